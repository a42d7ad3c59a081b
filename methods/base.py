"""The Method protocol: a config dataclass, `fit(store, layer) -> Artefact`, and the artefact every metric reads.

An artefact is a dictionary over one hook of one model: K unit `directions` (K x d, float32), an `encode` to
K-wide feature activations, a hard `assign`, an optional `decode`, intervention helpers and a `cost`. It is
persisted as `artefact.safetensors` (its named tensors) plus `cfg.json` (method name, config, info); see the
README section "Artefact format".
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from bench.store import ActivationStore

ARTEFACT_FORMAT_VERSION = 1


@dataclasses.dataclass
class MethodConfig:
    """Base class of method configs; subclasses add documented fields with defaults."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        """Build from a dict, refusing unknown keys so typos in `--param` fail loudly."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown parameter(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)


@dataclasses.dataclass
class Cost:
    """What building (or encoding with) a method consumed."""

    rows: int = 0  # activation rows read
    tokens: int = 0  # model tokens behind those rows, BOS included (the paper's "tokens streamed")
    flops: float = 0.0  # counted analytically from the shapes of the work done
    wall_seconds: float = 0.0
    peak_memory_bytes: int = 0  # peak RSS growth (CPU) or peak allocated (CUDA) during the build
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Assignment(NamedTuple):
    """Hard assignment: per row the chosen region/feature and a method-specific score."""

    index: torch.Tensor  # [N] int64
    score: torch.Tensor  # [N] float32 (EP: cosine distance to the nearest exemplar; others: activation)


class Artefact(ABC):
    """A fitted dictionary. Subclasses keep all state in `self.tensors` so save/load is generic."""

    method: ClassVar[str] = ""
    supervised: ClassVar[bool] = False  # uses concept labels to fit (DiffMean): marked in every table
    reconstructs: ClassVar[bool] = False  # has a meaningful decode()
    readouts: ClassVar[tuple[str, ...]] = ("default",)
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig, tensors: dict[str, torch.Tensor], info: dict[str, Any]):
        self.config = config
        self.tensors = tensors
        self.info = info  # provenance: store id, model, layer, hook, cost, versions, method-specific stats

    # --- geometry -------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def directions(self) -> torch.Tensor:
        """Unit feature directions, [K, d] float32."""

    @property
    def center(self) -> torch.Tensor:
        """The point interventions pivot on (EP: the calibration centre); zero unless a method has one."""
        return self.tensors.get("center", torch.zeros(self.d_model))

    @property
    def K(self) -> int:
        return int(self.directions.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[1])

    @property
    def cost(self) -> Cost:
        return Cost(**self.info.get("cost", {}))

    @property
    def name(self) -> str:
        """A short label for tables, e.g. `ep:p=2`."""
        return self.info.get("label", self.method)

    # --- reading features -------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate [N, d] activations; float32 on the artefact's device."""
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(
                f"{self.name}: expected activations [N, {self.d_model}], got {tuple(x.shape)}; "
                "was the artefact built on another model or hook?"
            )
        x = x.float()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise ValueError(f"{self.name}: {bad} activation row(s) contain NaN/inf; drop or fix them first")
        return x

    @abstractmethod
    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        """Feature activations [N, K] for activations x [N, d]."""

    def assign(self, x: torch.Tensor) -> Assignment:
        """Top feature per row and its activation."""
        score, index = self.encode(x).max(dim=1)
        return Assignment(index, score)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruct activations [N, d] from features [N, K]."""
        raise NotImplementedError(f"{self.method} has no decoder")

    # --- interventions -----------------------------------------------------------------------------------
    def ablate(self, x: torch.Tensor, features: Sequence[int]) -> torch.Tensor:
        """Project the span of the chosen directions out of (x - center), then add the centre back."""
        dirs = self.directions[list(features)].to(x)
        q, _ = torch.linalg.qr(dirs.T)  # orthonormal basis of the span, [d, k]
        c = self.center.to(x)
        xc = x - c
        return xc - (xc @ q) @ q.T + c

    def steer(self, x: torch.Tensor, feature: int, alpha: float) -> torch.Tensor:
        """Add alpha times the unit direction of one feature."""
        return x + alpha * self.directions[feature].to(x)

    # --- persistence -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `artefact.safetensors` + `cfg.json` into directory `path` (atomic per file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "artefact.safetensors.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(tmp))
        tmp.replace(path / "artefact.safetensors")
        cfg = {
            "format_version": ARTEFACT_FORMAT_VERSION,
            "method": self.method,
            "config": self.config.to_dict(),
            "info": self.info,
        }
        tmp_json = path / "cfg.json.tmp"
        tmp_json.write_text(json.dumps(cfg, indent=2, default=str))
        tmp_json.replace(path / "cfg.json")
        return path

    @classmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], info: dict[str, Any]):
        return cls(cls.config_cls.from_dict(config), tensors, info)


def load_artefact(path: str | Path) -> Artefact:
    """Load any saved artefact; the method named in cfg.json picks the class through the registry."""
    from methods.registry import get_method

    path = Path(path)
    cfg_path, tensor_path = path / "cfg.json", path / "artefact.safetensors"
    for p in (cfg_path, tensor_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: {path} is not a saved epbench artefact")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(str(tensor_path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged artefact
        raise ValueError(f"artefact at {path} is corrupted ({e}); rebuild it with `epbench build`") from e
    if cfg.get("format_version") != ARTEFACT_FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {cfg.get('format_version')} != {ARTEFACT_FORMAT_VERSION}")
    return get_method(cfg["method"]).artefact_cls.from_parts(cfg["config"], tensors, cfg["info"])


class Method(ABC):
    """Fits an artefact from the activation store. One subclass per file in `methods/`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    artefact_cls: ClassVar[type[Artefact]]
    supervised: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None, **params: Any):
        if config is None:
            config = self.config_cls.from_dict(params)
        elif params:
            raise TypeError("pass either a config or keyword parameters, not both")
        self.config = config

    @abstractmethod
    def fit(
        self,
        store: "ActivationStore",
        layer: int,
        concepts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> Artefact:
        """Fit on `store` at `layer`. Supervised methods also get concepts: name -> (pos [n, d], neg [m, d])."""
