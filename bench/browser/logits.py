"""Logit effects: the tokens a feature's direction promotes and suppresses through the unembedding.

For a unit direction u the effect on the logits is W_U^T (s * u) [vocab], where s is the final norm's weight
(`ln_final.w`). epbench loads every model with unprocessed weights (transformer-lens' from_pretrained_no_processing
or its own weight conversions; Gemma's `1 + w` is already in `ln_final.w`), so s is applied here; a model whose
config says the norm was folded (normalization_type RMSPre / LNPre: fold_ln moved the weight into W_U) uses W_U as
it is. A LayerNorm also removes the mean over d_model, so u is centred first there. Left out: the norm's division
by the residual's scale (a positive factor per token, which leaves the ranking alone), the bias b_U and the
logit soft cap (monotone). This is the direct path only, as sae-dashboard and Neuronpedia show it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from bench.browser import cards

VOCAB_CHUNK = 8192  # unembedding columns per block: [features, 8192] logits at a time


class Unembedding(NamedTuple):
    W_U: torch.Tensor  # [d_model, vocab]
    scale: torch.Tensor | None  # [d_model] final-norm weight applied to a direction first (None: folded / no norm)
    center: bool  # LayerNorm: remove the direction's mean over d_model first
    note: str  # what was applied, for the page


def unembedding(backend: Any) -> Unembedding:
    """The unembedding of a bench.models.ModelBackend, with how its final norm is handled (see the module)."""
    m = backend.model
    kind = m.cfg.normalization_type
    W_U = m.W_U.detach()
    shape = f"W_U [{W_U.shape[0]} x {W_U.shape[1]}] of {backend.name}"
    if kind in ("RMS", "LN"):
        name = "RMSNorm" if kind == "RMS" else "LayerNorm"
        return Unembedding(W_U, m.ln_final.w.detach().float(), kind == "LN",
                           f"{shape} applied to the direction times the final {name} weight ln_final.w "
                           "(unprocessed weights)" + ("; the direction is centred first" if kind == "LN" else ""))
    if kind in ("RMSPre", "LNPre"):
        return Unembedding(W_U, None, kind == "LNPre",
                           f"{shape} applied to the direction; the final norm's weight is already folded into W_U "
                           f"(normalization_type {kind}: fold_ln was applied)")
    return Unembedding(W_U, None, False, f"{shape} applied to the direction (the model has no final norm)")


def logit_effects(directions: torch.Tensor, U: Unembedding, n: int) -> tuple[torch.Tensor, ...]:
    """(top ids, top values, bottom ids, bottom values), each [K, n]: the n most promoted tokens (largest first)
    and the n most suppressed (most negative first) of every direction [K, d]. Computed in blocks of features x
    VOCAB_CHUNK columns with a running top-n, so memory stays at about cards.BLOCK_ELEMS logits whatever K and vocab."""
    D = directions.detach().float()
    if U.center:
        D = D - D.mean(dim=1, keepdim=True)
    if U.scale is not None:
        D = D * U.scale.to(D)
    K, V = D.shape[0], U.W_U.shape[1]
    n = min(n, V)
    kb = max(1, cards.BLOCK_ELEMS // VOCAB_CHUNK)
    out = [torch.zeros((K, n), dtype=torch.long), torch.zeros(K, n), torch.zeros((K, n), dtype=torch.long),
           torch.zeros(K, n)]
    with torch.no_grad():
        for a in range(0, K, kb):
            d = D[a:a + kb]
            best = [torch.full((len(d), 0), -torch.inf), torch.zeros((len(d), 0), dtype=torch.long)]
            worst = [torch.full((len(d), 0), -torch.inf), torch.zeros((len(d), 0), dtype=torch.long)]
            for v0 in range(0, V, VOCAB_CHUNK):
                logits = d @ U.W_U[:, v0:v0 + VOCAB_CHUNK].float()
                ids = torch.arange(v0, v0 + logits.shape[1])
                for run, x in ((best, logits), (worst, -logits)):
                    vals, pos = torch.cat([run[0], x], 1).topk(n, dim=1)
                    run[0], run[1] = vals, torch.cat([run[1], ids.expand(len(d), -1)], 1).gather(1, pos)
            out[0][a:a + kb], out[1][a:a + kb] = best[1], best[0]
            out[2][a:a + kb], out[3][a:a + kb] = worst[1], -worst[0]
    return tuple(out)
