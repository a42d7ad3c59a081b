"""One-hot probe retention (the EP paper's l0 = 1 probe, SAEBench-style pooling), with its floors.

Per concept, a one-vs-rest task: that concept's positives (label 1) against its negatives and hard negatives
(label 0). Features of a text are mean-pooled over its token rows (`pool_mean`). A logistic-regression probe
(sklearn liblinear, L2, C = 1, features standardised on train) is fitted on the train split and scored by accuracy on
the test split, on:
- the artefact's one-hot readout: `encode(x, "binary")` where the method has a `binary` readout (EP), else
  the one-hot of `assign(x).index` (the top feature per token; documented in each row's `detail`). Mean-pooled,
  it is the share of the text's tokens assigned to each feature.
- the raw activations (mean-pooled, d wide): the full-width raw probe.
- the single best raw dimension (the paper revision's "raw top-1 probe"): the dimension with the largest
  |mean(pos) - mean(neg)| of the mean-pooled raw activations on TRAIN, unstandardised (as sparse probing selects
  features; the probe then standardises its one column like every probe here).
Rows (mean over concepts, bootstrap CI over concepts, per-concept `units`):
- `probing.acc_readout`, `probing.acc_raw`, `probing.acc_raw_top1`: test accuracies of the three probes.
- `probing.acc_floor`: the majority-class predictor's test accuracy; the majority class is the one more frequent
  in TRAIN (negative on a tie), scored on test. With one positive per negative category it is about 2/3.
- `probing.onehot_retention` = acc_readout / acc_raw (per concept, then the mean).
- `probing.onehot_retention_norm` = (acc_readout - acc_floor) / (acc_raw - acc_floor): the share of the raw probe's
  gain over the floor that the readout keeps; NaN (and counted in `detail`) where acc_raw <= acc_floor.
- `probing.onehot_retention_top1` = acc_readout / acc_raw_top1.
`detail`: "<concept set>; <readout note>; mean-pooled; floor=<mean floor>; norm_undefined=<n>/<concepts>".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.activations import TextActivations, pool_mean
from methods.base import Artefact
from metrics.common import MetricRow, mean_row
from metrics.feature_selection import CHUNK_ROWS, split_examples

C_REG = 1.0  # inverse L2 strength of every probe


class ConceptTask(NamedTuple):
    """One concept's probing task: text ids and 0/1 labels of each split."""

    concept: str
    ids_train: np.ndarray
    y_train: np.ndarray
    ids_test: np.ndarray
    y_test: np.ndarray


def concept_tasks(concept_set) -> Iterator[ConceptTask]:
    """Per concept, positives (1) against negatives and hard negatives (0), train and test."""
    ex = split_examples(concept_set, None)
    for c in concept_set.concepts:
        e = ex[ex["concept"] == c]
        parts = []
        for split in ("train", "test"):
            es = e[e["split"] == split]
            parts += [es["text_id"].to_numpy(), (es["category"] == "positive").to_numpy().astype(int)]
        yield ConceptTask(c, *parts)


def onehot_pooled(artefact: Artefact, text_acts: TextActivations, chunk_rows: int = CHUNK_ROWS
                  ) -> tuple[sp.csr_matrix, str]:
    """Mean-pooled one-hot readout, sparse [n_texts, K] (K can be 20k), and a note naming the readout used."""
    n = text_acts.n_texts
    tid = text_acts.text_ids.long()
    use_binary = "binary" in artefact.readouts
    rows, cols, vals = [], [], []
    with torch.no_grad():
        for s in range(0, text_acts.acts.shape[0], chunk_rows):
            x, t = text_acts.acts[s:s + chunk_rows], tid[s:s + chunk_rows]
            if use_binary:
                f = artefact.encode(x, "binary").float().cpu()
                r, k = f.nonzero(as_tuple=True)
                rows.append(t[r].numpy()), cols.append(k.numpy()), vals.append(f[r, k].numpy())
            else:
                rows.append(t.numpy()), cols.append(artefact.assign(x).index.long().cpu().numpy())
                vals.append(np.ones(len(t), dtype=np.float32))
    counts = torch.bincount(tid, minlength=n).clamp(min=1).numpy().astype(np.float32)
    r, k, v = (np.concatenate(a) if a else np.zeros(0) for a in (rows, cols, vals))
    m = sp.csr_matrix((v / counts[r.astype(np.int64)], (r, k)), shape=(n, artefact.K))  # duplicates are summed
    note = "binary readout" if use_binary else "one-hot of assign() (no binary readout)"
    return m, note


def fit_probe(X_train: np.ndarray, y_train: np.ndarray, seed: int = 0) -> Pipeline:
    """The probe every probing metric uses: standardise on train, then L2 logistic regression (C = C_REG)."""
    lr = LogisticRegression(C=C_REG, solver="liblinear", max_iter=1000, random_state=seed)  # fast at small n, large K
    probe = make_pipeline(StandardScaler(), lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(X_train, y_train)
    return probe


def probe_scores(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                 seed: int = 0) -> tuple[float, float]:
    """(test accuracy, test AUROC of the decision function) of a `fit_probe` probe; NaN where undefined."""
    if len(np.unique(y_train)) < 2 or len(y_test) == 0:
        return float("nan"), float("nan")
    probe = fit_probe(X_train, y_train, seed)
    acc = float((probe.predict(X_test) == y_test).mean())
    auc = float(roc_auc_score(y_test, probe.decision_function(X_test))) if len(np.unique(y_test)) == 2 \
        else float("nan")
    return acc, auc


def probe_accuracy(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                   seed: int = 0) -> float:
    """Test accuracy of a standardised L2 logistic-regression probe fitted on train."""
    return probe_scores(X_train, y_train, X_test, y_test, seed)[0]


def top_k_by_mean_diff(X_train: np.ndarray, y_train: np.ndarray, k: int) -> np.ndarray:
    """Columns with the k largest |mean(pos) - mean(neg)| on train (one vectorised pass; lowest index on ties)."""
    y = np.asarray(y_train).astype(bool)
    diff = np.abs(X_train[y].mean(axis=0) - X_train[~y].mean(axis=0))
    return np.argsort(-diff, kind="stable")[:min(k, X_train.shape[1])]


def majority_floor(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of predicting the class more frequent in train (the negative class on a tie)."""
    if len(y_test) == 0:
        return float("nan")
    majority = 1 if np.mean(y_train) > 0.5 else 0
    return float(np.mean(np.asarray(y_test) == majority))


def probing_metrics(artefact: Artefact, concept_set, text_acts: TextActivations, *, seed: int = 0
                    ) -> list[MetricRow]:
    """The `probing.*` rows (mean over concepts): accuracies, the floor, and the three retentions."""
    onehot, note = onehot_pooled(artefact, text_acts)
    raw = pool_mean(text_acts.acts.float(), text_acts.text_ids.long(), text_acts.n_texts).numpy()
    acc: dict[str, list[float]] = {"readout": [], "raw": [], "raw_top1": [], "floor": []}
    for t in concept_tasks(concept_set):
        if len(t.ids_test) == 0:
            for v in acc.values():
                v.append(float("nan"))
            continue
        acc["floor"].append(majority_floor(t.y_train, t.y_test))
        acc["readout"].append(probe_accuracy(onehot[t.ids_train].toarray(), t.y_train,
                                             onehot[t.ids_test].toarray(), t.y_test, seed))
        acc["raw"].append(probe_accuracy(raw[t.ids_train], t.y_train, raw[t.ids_test], t.y_test, seed))
        if len(np.unique(t.y_train)) < 2:
            acc["raw_top1"].append(float("nan"))
            continue
        top = top_k_by_mean_diff(raw[t.ids_train], t.y_train, 1)
        acc["raw_top1"].append(probe_accuracy(raw[t.ids_train][:, top], t.y_train, raw[t.ids_test][:, top],
                                              t.y_test, seed))
    a = {k: np.asarray(v, dtype=float) for k, v in acc.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        retention = np.where(a["raw"] > 0, a["readout"] / a["raw"], np.nan)
        retention_top1 = np.where(a["raw_top1"] > 0, a["readout"] / a["raw_top1"], np.nan)
        above = a["raw"] > a["floor"]  # the raw probe beats the floor: normalisation is defined
        retention_norm = np.where(above, (a["readout"] - a["floor"]) / (a["raw"] - a["floor"]), np.nan)
    n_undefined = int((~above & ~np.isnan(a["raw"]) & ~np.isnan(a["floor"])).sum())
    floor = np.nanmean(a["floor"]) if (~np.isnan(a["floor"])).any() else float("nan")
    detail = (f"{getattr(concept_set, 'name', '')}; {note}; mean-pooled; floor={floor:.3f}; "
              f"norm_undefined={n_undefined}/{len(concept_set.concepts)}")
    units = concept_set.concepts
    values = {"probing.acc_readout": a["readout"], "probing.acc_raw": a["raw"], "probing.acc_floor": a["floor"],
              "probing.acc_raw_top1": a["raw_top1"], "probing.onehot_retention": retention,
              "probing.onehot_retention_norm": retention_norm, "probing.onehot_retention_top1": retention_top1}
    return [mean_row(artefact, m, v, seed=seed, detail=detail, units=units) for m, v in values.items()]
