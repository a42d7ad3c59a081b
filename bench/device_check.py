"""The whole harness on a GPU, checked against the CPU: `python -m bench.device_check` (one table, exit 1 on a
mismatch).

Checks, each a row of the table:
1. extraction: tiny Gemma-2 activations on the device (fp32, and bf16 as the paper suite loads Gemma-2 on CUDA)
   against fp32 on the CPU;
2. the smoke suite on the device and on the CPU (CUDA hidden), both scoring the same stored activations: every
   row equal within tolerance, every EP exemplar decision identical;
3. EP (fp32, and opt-in TF32: reported, not failed) and SAE builds at d=2304 (`tiny-gemma2-wide`) on the device
   against the CPU;
4. the speed and memory benchmarks (`bench.benchmarks`) on this machine.

A bare GPU machine has torch but maybe not transformer-lens, sae-lens, faiss...: the script names what is missing
and installs it from a wheelhouse brought along with the checkout (`--wheelhouse DIR`, `pip install --no-index
--no-deps`, only distributions not installed, so torch is never touched). Build the wheelhouse on a machine with
network: `python -m bench.device_check --build-wheelhouse wheelhouse [--have target-freeze.txt]` (exact versions
of this venv; `--have` drops what the target already has; fails above 64 MiB). `--device cpu --quick` runs every
step CPU against CPU in about a minute (tests/test_device_check.py), so the script cannot rot without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

# Modules the harness imports at run time (top-level names); a missing one stops the check before any work.
RUNTIME_MODULES = ("numpy", "pandas", "pyarrow", "scipy", "sklearn", "safetensors", "yaml", "tqdm", "psutil",
                   "transformers", "transformer_lens", "sae_lens", "faiss", "gguf")
# Distributions a CUDA torch image brings, never put in a wheelhouse (they would replace its CUDA build).
TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|setuptools|pip|wheel)$")
WHEELHOUSE_LIMIT_MB = 64.0
SMOKE_QUICK = {"methods": ["ep"], "metrics": ["build", "retrieval", "recon"]}  # --quick: SAE runs in the d=2304 step
# CPU vs GPU: float reductions run in another order; rows agree to this tolerance (exemplar decisions: exactly).
ROW_RTOL, ROW_ATOL = 1e-3, 1e-4


class CheckRow(NamedTuple):
    check: str
    value: str
    target: str
    ok: bool | None  # None: informational (reported, never fails the run)


class ExemplarComparison(NamedTuple):
    """Whether two EP builds on the same stream made the same decisions (which rows became exemplars)."""

    K_reference: int
    K_other: int
    first_difference: int | None  # index of the first exemplar that differs; None when identical
    n_different: int  # exemplars (by position in creation order) whose source row differs

    @property
    def identical(self) -> bool:
        return self.first_difference is None


def compare_exemplars(reference: Any, other: Any) -> ExemplarComparison:
    """Compare two EP artefacts' exemplar sources (context, position) in creation order."""
    ra = reference.tensors
    oa = other.tensors
    src_r = list(zip(ra["exemplar_context"].tolist(), ra["exemplar_position"].tolist()))
    src_o = list(zip(oa["exemplar_context"].tolist(), oa["exemplar_position"].tolist()))
    diff = [i for i, (a, b) in enumerate(zip(src_r, src_o)) if a != b]
    diff += list(range(min(len(src_r), len(src_o)), max(len(src_r), len(src_o))))
    return ExemplarComparison(len(src_r), len(src_o), diff[0] if diff else None, len(diff))


# ---------------------------------------------------------------------------------------------------------
# Requirements and the wheelhouse


def missing_modules() -> list[str]:
    """Runtime modules that cannot be imported here."""
    out = []
    for name in RUNTIME_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


def install_from_wheelhouse(wheelhouse: Path) -> list[str]:
    """Install every wheel of `wheelhouse` whose distribution is not installed (no index, no dependency
    resolution: torch and anything present stay as they are); returns the distributions installed."""
    if not wheelhouse.is_dir():
        raise FileNotFoundError(f"wheelhouse {wheelhouse} does not exist; build it where there is network with "
                                "`python -m bench.device_check --build-wheelhouse DIR` and bring it with the checkout")
    wheels = [w for w in sorted(wheelhouse.glob("*.whl")) if not _installed(_dist_name(w))]
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        *map(str, wheels)], check=True)
        importlib.invalidate_caches()
    return [_dist_name(w) for w in wheels]


def runtime_distributions() -> dict[str, str]:
    """Distributions (name -> version installed here) behind every module the harness imports at run time."""
    import pkgutil

    import methods
    import metrics

    for name in ("bench.runner", "bench.cli", "bench.models", "bench.store", "bench.corpora", "bench.concepts",
                 "bench.prompts", "bench.activations", "bench.benchmarks", *RUNTIME_MODULES):
        importlib.import_module(name)
    for pkg in (methods, metrics):
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    importlib.import_module("sae_lens.training.sae_trainer")  # SAE training imports more than `import sae_lens`
    by_module = md.packages_distributions()
    out = {}
    for top in {m.split(".")[0] for m in sys.modules}:
        for dist in by_module.get(top, []):
            name = dist.lower().replace("_", "-")
            if not TORCH_FAMILY.match(name) and name != "epbench":
                out[name] = md.version(dist)
    return dict(sorted(out.items()))


def build_wheelhouse(dest: Path, have: Sequence[str] = (), python_version: str | None = None) -> tuple[float, list]:
    """Download (pip download, binary wheels, exact versions of this venv, no deps) what the harness imports,
    less `have`; returns (total MiB, [(MiB, wheel)] largest first)."""
    skip = {h.lower().replace("_", "-") for h in have}
    pins = [f"{n}=={v}" for n, v in runtime_distributions().items() if n not in skip]
    dest.mkdir(parents=True, exist_ok=True)
    pyver = python_version or f"{sys.version_info.major}{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", pyver, "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", *pins]
    print("[device_check]", " ".join(cmd[:16]), f"... ({len(pins)} pins)", flush=True)
    subprocess.run(cmd, check=True)
    sizes = sorted(((w.stat().st_size / 2**20, w.name) for w in dest.glob("*.whl")), reverse=True)
    return sum(s for s, _ in sizes), sizes


def _read_freeze(path: str | None) -> list[str]:
    if not path:
        return []
    return [re.split(r"[=<>@ ]", line.strip())[0] for line in Path(path).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------------------------------------------------
# Checks


def check_extraction(device: str, quick: bool) -> list[CheckRow]:
    """tiny-gemma2 activations: device fp32 and bf16 against CPU fp32, on the same token batch."""
    import copy

    import torch

    from bench.models import load_tiny

    cpu = load_tiny("tiny-gemma2", "cpu")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 250, (4 if quick else 16, 64), generator=g)
    layers = [1, 2]
    ref = cpu.run_layers(tokens, layers)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(cpu.model).to(device).to(dtype)  # the same weights, moved and cast
        model.cfg.device, model.cfg.dtype = device, dtype
        out = _run_with(cpu, model, tokens.to(device), layers)
        err = max(float((out[L].float().cpu() - ref[L]).abs().max() / ref[L].abs().max()) for L in layers)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        name = "fp32" if dtype == torch.float32 else "bf16 (paper-suite dtype on CUDA)"
        rows.append(CheckRow(f"extraction {name} vs CPU fp32: max rel. error", f"{err:.2e}", f"<= {tol:g}",
                             err <= tol))
    return rows


def _run_with(backend: Any, model: Any, tokens: Any, layers: list[int]) -> dict[int, Any]:
    """Run `backend`'s layer capture with another model object (same weights, other device/dtype)."""
    return dataclasses.replace(backend, model=model).run_layers(tokens, layers)


def _suite_for(device: str, quick: bool):
    from bench.cli import narrow_suite
    from bench.suites import get_suite

    suite = get_suite("smoke")
    if quick:
        suite = narrow_suite(suite, methods=SMOKE_QUICK["methods"], metrics=SMOKE_QUICK["metrics"])
    return dataclasses.replace(suite, device=device)


def _child(args: list[str], cache: Path, hide_cuda: bool, timeout: float = 1800) -> None:
    """Run a step of this script in a child process (fresh CUDA state; CUDA hidden for the CPU reference)."""
    env = {**os.environ, "EPBENCH_CACHE": str(cache)}
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-m", "bench.device_check", *args], env=env, check=True, timeout=timeout)


def check_smoke(device: str, quick: bool, work: Path) -> list[CheckRow]:
    """The smoke suite on `device` and on the CPU, both on the CPU-extracted store: rows and EP exemplars."""
    from bench.executors import diff_rows

    cpu_cache, dev_cache = work / "cache_cpu", work / "cache_dev"
    q = ["--quick"] if quick else []
    t0 = time.perf_counter()
    _child(["--_suite", "cpu", str(work / "res_cpu"), *q], cpu_cache, hide_cuda=True)
    t_cpu = time.perf_counter() - t0
    shutil.copytree(cpu_cache / "stores", dev_cache / "stores", dirs_exist_ok=True)  # same activations
    if (cpu_cache / "models").exists():
        shutil.copytree(cpu_cache / "models", dev_cache / "models", dirs_exist_ok=True)
    t0 = time.perf_counter()
    _child(["--_suite", device, str(work / "res_dev"), *q], dev_cache, hide_cuda=device == "cpu")
    t_dev = time.perf_counter() - t0
    run_cpu, run_dev = (next((work / r).iterdir()) for r in ("res_cpu", "res_dev"))
    diff = diff_rows(run_cpu, run_dev, rtol=ROW_RTOL, atol=ROW_ATOL)
    for line in (diff.missing + diff.extra + diff.mismatched)[:20]:
        print(f"[device_check] smoke mismatch: {line}", flush=True)
    rows = [CheckRow(f"smoke suite ({'quick' if quick else 'full'}) on {device}: wall s (CPU {t_cpu:.0f} s)",
                     f"{t_dev:.0f}", "-", None),
            CheckRow(f"smoke rows equal to CPU (rtol {ROW_RTOL:g}, atol {ROW_ATOL:g})",
                     f"{diff.n_rows - len(diff.mismatched)}/{diff.n_rows} ({len(diff.missing)} missing, "
                     f"{len(diff.extra)} extra)", "all", diff.same and diff.n_rows > 0)]
    from methods.base import load_artefact

    pairs = _ep_artefact_pairs(cpu_cache, dev_cache)
    bad = [p for p, (a, b) in pairs.items() if not compare_exemplars(load_artefact(a), load_artefact(b)).identical]
    rows.append(CheckRow("smoke EP artefacts with identical exemplars", f"{len(pairs) - len(bad)}/{len(pairs)}",
                         "all", bool(pairs) and not bad))
    return rows


def _ep_artefact_pairs(a_cache: Path, b_cache: Path) -> dict[str, tuple[Path, Path]]:
    """EP artefact folders present in both caches, by their path under artefacts/."""
    out = {}
    for cfg in sorted((a_cache / "artefacts").rglob("cfg.json")):
        if not any(part.startswith("ep-") for part in cfg.parts):
            continue
        rel = cfg.parent.relative_to(a_cache)
        if (b_cache / rel / "cfg.json").exists():
            out[str(rel)] = (a_cache / rel, b_cache / rel)
    return out


def check_wide_builds(device: str, quick: bool, work: Path) -> list[CheckRow]:
    """EP (fp32 and TF32) and a TopK SAE at d=2304 on `device`, against the CPU, on one CPU-extracted store."""
    import torch

    from bench.store import ExtractionRequest, extract
    from methods.exemplar_partitioning import ExemplarPartitioning
    from methods.sae import SAEMethod

    tokens = 2_000 if quick else 60_000
    store = extract(ExtractionRequest(model="tiny-gemma2-wide", layers=[1], corpus="default", tokens=tokens,
                                      ctx_len=128), root=work / "stores", progress=False, device="cpu")
    ep = {"percentiles": [2.0], "n_calib": 2000, "batch_contexts": 4 if quick else 32}
    rows = []
    builds = {}
    for name, dev, extra in (("cpu fp32", "cpu", {}), (f"{device} fp32", device, {}),
                             (f"{device} tf32", device, {"tf32": True})):
        t0 = time.perf_counter()
        builds[name] = ExemplarPartitioning(**ep, device=dev, **extra).fit(store, 1)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append(CheckRow(f"EP d=2304 {name}: K, rows/s", f"K={builds[name].K}, "
                             f"{builds[name].cost.rows / (time.perf_counter() - t0):,.0f}", "-", None))
    same = compare_exemplars(builds["cpu fp32"], builds[f"{device} fp32"])
    rows.append(CheckRow(f"EP d=2304 exemplars {device} fp32 = CPU", _describe(same), "identical", same.identical))
    tf = compare_exemplars(builds[f"{device} fp32"], builds[f"{device} tf32"])
    rows.append(CheckRow(f"EP d=2304 TF32 decisions vs fp32 ({device})", _describe(tf), "reported", None))

    sae = {"architecture": "topk", "width": 128 if quick else 4096, "k": 16, "training_tokens": 1024 if quick
           else 20_000, "batch_rows": 128 if quick else 512, "buffer_rows": 512 if quick else 2048,
           "progress": False}
    ev = {}
    for dev in dict.fromkeys(("cpu", device)):
        art = SAEMethod(**sae, device=dev).fit(store, 1)
        ev[dev] = float(art.info.get("explained_variance", float("nan")))
        rows.append(CheckRow(f"SAE TopK d=2304 width {sae['width']} on {dev}: held-out EV", f"{ev[dev]:.4f}", "-",
                             None))
    gap = abs(ev["cpu"] - ev[device])
    rows.append(CheckRow(f"SAE EV {device} vs CPU: |difference|", f"{gap:.4f}", "<= 0.02", gap <= 0.02))
    return rows


def _describe(c: ExemplarComparison) -> str:
    if c.identical:
        return f"identical (K={c.K_reference})"
    return f"{c.n_different} differ, first at #{c.first_difference} (K {c.K_reference} vs {c.K_other})"


def check_benchmarks(quick: bool) -> list[CheckRow]:
    """bench.benchmarks in a child process: its PASS/FAIL lines, counted."""
    out = subprocess.run([sys.executable, "-m", "bench.benchmarks", *(["--quick"] if quick else [])],
                         capture_output=True, text=True, timeout=3600)
    print(out.stdout, flush=True)
    n_pass, n_fail = out.stdout.count("PASS"), out.stdout.count("FAIL")
    return [CheckRow("benchmarks (bench.benchmarks): targets passed", f"{n_pass}/{n_pass + n_fail}", "all",
                     out.returncode == 0 and n_fail == 0 and n_pass > 0)]


def print_table(rows: list[CheckRow]) -> None:
    w = max(len(r.check) for r in rows)
    v = max(len(r.value) for r in rows)
    print(f"\n{'check':<{w}}  {'value':<{v}}  {'target':<10}  verdict")
    for r in rows:
        verdict = "info" if r.ok is None else ("PASS" if r.ok else "FAIL")
        print(f"{r.check:<{w}}  {r.value:<{v}}  {r.target:<10}  {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="device under test (default: cuda; cpu checks CPU against CPU)")
    ap.add_argument("--quick", action="store_true", help="smaller suite and builds (the CPU-only test uses it)")
    ap.add_argument("--wheelhouse", default="wheelhouse", help="wheels for what is missing (default ./wheelhouse)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["extraction", "smoke", "wide", "benchmarks"])
    ap.add_argument("--build-wheelhouse", metavar="DIR", help="download the wheels a bare GPU machine needs, then exit")
    ap.add_argument("--have", default=None, help="with --build-wheelhouse: the target's `pip freeze` (left out)")
    ap.add_argument("--python-version", default=None, help="with --build-wheelhouse: the target's, e.g. 311")
    ap.add_argument("--_suite", nargs=2, metavar=("DEVICE", "RESULTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.build_wheelhouse:
        total, sizes = build_wheelhouse(Path(args.build_wheelhouse), _read_freeze(args.have), args.python_version)
        for mb, name in sizes[:10]:
            print(f"{mb:8.1f} MiB  {name}")
        print(f"wheelhouse {args.build_wheelhouse}: {len(sizes)} wheels, {total:.1f} MiB "
              f"(limit {WHEELHOUSE_LIMIT_MB:g})")
        return 0 if total <= WHEELHOUSE_LIMIT_MB else 1
    if args._suite:
        from bench.runner import run_suite

        run_suite(_suite_for(args._suite[0], args.quick), args._suite[1], progress=False, report=False)
        return 0

    missing = missing_modules()
    if missing:
        print(f"[device_check] missing modules: {', '.join(missing)}; installing from {args.wheelhouse}", flush=True)
        installed = install_from_wheelhouse(Path(args.wheelhouse))
        print(f"[device_check] installed {len(installed)} distributions: {', '.join(installed)}", flush=True)
        still = missing_modules()
        if still:
            print(f"[device_check] error: still missing {', '.join(still)}; rebuild the wheelhouse with "
                  "`python -m bench.device_check --build-wheelhouse wheelhouse --have <target pip freeze>`",
                  file=sys.stderr)
            return 2
    import torch

    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("[device_check] error: no CUDA device here; run on a GPU machine, or --device cpu to check the CPU "
              "path against itself", file=sys.stderr)
        return 2
    rows = [CheckRow("torch / device", f"{torch.__version__} / " + (torch.cuda.get_device_name(0)
                     if device.startswith("cuda") else "cpu"), "-", None)]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="epbench-device-check-"))
    try:
        steps = {"extraction": lambda: check_extraction(device, args.quick),
                 "smoke": lambda: check_smoke(device, args.quick, work),
                 "wide": lambda: check_wide_builds(device, args.quick, work),
                 "benchmarks": lambda: check_benchmarks(args.quick)}
        for name, step in steps.items():
            if name in args.skip:
                continue
            t0 = time.perf_counter()
            try:
                rows += step()
                rows.append(CheckRow(f"{name}: step wall seconds", f"{time.perf_counter() - t0:.0f}", "-", None))
            except Exception as e:  # noqa: BLE001 - a crashed step is a failed check, and the others still run
                rows.append(CheckRow(f"{name}: crashed", f"{type(e).__name__}: {e}"[:120], "no error", False))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    failed = [r.check for r in rows if r.ok is False]
    print(f"\n[device_check] {'FAILED: ' + '; '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
