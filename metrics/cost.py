"""Compute cost: what building a dictionary consumed, how fast it encodes, and EP vs SAE ratios.

- Build (from `artefact.cost`, recorded by the method while fitting): `cost.build.tokens` (model tokens behind
  the rows read, BOS included: the paper's "tokens streamed"), `cost.build.rows`, `cost.build.flops` (counted
  analytically by the method), `cost.build.wall_seconds`, `cost.build.peak_memory_bytes`. For a pretrained
  SAE these describe loading it, not training it: its training budget lives in
  info["published_training_tokens"] and is used by `compare_costs`.
- Encode: `cost.encode_rows_per_s`, rows of a given activation batch encoded per second (median of timed
  repeats after a warm-up; CI = bootstrap over repeats).
- `compare_costs(ep, sae)`: `cost.token_ratio_sae_over_ep` = SAE training tokens / EP tokens streamed (the
  paper's ~1e3 claim is this token ratio, not a FLOP count) and `cost.flop_ratio_sae_over_ep`. For a pretrained
  SAE the tokens are the published ones (detail "published SAE tokens") and its FLOPs, unless published in
  info["published_training_flops"], are estimated as 12 * d * K per training token (encoder + decoder
  matmuls, 2 * d * K FLOPs each forward, backward twice the forward), labelled as an estimate.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from methods.base import LOADED_SOURCES, Artefact
from metrics.common import MetricRow, bootstrap_ci, row

BUILD_FIELDS = (("tokens", "tokens"), ("rows", "rows"), ("flops", "flops"), ("wall_seconds", "wall_seconds"),
                ("peak_memory_bytes", "peak_memory_bytes"))


def training_unknown(artefact: Artefact) -> bool:
    """A dictionary loaded rather than built here (a pretrained release, a directory on disk) whose training budget
    is not published: its tokens, rows and FLOPs are unknown, never 0 (which would read as free)."""
    info = artefact.info
    return info.get("source") in LOADED_SOURCES and info.get("published_training_tokens") is None


def build_cost_rows(artefact: Artefact, seed: int = 0) -> list[MetricRow]:
    """One row per field of the artefact's recorded build cost (NaN: unknown, for a loaded SAE's training)."""
    c = artefact.cost
    detail = f"device {c.device}"
    unknown = training_unknown(artefact)
    if artefact.info.get("source") in LOADED_SOURCES:
        detail += ("; loaded: its training budget is unknown (not published), wall time and memory are loading it"
                   if unknown else "; pretrained: build cost = loading it (see cost.token_ratio_sae_over_ep for "
                   "training)")
    return [row(artefact, f"cost.build.{name}",
                float("nan") if unknown and name in ("tokens", "rows", "flops") else float(getattr(c, attr)),
                n=1, seed=seed, detail=detail)
            for name, attr in BUILD_FIELDS]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_throughput(artefact: Artefact, acts_ND: torch.Tensor, readout: str | None = None, repeats: int = 5,
                      warmup: int = 1, seed: int = 0) -> list[MetricRow]:
    """cost.encode_rows_per_s: rows of `acts_ND` encoded per second (median over timed repeats)."""
    if acts_ND.ndim != 2 or len(acts_ND) == 0:
        raise ValueError(f"encode_throughput needs a non-empty [N, d] activation batch, got {tuple(acts_ND.shape)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    kw = {} if readout is None else {"readout": readout}
    with torch.no_grad():
        for _ in range(warmup):
            artefact.encode(acts_ND, **kw)
        _sync(acts_ND.device)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            artefact.encode(acts_ND, **kw)
            _sync(acts_ND.device)
            rates.append(len(acts_ND) / max(time.perf_counter() - t0, 1e-9))
    detail = f"{acts_ND.device}; rows={len(acts_ND)}, d={acts_ND.shape[1]}; readout={readout or 'default'}; " \
             f"torch_threads={torch.get_num_threads()}"
    return [row(artefact, "cost.encode_rows_per_s", statistics.median(rates),
                bootstrap_ci(rates, stat=np.median, seed=seed), n=repeats, seed=seed, detail=detail)]


def cost_metrics(artefact: Artefact, acts_ND: torch.Tensor | None = None, readout: str | None = None,
                 seed: int = 0) -> list[MetricRow]:
    """Build-cost rows, plus encode throughput when an activation batch is given."""
    rows = build_cost_rows(artefact, seed)
    if acts_ND is not None:
        rows += encode_throughput(artefact, acts_ND, readout=readout, seed=seed)
    return rows


def training_budget(artefact: Artefact) -> tuple[float, float, str]:
    """(tokens, flops, how they were obtained) of what building the artefact took, published figures first."""
    info = artefact.info
    if info.get("published_training_tokens") is not None:
        tokens = float(info["published_training_tokens"])
        if info.get("published_training_flops") is not None:
            return tokens, float(info["published_training_flops"]), "published SAE tokens and FLOPs"
        flops = 12.0 * artefact.d_model * artefact.K * tokens
        return tokens, flops, "published SAE tokens; FLOPs estimated as 12*d*K per token"
    if training_unknown(artefact):
        return float("nan"), float("nan"), "training budget unknown (a loaded SAE that publishes none)"
    c = artefact.cost

    return float(c.tokens), float(c.flops), "measured build cost"


def compare_costs(ep_artefact: Artefact, sae_artefact: Artefact, seed: int = 0) -> list[MetricRow]:
    """SAE-over-EP ratios of training tokens and FLOPs, as rows of the EP artefact."""
    ep_tok, ep_flops, _ = training_budget(ep_artefact)
    sae_tok, sae_flops, how = training_budget(sae_artefact)
    detail = (f"vs {sae_artefact.name} ({how}): SAE {sae_tok:.4g} tokens / {sae_flops:.4g} FLOPs; "
              f"EP {ep_tok:.4g} tokens / {ep_flops:.4g} FLOPs")
    tok_ratio = sae_tok / ep_tok if ep_tok > 0 else float("nan")
    flop_ratio = sae_flops / ep_flops if ep_flops > 0 else float("nan")
    return [row(ep_artefact, "cost.token_ratio_sae_over_ep", tok_ratio, n=1, seed=seed, detail=detail),
            row(ep_artefact, "cost.flop_ratio_sae_over_ep", flop_ratio, n=1, seed=seed, detail=detail)]
