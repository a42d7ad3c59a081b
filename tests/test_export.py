"""`epbench export --format sae-lens`: sae-lens' own loader, in a process that cannot import epbench, encodes and
decodes real activations (tiny-gemma2) exactly as epbench does; unexpressible readouts are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.export import export_sae_lens, plan_export
from bench.store import ExtractionRequest, extract
from methods.registry import get_method

LAYER = 1
TOL = 1e-4  # relative to the largest |value|: float32 rounding of the same products summed in another order

# Runs with only sae-lens: any import of epbench's packages fails, so the directory must stand on its own.
LOADER = r"""
import importlib.abc, sys
class NoEpbench(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("bench", "methods", "metrics"):
            raise ImportError(f"{name}: epbench must not be needed to load an exported SAE")
sys.meta_path.insert(0, NoEpbench())
import numpy as np, torch
from sae_lens import SAE
x = torch.from_numpy(np.load(sys.argv[1]))
for d in sys.argv[2:]:
    sae = SAE.load_from_disk(d)
    f = sae.encode(x)
    np.save(d + "/enc.npy", f.detach().numpy()); np.save(d + "/dec.npy", sae.decode(f).detach().numpy())
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Real activations of tiny-gemma2 and EP, k-means, PCA, random and SAE artefacts fitted on them."""
    root = tmp_path_factory.mktemp("export")
    old = os.environ.get("EPBENCH_CACHE")
    os.environ["EPBENCH_CACHE"] = str(root / "cache")
    try:
        store = extract(ExtractionRequest(model="tiny-gemma2", layers=[LAYER], corpus="bbc", tokens=6000, ctx_len=64),
                        progress=False, device="cpu")
        params = {"ep": {"percentiles": [2], "n_calib": 2000, "batch_contexts": 8},
                  "kmeans": {"k": 16, "n_rows": 2000, "n_calib": 2000}, "pca": {"k": 8}, "random": {"k": 32},
                  "sae": {"architecture": "topk", "width": 64, "k": 4, "training_tokens": 4096, "batch_rows": 256,
                          "buffer_rows": 512, "progress": False, "device": "cpu"}}
        arts = {m: get_method(m)(**p).fit(store, LAYER) for m, p in params.items()}
        x = next(store.batches(LAYER, batch_contexts=16)).acts
        yield store, arts, x, root
    finally:
        if old is None:
            os.environ.pop("EPBENCH_CACHE", None)
        else:
            os.environ["EPBENCH_CACHE"] = old


# (method, export kwargs): every exact mapping
CASES = [("ep", {"readout": "topk", "k": 1, "basis": "exemplar"}), ("ep", {"readout": "topk", "k": 1, "basis": "mean"}),
         ("ep", {"readout": "topk", "k": 3}), ("ep", {"readout": "signed"}), ("kmeans", {"readout": "topk", "k": 1}),
         ("pca", {}), ("random", {}), ("sae", {})]


def _expected(art, x: torch.Tensor, kw: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
    """epbench's own features and reconstruction for the readout an export reproduces."""
    basis = {"basis": kw.get("basis", "exemplar")} if art.method == "ep" else {}
    readout = plan_export(art, **kw).readout
    if readout == "topk":
        f = art.encode(x, "topk", k=kw.get("k", 1), **basis)
    elif art.method == "sae":
        f = art.encode(x)
    else:
        f = art.encode(x, readout)
    rec = f @ art.basis(basis["basis"]) + art.center if art.method == "ep" else (
        art.decode(f) if art.reconstructs else f @ art.directions + art.center)
    return f, rec, readout


def test_sae_lens_loads_every_export_without_epbench_and_matches_epbench(fitted, capsys):
    store, arts, x, root = fitted
    dirs = []
    for i, (m, kw) in enumerate(CASES):
        dirs.append(export_sae_lens(arts[m], root / f"out{i}", **kw)[0])
    np.save(root / "x.npy", x.numpy())
    subprocess.run([sys.executable, "-c", LOADER, str(root / "x.npy"), *map(str, dirs)], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": ""})
    errors = {}
    for (m, kw), d in zip(CASES, dirs):
        art = arts[m]
        f_sl, rec_sl = torch.from_numpy(np.load(d / "enc.npy")), torch.from_numpy(np.load(d / "dec.npy"))
        f, rec, readout = _expected(art, x, kw)
        if f_sl.shape[1] == 2 * art.K:  # dense readouts: positive and negative parts
            assert (f_sl >= 0).all()
            f_sl = f_sl[:, :art.K] - f_sl[:, art.K:]
        assert f_sl.shape == f.shape
        enc_err = float((f_sl - f).abs().max() / f.abs().max())
        rec_err = float((rec_sl - rec).abs().max() / rec.abs().max())
        if readout == "topk":
            assert torch.equal(f_sl != 0, f != 0), f"{m} {kw}: sae-lens picked other latents"
        assert enc_err < TOL and rec_err < TOL, (m, kw, enc_err, rec_err)
        errors[f"{m} {readout} {kw}"] = (enc_err, rec_err)
        assert json.loads((d / "epbench_export.json").read_text())["readout"] == readout
    with capsys.disabled():
        for name, (e, r) in errors.items():
            print(f"\n  export round trip {name}: max rel. error encode {e:.1e}, decode {r:.1e}", end="")


def test_ep_topk_k1_is_a_topk_sae_with_the_exemplars_as_encoder_and_decoder(fitted):
    _, arts, _, _ = fitted
    ep = arts["ep"]
    plan = plan_export(ep, "topk", k=1)
    assert plan.cfg["architecture"] == "topk" and plan.cfg["k"] == 1 and plan.cfg["apply_b_dec_to_input"]
    assert torch.equal(plan.state["W_enc"], ep.directions.T) and torch.equal(plan.state["W_dec"], ep.directions)
    assert torch.equal(plan.state["b_dec"], ep.center) and not plan.state["b_enc"].any()


@pytest.mark.parametrize("method,readout", [("ep", "binary"), ("ep", "cosine"), ("kmeans", "binary")])
def test_readouts_sae_lens_cannot_express_are_refused_with_the_reason(fitted, tmp_path, method, readout):
    _, arts, _, _ = fitted
    with pytest.raises(ValueError, match=f"the '{readout}' readout cannot be exported"):
        export_sae_lens(arts[method], tmp_path / "o", readout=readout)
    assert not (tmp_path / "o").exists()


def test_export_refuses_a_non_empty_out_and_keeps_its_files(fitted, tmp_path):
    _, arts, _, _ = fitted
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_sae_lens(arts["pca"], tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine" and not (tmp_path / "cfg.json").exists()


def test_sae_path_benchmarks_any_sae_lens_directory_and_cli_export(fitted, tmp_path, capsys):
    from bench.cli import main
    from methods.sae import SAEMethod

    store, arts, x, root = fitted
    arts["ep"].save(tmp_path / "ep")
    assert main(["export", str(tmp_path / "ep"), "--format", "sae-lens", str(tmp_path / "sl")]) == 0
    assert "SAE.load_from_disk" in capsys.readouterr().out
    art = SAEMethod(path=str(tmp_path / "sl"), device="cpu").fit(store, LAYER)
    assert art.info["source"] == "disk" and art.K == arts["ep"].K
    torch.testing.assert_close(art.encode(x), arts["ep"].encode(x, "topk", k=1), rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        SAEMethod(path=str(tmp_path / "nowhere"), device="cpu").fit(store, LAYER)
    assert main(["export", str(tmp_path / "ep"), "--format", "sae-lens", str(tmp_path / "b"), "--readout", "binary"]) == 2
    assert "cannot be exported" in capsys.readouterr().err


def test_diffmean_projection_exports_as_a_two_sided_relu_sae(fitted):
    from sae_lens import SAE

    from methods.diffmean import DiffMeanArtefact, DiffMeanConfig

    _, _, x, _ = fitted
    g = torch.Generator().manual_seed(1)
    dirs = torch.randn(3, x.shape[1], generator=g)
    art = DiffMeanArtefact(DiffMeanConfig(), {"directions": dirs / dirs.norm(dim=1, keepdim=True),
                                              "diff_norms": torch.ones(3)}, {"label": "diffmean", "concepts": ["a", "b", "c"]})
    plan = plan_export(art)
    sae = SAE.from_dict(plan.cfg)
    sae.load_state_dict(plan.state)
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(f[:, :3] - f[:, 3:], art.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(f), art.encode(x) @ art.directions, rtol=1e-5, atol=1e-4)
