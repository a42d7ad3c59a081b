"""The Method protocol: a config dataclass, `fit(store, layer) -> Artefact`, and the artefact every metric reads.

An artefact is a dictionary over one hook of one model: K unit `directions` (K x d, float32), an `encode` to
K-wide feature activations, a hard `assign`, an optional `decode`, intervention helpers and a `cost`. It is
persisted as `artefact.safetensors` (its named tensors) plus `cfg.json` (method name, config, info); see the
README section "Artefact format".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import re
import types
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Sequence

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from bench.cache import atomic_write_text, unique_tmp

if TYPE_CHECKING:
    from bench.store import ActivationStore

ARTEFACT_FORMAT_VERSION = 2  # 2: cfg.json records sha256 of the tensors file and of its own content

TensorShape = tuple[str | int, ...]


class ArtefactError(ValueError):
    """A saved artefact is missing, damaged, of another method or holds non-finite numbers; names path and fix."""


@dataclasses.dataclass
class MethodConfig:
    """Base class of method configs; subclasses add documented fields with defaults."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        """Build from a dict, refusing unknown keys and values of the wrong type (`pca:k=2.5`) in one line."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown parameter(s) {unknown}; valid: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for name, value in d.items():
            if not _fits_type(value, hints.get(name, Any)):
                raise ValueError(f"{cls.__name__}: {name}={value!r} is not of type {_type_name(hints[name])}"
                                 f"{'; ' + doc if (doc := cls.field_docs().get(name)) else ''}")
        return cls(**d)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's documented meaning: the comment on its line in the class source (for --help)."""
        docs: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if not (isinstance(klass, type) and issubclass(klass, MethodConfig)):
                continue
            try:
                src = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M):
                docs[m.group(1)] = m.group(2).strip()
        return docs


def _fits_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits a config field annotation (int, float, bool, str, None, unions, lists, literals)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return not inner or all(_fits_type(v, inner[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and origin is None:
        return isinstance(value, hint)
    return True  # an annotation this check does not model is left to the method


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


LOADED_SOURCES = ("pretrained", "disk")  # info["source"] of a dictionary loaded, not built here (training unknown)


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
    # The tensors a saved artefact of this class holds, name -> shape: "K" features, "d" model width, other
    # strings are sizes that must agree across tensors, ints are fixed sizes. Checked on save and on load, so
    # another method's file is refused by name. Empty (plugins that declare nothing): only finiteness is checked.
    tensor_shapes: ClassVar[dict[str, TensorShape]] = {}
    optional_tensors: ClassVar[dict[str, TensorShape]] = {}  # may be absent (e.g. a JumpReLU SAE's threshold)

    def __init__(self, config: MethodConfig, tensors: dict[str, torch.Tensor], info: dict[str, Any]):
        self.config = config
        self.tensors = tensors
        self.info = info  # provenance: store id, model, layer, hook, cost, versions, method-specific stats

    def config_record(self) -> dict[str, Any]:
        """The config the metric rows record (`method_config`): what this artefact is. Default: its config."""
        return self.config.to_dict()

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
    @classmethod
    def check_tensors(cls, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Refuse tensors this class does not declare, missing ones, shapes that disagree, NaN/inf values."""
        if cls.tensor_shapes:
            declared = {**cls.tensor_shapes, **cls.optional_tensors}
            missing = sorted(set(cls.tensor_shapes) - set(tensors))
            unknown = sorted(set(tensors) - set(declared))
            if missing or unknown:
                raise ArtefactError(
                    f"{where}: not a {cls.method} artefact (missing tensor(s) {missing}, unexpected {unknown}; "
                    f"it holds {sorted(tensors)}); was another method's file put here? rebuild it with `epbench build`")
            sizes: dict[str, int] = {}
            for name, spec in declared.items():
                if name not in tensors:
                    continue
                shape = tuple(tensors[name].shape)
                ok = len(shape) == len(spec)
                for dim, sym in zip(shape, spec):
                    ok = ok and (dim == sym if isinstance(sym, int) else sizes.setdefault(sym, dim) == dim)
                if not ok:
                    raise ArtefactError(f"{where}: tensor {name!r} has shape {list(shape)}, a {cls.method} artefact "
                                        f"needs {list(spec)} (with {sizes}); rebuild it with `epbench build`")
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ArtefactError(f"{where}: tensor {name!r} holds {bad} NaN/inf value(s); rebuild it with "
                                    "`epbench build` (if a fresh build does this too, the build diverged: check its "
                                    "settings and the store)")

    def save(self, path: str | Path) -> Path:
        """Write `artefact.safetensors` + `cfg.json` (with sha256 of both contents) into directory `path`.

        Each file goes through a unique temporary name; cfg.json is written last, so a directory whose cfg.json
        hashes do not match its tensors was interrupted or damaged, never silently half-written.
        """
        path = Path(path)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        type(self).check_tensors(tensors, f"{self.name} (about to be saved to {path})")
        path.mkdir(parents=True, exist_ok=True)
        tmp = unique_tmp(path / "artefact.safetensors")
        try:
            save_file(tensors, str(tmp))
            tensors_sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
            (path / "cfg.json").unlink(missing_ok=True)  # tensors and cfg.json change together or not at all
            tmp.replace(path / "artefact.safetensors")
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        body = json.loads(json.dumps({"method": self.method, "config": self.config.to_dict(), "info": self.info},
                                     default=str))  # round-trip first: the hash is of what a load reads back
        cfg = {"format_version": ARTEFACT_FORMAT_VERSION, **body, "tensors_sha256": tensors_sha,
               "content_sha256": _content_sha256(body, tensors_sha)}
        atomic_write_text(path / "cfg.json", json.dumps(cfg, indent=2))
        return path

    @classmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], info: dict[str, Any]):
        return cls(cls.config_cls.from_dict(config), tensors, info)


def _content_sha256(body: dict[str, Any], tensors_sha256: str) -> str:
    """sha256 over method, config, info (canonical JSON) and the tensors file's sha256."""
    blob = json.dumps({**body, "tensors_sha256": tensors_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cfg(cfg_path: Path) -> dict[str, Any]:
    """cfg.json, checked for shape: a dict with format_version, method (str), config (dict), info (dict), hashes."""
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtefactError(f"{cfg_path} is corrupted ({e}); rebuild the artefact with `epbench build`") from e
    if not isinstance(cfg, dict):
        raise ArtefactError(f"{cfg_path} holds a {type(cfg).__name__}, not an artefact config; rebuild the artefact")
    if cfg.get("format_version") != ARTEFACT_FORMAT_VERSION:
        raise ArtefactError(f"{cfg_path}: format_version {cfg.get('format_version')!r}, this epbench reads "
                            f"{ARTEFACT_FORMAT_VERSION} (artefacts from older versions carry no content hashes); "
                            "rebuild it with `epbench build`")
    wrong = [k for k, t in (("method", str), ("config", dict), ("info", dict), ("tensors_sha256", str),
                            ("content_sha256", str)) if not isinstance(cfg.get(k), t)]
    if wrong:
        raise ArtefactError(f"{cfg_path}: field(s) {wrong} missing or of the wrong type; rebuild the artefact")
    return cfg


def load_artefact(path: str | Path) -> Artefact:
    """Load a saved artefact after verifying it: sha256 of tensors and config, tensor names/shapes, finiteness.

    The method named in cfg.json picks the class through the registry. Any damage raises ArtefactError naming
    the file and the fix; nothing damaged is ever returned.
    """
    from methods.registry import get_method

    path = Path(path)
    cfg_path, tensor_path = path / "cfg.json", path / "artefact.safetensors"
    for p in (cfg_path, tensor_path):
        if not p.exists():
            raise ArtefactError(f"{p} is missing: {path} is not a saved epbench artefact (or its save was "
                                "interrupted); rebuild it with `epbench build`")
    cfg = _read_cfg(cfg_path)
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != cfg["tensors_sha256"]:
        raise ArtefactError(f"{tensor_path} is corrupted (sha256 differs from the one in cfg.json); "
                            "rebuild it with `epbench build`")
    body = {k: cfg[k] for k in ("method", "config", "info")}
    if _content_sha256(body, cfg["tensors_sha256"]) != cfg["content_sha256"]:
        raise ArtefactError(f"{cfg_path} was modified after saving (content sha256 mismatch); rebuild the artefact")
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # noqa: BLE001 - a parse failure of hashed bytes: written damaged
        raise ArtefactError(f"{tensor_path} cannot be read ({e}); rebuild it with `epbench build`") from e
    try:
        cls = get_method(cfg["method"]).artefact_cls
    except ValueError as e:
        raise ArtefactError(f"{cfg_path}: {e}") from e
    cls.check_tensors(tensors, str(tensor_path))
    try:
        return cls.from_parts(cfg["config"], tensors, cfg["info"])
    except (TypeError, ValueError) as e:
        raise ArtefactError(f"{cfg_path}: config does not fit {cls.method} ({e}); rebuild the artefact") from e


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
