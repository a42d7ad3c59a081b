"""The suite runner: expands a suite into cells, computes each once, appends tidy rows to results/<run-id>/.

A cell is (model, layer, method spec, metric family); cross-layer families use layer -1 ("all layers").
Finished cells are JSON files under `results/<run-id>/cells/`; a rerun skips them (resume), `force` recomputes.
What the cells of a model share (stores, data, cached artefacts) is its `bench.context.ModelContext`; what a cell
of each family computes is in `bench.families`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.cache import atomic_write_json, hold_lock, unique_tmp
from bench.cells import CELL_SHA256, Cell, cell_problem, cell_sha256, expand_cells  # noqa: F401  (re-exported)
from bench.context import ModelContext
from bench.families import FAMILIES
from bench.store import library_versions
from bench.suites import ALL_LAYERS, Suite  # noqa: F401  (ALL_LAYERS re-exported)
from metrics.common import MetricRow


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """Run provenance (run.json): platform, CPU (model name, family/model/stepping, SIMD flags, caches), threads, the
    BLAS torch uses (MKL or OpenBLAS, version, code-path settings) and CUDA. A trained SAE reproduces bit for bit only
    on the same CPU, BLAS and thread count (README, Reproducibility); EP, k-means and PCA rows do elsewhere too."""
    from bench.reproducibility import platform_summary

    cpu = {k: v for k, v in platform_summary().items() if v is not None}
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), **cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}




# ---------------------------------------------------------------------------------------------------------
# The run: results directory, resume, provenance


PROSE_FIELDS = ("description", "evidence")  # Suite text a package update may reword: not part of the grid
SITTING_FIELDS = ("git_commit", "versions", "machine")  # provenance that may change between sittings of one run


class Run:
    """One run of a suite: `results/<run-id>/` with run.json, cells/*.json, rows.parquet, rows.csv."""

    def __init__(self, suite: Suite, results_dir: str | Path = "results", run_id: str | None = None,
                 force: bool = False, progress: bool = True, amend: bool = False):
        self.suite = suite
        self.run_id = run_id or f"{suite.name}-{suite.key()}"
        self.dir = Path(results_dir) / self.run_id
        self.cells_dir = self.dir / "cells"
        self.progress = progress
        self.dir.mkdir(parents=True, exist_ok=True)
        # one process per run directory: a second `epbench run` of the same run id refuses in one line
        hold_lock(self.dir / ".lock", f"run {self.dir}", wait=False)
        if force and self.cells_dir.exists():
            for p in self.cells_dir.glob("*.json"):
                p.unlink()
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self._contexts: dict[str, ModelContext] = {}
        meta_path = self.dir / "run.json"
        old = None if force else _read_run_json(meta_path)
        config = json.loads(json.dumps(suite.to_dict(), default=str))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # this sitting's start (and a new run's)
        amendment = None
        if old is not None and old.get("config") is not None:
            # a field added to Suite since the run started reads as its default: the grid is unchanged
            was = {**_suite_defaults(suite, set(config) - set(old["config"])), **old["config"]}
            changed = sorted(k for k in (set(config) | set(was)) - set(PROSE_FIELDS) if config.get(k) != was.get(k))
            amended = amendment_of(was, config, finished_cells(self.cells_dir), changed)
            if changed and not (amend and amended):
                how = (f"it changes only {amendment_words(amended)}, none of which has a finished cell: pass --amend "
                       "to record it in run.json as an amendment and continue, " if amended else "")
                raise ValueError(f"run {self.dir} was started with another {suite.name} suite (differs in {changed});"
                                 f" resuming would mix two grids: {how}pass --force to restart it or choose another "
                                 "--run-id")
            if changed:
                amendment = {**amended, "before": {k: was.get(k) for k in changed},
                             "after": {k: config.get(k) for k in changed}}
            old["config"] = config
        if old is not None and "sittings" not in old and old.get("git_commit"):
            # a run.json from before sittings were kept: what it records is its last sitting's (start unknown)
            old["sittings"] = [{"started": None, **{k: old.get(k) for k in SITTING_FIELDS}}]
        self.meta = old or {
            "run_id": self.run_id, "suite": suite.name, "config": config,
            "started": now, "wall_seconds": 0.0}
        # a resumed run may continue on another commit, library set or machine: the top-level fields are the latest
        # sitting's, `sittings` keeps every one, and each cell records the index of the sitting that computed it
        self.meta.update(versions=library_versions(), git_commit=git_commit(), machine=machine_info())
        self.meta.setdefault("sittings", []).append({"started": now, **{k: self.meta[k] for k in SITTING_FIELDS}})
        self.sitting = len(self.meta["sittings"]) - 1
        if amendment is not None:
            self.meta.setdefault("amendments", []).append({"at": now, "sitting": self.sitting, **amendment})
            print(f"[epbench] amended run {self.dir}: {amendment_words(amendment)} (none had a finished cell; "
                  "recorded in run.json `amendments`)", flush=True)
        atomic_write_json(meta_path, self.meta)

    def context(self, model: str) -> ModelContext:
        if model not in self._contexts:
            if self.suite.needs_hub:
                from bench.models import HUB_MODELS, check_hub_access

                if model in HUB_MODELS:
                    check_hub_access(HUB_MODELS[model])
            self._contexts[model] = ModelContext(self.suite, model, self.progress)
            self._contexts[model].extras_dir = self.dir / "extras"
            self._contexts[model].cells_dir = self.cells_dir
        return self._contexts[model]

    def cells(self) -> list[Cell]:
        return expand_cells(self.suite)

    def cell_path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.id}.json"

    def is_done(self, cell: Cell) -> bool:
        return read_cell(self.cell_path(cell)) is not None

    def run_cell(self, cell: Cell) -> list[MetricRow]:
        """Compute one cell (or read it back when a previous run finished it) and record its rows."""
        path = self.cell_path(cell)
        done = read_cell(path)
        if done is not None:
            return [MetricRow(**r) for r in done["rows"]]
        ctx = self.context(cell.model)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        t0 = time.perf_counter()
        try:
            rows = FAMILIES[cell.family](ctx, cell)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise RuntimeError(f"cell {cell.id} failed: {type(e).__name__}: {e} (finished cells are kept; "
                               "rerun to resume)") from e
        if not rows:  # a family that measured nothing (e.g. no artefact fitted on this concept set) is an error
            raise RuntimeError(f"cell {cell.id} produced no rows: nothing was scored for {cell.spec} on "
                               f"{cell.family}; check the method's inputs (concept sets, layers) and rerun "
                               "(finished cells are kept)")
        wall = time.perf_counter() - t0
        record = {
            "cell": cell.__dict__, "cell_id": cell.id, "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_seconds": wall,
            "store_id": ctx.store.id, "method_family": ctx.spec(cell.spec).method,
            "git_commit": self.meta["git_commit"], "sitting": self.sitting,
            "artefacts": ctx.artefact_summaries(cell),
            "rows": [r.to_dict() for r in rows],
        }
        write_cell(path, record)
        loaded = {k for k in ("concept_sets", "prompt_sets") if k in ctx.__dict__}  # what this process built
        if loaded - set(self.meta.get("data", {}).get(cell.model, {})):
            self.meta.setdefault("data", {})[cell.model] = ctx.data_summary()
        self.meta["wall_seconds"] = float(self.meta.get("wall_seconds", 0.0)) + wall
        atomic_write_json(self.dir / "run.json", self.meta)
        self.write_tables()
        return rows

    def records(self) -> Iterator[dict[str, Any]]:
        yield from _cell_records(self.cells_dir)

    def write_tables(self) -> Path:
        """Rebuild rows.parquet / rows.csv from the finished cells (tidy rows + provenance columns)."""
        return write_tables(self.dir, self.suite.name, self.meta["git_commit"])

    def finish(self) -> None:
        self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(self.dir / "run.json", self.meta)
        self.write_tables()


# a resumed run may change these (--amend), within limits
AMENDABLE_FIELDS = ("methods", "model_layers", "layers", "model_store_dtype")


def finished_cells(cells_dir: Path) -> set[tuple[str, str]]:
    """The (model, method-spec label) pairs with at least one finished (readable, verified) cell."""
    return {(rec["cell"]["model"], rec["cell"]["spec"]) for rec in _cell_records(cells_dir)} if cells_dir.is_dir() \
        else set()


def amended_specs(was: dict[str, Any], config: dict[str, Any], finished: set[str]) -> list[str]:
    """The labels of the method specs that differ between two suite configs (added, removed or changed), when the
    change can amend a run without touching a result: none of them, and no spec matched to one of them (its
    artefacts copy their K or tokens), has a finished cell; nor may the reference SAE (the suite's first SAE spec,
    which other specs' cost, correspondence and ground-truth cells read) change once any cell has finished. Empty
    when it cannot."""
    before = {m["label"]: m for m in was.get("methods") or []}
    after = {m["label"]: m for m in config.get("methods") or []}
    specs = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    touched = set(specs)
    for m in list(before.values()) + list(after.values()):  # a spec matched to a changed one changes with it
        if touched & set(m.get("match_to") or []):
            touched.add(m["label"])
    reference = [next((m["label"] for m in ms.values() if m["method"] == "sae"), None) for ms in (before, after)]
    if reference[0] != reference[1] or reference[0] in touched:
        touched |= finished
    return specs if specs and not touched & finished else []


def amended_models(was: dict[str, Any], config: dict[str, Any], finished: set[str]) -> list[str]:
    """The models read differently (other layers, another store dtype) under two suite configs with the same models,
    when none of them has a finished cell (e.g. a model cut to fewer layers before its first cell ran). Empty when
    it cannot."""
    if was.get("models") != config.get("models"):
        return []

    def reading(cfg: dict[str, Any], model: str) -> tuple[list[int], str]:
        return (list((cfg.get("model_layers") or {}).get(model, cfg.get("layers"))),
                (cfg.get("model_store_dtype") or {}).get(model, cfg.get("store_dtype")))

    models = [m for m in config.get("models") or [] if reading(was, m) != reading(config, m)]
    return models if models and not set(models) & finished else []


def amendment_of(was: dict[str, Any], config: dict[str, Any], finished: set[tuple[str, str]],
                 changed: list[str]) -> dict[str, list[str]]:
    """What a change of suite config amends (`specs`: method-spec labels, `models`: models read at other layers),
    when every changed field may be amended and nothing it touches has finished; empty when it cannot amend."""
    if not changed or not set(changed) <= set(AMENDABLE_FIELDS):
        return {}
    out = {}
    if "methods" in changed:
        out["specs"] = amended_specs(was, config, {spec for _, spec in finished})
    if {"model_layers", "layers", "model_store_dtype"} & set(changed):
        out["models"] = amended_models(was, config, {model for model, _ in finished})
    return out if all(out.values()) else {}


def amendment_words(amended: dict[str, Any]) -> str:
    """What an amendment changes, in words: method specs, and the layers or store dtype of models (from and to, once
    the record holds the config before and after; a record from before layers could be amended holds method lists
    there)."""
    cfg = [a if isinstance(a := amended.get(when), dict) else {} for when in ("before", "after")]
    fields = (("model_layers", "layers", "the suite layers"),
              ("model_store_dtype", "store dtype", "the suite store dtype"))
    said = []
    for m in amended.get("models") or []:
        was, now = ([c.get(f, {}).get(m, default) for f, _, default in fields] for c in cfg)
        changes = [f"the {what} of {m} (from {a} to {b})" for (_, what, _), a, b in zip(fields, was, now) if a != b]
        said += changes or [f"the layers of {m}"]
    return " and ".join((["method specs " + ", ".join(amended["specs"])] if amended.get("specs") else []) + said)


_LEGACY_CELLS_TOLD: set[str] = set()  # cells folders whose unchecksummed (legacy) cells were announced


def write_cell(path: Path, record: dict[str, Any]) -> None:
    """Write a cell record with its checksum (computed over what a read gets back), atomically."""
    record = json.loads(json.dumps({k: v for k, v in record.items() if k != CELL_SHA256}, default=str))
    record[CELL_SHA256] = cell_sha256(record)
    atomic_write_json(path, record)


def read_cell(path: Path) -> dict[str, Any] | None:
    """A finished cell's record, or None when it is absent, unreadable or fails its checksum (then it is recomputed,
    and says so). A cell written before cells carried a checksum is read as legacy, unverified (said once per
    folder)."""
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
        problem = cell_problem(rec)
        if not problem:
            if CELL_SHA256 not in rec and str(path.parent) not in _LEGACY_CELLS_TOLD:
                _LEGACY_CELLS_TOLD.add(str(path.parent))
                print(f"[epbench] cell files in {path.parent} carry no checksum (written by an older epbench): "
                      "read as legacy, unverified", flush=True)
            return rec
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"is unreadable ({e})"
    print(f"[epbench] cell file {path} {problem}; it will be recomputed", flush=True)
    return None


def _cell_records(cells_dir: Path) -> Iterator[dict[str, Any]]:
    for p in sorted(cells_dir.glob("*.json")):
        rec = read_cell(p)
        if rec is not None:
            yield rec


def _suite_defaults(suite: Suite, names: set[str]) -> dict[str, Any]:
    """The JSON form of the Suite fields' defaults for `names`."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(suite):
        if f.name in names:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = json.loads(json.dumps(value, default=str))
    return out


def _read_run_json(path: Path) -> dict[str, Any] | None:
    """run.json if it parses as an object; None when absent or damaged (it is rewritten from the suite)."""
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        if isinstance(meta, dict):
            return meta
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    print(f"[epbench] {path} is damaged; rewriting it from the suite (cells are kept)", flush=True)
    return None


def _cells_digest(cells_dir: Path) -> str:
    """sha256 over the names and bytes of every cell file: what the derived tables must have been built from."""

    h = hashlib.sha256()
    for p in sorted(cells_dir.glob("*.json")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


TABLES_RECORD = "tables.json"  # sha256 of rows.parquet, rows.csv and of the cells they were built from


def write_tables(run_dir: Path, suite_name: str, git_commit_: str) -> Path:
    """rows.parquet and rows.csv from cells/*.json (the source of truth), plus tables.json recording their sha256."""

    import pandas as pd

    run_dir = Path(run_dir)
    cells_dir = run_dir / "cells"
    digest = _cells_digest(cells_dir)
    rows = []
    for rec in _cell_records(cells_dir):
        for r in rec["rows"]:
            r = {k: v for k, v in r.items() if k not in ("units", "clusters")}  # per-unit data stays in the cells
            rows.append({**r, "suite": suite_name, "cell_id": rec["cell_id"],
                         "method_family": rec.get("method_family"), "store_id": rec.get("store_id"),
                         "git_commit": rec.get("git_commit", git_commit_), "sitting": rec.get("sitting"),
                         "started": rec.get("started"),
                         "finished": rec.get("finished")})
    df = pd.DataFrame(rows)
    hashes = {}
    for name, write in (("rows.parquet", lambda p: df.to_parquet(p, index=False)),
                        ("rows.csv", lambda p: df.to_csv(p, index=False))):
        tmp = unique_tmp(run_dir / name)
        try:
            write(tmp)
            hashes[name] = hashlib.sha256(tmp.read_bytes()).hexdigest()
            tmp.replace(run_dir / name)
        finally:
            tmp.unlink(missing_ok=True)
    atomic_write_json(run_dir / TABLES_RECORD, {"cells_sha256": digest, "files": hashes, "n_rows": len(df)})
    return run_dir / "rows.parquet"


def verify_tables(run_dir: str | Path) -> bool:
    """Check rows.parquet / rows.csv against tables.json and the cells; rebuild them from the cells when a table
    is missing, damaged or stale. Returns True when they were rebuilt (and says why)."""

    run_dir = Path(run_dir)
    record_path = run_dir / TABLES_RECORD
    problem = ""
    try:
        record = json.loads(record_path.read_text())
        if record["cells_sha256"] != _cells_digest(run_dir / "cells"):
            damaged = damaged_cells(run_dir)
            problem = (f"cell file {damaged[0]} is damaged or unreadable ({len(damaged)} in all; left out of the "
                       "tables, and recomputed by the next `epbench run`)" if damaged
                       else "they are older than the cells")
        for name, sha in record["files"].items():
            p = run_dir / name
            if not problem and (not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != sha):
                problem = f"{p} is missing or damaged (sha256 differs from {record_path})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        problem = f"{record_path} is missing or damaged"
    if not problem:
        return False
    meta = _read_run_json(run_dir / "run.json") or {}
    print(f"[epbench] rebuilding the tables of {run_dir} from its cells: {problem}", flush=True)
    write_tables(run_dir, str(meta.get("suite", "unknown")), str(meta.get("git_commit", "unknown")))
    return True


def _damaged_cell(path: Path) -> bool:
    try:
        return bool(cell_problem(json.loads(path.read_text())))
    except (OSError, UnicodeDecodeError, ValueError):
        return True


def damaged_cells(run_dir: str | Path) -> list[Path]:
    """The cell files of a run that are unreadable, malformed or fail their checksum."""
    return [p for p in sorted((Path(run_dir) / "cells").glob("*.json")) if _damaged_cell(p)]


def prioritised(cells: list[Cell], patterns: list[str]) -> list[Cell]:
    """`cells` with those whose id matches a glob in `patterns` first, by the first pattern each matches, each group
    in its own order; the rest after them, in theirs. Every cell is computed as it would be in any order."""
    import fnmatch

    def rank(cell: Cell) -> int:
        return next((i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(cell.id, p)), len(patterns))

    return sorted(cells, key=rank)  # stable: the suite's order within each group


def run_suite(suite: Suite, results_dir: str | Path = "results", run_id: str | None = None, force: bool = False,
              progress: bool = True, report: bool = True, executor: str = "local", address: str | None = None,
              stop_at: float | None = None, amend: bool = False, first: list[str] | None = None) -> Run:
    """Run every cell (skipping finished ones), then write the report. `executor="ray"` runs the same cells on a
    Ray cluster (`address`; see bench.executors). `stop_at` (a time.time() value; local executor): start no cell
    after it; the cell in flight finishes, the run stays unfinished and says how to continue it. `amend`: accept a
    suite whose changes touch only method specs without finished cells (recorded in run.json `amendments`).
    `first`: glob patterns of cell ids to run before the others (`prioritised`)."""
    from tqdm.auto import tqdm

    if stop_at is not None and executor != "local":
        raise ValueError("a stop time applies to the local executor only; a Ray run stops when its cells do")
    run = Run(suite, results_dir, run_id, force, progress, amend=amend)
    cells = run.cells()
    todo = prioritised([c for c in cells if not run.is_done(c)], first or [])
    print(f"[epbench] suite {suite.name}: {len(cells)} cells, {len(cells) - len(todo)} already finished "
          f"-> {run.dir}", flush=True)
    left = 0
    if executor != "local":
        from bench.executors import run_cells

        run_cells(run, todo, executor, address=address, progress=progress)
    else:
        run.meta["executor"] = {"name": "local"}
        for i, cell in enumerate(tqdm(todo, desc=f"suite {suite.name}", unit="cell", disable=not progress)):
            if stop_at is not None and time.time() >= stop_at:
                left = len(todo) - i
                break
            run.run_cell(cell)
    if left:
        run.write_tables()
        print(f"[epbench] stop time {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stop_at))} reached: "
              f"{len(cells) - left} of {len(cells)} cells finished, {left} left; the same `epbench run` command (with "
              "a later stop time or none) continues it", flush=True)
    else:
        run.finish()
    if report:
        from bench.report import write_report

        print(f"[epbench] report: {write_report(run.dir)}", flush=True)
    return run
