"""The paper's claims, scored: each published claim restated in a line, measured on this run, and marked.

Status words: `reproduced`, `not reproduced`, `not testable here` (the run lacks what the claim needs: another
model, a pretrained SAE, a model that refuses), each with our numbers and the reason. The criteria are stated
in each claim's `criterion` so a reader can disagree with them. Computed from a run's cell files like
`bench.verdict`, never inside the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from bench.verdict import Comparison, Verdict, VerdictConfig, compare, load_cells, unit_table, verdict_table

REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "not reproduced", "not testable here"


class ClaimResult(NamedTuple):
    claim: str  # the paper's claim, restated in one line
    published: str  # the published figure(s), labelled
    criterion: str  # what "reproduced" means here
    measured: str  # our numbers
    status: str  # REPRODUCED / NOT_REPRODUCED / NOT_TESTABLE
    reason: str


def rows_table(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """The tidy rows of every cell (with the cell's method family), from the cell files."""
    recs = [{**{k: v for k, v in r.items() if k != "units"}, "method_family": c.get("method_family", "")}
            for c in cells for r in c.get("rows", [])]
    df = pd.DataFrame(recs)
    if not df.empty:
        df["setting"] = df["detail"].astype(str).str.split(";").str[0].str.strip()
    return df


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or not np.isfinite(v):
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.{digits}f}"


def _ep(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    return df[(df["method_family"] == "ep") & (df["metric"] == metric)]


def _p_of(df: pd.DataFrame) -> dict[str, float]:
    d = _ep(df, "build.percentile")
    return dict(zip(d["method"], d["value"]))


def _primary_sae(df: pd.DataFrame) -> str | None:
    """The converged (not budget-matched) trained or pretrained SAE: the one the paper's comparisons name."""
    saes = sorted(set(df.loc[df["method_family"] == "sae", "method"]))
    plain = [m for m in saes if "@" not in m]
    return (plain or saes or [None])[0]


def claim_saturation(df: pd.DataFrame) -> ClaimResult:
    claim = "At coarse p (8, 10) discovery saturates: regions stop appearing after a few 1e5 tokens"
    pub = "published: Gemma-2-2B L12 p8: K 292 after 313,728 tokens; p10: K 203 after 346,752"
    crit = ("every EP build at p >= 8 stopped by saturation (sat_window batches without a new region) before the store "
            "ended (fewer tokens streamed than the finest p read)")
    p = _p_of(df)
    coarse = [m for m, v in p.items() if v >= 8]
    sat = _ep(df, "build.saturated")
    sat = sat[sat["method"].isin(coarse)]
    if sat.empty:
        return ClaimResult(claim, pub, crit, "no EP build at p >= 8 in this run", NOT_TESTABLE, "add p=8 or 10")
    tokens = _ep(df, "build.tokens")
    tok = tokens.set_index(["method", "layer"])["value"]
    store = tokens.groupby("layer")["value"].max()  # the most any percentile read: the store, unless all saturated
    K = _ep(df, "build.K").set_index(["method", "layer"])["value"]
    early = {(r.method, r.layer): bool(r.value) and tok.get((r.method, r.layer)) < store[r.layer]
             for r in sat.itertuples()}
    parts = [f"{m} L{L}: K {_fmt(K.get((m, L)))} after {_fmt(tok.get((m, L)))} tokens "
             f"({'saturated' if e else 'store ended'})" for (m, L), e in early.items()]
    ok = all(early.values())
    return ClaimResult(claim, pub, crit, "; ".join(parts), REPRODUCED if ok else NOT_REPRODUCED,
                       "" if ok else "the store ran out before saturation: extract more tokens (the full suite)")


def claim_k_vs_p(df: pd.DataFrame) -> ClaimResult:
    claim = "K falls steeply as p grows (about 100x from p1 to p10)"
    pub = "published: Gemma-2-2B L12: K 20,295 (p1), 5,129 (p2), 1,193 (p4), 292 (p8), 203 (p10)"
    crit = "K strictly decreasing in p at every layer; ratio K(min p) / K(max p) printed beside the published ~100x"
    p, K = _p_of(df), _ep(df, "build.K")
    if len(set(p.values())) < 2:
        return ClaimResult(claim, pub, crit, "fewer than two EP percentiles", NOT_TESTABLE, "run several p")
    parts, mono = [], True
    for L, d in K.groupby("layer"):
        ks = sorted((p[m], v) for m, v in zip(d["method"], d["value"]) if m in p)
        mono &= all(a[1] > b[1] for a, b in zip(ks, ks[1:]))
        parts.append(f"L{L}: " + ", ".join(f"p{q:g} {_fmt(v)}" for q, v in ks) + f" (ratio {ks[0][1] / ks[-1][1]:.0f}x)")
    sat = _ep(df, "build.saturated")
    unsat = sorted({f"p{p[m]:g}" for m, v in zip(sat["method"], sat["value"]) if not v and m in p})
    reason = f"unsaturated builds ({', '.join(unsat)}) give a K bounded by the store, not the saturated K" if unsat else ""
    return ClaimResult(claim, pub, crit, "; ".join(parts), REPRODUCED if mono else NOT_REPRODUCED, reason)


def _paired_claim(units: pd.DataFrame, a: str, b: str, metric: str, metric_b: str = "") -> str:
    r = compare(units, Comparison(a, b, "claim", metric, metric_b=metric_b), VerdictConfig())
    if r is None:
        return ""
    return (f"{a} {_fmt(r.mean_a)} vs {b}{' (' + metric_b + ')' if metric_b else ''} {_fmt(r.mean_b)}: "
            f"Δ {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], p {r.p:.3g}, n {r.n}")


def claim_detection(df: pd.DataFrame, units: pd.DataFrame, verdicts: list[Verdict]) -> ClaimResult:
    claim = ("EP's per-concept region (supervised choice) detects concepts better than an SAE feature chosen the "
             "same way, and about as well as the SAE's best training-AUROC latent (SAE-A)")
    pub = "published: AxBench, Gemma-2-2B-it L20, 500 concepts: EP p1 0.881; canonical Gemma Scope 0.755; SAE-A 0.911"
    crit = ("the verdict table's row EP (finest p) vs the SAE on detection.auroc says `better` (paired over concepts, "
            "Holm-adjusted); our SAE is trained on the store, with no concept labels, so the 'canonical' feature is the "
            "train-split choice")
    sae = _primary_sae(df)
    p = _p_of(df)
    if not p or sae is None or "detection.auroc" not in set(units.get("metric", [])):
        return ClaimResult(claim, pub, crit, "no EP or SAE detection rows", NOT_TESTABLE, "run EP, an SAE, detection")
    ep = min(p, key=p.get)
    row = next((v for v in verdicts if (v.comparison.a, v.comparison.b, v.comparison.metric)
                == (ep, sae, "detection.auroc")), None)
    if row is None or row.result is None:
        return ClaimResult(claim, pub, crit, "too few concepts", NOT_TESTABLE, "needs >= 5 concepts")
    r = row.result
    vs_sel = (f"{ep} {_fmt(r.mean_a)} vs {sae} {_fmt(r.mean_b)}: Δ {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], "
              f"Holm p {row.p_holm:.3g} ({row.verdict}), n {r.n}")
    vs_a = _paired_claim(units, ep, sae, "detection.auroc", "detection.auroc_best_latent")
    status = REPRODUCED if row.verdict == "better" else NOT_REPRODUCED
    return ClaimResult(claim, pub, crit, "; ".join(x for x in (vs_sel, vs_a and f"{vs_a} (unadjusted)") if x), status,
                       "different model and concepts (SmolLM2, WordNet/BBC); the direction is tested, not the values")


def claim_correspondence(df: pd.DataFrame) -> ClaimResult:
    claim = "About 20% of EP regions have an SAE feature with F1 > 0.5 on their top-100 inputs"
    pub = "published: ~0.20, Gemma-2-2B L12 vs Gemma Scope 16k (p not stated)"
    crit = "share within 0.10 of 0.20 for some EP p (our SAE is trained on the store, not Gemma Scope)"
    d = _ep(df, "correspondence.share_f1>0.5")
    if d.empty:
        return ClaimResult(claim, pub, crit, "no correspondence rows", NOT_TESTABLE, "run correspondence with an SAE")
    parts = [f"{r.method} L{r.layer}: {_fmt(r.value)}" for r in d.sort_values(["layer", "method"]).itertuples()]
    ok = bool((d["value"].sub(0.20).abs() <= 0.10).any())
    return ClaimResult(claim, pub, crit, "; ".join(parts), REPRODUCED if ok else NOT_REPRODUCED,
                       "against our trained SAE, not Gemma Scope 16k")


def claim_probing(df: pd.DataFrame) -> ClaimResult:
    claim = "EP's one-hot (l0 = 1) readout keeps about 97% of a raw-activation probe's accuracy"
    pub = "published: ~0.97 (Gemma-2-2B; layer and p not stated)"
    crit = "mean retention >= 0.94 (within 3 points) for some EP p, its 95% CI reaching 0.97"
    d = _ep(df, "probing.onehot_retention")
    if d.empty:
        return ClaimResult(claim, pub, crit, "no probing rows", NOT_TESTABLE, "run the probing family")
    g = d.groupby("method").agg(value=("value", "mean"), hi=("ci_high", "max")).reset_index()
    parts = [f"{r.method}: {_fmt(r.value)} (CI up to {_fmt(r.hi)})" for r in g.itertuples()]
    ok = bool(((g["value"] >= 0.94) & (g["hi"] >= 0.97)).any())
    return ClaimResult(claim, pub, crit, "; ".join(parts) + " (mean over layers and concept sets)",
                       REPRODUCED if ok else NOT_REPRODUCED, "")


def claim_tokens(df: pd.DataFrame) -> ClaimResult:
    claim = "EP builds its dictionary on orders of magnitude (~1e3) fewer activation tokens than an SAE is trained on"
    pub = "published: EP p1 ~3.6e6 tokens vs ~4e9 for the Gemma Scope 16k SAE (a token ratio, not FLOPs)"
    crit = ("tokens our SAE processed until convergence (repeats over epochs counted, as training tokens are) / tokens "
            "EP streamed, per p; reproduced at >= 100x, and the SAE trained on EP's tokens only must be worse than the "
            "converged one (else the SAE did not need them)")
    sae = _primary_sae(df)
    tok = df[df["metric"] == "build.tokens"]
    if sae is None or tok.empty or not _p_of(df):
        return ClaimResult(claim, pub, crit, "no SAE or EP builds", NOT_TESTABLE, "run EP and a trained SAE")
    s_tok = tok[tok["method"] == sae]["value"].mean()
    ep = tok[tok["method_family"] == "ep"].groupby("method")["value"].mean()
    ratios = {m: s_tok / v for m, v in ep.items() if v > 0}
    ev = df[(df["metric"] == "build.heldout_explained_variance") & (df["method_family"] == "sae")]
    same = ev[ev["method"].str.contains("@tokens")].groupby("method")["value"].mean()
    conv = ev[ev["method"] == sae]["value"].mean()
    parts = [f"{sae}: {_fmt(s_tok)} tokens"] + [f"{m}: {_fmt(v)} ({ratios[m]:.1f}x)" for m, v in ep.items()]
    if len(same):
        parts.append(f"held-out EV: converged SAE {_fmt(conv)}, " +
                     ", ".join(f"{m} {_fmt(v)}" for m, v in same.items()))
    ok = max(ratios.values(), default=0) >= 100 and (len(same) == 0 or bool((same < conv).all()))
    return ClaimResult(claim, pub, crit, "; ".join(parts), REPRODUCED if ok else NOT_REPRODUCED,
                       "" if ok else "on this corpus an SAE converges on a small multiple of EP's tokens")


def claim_ood(df: pd.DataFrame) -> ClaimResult:
    claim = "The nearest-exemplar distance (no threshold) is a free out-of-distribution signal"
    pub = "published: qualitative (no number)"
    crit = "EP's ood.auroc 95% CI above 0.5 for every OOD set at some p"
    d = _ep(df, "ood.auroc")
    if d.empty:
        return ClaimResult(claim, pub, crit, "no OOD rows", NOT_TESTABLE, "run the ood family")
    parts, ok = [], False
    for m, g in d.groupby("method"):
        parts.append(f"{m}: " + ", ".join(f"{r.setting} {_fmt(r.value)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]"
                                          for r in g.groupby("setting", as_index=False).mean(numeric_only=True)
                                          .itertuples()))
        ok |= bool((g.groupby("setting")["ci_low"].min() > 0.5).all())
    return ClaimResult(claim, pub, crit, "; ".join(parts) + " (mean over layers)", REPRODUCED if ok else NOT_REPRODUCED,
                       "")


def claim_refusal(df: pd.DataFrame) -> ClaimResult:
    claim = "Ablating EP's top refusal region collapses a chat model's refusal of harmful requests"
    pub = "published: Gemma-2-2B-it L20: baseline refusal 0.98; collapses at good p; at p8 the cluster splits"
    crit = "needs a model that refuses (baseline >= 0.5); then refusal after ablation < half the baseline"
    base = df[df["metric"] == "refusal.baseline.harmful_rate"]
    if base.empty:
        return ClaimResult(claim, pub, crit, "refusal not measured in this run", NOT_TESTABLE,
                           "add the refusal family (needs a chat model)")
    base = base.drop_duplicates(["model", "metric"])
    b = float(base["value"].iloc[0])
    n = int(base["n"].iloc[0])
    if b < 0.5:
        return ClaimResult(claim, pub, crit, f"baseline refusal {b:.2f} on {n} harmful prompts", NOT_TESTABLE,
                           "the model complies with harmful requests, so there is no refusal to ablate; run the "
                           "paper suite on gemma-2-2b-it")
    after = _ep(df, "refusal.ablated_rate")
    if after.empty:
        return ClaimResult(claim, pub, crit, f"baseline {b:.2f}; no ablation rows", NOT_TESTABLE, "")
    parts = [f"{r.method} L{r.layer}: {_fmt(r.value)}" for r in after.itertuples()]
    ok = bool((after["value"] < b / 2).any())
    return ClaimResult(claim, pub, crit, f"baseline {b:.2f} (n {n}); after ablation " + "; ".join(parts),
                       REPRODUCED if ok else NOT_REPRODUCED, "")


def claim_calibration(df: pd.DataFrame) -> ClaimResult:
    claim = "Calibration at Gemma-2-2B L12 p10: theta = 0.8744, ||c|| = 88.79"
    pub = "published: theta 0.8744, ||c|| 88.79 (Gemma-2-2B, L12, p10, Pile)"
    crit = "needs gemma-2-2b at layer 12 and the Pile stream"
    d = _ep(df, "build.theta")
    models = sorted(set(d["model"]))
    if "gemma-2-2b" in models:
        t = d[(d["model"] == "gemma-2-2b") & (d["layer"] == 12)]
        p = _p_of(df)
        t = t[t["method"].map(p) == 10]
        if len(t):
            v = float(t["value"].iloc[0])
            return ClaimResult(claim, pub, crit, f"theta {v:.4f}", REPRODUCED if abs(v - 0.8744) < 0.005
                               else NOT_REPRODUCED, "")
    ours = "; ".join(f"{r.method} L{r.layer}: theta {r.value:.4f}" for r in d.itertuples() if "p=10" in r.method)
    return ClaimResult(claim, pub, crit, ours or "no EP p10 build", NOT_TESTABLE,
                       f"model-specific; this run has {', '.join(models) or 'no EP'}")


def scorecard(run_dir: Path, verdicts: list[Verdict] | None = None,
              cells: list[dict[str, Any]] | None = None) -> list[ClaimResult]:
    """Every claim of the spec's published-figures list, scored on one run (paired claims read the verdict table)."""
    cells = load_cells(run_dir) if cells is None else cells
    df, units = rows_table(cells), unit_table(cells)
    if df.empty:
        return []
    verdicts = verdict_table(run_dir, cells=cells) if verdicts is None else verdicts
    return [claim_k_vs_p(df), claim_saturation(df), claim_calibration(df), claim_detection(df, units, verdicts),
            claim_correspondence(df), claim_probing(df), claim_tokens(df), claim_ood(df), claim_refusal(df)]
