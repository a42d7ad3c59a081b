"""Issue 21 items 1-5, 12, 14, 15: a researcher's own dictionary, data and command line.

A `--path` SAE is cached by its files' bytes (not its path string); `score --metrics recon` plans recon cells for
it; its rows record its own shape and an unknown training budget; `--version`, exit codes 2 (usage) and 1
(runtime), flag aliases; a user's prompt file is used whole unless `--max-prompts` samples it, and the report's
level-of-evidence line names the user's data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main, with_data
from bench.suites import get_suite
from methods.base import load_artefact

LAYER = 1
TINY = ["--model", "tiny-gemma2", "--layers", str(LAYER), "--tokens", "3000"]


def _sae_dir(root: Path, name: str, seed: int, width: int) -> Path:
    """A sae-lens SAE directory of a TopK SAE trained here (built, then exported through epbench)."""
    arts = root / f"arts-{name}"
    assert main(["build", "--method", "sae", "--layer", str(LAYER), "--model", "tiny-gemma2", "--tokens", "3000",
                 "--width", str(width), "--k", "4", "--training-tokens", "2048", "--batch-rows", "256",
                 "--buffer-rows", "512", "--seed", str(seed), "--device", "cpu", "--out", str(arts)]) == 0
    (art_dir,) = [p.parent for p in arts.rglob("cfg.json")]
    out = root / name
    assert main(["export", str(art_dir), "--format", "sae-lens", str(out)]) == 0
    return out


def _score(results: Path, run_id: str, path: Path) -> pd.DataFrame:
    assert main(["score", *TINY, "--methods", f"sae:path={path}", "--metrics", "recon", "build",
                 "--results-dir", str(results), "--run-id", run_id]) == 0
    return pd.read_csv(results / run_id / "rows.csv")


@pytest.fixture(scope="module")
def two_saes(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPBENCH_CACHE", str(root / "cache"))
        yield root, _sae_dir(root, "a", seed=0, width=32), _sae_dir(root, "b", seed=1, width=48)


def test_an_overwritten_path_sae_is_rescored_not_served_from_the_cache(two_saes, tmp_path, monkeypatch, capsys):
    import shutil

    root, a, b = two_saes
    monkeypatch.setenv("EPBENCH_CACHE", str(root / "cache"))
    mine = tmp_path / "my_sae"  # an absolute path: `/` also separates list items in a spec
    shutil.copytree(a, mine)
    first = _score(tmp_path / "r", "first", mine)
    ev = "recon.explained_variance"
    assert ev in set(first["metric"])  # recon cells are planned for a `--path` SAE (they were 0)
    shutil.rmtree(mine)
    shutil.copytree(b, mine)  # the same path string, another SAE
    second = _score(tmp_path / "r", "second", mine)
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "fresh"))
    fresh = _score(tmp_path / "r", "fresh", mine)
    value = {n: d.set_index("metric")["value"] for n, d in (("first", first), ("second", second), ("fresh", fresh))}
    assert value["second"][ev] == pytest.approx(value["fresh"][ev], abs=1e-9)  # the new SAE's number
    assert value["second"][ev] != pytest.approx(value["first"][ev], abs=1e-6)  # not the stale one
    assert value["second"]["build.K"] == 48 and value["first"]["build.K"] == 32
    with capsys.disabled():
        print(f"\n  overwritten --path SAE: EV {value['first'][ev]:.6f} (first SAE) -> {value['second'][ev]:.6f} "
              f"(rescored; a fresh cache gives {value['fresh'][ev]:.6f})", end="")


def test_a_disk_sae_records_its_own_shape_and_an_unknown_training_budget(two_saes, tmp_path, monkeypatch):
    from metrics.cost import build_cost_rows, training_budget
    from methods.sae import SAEMethod
    from bench.store import find_stores

    root, a, _ = two_saes
    monkeypatch.setenv("EPBENCH_CACHE", str(root / "cache"))
    store = find_stores("tiny-gemma2", LAYER)[0]
    art = SAEMethod(path=str(a), device="cpu").fit(store, LAYER)  # the suite's training defaults: width 4096, k 32
    rec = art.config_record()
    assert rec["width"] == 32 == art.K and rec["k"] == 4 and rec["architecture"] == "topk"
    assert rec["path"] == str(a.resolve()) and "training_tokens" not in rec
    rows = {r.metric: r for r in build_cost_rows(art)}
    assert math.isnan(rows["cost.build.tokens"].value) and math.isnan(rows["cost.build.flops"].value)
    assert rows["cost.build.wall_seconds"].value > 0 and "training budget is unknown" in rows["cost.build.tokens"].detail
    tokens, flops, how = training_budget(art)
    assert math.isnan(tokens) and math.isnan(flops) and "unknown" in how
    assert json.loads(rows["cost.build.tokens"].method_config)["width"] == 32


def test_export_prints_its_reconstruction_and_names_the_model_for_downstream_tools(two_saes, tmp_path, monkeypatch,
                                                                                  capsys):
    from bench.export import downstream_model_name

    root, _, _ = two_saes
    monkeypatch.setenv("EPBENCH_CACHE", str(root / "cache"))
    (art_dir,) = [p.parent for p in (root / "arts-a").rglob("cfg.json")]
    capsys.readouterr()
    assert main(["export", str(art_dir), "--format", "sae-lens", str(tmp_path / "o"), "--model-name", "me/mine"]) == 0
    out = capsys.readouterr().out
    assert "explained variance" in out and "store rows" in out
    assert json.loads((tmp_path / "o" / "cfg.json").read_text())["metadata"]["model_name"] == "me/mine"
    check = json.loads((tmp_path / "o" / "epbench_export.json").read_text())["reconstruction"]
    assert check["rows"] > 0 and -1 < check["explained_variance"] <= 1
    assert downstream_model_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert downstream_model_name("gemma-3-270m") == "google/gemma-3-270m"


def test_version_and_exit_codes_and_flag_aliases(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("epbench 0.")
    for argv in (["score", "--layer", "1", "--method", "nope"], ["score", "--layers", "1", "--methods", "nope"],
                 ["run", "--suite", "smoke", "--methods", "nope", "--results-dir", str(tmp_path)],
                 ["run", "--suite", "smoke", "--method", "nope", "--layer", "1", "--results-dir", str(tmp_path)]):
        assert main(argv) == 2, argv  # usage: nothing started
        assert "unknown method" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run folder made for a usage error
    assert main(["report", "no-such-run", "--results-dir", str(tmp_path)]) == 2
    assert main(["run", "--suite", "smoke", "--methods", "random", "--metrics", "recon", "--results-dir",
                 str(tmp_path)]) == 2  # random directions do not decode: nothing to run, said before any work
    assert "nothing to run" in capsys.readouterr().err


def test_a_users_prompt_file_is_used_whole_and_any_sample_is_printed(tmp_path, monkeypatch):
    from bench.context import ModelContext

    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    countries = ["France", "Spain", "Italy", "Germany", "Japan", "China", "Brazil", "Canada", "Egypt", "India"]
    lines = [{"prompt": f"Fact {i}: the country {c} is in", "target": " Europe", "contrast": " Asia"}
             for i in range(30) for c in countries]  # 300 written prompts
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    suite = get_suite("default")
    assert suite.max_prompts is not None  # the shipped sets are capped
    whole = with_data(suite, prompts=[str(f)])
    assert whole.max_prompts is None and str(tmp_path) not in whole.evidence and "mine.jsonl" in whole.evidence
    sampled = with_data(suite, prompts=[str(f)], max_prompts=50)
    for s, n_used in ((whole, 300), (sampled, 50)):
        s.models, s.layers = ["tiny-gemma2"], [LAYER]
        ctx = ModelContext(s, "tiny-gemma2", progress=False)
        ps = ctx.prompt_sets[str(f)]
        summary = ctx.data_summary()["prompt_sets"]["mine"]  # named by the file, not its absolute path
        assert summary["written"] == 300 and summary["sampled"] == (None if n_used == 300 else 50)
        assert summary["kept"] == ps.n_kept <= n_used
    from bench.report.tables import data_md

    line = "\n".join(data_md({"m": {"prompt_sets": {"mine": summary}}}))
    assert "of 50 sampled (seeded) from 300 written" in line
