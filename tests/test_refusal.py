"""Refusal metric: refusal-phrase matching, pair splits, chat formatting, batched KV-cached generation against a
plain greedy loop, the ablation hook's positions, and the planted-region ablation experiment (tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.corpora import hash_unit
from bench.prompts import RefusalPrompts, refusal_prompts
from metrics import refusal
from metrics.refusal import (
    RefusalConfig,
    baseline_refusal_rows,
    chat_ids,
    chat_text,
    generate_responses,
    is_refusal,
    refusal_ablation_metrics,
    split_pairs,
)

from fakes import LAYER, LinArtefact, make

REQUESTS = ["hi", "hello there, how are you", "x", "tell me a story about a cat"]


def test_is_refusal():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("  I cannot provide instructions for this.")
    assert is_refusal("As an AI, I won\u2019t do that")
    assert not is_refusal("To build a birdhouse, follow these steps: cut the wood.")
    assert not is_refusal("Sure! " + "x" * 200 + " I cannot stress enough")  # past the opening window


def test_split_pairs_keeps_pairs_together():
    rp = refusal_prompts()
    train, test = split_pairs(rp, 0.5, seed=0)
    assert len(train.harmful) + len(test.harmful) == len(rp.harmful) and len(train.harmful) == 25
    assert not set(train.harmful) & set(test.harmful)
    pair = dict(zip(rp.harmful, rp.harmless))
    assert all(pair[h] == s for part in (train, test) for h, s in zip(part.harmful, part.harmless))
    assert split_pairs(rp, 0.5, seed=0) == (train, test) and split_pairs(rp, 0.5, seed=1)[0] != train
    with pytest.raises(ValueError, match="train_frac"):
        split_pairs(rp, 1.0)


def test_chat_text_has_one_bos(tiny_model):
    tok = tiny_model.tokenizer
    assert chat_text(tiny_model, "hi") == "<bos>User: hi\nAssistant:"  # no chat template: a plain transcript
    ids = chat_ids(tiny_model, "hi")
    assert ids[0] == tiny_model.bos_id and ids.count(tiny_model.bos_id) == 1
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        assert chat_text(tiny_model, "hi") == "<bos><user>hi<assistant>"  # the template's BOS is kept, not doubled
        assert chat_ids(tiny_model, "hi").count(tiny_model.bos_id) == 1
    finally:
        tok.chat_template = None


def test_batched_generation_matches_plain_greedy(tiny_model):
    """Oracle: greedy decoding one prompt at a time, no KV cache, no padding."""
    n = 5
    batched = generate_responses(tiny_model, REQUESTS, n, batch_size=len(REQUESTS))
    for req, got in zip(REQUESTS, batched.texts):
        ids = torch.tensor([chat_ids(tiny_model, req)])
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, tiny_model.model(ids, return_type="logits")[0, -1].argmax().view(1, 1)], 1)
        assert got == tiny_model.tokenizer.decode(ids[0, -n:].tolist(), skip_special_tokens=True)
    assert batched.refused.dtype == bool and batched.rate == 0.0  # random bytes never open with a refusal


def test_ablation_hook_skips_bos_and_padding(tiny_model):
    seen = []

    def identity(x):
        seen.append(x.shape[0])
        return x

    n = 3
    hooked = generate_responses(tiny_model, REQUESTS, n, identity, tiny_model.hook_name(LAYER), batch_size=4)
    plain = generate_responses(tiny_model, REQUESTS, n, batch_size=4)
    assert hooked.texts == plain.texts  # an identity intervention changes nothing
    lengths = [len(chat_ids(tiny_model, r)) for r in REQUESTS]
    assert seen[0] == sum(L - 1 for L in lengths)  # prompt pass: every real token but BOS
    assert seen[1:] == [len(REQUESTS)] * (n - 1)  # each cached step: one new token per row
    zeroed = generate_responses(tiny_model, REQUESTS, n, lambda x: 0 * x, tiny_model.hook_name(LAYER), 4)
    assert zeroed.texts != plain.texts


def test_ablation_picks_the_planted_region_and_reports_paired_rates(tiny_model, monkeypatch):
    # Refusal judged by a hash of the response, so rates move when the ablation changes the text.
    monkeypatch.setattr(refusal, "is_refusal", lambda t: hash_unit(t) < 0.5)
    rp = RefusalPrompts([f"please do harm number {i}" for i in range(6)],
                        [f"please do good deed {i}" for i in range(6)])
    cfg = RefusalConfig(max_new_tokens=3, batch_size=4)
    train, test = split_pairs(rp, cfg.train_frac, cfg.split_seed)
    acts = refusal._last_token_residuals(tiny_model, train.harmful + train.harmless, LAYER, 4)
    planted = acts[: len(train.harmful)].mean(0) - acts[len(train.harmful):].mean(0)
    dirs = torch.randn(6, tiny_model.d_model, generator=torch.Generator().manual_seed(1)) * 1e-3
    dirs[4] = planted
    art = make(LinArtefact, dirs)
    rows = {r.metric: r for r in refusal_ablation_metrics(art, tiny_model, rp, cfg)}
    assert "region 4 of 6" in rows["refusal.delta"].detail
    before = generate_responses(tiny_model, test.harmful, 3).refused.astype(float)
    after = generate_responses(tiny_model, test.harmful, 3, lambda x: art.ablate(x, [4]),
                               tiny_model.hook_name(LAYER)).refused.astype(float)
    assert rows["refusal.heldout_baseline_rate"].value == pytest.approx(before.mean())
    assert rows["refusal.ablated_rate"].value == pytest.approx(after.mean())
    assert rows["refusal.delta"].value == pytest.approx((after - before).mean())
    r = rows["refusal.delta_vs_control"]
    assert r.value == pytest.approx(after.mean() - rows["refusal.control_rate"].value)
    assert all(x.n == len(test.harmful) and x.layer == LAYER for x in rows.values())


def test_baseline_rows(tiny_model, monkeypatch):
    monkeypatch.setattr(refusal, "is_refusal", lambda t: hash_unit(t) < 0.5)
    rp = RefusalPrompts(REQUESTS, [r + "!" for r in REQUESTS])
    rows = {r.metric: r for r in baseline_refusal_rows(tiny_model, rp, RefusalConfig(max_new_tokens=3))}
    assert set(rows) == {"refusal.baseline.harmful_rate", "refusal.baseline.harmless_rate"}
    expect = np.mean([hash_unit(t) < 0.5 for t in generate_responses(tiny_model, REQUESTS, 3).texts])
    harmful = rows["refusal.baseline.harmful_rate"]
    assert harmful.value == pytest.approx(expect) and harmful.n == len(REQUESTS) and harmful.method == "model"
