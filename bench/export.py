"""Export an epbench artefact as a sae-lens SAE directory (`cfg.json` + `sae_weights.safetensors`).

The directory loads with sae-lens' own `SAE.load_from_disk(OUT)`, with no epbench installed, so tools that
read sae-lens SAEs (SAEBench, SAE dashboards, Neuronpedia uploads) can read EP dictionaries. Mappings, each
exact up to float rounding (tested on real activations in tests/test_export.py):

- EP / k-means `topk` readout (k = `--k`, default 1): a TopK SAE with W_enc = W^T, b_enc = 0, W_dec = W,
  b_dec = c and `apply_b_dec_to_input`: sae-lens computes topk(relu((x - c) W^T)), which is epbench's
  topk of x_c . w (EP divides by ||x_c|| + 1e-8 and multiplies back, a relative error below 1e-7 for
  ||x_c|| >> 1e-8). W is EP's exemplar or mean basis (`--basis`), c the calibration centre.
- dense `signed` / `projection` readouts (EP signed, k-means signed, PCA, random, DiffMean): a standard
  (ReLU) SAE of width 2K with W_enc = [W^T, -W^T], W_dec = [W; -W], b_dec = c: latent j is relu(s_j) and
  latent K + j is relu(-s_j), so epbench's s = f[:, :K] - f[:, K:] and decode gives s W + c exactly.
- SAE artefacts: their own tensors (sae-lens' inference form already).

Not expressible: EP / k-means `binary` (a one-hot 1.0 that does not scale with the input; every sae-lens
encoder is positively homogeneous in x - b_dec away from thresholds) and `cosine` (divides by ||x_c||).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bench.cache import as_os_error, unique_tmp
from methods.base import Artefact

EXPORT_INFO = "epbench_export.json"  # written beside sae-lens' files: provenance and how to read the latents
TOPK_READOUT_METHODS = ("ep", "kmeans")  # methods whose topk readout is x_c . w over unit directions
DENSE_READOUTS = {"ep": "signed", "kmeans": "signed", "pca": "projection", "random": "projection",
                  "diffmean": "projection"}
NOT_EXPRESSIBLE = {
    "binary": "a one-hot 1.0 at the nearest region does not scale with the input, and every sae-lens encoder "
              "does (relu/topk/jumprelu of an affine map)",
    "cosine": "cosine divides by ||x - c||, which no sae-lens encoder computes",
}


class ExportPlan(NamedTuple):
    """What one artefact becomes in sae-lens: its config dict, state dict and how latents map back."""

    cfg: dict[str, Any]
    state: dict[str, torch.Tensor]
    readout: str  # the epbench readout the export reproduces
    latents: str  # how sae-lens' latents relate to epbench's encode


def _basis(art: Artefact, basis: str) -> torch.Tensor:
    if art.method == "ep":
        return art.basis(basis).float()
    if basis != "exemplar":
        raise ValueError(f"--basis {basis} applies to EP only; {art.name} has one set of directions")
    return art.directions.float()


def _base_cfg(art: Artefact, architecture: str, d_sae: int) -> dict[str, Any]:
    return {"architecture": architecture, "d_in": art.d_model, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "metadata": {"model_name": art.info.get("model"), "hook_name": art.info.get("hook")}}


def plan_export(art: Artefact, readout: str | None = None, k: int = 1, basis: str = "exemplar") -> ExportPlan:
    """The sae-lens SAE equal to `art` read out with `readout` (default: topk for EP / k-means, else dense)."""
    if art.method == "sae":
        sae = art.to_sae_lens()
        cfg = sae.cfg.to_dict()
        return ExportPlan(cfg, {n: t.detach().float() for n, t in sae.state_dict().items()}, "latent",
                          "identical to epbench's encode (latent readout)")
    readout = readout or ("topk" if art.method in TOPK_READOUT_METHODS else DENSE_READOUTS.get(art.method))
    if readout in NOT_EXPRESSIBLE:
        raise ValueError(f"{art.name}: the {readout!r} readout cannot be exported to sae-lens: "
                         f"{NOT_EXPRESSIBLE[readout]}; export --readout topk or a dense readout instead")
    W, c = _basis(art, basis), art.center.float()
    if readout == "topk" and art.method in TOPK_READOUT_METHODS:
        if not 1 <= k <= art.K:
            raise ValueError(f"{art.name}: --k must be in 1..K={art.K}, got {k}")
        cfg = {**_base_cfg(art, "topk", art.K), "k": k, "rescale_acts_by_decoder_norm": False}
        state = {"W_enc": W.T.contiguous(), "b_enc": torch.zeros(art.K), "W_dec": W.contiguous(), "b_dec": c}
        return ExportPlan(cfg, state, "topk", f"identical to epbench's encode(x, 'topk', k={k})")
    if readout == DENSE_READOUTS.get(art.method):
        both = torch.cat([W, -W])
        cfg = _base_cfg(art, "standard", 2 * art.K)
        state = {"W_enc": both.T.contiguous(), "b_enc": torch.zeros(2 * art.K), "W_dec": both.contiguous(), "b_dec": c}
        return ExportPlan(cfg, state, readout, f"epbench's encode(x, {readout!r}) = f[:, :K] - f[:, K:] "
                          f"(K = {art.K}); latent j is its positive part, K + j its negative part")
    raise ValueError(f"{art.name}: no sae-lens form for readout {readout!r}; exportable: "
                     f"{'topk, ' if art.method in TOPK_READOUT_METHODS else ''}{DENSE_READOUTS.get(art.method)}")


def downstream_model_name(model: str) -> str:
    """The name tools outside epbench load the model by (SAEBench, sae-dashboard, TransformerLens): the Hugging Face
    repo id (`smollm2-135m` -> HuggingFaceTB/SmolLM2-135M-Instruct); an unknown name is kept."""
    from methods.sae import MODEL_ALIASES

    return next((a for a in MODEL_ALIASES.get(model, ()) if "/" in a), model)


class ExportCheck(NamedTuple):
    """How well the exported SAE reconstructs, measured through sae-lens on rows of the artefact's own store."""

    rows: int
    explained_variance: float
    explained_variance_k1: float | None  # topk exports with k > 1: the same at k = 1, for comparison
    warning: str  # "" when the export reconstructs; else why its decode is not a reconstruction

    def line(self) -> str:
        text = f"reconstruction through sae-lens on {self.rows:,} store rows: explained variance " \
               f"{self.explained_variance:.4f}"
        if self.explained_variance_k1 is not None:
            text += f" (k = 1: {self.explained_variance_k1:.4f})"
        return text + (f"; WARNING: {self.warning}" if self.warning else "")


def check_export(sae: Any, art: Artefact, plan: ExportPlan, store_root: str | Path | None = None,
                 max_rows: int = 4096) -> ExportCheck | None:
    """Explained variance of the sae-lens SAE's decode(encode(x)) on up to `max_rows` rows of the store the artefact
    was built on (None when that store is not on this machine)."""
    from bench.store import ActivationStore, stores_root
    from metrics.reconstruction import explained_variance

    where = stores_root(store_root) / str(art.info.get("store_id"))
    layer = art.info.get("layer")
    if not (where / "manifest.json").exists() or layer is None:
        return None
    x = next(ActivationStore(where).batches(int(layer), batch_contexts=max(1, max_rows // 64))).acts[:max_rows]
    with torch.no_grad():
        ev = explained_variance(x, sae.decode(sae.encode(x)))
        ev1 = None
        if plan.readout == "topk" and plan.cfg.get("k", 1) > 1:
            one = type(sae).from_dict({**plan.cfg, "k": 1})
            one.load_state_dict(plan.state)
            ev1 = explained_variance(x, one.decode(one.encode(x)))
    warning = ""
    if ev < 0:
        warning = (f"the {plan.readout!r} export reconstructs worse than the mean (a readout for probing or "
                   "browsing, not a reconstruction: do not report its loss recovered)")
    elif ev1 is not None and ev < ev1:
        warning = (f"k = {plan.cfg['k']} reconstructs worse than k = 1 (the directions are not orthogonal, so their "
                   "projections double-count): for reconstruction export k = 1")
    return ExportCheck(len(x), ev, ev1, warning)


def export_sae_lens(art: Artefact, out: str | Path, readout: str | None = None, k: int = 1,
                    basis: str = "exemplar", source: str | None = None, model_name: str | None = None,
                    store_root: str | Path | None = None) -> tuple[Path, ExportCheck | None]:
    """Write `art` as a sae-lens directory at `out` (through sae-lens' own `save_model`), with its reconstruction
    measured on the artefact's store (`check_export`; recorded in epbench_export.json). `model_name`: what the
    cfg's metadata names the model (default: its Hugging Face repo id, which downstream tools load)."""
    from sae_lens import SAE

    plan = plan_export(art, readout, k, basis)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new OUT directory (nothing was written)")
    name = model_name or downstream_model_name(str(art.info.get("model")))
    plan.cfg.setdefault("metadata", {})["model_name"] = name
    sae = SAE.from_dict(plan.cfg)
    sae.load_state_dict(plan.state)
    check = check_export(sae, art, plan, store_root)
    info = {"source_artefact": source, "method": art.method, "label": art.name, "readout": plan.readout,
            "basis": basis if art.method == "ep" else None, "k": k if plan.readout == "topk" else None,
            "latents": plan.latents, "K": art.K, "model_name": name, "epbench_model": art.info.get("model"),
            "reconstruction": check._asdict() if check else None,
            "provenance": {key: art.info.get(key) for key in ("store_id", "model", "layer", "hook", "theta", "p")}}

    # written into a fresh folder beside OUT and renamed into place: a full disk or a kill leaves no partial OUT
    # (which would block the rerun: OUT must be empty) and comes out as an OSError naming OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(out)
    try:
        sae.save_model(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.replace(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        io_error = as_os_error(e, out)
        if io_error is not None:
            raise io_error from e
        raise
    return out, check
