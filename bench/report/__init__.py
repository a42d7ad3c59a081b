"""Markdown report and plots for one run: REPORT.md is one page (bottom line, primary verdicts, metric-vs-K plots,
scorecard, budgets); DETAILS.md holds exploratory verdicts, per-family tables and paper tables.

Input: `results/<run-id>/rows.parquet` (or `rows.csv`), tidy MetricRow rows plus provenance columns, and
`run.json`. Output: `REPORT.md` and `plots/*.png` in the same directory. Metrics are grouped by the prefix of
their name (the family); methods by the `method_family` column. Supervised methods are marked with a dagger.
Published figures (bench/data/published.yaml) are printed beside ours only where model, layer, p and method
family match; anywhere else ours stand alone and the published figures are listed apart, never as ours.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from bench.report.common import (  # noqa: F401  (public names other modules and tests import)
    DETAIL_WIDTH, ROW_FIELDS, families_in, fmt_num, load_rows, load_run_info, md_table,
)
from bench.claims import scorecard
from bench.report.common import _safe
from bench.report.plots import curve_points, make_plots, plot_metric_vs_k
from bench.report.published import load_published, paper_md  # noqa: F401
from bench.report.tables import family_md, header_md, headline_md, primary_concept_set  # noqa: F401
from bench.report.verdicts import (
    baselines_md, bottom_line, budgets_md, exploratory_md, ground_truth_md, primary_md, scorecard_md, seeds_md,
)
from bench.verdict import artefact_table, load_cells, plan_of, unit_table, verdicts_and_refusals

# --------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------
def write_report(run_dir: Path) -> Path:
    """Write run_dir/REPORT.md (one page: bottom line, primary verdicts with per-layer differences, metric-vs-K
    plots, scorecard, budgets), run_dir/DETAILS.md (everything else) and run_dir/plots/*.png; returns REPORT.md."""
    run_dir = Path(run_dir)
    df = load_rows(run_dir)
    info = load_run_info(run_dir)
    published = load_published()
    concept_set = primary_concept_set(df, info)
    cells = load_cells(run_dir)  # read once: verdicts, scorecard, baselines, curves and plots all use them
    plan = plan_of(run_dir)
    table = verdicts_and_refusals(run_dir, cells=cells, plan=plan)
    models = sorted({str(c.get("cell", {}).get("model")) for c in cells if c.get("cell", {}).get("model")})
    # the claims are model-specific: each model is scored on its own cells (and, with several, its primary family
    # Holm-corrected on its own beside the pooled verdict)
    per_model: dict[str, list] = {}
    claims = {}
    if len(models) < 2:
        claims[""] = scorecard(run_dir, table.verdicts, cells)
    else:
        for m in models:
            mine = [c for c in cells if c.get("cell", {}).get("model") == m]
            per_model[m] = verdicts_and_refusals(run_dir, cells=mine, plan=plan).verdicts
            claims[m] = scorecard(run_dir, per_model[m], mine)
    plots = make_plots(df, run_dir, published, concept_set, cells)
    curves = k_curve_plots(cells, run_dir, [m.metric for m in plan.primary_metrics])
    page = header_md(info, df, run_dir, details=DETAILS) + bottom_line(table.verdicts, claims, plan, per_model)
    page += primary_md(table.verdicts, plan.k_tolerance, per_model)
    page += ["## Metrics along the dictionary-size axis", "",
             ("Each headline metric against K (log axis), per layer: EP as its percentile sweep, each baseline "
              "built at EP's sizes as one line over them, single-size artefacts as points; 95% intervals over the "
              "same clusters the verdicts use."), ""]
    page += [f"![{m} vs K]({path})" for m, path in curves.items()] + [""] if curves else ["(no per-unit rows)", ""]
    page += ground_truth_md(df, published)
    page += scorecard_md(claims, details=DETAILS)
    page += budgets_md(cells)
    page += [f"Everything else (exploratory and refused comparisons, baselines at their best, seed spread, every "
             f"metric family, the paper tables): [{DETAILS}]({DETAILS}); the suite grid: [run.json](run.json); "
             f"tidy rows: `rows.parquet`."]
    details = [f"# Details of run `{info.get('run_id', run_dir.name)}`", "", "Back to [REPORT.md](REPORT.md).", ""]
    details += header_md(info, df, run_dir)[2:]  # provenance again, the suite grid and how to read the tables
    details += scorecard_md(claims, "in full")
    details += exploratory_md(table.verdicts, table.refused) + headline_md(df, concept_set)
    details += baselines_md(cells, plots.get("sae_curves")) + seeds_md(cells)
    details += ["## Metric families", "",
                (f"Every row of the run, grouped by metric family (details cut at {DETAIL_WIDTH} characters; rows.csv "
                 "has them in full)."), ""]
    for fam in families_in(df):
        details += family_md(df, fam, plots.get(f"family:{fam}"))
    details += ["## Quality vs cost, stability", ""]
    if "pareto" in plots:
        details += [("Quality against the tokens each build consumed (log x); the dashed line is the Pareto frontier. "
                     "Pretrained SAEs report the cost of loading them: their training tokens are in "
                     "`cost.token_ratio_sae_over_ep`."), "", f"![quality vs build tokens]({plots['pareto']})", ""]
    if "stability" in plots:
        details += ["Stability metrics against the pair of dictionaries compared (layer pairs, seed pairs).", "",
                    f"![stability vs pair]({plots['stability']})", ""]
    details += paper_md(df, published, plots)
    write_text_atomic(run_dir / DETAILS, "\n".join(details).rstrip() + "\n")
    return write_text_atomic(run_dir / "REPORT.md", "\n".join(page).rstrip() + "\n")


DETAILS = "DETAILS.md"


def k_curve_plots(cells: list[dict], run_dir: Path, metrics: list[str]) -> dict[str, str]:
    """One metric-vs-K plot per headline metric present in the run; {metric: path relative to run_dir}."""
    units, arts = unit_table(cells), artefact_table(cells)
    out = {}
    for metric in dict.fromkeys(metrics):
        name = f"k_curve_{_safe(metric)}.png"
        if plot_metric_vs_k(curve_points(units, arts, metric), metric, run_dir / "plots" / name):
            out[metric] = f"plots/{name}"
    return out


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a text file under a unique temporary name and rename it over the old one (a failed write leaves the
    previous complete file in place)."""
    from bench.cache import atomic_write_text

    atomic_write_text(path, text)  # fsynced; an OSError keeps its errno and names `path` (the CLI adds the fix)
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

    def when(run_dir: Path) -> float:  # one damaged run.json must not stop the listing of every run
        try:
            return _run_time(run_dir)
        except (OSError, ValueError, AttributeError) as e:
            print(f"[epbench] {run_dir / 'run.json'} is unreadable ({type(e).__name__}); ordering that run by "
                  "its rows' time", flush=True)
            return max(f.stat().st_mtime for f in (run_dir / "rows.parquet", run_dir / "rows.csv") if f.exists())

    return sorted(runs, key=when)


def report_main(run_id: str | None, results_dir: Path = Path("results")) -> Path:
    """Write the report of run `run_id` (None: the latest run) under results_dir; returns REPORT.md's path."""
    from bench.runner import verify_tables

    runs = list_runs(results_dir)
    if run_id is None:
        if not runs:
            raise FileNotFoundError(f"no runs with rows under {results_dir}; run `epbench run` first")
        run_dir = runs[-1]
    else:
        run_dir = Path(results_dir) / run_id
        if not run_dir.is_dir():
            have = ", ".join(d.name for d in runs) or "none"
            raise FileNotFoundError(f"no run {run_id!r} under {results_dir} (runs there: {have})")
    info_path = run_dir / "run.json"
    if info_path.exists():
        try:
            if not isinstance(json.loads(info_path.read_text()), dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{info_path} is corrupted ({e}); rerun the same `epbench run` (its finished cells are "
                             "kept) to rewrite it, or delete it to report without run metadata") from None
    if (run_dir / "cells").is_dir():
        verify_tables(run_dir)  # rows.parquet / rows.csv are derived: checked against the cells, rebuilt if off
        from bench.runner import damaged_cells

        damaged = damaged_cells(run_dir)  # the verdicts read the cells themselves: none may be damaged
        if damaged:
            raise ValueError(f"cell file {damaged[0]} is damaged ({len(damaged)} in all: checksum mismatch or "
                             "unreadable); rerun the same `epbench run` to recompute it, then `epbench report`")
    return write_report(run_dir)
