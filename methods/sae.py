"""Sparse autoencoders through sae-lens: pretrained (e.g. Gemma Scope, by release and id) or trained on the store.

Two ways to get an SAE over one hook:
- **pretrained**: `SAEConfig(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_{layer}/width_16k/canonical")`
  loads through `sae_lens.SAE.from_pretrained` (sae-lens' own hub loaders and weight conversions) and refuses an
  SAE whose recorded model, hook or width d does not match the store.
- **trained**: `SAEConfig(architecture="topk", width=4096, k=32)` trains an sae-lens training SAE with the steps of
  sae-lens' own `SAETrainer`, fed from `store.batches(layer)` through sae-lens' `mixing_buffer`, until held-out
  convergence (the stopping rule in `SAEConfig`: converge_* fields; caps training_tokens / max_epochs), then
  converts it to sae-lens' inference form (TopK decoder norms folded; BatchTopK saved as JumpReLU). The training
  pool is the store minus its held-out tail (heldout_frac of contexts), or with `token_budget` the store prefix
  EP reads first. The artefact keeps the training curve (info["training"]["curve"]), why it stopped, the budget
  (info["budget"]) and the final held-out explained variance (info["explained_variance"]). Training is
  bit-identical for the same store, seed, CPU, BLAS and thread count; info["training"]["reproducibility"] records
  those (the README's Reproducibility section says what to expect elsewhere).

Either way the artefact keeps only plain tensors (W_enc [d, K], W_dec [K, d], b_enc, b_dec, threshold for
JumpReLU) plus JSON info, and encodes with its own torch code, so reading a saved artefact needs no sae-lens.
`to_sae_lens()` rebuilds the equivalent sae-lens module (e.g. for HookedSAETransformer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from methods.base import LOADED_SOURCES, Artefact, Method, MethodConfig
from methods.common import PeakMemory, stream_rows, tokens_behind

if TYPE_CHECKING:
    from bench.store import ActivationStore

JUMPRELU_INITS = ("constant", "quantile")  # how a trained JumpReLU SAE's thresholds start (SAEConfig.jumprelu_init)
TRAIN_ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "matryoshka")  # what `architecture` may name
# sae-lens' training-class name of each (matryoshka: MatryoshkaBatchTopKTrainingSAE, saved as JumpReLU like batchtopk)
SAE_LENS_TRAINING_NAMES = {"topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu",
                           "matryoshka": "matryoshka_batchtopk"}
ENCODE_ARCHITECTURES = ("jumprelu", "topk", "standard")  # inference forms the artefact can encode
NORMALIZATIONS = ("none", "expected_average_only_in")

# Our model names -> the names sae-lens records for SAEs of that model (release `model:` or cfg metadata).
MODEL_ALIASES: dict[str, tuple[str, ...]] = {
    "gemma-2-2b": ("gemma-2-2b", "google/gemma-2-2b"),
    "gemma-2-2b-it": ("gemma-2-2b-it", "google/gemma-2-2b-it"),
    "gemma-3-270m": ("gemma-3-270m", "google/gemma-3-270m"),
    "smollm2-135m": ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}

# Published training tokens of Gemma Scope SAEs by the width in their folder name (pt models), from the table of the
# Gemma Scope model card (adapted from Fig. 1 of Lieberum et al. 2024, arXiv:2408.05147): 16k -> 4B, 32k..524k -> 8B,
# 1m -> 16B. The EP paper's compute comparison uses the same 4e9 for the 16k SAE.
_GEMMA_SCOPE_TOKENS = {"16k": 4e9, "32k": 8e9, "65k": 8e9, "131k": 8e9, "262k": 8e9, "524k": 8e9, "1m": 16e9}
_GEMMA_SCOPE_SOURCE = "published: Gemma Scope model card / Lieberum et al. 2024 (arXiv:2408.05147), Fig. 1"


@dataclasses.dataclass
class SAEConfig(MethodConfig):
    """Pretrained (set `release`) or trained-on-the-store (leave `release` None) sparse autoencoder."""

    # --- pretrained ---
    release: str | None = None  # sae-lens release name (pretrained_saes.yaml); None: train an SAE on the store
    sae_id: str = "layer_{layer}/width_16k/canonical"  # SAE id in the release; `{layer}` is filled from the fit layer
    allow_model_mismatch: bool = False  # accept an SAE of another model (Gemma Scope 2b-pt on 2b-it, as AxBench does)
    path: str | None = None  # a sae-lens SAE directory on disk (cfg.json + sae_weights.safetensors); `{layer}` filled
    # --- trained ---
    architecture: str = "topk"  # topk | batchtopk, matryoshka (saved as JumpReLU) | jumprelu (L0 penalty around k)
    width: int = 4096  # number of latents K
    k: int = 32  # active latents per row (topk), mean per row (batchtopk, matryoshka), target L0 (jumprelu)
    matryoshka_widths: list[int] | None = None  # matryoshka: nested widths ending at width; None: width/16../2, width
    training_tokens: int = 2_000_000  # cap on rows trained on (the pool is looped over as often as needed)
    max_epochs: float | None = None  # cap on passes over the training pool (None: only training_tokens caps)
    converge_tol: float = 0.01  # stop once held-out NMSE improved by < this fraction over the last window; 0: cap
    converge_window: float = 0.1  # the window: this fraction of the steps taken so far
    converge_min_steps: int = 200  # the rule is checked from this step on (early steps can stall for a while)
    eval_every: int = 0  # steps between held-out evaluations (curve points); 0: auto (cap / 100, eval <= 11%)
    heldout_frac: float = 0.1  # the store's last contexts (store order) held out of training, for the stopping rule
    heldout_max_rows: int = 8192  # held-out rows evaluated (the first of the held-out tail)
    token_budget: int | None = None  # train only on the store prefix of this many tokens (stream order, as EP reads)
    dense_threshold: float = 0.1  # a latent active on more than this fraction of held-out rows counts as dense
    init_b_dec: str = "mean"  # mean: b_dec starts at the training pool's mean; zeros: sae-lens' default
    lr: float = 3e-4  # Adam learning rate: constant until the stopping rule, then linear decay to 0
    lr_decay_frac: float = 0.2  # the decay's share of the run: converged at step s, decay s * f / (1 - f) steps
    batch_rows: int = 4096  # rows per optimiser step
    buffer_rows: int = 65_536  # sae-lens mixing buffer: rows shuffled together before batches are served
    l0_coefficient: float = 1.0  # jumprelu only: weight of the L0 penalty
    jumprelu_init: str = "constant"  # jumprelu only: constant (every threshold at jumprelu_init_threshold, sae-lens'
    # start) | quantile (each latent's threshold at its (1 - k/width) pre-activation quantile on the first training
    # batch, so training starts at mean L0 ~ k; see `init_thresholds_from_data`)
    jumprelu_init_threshold: float = 0.01  # jumprelu, constant init: the initial threshold (sae-lens' default 0.01)
    dead_feature_window: int = 1000  # steps without firing before a latent counts as dead (TopK aux loss)
    normalize_activations: str = "expected_average_only_in"  # rows scaled to mean norm sqrt(d), folded in; or none
    seed: int = 0  # weight init, store shuffle and mixing-buffer order
    train_threads: int | None = None  # torch CPU threads while training (restored after); None: the process's.
    # Recorded either way (info training.reproducibility). MKL promises equal results only at a fixed count; on the
    # AMD EPYC / MKL 2024.2 measured, 1 and 2 threads train the same SAE bit for bit (python -m bench.reproducibility)
    device: str | None = None  # None: CUDA when available
    progress: bool = True  # our per-batch row bar (sae-lens' trainer shows its own, updated every 100 steps)

    def __post_init__(self) -> None:
        if self.architecture not in TRAIN_ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; choose one of {TRAIN_ARCHITECTURES}")
        if self.width <= 0:
            raise ValueError(f"width must be > 0 (number of SAE latents), got {self.width}")
        if not 0 < self.k <= self.width:
            raise ValueError(f"k must be in 1..width ({self.width}), got {self.k}; lower k or raise width")
        if self.training_tokens < self.batch_rows or self.batch_rows <= 0:
            raise ValueError(f"need 0 < batch_rows <= training_tokens, got batch_rows={self.batch_rows}, "
                             f"training_tokens={self.training_tokens}")
        if self.buffer_rows < self.batch_rows:
            raise ValueError(f"buffer_rows ({self.buffer_rows}) must be >= batch_rows ({self.batch_rows})")
        if self.lr <= 0 or not 0 <= self.lr_decay_frac < 1:
            raise ValueError(f"need lr > 0 and 0 <= lr_decay_frac < 1, got {self.lr}, {self.lr_decay_frac}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, "
                             f"got {self.normalize_activations!r}")
        if self.converge_tol < 0 or not 0 < self.converge_window < 1 or min(self.eval_every,
                                                                             self.converge_min_steps) < 0:
            raise ValueError(f"need converge_tol >= 0, 0 < converge_window < 1, eval_every >= 0 and "
                             f"converge_min_steps >= 0, got {self.converge_tol}, {self.converge_window}, "
                             f"{self.eval_every}, {self.converge_min_steps}")
        if not 0 < self.heldout_frac < 1 or self.heldout_max_rows < 1:
            raise ValueError(f"need 0 < heldout_frac < 1 and heldout_max_rows >= 1, got {self.heldout_frac}, "
                             f"{self.heldout_max_rows}")
        if (self.max_epochs is not None and self.max_epochs <= 0) or (
                self.token_budget is not None and self.token_budget <= 0):
            raise ValueError(f"max_epochs and token_budget must be > 0 when set, got {self.max_epochs}, "
                             f"{self.token_budget}")
        if self.init_b_dec not in ("mean", "zeros") or not 0 < self.dense_threshold < 1:
            raise ValueError(f"need init_b_dec in (mean, zeros) and 0 < dense_threshold < 1, got "
                             f"{self.init_b_dec!r}, {self.dense_threshold}")
        if self.jumprelu_init not in JUMPRELU_INITS or self.jumprelu_init_threshold < 0:
            raise ValueError(f"need jumprelu_init in {JUMPRELU_INITS} and jumprelu_init_threshold >= 0, got "
                             f"{self.jumprelu_init!r}, {self.jumprelu_init_threshold}")
        if self.train_threads is not None and self.train_threads < 1:
            raise ValueError(f"train_threads must be >= 1 (or None: the process's thread count), "
                             f"got {self.train_threads}")

    def to_dict(self) -> dict[str, Any]:
        """All fields, but `train_threads` only when set and the JumpReLU init fields only when not at their defaults:
        a config from before a field existed records (rows' method_config, cfg.json) the same text, so a rerun's
        rows compare equal to the committed reference's."""
        d = super().to_dict()
        for name, default in (("train_threads", None), ("jumprelu_init", "constant"),
                              ("jumprelu_init_threshold", 0.01)):
            if d[name] == default:
                del d[name]
        return d


class SAEArtefact(Artefact):
    """An SAE as plain tensors: W_enc [d, K], W_dec [K, d], b_enc [K], b_dec [d] (+ threshold [K] for JumpReLU)."""

    method = "sae"
    reconstructs = True
    readouts = ("latent", "pre")  # latent: the SAE's feature activations; pre: dense encoder pre-activations
    config_cls = SAEConfig
    tensor_shapes = {"W_enc": ("d", "K"), "W_dec": ("K", "d"), "b_enc": ("K",), "b_dec": ("d",)}
    optional_tensors = {"threshold": ("K",)}  # JumpReLU only

    # Interventions: the inherited `ablate` projects the unit decoder direction out of x with centre zero (no
    # `center` tensor); b_dec is not used as a pivot because it is a reconstruction offset, not a data centre.
    # `ablate_latents` is the SAE-native alternative (subtract the latents' decoded contribution).

    @property
    def architecture(self) -> str:
        return self.info["architecture"]

    @property
    def loaded(self) -> bool:
        """Loaded (a pretrained release or a directory on disk), not trained here: the training fields of its
        config never applied to it, and what it cost to train is unknown unless published."""
        return self.info.get("source") in LOADED_SOURCES

    def config_record(self) -> dict[str, Any]:
        """A loaded SAE records where it came from and its own shape (read from the file), not the suite's training
        defaults (width 4096, k 32 for a 1,024-latent, k 16 SAE)."""
        if not self.loaded:
            return super().config_record()
        cfg = self.config.to_dict()
        where = {"release": cfg["release"], "sae_id": self.info.get("sae_id")} if cfg["release"] else \
            {"path": self.info.get("path", cfg["path"])}
        return {**where, "allow_model_mismatch": cfg["allow_model_mismatch"], "architecture": self.architecture,
                "width": self.K, "k": self.info.get("k")}


    @property
    def directions(self) -> torch.Tensor:
        """Unit-normalised decoder rows, [K, d] float32."""
        if getattr(self, "_dirs", None) is None:
            w = self.tensors["W_dec"].float()
            self._dirs = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self._dirs

    @property
    def decoder_raw(self) -> torch.Tensor:
        """Decoder rows as the SAE uses them for reconstruction, [K, d]."""
        return self.tensors["W_dec"]

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors as float32 on `device` (cached, so GPU callers do not copy a 16k-wide SAE per batch)."""
        cache = self.__dict__.setdefault("_device_cache", {})
        if device not in cache:
            cache[device] = {k: v.to(device, torch.float32) for k, v in self.tensors.items()}
        return cache[device]

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        t = self._on(x.device)
        if self.info.get("apply_b_dec_to_input", False):
            x = x - t["b_dec"]
        pre = x @ t["W_enc"] + t["b_enc"]
        if self.info.get("rescale_acts_by_decoder_norm", False):
            pre = pre * t["W_dec"].norm(dim=1)
        return pre

    @torch.no_grad()
    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        """Feature activations [N, K] (readout `latent`, default) or encoder pre-activations (`pre`)."""
        readout = readout or "latent"
        if readout not in self.readouts:
            raise ValueError(f"{self.name}: unknown readout {readout!r}; choose one of {self.readouts}")
        pre = self._pre(self.check_input(x))
        if readout == "pre":
            return pre
        arch = self.architecture
        if arch == "jumprelu":
            return pre.relu() * (pre > self._on(pre.device)["threshold"]).to(pre.dtype)
        if arch == "topk":
            vals, idx = pre.topk(int(self.info["k"]), dim=1)
            return torch.zeros_like(pre).scatter_(1, idx, vals.relu())
        if arch == "standard":
            return pre.relu()
        raise ValueError(f"{self.name}: cannot encode architecture {arch!r}; supported: {ENCODE_ARCHITECTURES}")

    @torch.no_grad()
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction f @ W_dec + b_dec, [N, d]."""
        if f.ndim != 2 or f.shape[1] != self.K:
            raise ValueError(f"{self.name}: expected features [N, {self.K}], got {tuple(f.shape)}")
        t = self._on(f.device)
        f = f.float()
        if self.info.get("rescale_acts_by_decoder_norm", False):
            f = f / t["W_dec"].norm(dim=1)
        return f @ t["W_dec"] + t["b_dec"]

    @torch.no_grad()
    def ablate_latents(self, x: torch.Tensor, features: Sequence[int]) -> torch.Tensor:
        """SAE-native ablation: subtract the chosen latents' decoded contribution (error term kept)."""
        f = self.encode(x)
        keep = torch.zeros(self.K, dtype=f.dtype, device=f.device)
        keep[list(features)] = 1.0
        return x - (self.decode(f * keep) - self._on(f.device)["b_dec"])

    def to_sae_lens(self) -> Any:
        """The equivalent sae-lens inference SAE (imports sae-lens)."""
        from sae_lens import SAE

        cfg: dict[str, Any] = {
            "architecture": self.architecture, "d_in": self.d_model, "d_sae": self.K, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": bool(self.info.get("apply_b_dec_to_input", False)),
            "normalize_activations": "none",
            "metadata": {"model_name": self.info.get("sae_model_name"), "hook_name": self.info.get("hook")},
        }
        if self.architecture == "topk":
            cfg.update(k=int(self.info["k"]),
                       rescale_acts_by_decoder_norm=bool(self.info.get("rescale_acts_by_decoder_norm", False)))
        sae = SAE.from_dict(cfg)
        sae.load_state_dict({k: v.float() for k, v in self.tensors.items()})
        return sae


# ---------------------------------------------------------------------------------------------------------
# Cost measurement


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _common_info(store: "ActivationStore", layer: int) -> dict[str, Any]:
    from bench.store import library_versions

    return {**store.provenance(layer), "versions": library_versions()}


# ---------------------------------------------------------------------------------------------------------
# Pretrained


def _directory() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _model_names(model: str) -> tuple[str, ...]:
    return MODEL_ALIASES.get(model, (model,))


def _releases_for(model: str) -> list[str]:
    names = set(_model_names(model))
    return sorted(r for r, v in _directory().items() if v.model in names)


def resolve_pretrained(release: str, sae_id_template: str, layer: int) -> tuple[str, Any]:
    """Check release and id against sae-lens' pretrained_saes.yaml; returns (sae_id, directory entry)."""
    try:
        sae_id = sae_id_template.format(layer=layer)
    except (KeyError, IndexError) as e:
        raise ValueError(f"sae_id {sae_id_template!r}: only the placeholder {{layer}} is filled in ({e})") from e
    directory = _directory()
    if release not in directory:
        gemma = sorted(r for r in directory if r.startswith("gemma-scope"))
        raise ValueError(f"unknown sae-lens release {release!r}; Gemma Scope releases: {', '.join(gemma)} "
                         f"({len(directory)} releases in sae-lens' pretrained_saes.yaml)")
    entry = directory[release]
    if sae_id not in entry.saes_map:  # Gemma Scope ids read layer_12/width_16k/..., Gemma Scope 2 layer_12_width_16k_...
        here = sorted(i for i in entry.saes_map if i.startswith((f"layer_{layer}/", f"layer_{layer}_")))
        shown = here or sorted(entry.saes_map)[:20]
        raise ValueError(f"SAE id {sae_id!r} is not in release {release!r}; ids "
                         f"{'at layer ' + str(layer) if here else '(first 20)'}: {', '.join(shown)}")
    return sae_id, entry


def published_training_tokens(repo_id: str, folder: str) -> float | None:
    """Training tokens the SAE's authors published, where we know them (Gemma Scope pt SAEs), else None."""
    m = re.search(r"width_(\w+?)(/|$)", folder)
    if m and repo_id.startswith("google/gemma-scope-") and "-pt-" in repo_id:
        return _GEMMA_SCOPE_TOKENS.get(m.group(1))
    return None


def _check_match(store: "ActivationStore", layer: int, sae_model: str | None, sae_hook: str | None, d_in: int,
                 what: str, allow_model_mismatch: bool) -> None:
    """Refuse an SAE built for another model, hook or width."""
    if sae_model is not None and sae_model not in _model_names(store.model) and not allow_model_mismatch:
        raise ValueError(f"{what} was trained on model {sae_model!r} but store {store.id} holds {store.model!r}; "
                         f"use a release for {store.model} ({', '.join(_releases_for(store.model)) or 'none known'}) "
                         "or set allow_model_mismatch=True to apply it anyway")
    hook = store.hook_name(layer)
    if sae_hook is not None and sae_hook != hook:
        raise ValueError(f"{what} reads hook {sae_hook!r} but the store's layer {layer} is {hook!r}; "
                         "pick the SAE id for this layer (sae_id='layer_{layer}/...') or fit another layer")
    if d_in != store.d_model:
        raise ValueError(f"{what} has d_in {d_in} but store {store.id} has d_model {store.d_model}; "
                         "the SAE belongs to another model or hook")


@contextlib.contextmanager
def _local_safetensors_shapes() -> Iterator[None]:
    """While loading: sae-lens' tensor-shape probe answered from the local Hugging Face cache when the file is there.

    sae-lens' Gemma Scope 2 loader (`gemma_3`) reads the shapes of params.safetensors by an HTTP range request on the
    hub even when it has that file cached, so a cached SAE fails to load offline. For a cached file the same header
    is read from the local copy (exactly what the range request fetches); any other file still goes to sae-lens'
    own function, i.e. the hub, unless HF_HUB_OFFLINE is set, which then raises the hub client's own
    "not in the local cache" error. The loader itself, its downloads and its weight conversion are sae-lens' own.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from safetensors import safe_open

    original = loaders.get_safetensors_tensor_shapes

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        local = try_to_load_from_cache(repo_id, filename)
        if isinstance(local, str):
            with safe_open(local, "pt") as f:
                return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        if constants.HF_HUB_OFFLINE:
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the local cache and HF_HUB_OFFLINE is set")
        return original(repo_id, filename)

    loaders.get_safetensors_tensor_shapes = shapes
    try:
        yield
    finally:
        loaders.get_safetensors_tensor_shapes = original


def load_pretrained(cfg: SAEConfig, store: "ActivationStore", layer: int) -> SAEArtefact:
    """Load `cfg.release` / `cfg.sae_id` through sae-lens and wrap it, after checking it fits the store.

    Gemma Scope 2 (e.g. release gemma-scope-2-270m-pt-res-all, sae_id layer_{layer}_width_16k_l0_small, for
    gemma-3-270m) goes through sae-lens' `gemma_3` loader; its shape probe reads a cached file locally
    (`_local_safetensors_shapes`), so a downloaded SAE also loads offline.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError
    from sae_lens import SAE

    store.check_layer(layer)
    sae_id, entry = resolve_pretrained(cfg.release, cfg.sae_id, layer)
    what = f"SAE {cfg.release}/{sae_id}"
    # The release's model is known before any download: refuse early rather than fetch hundreds of MB.
    if entry.model not in _model_names(store.model) and not cfg.allow_model_mismatch:
        _check_match(store, layer, entry.model, None, store.d_model, what, False)
    device = _device(cfg.device)
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        try:
            with _local_safetensors_shapes():
                sae = SAE.from_pretrained(cfg.release, sae_id, device=device, dtype="float32")
        except LocalEntryNotFoundError as e:
            raise RuntimeError(f"{what} is not in the local Hugging Face cache and the hub is unreachable or "
                               f"HF_HUB_OFFLINE=1 is set: unset HF_HUB_OFFLINE and check network/login "
                               f"(`hf auth login`) so sae-lens can download {entry.repo_id}") from e
    wall = time.perf_counter() - t0
    meta = sae.cfg.metadata
    arch = _check_loaded(sae, store, layer, what, cfg.allow_model_mismatch)
    tensors = _tensors_of(sae, arch)
    folder = entry.saes_map[sae_id]
    published = published_training_tokens(entry.repo_id, folder)
    info = _common_info(store, layer)
    info.update(
        source="pretrained", release=cfg.release, sae_id=sae_id, repo_id=entry.repo_id,
        folder=folder, neuronpedia_id=entry.neuronpedia_id.get(sae_id),
        sae_model_name=meta.model_name, sae_hook_name=meta.hook_name,
        model_mismatch=meta.model_name not in _model_names(store.model),
        **_arch_info(sae, arch),
        label=f"sae:{sae_id}",
        published_training_tokens=published,
        published_training_tokens_source=_GEMMA_SCOPE_SOURCE if published else "unknown",
        expected_variance_explained=entry.expected_var_explained.get(sae_id),
        expected_l0=entry.expected_l0.get(sae_id),
        cost={"rows": 0, "tokens": 0, "flops": 0.0, "wall_seconds": wall, "peak_memory_bytes": mem.peak,
              "device": device},
    )
    return SAEArtefact(cfg, tensors, info)


def load_from_path(cfg: SAEConfig, store: "ActivationStore", layer: int) -> SAEArtefact:
    """Load a sae-lens SAE directory (`cfg.path`, e.g. one you trained or an `epbench export`) through sae-lens."""
    from sae_lens import SAE

    store.check_layer(layer)
    path = Path(cfg.path.format(layer=layer)).expanduser()
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"{path}/cfg.json is missing: --path must name a sae-lens SAE directory "
                                "(cfg.json + sae_weights.safetensors, as `SAE.save_model` writes)")
    _check_sae_dir(path)
    device = _device(cfg.device)
    t0 = time.perf_counter()
    try:
        with PeakMemory(device) as mem:
            sae = SAE.load_from_disk(path, device=device, dtype="float32")
    except Exception as e:  # noqa: BLE001 - sae-lens' errors for a bad config are of every type: one line
        raise ValueError(f"{path} is not a loadable sae-lens SAE ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}); point --path at a folder written by sae-lens' "
                         "SAE.save_model or `epbench export`") from None
    wall = time.perf_counter() - t0
    meta, what = sae.cfg.metadata, f"SAE at {path}"
    arch = _check_loaded(sae, store, layer, what, cfg.allow_model_mismatch)
    info = _common_info(store, layer)
    info.update(
        source="disk", path=str(path.resolve()), sae_model_name=meta.model_name, sae_hook_name=meta.hook_name,
        model_mismatch=meta.model_name is not None and meta.model_name not in _model_names(store.model),
        **_arch_info(sae, arch), label=f"sae:{path.name}", published_training_tokens=None,
        cost={"rows": 0, "tokens": 0, "flops": 0.0, "wall_seconds": wall, "peak_memory_bytes": mem.peak,
              "device": device},
    )
    return SAEArtefact(cfg, _tensors_of(sae, arch), info)


def _check_sae_dir(path: Path) -> None:
    """Refuse, before sae-lens reads anything, a cfg.json that is not a JSON object and a weights file that is not
    safetensors (e.g. a pickle under that name: safetensors never unpickles, but its error is a traceback)."""
    import json
    import struct

    try:
        ok = isinstance(json.loads((path / "cfg.json").read_text()), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{path / 'cfg.json'} is not a JSON object (a sae-lens SAE config); point --path at a "
                         "folder written by sae-lens' SAE.save_model or `epbench export`")
    weights = path / "sae_weights.safetensors"
    try:
        with open(weights, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            ok = 1 < n <= min(100_000_000, weights.stat().st_size - 8) and f.read(1) == b"{"
    except OSError:
        ok = False
    if not ok:
        raise ValueError(f"{weights} is missing or not a safetensors file (a pickle or another format under that "
                         "name is never loaded); save the SAE with sae-lens' SAE.save_model or `epbench export`")


def _check_loaded(sae: Any, store: "ActivationStore", layer: int, what: str, allow_model_mismatch: bool) -> str:
    """Refuse a loaded sae-lens SAE this adapter cannot reproduce on this store; returns its architecture."""
    meta = sae.cfg.metadata
    _check_match(store, layer, meta.model_name, meta.hook_name, sae.cfg.d_in, what, allow_model_mismatch)
    arch = sae.cfg.architecture()
    if arch not in ENCODE_ARCHITECTURES:
        raise ValueError(f"{what} has architecture {arch!r}; this adapter encodes {ENCODE_ARCHITECTURES}")
    if sae.cfg.normalize_activations != "none" or sae.cfg.reshape_activations != "none":
        raise ValueError(f"{what} needs run-time normalisation {sae.cfg.normalize_activations!r} / reshape "
                         f"{sae.cfg.reshape_activations!r}, which this adapter does not reproduce")
    return arch


def _tensors_of(sae: Any, arch: str) -> dict[str, torch.Tensor]:
    names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    return {n: getattr(sae, n).detach().float().cpu().clone().contiguous() for n in names}


def _arch_info(sae: Any, arch: str) -> dict[str, Any]:
    return {
        "architecture": arch,
        "k": int(sae.cfg.k) if arch == "topk" else None,
        "width": int(sae.cfg.d_sae),
        "apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input),
        "rescale_acts_by_decoder_norm": bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)),
    }


# ---------------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class _Meter:
    rows: int = 0  # rows served to the trainer (the normalisation estimate included)
    tokens: int = 0  # tokens (BOS included) behind the training rows read from the store
    store_passes: int = 0  # completed passes over the store


class _Split(NamedTuple):
    """Which store contexts train and which are held out (context ids in store order)."""

    train_contexts: int  # the training pool is contexts [0, train_contexts)
    train_rows: int
    train_tokens: int  # rows + one BOS per context
    heldout_first: int  # held-out contexts are [heldout_first, n_contexts): the store's tail, never trained on
    heldout_contexts: int
    heldout_rows: torch.Tensor  # [<= heldout_max_rows, d] float32, the first rows of the held-out tail
    train_mean: torch.Tensor  # [d] float64 mean of the training pool (b_dec init)
    budget_clamped: bool = False  # token_budget reached past the held-out tail: the pool is everything before it


def _split(cfg: SAEConfig, store: "ActivationStore", layer: int) -> _Split:
    """One pass in store order: the training pool (contexts [0, n) within the budget), its mean, the held-out tail."""
    n_ctx = store.n_contexts
    if n_ctx < 2:
        raise ValueError(f"store {store.id} has {n_ctx} context(s); SAE training needs >= 2 so one can be held "
                         "out: extract more tokens")
    heldout_first = n_ctx - max(1, round(cfg.heldout_frac * n_ctx))
    budget = cfg.token_budget
    pool_contexts = pool_rows = pool_tokens = tokens_before_heldout = 0
    pool_sum = torch.zeros(store.d_model, dtype=torch.float64)
    pool_open = True
    held: list[torch.Tensor] = []
    n_held = 0
    for x_ND, ctx_N in stream_rows(store, layer):  # store order: context ids ascend, whole contexts per batch
        ids, counts = torch.unique_consecutive(ctx_N, return_counts=True)
        tokens_before_heldout += int((counts[ids < heldout_first] + 1).sum())  # + one BOS per context
        if pool_open:
            # The pool grows by whole contexts in stream order (the order EP reads) while they fit the budget.
            for c, n in zip(ids.tolist(), counts.tolist()):
                if c >= heldout_first or (budget is not None and pool_tokens + n + 1 > budget):
                    pool_open = False
                    break
                pool_contexts, pool_rows, pool_tokens = c + 1, pool_rows + n, pool_tokens + n + 1
            pool_sum += x_ND[ctx_N < pool_contexts].double().sum(0)
        tail = ctx_N >= heldout_first
        if n_held < cfg.heldout_max_rows and bool(tail.any()):
            held.append(x_ND[tail][: cfg.heldout_max_rows - n_held])
            n_held += held[-1].shape[0]
    if budget is not None and pool_contexts == 0:
        raise ValueError(f"token_budget={budget} must cover at least one context of store {store.id}; raise "
                         "token_budget or extract more tokens")
    # A budget beyond the held-out tail (e.g. EP streamed the whole store) cannot be met without training on held-out
    # rows: the pool stops at the tail and the artefact records that the budget was clamped.
    clamped = budget is not None and budget > tokens_before_heldout
    if pool_rows < cfg.batch_rows:
        raise ValueError(f"the training pool holds {pool_rows} rows, fewer than batch_rows={cfg.batch_rows}; "
                         "lower batch_rows or raise token_budget / extract more tokens")
    return _Split(pool_contexts, pool_rows, pool_tokens, heldout_first, n_ctx - heldout_first, torch.cat(held),
                  pool_sum / pool_rows, clamped)


def _pool_batches(store: "ActivationStore", layer: int, train_contexts: int, seed: int,
                  meter: _Meter) -> Iterator[torch.Tensor]:
    """Endless training rows: shuffled passes (seed + pass index) over the store, keeping contexts < train_contexts."""
    while True:
        for x_ND, ctx_N in stream_rows(store, layer, shuffle_seed=seed + meter.store_passes):
            keep = ctx_N < train_contexts
            if bool(keep.any()):
                meter.tokens += tokens_behind(ctx_N[keep])
                yield x_ND[keep]
        meter.store_passes += 1


def _counted(batches: Iterator[torch.Tensor], meter: _Meter, bar: Any) -> Iterator[torch.Tensor]:
    """Count the rows served (normalisation estimate included) and advance the progress bar."""
    for b in batches:
        meter.rows += b.shape[0]
        bar.update(b.shape[0])
        yield b


def training_flops(rows: int, width: int, d: int) -> float:
    """Analytic FLOPs of training: 12 * rows * width * d.

    Per row the encoder and the (dense) decoder matmuls cost 2*d*K multiply-adds = 4*d*K FLOPs forward, and the
    backward pass about twice that: 12*d*K, i.e. the usual 6 FLOPs per parameter per row with 2*d*K parameters.
    The TopK auxiliary loss (dead latents only) and elementwise work are not counted.
    """
    return 12.0 * rows * width * d


def eval_flops(rows: int, width: int, d: int) -> float:
    """Analytic FLOPs of one held-out evaluation: encoder and decoder forward, 4 * rows * width * d."""
    return 4.0 * rows * width * d


def _training_sae(cfg: SAEConfig, d: int, device: str, store: "ActivationStore", layer: int) -> Any:
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = get_sae_training_class(SAE_LENS_TRAINING_NAMES[cfg.architecture])
    extra: dict[str, Any] = {}
    if cfg.architecture == "topk":
        extra = {"k": cfg.k}
    elif cfg.architecture == "batchtopk":
        extra = {"k": float(cfg.k)}
    elif cfg.architecture == "matryoshka":
        extra = {"k": float(cfg.k), "matryoshka_widths": matryoshka_widths(cfg)}
    elif cfg.architecture == "jumprelu":
        # The Gemma Scope 2 quadratic L0 penalty steers the mean L0 toward k, so k means the same for all three.
        extra = {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(cfg.k),
                 "l0_coefficient": cfg.l0_coefficient, "jumprelu_init_threshold": cfg.jumprelu_init_threshold}
    sae_cfg = cfg_cls(d_in=d, d_sae=cfg.width, dtype="float32", device=device,
                      normalize_activations=cfg.normalize_activations,
                      metadata=SAEMetadata(model_name=store.model, hook_name=store.hook_name(layer)), **extra)
    return sae_cls(sae_cfg)


def matryoshka_widths(cfg: SAEConfig) -> list[int]:
    """The nested widths of a matryoshka SAE: the config's, or width/16, /8, /4, /2, width (doubling prefixes)."""
    widths = list(cfg.matryoshka_widths) if cfg.matryoshka_widths else sorted(
        {max(1, cfg.width // 2**i) for i in range(4, 0, -1)} | {cfg.width})
    if widths[-1] != cfg.width or any(a >= b for a, b in zip(widths, widths[1:])) or widths[0] < 1:
        raise ValueError(f"matryoshka_widths must increase strictly from >= 1 and end at width={cfg.width}, "
                         f"got {widths}")
    return widths


def _to_inference(training_sae: Any) -> Any:
    """sae-lens' own training -> inference conversion (as `save_inference_model` does, in memory)."""
    from sae_lens import SAE

    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict({k: v.float().cpu() for k, v in state.items()})
    return sae.to("cpu")


class HeldoutStats(NamedTuple):
    """An SAE's reconstruction and sparsity on held-out rows."""

    nmse: float  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    explained_variance: float  # 1 - nmse
    mean_l0: float  # active latents per row
    dense_fraction: float  # latents active on more than dense_threshold of the rows
    never_fired_fraction: float  # latents active on none of the rows


def _row_total(per_row: torch.Tensor) -> float:
    """The exactly rounded sum (math.fsum) of per-row values: independent of their order and of the thread count."""
    return math.fsum(per_row.double().cpu().tolist())


@torch.no_grad()
def heldout_stats(encode: Any, decode: Any, x_ND: torch.Tensor, dense_threshold: float,
                  chunk: int = 4096) -> HeldoutStats:
    """Held-out reconstruction and sparsity of an encode/decode pair, in row chunks to bound memory.

    Sums are per row, then over rows exactly (`_row_total`), so the NMSE (and the stopping rule reading it) is the
    same float at any thread count: a flat `.sum()` over a chunk splits across threads, and its last bits (1e-7 of
    the held-out EV here) then depend on how many there are."""
    err = var = active = fires = 0.0
    mean = x_ND.double().mean(0)
    for i in range(0, x_ND.shape[0], chunk):
        x = x_ND[i : i + chunk]
        f = encode(x)
        err += _row_total((x - decode(f)).pow(2).sum(1))
        var += _row_total((x.double() - mean).pow(2).sum(1))
        on = f != 0
        active += float(on.sum())
        fires = fires + on.sum(0)
    n = x_ND.shape[0]
    nmse = err / var if var > 0 else float("inf")
    rate = fires / n
    return HeldoutStats(nmse, 1.0 - nmse, active / n, float((rate > dense_threshold).float().mean()),
                        float((rate == 0).float().mean()))


def _eval_training_sae(trainer: Any, x_ND: torch.Tensor, dense_threshold: float) -> HeldoutStats:
    """Held-out stats of the SAE as it would be saved now (sae-lens' inference conversion), on scaled rows."""
    inference = _to_inference(trainer.sae).to(x_ND.device)
    scaled = trainer.activation_scaler(x_ND)  # NMSE and EV do not change under a common scaling of x and x_hat
    return heldout_stats(inference.encode, inference.decode, scaled, dense_threshold)


class _Convergence:
    """Stopping rule: the best held-out NMSE of the last `window` of steps is < `tol` below the earlier best."""

    def __init__(self, tol: float, window: float, eval_every: int, min_steps: int):
        self.tol, self.window, self.eval_every, self.min_steps = tol, window, eval_every, min_steps
        self.points: list[tuple[int, float]] = []  # (step, held-out NMSE)

    def add(self, step: int, nmse: float) -> str | None:
        """Record an eval point; returns why training has converged, or None."""
        self.points.append((step, nmse))
        # The window must span at least one eval interval, so the check starts at step eval_every / window.
        if self.tol <= 0 or step < self.min_steps or step * self.window < self.eval_every:
            return None
        start = step - step * self.window
        # Best so far, not the last point, so one noisy evaluation neither stops nor prolongs the run.
        before = min(v for s, v in self.points if s <= start)
        within = min(v for s, v in self.points if s > start)
        gain = (before - within) / before if before > 0 else 0.0
        if gain < self.tol:
            return (f"converged: best held-out NMSE of steps {math.floor(start) + 1}-{step} (the last "
                    f"{100 * self.window:g}% of steps) is {100 * gain:.2f}% below the best before "
                    f"(< {100 * self.tol:g}%)")
        return None


JUMPRELU_L0_SLACK = 1.5  # a JumpReLU SAE's held-out L0 must be within this factor of its target k to stop


def l0_reached(cfg: SAEConfig, mean_l0: float) -> bool:
    """Whether the NMSE rule may stop training: always for TopK-style SAEs (their L0 is fixed by k), for JumpReLU only
    once its held-out L0 is within a factor JUMPRELU_L0_SLACK of the target k, on either side; a plateau in NMSE while
    the L0 penalty is still moving L0 is not convergence, nor is an SAE whose latents have all stopped firing (its
    NMSE plateaus at 1). Measured on synth-cpu (width 512, k 8, cap 4M rows = 3,906 steps at lr 3e-4, seed 0): the
    NMSE rule alone stopped at step 878 with L0 198; with the upper bound training ran to the cap and ended at L0
    30.7, EV 0.852. Within a budget that short the L0 it ends at is set by where the thresholds start, not by
    l0_coefficient (1 and 10: the same L0): Adam moves a threshold by about lr per step, about 1.2 over this budget.
    Initial threshold 0.5: L0 13.3, EV 0.80; 1.0: every latent silent from the start (L0 0, EV 0.00), which the upper
    bound alone accepted as converged at step 488. `jumprelu_init="quantile"` (init_thresholds_from_data) starts at
    L0 ~k; with it and a 12M-row cap this rule stopped the same SAE at step ~5,000, L0 9.7 (bench/suites/synth.py)."""
    return cfg.architecture != "jumprelu" or cfg.k / JUMPRELU_L0_SLACK <= mean_l0 <= JUMPRELU_L0_SLACK * cfg.k


@torch.no_grad()
def init_thresholds_from_data(sae: Any, x_ND: torch.Tensor, k: int) -> torch.Tensor:
    """Start each JumpReLU latent's threshold at its (1 - k/width) pre-activation quantile on the rows x_ND (scaled
    as the SAE sees them), floored at 0 (sae-lens keeps thresholds >= 0), so each latent fires on about a k/width
    share of the rows and training starts at mean L0 ~ k. Returns the thresholds.

    Why: with sae-lens' constant start (0.01) the final L0 is set by the start, not by the L0 penalty, because Adam
    moves a threshold by about lr per step (measured on synth-cpu, width 512, k 8, 3,906 steps at lr 3e-4: start
    0.01 ends at L0 30.7, 0.5 at 13.3, 1.0 silences every latent). A reduced training budget cannot move thresholds
    far enough; starting them where the target L0 puts them removes that dependence."""
    _, pre_NK = sae.encode_with_hidden_pre(x_ND)
    q = 1.0 - k / pre_NK.shape[1]
    threshold = torch.quantile(pre_NK.float(), q, dim=0).clamp(min=0.0)
    sae.threshold.data.copy_(threshold.to(sae.threshold.dtype))
    return threshold


def _linear_decay(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """lr falls linearly from its current value to 0 over `steps` optimiser steps."""
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1.0 - i / steps))


REPRODUCES = ("bit-identical on the same CPU (model and stepping), BLAS build, thread count, store "
              "(activations_sha256) and seed; on another CPU or BLAS code path training diverges from its first "
              "steps: expect its metrics within the seed spread, not equal (README, Reproducibility)")


@contextlib.contextmanager
def _reproducible_training(threads: int | None) -> Iterator[dict[str, Any]]:
    """While training: `threads` torch CPU threads (None: the process's) and torch's deterministic algorithms (an op
    that has a deterministic variant uses it; warn_only: one without warns rather than fails), both restored after.
    Yields what the artefact records: the thread count, the CPU and the BLAS (bench.reproducibility)."""
    import torch.utils.deterministic as det

    from bench.reproducibility import blas_info, cpu_info

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False  # NaN-filling every new tensor (a debugging aid) cost ~10% of training
    try:
        yield {"threads": torch.get_num_threads(), "deterministic_algorithms": True, "cpu": cpu_info(),
               "blas": blas_info(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "reproduces": REPRODUCES}
    finally:
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        det.fill_uninitialized_memory = before[3]
        torch.set_num_threads(before[0])


def activations_sha256(store: "ActivationStore", layer: int) -> str | None:
    """sha256 over the sha256 of the layer's (and the row metadata's) shard files, in shard order: two stores with
    the same id extracted on two machines hold bit-identical activations exactly when this agrees."""
    shards = getattr(store, "_shards", None)
    if not shards:
        return None
    h = hashlib.sha256()
    for sh in shards:
        for rel, meta in sorted(sh["files"].items()):
            if rel.startswith((f"L{layer:02d}/", "meta/")):
                h.update(f"{rel}:{meta['sha256']}\n".encode())
    return h.hexdigest()


def train_on_store(cfg: SAEConfig, store: "ActivationStore", layer: int) -> SAEArtefact:
    """Train an sae-lens SAE with sae-lens' SAETrainer on store rows until held-out convergence or the cap.

    Steps go through the trainer's own `step` (optimiser, lr schedule, dead-latent tracking, TopK aux loss), the
    loop around it is `SAETrainer.fit`'s plus held-out evaluation and the stopping rule in `SAEConfig`.
    """
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.mixing_buffer import mixing_buffer
    from sae_lens.training.sae_trainer import SAETrainer

    store.check_layer(layer)
    d, device = store.d_model, _device(cfg.device)
    meter = _Meter()
    t0 = time.perf_counter()
    split = _split(cfg, store, layer)
    cap_rows = cfg.training_tokens if cfg.max_epochs is None else \
        min(cfg.training_tokens, math.ceil(cfg.max_epochs * split.train_rows))
    cap_steps = max(1, cap_rows // cfg.batch_rows)
    decay_cap = round(cfg.lr_decay_frac * cap_steps)  # steps kept for the final decay when the cap is reached
    heldout = split.heldout_rows.to(device)
    # Auto: ~100 curve points, but no more often than every 3 * heldout_rows / batch_rows steps, so held-out
    # evaluation (4 FLOPs per row and weight, vs 12 to train) costs at most ~11% of training.
    eval_every = cfg.eval_every or max(1, cap_steps // 100, math.ceil(3 * heldout.shape[0] / cfg.batch_rows))
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    bar = tqdm(unit="row", unit_scale=True, disable=not cfg.progress,
               desc=f"train {cfg.architecture} SAE w{cfg.width} on {store.model} L{layer}")
    curve: dict[str, list[float | None]] = {name: [] for name in CURVE_COLUMNS}
    stop_reason, decay_start, eval_seconds, n_evals = "", None, 0.0, 0
    with PeakMemory(device) as mem, torch.random.fork_rng(devices=cuda_devices), \
            _reproducible_training(cfg.train_threads) as repro:
        # fork_rng keeps the seeding (init, mixing-buffer randperm) local to this fit
        torch.manual_seed(cfg.seed)
        sae = _training_sae(cfg, d, device, store, layer)
        rows = _counted(mixing_buffer(cfg.buffer_rows, cfg.batch_rows,
                                      _pool_batches(store, layer, split.train_contexts, cfg.seed, meter)), meter, bar)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cap_steps * cfg.batch_rows, train_batch_size_samples=cfg.batch_rows, lr=cfg.lr,
            lr_end=cfg.lr, lr_decay_steps=0, device=device, dead_feature_window=cfg.dead_feature_window,
            logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, save_final_checkpoint=False,
            n_batches_for_norm_estimate=max(1, min(1000, split.train_rows // cfg.batch_rows)),
        )
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=rows)
        trainer.sae.to(device)
        if cfg.normalize_activations == "expected_average_only_in":  # as SAETrainer.fit does before its loop
            trainer.activation_scaler.estimate_scaling_factor(d, rows, trainer_cfg.n_batches_for_norm_estimate)
        if cfg.init_b_dec == "mean":
            # sae-lens starts b_dec at 0; the residual stream's mean is far from 0 (norm ~ the rows' spread), and
            # Adam moves b_dec by about lr per step, so without this the SAE spends its steps learning the offset.
            mean = split.train_mean.float().to(device)
            trainer.sae.b_dec.data.copy_(trainer.activation_scaler(mean[None])[0])
        if cfg.architecture == "jumprelu" and cfg.jumprelu_init == "quantile":
            init_thresholds_from_data(trainer.sae, trainer.activation_scaler(next(rows).to(device)), cfg.k)
        min_steps = cfg.converge_min_steps
        if cfg.architecture in ("batchtopk", "matryoshka"):
            # The saved JumpReLU threshold is an EMA of the batch top-k threshold started at 0: its held-out NMSE
            # means little until ~3 EMA time constants (e^-3 = 5% of the start left) have passed.
            min_steps = max(min_steps, math.ceil(3 / trainer.sae.cfg.topk_threshold_lr))
        convergence = _Convergence(cfg.converge_tol, cfg.converge_window, eval_every, min_steps)
        window_loss: list[float] = []

        def evaluate() -> str | None:
            nonlocal eval_seconds, n_evals
            te = time.perf_counter()
            trainer.sae.eval()
            s = _eval_training_sae(trainer, heldout, cfg.dense_threshold)
            trainer.sae.train()
            eval_seconds += time.perf_counter() - te
            n_evals += 1
            step = trainer.n_training_steps
            point = {"step": step, "rows": trainer.n_training_samples,
                     "epoch": trainer.n_training_samples / split.train_rows,
                     "train_loss": sum(window_loss) / len(window_loss) if window_loss else None,  # None before step 1
                     "heldout_nmse": s.nmse, "heldout_explained_variance": s.explained_variance,
                     "l0": s.mean_l0, "dead_fraction": float(trainer.dead_neurons.float().mean()),
                     "dense_fraction": s.dense_fraction, "never_fired_fraction": s.never_fired_fraction,
                     "lr": trainer.optimizer.param_groups[0]["lr"]}
            for name in CURVE_COLUMNS:
                curve[name].append(point[name])
            bar.set_postfix(step=step, epoch=f"{point['epoch']:.1f}", heldout_ev=f"{s.explained_variance:.4f}",
                            l0=f"{s.mean_l0:.1f}")
            window_loss.clear()
            why = convergence.add(step, s.nmse) if decay_start is None else None
            return why if why is None or l0_reached(cfg, s.mean_l0) else None

        evaluate()
        end = cap_steps
        try:
            while trainer.n_training_steps < end:
                trainer.maybe_reset_sparsity()
                window_loss.append(float(trainer.step(next(rows)).loss.detach()))
                trainer.n_training_steps += 1
                step = trainer.n_training_steps
                if step % eval_every == 0 or step == end:
                    why = evaluate()
                    if step == end and not stop_reason:
                        stop_reason = f"cap: {cap_steps} steps ({_cap_text(cfg, cap_rows, split.train_rows)})"
                    if why and decay_start is None:
                        stop_reason, decay_start = why, step
                        end = min(cap_steps, step + round(step * cfg.lr_decay_frac / (1 - cfg.lr_decay_frac)))
                if decay_start is None and step >= cap_steps - decay_cap and decay_cap > 0:
                    decay_start = step  # not converged: the last lr_decay_frac of the cap decays the lr
                if decay_start == step and end > step:
                    trainer.lr_scheduler = _linear_decay(trainer.optimizer, end - step)
        finally:
            bar.close()
        if trainer.n_training_steps % eval_every and curve["step"][-1] != trainer.n_training_steps:
            evaluate()
        dead = int(trainer.dead_neurons.sum())
        _finish_like_fit(trainer)
        inference = _to_inference(trainer.sae)
    wall = time.perf_counter() - t0
    arch = inference.cfg.architecture()
    steps, trained = trainer.n_training_steps, trainer.n_training_samples
    converged = stop_reason.startswith("converged")
    flops_train = training_flops(trained, cfg.width, d)
    flops_eval = n_evals * eval_flops(heldout.shape[0], cfg.width, d)
    budget = {"mode": "token_budget" if cfg.token_budget is not None else "converged",
              "token_budget": cfg.token_budget, "pool_tokens": split.train_tokens, "pool_rows": split.train_rows,
              "pool_contexts": split.train_contexts, "rows_trained": trained, "epochs": trained / split.train_rows,
              "budget_clamped_to_pool": split.budget_clamped}
    info = _common_info(store, layer)
    info.update(
        source="trained", training_architecture=cfg.architecture, sae_model_name=store.model,
        sae_hook_name=store.hook_name(layer), **_arch_info(inference, arch),
        label=f"sae:{cfg.architecture}-w{cfg.width}-k{cfg.k}" + (
            f"-tokens{cfg.token_budget}" if cfg.token_budget is not None else
            f"-rows{cfg.training_tokens}" if cfg.converge_tol == 0 else ""),  # a fixed budget names the SAE
        budget=budget,
        training={"rows": trained, "steps": steps, "epochs": trained / split.train_rows,
                  "store_passes": meter.store_passes, "converged": converged, "stop_reason": stop_reason,
                  "criterion": CONVERGENCE_RULE.format(tol=100 * cfg.converge_tol, window=100 * cfg.converge_window,
                                                       every=eval_every, min_steps=min_steps),
                  "lr_decay_start_step": decay_start, "eval_every": eval_every, "cap_steps": cap_steps,
                  "heldout": {"contexts": [split.heldout_first, split.heldout_first + split.heldout_contexts],
                              "rows": int(heldout.shape[0]),
                              "what": "the store's last heldout_frac of contexts (store order), never trained on"},
                  "dense_threshold": cfg.dense_threshold, "dead_latents_at_end": dead,
                  "train_seconds": wall - eval_seconds, "eval_seconds": eval_seconds, "evals": n_evals,
                  "rows_per_second": trained / max(wall - eval_seconds, 1e-9),
                  "flops_train": flops_train, "flops_eval": flops_eval,
                  "flops_formula": "12 * rows_trained * width * d + evals * 4 * heldout_rows * width * d",
                  "trainer": "sae_lens.training.sae_trainer.SAETrainer", "curve": curve,
                  "reproducibility": {**repro, "seed": cfg.seed, "device": device,
                                      "activations_sha256": activations_sha256(store, layer)}},
        published_training_tokens=None,
        cost={"rows": meter.rows, "tokens": meter.tokens, "flops": flops_train + flops_eval,
              "wall_seconds": wall, "peak_memory_bytes": mem.peak, "device": device},
    )
    art = SAEArtefact(cfg, _tensors_of(inference, arch), info)
    final = heldout_stats(art.encode, art.decode, split.heldout_rows, cfg.dense_threshold)
    art.info.update(explained_variance=final.explained_variance, heldout_nmse=final.nmse, mean_l0=final.mean_l0,
                    dense_fraction=final.dense_fraction, never_fired_fraction=final.never_fired_fraction)
    return art


# dead_fraction: sae-lens' definition (no firing in the last dead_feature_window steps, so 0 in runs shorter than
# the window); never_fired_fraction: active on none of the held-out rows; dense_fraction: on > dense_threshold.
CURVE_COLUMNS = ("step", "rows", "epoch", "train_loss", "heldout_nmse", "heldout_explained_variance", "l0",
                 "dead_fraction", "dense_fraction", "never_fired_fraction", "lr")
CONVERGENCE_RULE = ("stop when the best held-out NMSE of the last {window:g}% of steps is less than {tol:g}% below "
                    "the best before them "
                    "(checked every {every} steps from step {min_steps}), then decay lr linearly to 0 over "
                    "lr_decay_frac of the run; or at the cap (training_tokens rows / max_epochs)")


def _cap_text(cfg: SAEConfig, cap_rows: int, pool_rows: int) -> str:
    epochs = f", max_epochs={cfg.max_epochs:g}" if cfg.max_epochs is not None else ""
    return (f"{cap_rows} rows = {cap_rows / pool_rows:.2f} epochs of the pool; "
            f"training_tokens={cfg.training_tokens}{epochs}")


def _finish_like_fit(trainer: Any) -> None:
    """What SAETrainer.fit does after its loop: fold the activation scaling into the weights, record metadata."""
    if trainer.activation_scaler.scaling_factor is not None:
        trainer.sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()


class SAEMethod(Method):
    """Sparse autoencoder: a pretrained sae-lens SAE (`release` set) or one trained on the store."""

    name = "sae"
    config_cls = SAEConfig
    artefact_cls = SAEArtefact

    def fit(self, store: "ActivationStore", layer: int,
            concepts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> SAEArtefact:
        """Load (pretrained) or train the SAE for `layer` of `store`; concepts are ignored (unsupervised)."""
        if self.config.path:
            return load_from_path(self.config, store, layer)
        if self.config.release:
            return load_pretrained(self.config, store, layer)
        return train_on_store(self.config, store, layer)
