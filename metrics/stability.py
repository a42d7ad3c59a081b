"""Stability of dictionaries: across adjacent layers, across stream orders (seeds), across models.

Two dictionaries A (K_a features) and B (K_b) are matched one-to-one in two ways:
- direction: similarity = cosine of unit directions (absolute cosine for sign-free methods such as PCA). Only
  meaningful when both live in the same residual basis: adjacent layers of one model, two builds at one
  layer, or two models sharing d (a base and its -it variant); a d mismatch raises.
- co-activation: on a shared evaluation stream (the same token rows fed to both, each at its own layer),
  each feature's top-k activating rows (k = 100; rows with activation exactly 0 do not count, so a sparse
  feature can have fewer) are compared: F1 = 2 |S_a & S_b| / (|S_a| + |S_b|). Readout: `signed` where the
  method offers it (EP's dense readout, as in the paper's F1 matching), else its default.
Matching: the Hungarian assignment (scipy linear_sum_assignment) maximising total similarity when
max(K_a, K_b) <= `hungarian_cap` (4096). Above it (20k x 20k is too slow), a greedy one-to-one matching over
sparse candidates (each feature's `n_candidates` = 8 most similar partners, both ways), taking edges in
decreasing similarity; features left unmatched count as similarity 0. Greedy is a valid one-to-one matching, so
its mean similarity is a lower bound of the Hungarian optimum. Rows (the layer of A in `layer`, the pair in
`detail`), as a share of min(K_a, K_b) (the most one-to-one matches possible), CI over features:
`stability.direction.share>{0.5,0.7,0.9}`, `stability.direction.mean_cos`, `stability.coactivation.share>0.5`,
`stability.coactivation.mean_f1`.
Concept-level: `concept_stability` asks whether the feature chosen for a concept at layer L
(`metrics.feature_selection.select_features`, train split), followed through the direction matching to its
partner at layer L+k, still retrieves the concept there: `metrics.retrieval.precision_at_k` (k = 10) of the
partner's pooled scores over the concept's test pool at L+k (`stability.concept_precision@10`, mean over
concepts; a feature left without a partner scores 0). Compare with `retrieval.precision@10` at L+k (the
feature selected there directly) for the ceiling.
Between two models (same tokenizer), pass each model's activations of the same texts as acts_a / acts_b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

from bench.activations import TextActivations
from methods.base import Artefact
from metrics.common import MetricRow, mean_row

# Methods whose directions have no meaningful sign (a principal axis is defined up to sign).
SIGN_FREE_METHODS = frozenset({"pca"})

ActsLike = torch.Tensor | TextActivations | Iterable[torch.Tensor]


@dataclass
class StabilityConfig:
    """Settings of the matching metrics."""

    cos_thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)  # direction cosine cut-offs reported as shares
    f1_thresholds: tuple[float, ...] = (0.5,)  # co-activation F1 cut-offs reported as shares
    top_k: int = 100  # top activating rows per feature for co-activation F1
    hungarian_cap: int = 4096  # above this K, greedy matching on sparse candidates replaces Hungarian
    n_candidates: int = 8  # candidate partners per feature (each way) for the greedy matching
    readout: str | None = None  # co-activation readout; None: "signed" where offered, else the default
    max_tokens: int | None = 200_000  # tokens streamed from an ActivationStore for co-activation
    seed: int = 0  # bootstrap seed


class Matching(NamedTuple):
    """A one-to-one matching between the features of A and B."""

    rows: np.ndarray  # matched feature ids in A
    cols: np.ndarray  # matched feature ids in B
    sim: np.ndarray  # similarity of each matched pair
    n_possible: int  # min(K_a, K_b): the most one-to-one matches possible
    exact: bool  # Hungarian (True) or greedy on sparse candidates (False)

    def padded(self) -> np.ndarray:
        """Similarities of the n_possible match slots, unmatched ones as 0."""
        out = np.zeros(self.n_possible)
        out[: len(self.sim)] = self.sim
        return out

    def partner(self) -> dict[int, int]:
        return dict(zip(self.rows.tolist(), self.cols.tolist()))


# ---------------------------------------------------------------------------------------------------------
# Matching


def hungarian(sim_AB: np.ndarray) -> Matching:
    """Maximum-total-similarity one-to-one matching of a dense similarity matrix."""
    r, c = linear_sum_assignment(sim_AB, maximize=True)
    return Matching(r, c, sim_AB[r, c].astype(float), min(sim_AB.shape), True)


def greedy(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> Matching:
    """One-to-one matching taking candidate edges in decreasing similarity."""
    order = np.lexsort((cols, rows, -vals))  # ties broken by ids, so the result is deterministic
    used_a, used_b = np.zeros(shape[0], bool), np.zeros(shape[1], bool)
    mr, mc, ms = [], [], []
    for e in order:
        a, b = rows[e], cols[e]
        if not used_a[a] and not used_b[b]:
            used_a[a] = used_b[b] = True
            mr.append(a), mc.append(b), ms.append(vals[e])
    return Matching(np.array(mr, int), np.array(mc, int), np.array(ms, float), min(shape), False)


def _topm_edges(a_KD: torch.Tensor, b_KD: torch.Tensor, m: int, absolute: bool,
                chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row of A's m most cosine-similar rows of B, computed in blocks: (rows, cols, sims)."""
    m = min(m, len(b_KD))
    rs, cs, vs = [], [], []
    for lo in range(0, len(a_KD), chunk):
        s = a_KD[lo : lo + chunk] @ b_KD.T
        if absolute:
            s = s.abs()
        v, i = s.topk(m, dim=1)
        rs.append(np.repeat(np.arange(lo, lo + len(s)), m))
        cs.append(i.reshape(-1).numpy())
        vs.append(v.reshape(-1).numpy())
    return np.concatenate(rs), np.concatenate(cs), np.concatenate(vs).astype(float)


def match_directions(dirs_a: torch.Tensor, dirs_b: torch.Tensor, absolute: bool = False,
                     hungarian_cap: int = 4096, n_candidates: int = 8) -> Matching:
    """Match two direction sets [K, d] by (absolute) cosine."""
    if dirs_a.shape[1] != dirs_b.shape[1]:
        raise ValueError(f"direction matching needs one residual basis, but d differs ({dirs_a.shape[1]} vs "
                         f"{dirs_b.shape[1]}); compare these dictionaries by co-activation only (directions=False)")
    a = torch.nn.functional.normalize(dirs_a.float().cpu(), dim=1)
    b = torch.nn.functional.normalize(dirs_b.float().cpu(), dim=1)
    if max(len(a), len(b)) <= hungarian_cap:
        s = (a @ b.T).double()
        return hungarian((s.abs() if absolute else s).numpy())
    r1, c1, v1 = _topm_edges(a, b, n_candidates, absolute)
    c2, r2, v2 = _topm_edges(b, a, n_candidates, absolute)
    return greedy(np.concatenate([r1, r2]), np.concatenate([c1, c2]), np.concatenate([v1, v2]), (len(a), len(b)))


# ---------------------------------------------------------------------------------------------------------
# Top-k activating rows


class TopK:
    """Running top-k activating rows per feature over a stream of feature chunks."""

    def __init__(self, K: int, k: int, absolute: bool = False):
        self.k, self.absolute, self.n_rows = k, absolute, 0
        self.vals = torch.full((0, K), float("-inf"))
        self.idx = torch.zeros((0, K), dtype=torch.long)

    def update(self, feats_NK: torch.Tensor) -> None:
        f = feats_NK.float().cpu()
        f = f.abs() if self.absolute else f
        f = f.masked_fill(feats_NK.cpu() == 0, float("-inf"))  # inactive rows never count
        ids = torch.arange(self.n_rows, self.n_rows + len(f))[:, None].expand_as(f)
        vals, idx = torch.cat([self.vals, f]), torch.cat([self.idx, ids])
        top = vals.topk(min(self.k, len(vals)), dim=0)
        self.vals, self.idx = top.values, idx.gather(0, top.indices)
        self.n_rows += len(f)

    def sets(self) -> sp.csr_matrix:
        """Binary [n_rows, K] membership of each feature's top rows."""
        keep = torch.isfinite(self.vals)
        feat = torch.arange(self.vals.shape[1])[None].expand_as(self.vals)[keep].numpy()
        rows = self.idx[keep].numpy()
        return sp.csr_matrix((np.ones(len(rows)), (rows, feat)), shape=(self.n_rows, self.vals.shape[1]))


def coactivation_readout(artefact: Artefact, readout: str | None = None) -> str | None:
    """The readout used for co-activation: given, else `signed` where the method offers it."""
    if readout is not None:
        return readout
    return "signed" if "signed" in artefact.readouts else None


def _encode(artefact: Artefact, x: torch.Tensor, readout: str | None) -> torch.Tensor:
    x = artefact.check_input(x)
    with torch.no_grad():
        return artefact.encode(x, readout=readout) if readout is not None else artefact.encode(x)


def _chunks(acts: ActsLike, K: int) -> Iterator[torch.Tensor]:
    """Row chunks of an activation source small enough that a [chunk, K] float block stays ~64 MB."""
    step = max(256, (1 << 24) // max(K, 1))
    if isinstance(acts, TextActivations):
        acts = acts.acts
    if isinstance(acts, torch.Tensor):
        for lo in range(0, len(acts), step):
            yield acts[lo : lo + step]
    else:
        for batch in acts:
            b = batch.acts if hasattr(batch, "acts") else batch
            for lo in range(0, len(b), step):
                yield b[lo : lo + step]


def topk_rows(artefact: Artefact, acts: ActsLike, k: int = 100, readout: str | None = None) -> TopK:
    """Each feature's top-k activating rows of an activation source."""
    ro = coactivation_readout(artefact, readout)
    acc = TopK(artefact.K, k, absolute=artefact.method in SIGN_FREE_METHODS)
    for x in _chunks(acts, artefact.K):
        acc.update(_encode(artefact, x, ro))
    return acc


def match_coactivation(top_a: TopK, top_b: TopK, hungarian_cap: int = 4096, n_candidates: int = 8) -> Matching:
    """Match features by F1 of their top-k row sets (both accumulated over the same rows)."""
    if top_a.n_rows != top_b.n_rows:
        raise ValueError(f"co-activation needs the same evaluation rows for both dictionaries, got "
                         f"{top_a.n_rows} and {top_b.n_rows} rows")
    sa, sb = top_a.sets(), top_b.sets()
    size_a, size_b = np.asarray(sa.sum(0)).ravel(), np.asarray(sb.sum(0)).ravel()
    inter = (sa.T @ sb).tocoo()
    f1 = 2 * inter.data / (size_a[inter.row] + size_b[inter.col])
    shape = (len(size_a), len(size_b))
    if max(shape) <= hungarian_cap:
        dense = np.zeros(shape)
        dense[inter.row, inter.col] = f1
        return hungarian(dense)
    keep = _top_per_line(inter.row, inter.col, f1, n_candidates)
    return greedy(inter.row[keep], inter.col[keep], f1[keep], shape)


def _top_per_line(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, m: int) -> np.ndarray:
    """Mask of edges among the m best of their row or of their column."""
    keep = np.zeros(len(vals), bool)
    for line in (rows, cols):
        order = np.lexsort((-vals, line))
        starts = np.r_[0, np.flatnonzero(np.diff(line[order])) + 1]
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        keep[order[rank < m]] = True
    return keep


# ---------------------------------------------------------------------------------------------------------
# Rows


def _match_rows(artefact: Artefact, kind: str, sim_name: str, m: Matching, thresholds: Sequence[float],
                detail: str, layer: int | None, seed: int) -> list[MetricRow]:
    s = m.padded()
    how = "hungarian" if m.exact else "greedy on sparse candidates (K above the Hungarian cap)"
    d = f"{detail}; {how}; share of min(K_a, K_b) = {m.n_possible}"
    out = [mean_row(artefact, f"stability.{kind}.share>{t:g}", (s > t).astype(float), seed, d, layer)
           for t in thresholds]
    out.append(mean_row(artefact, f"stability.{kind}.{sim_name}", s, seed, d, layer))
    return out


def pair_stability(
    art_a: Artefact,
    art_b: Artefact,
    acts_a: ActsLike | None = None,
    acts_b: ActsLike | None = None,
    detail: str = "",
    layer: int | None = None,
    config: StabilityConfig | None = None,
    directions: bool = True,
) -> list[MetricRow]:
    """Direction and (with activations) co-activation matching of two dictionaries, as rows of A.

    acts_a / acts_b: the same evaluation rows at A's and B's hook (acts_b defaults to acts_a: same layer).
    """
    cfg = config or StabilityConfig()
    detail = detail or f"{art_a.name} L{art_a.info.get('layer', '?')} vs {art_b.name} L{art_b.info.get('layer', '?')}"
    detail += f"; K_a={art_a.K}, K_b={art_b.K}"
    rows: list[MetricRow] = []
    if directions:
        absolute = art_a.method in SIGN_FREE_METHODS or art_b.method in SIGN_FREE_METHODS
        m = match_directions(art_a.directions, art_b.directions, absolute, cfg.hungarian_cap, cfg.n_candidates)
        rows += _match_rows(art_a, "direction", "mean_cos", m, cfg.cos_thresholds,
                            detail + ("; |cos| (sign-free method)" if absolute else ""), layer, cfg.seed)
    if acts_a is not None:
        top_a = topk_rows(art_a, acts_a, cfg.top_k, cfg.readout)
        top_b = topk_rows(art_b, acts_b if acts_b is not None else acts_a, cfg.top_k, cfg.readout)
        rows += _coactivation_rows(art_a, top_a, top_b, cfg, detail, layer)
    return rows


def _coactivation_rows(art_a: Artefact, top_a: TopK, top_b: TopK, cfg: StabilityConfig, detail: str,
                       layer: int | None) -> list[MetricRow]:
    m = match_coactivation(top_a, top_b, cfg.hungarian_cap, cfg.n_candidates)
    d = f"{detail}; top-{cfg.top_k} rows of {top_a.n_rows}"
    return _match_rows(art_a, "coactivation", "mean_f1", m, cfg.f1_thresholds, d, layer, cfg.seed)


def _check_same_store(artefacts: Mapping[int, Artefact]) -> None:
    ids = {a.info.get("store_id") for a in artefacts.values()} - {None}
    if len(ids) > 1:
        raise ValueError(f"cross-layer stability compares dictionaries built on one activation store, got stores "
                         f"{sorted(ids)}; rebuild them on one multi-layer store")


def cross_layer_stability(
    artefacts: Mapping[int, Artefact],
    acts: Mapping[int, ActsLike] | None = None,
    store: Any = None,
    config: StabilityConfig | None = None,
) -> list[MetricRow]:
    """Stability between each pair of adjacent layers (sorted) of one method's artefacts.

    Co-activation needs the same rows at every layer: either `acts` (layer -> tensor / TextActivations of the
    same texts) or an ActivationStore `store` holding those layers (streamed once, up to config.max_tokens).
    """
    cfg = config or StabilityConfig()
    if len(artefacts) < 2:
        raise ValueError(f"cross-layer stability needs artefacts at >= 2 layers, got layers {sorted(artefacts)}")
    _check_same_store(artefacts)
    layers = sorted(artefacts)
    tops: dict[int, TopK] = {}
    if store is not None:
        tops = {L: TopK(artefacts[L].K, cfg.top_k, artefacts[L].method in SIGN_FREE_METHODS) for L in layers}
        for batch in store.batches(layers, max_tokens=cfg.max_tokens):
            for L in layers:
                for x in _chunks(batch.acts[L], artefacts[L].K):
                    tops[L].update(_encode(artefacts[L], x, coactivation_readout(artefacts[L], cfg.readout)))
    elif acts is not None:
        missing = [L for L in layers if L not in acts]
        if missing:
            raise ValueError(f"acts lacks layer(s) {missing}; give activations of the same rows at every layer")
        tops = {L: topk_rows(artefacts[L], acts[L], cfg.top_k, cfg.readout) for L in layers}
    rows: list[MetricRow] = []
    for la, lb in zip(layers, layers[1:]):
        a, b = artefacts[la], artefacts[lb]
        detail = f"layers {la}->{lb}; K_a={a.K}, K_b={b.K}"
        absolute = a.method in SIGN_FREE_METHODS or b.method in SIGN_FREE_METHODS
        m = match_directions(a.directions, b.directions, absolute, cfg.hungarian_cap, cfg.n_candidates)
        rows += _match_rows(a, "direction", "mean_cos", m, cfg.cos_thresholds, detail, la, cfg.seed)
        if tops:
            rows += _coactivation_rows(a, tops[la], tops[lb], cfg, detail, la)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Concept-level stability


def concept_stability(
    artefacts: Mapping[int, Artefact],
    concept_set: Any,
    text_acts: Mapping[int, TextActivations],
    offsets: Sequence[int] = (1,),
    config: StabilityConfig | None = None,
) -> list[MetricRow]:
    """stability.concept_precision@10: precision@10 at L+k of the match of the feature chosen at L."""
    # Sibling modules, imported when used: selection and the precision rule are theirs, not re-implemented.
    from metrics.feature_selection import default_readout, pooled_features, select_features, split_examples
    from metrics.retrieval import precision_at_k

    cfg = config or StabilityConfig()
    _check_same_store(artefacts)
    layers = sorted(artefacts)
    rows: list[MetricRow] = []
    for la in layers:
        a = artefacts[la]
        chosen = select_features(a, concept_set, text_acts[la], split="train")
        for k in offsets:
            lb = la + k
            if lb not in artefacts:
                continue
            b = artefacts[lb]
            absolute = a.method in SIGN_FREE_METHODS or b.method in SIGN_FREE_METHODS
            partner = match_directions(a.directions, b.directions, absolute, cfg.hungarian_cap,
                                       cfg.n_candidates).partner()
            test = split_examples(concept_set, "test")
            pooled = pooled_features(b, text_acts[lb], test["text_id"].unique(), default_readout(b))
            values = []
            for c in concept_set.concepts:
                if chosen[c] not in partner:  # no partner at L+k: the concept is not retrieved there
                    values.append(0.0)
                    continue
                e = test[test["concept"] == c]
                scores = pooled.values.numpy()[pooled.rows(e["text_id"].to_numpy()), partner[chosen[c]]]
                values.append(precision_at_k(scores, (e["category"] == "positive").to_numpy(), 10))
            rows.append(mean_row(a, "stability.concept_precision@10", values, cfg.seed,
                                 f"concepts chosen at L{la} (train split), followed by direction matching to "
                                 f"L{lb}, precision@10 on test texts at L{lb}; {concept_set.name}", la))
    return rows
