"""The Ray executor: its plan (dependencies), fault injection, and the smoke suite on a local Ray cluster with a
killed worker, compared row by row with a local run."""

import json
import os
import subprocess
import sys

import pytest

from bench.cli import narrow_suite
from bench.executors import (MODEL_FAMILIES, build_unit, cell_builds, diff_rows, extract_unit, plan_units)
from bench.runner import ALL_LAYERS, expand_cells, run_suite
from bench.suites import get_suite


def test_plan_has_the_real_dependencies():
    suite = get_suite("smoke")
    cells = expand_cells(suite)
    deps = plan_units(suite, cells)
    model = suite.models[0]
    builds = {u for u in deps if u.startswith("build:")}
    assert builds == {build_unit(model, s.label) for s in suite.methods}  # one build per spec, not per cell
    assert [u for u in deps if u.startswith("extract:")] == [extract_unit(model)]  # one extraction per store
    for spec in suite.methods:  # a budget-matched spec's build waits for the builds it copies K or tokens from
        targets = [build_unit(model, t) for t in getattr(spec, "match_to", None) or []]
        assert deps[build_unit(model, spec.label)] == [extract_unit(model), *targets]
    order = list(deps)
    assert all(order.index(u) < order.index(unit) for unit, waits in deps.items() for u in waits)
    sae = next(s.label for s in suite.methods if s.method == "sae")
    for cell in cells:
        assert build_unit(model, cell.spec) in deps[cell.id]
        ep = cell.spec.startswith("ep")
        assert (build_unit(model, sae) in deps[cell.id]) == (cell.spec == sae or (ep and cell.family in
                                                                                    ("cost", "correspondence")))
    cross = [c for c in cells if c.layer == ALL_LAYERS]
    assert cross and all(deps[c.id] == [build_unit(model, c.spec)] for c in cross)  # a build covers every layer
    assert {c.family for c in cells} & set(MODEL_FAMILIES)  # some cells run on the model's actor


def test_cell_builds_without_sae_is_own_spec():

    suite = narrow_suite(get_suite("smoke"), methods=["ep", "pca"])
    assert all(cell_builds(suite, c) == [c.spec] for c in expand_cells(suite))


def test_fault_point_kills_once(tmp_path):
    code = "from bench.executors import _fault_point; _fault_point('cellX'); print('survived')"
    env = {**os.environ, "EPBENCH_FAULT_KILL": "other,cellX", "EPBENCH_FAULT_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == -9 and "survived" not in first.stdout
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "survived" in second.stdout  # killed once only


def test_diff_rows_sees_a_changed_value(tmp_path):
    import pandas as pd

    base = {"model": "m", "layer": 1, "method": "ep", "detail": "", "ci_low": 0.0, "ci_high": 1.0, "n": 3,
            "method_config": "{}", "supervised": False, "seed": 0}
    rows = [{**base, "metric": "retrieval.precision@10", "value": 0.5},
            {**base, "metric": "build.wall_seconds", "value": 1.0}]
    for name, vals in (("a", (0.5, 1.0)), ("b", (0.5, 9.0)), ("c", (0.5000001, 1.0))):
        (tmp_path / name).mkdir()
        pd.DataFrame([{**r, "value": v} for r, v in zip(rows, vals)]).to_parquet(tmp_path / name / "rows.parquet")
    assert diff_rows(tmp_path / "a", tmp_path / "b").same  # wall time is a machine metric
    d = diff_rows(tmp_path / "a", tmp_path / "c")
    assert not d.same and "precision@10" in d.mismatched[0]
    assert diff_rows(tmp_path / "a", tmp_path / "c", rtol=1e-5).same
    with pytest.raises(FileNotFoundError, match="run the suite"):
        diff_rows(tmp_path / "a", tmp_path / "missing")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray executor's tests need the extra: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cache(tmp_path_factory):
    """The Ray runs' cache: the failure test reuses the smoke run's store instead of extracting again."""
    return tmp_path_factory.mktemp("ray_cache")


@pytest.mark.slow
def test_smoke_on_ray_with_killed_workers_matches_local(ray_cluster, ray_cache, tmp_path, monkeypatch):
    # the smoke grid less its two costliest additions (sparse probing, the SAE at EP's K: the same code paths as
    # the concept families and the other matched specs), to keep the test command under its 10-minute budget
    smoke = get_suite("smoke")
    suite = narrow_suite(smoke, methods=[m.label for m in smoke.methods if m.label != "sae@K"],
                         metrics=[f for f in smoke.metrics if f != "sparse_probing"])
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache_local"))
    local = run_suite(suite, tmp_path / "local", progress=False, report=False)

    # kill a build, a metric cell and the model actor mid-cell (after the work, before the result returns)
    cells = {c.family: c for c in expand_cells(suite) if c.spec.startswith("ep")}
    victims = [build_unit(suite.models[0], "ep"), cells["retrieval"].id, cells["recon"].id]
    monkeypatch.setenv("EPBENCH_CACHE", str(ray_cache))  # the Ray run extracts and builds anew
    monkeypatch.setenv("EPBENCH_FAULT_KILL", ",".join(victims))
    monkeypatch.setenv("EPBENCH_FAULT_DIR", str(tmp_path / "faults"))
    ray_run = run_suite(suite, tmp_path / "ray", progress=False, report=False, executor="ray")
    killed = sorted(p.name for p in (tmp_path / "faults").iterdir())
    assert len(killed) == len(victims), f"not every fault fired: {killed}"

    diff = diff_rows(local.dir, ray_run.dir)
    assert diff.n_rows > 300 and diff.same, diff
    meta = json.loads((ray_run.dir / "run.json").read_text())
    assert meta["executor"]["name"] == "ray" and meta["executor"]["cluster"]["nodes"]
    local_meta = json.loads((local.dir / "run.json").read_text())
    assert local_meta["executor"] == {"name": "local"}
    assert meta.get("data") == local_meta.get("data")  # the evaluation-data summary workers recorded
    record = json.loads(ray_run.cell_path(cells["retrieval"]).read_text())
    assert record["executor"]["name"] == "ray" and record["rows"]

    # a rerun resumes: every cell is already written, nothing is recomputed
    before = {p.name: p.stat().st_mtime_ns for p in ray_run.cells_dir.glob("*.json")}
    again = run_suite(suite, tmp_path / "ray", progress=False, report=False, executor="ray")
    assert {p.name: p.stat().st_mtime_ns for p in again.cells_dir.glob("*.json")} == before


@pytest.mark.slow
def test_a_real_failure_is_named_and_the_rest_finish(ray_cluster, ray_cache, tmp_path, monkeypatch):

    monkeypatch.setenv("EPBENCH_CACHE", str(ray_cache))
    suite = narrow_suite(get_suite("smoke"), layers=[1, 2], methods=["pca", "kmeans:k=1000000"],
                         metrics=["build", "retrieval"])
    with pytest.raises(RuntimeError) as err:
        run_suite(suite, tmp_path / "res", progress=False, report=False, executor="ray")
    msg = str(err.value)
    kmeans_cells = [c for c in expand_cells(suite) if c.spec.startswith("kmeans")]
    assert f"{len(kmeans_cells)} of {len(expand_cells(suite))} cells failed" in msg
    assert all(c.id in msg for c in kmeans_cells) and "build:tiny-gemma2:kmeans:k=1000000 failed" in msg
    written = {p.stem for p in (tmp_path / "res").glob("*/cells/*.json")}
    assert written == {c.id for c in expand_cells(suite) if c.spec == "pca"}  # the rest finished
