"""Synthetic models with known ground truth (SynthSAEBench, through sae-lens' `sae_lens.synthetic`).

A synthetic "model" is a `sae_lens.synthetic.SyntheticModel`: N ground-truth unit feature vectors F [N, d] and a
generator of sparse feature activations a [N] (Zipfian firing, hierarchy, low-rank correlations, per-feature
magnitudes); a sample is the hidden vector h = a @ F + bias. Its samples are written into the ordinary activation
store, so every method builds on them unchanged (`Method.fit(store, 0)`), and the true activations are saved beside
them, so the `ground_truth` metric family (metrics/ground_truth.py) can score any artefact against F.

Registered names (every field not named here is SynthSAEBench-16k's; see `PRESETS`):

| name | features | dim | roots | what |
|---|---|---|---|---|
| `synth-16k` | 16,384 | 768 | 128 | SynthSAEBench-16k (Chanin & Garriga-Alonso, arXiv 2602.14687; sae-lens docs) |
| `synth-cpu` | 2,048 | 96 | 16 | 1/8 scale: features / dim kept at 21.3, 2/3 of the features in hierarchies |
| `synth-tiny` | 512 | 24 | 4 | 1/32 scale, for tests |

SynthSAEBench-16k's config (sae-lens docs, "SynthSAEBench-16k Model"): Zipfian firing (exponent 0.5, p_max 0.4,
p_min 5e-4); hierarchy of 128 roots, branching 4, depth 3, every child set mutually exclusive from the roots down,
firing probabilities compensated for the hierarchy, children scaled by their parent; low-rank correlations (rank 25,
scale 0.1); orthogonalisation 100 steps at lr 3e-4; mean magnitudes linear 5.0 -> 4.0; std magnitudes folded normal
(mean 0.5, std 0.5); bias norm 0.5; seed 42. The scaled presets change only num_features, hidden_dim and
total_root_nodes (all by the same factor), so mean true L0 falls with the feature count (measured over 8,192
samples: 34.6 at 16k, 10.9 for synth-cpu, ~4 for synth-tiny; 25.6 / 8.4 over the most frequent quarter of features).

Models are generated on the CPU with `SyntheticModel(cfg, device="cpu")` and cached (sae-lens' own save format:
JSON config, safetensors, hierarchy JSON) under `$EPBENCH_CACHE/synthetic/<name>-<id>/`. The published
SynthSAEBench-16k was generated on CUDA, so `synth-16k` regenerated here has the same config, not the same bits
(its hub copy is `decoderesearch/synth-sae-bench-16k-v1`). Measured on this project's 2-core CPU: synth-16k's
orthogonalisation takes ~48 s per step (~80 min for 100) and sampling ~240 samples/s; synth-cpu builds in ~20 s
and samples ~4,500/s.

Store layout (on top of the ordinary one, see bench/store.py): one layer, 0 (hook `synthetic.hidden`); contexts of
ctx_len - 1 samples (position 0 is a BOS placeholder, as in a text store, so batching geometry is unchanged); every
sample its own row; `token_id` 1 everywhere (no tokens); each context its own document.

    ground_truth/features.safetensors   feature_vectors [N, d] (unit), bias [d], firing_probabilities [N]
    ground_truth/model/                 the generating SyntheticModel, as sae-lens saves it
    ground_truth/shard_00000.safetensors per shard, CSR over its rows in store order: row_ptr [rows + 1] int64,
                                         feature_ids [nnz] int32, values [nnz] float32 (the true activations a)

The per-row file is listed in its shard's record (sha256-verified like the activations); the store-level files'
sha256 are in manifest["synthetic"]["files"]. manifest["model"]["synthetic"] is True: `is_synthetic_store(store)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from bench.cache import cache_dir, file_lock, mismatched_files, sha256_bytes_of_file

if TYPE_CHECKING:
    from bench.store import ActivationStore, ExtractionRequest

HOOK = "synthetic.hidden"
LAYER = 0
CORPUS = "synthetic"
GENERATOR = "sae_lens.synthetic.SyntheticModel(cfg, device='cpu')"
EVAL_SEED = 1_000_003  # eval stores: samples drawn with seed EVAL_SEED + suite seed, never a build store's seed
EVAL_ROWS = 100_000  # rows of a ground-truth eval store (sae-lens' eval_sae_on_synthetic_data default: 100,000)

# name -> (num_features, hidden_dim, total_root_nodes); every other setting is SynthSAEBench-16k's
PRESETS: dict[str, tuple[int, int, int]] = {
    "synth-16k": (16_384, 768, 128),
    "synth-cpu": (2_048, 96, 16),
    "synth-tiny": (512, 24, 4),
}

# Families that need text, a tokenizer or a language model: they have nothing to measure on a synthetic model.
TEXT_FAMILIES = ("retrieval", "detection", "probing", "ood", "causal", "recon", "correspondence", "stability",
                 "refusal", "sparse_probing", "compositional")
SYNTHETIC_FAMILIES = ("build", "cost", "ground_truth")  # what a synthetic model's cells can compute


def is_synthetic(model_name: str) -> bool:
    """Whether a registered model name is a synthetic (ground-truth) model."""
    return model_name in PRESETS


def is_synthetic_store(store: "ActivationStore") -> bool:
    """Whether a store holds synthetic samples (manifest["model"]["synthetic"], written by `extract_synthetic`)."""
    return bool(store.manifest.get("model", {}).get("synthetic", False))


def family_applies(family: str, model_name: str) -> tuple[bool, str]:
    """(applies, reason when not) for a metric family on a model: text families skip synthetic models, and
    ground_truth skips models without ground truth. For the cell expansion (bench.cells._applies) to call."""
    if is_synthetic(model_name) and family in TEXT_FAMILIES:
        return False, (f"{model_name} is a synthetic model (sae_lens.synthetic samples, no text, tokenizer or "
                       f"language model): {family} has nothing to measure")
    if family == "ground_truth" and not is_synthetic(model_name):
        return False, f"{model_name} is not a synthetic model: it has no ground-truth features"
    return True, ""


# ---------------------------------------------------------------------------------------------------------
# The generating model


def model_config(name: str) -> Any:
    """The `sae_lens.synthetic.SyntheticModelConfig` of a preset (SynthSAEBench-16k's, scaled for the small ones)."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    if name not in PRESETS:
        raise ValueError(f"unknown synthetic model {name!r}; available: {', '.join(PRESETS)}")
    n, d, roots = PRESETS[name]
    return SyntheticModelConfig(
        num_features=n,
        hidden_dim=d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=roots, branching_factor=4, max_depth=3,
                                  mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                  compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )


def _recipe(name: str) -> dict[str, Any]:
    return {"preset": name, "config": model_config(name).to_dict(), "generator": GENERATOR,
            "sae-lens": version("sae-lens"), "torch": torch.__version__}


def weights_identity(name: str) -> str:
    """sha256 of what determines the generated model (config, generator, library versions), known without building."""
    return hashlib.sha256(json.dumps(_recipe(name), sort_keys=True, default=str).encode()).hexdigest()


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{list(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _model_dir(name: str) -> Path:
    return cache_dir() / "synthetic" / f"{name}-{weights_identity(name)[:16]}"


def load_synthetic_model(name: str, progress: bool = False) -> tuple[Any, dict[str, Any]]:
    """(SyntheticModel on CPU, identity record) for a preset: generated once, then loaded from the cache.

    The record holds `weights_id` (the recipe), `weights_sha256` (of the generated tensors, checked on every load)
    and `build_seconds`.
    """
    from sae_lens.synthetic import SyntheticModel

    path = _model_dir(name)
    ident_path = path / "identity.json"
    with file_lock(path.parent / f"{path.name}.lock", f"synthetic model {name}"):
        if ident_path.exists():
            ident = json.loads(ident_path.read_text())
            model = SyntheticModel.load_from_disk(path / "model", device="cpu")
            if _model_sha256(model) == ident["weights_sha256"]:
                return model, ident
            print(f"[epbench] cached synthetic model {path} is damaged (sha256 mismatch); regenerating", flush=True)
            shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        cfg = model_config(name)
        if progress:
            print(f"[epbench] generating synthetic model {name} ({cfg.num_features} features, d {cfg.hidden_dim}; "
                  "once, then cached)", flush=True)
        # sae-lens always shows its orthogonalisation bar (tqdm on stderr): silenced unless progress
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        with torch.random.fork_rng(), quiet:
            model = SyntheticModel(cfg, device="cpu")
        seconds = time.perf_counter() - t0
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp / "model")
        ident = {"preset": name, "weights_id": weights_identity(name), "weights_sha256": _model_sha256(model),
                 "build_seconds": round(seconds, 2), "recipe": _recipe(name)}
        (tmp / "identity.json").write_text(json.dumps(ident, indent=1, default=str))
        shutil.rmtree(path, ignore_errors=True)
        tmp.replace(path)
        # reload from disk, so the model a store is generated with is always the one a later load returns
        model = SyntheticModel.load_from_disk(path / "model", device="cpu")
        return model, ident


def _model_sha256(model: Any) -> str:
    t = {"feature_vectors": model.feature_dict.feature_vectors.data, "bias": model.feature_dict.bias.data,
         "firing_probabilities": model.activation_generator.firing_probabilities,
         "mean_firing_magnitudes": model.activation_generator.mean_firing_magnitudes,
         "std_firing_magnitudes": model.activation_generator.std_firing_magnitudes}
    if model.correlation_matrix is not None:
        t["correlation_factor"] = model.correlation_matrix.correlation_factor
        t["correlation_diag"] = model.correlation_matrix.correlation_diag
    return _tensors_sha256(t)


# ---------------------------------------------------------------------------------------------------------
# Writing a store of samples


def _shard_seed(seed: int, shard: int) -> int:
    return int(hashlib.sha256(f"epbench-synthetic:{seed}:{shard}".encode()).hexdigest()[:15], 16)


@torch.no_grad()
def sample_rows(model: Any, n_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n_rows samples from `model` under torch seed `seed` (the global RNG is restored afterwards):
    (hidden [n, d] float32, row_ptr [n + 1] int64, feature_ids [nnz] int32, values [nnz] float32)."""
    n_feat = model.cfg.num_features
    chunk = max(256, 2**25 // n_feat)  # a dense [chunk, N] block of true activations is at most 128 MiB
    hidden, counts, ids, vals = [], [], [], []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for s in range(0, n_rows, chunk):
            feats = model.activation_generator.sample(min(chunk, n_rows - s))
            hidden.append(model.feature_dict(feats).float())
            r, c = feats.nonzero(as_tuple=True)  # row-major: rows ascending, features ascending within a row
            counts.append(torch.bincount(r, minlength=feats.shape[0]))
            ids.append(c.to(torch.int32))
            vals.append(feats[r, c].float())
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(counts).cumsum(0)])
    return torch.cat(hidden), row_ptr, torch.cat(ids), torch.cat(vals)


def _normalised(req: "ExtractionRequest") -> "ExtractionRequest":
    """The request as the store's identity sees it (corpus `default` means the samples, like `synthetic`)."""
    if req.corpus not in (CORPUS, "default"):
        raise ValueError(f"{req.model} is a synthetic model: its store holds generated samples, not a text corpus; "
                         f"use --corpus {CORPUS} (got {req.corpus!r})")
    if req.layers != [LAYER]:
        raise ValueError(f"{req.model} is a synthetic model with one layer, {LAYER} (hook {HOOK}); got layers "
                         f"{req.layers}")
    if req.max_contexts_per_doc is not None or req.max_docs is not None:
        raise ValueError(f"{req.model} is a synthetic model: it has no documents (max_contexts_per_doc / max_docs)")
    return replace(req, corpus=CORPUS)


def extract_synthetic(req: "ExtractionRequest", root: str | Path | None = None, force: bool = False,
                      progress: bool = True) -> "ActivationStore":
    """Write (or reuse, or resume) the store of a synthetic model's samples for `req` (bench.store.extract's
    counterpart): ceil(tokens / ctx_len) contexts of ctx_len - 1 samples each, shard i drawn under a seed derived
    from (req.seed, i), so a killed run resumes and ends identical to an uninterrupted one."""
    from bench.store import open_verified, request_id, stores_root

    req = _normalised(req)
    weights_id = weights_identity(req.model)
    fingerprint = {"name": CORPUS, "generator": GENERATOR, "sample_seed": req.seed}
    sid = request_id(req, fingerprint, weights_id)
    path = stores_root(root) / sid
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.parent / f"{sid}.lock", f"store {sid}", wait=True):
        if force and path.exists():
            shutil.rmtree(path)
        if (path / "manifest.json").exists():
            store, problem = open_verified(path)
            if store is not None and not _damaged_ground_truth(store):
                return store
            if store is not None:
                problem = "store-level ground-truth files damaged"
            print(f"[epbench] store {path} needs repair: {problem}; regenerating it", flush=True)
            shutil.rmtree(path)  # deterministic per shard: regenerating is the repair
        return _write(req, path, sid, weights_id, fingerprint, progress)


def _damaged_ground_truth(store: "ActivationStore") -> bool:
    files = store.manifest.get("synthetic", {}).get("files", {})
    return bool(mismatched_files({store.path / rel: sha for rel, sha in files.items()})) or not files


def _write(req: "ExtractionRequest", path: Path, sid: str, weights_id: str, fingerprint: dict[str, Any],
           progress: bool) -> "ActivationStore":
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from bench.store import (
        BOS_POLICY,
        PAD_POLICY,
        STORE_FORMAT_VERSION,
        Context,
        _atomic_save,
        _atomic_write_json,
        _context_table,
        _finish,
        _shard_complete,
        library_versions,
    )

    t0 = time.perf_counter()
    model, ident = load_synthetic_model(req.model, progress=progress)
    cfg = model.cfg
    T = req.ctx_len - 1  # samples per context
    n_ctx = math.ceil(req.tokens / req.ctx_len)
    path.mkdir(parents=True, exist_ok=True)
    for tmp in path.rglob("*.tmp"):
        tmp.unlink()
    gt = path / "ground_truth"
    gt.mkdir(exist_ok=True)
    files: dict[str, str] = {}
    feats_path = gt / "features.safetensors"
    tmp = feats_path.with_suffix(".tmp")
    save_file({"feature_vectors": model.feature_dict.feature_vectors.data.float().contiguous(),
               "bias": model.feature_dict.bias.data.float().contiguous(),
               "firing_probabilities": model.activation_generator.firing_probabilities.float().contiguous()},
              str(tmp))
    tmp.replace(feats_path)
    files["ground_truth/features.safetensors"] = sha256_bytes_of_file(feats_path)
    src = _model_dir(req.model) / "model"
    shutil.rmtree(gt / "model", ignore_errors=True)
    shutil.copytree(src, gt / "model")
    for p in sorted((gt / "model").iterdir()):
        files[f"ground_truth/model/{p.name}"] = sha256_bytes_of_file(p)
    manifest: dict[str, Any] = {
        "format_version": STORE_FORMAT_VERSION, "id": sid, "status": "in_progress", "request": asdict(req),
        "model": {"name": req.model, "source": f"{GENERATOR}, regenerated from its SyntheticModelConfig",
                  "weights_sha256": ident["weights_sha256"], "weights_id": weights_id, "d_model": cfg.hidden_dim,
                  "n_layers": 1, "synthetic": True, "n_features": cfg.num_features},
        "layers": [LAYER], "hooks": {str(LAYER): HOOK}, "ctx_len": req.ctx_len, "dtype": req.dtype,
        "bos_policy": BOS_POLICY + " (synthetic: position 0 is a placeholder, every other position one sample)",
        "pad_policy": PAD_POLICY + " (synthetic: never padded)",
        "tokenizer": {"name": "none (synthetic samples)", "vocab_size": 2, "bos_token_id": 0, "pad_token_id": 0},
        "corpus": fingerprint,
        "order": "sample order: shard i drawn under torch.manual_seed(sha256('epbench-synthetic:{seed}:{i}')); "
                 "each context ctx_len - 1 consecutive samples",
        "seed": req.seed, "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "synthetic": {
            "preset": req.model, "config": cfg.to_dict(), "generator": GENERATOR,
            "sae_lens_version": version("sae-lens"),
            "model_build_seconds": ident["build_seconds"], "samples_per_context": T, "files": files,
            "ground_truth": {
                "features": "ground_truth/features.safetensors: feature_vectors [n_features, d] (unit rows), "
                            "bias [d], firing_probabilities [n_features]; a sample is a @ feature_vectors + bias",
                "model": "ground_truth/model/: the SyntheticModel as sae-lens saves it (SyntheticModel.load_from_disk)",
                "per_row": "ground_truth/shard_{i:05d}.safetensors: CSR over the shard's rows in store order: "
                           "row_ptr [rows + 1] int64, feature_ids [nnz] int32, values [nnz] float32"}},
    }
    _atomic_write_json(path / "manifest.json", manifest)
    np_dtype = torch.float32 if req.dtype == "float32" else torch.float16
    records, nnz = [], 0
    bar = tqdm(total=n_ctx * T, unit="row", unit_scale=True, desc=f"sample {req.model}", disable=not progress)
    for si, lo in enumerate(range(0, n_ctx, req.shard_contexts)):
        hi = min(n_ctx, lo + req.shard_contexts)
        rec = _shard_complete(path, si)
        if rec is not None and rec["contexts"] == [lo, hi]:
            records.append(rec)
            nnz += int(rec.get("nnz", 0))
            bar.update((hi - lo) * T)
            continue
        n = hi - lo
        hidden, row_ptr, ids, vals = sample_rows(model, n * T, _shard_seed(req.seed, si))
        contexts = [Context(c, [0] + [1] * T) for c in range(lo, hi)]
        meta = {"context_id": torch.arange(lo, hi).repeat_interleave(T),
                "doc_id": torch.arange(lo, hi).repeat_interleave(T),
                "position": torch.arange(1, T + 1).repeat(n), "token_id": torch.ones(n * T, dtype=torch.long)}
        meta.update(_context_table(contexts, req.ctx_len, 0))
        shard_files = {}
        for kind, tensors in (("meta", meta), (f"L{LAYER:02d}", {"acts": hidden.to(np_dtype).contiguous()}),
                              ("ground_truth", {"row_ptr": row_ptr, "feature_ids": ids, "values": vals})):
            rel = f"{kind}/shard_{si:05d}.safetensors"
            (path / kind).mkdir(parents=True, exist_ok=True)
            sha = _atomic_save(tensors, path / rel)
            shard_files[rel] = {"sha256": sha, "bytes": (path / rel).stat().st_size}
        rec = {"index": si, "contexts": [lo, hi], "rows": n * T, "tokens": n * req.ctx_len, "files": shard_files,
               "nnz": int(ids.numel())}
        (path / "shards").mkdir(exist_ok=True)
        _atomic_write_json(path / "shards" / f"shard_{si:05d}.json", rec)
        records.append(rec)
        nnz += int(ids.numel())
        bar.update(n * T)
    bar.close()
    manifest["synthetic"]["true_l0"] = nnz / max(1, n_ctx * T)
    return _finish(path, manifest, records, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------
# Reading the ground truth


@dataclass
class GroundTruth:
    """A synthetic store's true features and, per row, its true feature activations (sparse)."""

    feature_vectors: torch.Tensor  # [n_features, d] float32, unit rows
    bias: torch.Tensor  # [d]
    firing_probabilities: torch.Tensor  # [n_features]
    model_dir: Path  # the generating SyntheticModel (sae-lens format)

    @property
    def n_features(self) -> int:
        return int(self.feature_vectors.shape[0])

    def feature_dict(self) -> Any:
        """A sae-lens FeatureDictionary with exactly these feature vectors and bias (for sae-lens' evaluation)."""
        from sae_lens.synthetic import FeatureDictionary

        with torch.random.fork_rng():  # its constructor draws random vectors, replaced below
            fd = FeatureDictionary(self.n_features, int(self.feature_vectors.shape[1]), bias=False, initializer=None)
        fd.feature_vectors.data = self.feature_vectors.clone()
        fd.bias = torch.nn.Parameter(self.bias.clone(), requires_grad=False)
        return fd

    def synthetic_model(self) -> Any:
        from sae_lens.synthetic import SyntheticModel

        return SyntheticModel.load_from_disk(self.model_dir, device="cpu")


def ground_truth(store: "ActivationStore") -> GroundTruth:
    """The true features of a synthetic store (refused, naming the fix, for a store of a language model)."""
    if not is_synthetic_store(store):
        raise ValueError(f"store {store.id} holds activations of {store.model!r}, not a synthetic model: it has no "
                         "ground truth")
    if _damaged_ground_truth(store):
        raise ValueError(f"store {store.path}: ground-truth files are missing or damaged (sha256 mismatch); rerun "
                         "the same `epbench extract` to regenerate it")
    t = load_file(str(store.path / "ground_truth" / "features.safetensors"))
    return GroundTruth(t["feature_vectors"], t["bias"], t["firing_probabilities"],
                       store.path / "ground_truth" / "model")


@dataclass
class SparseActs:
    """True activations of consecutive store rows, CSR: row i's features are ids[row_ptr[i]:row_ptr[i + 1]]."""

    row_ptr: torch.Tensor  # [n + 1] int64
    feature_ids: torch.Tensor  # [nnz] int64
    values: torch.Tensor  # [nnz] float32
    n_features: int

    @property
    def n_rows(self) -> int:
        return int(self.row_ptr.numel() - 1)

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) as a dense [n, n_features] float32 tensor."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        a, b = int(self.row_ptr[start]), int(self.row_ptr[stop])
        rows = torch.repeat_interleave(torch.arange(stop - start), self.row_ptr[start + 1 : stop + 1]
                                       - self.row_ptr[start:stop])
        out = torch.zeros(stop - start, self.n_features)
        out[rows, self.feature_ids[a:b]] = self.values[a:b]
        return out


def iter_rows(store: "ActivationStore", max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, SparseActs]]:
    """(hidden [n, d] float32, true activations) per shard in store order, up to max_rows rows in all."""
    n_feat = int(store.manifest["model"]["n_features"])
    left = store.n_rows if max_rows is None else max_rows
    for i in range(len(store.manifest["shards"])):
        if left <= 0:
            return
        x = store._load(f"L{LAYER:02d}", i)["acts"].float()
        g = store._load("ground_truth", i)
        n = min(left, x.shape[0])
        ptr = g["row_ptr"][: n + 1]
        acts = SparseActs(ptr, g["feature_ids"][: int(ptr[-1])].long(), g["values"][: int(ptr[-1])], n_feat)
        left -= n
        yield x[:n], acts


def eval_data(store: "ActivationStore", max_rows: int | None = None) -> tuple[torch.Tensor, SparseActs]:
    """The first max_rows rows of a synthetic store and their true activations, concatenated."""
    xs, ptrs, ids, vals = [], [torch.zeros(1, dtype=torch.long)], [], []
    offset = 0
    n_feat = int(store.manifest["model"]["n_features"])
    for x, a in iter_rows(store, max_rows):
        xs.append(x)
        ptrs.append(a.row_ptr[1:] + offset)
        offset += int(a.row_ptr[-1])
        ids.append(a.feature_ids)
        vals.append(a.values)
    return torch.cat(xs), SparseActs(torch.cat(ptrs), torch.cat(ids), torch.cat(vals), n_feat)


def eval_store(model: str, ctx_len: int = 128, seed: int = 0, rows: int = EVAL_ROWS,
               root: str | Path | None = None, progress: bool = True) -> "ActivationStore":
    """A store of fresh samples for scoring (seed EVAL_SEED + seed: never a build store's samples)."""
    from bench.store import ExtractionRequest

    T = ctx_len - 1
    req = ExtractionRequest(model=model, layers=[LAYER], corpus=CORPUS, tokens=math.ceil(rows / T) * ctx_len,
                            ctx_len=ctx_len, seed=EVAL_SEED + seed)
    return extract_synthetic(req, root=root, progress=progress)


def load_backend(name: str, device: str | None = None) -> Any:
    """bench.models' loader entry for a synthetic name: there is no language model behind it, so refuse in one line."""
    raise ValueError(f"{name} is a synthetic model (sae_lens.synthetic samples): it has no language model or "
                     f"tokenizer to load; only the families {', '.join(SYNTHETIC_FAMILIES)} apply to it "
                     "(bench.synth.family_applies)")


def true_l0(acts: SparseActs) -> float:
    return float(np.diff(acts.row_ptr.numpy()).mean()) if acts.n_rows else 0.0
