"""Name -> Method class registry; external packages add methods via the `epbench.methods` entry-point group."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from methods.base import Method

ENTRY_POINT_GROUP = "epbench.methods"

# Built-in methods, imported lazily so `import methods` stays cheap (faiss, sae-lens load on first use).
_BUILTIN: dict[str, str] = {
    "ep": "methods.exemplar_partitioning:ExemplarPartitioning",
    "sae": "methods.sae:SAEMethod",
    "kmeans": "methods.kmeans:KMeans",
    "pca": "methods.pca:PCA",
    "random": "methods.random_directions:RandomDirections",
    "diffmean": "methods.diffmean:DiffMean",
    "frozen_sae": "methods.frozen_decoder_sae:FrozenDecoderSAE",
}
_REGISTERED: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator registering a Method under `cls.name` (for methods defined in user code)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name`")
    _REGISTERED[cls.name] = cls
    return cls


def _load(target: str) -> type[Method]:
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_methods() -> list[str]:
    """Names of built-in, registered and installed plugin methods."""
    return sorted(set(_BUILTIN) | set(_REGISTERED) | set(_plugins()))


def get_method(name: str) -> type[Method]:
    """Resolve a method name to its class; unknown names get an error listing what exists."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        cls = _load(_BUILTIN[name])
    else:
        plugins = _plugins()
        if name not in plugins:
            raise KeyError(
                f"unknown method {name!r}; available: {', '.join(available_methods())}. "
                f"Plugins register through the entry-point group {ENTRY_POINT_GROUP!r}."
            )
        cls = plugins[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method {name!r} resolves to {cls!r}, which is not a methods.base.Method subclass")
    _REGISTERED[name] = cls
    return cls
