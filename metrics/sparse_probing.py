"""Sparse probing (SAEBench / sae-probes style): how well the k most class-separating features predict a concept.

Per concept (a one-vs-rest task as in metrics.probing: positives 1, negatives and hard negatives 0) and
k in `KS` = (1, 2, 5, 16):
- features: the artefact's readout (`default_readout`: EP's dense cosine, other methods their default encode),
  mean-pooled over each text's tokens (`pooled_features(..., pool="mean")`; BOS is excluded by the store);
- selection, on TRAIN only: the k features with the largest |mean(pos) - mean(neg)| (unstandardised, one
  vectorised pass over all K features; lowest index on ties; k is capped at K, flagged in `detail`);
- probe: `metrics.probing.fit_probe` (standardised on train, L2 logistic regression, C = 1) on those k columns,
  scored on TEST by accuracy and AUROC of its decision function.
The same on the raw residual dimensions (mean-pooled activations, the raw top-k probe), plus a full-width raw probe
on all d dimensions. Rows (mean over concepts, bootstrap CI, per-concept `units`): `sparse_probing.acc@{k}`,
`sparse_probing.auc@{k}`, `sparse_probing.raw_acc@{k}`, `sparse_probing.raw_auc@{k}`, `sparse_probing.raw_full_acc`,
`sparse_probing.raw_full_auc`. `detail`: "<concept set>; readout=<r>; mean-pooled; K=<K>[; k capped at K]".
"""

from __future__ import annotations

import numpy as np

from bench.activations import TextActivations, pool_mean
from methods.base import Artefact
from metrics.common import MetricRow, mean_row
from metrics.feature_selection import default_readout, pooled_features
from metrics.probing import ConceptTask, concept_tasks, probe_scores, top_k_by_mean_diff

KS = (1, 2, 5, 16)
POOLED_BUDGET = 2**27  # floats of one pooled [texts, K] block (512 MB): concepts are pooled in groups under it


def sparse_probe(X: np.ndarray, task: ConceptTask, rows_train: np.ndarray, rows_test: np.ndarray,
                 ks: tuple[int, ...], seed: int = 0) -> dict[int, tuple[float, float]]:
    """k -> (test accuracy, test AUROC) of the probe on the top-k train-selected columns of X."""
    X_tr, X_te = X[rows_train], X[rows_test]
    if len(np.unique(task.y_train)) < 2 or len(task.y_test) == 0:
        return {k: (float("nan"), float("nan")) for k in ks}
    order = top_k_by_mean_diff(X_tr, task.y_train, max(ks))  # the top-k for every k is a prefix of this order
    return {k: probe_scores(X_tr[:, order[:k]], task.y_train, X_te[:, order[:k]], task.y_test, seed) for k in ks}


def _groups(tasks: list[ConceptTask], K: int, budget: int | None = None) -> list[list[ConceptTask]]:
    """Consecutive concepts whose texts, pooled together, fit in `budget` floats (a large K x many texts would not)."""
    budget = POOLED_BUDGET if budget is None else budget
    groups: list[list[ConceptTask]] = []
    seen: set[int] = set()
    for t in tasks:
        ids = set(t.ids_train.tolist()) | set(t.ids_test.tolist())
        if groups and len(seen | ids) * K <= budget:
            groups[-1].append(t)
            seen |= ids
        else:
            groups.append([t])
            seen = ids
    return groups


def sparse_probing_metrics(artefact: Artefact, concept_set, text_acts: TextActivations, *, seed: int = 0,
                           ks: tuple[int, ...] = KS) -> list[MetricRow]:
    """The `sparse_probing.*` rows: top-k feature probes, raw top-k probes and the full-width raw probe."""
    readout = default_readout(artefact)
    raw = pool_mean(text_acts.acts.float(), text_acts.text_ids.long(), text_acts.n_texts).numpy()
    tasks = list(concept_tasks(concept_set))
    feat: dict[str, dict[int, tuple[float, float]]] = {}
    for group in _groups(tasks, artefact.K):
        ids = np.concatenate([np.concatenate([t.ids_train, t.ids_test]) for t in group])
        pooled = pooled_features(artefact, text_acts, ids, readout=readout, pool="mean")
        X = pooled.values.numpy()
        for t in group:
            feat[t.concept] = sparse_probe(X, t, pooled.rows(t.ids_train), pooled.rows(t.ids_test), ks, seed)
    raw_k = {t.concept: sparse_probe(raw, t, t.ids_train, t.ids_test, ks, seed) for t in tasks}
    raw_full = {t.concept: probe_scores(raw[t.ids_train], t.y_train, raw[t.ids_test], t.y_test, seed)
                if len(t.ids_test) else (float("nan"), float("nan")) for t in tasks}
    units = [t.concept for t in tasks]
    capped = "; k capped at K" if max(ks) > artefact.K else ""
    detail = (f"{getattr(concept_set, 'name', '')}; readout={readout or 'default'}; mean-pooled; "
              f"K={artefact.K}{capped}")
    rows = []
    for k in ks:
        for name, res in ((f"acc@{k}", feat), (f"raw_acc@{k}", raw_k)):
            rows.append(mean_row(artefact, f"sparse_probing.{name}", [res[u][k][0] for u in units], seed=seed,
                                 detail=detail, units=units))
        for name, res in ((f"auc@{k}", feat), (f"raw_auc@{k}", raw_k)):
            rows.append(mean_row(artefact, f"sparse_probing.{name}", [res[u][k][1] for u in units], seed=seed,
                                 detail=detail, units=units))
    for i, name in enumerate(("raw_full_acc", "raw_full_auc")):
        rows.append(mean_row(artefact, f"sparse_probing.{name}", [raw_full[u][i] for u in units], seed=seed,
                             detail=detail, units=units))
    return rows
