"""A run's results as data: `bench.results.load(run)` returns tidy pandas DataFrames.

    from bench.results import load
    r = load("reference")                 # a run id under results/, or a run directory path
    r.rows[~r.rows.uninformative].groupby(["metric", "method"]).value.mean()
    r.units.query("metric == 'detection.auroc'")       # one row per concept / prompt / dataset
    r.artefacts[["model", "layer", "method", "K", "tokens"]]
    r.run["config"]                        # the suite grid (run.json)

The cell files (`results/<run>/cells/*.json`) are the source of truth; everything here is derived from them.
`rows.parquet` is verified first (`bench.runner.verify_tables`: rebuilt from the cells when missing, damaged or
older than the cells), cells are read through their checksums (`bench.runner.read_cell`: a damaged one is named
and left out).

Schema
------
`rows`: one row per metric row of the run (the columns of `rows.parquet`, plus parsed ones):

| column | what |
|---|---|
| `method` | the artefact label (`ep:p=2`, `kmeans@K(ep:p=2)`, `sae`) |
| `method_family` | the registry name of the method (`ep`, `kmeans`, ...) |
| `method_config` | the artefact's config, JSON text |
| `model`, `layer` | where it was measured (`layer` -1: a cross-layer family such as stability) |
| `metric` | `family.name` (`detection.auroc`, `retrieval.precision@10`) |
| `value`, `ci_low`, `ci_high`, `n` | the value, its 95% interval and the number of units behind it |
| `seed`, `supervised` | the fit seed; whether the method used concept labels (DiffMean) |
| `setting` | the first `;`-separated token of the metric's detail: the data set it was measured on (concept set, prompt set, OOD set) or, for families without one, what it compares (`layers 4->8`, `vs sae`, `hook ...`) |
| one column per `key=value` token | every `key=value` token of the detail after the first (`readout`, `ceiling`, `n_texts`, `kl`, `alpha`, `clusters`, `prompts`, ...; several in one token when it holds only `key=value` pairs separated by `, `), numeric where every value of the column is a number; NaN/None where a row has no such token. A key equal to another column's name becomes `detail_<key>` |
| `detail` | the rest of the detail, free text (`""` when everything was parsed) |
| `uninformative` | True for every row of a (metric, setting) where every row's value equals the row's own `ceiling` or `floor` (from the detail): the metric cannot tell the methods apart there. Computed from the rows, never from a list of metric names |
| `uninformative_reason` | why (`every value at its ceiling (0.333)`), `""` otherwise |
| `suite`, `cell_id`, `store_id`, `git_commit`, `started`, `finished` | provenance |

`units`: the per-unit values behind the rows (`bench.verdict.unit_table`): `model`, `layer`, `method`, `family`
(method family), `metric`, `seed`, `unit` (concept, prompt id, dataset), `cluster` (units sharing a direction,
e.g. causal prompts of one relation/answer; else the unit), `value`; `setting` and the sweep columns (`kl`,
`alpha`, `scale`, ...) parsed exactly as in `rows`, so `units.merge(rows, on=[...])` joins on the same names;
`pair_setting` is the string verdicts pair units on.

`artefacts`: one row per (model, layer, artefact label) (`bench.verdict.artefact_table`): `family`, `K`,
`tokens`, `rows`, `flops`, `seeds`, `p`, `matched_to`, `quality` (fit evidence: SAE held-out EV, k-means
iterations, ...). `load(run, per_seed=True)` gives one row per fit seed.

`run`: run.json as a dict (`config`: the suite grid; `versions`, `machine`, `git_commit`, `data`, ...).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from bench.runner import read_cell, verify_tables
from bench.verdict import artefact_table, unit_table

# A `key=value` token: the key is one word (letters, digits, `_ . @ -`), the value is everything after `=`.
_KV = re.compile(r"^([A-Za-z_][A-Za-z0-9_.@-]*)=(.*)$")
# Facts written as prose by runs before they were `key=value` (retrieval's "ceiling 0.333").
_LEGACY = (re.compile(r"^(ceiling|floor) (-?[0-9.]+(?:e[-+]?[0-9]+)?)$"),)
BOUNDS = ("ceiling", "floor")  # detail keys that declare the best / worst value a row could take


class Results(NamedTuple):
    """A run's results (see the module docstring for the schema)."""

    rows: pd.DataFrame
    units: pd.DataFrame
    artefacts: pd.DataFrame
    run: dict[str, Any]
    dir: Path


def parse_detail(detail: Any) -> tuple[str, dict[str, str], str]:
    """Split a row's detail into (setting, {key: value}, rest).

    The first `;`-separated token is the setting; every later token that is `key=value` (or only `key=value`
    pairs separated by `, `) goes into the dict, its value as written; the first occurrence of a key wins;
    everything else stays in `rest`, joined with `; `.
    """
    parts = [p.strip() for p in str(detail if detail is not None else "").split(";")]
    setting, facts, rest = parts[0], {}, []
    for tok in parts[1:]:
        if not tok:
            continue
        pairs = _pairs(tok)
        if pairs is None:
            rest.append(tok)
            continue
        for k, v in pairs:
            if k in facts and facts[k] != v:
                rest.append(f"{k}={v}")
            facts.setdefault(k, v)
    return setting, facts, "; ".join(rest)


def _pairs(tok: str) -> list[tuple[str, str]] | None:
    """The `key=value` pairs a detail token consists of, or None when it is (partly) prose."""
    for legacy in _LEGACY:
        m = legacy.match(tok)
        if m:
            return [(m.group(1), m.group(2))]
    m = _KV.match(tok)
    if m is None:
        return None
    if ", " in tok:  # `K_a=5407, K_b=5102`: pairs only; otherwise the value itself holds a comma
        sub = [_KV.match(s.strip()) for s in tok.split(", ")]
        if all(sub):
            return [(s.group(1), s.group(2)) for s in sub]
    return [(m.group(1), m.group(2))]


def _number(v: str) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x


def _tolerance(v: str) -> float:
    """Half a unit in the last digit a bound was written with (`0.333` -> 5e-4), at least 1e-9 (relative)."""
    mant = v.lower().split("e")[0]
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    scale = 10 ** int(v.lower().split("e")[1]) if "e" in v.lower() else 1.0
    return max(0.5 * 10 ** -decimals * scale, 1e-9 * max(1.0, abs(float(v))))


def tidy_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with `setting`, one column per detail `key=value`, the rest of `detail`, and `uninformative`."""
    df = df.copy().reset_index(drop=True)
    if "detail" not in df:
        df["detail"] = ""
    parsed = [parse_detail(d) for d in df["detail"]]
    facts = pd.DataFrame([f for _, f, _ in parsed], index=df.index)
    df["setting"] = [s for s, _, _ in parsed]
    df["detail"] = [r for _, _, r in parsed]
    df = _add_fact_columns(df, facts)
    df["uninformative"], df["uninformative_reason"] = _uninformative(df, facts)
    front = [c for c in ("method", "method_family", "method_config", "model", "layer", "metric", "setting", "value",
                         "ci_low", "ci_high", "n", "seed", "supervised") if c in df]
    return df[front + [c for c in df.columns if c not in front]]


def _add_fact_columns(df: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    """Detail facts as columns after the row columns: numeric where every given value is a number."""
    cols = {}
    for key in facts.columns:
        name = f"detail_{key}" if key in df.columns or key in ("uninformative", "uninformative_reason") else key
        col = facts[key]
        given = col.dropna()
        nums = pd.to_numeric(given, errors="coerce")
        cols[name] = pd.to_numeric(col, errors="coerce") if len(given) and nums.notna().all() else col
    return pd.concat([df, pd.DataFrame(cols, index=df.index)], axis=1) if cols else df


def _uninformative(df: pd.DataFrame, facts: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per row: whether its (metric, setting) has every value at the row's own ceiling or floor, and why."""
    at = {b: pd.Series(False, index=df.index) for b in BOUNDS}
    bound_value: dict[str, pd.Series] = {}
    for b in BOUNDS:
        if b not in facts:
            continue
        raw = facts[b]
        ok = []
        for v, bound in zip(df["value"], raw):
            x = _number(bound) if isinstance(bound, str) else None
            ok.append(x is not None and isinstance(v, (int, float)) and not math.isnan(v)
                      and abs(float(v) - x) <= _tolerance(bound))
        at[b] = pd.Series(ok, index=df.index)
        bound_value[b] = raw
    flag = pd.Series(False, index=df.index)
    reason = pd.Series("", index=df.index)
    if not bound_value:
        return flag, reason
    for idx in df.groupby(["metric", "setting"], sort=False).groups.values():
        for b in bound_value:
            if bool(at[b].loc[idx].all()):
                vals = sorted(set(bound_value[b].loc[idx]))
                flag.loc[idx] = True
                reason.loc[idx] = f"every value at its {b} ({', '.join(vals)})"
                break
    return flag, reason


def tidy_units(units: pd.DataFrame) -> pd.DataFrame:
    """unit_table's rows with its pairing `setting` split like the rows' detail (`setting` + sweep columns)."""
    units = units.rename(columns={"setting": "pair_setting"})
    parsed = [parse_detail(s) for s in units["pair_setting"]]
    units.insert(units.columns.get_loc("pair_setting"), "setting", [s for s, _, _ in parsed])
    facts = pd.DataFrame([f for _, f, _ in parsed], index=units.index)
    return _add_fact_columns(units, facts)


def run_dir(run: str | Path, results_dir: str | Path = "results") -> Path:
    """A run's directory: `run` itself when it is a run directory, else `<results_dir>/<run>`."""
    p = Path(run).expanduser()
    for d in (p, Path(results_dir) / str(run)):
        if d.is_dir() and ((d / "cells").is_dir() or (d / "run.json").exists()):
            return d
    root = Path(results_dir)
    known = sorted(x.name for x in root.iterdir() if (x / "cells").is_dir()) if root.is_dir() else []
    raise FileNotFoundError(f"no run {str(run)!r}: neither a run directory (with cells/) nor a run id under "
                            f"{root}/ (runs there: {', '.join(known) or 'none'})")


def load(run: str | Path, results_dir: str | Path = "results", per_seed: bool = False) -> Results:
    """A run's rows, per-unit values, artefacts and run.json as tidy DataFrames (schema: the module docstring).

    `run` is a run id under `results_dir` or a run directory; `per_seed` gives one artefact row per fit seed.
    """
    d = run_dir(run, results_dir)
    if not any((d / "cells").glob("*.json")):
        raise FileNotFoundError(f"{d} has no cell files (cells/*.json): the run has not finished a cell yet")
    verify_tables(d)
    rows = tidy_rows(pd.read_parquet(d / "rows.parquet"))
    cells = [c for c in (read_cell(p) for p in sorted((d / "cells").glob("*.json"))) if c is not None]
    units = tidy_units(unit_table(cells))
    artefacts = artefact_table(cells, per_seed=per_seed)
    try:
        meta = json.loads((d / "run.json").read_text())
    except (OSError, ValueError):
        meta = {}
    return Results(rows, units, artefacts, meta if isinstance(meta, dict) else {}, d)
