"""Feature correspondence between two dictionaries (the EP paper's EP-SAE F1 matching).

On one shared evaluation stream of inputs (token rows, or texts pooled by max over tokens), every feature's
top-n set is the n inputs with the largest activation among those where it is > 0 (a sparse feature that fires
on fewer than n inputs gets a smaller set; one that never fires gets an empty set). EP is read with its dense
`signed` readout (the paper's choice), as is k-means; random directions with their projection, the same readout: so
random directions and k-means built at EP's K give the share a chance level to beat (the signed readout ranks
high-norm tokens first, which alone makes unrelated top sets overlap). The reference (an SAE) uses its default.
For a feature a of the artefact and b of the reference, F1(a, b) = 2 |A ∩ B| / (|A| + |B|); a's best match is
the b with the largest F1. Rows (attributed to the artefact, reference named in `detail`; CI over features):
- `correspondence.share_f1>0.5`: share of the artefact's non-empty features whose best F1 > 0.5 (paper: ~20% of
  EP regions at Gemma-2-2B L12 vs Gemma Scope 16k),
- `correspondence.mean_best_f1`: mean best F1 over those features,
- `correspondence.reverse_share_f1>0.5` and `correspondence.reverse_mean_best_f1`: the same from the reference's
  side (best artefact feature per non-empty reference feature).
Top-n sets are kept as running top-n per feature over input batches and stored as sparse incidence matrices
[K, N]; all K_a x K_b intersections come from one sparse product. Its cost is the number of overlapping
(a, b) pairs, about N * (K_a n / N) * (K_b n / N): small on a long stream (1M token rows: ~3M pairs for 20k x 16k
features), large on a short one (20k rows: ~120M pairs, ~30 s on 2 CPU cores), so use a stream of N >> n.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import scipy.sparse as sp
import torch

from bench.activations import TextActivations
from methods.base import Artefact
from metrics.common import MetricRow, mean_row
from metrics.feature_selection import CHUNK_ROWS, pooled_features

TOP_N = 100
F1_MATCH = 0.5


class RunningTopN:
    """The n largest activations (and their global input indices) per feature, updated batch by batch."""

    def __init__(self, K: int, n: int):
        self.n = n
        self.values = torch.full((K, 0), float("-inf"))
        self.index = torch.zeros((K, 0), dtype=torch.int64)

    def update(self, f_BK: torch.Tensor, start: int) -> None:
        if self.values.shape[1] < self.n:  # not full yet: merge the batch's own top-n
            bv, bi = f_BK.T.float().contiguous().topk(min(self.n, f_BK.shape[0]), dim=1)
            v = torch.cat([self.values, bv], dim=1)
            i = torch.cat([self.index, bi + start], dim=1)
            self.values, pos = v.topk(min(self.n, v.shape[1]), dim=1)
            self.index = i.gather(1, pos)
            return
        # Only entries above a feature's current n-th value can enter its set; after a few batches they are rare,
        # so the merge touches a few features and columns instead of a [K, B] top-k per batch.
        r, k = (f_BK > self.values[:, -1]).nonzero(as_tuple=True)
        if len(k) == 0:
            return
        order = torch.argsort(k, stable=True)
        r, k = r[order], k[order]
        feats, counts = torch.unique_consecutive(k, return_counts=True)
        slot = torch.arange(len(k)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        row = torch.repeat_interleave(torch.arange(len(feats)), counts)
        cand_v = torch.full((len(feats), int(counts.max())), float("-inf"))
        cand_i = torch.zeros((len(feats), int(counts.max())), dtype=torch.int64)
        cand_v[row, slot] = f_BK[r, k].float()
        cand_i[row, slot] = r + start
        v = torch.cat([self.values[feats], cand_v], dim=1)
        i = torch.cat([self.index[feats], cand_i], dim=1)
        top_v, pos = v.topk(self.n, dim=1)
        self.values[feats], self.index[feats] = top_v, i.gather(1, pos)

    def incidence(self, n_inputs: int) -> sp.csr_matrix:
        """Sparse [K, n_inputs] 0/1 matrix of each feature's top set, keeping only activations > 0."""
        mask = self.values > 0
        rows = torch.arange(self.values.shape[0])[:, None].expand_as(mask)[mask].numpy()
        cols = self.index[mask].numpy()
        return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                             shape=(self.values.shape[0], n_inputs))


def _batches(inputs, unit: str, artefacts: list[Artefact], readouts: list[str | None]):
    """Yield per-batch feature blocks of every artefact on the same inputs."""
    if isinstance(inputs, TextActivations) and unit == "text":
        pooled = [pooled_features(a, inputs, None, r).values for a, r in zip(artefacts, readouts)]
        for s in range(0, inputs.n_texts, CHUNK_ROWS):
            yield [p[s:s + CHUNK_ROWS] for p in pooled]
        return
    if unit != "token":
        raise ValueError(f"unit must be 'token' or 'text' (text needs TextActivations), got {unit!r}")
    if isinstance(inputs, TextActivations):
        inputs = inputs.acts
    if isinstance(inputs, torch.Tensor):
        rows = inputs
        inputs = (rows[s:s + CHUNK_ROWS] for s in range(0, rows.shape[0], CHUNK_ROWS))
    with torch.no_grad():
        for x in inputs:
            yield [a.encode(x, r).float().cpu() for a, r in zip(artefacts, readouts)]


def best_f1(A: sp.csr_matrix, B: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Best F1 per row of A over rows of B, and per row of B over rows of A (0 where there is no overlap)."""
    size_a = np.asarray(A.sum(axis=1)).ravel()
    size_b = np.asarray(B.sum(axis=1)).ravel()
    inter = (A @ B.T).tocsr()  # |A_i ∩ B_j| for overlapping pairs only
    inter.sort_indices()
    row = np.repeat(np.arange(A.shape[0]), np.diff(inter.indptr))
    f1 = sp.csr_matrix((2.0 * inter.data / (size_a[row] + size_b[inter.indices]), inter.indices, inter.indptr),
                       shape=inter.shape)
    best_a = f1.max(axis=1).toarray().ravel()
    best_b = f1.max(axis=0).toarray().ravel()
    return best_a, best_b


def _dense_signed(artefact: Artefact) -> str | None:
    """The dense signed readout x_c . w where a partition offers one (EP, k-means: the paper's choice for EP, and the
    same for the k-means null); None (the default) elsewhere: a random control's projection is that readout."""
    return "signed" if artefact.method in ("ep", "kmeans") else None


def correspondence_metrics(
    artefact: Artefact,
    reference: Artefact,
    inputs: TextActivations | torch.Tensor | Iterable[torch.Tensor],
    *,
    unit: str = "token",
    top_n: int = TOP_N,
    readout: str | None = None,
    reference_readout: str | None = None,
    seed: int = 0,
    extras: dict[str, np.ndarray] | None = None,
) -> list[MetricRow]:
    """Top-n F1 matching of `artefact`'s features against `reference`'s (e.g. EP regions vs SAE latents).

    `extras`, when given, receives the per-feature best F1 of the non-empty features (`best_f1`, `reverse_best_f1`)
    for histograms."""
    if artefact.d_model != reference.d_model:
        raise ValueError(f"{artefact.name} (d={artefact.d_model}) and {reference.name} (d={reference.d_model}) "
                         "read different activations; build both on the same model and hook")
    readouts = [readout if readout is not None else _dense_signed(artefact),
                reference_readout if reference_readout is not None else _dense_signed(reference)]
    tops = [RunningTopN(artefact.K, top_n), RunningTopN(reference.K, top_n)]
    n_inputs = 0
    for feats in _batches(inputs, unit, [artefact, reference], readouts):
        for t, f in zip(tops, feats):
            t.update(f, n_inputs)
        n_inputs += feats[0].shape[0]
    if n_inputs == 0:
        raise ValueError("correspondence got no inputs; pass a non-empty evaluation stream")
    A, B = (t.incidence(n_inputs) for t in tops)
    best_a, best_b = best_f1(A, B)
    live_a = np.asarray(A.sum(axis=1)).ravel() > 0
    live_b = np.asarray(B.sum(axis=1)).ravel() > 0
    if extras is not None:
        extras.update(best_f1=best_a[live_a], reverse_best_f1=best_b[live_b])
    detail = (f"vs {reference.name}; top_n={top_n}, pool={n_inputs}, pool_unit={unit}; readout_a={readouts[0]}, "
              f"readout_b={readouts[1]}; nonempty_a={int(live_a.sum())}, K_a={artefact.K}, "
              f"nonempty_b={int(live_b.sum())}, K_b={reference.K}")
    return [
        mean_row(artefact, "correspondence.share_f1>0.5", (best_a[live_a] > F1_MATCH).astype(float),
                 seed=seed, detail=detail),
        mean_row(artefact, "correspondence.mean_best_f1", best_a[live_a], seed=seed, detail=detail),
        mean_row(artefact, "correspondence.reverse_share_f1>0.5", (best_b[live_b] > F1_MATCH).astype(float),
                 seed=seed, detail=detail),
        mean_row(artefact, "correspondence.reverse_mean_best_f1", best_b[live_b], seed=seed, detail=detail),
    ]
