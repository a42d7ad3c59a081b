"""Out-of-distribution signal from the distance to the nearest dictionary element.

Per token row, the OOD score is a distance:
- EP: `assign(x).score`, the cosine distance to the nearest exemplar (centred unit sphere); the paper's free OOD
  signal, since a distance above theta means "outside every cell".
- other methods: 1 - max_k cos(x - center, direction_k) (center is zero unless the method has one).
Rows (the per-set name is in `detail`):
- `ood.auroc`, one per OOD set: AUROC of the score separating held-out in-distribution rows (label 0) from that
  set's rows (label 1); 0.5 is no signal. The CI is a cluster bootstrap that resamples whole texts (rows of one
  text are not independent); plain tensors are resampled by row.
- `ood.within_theta_rate`, one per corpus (in-distribution included, EP only): share of rows with distance <= theta
  (the EP threshold, from `info['theta']` or the `theta` argument); same cluster-bootstrap CI.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.activations import TextActivations
from methods.base import Artefact
from metrics.common import MetricRow, bootstrap_ci, row
from metrics.feature_selection import CHUNK_ROWS

IN_DIST = "in-distribution"
N_BOOT = 500  # cluster-bootstrap replicates (each is O(rows))


def distances(artefact: Artefact, acts: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Per-row distance to the nearest dictionary element (see the module docstring)."""
    out = []
    dirs = F.normalize(artefact.directions.float(), dim=1)
    with torch.no_grad():
        for s in range(0, acts.shape[0], chunk_rows):
            x = artefact.check_input(acts[s:s + chunk_rows])
            if artefact.method == "ep":
                out.append(artefact.assign(x).score.float().cpu())
            else:
                u = F.normalize(x - artefact.center.to(x), dim=1)
                out.append(1.0 - (u @ dirs.to(u).T).max(dim=1).values.cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _units(data: TextActivations | torch.Tensor) -> tuple[torch.Tensor, np.ndarray, int]:
    """Rows and their resampling unit (text id for TextActivations, row otherwise)."""
    if isinstance(data, TextActivations):
        return data.acts, data.text_ids.long().numpy(), int(data.n_texts)
    return data, np.arange(data.shape[0]), int(data.shape[0])


def weighted_auroc_stat(scores: np.ndarray, labels: np.ndarray, unit_of_row: np.ndarray, n_units: int
                        ) -> Callable[[np.ndarray], float]:
    """AUROC (ties count one half) of rows weighted by how often their unit is drawn, as f(unit indices)."""
    _, group = np.unique(scores, return_inverse=True)  # tie groups in increasing score order
    G = int(group.max()) + 1 if len(group) else 0
    is_pos = labels.astype(bool)

    def stat(units: np.ndarray) -> float:
        w = np.bincount(np.asarray(units, dtype=np.int64), minlength=n_units)[unit_of_row].astype(float)
        pos_g = np.bincount(group, weights=w * is_pos, minlength=G)
        neg_g = np.bincount(group, weights=w * ~is_pos, minlength=G)
        wp, wn = pos_g.sum(), neg_g.sum()
        if wp == 0 or wn == 0:
            return float("nan")
        neg_below = np.cumsum(neg_g) - neg_g
        return float((pos_g * (neg_below + 0.5 * neg_g)).sum() / (wp * wn))

    return stat


def weighted_rate_stat(hit: np.ndarray, unit_of_row: np.ndarray, n_units: int) -> Callable[[np.ndarray], float]:
    """Share of rows with `hit`, rows weighted by how often their unit is drawn, as f(unit indices)."""
    hits_u = np.bincount(unit_of_row, weights=hit.astype(float), minlength=n_units)
    rows_u = np.bincount(unit_of_row, minlength=n_units).astype(float)

    def stat(units: np.ndarray) -> float:
        c = np.bincount(np.asarray(units, dtype=np.int64), minlength=n_units)
        total = (c * rows_u).sum()
        return float((c * hits_u).sum() / total) if total else float("nan")

    return stat


def _theta(artefact: Artefact, theta: float | None) -> float:
    if theta is not None:
        return float(theta)
    if "theta" in artefact.info:
        return float(artefact.info["theta"])
    if "theta" in artefact.tensors:
        return float(artefact.tensors["theta"])
    raise ValueError(f"{artefact.name}: no theta in info or tensors; pass theta= explicitly")


def ood_metrics(
    artefact: Artefact,
    in_dist: TextActivations | torch.Tensor,
    ood_sets: dict[str, TextActivations | torch.Tensor],
    *,
    theta: float | None = None,
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> list[MetricRow]:
    """`ood.auroc` per OOD set and (EP only) `ood.within_theta_rate` per corpus; set names in `detail`."""
    if not ood_sets:
        raise ValueError("ood_metrics needs at least one named OOD set, e.g. {'random_tokens': acts}")
    score_note = "EP nearest-exemplar distance" if artefact.method == "ep" else "1 - max cosine to directions"
    acts_in, unit_in, n_in = _units(in_dist)
    d_in = distances(artefact, acts_in)
    corpora = {IN_DIST: (d_in, unit_in, n_in)}
    rows: list[MetricRow] = []
    for name, data in ood_sets.items():
        acts, unit, n = _units(data)
        d = distances(artefact, acts)
        corpora[name] = (d, unit, n)
        scores = np.concatenate([d_in, d])
        labels = np.r_[np.zeros(len(d_in)), np.ones(len(d))]
        units = np.concatenate([unit_in, unit + n_in])
        stat = weighted_auroc_stat(scores, labels, units, n_in + n)
        all_units = np.arange(n_in + n)
        rows.append(row(artefact, "ood.auroc", stat(all_units),
                        bootstrap_ci(all_units, stat=stat, n_boot=n_boot, seed=seed), n=len(scores), seed=seed,
                        detail=f"{name}; score = {score_note}; rows_in={len(d_in)}, rows_ood={len(d)}"))
    if artefact.method == "ep":
        th = _theta(artefact, theta)
        for name, (d, unit, n) in corpora.items():
            stat = weighted_rate_stat(d <= th, unit, n)
            all_units = np.arange(n)
            rows.append(row(artefact, "ood.within_theta_rate", stat(all_units),
                            bootstrap_ci(all_units, stat=stat, n_boot=n_boot, seed=seed), n=len(d), seed=seed,
                            detail=f"{name}; theta={th:.4f}"))
    return rows
