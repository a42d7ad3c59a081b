"""Per-feature card data: top-activating contexts with per-token activations, histograms, EP members, best
matches in other methods (top-n F1, as metrics.correspondence) and the concepts that select each feature.

Everything is computed from the artefact and the activation store, in row chunks, so a K = 20,000 dictionary
needs memory for a few [chunk, K] blocks, never [rows, K].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from bench.activations import TextActivations
from bench.store import ActivationBatch, ActivationStore
from methods.base import Artefact
from metrics.correspondence import TOP_N, RunningTopN, _batches
from metrics.detection import auroc_columns
from metrics.feature_selection import default_readout, pooled_features, select_features, split_examples

BLOCK_ELEMS = 8 * 2**20  # largest [rows, K] feature block held at once (32 MB in fp32)
LEVELS = 9  # per-token shading is quantised to 0..LEVELS (one digit per token in the site's data)


@dataclass
class CardConfig:
    """How much of each feature the browser shows (and so how large the site is)."""

    sample_contexts: int = 128  # store contexts scanned for top contexts and histograms (from the store's start)
    top_contexts: int = 5  # top-activating contexts per feature (distinct contexts)
    before: int = 10  # tokens shown before the most active token of a context
    after: int = 4  # ... and after it
    bins: int = 16  # histogram bins over the feature's non-zero range on the sample
    members: int = 4  # EP closest and farthest members shown (each)
    match_top_n: int = TOP_N  # top-n inputs per feature for F1 matching (the correspondence metric's n)


class TopContexts(NamedTuple):
    """Per feature, its strongest contexts: where the window starts, the shading digits and the peak."""

    context: np.ndarray  # [K, T] store context id (-1: fewer than T contexts fired)
    start: np.ndarray  # [K, T] position of the window's first token in the context
    peak: np.ndarray  # [K, T] position of the most active token
    value: np.ndarray  # [K, T] activation at the peak
    digits: list[list[str]]  # [K][T] one digit 0..LEVELS per window token: activation / feature max


class Histogram(NamedTuple):
    """Activation histogram per feature over the sample's token rows; zeros counted apart (sparse features)."""

    lo: np.ndarray  # [K] left edge
    hi: np.ndarray  # [K] right edge
    counts: np.ndarray  # [K, bins] int64 of the non-zero activations
    zeros: np.ndarray  # [K] rows where the feature is exactly 0
    rows: int


def sample_rows(store: ActivationStore, layer: int, n_contexts: int) -> ActivationBatch:
    """The first `n_contexts` contexts of the store at `layer` (rows in context order)."""
    batch = next(store.batches(layer, batch_contexts=max(1, min(n_contexts, store.n_contexts))), None)
    if batch is None:
        raise ValueError(f"store {store.id} has no rows at layer {layer}; extract a non-empty corpus first")
    return batch


def _context_chunks(sample: ActivationBatch, K: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) made of whole contexts, about BLOCK_ELEMS / K rows each (at least one context)."""
    ctx = sample.context_ids.numpy()
    starts = np.r_[0, np.flatnonzero(np.diff(ctx)) + 1, len(ctx)]
    budget = max(1, BLOCK_ELEMS // max(K, 1))
    out, i = [], 0
    while i < len(starts) - 1:
        j = i + 1
        while j < len(starts) - 1 and starts[j + 1] - starts[i] <= budget:
            j += 1
        out.append((int(starts[i]), int(starts[j])))
        i = j
    return out


def _encode(art: Artefact, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return art.encode(x, default_readout(art)).float().cpu()


def scan(art: Artefact, sample: ActivationBatch, cfg: CardConfig) -> tuple[TopContexts, Histogram]:
    """Two passes over the sample: per-context peaks and ranges, then histograms and the top windows."""
    K, ctx_ids, pos = art.K, sample.context_ids, sample.positions
    uniq, first = np.unique(ctx_ids.numpy(), return_index=True)
    n_ctx, chunks = len(uniq), _context_chunks(sample, K)
    ctx_of_row = torch.from_numpy(np.searchsorted(uniq, ctx_ids.numpy()))
    peak_val = torch.full((n_ctx, K), float("-inf"))
    peak_row = torch.zeros((n_ctx, K), dtype=torch.long)
    lo, hi = torch.full((K,), float("inf")), torch.full((K,), float("-inf"))
    for a, b in chunks:
        f = _encode(art, sample.acts[a:b])
        nz = f != 0
        lo = torch.minimum(lo, torch.where(nz, f, torch.inf).min(0).values)
        hi = torch.maximum(hi, torch.where(nz, f, -torch.inf).max(0).values)
        c = ctx_of_row[a:b]
        for ci in torch.unique(c).tolist():
            rows = (c == ci).nonzero().squeeze(1)
            v, r = f[rows].max(0)
            peak_val[ci], peak_row[ci] = v, rows[r] + a
    T = min(cfg.top_contexts, n_ctx)
    top_v, top_c = peak_val.T.topk(T, dim=1)  # [K, T]
    fired = top_v > 0  # a context where the feature stays <= 0 is not an activating example
    fmax = top_v[:, 0].clamp_min(1e-12)
    context = np.full((K, T), -1, dtype=np.int64)
    start = np.zeros((K, T), dtype=np.int64)
    peak = np.zeros((K, T), dtype=np.int64)
    value = np.zeros((K, T), dtype=np.float32)
    digits: list[list[str]] = [[""] * T for _ in range(K)]
    counts = torch.zeros(K * cfg.bins, dtype=torch.long)
    zeros = torch.zeros(K, dtype=torch.long)
    span = (hi - lo).clamp_min(1e-12)
    row_lo = torch.from_numpy(first)  # first row of each sampled context
    row_hi = torch.from_numpy(np.r_[first[1:], len(ctx_ids)])
    for a, b in chunks:
        f = _encode(art, sample.acts[a:b])
        nz = f != 0
        zeros += (~nz).sum(0)
        bins = ((f - lo) / span * cfg.bins).long().clamp(0, cfg.bins - 1) + torch.arange(K) * cfg.bins
        counts.index_add_(0, bins[nz], torch.ones(int(nz.sum()), dtype=torch.long))
        in_chunk = (row_lo[top_c] >= a) & (row_lo[top_c] < b) & fired  # [K, T] windows whose context is here
        for k, t in in_chunk.nonzero().tolist():
            ci = int(top_c[k, t])
            r = int(peak_row[ci, k])
            ra, rb = max(int(row_lo[ci]), r - cfg.before), min(int(row_hi[ci]), r + cfg.after + 1)
            vals = f[ra - a:rb - a, k].clamp_min(0) / fmax[k]
            context[k, t], start[k, t] = int(ctx_ids[r]), int(pos[ra])
            peak[k, t], value[k, t] = int(pos[r]), float(f[r - a, k])
            digits[k][t] = "".join(str(int(round(float(v) * LEVELS))) for v in vals.clamp(0, 1))
    hist = Histogram(lo.numpy(), hi.numpy(), counts.view(K, cfg.bins).numpy(), zeros.numpy(), len(ctx_ids))
    return TopContexts(context, start, peak, value, digits), hist


def top_sets(arts: list[Artefact], inputs: TextActivations | torch.Tensor, unit: str, n: int) -> list[Any]:
    """Each artefact's top-n input sets (sparse incidence [K, N]), read as metrics.correspondence reads them."""
    readouts = ["signed" if a.method == "ep" else None for a in arts]
    tops = [RunningTopN(a.K, n) for a in arts]
    n_inputs = 0
    for feats in _batches(inputs, unit, arts, readouts):
        for t, f in zip(tops, feats):
            t.update(f, n_inputs)
        n_inputs += feats[0].shape[0]
    return [t.incidence(n_inputs) for t in tops]


def best_matches(A: Any, B: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per row of A, the row of B with the largest top-set F1 and that F1 (-1 and 0 without any overlap)."""
    size_a = np.asarray(A.sum(axis=1)).ravel()
    size_b = np.asarray(B.sum(axis=1)).ravel()
    inter = (A @ B.T).tocsr()
    best = np.full(A.shape[0], -1, dtype=np.int64)
    f1 = np.zeros(A.shape[0], dtype=np.float64)
    for i in range(A.shape[0]):
        lo, hi = inter.indptr[i], inter.indptr[i + 1]
        if hi == lo:
            continue
        cols, data = inter.indices[lo:hi], inter.data[lo:hi]
        scores = 2.0 * data / (size_a[i] + size_b[cols])
        j = int(np.lexsort((cols, -scores))[0])  # largest F1, lowest feature index on ties
        best[i], f1[i] = int(cols[j]), float(scores[j])
    return best, f1


def concept_picks(art: Artefact, concept_set: Any, acts: TextActivations) -> list[tuple[str, int, float]]:
    """(concept, selected feature, test AUROC positives vs negatives): what detection.auroc averages."""
    readout = default_readout(art)
    pooled = pooled_features(art, acts, None, readout)
    selected = select_features(art, concept_set, acts, "train", readout, pooled=pooled)
    test = split_examples(concept_set, "test")
    out = []
    for c in concept_set.concepts:
        e = test[test["concept"] == c]
        k = selected[c]
        pos = pooled.values[pooled.rows(e.loc[e["category"] == "positive", "text_id"].to_numpy())][:, [k]]
        neg = pooled.values[pooled.rows(e.loc[e["category"] == "negative", "text_id"].to_numpy())][:, [k]]
        out.append((c, k, float(auroc_columns(pos, neg)[0])))
    return out
