"""One-hot probe retention (the EP paper's l0 = 1 probe, SAEBench-style pooling).

Per concept, a one-vs-rest task: that concept's positives (label 1) against its negatives and hard negatives
(label 0). Features of a text are mean-pooled over its token rows (`pool_mean`). A logistic-regression probe
(sklearn liblinear, L2, C = 1, features standardised on train) is fitted on the train split and scored by accuracy on
the test split, twice:
- on the artefact's one-hot readout: `encode(x, "binary")` where the method has a `binary` readout (EP), else
  the one-hot of `assign(x).index` (the top feature per token; documented in each row's `detail`). Mean-pooled,
  it is the share of the text's tokens assigned to each feature.
- on the raw activations (mean-pooled, d wide).
Rows (mean over concepts, bootstrap CI over concepts): `probing.acc_readout`, `probing.acc_raw` and
`probing.onehot_retention` = per-concept acc_readout / acc_raw. Accuracy is plain accuracy: with one positive per
negative category the majority-class rate is about 2/3 (given in `detail`), so read retention next to it.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.activations import TextActivations, pool_mean
from methods.base import Artefact
from metrics.common import MetricRow, mean_row
from metrics.feature_selection import CHUNK_ROWS, split_examples

C_REG = 1.0  # inverse L2 strength of every probe


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


def probe_accuracy(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                   seed: int = 0) -> float:
    """Test accuracy of a standardised L2 logistic-regression probe fitted on train."""
    if len(np.unique(y_train)) < 2:
        return float("nan")
    lr = LogisticRegression(C=C_REG, solver="liblinear", max_iter=1000, random_state=seed)  # fast at small n, large K
    probe = make_pipeline(StandardScaler(), lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(X_train, y_train)
    return float((probe.predict(X_test) == y_test).mean())


def probing_metrics(artefact: Artefact, concept_set, text_acts: TextActivations, *, seed: int = 0
                    ) -> list[MetricRow]:
    """`probing.acc_readout`, `probing.acc_raw` and `probing.onehot_retention` rows (mean over concepts)."""
    onehot, note = onehot_pooled(artefact, text_acts)
    raw = pool_mean(text_acts.acts.float(), text_acts.text_ids.long(), text_acts.n_texts).numpy()
    ex = split_examples(concept_set, None)
    acc_r, acc_x, majority = [], [], []
    for c in concept_set.concepts:
        e = ex[ex["concept"] == c]
        parts = {}
        for split in ("train", "test"):
            es = e[e["split"] == split]
            parts[split] = (es["text_id"].to_numpy(), (es["category"] == "positive").to_numpy().astype(int))
        (ids_tr, y_tr), (ids_te, y_te) = parts["train"], parts["test"]
        if len(ids_te) == 0:
            acc_r.append(float("nan"))
            acc_x.append(float("nan"))
            continue
        majority.append(max(y_te.mean(), 1 - y_te.mean()))
        acc_r.append(probe_accuracy(onehot[ids_tr].toarray(), y_tr, onehot[ids_te].toarray(), y_te, seed))
        acc_x.append(probe_accuracy(raw[ids_tr], y_tr, raw[ids_te], y_te, seed))
    acc_r_, acc_x_ = np.asarray(acc_r), np.asarray(acc_x)
    with np.errstate(divide="ignore", invalid="ignore"):
        retention = np.where(acc_x_ > 0, acc_r_ / acc_x_, np.nan)
    detail = (f"{getattr(concept_set, 'name', '')}; {note}; mean-pooled; "
              f"majority-class test accuracy {np.mean(majority) if majority else float('nan'):.3f}")
    return [
        mean_row(artefact, "probing.acc_readout", acc_r_, seed=seed, detail=detail, units=concept_set.concepts),
        mean_row(artefact, "probing.acc_raw", acc_x_, seed=seed, detail=detail, units=concept_set.concepts),
        mean_row(artefact, "probing.onehot_retention", retention, seed=seed, detail=detail,
                 units=concept_set.concepts),
    ]
