"""Suites, the runner's resume semantics, and the CLI surface (run, score, build, extract, report)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main, narrow_suite
from bench.runner import ALL_LAYERS, expand_cells
from bench.suites import MethodSpec, available_suites, get_suite

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("wall_seconds", "rows_per_s", "peak_memory", "flops")  # measured, so they differ between runs


def test_shipped_suites_and_method_spec_parsing():
    assert {"smoke", "default", "paper"} <= set(available_suites())
    spec = MethodSpec.parse("ep:p=2")
    assert spec.method == "ep" and spec.params == {"percentiles": [2]} and spec.label == "ep:p=2"
    assert MethodSpec.parse("kmeans:k=16/64,spherical=false").params == {"k": [16, 64], "spherical": False}
    with pytest.raises(ValueError, match="key=value"):
        MethodSpec.parse("ep:2")
    with pytest.raises(ValueError, match="unknown suite"):
        get_suite("nope")


def test_cells_cover_the_grid_and_skip_what_does_not_apply():
    suite = get_suite("smoke")
    cells = expand_cells(suite)
    assert cells[0].family == "build"
    fams = {(c.spec, c.family) for c in cells}
    assert ("ep", "correspondence") in fams and ("pca", "correspondence") not in fams
    assert ("random", "recon") not in fams and ("diffmean", "stability") not in fams
    assert all(c.layer == ALL_LAYERS for c in cells if c.family == "stability")
    assert len({c.id for c in cells}) == len(cells)
    specs = [c.spec for c in cells]  # method by method: each spec's cells are contiguous, its builds first
    assert specs == sorted(specs, key=[m.label for m in suite.methods].index)
    for spec in set(specs):
        mine = [c.family for c in cells if c.spec == spec]
        assert mine[: mine.count("build")] == ["build"] * mine.count("build") and mine.count("build") >= 1


def test_narrow_suite_keeps_suite_params_and_rejects_unknown_names():
    suite = narrow_suite(get_suite("default"), methods=["sae", "ep:p=2"], metrics=["build", "detection"])
    sae, ep = suite.methods
    assert sae.params["width"] == 2048 and ep.params["percentiles"] == [2] and ep.params["n_calib"] == 30_000
    with pytest.raises(KeyError, match="unknown method 'nosuch'"):
        narrow_suite(get_suite("smoke"), methods=["nosuch"])
    with pytest.raises(ValueError, match="unknown metric families"):
        narrow_suite(get_suite("smoke"), metrics=["vibes"])


def test_paper_suite_offline_fails_fast_naming_what_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.time()
    assert main(["run", "--suite", "paper", "--results-dir", str(tmp_path)]) == 1  # the environment, not the command
    assert time.time() - t0 < 10
    err = capsys.readouterr().err
    assert "google/gemma-2-2b" in err and "HF_HUB_OFFLINE" in err and "licence" in err


def test_build_cli_prints_k_cost_and_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "d.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"line {i} about topic {i % 7} " * 6}) for i in range(80)))
    rc = main(["build", "--method", "ep", "--percentiles", "2", "10", "--n-calib", "500", "--batch-contexts", "8",
               "--model", "tiny-gemma2", "--layer", "2", "--corpus", f"jsonl:{docs}", "--tokens", "4000",
               "--out", str(tmp_path / "arts")])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("ep:p=")]
    assert len(lines) == 2 and "theta=" in lines[0]
    k2, k10 = (int(ln.split()[1]) for ln in lines)
    assert k2 > k10 > 0
    assert (tmp_path / "arts").exists()
    assert main(["build", "--method", "ep", "--percentiles", "150", "--model", "tiny-gemma2", "--layer", "2"]) == 2
    assert "outside (0, 100)" in capsys.readouterr().err


RUN = [sys.executable, "-m", "bench", "run", "--suite", "smoke", "--no-report", "--metrics", "build", "retrieval",
       "detection", "probing", "ood", "stability"]


def _quality(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "rows.parquet")
    df = df[~df["metric"].str.contains("|".join(TIMING))]
    cols = ["cell_id", "method", "layer", "metric", "detail", "value", "ci_low", "ci_high", "n"]
    return df[cols].sort_values(cols[:5]).reset_index(drop=True)


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing_and_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EPBENCH_CACHE": str(tmp_path / "cache")}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(RUN + ["--results-dir", str(killed), "--run-id", "r"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = killed / "r" / "cells"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cells.glob("*.json"))) < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_text() for p in cells.glob("*.json")}
    assert 0 < len(before) < 60, "the kill missed the middle of the run"
    out = subprocess.run(RUN + ["--results-dir", str(killed), "--run-id", "r"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert f"{len(before)} already finished" in out
    assert all((cells / name).read_text() == text for name, text in before.items())  # not recomputed
    clean = tmp_path / "clean"
    subprocess.run(RUN + ["--results-dir", str(clean), "--run-id", "r"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pd.testing.assert_frame_equal(_quality(killed / "r"), _quality(clean / "r"))


def test_family_layer_limits_fall_back_when_the_suite_is_narrowed():
    suite = narrow_suite(get_suite("default"), layers=[12], methods=["ep"], metrics=["causal", "build"])
    assert {c.layer for c in expand_cells(suite) if c.family == "causal"} == {12}
    full = get_suite("default")
    assert {c.layer for c in expand_cells(full) if c.family == "causal"} == set(full.family_layers["causal"])


def test_correspondence_cells_save_per_region_best_f1_for_the_histogram(tmp_path):
    import numpy as np

    from bench.runner import run_suite

    suite = narrow_suite(get_suite("smoke"), layers=[1], methods=["ep", "sae"], metrics=["build", "correspondence"])
    run = run_suite(suite, tmp_path, progress=False, report=True)
    (extra,) = sorted((run.dir / "extras").glob("correspondence_*ep_p=2*.npy"))
    f1 = np.load(extra)
    rows = pd.read_parquet(run.dir / "rows.parquet")
    share = rows[(rows.metric == "correspondence.share_f1>0.5") & (rows.method == "ep:p=2")].value.item()
    assert np.isclose((f1 > 0.5).mean(), share)
    assert "plots/correspondence.png" in (run.dir / "DETAILS.md").read_text()  # linked from REPORT.md


def test_first_patterns_reorder_unfinished_cells_without_dropping_any():
    from bench.cells import Cell
    from bench.runner import prioritised

    cells = [Cell("m", L, spec, fam) for spec in ("kmeans@K", "random@K") for fam in ("build", "cost")
             for L in (4, 8)]
    got = prioritised(cells, ["*random_K__cost", "*random_K*"])
    assert [c.id for c in got[:2]] == ["m__L04__random_K__cost", "m__L08__random_K__cost"]
    assert [c.id for c in got[2:4]] == ["m__L04__random_K__build", "m__L08__random_K__build"]
    assert got[4:] == cells[:4] and sorted(map(id, got)) == sorted(map(id, cells))  # kmeans@K after, in order
    assert prioritised(cells, []) == cells
