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
from pathlib import Path

from bench.report.common import (  # noqa: F401  (public names other modules and tests import)
    DETAIL_WIDTH, ROW_FIELDS, families_in, fmt_num, load_rows, load_run_info, md_table,
)
from bench.report.plots import make_plots
from bench.report.published import load_published, paper_md  # noqa: F401
from bench.report.tables import family_md, header_md, headline_md, primary_concept_set  # noqa: F401
from bench.report.verdicts import baselines_md, scorecard_md, seeds_md, verdict_md
from bench.verdict import load_cells, verdict_table

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
    cells = load_cells(run_dir)  # read once: the verdicts, the scorecard, the baselines and the SAE curves use them
    plots = make_plots(df, run_dir, published, concept_set, cells)
    verdicts = verdict_table(run_dir, cells=cells)  # computed once: the verdict table and the scorecard's paired claims
    md = header_md(info, df, run_dir) + verdict_md(run_dir, verdicts) + scorecard_md(run_dir, verdicts, cells)
    md += headline_md(df, concept_set)
    md += baselines_md(cells, plots.get("sae_curves")) + seeds_md(cells)
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
    return write_report(run_dir)
