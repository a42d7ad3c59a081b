"""Per-feature card data read from the activation store: top-activating contexts, tokens sampled from
activation-quantile bands, the most negative contexts, each with the feature's value on every token of a window,
plus firing rate, extremes, a histogram and per-token-string activation sums; best matches in other methods
(top-n F1, as metrics.correspondence) and the concepts that select each feature.

The store (all of it by default, or its first `sample_contexts` contexts) is read twice in chunks of whole
contexts of about BLOCK_ELEMS / K rows. Pass 1: per feature the counts and extremes, a log-spaced histogram of
its positive activations (where its quantile bands start and end) and the running top / most negative contexts.
Pass 2: the display histogram, each band's exact count and range and a uniform random sample of its tokens, and
(optionally) activation sums per token string. So a K = 20,000 dictionary needs memory for a few [chunk, K]
blocks and per-feature summaries, never [rows, K].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from bench.activations import TextActivations
from bench.store import ActivationBatch, ActivationStore
from methods.base import Artefact
from metrics.correspondence import TOP_N, RunningTopN, _batches
from metrics.detection import auroc_columns
from metrics.feature_selection import default_readout, pooled_features, select_features, split_examples

BLOCK_ELEMS = 8 * 2**20  # largest [rows, K] feature block held at once (32 MB in fp32)
LOG_BINS = 8  # log-histogram bins per octave (equal sub-bins): quantile-band edges are located to within 12.5 %
LOG_LOW, LOG_HIGH = -24, 16  # octaves it spans: positive activations in [2**-24, 2**16) (clamped outside)


@dataclass
class CardConfig:
    """How much of each feature the browser shows (and so how large the site is)."""

    sample_contexts: int | None = None  # scan only the first N store contexts (None: the whole store)
    top_contexts: int = 5  # top-activating contexts per feature (distinct contexts)
    negative_contexts: int = 3  # most negative contexts, for features whose activation goes below 0
    bands: int = 4  # activation-quantile bands of a feature's positive activations (4: quartiles)
    band_examples: int = 2  # tokens drawn uniformly at random from each band
    before: int = 24  # tokens shown before an example's token
    after: int = 7  # ... and after it (a 32-token window)
    bins: int = 16  # histogram bins over the feature's non-zero range on the scanned rows
    members: int = 4  # EP closest and farthest members shown (each)
    match_top_n: int = TOP_N  # top-n inputs per feature for F1 matching (the correspondence metric's n)
    match_contexts: int = 128  # store contexts whose token rows are the matching inputs when there are no concept texts
    logit_tokens: int = 10  # promoted and suppressed tokens per feature (logit effects)
    fire_features: int = 5  # per token string, its features by mean activation ("fires on this text")
    fire_min_count: int = 2  # token strings seen fewer times on the scanned rows are left out of that table
    search_features: int = 50  # per word and dictionary, features in the context-text search index
    seed: int = 0  # of the band samples

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


class Examples(NamedTuple):
    """Per feature T examples: a store context, the example token's position and value, and the feature's value
    on the window of tokens around it (the example token at index `before`; NaN outside the context)."""

    context: np.ndarray  # [K, T] store context id (-1: fewer than T examples)
    position: np.ndarray  # [K, T] position of the example token in its context
    value: np.ndarray  # [K, T] activation there
    window: np.ndarray  # [K, T, before + 1 + after] float32


class Histogram(NamedTuple):
    """Activation histogram per feature over the scanned token rows; zeros counted apart (sparse features)."""

    lo: np.ndarray  # [K] left edge (smallest non-zero activation)
    hi: np.ndarray  # [K] right edge (largest non-zero activation)
    counts: np.ndarray  # [K, bins] int64 of the non-zero activations
    zeros: np.ndarray  # [K] rows where the feature is exactly 0
    rows: int


class Bands(NamedTuple):
    """The feature's positive activations cut into quantile bands (edges from pass 1's log histogram)."""

    edges: np.ndarray  # [K, bands - 1] upper edge of every band but the last (band b: edge[b-1] < v <= edge[b])
    count: np.ndarray  # [K, bands] tokens in each band (exact)
    lo: np.ndarray  # [K, bands] smallest activation in the band (NaN: empty)
    hi: np.ndarray  # [K, bands] largest
    samples: list[Examples]  # per band, tokens drawn uniformly at random from it


class Evidence(NamedTuple):
    """Everything a dictionary's cards show that is read from the store."""

    rows: int  # token rows scanned
    contexts: int  # store contexts scanned
    positive: np.ndarray  # [K] rows where the feature is > 0 (its firing rate is positive / rows)
    vmin: np.ndarray  # [K] smallest activation
    vmax: np.ndarray  # [K] largest activation
    top: Examples  # strongest distinct contexts, by the context's largest activation
    negative: Examples  # most negative distinct contexts (only where the activation is < 0)
    bands: Bands
    hist: Histogram
    token_counts: np.ndarray  # occurrences per token id on the scanned rows
    token_sums: torch.Tensor | None  # [strings, K] activation summed per token string (see `scan`)


def sample_rows(store: ActivationStore, layer: int, n_contexts: int) -> ActivationBatch:
    """The first `n_contexts` contexts of the store at `layer` (rows in context order)."""
    batch = next(store.batches(layer, batch_contexts=max(1, min(n_contexts, store.n_contexts))), None)
    if batch is None:
        raise ValueError(f"store {store.id} has no rows at layer {layer}; extract a non-empty corpus first")
    return batch


def store_chunks(store: ActivationStore, layer: int, K: int, cap: int | None = None) -> Iterator[ActivationBatch]:
    """The store's rows at `layer` in context order, in batches of whole contexts of at most about BLOCK_ELEMS / K
    rows (at least one context), up to the first `cap` contexts (None: all of them)."""
    per_context = max(1, int(store.manifest["ctx_len"]) - 1)
    n = max(1, BLOCK_ELEMS // (max(K, 1) * per_context))
    for batch in store.batches(layer, batch_contexts=n if cap is None else max(1, min(n, cap))):
        if cap is not None and int(batch.context_ids[-1]) >= cap:
            keep = batch.context_ids < cap
            if not bool(keep.any()):
                return
            n_ctx = len(torch.unique(batch.context_ids[keep]))
            yield ActivationBatch(batch.acts[keep], batch.context_ids[keep], batch.doc_ids[keep],
                                  batch.positions[keep], batch.token_ids[keep], int(keep.sum()) + n_ctx)
            return
        yield batch


def _encode(art: Artefact, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return art.encode(x, default_readout(art)).float().cpu()


class _Chunk(NamedTuple):
    """One batch of rows with its features and, per row, its context's index in the batch and row range."""

    batch: ActivationBatch
    f: torch.Tensor  # [n, K]
    ctx: torch.Tensor  # [n] index of the row's context within the batch
    n_ctx: int
    row_lo: torch.Tensor  # [n] first row of the row's context
    row_hi: torch.Tensor  # [n] one past its last row


def _chunk(art: Artefact, batch: ActivationBatch) -> _Chunk:
    cid = batch.context_ids
    new = torch.ones(len(cid), dtype=torch.bool)
    new[1:] = cid[1:] != cid[:-1]
    ctx = torch.cumsum(new.long(), 0) - 1
    starts = new.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([len(cid)])])
    return _Chunk(batch, _encode(art, batch.acts), ctx, len(starts), starts[ctx], ends[ctx])


def _context_extremes(c: _Chunk, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per context of the chunk and feature: the largest (smallest) activation and the first row holding it."""
    n, K = c.f.shape
    idx = c.ctx[:, None].expand(n, K)
    ext = torch.full((c.n_ctx, K), -torch.inf if largest else torch.inf)
    ext.scatter_reduce_(0, idx, c.f, "amax" if largest else "amin")
    hit = torch.where(c.f == ext[c.ctx], torch.arange(n)[:, None], n)
    row = torch.full((c.n_ctx, K), n, dtype=torch.long).scatter_reduce_(0, idx, hit, "amin")
    return ext, row


class _Best:
    """Per feature the T best examples seen so far by a score (larger first; -inf: none), with their windows."""

    def __init__(self, K: int, T: int, before: int, after: int):
        self.before, self.after = before, after
        self.score = torch.full((K, T), -torch.inf)
        self.context = torch.full((K, T), -1, dtype=torch.long)
        self.position = torch.zeros((K, T), dtype=torch.long)
        self.value = torch.zeros((K, T))
        self.window = torch.full((K, T, before + 1 + after), torch.nan)

    def offer(self, c: _Chunk, score: torch.Tensor, rows: torch.Tensor) -> None:
        """Candidates: score [K, m] (-inf: no candidate) of the chunk's rows [K, m]; only the kept ones' windows
        are read."""
        K, T = self.score.shape
        if T == 0 or score.shape[1] == 0:
            return
        best, order = torch.cat([self.score, score], 1).topk(T, dim=1)
        new = (order >= T) & torch.isfinite(best)
        old = order.clamp(max=T - 1)
        context, position = self.context.gather(1, old), self.position.gather(1, old)
        value = self.value.gather(1, old)
        window = self.window.gather(1, old[:, :, None].expand(-1, -1, self.window.shape[2])).clone()
        k, t = new.nonzero(as_tuple=True)
        if len(k):
            r = rows[k, order[k, t] - T]
            span = r[:, None] + torch.arange(-self.before, self.after + 1)
            inside = (span >= c.row_lo[r][:, None]) & (span < c.row_hi[r][:, None])
            vals = c.f[span.clamp(0, len(c.f) - 1), k[:, None]]
            window[k, t] = torch.where(inside, vals, torch.nan)
            context[k, t], position[k, t] = c.batch.context_ids[r], c.batch.positions[r]
            value[k, t] = c.f[r, k]
        gone = ~torch.isfinite(best)
        context[gone] = -1
        self.score, self.context, self.position, self.value, self.window = best, context, position, value, window

    def examples(self) -> Examples:
        return Examples(self.context.numpy(), self.position.numpy(), self.value.numpy(), self.window.numpy())


def _log_bins(f: torch.Tensor) -> torch.Tensor:
    """Log-histogram bin of positive activations (int32; any value for the rest, which callers mask): octave o
    (v in [2**(LOG_LOW + o), 2**(LOG_LOW + o + 1))) cut into LOG_BINS equal sub-bins."""
    mant, exp = torch.frexp(f)  # f = mant * 2**exp, mant in [0.5, 1)
    sub = ((mant * 2 - 1) * LOG_BINS).to(torch.int32)
    return ((exp - 1 - LOG_LOW) * LOG_BINS + sub).clamp_(0, (LOG_HIGH - LOG_LOW) * LOG_BINS - 1)


def _bin_top(b: np.ndarray) -> np.ndarray:
    """Upper boundary of log-histogram bin b."""
    octave, sub = np.divmod(b, LOG_BINS)
    return 2.0 ** (LOG_LOW + octave) * (1 + (sub + 1) / LOG_BINS)


def _count(idx: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """Counts [size] of the flat indices idx where mask holds (the rest go to a dropped extra slot)."""
    return torch.bincount(idx.masked_fill(~mask, size).view(-1), minlength=size + 1)[:size]


def band_edges(log_hist: np.ndarray, positive: np.ndarray, vmax: np.ndarray, bands: int) -> np.ndarray:
    """[K, bands - 1] band edges: where each feature's cumulative count of positive activations (log histogram
    [K, bins]) first reaches b / bands of them, as the upper boundary of that bin (so the exact b / bands quantile
    lies within a factor 1 + 1/LOG_BINS below the edge), capped at the feature's maximum."""
    cdf = np.cumsum(log_hist, axis=1)
    out = np.zeros((len(log_hist), max(bands - 1, 0)))
    for b in range(1, bands):
        target = positive * b / bands
        first = (cdf < np.maximum(target, 1)[:, None]).sum(axis=1)  # first bin whose cumulative count reaches it
        out[:, b - 1] = np.minimum(_bin_top(first), np.maximum(vmax, 0))
    return out


def scan(art: Artefact, store: ActivationStore, layer: int, cfg: CardConfig,
         token_rows: Callable[[np.ndarray, int], torch.Tensor] | None = None) -> Evidence:
    """Read the store twice (see the module docstring). `token_rows(token_counts, K)`, given, maps every token id
    to a row of the per-string activation sums (-1: left out), called between the passes."""
    K, B, S = art.K, cfg.bands, cfg.band_examples
    chunks = lambda: store_chunks(store, layer, K, cfg.sample_contexts)  # noqa: E731 - read once per pass
    nonzero = torch.zeros(K, dtype=torch.long)
    lo, hi = torch.full((K,), torch.inf), torch.full((K,), -torch.inf)  # over non-zero activations
    vmin, vmax = torch.full((K,), torch.inf), torch.full((K,), -torch.inf)
    n_log = (LOG_HIGH - LOG_LOW) * LOG_BINS
    log_hist = torch.zeros(K * n_log, dtype=torch.int64)
    offsets = torch.arange(K, dtype=torch.int32)
    top = _Best(K, cfg.top_contexts, cfg.before, cfg.after)
    neg = _Best(K, cfg.negative_contexts, cfg.before, cfg.after)
    token_counts = np.zeros(1, dtype=np.int64)
    rows = contexts = 0
    for batch in chunks():
        c = _chunk(art, batch)
        f = c.f
        rows, contexts = rows + len(f), contexts + c.n_ctx
        pos, nz = f > 0, f != 0
        nonzero += nz.float().sum(0).long()
        lo = torch.minimum(lo, torch.where(nz, f, torch.inf).amin(0))
        hi = torch.maximum(hi, torch.where(nz, f, -torch.inf).amax(0))
        vmin, vmax = torch.minimum(vmin, f.amin(0)), torch.maximum(vmax, f.amax(0))
        log_hist += _count(_log_bins(f) + offsets * n_log, pos, K * n_log)
        ext, row = _context_extremes(c, largest=True)
        top.offer(c, torch.where(ext > 0, ext, -torch.inf).T, row.T)
        if cfg.negative_contexts:
            ext, row = _context_extremes(c, largest=False)
            neg.offer(c, torch.where(ext < 0, -ext, -torch.inf).T, row.T)
        ids = batch.token_ids.numpy()
        if len(ids):
            counts = np.bincount(ids)
            token_counts = np.pad(token_counts, (0, max(0, len(counts) - len(token_counts))))
            token_counts[:len(counts)] += counts
    if rows == 0:
        raise ValueError(f"store {store.id} has no rows at layer {layer}; extract a non-empty corpus first")
    log_hist = log_hist.view(K, n_log).numpy()
    positive_np, vmax_np = log_hist.sum(axis=1), vmax.numpy()  # every positive activation is in one bin
    edges = torch.from_numpy(band_edges(log_hist, positive_np, vmax_np, B)).float()
    str_rows = token_rows(token_counts, K) if token_rows is not None else None
    n_strings = int(str_rows.max()) + 1 if str_rows is not None and len(str_rows) else 0
    sums = torch.zeros((n_strings, K)) if str_rows is not None else None
    counts = torch.zeros(K * cfg.bins, dtype=torch.long)
    span = (hi - lo).clamp_min(1e-12)
    band_count = torch.zeros((B + 1) * K, dtype=torch.long)  # band-major, band B: not positive
    band_lo, band_hi = torch.full(((B + 1) * K,), torch.inf), torch.full(((B + 1) * K,), -torch.inf)
    samples = [_Best(K, S, cfg.before, cfg.after) for _ in range(B)]
    g = torch.Generator().manual_seed(cfg.seed)
    for batch in chunks():
        c = _chunk(art, batch)
        f = c.f
        nz, pos = f != 0, f > 0
        bins = ((f - lo) / span * cfg.bins).to(torch.int32).clamp_(0, cfg.bins - 1) + offsets * cfg.bins
        counts += _count(bins, nz, K * cfg.bins)
        del bins
        band = torch.zeros(f.shape, dtype=torch.int64)
        for j in range(B - 1):
            band += f > edges[:, j]
        band.masked_fill_(~pos, B)
        flat = band * K + torch.arange(K)
        band_count += torch.bincount(flat.view(-1), minlength=(B + 1) * K)
        band_lo.scatter_reduce_(0, flat.view(-1), f.view(-1), "amin")
        band_hi.scatter_reduce_(0, flat.view(-1), f.view(-1), "amax")
        del flat
        if S:
            key = torch.rand(f.shape, generator=g)  # uniform keys: each band's S smallest are a uniform sample
            for b in range(B):
                score, row = torch.where(band == b, -key, -torch.inf).topk(min(S, len(f)), dim=0)
                samples[b].offer(c, score.T, row.T)
        if sums is not None:
            r = str_rows[batch.token_ids.clamp(max=len(str_rows) - 1)]
            r = torch.where(batch.token_ids < len(str_rows), r, -1)
            keep = r >= 0
            sums.index_add_(0, r[keep], f[keep])
    zeros = rows - nonzero
    finite = lambda t: torch.where(torch.isfinite(t), t, torch.nan).numpy()  # noqa: E731
    hist = Histogram(lo.numpy(), hi.numpy(), counts.view(K, cfg.bins).numpy(), zeros.numpy(), rows)
    per_band = lambda t: t.view(B + 1, K)[:B].T.contiguous()  # noqa: E731 - [K, B]
    bands = Bands(edges.numpy(), per_band(band_count).numpy(), finite(per_band(band_lo)), finite(per_band(band_hi)),
                  [s.examples() for s in samples])
    return Evidence(rows, contexts, positive_np, vmin.numpy(), vmax_np, top.examples(), neg.examples(), bands, hist,
                    token_counts, sums)


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
