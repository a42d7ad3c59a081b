"""AxBench latent concept detection: does the concept's feature score positives above negatives?

Score of an example = its text's maximum over token rows of one feature's activation (BOS is excluded by
the store). Per concept, on the test split:
- `detection.auroc`: AUROC of positives vs `negative` examples, scored by the feature chosen on the train
  split by `metrics.feature_selection.select_features` (EP: the paper's mean-difference rule on `cosine`).
- `detection.auroc_hard`: the same feature, positives vs `hard negative` examples. Concepts without hard
  negatives get NaN and are counted in the row's `detail`; the row is always emitted.
- `detection.auroc_best_latent` (SAE-A's rule): per concept, the feature with the best TRAIN AUROC (positives vs
  negatives and hard negatives, the same contrast selection uses), evaluated by test AUROC positives vs negatives.
- EP twice (the paper's revision: representative and rule are part of a detection result's identity): the rows
  above read the regions' exemplars (`basis="exemplar"`); `detection.auroc.region_mean` and
  `detection.auroc_best_latent.region_mean` read the region means (`basis="mean"`), each selected with the
  representative it is then scored with (the contrast rule and SAE-A's rule respectively).
Each row is the mean over concepts with a bootstrap CI over concepts. AUROC is rank-based with ties
counted one half (the Mann-Whitney statistic), so binary readouts are scored exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bench.activations import TextActivations
from methods.base import Artefact
from metrics.common import MetricRow, mean_row
from metrics.feature_selection import (
    TRAIN_NEGATIVES,
    PooledTexts,
    default_readout,
    pooled_features,
    select_features,
    split_examples,
)


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """AUROC of `scores` for binary `labels` (1 = positive) from average ranks; NaN if a class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # Tie groups get the mean of the 1-based ranks they span.
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_columns(pos_PK: torch.Tensor, neg_MK: torch.Tensor) -> torch.Tensor:
    """AUROC per column (feature) of positives [P, K] vs negatives [M, K] -> [K]; ties count one half."""
    P, M = pos_PK.shape[0], neg_MK.shape[0]
    if P == 0 or M == 0:
        return torch.full((pos_PK.shape[1],), float("nan"))
    neg_KM = neg_MK.T.contiguous().double().sort(dim=1).values
    pos_KP = pos_PK.T.contiguous().double()
    below = torch.searchsorted(neg_KM, pos_KP, right=False).sum(dim=1)
    at_or_below = torch.searchsorted(neg_KM, pos_KP, right=True).sum(dim=1)
    return ((below + 0.5 * (at_or_below - below)) / (P * M)).float()


def _ids(ex, concept: str, categories: Sequence[str]) -> np.ndarray:
    e = ex[(ex["concept"] == concept) & ex["category"].isin(categories)]
    return e["text_id"].to_numpy()


def detection_metrics(
    artefact: Artefact,
    concept_set,
    text_acts: TextActivations,
    readout: str | None = None,
    *,
    selected: dict[str, int] | None = None,
    pooled: PooledTexts | None = None,
    seed: int = 0,
) -> list[MetricRow]:
    """`detection.auroc`, `detection.auroc_hard` and `detection.auroc_best_latent` rows (mean over concepts), and
    for EP the same two rules on the region means (`*.region_mean`)."""
    readout = default_readout(artefact, readout)
    rows = _detection_rows(artefact, concept_set, text_acts, readout, selected, pooled, seed, "")
    if artefact.method == "ep":
        mean = pooled_features(artefact, text_acts, None, readout, basis="mean")
        rows += [r for r in _detection_rows(artefact, concept_set, text_acts, readout, None, mean, seed,
                                            ".region_mean") if "auroc_hard" not in r.metric]
    return rows


def _detection_rows(artefact: Artefact, concept_set, text_acts: TextActivations, readout: str | None,
                    selected: dict[str, int] | None, pooled: PooledTexts | None, seed: int, suffix: str
                    ) -> list[MetricRow]:
    """The three detection rows for one representative (`suffix` names it in the metric)."""
    if pooled is None:
        pooled = pooled_features(artefact, text_acts, None, readout)
    if selected is None:
        selected = select_features(artefact, concept_set, text_acts, "train", readout, pooled=pooled)
    train, test = split_examples(concept_set, "train"), split_examples(concept_set, "test")
    X = pooled.values
    easy, hard, best = [], [], []
    for c in concept_set.concepts:
        pos = X[pooled.rows(_ids(test, c, ("positive",)))]
        neg = X[pooled.rows(_ids(test, c, ("negative",)))]
        hneg = X[pooled.rows(_ids(test, c, ("hard negative",)))]
        k = selected[c]
        easy.append(float(auroc_columns(pos[:, [k]], neg[:, [k]])[0]))
        hard.append(float(auroc_columns(pos[:, [k]], hneg[:, [k]])[0]) if len(hneg) else float("nan"))
        tr = auroc_columns(X[pooled.rows(_ids(train, c, ("positive",)))],
                           X[pooled.rows(_ids(train, c, TRAIN_NEGATIVES))])
        # nan_to_num so a feature constant on train (AUROC 0.5) still competes; argmax takes the lowest index on ties.
        kb = int(torch.nan_to_num(tr, nan=-1.0).argmax())
        best.append(float(auroc_columns(pos[:, [kb]], neg[:, [kb]])[0]))
    name = getattr(concept_set, "name", "")
    n_no_hard = int(np.isnan(hard).sum())
    hard_detail = name + (f"; {n_no_hard} of {len(hard)} concepts have no test hard negatives (NaN, excluded "
                          "from the mean)" if n_no_hard else "")
    rd = f"readout={readout or 'default'}" + (f"; basis={'mean' if suffix else 'exemplar'}"
                                               if artefact.method == "ep" else "")
    return [
        mean_row(artefact, f"detection.auroc{suffix}", easy, seed=seed, detail=f"{name}; {rd}; rule=contrast",
                 units=concept_set.concepts),
        mean_row(artefact, "detection.auroc_hard", hard, seed=seed, detail=f"{hard_detail}; {rd}; rule=contrast",
                 units=concept_set.concepts),
        mean_row(artefact, f"detection.auroc_best_latent{suffix}", best, seed=seed,
                 detail=f"{name}; {rd}; rule=SAE-A (latent with best train AUROC)", units=concept_set.concepts),
    ]
