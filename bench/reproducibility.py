"""How exactly a trained SAE reproduces: the platform provenance runs and artefacts record, and a measurement.

    python -m bench.reproducibility            # the default suite's TopK SAE (w2048, k32, 3 epochs; minutes)
    python -m bench.reproducibility --quick    # a w512 SAE on a 6k-row store (10 epochs): a few minutes
    python -m bench.reproducibility --json OUT.json

Provenance (`cpu_info`, `blas_info`): the CPU as /proc/cpuinfo names it (model name, family/model/stepping, the ISA
flags kernels dispatch on, cache sizes, which MKL's blocking depends on) and the BLAS torch was built with (MKL or
OpenBLAS, version, MKL's conditional-reproducibility branch `MKL_CBWR` when set, ATen's CPU capability).
`bench.runner.machine_info` (run.json; `platform_summary`) and the trained SAE's info
(`training.reproducibility`) record them.

The measurement trains the same SAE on the same synthetic store (d = 576 as SmolLM2-135M, 312 contexts x 128 tokens
as the default suite's 40k-token store; sparse planted features, 20 "topic" features for a detection number) in a
fresh interpreter per configuration:

| configuration | what differs from `reference` (2 threads, seed 0) |
|---|---|
| `rerun` | nothing: the same run again |
| `threads=1` | torch / MKL / OpenMP thread count 1 |
| `aten=avx2` | ATen's AVX2 kernels instead of AVX-512 (`ATEN_CPU_CAPABILITY=avx2`; only where the CPU has AVX-512) |
| `mkl=compatible` | MKL's SSE2 path (`MKL_CBWR=COMPATIBLE`): GEMMs sum in another order, as on another CPU |
| `faiss=avx2` | k-means only: faiss' AVX2 build and its OpenBLAS's Haswell kernels, as on a CPU without AVX-512 |
| `seed=1`, `seed=2` | the SAE's seed (init, shuffle, mixing buffer) |

and prints per run the sha256 of the trained tensors, the first training step whose parameters differ from the
reference's, the held-out explained variance and a detection AUROC (SAE-A's best-latent rule, as
`detection.auroc_best_latent`: per topic the latent with the best train AUROC over 8 + 8 contexts, scored on 7 + 7
held-out contexts, max-pooled over tokens, mean over the 20 topics); then the spread across configurations next to
the spread across seeds. EP, k-means and PCA are fitted under the same configurations (not seeds) and reported as
bit-identical to the reference or not, with their largest tensor difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------
# Provenance


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def _cache_sizes() -> dict[str, str]:
    """CPU 0's cache sizes from sysfs, e.g. {"L1d": "48K", "L2": "1024K", "L3": "32768K"} ({} where unreadable)."""
    out: dict[str, str] = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            out[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return out


def cpu_info() -> dict[str, Any]:
    """The CPU: model name (/proc/cpuinfo, else platform.processor()), vendor, family/model/stepping (a virtual
    machine may show only "AMD EPYC": these tell generations apart), the SIMD flags kernels dispatch on, caches."""
    f = _cpuinfo_fields()
    flags = set(f.get("flags", "").split())
    return {
        "model_name": f.get("model name") or platform.processor() or platform.machine(),
        "vendor": f.get("vendor_id"),
        "family_model_stepping": "/".join(f.get(k, "?") for k in ("cpu family", "model", "stepping")) if f else None,
        "simd": [x for x in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma", "avx") if x in flags],
        "caches": _cache_sizes(),
        "machine": platform.machine(),
    }


def faiss_blas() -> str | None:
    """The BLAS faiss (k-means) bundles, by its library's file name (faiss-cpu wheels ship OpenBLAS), or None."""
    import importlib.util

    spec = importlib.util.find_spec("faiss")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))).parent
    libs = sorted(p.name for p in root.glob("faiss*.libs/*blas*"))
    return libs[0] if libs else "unknown (not a bundled BLAS)"


def blas_info() -> dict[str, Any]:
    """The BLAS / LAPACK torch was built with and the settings that pick its code path."""
    import torch

    cfg = torch.__config__.show()

    def build(key: str) -> str | None:
        m = re.search(rf"{key}=([^,\s]+)", cfg)
        return m.group(1) if m else None

    mkl = next((line.strip(" -") for line in cfg.splitlines() if "Math Kernel Library" in line), None)
    onednn = next((line.strip(" -") for line in cfg.splitlines() if "MKL-DNN" in line or "oneDNN" in line), None)
    return {
        "blas": build("BLAS_INFO"), "lapack": build("LAPACK_INFO"), "mkl": mkl if torch.backends.mkl.is_available()
        else None, "onednn": onednn if torch.backends.mkldnn.is_available() else None,
        "openmp": torch.backends.openmp.is_available(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "faiss_blas": faiss_blas(),
        # MKL picks its kernels (and their summation order) per CPU unless MKL_CBWR fixes a branch
        "env": {k: os.environ[k] for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                           "OPENBLAS_CORETYPE", "FAISS_OPT_LEVEL") if os.environ.get(k) is not None},
    }


def platform_summary() -> dict[str, Any]:
    """cpu_info and blas_info as short flat strings (run.json's `machine`, one line of the report's header)."""
    cpu, blas = cpu_info(), blas_info()
    mkl = re.search(r"Version ([\w.]+)", blas["mkl"] or "")
    out = {"cpu_model": cpu["model_name"],
           "cpu_id": f"{cpu['vendor']} family/model/stepping {cpu['family_model_stepping']}" if cpu["vendor"]
           else None,
           "cpu_simd": " ".join(cpu["simd"]) or None,
           "cpu_caches": " ".join(f"{k} {v}" for k, v in cpu["caches"].items()) or None,
           "blas": f"{blas['blas']}" + (f" {mkl.group(1)}" if mkl else "") + f", LAPACK {blas['lapack']}",
           "aten_cpu_capability": blas["aten_cpu_capability"], "faiss_blas": blas["faiss_blas"]}
    if blas["env"]:
        out["blas_env"] = " ".join(f"{k}={v}" for k, v in blas["env"].items())
    return out


# ---------------------------------------------------------------------------------------------------------
# The synthetic store and its labelled contexts


D, N_DICT, ACTIVE, N_TOPICS = 576, 1024, 8, 20
TOPIC_RATE, TOPIC_MAG = 0.25, (1.0, 2.0)  # a topic context's share of tokens carrying it; magnitudes


def _generator(seed: int, d: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(N_DICT, d, generator=g), dim=1)
    topics = torch.nn.functional.normalize(torch.randn(N_TOPICS, d, generator=g), dim=1)
    offset = 4.0 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    popularity = 1.0 / (torch.arange(N_DICT, dtype=torch.float64) + 10.0)
    return dictionary, topics, offset, popularity


def synthetic_contexts(n_ctx: int, T: int, d: int, seed: int, topic_of: Any = None):
    """Contexts [n_ctx, T, d]: ACTIVE sparse dictionary features per token (Zipf-like popularity, magnitudes
    U(0.5, 2.5)), a common offset, noise; a context with a topic (topic_of[c] >= 0) carries that topic's direction
    on each token with probability 0.3 (magnitude U(1.5, 3)). The dictionary is fixed (seed 0); `seed` draws rows."""
    import torch

    dictionary, topics, offset, popularity = _generator(0, d)
    g = torch.Generator().manual_seed(1000 + seed)
    N = n_ctx * T
    idx = torch.multinomial(popularity, N * ACTIVE, replacement=True, generator=g).reshape(N, ACTIVE)
    mag = 0.5 + 2.0 * torch.rand(N, ACTIVE, generator=g)
    x = torch.einsum("na,nad->nd", mag, dictionary[idx]) + offset + 0.05 * torch.randn(N, d, generator=g)
    if topic_of is None:  # the store: half the contexts have a topic
        topic_of = torch.where(torch.rand(n_ctx, generator=g) < 0.5,
                               torch.randint(0, N_TOPICS, (n_ctx,), generator=g), torch.full((n_ctx,), -1))
    on = (torch.rand(n_ctx, T, generator=g) < TOPIC_RATE) & (topic_of[:, None] >= 0)
    t_mag = (TOPIC_MAG[0] + (TOPIC_MAG[1] - TOPIC_MAG[0]) * torch.rand(n_ctx, T, generator=g)) * on
    x = x.reshape(n_ctx, T, d) + t_mag[..., None] * topics[topic_of.clamp_min(0)][:, None, :]
    return x


def labelled_contexts(d: int, T: int = 16, per_class: int = 15):
    """Per topic, per_class positive contexts (that topic) and per_class negatives (another topic or none), T
    tokens each, drawn apart from the store: [N_TOPICS, 2, per_class, T, d]."""
    import torch

    g = torch.Generator().manual_seed(7)
    pos = torch.arange(N_TOPICS).repeat_interleave(per_class)
    neg = torch.randint(-1, N_TOPICS - 1, (N_TOPICS * per_class,), generator=g)
    neg = torch.where((neg >= 0) & (neg >= pos), neg + 1, neg)  # another topic than the positive's, or none
    x = synthetic_contexts(2 * N_TOPICS * per_class, T, d, seed=99, topic_of=torch.cat([pos, neg]))
    return x.reshape(2, N_TOPICS, per_class, T, d).transpose(0, 1)


def best_latent_auroc(encode: Any, labelled: Any, n_train: int = 8) -> float:
    """SAE-A's rule (as detection.auroc_best_latent): per topic the latent with the best train AUROC, its test
    AUROC; scores are max-pooled over a context's tokens; mean over topics."""
    import torch

    from metrics.detection import auroc_columns

    n_topics, _, per_class, T, d = labelled.shape
    with torch.no_grad():
        pooled = encode(labelled.reshape(-1, d)).reshape(n_topics, 2, per_class, T, -1).amax(dim=3)
    out = []
    for c in range(n_topics):
        pos, neg = pooled[c, 0], pooled[c, 1]
        tr = auroc_columns(pos[:n_train], neg[:n_train])
        k = int(torch.nan_to_num(tr, nan=-1.0).argmax())
        out.append(float(auroc_columns(pos[n_train:, [k]], neg[n_train:, [k]])[0]))
    return sum(out) / len(out)


# ---------------------------------------------------------------------------------------------------------
# One configuration's fits (a fresh interpreter each: MKL_CBWR and ATEN_CPU_CAPABILITY are read at start)


def _sha(tensors: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def child(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bench.store import ActivationStore
    from methods.registry import get_method

    torch.set_num_threads(job["threads"])
    try:
        import faiss

        faiss.omp_set_num_threads(job["threads"])
    except ImportError:
        pass
    store = ActivationStore(job["store"])
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "blas": blas_info()}
    if job["method"] == "sae":
        from sae_lens.training.sae_trainer import SAETrainer

        steps: list[str] = []
        original = SAETrainer.step

        def step(self: Any, batch: Any) -> Any:  # the parameters' sha256 after every optimiser step
            result = original(self, batch)
            steps.append(_sha(dict(self.sae.named_parameters()))[:16])
            return result

        SAETrainer.step = step
        t0 = time.perf_counter()
        art = get_method("sae")(**job["params"], train_threads=job["threads"]).fit(store, 0)
        labelled = torch.load(job["labelled"])
        out.update(seconds=time.perf_counter() - t0, step_sha=steps, ev=art.info["explained_variance"],
                   detection=best_latent_auroc(art.encode, labelled),
                   reproducibility=art.info["training"]["reproducibility"])
    else:
        cls = get_method(job["method"])
        art = cls(**job["params"]).fit(store, 0)
    torch.save(art.tensors, job["tensors"])
    out["sha256"] = _sha(art.tensors)
    return out


# ---------------------------------------------------------------------------------------------------------
# The measurement


SAE_DEFAULT = {"architecture": "topk", "width": 2048, "k": 32, "training_tokens": 400_000, "max_epochs": 3.0,
               "batch_rows": 1024, "buffer_rows": 16_384, "lr": 3e-3}  # bench/suites/default.py's SAE
SAE_QUICK = {**SAE_DEFAULT, "width": 512, "k": 16, "batch_rows": 256, "buffer_rows": 4096, "max_epochs": 10.0}
OTHERS = {"ep": {"percentiles": [8], "n_calib": 30_000}, "kmeans": {"k": 512, "n_rows": 30_000, "n_calib": 30_000,
                                                                    "niter": 30},
          "pca": {"k": 64}}  # the default suite's settings
OTHERS_QUICK = {"ep": {"percentiles": [8], "n_calib": 4000}, "kmeans": {"k": 64, "n_rows": 4000, "n_calib": 4000,
                                                                       "niter": 30}, "pca": {"k": 32}}


def configurations() -> list[tuple[str, dict[str, str], int, int, tuple[str, ...] | None]]:
    """(name, environment, threads, seed, methods: None for all) of each run; ATen's AVX2 variant only where the CPU
    has AVX-512; faiss' AVX2 code and OpenBLAS Haswell kernels (k-means only) where faiss bundles OpenBLAS."""
    import torch

    runs: list[tuple[str, dict[str, str], int, int, tuple[str, ...] | None]] = [
        ("reference", {}, 2, 0, None), ("rerun", {}, 2, 0, None), ("threads=1", {}, 1, 0, None)]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        runs.append(("aten=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, 2, 0, None))
    if torch.backends.mkl.is_available():
        runs.append(("mkl=compatible", {"MKL_CBWR": "COMPATIBLE"}, 2, 0, None))
    if "openblas" in (faiss_blas() or ""):
        runs.append(("faiss=avx2", {"OPENBLAS_CORETYPE": "Haswell", "FAISS_OPT_LEVEL": "AVX2"}, 2, 0, ("kmeans",)))
    return runs + [("seed=1", {}, 2, 1, ("sae",)), ("seed=2", {}, 2, 2, ("sae",))]


def _run_child(job: dict[str, Any], env: dict[str, str], threads: int) -> dict[str, Any]:
    environ = {**os.environ, **env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "bench.reproducibility", "--_child", json.dumps(job)],
                          capture_output=True, text=True, env=environ)
    if proc.returncode:
        raise RuntimeError(f"child {job['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


def measure(quick: bool, work: Path, log: Any = print) -> dict[str, Any]:
    import torch

    from bench.store import write_synthetic_store

    n_ctx, T, d = (96, 64, D) if quick else (312, 128, D)
    sae_params = {**(SAE_QUICK if quick else SAE_DEFAULT), "device": "cpu", "progress": False}
    others = OTHERS_QUICK if quick else OTHERS
    store = write_synthetic_store(work / "store", {0: synthetic_contexts(n_ctx, T, d, seed=0)})
    labelled_path = work / "labelled.pt"
    torch.save(labelled_contexts(d), labelled_path)
    log(f"synthetic store: {n_ctx} contexts x {T} tokens, d={d}; SAE {sae_params['architecture']} w"
        f"{sae_params['width']} k{sae_params['k']}, batch {sae_params['batch_rows']}, "
        f"{sae_params['max_epochs']:g} epochs; CPU {cpu_info()['model_name']} ({cpu_info()['family_model_stepping']})"
        f", {blas_info()['mkl'] or blas_info()['blas']}")
    runs: dict[str, Any] = {}
    tensors: dict[tuple[str, str], dict[str, Any]] = {}
    for name, env, threads, seed, methods in configurations():
        for method in methods or ["sae", *others]:
            params = {**sae_params, "seed": seed} if method == "sae" else others[method]
            path = work / f"{method}-{name}.pt"
            job = {"store": str(store.path), "method": method, "params": params, "threads": threads,
                   "labelled": str(labelled_path), "tensors": str(path)}
            r = _run_child(job, env, threads)
            tensors[(method, name)] = torch.load(path)
            runs.setdefault(method, {})[name] = {**r, "env": env, "seed": seed}
        if name not in runs["sae"]:
            log(f"  {name:15s} ({', '.join(methods or [])} only)")
            continue
        r = runs["sae"][name]
        ref = runs["sae"]["reference"]
        first = next((i + 1 for i, (a, b) in enumerate(zip(ref["step_sha"], r["step_sha"])) if a != b), None)
        r["first_differing_step"] = first
        log(f"  {name:15s} threads={threads} seed={seed} steps={len(r['step_sha'])} sha256={r['sha256'][:12]} "
            f"first differing step={first if first else '-'} held-out EV={r['ev']:.6f} "
            f"detection AUROC={r['detection']:.4f} ({r['seconds']:.0f} s)")
    summary = _summarise(runs, tensors)
    for line in summary["lines"]:
        log(line)
    return {"runs": {m: {n: {k: v for k, v in r.items() if k != "step_sha"} for n, r in rs.items()}
                     for m, rs in runs.items()}, "summary": summary, "cpu": cpu_info(), "blas": blas_info(),
            "quick": quick}


def _summarise(runs: dict[str, Any], tensors: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    sae = runs["sae"]
    seeds = [sae[n] for n in ("reference", "seed=1", "seed=2")]
    configs = [n for n in sae if n not in ("reference", "seed=1", "seed=2")]
    out: dict[str, Any] = {"seed_spread": {"ev": _spread([r["ev"] for r in seeds]),
                                           "detection": _spread([r["detection"] for r in seeds])}, "configs": {}}
    lines = ["SAE: difference from the reference run, next to the spread (max - min) over seeds 0, 1, 2:"]
    for n in configs:
        r = sae[n]
        d_ev, d_det = abs(r["ev"] - sae["reference"]["ev"]), abs(r["detection"] - sae["reference"]["detection"])
        same = r["sha256"] == sae["reference"]["sha256"]
        out["configs"][n] = {"bit_identical": same, "ev": d_ev, "detection": d_det,
                             "first_differing_step": r["first_differing_step"]}
        lines.append(f"  {n:15s} {'bit-identical' if same else 'differs':13s} |dEV|={d_ev:.2e} "
                     f"|dAUROC|={d_det:.2e}")
    lines.append(f"  {'seed spread':15s} {'':13s}  EV={out['seed_spread']['ev']:.2e}  "
                 f"AUROC={out['seed_spread']['detection']:.2e}")
    lines.append("Other methods under the same configurations (tensors vs the reference's):")
    for method in (m for m in runs if m != "sae"):
        cells = []
        for n in runs[method]:
            if n == "reference":
                continue
            a, b = tensors[(method, "reference")], tensors[(method, n)]
            if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
                out["configs"].setdefault(n, {})[method] = {"bit_identical": False, "same_shapes": False}
                cells.append(f"{n}: other tensors or shapes (K)")
                continue
            diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].is_floating_point()
                     else float((a[k] != b[k]).sum()) for k in a}  # integer tensors: entries that differ
            differ = sorted(k for k, v in diffs.items() if v)
            same = runs[method][n]["sha256"] == runs[method]["reference"]["sha256"]
            out["configs"].setdefault(n, {})[method] = {"bit_identical": same, "same_shapes": True,
                                                         "max_abs_diff": diffs}
            cells.append(f"{n}: " + ("bit-identical" if same else
                                     f"max |d|={max(diffs.values()):.1e} in {', '.join(differ)}"))
        lines.append(f"  {method:7s} " + "; ".join(cells))
    out["lines"] = lines
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a w512 SAE on a 6k-row store, 10 epochs")
    ap.add_argument("--json", help="also write the measured numbers here")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="epbench-repro-") as tmp:
        result = measure(args.quick, Path(tmp), log=lambda s: print(s, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
