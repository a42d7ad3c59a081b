"""Retrieval: do a feature's top-scoring texts belong to one concept?

Text score = maximum over token rows of the feature's activation (see `metrics.feature_selection`).

`retrieval.precision@k` (k = 10, 50; supervised choice of feature): for each concept c, the candidate pool is
its test examples of every category (positives, negatives, hard negatives, one entry per text), ranked by the
feature `select_features` chose for c on the train split. precision@k = (# positives among the top k') / k'
with k' = min(k, pool size). Ties straddling the cut are scored by their expectation under a random order
(the tied block contributes its positive share times the places left), so a binary readout is not flattered
by a lucky sort. The best achievable value is min(n_pos, k') / k'; its mean over concepts is `ceiling=` in
`detail` (and the mean pool size `pool_texts=`).

`retrieval.purity@k` (label-free, k = 10, 50): the text pool is every test text that is a positive of exactly
one concept (its label). For each feature whose pooled activation is > 0 on at least k pool texts ("fires"),
take its top k texts (ties at the cut broken by a seeded random order) and compute the share of them that
carry the most common label among them. The value is the mean over firing features (bootstrap CI over
features); features that fire on fewer than k texts are left out and counted in `detail` (`firing=` of `K=`,
on >= `min_texts=` of `n_texts=` pool texts). Dense readouts (cosine, signed, PCA) are > 0 on most texts, so
nearly every feature enters with its top k anyway; `nonzero_share=` (the share of non-zero pooled entries) makes
a dense readout visible. Chance level is about the largest label share in the pool; the ceiling is
min(n_label, k) / k.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bench.activations import TextActivations
from methods.base import Artefact
from metrics.common import MetricRow, mean_row
from metrics.feature_selection import PooledTexts, default_readout, pooled_features, select_features, split_examples

KS = (10, 50)


def precision_at_k(scores: np.ndarray, is_pos: np.ndarray, k: int) -> float:
    """Expected precision of the top min(k, n) under a random order of ties."""
    n = len(scores)
    if n == 0:
        return float("nan")
    k = min(k, n)
    t = np.sort(scores)[::-1][k - 1]  # the k-th largest score
    above, tied = scores > t, scores == t
    need = k - int(above.sum())
    hits = is_pos[above].sum() + need * is_pos[tied].mean()
    return float(hits / k)


def _precision_rows(artefact, concept_set, pooled: PooledTexts, selected: dict[str, int], ks: Sequence[int],
                    seed: int, readout) -> list[MetricRow]:
    test = split_examples(concept_set, "test").drop_duplicates(["concept", "text_id"])
    X = pooled.values.numpy()
    prec = {k: [] for k in ks}
    ceil = {k: [] for k in ks}
    pool = []
    for c in concept_set.concepts:
        e = test[test["concept"] == c]
        pool.append(len(e))
        s = X[pooled.rows(e["text_id"].to_numpy()), selected[c]]
        pos = (e["category"] == "positive").to_numpy()
        for k in ks:
            prec[k].append(precision_at_k(s, pos, k))
            kk = min(k, len(s))
            ceil[k].append(min(int(pos.sum()), kk) / kk if kk else float("nan"))
    name = getattr(concept_set, "name", "")
    # key=value facts (bench.results parses them into columns): the best achievable value and the mean pool size
    return [mean_row(artefact, f"retrieval.precision@{k}", prec[k], seed=seed, units=concept_set.concepts,
                     detail=(f"{name}; readout={readout or 'default'}; ceiling={np.nanmean(ceil[k]):.6g}; "
                             f"pool_texts={np.mean(pool) if pool else float('nan'):.4g}")) for k in ks]


def purity_values(X_NK: np.ndarray, labels: np.ndarray, k: int, seed: int = 0, chunk: int = 1024
                  ) -> tuple[np.ndarray, int]:
    """Purity@k of every firing feature of pooled scores [N, K] with integer labels [N]; also the firing count."""
    N, K = X_NK.shape
    fires = np.flatnonzero((X_NK > 0).sum(axis=0) >= k)
    if len(fires) == 0:
        return np.zeros(0), 0
    # Rows in a seeded random order + a stable sort = ties (massive for binary readouts) broken at random.
    perm = np.random.default_rng(seed).permutation(N)
    Xp, lab = X_NK[perm], labels[perm]
    n_labels = int(labels.max()) + 1
    out = []
    for s in range(0, len(fires), chunk):
        cols = fires[s:s + chunk]
        top_kF = np.argsort(-Xp[:, cols], axis=0, kind="stable")[:k]
        flat = lab[top_kF] + n_labels * np.arange(len(cols))[None, :]
        counts_FL = np.bincount(flat.ravel(), minlength=len(cols) * n_labels).reshape(len(cols), n_labels)
        out.append(counts_FL.max(axis=1) / k)
    return np.concatenate(out).astype(float), len(fires)


def _purity_rows(artefact, concept_set, pooled: PooledTexts, ks: Sequence[int], seed: int, readout
                 ) -> list[MetricRow]:
    test = split_examples(concept_set, "test")
    pos = test[test["category"] == "positive"]
    n_lab = pos.groupby("text_id")["concept"].nunique()
    single = n_lab[n_lab == 1].index.to_numpy()
    lab = pos.drop_duplicates("text_id").set_index("text_id").loc[single, "concept"]
    codes = {c: i for i, c in enumerate(concept_set.concepts)}
    labels = np.array([codes[c] for c in lab], dtype=np.int64)
    X = pooled.values.numpy()[pooled.rows(single)]
    nonzero = float((X > 0).mean()) if X.size else float("nan")
    rows = []
    for k in ks:
        vals, n_fire = purity_values(X, labels, k, seed)
        # firing = features active (> 0) on >= min_texts of the n_texts pool texts; K = all features
        detail = (f"{getattr(concept_set, 'name', '')}; readout={readout or 'default'}; firing={n_fire}; "
                  f"K={X.shape[1]}; min_texts={k}; n_texts={len(single)}; nonzero_share={nonzero:.3f}")
        rows.append(mean_row(artefact, f"retrieval.purity@{k}", vals, seed=seed, detail=detail))
    return rows


def retrieval_metrics(
    artefact: Artefact,
    concept_set,
    text_acts: TextActivations,
    readout: str | None = None,
    *,
    selected: dict[str, int] | None = None,
    pooled: PooledTexts | None = None,
    ks: Sequence[int] = KS,
    seed: int = 0,
) -> list[MetricRow]:
    """`retrieval.precision@k` and `retrieval.purity@k` rows for k in `ks`."""
    readout = default_readout(artefact, readout)
    if pooled is None:
        pooled = pooled_features(artefact, text_acts, None, readout)
    if selected is None:
        selected = select_features(artefact, concept_set, text_acts, "train", readout, pooled=pooled)
    return (_precision_rows(artefact, concept_set, pooled, selected, ks, seed, readout)
            + _purity_rows(artefact, concept_set, pooled, ks, seed, readout))
