"""Model-based and structural metrics: reconstruction, cost and stability (causal interventions: test_causal.py).

Oracles: numpy explained variance, identity / zero reconstructions, planted permutations of a dictionary and
brute-force top-k.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bench.activations import TextActivations
from bench.concepts import ConceptSet
from bench.store import write_synthetic_store
from methods.base import Artefact, Cost, MethodConfig
from metrics.cost import build_cost_rows, compare_costs, cost_metrics, encode_throughput
from metrics.reconstruction import explained_variance, reconstruction_metrics
from metrics.stability import (
    StabilityConfig,
    TopK,
    concept_stability,
    cross_layer_stability,
    greedy,
    hungarian,
    match_directions,
    pair_stability,
)

from fakes import LAYER, IdentityArtefact, LinArtefact, ZeroArtefact, make, rand_dirs

TEXTS = ["the cat sat on the mat", "a quick brown fox", "numbers 1 2 3 4 5", "hello there world"]


@pytest.fixture(scope="module")
def backend():
    from bench.models import load_model

    return load_model("tiny-gemma2")


def valid_rows(backend, texts, layer, ctx_len=128):
    """Non-BOS, non-pad residual rows, the oracle's view of the evaluated tokens."""
    toks, lengths = backend.to_tokens(texts, ctx_len=ctx_len)
    acts = backend.run_layers(toks, [layer])[layer]
    return torch.cat([acts[i, 1 : int(lengths[i])] for i in range(len(texts))])


# ---------------------------------------------------------------------------------------------------------
# Reconstruction


def by_metric(rows):
    return {r.metric: r for r in rows}


def test_reconstruction_identity_and_zero(backend):
    eye = torch.eye(64)
    ident = by_metric(reconstruction_metrics(make(IdentityArtefact, eye), backend, TEXTS))
    assert ident["recon.loss_recovered"].value == pytest.approx(1.0, abs=1e-9)
    assert ident["recon.explained_variance"].value == pytest.approx(1.0, abs=1e-12)
    assert ident["recon.mse"].value == 0.0
    assert ident["recon.loss_recovered"].n == len(TEXTS) and ident["recon.loss_recovered"].layer == LAYER
    zero = by_metric(reconstruction_metrics(make(ZeroArtefact, eye), backend, TEXTS))
    assert zero["recon.loss_recovered"].value == pytest.approx(0.0, abs=1e-9)
    assert zero["recon.explained_variance"].value < 0  # predicting 0 is worse than predicting the mean


def test_reconstruction_matches_numpy_oracle(backend):
    q, _ = torch.linalg.qr(rand_dirs(8).T)  # 8 orthonormal directions
    art = make(LinArtefact, q.T)
    got = by_metric(reconstruction_metrics(art, backend, TEXTS, batch_size=3))
    x = valid_rows(backend, TEXTS, LAYER).double().numpy()
    qn = q.double().numpy()
    xh = x @ qn @ qn.T
    ev = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert got["recon.explained_variance"].value == pytest.approx(ev, rel=1e-5)
    assert got["recon.mse"].value == pytest.approx(((x - xh) ** 2).mean(), rel=1e-5)
    lo, hi = got["recon.explained_variance"].ci_low, got["recon.explained_variance"].ci_high
    assert lo <= hi and np.isfinite(lo)
    # Variance about the mean, not about zero (which is what some implementations compute).
    about_zero = 1 - ((x - xh) ** 2).sum() / (x ** 2).sum()
    assert abs(about_zero - ev) > 1e-3
    assert explained_variance(torch.tensor(x), torch.tensor(xh)) == pytest.approx(ev, rel=1e-9)


def test_reconstruction_skips_methods_without_decoder(backend):
    class NoDecode(Artefact):
        method = "nodecode"

        @property
        def directions(self):
            return self.tensors["directions"]

        def encode(self, x, readout=None):
            return x @ self.directions.T

    art = NoDecode(MethodConfig(), {"directions": torch.eye(64)}, {"layer": LAYER})
    assert reconstruction_metrics(art, backend, TEXTS) == []


# ---------------------------------------------------------------------------------------------------------
# Cost


def test_cost_rows_and_ratios():
    ep = make(LinArtefact, rand_dirs(10), cost=Cost(rows=1000, tokens=4000, flops=2e9, wall_seconds=1.5).to_dict())
    sae_pre = make(LinArtefact, rand_dirs(20), published_training_tokens=4_000_000)
    sae_own = make(LinArtefact, rand_dirs(20), cost=Cost(tokens=40_000, flops=8e10).to_dict())
    b = by_metric(build_cost_rows(ep))
    assert b["cost.build.tokens"].value == 4000 and b["cost.build.wall_seconds"].value == 1.5
    r = by_metric(compare_costs(ep, sae_pre))
    assert r["cost.token_ratio_sae_over_ep"].value == pytest.approx(1000.0)
    assert "published SAE tokens" in r["cost.token_ratio_sae_over_ep"].detail
    assert r["cost.flop_ratio_sae_over_ep"].value == pytest.approx(12 * 64 * 20 * 4e6 / 2e9)
    r = by_metric(compare_costs(ep, sae_own))
    assert r["cost.token_ratio_sae_over_ep"].value == pytest.approx(10.0)
    assert r["cost.flop_ratio_sae_over_ep"].value == pytest.approx(40.0)
    enc = encode_throughput(ep, torch.randn(512, 64), repeats=3)[0]
    assert enc.metric == "cost.encode_rows_per_s" and enc.value > 0 and enc.n == 3
    assert len(cost_metrics(ep, torch.randn(64, 64))) == 6


# ---------------------------------------------------------------------------------------------------------
# Stability


def permuted(dirs, noise, seed=1):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(dirs), generator=g)
    noisy = dirs[perm] + noise * torch.randn(dirs.shape, generator=g)
    return torch.nn.functional.normalize(noisy, dim=1), perm


@pytest.mark.parametrize("cap", [4096, 10])  # Hungarian, then the greedy path for K above the cap
def test_direction_matching_recovers_planted_permutation(cap):
    a = torch.nn.functional.normalize(rand_dirs(60), dim=1)
    b, perm = permuted(a, 0.02)
    m = match_directions(a, b, hungarian_cap=cap)
    assert m.exact == (cap > 60)
    partner = m.partner()
    assert all(partner[int(perm[j])] == j for j in range(60))  # b[j] = a[perm[j]] + noise
    rows = by_metric(pair_stability(make(LinArtefact, a), make(LinArtefact, b),
                                    config=StabilityConfig(hungarian_cap=cap)))
    assert rows["stability.direction.share>0.9"].value == 1.0
    ctrl = by_metric(pair_stability(make(LinArtefact, a), make(LinArtefact, rand_dirs(60, seed=7))))
    assert ctrl["stability.direction.share>0.5"].value == 0.0  # random directions in d=64 never match
    assert rows["stability.direction.mean_cos"].value > 0.98 > 0.5 > ctrl["stability.direction.mean_cos"].value


def test_greedy_is_a_lower_bound_of_hungarian():
    s = np.random.default_rng(0).random((30, 40))
    h = hungarian(s)
    r, c = np.nonzero(np.ones_like(s))
    g = greedy(r, c, s[r, c], s.shape)
    assert len(set(g.rows)) == len(g.rows) == 30 and len(set(g.cols)) == 30
    assert g.sim.sum() <= h.sim.sum() + 1e-12


def test_topk_matches_brute_force():
    f = torch.randn(1000, 7)
    f[:, 3] = 0.0  # a dead feature has no top rows
    f[::2, 4] = 0.0
    acc = TopK(7, 10)
    for lo in range(0, 1000, 128):
        acc.update(f[lo:lo + 128])
    sets = acc.sets().toarray()
    for k in (0, 1, 2, 4):
        assert set(np.flatnonzero(sets[:, k])) == set(f[:, k].topk(10).indices.tolist())
    assert sets[:, 3].sum() == 0


@pytest.mark.parametrize("cap", [4096, 10])
def test_coactivation_planted_and_d_mismatch(cap):
    x = torch.randn(3000, 64, generator=torch.Generator().manual_seed(3))
    a = torch.nn.functional.normalize(rand_dirs(40), dim=1)
    b, _ = permuted(a, 0.02)
    cfg = StabilityConfig(hungarian_cap=cap)
    rows = by_metric(pair_stability(make(LinArtefact, a), make(LinArtefact, b), x, config=cfg))
    assert ("greedy" in rows["stability.coactivation.mean_f1"].detail) == (cap < 40)
    assert rows["stability.coactivation.share>0.5"].value == 1.0
    assert rows["stability.coactivation.mean_f1"].value > 0.8
    ctrl = by_metric(pair_stability(make(LinArtefact, a), make(LinArtefact, rand_dirs(40, seed=9)), x, config=cfg))
    assert ctrl["stability.coactivation.mean_f1"].value < 0.3
    with pytest.raises(ValueError, match="co-activation only"):
        pair_stability(make(LinArtefact, a), make(LinArtefact, rand_dirs(40, d=32)))


def test_cross_layer_stability_from_store(tmp_path):
    g = torch.Generator().manual_seed(0)
    l0 = torch.randn(16, 20, 64, generator=g)
    store = write_synthetic_store(tmp_path / "s", {0: l0, 1: l0 + 0.01 * torch.randn(16, 20, 64, generator=g)})
    a = torch.nn.functional.normalize(rand_dirs(30), dim=1)
    b, _ = permuted(a, 0.02)
    arts = {0: make(LinArtefact, a, layer=0, store_id=store.id), 1: make(LinArtefact, b, layer=1, store_id=store.id)}
    rows = by_metric(cross_layer_stability(arts, store=store, config=StabilityConfig(top_k=20)))
    assert rows["stability.direction.share>0.7"].value == 1.0
    assert rows["stability.coactivation.share>0.5"].value == 1.0
    assert rows["stability.direction.mean_cos"].layer == 0 and "0->1" in rows["stability.direction.mean_cos"].detail
    arts[1].info["store_id"] = "other"
    with pytest.raises(ValueError, match="one activation store"):
        cross_layer_stability(arts)


def test_concept_stability_follows_matched_feature():
    g = torch.Generator().manual_seed(0)
    d, n_texts, per = 64, 40, 3
    concept_dirs = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=1)
    acts = 0.3 * torch.randn(n_texts * per, d, generator=g)
    text_ids = torch.arange(n_texts).repeat_interleave(per)
    label = (torch.arange(n_texts) >= 20).long()  # texts 0-19 concept A, 20-39 concept B
    acts += 2.0 * concept_dirs[label[text_ids]]
    ta = TextActivations(acts, text_ids, n_texts)
    ex = []
    for c, own in (("A", 0), ("B", 1)):
        for t in range(n_texts):
            category = "positive" if label[t] == own else "negative"
            ex.append((f"text {t}", c, category, "train" if t % 20 < 10 else "test"))
    cs = ConceptSet("planted", ["A", "B"], pd.DataFrame(ex, columns=["text", "concept", "category", "split"]), "test")
    dirs_a = torch.cat([concept_dirs, rand_dirs(10, seed=5)])
    dirs_b, _ = permuted(torch.nn.functional.normalize(dirs_a, dim=1), 0.02)
    arts = {3: make(LinArtefact, dirs_a, layer=3), 4: make(LinArtefact, dirs_b, layer=4)}
    rows = concept_stability(arts, cs, {3: ta, 4: ta})
    assert len(rows) == 1 and rows[0].metric == "stability.concept_precision@10"
    assert rows[0].value == 1.0 and rows[0].layer == 3
