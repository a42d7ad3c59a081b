"""DiffMean: the supervised reference, one direction per concept = normalise(mean(positives) - mean(negatives)).

It uses concept labels to fit, so every table marks it as supervised; feature i is concept i, in the order the
concepts were given (kept in `info["concepts"]`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from methods.base import Artefact, Method, MethodConfig
from methods.common import EPS, BuildMeter, base_info, check_rows

if TYPE_CHECKING:
    from bench.store import ActivationStore


@dataclasses.dataclass
class DiffMeanConfig(MethodConfig):
    """DiffMean has no hyperparameters: the concept set defines it."""


class DiffMeanArtefact(Artefact):
    """Concept directions; encode = x @ dirs^T (no centre)."""

    method = "diffmean"
    supervised = True
    readouts = ("projection",)
    config_cls = DiffMeanConfig
    tensor_shapes = {"directions": ("K", "d"), "diff_norms": ("K",)}

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    @property
    def concepts(self) -> list[str]:
        """Concept names; feature i belongs to concepts[i]."""
        return list(self.info["concepts"])

    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        if readout not in (None, "projection", "default"):
            raise ValueError(f"diffmean has one readout, 'projection'; got {readout!r}")
        x = self.check_input(x)
        return x @ self.directions.to(x).T


class DiffMean(Method):
    """normalise(mean(pos) - mean(neg)) per concept."""

    name = "diffmean"
    supervised = True
    config_cls = DiffMeanConfig
    artefact_cls = DiffMeanArtefact

    def fit(
        self,
        store: "ActivationStore | None",
        layer: int,
        concepts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> DiffMeanArtefact:
        """One direction per concept from its positive and negative activations (rows at `layer`)."""
        if concepts is None:
            raise ValueError(
                "diffmean is supervised: pass concept activations; the runner does this from a concept set")
        if not concepts:
            raise ValueError("diffmean got an empty concept dict; pass at least one concept")
        d = store.d_model if store is not None else None
        with BuildMeter() as meter:
            dirs, norms, rows = [], [], 0
            for name, pair in concepts.items():
                pos, neg = (_check_side(name, side, x, d) for side, x in zip(("positive", "negative"), pair))
                d = pos.shape[1]
                diff_D = pos.double().mean(0) - neg.double().mean(0)
                norm = float(diff_D.norm())
                if norm <= EPS:
                    raise ValueError(f"concept {name!r}: positive and negative means coincide, so there is no "
                                     "direction; check its labels")
                dirs.append((diff_D / norm).float())
                norms.append(norm)
                rows += pos.shape[0] + neg.shape[0]
        # Rows arrive as activations, not contexts: tokens counts the rows (their BOS is unknown here).
        cost = meter.cost(rows, rows, flops=float(rows * d + 3 * len(dirs) * d))
        info = base_info(store, layer, f"diffmean:K={len(dirs)}", cost, concepts=list(concepts), supervised=True)
        return DiffMeanArtefact(self.config, {"directions": torch.stack(dirs), "diff_norms": torch.tensor(norms)},
                                info)


def _check_side(name: str, side: str, x: torch.Tensor, d: int | None) -> torch.Tensor:
    """Validate one side of a concept: [n >= 1, d] finite rows."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"concept {name!r}: {side} activations must be a 2-d tensor [n, d]")
    if x.shape[0] == 0:
        raise ValueError(f"concept {name!r} has no {side} rows; every concept needs positives and negatives")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"concept {name!r}: {side} activations have d={x.shape[1]}, expected {d}; "
                         "were they taken from another model or hook?")
    return check_rows(x, f"concept {name!r} {side}")
