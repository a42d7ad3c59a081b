"""The report's opening: paired verdicts (bench.verdict), the claims scorecard (bench.claims), and the evidence
that every baseline was at its best (SAE training curves and convergence, k-means iterations, seed spread)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from bench.claims import scorecard
from bench.report.common import MISSING, fmt_num, md_table
from bench.verdict import CONTROL, EV_FLOOR, HEADLINE_METRICS, METRIC_DIRECTION, Verdict, artefact_table, seed_spread

DIRECTION = {+1: "higher is better", -1: "lower is better"}


def _interval(v: Verdict) -> str:
    r = v.result
    return MISSING if r is None else f"{r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"


def _p(x: float) -> str:
    return MISSING if x != x else (f"{x:.2g}" if x >= 0.001 else "<0.001")


def verdict_md(run_dir: Path, verdicts: list[Verdict]) -> list[str]:
    """The paired verdict table (layers pooled), grouped by metric; Holm over the whole table."""
    out = ["## Verdict", ""]
    if not verdicts:
        return out + ["(no comparison yet: the finished cells hold no pair of methods measured on the same units; "
                      "finish or resume the run)", ""]
    tested = sum(v.result is not None for v in verdicts)
    counts = pd.Series([v.verdict for v in verdicts]).value_counts().to_dict()
    out += [(f"Each row compares A with B on one metric over the **same units** (concepts; prompts for causal "
             f"metrics), paired: per unit A - B, averaged over the layers both were measured at (a concept counts "
             f"once) and over fit seeds. Δ is the mean paired difference with a 95% bootstrap interval over units; p "
             f"is a two-sided sign-flip permutation test, **Holm-adjusted over all {tested} tests of this table**. "
             f"`better` / `worse` (in the metric's direction) only when the adjusted p < 0.05; otherwise `no "
             f"detectable difference`, whatever the point estimate. The interval is per comparison (not adjusted), "
             f"so it can exclude 0 where the adjusted verdict still says `no detectable difference`. Budgets are "
             f"stated per side; `K differs` flags a comparison at unlike dictionary sizes (best-of-K feature "
             f"selection favours the larger K by chance alone). Steering deltas are compared with the same-strength random direction only: each method "
             f"steers at the strength it chose on train prompts, so two methods' deltas would come from unlike "
             f"strengths and KL. Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "."), ""]
    for metric in dict.fromkeys(v.comparison.metric for v in verdicts):
        sign = METRIC_DIRECTION[metric]
        out += [f"**{metric}** ({DIRECTION[sign]})", ""]
        body = []
        for v in (v for v in verdicts if v.comparison.metric == metric):
            c, r = v.comparison, v.result
            b = c.b if c.b != CONTROL else f"{CONTROL} (same prompts)"
            body.append([c.a, b, c.kind, ",".join(map(str, c.layers)), str(r.n) if r else "0",
                         fmt_num(r.mean_a) if r else MISSING, fmt_num(r.mean_b) if r else MISSING, _interval(v),
                         _p(v.p_holm), f"**{v.verdict}**" if v.verdict in ("better", "worse") else v.verdict,
                         "; ".join(x for x in (c.budget_a and f"A: {c.budget_a}", c.budget_b and f"B: {c.budget_b}",
                                               c.note) if x)])
        out += [md_table(["A", "B", "comparison", "layers", "n", "A", "B", "Δ = A - B [95% CI]", "p (Holm)",
                          "verdict", "budgets"], body, right=(4, 5, 6, 7, 8)), ""]
    return out


def scorecard_md(run_dir: Path, verdicts: list[Verdict], cells: list[dict[str, Any]]) -> list[str]:
    """The paper's claims, each restated, measured here and marked."""
    claims = scorecard(run_dir, verdicts, cells)
    out = ["## The paper's claims, scored", ""]
    if not claims:
        return out + ["(no rows)", ""]
    out += [("Each claim of the EP paper's published-figures list, restated in a line, measured on this run and "
             "marked `reproduced`, `not reproduced` or `not testable here`; the criterion says what we counted as "
             "reproduced. Published figures are labelled as such and are never ours."), ""]
    body = [[c.claim, c.published, c.measured, f"**{c.status}**", "; ".join(x for x in (c.criterion, c.reason) if x)]
            for c in claims]
    return out + [md_table(["claim", "published", "measured here", "status", "criterion; reason"], body), ""]


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
