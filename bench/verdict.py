"""Paired verdicts: is a method better than another over the same units, at a stated budget?

Read from a run's cell files (`results/<run>/cells/*.json`, the source of truth), never from the report:
every metric row that averaged over units (concepts, prompts) keeps its per-unit values there (`units`), and
every per-layer cell records the budget of the artefacts it scored (`artefacts`: K, tokens, rows, FLOPs, the
artefact it was matched to).

For a comparison A vs B on one metric:
1. per (layer, setting, unit), each method's value is averaged over its fit seeds (stochastic methods);
2. d = A - B wherever both have the unit; per cluster (setting, unit: a concept or prompt, the same at every
   layer), d is averaged over the layers in scope, so a concept measured at three layers counts once;
3. the mean of the cluster differences gets a 95% percentile-bootstrap interval over clusters and a two-sided
   sign-flip permutation p-value (the paired test: under "no difference" each cluster's sign is arbitrary);
4. p-values of one table are Holm-adjusted together; the verdict is `better` / `worse` (in the metric's own
   direction) when the adjusted p < alpha, else `no detectable difference`.

Comparisons (`plan_comparisons`): every EP percentile vs every SAE (converged, matched width, matched tokens),
EP vs k-means at EP's K (else the suite's k-means, budget flagged), every method vs the random control at its
own K (else the suite's random, flagged: best-of-K selection favours a larger K by chance alone), and, for the
causal metrics, every method vs its built-in same-norm random direction. The steering delta is compared with that
control only: each method steers at the strength it chose on train prompts, so two methods' steering deltas come
from unlike strengths (and unlike KL); the control shares its method's strength.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import pandas as pd

# metric -> +1 when higher is better, -1 when lower is better (the causal deltas: more negative = moved more)
HEADLINE_METRICS: dict[str, int] = {
    "detection.auroc": +1,
    "detection.auroc_hard": +1,
    "retrieval.precision@10": +1,
    "probing.onehot_retention": +1,
    "causal.ablate.delta_logit_diff": -1,
}
# causal metric -> the same-norm random-direction control measured on the same prompts by the same artefact
CONTROL_OF: dict[str, str] = {
    "causal.ablate.delta_logit_diff": "causal.ablate.control_delta",
    "causal.steer.delta_logit_diff": "causal.steer.control_delta",
}
# every metric a verdict is computed on -> +1 when higher is better, -1 when lower is better; looked up strictly, so
# a metric added to the table without a direction fails instead of being read the wrong way round
METRIC_DIRECTION: dict[str, int] = {**HEADLINE_METRICS, "causal.steer.delta_logit_diff": -1}
CONTROL = "same-norm random direction"
EV_FLOOR = 0.7  # a trained SAE with held-out explained variance below this is marked "undertrained" everywhere
VERDICTS = ("better", "worse", "no detectable difference")


@dataclass
class VerdictConfig:
    """How verdicts are computed."""

    alpha: float = 0.05  # family-wise error rate of one table (Holm)
    n_boot: int = 2000  # bootstrap resamples of clusters for the interval
    n_perm: int = 200_000  # sign-flip permutations for the p-value (exact enumeration when 2^n is smaller); the
    # smallest p it can show is 1/(n_perm + 1), which Holm multiplies by the number of tests: keep it well below alpha
    seed: int = 0
    min_units: int = 5  # fewer paired clusters than this: no test ("too few units")


class PairedResult(NamedTuple):
    n: int  # paired clusters
    mean_a: float
    mean_b: float
    diff: float  # mean over clusters of (A - B)
    ci_low: float
    ci_high: float
    p: float  # two-sided sign-flip permutation p-value (unadjusted)


@dataclass
class Comparison:
    """A vs B on one metric: who, why (kind), and the budgets of both (so unlike budgets are never silent)."""

    a: str
    b: str  # a method label, or CONTROL
    kind: str  # e.g. "EP vs SAE", "vs random at matched K"
    metric: str
    metric_b: str = ""  # B's metric when it differs from A's (e.g. EP's detection.auroc vs SAE-A's best latent)
    budget_a: str = ""
    budget_b: str = ""
    note: str = ""  # e.g. "K differs: 545 vs 512"
    layers: list[int] = field(default_factory=list)


@dataclass
class Verdict:
    """One row of a verdict table."""

    comparison: Comparison
    result: PairedResult | None
    p_holm: float = float("nan")
    verdict: str = "too few units"

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self.comparison), "p_holm": self.p_holm, "verdict": self.verdict}
        d.update(self.result._asdict() if self.result else {})
        return d


# ---------------------------------------------------------------------------------------------------------
# Loading


def _setting(detail: str) -> str:
    return str(detail).split(";")[0].strip()


def load_cells(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished cell record of a run (a damaged file is named, not skipped silently)."""
    out = []
    for p in sorted((Path(run_dir) / "cells").glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: unreadable cell file ({e}); delete it and rerun the suite to recompute it") from e
    return out


def unit_table(cells: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long table of per-unit values: model, layer, method, family, metric, setting, seed, unit, value."""
    recs = []
    for c in cells:
        fam = c.get("method_family", "")
        for r in c.get("rows", []):
            for unit, v in (r.get("units") or {}).items():
                recs.append((r["model"], int(r["layer"]), r["method"], fam, r["metric"], _setting(r["detail"]),
                             int(r["seed"]), unit, float(v)))
    cols = ["model", "layer", "method", "family", "metric", "setting", "seed", "unit", "value"]
    return pd.DataFrame.from_records(recs, columns=cols)


def artefact_table(cells: Iterable[dict[str, Any]], per_seed: bool = False) -> pd.DataFrame:
    """One row per (model, layer, artefact label), or per fit seed too: family, K, tokens, rows, FLOPs, match
    target, seeds, fit quality (of the first seed seen unless `per_seed`)."""
    recs: dict[tuple, dict[str, Any]] = {}
    for c in cells:
        cell = c.get("cell", {})
        for a in c.get("artefacts", []):
            key = (cell.get("model"), int(cell.get("layer", -1)), a["name"]) + ((a.get("seed"),) if per_seed else ())
            rec = recs.setdefault(key, {"model": key[0], "layer": key[1], "method": key[2], "seeds": set(), **a})
            rec["seeds"].add(a.get("seed"))
    df = pd.DataFrame(list(recs.values()))
    if len(df):
        df["seeds"] = df["seeds"].map(lambda s: sorted(x for x in s if x is not None))
    return df


# ---------------------------------------------------------------------------------------------------------
# Statistics


def paired_test(diffs: np.ndarray, mean_a: float, mean_b: float, cfg: VerdictConfig) -> PairedResult:
    """Mean paired difference with a bootstrap CI over units and a two-sided sign-flip permutation p-value."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    rng = np.random.default_rng(cfg.seed)
    boot = d[rng.integers(0, n, size=(cfg.n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    obs = abs(d.mean())
    if 2 ** n <= cfg.n_perm:  # exact: every sign pattern
        signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1) * 2 - 1
        p = float(np.mean(np.abs((signs * d).mean(axis=1)) >= obs - 1e-12))
    else:
        hits = 0
        for s in range(0, cfg.n_perm, 20_000):
            m = min(20_000, cfg.n_perm - s)
            signs = rng.integers(0, 2, size=(m, n), dtype=np.int8).astype(np.float64) * 2 - 1
            hits += int((np.abs(signs @ d) / n >= obs - 1e-12).sum())
        p = (hits + 1) / (cfg.n_perm + 1)
    return PairedResult(n, float(mean_a), float(mean_b), float(d.mean()), float(lo), float(hi), float(p))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def _seed_mean(u: pd.DataFrame) -> pd.DataFrame:
    return u.groupby(["model", "layer", "method", "metric", "setting", "unit"], as_index=False)["value"].mean()


def compare(units: pd.DataFrame, comp: Comparison, cfg: VerdictConfig, layers: list[int] | None = None
            ) -> PairedResult | None:
    """The paired test of one comparison over the layers in scope (None: too few shared units)."""
    u = units[units["layer"].isin(layers)] if layers is not None else units
    a = _seed_mean(u[(u["method"] == comp.a) & (u["metric"] == comp.metric)])
    if comp.b == CONTROL:
        b = _seed_mean(u[(u["method"] == comp.a) & (u["metric"] == CONTROL_OF[comp.metric])])
    else:
        b = _seed_mean(u[(u["method"] == comp.b) & (u["metric"] == (comp.metric_b or comp.metric))])
    keys = ["model", "layer", "setting", "unit"]
    j = a.merge(b, on=keys, suffixes=("_a", "_b"))
    if j.empty:
        return None
    j["d"] = j["value_a"] - j["value_b"]
    clusters = j.groupby(["model", "setting", "unit"])[["d", "value_a", "value_b"]].mean()
    if len(clusters) < cfg.min_units:
        return None
    return paired_test(clusters["d"].to_numpy(), clusters["value_a"].mean(), clusters["value_b"].mean(), cfg)


def decide(results: list[PairedResult | None], comps: list[Comparison], cfg: VerdictConfig) -> list[Verdict]:
    """Holm over one table, then the verdict word in each metric's direction."""
    adj = holm([r.p if r is not None else float("nan") for r in results])
    out = []
    for comp, r, p in zip(comps, results, adj):
        if r is None:
            out.append(Verdict(comp, None))
            continue
        sign = METRIC_DIRECTION[comp.metric]
        word = VERDICTS[2] if not p < cfg.alpha else (VERDICTS[0] if sign * r.diff > 0 else VERDICTS[1])
        out.append(Verdict(comp, r, p, word))
    return out


# ---------------------------------------------------------------------------------------------------------
# What to compare


def _budget(arts: pd.DataFrame, label: str) -> str:
    a = arts[arts["method"] == label]
    if a.empty:
        return ""
    Ks = sorted({int(k) for k in a["K"]})
    toks = sorted({int(t) for t in a["tokens"]})
    fmt = lambda xs: f"{xs[0]:,}" if len(xs) == 1 else f"{xs[0]:,}-{xs[-1]:,}"  # noqa: E731
    return f"K {fmt(Ks)}; {fmt(toks)} tokens"


def _size_note(arts: pd.DataFrame, a: str, b: str) -> str:
    ka = sorted({int(k) for k in arts.loc[arts["method"] == a, "K"]})
    kb = sorted({int(k) for k in arts.loc[arts["method"] == b, "K"]})
    return "" if ka == kb else f"K differs ({'/'.join(map(str, ka))} vs {'/'.join(map(str, kb))})"


def plan_comparisons(arts: pd.DataFrame, metrics: Iterable[str]) -> list[Comparison]:
    """The comparisons the issue asks for, from the artefacts a run built (see the module docstring)."""
    if arts.empty:
        return []
    fam = arts.drop_duplicates("method").set_index("method")["family"].to_dict()
    matched = {m: (t["artefact"], t["kind"]) for m, t in
               arts.drop_duplicates("method").set_index("method")["matched_to"].dropna().items()}
    labels = list(fam)
    eps = [m for m in labels if fam[m] == "ep"]
    plain = lambda f: [m for m in labels if fam[m] == f and m not in matched]  # noqa: E731
    at_k = lambda f, t: [m for m in labels if fam[m] == f and matched.get(m) == (t, "K")]  # noqa: E731
    pairs: list[tuple[str, str, str]] = []
    for e in eps:
        saes = plain("sae") + [m for m in labels if fam[m] == "sae" and matched.get(m, ("",))[0] == e]
        pairs += [(e, s, "EP vs SAE") for s in saes]
        pairs += [(e, k, "EP vs k-means at matched K") for k in at_k("kmeans", e)]
        pairs += [(e, k, "EP vs k-means") for k in ([] if at_k("kmeans", e) else plain("kmeans"))]
    for m in labels:
        if fam[m] == "random" or fam[m] == "diffmean":
            continue
        # the random control of m's size: matched to m, or to the artefact m itself copies K from
        same_k = at_k("random", m) + (at_k("random", matched[m][0]) if matched.get(m, ("", ""))[1] == "K" else [])
        pairs += [(m, r, "vs random at matched K") for r in same_k]
        pairs += [(m, r, "vs random") for r in ([] if same_k else plain("random"))]
    out = []
    for metric in metrics:
        for a, b, kind in (pairs if metric in HEADLINE_METRICS else []):  # steering: vs its control only
            out.append(Comparison(a, b, kind, metric, budget_a=_budget(arts, a), budget_b=_budget(arts, b),
                                  note=_size_note(arts, a, b)))
        if metric in CONTROL_OF:
            out += [Comparison(m, CONTROL, "vs same-norm control", metric, budget_a=_budget(arts, m),
                               budget_b="same artefact, random unit direction of equal norm")
                    for m in labels if fam[m] != "diffmean"]
    return out


def verdict_table(run_dir: Path, cfg: VerdictConfig | None = None,
                  cells: list[dict[str, Any]] | None = None) -> list[Verdict]:
    """Every planned comparison on every headline metric, pooled over the layers both sides were measured at
    (`cells`: the run's cell records when the caller has loaded them already)."""
    cfg = cfg or VerdictConfig()
    cells = load_cells(run_dir) if cells is None else cells
    units, arts = unit_table(cells), artefact_table(cells)
    if units.empty or arts.empty:
        return []
    present = set(units["metric"])
    metrics = [m for m in HEADLINE_METRICS if m in present] + [m for m in CONTROL_OF if m in present
                                                               and m not in HEADLINE_METRICS]
    comps: list[Comparison] = []
    results: list[PairedResult | None] = []
    for comp in plan_comparisons(arts, metrics):
        layers = _layers(units, comp)
        if not layers:
            continue  # the pair was never measured on this metric (e.g. causal on a few artefacts only)
        comps.append(Comparison(**{**asdict(comp), "layers": layers}))
        results.append(compare(units, comp, cfg))
    return decide(results, comps, cfg)


def _layers(units: pd.DataFrame, comp: Comparison) -> list[int]:
    """Layers at which both sides were measured (a control is measured with its artefact)."""
    m = units[units["metric"] == comp.metric]
    la = set(m.loc[m["method"] == comp.a, "layer"])
    lb = la if comp.b == CONTROL else set(m.loc[m["method"] == comp.b, "layer"])
    return sorted(int(x) for x in la & lb)


def seed_spread(cells: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Per (method, layer, metric, setting) with >= 2 fit seeds: seeds, mean, std and range across seeds."""
    recs = [(r["method"], int(r["layer"]), r["metric"], _setting(r["detail"]), int(r["seed"]), float(r["value"]))
            for c in cells for r in c.get("rows", [])]
    df = pd.DataFrame.from_records(recs, columns=["method", "layer", "metric", "setting", "seed", "value"])
    if df.empty:
        return df
    g = df.groupby(["method", "layer", "metric", "setting"])["value"]
    out = g.agg(n_seeds="nunique", mean="mean", std="std", min="min", max="max").reset_index()
    out["n_seeds"] = df.groupby(["method", "layer", "metric", "setting"])["seed"].nunique().to_numpy()
    return out[out["n_seeds"] >= 2].reset_index(drop=True)
