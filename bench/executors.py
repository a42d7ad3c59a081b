"""Executors: where a suite's cells run. `local` (the default) is the runner's own loop in this process; `ray`
submits the same cells to a Ray cluster (`pip install 'epbench[ray]'`).

The Ray plan is the runner's work split along its real dependencies, with Ray doing the scheduling:

- one actor per model (`_ModelActor`) loads the model once; it extracts the build store and the evaluation-text
  stores (one extraction per store) and runs the model-in-the-loop families (causal, recon) on a GPU when the
  cluster has one;
- one build task per (model, method spec) fits every suite layer (memory request), after the extraction;
- one task per metric cell, after the builds whose artefacts it scores; cross-layer cells wait on builds that
  cover every layer.

Workers compute a cell with the runner's own `Run.run_cell` (in a private scratch run) and return its record;
the driver writes it to `results/<run-id>/cells/<cell>.json` atomically, exactly as a local run does, so a
rerun (local or Ray) resumes it. Everything a worker reads or writes besides its scratch lives under
`$EPBENCH_CACHE` (stores, artefacts) and the results directory: both must be the same path on every node.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from bench.cache import atomic_write_json, cache_dir
from bench.context import ModelContext, sae_spec
from bench.cells import Cell
from bench.runner import Run, write_cell
from bench.store import ActivationStore
from bench.suites import Suite

EXECUTORS = ("local", "ray")
DATA_KEY = "_run_data"  # carries a worker's run.json "data" (evaluation-data summary) back to the driver
# Families that run the model itself (interventions, spliced reconstructions): they run on the model's actor.
MODEL_FAMILIES = ("causal", "recon", "refusal", "compositional")
# Environment every worker needs to see as the driver does (shared cache path, offline hub, passive threads).
PASSED_ENV = ("EPBENCH_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
              "TOKENIZERS_PARALLELISM", "EPBENCH_FAULT_KILL", "EPBENCH_FAULT_DIR")


@dataclasses.dataclass
class RayConfig:
    """How a suite runs on Ray. Resource requests are per task; Ray places them."""

    address: str | None = None  # an existing cluster ("auto", "host:6379", "ray://host:10001"); None: start one here
    num_cpus: int | None = None  # CPUs of a cluster started here (None: all of this machine's)
    gpus_per_model: float | None = None  # GPUs each model actor holds (None: 1 when the cluster has a GPU and
    # the suite's device is not cpu, else 0)
    actor_cpus: float | None = None  # CPUs each model actor holds (None: Ray's default, 1 to place it, 0 held)
    build_memory_gb: float = 2.0  # memory reserved by each build task (EP, SAE training, k-means)
    build_gpus: float = 0.0  # GPUs per build task (EP discovery is much faster on a GPU: see bench.benchmarks)
    max_retries: int = 3  # re-runs of a task or actor call whose worker died; errors in the code are not retried


class Prepared(NamedTuple):
    """What a model's extraction step hands to the tasks of that model."""

    store_path: str  # the build store, on the shared cache
    ood_texts: dict[str, list[str]] | None  # the OOD sets (made with the model's tokenizer), None if not needed
    tokenizer: Any  # the model's tokenizer: tasks count tokens without loading the model


class RowsDiff(NamedTuple):
    """How two runs' rows differ, timings aside."""

    n_rows: int  # rows compared (present in both runs)
    missing: list[str]  # row keys only in the reference run
    extra: list[str]  # row keys only in the other run
    mismatched: list[str]  # "key: reference value vs other value"

    @property
    def same(self) -> bool:
        return not (self.missing or self.extra or self.mismatched)


class Failure(NamedTuple):
    unit: str  # cell id, or build:<model>:<spec>, or extract:<model>
    error: str


# Metrics that measure this machine (time, memory, throughput) rather than the method: they differ run to run.
MACHINE_METRICS = ("build.wall_seconds", "build.peak_memory_mb", "cost.encode_rows_per_s", "cost.build.wall_seconds",
                   "cost.build.peak_memory_bytes")
ROW_KEY = ("model", "layer", "method", "metric", "detail")
ROW_VALUES = ("value", "ci_low", "ci_high", "n", "method_config", "supervised", "seed")


def diff_rows(reference: str | Path, other: str | Path, rtol: float = 0.0, atol: float = 0.0,
              ignore: tuple[str, ...] = MACHINE_METRICS) -> RowsDiff:
    """Compare the rows.parquet of two run directories (values within rtol/atol; NaN equals NaN)."""
    import math

    import pandas as pd

    def load(d: str | Path) -> dict[tuple, dict[str, Any]]:
        path = Path(d) / "rows.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the suite into {d} first (epbench run ...)")
        df = pd.read_parquet(path)
        df = df[~df["metric"].isin(ignore)]
        out: dict[tuple, dict[str, Any]] = {}
        seen: dict[tuple, int] = {}
        for r in df.to_dict("records"):
            key = tuple(r[k] for k in ROW_KEY)
            seen[key] = seen.get(key, 0) + 1  # a repeated key is compared in order, never overwritten
            out[(*key, seen[key])] = r
        return out

    a, b = load(reference), load(other)
    mismatched = []
    for key in sorted(set(a) & set(b), key=str):
        for col in ROW_VALUES:
            x, y = a[key][col], b[key][col]
            if isinstance(x, float) and isinstance(y, float):
                ok = (math.isnan(x) and math.isnan(y)) or abs(x - y) <= atol + rtol * abs(x)
            else:
                ok = x == y
            if not ok:
                mismatched.append(f"{'/'.join(map(str, key))} {col}: {x!r} vs {y!r}")
    return RowsDiff(len(set(a) & set(b)), [str(k) for k in sorted(set(a) - set(b), key=str)],
                    [str(k) for k in sorted(set(b) - set(a), key=str)], mismatched)


# ---------------------------------------------------------------------------------------------------------
# The plan: pure data, testable without Ray


def extract_unit(model: str) -> str:
    return f"extract:{model}"


def build_unit(model: str, label: str) -> str:
    return f"build:{model}:{label}"


def cell_builds(suite: Suite, cell: Cell) -> list[str]:
    """Method-spec labels whose artefacts a cell reads (its own; EP's cost and correspondence also read the SAE)."""
    labels = [cell.spec]
    sae = sae_spec(suite)
    spec = next(s for s in suite.methods if s.label == cell.spec)
    if sae is not None and spec.method == "ep" and cell.family in ("cost", "correspondence"):
        labels.append(sae.label)
    return labels


def plan_units(suite: Suite, cells: list[Cell]) -> dict[str, list[str]]:
    """Every unit of work the cells need, mapped to the units it waits for, each after its dependencies:
    extract <- build (<- the builds a budget-matched spec copies K or tokens from) <- cell."""
    deps: dict[str, list[str]] = {}

    def add_build(model: str, label: str) -> str:
        unit = build_unit(model, label)
        if unit not in deps:
            spec = next(s for s in suite.methods if s.label == label)
            targets = [add_build(model, t) for t in getattr(spec, "match_to", None) or []]
            deps[unit] = [extract_unit(model), *targets]
        return unit

    for cell in cells:
        deps.setdefault(extract_unit(cell.model), [])
        deps[cell.id] = [add_build(cell.model, label) for label in cell_builds(suite, cell)]
    return deps


# ---------------------------------------------------------------------------------------------------------
# Worker side


class _ClusterContext(ModelContext):
    """A ModelContext on a Ray worker: stores opened from the shared cache, artefacts only loaded (builds run in
    their own tasks), the model loaded only on its actor."""

    def __init__(self, suite: Suite, model: str, prepared: Prepared | None, may_build: bool, has_model: bool):
        store = ActivationStore(prepared.store_path) if prepared is not None else None
        super().__init__(suite, model, progress=False, store=store)
        if prepared is not None and prepared.ood_texts is not None:
            self.__dict__["ood_texts"] = prepared.ood_texts
        self.may_build, self.has_model, self.prepared = may_build, has_model, prepared

    @cached_property
    def backend(self):
        if not self.has_model:
            return _TokenizerOnly(self.model_name, self.prepared.tokenizer if self.prepared else None)
        return ModelContext.backend.func(self)

    def build(self, spec, fits_dir=None):
        if not self.may_build:
            raise RuntimeError(f"artefacts of {spec.label} ({self.model_name}) were not built before this cell: "
                               "bench.executors.cell_builds misses a dependency")
        return super().build(spec, fits_dir)


class _TokenizerOnly:
    """The model backend as a task without the model sees it: its tokenizer, and a clear error for the rest."""

    def __init__(self, model: str, tokenizer: Any):
        self.model_name, self.tokenizer = model, tokenizer

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"a task without the model used {self.model_name}'s backend.{name}: only the model's "
                           "actor loads it (add the family to bench.executors.MODEL_FAMILIES)")


class _WorkerRun(Run):
    """The runner's Run in a private scratch folder: `run_cell` computes exactly as locally; the driver writes
    the record into the real run. Extras (per-unit arrays) go straight to the real run's extras/."""

    def __init__(self, suite: Suite, run_id: str, extras_dir: str, prepared: Prepared | None, may_build: bool,
                 has_model: bool):
        scratch = tempfile.mkdtemp(prefix="epbench-worker-")
        atexit.register(shutil.rmtree, scratch, True)
        super().__init__(suite, scratch, run_id, progress=False)
        self.extras_dir, self.prepared = Path(extras_dir), prepared
        self.may_build, self.has_model = may_build, has_model
        self._cluster_contexts: dict[str, _ClusterContext] = {}

    def context(self, model: str) -> ModelContext:
        if model not in self._cluster_contexts:
            ctx = _ClusterContext(self.suite, model, self.prepared, self.may_build, self.has_model)
            ctx.extras_dir = self.extras_dir
            self._cluster_contexts[model] = ctx
        return self._cluster_contexts[model]

    def compute(self, cell: Cell) -> dict[str, Any]:
        """The cell's record (rows and provenance), computed here; the scratch copy is removed."""
        self.run_cell(cell)
        path = self.cell_path(cell)
        record = json.loads(path.read_text())
        path.unlink()
        record["executor"] = {"name": "ray", "node": socket.gethostname(), "pid": os.getpid()}
        record[DATA_KEY] = self.meta.get("data", {})  # what run_cell recorded for run.json; the driver merges it
        return record


_TASK_RUNS: dict[tuple[str, str, str], _WorkerRun] = {}  # one per (suite, run, store) in each worker process


def _task_run(suite: Suite, run_id: str, extras_dir: str, prepared: Prepared, may_build: bool) -> _WorkerRun:
    """This worker process's run for the suite: contexts (concept sets, text activations) persist across tasks."""
    key = (suite.key(), run_id, prepared.store_path + str(may_build))
    if key not in _TASK_RUNS:
        _TASK_RUNS[key] = _WorkerRun(suite, run_id, extras_dir, prepared, may_build, has_model=False)
    return _TASK_RUNS[key]


def _fault_point(unit: str) -> None:
    """Fault injection for tests: EPBENCH_FAULT_KILL names units (comma-separated) whose worker is SIGKILLed once,
    after the unit's work and before its result reaches the driver; EPBENCH_FAULT_DIR keeps the once-markers."""
    names = os.environ.get("EPBENCH_FAULT_KILL", "")
    if unit not in names.split(","):
        return
    marker = Path(os.environ["EPBENCH_FAULT_DIR"]) / (unit.replace("/", "_").replace(":", "_") + ".killed")
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def _build_task(suite: Suite, run_id: str, extras_dir: str, model: str, label: str, prepared: Prepared,
                *upstream: str) -> str:
    """Fit (or load from the artefact cache) one method spec at every suite layer, after the builds it copies
    a budget from (`upstream`)."""
    run = _task_run(suite, run_id, extras_dir, prepared, may_build=True)
    ctx = run.context(model)
    for layer in ctx.spec_layers(ctx.spec(label)):
        ctx.artefacts(label, layer)
    _fault_point(build_unit(model, label))
    return label


def _cell_task(suite: Suite, run_id: str, extras_dir: str, cell: Cell, prepared: Prepared, *builds: str
               ) -> dict[str, Any]:
    """One metric cell, after the builds it reads (`builds` are their results, passed so Ray orders them)."""
    record = _task_run(suite, run_id, extras_dir, prepared, may_build=False).compute(cell)
    _fault_point(cell.id)
    return record


class _ModelActor:
    """Holds one model: extracts its stores, then runs the cells that need the model in the loop."""

    def __init__(self, suite: Suite, run_id: str, extras_dir: str, model: str):
        self.model = model
        self.run = _WorkerRun(suite, run_id, extras_dir, None, may_build=False, has_model=True)

    def prepare(self) -> Prepared:
        """Extract (or reuse) the build store and every evaluation-text store, once for the whole cluster."""
        ctx = self.run.context(self.model)
        suite = ctx.suite
        store = ctx.store
        for name, cs in ctx.concept_sets.items():
            ctx.text_store(f"concepts:{name}", cs.texts())
        ood = ctx.ood_texts if "ood" in suite.metrics else None
        for name, texts in (ood or {}).items():
            ctx.text_store(f"ood:{name}", texts)
        _fault_point(extract_unit(self.model))
        return Prepared(str(store.path), ood, ctx.backend.tokenizer)

    def run_cell(self, cell: Cell, prepared: Prepared, *builds: str) -> dict[str, Any]:
        record = self.run.compute(cell)
        _fault_point(cell.id)
        return record


# ---------------------------------------------------------------------------------------------------------
# Driver side


def _worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env["EPBENCH_CACHE"] = str(cache_dir().resolve())  # workers must use the driver's (shared) cache
    # Ray starts workers with one OpenMP thread; float reductions (SAE training, k-means) then round differently
    # from a driver with more. Workers use the driver's count unless the environment sets one.
    import torch

    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


def cluster_info(ray: Any) -> dict[str, Any]:
    """What the run was executed on: Ray version, address, nodes and their resources."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"ray_version": ray.__version__, "address": ray.get_runtime_context().gcs_address,
            "nodes": [{"host": n.get("NodeManagerHostname"), "resources": n.get("Resources", {})} for n in nodes],
            "cluster_resources": ray.cluster_resources()}


def _error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"


def check_address(address: str | None, timeout: float = 3.0) -> None:
    """Refuse, in one line and within `timeout` seconds, a Ray address nothing listens on ("host:port" or
    "ray://host:port"). None and "auto"/"local" are left to Ray (start one here / find the local one)."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address {address!r} is not host:port or ray://host:port (e.g. 10.0.0.5:6379, "
                         "ray://10.0.0.5:10001, or auto)")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise RuntimeError(f"no Ray cluster answers at --address {address} ({e.strerror or type(e).__name__}); "
                           "start one there (`ray start --head`), pass its right address, or leave --address out "
                           "to start one on this machine") from None


def run_on_ray(run: Run, cells: list[Cell], config: RayConfig | None = None, progress: bool = True,
               raise_on_failure: bool = True) -> list[Failure]:
    """Compute `cells` of `run` on Ray and write each finished cell file; returns (or raises naming) failures.

    Every cell whose dependencies succeed finishes even when others fail; failed cells leave no file, so a
    rerun retries exactly them.
    """
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("the ray executor needs Ray: pip install 'epbench[ray]' (or -e '.[ray]')") from e
    cfg = config or RayConfig()
    if not cells:
        return []  # nothing left to compute (a resumed run): no cluster needed
    started_here = not ray.is_initialized()
    env = _worker_env()
    if started_here:
        check_address(cfg.address)  # a dead address fails here in seconds (Ray itself retries for minutes)
        ray.init(address=cfg.address, num_cpus=cfg.num_cpus if cfg.address is None else None,
                 include_dashboard=False, log_to_driver=progress, runtime_env={"env_vars": env})
    try:
        return _submit_and_collect(ray, run, cells, cfg, env, progress, raise_on_failure)
    finally:
        if started_here:
            ray.shutdown()


def _submit_and_collect(ray: Any, run: Run, cells: list[Cell], cfg: RayConfig, env: dict[str, str],
                        progress: bool, raise_on_failure: bool) -> list[Failure]:
    from tqdm.auto import tqdm

    suite = run.suite
    run.meta["executor"] = {"name": "ray", "config": dataclasses.asdict(cfg), "cluster": cluster_info(ray)}
    atomic_write_json(run.dir / "run.json", run.meta)
    for model in dict.fromkeys(c.model for c in cells):
        run.context(model)  # fails fast (hub access) before anything is submitted
    extras = str((run.dir / "extras").resolve())
    runtime_env = {"env_vars": env}
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1 and suite.device != "cpu"
    gpus = cfg.gpus_per_model if cfg.gpus_per_model is not None else (1.0 if has_gpu else 0.0)
    actor_opts: dict[str, Any] = {"num_gpus": gpus, "max_restarts": cfg.max_retries,
                                  "max_task_retries": cfg.max_retries, "runtime_env": runtime_env}
    if cfg.actor_cpus is not None:
        actor_opts["num_cpus"] = cfg.actor_cpus
    actor_cls = ray.remote(_ModelActor)
    build_fn = ray.remote(_build_task).options(num_cpus=1, num_gpus=cfg.build_gpus,
                                               memory=int(cfg.build_memory_gb * 2**30),
                                               max_retries=cfg.max_retries, runtime_env=runtime_env)
    cell_fn = ray.remote(_cell_task).options(num_cpus=1, max_retries=cfg.max_retries, runtime_env=runtime_env)

    deps = plan_units(suite, cells)
    refs: dict[str, Any] = {}  # unit -> ObjectRef; units come after their dependencies
    actors: dict[str, Any] = {}
    by_ref: dict[Any, Cell] = {}
    cell_of = {c.id: c for c in cells}
    for unit, waits in deps.items():
        upstream = [refs[u] for u in waits]
        if unit.startswith("extract:"):
            model = unit.split(":", 1)[1]
            actors[model] = actor_cls.options(**actor_opts).remote(suite, run.run_id, extras, model)
            refs[unit] = actors[model].prepare.remote()
        elif unit.startswith("build:"):
            _, model, label = unit.split(":", 2)
            refs[unit] = build_fn.remote(suite, run.run_id, extras, model, label, *upstream)
        else:
            cell = cell_of[unit]
            prepared = refs[extract_unit(cell.model)]
            if cell.family in MODEL_FAMILIES:
                refs[unit] = actors[cell.model].run_cell.remote(cell, prepared, *upstream)
            else:
                refs[unit] = cell_fn.remote(suite, run.run_id, extras, cell, prepared, *upstream)
            by_ref[refs[unit]] = cell

    failures: list[Failure] = []
    failed_units: set[str] = set()
    wall = 0.0
    pending = list(by_ref)
    bar = tqdm(total=len(pending), desc=f"suite {suite.name} (ray)", unit="cell", disable=not progress)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        cell = by_ref[done[0]]
        try:
            record = ray.get(done[0])
        except ray.exceptions.RayError as e:
            failures.append(_name_failure(ray, cell, deps, refs, failed_units, e))
            bar.update(1)
            continue
        record["git_commit"], record["sitting"] = run.meta["git_commit"], run.sitting
        for model, summary in record.pop(DATA_KEY, {}).items():
            _merge(run.meta.setdefault("data", {}).setdefault(model, {}), summary)
        write_cell(run.cell_path(cell), record)  # with its checksum, over the fields added here
        wall += float(record["wall_seconds"])
        bar.update(1)
    bar.close()
    run.meta["wall_seconds"] = float(run.meta.get("wall_seconds", 0.0)) + wall
    atomic_write_json(run.dir / "run.json", run.meta)
    run.write_tables()
    if failures:
        lines = "\n".join(f"  {f.unit}: {f.error}" for f in failures)
        msg = (f"{len(failures)} of {len(cells)} cells failed on Ray (the other cells are written; rerun to "
               f"retry these):\n{lines}")
        if raise_on_failure:
            raise RuntimeError(msg)
        print(f"[epbench] {msg}", flush=True)
    return failures


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Nested dict update: workers each report the evaluation data they touched."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _name_failure(ray: Any, cell: Cell, deps: dict[str, list[str]], refs: dict[str, Any], failed_units: set[str],
                  err: BaseException) -> Failure:
    """The failure of a cell, blamed on the first upstream unit that failed (its build or extraction) if any."""
    for unit in [extract_unit(cell.model), *deps[cell.id]]:
        if unit in failed_units:
            return Failure(cell.id, f"not run: {unit} failed")
        try:
            ray.get(refs[unit], timeout=0)
        except ray.exceptions.GetTimeoutError:
            continue  # still running: it did not fail
        except ray.exceptions.RayError as up:
            failed_units.add(unit)
            return Failure(cell.id, f"not run: {unit} failed: {_error_text(up)}")
    return Failure(cell.id, _error_text(err))


def run_cells(run: Run, cells: list[Cell], executor: str, address: str | None = None, progress: bool = True,
              raise_on_failure: bool = True) -> list[Failure]:
    """Run `cells` with a non-local executor (the local loop lives in bench.runner.run_suite)."""
    if executor not in EXECUTORS or executor == "local":
        raise ValueError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)} (local runs in run_suite)")
    t0 = time.perf_counter()
    failures = run_on_ray(run, cells, RayConfig(address=address), progress, raise_on_failure)
    if progress:
        print(f"[epbench] ray: {len(cells) - len(failures)} of {len(cells)} cells in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return failures
