"""A minimal epbench method plugin: one direction, the normalised mean activation of the stream."""
from dataclasses import dataclass

import torch

from methods.base import Artefact, Method, MethodConfig
from methods.common import BuildMeter, base_info, stream_rows, tokens_behind


@dataclass
class MeanDirectionConfig(MethodConfig):
    n_rows: int = 10_000  # rows averaged, in stream order


class MeanDirectionArtefact(Artefact):
    method, config_cls = "mean_direction", MeanDirectionConfig
    tensor_shapes = {"directions": ("K", "d")}  # checked on save and load
    directions = property(lambda self: self.tensors["directions"])  # [1, d] unit

    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        return self.check_input(x) @ self.directions.T


class MeanDirection(Method):
    name, config_cls, artefact_cls = "mean_direction", MeanDirectionConfig, MeanDirectionArtefact

    def fit(self, store, layer, concepts=None) -> MeanDirectionArtefact:
        n, tokens, total = 0, 0, torch.zeros(store.d_model, dtype=torch.float64)
        with BuildMeter() as meter:  # wall seconds and peak memory of the build
            for x, context_ids in stream_rows(store, layer):  # validated rows, in stream order
                x, context_ids = x[: self.config.n_rows - n], context_ids[: self.config.n_rows - n]
                total += x.double().sum(0)
                n, tokens = n + len(x), tokens + tokens_behind(context_ids)  # tokens: rows + one BOS per context
                if n >= self.config.n_rows:
                    break
            mean = (total / n).float()[None]
        cost = meter.cost(rows=n, tokens=tokens, flops=float(n * store.d_model))  # one add per element read
        return MeanDirectionArtefact(self.config, {"directions": mean / mean.norm()},
                                     base_info(store, layer, self.name, cost))
