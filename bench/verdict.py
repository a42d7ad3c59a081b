"""Paired verdicts: is a method better than another over the same independent units, at the same budget?

Read from a run's cell files (`results/<run>/cells/*.json`, the source of truth), never from the report: every
metric row that averaged over units (concepts, datasets, prompts) keeps its per-unit values there (`units`) and,
where units are not independent, the cluster of each unit (`clusters`: causal prompts that share one selected
direction form one cluster, relation/answer); every per-layer cell records the budget of the artefacts it scored
(`artefacts`: K, rows fitted on, tokens, FLOPs, the artefact it was matched to).

For a comparison A vs B on one metric:
1. per (model, layer, setting, unit), each method's value is averaged over its fit seeds;
2. layers where A's and B's dictionary sizes differ by more than the suite's tolerance (`VerdictPlan.k_tolerance`,
   10%) are refused, never pooled; a comparison with no matched layer is listed as refused, with its sizes;
3. d = A - B per unit; per cluster (model, data set, cluster: a concept, a dataset, a relation/answer; the same at
   every layer), d is averaged over the cluster's units and the layers in scope, so a concept counts once per model;
4. the mean of the cluster differences gets a 95% percentile-bootstrap interval over clusters and a two-sided
   sign-flip permutation p-value over clusters; per-layer, per-data-set and per-model means are kept beside it;
5. power: the smallest p a sign-flip test over n clusters can reach is 2 / 2^n (1 / (n_perm + 1) when sampled);
   where m x that is not below alpha (m = the family's tests), the test cannot pass and its verdict is
   `underpowered (n = ...)`; it is left out of the family's Holm correction (decided from n alone, never from data);
6. Holm within each family: the suite's declared primary family (EP vs each primary baseline at matched K, per
   percentile and pooled over percentiles) and the exploratory rest; `better` / `worse` (in the metric's own
   direction) when the adjusted p < alpha, else `no detectable difference`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import pandas as pd

from bench.suites import MetricPair, VerdictPlan

# metric -> +1 when higher is better, -1 when lower is better (causal deltas: more negative = moved more). Looked
# up strictly, so a metric compared without a direction fails instead of being read the wrong way round.
METRIC_DIRECTION: dict[str, int] = {
    "detection.auroc": +1,
    "detection.auroc.region_mean": +1,
    "detection.auroc_best_latent": +1,
    "detection.auroc_best_latent.region_mean": +1,
    "detection.auroc_hard": +1,
    "retrieval.precision@10": +1,
    "probing.onehot_retention": +1,
    "probing.onehot_retention_norm": +1,
    "probing.onehot_retention_top1": +1,
    "sparse_probing.acc@1": +1,
    "sparse_probing.acc@5": +1,
    "causal.ablate.delta_logit_diff": -1,
    "causal.steer.delta_logit_diff": -1,
    "causal.ablate.delta_at_kl": -1,
    "causal.steer.delta_at_kl": -1,
    "ground_truth.mcc": +1,
    "ground_truth.f1": +1,
    "ground_truth.feature_recovery": +1,
    "ground_truth.feature_f1": +1,
}
# exploratory metrics compared between every method and its matched random control (the primary ones come from the
# suite's VerdictPlan)
SECONDARY_METRICS = ("detection.auroc", "detection.auroc_best_latent", "detection.auroc_hard",
                     "retrieval.precision@10", "probing.onehot_retention_norm", "sparse_probing.acc@1",
                     "causal.ablate.delta_logit_diff", "ground_truth.feature_recovery", "ground_truth.feature_f1")
# causal metric -> the control measured on the same prompts by the same artefact: random directions of the artefact's
# K, one selected per answer by the same train-prompt rule (metrics.causal)
CONTROL_OF: dict[str, str] = {
    "causal.ablate.delta_logit_diff": "causal.ablate.control_delta",
    "causal.steer.delta_logit_diff": "causal.steer.control_delta",
    "causal.ablate.delta_at_kl": "causal.ablate.control_delta_at_kl",
    "causal.steer.delta_at_kl": "causal.steer.control_delta_at_kl",
}
HEADLINE_METRICS: dict[str, int] = {m: METRIC_DIRECTION[m] for m in SECONDARY_METRICS}  # report tables and plots
CONTROL = "selected random control"
# metrics whose units share directions (prompts of one answer): compared only when the rows record their clusters
NEEDS_CLUSTERS = tuple(m for m in METRIC_DIRECTION if m.startswith("causal."))
EV_FLOOR = 0.7  # a trained SAE with held-out explained variance below this is marked "undertrained" everywhere
BETTER, WORSE, NDD, UNDERPOWERED, TOO_FEW = ("better", "worse", "no detectable difference", "underpowered",
                                              "too few units")
VERDICTS = (BETTER, WORSE, NDD)
PRIMARY, EXPLORATORY = "primary", "exploratory"


@dataclass
class VerdictConfig:
    """How verdicts are computed (the family structure and K tolerance come from the suite's VerdictPlan)."""

    alpha: float = 0.05  # family-wise error rate of one family (Holm)
    n_boot: int = 2000  # bootstrap resamples of clusters for the interval
    n_perm: int = 200_000  # sign-flip permutations for the p-value (exact enumeration when 2^n is smaller); the
    # smallest p it can show is 1/(n_perm + 1), which Holm multiplies by the number of tests: keep it well below alpha
    seed: int = 0
    min_units: int = 5  # fewer paired clusters than this: no test ("too few units")


class PairedResult(NamedTuple):
    n: int  # paired clusters (independent units)
    mean_a: float
    mean_b: float
    diff: float  # mean over clusters of (A - B)
    ci_low: float
    ci_high: float
    p: float  # two-sided sign-flip permutation p-value over clusters (unadjusted)
    n_units: int = 0  # paired units (prompts, concepts) inside the clusters, summed over layers
    by_layer: dict[str, float] | None = None  # "L8" -> mean paired difference at that layer (unadjusted)
    by_setting: dict[str, float] | None = None  # data set -> mean paired difference
    by_model: dict[str, float] | None = None  # model -> mean paired difference


@dataclass
class Comparison:
    """A vs B on one metric: who, why (kind), the family, and both budgets (so unlike budgets are never silent).

    `pairs` makes a pooled row: per cluster, the mean over the listed (A, B) pairs of their paired differences
    (EP pooled over percentiles against the baseline matched to each percentile)."""

    a: str
    b: str  # a method label, or CONTROL
    kind: str  # e.g. "EP vs SAE at matched K"
    metric: str
    metric_b: str = ""  # B's metric when it differs (e.g. EP's region-mean AUROC vs the SAE's AUROC, same rule)
    name: str = ""  # the quantity as printed (VerdictPlan's MetricPair.name), default the metric
    setting: str = ""  # only units whose setting contains this token (e.g. "kl=0.1")
    family: str = EXPLORATORY
    budget_a: str = ""
    budget_b: str = ""
    note: str = ""  # e.g. the layers refused for unlike K
    layers: list[int] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Verdict:
    """One row of a verdict table."""

    comparison: Comparison
    result: PairedResult | None
    p_holm: float = float("nan")
    verdict: str = TOO_FEW

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self.comparison), "p_holm": self.p_holm, "verdict": self.verdict}
        d.update(self.result._asdict() if self.result else {})
        return d


class Refused(NamedTuple):
    """A comparison that was not made, and why (e.g. dictionary sizes outside the tolerance at every layer)."""

    a: str
    b: str
    metric: str
    reason: str


# ---------------------------------------------------------------------------------------------------------
# Loading


def setting_of(detail: str) -> str:
    """The data set a row was measured on (the first `;` token of its detail) plus the sweep point tokens that make
    rows of one metric distinct (`kl=`, `alpha=`, `scale=`), so those never pair with each other."""
    parts = [x.strip() for x in str(detail).split(";")]
    sweep = [x for x in parts[1:] if x.startswith(("kl=", "alpha=", "scale="))]
    return "; ".join([parts[0]] + sweep)


def load_cells(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished cell record of a run, each checked against its checksum (a damaged or unreadable file is
    named, never skipped silently)."""
    from bench.cells import cell_problem

    out = []
    for p in sorted((Path(run_dir) / "cells").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: unreadable cell file ({e}); delete it and rerun the suite to recompute it") from e
        problem = cell_problem(rec)
        if problem:
            raise ValueError(f"{p} {problem}; rerun the suite (the same command) to recompute it")
        out.append(rec)
    return out


def unit_table(cells: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long table of per-unit values: model, layer, method, family, metric, setting, seed, unit, cluster (the unit
    itself where the row recorded none), clustered (whether it did), value."""
    recs = []
    for c in cells:
        fam = c.get("method_family", "")
        for r in c.get("rows", []):
            clusters = r.get("clusters")
            setting = setting_of(r["detail"])
            for unit, v in (r.get("units") or {}).items():
                recs.append((r["model"], int(r["layer"]), r["method"], fam, r["metric"], setting, int(r["seed"]),
                             unit, (clusters or {}).get(unit, unit), clusters is not None, float(v)))
    cols = ["model", "layer", "method", "family", "metric", "setting", "seed", "unit", "cluster", "clustered",
            "value"]
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


def plan_of(run_dir: Path | None) -> VerdictPlan:
    """The suite's VerdictPlan as recorded in run.json (the default plan for runs that recorded none)."""
    cfg: dict[str, Any] = {}
    if run_dir is not None and (Path(run_dir) / "run.json").exists():
        try:
            cfg = (json.loads((Path(run_dir) / "run.json").read_text()).get("config") or {}).get("verdicts") or {}
        except (OSError, ValueError, AttributeError):
            cfg = {}
    if not cfg:
        return VerdictPlan()
    metrics = [MetricPair(**m) for m in cfg.get("primary_metrics", [])]
    return VerdictPlan(**{**cfg, "primary_metrics": metrics})


# ---------------------------------------------------------------------------------------------------------
# Statistics


def min_p(n: int, cfg: VerdictConfig) -> float:
    """The smallest two-sided p-value the sign-flip test can give over n clusters."""
    return 2.0 / 2 ** n if 2 ** n <= cfg.n_perm else 1.0 / (cfg.n_perm + 1)


def paired_test(diffs: np.ndarray, mean_a: float, mean_b: float, cfg: VerdictConfig) -> PairedResult:
    """Mean paired difference with a bootstrap CI over clusters and a two-sided sign-flip permutation p-value."""
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
    return PairedResult(n, float(mean_a), float(mean_b), float(d.mean()), float(lo), float(hi), float(p), n)


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
    keys = ["model", "layer", "method", "metric", "setting", "unit", "cluster"]
    return u.groupby(keys, as_index=False)["value"].mean()


def _sides(units: pd.DataFrame, a: str, b: str, metric: str, metric_b: str, setting: str) -> pd.DataFrame:
    """Per (model, layer, setting, unit) the seed-averaged values of both sides, joined, with d = A - B."""
    u = units[units["setting"].map(lambda x: setting in x.split("; "))] if setting else units
    va = _seed_mean(u[(u["method"] == a) & (u["metric"] == metric)])
    if b == CONTROL:
        vb = _seed_mean(u[(u["method"] == a) & (u["metric"] == CONTROL_OF[metric])])
    else:
        vb = _seed_mean(u[(u["method"] == b) & (u["metric"] == (metric_b or metric))])
    j = va.merge(vb.drop(columns=["cluster"]), on=["model", "layer", "setting", "unit"], suffixes=("_a", "_b"))
    j["d"] = j["value_a"] - j["value_b"]
    j["base"] = j["setting"].str.split(";").str[0].str.strip()
    return j


def compare(units: pd.DataFrame, comp: Comparison, cfg: VerdictConfig, layers: list[int] | None = None
            ) -> PairedResult | None:
    """The clustered paired test of one comparison over the layers in scope (None: too few shared clusters)."""
    layers = layers if layers is not None else (comp.layers or None)
    u = units[units["layer"].isin(layers)] if layers is not None else units
    pairs = comp.pairs or [(comp.a, comp.b)]
    parts = [_sides(u, a, b, comp.metric, comp.metric_b, comp.setting).assign(pair=i) for i, (a, b) in
             enumerate(pairs)]
    j = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if j.empty:
        return None
    ckey = ["model", "base", "cluster"]
    # per pair and cluster first, then over pairs: a pooled row weighs each percentile equally within a cluster
    per_pair = j.groupby(ckey + ["pair"])[["d", "value_a", "value_b"]].mean()
    clusters = per_pair.groupby(level=ckey).mean()
    if len(clusters) < cfg.min_units:
        return None
    r = paired_test(clusters["d"].to_numpy(), clusters["value_a"].mean(), clusters["value_b"].mean(), cfg)

    def breakdown(key: str, fmt: str) -> dict[str, float]:
        g = j.groupby(list(dict.fromkeys(ckey + [key])))["d"].mean().groupby(level=key).mean()
        return {fmt.format(k): float(v) for k, v in g.items()}

    if j["model"].nunique() > 1:  # layers of different models are different places: name both
        j["layer"] = j["model"] + " L" + j["layer"].astype(str)
    return r._replace(n_units=len(j), by_layer=breakdown("layer", "{}" if j["model"].nunique() > 1 else "L{}"),
                      by_setting=breakdown("base", "{}"), by_model=breakdown("model", "{}"))


def decide(results: list[PairedResult | None], comps: list[Comparison], cfg: VerdictConfig) -> list[Verdict]:
    """Per family: drop the tests that cannot pass at their n (underpowered), Holm over the rest, verdict words."""
    out = [Verdict(c, r) for c, r in zip(comps, results)]
    for family in dict.fromkeys(c.family for c in comps):
        idx = [i for i, c in enumerate(comps) if c.family == family and results[i] is not None]
        # the family size and the underpowered set depend on each other (and on n only): shrink to a fixed point
        while True:
            m = len(idx)
            weak = [i for i in idx if m * min_p(results[i].n, cfg) >= cfg.alpha]
            if not weak:
                break
            for i in weak:
                out[i].verdict = f"{UNDERPOWERED} (n = {results[i].n})"
            idx = [i for i in idx if i not in weak]
        adj = holm([results[i].p for i in idx])
        for i, p in zip(idx, adj):
            r, sign = results[i], METRIC_DIRECTION[comps[i].metric]
            out[i].p_holm = p
            out[i].verdict = NDD if not p < cfg.alpha else (BETTER if sign * r.diff > 0 else WORSE)
    return out


# ---------------------------------------------------------------------------------------------------------
# What to compare


def _fmt_range(xs: list[int]) -> str:
    xs = sorted(set(xs))
    return f"{xs[0]:,}" if len(xs) == 1 else f"{xs[0]:,}-{xs[-1]:,}"


def budget(arts: pd.DataFrame, label: str) -> str:
    """What an artefact was really fitted on: K, the rows its fit read (k-means: training rows, not the centre's
    calibration read), and the tokens behind them; ranges over layers."""
    a = arts[arts["method"] == label]
    if a.empty:
        return ""
    fit = a["fit_rows"] if "fit_rows" in a else pd.Series(np.nan, index=a.index)
    rows = fit.fillna(a["rows"]) if "rows" in a else fit
    text = f"K {_fmt_range([int(k) for k in a['K']])}"
    return text + (f"; fitted on {_fmt_range([int(r) for r in rows])} rows" if rows.notna().all() else "")


def matched_layers(arts: pd.DataFrame, a: str, b: str, tol: float) -> tuple[list[int], list[str]]:
    """Layers (per model) where B's K is within `tol` of A's, and a note per refused layer with both sizes."""
    ka = arts[arts["method"] == a].groupby(["model", "layer"])["K"].first()
    kb = arts[arts["method"] == b].groupby(["model", "layer"])["K"].first()
    ok, refused = set(), []
    for key in sorted(set(ka.index) & set(kb.index)):
        if abs(kb[key] / ka[key] - 1) <= tol + 1e-12:
            ok.add(int(key[1]))
        else:
            refused.append(f"L{key[1]}: K {int(ka[key]):,} vs {int(kb[key]):,}")
    return sorted(ok), refused


def _same_k(arts: pd.DataFrame, a: str, b: str) -> bool:
    """Whether B has exactly A's K wherever (model, layer) A is read."""
    keys = [k for k in ("model", "layer") if k in arts]
    ka, kb = (arts[arts["method"] == m].groupby(keys)["K"].first() if keys else
              pd.Series([arts.loc[arts["method"] == m, "K"].iloc[0]]) for m in (a, b))
    return set(ka.index) <= set(kb.index) and all(int(kb[i]) == int(ka[i]) for i in ka.index)


def plan_comparisons(arts: pd.DataFrame, metrics: Iterable[str], plan: VerdictPlan | None = None
                     ) -> list[Comparison]:
    """The primary family from the plan, and the exploratory comparisons (see the module docstring)."""
    plan = plan or VerdictPlan()
    if arts.empty:
        return []
    present = set(metrics)
    first = arts.drop_duplicates("method").set_index("method")
    fam = first["family"].to_dict()
    matched = {m: (t["artefact"], t["kind"]) for m, t in first["matched_to"].dropna().items()}
    labels = list(fam)
    eps = sorted((m for m in labels if fam[m] == "ep" and m not in matched), key=lambda m: _p_of_label(m))
    out: list[Comparison] = []
    # primary: EP at each p vs each primary baseline built at that EP artefact's K, and pooled over p
    for spec in plan.primary_baselines:
        targets = [(e, f"{spec}({e})") for e in eps if f"{spec}({e})" in fam]
        for mp in plan.primary_metrics:
            if mp.metric not in present:
                continue
            kind = f"EP vs {spec} at matched K"
            for e, b in targets:
                out.append(Comparison(e, b, kind, mp.metric, mp.metric_b, mp.name, mp.setting, PRIMARY))
            if plan.pool_over_p and len(targets) > 1:
                out.append(Comparison("EP (pooled over p)", f"{spec} (pooled)", kind, mp.metric, mp.metric_b,
                                      mp.name, mp.setting, PRIMARY, pairs=targets))
    # exploratory: EP vs the suite's other SAEs and k-means (refused unless K matches), every method vs the random
    # directions of its own K (selected by the same rule), causal effects vs their selected random control
    primary_b = {c.b for c in out}
    # a dose-response metric is compared with its control at the dose the plan fixed (default 0.1 nat of KL)
    dose = {x: "kl=0.1" for x in CONTROL_OF if x.endswith("_at_kl")}
    dose.update({mp.metric: mp.setting for mp in plan.primary_metrics if mp.metric in dose and mp.setting})
    for e in eps:
        for m in labels:
            if fam[m] in ("sae", "kmeans") and m not in primary_b and matched.get(m, (e, "K"))[0] == e:
                out += [Comparison(e, m, f"EP vs {fam[m]}", x, family=EXPLORATORY) for x in SECONDARY_METRICS
                        if x in present]
    for m in labels:
        if fam[m] not in ("random", "diffmean"):
            # the random directions of m's K: matched to m, or to the artefact whose K m itself copies
            size_of = [m] + ([matched[m][0]] if matched.get(m, ("", ""))[1] == "K" else [])
            rnd = [r for r in labels if fam[r] == "random" and matched.get(r, ("", ""))[0] in size_of
                   and matched[r][1] == "K"]
            # else a random-direction spec of m's own K wherever m is read (e.g. `random` k 2048 for the SAE of
            # width 2048: random@K there would redraw the same directions)
            rnd = rnd or [r for r in labels if fam[r] == "random" and r not in matched and _same_k(arts, m, r)]
            out += [Comparison(m, r, "vs random directions at its K", x) for r in rnd for x in SECONDARY_METRICS
                    if x in present and not x.startswith("causal.")]
        out += [Comparison(m, CONTROL, "vs selected random control", x, setting=dose.get(x, "")) for x in CONTROL_OF
                if x in present]
    for c in out:
        c.budget_a = "; ".join(budget(arts, a) for a, _ in c.pairs[:1]) if c.pairs else budget(arts, c.a)
        c.budget_b = ("random directions of the artefact's K, selected on the same train prompts" if c.b == CONTROL
                      else "; ".join(budget(arts, b) for _, b in c.pairs[:1]) if c.pairs else budget(arts, c.b))
    return out


def _p_of_label(label: str) -> float:
    try:
        return float(label.split("p=")[1].split(")")[0].split(",")[0])
    except (IndexError, ValueError):
        return float("inf")


class VerdictTable(NamedTuple):
    verdicts: list[Verdict]
    refused: list[Refused]


def verdict_table(run_dir: Path | None, cfg: VerdictConfig | None = None,
                  cells: list[dict[str, Any]] | None = None, plan: VerdictPlan | None = None) -> list[Verdict]:
    """Every planned comparison, pooled over the layers at which both sides were measured at matched K."""
    return verdicts_and_refusals(run_dir, cfg, cells, plan).verdicts


def verdicts_and_refusals(run_dir: Path | None, cfg: VerdictConfig | None = None,
                          cells: list[dict[str, Any]] | None = None, plan: VerdictPlan | None = None
                          ) -> VerdictTable:
    """The verdicts and the comparisons refused for unlike dictionary sizes (`cells`: the run's records when the
    caller has loaded them; `plan`: the suite's VerdictPlan, default the one in run.json)."""
    plan = plan or plan_of(run_dir)
    cfg = cfg or VerdictConfig(alpha=plan.alpha)
    cells = load_cells(run_dir) if cells is None else cells
    units, arts = unit_table(cells), artefact_table(cells)
    if units.empty or arts.empty:
        return VerdictTable([], [])
    comps, results, refused = [], [], []
    for comp in plan_comparisons(arts, set(units["metric"]), plan):
        layers, notes = _scope(units, arts, comp, plan.k_tolerance)
        if not layers:
            if notes:
                refused.append(Refused(comp.a, comp.b, comp.metric, "K outside the tolerance at every layer ("
                                       + "; ".join(notes) + ")"))
            continue  # never measured together on this metric (e.g. causal on a few artefacts only)
        sides = {m for pair in (comp.pairs or [(comp.a, comp.b)]) for m in pair if m != CONTROL}
        mine = units[(units["metric"] == comp.metric) & units["method"].isin(sides)]
        if comp.metric in NEEDS_CLUSTERS and not mine["clustered"].all():  # only the compared methods' rows
            refused.append(Refused(comp.a, comp.b, comp.metric, "its rows record no clusters (cells written before "
                                   "causal prompts were clustered by the direction used): units are not independent"))
            continue
        comp.layers = layers
        comp.note = ("layers refused for unlike K: " + "; ".join(notes)) if notes else ""
        comps.append(comp)
        results.append(compare(units, comp, cfg))
    return VerdictTable(decide(results, comps, cfg), refused)


def _scope(units: pd.DataFrame, arts: pd.DataFrame, comp: Comparison, tol: float) -> tuple[list[int], list[str]]:
    """Layers at which both sides were measured on the metric and, for two dictionaries, are at matched K."""
    pairs = comp.pairs or [(comp.a, comp.b)]
    m = units[units["metric"] == comp.metric]
    mb = units[units["metric"] == (comp.metric_b or comp.metric)]
    layers: set[int] | None = None
    notes: list[str] = []
    for a, b in pairs:
        la = set(m.loc[m["method"] == a, "layer"])
        lb = la if b == CONTROL else set(mb.loc[mb["method"] == b, "layer"])
        common = la & lb
        if b != CONTROL:
            ok, refused = matched_layers(arts, a, b, tol)
            notes += [f"{a} vs {b} {r}" if comp.pairs else r for r in refused if int(r[1:].split(":")[0]) in common]
            common &= set(ok)
        layers = common if layers is None else layers | common
    return sorted(int(x) for x in (layers or set())), notes


def seed_spread(cells: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Per (method, layer, metric, setting) with >= 2 fit seeds: seeds, mean, std and range across seeds."""
    recs = [(r["method"], int(r["layer"]), r["metric"], setting_of(r["detail"]), int(r["seed"]), float(r["value"]))
            for c in cells for r in c.get("rows", [])]
    df = pd.DataFrame.from_records(recs, columns=["method", "layer", "metric", "setting", "seed", "value"])
    if df.empty:
        return df
    g = df.groupby(["method", "layer", "metric", "setting"])["value"]
    out = g.agg(n_seeds="nunique", mean="mean", std="std", min="min", max="max").reset_index()
    out["n_seeds"] = df.groupby(["method", "layer", "metric", "setting"])["seed"].nunique().to_numpy()
    return out[out["n_seeds"] >= 2].reset_index(drop=True)
