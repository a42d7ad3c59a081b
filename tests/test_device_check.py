"""The GPU check script's CPU-only path (CPU against CPU), its exemplar-decision check (the TF32 report) and its
wheelhouse handling, so the script cannot rot on machines without a GPU."""

import pytest
import torch

from bench.device_check import (ExemplarComparison, compare_exemplars, install_from_wheelhouse, main,
                                missing_modules)
from bench.store import write_synthetic_store
from methods.exemplar_partitioning import EPArtefact, ExemplarPartitioning, tf32_matmuls


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(24, 32, 48, generator=g) + 3 * torch.randn(6, 48, generator=g)[torch.arange(24) % 6, None]
    return write_synthetic_store(tmp_path_factory.mktemp("dc") / "s", {0: acts}, shard_contexts=8)


def _ep(store, **kw):
    return ExemplarPartitioning(percentiles=[5.0], n_calib=400, batch_contexts=4, device="cpu", **kw).fit(store, 0)


def test_two_runs_on_one_stream_make_the_same_decisions_and_tf32_is_a_cpu_no_op(store):
    a, b, t = _ep(store), _ep(store), _ep(store, tf32=True)
    assert a.K > 5
    assert compare_exemplars(a, b) == ExemplarComparison(a.K, a.K, None, 0)
    assert compare_exemplars(a, t).identical and t.config.tf32 and not a.config.tf32


def test_a_changed_decision_is_reported_with_its_index(store):
    a = _ep(store)
    tensors = dict(a.tensors)
    ctx = tensors["exemplar_context"].clone()
    ctx[3] += 1  # another row became exemplar #3
    changed = EPArtefact(a.config, {**tensors, "exemplar_context": ctx}, a.info)
    c = compare_exemplars(a, changed)
    assert (c.first_difference, c.n_different, c.identical) == (3, 1, False)
    fewer = EPArtefact(a.config, {k: (v[:-2] if k.startswith("exemplar_") else v) for k, v in tensors.items()},
                       a.info)
    c = compare_exemplars(a, fewer)
    assert (c.K_other, c.first_difference, c.n_different) == (a.K - 2, a.K - 2, 2)


def test_tf32_matmuls_restores_the_setting():
    mm = torch.backends.cuda.matmul
    before = mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32
    with tf32_matmuls(True):
        inside = mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32
        assert inside in ("tf32", True)
    assert (mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32) == before


def test_wheelhouse_installs_only_what_is_missing(tmp_path):
    assert missing_modules() == []  # this venv has every runtime module
    with pytest.raises(FileNotFoundError, match="--build-wheelhouse"):
        install_from_wheelhouse(tmp_path / "absent")
    (tmp_path / "numpy-0.0.0-py3-none-any.whl").write_bytes(b"")  # installed here: never passed to pip
    assert install_from_wheelhouse(tmp_path) == []


def test_cuda_requested_without_gpu_is_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_path_end_to_end(tmp_path, capsys):
    # benchmarks are left out here: tests/test_benchmarks.py runs their quick mode
    code = main(["--device", "cpu", "--quick", "--skip", "benchmarks", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for check in ("extraction fp32", "extraction bf16", "smoke rows equal to CPU", "identical exemplars",
                  "EP d=2304 exemplars cpu fp32 = CPU", "TF32 decisions", "SAE EV cpu vs CPU"):
        line = next(line for line in out.splitlines() if check in line)
        assert line.endswith(("PASS", "info")), line
    assert "FAIL" not in out
