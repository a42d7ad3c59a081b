"""Fake dictionaries for metric tests: linear encoders with known directions (exact oracles for every metric)."""

from __future__ import annotations

import torch

from methods.base import Artefact, MethodConfig

LAYER = 2


class LinArtefact(Artefact):
    """Test dictionary: encode = (x - c) @ D^T (signed), decode = f @ D + c."""

    method = "lin-test"
    reconstructs = True
    readouts = ("signed",)

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    def encode(self, x, readout=None):
        return (self.check_input(x) - self.center.to(x)) @ self.directions.to(x).T

    def decode(self, f):
        return f @ self.directions.to(f) + self.center.to(f)


class IdentityArtefact(LinArtefact):
    method = "identity-test"

    def encode(self, x, readout=None):
        return x.clone()

    def decode(self, f):
        return f.clone()


class ZeroArtefact(IdentityArtefact):
    method = "zero-test"

    def decode(self, f):
        return torch.zeros_like(f)


def make(cls, dirs, layer=LAYER, center=None, **info):
    t = {"directions": torch.nn.functional.normalize(dirs.float(), dim=1)}
    if center is not None:
        t["center"] = center
    return cls(MethodConfig(), t, {"label": cls.method, "layer": layer, "model": "tiny-gemma2", **info})


def rand_dirs(K, d=64, seed=0):
    return torch.randn(K, d, generator=torch.Generator().manual_seed(seed))
