"""Synthetic (SynthSAEBench) backends: presets, the store of samples with its ground truth, dispatch, skip rules."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bench import synth
from bench.store import ExtractionRequest, extract, open_verified

TOKENS, CTX = 4096, 32  # 128 contexts of 31 samples of synth-tiny


@pytest.fixture(scope="module")
def cache(module_cache):
    return module_cache


@pytest.fixture(scope="module")
def store(cache):
    return extract(ExtractionRequest(model="synth-tiny", layers=[0], corpus="synthetic", tokens=TOKENS, ctx_len=CTX,
                                     shard_contexts=64), progress=False)


def test_presets_are_synthsaebench_16k_scaled():
    cfg = synth.model_config("synth-16k").to_dict()
    assert (cfg["num_features"], cfg["hidden_dim"], cfg["seed"], cfg["bias"]) == (16384, 768, 42, 0.5)
    fp = cfg["firing_probability"]
    assert (fp["exponent"], fp["max_prob"], fp["min_prob"]) == (0.5, 0.4, 5e-4)
    h = cfg["hierarchy"]
    assert (h["total_root_nodes"], h["branching_factor"], h["max_depth"], h["mutually_exclusive_portion"],
            h["compensate_probabilities"], h["scale_children_by_parent"]) == (128, 4, 3, 1.0, True, True)
    assert (cfg["correlation"]["rank"], cfg["correlation"]["correlation_scale"]) == (25, 0.1)
    assert (cfg["orthogonalization"]["num_steps"], cfg["orthogonalization"]["lr"]) == (100, 3e-4)
    small = synth.model_config("synth-cpu").to_dict()
    differ = {k for k in cfg if cfg[k] != small[k]}
    assert differ == {"num_features", "hidden_dim", "hierarchy"}
    assert {k for k in h if h[k] != small["hierarchy"][k]} == {"total_root_nodes"}
    ids = {synth.weights_identity(n) for n in synth.PRESETS}
    assert len(ids) == len(synth.PRESETS) and synth.weights_identity("synth-tiny") == synth.weights_identity(
        "synth-tiny")


def test_store_round_trip_with_ground_truth(store):
    m = store.manifest
    assert m["model"]["synthetic"] is True and synth.is_synthetic_store(store)
    assert m["model"]["n_features"] == 512 and store.d_model == 24 and store.layers == [0]
    assert m["synthetic"]["config"] == synth.model_config("synth-tiny").to_dict()
    assert m["hooks"] == {"0": synth.HOOK} and store.n_contexts == TOKENS // CTX
    assert store.n_rows == store.n_contexts * (CTX - 1) and store.n_tokens == TOKENS
    gt = synth.ground_truth(store)
    assert gt.feature_vectors.shape == (512, 24)
    assert torch.allclose(gt.feature_vectors.norm(dim=1), torch.ones(512), atol=1e-5)
    x, acts = synth.eval_data(store)
    assert x.shape == (store.n_rows, 24) and acts.n_rows == store.n_rows
    # every stored sample is its true activations through the true features
    assert torch.allclose(acts.dense() @ gt.feature_vectors + gt.bias, x, atol=1e-5)
    assert (acts.values > 0).all() and abs(synth.true_l0(acts) - m["synthetic"]["true_l0"]) < 1e-9
    # the store reads like any other: whole contexts per batch, rows in the same order as the ground truth
    b = next(store.batches(0, batch_contexts=8))
    assert b.acts.shape == (8 * (CTX - 1), 24) and torch.equal(b.acts, x[: 8 * (CTX - 1)])
    # the generating model reloads through sae-lens and has the stored features
    assert torch.equal(gt.synthetic_model().feature_dict.feature_vectors.data, gt.feature_vectors)
    assert torch.allclose(gt.feature_dict()(acts.dense(0, 5)), x[:5], atol=1e-5)


def test_store_is_deterministic_reused_and_repaired(store):
    req = ExtractionRequest(model="synth-tiny", layers=[0], corpus="default", tokens=TOKENS, ctx_len=CTX,
                            shard_contexts=64)
    assert extract(req, progress=False).id == store.id  # corpus `default` means the samples too: reused
    shas = {rel: f["sha256"] for sh in store.manifest["shards"] for rel, f in sh["files"].items()}
    gt_file = store.path / "ground_truth" / "shard_00001.safetensors"
    data = bytearray(gt_file.read_bytes())
    data[-1] ^= 0xFF
    gt_file.write_bytes(bytes(data))
    assert open_verified(store.path)[0] is None  # the per-row ground truth is sha256-verified like the acts
    again = extract(req, progress=False)  # regenerated from the per-shard seeds: bit-identical
    assert {rel: f["sha256"] for sh in again.manifest["shards"] for rel, f in sh["files"].items()} == shas
    other = extract(ExtractionRequest(model="synth-tiny", layers=[0], corpus="synthetic", tokens=TOKENS,
                                      ctx_len=CTX, shard_contexts=64, seed=1), progress=False)
    assert other.id != store.id and not torch.equal(next(other.batches(0)).acts, next(store.batches(0)).acts)


def test_requests_a_synthetic_store_cannot_serve(cache):
    for kw, match in (({"corpus": "wordnet"}, "--corpus synthetic"), ({"layers": [1]}, "one layer"),
                      ({"max_docs": 3}, "no documents")):
        args = {"model": "synth-tiny", "layers": [0], "corpus": "synthetic", "tokens": 256, "ctx_len": CTX, **kw}
        with pytest.raises(ValueError, match=match):
            extract(ExtractionRequest(**args), progress=False)


def test_model_names_dispatch():
    from bench.models import LOADERS, load_model, weights_identity

    assert set(synth.PRESETS) <= set(LOADERS)
    assert weights_identity("synth-cpu") == synth.weights_identity("synth-cpu")
    with pytest.raises(ValueError, match="synthetic model"):
        load_model("synth-tiny")


def test_skip_rules():
    from bench.suites import METRIC_FAMILIES

    for family in METRIC_FAMILIES:
        ok, why = synth.family_applies(family, "synth-cpu")
        assert ok == (family in synth.SYNTHETIC_FAMILIES) or family not in synth.TEXT_FAMILIES, family
        assert ok or "synthetic" in why
    assert not synth.family_applies("ground_truth", "tiny-gemma2")[0]
    assert synth.family_applies("ground_truth", "synth-tiny") == (True, "")
    assert synth.family_applies("retrieval", "tiny-gemma2") == (True, "")
    assert synth.is_synthetic("synth-16k") and not synth.is_synthetic("smollm2-135m")


def test_ground_truth_family_skips_a_language_model():
    from bench.families import FAMILIES
    from methods.random_directions import RandomArtefact, RandomConfig

    art = RandomArtefact(RandomConfig(k=4), {"directions": torch.eye(4, 8), "center": torch.zeros(8)},
                         {"model": "tiny-gemma2"})

    ctx = SimpleNamespace(cell_artefacts=lambda cell: [art])  # no store: the skip must not extract one
    cell = SimpleNamespace(model="tiny-gemma2", layer=1, spec="random", family="ground_truth")
    rows = FAMILIES["ground_truth"](ctx, cell)
    assert [r.metric for r in rows] == ["ground_truth.not_applicable"]
    assert "not a synthetic model" in rows[0].detail and json.dumps(rows[0].to_dict())
