"""Exemplar Partitioning (EP): a streaming leader-clustering Voronoi dictionary on the centred unit sphere.

Implements `/work/shared/spec/exemplar-partitioning.md` (Rumbelow 2026) from the spec, not from reference code:

1. Calibration (`calibrate`, once per store/hook/batch geometry): centre c from the spherical mean, and per
   percentile p a threshold theta_p = mean over calibration batches of the p-th percentile of all within-batch
   pairwise cosine distances (exact, or estimated from uniformly sampled pairs).
2. Discovery (`fit` / `fit_many`): stream batches in store order from the start of the stream; rows join the
   nearest exemplar existing at batch start when within theta (best fit, inclusive), unmatched rows are walked
   in batch order and either join the most similar leader created earlier in the batch or become a new region.
   Stop after `sat_window` batches that create no region, or at the token budget.

`fit_many(store, layers)` builds every (layer, percentile) dictionary from one multi-layer stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from methods.base import Artefact, Assignment, Cost, Method, MethodConfig
from methods.common import EPS, CenterAccumulator, PeakMemory, centred_unit

if TYPE_CHECKING:
    from bench.store import ActivationBatch, ActivationStore

SIM_BUDGET_ELEMS = 64 * 2**20  # largest [rows, K] similarity block materialised at once (256 MB in fp32)
EXACT_MAX_PAIRS = 140_000_000  # exact calibration keeps every pair distance: 16,384 rows (134M pairs, 536 MB) fit
READOUTS = ("cosine", "signed", "topk", "binary")
BASES = ("exemplar", "mean")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class EPConfig(MethodConfig):
    """EP hyperparameters. Only `percentiles` shapes the dictionary; the rest is stream geometry and engineering."""

    percentiles: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 10.0])  # p in (0, 100);
    # `fit` builds percentiles[0], `fit_many` builds all of them from one pass
    n_calib: int = 200_000  # calibration rows (read whole batches until reached; may overshoot by one batch)
    calib_estimator: str = "sampled"  # "exact": every within-batch pair; "sampled": calib_pairs uniform pairs
    calib_pairs: int = 4_000_000  # pairs per calibration batch for the sampled estimator
    calib_block: int = 128  # sampled pairs come as b x b blocks of 2b distinct random rows so they run as
    # GEMMs; every pair is still uniform over the n(n-1)/2 pairs, but pairs of a block share rows, so a block
    # design needs more pairs for the same variance (on SmolLM2 activations, 4M pairs in 128-blocks ~ 2M
    # independent pairs). 1 = independent pairs (slow: two row gathers per pair)
    calib_seed: int = 0  # seed of the sampled estimator
    batch_contexts: int = 128  # contexts per batch (128 x 127 rows: the paper's geometry; theta depends on it)
    sat_window: int = 1  # stop after this many consecutive batches that create no region
    token_budget: int | None = None  # stop discovery once this many tokens (BOS included) were streamed
    shuffle_seed: int | None = None  # block-shuffle of the store order (None: store order, as published)
    merge_close: bool = False  # optional post-pass merging close exemplars; not implemented (spec: near no-op)
    n_examples: int = 5  # closest and farthest member examples kept per region
    device: str | None = None  # None: cuda when available, else cpu
    chunk_rows: int = 4096  # rows per chunk of exemplar search / assign (also capped by SIM_BUDGET_ELEMS / K)
    leader_block: int = 1024  # rows per block of the within-batch leader walk
    compute_dtype: str = "float32"  # "float64" reproduces a float64 reference bit-for-bit in decisions (tests)
    tf32: bool = False  # opt-in TF32 matmuls in discovery's exemplar search (CUDA Ampere+; no effect on CPU);
    # calibration stays fp32, so theta is unchanged; bench.device_check reports whether any decision changed

    def __post_init__(self) -> None:
        if isinstance(self.percentiles, (int, float)):
            self.percentiles = [self.percentiles]
        self.percentiles = [float(p) for p in self.percentiles]
        if not self.percentiles:
            raise ValueError("EPConfig.percentiles is empty; give at least one percentile, e.g. [2]")
        for p in self.percentiles:
            if not (0.0 < p < 100.0) or not math.isfinite(p):
                raise ValueError(f"EPConfig.percentiles: {p} is outside (0, 100); the paper uses 1, 2, 4, 8, 10")
        if len(set(self.percentiles)) != len(self.percentiles):
            raise ValueError(f"EPConfig.percentiles has duplicates: {self.percentiles}")
        if self.calib_estimator not in ("exact", "sampled"):
            raise ValueError(f"calib_estimator must be 'exact' or 'sampled', not {self.calib_estimator!r}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, not {self.compute_dtype!r}")
        for name in ("n_calib", "calib_pairs", "calib_block", "batch_contexts", "sat_window", "chunk_rows",
                     "leader_block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EPConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_examples < 0:
            raise ValueError(f"EPConfig.n_examples must be >= 0, got {self.n_examples}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"EPConfig.token_budget must be >= 1 token (or None for no budget), got {self.token_budget}")
        if self.merge_close:
            raise NotImplementedError("EP merge_close post-pass is not implemented (the spec calls it a near no-op); "
                                      "leave merge_close=False")


def _device(cfg: EPConfig) -> torch.device:
    """The configured device (default CUDA when present); one a CPU-only torch cannot use is refused in one line."""
    if cfg.device and torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"ep: device={cfg.device!r}, but torch {torch.__version__} sees no GPU; use device=cpu")
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA float32 matmuls on TF32 tensor cores inside the block when `enabled` (CPU matmuls are untouched)."""
    if not enabled:
        yield
        return
    mm = torch.backends.cuda.matmul
    new_api = hasattr(mm, "fp32_precision")  # torch >= 2.9; the legacy flag must not be mixed with it
    prev = mm.fp32_precision if new_api else mm.allow_tf32
    if new_api:
        mm.fp32_precision = "tf32"
    else:
        mm.allow_tf32 = True
    try:
        yield
    finally:
        if new_api:
            mm.fp32_precision = prev
        else:
            mm.allow_tf32 = prev


# ---------------------------------------------------------------------------------------------------------
# Geometry helpers


def cosine_distance(sim: torch.Tensor) -> torch.Tensor:
    """1 - cos, clamped to [0, 2] (the spec's distance)."""
    return (1.0 - sim).clamp_(0.0, 2.0)


def _rows_per_chunk(K: int, chunk_rows: int) -> int:
    """Rows per similarity block so that [rows, K] stays within SIM_BUDGET_ELEMS."""
    return max(1, min(chunk_rows, SIM_BUDGET_ELEMS // max(K, 1)))


def nearest(u_ND: torch.Tensor, W_KD: torch.Tensor, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine similarity and its index per row, by chunked GEMM against W (first index on ties)."""
    n = u_ND.shape[0]
    best = torch.empty(n, dtype=u_ND.dtype, device=u_ND.device)
    idx = torch.empty(n, dtype=torch.long, device=u_ND.device)
    step = _rows_per_chunk(W_KD.shape[0], chunk_rows)
    for s in range(0, n, step):
        b, i = (u_ND[s : s + step] @ W_KD.T).max(dim=1)
        best[s : s + step], idx[s : s + step] = b, i
    return best, idx


def _linear_percentiles(values: np.ndarray, ps: Sequence[float]) -> list[float]:
    """numpy's default (linear) percentile of `values`, selecting in place (values are reordered)."""
    M = values.size
    pos = [p / 100.0 * (M - 1) for p in ps]
    kth = sorted({int(math.floor(q)) for q in pos} | {min(int(math.floor(q)) + 1, M - 1) for q in pos})
    values.partition(kth)
    out = []
    for q in pos:
        lo = int(math.floor(q))
        hi = min(lo + 1, M - 1)
        a, b = float(values[lo]), float(values[hi])
        out.append(a + (q - lo) * (b - a))
    return out


def exact_pair_percentiles(u_ND: torch.Tensor, ps: Sequence[float], chunk_elems: int = 32 * 2**20) -> list[float]:
    """p-th percentiles of all n(n-1)/2 pairwise cosine distances, exactly (numpy's linear interpolation).

    Upper-triangle GEMM blocks are written into one buffer of n(n-1)/2 distances (536 MB at 16,384 float32
    rows), then the needed order statistics are selected in place.
    """
    n = u_ND.shape[0]
    M = n * (n - 1) // 2
    if M < 1:
        raise ValueError("need at least 2 rows for pairwise distances")
    if M > EXACT_MAX_PAIRS:
        raise ValueError(f"exact calibration of a {n}-row batch needs {M * 4 / 2**30:.1f} GiB of pair distances; "
                         "use calib_estimator='sampled' or a smaller batch_contexts")
    buf = np.empty(M, dtype=np.float64 if u_ND.dtype == torch.float64 else np.float32)
    step = max(1, chunk_elems // n)
    w = 0
    for s in range(0, n - 1, step):
        e = min(n, s + step)
        dist = cosine_distance(u_ND[s:e] @ u_ND[s:].T).cpu().numpy()  # [c, n - s]
        for r in range(e - s):  # row s + r pairs with columns j > s + r: a contiguous tail of its row
            tail = dist[r, r + 1 :]
            buf[w : w + tail.size] = tail
            w += tail.size
    assert w == M
    return _linear_percentiles(buf, ps)


def _balanced_blocks(n_blocks: int, k: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n_blocks, k] row indices: each round is a random permutation of all rows cut into blocks of k.

    Every block holds k distinct uniformly drawn rows, and within a round every row is used exactly once, so no
    row is over-represented (less variance than independent draws at the same cost).
    """
    per_round = n // k
    rounds = -(-n_blocks // per_round)
    perms = [torch.randperm(n, generator=generator)[: per_round * k].view(per_round, k) for _ in range(rounds)]
    return torch.cat(perms)[:n_blocks]


def sampled_pair_distances(u_ND: torch.Tensor, n_pairs: int, block: int, generator: torch.Generator) -> torch.Tensor:
    """Cosine distances of about n_pairs uniformly drawn pairs i != j.

    Pairs come in b x b blocks: 2b distinct random rows split into A and B, all A x B pairs taken; blocks are cut
    from random permutations of the batch so every row serves equally often. Each pair is marginally uniform
    over the n(n-1)/2 pairs; the blocks turn the dot products into batched GEMMs instead of 2 * n_pairs row
    gathers (block=1: plain random pairs).
    """
    n, d = u_ND.shape
    b = max(1, min(block, n // 2))
    n_blocks = -(-n_pairs // (b * b))
    rows = _balanced_blocks(n_blocks, 2 * b, n, generator).to(u_ND.device)
    per = max(1, (16 * 2**20) // (2 * b * d))  # blocks per chunk: ~64 MB of gathered fp32 rows
    out = []
    for s in range(0, n_blocks, per):
        r = rows[s : s + per]
        if b == 1:  # a batched GEMM of 1 x 1 blocks is far slower than a row-wise dot
            sims = (u_ND[r[:, 0]] * u_ND[r[:, 1]]).sum(dim=1)
        else:
            sims = torch.bmm(u_ND[r[:, :b]], u_ND[r[:, b:]].transpose(1, 2))
        out.append(cosine_distance(sims).reshape(-1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# Calibration


@dataclasses.dataclass
class Calibration:
    """Centre and thresholds of one (store, layer, batch geometry); reusable across fits."""

    center: torch.Tensor  # [d] float32, c = magnitude * m
    thetas: dict[float, float]  # percentile -> theta_p (mean of per-batch percentiles)
    n_rows: int  # calibration rows read
    n_batches: int  # calibration batches read
    estimator: str  # "exact" or "sampled"
    store_id: str
    model: str
    weights_sha256: str
    layer: int
    hook: str
    batch_contexts: int
    shuffle_seed: int | None
    calib_pairs: int = 0  # pairs per batch (sampled)
    calib_block: int = 0
    calib_seed: int = 0
    theta_batch_std: dict[float, float] = dataclasses.field(default_factory=dict)  # spread of per-batch percentiles
    flops: float = 0.0
    wall_seconds: float = 0.0

    @property
    def center_norm(self) -> float:
        return float(self.center.norm())

    def theta(self, p: float) -> float:
        """theta for percentile p, or a clear error if this calibration lacks it."""
        p = float(p)
        if p not in self.thetas:
            raise ValueError(f"calibration of store {self.store_id} layer {self.layer} has thetas for percentiles "
                             f"{sorted(self.thetas)}, not {p}; recalibrate with percentiles including {p}")
        return self.thetas[p]

    def meta(self) -> dict[str, Any]:
        """JSON-able description (everything but the centre vector)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "center"}
        d["thetas"] = {str(k): v for k, v in self.thetas.items()}
        d["theta_batch_std"] = {str(k): v for k, v in self.theta_batch_std.items()}
        d["center_norm"] = self.center_norm
        return d

    @classmethod
    def from_meta(cls, meta: dict[str, Any], center: torch.Tensor) -> "Calibration":
        names = {f.name for f in dataclasses.fields(cls)} - {"center"}
        kw = {k: v for k, v in meta.items() if k in names}
        kw["thetas"] = {float(k): float(v) for k, v in meta["thetas"].items()}
        kw["theta_batch_std"] = {float(k): float(v) for k, v in meta.get("theta_batch_std", {}).items()}
        return cls(center=center.float(), **kw)

    def save(self, path: str | Path) -> Path:
        """Write `calibration.safetensors` (centre) + `calibration.json` into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "calibration.safetensors.tmp"
        save_file({"center": self.center.detach().float().contiguous().cpu()}, str(tmp))
        tmp.replace(path / "calibration.safetensors")
        tmp_json = path / "calibration.json.tmp"
        tmp_json.write_text(json.dumps(self.meta(), indent=1))
        tmp_json.replace(path / "calibration.json")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        for f in ("calibration.json", "calibration.safetensors"):
            if not (path / f).exists():
                raise FileNotFoundError(f"{path / f} is missing: {path} is not a saved EP calibration")
        return cls.from_meta(json.loads((path / "calibration.json").read_text()),
                             load_file(str(path / "calibration.safetensors"))["center"])

    def check_matches(self, store: "ActivationStore", layer: int, cfg: EPConfig) -> None:
        """Refuse a calibration from another store, model, hook, layer or batch geometry."""
        prov = store.provenance(layer)
        same = (self.store_id == prov["store_id"] and self.model == prov["model"]
                and self.weights_sha256 == prov["weights_sha256"] and self.layer == layer and self.hook == prov["hook"])
        if not same:
            raise ValueError(f"calibration was computed on store {self.store_id} ({self.model}) layer {self.layer} "
                             f"hook {self.hook}, but this fit reads store {prov['store_id']} ({prov['model']}) layer "
                             f"{layer} hook {prov['hook']}; recalibrate or pass the matching store")
        if self.center.numel() != store.d_model:
            raise ValueError(f"calibration centre has d={self.center.numel()} but store {store.id} has d_model="
                             f"{store.d_model}; recalibrate on this store")
        if self.batch_contexts != cfg.batch_contexts:
            raise ValueError(f"calibration used batch_contexts={self.batch_contexts} but this fit uses "
                             f"{cfg.batch_contexts} (theta depends on batch geometry); recalibrate or set "
                             f"batch_contexts={self.batch_contexts}")
        for p in cfg.percentiles:
            self.theta(p)


def _check_finite(x_ND: torch.Tensor, batch: "ActivationBatch", layer: int, batch_index: int, phase: str) -> None:
    """Name the first non-finite row (batch, row, context, position) so it can be found in the store."""
    ok = torch.isfinite(x_ND).all(dim=1)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok)[:, 0]
        i = int(bad[0])
        raise ValueError(f"EP {phase}: layer {layer} batch {batch_index} row {i} (context "
                         f"{int(batch.context_ids[i])}, position {int(batch.positions[i])}) contains NaN/inf "
                         f"({len(bad)} bad row(s) in this batch); fix or re-extract the store")


def _layer_acts(batch: "ActivationBatch", layer: int) -> torch.Tensor:
    return batch.acts[layer] if isinstance(batch.acts, dict) else batch.acts


def _calibration_batches(store: "ActivationStore", layers: list[int], cfg: EPConfig, n_batches: int | None
                         ) -> Iterator[tuple[int, "ActivationBatch"]]:
    """The calibration prefix: whole batches until n_calib rows (or exactly n_batches when known)."""
    rows = 0
    for bi, batch in enumerate(store.batches(layers, batch_contexts=cfg.batch_contexts, shuffle_seed=cfg.shuffle_seed)):
        if n_batches is not None and bi >= n_batches:
            return
        yield bi, batch
        rows += len(batch.positions)
        if n_batches is None and rows >= cfg.n_calib:
            return


def calibrate(store: "ActivationStore", layers: Sequence[int], cfg: EPConfig) -> dict[int, Calibration]:
    """Centre and thresholds for every layer and percentile of `cfg`, from one calibration prefix.

    The prefix is read twice (centre first, then per-batch percentiles of rows centred on it) so memory stays
    at one batch; both reads see the same batches.
    """
    layers = [int(L) for L in layers]
    dev, dt = _device(cfg), _DTYPES[cfg.compute_dtype]
    t0 = time.perf_counter()
    d = store.d_model
    accs = {L: CenterAccumulator(d, dev) for L in layers}
    n_rows, n_batches = 0, 0
    for bi, batch in _calibration_batches(store, layers, cfg, None):
        for L in layers:
            x = _layer_acts(batch, L)
            _check_finite(x, batch, L, bi, "calibration")
            accs[L].update(x)
        n_rows += len(batch.positions)
        n_batches += 1
    if n_rows == 0:
        raise ValueError(f"store {store.id} has no activation rows to calibrate EP on; extract a non-empty corpus")
    centers = {L: accs[L].center(dt) for L in layers}  # magnitude * spherical mean direction

    ps = cfg.percentiles
    per_batch: dict[int, list[list[float]]] = {L: [] for L in layers}
    flops = 4.0 * n_rows * d  # centre pass
    for bi, batch in _calibration_batches(store, layers, cfg, n_batches):
        n = len(batch.positions)
        if n < 2:
            continue  # a one-row batch has no pairs
        gen = torch.Generator().manual_seed(cfg.calib_seed * 1_000_003 + bi)
        state = gen.get_state()
        for L in layers:
            u = centred_unit(_layer_acts(batch, L).to(dev, dt), centers[L])
            pairs_all = n * (n - 1) // 2
            if cfg.calib_estimator == "exact" or pairs_all <= cfg.calib_pairs:
                per_batch[L].append(exact_pair_percentiles(u, ps))
                flops += 2.0 * pairs_all * d + 3.0 * n * d
            else:
                gen.set_state(state)  # every layer sees the same pairs
                dist = sampled_pair_distances(u, cfg.calib_pairs, cfg.calib_block, gen)
                per_batch[L].append(_linear_percentiles(dist.cpu().numpy().copy(), ps))
                flops += 2.0 * dist.numel() * d + 3.0 * n * d
    if not any(per_batch.values()):
        raise ValueError(f"store {store.id}: calibration batches have fewer than 2 rows, so no pairs; "
                         "use a larger batch_contexts")
    wall = time.perf_counter() - t0
    out = {}
    for L in layers:
        arr = np.asarray(per_batch[L], dtype=np.float64)  # [batches, percentiles]
        prov = store.provenance(L)
        out[L] = Calibration(
            center=centers[L].float().cpu(), thetas={p: float(arr[:, i].mean()) for i, p in enumerate(ps)},
            n_rows=n_rows, n_batches=n_batches, estimator=cfg.calib_estimator, store_id=prov["store_id"],
            model=prov["model"], weights_sha256=prov["weights_sha256"], layer=L, hook=prov["hook"],
            batch_contexts=cfg.batch_contexts, shuffle_seed=cfg.shuffle_seed,
            calib_pairs=cfg.calib_pairs if cfg.calib_estimator == "sampled" else 0,
            calib_block=cfg.calib_block, calib_seed=cfg.calib_seed,
            theta_batch_std={p: float(arr[:, i].std()) for i, p in enumerate(ps)},
            flops=flops / len(layers), wall_seconds=wall / len(layers),
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Discovery


class _Builder:
    """Streaming leader clustering for one (layer, percentile): exemplars, stats, stop rule."""

    def __init__(self, layer: int, p: float, theta: float, d: int, cfg: EPConfig, device: torch.device):
        self.layer, self.p, self.theta, self.cfg = layer, p, float(theta), cfg
        self.dev, self.dt = device, _DTYPES[cfg.compute_dtype]
        self.K, self.cap, self.d, self.n_ex = 0, 0, d, cfg.n_examples
        self.E = torch.empty(0, d, dtype=self.dt, device=device)  # exemplar directions (capacity rows)
        self.sum_u = torch.empty(0, d, dtype=self.dt, device=device)
        self.count = torch.empty(0, dtype=torch.long, device=device)
        self.dsum = torch.empty(0, dtype=torch.float64, device=device)
        self.dsq = torch.empty(0, dtype=torch.float64, device=device)
        self.src = torch.empty(0, 2, dtype=torch.long, device=device)  # (context, position) of each exemplar row
        e = max(self.n_ex, 1)
        self.close = {k: torch.empty(0, e, dtype=t, device=device) for k, t in
                      (("ctx", torch.long), ("pos", torch.long), ("dist", torch.float64))}
        self.far = {k: v.clone() for k, v in self.close.items()}
        self.rows = self.tokens = self.batches = 0
        self.created_per_batch: list[int] = []
        self.streak = 0
        self.done = False
        self.stop_reason = "stream ended"
        self.flops = 0.0
        self.seconds = 0.0

    # storage -----------------------------------------------------------------------------------------------
    def _reserve(self, extra: int) -> None:
        need = self.K + extra
        if need <= self.cap:
            return
        cap = max(need, 2 * self.cap, 64)

        def grow(t: torch.Tensor, fill: float) -> torch.Tensor:
            new = torch.full((cap, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            new[: self.K] = t[: self.K]
            return new

        self.E, self.sum_u = grow(self.E, 0.0), grow(self.sum_u, 0.0)
        self.count, self.dsum, self.dsq = grow(self.count, 0), grow(self.dsum, 0.0), grow(self.dsq, 0.0)
        self.src = grow(self.src, -1)
        for store in (self.close, self.far):
            for k, fill in (("ctx", -1), ("pos", -1), ("dist", 0.0)):
                store[k] = grow(store[k], fill)
        self.cap = cap

    def _new_regions(self, u_LD: torch.Tensor) -> None:
        self.E[self.K : self.K + len(u_LD)] = u_LD
        self.K += len(u_LD)

    # one batch ---------------------------------------------------------------------------------------------
    def step(self, u_ND: torch.Tensor, ctx_N: torch.Tensor, pos_N: torch.Tensor, n_tokens: int) -> int:
        """Process one batch (rows already centred and normalised); returns regions created."""
        t0 = time.perf_counter()
        n, d = u_ND.shape
        if n == 0:  # a batch of BOS-only contexts: tokens streamed, nothing to cluster, no saturation evidence
            self.tokens += int(n_tokens)
            return 0
        K_start = self.K
        region = torch.empty(n, dtype=torch.long, device=self.dev)
        dist = torch.empty(n, dtype=self.dt, device=self.dev)
        seeded = self.K == 0
        if seeded:
            self._reserve(1)
            self._new_regions(u_ND[:1])  # the very first row seeds region 0 before matching
        K0 = self.K
        best, idx = nearest(u_ND, self.E[:K0], self.cfg.chunk_rows)  # exemplars existing at batch start
        self.flops += 2.0 * n * K0 * d
        dmatch = cosine_distance(best)
        if seeded:  # the seed is region 0's own exemplar: distance 0, whatever rounding gives (theta can be 0)
            dmatch[0], idx[0] = 0.0, 0
        matched = dmatch <= self.theta
        region[matched], dist[matched] = idx[matched], dmatch[matched]
        unmatched = torch.nonzero(~matched)[:, 0]
        if len(unmatched):
            self._reserve(len(unmatched))  # each unmatched row may become a region
            r, dd = self._walk(u_ND[unmatched])
            region[unmatched], dist[unmatched] = r, dd
        self._update_stats(u_ND, region, dist, ctx_N, pos_N)
        self.src[K_start : self.K] = torch.stack([ctx_N, pos_N], 1)[self._creators(region, dist, K_start)]
        created = self.K - K_start
        self.rows += n
        self.tokens += int(n_tokens)
        self.batches += 1
        self.created_per_batch.append(created)
        self.streak = 0 if created else self.streak + 1
        if self.streak >= self.cfg.sat_window:
            self.done, self.stop_reason = True, "saturated"
        elif self.cfg.token_budget is not None and self.tokens >= self.cfg.token_budget:
            self.done, self.stop_reason = True, "token budget"
        self.seconds += time.perf_counter() - t0
        return created

    def _creators(self, region: torch.Tensor, dist: torch.Tensor, K_start: int) -> torch.Tensor:
        """Row index of the first member of each region created in this batch (its creator)."""
        n = len(region)
        rows = torch.arange(n, device=self.dev)
        first = torch.full((self.K - K_start,), n, dtype=torch.long, device=self.dev)
        new = region >= K_start
        first.scatter_reduce_(0, region[new] - K_start, rows[new], reduce="amin")
        return first

    def _walk(self, Um: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In-order leader walk over unmatched rows; returns their region ids and distances."""
        m, d = Um.shape
        K0, theta, blk = self.K, self.theta, self.cfg.leader_block
        leader_pos: list[int] = []
        for s in range(0, m, blk):
            Ub = Um[s : s + blk]
            b = len(Ub)
            if self.K > K0:  # covered by a leader from an earlier block of this batch?
                near, _ = nearest(Ub, self.E[K0 : self.K], self.cfg.chunk_rows)
                self.flops += 2.0 * b * (self.K - K0) * d
                covered = (cosine_distance(near) <= theta).cpu().numpy()
            else:
                covered = np.zeros(b, dtype=bool)
            within = (cosine_distance(Ub @ Ub.T) <= theta).triu_(diagonal=1).cpu().numpy()
            self.flops += 2.0 * b * b * d
            new = []
            for i in range(b):  # sequential by definition; each step is one vector OR
                if not covered[i]:
                    new.append(i)
                    covered |= within[i]
            if new:
                self._new_regions(Ub[new])
                leader_pos.extend(s + i for i in new)
        # every unmatched non-leader joins the most similar leader created before it in batch order
        region = torch.empty(m, dtype=torch.long, device=self.dev)
        dist = torch.zeros(m, dtype=self.dt, device=self.dev)
        lp = torch.tensor(leader_pos, dtype=torch.long, device=self.dev)
        region[lp] = torch.arange(K0, self.K, device=self.dev)
        is_leader = torch.zeros(m, dtype=torch.bool, device=self.dev)
        is_leader[lp] = True
        q = torch.nonzero(~is_leader)[:, 0]
        if len(q):
            L = self.E[K0 : self.K]
            allowed = torch.searchsorted(lp, q)  # leaders with batch position < q
            step = _rows_per_chunk(len(L), self.cfg.chunk_rows)
            cols = torch.arange(len(L), device=self.dev)
            for s in range(0, len(q), step):
                qs = q[s : s + step]
                sims = Um[qs] @ L.T
                sims.masked_fill_(cols[None, :] >= allowed[s : s + step, None], -math.inf)
                best, j = sims.max(dim=1)
                region[qs], dist[qs] = K0 + j, cosine_distance(best)
            self.flops += 2.0 * len(q) * len(L) * d
        return region, dist

    def _update_stats(self, u_ND: torch.Tensor, region: torch.Tensor, dist: torch.Tensor,
                      ctx_N: torch.Tensor, pos_N: torch.Tensor) -> None:
        K = self.K
        self.count[:K] += torch.bincount(region, minlength=K)
        self.sum_u.index_add_(0, region, u_ND)
        d64 = dist.double()
        self.dsum.index_add_(0, region, d64)
        self.dsq.index_add_(0, region, d64 * d64)
        self.flops += 2.0 * len(region) * self.d
        if self.n_ex:
            self._merge_examples(self.close, region, d64, ctx_N, pos_N, largest=False)
            self._merge_examples(self.far, region, d64, ctx_N, pos_N, largest=True)

    def _merge_examples(self, ex: dict[str, torch.Tensor], region: torch.Tensor, dist: torch.Tensor,
                        ctx: torch.Tensor, pos: torch.Tensor, largest: bool) -> None:
        """Keep the n_examples smallest (or largest) distances per region, old entries merged with the batch."""
        touched = torch.unique(region)
        old_ok = ex["ctx"][touched] >= 0  # [T, E]
        old_r = touched[:, None].expand_as(old_ok)[old_ok]
        r = torch.cat([old_r, region])
        d = torch.cat([ex["dist"][touched][old_ok], dist])
        c = torch.cat([ex["ctx"][touched][old_ok], ctx])
        p = torch.cat([ex["pos"][touched][old_ok], pos])
        o = torch.sort(-d if largest else d, stable=True).indices
        o = o[torch.sort(r[o], stable=True).indices]  # grouped by region, best first within a region
        r, d, c, p = r[o], d[o], c[o], p[o]
        rank = torch.arange(len(r), device=self.dev) - torch.searchsorted(r, r)
        keep = rank < self.n_ex
        ex["ctx"][touched] = -1
        for k, v in (("ctx", c), ("pos", p), ("dist", d)):
            ex[k][r[keep], rank[keep]] = v[keep]

    # result ------------------------------------------------------------------------------------------------
    def tensors(self, center: torch.Tensor) -> dict[str, torch.Tensor]:
        K = self.K
        mean = self.sum_u[:K].double() / self.count[:K].clamp_min(1)[:, None]
        coherence = mean.norm(dim=1)
        out = {
            "center": center.float().cpu(),
            "exemplar_directions": self.E[:K].float().cpu(),
            "mean_directions": (mean / coherence.clamp_min(EPS)[:, None]).float().cpu(),
            "coherence": coherence.float().cpu(),
            "member_count": self.count[:K].cpu(),
            "dist_sum": self.dsum[:K].cpu(),
            "dist_sqsum": self.dsq[:K].cpu(),
            "exemplar_context": self.src[:K, 0].cpu(),
            "exemplar_position": self.src[:K, 1].cpu(),
        }
        for name, ex in (("closest", self.close), ("farthest", self.far)):
            for k in ("ctx", "pos", "dist"):
                key = {"ctx": "context", "pos": "position", "dist": "distance"}[k]
                out[f"{name}_{key}"] = ex[k][:K, : self.n_ex].cpu()
        return out


# ---------------------------------------------------------------------------------------------------------
# Artefact


class EPArtefact(Artefact):
    """An EP dictionary: K exemplar regions with their statistics, centre and threshold."""

    method: ClassVar[str] = "ep"
    reconstructs: ClassVar[bool] = True  # decode is meaningful with the topk readout
    readouts: ClassVar[tuple[str, ...]] = READOUTS  # first is the default
    config_cls: ClassVar[type[MethodConfig]] = EPConfig
    tensor_shapes: ClassVar[dict[str, tuple]] = {
        "center": ("d",), "exemplar_directions": ("K", "d"), "mean_directions": ("K", "d"), "coherence": ("K",),
        "member_count": ("K",), "dist_sum": ("K",), "dist_sqsum": ("K",), "exemplar_context": ("K",),
        "exemplar_position": ("K",), **{f"{e}_{k}": ("K", "n_examples") for e in ("closest", "farthest")
                                        for k in ("context", "position", "distance")}}

    # geometry ------------------------------------------------------------------------------------------------
    @property
    def directions(self) -> torch.Tensor:
        """Exemplar directions (unit, centred), [K, d]."""
        return self.tensors["exemplar_directions"]

    @property
    def mean_directions(self) -> torch.Tensor:
        """Normalised mean member directions, [K, d]."""
        return self.tensors["mean_directions"]

    @property
    def theta(self) -> float:
        return float(self.info["theta"])

    @property
    def p(self) -> float:
        return float(self.info["p"])

    @property
    def calibration(self) -> Calibration:
        """The calibration this dictionary was built with (reusable in `fit(..., calibration=)`)."""
        return Calibration.from_meta(self.info["calibration"], self.tensors["center"])

    def basis(self, basis: str = "exemplar") -> torch.Tensor:
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, not {basis!r}")
        return self.directions if basis == "exemplar" else self.mean_directions

    def _on(self, basis: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Basis and centre on `device`, cached so repeated calls do not copy K x d each time."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (basis, str(device))
        if key not in cache:
            cache[key] = (self.basis(basis).to(device), self.center.float().to(device))
        return cache[key]

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"{self.name}: expected activations [N, {self.d_model}], got {tuple(x.shape)}; "
                             "was the artefact built on another model or hook?")

    def _chunks(self, x: torch.Tensor, basis: str) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield (rows, x_c chunk, similarities of u with the basis) with bounded extra memory."""
        self._check_shape(x)
        W, c = self._on(basis, x.device)
        step = _rows_per_chunk(self.K, int(getattr(self.config, "chunk_rows", 4096)))
        for s in range(0, x.shape[0], step):
            xs = x[s : s + step].float()
            if not bool(torch.isfinite(xs).all()):
                bad = s + int(torch.nonzero(~torch.isfinite(xs).all(dim=1))[0, 0])
                raise ValueError(f"{self.name}: activation row {bad} contains NaN/inf; drop or fix it first")
            xc = xs - c
            u = xc / (xc.norm(dim=1, keepdim=True) + EPS)
            sims = u @ W.T
            yield slice(s, s + len(xs)), xc, sims
            del xs, xc, u, sims  # free this chunk before the next one is computed

    # reading features --------------------------------------------------------------------------------------
    def assign(self, x: torch.Tensor, basis: str = "exemplar") -> Assignment:
        """Nearest region by cosine with NO threshold; score = cosine distance (above theta: out of every cell)."""
        n = x.shape[0] if x.ndim == 2 else 0
        index = torch.empty(n, dtype=torch.long, device=x.device)
        score = torch.empty(n, dtype=torch.float32, device=x.device)
        for rows, _, sims in self._chunks(x, basis):
            best, idx = sims.max(dim=1)
            index[rows], score[rows] = idx, cosine_distance(best)
            del sims  # one [chunk, K] block alive at a time
        return Assignment(index, score)

    def encode(self, x: torch.Tensor, readout: str | None = None, k: int = 1, basis: str = "exemplar") -> torch.Tensor:
        """Feature activations [N, K]: cosine (dense cos), signed (dense x_c . w), topk (k largest of
        ||x_c|| cos, ReLU), binary (one-hot at the nearest region)."""
        readout = readout or self.readouts[0]
        if readout not in READOUTS:
            raise ValueError(f"{self.name}: unknown readout {readout!r}; choose one of {READOUTS}")
        if readout == "topk" and not (1 <= k <= self.K):
            raise ValueError(f"{self.name}: topk needs 1 <= k <= K={self.K}, got k={k}")
        self._check_shape(x)
        out = torch.zeros(x.shape[0], self.K, dtype=torch.float32, device=x.device)
        for rows, xc, sims in self._chunks(x, basis):
            if readout == "cosine":
                out[rows] = sims
            elif readout == "binary":
                out[rows].scatter_(1, sims.argmax(dim=1, keepdim=True), 1.0)
            else:
                signed = sims * xc.norm(dim=1, keepdim=True)  # ||x_c|| cos(u, w): x_c . w up to the eps
                if readout == "signed":
                    out[rows] = signed
                else:
                    val, idx = signed.topk(k, dim=1)
                    out[rows] = torch.zeros_like(signed).scatter_(1, idx, val.clamp_min(0.0))
            del xc, sims
        return out

    def decode(self, f: torch.Tensor, basis: str = "exemplar") -> torch.Tensor:
        """features @ W + c (W the chosen basis); reconstructs x from the topk (or signed) readout."""
        W, c = self._on(basis, f.device)
        if f.ndim != 2 or f.shape[1] != self.K:
            raise ValueError(f"{self.name}: expected features [N, {self.K}], got {tuple(f.shape)}")
        return f.float() @ W + c

    # inspection ------------------------------------------------------------------------------------------------
    def examples(self, region: int, store: "ActivationStore | None" = None, backend: Any = None,
                 window: int = 12) -> list[dict[str, Any]]:
        """Closest (ascending) then farthest (descending) member examples of a region.

        With `store`, each example gets its context's token ids around the position; with `backend` as well,
        the decoded text (`text`: up to `window` tokens ending at the token, `token`: the token itself).
        """
        if not 0 <= region < self.K:
            raise IndexError(f"region {region} out of range (K={self.K})")
        out = []
        for kind in ("closest", "farthest"):
            ctx, pos = self.tensors[f"{kind}_context"][region], self.tensors[f"{kind}_position"][region]
            dist = self.tensors[f"{kind}_distance"][region]
            for j in range(len(ctx)):
                if int(ctx[j]) < 0:
                    continue
                ex: dict[str, Any] = {"kind": kind, "context_id": int(ctx[j]), "position": int(pos[j]),
                                      "distance": float(dist[j])}
                if store is not None:
                    toks = store.context_tokens(ex["context_id"])
                    p = ex["position"]
                    ex["token_ids"] = toks[max(0, p - window + 1) : p + 1]
                    if backend is not None:
                        tok = backend.tokenizer
                        ex["text"] = tok.decode(ex["token_ids"])
                        ex["token"] = tok.decode([toks[p]])
                out.append(ex)
        return out

    def region_stats(self) -> dict[str, torch.Tensor]:
        """Per-region member count, coherence, and mean / std of construction-time distances."""
        n = self.tensors["member_count"].double().clamp_min(1)
        mean = self.tensors["dist_sum"] / n
        var = (self.tensors["dist_sqsum"] / n - mean * mean).clamp_min(0)
        return {"member_count": self.tensors["member_count"], "coherence": self.tensors["coherence"],
                "dist_mean": mean, "dist_std": var.sqrt()}


# ---------------------------------------------------------------------------------------------------------
# Method


class ExemplarPartitioning(Method):
    """EP: `fit` builds percentiles[0]; `fit_many` builds every (layer, percentile) from one discovery pass."""

    name: ClassVar[str] = "ep"
    config_cls: ClassVar[type[MethodConfig]] = EPConfig
    artefact_cls: ClassVar[type[Artefact]] = EPArtefact
    config: EPConfig

    def calibrate(self, store: "ActivationStore", layers: int | Sequence[int]) -> dict[int, Calibration]:
        """Centre and thresholds per layer for every configured percentile."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        for L in layers:
            store.check_layer(L)
        return calibrate(store, layers, self.config)

    def fit(self, store: "ActivationStore", layer: int, concepts: Any = None,
            calibration: Calibration | None = None) -> EPArtefact:
        """Build the dictionary for percentiles[0] at `layer` (pass `calibration` to reuse one)."""
        p0 = self.config.percentiles[0]
        cfg = dataclasses.replace(self.config, percentiles=[p0])
        method = ExemplarPartitioning(cfg)
        cals = {layer: calibration} if calibration is not None else None
        return method.fit_many(store, [layer], calibrations=cals)[(layer, p0)]

    def fit_many(self, store: "ActivationStore", layers: int | Sequence[int],
                 calibrations: dict[int, Calibration] | None = None) -> dict[tuple[int, float], EPArtefact]:
        """Every (layer, percentile) dictionary from one calibration prefix and one shared discovery stream."""
        cfg = self.config
        layers = [layers] if isinstance(layers, int) else [int(L) for L in layers]
        for L in layers:
            store.check_layer(L)
        dev = _device(cfg)
        t_start = time.perf_counter()
        with PeakMemory(dev) as mem:
            cals = dict(calibrations or {})
            reused = {L: L in cals for L in layers}
            for L in layers:
                if L in cals:
                    cals[L].check_matches(store, L, cfg)
            missing = [L for L in layers if L not in cals]
            if missing:
                cals.update(calibrate(store, missing, cfg))
            t_cal = time.perf_counter() - t_start
            builders = {(L, p): _Builder(L, p, cals[L].theta(p), store.d_model, cfg, dev)
                        for L in layers for p in cfg.percentiles}
            centers = {L: cals[L].center.to(dev, _DTYPES[cfg.compute_dtype]) for L in layers}
            n_read = 0
            t_read = time.perf_counter()
            for bi, batch in enumerate(store.batches(layers, batch_contexts=cfg.batch_contexts,
                                                     shuffle_seed=cfg.shuffle_seed, max_tokens=cfg.token_budget)):
                read_s = time.perf_counter() - t_read
                n_read += 1
                for L in layers:
                    active = [b for (LL, _), b in builders.items() if LL == L and not b.done]
                    if not active:
                        continue
                    x = _layer_acts(batch, L)
                    _check_finite(x, batch, L, bi, "discovery")
                    t0 = time.perf_counter()
                    u = centred_unit(x.to(dev, _DTYPES[cfg.compute_dtype]), centers[L])
                    ctx, pos = batch.context_ids.to(dev), batch.positions.to(dev)
                    shared_s = time.perf_counter() - t0 + read_s  # reading and centring serve every builder
                    for b in active:
                        with tf32_matmuls(cfg.tf32):
                            b.step(u, ctx, pos, batch.n_tokens)
                        b.seconds += shared_s
                        b.flops += 3.0 * len(u) * u.shape[1]
                if all(b.done for b in builders.values()):
                    break
                t_read = time.perf_counter()
            if n_read == 0:
                raise ValueError(f"EP: no rows were streamed for discovery from store {store.id} "
                                 f"(n_rows={store.n_rows}, token_budget={cfg.token_budget}); use a non-empty store "
                                 "or a larger token_budget")
        from bench.store import library_versions

        versions = library_versions()
        out = {}
        for (L, p), b in builders.items():
            cal = cals[L]
            cal_flops = 0.0 if reused[L] else cal.flops
            cal_wall = 0.0 if reused[L] else t_cal
            cost = Cost(rows=b.rows, tokens=b.tokens, flops=b.flops + cal_flops, wall_seconds=b.seconds + cal_wall,
                        peak_memory_bytes=mem.peak, device=str(dev))
            info = {
                "label": f"ep:p={p:g}",
                **store.provenance(L),
                "versions": versions,
                "p": p, "theta": b.theta, "K": b.K,
                "tokens_streamed": b.tokens, "rows": b.rows, "batches": b.batches,
                "saturated": b.stop_reason == "saturated", "stop_reason": b.stop_reason,
                "regions_created_per_batch": b.created_per_batch,
                "singletons": 0,
                "calibration": {**cal.meta(), "reused": reused[L]},
                "cost": cost.to_dict(),
                "cost_note": ("calibration cost is shared by the percentiles of a layer and counted in each; "
                              "peak memory is that of the whole shared build; wall = calibration + this "
                              "dictionary's own discovery work + the stream reads it consumed"),
            }
            tensors = b.tensors(cal.center)
            info["singletons"] = int((tensors["member_count"] == 1).sum())
            out[(L, p)] = EPArtefact(dataclasses.replace(cfg, percentiles=[p]), tensors, info)
        return out
