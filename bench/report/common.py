"""What every part of the report shares: constants, loading a run's rows and info, formatting."""

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


DAGGER = "†"
MISSING = "—"
# metrics.common.MetricRow fields (kept here so a report does not import torch; tests check they agree).
ROW_FIELDS = ("method", "method_config", "model", "layer", "metric", "value", "ci_low", "ci_high", "n", "seed",
              "supervised", "detail")
FAMILY_ORDER = ("ep", "sae", "kmeans", "pca", "random", "diffmean")  # method families, in table order
METRIC_FAMILY_ORDER = ("build", "retrieval", "detection", "probing", "correspondence", "ood", "causal", "recon",
                       "cost", "stability", "refusal")  # metric families, in report order; unknown ones follow, sorted
MAIN_METRIC = {  # the metric plotted for each family (others: the family's first metric)
    "build": "build.K", "retrieval": "retrieval.precision@10", "detection": "detection.auroc",
    "probing": "probing.onehot_retention", "correspondence": "correspondence.share_f1>0.5", "ood": "ood.auroc",
    "causal": "causal.ablate.delta_logit_diff", "recon": "recon.loss_recovered", "cost": "cost.encode_rows_per_s",
    "stability": "stability.direction.mean_cos",
}
TOKENS = ("build.tokens", "cost.build.tokens")  # build tokens under either name (runner / metrics.cost)
SECONDS = ("build.wall_seconds", "cost.build.wall_seconds")
DETAIL_WIDTH = 48  # family tables cut `detail` here (full text in rows.csv)


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
    return annotate_rows(df)


def _per_artefact(df: pd.DataFrame, metric: str) -> pd.Series:
    """One value per (model, layer, method) of a metric (the first row; NaN where absent), aligned with df."""
    v = df[df["metric"] == metric].groupby(["model", "layer", "method"])["value"].first()
    return pd.Series(pd.MultiIndex.from_frame(df[["model", "layer", "method"]]).map(v.to_dict().get),
                     index=df.index, dtype=float)


def annotate_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Add `budget` (K, build tokens, FLOPs) to every row, and to every trained SAE's name its held-out EV and loss
    recovered at that layer, with `⚠` (and `undertrained` in the budget) when EV is below the floor."""
    from bench.verdict import EV_FLOOR

    K, tok, flops = (_per_artefact(df, m) for m in ("build.K", "build.tokens", "build.flops"))
    df["budget"] = [", ".join(x for x in (f"K {int(k):,}" if k == k else "", f"{int(t):,} tok" if t == t else "",
                                          f"{f:.2g} FLOP" if f == f and f > 0 else "") if x)
                    for k, t, f in zip(K, tok, flops)]
    ev, lr = _per_artefact(df, "build.heldout_explained_variance"), _per_artefact(df, "recon.loss_recovered")
    sae = (df["method_family"] == "sae") & ev.notna()
    under = sae & (ev < EV_FLOOR)
    df.loc[sae, "display"] = [f"{d} (EV {e:.2f}{f', LR {r:.2f}' if r == r else ''}){' ⚠' if u else ''}"
                              for d, e, r, u in zip(df.loc[sae, "display"], ev[sae], lr[sae], under[sae])]
    df.loc[under, "budget"] = df.loc[under, "budget"] + "; undertrained"
    df["undertrained"] = under
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


PAD_MAX = 48  # columns are aligned up to this width; a longer cell is written as is (renders the same, and a
# table with a paragraph in one column is not padded to that paragraph's length on every row)


def md_table(header: Sequence[str], body: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    """An aligned GitHub pipe table (columns padded up to PAD_MAX characters); columns in `right` are
    right-aligned."""
    right = set(right)
    cells = [[str(c).replace("|", "\\|") for c in r] for r in [list(header), *body]]
    widths = [min(PAD_MAX, max(3, *(len(r[i]) for r in cells))) for i in range(len(header))]

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
