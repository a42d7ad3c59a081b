"""Budget-matched specs (MethodSpec.match): the runner builds baselines at another artefact's K or tokens."""

import dataclasses

import pytest
import torch

from bench.context import ModelContext
from bench.store import write_synthetic_store
from bench.suites import MethodSpec, get_suite

LAYERS = (1, 2)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    acts = {L: 3.0 + torch.randn(48, 15, 16, generator=g) for L in LAYERS}
    store = write_synthetic_store(tmp_path_factory.mktemp("store") / "s", acts)
    suite = dataclasses.replace(
        get_suite("smoke"), layers=list(LAYERS), concept_sets=[],
        methods=[MethodSpec("ep", {"percentiles": [2, 10], "n_calib": 200, "batch_contexts": 8}),
                 MethodSpec("pca", {"k": 4}),
                 MethodSpec("random", {"k": 8}, match="K", match_to=["ep", "pca"], seeds=[0, 1]),
                 MethodSpec("kmeans", {"n_rows": 600, "n_calib": 200}, match="K", match_to=["ep"], match_p=[10]),
                 MethodSpec("kmeans", {"n_calib": 200, "niter": 5}, label="km-rows", match="K", match_to=["ep"],
                            seeds=[0, 1], match_seeds={2: [0]}, rows_as_target=True),
                 MethodSpec("sae", {"architecture": "topk", "k": 32, "training_tokens": 2048, "batch_rows": 128,
                                    "buffer_rows": 256, "progress": False}, label="sae-scaled", match="K",
                            match_to=["ep"], match_p=[2], k_per_width=1 / 8),
                 MethodSpec("kmeans", {"n_calib": 200, "niter": 5}, label="km-one-layer", match="K",
                            match_to=["ep"], match_p=[10], at_layers={"synthetic": [2]})])
    return ModelContext(suite, "synthetic", progress=False, store=store)


def test_matched_artefacts_copy_the_targets_k_per_layer_and_seed(ctx):
    for L in LAYERS:
        targets = {a.name: a.K for a in ctx.artefacts("ep", L) + ctx.artefacts("pca", L)}
        rnd = ctx.artefacts("random@K", L)
        assert sorted(a.name for a in rnd) == sorted(f"random@K({t})" for t in targets for _ in (0, 1))
        for a in rnd:
            target = a.info["matched_to"]["artefact"]
            assert a.K == targets[target] == a.info["matched_to"]["K"]
        assert {a.config.seed for a in rnd} == {0, 1}
        km = ctx.artefacts("kmeans@K", L)  # match_p keeps only p=10
        assert [a.name for a in km] == ["kmeans@K(ep:p=10)"] and km[0].K == targets["ep:p=10"]


def test_match_rules_scale_sparsity_copy_rows_and_seed_per_target(ctx):
    for L in LAYERS:
        ep = {a.info["p"]: a for a in ctx.artefacts("ep", L)}
        km = ctx.artefacts("km-rows", L)
        seeds = sorted((a.info["matched_to"]["artefact"], a.config.seed) for a in km)
        assert seeds == [("ep:p=10", 0), ("ep:p=10", 1), ("ep:p=2", 0)]  # one seed at p=2 (match_seeds)
        for a in km:  # fitted on as many store rows as its target streamed
            target = ep[2.0 if a.name.endswith("p=2)") else 10.0]
            assert a.info["n_train_rows"] == target.cost.rows
        (sae,) = ctx.artefacts("sae-scaled", L)
        assert sae.K == ep[2.0].K and sae.config.k == min(32, max(1, round(ep[2.0].K / 8)))


def test_matched_spec_key_follows_its_targets(ctx):
    spec = ctx.spec("random@K")
    before = ctx.spec_key(spec)
    ctx.suite.methods[0].params["n_calib"] = 100  # another EP build changes every K it sets
    try:
        assert ctx.spec_key(spec) != before
    finally:
        ctx.suite.methods[0].params["n_calib"] = 200


def test_a_match_target_missing_from_the_suite_is_named():
    with pytest.raises(ValueError, match="match_to.*'ep'.*not in the suite"):
        dataclasses.replace(get_suite("smoke"), methods=[MethodSpec("random", match="K", match_to=["ep"])])
    with pytest.raises(ValueError, match="match must be one of"):
        MethodSpec("random", match="flops", match_to=["ep"])


def test_max_prompts_takes_a_seeded_sample_before_filtering():
    import numpy as np

    class AllCorrect:  # a backend stand-in that answers every prompt
        @staticmethod
        def score_prompts(prompts, targets, contrasts):
            return np.ones(len(prompts)), np.ones(len(prompts), dtype=bool)

    suite = dataclasses.replace(get_suite("default"), prompt_sets=["country_continent"], max_prompts=12)
    sets = []
    for _ in range(2):
        c = ModelContext(suite, "smollm2-135m", progress=False)
        c.__dict__["backend"] = AllCorrect()
        sets.append(c.prompt_sets["country_continent"])
    from bench.prompts import get_prompt_set

    written = len(get_prompt_set("country_continent"))
    assert sets[0].n_written == written > 12 and sets[0].n_sampled == 12 and len(sets[0]) == 12  # sampled of written
    assert sets[0].texts == sets[1].texts  # the same sample every time



def test_a_spec_at_some_layers_is_built_and_cached_there_only(ctx):
    from bench.cells import expand_cells

    spec = ctx.spec("km-one-layer")
    assert ctx.spec_layers(spec) == [2] and ctx.spec_layers(ctx.spec("ep")) == list(LAYERS)
    (km,) = ctx.artefacts("km-one-layer", 2)
    assert km.K == next(a.K for a in ctx.artefacts("ep", 2) if a.name == "ep:p=10")
    fresh = ModelContext(ctx.suite, "synthetic", progress=False, store=ctx.store)
    assert set(fresh._load_or_build(spec)) == {2}  # the cache holds (and verifies) just that layer
    suite = dataclasses.replace(ctx.suite, models=["synthetic"])
    cells = [c for c in expand_cells(suite) if c.spec == "km-one-layer"]
    assert cells and {c.layer for c in cells} == {2}  # no layer-1 cell, no cross-layer cell for one layer
    assert {c.layer for c in expand_cells(suite) if c.spec == "ep" and c.family == "build"} == set(LAYERS)
    other = MethodSpec("pca", {"k": 4}, at_layers={"another-model": [1]})
    assert other.layers_of("synthetic", [1, 2]) == [] and other.layers_of("another-model", [1, 2]) == [1]
    # written only when set: a run recorded before the field existed resumes with the same config
    methods = suite.to_dict()["methods"]
    assert [m["label"] for m in methods if "at_layers" in m] == ["km-one-layer"]
