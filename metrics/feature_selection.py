"""Per-concept feature selection, and the pooled per-text feature matrix every concept metric reads.

Pooling: a text's score on feature k is its maximum over token rows of the artefact's feature activation
(AxBench's latent score; BOS is already excluded by the store). The matrix [n_texts, K] is computed once,
in row chunks, and shared by selection, retrieval and detection (pass it as `pooled=`).

Selection rule (all methods, vectorised over features and concepts): for concept c on the train split,
    score[c, k] = mean(pooled[t, k] | t positive for c) - mean(pooled[t, k] | t negative or hard negative for c)
and the selected feature is argmax_k score[c, k] (lowest index on ties). This is the EP paper's rule
("largest mean(cos | positive) - mean(cos | negative)"); EP uses its dense `cosine` readout, other methods
their default encode readout. DiffMean is supervised: each concept gets its own direction, found through
`artefact.info["concepts"]` (concept names aligned with the rows of `directions`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from bench.activations import TextActivations
from methods.base import Artefact

TRAIN_NEGATIVES = ("negative", "hard negative")  # the categories selection contrasts positives with
CHUNK_ROWS = 4096  # token rows encoded at once: bounds the [rows, K] feature block in memory


class PooledTexts(NamedTuple):
    """Pooled features of a subset of texts: `values[row_of[t]]` is text t's K-wide feature vector."""

    values: torch.Tensor  # [n_pooled, K] float32
    row_of: np.ndarray  # [n_texts] int64: row of each text in `values`, -1 if the text was not pooled
    readout: str | None  # the encode readout used

    def rows(self, text_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of `values` for these text ids; a clear error if any text was not pooled."""
        ids = np.asarray(text_ids, dtype=np.int64)
        r = self.row_of[ids]
        if (r < 0).any():
            raise KeyError(f"text ids {ids[r < 0][:5].tolist()} were not pooled; pool them (pass text_ids=None)")
        return r


def default_readout(artefact: Artefact, readout: str | None = None) -> str | None:
    """The readout concept metrics use: EP's dense `cosine` (the paper's choice), else the method default."""
    if readout is not None:
        return readout
    return "cosine" if artefact.method == "ep" else None


def encode_chunks(artefact: Artefact, acts: torch.Tensor, readout: str | None, chunk_rows: int = CHUNK_ROWS,
                  basis: str | None = None):
    """Yield (start, features [b, K]) over row chunks of acts [N, d]; encoding all rows at once can need GBs.
    `basis` (EP: `exemplar` or `mean`, the region's representative) is passed to encode only when given."""
    kw = {} if basis is None else {"basis": basis}
    with torch.no_grad():
        for s in range(0, acts.shape[0], chunk_rows):
            yield s, artefact.encode(acts[s:s + chunk_rows], readout, **kw).float().cpu()


def pooled_features(
    artefact: Artefact,
    text_acts: TextActivations,
    text_ids: Sequence[int] | np.ndarray | None = None,
    readout: str | None = None,
    pool: str = "max",
    chunk_rows: int = CHUNK_ROWS,
    basis: str | None = None,
) -> PooledTexts:
    """Per-text pooled (max or mean over tokens) feature activations for `text_ids` (default: all texts);
    `basis` picks EP's representative (exemplar or region mean)."""
    if pool not in ("max", "mean"):
        raise ValueError(f"pool must be 'max' or 'mean', got {pool!r}")
    acts, tid = text_acts.acts, text_acts.text_ids.long()
    wanted = np.arange(text_acts.n_texts) if text_ids is None else np.unique(np.asarray(text_ids, dtype=np.int64))
    row_of = np.full(text_acts.n_texts, -1, dtype=np.int64)
    row_of[wanted] = np.arange(len(wanted))
    counts = torch.bincount(tid, minlength=text_acts.n_texts)[torch.from_numpy(wanted)]
    if (counts == 0).any():
        empty = wanted[(counts == 0).numpy()][:5].tolist()
        raise ValueError(f"texts {empty} have no token rows in text_acts; re-extract the concept set's texts "
                         "(an empty text has nothing to score)")
    keep = torch.from_numpy(row_of)[tid]
    mask = keep >= 0
    acts, rows = acts[mask], keep[mask]
    K = artefact.K
    if pool == "max":
        out = torch.full((len(wanted), K), float("-inf"))
        for s, f in encode_chunks(artefact, acts, readout, chunk_rows, basis):
            idx = rows[s:s + f.shape[0]].view(-1, 1).expand_as(f)
            out.scatter_reduce_(0, idx, f, reduce="amax", include_self=True)
    else:
        out = torch.zeros((len(wanted), K))
        for s, f in encode_chunks(artefact, acts, readout, chunk_rows, basis):
            out.index_add_(0, rows[s:s + f.shape[0]], f)
        out /= counts.to(out.dtype)[:, None]
    return PooledTexts(out, row_of, readout)


def split_examples(concept_set, split: str | None):
    """The example rows of one split (or all), deduplicated per (concept, text)."""
    ex = concept_set.examples
    if split is not None:
        ex = ex[ex["split"] == split]
    return ex.drop_duplicates(["concept", "text_id"])


def contrast_weights(concept_set, split: str, neg_categories: Sequence[str], concepts: list[str],
                     pooled: PooledTexts) -> sp.csr_matrix:
    """Sparse [C, n_pooled] weights with +1/n_pos on positives and -1/n_neg on negatives of each concept."""
    ex = split_examples(concept_set, split)
    rows, cols, vals = [], [], []
    for i, c in enumerate(concepts):
        e = ex[ex["concept"] == c]
        pos = e.loc[e["category"] == "positive", "text_id"].to_numpy()
        neg = e.loc[e["category"].isin(neg_categories), "text_id"].to_numpy()
        if len(pos) == 0 or len(neg) == 0:
            raise ValueError(f"concept {c!r} has {len(pos)} positive and {len(neg)} negative {split} examples; "
                             "selection needs both (check the concept set's split)")
        for ids, w in ((pos, 1.0 / len(pos)), (neg, -1.0 / len(neg))):
            r = pooled.rows(ids)
            rows += [i] * len(r)
            cols += r.tolist()
            vals += [w] * len(r)
    return sp.csr_matrix((np.asarray(vals, dtype=np.float32), (rows, cols)),
                         shape=(len(concepts), pooled.values.shape[0]))


def diffmean_features(artefact: Artefact, concepts: Sequence[str]) -> dict[str, int]:
    """DiffMean's own direction per concept, via `info['concepts']`."""
    names = artefact.info.get("concepts")
    if names is None:
        raise ValueError(f"{artefact.name}: a DiffMean artefact must list its concepts in info['concepts']")
    index = {n: i for i, n in enumerate(names)}
    missing = [c for c in concepts if c not in index]
    if missing:
        raise ValueError(f"{artefact.name} was fitted without concept(s) {missing[:5]}; refit it on this concept set")
    return {c: index[c] for c in concepts}


def select_features(
    artefact: Artefact,
    concept_set,
    text_acts: TextActivations,
    split: str = "train",
    readout: str | None = None,
    *,
    pooled: PooledTexts | None = None,
    neg_categories: Sequence[str] = TRAIN_NEGATIVES,
) -> dict[str, int]:
    """Per concept, the feature with the largest mean pooled activation difference positives - negatives."""
    concepts = list(concept_set.concepts)
    if artefact.method == "diffmean":
        return diffmean_features(artefact, concepts)
    readout = default_readout(artefact, readout)
    if pooled is None:
        ids = split_examples(concept_set, split)["text_id"].to_numpy()
        pooled = pooled_features(artefact, text_acts, ids, readout)
    elif pooled.readout != readout:
        raise ValueError(f"pooled features were read out with {pooled.readout!r}, selection needs {readout!r}; "
                         "pool again with that readout")
    W = contrast_weights(concept_set, split, neg_categories, concepts, pooled)
    score_CK = np.asarray(W @ pooled.values.numpy())
    best = score_CK.argmax(axis=1)
    return {c: int(k) for c, k in zip(concepts, best)}
