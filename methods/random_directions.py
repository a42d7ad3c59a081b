"""Random unit directions: the control every metric must beat.

Directions are seeded Gaussian vectors normalised to unit length (uniform on the sphere), independent of the
data. The centre is the stream mean, so encode = (x - mean) @ dirs^T and ablations pivot on the mean, like the
data-driven methods pivot on theirs; the readout therefore differs from x @ dirs^T by a constant per feature.
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
class RandomConfig(MethodConfig):
    """Seeded random unit directions about the stream mean."""

    k: int = 1024  # number of directions
    seed: int = 0  # generator seed, mixed with the layer and k: same seed, layer, k and d give the same directions on
    # every machine; each layer gets its own draw (so cross-layer stability of the control is chance level) and so
    # does each k (controls of different K are independent draws, not prefixes of one draw)
    n_rows: int | None = 200_000  # rows read for the mean; None reads the whole store
    batch_contexts: int = 128  # contexts per store batch


class RandomArtefact(Artefact):
    """Random unit directions; encode = (x - mean) @ dirs^T."""

    method = "random"
    readouts = ("projection",)
    config_cls = RandomConfig
    tensor_shapes = {"directions": ("K", "d"), "center": ("d",)}

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        if readout not in (None, "projection", "default"):
            raise ValueError(f"random has one readout, 'projection'; got {readout!r}")
        x = self.check_input(x)
        return (x - self.center.to(x)) @ self.directions.to(x).T


def random_unit_directions(k: int, d: int, seed: int) -> torch.Tensor:
    """[k, d] float32 unit rows, uniform on the sphere, from a seeded CPU generator (portable)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(k, d, generator=g, dtype=torch.float64)
    return (dirs / dirs.norm(dim=1, keepdim=True)).float()


def draw_seed(seed: int, layer: int, k: int) -> int:
    """The generator seed of one draw: distinct for every (seed, layer, k), portable (no Python hash)."""
    return (seed * 1_000_003 + layer) * 1_000_033 + k


class RandomDirections(Method):
    """Seeded random directions; reads the stream only for its mean (the ablation pivot)."""

    name = "random"
    config_cls = RandomConfig
    artefact_cls = RandomArtefact

    def fit(self, store: "ActivationStore", layer: int, concepts: Any = None) -> RandomArtefact:
        cfg: RandomConfig = self.config
        if cfg.k < 1 or (cfg.n_rows is not None and cfg.n_rows < 1):
            raise ValueError(f"k and n_rows must be >= 1 (got k={cfg.k}, n_rows={cfg.n_rows})")
        d = store.d_model
        with BuildMeter() as meter:
            sum_D, n, tokens = torch.zeros(d, dtype=torch.float64), 0, 0
            for x_ND, ctx_N in stream_rows(store, layer, cfg.batch_contexts):
                if cfg.n_rows is not None:
                    x_ND, ctx_N = x_ND[: cfg.n_rows - n], ctx_N[: cfg.n_rows - n]
                sum_D += x_ND.double().sum(0)
                n += x_ND.shape[0]
                tokens += tokens_behind(ctx_N)
                meter.sample()
                if cfg.n_rows is not None and n >= cfg.n_rows:
                    break
            if n == 0:
                raise ValueError(f"store {store.id} has no rows at layer {layer}; extract a non-empty corpus first")
            dirs_KD = random_unit_directions(cfg.k, d, draw_seed(cfg.seed, layer, cfg.k))
        cost = meter.cost(n, tokens, flops=float(n * d + 3 * cfg.k * d))  # mean + draw and normalise
        info = base_info(store, layer, f"random:k={cfg.k}", cost, n_mean_rows=n)
        return RandomArtefact(cfg, {"directions": dirs_KD, "center": (sum_D / n).float()}, info)
