"""Causal interventions (metrics.causal) on the tiny random model, and the cluster bootstrap behind their CIs.

Oracles: exact no-op interventions (alpha 0, a direction orthogonal to every residual), a TransformerLens hook
forward, an unembedding-aligned steering direction that must beat the control, a brute-force selected random
control, Artefact.ablate at scale 1, hand-computed interpolation at KL targets and cluster bootstraps, and a direct
mean-difference computation for the DiffMean baseline.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.prompts import CausalPrompt, PromptSet
from methods.common import EPS
from metrics.causal import (CausalConfig, _Texts, causal_diffmean_directions, causal_metrics, control_readout,
                            diffmean_causal_metrics, kl_attributes, length_groups, random_control_chunks,
                            scaled_ablate, select_causal_features, select_random_control, values_at_kl)
from metrics.common import bootstrap_ci, cluster_bootstrap_ci

from fakes import LAYER, LinArtefact, make, rand_dirs


@pytest.fixture(scope="module")
def backend():
    from bench.models import load_model

    return load_model("tiny-gemma2")


def by_metric(rows):
    return {r.metric: r for r in rows}


def tokens(detail):
    """The `;`-separated tokens of a detail, key=value ones as a dict (the first token under "setting")."""
    parts = [p.strip() for p in detail.split(";")]
    return {"setting": parts[0], **dict(p.split("=", 1) for p in parts[1:] if "=" in p and " " not in p)}


def valid_rows(backend, texts, layer, ctx_len=128):
    """Non-BOS, non-pad residual rows, the oracle's view of the evaluated tokens."""
    toks, lengths = backend.to_tokens(texts, ctx_len=ctx_len)
    acts = backend.run_layers(toks, [layer])[layer]
    return torch.cat([acts[i, 1 : int(lengths[i])] for i in range(len(texts))])


def letter_prompts(n_per_attr=4, length=3, seed=0, relation=""):
    """Short random-letter prompts in 3 answer groups; byte tokenizer, so answers carry no leading space."""
    rng = np.random.default_rng(seed)
    attrs = ["x", "y", "z"]
    prompts = []
    for i, a in enumerate(attrs):
        for _ in range(n_per_attr):
            p = "".join(rng.choice(list("abcdefghij"), size=length))
            prompts.append(CausalPrompt(p, a, attrs[(i + 1) % 3], a, relation))
    return PromptSet("letters", prompts, len(prompts))


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def test_cluster_bootstrap_hand_computed():
    # Two clusters, means 0 (2 prompts) and 1 (4 prompts): a resample is AA (0), BB (1) or AB/BA (4/6), so the 95%
    # interval is [0, 1] whatever the draws, while a bootstrap over the 6 prompts is narrower.
    v, c = [0, 0, 1, 1, 1, 1], ["a", "a", "b", "b", "b", "b"]
    assert cluster_bootstrap_ci(v, c, seed=0) == (0.0, 1.0)
    lo, hi = bootstrap_ci(v, seed=0)
    assert lo > 0.3  # the prompt bootstrap: all six prompts 0 is a 1-in-729 draw
    # every cluster with the same mean: a degenerate interval at it; NaN values are dropped with their weights
    assert cluster_bootstrap_ci([1, 3, 2, np.nan], ["a", "a", "b", "b"]) == (2.0, 2.0)
    # a ratio: clusters (num, den) = (2, 1) and (2, 4): resamples give 2, 4/5 or 0.5
    assert cluster_bootstrap_ci([2, 2], ["p", "q"], weights=[1, 4]) == (0.5, 2.0)
    # singletons: the draws of the unit bootstrap
    x = np.random.default_rng(1).normal(size=20)
    assert cluster_bootstrap_ci(x, [str(i) for i in range(20)], seed=3) == pytest.approx(bootstrap_ci(x, seed=3))
    assert np.isnan(cluster_bootstrap_ci([1.0, 2.0], ["a", "a"])[0])  # one cluster: no interval
    with pytest.raises(ValueError, match="align"):
        cluster_bootstrap_ci([1.0, 2.0], ["a"])


def test_values_at_kl_hand_computed():
    kl = [0.0, 0.2, 0.6, 0.4]  # ascending strength; KL not monotone after the third point
    v = np.array([[0.0, -1.0, -3.0, -5.0], [0.0, 2.0, 2.0, 0.0]])
    got = values_at_kl(kl, v, [0.1, 0.2, 0.5, 0.7, 0.0])
    np.testing.assert_allclose(got[:, 0], [-0.5, 1.0])  # halfway through the first segment
    np.testing.assert_allclose(got[:, 1], [-1.0, 2.0])  # exactly a sweep point
    np.testing.assert_allclose(got[:, 2], [-1 + 0.75 * -2, 2.0])  # first bracketing pair (0.2, 0.6), not (0.6, 0.4)
    assert np.isnan(got[:, 3]).all()  # above the largest measured KL: never extrapolated
    np.testing.assert_allclose(got[:, 4], [0.0, 0.0])
    assert np.isnan(values_at_kl([0.0, np.nan], v[:, :2], [0.1])).all()  # KL not measured
    assert np.isnan(values_at_kl([0.1, 0.3], [[1.0, 2.0]], [0.05])).all()  # below the range


def test_scaled_ablation_at_scale_one_is_artefact_ablate():
    dirs, c = rand_dirs(5, seed=2), rand_dirs(1, seed=3)[0]
    art = make(LinArtefact, dirs, center=c)
    x = rand_dirs(7, seed=4) * 3
    w = art.directions[3]
    torch.testing.assert_close(scaled_ablate(x, w, art.center, 1.0), art.ablate(x, [3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled_ablate(x, w, art.center, 0.0), x)
    def proj(y):
        return (y - c) @ w

    torch.testing.assert_close(proj(scaled_ablate(x, w, c, 2.0)), -proj(x), atol=1e-5, rtol=1e-5)  # reflection
    torch.testing.assert_close(scaled_ablate(x, 5 * w, c, 0.5), scaled_ablate(x, w, c, 0.5))  # w's norm is ignored


def test_select_causal_features_planted():
    acts = torch.zeros(6, 64)
    acts[:3, 5] = 1.0  # attribute "p" fires feature 5
    acts[3:, 9] = 1.0  # attribute "q" fires feature 9
    art = make(LinArtefact, torch.eye(64))
    assert select_causal_features(art, acts, ["p"] * 3 + ["q"] * 3) == {"p": 5, "q": 9}
    with pytest.raises(ValueError, match="at least 2 attributes"):
        select_causal_features(art, acts, ["p"] * 6)


@pytest.mark.parametrize("readout", ["cosine", "projection"])
def test_selected_random_control_matches_brute_force(readout):
    x, center = rand_dirs(9, d=16, seed=5) + 2.0, rand_dirs(1, d=16, seed=6)[0]
    attrs = ["b", "a", "b", "c", "a", "c", "b", "a", "c"]
    K, seed, chunk = 10, 7, 3
    got, dirs = select_random_control(x, attrs, center, K, seed, readout, chunk=chunk)
    # brute force: the same draws (one generator, chunks of 3 in float64), every score by explicit loops
    g = torch.Generator().manual_seed(seed)
    pool = torch.cat([torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (3, 3, 3, 1)])
    pool = pool / pool.norm(dim=1, keepdim=True)
    xc = x.double() - center.double()
    for a in ("a", "b", "c"):
        scores = []
        for k in range(K):
            act = [float(r @ pool[k]) / (float(r.norm()) + EPS if readout == "cosine" else 1.0) for r in xc]
            inside = [v for v, t in zip(act, attrs) if t == a]
            outside = [v for v, t in zip(act, attrs) if t != a]
            scores.append(sum(inside) / len(inside) - sum(outside) / len(outside))
        assert got[a] == int(np.argmax(scores))
        torch.testing.assert_close(dirs[sorted(got).index(a)], pool[got[a]].float())
    assert [s for s, _ in random_control_chunks(K, 16, seed, chunk)] == [0, 3, 6, 9]


def test_control_readout_mirrors_the_selection_readout():
    ep_like = make(LinArtefact, rand_dirs(3))
    ep_like.method = "ep"
    assert control_readout(ep_like) == "cosine"  # EP selects with its dense cosine
    assert control_readout(make(LinArtefact, rand_dirs(3))) == "projection"
    assert control_readout(make(LinArtefact, rand_dirs(3)), readout="binary") == "cosine"


def test_length_groups_hand_computed():
    assert length_groups([7, 52, 8, 10, 7, 27, 12], batch_size=2) == [[0, 4], [2, 3], [6], [5], [1]]
    assert length_groups([5, 5, 5], batch_size=64) == [[0, 1, 2]]
    assert length_groups([], batch_size=4) == []


def test_causal_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="kl_targets"):
        CausalConfig(kl_targets=(0.0,))
    with pytest.raises(ValueError, match="ablation_scales"):
        CausalConfig(ablation_scales=(-1.0,))


# ---------------------------------------------------------------------------------------------------------
# Forward passes


def test_intervened_passes_from_cached_residuals_equal_a_full_forward_with_a_hook(backend):
    """Oracle: every text alone through the whole model with a TransformerLens hook at the layer."""
    texts = ["ab", "the cat sat on the mat and then some more words", "hi", "a quick brown fox jumps", "xyz"]
    shift = rand_dirs(1, seed=3)[0] * 3.0

    def apply(x, key):
        return x + key * shift

    keys = [1, 2, None, 1, 3]
    batched = _Texts(backend, texts, LAYER, batch_size=2)
    assert len(batched.batches) >= 3  # several length groups, some with padding
    t_ids, c_ids = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([1, 2, 3, 4, 0])
    diffs = batched.logit_diffs(t_ids, c_ids, apply, keys)
    lps = dict(batched.log_probs(apply, keys))
    for i, text in enumerate(texts):
        def hook(act, hook, k=keys[i]):
            out = act.clone()
            if k is not None:
                out[:, 1:] = apply(act[0, 1:], k)[None]
            return out

        toks, _ = backend.to_tokens([text])
        with torch.no_grad():
            logits = backend.model.run_with_hooks(toks, fwd_hooks=[(backend.hook_name(LAYER), hook)])[0].float()
        assert diffs[i] == pytest.approx(float(logits[-1, t_ids[i]] - logits[-1, c_ids[i]]), abs=1e-4)
        torch.testing.assert_close(lps[i], torch.log_softmax(logits, -1)[1:], atol=1e-4, rtol=1e-4)


def test_logit_diffs_use_token_ids_when_the_backend_offers_them(backend):
    calls = []

    class Columns:
        """The tiny backend with a final_logits that can return selected vocabulary columns only."""

        def __getattr__(self, name):
            return getattr(backend, name)

        def final_logits(self, resid, token_ids=None):
            calls.append(token_ids)
            full = backend.final_logits(resid)
            return full if token_ids is None else full[..., token_ids]

    texts = ["ab", "hello there", "xyz"]
    t_ids, c_ids = torch.tensor([9, 3, 9]), torch.tensor([4, 9, 1])
    want = _Texts(backend, texts, LAYER, 2).logit_diffs(t_ids, c_ids, None, [None] * 3)
    got = _Texts(Columns(), texts, LAYER, 2).logit_diffs(t_ids, c_ids, None, [None] * 3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert calls and all(c is not None and len(c) <= 4 for c in calls)


# ---------------------------------------------------------------------------------------------------------
# The metric


def test_causal_rows_and_alpha_zero_is_exact_noop(backend):
    art = make(LinArtefact, rand_dirs(16, seed=1))
    rows = causal_metrics(art, backend, letter_prompts(), ["some text here"], CausalConfig(alphas=(0.0,)))
    m = by_metric(rows)
    for prefix in ("causal.ablate", "causal.steer", "causal.steer.curve"):
        for name in ("delta_logit_diff", "flip_rate", "control_delta", "delta_vs_control", "kl", "effect_per_kl"):
            assert f"{prefix}.{name}" in m
    for prefix in ("causal.ablate", "causal.steer"):
        assert {f"{prefix}.unselected_control_delta", f"{prefix}.unselected_control_flip_rate",
                f"{prefix}.delta_at_kl", f"{prefix}.control_delta_at_kl"} <= set(m)
    assert not any(r.metric.startswith("causal.ablate.curve") for r in rows)  # the default sweep is s = 1 only
    assert m["causal.steer.delta_logit_diff"].value == 0.0 and m["causal.steer.kl"].value == 0.0
    assert m["causal.steer.flip_rate"].value == 0.0 and m["causal.steer.control_kl"].value == 0.0
    assert m["causal.steer.unselected_control_delta"].value == 0.0
    assert all(r.value != r.value for r in rows if r.metric == "causal.steer.delta_at_kl")  # KL 0 only: all NaN
    t = tokens(m["causal.steer.curve.kl"].detail)
    assert t["setting"] == "letters" and t["alpha"] == "0" and t["clusters"] == "3" and t["prompts"] == "6"
    best = tokens(m["causal.steer.kl"].detail)
    assert best["chosen"] == "train" and best["best_alpha"] == "0" and "alpha" not in best  # pairs across methods
    assert "chosen on train" in m["causal.steer.kl"].detail
    assert m["causal.ablate.delta_logit_diff"].n == 6 and m["causal.ablate.kl"].value > 0
    assert all(r.layer == LAYER for r in rows)


def test_rows_carry_clusters_by_relation_and_answer_and_cluster_bootstrap_cis(backend):
    base = letter_prompts(n_per_attr=4)
    ps = PromptSet("letters", [p._replace(relation="rel") if p.attribute != "z" else p for p in base.prompts], 12)
    cfg = CausalConfig(alphas=(1.0,), kl_targets=(0.1,))
    rows = causal_metrics(make(LinArtefact, rand_dirs(16, seed=1)), backend, ps, ["some text here"], cfg)
    test = ps.split()[1].prompts
    for r in rows:
        if r.units is None:
            continue
        assert set(r.clusters) == set(r.units)
        for unit, cluster in r.clusters.items():
            p = test[int(unit.split(":")[0])]
            owner = p.attribute if r.metric.startswith("causal.ablate") else p.contrast
            assert cluster == f"{p.relation or 'letters'}/{owner}"
        t = tokens(r.detail)
        assert int(t["clusters"]) == len(set(r.clusters.values())) and int(t["prompts"]) == r.n == len(r.units)
        ids = list(r.units)
        want = cluster_bootstrap_ci([r.units[i] for i in ids], [r.clusters[i] for i in ids], seed=cfg.seed)
        assert (r.ci_low, r.ci_high) == pytest.approx(want, nan_ok=True)
    m = by_metric(rows)
    assert set(m["causal.ablate.delta_logit_diff"].clusters.values()) == {"rel/x", "rel/y", "letters/z"}
    assert set(m["causal.steer.delta_logit_diff"].clusters.values()) == {"rel/y", "rel/z", "letters/x"}


def test_selected_control_is_the_brute_force_selection_run_as_a_feature(backend):
    """The control arm equals running causal_metrics with the brute-force selected random directions as features."""
    ps, unrelated = letter_prompts(), ["some text here"]
    center = rand_dirs(1, seed=8)[0]
    art = make(LinArtefact, rand_dirs(24, seed=1), center=center)
    cfg = CausalConfig(alphas=(1.0,), control_seed=5)
    rows = by_metric(causal_metrics(art, backend, ps, unrelated, cfg))
    train = ps.split()[0]
    last, _ = _Texts(backend, train.texts, LAYER, 64).last_and_mean_norm()
    idx, dirs = select_random_control(last, [p.attribute for p in train.prompts], center, art.K, 5, "projection")
    as_feature = make(LinArtefact, dirs, center=center)
    feat = by_metric(causal_metrics(as_feature, backend, ps, unrelated, cfg, features={"x": 0, "y": 1, "z": 2}))
    for cond in ("ablate", "steer"):
        ctrl, want = rows[f"causal.{cond}.control_delta"].units, feat[f"causal.{cond}.delta_logit_diff"].units
        assert ctrl.keys() == want.keys() and all(ctrl[u] == pytest.approx(want[u], abs=1e-5) for u in ctrl)
        assert rows[f"causal.{cond}.control_kl"].value == pytest.approx(feat[f"causal.{cond}.kl"].value, rel=1e-4)
    assert "best of 24 random directions" in rows["causal.ablate.control_delta"].detail
    assert len(set(idx.values())) >= 1 and max(idx.values()) < art.K


def test_delta_at_kl_reads_the_dose_response_sweep(backend):
    ps, unrelated = letter_prompts(), ["some text here", "another one"]
    cfg = CausalConfig(alphas=(0.25, 1.0), ablation_scales=(0.5, 1.0, 2.0), kl_targets=(1e-4, 0.01, 100.0))
    rows = causal_metrics(make(LinArtefact, rand_dirs(16, seed=1)), backend, ps, unrelated, cfg)
    curve = {}  # (condition, strength token, metric) -> row
    for r in rows:
        if ".curve." in r.metric:
            t = tokens(r.detail)
            curve[(r.metric.split(".")[1], t.get("scale", t.get("alpha")), r.metric.rsplit(".", 1)[1])] = r
    assert {k[1] for k in curve if k[0] == "ablate"} == {"0.5", "1", "2"}
    at = {(r.metric, tokens(r.detail)["kl"]): r for r in rows if r.metric.endswith("delta_at_kl")}
    for cond, points in (("ablate", ("0.5", "1", "2")), ("steer", ("0.25", "1"))):
        for arm, d_name, kl_name in (("delta_at_kl", "delta_logit_diff", "kl"),
                                     ("control_delta_at_kl", "control_delta", "control_kl")):
            for target in ("0.0001", "0.01"):
                r = at[(f"causal.{cond}.{arm}", target)]
                for unit, got in r.units.items():
                    kl = [0.0] + [curve[(cond, s, kl_name)].units[unit] for s in points]
                    d = [0.0] + [curve[(cond, s, d_name)].units[unit] for s in points]
                    want = values_at_kl(kl, np.array([d]), [float(target)])[0, 0]
                    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
                t = tokens(r.detail)
                assert int(t["nan"]) + r.n == 6 and t["unmeasured"] == "0"
            high = at[(f"causal.{cond}.{arm}", "100")]
            assert high.n == 0 and tokens(high.detail)["nan"] == "6"  # beyond every measured KL: NaN, not extrapolated
    tiny = at[("causal.ablate.delta_at_kl", "0.0001")]
    assert tiny.n == 6  # below the smallest scale's KL: read between the exact no-op point and s = 0.5


def test_side_effect_kl_is_measured_for_the_answers_with_most_prompts_when_capped(backend):
    """kl_attributes caps the forward passes per condition; the measured answers' KL is the uncapped KL."""
    ps = letter_prompts(n_per_attr=6)
    ps = PromptSet("letters", ps.prompts[:-2], len(ps.prompts) - 2)  # answer "z" now owns fewer prompts
    assert kl_attributes(["x", "y", "z"], ps.prompts, 2) == ["x", "y"]  # the two owning most prompts
    assert kl_attributes(["x", "y", "z"], ps.prompts, 0) == ["x", "y", "z"]
    art = make(LinArtefact, rand_dirs(16, seed=1))
    full, capped = (by_metric(causal_metrics(art, backend, ps, ["some text here", "another one"],
                                             CausalConfig(alphas=(1.0,), kl_attributes=cap))) for cap in (0, 1))
    for name in ("delta_logit_diff", "control_delta"):  # effects do not depend on the cap
        assert capped[f"causal.ablate.{name}"].units == full[f"causal.ablate.{name}"].units
    kl_all, kl_one = full["causal.ablate.kl"].units, capped["causal.ablate.kl"].units
    assert 0 < len(kl_one) < len(kl_all) and all(kl_one[u] == pytest.approx(kl_all[u]) for u in kl_one)
    assert capped["causal.ablate.kl"].n == len(kl_one) and "KL measured for the 1 answers" in \
        capped["causal.ablate.kl"].detail
    at = next(r for r in capped.values() if r.metric == "causal.ablate.delta_at_kl")
    assert int(tokens(at.detail)["unmeasured"]) == len(full["causal.ablate.kl"].units) - len(kl_one)


def test_ablating_a_direction_orthogonal_to_every_residual_does_nothing(backend):
    ps, unrelated = letter_prompts(), ["hello world"]
    # 12 prompts x 3 tokens + 11 tokens = 47 residual rows in d = 64: a null direction exists.
    rows = torch.cat([valid_rows(backend, ps.texts, LAYER), valid_rows(backend, unrelated, LAYER)])
    null = torch.linalg.svd(rows.double(), full_matrices=True).Vh[-1].float()
    assert (rows @ null).abs().max() < 1e-4
    m = by_metric(causal_metrics(make(LinArtefact, null[None]), backend, ps, unrelated, CausalConfig(alphas=(1.0,))))
    assert abs(m["causal.ablate.delta_logit_diff"].value) < 1e-4
    # residuals move by < 1e-4 along the null direction: fp32 KL noise is ~1e-8 (thread-count dependent), a real
    # intervention's KL is orders of magnitude larger (the control's)
    assert m["causal.ablate.kl"].value < 1e-6 < m["causal.ablate.control_kl"].value
    assert abs(m["causal.ablate.control_delta"].value) > 1e-3  # a random direction does change the output


def test_unembedding_direction_beats_random_control_when_steering(backend):
    L = backend.n_layers - 1
    ps = letter_prompts(n_per_attr=10, length=5)
    diff, _ = backend.score_prompts(ps.texts, ps.targets, ps.contrasts)
    ps = PromptSet("letters", [p for p, v in zip(ps.prompts, diff) if v > 0], len(ps))  # flips are then meaningful
    toks = [backend.first_token(a) for a in ("x", "y", "z")]
    art = make(LinArtefact, backend.model.W_U[:, toks].T.detach(), layer=L)
    rows = causal_metrics(art, backend, ps, ["hello world"], CausalConfig(alphas=(1.0, 4.0)),
                          features={"x": 0, "y": 1, "z": 2})
    m = by_metric(rows)
    assert m["causal.steer.delta_logit_diff"].value < m["causal.steer.control_delta"].value
    assert m["causal.steer.delta_vs_control"].ci_high < 0
    assert m["causal.steer.flip_rate"].value > m["causal.steer.control_flip_rate"].value
    assert m["causal.ablate.delta_vs_control"].value < 0
    at4 = {r.metric: r.value for r in rows
           if r.metric.startswith("causal.steer.curve") and tokens(r.detail)["alpha"] == "4"}
    assert at4["causal.steer.curve.flip_rate"] > at4["causal.steer.curve.control_flip_rate"]


def test_causal_bad_inputs(backend):
    art = make(LinArtefact, rand_dirs(4))
    spaced = PromptSet("spaced", [CausalPrompt(p.prompt, " " + p.target, " " + p.contrast, p.attribute)
                                  for p in letter_prompts().prompts], 12)
    with pytest.raises(ValueError, match="same first token"):
        causal_metrics(art, backend, spaced)
    with pytest.raises(ValueError, match="d=32"):
        causal_metrics(make(LinArtefact, rand_dirs(4, d=32)), backend, letter_prompts())


# ---------------------------------------------------------------------------------------------------------
# DiffMean, and the family


def test_diffmean_causal_directions_are_train_mean_differences(backend):
    ps = letter_prompts()
    rows = diffmean_causal_metrics(backend, ps, LAYER, ["some text here"], CausalConfig(alphas=(1.0,)),
                                   label="diffmean", info={"model": "tiny-gemma2"})
    assert rows and all(r.supervised and r.method == "diffmean" and r.model == "tiny-gemma2" for r in rows)
    m = by_metric(rows)
    assert m["causal.ablate.delta_logit_diff"].n == 6 and "best of 3 random directions" in \
        m["causal.ablate.control_delta"].detail
    train = ps.split()[0]
    last, _ = _Texts(backend, train.texts, LAYER, 64).last_and_mean_norm()
    attrs = np.array([p.attribute for p in train.prompts])
    names, dirs = causal_diffmean_directions(last, list(attrs))
    assert names == ["x", "y", "z"]
    x = last.double().numpy()
    for i, a in enumerate(names):
        diff = x[attrs == a].mean(0) - x[attrs != a].mean(0)
        np.testing.assert_allclose(dirs[i].numpy(), diff / np.linalg.norm(diff), atol=1e-6)
    # the rows are those of the same directions about the train mean, run as features
    art = make(LinArtefact, dirs, center=last.mean(0))
    feat = by_metric(causal_metrics(art, backend, ps, ["some text here"], CausalConfig(alphas=(1.0,)),
                                    features={a: i for i, a in enumerate(names)}))
    got, want = m["causal.ablate.delta_logit_diff"].units, feat["causal.ablate.delta_logit_diff"].units
    assert got.keys() == want.keys() and all(got[u] == pytest.approx(want[u], abs=1e-5) for u in got)


def test_causal_family_scores_diffmean_once_per_prompt_set(backend):
    from bench.families import _causal_rows

    class Supervised(LinArtefact):
        method = "diffmean"
        supervised = True

    arts = [make(Supervised, rand_dirs(2, seed=s), concept_set=f"c{s}") for s in (1, 2)]
    arts.append(make(LinArtefact, rand_dirs(8, seed=3)))
    suite = SimpleNamespace(seed=0, causal_alphas=[1.0], causal_unrelated_texts=1, causal_kl_targets=[0.1],
                            causal_ablation_scales=[1.0])
    ctx = SimpleNamespace(suite=suite, backend=backend, model_name="tiny-gemma2", unrelated_texts=["some text here"],
                          prompt_sets={"letters": letter_prompts()}, cell_artefacts=lambda cell: arts)
    rows = _causal_rows(ctx, SimpleNamespace(spec="diffmean", layer=LAYER))
    sup = [r for r in rows if r.supervised]
    assert {r.method for r in sup} == {"diffmean"} and {r.method for r in rows if not r.supervised} == {"lin-test"}
    assert len(sup) == len(rows) - len(sup)  # one DiffMean run, however many concept-set artefacts
    assert all(r.detail.startswith("letters;") for r in rows)
    assert {tokens(r.detail)["kl"] for r in rows if r.metric.endswith("delta_at_kl")} == {"0.1"}


def test_causal_family_skips_a_prompt_set_the_answers_leave_unusable_and_says_why(backend):
    """Every answer once (a small model that answers few capitals): no held-out answer has a train prompt, so the
    set is skipped for the cell with a recorded row; the other set is scored; a direct call still raises."""
    from bench.families import _causal_rows
    from metrics.causal import UnusablePrompts

    letters = "klmnopqrstuv"
    unique = PromptSet("unique", [CausalPrompt(f"{letters[i]}{letters[-1 - i]}q", letters[i], letters[(i + 1) % 12],
                                               f"a{i}") for i in range(12)], 12)
    art = make(LinArtefact, rand_dirs(8, seed=3))
    with pytest.raises(UnusablePrompts, match="no held-out prompt"):
        causal_metrics(art, backend, unique, ["some text here"], CausalConfig(alphas=(1.0,)))
    suite = SimpleNamespace(seed=0, causal_alphas=[1.0], causal_unrelated_texts=1, causal_kl_targets=[0.1],
                            causal_ablation_scales=[1.0])
    ctx = SimpleNamespace(suite=suite, backend=backend, model_name="tiny-gemma2", unrelated_texts=["some text here"],
                          prompt_sets={"unique": unique, "letters": letter_prompts()},
                          cell_artefacts=lambda cell: [art])
    rows = _causal_rows(ctx, SimpleNamespace(spec="lin", layer=LAYER))
    (skip,) = [r for r in rows if r.metric == "causal.prompt_sets_skipped"]
    assert skip.value == 1 and skip.n == 2 and skip.detail.startswith("skipped 1 of 2 prompt sets: unique (prompt set")
    assert {r.detail.split(";")[0] for r in rows if r is not skip} == {"letters"}
