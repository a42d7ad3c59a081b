"""Model backends: hook names, tiny Gemma-2 architecture, the embedded model is real, clear errors."""

import time

import pytest
import torch

from bench.models import LOADERS, load_model, tiny_gemma2_config


def test_tiny_gemma2_has_gemma2_architecture(tiny_model):
    cfg = tiny_model.model.cfg
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert cfg.gated_mlp and cfg.use_normalization_before_and_after
    assert cfg.attn_scores_soft_cap == 50.0 and cfg.output_logits_soft_cap == 30.0
    assert set(cfg.attn_types) == {"local", "global"}


def test_run_layers_captures_resid_post_with_standard_hook_names(tiny_model):
    toks, lengths = tiny_model.to_tokens(["hello world", "a"])
    assert toks[0, 0] == tiny_model.bos_id and lengths.tolist() == [12, 2]
    out = tiny_model.run_layers(toks, [1, 3])
    assert set(out) == {1, 3} and out[3].shape == (2, 12, 64)
    _, cache = tiny_model.model.run_with_cache(toks)
    torch.testing.assert_close(out[1], cache["blocks.1.hook_resid_post"])
    assert tiny_model.hook_name(3) == "blocks.3.hook_resid_post"


def test_stop_at_layer_gives_the_same_activations_as_a_full_pass(tiny_model):
    toks, _ = tiny_model.to_tokens(["stop early please"])
    early = tiny_model.run_layers(toks, [0])[0]
    _, cache = tiny_model.model.run_with_cache(toks)
    torch.testing.assert_close(early, cache["blocks.0.hook_resid_post"])


def test_layer_out_of_range_and_unknown_model_errors(tiny_model):
    with pytest.raises(ValueError, match=r"out of range .* layers 0\.\.3"):
        tiny_model.check_layers([2, 7])
    with pytest.raises(ValueError, match="unknown model 'gpt-9'.*smollm2-135m"):
        load_model("gpt-9")


def test_wide_tiny_model_is_full_width():
    cfg = tiny_gemma2_config(d_model=2304, n_layers=2)
    assert cfg["d_model"] == 2304 and cfg["n_layers"] == 2
    wide = load_model("tiny-gemma2-wide")
    toks, _ = wide.to_tokens(["full width"])
    assert wide.run_layers(toks, [1])[1].shape == (1, 11, 2304)


def test_gemma_offline_error_is_one_clear_line_and_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.time()
    with pytest.raises(RuntimeError) as err:
        LOADERS["gemma-2-2b"](None)
    assert time.time() - t0 < 2
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "licence" in msg and "HF_TOKEN" in msg


@pytest.mark.slow
def test_embedded_model_is_a_real_trained_model(smollm2):
    assert "Paris" in smollm2.greedy_continuation("The capital of France is", 4)
    assert smollm2.d_model == 576 and smollm2.n_layers == 30
    diff, top1 = smollm2.score_prompts(["The capital of France is"], [" Paris"], [" London"])
    assert diff[0] > 0 and top1[0]


def test_next_token_logits_equal_the_full_forward_at_the_last_position(tiny_model):
    import torch

    texts = ["The capital of France is", "hi", "a longer prompt with several words in it"]
    toks, lengths = tiny_model.to_tokens(texts)
    full = tiny_model.model(toks, return_type="logits")[torch.arange(len(texts)), lengths - 1].float()
    assert tiny_model.model.cfg.output_logits_soft_cap > 0  # the soft cap path is exercised
    torch.testing.assert_close(tiny_model.next_token_logits(texts), full, atol=1e-5, rtol=1e-5)


def test_final_logits_of_selected_token_ids_are_the_full_columns(tiny_model):
    """final_logits(resid, token_ids) = final_logits(resid)[..., token_ids], through the norm and the soft cap."""
    import torch

    toks, _ = tiny_model.to_tokens(["The capital of France is", "hi"])
    m = tiny_model.model
    assert m.cfg.output_logits_soft_cap > 0
    with torch.no_grad():
        resid = m(toks, stop_at_layer=m.cfg.n_layers)
        full = tiny_model.final_logits(resid)
        ids = torch.tensor([5, 0, 258, 5, 100])  # repeats and both ends of the vocabulary
        part = tiny_model.final_logits(resid, token_ids=ids)
        assert part.shape == (*resid.shape[:-1], 5)
        torch.testing.assert_close(part, full[..., ids], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tiny_model.final_logits(resid[:, -1], token_ids=ids[:2]), full[:, -1, ids[:2]],
                                   rtol=1e-6, atol=1e-6)  # [B, d] in, [B, n] out
        assert tiny_model.final_logits(resid, token_ids=torch.tensor([], dtype=torch.long)).shape[-1] == 0
    for bad in (torch.tensor([[1, 2]]), torch.tensor([259]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="token_ids"):
            tiny_model.final_logits(resid, token_ids=bad)
