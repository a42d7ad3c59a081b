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
    # Unit id -> the independent cluster it belongs to, where units are not independent (causal prompts that share
    # one selected direction: cluster = relation/answer). Verdicts resample and sign-flip clusters, not units.
    # None: every unit is its own cluster.
    clusters: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def row(artefact: Artefact, metric: str, value: float, ci: tuple[float, float] = (float("nan"), float("nan")),
        n: int = 0, seed: int = 0, detail: str = "", layer: int | None = None,
        units: dict[str, float] | None = None, clusters: dict[str, str] | None = None) -> MetricRow:
    """A MetricRow filled in from an artefact's provenance."""
    info = artefact.info
    return MetricRow(
        method=artefact.name,
        method_config=json.dumps(artefact.config_record(), sort_keys=True, default=str),
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
        clusters=clusters,
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


def cluster_bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[Any],
    weights: Sequence[float] | np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(values) / sum(weights) (weights default 1: the mean over units) with whole
    clusters resampled, for units that share a cluster (causal prompts ablated with one direction). NaN values
    (and their weights) are dropped; NaN with fewer than 2 clusters. Clusters are taken in order of first
    appearance, so with every unit its own cluster the draws are those of `bootstrap_ci` (same seed)."""
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    c = np.asarray([str(x) for x in clusters], dtype=object)
    if not len(v) == len(w) == len(c):
        raise ValueError(f"values, weights and clusters must align ({len(v)}, {len(w)}, {len(c)})")
    keep = ~(np.isnan(v) | np.isnan(w))
    v, w, c = v[keep], w[keep], c[keep]
    names = list(dict.fromkeys(c))
    if len(names) < 2:
        return float("nan"), float("nan")
    of = {n: i for i, n in enumerate(names)}
    idx_c = np.array([of[x] for x in c], dtype=int)
    sums, wsums = np.bincount(idx_c, v, len(names)), np.bincount(idx_c, w, len(names))
    draw = np.random.default_rng(seed).integers(0, len(names), size=(n_boot, len(names)))
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = sums[draw].sum(1) / wsums[draw].sum(1)
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
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
             layer: int | None = None, units: Sequence[Any] | None = None,
             clusters: Sequence[Any] | None = None) -> MetricRow:
    """Mean over units with its bootstrap CI, as a row; `units` names each value's unit (for paired tests) and
    `clusters` (aligned with `units`) the independent group each unit belongs to: the CI then resamples clusters
    (cluster_bootstrap_ci), not units."""
    per_unit = unit_values(units, values)
    per_cluster = None
    if clusters is not None:
        if units is None or len(clusters) != len(units):
            raise ValueError(f"clusters must align with units ({len(clusters)} clusters, "
                             f"{0 if units is None else len(units)} units)")
        per_cluster = {str(u): str(c) for u, c in zip(units, clusters) if per_unit and str(u) in per_unit}
    v = np.asarray(values, dtype=float)
    ci = bootstrap_ci(v, seed=seed) if clusters is None else cluster_bootstrap_ci(v, clusters, seed=seed)
    v = v[~np.isnan(v)]
    value = float(v.mean()) if len(v) else float("nan")
    return row(artefact, metric, value, ci, n=len(v), seed=seed, detail=detail, layer=layer,
               units=per_unit, clusters=per_cluster)
