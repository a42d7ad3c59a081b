"""The report's verdict pages, rendered from bench.verdict and bench.claims (nothing is computed here): the bottom
line, the primary and exploratory verdict tables, the claims scorecard, the budgets, and the evidence that every
baseline was at its best (SAE training curves and convergence, k-means iterations, seed spread)."""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd

from bench.claims import NOT_TESTABLE, NOT_TESTABLE_N, REPRODUCED, ClaimResult
from bench.report.common import MISSING, fmt_num, md_table
from bench.suites import VerdictPlan
from bench.verdict import (
    CONTROL, EV_FLOOR, HEADLINE_METRICS, METRIC_DIRECTION, PRIMARY, UNDERPOWERED, Refused, Verdict, artefact_table,
    seed_spread,
)

DIRECTION = {+1: "higher is better", -1: "lower is better"}


def _interval(v: Verdict) -> str:
    r = v.result
    return MISSING if r is None else f"{r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"


def _p(x: float) -> str:
    return MISSING if x != x else (f"{x:.2g}" if x >= 0.001 else "<0.001")


def _word(v: Verdict) -> str:
    return f"**{v.verdict}**" if v.verdict in ("better", "worse") else v.verdict


def _breakdown(d: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {x:+.3f}" for k, x in (d or {}).items()) or MISSING


def _n(v: Verdict) -> str:
    r = v.result
    return "0" if r is None else (f"{r.n}" if r.n_units in (0, r.n) else f"{r.n} ({r.n_units} units)")


def primary_md(verdicts: list[Verdict], k_tolerance: float,
               per_model: dict[str, list[Verdict]] | None = None) -> list[str]:
    """The suite's declared primary family: EP vs each primary baseline at matched K, per p and pooled over p, with
    per-layer, per-data-set and per-model differences beside the pooled one."""
    rows = [v for v in verdicts if v.comparison.family == PRIMARY]
    out = ["## Primary comparisons: EP against baselines of the same K", ""]
    if not rows:
        return out + ["(no primary comparison in this run: the suite's VerdictPlan names baselines built at EP's K "
                      "(`match=\"K\"`); none were measured)", ""]
    tested = sum(v.result is not None and not v.verdict.startswith(UNDERPOWERED) for v in rows)
    out += [(f"Declared by the suite before any result (its `VerdictPlan`): EP at each percentile against each "
             f"baseline built at that EP artefact's K (within {k_tolerance:.0%}), on each headline quantity, and pooled "
             f"over the percentiles (per unit, the mean over p of the paired differences). Δ = EP - baseline, in the "
             f"metric's own direction noted per block; n counts **independent clusters** (a concept or data set "
             f"once per model; causal prompts that share one selected direction, relation/answer, are one cluster); "
             f"95% bootstrap interval and sign-flip p over clusters; **Holm over the {tested} primary tests**. "
             f"Per-layer, per-data-set and per-model columns are the same paired difference restricted there "
             f"(unadjusted, descriptive)."), ""]
    for name in dict.fromkeys(v.comparison.name or v.comparison.metric for v in rows):
        block = [v for v in rows if (v.comparison.name or v.comparison.metric) == name]
        c0 = block[0].comparison
        direction = DIRECTION[METRIC_DIRECTION[c0.metric]]
        metric = c0.metric + (f" vs {c0.metric_b}" if c0.metric_b else "") + (f" ({c0.setting})" if c0.setting else "")
        out += [f"**{name}** (`{metric}`, {direction})", ""]
        body = [[v.comparison.a, v.comparison.b, _n(v), fmt_num(v.result.mean_a) if v.result else MISSING,
                 fmt_num(v.result.mean_b) if v.result else MISSING, _interval(v), _p(v.p_holm), _word(v),
                 _breakdown(v.result.by_layer if v.result else None),
                 _breakdown(v.result.by_setting if v.result else None)] for v in block]
        out += [md_table(["EP", "baseline", "n", "EP", "baseline", "Δ [95% CI]", "p (Holm)", "verdict", "per layer",
                          "per data set"], body, right=(2, 3, 4, 5, 6)), ""]
    if per_model:
        body = []
        for model, vs in per_model.items():
            body += [[model, v.comparison.b, v.comparison.name or v.comparison.metric, _n(v), _interval(v),
                      _p(v.p_holm), _word(v)] for v in vs
                     if v.comparison.family == PRIMARY and v.comparison.pairs and v.result]
        out += ["**Per model** (pooled-over-p rows, each model's primary family Holm-corrected on its own). The "
                "rows above pool the models: a concept or data set counts once per model, so each model weighs "
                "by its clusters.", "",
                md_table(["model", "baseline", "quantity", "n", "Δ [95% CI]", "p (Holm)", "verdict"], body,
                         right=(3, 4, 5)), ""]
    return out


def exploratory_md(verdicts: list[Verdict], refused: list[Refused]) -> list[str]:
    """Every other comparison (Holm within its own family), and what was refused for unlike K."""
    rows = [v for v in verdicts if v.comparison.family != PRIMARY]
    tested = sum(v.result is not None and not v.verdict.startswith(UNDERPOWERED) for v in rows)
    out = ["## Exploratory comparisons", "",
           (f"Secondary, labelled exploratory: EP against the suite's other SAEs and k-means (only where K matches), "
            f"every method against random directions of its own K (feature chosen by the same train rule: best-of-K "
            f"selection favours a larger K by chance alone, so the control has the same K), and causal effects "
            f"against random directions of the artefact's K selected on the same train prompts. Holm over these "
            f"{tested} tests, separately from the primary family."), ""]
    body = [[v.comparison.a, v.comparison.b if v.comparison.b != CONTROL else f"{CONTROL} (same prompts)",
             v.comparison.kind, v.comparison.metric + (f" ({v.comparison.setting})" if v.comparison.setting else ""),
             ",".join(map(str, v.comparison.layers)), _n(v), _interval(v), _p(v.p_holm), _word(v),
             _breakdown(v.result.by_layer if v.result else None), v.comparison.note] for v in rows]
    out += [md_table(["A", "B", "comparison", "metric", "layers", "n", "Δ [95% CI]", "p (Holm)", "verdict",
                      "per layer", "note"], body, right=(5, 6, 7)), ""]
    if refused:
        out += [f"**Refused for unlike dictionary sizes** ({len(refused)}: never compared; the metric-vs-K plots "
                "show them along the size axis instead):", "",
                md_table(["A", "B", "metric", "why"], [[r.a, r.b, r.metric, r.reason] for r in refused]), ""]
    return out


def _pooled_primary(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.comparison.family == PRIMARY and v.comparison.pairs and v.result]


def _quantity(v: Verdict) -> str:
    """A comparison's headline quantity, with its direction where lower is better (Δ > 0 is then EP's loss)."""
    return (v.comparison.name or v.comparison.metric) + (
        " (lower is better)" if METRIC_DIRECTION.get(v.comparison.metric) == -1 else "")


def model_agreement(per_model: dict[str, list[Verdict]]) -> str:
    """One sentence: on how many pooled-over-p primary quantities every model reaches the same verdict word, and
    where they differ."""
    words: dict[tuple[str, str], dict[str, str]] = {}
    for model, vs in per_model.items():
        for v in _pooled_primary(vs):
            words.setdefault((v.comparison.b.split("(")[0].strip(), _quantity(v)), {})[model] = v.verdict
    both = {k: w for k, w in words.items() if len(w) == len(per_model)}
    if len(per_model) < 2 or not both:
        return ""
    differ = [(k, w) for k, w in both.items() if len(set(w.values())) > 1]
    text = (f"Per model (each model's primary family Holm-corrected on its own), the verdict words agree on "
            f"{len(both) - len(differ)} of {len(both)} pooled comparisons")
    if differ:
        shown = "; ".join(f"{q} vs {b}: " + ", ".join(f"{m} {w}" for m, w in ws.items()) for (b, q), ws in differ[:3])
        text += f" and differ on {shown}" + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
    return text + "."


def claims_tally(claims: dict[str, list[ClaimResult]]) -> str:
    """One sentence: how many of the testable claims reproduce, per model (`claims` as for scorecard_md)."""
    parts = []
    for model, cs in claims.items():
        counted = [c for c in cs if c.status != NOT_TESTABLE]
        if counted:
            n_low = sum(c.status == NOT_TESTABLE_N for c in counted)
            parts.append(f"{sum(c.status == REPRODUCED for c in counted)} of {len(counted)}"
                         + (f" on {model}" if model else "") + (f" ({n_low} not testable at this n)" if n_low else ""))
    if not parts:
        return ""
    return (f"Of the paper's claims testable on this run, {' and '.join(parts)} reproduce under the fixed criteria "
            "below.")


def bottom_line(verdicts: list[Verdict], claims: dict[str, list[ClaimResult]], plan: VerdictPlan,
                per_model: dict[str, list[Verdict]] | None = None) -> list[str]:
    """At most five sentences, generated from the primary rows, each model's own primary rows and the scorecard
    (`claims` as for scorecard_md)."""
    pooled = _pooled_primary(verdicts)
    out = ["## Bottom line", ""]
    if not pooled:
        pooled = [v for v in verdicts if v.comparison.family == PRIMARY and v.result]
    sentences = []
    for spec in plan.primary_baselines:
        rows = [v for v in pooled if v.comparison.b.startswith(spec)]
        if not rows:
            continue
        by = {w: [v for v in rows if v.verdict == w] for w in ("better", "worse")}
        pooled_word = "pooled over EP's percentiles" if rows[0].comparison.pairs else "per percentile"

        def items(vs: list[Verdict]) -> str:
            return "; ".join(f"{_quantity(v)} {v.result.diff:+.3f} [{v.result.ci_low:+.3f}, {v.result.ci_high:+.3f}]"
                             for v in vs)

        rest = len(rows) - len(by["better"]) - len(by["worse"])
        if not by["better"] and not by["worse"]:
            big = max(rows, key=lambda v: abs(v.result.diff))
            sentences.append(f"Against {spec} at the same K ({pooled_word}), EP shows no detectable difference on "
                             f"any of {len(rows)} headline quantities (largest |Δ|: "
                             f"{_quantity(big)} {big.result.diff:+.3f} "
                             f"[{big.result.ci_low:+.3f}, {big.result.ci_high:+.3f}]).")
            continue
        parts = []
        if by["better"]:
            parts.append(f"better on {items(by['better'])}")
        if by["worse"]:
            parts.append(f"worse on {items(by['worse'])}")
        sentences.append(f"Against {spec} at the same K ({pooled_word}), EP is " + ", and ".join(parts)
                         + (f", with no detectable difference on the other {rest}" if rest else "") + ".")
    agreement = model_agreement(per_model or {})
    if agreement:
        sentences.append(agreement)
    tally = claims_tally(claims)
    if tally:
        sentences.append(tally)
    if not sentences:
        sentences = ["No primary comparison has finished yet."]
    return out + [" ".join(sentences[:5]), ""]


MEASURED_MAX = 360  # characters of a claim's measurements on the one page (in full in DETAILS.md)


def _shorten(text: str, limit: int, details: str) -> str:
    """`text` cut at its last `; ` (else space) before `limit`, with a link to where it stands in full."""
    if len(text) <= limit:
        return text
    cut = text.rfind("; ", 0, limit)
    cut = cut if cut > limit // 2 else text.rfind(" ", 0, limit)
    return text[:max(cut, 1)] + f" … ([in full]({details}))"


def scorecard_md(claims: dict[str, list[ClaimResult]], title: str = "", details: str | None = None) -> list[str]:
    """The paper's claims, each restated, with its version, measured here and marked. `claims`: model -> its
    scorecard (each model scored on its own rows; a single key "" for a one-model run, printed without a model
    column). With `details` (the page that holds them in full), measurements are cut to MEASURED_MAX characters
    and criteria are left there."""
    out = [f"## The paper's claims, scored{f' ({title})' if title else ''}", ""]
    if not any(claims.values()):
        return out + ["(no rows)", ""]
    models = [m for m in claims if m]
    out += [("Each claim restated, labelled with the paper version it comes from (v2, or the revision's later figures; "
             "where they differ the revision is what the authors now claim), measured on this run at the setting "
             "fixed in its criterion, against a control, and marked `reproduced`, `not reproduced`, `not testable "
             "here` or `not testable at this n` (too few independent units for its test to pass: not a failure). "
             "Published figures are labelled and are never ours."
             + (" Each model is scored on its own rows, one line each." if models else "")
             + (f" Criteria, reasons and every measurement: [{details}]({details})." if details else "")), ""]
    keys = list(dict.fromkeys((c.version, c.claim) for cs in claims.values() for c in cs))
    by = {m: {(c.version, c.claim): c for c in cs} for m, cs in claims.items()}
    body = []
    for key in keys:
        first = True
        for m in claims:
            c = by[m].get(key)
            if c is None:
                continue
            measured = _shorten(c.measured, MEASURED_MAX, details) if details else c.measured
            line = [c.version, c.claim, c.published] if first else ["", "", ""]
            line += ([m] if models else []) + [measured, f"**{c.status}**"]
            body.append(line + ([] if details else ["; ".join(x for x in (c.criterion, c.reason) if x)]))
            first = False
    header = ["version", "claim", "published"] + (["model"] if models else []) + ["measured here", "status"]
    return out + [md_table(header + ([] if details else ["criterion; reason"]), body), ""]


def budgets_md(cells: list[dict[str, Any]]) -> list[str]:
    """What every dictionary was really fitted on, per layer: K, rows the fit read, tokens, FLOPs."""
    arts = artefact_table(cells)
    out = ["## Budgets", ""]
    if arts.empty:
        return out + ["(no artefact records)", ""]
    rows = arts.get("fit_rows", arts["rows"]).fillna(arts["rows"]) if "fit_rows" in arts else arts["rows"]
    arts = arts.assign(fit=rows)
    body = []
    for (model, method), g in arts.groupby(["model", "method"], sort=False):
        g = g.sort_values("layer")
        body.append([model, method, g["family"].iloc[0], " / ".join(f"{int(k):,}" for k in g["K"]),
                     " / ".join(fmt_num(x) for x in g["fit"]), " / ".join(fmt_num(x) for x in g["tokens"]),
                     " / ".join(fmt_num(x) for x in g["flops"]), str(len(g.iloc[0]["seeds"]) or 1)])
    layers = " / ".join(f"L{int(x)}" for x in sorted(arts["layer"].unique()))
    return out + [f"Per layer ({layers}): K, the store rows each fit read (k-means: its training rows; EP: its "
                  "discovery stream; an SAE: its training rows, repeats over epochs counted), the tokens of everything "
                  "the build read (k-means: its centre too) "
                  "and the fit's FLOPs; seeds fitted.", "",
                  md_table(["model", "dictionary", "family", "K", "fitted on rows", "tokens read", "FLOPs", "seeds"],
                           body), ""]


def baselines_md(cells: list[dict[str, Any]], plot: str | None) -> list[str]:
    """Evidence that each baseline is at its best: SAE convergence and held-out quality, k-means convergence."""
    arts = artefact_table(cells, per_seed=True)
    out = ["## Baselines at their best", ""]
    if arts.empty:
        return out + ["(no artefact records in this run)", ""]
    q = arts[arts["quality"].notna()]
    sae = q[q["family"] == "sae"]
    if len(sae):
        out += [(f"Trained SAEs run to the stated convergence rule (below); an SAE whose held-out explained variance "
                 f"is under **{EV_FLOOR}** is marked **undertrained** here and in every table (its method name ends "
                 f"in `⚠`). Same-token SAEs (`@tokens`) train only on the tokens the named EP build streamed."), ""]
        body = []
        for r in sae.sort_values(["layer", "method", "seed"], na_position="first").itertuples():
            qq = r.quality
            body.append([r.method, str(r.layer), _seed(r.seed), fmt_num(r.K), fmt_num(r.tokens),
                         fmt_num(qq.get("epochs")), _stop(qq.get("stop_reason")), fmt_num(qq.get("explained_variance")),
                         "**undertrained**" if qq.get("undertrained") else "ok"])
        out += [md_table(["SAE", "L", "seed", "width", "rows trained", "epochs", "stop", "held-out EV",
                          f"EV >= {EV_FLOOR}"], body, right=(1, 2, 3, 4, 5, 7)), ""]
        if plot:
            out += ["Training curves of every fit (held-out explained variance, L0, dead and dense latent fractions by "
                    "training rows; colour: layer, line style: seed; budget-matched SAEs' held-out EV below):", "",
                    f"![SAE training curves]({plot})", ""]
    km = q[q["family"] == "kmeans"]
    if len(km):
        body = [[r.method, str(r.layer), _seed(r.seed), fmt_num(r.K), str(r.quality.get("iterations", MISSING)),
                 str(r.quality.get("converged")), _stop(r.quality.get("stop_reason")),
                 fmt_num(r.quality.get("objective"))]
                for r in km.sort_values(["layer", "method", "seed"], na_position="first").itertuples()]
        out += ["k-means (faiss, spherical) runs Lloyd iterations to its stopping rule:", "",
                md_table(["k-means", "L", "seed", "k", "iterations", "converged", "stop", "objective"], body,
                         right=(1, 2, 3, 4, 7)), ""]
    out += ["PCA is exact (eigendecomposition of the full streamed covariance).", ""]
    return out


def _seed(seed: Any) -> str:
    return MISSING if seed is None or seed != seed else str(int(seed))


def _stop(reason: str | None) -> str:
    """A stop reason for a table cell, without the SAE rule's restated window (the full text is in the cell files)."""
    return re.sub(r" \(the last [^)]*\)", "", str(reason or MISSING))[:100]


def seeds_md(cells: list[dict[str, Any]]) -> list[str]:
    """Spread of each stochastic method's headline metrics across fit seeds."""
    sp = seed_spread(cells)
    sp = sp[sp["metric"].isin(list(HEADLINE_METRICS) + ["build.heldout_explained_variance"])] if len(sp) else sp
    out = ["## Seed spread", ""]
    if sp.empty:
        return out + ["(every method was fitted with one seed in this run)", ""]
    body = [[r.method, str(r.layer), r.metric, r.setting, str(r.n_seeds), fmt_num(r.mean), fmt_num(r.std),
             f"{fmt_num(r.min)} .. {fmt_num(r.max)}"] for r in sp.itertuples()]
    return out + ["Stochastic methods fitted with several seeds: spread of the metric across seeds (verdicts "
                  "average each unit over seeds first).", "",
                  md_table(["method", "L", "metric", "setting", "seeds", "mean", "std", "range"], body,
                           right=(1, 4, 5, 6)), ""]


GROUND_TRUTH_COLUMNS = ("f1", "mcc", "uniqueness", "explained_variance", "l0", "dead_fraction")
PUBLISHED_WIDTH, PUBLISHED_K = 4096, 25  # SynthSAEBench's published rows


def ground_truth_md(df: pd.DataFrame, published: list[Any]) -> list[str]:
    """The ground-truth table of a synthetic-model run: per dictionary, mean ± std over fit seeds of each
    `ground_truth.*` quantity, and SynthSAEBench's published rows beside them, labelled (never in their place)."""
    gt = df[df["metric"].isin([f"ground_truth.{c}" for c in GROUND_TRUTH_COLUMNS])]
    if gt.empty:
        return []
    out = ["## Ground truth: recovery of the synthetic model's true features", "",
           ("Per dictionary (rows of `metrics/ground_truth.py`: SAEs through sae-lens' own synthetic evaluation, every "
            "other artefact through our tested recomputation; EP's readout in its rows' detail), mean ± std over fit "
            "seeds. The published rows are SynthSAEBench's, on SynthSAEBench-16k itself at its budget: labelled, "
            "never ours."), ""]
    body = []
    for (model, method), g in gt.groupby(["model", "method"], sort=False):
        cells = []
        for c in GROUND_TRUTH_COLUMNS:
            v = g.loc[g["metric"] == f"ground_truth.{c}", "value"].astype(float)
            cells.append(MISSING if v.empty else fmt_num(v.mean()) + (f" ± {v.std():.3f}" if len(v) > 1 else ""))
        K = df[(df["method"] == method) & (df["metric"] == "build.K")]["value"]
        body.append([model, method, fmt_num(K.mean()) if len(K) else MISSING, str(g["seed"].nunique()), *cells])
    for e in published:
        if getattr(e, "table", "") != "synthsaebench" or not e.metric.endswith(".f1"):
            continue
        vals = {x.metric.split(".")[-1]: x.value for x in published
                if x.table == e.table and x.method == e.method}
        body.append([f"published: {e.model}", f"{e.method} (width {PUBLISHED_WIDTH}, L0 {PUBLISHED_K}, 200M samples)",
                     fmt_num(PUBLISHED_WIDTH), "—",
                     *[MISSING if vals.get(c) is None else fmt_num(vals[c]) for c in GROUND_TRUTH_COLUMNS]])
    return out + [md_table(["model", "dictionary", "K", "seeds", *GROUND_TRUTH_COLUMNS], body,
                           right=(2, 3, 4, 5, 6, 7, 8, 9)), ""] + published_gap_md(gt, df, published)


def published_gap_md(gt: pd.DataFrame, df: pd.DataFrame, published: list[Any]) -> list[str]:
    """Ours beside each published SynthSAEBench row, with the gap, for the SAEs of this run that have the published
    model, architecture, width and k (read from the rows' method config), one line per training budget."""
    pub = [e for e in published if getattr(e, "table", "") == "synthsaebench"]
    body = []
    for (model, method), g in gt.groupby(["model", "method"], sort=False):
        cfg = json.loads(g["method_config"].iloc[0] or "{}")
        if (cfg.get("width"), cfg.get("k")) != (PUBLISHED_WIDTH, PUBLISHED_K):
            continue
        epochs = df[(df["method"] == method) & (df["metric"] == "build.epochs")]["value"]
        for e in pub:
            if (e.model, e.method) != (model, cfg.get("architecture")):
                continue
            v = g.loc[g["metric"] == e.metric, "value"].astype(float)
            if v.empty:
                continue
            body.append([model, method, fmt_num(cfg.get("training_tokens")), fmt_num(epochs.mean()) if len(epochs)
                         else MISSING, e.metric.split(".")[-1], fmt_num(v.mean()), fmt_num(e.value),
                         f"{v.mean() - e.value:+.3f}"])
    if not body:
        return []
    return ["Published beside ours: each SAE of this run at the published model, architecture, width and k (training "
            "rows capped at the stated budget, passes over the store's pool in `epochs`), against the published row "
            "(200M fresh samples). gap = ours - published.", "",
            md_table(["model", "dictionary", "training rows", "epochs", "metric", "ours", "published", "gap"], body,
                     right=(2, 3, 5, 6, 7)), ""]
