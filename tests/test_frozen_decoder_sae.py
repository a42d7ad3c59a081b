"""The frozen-random-decoder SAE baseline (arXiv 2602.14111): decoder fixed, encoder trained."""

from __future__ import annotations

import math

import pytest
import torch

from bench.store import ExtractionRequest, extract


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from methods.frozen_decoder_sae import FrozenDecoderSAE

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPBENCH_CACHE", str(tmp_path_factory.mktemp("frozen-cache")))
        store = extract(ExtractionRequest(model="synth-tiny", layers=[0], corpus="synthetic", tokens=16384,
                                          ctx_len=32, shard_contexts=64), progress=False)
        cfg = {"width": 64, "k": 4, "training_tokens": 60_000, "batch_rows": 256, "buffer_rows": 1024,
               "converge_tol": 0.0, "eval_every": 20, "seed": 3}
        yield store, FrozenDecoderSAE(**cfg).fit(store, 0), cfg


def test_decoder_is_unchanged_by_training(fitted):
    from methods.random_directions import random_unit_directions

    store, art, cfg = fitted
    assert torch.equal(art.tensors["W_dec"], random_unit_directions(cfg["width"], store.d_model, cfg["seed"]))
    assert torch.allclose(art.directions.norm(dim=1), torch.ones(cfg["width"]))
    assert art.info["training"]["steps"] == cfg["training_tokens"] // cfg["batch_rows"]  # converge_tol 0: the cap


def test_loss_decreases(fitted):
    _, art, _ = fitted
    curve = art.info["training"]["curve"]
    assert curve["heldout_nmse"][-1] < 0.95 * curve["heldout_nmse"][0]  # W_enc = W_dec^T starts near 0.67
    losses = [v for v in curve["train_loss"] if not math.isnan(v)]
    assert losses[-1] < losses[0]
    assert art.info["explained_variance"] > 0.2 and art.cost.rows >= art.info["training"]["rows"]


def test_encode_decode_and_sae_lens_equivalence(fitted):
    store, art, _ = fitted
    x = next(store.batches(0, batch_contexts=4)).acts
    f = art.encode(x)
    assert ((f != 0).sum(1) <= 4).all() and (f >= 0).all()
    sae = art.to_sae_lens()
    assert torch.allclose(sae.encode(x), f, atol=1e-5)
    assert torch.allclose(sae.decode(f), art.decode(f), atol=1e-5)


def test_save_load_round_trip(fitted, tmp_path):
    from methods.base import load_artefact

    store, art, _ = fitted
    back = load_artefact(art.save(tmp_path / "frozen"))
    assert type(back) is type(art) and back.name == art.name and back.config == art.config
    assert all(torch.equal(back.tensors[k], v) for k, v in art.tensors.items())
    x = next(store.batches(0, batch_contexts=2)).acts
    assert torch.equal(back.encode(x), art.encode(x))
