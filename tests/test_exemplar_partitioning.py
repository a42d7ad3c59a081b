"""EP adapter against an independent oracle: a naive row-by-row leader clustering in numpy, written from the spec.

The oracle walks every row in stream order with the spec's batch semantics (exemplars existing at batch start,
then leaders created earlier in the batch); the implementation (chunked GEMM, blocked leader walk) must give the
same exemplars, ids, memberships and stopping point. Discovery runs in float64 here so that no decision sits on
a float32 rounding boundary.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bench.store import write_synthetic_store
from methods.base import load_artefact
from methods.exemplar_partitioning import (
    Calibration,
    EPArtefact,
    EPConfig,
    ExemplarPartitioning,
    exact_pair_percentiles,
)

EPS = 1e-12


# ---------------------------------------------------------------------------------------------------------
# Oracle


def unit_rows(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    xc = x - c
    return xc / (np.linalg.norm(xc, axis=1, keepdims=True) + EPS)


def oracle_build(batches: list[np.ndarray], n_tokens: list[int], theta: float, sat_window: int = 1,
                 token_budget: int | None = None) -> dict:
    """Naive leader clustering; batches are [n, d] centred unit rows in stream order."""
    E: list[np.ndarray] = []
    creators: list[tuple[int, int]] = []  # (batch, row) that created each region
    counts: list[int] = []
    created_per_batch: list[int] = []
    streak, tokens, stop = 0, 0, "stream ended"
    for bi, U in enumerate(batches):
        K_before = len(E)
        if not E:
            E.append(U[0]); creators.append((bi, 0)); counts.append(0)
        K0 = len(E)
        for i, u in enumerate(U):
            sims = np.array([e @ u for e in E[:K0]])
            j = int(np.argmax(sims))
            if min(max(1.0 - sims[j], 0.0), 2.0) <= theta:
                counts[j] += 1
                continue
            if len(E) > K0:
                s2 = np.array([e @ u for e in E[K0:]])
                j2 = int(np.argmax(s2))
                if min(max(1.0 - s2[j2], 0.0), 2.0) <= theta:
                    counts[K0 + j2] += 1
                    continue
            E.append(u); creators.append((bi, i)); counts.append(1)
        created = len(E) - K_before
        created_per_batch.append(created)
        tokens += n_tokens[bi]
        streak = 0 if created else streak + 1
        if streak >= sat_window:
            stop = "saturated"
            break
        if token_budget is not None and tokens >= token_budget:
            stop = "token budget"
            break
    return {"E": np.array(E), "creators": creators, "counts": np.array(counts), "created": created_per_batch,
            "tokens": tokens, "stop": stop}


def store_batches(x_CTD: torch.Tensor, batch_contexts: int) -> list[np.ndarray]:
    """The store's batch partition (consecutive contexts), as float64 rows of the stored float32 values."""
    x = x_CTD.float().double().numpy()
    return [x[i : i + batch_contexts].reshape(-1, x.shape[2]) for i in range(0, len(x), batch_contexts)]


def fixed_calibration(store, layer: int, center: np.ndarray, thetas: dict[float, float], bc: int) -> Calibration:
    prov = store.provenance(layer)
    return Calibration(center=torch.tensor(center, dtype=torch.float32), thetas=thetas, n_rows=0, n_batches=0,
                       estimator="fixed", store_id=prov["store_id"], model=prov["model"],
                       weights_sha256=prov["weights_sha256"], layer=layer, hook=prov["hook"], batch_contexts=bc,
                       shuffle_seed=None)


def run_oracle(art: EPArtefact, x_CTD: torch.Tensor, bc: int, **kw) -> dict:
    c = art.tensors["center"].double().numpy()
    bs = [unit_rows(b, c) for b in store_batches(x_CTD, bc)]
    T = x_CTD.shape[1]
    return oracle_build(bs, [len(b) + len(b) // T for b in bs], art.theta, **kw)


def assert_same_as_oracle(art: EPArtefact, orc: dict, T: int, bc: int, counts: bool = True) -> None:
    assert art.K == len(orc["E"])
    np.testing.assert_allclose(art.directions.numpy(), orc["E"], atol=1e-6)
    # creator of each region as (context, position): ids appended in creation order
    want = [(bi * bc + i // T, 1 + i % T) for bi, i in orc["creators"]]
    got = list(zip(art.tensors["exemplar_context"].tolist(), art.tensors["exemplar_position"].tolist()))
    assert got == want
    assert art.info["regions_created_per_batch"] == orc["created"]
    assert art.info["tokens_streamed"] == orc["tokens"]
    assert art.info["stop_reason"] == orc["stop"]
    if counts:
        np.testing.assert_array_equal(art.tensors["member_count"].numpy(), orc["counts"])


# ---------------------------------------------------------------------------------------------------------
# Streams


def random_stream(n_ctx=48, T=12, d=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_ctx, T, d, generator=g) + 2.0


def clustered_stream(n_ctx=64, T=12, d=24, n_clusters=10, noise=0.25, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Planted clusters: rows = centre[label] + noise, plus a common offset (so the centre matters)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 3.0
    labels = torch.randint(0, n_clusters, (n_ctx, T), generator=g)
    x = centres[labels] + noise * torch.randn(n_ctx, T, d, generator=g) + 4.0
    return x, labels


def fit(store, layer=0, **params) -> EPArtefact:
    params.setdefault("compute_dtype", "float64")
    params.setdefault("calib_estimator", "exact")
    params.setdefault("device", "cpu")
    return ExemplarPartitioning(**params).fit(store, layer)


# ---------------------------------------------------------------------------------------------------------
# Discovery vs oracle


@pytest.mark.parametrize("kind,p", [("random", 2.0), ("random", 10.0), ("clustered", 1.0), ("clustered", 4.0)])
def test_matches_oracle(tmp_path, kind, p):
    x = random_stream() if kind == "random" else clustered_stream()[0]
    store = write_synthetic_store(tmp_path, {0: x})
    bc = 4
    art = fit(store, percentiles=[p], batch_contexts=bc, n_calib=100, leader_block=16, chunk_rows=64)
    orc = run_oracle(art, x, bc)
    assert_same_as_oracle(art, orc, x.shape[1], bc)
    assert art.K > 3
    # every pair of exemplars is more than theta apart
    E = art.directions.double()
    D = 1 - E @ E.T
    iu = torch.triu_indices(len(E), len(E), 1)
    assert bool((D[iu[0], iu[1]] > art.theta).all())
    # stats are consistent with the memberships
    assert int(art.tensors["member_count"].sum()) == art.info["rows"]
    assert torch.allclose(art.mean_directions.norm(dim=1), torch.ones(art.K), atol=1e-5)
    assert bool(((art.tensors["coherence"] > 0) & (art.tensors["coherence"] <= 1 + 1e-6)).all())


def test_exemplars_invariant_to_batch_size(tmp_path):
    x, _ = clustered_stream(n_ctx=24, T=10, noise=0.6)
    store = write_synthetic_store(tmp_path, {0: x})
    center = x.reshape(-1, x.shape[2]).mean(0).numpy()
    arts = {}
    for bc in (1, 3, 8):
        cal = fixed_calibration(store, 0, center, {5.0: 0.05}, bc)
        m = ExemplarPartitioning(percentiles=[5.0], batch_contexts=bc, sat_window=10**6, compute_dtype="float64",
                                 device="cpu", leader_block=7)
        arts[bc] = m.fit(store, 0, calibration=cal)
        orc = run_oracle(arts[bc], x, bc, sat_window=10**6)
        assert_same_as_oracle(arts[bc], orc, x.shape[1], bc)
    ref = arts[1]
    assert ref.K > 20
    for bc in (3, 8):
        assert torch.equal(arts[bc].directions, ref.directions)
        assert torch.equal(arts[bc].tensors["exemplar_context"], ref.tensors["exemplar_context"])
        assert int(arts[bc].tensors["member_count"].sum()) == int(ref.tensors["member_count"].sum())
    # memberships do depend on batch size (rows compare only with exemplars existing at batch start)
    assert any(not torch.equal(arts[bc].tensors["member_count"], ref.tensors["member_count"]) for bc in (3, 8))


def _axis_store(tmp_path, rows_per_ctx: list[list[list[float]]]):
    x = torch.tensor(rows_per_ctx, dtype=torch.float32)
    return write_synthetic_store(tmp_path, {0: x}), x


def test_best_fit_not_first_fit(tmp_path):
    s = math.sqrt(3) / 2
    # context 0 creates e0 (angle 0) and e1 (angle 90 deg); row (angle 60 deg) is within theta of both:
    # first fit would take e0 (distance 0.5), best fit takes e1 (distance 1 - cos 30 = 0.134)
    store, _ = _axis_store(tmp_path, [[[1, 0], [0, 1]], [[0.5, s], [0, 1]]])
    cal = fixed_calibration(store, 0, np.zeros(2), {1.0: 0.6}, 1)
    art = ExemplarPartitioning(percentiles=[1.0], batch_contexts=1, sat_window=5, device="cpu").fit(
        store, 0, calibration=cal)
    assert art.K == 2
    assert art.tensors["member_count"].tolist() == [1, 3]
    closest = art.examples(1)
    assert {(e["context_id"], e["position"]) for e in closest} >= {(1, 1)}
    row = next(e for e in closest if e["context_id"] == 1 and e["position"] == 1)
    assert abs(row["distance"] - (1 - s)) < 1e-6


def test_inclusive_threshold_in_match_and_leader_walk(tmp_path):
    # Unit rows with entries 0, +-0.5, +-1 so every norm and dot product is exact in float32 (where the spec's
    # +1e-12 vanishes). a seeds region 0; b and c are orthogonal to a (distance 1 > theta = 0.5), so both are
    # unmatched; <b, c> = 0.5 exactly, so c sits at distance exactly theta from leader b and joins it. Context 1's
    # rows are exactly theta from b (and orthogonal to a): they join b in the match phase.
    h = 0.5
    a, b, c = [1, 0, 0, 0, 0], [0, h, h, h, h], [0, h, h, h, -h]
    ctx1 = [[0, h, h, -h, h], [0, h, -h, h, h], [0, -h, h, h, h]]
    store, _ = _axis_store(tmp_path, [[a, b, c], ctx1])
    for theta, K, counts in [(0.5, 2, [1, 5]), (0.49999, 6, None)]:
        cal = fixed_calibration(store, 0, np.zeros(5), {1.0: theta}, 1)
        art = ExemplarPartitioning(percentiles=[1.0], batch_contexts=1, sat_window=5, device="cpu").fit(
            store, 0, calibration=cal)
        assert art.K == K, theta
        if counts:
            assert art.tensors["member_count"].tolist() == counts


def test_saturation_stops_exactly(tmp_path):
    g = torch.Generator().manual_seed(3)
    d, T, bc = 8, 4, 2
    new = lambda n: torch.randn(n, T, d, generator=g)
    fresh = new(6)  # batches 0-2 create regions
    covered = fresh[torch.tensor([1, 4, 0, 5, 2, 3])]  # batches 3-5 repeat earlier rows: create nothing
    x = torch.cat([fresh, covered, new(2)])  # batch 6 creates again
    store = write_synthetic_store(tmp_path, {0: x})
    for sat, n_batches, stop in [(1, 4, "saturated"), (2, 5, "saturated"), (3, 6, "saturated"),
                                 (4, 7, "stream ended")]:
        cal = fixed_calibration(store, 0, np.zeros(d), {1.0: 0.3}, bc)
        art = ExemplarPartitioning(percentiles=[1.0], batch_contexts=bc, sat_window=sat, device="cpu",
                                   compute_dtype="float64").fit(store, 0, calibration=cal)
        assert art.info["batches"] == n_batches, sat
        assert art.info["stop_reason"] == stop
        assert art.info["saturated"] == (stop == "saturated")
        assert art.info["tokens_streamed"] == n_batches * bc * (T + 1)  # BOS included
        assert_same_as_oracle(art, run_oracle(art, x, bc, sat_window=sat), T, bc)


def test_token_budget_and_singletons(tmp_path):
    x = random_stream(n_ctx=20, T=6, d=32, seed=5)
    store = write_synthetic_store(tmp_path, {0: x})
    cal = fixed_calibration(store, 0, np.zeros(32), {1.0: 0.05}, 2)  # far below random-pair distances
    art = ExemplarPartitioning(percentiles=[1.0], batch_contexts=2, sat_window=3, token_budget=25, device="cpu",
                               compute_dtype="float64").fit(store, 0, calibration=cal)
    assert art.info["stop_reason"] == "token budget"
    assert art.info["tokens_streamed"] == 28 and art.info["batches"] == 2  # stops once >= 25 (14 per batch)
    assert art.K == art.info["rows"] == 24  # every row is its own region: singletons are kept
    assert art.info["singletons"] == 24 and bool((art.tensors["member_count"] == 1).all())
    assert_same_as_oracle(art, run_oracle(art, x, 2, sat_window=3, token_budget=25), 6, 2)


# ---------------------------------------------------------------------------------------------------------
# Calibration


def test_calibration_centre_and_exact_theta(tmp_path):
    x, _ = clustered_stream(n_ctx=40, T=10)
    store = write_synthetic_store(tmp_path, {2: x})
    bc, ps = 8, [1.0, 5.0, 30.0]
    for n_calib, n_batches in [(80, 1), (81, 2), (160, 2)]:
        m = ExemplarPartitioning(percentiles=ps, batch_contexts=bc, n_calib=n_calib, calib_estimator="exact",
                                 compute_dtype="float64", device="cpu")
        cal = m.calibrate(store, 2)[2]
        assert cal.n_batches == n_batches and cal.n_rows == n_batches * bc * 10
        batches = store_batches(x, bc)[:n_batches]
        rows = np.concatenate(batches)
        mdir = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(0)
        mdir /= np.linalg.norm(mdir)
        c = (rows.mean(0) @ mdir) * mdir
        np.testing.assert_allclose(cal.center.double().numpy(), c, rtol=1e-6, atol=1e-6)
        per_batch = []
        for b in batches:
            U = unit_rows(b, c)
            iu = np.triu_indices(len(U), 1)
            per_batch.append(np.percentile(np.clip(1 - (U @ U.T)[iu], 0, 2), ps))
        want = np.mean(per_batch, axis=0)
        np.testing.assert_allclose([cal.thetas[p] for p in ps], want, atol=1e-6)
    # float32 path agrees to float32 precision
    m32 = ExemplarPartitioning(percentiles=ps, batch_contexts=bc, n_calib=160, calib_estimator="exact", device="cpu")
    cal32 = m32.calibrate(store, 2)[2]
    np.testing.assert_allclose([cal32.thetas[p] for p in ps], want, atol=2e-5)


def test_exact_percentiles_function_matches_numpy():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(300, 12, generator=g, dtype=torch.float64), dim=1)
    ps = [0.5, 1, 10, 50, 99.9]
    got = exact_pair_percentiles(u, ps, chunk_elems=1000)  # many small upper-triangle blocks
    U = u.numpy()
    iu = np.triu_indices(300, 1)
    np.testing.assert_allclose(got, np.percentile(np.clip(1 - (U @ U.T)[iu], 0, 2), ps), atol=1e-12)


@pytest.mark.parametrize("block", [1, 16])
def test_sampled_theta_close_to_exact(tmp_path, block):
    x, _ = clustered_stream(n_ctx=64, T=12, noise=1.0, seed=4)
    store = write_synthetic_store(tmp_path, {0: x})
    ps = [2.0, 5.0]  # inside the within-cluster mass (10 clusters): not at the density gap near 10%
    common = dict(percentiles=ps, batch_contexts=32, n_calib=10**6, device="cpu")
    exact = ExemplarPartitioning(calib_estimator="exact", **common).calibrate(store, 0)[0]
    samp = ExemplarPartitioning(calib_estimator="sampled", calib_pairs=40_000, calib_block=block,
                                **common).calibrate(store, 0)[0]
    assert samp.estimator == "sampled" and samp.n_batches == 2
    torch.testing.assert_close(samp.center, exact.center)
    for p in ps:
        assert abs(samp.thetas[p] - exact.thetas[p]) < 0.02, (p, samp.thetas[p], exact.thetas[p])
    again = ExemplarPartitioning(calib_estimator="sampled", calib_pairs=40_000, calib_block=block,
                                 **common).calibrate(store, 0)[0]
    assert again.thetas == samp.thetas  # seeded


def test_K_falls_as_p_rises_and_fit_many_equals_separate_fits(tmp_path):
    x, _ = clustered_stream(n_ctx=48, T=10, noise=0.5, seed=2)
    x2 = torch.tanh(x) * 3 + 0.1 * x  # a second "layer" over the same rows
    store = write_synthetic_store(tmp_path, {1: x, 4: x2})
    ps = [1.0, 5.0, 20.0]
    common = dict(batch_contexts=4, n_calib=200, compute_dtype="float64", device="cpu", calib_estimator="exact")
    many = ExemplarPartitioning(percentiles=ps, **common).fit_many(store, [1, 4])
    assert set(many) == {(L, p) for L in (1, 4) for p in ps}
    for L in (1, 4):
        Ks = [many[(L, p)].K for p in ps]
        assert Ks[0] > Ks[1] > Ks[2], Ks
        for p in ps:
            one = ExemplarPartitioning(percentiles=[p], **common).fit(store, L)
            a = many[(L, p)]
            assert a.theta == one.theta and a.K == one.K
            for k in one.tensors:
                assert torch.equal(a.tensors[k], one.tensors[k]), (L, p, k)
            for k in ("tokens_streamed", "rows", "batches", "stop_reason", "regions_created_per_batch"):
                assert a.info[k] == one.info[k]
            assert a.info["label"] == f"ep:p={p:g}" and a.info["layer"] == L


# ---------------------------------------------------------------------------------------------------------
# Readouts, assign, interventions


def tiny_artefact() -> EPArtefact:
    """d = 2, centre (1, 0), exemplars e0 = (1, 0), e1 = (0, 1); mean directions (0.6, 0.8), (0, 1)."""
    tensors = {
        "center": torch.tensor([1.0, 0.0]),
        "exemplar_directions": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "mean_directions": torch.tensor([[0.6, 0.8], [0.0, 1.0]]),
        "member_count": torch.tensor([3, 1]),
        "coherence": torch.tensor([0.9, 1.0]),
        "dist_sum": torch.tensor([0.3, 0.0], dtype=torch.float64),
        "dist_sqsum": torch.tensor([0.05, 0.0], dtype=torch.float64),
    }
    return EPArtefact(EPConfig(percentiles=[1.0]), tensors, {"label": "ep:tiny", "theta": 0.1, "p": 1.0})


def test_readouts_on_hand_computed_example():
    a = tiny_artefact()
    x = torch.tensor([[4.0, 4.0], [-2.0, 0.0]])  # x_c = (3, 4) (u = (0.6, 0.8)) and (-3, 0) (u = (-1, 0))
    close = lambda got, want: torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    close(a.encode(x, "cosine"), [[0.6, 0.8], [-1.0, 0.0]])
    close(a.encode(x), [[0.6, 0.8], [-1.0, 0.0]])  # cosine is the default readout
    close(a.encode(x, "signed"), [[3.0, 4.0], [-3.0, 0.0]])
    close(a.encode(x, "topk", k=1), [[0.0, 4.0], [0.0, 0.0]])  # ReLU: row 2's best is 0
    close(a.encode(x, "topk", k=2), [[3.0, 4.0], [0.0, 0.0]])
    close(a.encode(x, "binary"), [[0.0, 1.0], [0.0, 1.0]])
    close(a.encode(x, "cosine", basis="mean"), [[1.0, 0.8], [-0.6, 0.0]])
    close(a.encode(x, "binary", basis="mean"), [[1.0, 0.0], [0.0, 1.0]])
    close(a.decode(a.encode(x, "topk", k=2)), [[4.0, 4.0], [1.0, 0.0]])
    close(a.decode(a.encode(x, "signed")), [[4.0, 4.0], [-2.0, 0.0]])  # orthonormal basis: exact
    asg = a.assign(x)
    assert asg.index.tolist() == [1, 1]
    close(asg.score, [0.2, 1.0])  # both beyond theta = 0.1: assign never thresholds
    close(a.ablate(x[:1], [1]), [[4.0, 0.0]])
    close(a.steer(x[:1], 0, 2.0), [[6.0, 4.0]])
    stats = a.region_stats()
    torch.testing.assert_close(stats["dist_mean"], torch.tensor([0.1, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown readout"):
        a.encode(x, "dense")
    with pytest.raises(ValueError, match="expected activations"):
        a.encode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN/inf"):
        a.assign(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))


def test_assign_is_chunked_nearest_without_threshold(tmp_path):
    x, _ = clustered_stream(n_ctx=32, T=10, seed=7)
    store = write_synthetic_store(tmp_path, {0: x})
    art = fit(store, percentiles=[2.0], batch_contexts=4, n_calib=100, chunk_rows=7)  # 7-row chunks
    g = torch.Generator().manual_seed(8)
    q = torch.cat([x[0], torch.randn(20, x.shape[2], generator=g) * 10])  # in-distribution and far away
    asg = art.assign(q)
    u = torch.nn.functional.normalize(q.double() - art.center.double(), dim=1)
    sims = u @ art.directions.double().T
    assert asg.index.tolist() == sims.argmax(1).tolist()
    torch.testing.assert_close(asg.score.double(), 1 - sims.max(1).values, atol=1e-5, rtol=0)
    assert bool((asg.score[10:] > art.theta).any())  # far rows keep their nearest region, beyond theta


def test_save_load_round_trip_and_calibration_reuse(tmp_path):
    x, _ = clustered_stream(n_ctx=32, T=10, seed=9)
    store = write_synthetic_store(tmp_path / "s", {0: x})
    art = ExemplarPartitioning(percentiles=[4.0], batch_contexts=4, n_calib=100, calib_pairs=300, device="cpu",
                               n_examples=3).fit(store, 0)
    assert art.info["calibration"]["estimator"] == "sampled"
    loaded = load_artefact(art.save(tmp_path / "a"))
    assert isinstance(loaded, EPArtefact) and loaded.K == art.K and loaded.info == art.info
    q = x[3]
    for readout in EPArtefact.readouts:
        assert torch.equal(loaded.encode(q, readout), art.encode(q, readout))
    assert torch.equal(loaded.assign(q).index, art.assign(q).index)
    for k, v in art.tensors.items():
        assert torch.equal(loaded.tensors[k], v), k
    # a saved calibration gives the same dictionary
    cal = Calibration.load(art.calibration.save(tmp_path / "cal"))
    again = ExemplarPartitioning(percentiles=[4.0], batch_contexts=4, n_calib=100, device="cpu",
                                 n_examples=3).fit(store, 0, calibration=cal)
    assert torch.equal(again.directions, art.directions) and again.info["calibration"]["reused"]
    assert again.cost.flops < art.cost.flops
    # examples carry stored context tokens and decoded text through a backend's tokenizer
    ex = art.examples(0, store, backend=type("B", (), {"tokenizer": _FakeTok()})())
    assert ex[0]["kind"] == "closest" and ex[0]["text"].startswith("<") and "token" in ex[0]
    assert len([e for e in ex if e["kind"] == "closest"]) <= 3


class _FakeTok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_errors(tmp_path):
    x, _ = clustered_stream(n_ctx=16, T=8, seed=11)
    store = write_synthetic_store(tmp_path / "a", {0: x, 1: x * 2})
    for bad in ([0.0], [100.0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match=r"outside \(0, 100\)"):
            ExemplarPartitioning(percentiles=bad)
    with pytest.raises(ValueError, match="unknown parameter"):
        ExemplarPartitioning(percentile=2)
    with pytest.raises(NotImplementedError, match="merge_close"):
        ExemplarPartitioning(merge_close=True)
    with pytest.raises(ValueError, match="token_budget"):
        ExemplarPartitioning(token_budget=0)
    # NaN rows are named by batch, row, context and position
    xn = x.clone()
    xn[5, 2, 3] = float("nan")
    bad_store = write_synthetic_store(tmp_path / "nan", {0: xn})
    with pytest.raises(ValueError, match=r"batch 1 row 10 \(context 5, position 3\).*NaN/inf"):
        fit(bad_store, batch_contexts=4, n_calib=10)
    xi = x.clone()
    xi[15, 0, 0] = float("inf")  # beyond the calibration prefix: caught during discovery
    with pytest.raises(ValueError, match=r"discovery: layer 0 batch 3 row 24 \(context 15, position 1\)"):
        fit(write_synthetic_store(tmp_path / "inf", {0: xi}), batch_contexts=4, n_calib=10, sat_window=100)
    # empty store
    empty = write_synthetic_store(tmp_path / "empty", {0: torch.zeros(0, 8, 24)})
    with pytest.raises(ValueError, match="no activation rows"):
        fit(empty)
    # a calibration from another layer, store or geometry
    cal0 = ExemplarPartitioning(percentiles=[2.0], batch_contexts=4, n_calib=10).calibrate(store, 0)[0]
    with pytest.raises(ValueError, match=r"calibration was computed on store .* layer 0.*recalibrate or pass"):
        ExemplarPartitioning(percentiles=[2.0], batch_contexts=4).fit(store, 1, calibration=cal0)
    other = write_synthetic_store(tmp_path / "b", {0: x + 1})
    with pytest.raises(ValueError, match="recalibrate or pass the matching store"):
        ExemplarPartitioning(percentiles=[2.0], batch_contexts=4).fit(other, 0, calibration=cal0)
    with pytest.raises(ValueError, match="batch_contexts=4"):
        ExemplarPartitioning(percentiles=[2.0], batch_contexts=8).fit(store, 0, calibration=cal0)
    with pytest.raises(ValueError, match="recalibrate with percentiles including 3.0"):
        ExemplarPartitioning(percentiles=[3.0], batch_contexts=4).fit(store, 0, calibration=cal0)
    with pytest.raises(ValueError, match="layer 7 is not in store"):
        ExemplarPartitioning().fit(store, 7)
    art = fit(store, percentiles=[2.0], batch_contexts=4, n_calib=10)
    with pytest.raises(ValueError, match=r"expected activations \[N, 24\]"):
        art.assign(torch.zeros(3, 25))
    with pytest.raises(ValueError, match="topk needs"):
        art.encode(x[0], "topk", k=0)
    assert dataclasses.asdict(art.config)["percentiles"] == [2.0]


def test_theta_zero_with_rounding_keeps_the_seed_in_its_own_region(tmp_path):
    # theta = 0 (identical rows at a fine percentile) and a row whose float32 self-distance rounds to 1.2e-7 > 0:
    # the seed row still belongs to region 0 (it used to start a duplicate region and leave region 0 empty)
    v, w = [1.0, 2.0, 3.0], [3.0, 1.0, 7.0]
    store, _ = _axis_store(tmp_path, [[v, v, w], [v, w, w]])
    cal = fixed_calibration(store, 0, np.zeros(3), {1.0: 0.0}, 1)
    art = ExemplarPartitioning(percentiles=[1.0], batch_contexts=1, sat_window=5, device="cpu").fit(
        store, 0, calibration=cal)
    assert art.tensors["member_count"].min() >= 1
    assert art.tensors["member_count"].sum() == 6
