"""k-means (faiss) on the same centred unit directions EP uses: the baseline that isolates leader clustering.

Rows are mapped exactly as EP maps them, u = (x - c) / (||x - c|| + 1e-12) with the spherical mean centre c over
the first `n_calib` stream rows, and clustered with faiss' (spherical) Lloyd iterations, run one at a time from the
previous centroids until the objective's relative change falls below `tol` or `niter` iterations (the cap); the
iterations, the objective per iteration and why it stopped are recorded in `info`. The readouts mirror EP's
(`binary`, `topk`, `cosine`, `signed`), so a metric that differs between the two reflects the clustering, not the
geometry or the readout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from methods.base import Artefact, Assignment, Method, MethodConfig
from methods.common import (
    EPS, BuildMeter, CenterAccumulator, base_info, centred_unit, dense_readouts, stream_rows, tokens_behind,
)

if TYPE_CHECKING:
    from bench.store import ActivationStore

# ---------------------------------------------------------------------------------------------------------
# k-means


@dataclasses.dataclass
class KMeansConfig(MethodConfig):
    """k-means on centred unit rows; `k` may be a list for a sweep (`KMeans.fit_many`)."""

    k: int | list[int] = 1024  # number of centroids, or a list of them (one artefact each, same rows)
    n_rows: int = 200_000  # training rows taken from the stream
    n_calib: int = 200_000  # rows for the centre: whole batches in stream order until >= n_calib (as EP)
    niter: int = 100  # cap on Lloyd iterations per restart
    tol: float = 1e-4  # stop when the objective changes by less than this fraction between iterations; 0: run the cap
    nredo: int = 1  # independent restarts (seed, seed + 1, ...); the one with the best final objective is kept
    seed: int = 0  # faiss initialisation seed
    spherical: bool = True  # renormalise centroids each iteration (cosine k-means); False: Euclidean on u
    shuffle_seed: int | None = None  # None: store order (as EP); int: seeded block shuffle (centre and rows)
    batch_contexts: int = 128  # contexts per store batch (EP's batch geometry, so the centre matches EP's)
    topk: int = 1  # k of the `topk` readout
    readout: str = "cosine"  # default readout of encode()

    def ks(self) -> list[int]:
        return [int(k) for k in (self.k if isinstance(self.k, (list, tuple)) else [self.k])]


class KMeansArtefact(Artefact):
    """Unit centroids on EP's centred sphere; readouts as EP's, assign = nearest centroid by cosine."""

    method = "kmeans"
    reconstructs = True
    readouts = ("cosine", "binary", "topk", "signed")
    config_cls = KMeansConfig
    tensor_shapes = {"directions": ("K", "d"), "center": ("d",), "counts": ("K",)}

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    def encode(self, x: torch.Tensor, readout: str | None = None, k: int | None = None) -> torch.Tensor:
        """Feature activations [N, K]; readouts as EP's (`k` of topk defaults to config.topk)."""
        x = self.check_input(x)
        return dense_readouts(x, self.center.to(x), self.directions.to(x), readout or self.config.readout,
                              k or self.config.topk)

    def assign(self, x: torch.Tensor) -> Assignment:
        """Nearest centroid; score = cosine distance 1 - cos in [0, 2] (EP's convention)."""
        cos = self.encode(x, "cosine")
        best, index = cos.max(dim=1)
        return Assignment(index, (1.0 - best).clamp(0.0, 2.0))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.float() @ self.directions.to(f.device) + self.center.to(f.device)


class KMeansFit(NamedTuple):
    """The result of Lloyd iterations to convergence (the best of `nredo` restarts)."""

    centroids: np.ndarray  # [k, d] unit (spherical) centroids
    iterations: int  # Lloyd iterations of the kept restart
    total_iterations: int  # over all restarts (what the FLOPs count)
    objective_curve: list[float]  # faiss' objective at the start of each iteration of the kept restart
    converged: bool
    stop_reason: str
    restart: int  # index of the kept restart


def objective(u_ND: np.ndarray, centroids_KD: np.ndarray, spherical: bool, chunk: int = 65536) -> float:
    """faiss' k-means objective of centroids: sum of best inner products (spherical) or of squared L2 distances."""
    total = 0.0
    for i in range(0, len(u_ND), chunk):
        u = u_ND[i : i + chunk].astype(np.float64)
        sims = u @ centroids_KD.T.astype(np.float64)
        if spherical:
            total += float(sims.max(axis=1).sum())
        else:
            d2 = (u**2).sum(1)[:, None] - 2 * sims + (centroids_KD.astype(np.float64) ** 2).sum(1)[None]
            total += float(d2.min(axis=1).sum())
    return total


def _run_faiss_kmeans(u_ND: np.ndarray, k: int, cfg: KMeansConfig) -> KMeansFit:
    """faiss Lloyd k-means on all given rows (no sub-sampling), one iteration per call, until the stopping rule."""
    import faiss

    n, d = u_ND.shape
    best: KMeansFit | None = None
    best_obj, total = 0.0, 0
    for redo in range(cfg.nredo):
        # niter=1 per call: faiss initialises (seeded) on the first call and continues from the given centroids after.
        km = faiss.Kmeans(d, k, niter=1, seed=cfg.seed + redo, spherical=cfg.spherical, verbose=False,
                          max_points_per_centroid=math.ceil(n / k) + 1, min_points_per_centroid=1)
        cents, curve, reason, converged = None, [], "", False
        for it in range(cfg.niter):
            km.train(u_ND, init_centroids=cents)
            cents = km.centroids
            curve.append(float(km.obj[-1]))
            total += 1
            if len(curve) >= 2 and cfg.tol > 0:
                change = abs(curve[-1] - curve[-2]) / max(abs(curve[-2]), 1e-30)
                if change < cfg.tol:
                    converged = True
                    reason = (f"converged: objective changed {change:.2e} (< tol {cfg.tol:g}) between iterations "
                              f"{it} and {it + 1}")
                    break
        if not converged:
            reason = f"cap: niter={cfg.niter} iterations" + (
                f" (last relative change {abs(curve[-1] - curve[-2]) / max(abs(curve[-2]), 1e-30):.2e})"
                if len(curve) >= 2 else "")
        cents_t = torch.from_numpy(np.ascontiguousarray(cents, dtype=np.float32))
        if cfg.spherical:
            cents_t = cents_t / cents_t.norm(dim=1, keepdim=True).clamp_min(EPS)
        obj = objective(u_ND, cents_t.numpy(), cfg.spherical)
        better = best is None or (obj > best_obj if cfg.spherical else obj < best_obj)
        if better:
            best, best_obj = KMeansFit(cents_t.numpy(), len(curve), 0, curve, converged, reason, redo), obj
    assert best is not None
    return best._replace(total_iterations=total)


class KMeans(Method):
    """faiss k-means on EP's centred unit directions."""

    name = "kmeans"
    config_cls = KMeansConfig
    artefact_cls = KMeansArtefact

    def _read(self, store: "ActivationStore", layer: int) -> tuple[torch.Tensor, int, torch.Tensor, int, int]:
        """One pass over the stream (store order or `shuffle_seed`, as EP): the centre from whole batches until
        n_calib rows, the first n_rows training rows; returns centre, calibration rows, rows, rows and tokens read."""
        cfg: KMeansConfig = self.config
        acc = CenterAccumulator(store.d_model)
        train, have, seen_rows, seen_ctx = [], 0, 0, []
        for x_ND, ctx_N in stream_rows(store, layer, cfg.batch_contexts, cfg.shuffle_seed):
            used = 0
            if acc.n < cfg.n_calib:
                acc.update(x_ND)
                used = x_ND.shape[0]
            if have < cfg.n_rows:
                take = min(cfg.n_rows - have, x_ND.shape[0])
                train.append(x_ND[:take])
                have += take
                used = max(used, take)  # both are prefixes of the batch
            seen_rows += used
            seen_ctx.append(ctx_N[:used])
            if acc.n >= cfg.n_calib and have >= cfg.n_rows:
                break
        if acc.n == 0:
            raise ValueError(f"store {store.id} has no rows at layer {layer}; extract a non-empty corpus first")
        return acc.center(), acc.n, torch.cat(train), seen_rows, tokens_behind(torch.cat(seen_ctx))

    def fit(self, store: "ActivationStore", layer: int, concepts: Any = None) -> KMeansArtefact:
        """Fit one artefact; use `fit_many` for a list of k."""
        if len(self.config.ks()) != 1:
            raise ValueError(f"k={self.config.k} is a sweep; call KMeans.fit_many to get one artefact per k")
        return self.fit_many(store, layer)[0]

    def fit_many(self, store: "ActivationStore", layer: int) -> list[KMeansArtefact]:
        """One artefact per k in the config, all trained on the same rows and centre."""
        cfg: KMeansConfig = self.config
        ks = cfg.ks()
        if any(k < 1 for k in ks) or min(cfg.n_rows, cfg.niter, cfg.nredo) < 1 or cfg.tol < 0:
            raise ValueError(f"k, n_rows, niter and nredo must be >= 1 and tol >= 0 (got k={cfg.k}, "
                             f"n_rows={cfg.n_rows}, niter={cfg.niter}, nredo={cfg.nredo}, tol={cfg.tol})")
        with BuildMeter() as read_meter:
            center_D, n_calib, x_ND, rows, tokens = self._read(store, layer)
            u_ND = centred_unit(x_ND, center_D).numpy()
            del x_ND
        n, d = u_ND.shape
        if max(ks) > n:
            raise ValueError(f"k={max(ks)} exceeds the {n} rows read from store {store.id}; "
                             "lower k or raise n_rows (or extract more tokens)")
        import faiss

        out = []
        for k in ks:
            with BuildMeter() as meter:
                fit = _run_faiss_kmeans(u_ND, k, cfg)
                dirs_KD = fit.centroids
                nearest_N, cos_N = _nearest(u_ND, dirs_KD)
                counts = np.bincount(nearest_N, minlength=k)
                final_objective = objective(u_ND, dirs_KD, cfg.spherical)
            # Distance evaluations dominate: one per iteration actually run, one per restart's final objective,
            # and the final assignment.
            flops = 2.0 * n * k * d * (fit.total_iterations + cfg.nredo + 1)
            cost = meter.cost(rows, tokens, flops=flops, extra_wall=read_meter.wall_seconds)
            # Evaluated now, the read meter gives the peak growth since the build started (reading included).
            cost.peak_memory_bytes = max(cost.peak_memory_bytes, read_meter.peak_memory_bytes())
            k_cfg = dataclasses.replace(cfg, k=k)
            info = base_info(store, layer, f"kmeans:k={k}", cost, versions={"faiss": faiss.__version__},
                             n_train_rows=n, n_calib_rows=n_calib, mean_cosine=float(cos_N.mean()),
                             center_norm=float(center_D.norm()), empty_clusters=int((counts == 0).sum()),
                             iterations=fit.iterations, total_iterations=fit.total_iterations,
                             converged=fit.converged, stop_reason=fit.stop_reason, kept_restart=fit.restart,
                             objective=final_objective, objective_curve=fit.objective_curve,
                             objective_definition=("sum over training rows of the best inner product with a unit "
                                                   "centroid (maximised)" if cfg.spherical else
                                                   "sum over training rows of the squared L2 distance to the "
                                                   "nearest centroid (minimised)"),
                             stopping_rule=f"relative objective change < {cfg.tol:g} between Lloyd iterations, "
                                           f"or niter={cfg.niter} iterations")
            tensors = {"directions": torch.from_numpy(dirs_KD), "center": center_D.clone(),
                       "counts": torch.from_numpy(counts.astype(np.int64))}
            out.append(KMeansArtefact(k_cfg, tensors, info))
        return out


def _nearest(u_ND: np.ndarray, dirs_KD: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Index of and cosine to the most similar unit centroid per row, in chunks to bound memory."""
    idx, cos = [], []
    for i in range(0, len(u_ND), chunk):
        sims = u_ND[i : i + chunk] @ dirs_KD.T
        idx.append(np.argmax(sims, axis=1))
        cos.append(np.take_along_axis(sims, idx[-1][:, None], axis=1)[:, 0])
    return np.concatenate(idx), np.concatenate(cos)
