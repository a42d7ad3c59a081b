"""The paper's claims, scored: each published claim restated in a line, measured on this run, and marked.

Every claim is scored against both versions of the paper (v2, and the revision with the reference README's later
figures: ../shared/spec/exemplar-partitioning.md), each labelled with its version; where they differ, the revision
is the claim the authors now make. Each claim has one setting fixed from the paper's own setting before looking at
results (written in its criterion) and a control: a claim passes only where EP beats what the control reaches.

Status words: `reproduced`, `not reproduced`, `not testable here` (the run lacks what the claim needs: another
model, a pretrained SAE, a model that refuses), and `not testable at this n` (the test behind it cannot reach
significance with this many independent units: never read as `not reproduced`). Computed from a run's cell files
like `bench.verdict`, never inside the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from bench.verdict import (
    UNDERPOWERED,
    Comparison,
    Verdict,
    VerdictConfig,
    artefact_table,
    compare,
    load_cells,
    min_p,
    unit_table,
    verdict_table,
)

REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "not reproduced", "not testable here"
NOT_TESTABLE_N = "not testable at this n"
V2, REVISION, BOTH = "v2", "revision", "v2 = revision"


class ClaimResult(NamedTuple):
    claim: str  # the paper's claim, restated in one line
    published: str  # the published figure(s), labelled
    criterion: str  # what "reproduced" means here, including the fixed setting and the control
    measured: str  # our numbers
    status: str  # REPRODUCED / NOT_REPRODUCED / NOT_TESTABLE / NOT_TESTABLE_N
    reason: str
    version: str = BOTH  # the paper version the claim is from


def rows_table(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """The tidy rows of every cell (with the cell's method family), from the cell files."""
    per_unit = ("units", "clusters")
    recs = [{**{k: v for k, v in r.items() if k not in per_unit}, "method_family": c.get("method_family", "")}
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
    tok = tokens.groupby(["method", "layer"])["value"].first()  # two specs may build the same label (ep, ep:p=8)
    store = tokens.groupby("layer")["value"].max()  # the most any percentile read: the store, unless all saturated
    K = _ep(df, "build.K").groupby(["method", "layer"])["value"].first()
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


def _ep_label(df: pd.DataFrame, p: float) -> str | None:
    return next((m for m, v in _p_of(df).items() if v == p), None)


def _finest(df: pd.DataFrame) -> str | None:
    p = _p_of(df)
    return min(p, key=p.get) if p else None


def _verdict(verdicts: list[Verdict], a: str, b: str, metric: str) -> Verdict | None:
    return next((v for v in verdicts if (v.comparison.a, v.comparison.b, v.comparison.metric) == (a, b, metric)),
                None)


def _row_text(v: Verdict) -> str:
    r = v.result
    return (f"{v.comparison.a} {_fmt(r.mean_a)} vs {v.comparison.b} {_fmt(r.mean_b)}: Δ {r.diff:+.3f} "
            f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}], Holm p {v.p_holm:.3g} ({v.verdict}), n {r.n}")


def _status_of(v: Verdict | None, want: str) -> str:
    if v is None or v.result is None:
        return NOT_TESTABLE
    if v.verdict.startswith(UNDERPOWERED):
        return NOT_TESTABLE_N
    return REPRODUCED if v.verdict == want else NOT_REPRODUCED


def _single_test(units: pd.DataFrame, comp: Comparison, cfg: VerdictConfig) -> tuple[str, str]:
    """One pre-declared comparison outside the verdict table (unadjusted): (measured text, status word)."""
    r = compare(units, comp, cfg)
    if r is None:
        return "too few units", NOT_TESTABLE
    text = (f"{comp.a} {_fmt(r.mean_a)} vs {comp.b}{' (' + comp.metric_b + ')' if comp.metric_b else ''} "
            f"{_fmt(r.mean_b)}: Δ {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], p {r.p:.3g} (unadjusted), "
            f"n {r.n}")
    if min_p(r.n, cfg) >= cfg.alpha:
        return text, NOT_TESTABLE_N
    return text, REPRODUCED if r.p < cfg.alpha and r.diff > 0 else NOT_REPRODUCED


def claim_detection(df: pd.DataFrame, units: pd.DataFrame, verdicts: list[Verdict],
                    arts: pd.DataFrame) -> list[ClaimResult]:
    """v2: EP p1 (exemplar, contrast rule) beats the SAE feature chosen the same way; revision: the region mean under
    SAE-A's rule beats SAE-A. Each at matched K (the primary verdict row) and, as in the paper, at an EP K below the
    SAE's width against the converged SAE."""
    sae, ep = _primary_sae(df), _finest(df)
    out = []
    setups = [
        (V2, "EP's region (exemplar, contrast rule: largest train mean(pos) - mean(neg)) detects concepts better than "
             "an SAE latent chosen by the same rule", "published v2: AxBench, Gemma-2-2B-it L20: EP p1 0.881 vs "
             "canonical Gemma Scope 0.755 (SAE-A 0.911)", "detection.auroc", ""),
        (REVISION, "EP's region mean under SAE-A's rule (best train AUROC) detects concepts better than SAE-A",
         "published revision: region mean, SAE-A rule, p1 on 100M tokens: 0.937 vs SAE-A 0.911 (exemplar, same "
         "rule: 0.828)", "detection.auroc_best_latent.region_mean", "detection.auroc_best_latent"),
    ]
    for version, claim, pub, metric, metric_b in setups:
        if ep is None or sae is None or metric not in set(units.get("metric", [])):
            out.append(ClaimResult(claim, pub, "needs EP and an SAE with detection rows", "no rows", NOT_TESTABLE,
                                   "run EP, an SAE and the detection family", version))
            continue
        crit = (f"fixed setting: EP at its finest p ({ep}, the paper's p1); (a) matched K: the primary verdict row "
                f"{ep} vs sae@K({ep}) on {metric}{' vs ' + metric_b if metric_b else ''} says `better` (Holm over "
                "the primary family), else, where an SAE was built at EP's K at some layers only, the same "
                "comparison there (one unadjusted test); control: the SAE at EP's K, same rule on both sides")
        v = _verdict(verdicts, ep, f"sae@K({ep})", metric)
        status = _status_of(v, "better")
        measured = [f"(a) {_row_text(v)}" if v is not None and v.result is not None else "(a) no SAE at EP's K"]
        other = _matched_sae(arts, ep) if v is None or v.result is None else None
        if other is not None:
            layers = ", ".join(f"L{int(x)}" for x in sorted(arts.loc[arts["method"] == other, "layer"].unique()))
            text, status = _single_test(units, Comparison(ep, other, "claim", metric, metric_b), VerdictConfig())
            measured = [f"(a) at EP's K where an SAE was built there ({layers}): {text}"]
        below = _below_k(df, arts, sae)
        if below is not None:
            text, st_b = _single_test(units, Comparison(below, sae, "claim", metric, metric_b), VerdictConfig())
            measured.append(f"(b) EP K below the SAE's width, as in the paper: {text} ({st_b})")
        crit += "; (b) reported beside it: the finest EP whose K is below the converged SAE's width at every layer"
        out.append(ClaimResult(claim, pub, crit, "; ".join(measured), status,
                               "different model and concepts (SmolLM2 / WordNet, BBC); the direction is tested",
                               version))
    return out


def _matched_sae(arts: pd.DataFrame, ep: str) -> str | None:
    """An SAE built at `ep`'s K (any matched SAE spec, e.g. one fitted at a few layers only), if the run has one."""
    if arts.empty or "matched_to" not in arts:
        return None
    hits = [r.method for r in arts.itertuples() if r.family == "sae" and isinstance(r.matched_to, dict)
            and r.matched_to.get("artefact") == ep and r.matched_to.get("kind") == "K"]
    return hits[0] if hits else None


def _below_k(df: pd.DataFrame, arts: pd.DataFrame, sae: str) -> str | None:
    """The finest EP artefact whose K is below the SAE's width at every layer (the paper's EP 5,796 vs 16k)."""
    if arts.empty:
        return None
    width = arts[arts["method"] == sae]["K"].min()
    p = _p_of(df)
    ok = [m for m in p if (arts.loc[arts["method"] == m, "K"] < width).all() and (arts["method"] == m).any()]
    return min(ok, key=p.get) if ok else None


def claim_correspondence(df: pd.DataFrame) -> ClaimResult:
    claim = "About 20% of EP regions have a strong SAE counterpart (F1 > 0.5 on their top-100 inputs)"
    pub = ("published v2: ~0.20, Gemma-2-2B L12 vs Gemma Scope 16k (p not stated); revision: ~0.20 at p10")
    d = _ep(df, "correspondence.share_f1>0.5")
    ep = _ep_label(df, 10.0)
    crit = ("fixed setting: EP p10 (the revision's), signed readout (the paper's), against the suite's converged SAE; "
            "the share, averaged over layers, within 0.10 of 0.20 AND above its chance level at every layer: the "
            "95% CI of EP's share lies above that of random directions at EP's K (same readout, same SAE)")
    if d.empty or ep is None:
        return ClaimResult(claim, pub, crit, "no correspondence rows at p10", NOT_TESTABLE,
                           "run correspondence with EP p10 and an SAE", REVISION)
    e = d[d["method"] == ep].set_index("layer")
    rnd = df[(df["metric"] == "correspondence.share_f1>0.5") & (df["method"].str.startswith("random@K"))
             & (df["method"].str.endswith(f"({ep})"))].groupby("layer")[["value", "ci_low", "ci_high"]].mean()
    km = df[(df["metric"] == "correspondence.share_f1>0.5") & (df["method"].str.startswith("kmeans@K"))
            & (df["method"].str.endswith(f"({ep})"))].groupby("layer")["value"].mean()
    parts = [f"L{L}: {ep} {_fmt(r.value)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]"
             + (f", random@K {_fmt(rnd.loc[L, 'value'])} [{_fmt(rnd.loc[L, 'ci_low'])}, {_fmt(rnd.loc[L, 'ci_high'])}]"
                if L in rnd.index else ", no random@K null")
             + (f", k-means@K {_fmt(km.loc[L])}" if L in km.index else "") for L, r in e.iterrows()]
    if rnd.empty:
        return ClaimResult(claim, pub, crit, "; ".join(parts), NOT_TESTABLE,
                           "no random-direction null at EP's K: add random@K to the correspondence family", REVISION)
    near = abs(e["value"].mean() - 0.20) <= 0.10
    above = all(L in rnd.index and r.ci_low > rnd.loc[L, "ci_high"] for L, r in e.iterrows())
    return ClaimResult(claim, pub, crit, "; ".join(parts), REPRODUCED if near and above else NOT_REPRODUCED,
                       "" if above else "random directions at EP's K reach the same share: not evidence of shared "
                       "structure", REVISION)


def claim_probing(df: pd.DataFrame) -> list[ClaimResult]:
    """v2: one-hot keeps ~97% of the raw probe; revision: 98% of the raw top-1 probe, 82% (p10) to 91% (p1) of the
    full-width raw probe. Control: the majority-class floor (normalised retention must be above 0)."""
    out = []
    checks = [
        (V2, "EP's one-hot (l0 = 1) readout keeps about 97% of a raw-activation probe's accuracy",
         "published v2: ~0.97 (Gemma-2-2B; layer and p not stated)", [(1.0, "probing.onehot_retention", 0.97)]),
        (REVISION, "EP's one-hot readout keeps 98% of the raw top-1 probe's accuracy and 82% (p10) to 91% (p1) of "
         "the full-width raw probe's", "published revision: 0.98 of raw top-1; 0.82 at p10, 0.91 at p1 of full width",
         [(1.0, "probing.onehot_retention_top1", 0.98), (10.0, "probing.onehot_retention", 0.82),
          (1.0, "probing.onehot_retention", 0.91)]),
    ]
    norm = _ep(df, "probing.onehot_retention_norm")
    for version, claim, pub, targets in checks:
        crit = ("fixed setting: " + ", ".join(f"{m} at p{p:g} within 0.03 of {t}" for p, m, t in targets) +
                " (mean over layers and concept sets); control: retention above the majority-class floor, i.e. "
                "the normalised retention (acc - floor) / (raw - floor) has its 95% CI above 0 at those p")
        parts, ok, testable = [], True, True
        for p, metric, target in targets:
            lab = _ep_label(df, p)
            d = _ep(df, metric)
            d = d[d["method"] == lab]
            if lab is None or d.empty:
                testable = False
                continue
            v = float(d["value"].mean())
            nrm = norm[norm["method"] == lab]
            floor_ok = bool(len(nrm)) and bool((nrm["ci_low"] > 0).all())
            parts.append(f"{lab} {metric} {_fmt(v)} (normalised {_fmt(nrm['value'].mean()) if len(nrm) else '—'}"
                         f"{', CI above the floor' if floor_ok else ', not above the floor everywhere'})")
            ok &= abs(v - target) <= 0.03 and floor_ok
        status = NOT_TESTABLE if not testable else (REPRODUCED if ok else NOT_REPRODUCED)
        out.append(ClaimResult(claim, pub, crit, "; ".join(parts) or "no probing rows", status,
                               "" if testable else "run the probing family (with the raw top-1 probe) at these p",
                               version))
    return out


def claim_tokens(df: pd.DataFrame) -> ClaimResult:
    claim = "EP builds its dictionary on orders of magnitude (~1e3) fewer activation tokens than an SAE is trained on"
    pub = "published v2 = revision: EP p1 ~3.6e6 tokens vs ~4e9 for the Gemma Scope 16k SAE (a token ratio)"
    crit = ("tokens our converged SAE processed (repeats over epochs counted) / tokens EP streamed, per p: >= 100x; "
            "and the SAE trained on EP's tokens only must have a lower held-out EV than the converged SAE by more "
            "than twice the converged SAE's seed spread (std over seeds), else the SAE did not need the extra tokens")
    sae = _primary_sae(df)
    tok = df[df["metric"] == "build.tokens"]
    if sae is None or tok.empty or not _p_of(df):
        return ClaimResult(claim, pub, crit, "no SAE or EP builds", NOT_TESTABLE, "run EP and a trained SAE")
    s_tok = tok[tok["method"] == sae]["value"].mean()
    ep = tok[tok["method_family"] == "ep"].groupby("method")["value"].mean()
    ratios = {m: s_tok / v for m, v in ep.items() if v > 0}
    ev = df[(df["metric"] == "build.heldout_explained_variance") & (df["method_family"] == "sae")]
    same = ev[ev["method"].str.contains("@tokens")].groupby("method")["value"].mean()
    conv = ev[ev["method"] == sae]
    spread = float(conv.groupby("layer")["value"].std().mean()) if conv["seed"].nunique() > 1 else float("nan")
    parts = [f"{sae}: {_fmt(s_tok)} tokens"] + [f"{m}: {_fmt(v)} ({ratios[m]:.1f}x)" for m, v in ep.items()]
    margin_ok = True
    if len(same):
        gap = conv["value"].mean() - same
        margin_ok = np.isfinite(spread) and bool((gap > 2 * spread).all())
        parts.append(f"held-out EV: converged SAE {_fmt(conv['value'].mean())} (seed std {_fmt(spread, 4)}), " +
                     ", ".join(f"{m} {_fmt(v)} (gap {gap[m]:+.4f})" for m, v in same.items()))
    ok = max(ratios.values(), default=0) >= 100 and margin_ok
    return ClaimResult(claim, pub, crit, "; ".join(parts), REPRODUCED if ok else NOT_REPRODUCED,
                       "" if ok else "on this corpus an SAE converges on a small multiple of EP's tokens")


def claim_ood(df: pd.DataFrame) -> ClaimResult:
    claim = "The nearest-exemplar distance (no threshold) is a free out-of-distribution signal"
    pub = "published v2 = revision: qualitative (no number)"
    crit = ("fixed setting: every EP p, mean over layers; EP's ood.auroc CI above 0.5 on every OOD set at some p, "
            "AND at that p not below the nearest-element distance of k-means and of random directions at EP's K on "
            "any set (point estimates): otherwise any dictionary's nearest-element distance gives the same signal")
    d = df[df["metric"] == "ood.auroc"]
    e = d[d["method_family"] == "ep"]
    if e.empty:
        return ClaimResult(claim, pub, crit, "no OOD rows", NOT_TESTABLE, "run the ood family")
    parts, ok = [], False
    for m, g in e.groupby("method"):
        mine = g.groupby("setting")[["value", "ci_low"]].mean()
        ctl = {f: d[d["method"].str.startswith(f"{f}@K") & d["method"].str.endswith(f"({m})")]
               .groupby("setting")["value"].mean() for f in ("kmeans", "random")}
        signal = bool((mine["ci_low"] > 0.5).all())
        beats = all(len(c) and all(mine.loc[s, "value"] >= c.get(s, float("inf")) for s in mine.index)
                    for c in ctl.values())
        ok |= signal and beats
        parts.append(f"{m}: " + ", ".join(
            f"{s} {_fmt(r.value)}" + "".join(f" / {f}@K {_fmt(c.get(s))}" for f, c in ctl.items() if s in c)
            for s, r in mine.iterrows()))
    return ClaimResult(claim, pub, crit, "; ".join(parts) + " (EP / k-means@K / random@K, mean over layers)",
                       REPRODUCED if ok else NOT_REPRODUCED, "" if ok else "k-means or random directions at EP's "
                       "K flag the same OOD sets at least as well, or the signal is not above chance")


def claim_compositional(df: pd.DataFrame) -> ClaimResult:
    claim = ("Compositional toy '{n} ({c1}) {c2}': regions recover the read colour c2 at most p, and the in-context "
             "colour c1 only at small p (each c2 region splits by c1)")
    pub = "published revision: qualitative (the reviewers' toy)"
    try:
        from metrics.compositional import score_compositional_claim
    except ImportError:
        return ClaimResult(claim, pub, "", "the compositional family is not available", NOT_TESTABLE, "", REVISION)
    r = score_compositional_claim(df)
    return ClaimResult(claim, pub, r.criterion, r.measured, r.status, "", REVISION)


def claims_not_testable() -> list[ClaimResult]:
    """The revision's claims no run of this harness can test, stated so they are not silently dropped."""
    return [
        ClaimResult("Cross-family: mean round-trip correspondence of wholly harmful Gemma and Llama regions is 19% "
                    "(base) and 44% (instruction-tuned)", "published revision: 0.19 base, 0.44 instruct",
                    "needs two model families with base and refusing chat variants", "—", NOT_TESTABLE,
                    "no refusing chat model of a second family is available offline", REVISION),
        ClaimResult("Taboo organisms: a readable secret region in 19 of 21 fine-tuned models; an occupancy-ranked "
                    "selector decodes the secret in the top 4 tokens for 13 of 21", "published revision: 19/21, "
                    "13/21", "needs the 21 taboo fine-tunes and their base model", "—", NOT_TESTABLE,
                    "the fine-tuned models are hub-only", REVISION),
    ]


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
    arts = artefact_table(cells)
    return [claim_k_vs_p(df), claim_saturation(df), claim_calibration(df), *claim_detection(df, units, verdicts, arts),
            claim_correspondence(df), *claim_probing(df), claim_tokens(df), claim_ood(df), claim_compositional(df),
            claim_refusal(df), *claims_not_testable()]
