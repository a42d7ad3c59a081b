"""The compositional toy (metrics.compositional): prompts, ARIs, EP on the toy, the family, the claim scorer."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from metrics.compositional import (
    METRICS,
    CompositionalConfig,
    ToyActivations,
    score_compositional_claim,
    score_partition,
    toy_calibration,
    toy_ep,
    toy_prompts,
    toy_sweep_rows,
)


def _planted(per_pair=10, d=16, noise=0.05, seed=0) -> ToyActivations:
    """Rows = offset + colour(c2) + 0.4 colour(c1) + noise: c2 dominant, c1 a smaller shift."""
    g = torch.Generator().manual_seed(seed)
    tp = toy_prompts(CompositionalConfig(per_pair=per_pair, seed=seed))
    base = torch.randn(3, d, generator=g)
    x = 5.0 + base[tp.c2] + 0.4 * base[tp.c1] + noise * torch.randn(len(tp.c1), d, generator=g)
    return ToyActivations(x, tp.c1, tp.c2, tp.prompts, 3, "planted", [""] * len(tp.c1))


def test_prompts_are_seeded_balanced_and_read_at_c2():
    cfg = CompositionalConfig(per_pair=7, n_low=10, n_high=20, seed=3)
    a, b = toy_prompts(cfg), toy_prompts(cfg)
    assert a.prompts == b.prompts and len(a.prompts) == 9 * 7
    assert toy_prompts(dataclasses.replace(cfg, seed=4)).prompts != a.prompts
    pairs, counts = np.unique(np.stack([a.c1, a.c2], 1), axis=0, return_counts=True)
    assert len(pairs) == 9 and set(counts) == {7}
    assert a.n.min() >= 10 and a.n.max() <= 20
    for p, c1, c2, n in zip(a.prompts, a.c1, a.c2, a.n):
        assert p == f"{n} ({cfg.colours[c1]}) {cfg.colours[c2]}"
    assert len(set(map(tuple, np.stack([a.c1, a.c2], 1)[:9]))) > 1  # shuffled: not grouped by pair


def test_aris_match_sklearn_on_planted_partitions():
    toy = _planted()
    s = score_partition(toy.pair, toy)  # exactly the pairs
    assert s.K == 9 and s.ari_pair == pytest.approx(1.0)
    assert s.ari_c2 == pytest.approx(adjusted_rand_score(toy.c2, toy.pair)) == pytest.approx(s.ari_c1, abs=1e-12)
    assert 0.3 < s.ari_c2 < 0.45  # ~0.39 for a balanced design (the reference figure in the docstring)
    s = score_partition(torch.from_numpy(toy.c2), toy)
    assert (s.K, s.ari_c2) == (3, pytest.approx(1.0)) and abs(s.ari_c1) < 0.05
    r = np.random.default_rng(0).integers(0, 5, len(toy.c1))
    s = score_partition(r, toy)
    assert s == (len(np.unique(r)), adjusted_rand_score(toy.c2, r), adjusted_rand_score(toy.c1, r),
                 adjusted_rand_score(toy.pair, r))


def _naive_leader(u: torch.Tensor, theta: float) -> list[int]:
    """The spec's one-batch leader clustering, written plainly: rows that become exemplars, in creation order."""
    leaders = [0]  # the very first row seeds region 0 before matching
    for i in range(1, len(u)):
        if 1.0 - float(u[i] @ u[0]) <= theta:  # matched to an exemplar existing at batch start (region 0)
            continue
        earlier = [j for j in leaders[1:]]  # leaders created earlier in this batch
        if earlier and max(float(u[i] @ u[j]) for j in earlier) >= 1.0 - theta:
            continue
        leaders.append(i)
    return leaders


def test_ep_on_toy_reproduces_the_spec_leader_clustering_and_calibration():
    toy = _planted(per_pair=12, noise=0.3)
    ps = [2.0, 10.0, 30.0]
    cal = toy_calibration(toy.x, ps)
    u = cal.u.double().numpy()
    iu = np.triu_indices(len(u), 1)
    dist = np.clip(1.0 - (u @ u.T)[iu], 0.0, 2.0)
    for p in ps:
        assert cal.thetas[p] == pytest.approx(np.percentile(dist, p), abs=1e-5)
    arts = toy_ep(toy, ps)
    for p, art in arts.items():
        leaders = _naive_leader(cal.u, cal.thetas[p])
        assert art.K == len(leaders) and art.name == f"ep-toy:p={p:g}"
        assert torch.equal(art.directions, cal.u[leaders])  # the same rows, in the same order
        sims = art.directions @ art.directions.T
        off = ~torch.eye(art.K, dtype=torch.bool)
        assert bool((1.0 - sims[off] > art.theta).all())  # exemplars are more than theta apart
        assert torch.equal(art.assign(toy.x).index[leaders], torch.arange(art.K))  # each exemplar in its own cell
    assert arts[2.0].K > arts[10.0].K > arts[30.0].K


def test_sweep_rows_recover_the_planted_structure_with_a_kmeans_control():
    toy = _planted(per_pair=12, noise=0.02)
    rows = toy_sweep_rows(toy, CompositionalConfig(percentiles=(2.0, 50.0)))
    df = pd.DataFrame([r.to_dict() for r in rows])
    assert set(df["metric"]) == set(METRICS) and (df["detail"].str.split(";").str[0] == "toy").all()
    assert set(df["method"]) == {"ep-toy:p=2", "ep-toy:p=50", "kmeans-toy@K(ep-toy:p=2)",
                                 "kmeans-toy@K(ep-toy:p=50)"}
    v = df.set_index(["method", "metric"])["value"]
    assert v["ep-toy:p=50", "compositional.K"] == v["kmeans-toy@K(ep-toy:p=50)", "compositional.K"]
    assert v["ep-toy:p=50", "compositional.ari_c2"] > 0.9  # three well-separated c2 clusters at large p
    assert v["ep-toy:p=2", "compositional.ari_pair"] > v["ep-toy:p=2", "compositional.ari_c2"]


def _claim_rows(ep: dict, km: dict | None = None, layer: int = 8) -> pd.DataFrame:
    out = []
    for kind, table in (("ep", ep), ("km", km or {})):
        for p, (K, c2, c1, pair) in table.items():
            name = f"ep-toy:p={p:g}" if kind == "ep" else f"kmeans-toy@K(ep-toy:p={p:g})"
            for m, val in zip(METRICS, (K, c2, c1, pair)):
                out.append({"method": name, "layer": layer, "metric": m, "value": val, "detail": f"toy; p={p:g}; K={K}"})
    out.append({"method": "ep:p=2", "layer": layer, "metric": "compositional.ari_c2", "value": 0.0,
                "detail": "store; store artefact; p=2"})  # a store row never enters the claim
    return pd.DataFrame(out)


REPRO = {1: (30, 0.30, 0.35, 0.90), 2: (12, 0.60, 0.10, 0.50), 4: (3, 0.9, 0.0, 0.4), 8: (3, 0.9, 0.0, 0.4),
         10: (3, 0.9, 0.0, 0.4)}


def test_claim_scorer_gives_each_status():
    s = score_compositional_claim(_claim_rows(REPRO, km=REPRO))
    assert s.status == "reproduced" and "EP is k-means at the same K" in s.measured
    assert "ARI_c2 >= 0.5" in s.criterion
    other_km = {p: (K, c2 - 0.2, c1, pair) for p, (K, c2, c1, pair) in REPRO.items()}
    s = score_compositional_claim(_claim_rows(REPRO, km=other_km))
    assert s.status == "reproduced" and "max |EP - k-means| ARI 0.20" in s.measured
    fine = {p: (100, 0.05, 0.05, 0.2) for p in (1, 2, 4, 8, 10)}  # over-partitioned: c2 never recovered
    assert score_compositional_claim(_claim_rows(fine)).status == "not reproduced"
    no_split = {p: (3, 0.9, 0.0, 0.4) for p in (1, 2, 4, 8, 10)}  # c2 everywhere, c1 never
    s = score_compositional_claim(_claim_rows(no_split))
    assert s.status == "not reproduced" and "B (split by c1 at p1: False" in s.measured
    two_layers = pd.concat([_claim_rows(REPRO), _claim_rows(no_split, layer=9)])
    assert score_compositional_claim(two_layers).status == "not reproduced"
    assert score_compositional_claim(pd.DataFrame(columns=["method", "layer", "metric", "value", "detail"])
                                     ).status == "not testable here"
    only_two = {p: REPRO[p] for p in (1, 2)}
    assert score_compositional_claim(_claim_rows(only_two)).status == "not testable here"
    off_grid = {p: (3, 1.0, 0.0, 0.4) for p in (20, 30, 50)}  # the extended p are reported, not scored
    assert score_compositional_claim(_claim_rows(off_grid)).status == "not testable here"


def test_the_family_runs_on_the_tiny_model(tiny_model, tmp_path, monkeypatch):
    import metrics.compositional as comp
    from bench.cells import Cell
    from bench.context import ModelContext
    from bench.families import FAMILIES
    from bench.store import write_synthetic_store
    from bench.suites import METRIC_FAMILIES, MethodSpec, get_suite

    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    assert "compositional" in METRIC_FAMILIES
    g = torch.Generator().manual_seed(0)
    store = write_synthetic_store(tmp_path / "s", {2: 3.0 + torch.randn(24, 15, tiny_model.d_model, generator=g)})
    suite = dataclasses.replace(
        get_suite("smoke"), layers=[2], concept_sets=[], metrics=["compositional"],
        methods=[MethodSpec("ep", {"percentiles": [2, 10], "n_calib": 100, "batch_contexts": 8}),
                 MethodSpec("pca", {"k": 4})])
    ctx = ModelContext(suite, "tiny-gemma2", progress=False, store=store)
    ctx.__dict__["backend"] = tiny_model
    calls = []
    real = comp.toy_activations
    monkeypatch.setattr(comp, "toy_activations", lambda *a, **k: calls.append(1) or real(*a, **k))
    ep_rows = FAMILIES["compositional"](ctx, Cell("tiny-gemma2", 2, "ep", "compositional"))
    pca_rows = FAMILIES["compositional"](ctx, Cell("tiny-gemma2", 2, "pca", "compositional"))
    assert len(calls) == 1  # the toy's activations are computed once per (model, layer)
    ep, pca = pd.DataFrame([r.to_dict() for r in ep_rows]), pd.DataFrame([r.to_dict() for r in pca_rows])
    setting = lambda df: df["detail"].str.split(";").str[0]
    assert set(ep.loc[setting(ep) == "toy", "method"]) >= {f"ep-toy:p={p:g}" for p in (1, 2, 4, 8, 10)}
    assert set(ep.loc[setting(ep) == "store", "method"]) == {"ep:p=2", "ep:p=10"}
    assert (setting(pca) == "store").all() and set(pca["method"]) == {"pca:k=4"}  # the sweep runs in EP's cell only
    assert set(ep["metric"]) == set(pca["metric"]) == set(METRICS)
    aris = pd.concat([ep, pca]).query("metric != 'compositional.K'")["value"]
    assert aris.between(-1, 1).all() and (ep["layer"] == 2).all()
    assert (ep.loc[setting(ep) == "toy", "model"] == "tiny-gemma2").all()  # store rows: the store's model
    assert score_compositional_claim(ep).status in ("reproduced", "not reproduced")
