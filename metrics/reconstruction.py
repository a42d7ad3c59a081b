"""Reconstruction quality of dictionaries that decode (SAEs, PCA, EP with its top-k readout).

Definitions, over every non-BOS, non-padding token of the evaluation texts at hook `blocks.{L}.hook_resid_post`
(BOS is excluded everywhere: its residual is atypical and SAEs are not trained on it; it is never replaced):
- `recon.mse`: mean over tokens and dimensions of (x - x_hat)^2, x_hat = decode(encode(x)).
- `recon.explained_variance` = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the variance about the mean
  activation of the evaluated tokens (not about zero, which would credit a method for the mean it did not
  explain).
- `recon.loss_recovered` = (CE_zero - CE_recon) / (CE_zero - CE_clean): next-token cross-entropy over the
  predictions made at the replaced positions (position p >= 1 predicting token p + 1) with the clean residual,
  with x_hat spliced in at every non-BOS position, and with the residual zero-ablated at those positions
  (SAEBench's baseline for residual hooks). 1 = the reconstruction loses nothing, 0 = no better than zero.
Readouts: EP (and k-means, which shares its readouts) reconstructs through its `topk` readout
(encode(x, readout="topk") then decode); other methods use their default readout unless `readout=` says
otherwise. CIs are bootstraps over texts (ratios resampled jointly).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from methods.base import Artefact
from metrics.common import MetricRow, bootstrap_ci, row

# Methods whose default readout is not the one their decoder inverts.
RECON_READOUT: dict[str, str] = {"ep": "topk", "kmeans": "topk"}


def can_reconstruct(artefact: Artefact) -> bool:
    """True when the artefact has a decoder (flag `reconstructs`, or a decode() of its own)."""
    return bool(artefact.reconstructs) or type(artefact).decode is not Artefact.decode


def reconstruct(artefact: Artefact, x_ND: torch.Tensor, readout: str | None = None) -> torch.Tensor:
    """x_hat = decode(encode(x)) with the readout the decoder expects."""
    ro = readout if readout is not None else RECON_READOUT.get(artefact.method)
    x = artefact.check_input(x_ND.to(artefact.directions.device))  # the artefact's tensors stay where they are
    with torch.no_grad():
        f = artefact.encode(x, readout=ro) if ro is not None else artefact.encode(x)
        return artefact.decode(f).float().to(x_ND.device)


def explained_variance(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """1 - SSE / total sum of squares about the mean of x."""
    x, xh = x_ND.double(), x_hat_ND.double()
    sst = ((x - x.mean(0)) ** 2).sum()
    return float(1 - ((x - xh) ** 2).sum() / sst)


def _token_ce(logits_BTV: torch.Tensor, toks_BT: torch.Tensor, lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per text: summed CE of predictions at positions 1..len-2 (targets 2..len-1) and their count."""
    lp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    ce_BT = -lp.gather(-1, toks_BT[:, 1:, None]).squeeze(-1).cpu()
    pos = torch.arange(ce_BT.shape[1])[None]
    mask = (pos >= 1) & (pos + 1 < lengths[:, None])
    return (ce_BT * mask).sum(1).double().numpy(), mask.sum(1).double().numpy()


def reconstruction_metrics(
    artefact: Artefact,
    backend: Any,
    texts: Sequence[str],
    layer: int | None = None,
    readout: str | None = None,
    ctx_len: int = 128,
    batch_size: int = 16,
    seed: int = 0,
) -> list[MetricRow]:
    """recon.mse, recon.explained_variance and recon.loss_recovered on `texts`; [] for methods without a decoder."""
    if not can_reconstruct(artefact):
        return []
    L = int(layer if layer is not None else artefact.info.get("layer", -1))
    if L < 0:
        raise ValueError(f"{artefact.name}: no layer in artefact.info; pass layer=")
    backend.check_layers([L])
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no (non-empty) evaluation texts given for the reconstruction metrics")
    hook_name = backend.hook_name(L)
    d = artefact.d_model
    n_t = len(texts)
    # Per-text sufficient statistics, so the bootstrap can resample texts.
    sse, cnt, sumsq = np.zeros(n_t), np.zeros(n_t), np.zeros(n_t)
    sumx = np.zeros((n_t, d))
    ce = {k: np.zeros(n_t) for k in ("clean", "recon", "zero")}
    n_pred = np.zeros(n_t)

    for lo in range(0, n_t, batch_size):
        hi = min(n_t, lo + batch_size)
        toks, lengths = backend.to_tokens(texts[lo:hi], ctx_len=ctx_len)
        valid_BT = (torch.arange(toks.shape[1])[None] < lengths[:, None])
        valid_BT[:, 0] = False
        store: dict[str, torch.Tensor] = {}

        def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
            x = act[:, 1:].reshape(-1, act.shape[-1])
            x_hat = reconstruct(artefact, x, readout).to(act.device)
            store["x"], store["x_hat"] = x.float().cpu(), x_hat.cpu()
            out = act.clone()
            out[:, 1:] = x_hat.reshape(act[:, 1:].shape).to(act.dtype)
            return out

        def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
            out = act.clone()
            out[:, 1:] = 0
            return out

        with torch.no_grad():
            for name, hooks in (("clean", []), ("recon", [(hook_name, splice)]), ("zero", [(hook_name, zero)])):
                logits = backend.model.run_with_hooks(toks, fwd_hooks=hooks, return_type="logits")
                s, n = _token_ce(logits, toks.cpu(), lengths)
                ce[name][lo:hi] = s
                n_pred[lo:hi] = n
        B, T = toks.shape
        x = store["x"].reshape(B, T - 1, d).double()
        err = ((x - store["x_hat"].reshape(B, T - 1, d).double()) ** 2).sum(-1)
        m = valid_BT[:, 1:].double()
        sse[lo:hi] = (err * m).sum(1).numpy()
        cnt[lo:hi] = m.sum(1).numpy()
        sumsq[lo:hi] = ((x ** 2).sum(-1) * m).sum(1).numpy()
        sumx[lo:hi] = (x * m[..., None]).sum(1).numpy()

    if cnt.sum() == 0:
        raise ValueError("evaluation texts have no token after BOS; pass longer texts")

    def ev(idx: np.ndarray) -> float:
        i = idx.astype(int)
        n = cnt[i].sum()
        sst = sumsq[i].sum() - (sumx[i].sum(0) ** 2).sum() / n
        return float(1 - sse[i].sum() / sst) if sst > 0 else float("nan")

    def mse(idx: np.ndarray) -> float:
        i = idx.astype(int)
        return float(sse[i].sum() / (cnt[i].sum() * d))

    def loss_rec(idx: np.ndarray) -> float:
        i = idx.astype(int)
        n = n_pred[i].sum()
        if n == 0:
            return float("nan")
        c, r, z = ce["clean"][i].sum() / n, ce["recon"][i].sum() / n, ce["zero"][i].sum() / n
        return float((z - r) / (z - c)) if z != c else float("nan")

    all_i = np.arange(n_t)
    ro = readout if readout is not None else RECON_READOUT.get(artefact.method, "default")
    n_tok = int(cnt.sum())
    n_p = max(int(n_pred.sum()), 1)
    mean_ce = {k: v.sum() / n_p for k, v in ce.items()}
    detail = (f"hook {hook_name}; texts={n_t}, tokens={n_tok}; readout={ro}; ce_clean={mean_ce['clean']:.4f}, "
              f"ce_recon={mean_ce['recon']:.4f}, ce_zero_ablation={mean_ce['zero']:.4f}; tokens exclude BOS")
    out = []
    for metric, fn in (("recon.mse", mse), ("recon.explained_variance", ev), ("recon.loss_recovered", loss_rec)):
        out.append(row(artefact, metric, fn(all_i), bootstrap_ci(all_i, stat=fn, seed=seed), n=n_t, seed=seed,
                       detail=detail, layer=L))
    return out
