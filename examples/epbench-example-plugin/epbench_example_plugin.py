"""A minimal epbench method plugin: one direction, the normalised mean activation of the stream."""
from dataclasses import dataclass

import torch

from methods.base import Artefact, Cost, Method, MethodConfig


@dataclass
class MeanDirectionConfig(MethodConfig):
    n_rows: int = 10_000  # rows averaged, in stream order


class MeanDirectionArtefact(Artefact):
    method, config_cls = "mean_direction", MeanDirectionConfig
    directions = property(lambda self: self.tensors["directions"])  # [1, d] unit

    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        return self.check_input(x) @ self.directions.T


class MeanDirection(Method):
    name, config_cls, artefact_cls = "mean_direction", MeanDirectionConfig, MeanDirectionArtefact

    def fit(self, store, layer, concepts=None) -> MeanDirectionArtefact:
        x = torch.cat([b.acts for b in store.batches(layer)])[: self.config.n_rows]
        info = {"label": self.name, "cost": Cost(rows=len(x)).to_dict(), **store.provenance(layer)}
        mean = x.mean(0, keepdim=True)
        return MeanDirectionArtefact(self.config, {"directions": mean / mean.norm()}, info)
