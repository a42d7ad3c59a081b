"""Baselines and controls (k-means, PCA, random, DiffMean) against independent oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SkPCA
from sklearn.metrics import adjusted_rand_score

from bench.store import write_synthetic_store
from methods.base import load_artefact
from methods.diffmean import DiffMean, DiffMeanArtefact
from methods.common import spherical_center
from methods.kmeans import KMeans, KMeansArtefact
from methods.pca import PCA
from methods.random_directions import RandomDirections

LAYER = 3
D = 16


def _store(tmp_path, acts_NTD: torch.Tensor, name: str = "store", **kw):
    return write_synthetic_store(tmp_path / name, {LAYER: acts_NTD}, **kw)


def planted_clusters(n_ctx: int = 40, T: int = 10, k: int = 5, seed: int = 0):
    """Rows = offset + 3 * (one of k orthonormal directions + small noise): well separated on the centred sphere."""
    g = torch.Generator().manual_seed(seed)
    basis_KD = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:, :k].T
    offset_D = 4.0 * torch.randn(D, generator=g)
    labels = torch.randint(0, k, (n_ctx * T,), generator=g)
    x = offset_D + 3.0 * (basis_KD[labels] + 0.03 * torch.randn(n_ctx * T, D, generator=g))
    return x.reshape(n_ctx, T, D), labels.numpy()


def np_spherical_center(x: np.ndarray) -> np.ndarray:
    """Hand computation of EP's centre in float64 numpy."""
    m = (x / np.linalg.norm(x, axis=1, keepdims=True)).mean(0)
    m /= np.linalg.norm(m)
    return float(x.mean(0) @ m) * m


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    acts, labels = planted_clusters()
    store = write_synthetic_store(tmp_path_factory.mktemp("km") / "s", {LAYER: acts}, shard_contexts=16)
    return store, acts.reshape(-1, D), labels


# ---------------------------------------------------------------------------------------------------------
# k-means


def test_spherical_center_matches_numpy():
    x = torch.randn(300, D, dtype=torch.float64) + 2.0
    np.testing.assert_allclose(spherical_center(x).numpy(), np_spherical_center(x.numpy()), rtol=1e-5, atol=1e-6)


def test_kmeans_center_uses_first_n_calib_rows_in_whole_batches(clustered):
    store, x, _ = clustered
    # 10 rows per context, 4 contexts per batch: n_calib=50 reads two whole batches = 80 rows (EP's overshoot).
    art = KMeans(k=5, n_rows=200, n_calib=50, batch_contexts=4, niter=5).fit(store, LAYER)
    np.testing.assert_allclose(art.center.numpy(), np_spherical_center(x[:80].double().numpy()), rtol=1e-5,
                               atol=1e-5)
    assert art.info["n_calib_rows"] == 80
    assert art.cost.rows == 200 and art.cost.tokens == 200 + 20  # 20 contexts, one BOS each


def test_kmeans_recovers_planted_clusters(clustered):
    store, x, labels = clustered
    art = KMeans(k=5, n_rows=10_000, n_calib=10_000, niter=20, nredo=5, seed=0).fit(store, LAYER)
    assert isinstance(art, KMeansArtefact) and art.K == 5 and art.d_model == D
    torch.testing.assert_close(art.directions.norm(dim=1), torch.ones(5))
    a = art.assign(x)
    assert adjusted_rand_score(labels, a.index.numpy()) == 1.0
    # Oracle centres: the normalised mean of each planted cluster's centred unit rows.
    u = (x - art.center) / (x - art.center).norm(dim=1, keepdim=True)
    for j in range(5):
        planted = u[torch.from_numpy(labels == j)].mean(0)
        sims = art.directions @ (planted / planted.norm())
        assert float(sims.max()) > 0.99
    assert ((a.score >= 0) & (a.score <= 2)).all()
    iters = art.info["total_iterations"]  # every Lloyd iteration run, the restarts' objectives, the final pass
    assert art.cost.flops == 2.0 * 400 * 5 * D * (iters + 5 + 1) and art.cost.rows == 400
    assert art.cost.wall_seconds > 0 and int(art.tensors["counts"].sum()) == 400


def _np_objective(x: torch.Tensor, art: KMeansArtefact) -> float:
    """Spherical k-means objective by hand (float64 numpy): sum of each centred unit row's best cosine."""
    xc = x.double().numpy() - art.center.double().numpy()
    u = xc / np.linalg.norm(xc, axis=1, keepdims=True)
    return float((u @ art.directions.double().numpy().T).max(axis=1).sum())


def test_kmeans_runs_to_convergence_and_reports_its_objective(clustered):
    store, x, _ = clustered
    art = KMeans(k=5, n_rows=400, niter=100, tol=1e-6, nredo=2).fit(store, LAYER)
    info = art.info
    assert info["converged"] is True and info["stop_reason"].startswith("converged")
    assert 2 <= info["iterations"] < 100 and info["total_iterations"] >= info["iterations"]
    assert len(info["objective_curve"]) == info["iterations"]
    np.testing.assert_allclose(info["objective"], _np_objective(x[:400], art), rtol=1e-6)
    # Lloyd iterations never lower the spherical objective; the last change is below tol.
    curve = np.array(info["objective_curve"])
    assert (np.diff(curve) >= -1e-3).all() and abs(curve[-1] - curve[-2]) / abs(curve[-2]) < 1e-6
    assert info["objective"] >= curve[-1] - 1e-3
    assert "relative objective change < 1e-06" in info["stopping_rule"]


def test_kmeans_cap_is_reported(clustered):
    store, x, _ = clustered
    art = KMeans(k=5, n_rows=400, niter=3, tol=0).fit(store, LAYER)
    assert art.info["iterations"] == 3 and art.info["converged"] is False
    assert art.info["stop_reason"].startswith("cap: niter=3")
    np.testing.assert_allclose(art.info["objective"], _np_objective(x[:400], art), rtol=1e-6)
    with pytest.raises(ValueError, match="tol >= 0"):
        KMeans(k=5, tol=-1).fit(store, LAYER)


def test_kmeans_readouts_and_decode(clustered):
    store, x, _ = clustered
    art = KMeans(k=5, n_rows=400, niter=10, topk=2).fit(store, LAYER)
    xc = x - art.center
    cos = (xc / xc.norm(dim=1, keepdim=True)) @ art.directions.T
    torch.testing.assert_close(art.encode(x, "cosine"), cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(art.encode(x, "signed"), xc @ art.directions.T, rtol=1e-4, atol=1e-4)
    binary = art.encode(x, "binary")
    assert torch.equal(binary.sum(1), torch.ones(len(x))) and torch.equal(binary.argmax(1), cos.argmax(1))
    top = art.encode(x, "topk")
    assert ((top > 0).sum(1) <= 2).all() and torch.equal(top.argmax(1), cos.argmax(1))
    assert ((art.encode(x, "topk", k=1) > 0).sum(1) <= 1).all()
    torch.testing.assert_close(art.decode(art.encode(x, "signed")), art.encode(x, "signed") @ art.directions
                               + art.center)
    with pytest.raises(ValueError, match="unknown readout"):
        art.encode(x, "bogus")


def test_kmeans_fit_many_and_sweep_guard(clustered):
    store, _, _ = clustered
    arts = KMeans(k=[2, 5], n_rows=400, niter=5).fit_many(store, LAYER)
    assert [a.K for a in arts] == [2, 5] and [a.name for a in arts] == ["kmeans:k=2", "kmeans:k=5"]
    assert torch.equal(arts[0].center, arts[1].center)
    with pytest.raises(ValueError, match="fit_many"):
        KMeans(k=[2, 5]).fit(store, LAYER)


def test_kmeans_deterministic(clustered):
    store, _, _ = clustered
    a, b = (KMeans(k=5, n_rows=400, niter=5, seed=3).fit(store, LAYER) for _ in range(2))
    assert torch.equal(a.directions, b.directions)


def test_kmeans_shuffled_stream_feeds_centre_and_rows(clustered):
    store, _, _ = clustered
    art = KMeans(k=5, n_rows=100, n_calib=40, batch_contexts=4, shuffle_seed=1, niter=5).fit(store, LAYER)
    first = next(store.batches(LAYER, batch_contexts=4, shuffle_seed=1)).acts  # EP calibrates on the same order
    np.testing.assert_allclose(art.center.numpy(), np_spherical_center(first.double().numpy()), rtol=1e-5,
                               atol=1e-5)
    assert art.info["n_train_rows"] == 100 and art.info["n_calib_rows"] == 40 and art.cost.rows == 100


def test_kmeans_centre_equals_ep_calibration_centre(clustered):
    ep = pytest.importorskip("methods.exemplar_partitioning")
    store, _, _ = clustered
    cfg = ep.EPConfig(percentiles=[10.0], n_calib=50, batch_contexts=4, calib_pairs=100, device="cpu")
    ep_center = ep.calibrate(store, [LAYER], cfg)[LAYER].center
    art = KMeans(k=5, n_rows=100, n_calib=50, batch_contexts=4, niter=5).fit(store, LAYER)
    torch.testing.assert_close(art.center, ep_center, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# PCA


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    scales = torch.linspace(3.0, 0.2, D)
    x = (torch.randn(30 * 12, D, generator=g) * scales) @ torch.linalg.qr(torch.randn(D, D, generator=g))[0] + 5.0
    store = write_synthetic_store(tmp_path_factory.mktemp("pca") / "s", {LAYER: x.reshape(30, 12, D)},
                                  shard_contexts=8)
    return store, x


def test_pca_matches_sklearn(gaussian):
    store, x = gaussian
    art = PCA(k=6, n_rows=None, batch_contexts=7).fit(store, LAYER)
    sk = SkPCA(n_components=6, svd_solver="full").fit(x.double().numpy())
    comps = art.directions.double().numpy()
    sign = np.sign((comps * sk.components_).sum(1))
    np.testing.assert_allclose(comps * sign[:, None], sk.components_, atol=1e-5)
    np.testing.assert_allclose(art.explained_variance.numpy(), sk.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(art.info["explained_variance_ratio"], sk.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(art.center.numpy(), sk.mean_, rtol=1e-6)
    np.testing.assert_allclose(art.encode(x).double().numpy() * sign, sk.transform(x.double().numpy()),
                               atol=1e-4)
    assert art.cost.rows == 360 and art.cost.tokens == 360 + 30


def test_pca_full_rank_reconstructs(gaussian):
    store, x = gaussian
    art = PCA(k=D, n_rows=None).fit(store, LAYER)
    torch.testing.assert_close(art.decode(art.encode(x)), x, rtol=1e-4, atol=1e-4)
    assert art.info["explained_variance_ratio_total"] == pytest.approx(1.0, abs=1e-9)


def test_pca_is_exact_on_ill_conditioned_offset_data(tmp_path):
    """A large common offset and variances spanning 8 decades, streamed in many batches: the components and
    variances match numpy's SVD of the centred float64 rows, and the rank-k error is the discarded variance."""
    g = np.random.default_rng(3)
    n_ctx, T = 37, 11
    scales = np.logspace(2, -2, D)
    q = np.linalg.qr(g.standard_normal((D, D)))[0]
    x = (g.standard_normal((n_ctx * T, D)) * scales) @ q + 1e3
    x = x.astype(np.float32)
    store = write_synthetic_store(tmp_path / "ill", {LAYER: torch.from_numpy(x).reshape(n_ctx, T, D)},
                                  shard_contexts=5)
    k = 5
    art = PCA(k=k, n_rows=None, batch_contexts=3).fit(store, LAYER)
    xd = x.astype(np.float64)
    xc = xd - xd.mean(0)
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    var = sv**2 / (len(x) - 1)
    np.testing.assert_allclose(art.explained_variance.numpy(), var[:k], rtol=1e-6)
    comps = art.directions.double().numpy()
    np.testing.assert_allclose(np.abs((comps * vt[:k]).sum(1)), np.ones(k), atol=1e-6)
    np.testing.assert_allclose(art.info["total_variance"], var.sum(), rtol=1e-9)
    # Eckart-Young: projecting onto the top k leaves exactly the variance of the other components.
    resid = xc - (xc @ comps.T) @ comps
    np.testing.assert_allclose((resid**2).sum() / (len(x) - 1), var[k:].sum(), rtol=1e-5)
    assert art.info["solver"].startswith("exact")


def test_pca_n_rows_and_k_guard(gaussian):
    store, x = gaussian
    art = PCA(k=3, n_rows=100).fit(store, LAYER)
    np.testing.assert_allclose(art.center.numpy(), x[:100].double().mean(0).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="exceeds min"):
        PCA(k=D + 1).fit(store, LAYER)
    with pytest.raises(ValueError, match="exceeds min"):
        PCA(k=5, n_rows=4).fit(store, LAYER)


# ---------------------------------------------------------------------------------------------------------
# random directions


def test_random_unit_seeded_and_centred(gaussian):
    store, x = gaussian
    a = RandomDirections(k=50, seed=7).fit(store, LAYER)
    b = RandomDirections(k=50, seed=7).fit(store, LAYER)
    c = RandomDirections(k=50, seed=8).fit(store, LAYER)
    torch.testing.assert_close(a.directions.norm(dim=1), torch.ones(50))
    assert torch.equal(a.directions, b.directions) and not torch.equal(a.directions, c.directions)
    torch.testing.assert_close(a.center, x.double().mean(0).float())
    torch.testing.assert_close(a.encode(x), (x - a.center) @ a.directions.T)
    assert a.K == 50 and a.name == "random:k=50"


def test_random_draws_differ_per_layer_so_the_stability_control_is_chance(tmp_path):
    from bench.store import write_synthetic_store

    g = torch.Generator().manual_seed(0)
    store = write_synthetic_store(tmp_path, {1: torch.randn(4, 5, 16, generator=g), 2: torch.randn(4, 5, 16, generator=g)})
    l1, l2 = (RandomDirections(k=8, seed=0).fit(store, L) for L in (1, 2))
    assert not torch.equal(l1.directions, l2.directions)
    assert torch.equal(l1.directions, RandomDirections(k=8, seed=0).fit(store, 1).directions)


# ---------------------------------------------------------------------------------------------------------
# DiffMean


def test_diffmean_matches_numpy(gaussian):
    store, _ = gaussian
    g = torch.Generator().manual_seed(5)
    concepts = {name: (torch.randn(20, D, generator=g) + i, torch.randn(30, D, generator=g)) for i, name in
                enumerate(["cat", "dog", "sea"], start=1)}
    art = DiffMean().fit(store, LAYER, concepts)
    assert DiffMean.supervised and art.supervised and isinstance(art, DiffMeanArtefact)
    assert art.concepts == ["cat", "dog", "sea"]
    for i, (pos, neg) in enumerate(concepts.values()):
        diff = pos.double().numpy().mean(0) - neg.double().numpy().mean(0)
        np.testing.assert_allclose(art.directions[i].numpy(), diff / np.linalg.norm(diff), rtol=1e-5, atol=1e-6)
    x = torch.randn(4, D, generator=g)
    torch.testing.assert_close(art.encode(x), x @ art.directions.T)
    assert art.cost.rows == 150


def test_diffmean_errors(gaussian):
    store, _ = gaussian
    with pytest.raises(ValueError, match="diffmean is supervised: pass concept activations"):
        DiffMean().fit(store, LAYER)
    with pytest.raises(ValueError, match="d=5, expected 16"):
        DiffMean().fit(store, LAYER, {"a": (torch.randn(3, 5), torch.randn(3, 5))})
    with pytest.raises(ValueError, match="no negative rows"):
        DiffMean().fit(store, LAYER, {"a": (torch.randn(3, D), torch.zeros(0, D))})
    bad = torch.randn(3, D)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        DiffMean().fit(store, LAYER, {"a": (bad, torch.randn(3, D))})


# ---------------------------------------------------------------------------------------------------------
# shared: persistence and bad input


def _fit_all(store, concepts):
    return [
        KMeans(k=[3], n_rows=200, niter=5).fit(store, LAYER),
        PCA(k=4).fit(store, LAYER),
        RandomDirections(k=8).fit(store, LAYER),
        DiffMean().fit(store, LAYER, concepts),
    ]


def test_save_load_round_trip_exact(gaussian, tmp_path):
    store, x = gaussian
    concepts = {"c": (x[:10] + 1, x[10:30])}
    for art in _fit_all(store, concepts):
        loaded = load_artefact(art.save(tmp_path / art.method))
        assert type(loaded) is type(art) and loaded.config == art.config
        assert loaded.info == json.loads(json.dumps(art.info)) == art.info
        assert set(loaded.tensors) == set(art.tensors)
        for k, v in art.tensors.items():
            assert torch.equal(loaded.tensors[k], v), (art.method, k)
        assert torch.equal(loaded.encode(x), art.encode(x))
        info = loaded.info
        assert info["store_id"] == store.id and info["layer"] == LAYER and info["hook"] == store.hook_name(LAYER)
        assert info["label"] == art.name and "torch" in info["versions"]
        assert loaded.cost.rows > 0 and loaded.cost.wall_seconds > 0


def test_bad_input_errors(gaussian, tmp_path):
    store, x = gaussian
    for art in _fit_all(store, {"c": (x[:10] + 1, x[10:30])}):
        with pytest.raises(ValueError, match=r"expected activations \[N, 16\]"):
            art.encode(torch.randn(3, D + 1))
        bad = x[:4].clone()
        bad[2, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN/inf"):
            art.encode(bad)
    with pytest.raises(ValueError, match="exceeds the 50 rows"):
        KMeans(k=60, n_rows=50).fit(store, LAYER)
    with pytest.raises(ValueError, match="layer 9 is not in store"):
        PCA(k=2).fit(store, 9)
    with pytest.raises(ValueError, match="unknown parameter"):
        KMeans(kk=3)


def test_nan_rows_in_store_are_refused(tmp_path):
    acts = torch.randn(4, 5, D)
    acts[2, 1, 3] = float("nan")
    store = _store(tmp_path, acts)
    for method in (KMeans(k=2, n_rows=100), PCA(k=2), RandomDirections(k=2)):
        with pytest.raises(ValueError, match="1 activation row"):
            method.fit(store, LAYER)


class _EmptyStore:
    """Reads like a store whose layer holds no rows."""

    id, d_model = "empty", D

    def check_layer(self, layer: int) -> None:
        pass

    def batches(self, *a, **kw):
        return iter(())

    def provenance(self, layer=None):
        return {"store_id": self.id}


def test_empty_store_is_refused():
    for method in (KMeans(k=2), PCA(k=2), RandomDirections(k=2)):
        with pytest.raises(ValueError, match="no rows at layer"):
            method.fit(_EmptyStore(), LAYER)
