"""Concept metrics (selection, retrieval, detection, probing, correspondence, OOD) against hand-computed values
and sklearn, and the planted-ground-truth validation: the oracle dictionary beats random directions on every one."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.activations import TextActivations, pool_max, pool_mean
from bench.concepts import ConceptSet
from bench.planted import OracleArtefact, make_planted, oracle_artefact
from methods.base import Assignment, MethodConfig
from methods.diffmean import DiffMeanArtefact, DiffMeanConfig
from methods.random_directions import RandomArtefact, RandomConfig, random_unit_directions
from metrics.correspondence import RunningTopN, best_f1, correspondence_metrics
from metrics.detection import auroc, auroc_columns, detection_metrics
from metrics.feature_selection import pooled_features, select_features
from metrics.ood import distances, ood_metrics, weighted_auroc_stat
from metrics.probing import onehot_pooled, probing_metrics
from metrics.retrieval import precision_at_k, purity_values, retrieval_metrics


class FakeEP(OracleArtefact):
    """EP-shaped artefact (method 'ep', EP readouts, distance assign) over given directions: routes like EP."""

    method: ClassVar[str] = "ep"
    readouts: ClassVar[tuple[str, ...]] = ("binary", "topk", "cosine", "signed")

    def encode(self, x, readout=None, basis="exemplar"):  # one basis: the region mean is its exemplar here
        x = self.check_input(x)
        cos = F.normalize(x, dim=1) @ self.directions.T
        if readout == "cosine":
            return cos
        if readout == "signed":
            return x @ self.directions.T
        if readout in (None, "binary", "topk"):
            return F.one_hot(cos.argmax(1), self.K).float()
        raise ValueError(readout)

    def assign(self, x):
        best = (F.normalize(self.check_input(x), dim=1) @ self.directions.T).max(1)
        return Assignment(best.indices, 1.0 - best.values)


def fake_ep(dirs, theta=0.5, label="ep-fake"):
    return FakeEP(MethodConfig(), {"directions": F.normalize(dirs.float(), dim=1)},
                  {"label": label, "theta": theta, "model": "planted", "layer": 0})


def tiny_set(rows):
    return ConceptSet("tiny", sorted({r[1] for r in rows}),
                      pd.DataFrame(rows, columns=["text", "concept", "category", "split"]), "test")


# ------------------------------------------------------------------------------------------------
# AUROC, precision, purity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 5, size=60).astype(float)  # heavy ties
    y = rng.integers(0, 2, size=60)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    S = rng.integers(0, 4, size=(60, 7)).astype(np.float32)
    cols = auroc_columns(torch.from_numpy(S[y == 1]), torch.from_numpy(S[y == 0])).numpy()
    np.testing.assert_allclose(cols, [roc_auc_score(y, S[:, j]) for j in range(7)], atol=1e-6)
    assert np.isnan(auroc([1.0, 2.0], [1, 1]))


def test_precision_at_k_hand_values():
    s, pos = np.array([3.0, 2.0, 2.0, 1.0]), np.array([1, 0, 1, 0], dtype=bool)
    assert precision_at_k(s, pos, 1) == 1.0
    assert precision_at_k(s, pos, 2) == pytest.approx(0.75)  # 1 sure hit + half of the tied pair
    assert precision_at_k(s, pos, 3) == pytest.approx(2 / 3)
    assert precision_at_k(s, pos, 10) == pytest.approx(0.5)  # k capped at the pool size


def test_purity_hand_values():
    X = np.array([[5, 0, 1], [4, 0, 1], [3, 2, 1], [0, 3, 1], [0, 0, 1]], dtype=float)
    labels = np.array([0, 0, 1, 1, 2])
    vals, n_fire = purity_values(X, labels, k=3)
    # feature 0 top-3 = rows 0,1,2 -> labels 0,0,1 -> 2/3; feature 1 fires on 2 < 3 texts -> left out;
    # feature 2 ties everywhere -> 3 random rows, purity in {1/3, 2/3}
    assert n_fire == 2 and len(vals) == 2
    assert vals[0] == pytest.approx(2 / 3) and vals[1] in (pytest.approx(1 / 3), pytest.approx(2 / 3))


# ------------------------------------------------------------------------------------------------
# pooling and selection


def test_pooled_features_match_pool_helpers_across_chunks():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(23, 6, generator=g)
    tid = torch.tensor(sorted(torch.randint(0, 5, (23,), generator=g).tolist()))
    tid[:5] = torch.arange(5)  # every text has a row
    ta = TextActivations(acts, tid, 5)
    art = oracle_artefact(torch.randn(4, 6, generator=g))
    f = art.encode(acts)
    p = pooled_features(art, ta, chunk_rows=3)
    torch.testing.assert_close(p.values, pool_max(f, tid, 5))
    pm = pooled_features(art, ta, [1, 3], pool="mean", chunk_rows=4)
    torch.testing.assert_close(pm.values, pool_mean(f, tid, 5)[[1, 3]])
    with pytest.raises(KeyError, match="not pooled"):
        pm.rows([0])
    with pytest.raises(ValueError, match="no token rows"):
        pooled_features(art, TextActivations(acts, torch.zeros(23, dtype=torch.long), 2))


@pytest.fixture(scope="module")
def small():
    """A small planted set: fast enough for the exact-value checks below."""
    return make_planted(n_concepts=4, n_background=6, per_concept=12, d=32, seed=3)


def test_selection_matches_naive_mean_difference(small):
    g = torch.Generator().manual_seed(1)
    art = oracle_artefact(torch.randn(10, 32, generator=g), label="rand")
    sel = select_features(art, small.concept_set, small.text_acts)
    P = pool_max(art.encode(small.text_acts.acts), small.text_acts.text_ids, small.text_acts.n_texts).numpy()
    ex = small.concept_set.examples
    for c in small.concept_set.concepts:
        e = ex[(ex.concept == c) & (ex.split == "train")]
        diff = [P[e[e.category == "positive"].text_id, k].mean() - P[e[e.category != "positive"].text_id, k].mean()
                for k in range(art.K)]
        assert sel[c] == int(np.argmax(diff))
    # The oracle picks each concept's own true feature.
    assert select_features(small.oracle, small.concept_set, small.text_acts) == small.concept_feature


def test_selection_routes_ep_to_cosine_and_diffmean_to_its_concepts(small):
    cs = small.concept_set
    ep = fake_ep(small.directions)
    assert select_features(ep, cs, small.text_acts) == small.concept_feature
    assert "readout=cosine" in detection_metrics(ep, cs, small.text_acts)[0].detail  # the paper's readout
    names = list(reversed(cs.concepts))
    dm = DiffMeanArtefact(DiffMeanConfig(), {"directions": small.directions[: len(names)]}, {"concepts": names})
    assert select_features(dm, cs, small.text_acts) == {c: names.index(c) for c in cs.concepts}
    dm_bad = DiffMeanArtefact(DiffMeanConfig(), {"directions": small.directions[:1]}, {"concepts": ["other"]})
    with pytest.raises(ValueError, match="refit"):
        select_features(dm_bad, cs, small.text_acts)


# ------------------------------------------------------------------------------------------------
# detection and retrieval rows


def test_detection_rows_match_sklearn(small):
    g = torch.Generator().manual_seed(2)
    art = oracle_artefact(torch.randn(10, 32, generator=g), label="rand")
    ta, cs = small.text_acts, small.concept_set
    P = pool_max(art.encode(ta.acts), ta.text_ids, ta.n_texts).numpy()
    sel = select_features(art, cs, ta)
    ex = cs.examples
    easy, hard, best = [], [], []
    for c in cs.concepts:
        te, tr = ex[(ex.concept == c) & (ex.split == "test")], ex[(ex.concept == c) & (ex.split == "train")]
        for out, negcat in ((easy, "negative"), (hard, "hard negative")):
            e = te[te.category.isin(["positive", negcat])]
            out.append(roc_auc_score(e.category == "positive", P[e.text_id, sel[c]]))
        train_auc = [roc_auc_score(tr.category == "positive", P[tr.text_id, k]) for k in range(art.K)]
        e = te[te.category.isin(["positive", "negative"])]
        best.append(roc_auc_score(e.category == "positive", P[e.text_id, int(np.argmax(train_auc))]))
    rows = {r.metric: r for r in detection_metrics(art, cs, ta)}
    assert rows["detection.auroc"].value == pytest.approx(np.mean(easy))
    assert rows["detection.auroc_hard"].value == pytest.approx(np.mean(hard))
    assert rows["detection.auroc_best_latent"].value == pytest.approx(np.mean(best))
    r = rows["detection.auroc"]
    assert r.n == len(cs.concepts) and r.ci_low <= r.value <= r.ci_high


def test_missing_hard_negatives_are_reported_not_dropped():
    rows = []
    for split in ("train", "test"):
        for i in range(3):
            rows += [(f"a{split}{i}", "A", "positive", split), (f"b{split}{i}", "A", "negative", split),
                     (f"b{split}{i}", "B", "positive", split), (f"a{split}{i}", "B", "negative", split),
                     (f"h{split}{i}", "B", "hard negative", split)]
    cs = tiny_set(rows)
    g = torch.Generator().manual_seed(0)
    ta = TextActivations(torch.randn(3 * len(cs.texts()), 8, generator=g),
                         torch.arange(len(cs.texts())).repeat_interleave(3), len(cs.texts()))
    out = {r.metric: r for r in detection_metrics(oracle_artefact(torch.randn(5, 8, generator=g)), cs, ta)}
    hard = out["detection.auroc_hard"]
    assert hard.n == 1 and "1 of 2 concepts have no test hard negatives" in hard.detail


def test_retrieval_precision_rows_match_hand_computation(small):
    ta, cs = small.text_acts, small.concept_set
    art = small.oracle
    sel = select_features(art, cs, ta)
    P = pool_max(art.encode(ta.acts), ta.text_ids, ta.n_texts).numpy()
    ex = cs.examples
    vals = []
    for c in cs.concepts:
        e = ex[(ex.concept == c) & (ex.split == "test")]
        order = np.argsort(-P[e.text_id, sel[c]], kind="stable")[:10]
        vals.append((e.category.to_numpy()[order] == "positive").mean())
    rows = {r.metric: r for r in retrieval_metrics(art, cs, ta)}
    assert rows["retrieval.precision@10"].value == pytest.approx(np.mean(vals))
    assert {"retrieval.precision@50", "retrieval.purity@10", "retrieval.purity@50"} <= set(rows)


# ------------------------------------------------------------------------------------------------
# probing


def test_onehot_pooled_readouts(small):
    ta = small.text_acts
    ep = fake_ep(small.directions)
    m, note = onehot_pooled(ep, ta, chunk_rows=7)
    assert note == "binary readout"
    torch.testing.assert_close(torch.from_numpy(m.toarray()), pool_mean(ep.encode(ta.acts, "binary"), ta.text_ids,
                                                                        ta.n_texts))
    m2, note2 = onehot_pooled(small.oracle, ta, chunk_rows=7)
    assert "assign" in note2
    oh = F.one_hot(small.oracle.assign(ta.acts).index, small.oracle.K).float()
    torch.testing.assert_close(torch.from_numpy(m2.toarray()), pool_mean(oh, ta.text_ids, ta.n_texts))
    assert np.allclose(m2.sum(axis=1), 1.0)


def test_probing_rows_match_direct_sklearn_probes(small):
    ta, cs = small.text_acts, small.concept_set
    rows = {r.metric: r for r in probing_metrics(small.oracle, cs, ta)}
    raw = pool_mean(ta.acts, ta.text_ids, ta.n_texts).numpy()
    onehot = pool_mean(F.one_hot(small.oracle.assign(ta.acts).index, small.oracle.K).float(), ta.text_ids,
                       ta.n_texts).numpy()
    ex, acc = cs.examples, {"raw": [], "onehot": []}
    for c in cs.concepts:
        tr, te = ex[(ex.concept == c) & (ex.split == "train")], ex[(ex.concept == c) & (ex.split == "test")]
        for name, X in (("raw", raw), ("onehot", onehot)):
            probe = make_pipeline(StandardScaler(), LogisticRegression(solver="liblinear", random_state=0))
            probe.fit(X[tr.text_id], tr.category == "positive")
            acc[name].append(probe.score(X[te.text_id], te.category == "positive"))
    assert rows["probing.acc_raw"].value == pytest.approx(np.mean(acc["raw"]))
    assert rows["probing.acc_readout"].value == pytest.approx(np.mean(acc["onehot"]))
    ratio = np.array(acc["onehot"]) / np.array(acc["raw"])
    assert rows["probing.onehot_retention"].value == pytest.approx(ratio.mean())
    assert rows["probing.onehot_retention"].n == len(cs.concepts)


# ------------------------------------------------------------------------------------------------
# correspondence


def test_running_topn_and_best_f1_against_naive():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(50, 6, generator=g) - 0.3
    ref_v, ref_i = f.T.topk(7, dim=1)
    for step in (3, 8, 50):  # batches smaller than n, larger than n, everything at once
        t = RunningTopN(6, 7)
        for s in range(0, 50, step):
            t.update(f[s:s + step], s)
        torch.testing.assert_close(t.values, ref_v)
        torch.testing.assert_close(t.index, ref_i)
    A = t.incidence(50).toarray()
    for k in range(6):
        assert set(np.flatnonzero(A[k])) == set(ref_i[k][ref_v[k] > 0].tolist())
    rng = np.random.default_rng(0)
    sa = [set(rng.choice(30, rng.integers(1, 10), replace=False)) for _ in range(5)]
    sb = [set(rng.choice(30, rng.integers(1, 10), replace=False)) for _ in range(4)]

    def inc(sets):
        m = np.zeros((len(sets), 30), dtype=np.float32)
        for i, s in enumerate(sets):
            m[i, list(s)] = 1
        return sp.csr_matrix(m)

    f1 = np.array([[2 * len(a & b) / (len(a) + len(b)) for b in sb] for a in sa])
    ba, bb = best_f1(inc(sa), inc(sb))
    np.testing.assert_allclose(ba, f1.max(1))
    np.testing.assert_allclose(bb, f1.max(0))


def test_correspondence_with_itself_is_perfect_and_ep_reads_signed(small):
    stream = small.stream(600)
    rows = {r.metric: r for r in correspondence_metrics(small.oracle, small.oracle, stream, top_n=50)}
    assert rows["correspondence.share_f1>0.5"].value == 1.0
    assert rows["correspondence.mean_best_f1"].value == pytest.approx(1.0)
    ep = fake_ep(small.directions)
    rows = correspondence_metrics(ep, small.oracle, [stream[:300], stream[300:]], top_n=50)
    assert "readout_a=signed, readout_b=None" in rows[0].detail and rows[0].value > 0.9


# ------------------------------------------------------------------------------------------------
# OOD


def test_weighted_auroc_matches_sklearn_sample_weights():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 6, 40).astype(float), rng.integers(0, 2, 40)
    unit = np.repeat(np.arange(10), 4)
    stat = weighted_auroc_stat(s, y, unit, 10)
    assert stat(np.arange(10)) == pytest.approx(roc_auc_score(y, s))
    draw = rng.integers(0, 10, 10)
    w = np.bincount(draw, minlength=10)[unit]
    assert stat(draw) == pytest.approx(roc_auc_score(y, s, sample_weight=w))


def test_ood_distances_and_within_theta(small):
    ep = fake_ep(small.directions, theta=0.3)
    x = small.text_acts.acts[:40]
    d = distances(ep, x)
    np.testing.assert_allclose(d, ep.assign(x).score.numpy(), rtol=1e-5)
    d_o = distances(small.oracle, x)
    np.testing.assert_allclose(d_o, 1 - (F.normalize(x, dim=1) @ small.oracle.directions.T).max(1).values, atol=1e-5)
    ood = {"gaussian": small.ood("gaussian", 20)}
    rows = ood_metrics(ep, small.text_acts, ood, n_boot=50)
    rate = {r.detail.split(";")[0]: r.value for r in rows if r.metric == "ood.within_theta_rate"}
    assert rate["in-distribution"] == pytest.approx(float((distances(ep, small.text_acts.acts) <= 0.3).mean()))
    assert set(rate) == {"in-distribution", "gaussian"}
    assert not [r for r in ood_metrics(small.oracle, small.text_acts, ood, n_boot=50)
                if r.metric == "ood.within_theta_rate"]  # EP only
    no_theta = fake_ep(small.directions)
    del no_theta.info["theta"]
    with pytest.raises(ValueError, match="theta"):
        ood_metrics(no_theta, small.text_acts, ood, n_boot=10)


# ------------------------------------------------------------------------------------------------
# planted-ground-truth validation: the oracle must beat random directions on every metric

# metric -> (oracle must reach at least, oracle - random must be at least)
MARGINS = {
    "retrieval.precision@10": (0.95, 0.12),
    "retrieval.precision@50": (0.95, 0.25),
    "retrieval.purity@10": (0.55, 0.12),
    "retrieval.purity@50": (0.5, 0.2),
    "detection.auroc": (0.97, 0.12),
    "detection.auroc_hard": (0.95, 0.12),
    "detection.auroc_best_latent": (0.97, 0.12),
    "probing.acc_readout": (0.95, 0.2),
    "probing.onehot_retention": (0.95, 0.2),
    "correspondence.share_f1>0.5": (0.9, 0.7),
    "correspondence.mean_best_f1": (0.85, 0.4),
    "correspondence.reverse_share_f1>0.5": (0.9, 0.7),
    "correspondence.reverse_mean_best_f1": (0.85, 0.4),
    "ood.auroc[gaussian]": (0.97, 0.3),
    "ood.auroc[foreign]": (0.97, 0.3),
    "ood.theta_gap[gaussian]": (0.4, 0.3),  # within-theta rate in-distribution minus OOD (EP-shaped artefacts)
}


def _scorecard(art, ep_art, planted, reference, stream, ood):
    rows = (retrieval_metrics(art, planted.concept_set, planted.text_acts)
            + detection_metrics(art, planted.concept_set, planted.text_acts)
            + probing_metrics(art, planted.concept_set, planted.text_acts)
            + correspondence_metrics(art, reference, stream)
            + ood_metrics(art, planted.text_acts, ood, n_boot=100))
    out = {}
    for r in rows:
        key = f"{r.metric}[{r.detail.split(';')[0]}]" if r.metric.startswith("ood.") else r.metric
        out[key] = r.value
    rate = {r.detail.split(";")[0]: r.value for r in ood_metrics(ep_art, planted.text_acts, ood, n_boot=10)
            if r.metric == "ood.within_theta_rate"}
    out["ood.theta_gap[gaussian]"] = rate["in-distribution"] - rate["gaussian"]
    return out


@pytest.fixture(scope="module")
def planted_scores():
    p = make_planted()
    K, d = p.directions.shape
    rnd = RandomArtefact(RandomConfig(k=K), {"directions": random_unit_directions(K, d, 0),
                                             "center": p.text_acts.acts.mean(0)}, {"label": "random"})
    g = torch.Generator().manual_seed(5)
    # The reference dictionary ("an SAE") is the truth slightly perturbed (cosine ~0.9 to it).
    reference = oracle_artefact(p.directions + 0.03 * torch.randn(p.directions.shape, generator=g), "reference")
    stream = p.stream(4000)
    ood = {k: p.ood(k, 100) for k in ("gaussian", "foreign")}
    # EP-shaped versions of both (distance = 1 - max cosine), theta = the oracle's in-distribution median.
    theta = float(np.median(distances(p.oracle, p.text_acts.acts)))
    ep_oracle, ep_random = fake_ep(p.directions, theta), fake_ep(rnd.directions, theta)
    return (_scorecard(p.oracle, ep_oracle, p, reference, stream, ood),
            _scorecard(rnd, ep_random, p, reference, stream, ood))


@pytest.mark.parametrize("metric", sorted(MARGINS))
def test_planted_oracle_beats_random(planted_scores, metric):
    oracle, random = planted_scores
    floor, margin = MARGINS[metric]
    assert oracle[metric] >= floor, f"oracle {metric} = {oracle[metric]:.3f} < {floor}"
    assert oracle[metric] - random[metric] >= margin, (
        f"{metric}: oracle {oracle[metric]:.3f} vs random {random[metric]:.3f}, margin < {margin}")


def test_planted_raw_probe_is_method_independent(planted_scores):
    oracle, random = planted_scores
    assert oracle["probing.acc_raw"] == random["probing.acc_raw"]
    assert set(oracle) >= set(MARGINS)
