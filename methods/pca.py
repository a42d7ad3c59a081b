"""PCA: the top-k principal components of the activations about their mean, from a streamed covariance.

The covariance is accumulated batch by batch (float64, shifted by the first batch's mean for numerical stability),
so memory is bounded by d x d whatever the number of rows; the components are its top eigenvectors. The solution is
exact, not randomised or iterative: a full symmetric eigendecomposition (`torch.linalg.eigh`, float64) of the exact
sample covariance of the rows read (`info["solver"]` says so).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from methods.base import Artefact, Method, MethodConfig
from methods.common import BuildMeter, base_info, stream_rows, tokens_behind

if TYPE_CHECKING:
    from bench.store import ActivationStore


@dataclasses.dataclass
class PCAConfig(MethodConfig):
    """Top-k principal components of the stream."""

    k: int = 256  # components kept (<= min(rows, d))
    n_rows: int | None = 200_000  # rows read from the stream; None reads the whole store
    shuffle_seed: int | None = None  # None: stream order; int: seeded block shuffle of contexts
    batch_contexts: int = 128  # contexts per store batch
    device: str = "cpu"  # where the d x d covariance accumulates ("cuda" pays off for large d)


class PCAArtefact(Artefact):
    """Orthonormal components; encode = (x - mean) @ V^T, decode = f @ V + mean."""

    method = "pca"
    reconstructs = True
    readouts = ("projection",)
    config_cls = PCAConfig
    tensor_shapes = {"directions": ("K", "d"), "center": ("d",), "explained_variance": ("K",)}

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    @property
    def explained_variance(self) -> torch.Tensor:
        """Variance along each component (denominator n - 1, as sklearn), [K] float64."""
        return self.tensors["explained_variance"]

    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        if readout not in (None, "projection", "default"):
            raise ValueError(f"pca has one readout, 'projection'; got {readout!r}")
        x = self.check_input(x)
        return (x - self.center.to(x)) @ self.directions.to(x).T

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.float() @ self.directions.to(f.device) + self.center.to(f.device)


class _Covariance:
    """Streaming mean and covariance in float64, shifted by the first batch mean to avoid cancellation."""

    def __init__(self, d: int, device: str):
        self.shift_D: torch.Tensor | None = None
        self.sum_D = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_DD = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.n = 0
        self.device = device

    def update(self, x_ND: torch.Tensor) -> None:
        x = x_ND.to(self.device, torch.float64)
        if self.shift_D is None:
            self.shift_D = x.mean(0)
        y = x - self.shift_D
        self.sum_D += y.sum(0)
        self.sum_DD += y.T @ y
        self.n += x.shape[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [d] and unbiased covariance [d, d]."""
        mean_y = self.sum_D / self.n
        cov = (self.sum_DD - self.n * torch.outer(mean_y, mean_y)) / (self.n - 1)
        return self.shift_D + mean_y, (cov + cov.T) / 2


class PCA(Method):
    """Principal components of the stream about its mean."""

    name = "pca"
    config_cls = PCAConfig
    artefact_cls = PCAArtefact

    def fit(self, store: "ActivationStore", layer: int, concepts: Any = None) -> PCAArtefact:
        cfg: PCAConfig = self.config
        if cfg.k < 1 or (cfg.n_rows is not None and cfg.n_rows < 2):
            raise ValueError(f"k must be >= 1 and n_rows >= 2 (got k={cfg.k}, n_rows={cfg.n_rows})")
        d = store.d_model
        with BuildMeter(cfg.device) as meter:
            acc, tokens = _Covariance(d, cfg.device), 0
            for x_ND, ctx_N in stream_rows(store, layer, cfg.batch_contexts, cfg.shuffle_seed):
                if cfg.n_rows is not None:
                    x_ND, ctx_N = x_ND[: cfg.n_rows - acc.n], ctx_N[: cfg.n_rows - acc.n]
                acc.update(x_ND)
                tokens += tokens_behind(ctx_N)  # contexts never straddle batches, so per-batch counts add up
                meter.sample()
                if cfg.n_rows is not None and acc.n >= cfg.n_rows:
                    break
            n = acc.n
            if n == 0:
                raise ValueError(f"store {store.id} has no rows at layer {layer}; extract a non-empty corpus first")
            if cfg.k > min(n, d):
                raise ValueError(f"k={cfg.k} exceeds min(rows read, d) = min({n}, {d}); lower k or read more rows")
            if n < 2:
                raise ValueError(f"store {store.id} has a single row at layer {layer}; PCA needs at least 2")
            mean_D, cov_DD = acc.finish()
            evals, evecs = torch.linalg.eigh(cov_DD)  # ascending
            order = torch.argsort(evals, descending=True)[: cfg.k]
            var_K = evals[order].clamp_min(0.0)
            comps_KD = evecs[:, order].T
            # Deterministic signs (as sklearn's svd_flip for PCA): the largest |entry| of each component is > 0.
            pivot = comps_KD.abs().argmax(dim=1, keepdim=True)
            comps_KD = comps_KD * torch.sign(comps_KD.gather(1, pivot))
            total_var = float(torch.diagonal(cov_DD).sum())
        # Covariance accumulation is 2*n*d^2; a symmetric eigendecomposition with vectors is about 9*d^3.
        cost = meter.cost(n, tokens, flops=2.0 * n * d * d + 9.0 * d**3)
        ratio = (var_K / total_var).tolist() if total_var > 0 else [0.0] * cfg.k
        info = base_info(store, layer, f"pca:k={cfg.k}", cost, n_train_rows=n,
                         explained_variance_ratio=ratio, explained_variance_ratio_total=float(sum(ratio)),
                         total_variance=total_var,
                         solver="exact: full eigendecomposition (torch.linalg.eigh) of the float64 sample covariance")
        tensors = {"directions": comps_KD.float().cpu().contiguous(), "center": mean_D.float().cpu(),
                   "explained_variance": var_K.cpu()}
        return PCAArtefact(cfg, tensors, info)
