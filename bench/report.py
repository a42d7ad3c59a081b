"""Markdown report and plots for one run: headline, per-family tables, paper tables with published figures.

Input: `results/<run-id>/rows.parquet` (or `rows.csv`), tidy MetricRow rows plus provenance columns, and
`run.json`. Output: `REPORT.md` and `plots/*.png` in the same directory. Metrics are grouped by the prefix of
their name (the family); methods by the `method_family` column. Supervised methods are marked with a dagger.
Published figures (bench/data/published.yaml) are printed beside ours only where model, layer, p and method
family match; anywhere else ours stand alone and the published figures are listed apart, never as ours.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PUBLISHED_PATH = Path(__file__).parent / "data" / "published.yaml"
DAGGER = "†"
MISSING = "—"
# metrics.common.MetricRow fields (kept here so a report does not import torch; tests check they agree).
ROW_FIELDS = ("method", "method_config", "model", "layer", "metric", "value", "ci_low", "ci_high", "n", "seed",
              "supervised", "detail")
FAMILY_ORDER = ("ep", "sae", "kmeans", "pca", "random", "diffmean")  # method families, in table order
METRIC_FAMILY_ORDER = ("build", "retrieval", "detection", "probing", "correspondence", "ood", "causal", "recon",
                       "cost", "stability")  # metric families, in report order; unknown ones follow, sorted
MAIN_METRIC = {  # the metric plotted for each family (others: the family's first metric)
    "build": "build.K", "retrieval": "retrieval.precision@10", "detection": "detection.auroc",
    "probing": "probing.onehot_retention", "correspondence": "correspondence.share_f1>0.5", "ood": "ood.auroc",
    "causal": "causal.ablate.delta_logit_diff", "recon": "recon.loss_recovered", "cost": "cost.encode_rows_per_s",
    "stability": "stability.direction.mean_cos",
}
TOKENS = ("build.tokens", "cost.build.tokens")  # build tokens under either name (runner / metrics.cost)
SECONDS = ("build.wall_seconds", "cost.build.wall_seconds")
PUBLISHED_KEYS = ("table", "model", "layer", "p", "method", "metric", "value", "approx", "source", "note")
PUBLISHED_OPTIONAL = ("setting",)  # keys an entry may add
DETAIL_WIDTH = 48  # family tables cut `detail` here (full text in rows.csv)


# --------------------------------------------------------------------------------------------------------
# Published figures
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """One published figure and the setting it was measured in (see the schema in published.yaml)."""

    table: str  # paper table id (ep_size, detection, correspondence, probing, cost, ood, refusal)
    model: str
    layer: int | None  # None: the source does not state it
    p: float | None  # EP percentile; None: not tied to one p, or not stated
    method: str | None  # method family; None: a model-level figure
    metric: str  # epbench metric name it corresponds to
    value: float | None  # None: a qualitative claim
    approx: bool  # the source says "about"
    source: str
    note: str
    setting: str | None = None  # our row's setting (concept set...) must contain this, case-insensitively

    def matches(self, model: str, layer: int, family: str, p: float | None, setting: str = "") -> bool:
        """Whether our row's setting is the one this figure was measured in (None fields match anything)."""
        return (self.model == model and (self.layer is None or self.layer == layer)
                and (self.method is None or self.method == family)
                and (self.p is None or (p is not None and math.isclose(self.p, p)))
                and (self.setting is None or self.setting.lower() in setting.lower()))

    def loose(self, p: float | None) -> str:
        """Which parts of our setting the source leaves open: '' when the match is exact."""
        open_ = (["any L"] if self.layer is None else []) + (["any p"] if self.p is None and p is not None else [])
        return ", ".join(open_)


def load_published(path: Path = PUBLISHED_PATH) -> list[Published]:
    """The published figures of bench/data/published.yaml, validated."""
    import yaml

    if not Path(path).exists():
        raise FileNotFoundError(f"published figures not found at {path}; "
                                "reinstall epbench (bench/data is package data)")
    doc = yaml.safe_load(Path(path).read_text())
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a mapping with an `entries` list")
    out = []
    for i, e in enumerate(entries):
        keys = set(e) if isinstance(e, dict) else set()
        if not set(PUBLISHED_KEYS) <= keys <= set(PUBLISHED_KEYS) | set(PUBLISHED_OPTIONAL):
            raise ValueError(f"{path}: entry {i} has keys {sorted(keys)}; every entry needs {list(PUBLISHED_KEYS)} "
                             f"and may add {list(PUBLISHED_OPTIONAL)}")
        out.append(Published(
            table=str(e["table"]), model=normalise_model(e["model"]),
            layer=None if e["layer"] is None else int(e["layer"]), p=None if e["p"] is None else float(e["p"]),
            method=None if e["method"] is None else str(e["method"]), metric=str(e["metric"]),
            value=None if e["value"] is None else float(e["value"]), approx=bool(e["approx"]),
            source=str(e["source"]), note=str(e["note"]),
            setting=None if e.get("setting") is None else str(e["setting"])))
    return out


# --------------------------------------------------------------------------------------------------------
# Loading a run
# --------------------------------------------------------------------------------------------------------
def normalise_model(name: Any) -> str:
    """Model names compare without the hub organisation and case (google/gemma-2-2b == gemma-2-2b)."""
    return str(name).strip().split("/")[-1].lower()


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else False


def _ep_percentile(rows: pd.DataFrame) -> float:
    """p of one EP artefact: its build.percentile row, else its config's single percentile, else its label."""
    pr = rows.loc[rows["metric"] == "build.percentile", "value"]
    if len(pr):
        return float(pr.iloc[0])
    try:
        cfg = json.loads(rows["method_config"].iloc[0])
        ps = cfg.get("percentiles", cfg.get("p"))
        ps = ps if isinstance(ps, list) else [ps]
        if len(ps) == 1 and ps[0] is not None:
            return float(ps[0])
    except (TypeError, ValueError, AttributeError):
        pass
    m = re.search(r"p=([0-9.]+)", str(rows["method"].iloc[0]))
    return float(m.group(1)) if m else float("nan")


def load_rows(run_dir: Path) -> pd.DataFrame:
    """The run's rows, typed, with `family` (metric prefix), `model_key` and `p` (EP only) columns added."""
    run_dir = Path(run_dir)
    pq, csv = run_dir / "rows.parquet", run_dir / "rows.csv"
    if pq.exists():
        df = pd.read_parquet(pq)
    elif csv.exists():
        df = pd.read_csv(csv, keep_default_na=False, na_values=["nan", "NaN", ""])
    else:
        raise FileNotFoundError(f"{run_dir}: no rows.parquet or rows.csv; "
                                "pass a run directory written by `epbench run`")
    missing = [c for c in ROW_FIELDS if c not in df.columns]
    if missing:
        raise ValueError(f"{run_dir}: rows lack columns {missing}; they must hold metrics.common.MetricRow fields")
    if df.empty:
        raise ValueError(f"{run_dir}: the run has no result rows yet; run or resume it before reporting")
    df = df.copy()
    if "method_family" not in df.columns:  # older rows: the label's prefix stands in for the family
        df["method_family"] = df["method"].astype(str).str.split(":").str[0]
    df["method_family"] = df["method_family"].fillna("").astype(str)
    df["detail"] = df["detail"].fillna("").astype(str)
    df["method_config"] = df["method_config"].fillna("").astype(str)
    df["supervised"] = df["supervised"].map(_as_bool)
    for c in ("value", "ci_low", "ci_high"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["layer"] = pd.to_numeric(df["layer"], errors="coerce").fillna(-1).astype(int)
    df["n"] = pd.to_numeric(df["n"], errors="coerce").fillna(0).astype(int)
    df["family"] = df["metric"].astype(str).str.split(".").str[0]
    df["model_key"] = df["model"].map(normalise_model)
    df["p"] = float("nan")
    for idx in df[df["method_family"] == "ep"].groupby(["model_key", "layer", "method"]).groups.values():
        df.loc[idx, "p"] = _ep_percentile(df.loc[idx])
    sup = df.groupby("method")["supervised"].any()
    df["display"] = [f"{m}{DAGGER}" if sup[m] else str(m) for m in df["method"]]
    return df


def load_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json, or {} when the run has not written it (an interrupted run)."""
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------
def fmt_num(v: float | None, digits: int = 3) -> str:
    """A number for a table: thousands separators for large counts, `digits` decimals below 10."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    v = float(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    a = abs(v)
    if a >= 1e9 or (0 < a < 10 ** -digits):
        return f"{v:.2e}"
    if a >= 10 and v == round(v):
        return f"{round(v):,}"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


@dataclass
class Cell:
    """One table cell: the value of a (method, layer, metric), its CI, and how many rows it pools."""

    value: float
    lo: float
    hi: float
    k: int  # rows pooled; > 1 means a plain mean over settings (concept sets, seeds...) without a CI

    def fmt(self, digits: int = 3) -> str:
        has_ci = self.k == 1 and np.isfinite(self.lo) and np.isfinite(self.hi)
        if not has_ci and np.isfinite(self.value) and float(self.value).is_integer():
            s = f"{int(self.value):,}" if abs(self.value) < 1e9 else fmt_num(self.value, digits)  # a count
        else:
            s = fmt_num(self.value, digits)
        if has_ci:
            s += f" [{fmt_num(self.lo, digits)}, {fmt_num(self.hi, digits)}]"
        return s + ("*" if self.k > 1 else "")


def cell_of(rows: pd.DataFrame) -> Cell | None:
    """The cell of the rows of one (method, layer, metric); None when there are none."""
    if rows.empty:
        return None
    if len(rows) == 1:
        r = rows.iloc[0]
        return Cell(float(r["value"]), float(r["ci_low"]), float(r["ci_high"]), 1)
    return Cell(float(np.nanmean(rows["value"])) if rows["value"].notna().any() else float("nan"),
                float("nan"), float("nan"), len(rows))


def first_metric(rows: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Rows of the first of `names` present in `rows` (metric aliases)."""
    for name in names:
        sel = rows[rows["metric"] == name]
        if len(sel):
            return sel
    return rows.iloc[0:0]


def md_table(header: Sequence[str], body: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    """An aligned GitHub pipe table; columns in `right` are right-aligned."""
    right = set(right)
    cells = [[str(c).replace("|", "\\|") for c in r] for r in [list(header), *body]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def method_sort_key(family: str, p: float, label: str) -> tuple:
    """Methods in table order: EP by p first, then SAEs, baselines, supervised DiffMean, plugins."""
    fam = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    return fam, (p if np.isfinite(p) else math.inf), label


def ordered_methods(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, display) pairs in table order."""
    first = df.drop_duplicates("method").set_index("method")
    keys = {m: method_sort_key(r["method_family"], float(r["p"]), m) for m, r in first.iterrows()}
    return [(m, first.loc[m, "display"]) for m in sorted(keys, key=keys.get)]


def families_in(df: pd.DataFrame) -> list[str]:
    """Metric families present, known ones in report order, unknown ones after, sorted."""
    present = set(df["family"])
    return [f for f in METRIC_FAMILY_ORDER if f in present] + sorted(present - set(METRIC_FAMILY_ORDER))


def setting_of(detail: str) -> str:
    """The setting a detail names first (concept set, OOD set, layer pair): its first `;` segment."""
    return detail.split(";")[0].strip()


def _safe(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_") or "x"


# --------------------------------------------------------------------------------------------------------
# Header, headline and family tables
# --------------------------------------------------------------------------------------------------------
def _when(v: Any) -> str:
    if v is None or v == "":
        return "unknown"
    if isinstance(v, (int, float)):
        return dt.datetime.fromtimestamp(float(v), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(v)


def _duration(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "unknown"
    h, rem = divmod(round(s), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s" if h else f"{rem // 60}m {rem % 60:02d}s"


def _kv(d: Any) -> str:
    if isinstance(d, dict):
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "unknown"
    return str(d) if d else "unknown"


def header_md(info: dict[str, Any], df: pd.DataFrame, run_dir: Path) -> list[str]:
    """Title, provenance and how to read the report."""
    suite = info.get("suite") or (df["suite"].iloc[0] if "suite" in df else "unknown")
    commit = info.get("git_commit") or (df["git_commit"].iloc[0] if "git_commit" in df else "")
    out = [f"# epbench report: suite `{suite}`, run `{info.get('run_id', run_dir.name)}`", ""]
    if not info:
        out += [("> run.json is missing (the run was interrupted before writing it); provenance below comes from "
                "the rows."), ""]
    out += [
        f"- **date**: started {_when(info.get('started'))}, finished {_when(info.get('finished'))}",
        f"- **wall time**: {_duration(info.get('wall_seconds'))}",
        f"- **git commit**: `{str(commit)[:12] or 'unknown'}`",
        f"- **versions**: {_kv(info.get('versions'))}",
        f"- **machine**: {_kv(info.get('machine'))}",
        (f"- **rows**: {len(df)} ({df['method'].nunique()} methods, models {', '.join(sorted(df['model'].unique()))}, "
        f"layers {', '.join(str(x) for x in sorted(df['layer'].unique()))})"),
        "",
    ]
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
    ]
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
                    body.append([disp, str(layer), *[c.fmt(2) if c else MISSING for c in cells]])
            if body:
                out += [f"**{title}**", "",
                        md_table(["method", "L", *[lbl for lbl, _ in present]], body, right=range(1, len(present) + 2)),
                        ""]
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
                     detail])
    head = ["metric", *(["model"] if multi_model else []), "method", "L", "value [95% CI]", "n", "detail"]
    nr = 1 + multi_model
    out = [f"### {family}", "", md_table(head, body, right=(nr + 1, nr + 2, nr + 3)), ""]
    if plot:
        out += [f"![{family}: {MAIN_METRIC.get(family, 'main metric')} by method and layer]({plot})", ""]
    return out


# --------------------------------------------------------------------------------------------------------
# Paper tables
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperTable:
    """A paper comparison: which of our metrics it shows, and how our rows are split."""

    id: str  # matches Published.table
    title: str
    quantities: tuple[tuple[str, tuple[str, ...]], ...]  # (column label, metric names: first present wins)
    families: tuple[str, ...] | None = None  # our method families it shows; None: all
    by_setting: bool = False  # one row per setting (first `;` segment of detail: concept set, OOD set)
    intro: str = ""


PAPER_TABLES = (
    PaperTable("ep_size", "Dictionary size K and tokens streamed vs p",
               (("K", ("build.K",)), ("tokens", TOKENS), ("theta", ("build.theta",)),
                ("‖c‖", ("build.center_norm",))),
               families=("ep",),
               intro="Published builds: Pile, context 128, batches of 128 prompts, seed 0, sat_window 1; K and tokens "
                     "depend on the corpus and batch geometry, so check this run's config before comparing."),
    PaperTable("detection", "AxBench latent concept detection (mean AUROC)",
               (("AUROC", ("detection.auroc",)), ("best-latent AUROC", ("detection.auroc_best_latent",))),
               by_setting=True,
               intro="Published: 500 AxBench concepts on gemma-2-2b-it L20; EP p1 uses the region chosen on train "
                     "(supervised choice), SAE the Gemma Scope feature labelled with the concept, SAE-A the latent "
                     "with the best train AUROC. Our SAE `AUROC` uses the same train-split selection rule as EP, not a "
                     "concept label; `best-latent AUROC` is the SAE-A protocol. The `set` column names our concept "
                     "set: AxBench figures sit beside our AxBench rows only."),
    PaperTable("correspondence", "EP-SAE feature correspondence (share of features with best F1 > 0.5)",
               (("share F1>0.5", ("correspondence.share_f1>0.5",)), ("mean best F1", ("correspondence.mean_best_f1",)),
                ("reverse share", ("correspondence.reverse_share_f1>0.5",))),
               by_setting=True, intro="Published: EP regions vs Gemma Scope 16k features at gemma-2-2b L12."),
    PaperTable("probing", "One-hot probe retention (binary-readout probe accuracy / raw-activation probe accuracy)",
               (("retention", ("probing.onehot_retention",)), ("acc one-hot", ("probing.acc_readout",)),
                ("acc raw", ("probing.acc_raw",))), by_setting=True),
    PaperTable("cost", "Compute: SAE training tokens over EP build tokens",
               (("token ratio", ("cost.token_ratio_sae_over_ep",)), ("FLOP ratio", ("cost.flop_ratio_sae_over_ep",)),
                ("EP tokens", TOKENS), ("SAE training tokens", ("cost.sae_training_tokens",))), families=("ep",),
               intro="A token ratio, not a FLOP count; our FLOP ratio estimates SAE FLOPs unless they were published "
                     "(see the cost rows' detail)."),
    PaperTable("ood", "Out-of-distribution signal (distance to the nearest dictionary element)",
               (("OOD AUROC", ("ood.auroc",)), ("within-theta rate", ("ood.within_theta_rate",))), by_setting=True),
    PaperTable("refusal", "Refusal (gemma-2-2b-it L20)",
               (("baseline refusal", ("causal.refusal.baseline_rate",)),
                ("top-region ablation", ("causal.refusal.ablate_top_region",)))),
)


def fmt_published(e: Published, loose: str = "") -> str:
    """A published value as the source gives it: `~` when approximate, `qualitative` when not a number."""
    if e.value is None:
        s = "qualitative"
    else:
        v = e.value
        s = f"{v:.1e}".replace("e+0", "e") if abs(v) >= 1e6 and e.approx else (
            f"{int(v):,}" if v == int(v) and abs(v) >= 10 else f"{v:g}")
        s = ("~" if e.approx else "") + s
    return s + (f" ({loose})" if loose else "")


def _who(e: Published) -> str:
    """The method family a published figure describes (`model` for model-level figures)."""
    return e.method or "model"


def _fmt_opt(v: float | None) -> str:
    return MISSING if v is None else (f"{int(v)}" if float(v).is_integer() else f"{v:g}")


def paper_table_md(df: pd.DataFrame, spec: PaperTable, published: list[Published]) -> list[str]:
    """One paper table: matched settings (ours | published), ours alone, and published figures not run here."""
    pubs = [e for e in published if e.table == spec.id]
    names = {m for _, ms in spec.quantities for m in ms}
    d = df[df["metric"].isin(names)]
    if spec.families is not None:
        d = d[d["method_family"].isin(spec.families)]
    d = d.assign(setting=d["detail"].map(setting_of) if spec.by_setting else "")
    out = [f"### {spec.title}", ""] + ([spec.intro, ""] if spec.intro else [])
    groups = []  # (model, layer, method, setting, rows, matched published)
    for (model, layer, method, setting), rows in d.groupby(["model", "layer", "method", "setting"], sort=False):
        fam, p = rows["method_family"].iloc[0], float(rows["p"].iloc[0])
        p_ = p if np.isfinite(p) else None
        # qualitative claims are listed with the published figures, never set beside a number of ours
        matched = [e for e in pubs
                   if e.value is not None and e.matches(rows["model_key"].iloc[0], int(layer), fam, p_, setting)]
        groups.append((model, int(layer), method, setting, rows, matched, p_))
    groups.sort(key=lambda g: (g[0], g[1], method_sort_key(g[4]["method_family"].iloc[0],
                                                            g[6] if g[6] is not None else math.nan, g[2]), g[3]))
    used = {id(e) for g in groups for e in g[5]}
    set_col = ["set"] if spec.by_setting else []

    def ours_cells(rows: pd.DataFrame, qs) -> list[str]:
        return [(c.fmt() if (c := cell_of(first_metric(rows, ms))) else MISSING) for _, ms in qs]

    matched = [g for g in groups if g[5]]
    if matched:
        body = []
        for model, layer, method, setting, rows, es, p in matched:
            for lbl, ms in spec.quantities:
                c = cell_of(first_metric(rows, ms))
                pe = [e for e in es if e.metric in ms]
                if c is None and not pe:
                    continue
                body.append([model, str(layer), rows["display"].iloc[0], *([setting] if spec.by_setting else []), lbl,
                             c.fmt() if c else MISSING, fmt_published(pe[0], pe[0].loose(p)) if pe else MISSING])
        head = ["model", "L", "method", *set_col, "quantity", "ours", "published"]
        out += ["**ours beside published (same model, layer, p, method family and named concept set)**", "",
                md_table(head, body, right=(1, len(head) - 2, len(head) - 1)), ""]
        label = {m: lbl for lbl, ms in spec.quantities for m in ms}
        notes = sorted({(label.get(e.metric, e.metric), _who(e), e.note) for g in matched for e in g[5]})
        sources = sorted({e.source for g in matched for e in g[5]})
        out += [f"- published {q} ({w}): {n}" for q, w, n in notes] + [f"- published source: {'; '.join(sources)}", ""]
    for model in sorted({g[0] for g in groups if not g[5]}):
        alone = [g for g in groups if not g[5] and g[0] == model]
        qs = [(lbl, ms) for lbl, ms in spec.quantities if any(g[4]["metric"].isin(ms).any() for g in alone)]
        body = [[str(layer), rows["display"].iloc[0], *([setting] if spec.by_setting else []), *ours_cells(rows, qs)]
                for _, layer, _, setting, rows, _, _ in alone]
        head = ["L", "method", *set_col, *[f"{lbl} (ours)" for lbl, _ in qs]]
        out += [f"**ours ({model}, no published counterpart)**", "",
                md_table(head, body, right=[0, *range(2 + len(set_col), len(head))]), ""]
    rest = [e for e in pubs if id(e) not in used]
    if rest:
        label = {m: lbl for lbl, ms in spec.quantities for m in ms}
        body = [[e.model, _fmt_opt(e.layer), _fmt_opt(e.p), e.method or "(model)", label.get(e.metric, e.metric),
                 fmt_published(e)] for e in rest]
        sources = sorted({e.source for e in rest})
        out += [(f"**published ({'; '.join(sources)}), not run here**: listed for reference, not our results "
                f"({MISSING} = not stated in the source)"), "",
                md_table(["model", "L", "p", "method", "quantity", "published"], body, right=(1, 2, 5)), ""]
        notes = sorted({(label.get(e.metric, e.metric), _who(e), e.note) for e in rest})
        out += [f"- {q} ({w}): {n}" for q, w, n in notes] + [""]
    if not groups and not pubs:
        out += ["(no rows)", ""]
    return out


def paper_md(df: pd.DataFrame, published: list[Published], plots: dict[str, str]) -> list[str]:
    """All paper tables, each after a note on how published figures are matched."""
    out = ["## Paper tables", "",
           ("Published figures come from bench/data/published.yaml. They sit beside ours only where model, layer, "
           "p (EP), method family and, where the source names one, the concept set match the published setting; "
           "`(any L)` / `(any p)` after a published value "
           "means the source does not state that part of its setting, so only the stated parts were matched. "
           "Everywhere else our values stand alone and the published figures are listed separately: a published "
           "number never stands in for ours."), ""]
    for spec in PAPER_TABLES:
        out += paper_table_md(df, spec, published)
        if spec.id == "ep_size" and "k_vs_p" in plots:
            out += [f"![EP dictionary size K vs p]({plots['k_vs_p']})", ""]
        if spec.id == "correspondence" and "correspondence" in plots:
            out += [f"![EP-SAE correspondence]({plots['correspondence']})", ""]
    return out


# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------
def _plt():
    """pyplot on the Agg backend with the seaborn theme (imported lazily: slow, and only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def _cells_by(d: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One pooled Cell per group of `keys` as columns value / lo / hi / k."""
    recs = []
    for k, rows in d.groupby(keys, sort=False):
        c = cell_of(rows)
        recs.append({**dict(zip(keys, k if isinstance(k, tuple) else (k,))), "value": c.value, "lo": c.lo,
                     "hi": c.hi, "k": c.k})
    return pd.DataFrame(recs)


def plot_metric_bars(df: pd.DataFrame, metric: str, path: Path) -> None:
    """Bars of one metric by method (x) and layer (hue), a panel per model, with CI error bars."""
    plt, sns = _plt()
    d = df[df["metric"] == metric]
    models = sorted(d["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.0, 1.1 * d["method"].nunique() + 2.5) * len(models), 3.8),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        dm = d[d["model"] == model]
        methods = ordered_methods(dm)
        layers = sorted(dm["layer"].unique())
        cells = _cells_by(dm, ["method", "layer"]).set_index(["method", "layer"])
        width = 0.8 / len(layers)
        colors = sns.color_palette("deep", len(layers))
        for j, layer in enumerate(layers):
            xs, ys = [], []
            for i, (m, _) in enumerate(methods):
                if (m, layer) not in cells.index:
                    continue
                c = cells.loc[(m, layer)]
                if not np.isfinite(c["value"]):  # NaN / inf: no bar (the table shows the value)
                    continue
                x = i - 0.4 + width * (j + 0.5)
                xs.append(x)
                ys.append(c["value"])
                if np.isfinite(c["lo"]) and np.isfinite(c["hi"]):
                    ax.errorbar(x, c["value"], yerr=[[max(c["value"] - c["lo"], 0)], [max(c["hi"] - c["value"], 0)]],
                                color="black", lw=1, capsize=2)
            ax.bar(xs, ys, width=width * 0.95, color=colors[j], label=f"L{layer}")
        ax.set_xticks(range(len(methods)), [disp for _, disp in methods], rotation=30, ha="right")
        vals = cells["value"].to_numpy(float)
        vals = vals[np.isfinite(vals)]
        if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 30:  # counts spanning decades
            ax.set_yscale("log")
        ax.set_title(model)
        ax.set_ylabel(metric)
        ax.legend(title="layer", fontsize=7)
    fig.suptitle(f"{metric} (95% CI; * bars without CI pool several settings)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(df: pd.DataFrame, path: Path) -> str | None:
    """Quality (detection AUROC, else retrieval p@10) vs build tokens (log x), frontier drawn; None if no data."""
    quality = next((m for m in ("detection.auroc", "retrieval.precision@10") if (df["metric"] == m).any()), None)
    if quality is None:
        return None
    q = _cells_by(df[df["metric"] == quality], ["model", "layer", "method", "display"])
    tok = df[df["metric"].isin(TOKENS)]
    tok = tok[tok["metric"] == next(m for m in TOKENS if (tok["metric"] == m).any())] if len(tok) else tok
    if q.empty or tok.empty:
        return None
    t = tok.groupby(["model", "layer", "method"])["value"].mean().rename("tokens").reset_index()
    pts = q.merge(t, on=["model", "layer", "method"])
    pts = pts[pts["tokens"] > 0]
    if pts.empty:
        return None
    plt, _sns = _plt()
    models = sorted(pts["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(6.0 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        pm = pts[pts["model"] == model].sort_values("tokens")
        for _, r in pm.iterrows():
            ok = np.isfinite(r["lo"]) and np.isfinite(r["hi"])
            ax.errorbar(r["tokens"], r["value"], yerr=[[r["value"] - r["lo"]], [r["hi"] - r["value"]]] if ok else None,
                        fmt="o", ms=5, capsize=2)
            ax.annotate(f"{r['display']} L{r['layer']}", (r["tokens"], r["value"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        best, fx, fy = -math.inf, [], []
        for _, r in pm.iterrows():  # cheapest first: a point is on the frontier if it beats all cheaper ones
            if r["value"] > best:
                best = r["value"]
                fx.append(r["tokens"])
                fy.append(r["value"])
        ax.step(fx, fy, where="post", color="grey", lw=1, ls="--", label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel("build tokens (log; pretrained SAEs: loading only)")
        ax.set_ylabel(quality)
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return quality


def plot_k_vs_p(df: pd.DataFrame, published: list[Published], path: Path) -> bool:
    """EP K vs p per (model, layer), with published K (hollow, dashed) where the same model and layer were run."""
    d = df[(df["method_family"] == "ep") & (df["metric"] == "build.K") & df["p"].notna()]
    if d.empty:
        return False
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for i, ((model, mkey, layer), g) in enumerate(d.groupby(["model", "model_key", "layer"])):
        g = g.groupby("p")["value"].mean().sort_index()
        color = sns.color_palette("deep")[i % 10]
        ax.plot(g.index, g.values, "o-", color=color, label=f"ours {model} L{layer}")
        pub = sorted((e.p, e.value) for e in published if e.table == "ep_size" and e.metric == "build.K"
                     and e.model == mkey and e.layer == layer and e.p is not None and e.value is not None)
        if pub:
            ax.plot([x for x, _ in pub], [y for _, y in pub], "o--", mfc="none", color=color,
                    label=f"published {model} L{layer}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ps = sorted(set(d["p"]) | {e.p for e in published if e.table == "ep_size" and e.p is not None
                               and (e.model, e.layer) in set(zip(d["model_key"], d["layer"]))})
    ax.set_xticks(ps, [f"{x:g}" for x in ps])
    ax.minorticks_off()
    ax.set_xlabel("percentile p")
    ax.set_ylabel("K (regions)")
    ax.set_title("EP dictionary size vs p")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pair_order(pair: str) -> tuple:
    nums = [int(x) for x in re.findall(r"\d+", pair)]
    return (len(nums) == 0, nums, pair)


def plot_stability(df: pd.DataFrame, path: Path) -> bool:
    """Each stability metric vs the pair it compares (layer pairs, seed pairs), a line per method."""
    d = df[df["family"] == "stability"]
    if d.empty:
        return False
    d = d.assign(pair=d["detail"].map(setting_of).replace("", "(unnamed)"))
    metrics = sorted(d["metric"].unique())
    plt, _sns = _plt()
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        dm = d[d["metric"] == metric]
        pairs = sorted(dm["pair"].unique(), key=_pair_order)
        for model in sorted(dm["model"].unique()):
            for method, disp in ordered_methods(dm[dm["model"] == model]):
                c = _cells_by(dm[(dm["model"] == model) & (dm["method"] == method)], ["pair"]).set_index("pair")
                xs = [i for i, p in enumerate(pairs) if p in c.index]
                ys = [c.loc[pairs[i], "value"] for i in xs]
                lab = disp if dm["model"].nunique() == 1 else f"{model} {disp}"
                ax.plot(xs, ys, "o-", label=lab)
        ax.set_xticks(range(len(pairs)), pairs, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_correspondence(df: pd.DataFrame, run_dir: Path, path: Path) -> str | None:
    """Histogram of per-region best F1 from extras/correspondence_*.npy, else bars of the F1 > 0.5 share."""
    files = sorted((run_dir / "extras").glob("correspondence_*.npy"))
    plt, _sns = _plt()
    if files:
        fig, ax = plt.subplots(figsize=(6.0, 4.0))
        for f in files:
            v = np.load(f, allow_pickle=False).astype(float).ravel()
            v = v[np.isfinite(v)]
            share = float((v > 0.5).mean()) if len(v) else float("nan")
            ax.hist(v, bins=np.linspace(0, 1, 21), histtype="step", lw=1.5,
                    label=f"{f.stem.removeprefix('correspondence_')} (n={len(v)}, F1>0.5: {share:.1%})")
        ax.axvline(0.5, color="grey", ls="--", lw=1)
        ax.set_xlabel("best-match F1 per region")
        ax.set_ylabel("regions")
        ax.set_title("EP-SAE correspondence")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return "histogram"
    if (df["metric"] == "correspondence.share_f1>0.5").any():
        plot_metric_bars(df, "correspondence.share_f1>0.5", path)
        return "share"
    return None


def make_plots(df: pd.DataFrame, run_dir: Path, published: list[Published], concept_set: str | None = None
               ) -> dict[str, str]:
    """Write every plot under run_dir/plots; returns {name: path relative to run_dir}.

    Concept-family plots show `concept_set` only (one measured value with its CI per bar)."""
    df = on_concept_set(df, concept_set)
    pdir = run_dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for fam in families_in(df):
        metrics = sorted(df.loc[df["family"] == fam, "metric"].unique())
        main = MAIN_METRIC.get(fam) if MAIN_METRIC.get(fam) in metrics else metrics[0]
        name = f"family_{_safe(fam)}.png"
        plot_metric_bars(df, main, pdir / name)
        out[f"family:{fam}"] = f"plots/{name}"
    if plot_pareto(df, pdir / "pareto.png"):
        out["pareto"] = "plots/pareto.png"
    if plot_k_vs_p(df, published, pdir / "ep_k_vs_p.png"):
        out["k_vs_p"] = "plots/ep_k_vs_p.png"
    if plot_stability(df, pdir / "stability.png"):
        out["stability"] = "plots/stability.png"
    if plot_correspondence(df, run_dir, pdir / "correspondence.png"):
        out["correspondence"] = "plots/correspondence.png"
    return out


# --------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------
def write_report(run_dir: Path) -> Path:
    """Write run_dir/REPORT.md and run_dir/plots/*.png from the run's rows; returns the report path."""
    run_dir = Path(run_dir)
    df = load_rows(run_dir)
    info = load_run_info(run_dir)
    published = load_published()
    concept_set = primary_concept_set(df, info)
    plots = make_plots(df, run_dir, published, concept_set)
    md = header_md(info, df, run_dir) + headline_md(df, concept_set)
    md += ["## Metric families", "",
           (f"Every row of the run, grouped by metric family (details cut at {DETAIL_WIDTH} characters; rows.csv has "
           "them in full)."), ""]
    for fam in families_in(df):
        md += family_md(df, fam, plots.get(f"family:{fam}"))
    md += ["## Quality vs cost, stability", ""]
    if "pareto" in plots:
        md += [("Quality against the tokens each build consumed (log x); the dashed line is the Pareto frontier. "
               "Pretrained SAEs report the cost of loading them: their training tokens are in "
               "`cost.token_ratio_sae_over_ep`."), "", f"![quality vs build tokens]({plots['pareto']})", ""]
    if "stability" in plots:
        md += ["Stability metrics against the pair of dictionaries compared (layer pairs, seed pairs).", "",
               f"![stability vs pair]({plots['stability']})", ""]
    if "pareto" not in plots and "stability" not in plots:
        md += ["(no build-token or stability rows in this run)", ""]
    md += paper_md(df, published, plots)
    path = run_dir / "REPORT.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path


def _run_time(run_dir: Path) -> float:
    """When a run started (run.json), else when its rows were last written: orders runs for `latest`."""
    info = load_run_info(run_dir) if (run_dir / "run.json").exists() else {}
    s = info.get("started")
    if isinstance(s, (int, float)):
        return float(s)
    if isinstance(s, str):
        try:
            t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
            return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()
        except ValueError:
            pass
    rows = [f for f in (run_dir / "rows.parquet", run_dir / "rows.csv") if f.exists()]
    return max(f.stat().st_mtime for f in rows)


def list_runs(results_dir: Path = Path("results")) -> list[Path]:
    """Run directories with rows under results_dir, oldest first."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    runs = [d for d in results_dir.iterdir()
            if d.is_dir() and ((d / "rows.parquet").exists() or (d / "rows.csv").exists())]
    return sorted(runs, key=_run_time)


def report_main(run_id: str | None, results_dir: Path = Path("results")) -> Path:
    """Write the report of run `run_id` (None: the latest run) under results_dir; returns REPORT.md's path."""
    runs = list_runs(results_dir)
    if run_id is None:
        if not runs:
            raise FileNotFoundError(f"no runs with rows under {results_dir}; run `epbench run` first")
        return write_report(runs[-1])
    run_dir = Path(results_dir) / run_id
    if not run_dir.is_dir():
        have = ", ".join(d.name for d in runs) or "none"
        raise FileNotFoundError(f"no run {run_id!r} under {results_dir} (runs there: {have})")
    return write_report(run_dir)
