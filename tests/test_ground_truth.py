"""The ground_truth metric family: epbench's MCC / uniqueness / F1 equal sae-lens' functions on the same inputs,
planted recovery scores 1, SAEs are scored by sae-lens' own eval_sae_on_synthetic_data, and the family end to end."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from bench import synth
from bench.store import ExtractionRequest, extract
from methods.base import Artefact, MethodConfig
from metrics import ground_truth as gtm

CTX = 32


@pytest.fixture(scope="module")
def cache(module_cache):
    return module_cache


@pytest.fixture(scope="module")
def data(cache):
    """(build store, eval x, eval true activations, ground truth) of synth-tiny."""
    store = extract(ExtractionRequest(model="synth-tiny", layers=[0], corpus="synthetic", tokens=8192, ctx_len=CTX,
                                      shard_contexts=64), progress=False)
    ev = synth.eval_store("synth-tiny", ctx_len=CTX, rows=4000, progress=False)
    x, acts = synth.eval_data(ev)
    return store, x, acts, synth.ground_truth(ev)


def test_oracle_equals_sae_lens_functions():
    from sae_lens.synthetic import compute_classification_metrics, feature_uniqueness, mean_correlation_coefficient

    g = torch.Generator().manual_seed(3)
    for K, N, d in ((40, 64, 16), (80, 64, 16), (7, 7, 5)):
        dirs, feats = torch.randn(K, d, generator=g), torch.randn(N, d, generator=g)
        cos = gtm.abs_cos(dirs, feats)
        assert gtm.mcc_matching(dirs, feats).mcc == pytest.approx(mean_correlation_coefficient(dirs, feats), abs=1e-6)
        assert gtm.uniqueness(cos) == pytest.approx(feature_uniqueness(dirs, feats))
        latents = torch.randn(500, K, generator=g).clamp_min(1.0) - 1.0  # sparse, some latents never fire
        latents[:, 0] = 0.0
        true = (torch.rand(500, N, generator=g) < 0.2).float() * torch.rand(500, N, generator=g)
        counts = gtm.firing_counts([latents[:200], latents[200:]], [true[:200], true[200:]], cos.argmax(1))
        p, r, f = counts.per_latent()
        ref = compute_classification_metrics(latents, true, dirs, feats)
        assert (float(p.mean()), float(r.mean()), float(f.mean())) == pytest.approx(
            (ref.precision, ref.recall, ref.f1_score), abs=1e-6)


class _Oracle(Artefact):
    """A planted artefact: its directions ARE the true features, its code IS the true activations (by row)."""

    method: ClassVar[str] = "oracle"
    reconstructs: ClassVar[bool] = True

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    def encode(self, x, readout=None):
        rows = self.info["lookup"]
        return torch.stack([rows[tuple(r.tolist())] for r in x])

    def decode(self, f):
        return f @ self.tensors["directions"] + self.tensors["bias"]


def test_planted_recovery_scores_one(data):
    _, x, acts, gt = data
    x, dense = x[:600], acts.dense(0, 600)
    sub = synth.SparseActs(acts.row_ptr[:601], acts.feature_ids[: int(acts.row_ptr[600])],
                           acts.values[: int(acts.row_ptr[600])], acts.n_features)
    art = _Oracle(MethodConfig(), {"directions": gt.feature_vectors, "bias": gt.bias},
                  {"label": "oracle", "lookup": {tuple(r.tolist()): f for r, f in zip(x, dense)}})
    rows = {r.metric: r for r in gtm.ground_truth_metrics(art, x, sub, gt.feature_vectors, k=gt.n_features,
                                                                       setting="planted")}
    v = {m.split(".", 1)[1]: r.value for m, r in rows.items()}
    assert v["mcc"] == pytest.approx(1.0, abs=1e-5) and v["uniqueness"] == 1.0
    assert v["feature_recovery"] == pytest.approx(1.0, abs=1e-5) and v["feature_f1"] == pytest.approx(1.0)
    fired = (dense > 0).any(0)
    assert v["recall"] == pytest.approx(float(fired.float().mean()))  # never-firing features: recall 0 by convention
    assert v["precision"] == pytest.approx(v["recall"]) and v["f1"] == pytest.approx(v["recall"])
    assert v["l0"] == pytest.approx(float((dense > 0).sum(1).float().mean()))
    assert v["dead_fraction"] == pytest.approx(1 - float(fired.float().mean()))
    assert v["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert rows["ground_truth.mcc"].units and len(rows["ground_truth.mcc"].units) == gt.n_features
    assert set(rows["ground_truth.feature_f1"].units) == {f"f{j}" for j in torch.nonzero(fired)[:, 0].tolist()}
    assert all(r.detail.startswith("planted;") for r in rows.values())


def _random_topk_sae(d: int, K: int, k: int, seed: int):
    from methods.sae import SAEArtefact, SAEConfig

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(K, d, generator=g)
    t = {"W_enc": W_dec.T.clone() + 0.1 * torch.randn(d, K, generator=g), "W_dec": W_dec,
         "b_enc": 0.1 * torch.randn(K, generator=g), "b_dec": torch.zeros(d)}
    info = {"label": "sae:planted", "architecture": "topk", "k": k, "apply_b_dec_to_input": False,
            "rescale_acts_by_decoder_norm": False}
    return SAEArtefact(SAEConfig(width=K, k=k), t, info)


def test_saes_are_scored_by_sae_lens_eval(data):
    from methods.frozen_decoder_sae import FrozenDecoderSAEArtefact, FrozenDecoderSAEConfig
    from methods.random_directions import random_unit_directions

    _, x, acts, gt = data
    d = x.shape[1]
    W_dec = random_unit_directions(48, d, 0)
    frozen = FrozenDecoderSAEArtefact(FrozenDecoderSAEConfig(width=48, k=3), {
        "W_enc": W_dec.T.clone(), "W_dec": W_dec, "b_enc": torch.zeros(48), "b_dec": gt.bias.clone()},
        {"label": "frozen_sae:planted"})
    for art in (_random_topk_sae(d, 64, 4, 0), frozen):
        rows = gtm.ground_truth_metrics(art, x, acts, gt.feature_vectors, k=4, setting="eval",
                                        feature_dict=gt.feature_dict())  # raises if ours and sae-lens' disagree
        main = [r for r in rows if r.metric in ("ground_truth.mcc", "ground_truth.f1", "ground_truth.l0")]
        assert len(main) == 3 and all("eval_sae_on_synthetic_data" in r.detail for r in main)
        assert next(r.value for r in rows if r.metric == "ground_truth.l0") <= art.config.k


def test_disagreement_with_sae_lens_raises(data, monkeypatch):
    _, x, acts, gt = data
    art = _random_topk_sae(x.shape[1], 32, 4, 1)
    real = gtm.sparse_code
    monkeypatch.setattr(gtm, "sparse_code", lambda a, xx, k, readout="sparse": (real(a, xx, k, readout)[0] * 0,
                                                                               "broken"))
    with pytest.raises(RuntimeError, match="disagree with sae-lens"):
        gtm.ground_truth_metrics(art, x[:300], acts, gt.feature_vectors, k=4, setting="eval",
                                 feature_dict=gt.feature_dict())


def test_family_end_to_end_on_synth_tiny(data, tmp_path):
    """EP (exemplar basis, topk and partition readouts), a trained BatchTopK and Matryoshka SAE and random
    directions through the ground_truth family of a synthetic suite."""
    from bench.cells import Cell
    from bench.context import ModelContext
    from bench.families import FAMILIES
    from bench.suites import MethodSpec, Suite

    store = data[0]
    sae = {"width": 64, "k": 4, "training_tokens": 8192, "batch_rows": 256, "buffer_rows": 1024, "progress": False,
           "converge_min_steps": 8}
    suite = Suite(name="synth-test", description="", models=["synth-tiny"], layers=[0], corpus="synthetic",
                  store_tokens=8192, ctx_len=CTX, concept_sets=[], prompt_sets=[], metrics=["build", "ground_truth"],
                  methods=[MethodSpec("ep", {"percentiles": [10], "n_calib": 1000, "batch_contexts": 8}),
                           MethodSpec("sae", {**sae, "architecture": "batchtopk"}, label="sae"),
                           MethodSpec("sae", {**sae, "architecture": "matryoshka"}, label="sae-m"),
                           MethodSpec("random", {"k": 64})])
    ctx = ModelContext(suite, "synth-tiny", progress=False, store=store)
    ctx.extras_dir = tmp_path / "extras"
    by = {}
    for spec in ("ep", "sae", "sae-m", "random"):
        rows = FAMILIES["ground_truth"](ctx, Cell("synth-tiny", 0, spec, "ground_truth"))
        by[spec] = {r.metric: r for r in rows}
        assert all(r.detail.split(";")[0] == by["ep"]["ground_truth.mcc"].detail.split(";")[0] for r in rows)
    assert "topk k=4, basis exemplar" in by["ep"]["ground_truth.f1"].detail
    assert by["ep"]["ground_truth.partition_l0"].value == 1.0 and "ground_truth.mcc_mean_basis" in by["ep"]
    assert "eval_sae_on_synthetic_data" in by["sae-m"]["ground_truth.f1"].detail
    assert "ground_truth.explained_variance" not in by["random"]  # random directions do not decode
    assert set(by["ep"]["ground_truth.feature_f1"].units) == set(by["random"]["ground_truth.feature_f1"].units)
    assert any(p.name.startswith("ground_truth_feature_f1_synth-tiny") for p in (tmp_path / "extras").iterdir())
    for spec in by:
        v = by[spec]["ground_truth.mcc"].value
        assert 0 < v <= 1 and 0 < by[spec]["ground_truth.uniqueness"].value <= 1


def test_matryoshka_default_widths():
    from methods.sae import SAEConfig, matryoshka_widths

    assert matryoshka_widths(SAEConfig(architecture="matryoshka", width=4096, k=25)) == [256, 512, 1024, 2048, 4096]
    with pytest.raises(ValueError, match="end at width"):
        matryoshka_widths(SAEConfig(architecture="matryoshka", width=64, k=4, matryoshka_widths=[8, 16]))

