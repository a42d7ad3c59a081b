"""Planted ground truth: synthetic activations whose true features and concept labels are known exactly.

K true unit directions in d dimensions: one per concept, one hard-negative partner per concept (cosine
`hard_cos` with the concept's direction), and background features. Every token row is a sparse superposition,
x = sum of a few active features times positive magnitudes + isotropic Gaussian noise. A text is a group of
token rows:
- a positive of concept c carries c's feature on `concept_tokens` of its tokens,
- a hard negative of c carries c's partner feature instead (close in direction, not the concept),
- a negative of c is a positive of another concept,
and every token also carries `background_per_token` random background features. An `OracleArtefact` (directions =
the true directions, encode = ReLU(x @ dirs^T)) is scored like any method and must beat random directions on
every concept metric: the check that the metrics measure what they claim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import torch
import torch.nn.functional as F

from bench.activations import TextActivations
from bench.concepts import ConceptSet
from methods.base import Artefact, MethodConfig


@dataclass
class PlantedConfig:
    """Shape of a planted-ground-truth data set."""

    d: int = 256  # activation width
    n_concepts: int = 16  # concepts, each tied to one planted feature
    n_background: int = 32  # features that fire at random on every token (distractors)
    hard_cos: float = 0.5  # cosine between a concept's direction and its hard-negative partner's
    per_concept: int = 100  # positives per concept (train/test halves); as many negatives and hard negatives
    tokens_per_text: int = 8  # token rows per text
    concept_tokens: int = 2  # tokens of a positive (hard negative) text carrying the concept (partner) feature
    background_per_token: int = 3  # background features active on each token
    magnitude: tuple[float, float] = (1.0, 2.0)  # uniform range of a background feature's magnitude
    concept_magnitude: tuple[float, float] = (2.0, 3.0)  # the same for planted concept and partner features
    noise: float = 0.1  # per-coordinate std of the Gaussian noise
    train_frac: float = 0.5  # share of each concept's texts in the train split
    seed: int = 0


@dataclass
class OracleConfig(MethodConfig):
    """The oracle has no parameters; `source` records where its directions came from."""

    source: str = "planted"  # e.g. "planted" or "planted+perturbed"


class OracleArtefact(Artefact):
    """Known directions as a dictionary: encode = ReLU(x @ dirs^T), assign = the largest of those."""

    method: ClassVar[str] = "oracle"
    readouts: ClassVar[tuple[str, ...]] = ("default",)
    config_cls: ClassVar[type[MethodConfig]] = OracleConfig

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        if readout not in (None, "default"):
            raise ValueError(f"{self.name}: unknown readout {readout!r}; available: {self.readouts}")
        return torch.relu(self.check_input(x) @ self.directions.T)


def oracle_artefact(directions: torch.Tensor, label: str = "oracle", source: str = "planted") -> OracleArtefact:
    """An OracleArtefact over the given (re-normalised) directions."""
    dirs = F.normalize(directions.float(), dim=1)
    return OracleArtefact(OracleConfig(source=source), {"directions": dirs},
                          {"label": label, "model": "planted", "layer": 0})


@dataclass
class Planted:
    """A planted data set: labelled texts, their token rows, the true directions and the oracle."""

    config: PlantedConfig
    concept_set: ConceptSet
    text_acts: TextActivations
    directions: torch.Tensor  # [K_true, d] unit
    concept_feature: dict[str, int]  # concept -> index of its true direction
    partner_feature: dict[str, int]  # concept -> index of its hard-negative partner direction
    oracle: OracleArtefact

    def stream(self, n_rows: int, seed: int = 1) -> torch.Tensor:
        """Unlabelled token rows [n_rows, d] where any true feature may fire (a shared eval stream)."""
        g = torch.Generator().manual_seed(seed)
        K = self.directions.shape[0]
        active = torch.rand(n_rows, K, generator=g).argsort(dim=1)[:, : self.config.background_per_token]
        return _rows(self.directions, active, self.config, g)

    def ood(self, kind: str, n_texts: int, seed: int = 2) -> TextActivations:
        """OOD token rows grouped like the texts: `gaussian` (isotropic, matched norm) or `foreign` (other features)."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.config
        n = n_texts * cfg.tokens_per_text
        tid = torch.arange(n_texts).repeat_interleave(cfg.tokens_per_text)
        if kind == "gaussian":
            x = torch.randn(n, cfg.d, generator=g)
            x = x / x.norm(dim=1, keepdim=True) * self.text_acts.acts.norm(dim=1).mean()
        elif kind == "foreign":
            dirs = F.normalize(torch.randn(self.directions.shape[0], cfg.d, generator=g), dim=1)
            active = torch.rand(n, dirs.shape[0], generator=g).argsort(dim=1)[:, : cfg.background_per_token]
            x = _rows(dirs, active, cfg, g)
        else:
            raise ValueError(f"unknown OOD kind {kind!r}; use 'gaussian' or 'foreign'")
        return TextActivations(x, tid, n_texts)


def _rows(dirs_KD: torch.Tensor, active_NA: torch.Tensor, cfg: PlantedConfig, g: torch.Generator) -> torch.Tensor:
    """Rows = sum over the active features of magnitude x direction, plus noise."""
    lo, hi = cfg.magnitude
    mags = lo + (hi - lo) * torch.rand(active_NA.shape, generator=g)
    x = (mags[..., None] * dirs_KD[active_NA]).sum(dim=1)
    return x + cfg.noise * torch.randn(x.shape, generator=g)


def _directions(cfg: PlantedConfig, g: torch.Generator) -> torch.Tensor:
    """Concept directions, then their partners at cosine hard_cos, then background directions."""
    C = cfg.n_concepts
    base = F.normalize(torch.randn(C + cfg.n_background, cfg.d, generator=g), dim=1)
    concept, background = base[:C], base[C:]
    r = torch.randn(C, cfg.d, generator=g)
    r = F.normalize(r - (r * concept).sum(1, keepdim=True) * concept, dim=1)  # orthogonal to its concept
    partner = cfg.hard_cos * concept + (1 - cfg.hard_cos**2) ** 0.5 * r
    return torch.cat([concept, partner, background])


def make_planted(config: PlantedConfig | None = None, **overrides: Any) -> Planted:
    """Generate a planted data set (deterministic in config.seed)."""
    cfg = dataclasses.replace(config or PlantedConfig(), **overrides)
    if cfg.n_concepts < 2 or cfg.per_concept < 2 or cfg.concept_tokens > cfg.tokens_per_text:
        raise ValueError("need n_concepts >= 2, per_concept >= 2 and concept_tokens <= tokens_per_text")
    g = torch.Generator().manual_seed(cfg.seed)
    C, P = cfg.n_concepts, cfg.per_concept
    dirs = _directions(cfg, g)
    concepts = [f"concept_{i:02d}" for i in range(C)]
    n_train = round(cfg.train_frac * P)
    split = ["train" if i < n_train else "test" for i in range(P)]
    # A text's planted feature (or -1): positives of c carry c, hard texts of c carry c's partner.
    planted: dict[str, int] = {}
    rows = []
    for c, name in enumerate(concepts):
        for i in range(P):
            planted[f"planted:pos:{c}:{i}"] = c
            planted[f"planted:hard:{c}:{i}"] = C + c
            rows.append((f"planted:pos:{c}:{i}", name, "positive", split[i]))
            rows.append((f"planted:hard:{c}:{i}", name, "hard negative", split[i]))
    for c, name in enumerate(concepts):
        # Negatives: positives of the other concepts, same split, dealt round-robin.
        others = [o for o in range(C) if o != c]
        for i in range(P):
            o = others[(i + c) % len(others)]
            rows.append((f"planted:pos:{o}:{i}", name, "negative", split[i]))
    examples = pd.DataFrame(rows, columns=["text", "concept", "category", "split"])
    cs = ConceptSet("planted", concepts, examples, "bench.planted synthetic ground truth",
                    {"seed": cfg.seed, "per_concept": P, "train_frac": cfg.train_frac})
    n_texts, T = len(cs.texts()), cfg.tokens_per_text
    tids = torch.arange(n_texts).repeat_interleave(T)
    bg = torch.rand(n_texts * T, cfg.n_background, generator=g).argsort(dim=1)[:, : cfg.background_per_token]
    acts = _rows(dirs, 2 * C + bg, cfg, g)
    # Each text's planted feature goes on `concept_tokens` random token positions of that text.
    feat = torch.tensor([planted[t] for t in cs.texts()])
    where = torch.rand(n_texts, T, generator=g).argsort(dim=1)[:, : cfg.concept_tokens]
    where = where + T * torch.arange(n_texts)[:, None]  # row index of those positions
    lo, hi = cfg.concept_magnitude
    mags = lo + (hi - lo) * torch.rand(where.shape, generator=g)
    acts[where.reshape(-1)] += mags.reshape(-1, 1) * dirs[feat.repeat_interleave(cfg.concept_tokens)]
    text_acts = TextActivations(acts, tids, n_texts)
    return Planted(cfg, cs, text_acts, dirs, {n: i for i, n in enumerate(concepts)},
                   {n: C + i for i, n in enumerate(concepts)}, oracle_artefact(dirs))
