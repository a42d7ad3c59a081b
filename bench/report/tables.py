"""The report's header, headline table and one table per metric family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report.common import (
    DAGGER, DETAIL_WIDTH, MAIN_METRIC, MISSING, SECONDS, TOKENS, Cell, _duration, _kv, _when, cell_of,
    first_metric, md_table, ordered_methods, setting_of,
)

def sittings_md(sittings: list[dict[str, Any]], df: pd.DataFrame) -> list[str]:
    """One line for a run resumed over several sittings: when each began, its commit and cells, and whether the
    machine or library versions changed between them (a trained SAE reproduces bit for bit only on one machine)."""
    if len(sittings) < 2:
        return []
    cells = df.drop_duplicates("cell_id") if "cell_id" in df else df.iloc[:0]
    parts = []
    for i, sit in enumerate(sittings):
        n = int((cells["sitting"] == i).sum()) if "sitting" in cells else 0
        parts.append(f"#{i + 1} {_when(sit.get('started')) if sit.get('started') else 'start unrecorded'}, "
                     f"commit `{str(sit.get('git_commit') or 'unknown')[:12]}`, {n} cells")
    unrecorded = len(cells) - int(cells["sitting"].notna().sum()) if "sitting" in cells else len(cells)
    if unrecorded:
        parts.append(f"{unrecorded} cells from before cells recorded their sitting (each records its commit)")
    same = [k for k in ("machine", "versions") if all(s.get(k) == sittings[0].get(k) for s in sittings)]
    differ = [k for k in ("machine", "versions") if k not in same]
    tail = (f"; {' and '.join(same)} the same in every sitting" if same else "") + (
        f"; {' and '.join(differ)} differ between sittings (run.json `sittings`)" if differ else "")
    return [f"- **sittings**: {len(sittings)} ({'; '.join(parts)}){tail}"]


def header_md(info: dict[str, Any], df: pd.DataFrame, run_dir: Path, details: str | None = None) -> list[str]:
    """Title, provenance and how to read the report (`details`: the page the suite grid and reading notes move to,
    keeping the report itself to one page)."""
    from bench.runner import amendment_words

    suite = info.get("suite") or (df["suite"].iloc[0] if "suite" in df else "unknown")
    commit = info.get("git_commit") or (df["git_commit"].iloc[0] if "git_commit" in df else "")
    out = [f"# epbench report: suite `{suite}`, run `{info.get('run_id', run_dir.name)}`", ""]
    evidence = (info.get("config") or {}).get("evidence")
    if evidence:
        out += [f"> **Level of evidence**: {evidence}", ""]
    if info and not info.get("finished"):
        n_cells = len(list((run_dir / "cells").glob("*.json")))
        out += [f"> **Unfinished run**: {n_cells} cells have finished so far; `epbench run --suite {suite} --run-id "
                f"{info.get('run_id', run_dir.name)}` continues it. Every table below covers those cells only.", ""]
    if str(commit).endswith("-dirty"):
        out += ["> **Not a reference result**: computed from a working tree with uncommitted changes (`-dirty`).", ""]
    if not info:
        out += [("> run.json is missing (the run was interrupted before writing it); provenance below comes from "
                "the rows."), ""]
    out += [
        f"- **date**: started {_when(info.get('started'))}, finished {_when(info.get('finished'))}",
        f"- **wall time**: {_duration(info.get('wall_seconds'))}",
        f"- **git commit**: `{str(commit)[:12] or 'unknown'}`",
        f"- **versions**: {_kv(info.get('versions'))}",
        f"- **machine**: {_kv(info.get('machine'))}",
        *sittings_md(info.get("sittings") or [], df),
        *[f"- **amendment** ({_when(a.get('at'))}, sitting #{int(a.get('sitting', 0)) + 1}): "
          f"{amendment_words(a)} changed before any of their cells had finished (run.json `amendments` holds them "
          "before and after)" for a in info.get("amendments") or []],
        ("- **reproducibility**: EP, k-means, PCA and random-direction rows reproduce on another machine (within "
         "1e-7); trained SAE rows reproduce bit for bit only on the same CPU, BLAS and code path (the machine line), "
         "elsewhere within their seed spread: TopK training amplifies last-bit GEMM differences (README, "
         "Reproducibility)"),
        (f"- **rows**: {len(df)} ({df['method'].nunique()} methods, models {', '.join(sorted(df['model'].unique()))}, "
        f"layers {', '.join(str(x) for x in sorted(df['layer'].unique()))})"),
        "",
    ]
    out += data_md(info.get("data") or {})
    if details:
        return out
    if info.get("config"):
        out += ["<details><summary>suite grid (run.json config)</summary>", "", "```json",
                json.dumps(info["config"], indent=1, sort_keys=True, default=str), "```", "", "</details>", ""]
    out += [
        "## How to read this", "",
        ("Every method was built on the same stored activations and scored by the same metric code. A cell reads "
        "`value [low, high]`: the mean over units (concepts, prompts, features, texts) with its 95% bootstrap "
        "confidence interval over those units; no interval means one unit or a plain count. A trailing `*` marks "
        "a plain mean over several settings (concept sets, OOD sets, seeds, layer pairs) without an interval; the "
        "per-family tables list each setting with its own interval. Higher is better except for causal deltas "
        "(more negative = the ablation moved the answer more; compare with the random-direction control), "
        "`recon.mse`, and costs. `random` is a control every method should beat. "
        f"Supervised methods, which fit on concept labels (DiffMean; the `supervised` column), are marked with "
        f"a dagger ({DAGGER}) in every table: compare them with unsupervised methods with that in mind. "
        "Published figures appear only in the paper tables, beside ours only where the setting matches."),
        "",
        ("**Causal effects** are read against the same intervention along a random unit direction of the same norm "
         "(`control_*`, `delta_vs_control`) and per unit of collateral damage (`effect_per_kl`: the answer's move "
         "per nat of KL on unrelated text). Steering at 1-2x the mean residual norm already costs several nats of "
         "KL and lets the random control alone flip many answers, so compare the gentle strength (0.5x, "
         "`causal.steer.curve.*`) and the per-KL figures, not raw flip rates."),
        "",
    ]
    return out


def data_md(data: dict[str, Any]) -> list[str]:
    """How much evaluation data the run used (run.json `data`): n per concept set and prompt set, truncations."""
    body, prompts = [], []
    for model, d in sorted(data.items()):
        for name, c in (d.get("concept_sets") or {}).items():
            test = c.get("min_per_class", {}).get("test", {})
            t = c.get("truncated") or {}
            body.append([model, name, str(c.get("n_concepts")), str(c.get("n_texts")),
                         ", ".join(f"{k} {v}" for k, v in test.items()),
                         f"{t.get('n_truncated', '?')} of {t.get('n_texts', '?')} ({100 * t.get('share', 0):.0f}%)"])
        prompts += [f"{name} {p.get('kept')} of {p.get('written')}" if p.get("sampled") is None else
                    f"{name} {p.get('kept')} of {p.get('sampled')} sampled (seeded) from {p.get('written')} written"
                    for name, p in (d.get("prompt_sets") or {}).items()]

    out = []
    if body:
        out += ["**Evaluation data** (test examples per class: the fewest any concept has; texts longer than the "
                "context are cut to it)", "",
                md_table(["model", "concept set", "concepts", "texts", "min test examples per class", "truncated"],
                         body, right=(2, 3)), ""]
    if prompts:
        out += [f"**Causal prompts answered correctly** (kept of written): {'; '.join(prompts)}", ""]
    return out


HEADLINE_GROUPS: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...] = (
    ("Concept retrieval and detection", (
        ("p@10", ("retrieval.precision@10",)), ("detection AUROC", ("detection.auroc",)),
        ("hard-neg AUROC", ("detection.auroc_hard",)))),
    ("Probing and causal effect", (
        ("probe retention", ("probing.onehot_retention",)),
        ("ablate Δ logit diff", ("causal.ablate.delta_logit_diff",)),
        ("control Δ", ("causal.ablate.control_delta",)))),
    ("Reconstruction, size and build cost", (
        ("loss recovered", ("recon.loss_recovered",)), ("K", ("build.K",)), ("build tokens", TOKENS),
        ("build s", SECONDS))),
)


CONCEPT_FAMILIES = ("retrieval", "detection", "probing")


def primary_concept_set(df: pd.DataFrame, info: dict[str, Any] | None = None) -> str | None:
    """The concept set the headline shows: the suite's first, else the one most rows name."""
    sets = (info or {}).get("config", {}).get("concept_sets") or []
    if sets:
        return sets[0]
    fam = df["metric"].str.split(".").str[0]
    settings = df.loc[fam.isin(CONCEPT_FAMILIES), "detail"].fillna("").map(setting_of)
    return settings.mode().iloc[0] if len(settings) else None


def on_concept_set(df: pd.DataFrame, concept_set: str | None) -> pd.DataFrame:
    """Rows with concept metrics of other concept sets dropped (so a plotted or tabled value is one measurement)."""
    if concept_set is None:
        return df
    fam = df["metric"].str.split(".").str[0]
    return df[~(fam.isin(CONCEPT_FAMILIES) & (df["detail"].fillna("").map(setting_of) != concept_set))]


def headline_md(df: pd.DataFrame, concept_set: str | None = None) -> list[str]:
    """Methods x key metrics, per model, in tables narrow enough for a terminal.

    Concept metrics are shown for one concept set (`concept_set`, default: see primary_concept_set) so each
    cell is one measured value with its CI; the family tables below have every set.
    """
    concept_set = concept_set or primary_concept_set(df)
    df = on_concept_set(df, concept_set)
    note = f" Concept metrics on the `{concept_set}` concept set." if concept_set else ""
    out = ["## Headline", "",
           ("Key metrics per model (rows: layer and method). Ablation Δ is the change of the target-minus-contrast "
           "logit difference (negative = works); control Δ is the same with a random direction." + note), ""]
    for model in sorted(df["model"].unique()):
        dm = df[df["model"] == model]
        out += [f"### {model}", ""]
        for title, cols in HEADLINE_GROUPS:
            present = [(lbl, names) for lbl, names in cols if dm["metric"].isin(names).any()]
            if not present:
                continue
            body = []
            for layer in sorted(dm["layer"].unique()):
                dl = dm[dm["layer"] == layer]
                for method, disp in ordered_methods(dl):
                    rows = dl[dl["method"] == method]
                    cells = [cell_of(first_metric(rows, names)) for _, names in present]
                    if all(c is None for c in cells):
                        continue
                    budget = rows["budget"].iloc[0] if len(rows) else ""
                    body.append([disp, str(layer), *[c.fmt(2) if c else MISSING for c in cells], budget])
            if body:
                out += [f"**{title}**", "",
                        md_table(["method", "L", *[lbl for lbl, _ in present], "budget"], body,
                                 right=range(1, len(present) + 2)), ""]
    return out


def family_md(df: pd.DataFrame, family: str, plot: str | None) -> list[str]:
    """Every row of one metric family: metric, method, layer, value [CI], n, detail."""
    d = df[df["family"] == family]
    multi_model = d["model"].nunique() > 1
    order = {m: i for i, (m, _) in enumerate(ordered_methods(d))}
    d = d.assign(_o=d["method"].map(order)).sort_values(["metric", "model", "layer", "_o", "detail"])
    body, last = [], None
    for _, r in d.iterrows():
        c = Cell(float(r["value"]), float(r["ci_low"]), float(r["ci_high"]), 1)
        detail = r["detail"] if len(r["detail"]) <= DETAIL_WIDTH else r["detail"][:DETAIL_WIDTH - 1] + "…"
        name = r["metric"] if r["metric"] != last else ""
        last = r["metric"]
        body.append([name, *([r["model"]] if multi_model else []), r["display"], str(r["layer"]), c.fmt(), str(r["n"]),
                     r["budget"], detail])
    head = ["metric", *(["model"] if multi_model else []), "method", "L", "value [95% CI]", "n", "budget", "detail"]
    nr = 1 + multi_model
    out = [f"### {family}", "", md_table(head, body, right=(nr + 1, nr + 2, nr + 3)), ""]
    if plot:
        out += [f"![{family}: {MAIN_METRIC.get(family, 'main metric')} by method and layer]({plot})", ""]
    return out
