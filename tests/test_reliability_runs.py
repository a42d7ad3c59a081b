"""Issue 9 items 1, 3, 4, 5, 11 in the run path: cached artefacts verified and keyed by every input, derived
tables checked against the cells, zero-row cells refused, one process per run directory."""

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from bench.cache import LockBusy
from bench.cli import narrow_suite
from bench.context import ModelContext
from bench.families import FAMILIES
from bench.runner import Run, run_suite, verify_tables
from bench.suites import get_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _suite(layers=(1,), methods=("pca",), metrics=("build", "retrieval")):
    return narrow_suite(get_suite("smoke"), layers=list(layers), methods=list(methods), metrics=list(metrics))


def _values(run_dir: Path) -> pd.Series:
    df = pd.read_parquet(run_dir / "rows.parquet")
    df = df[~df.metric.str.contains("wall_seconds|peak_memory|rows_per_s")]
    return df.set_index(["cell_id", "metric", "detail"])["value"].sort_index()


def test_a_corrupted_cached_artefact_is_rebuilt_and_says_so(tmp_path, cache, capsys):
    first = run_suite(_suite(), tmp_path / "r", run_id="a", progress=False, report=False)
    clean = _values(first.dir)
    (tensors,) = cache.glob("artefacts/*/pca-*/*/L01/*/artefact.safetensors")
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x01
    tensors.write_bytes(bytes(data))
    capsys.readouterr()
    again = run_suite(_suite(), tmp_path / "r", run_id="b", progress=False, report=False)
    assert "cached artefact unusable, rebuilding it" in capsys.readouterr().out
    pd.testing.assert_series_equal(_values(again.dir).droplevel(0), clean.droplevel(0))


def test_a_flipped_byte_in_rows_parquet_never_reaches_a_reader(tmp_path, cache, capsys):
    run = run_suite(_suite(), tmp_path, run_id="r", progress=False, report=False)
    clean = _values(run.dir)
    assert verify_tables(run.dir) is False  # fresh tables pass
    p = run.dir / "rows.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x10
    p.write_bytes(bytes(data))
    assert verify_tables(run.dir) is True
    assert "rows.parquet is missing or damaged" in capsys.readouterr().out
    pd.testing.assert_series_equal(_values(run.dir), clean)
    csv = run.dir / "rows.csv"
    csv.write_text(csv.read_text()[:200])  # truncated
    assert verify_tables(run.dir) is True and len(pd.read_csv(csv)) == len(clean) + _n_excluded(run.dir)
    (run.dir / "cells" / "extra.json").write_text(next((run.dir / "cells").glob("*.json")).read_text())
    assert verify_tables(run.dir) is True  # tables older than the cells are rebuilt too
    assert "older than the cells" in capsys.readouterr().out


def _n_excluded(run_dir: Path) -> int:
    df = pd.read_parquet(run_dir / "rows.parquet")
    return int(df.metric.str.contains("wall_seconds|peak_memory|rows_per_s").sum())


def test_a_cell_with_zero_rows_is_an_error_not_a_finish(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(FAMILIES, "retrieval", lambda ctx, cell: [])
    with pytest.raises(RuntimeError, match="retrieval produced no rows"):
        run_suite(_suite(), tmp_path, run_id="r", progress=False, report=False)
    assert not list((tmp_path / "r" / "cells").glob("*retrieval*.json"))


def test_a_torn_cell_file_is_recomputed(tmp_path, cache, capsys):
    run = run_suite(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False, report=False)
    (cell,) = (run.dir / "cells").glob("*.json")
    cell.write_text(cell.read_text()[:50])
    run_suite(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False, report=False)
    assert "will be recomputed" in capsys.readouterr().out and json.loads(cell.read_text())["rows"]


def test_the_artefact_key_covers_layers_concept_sets_and_code(cache, monkeypatch):
    suite = _suite(methods=("diffmean",))
    ctx = ModelContext(suite, "tiny-gemma2")
    spec = suite.methods[0]
    bbc = get_suite("smoke")
    from bench.concepts import get_concept_set

    ctx.__dict__["concept_sets"] = {"bbc": get_concept_set("bbc", seed=0, per_concept=6)}
    key = ctx.inputs_key(spec)
    ctx.__dict__["concept_sets"] = {"bbc": get_concept_set("bbc", seed=1, per_concept=6)}
    assert ctx.inputs_key(spec) != key  # other supervision: another artefact
    ctx.__dict__["concept_sets"] = {"bbc": get_concept_set("bbc", seed=0, per_concept=6)}
    assert ctx.inputs_key(spec) == key
    wide = ModelContext(narrow_suite(bbc, layers=[1, 2], methods=["diffmean"]), "tiny-gemma2")
    wide.__dict__["concept_sets"] = ctx.concept_sets
    assert wide.inputs_key(spec) != key  # other layers
    import inspect

    real = inspect.getsourcefile
    edited = cache / "diffmean_edited.py"
    edited.parent.mkdir(parents=True, exist_ok=True)
    edited.write_text(Path(real(sys.modules["methods.diffmean"])).read_text() + "\n# edited\n")
    monkeypatch.setattr(inspect, "getsourcefile",
                        lambda obj: str(edited) if getattr(obj, "__name__", "") == "methods.diffmean" else real(obj))
    assert ctx.inputs_key(spec) != key  # other method code


def test_a_store_with_more_layers_serves_each_layer_in_turn(tmp_path, cache):
    """The README's extract-then-score workflow: a 2-layer store, then layer 1, then layer 2 (was KeyError: 2)."""
    from bench.store import ExtractionRequest, extract

    s = get_suite("smoke")
    extract(ExtractionRequest(model="tiny-gemma2", layers=[1, 2], corpus=s.corpus, tokens=s.store_tokens,
                              ctx_len=s.ctx_len, seed=s.seed), progress=False)
    for layer in (1, 2):
        run = run_suite(_suite(layers=(layer,), metrics=("build",)), tmp_path, progress=False, report=False)
        assert {c["cell"]["layer"] for c in map(json.loads, map(Path.read_text, run.cells_dir.glob("*.json")))} == {layer}
    assert len(list(cache.glob("stores/*/manifest.json"))) == 1  # both layers read the one store


HOLD = """
import sys, time
from bench.runner import Run
from bench.cli import narrow_suite
from bench.suites import get_suite
Run(narrow_suite(get_suite("smoke"), layers=[1], methods=["pca"], metrics=["build"]), sys.argv[1], run_id="r",
    progress=False)
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_process_on_the_same_run_refuses_in_one_line(tmp_path, cache):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(LockBusy, match=r"run .*r is in use by pid \d+") as e:
            Run(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False)
        assert "\n" not in str(e.value)
    finally:
        proc.kill()
        proc.wait()
    Run(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False)  # free again once the holder is gone


def test_concurrent_table_writes_use_unique_temporary_names(tmp_path, cache):
    run = run_suite(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False, report=False)
    errors = []

    def write():
        try:
            for _ in range(5):
                run.write_tables()
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not list(run.dir.glob("*.tmp")) and not list(run.dir.glob(".*.tmp"))
    assert verify_tables(run.dir) is False


@pytest.mark.parametrize("damage", ['{"run_id": "r", "sta', "[1, 2]"])
def test_a_damaged_run_json_is_rewritten_and_the_run_resumes(tmp_path, cache, capsys, damage):
    run = run_suite(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False, report=False)
    (run.dir / "run.json").write_text(damage)
    again = run_suite(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False, report=False)
    out = capsys.readouterr().out
    assert "run.json is damaged; rewriting it" in out and "1 already finished" in out
    assert json.loads((again.dir / "run.json").read_text())["run_id"] == "r"


def test_a_bit_flipped_store_is_repaired_by_the_next_run(tmp_path, cache, capsys):
    first = run_suite(_suite(metrics=("build",)), tmp_path, run_id="a", progress=False, report=False)
    (store,) = [p.parent for p in cache.glob("stores/*/manifest.json")
                if json.loads(p.read_text())["request"]["corpus"] == get_suite("smoke").corpus]
    shard = next(store.glob("L01/*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x08
    shard.write_bytes(bytes(data))
    again = run_suite(_suite(metrics=("build",)), tmp_path, run_id="b", progress=False, report=False)
    assert "needs repair" in capsys.readouterr().out
    pd.testing.assert_series_equal(_values(again.dir).droplevel(0), _values(first.dir).droplevel(0))


def test_an_interrupted_multi_fit_build_resumes_at_the_next_fit(cache, monkeypatch):
    import dataclasses

    import torch

    from bench.store import write_synthetic_store
    from bench.suites import MethodSpec
    from methods.base import Artefact
    from methods.random_directions import RandomDirections

    g = torch.Generator().manual_seed(0)
    store = write_synthetic_store(cache.parent / "store", {L: torch.randn(16, 8, 12, generator=g) for L in (1, 2)})
    suite = dataclasses.replace(get_suite("smoke"), layers=[1, 2], concept_sets=[],
                                methods=[MethodSpec("random", {"k": 5}, seeds=[0, 1, 2])])
    ctx = ModelContext(suite, "synthetic", progress=False, store=store)
    spec = ctx.spec("random")
    fitted: list[tuple[int, int]] = []
    real_fit = RandomDirections.fit

    def counting_fit(self, store, layer, concepts=None):
        if len(fitted) == 3 and stop_at_fourth:
            raise KeyboardInterrupt  # the session ends mid-build
        fitted.append((self.config.seed, layer))
        return real_fit(self, store, layer)

    monkeypatch.setattr(RandomDirections, "fit", counting_fit)
    stop_at_fourth = True
    with pytest.raises(KeyboardInterrupt):
        ctx._load_or_build(spec)
    assert fitted == [(0, 1), (0, 2), (1, 1)]
    stop_at_fourth = False
    saved: list[str] = []
    real_save = Artefact.save
    monkeypatch.setattr(Artefact, "save", lambda self, path: (saved.append(str(path)), real_save(self, path))[1])
    resumed = ctx._load_or_build(spec)
    assert fitted[3:] == [(1, 2), (2, 1), (2, 2)]  # the three finished fits are not repeated
    assert len(saved) == 3  # each new fit is written once, as its checkpoint, then moved into the index's place
    root = next(cache.glob("artefacts/*/random-*/*"))
    assert not (root / "fits").exists()  # once the index is written the checkpoints are folded into it
    indexed = ctx._load_cached(root)
    for L in (1, 2):
        for a, b in zip(resumed[L], indexed[L]):
            assert a.name == b.name and torch.equal(a.directions, b.directions)
    for path in root.glob("*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    fresh = ctx._load_or_build(spec)  # a build never interrupted gives the same artefacts
    for L in (1, 2):
        assert [a.name for a in resumed[L]] == [a.name for a in fresh[L]]
        for a, b in zip(resumed[L], fresh[L]):
            assert a.config.seed == b.config.seed
            torch.testing.assert_close(a.directions, b.directions, rtol=0, atol=0)


def _stop_after_first_cell(monkeypatch):
    """bench.runner's clock jumps a day ahead once the first cell has finished (the rest of time is untouched)."""
    import time as real
    import types

    import bench.runner as runner

    finished = []
    original = Run.run_cell

    def run_cell(self, cell):
        rows = original(self, cell)
        finished.append(cell.id)
        return rows

    clock = types.SimpleNamespace(**{k: getattr(real, k) for k in ("strftime", "gmtime", "localtime", "perf_counter")},
                                  time=lambda: real.time() + (86_400 if finished else 0))
    monkeypatch.setattr(Run, "run_cell", run_cell)
    monkeypatch.setattr(runner, "time", clock)
    return finished


def test_a_stop_time_ends_the_run_after_the_cell_in_flight_and_the_next_sitting_continues(
        tmp_path, cache, capsys, monkeypatch):
    import time

    suite = _suite(metrics=("build", "retrieval"))
    finished = _stop_after_first_cell(monkeypatch)
    run = run_suite(suite, tmp_path, run_id="r", progress=False, report=False, stop_at=time.time() + 3600)
    out = capsys.readouterr().out
    assert len(finished) == 1 and len(list(run.cells_dir.glob("*.json"))) == 1
    assert "1 of 2 cells finished, 1 left" in out and "continues it" in out
    meta = json.loads((run.dir / "run.json").read_text())
    assert "finished" not in meta and pd.read_parquet(run.dir / "rows.parquet").cell_id.nunique() == 1
    monkeypatch.undo()
    monkeypatch.setenv("EPBENCH_CACHE", str(cache))
    monkeypatch.setattr("bench.runner.machine_info", lambda: {"cpu_model": "another CPU"})
    again = run_suite(suite, tmp_path, run_id="r", progress=False, report=True)
    assert "1 already finished" in capsys.readouterr().out
    meta = json.loads((again.dir / "run.json").read_text())
    assert meta["finished"] and [s["machine"].get("cpu_model") == "another CPU" for s in meta["sittings"]] == [
        False, True]
    cells = {json.loads(p.read_text())["cell"]["family"]: json.loads(p.read_text()) for p in run.cells_dir.glob("*")}
    assert cells["build"]["sitting"] == 0 and cells["retrieval"]["sitting"] == 1
    report = (again.dir / "REPORT.md").read_text()
    assert "**sittings**: 2" in report and "1 cells; #2" in report and "machine differ between sittings" in report
    with pytest.raises(ValueError, match="local executor only"):
        run_suite(suite, tmp_path, run_id="r", executor="ray", stop_at=time.time() + 60)


def test_a_run_json_from_before_sittings_keeps_its_provenance_as_the_first_sitting(tmp_path, cache):
    run = run_suite(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False, report=False)
    meta = json.loads((run.dir / "run.json").read_text())
    del meta["sittings"]
    meta["machine"] = {"cpu_model": "the old machine"}
    (run.dir / "run.json").write_text(json.dumps(meta))
    run_suite(_suite(metrics=("build",)), tmp_path, run_id="r", progress=False, report=False)
    sittings = json.loads((run.dir / "run.json").read_text())["sittings"]
    assert [s["started"] is None for s in sittings] == [True, False]
    assert sittings[0]["machine"] == {"cpu_model": "the old machine"} != sittings[1]["machine"]


def test_a_later_sitting_matches_to_a_targets_recorded_budget_without_refitting_it(tmp_path, cache, monkeypatch):
    suite = _suite(methods=("ep", "kmeans@K"), metrics=("build",))
    _stop_after_first_cell(monkeypatch)
    import time

    run_suite(suite, tmp_path, run_id="r", progress=False, report=False, stop_at=time.time() + 3600)  # EP's build
    monkeypatch.undo()
    built = []
    original = ModelContext._load_or_build

    def load_or_build(self, spec):
        built.append(spec.label)
        return original(self, spec)

    monkeypatch.setattr(ModelContext, "_load_or_build", load_or_build)
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "fresh"))  # a new session: nothing cached
    later = run_suite(suite, tmp_path, run_id="r", progress=False, report=False)
    assert built == ["kmeans@K"]  # EP's K and rows came from its build cell, EP was not refitted
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "other"))
    live = run_suite(suite, tmp_path / "live", run_id="r", progress=False, report=False)
    assert built[1:] == ["ep", "kmeans@K"]  # a fresh run: the target is fitted (in its own build cell)

    def matched(run):
        (path,) = run.cells_dir.glob("*kmeans_K__build.json")
        return [{k: a[k] for k in ("name", "K", "rows", "fit_rows", "matched_to")}
                for a in json.loads(path.read_text())["artefacts"]]

    assert matched(later) == matched(live) and matched(live)[0]["matched_to"]["kind"] == "K"
