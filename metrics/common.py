"""What every metric family shares: the tidy result row, bootstrap confidence intervals, seeding."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from methods.base import Artefact


@dataclass
class MetricRow:
    """One tidy result: a metric value for one method artefact at one model/layer."""

    method: str  # artefact label, e.g. "ep:p=2"
    method_config: str  # JSON of the method config
    model: str
    layer: int
    metric: str  # e.g. "retrieval.precision@10"
    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n: int = 0  # units averaged over (concepts, prompts, features, layer pairs)
    seed: int = 0  # the artefact's fit seed (its config `seed`) where it has one, else the metric's seed
    supervised: bool = False  # the method used concept labels to fit (DiffMean)
    detail: str = ""  # free text, e.g. the concept set or the layer pair
    # Per-unit values behind `value` (unit id -> value: a concept, prompt or text), kept in the cell files so
    # paired comparisons (bench.verdict) can difference two methods over the same units; not in rows.csv.
    units: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def row(artefact: Artefact, metric: str, value: float, ci: tuple[float, float] = (float("nan"), float("nan")),
        n: int = 0, seed: int = 0, detail: str = "", layer: int | None = None,
        units: dict[str, float] | None = None) -> MetricRow:
    """A MetricRow filled in from an artefact's provenance."""
    info = artefact.info
    return MetricRow(
        method=artefact.name,
        method_config=json.dumps(artefact.config.to_dict(), sort_keys=True, default=str),
        model=str(info.get("model", "")),
        layer=int(layer if layer is not None else info.get("layer", -1)),
        metric=metric,
        value=float(value),
        ci_low=float(ci[0]),
        ci_high=float(ci[1]),
        n=int(n),
        seed=int(getattr(artefact.config, "seed", seed)),
        supervised=bool(artefact.supervised),
        detail=detail,
        units=units,
    )


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat` over units (concepts, prompts...); NaN with fewer than 2 units."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    stats = np.array([stat(v[i]) for i in idx]) if stat is not np.mean else v[idx].mean(axis=1)
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def unit_values(ids: Sequence[Any] | None, values: Sequence[float] | np.ndarray) -> dict[str, float] | None:
    """{unit id: value} for the non-NaN values (None without ids); ids must be unique and align with values."""
    if ids is None:
        return None
    ids = [str(i) for i in ids]
    if len(ids) != len(values) or len(set(ids)) != len(ids):
        raise ValueError(f"unit ids must be unique and one per value ({len(ids)} ids, {len(values)} values)")
    return {i: float(v) for i, v in zip(ids, values) if not np.isnan(v)}


def mean_row(artefact: Artefact, metric: str, values: Sequence[float], seed: int = 0, detail: str = "",
             layer: int | None = None, units: Sequence[Any] | None = None) -> MetricRow:
    """Mean over units with its bootstrap CI, as a row; `units` names each value's unit (for paired tests)."""
    per_unit = unit_values(units, values)
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    value = float(v.mean()) if len(v) else float("nan")
    return row(artefact, metric, value, bootstrap_ci(v, seed=seed), n=len(v), seed=seed, detail=detail, layer=layer,
               units=per_unit)
