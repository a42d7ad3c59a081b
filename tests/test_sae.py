"""SAE adapter: Gemma Scope loading through sae-lens' unmodified loader, training with sae-lens' trainer on a
store with planted sparse directions, encode equality with sae-lens, save/load, and error cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.store import write_synthetic_store
from methods.base import load_artefact
from methods.sae import (
    CURVE_COLUMNS, SAEArtefact, SAEConfig, SAEMethod, _pool_batches, _split, eval_flops, training_flops,
)

RELEASE = "gemma-scope-2b-pt-res-canonical"
REPO = "google/gemma-scope-2b-pt-res"
D_GS, W_GS = 64, 128  # tiny-gemma2's d_model; a small width so the test file is a few hundred kB


# ---------------------------------------------------------------------------------------------------------
# Gemma Scope, offline


def _release_entry():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()[RELEASE]


@pytest.fixture
def gemma_scope_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Hugging Face cache holding Gemma Scope-format params.npz files, as `hf download` would lay them out.

    sae-lens' own `gemma_2` loader then reads them through `hf_hub_download` offline. The one thing changed in
    sae-lens is data, not code: that loader hard-codes gemma-2-2b's d_in (2304) and the width named by the folder
    (16k), so the release's `config_overrides` (sae-lens' mechanism for per-release fixes) set d_in 64, d_sae 128.
    """
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(_release_entry(), "config_overrides", {"d_in": D_GS, "d_sae": W_GS})

    def write(layer: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        params = {
            "W_enc": (0.2 * rng.standard_normal((D_GS, W_GS))).astype(np.float32),
            "W_dec": (0.2 * rng.standard_normal((W_GS, D_GS))).astype(np.float32),
            "b_enc": (0.1 * rng.standard_normal(W_GS)).astype(np.float32),
            "b_dec": (0.1 * rng.standard_normal(D_GS)).astype(np.float32),
            "threshold": rng.uniform(0.0, 1.0, W_GS).astype(np.float32),
        }
        folder = _release_entry().saes_map[f"layer_{layer}/width_16k/canonical"]
        target = repo_dir / "snapshots" / commit / folder
        target.mkdir(parents=True, exist_ok=True)
        np.savez(target / "params.npz", **params)
        return params

    return write


def _gs_store(path: Path, layer: int = 12, d: int = D_GS, model: str = "gemma-2-2b"):
    acts = torch.randn(4, 16, d, generator=torch.Generator().manual_seed(1))
    return write_synthetic_store(path, {layer: acts}, model=model)


def test_gemma_scope_loads_through_sae_lens_offline(tmp_path: Path, gemma_scope_cache) -> None:
    params = gemma_scope_cache(12)
    store = _gs_store(tmp_path / "store")
    art = SAEMethod(release=RELEASE).fit(store, 12)

    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(art.tensors[name], torch.from_numpy(params[name])), name
    assert art.architecture == "jumprelu" and art.K == W_GS and art.d_model == D_GS
    assert art.info["sae_hook_name"] == "blocks.12.hook_resid_post"
    assert art.info["sae_model_name"] == "gemma-2-2b"
    assert art.info["sae_id"] == "layer_12/width_16k/canonical"
    assert art.info["folder"] == _release_entry().saes_map["layer_12/width_16k/canonical"]
    assert art.info["published_training_tokens"] == 4e9
    assert "published" in art.info["published_training_tokens_source"]
    assert art.cost.rows == 0 and art.cost.tokens == 0

    # JumpReLU by hand (numpy): Gemma Scope does not subtract b_dec from the input.
    x = store.all_rows(12).acts
    pre = x.numpy().astype(np.float64) @ params["W_enc"] + params["b_enc"]
    hand = np.where(pre > params["threshold"], np.maximum(pre, 0), 0.0)
    np.testing.assert_allclose(art.encode(x, readout="pre").numpy(), pre, atol=1e-5)
    f = art.encode(x)
    assert (f > 0).any() and (f == 0).any()
    np.testing.assert_allclose(f.numpy(), hand, atol=1e-5)
    np.testing.assert_allclose(art.decode(f).numpy(), hand @ params["W_dec"] + params["b_dec"], atol=1e-4)

    # ... and sae-lens' own encode on its own loaded module.
    from sae_lens import SAE

    sae = SAE.from_pretrained(RELEASE, "layer_12/width_16k/canonical")
    with torch.no_grad():
        torch.testing.assert_close(art.encode(x), sae.encode(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(art.decode(f), sae.decode(f), rtol=0, atol=1e-6)

    back = load_artefact(art.save(tmp_path / "gs-art"))
    assert back.info == art.info and torch.equal(back.encode(x), art.encode(x))

    # Unit directions and assignment.
    torch.testing.assert_close(art.directions.norm(dim=1), torch.ones(W_GS))
    a = art.assign(x)
    torch.testing.assert_close(a.score, f.max(dim=1).values)


def test_gemma_scope_mismatches_are_refused(tmp_path: Path, gemma_scope_cache) -> None:
    gemma_scope_cache(12)
    gemma_scope_cache(13)
    store = _gs_store(tmp_path / "s12")
    with pytest.raises(ValueError, match="hook 'blocks.13.hook_resid_post'.*'blocks.12.hook_resid_post'"):
        SAEMethod(release=RELEASE, sae_id="layer_13/width_16k/canonical").fit(store, 12)
    with pytest.raises(ValueError, match="d_in 64 but store .* d_model 32"):
        SAEMethod(release=RELEASE).fit(_gs_store(tmp_path / "d32", d=32), 12)
    # Another model: refused before anything is read from the hub.
    with pytest.raises(ValueError, match="trained on model 'gemma-2-2b'.*allow_model_mismatch"):
        SAEMethod(release=RELEASE).fit(_gs_store(tmp_path / "smol", model="smollm2-135m"), 12)
    it_store = _gs_store(tmp_path / "it", model="gemma-2-2b-it")
    with pytest.raises(ValueError, match="allow_model_mismatch"):
        SAEMethod(release=RELEASE).fit(it_store, 12)
    art = SAEMethod(release=RELEASE, allow_model_mismatch=True).fit(it_store, 12)
    assert art.info["model_mismatch"] is True and art.info["model"] == "gemma-2-2b-it"


def test_unknown_pretrained_ids_list_what_exists(tmp_path: Path) -> None:
    store = _gs_store(tmp_path / "s")
    with pytest.raises(ValueError, match="width_65k/canonical"):
        SAEMethod(release=RELEASE, sae_id="layer_{layer}/width_3k/canonical").fit(store, 12)
    with pytest.raises(ValueError, match="unknown sae-lens release.*gemma-scope-2b-pt-res-canonical"):
        SAEMethod(release="gemma-scope-nope").fit(store, 12)


def test_missing_weights_offline_names_the_fix(tmp_path: Path, gemma_scope_cache) -> None:
    store = _gs_store(tmp_path / "s")  # the cache fixture is active but holds no file for layer 12
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        SAEMethod(release=RELEASE).fit(store, 12)


# ---------------------------------------------------------------------------------------------------------
# Training on a store with planted sparse directions


D, N_TRUE = 32, 16


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """Rows = 2 of 16 planted unit directions with magnitudes in [1, 3], plus small noise.

    At EV ~0.995 the SGD noise of held-out NMSE exceeds 1% between evaluations, so the fixture stops at 5%."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(N_TRUE, D, generator=g)
    true /= true.norm(dim=1, keepdim=True)
    n_ctx, T = 128, 64
    idx = torch.stack([torch.randperm(N_TRUE, generator=g)[:2] for _ in range(n_ctx * T)])
    mag = 1 + 2 * torch.rand(n_ctx * T, 2, generator=g)
    x = (mag[:, :, None] * true[idx]).sum(1) + 0.02 * torch.randn(n_ctx * T, D, generator=g)
    store = write_synthetic_store(tmp_path_factory.mktemp("planted"), {3: x.reshape(n_ctx, T, D)})
    return store, true


@pytest.fixture(scope="module")
def topk_art(planted) -> SAEArtefact:
    store, _ = planted
    cfg = SAEConfig(architecture="topk", width=32, k=2, training_tokens=100_000, batch_rows=256, buffer_rows=4096,
                    lr=3e-3, dead_feature_window=50, device="cpu", progress=False, converge_tol=0.05,
                    converge_min_steps=50)
    return SAEMethod(cfg).fit(store, 3)


def test_topk_recovers_planted_directions(planted, topk_art: SAEArtefact) -> None:
    store, true = planted
    x = store.all_rows(3).acts
    f = topk_art.encode(x)
    ev = 1 - (x - topk_art.decode(f)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.8
    assert ((f > 0).sum(dim=1) <= 2).all()
    best = (topk_art.directions @ true.T).max(dim=0).values  # per planted direction, its best decoder row
    assert int((best > 0.9).sum()) >= 12, best
    assert topk_art.info["explained_variance"] > 0.95


def test_training_stops_at_convergence_with_its_curve(topk_art: SAEArtefact) -> None:
    tr, info = topk_art.info["training"], topk_art.info
    cap = 100_000 // 256
    assert tr["converged"] is True and tr["stop_reason"].startswith("converged: best held-out NMSE")
    assert tr["steps"] < cap and tr["cap_steps"] == cap and tr["lr_decay_start_step"] < tr["steps"]
    curve = tr["curve"]
    assert tuple(curve) == CURVE_COLUMNS and len({len(v) for v in curve.values()}) == 1
    steps = curve["step"]
    assert steps[0] == 0 and steps[-1] == tr["steps"] and steps == sorted(steps) and len(steps) == tr["evals"]
    assert curve["lr"][-1] < curve["lr"][0]  # the final decay ran
    # The curve's held-out EV is 1 - NMSE, rises from ~0 (b_dec at the mean) and ends where the artefact's does.
    np.testing.assert_allclose(curve["heldout_explained_variance"], 1 - np.array(curve["heldout_nmse"]))
    assert curve["heldout_explained_variance"][0] < 0.1 and curve["heldout_explained_variance"][-1] > 0.95
    assert curve["heldout_explained_variance"][-1] == pytest.approx(info["explained_variance"], abs=1e-4)
    assert all(v == pytest.approx(2.0) for v in curve["l0"][1:]) and 0 <= max(curve["dead_fraction"]) <= 1
    assert curve["never_fired_fraction"][-1] == pytest.approx(info["never_fired_fraction"], abs=1 / 32)
    # Held out: the store's tail (10% of 128 contexts), never in the training pool.
    assert tr["heldout"]["contexts"] == [115, 128] and tr["heldout"]["rows"] == 13 * 64
    b = info["budget"]
    assert b["mode"] == "converged" and b["pool_contexts"] == 115 and b["pool_rows"] == 115 * 64
    assert b["epochs"] == pytest.approx(tr["rows"] / (115 * 64)) and b["rows_trained"] == tr["rows"]
    assert 0 <= info["dense_fraction"] <= 1 and info["mean_l0"] == pytest.approx(2.0)


def test_training_cost_is_recorded(topk_art: SAEArtefact) -> None:
    c, tr = topk_art.cost, topk_art.info["training"]
    assert tr["rows"] == tr["steps"] * 256
    assert c.rows >= tr["rows"] and c.tokens > c.rows  # BOS tokens, the norm estimate and the buffer's read-ahead
    # Every step taken and every held-out evaluation is counted.
    assert training_flops(tr["rows"], 32, D) == 12.0 * tr["rows"] * 32 * D == tr["flops_train"]
    assert tr["flops_eval"] == tr["evals"] * eval_flops(13 * 64, 32, D)
    assert c.flops == tr["flops_train"] + tr["flops_eval"]
    assert c.wall_seconds >= tr["train_seconds"] + tr["eval_seconds"] - 1e-6 and tr["eval_seconds"] > 0
    assert c.peak_memory_bytes >= 0 and c.device == "cpu"
    assert tr["trainer"].endswith("SAETrainer") and tr["store_passes"] >= tr["epochs"] - 1
    assert topk_art.info["hook"] == "blocks.3.hook_resid_post" and topk_art.info["source"] == "trained"


def test_encode_matches_sae_lens_and_roundtrips(tmp_path: Path, planted, topk_art: SAEArtefact) -> None:
    store, _ = planted
    x = store.all_rows(3).acts[:500]
    sae = topk_art.to_sae_lens()
    with torch.no_grad():
        torch.testing.assert_close(topk_art.encode(x), sae.encode(x), rtol=0, atol=1e-5)
        f = topk_art.encode(x)
        torch.testing.assert_close(topk_art.decode(f), sae.decode(f), rtol=0, atol=1e-5)
    path = topk_art.save(tmp_path / "art")
    back = load_artefact(path)
    assert isinstance(back, SAEArtefact) and back.config == topk_art.config
    assert back.tensors.keys() == topk_art.tensors.keys()
    for k, v in topk_art.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    assert back.info == topk_art.info
    assert torch.equal(back.encode(x), topk_art.encode(x))
    assert torch.equal(back.directions, topk_art.directions)


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_other_architectures_convert_like_sae_lens(planted, arch: str) -> None:
    store, _ = planted
    cfg = SAEConfig(architecture=arch, width=32, k=2, training_tokens=4096, batch_rows=256, buffer_rows=1024,
                    lr=3e-3, device="cpu", progress=False)
    art = SAEMethod(cfg).fit(store, 3)
    assert art.architecture == "jumprelu" and art.info["training_architecture"] == arch  # sae-lens saves both so
    assert set(art.tensors) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    x = store.all_rows(3).acts[:500]
    with torch.no_grad():
        torch.testing.assert_close(art.encode(x), art.to_sae_lens().encode(x), rtol=0, atol=1e-5)


def test_batchtopk_waits_for_its_threshold_before_converging(planted) -> None:
    """BatchTopK saves a JumpReLU whose threshold is an EMA started at 0: stopping before it settles kept an SAE with
    L0 ~12 and EV ~0.2 here; the rule starts after 3 EMA time constants (300 steps at sae-lens' 0.01)."""
    store, _ = planted
    art = SAEMethod(architecture="batchtopk", width=32, k=2, training_tokens=200_000, batch_rows=256,
                    buffer_rows=4096, lr=3e-3, dead_feature_window=50, converge_tol=0.05, converge_min_steps=50,
                    device="cpu", progress=False).fit(store, 3)
    tr = art.info["training"]
    why = (tr["lr_decay_start_step"], tr["stop_reason"], tr["criterion"])
    assert tr["lr_decay_start_step"] >= 300 and "from step 300" in tr["criterion"], why  # no stop before 300
    assert art.info["explained_variance"] > 0.9 and art.info["mean_l0"] == pytest.approx(2.0, abs=0.5)


def test_ablate_latents_removes_the_decoded_contribution(topk_art: SAEArtefact, planted) -> None:
    store, _ = planted
    x = store.all_rows(3).acts[:50]
    f = topk_art.encode(x)
    j = int(f.sum(0).argmax())
    out = topk_art.ablate_latents(x, [j])
    torch.testing.assert_close(out, x - f[:, j : j + 1] * topk_art.decoder_raw[j], atol=1e-5, rtol=0)
    # The inherited ablate (projection, centre zero) leaves nothing along the unit direction.
    proj = topk_art.ablate(x, [j]) @ topk_art.directions[j]
    torch.testing.assert_close(proj, torch.zeros(50), atol=1e-4, rtol=0)


def test_cap_and_max_epochs_stop_an_unconverged_run(planted) -> None:
    store, _ = planted
    art = SAEMethod(width=32, k=2, training_tokens=100_000, max_epochs=1.5, batch_rows=256, buffer_rows=1024,
                    lr=3e-3, converge_tol=0, device="cpu", progress=False).fit(store, 3)
    tr = art.info["training"]
    cap = int(1.5 * 115 * 64) // 256
    assert tr["converged"] is False and tr["stop_reason"].startswith(f"cap: {cap} steps")
    assert "max_epochs=1.5" in tr["stop_reason"] and tr["steps"] == cap and tr["epochs"] <= 1.5
    assert tr["lr_decay_start_step"] == cap - round(0.2 * cap) and art.info["training"]["curve"]["step"][-1] == cap


def _coded_store(path: Path, n_ctx: int = 20, T: int = 8, d: int = 8):
    """Rows whose first coordinate is their context id, to see which contexts a stream reads."""
    acts = torch.randn(n_ctx, T, d, generator=torch.Generator().manual_seed(2))
    acts[:, :, 0] = torch.arange(n_ctx, dtype=torch.float32)[:, None]
    return write_synthetic_store(path, {0: acts}, shard_contexts=6)


def test_heldout_tail_and_token_budget_prefix_are_never_trained_on(tmp_path: Path) -> None:
    from methods.sae import _Meter

    store = _coded_store(tmp_path / "coded")
    cfg = SAEConfig(width=8, k=2, training_tokens=256, batch_rows=16, buffer_rows=32, heldout_frac=0.25)
    sp = _split(cfg, store, 0)
    assert sp.heldout_first == 15 and sp.train_contexts == 15 and sp.train_rows == 15 * 8
    assert set(sp.heldout_rows[:, 0].tolist()) == set(range(15, 20)) and sp.train_tokens == 15 * 9
    x = store.all_rows(0).acts
    torch.testing.assert_close(sp.train_mean.float(), x[: 15 * 8].double().mean(0).float())
    meter = _Meter()
    rows = _pool_batches(store, 0, sp.train_contexts, seed=0, meter=meter)
    seen = torch.cat([next(rows) for _ in range(6)])  # more than one pass
    assert meter.store_passes >= 1 and seen[:, 0].max() < 15
    assert set(seen[:, 0].long().tolist()) == set(range(15))
    # token_budget: the store prefix in stream order, whole contexts of 9 tokens (8 rows + BOS).
    budget = dataclasses.replace(cfg, token_budget=40)
    sp = _split(budget, store, 0)
    assert sp.train_contexts == 4 and sp.train_tokens == 36 and sp.train_rows == 32
    # a budget past the held-out tail (EP streamed the whole store) is clamped to the pool before it, and says so
    sp = _split(dataclasses.replace(cfg, token_budget=1000), store, 0)
    assert sp.budget_clamped and sp.train_contexts == 15 and sp.heldout_first == 15
    assert not _split(budget, store, 0).budget_clamped
    with pytest.raises(ValueError, match="token_budget=5 must cover at least one context"):
        _split(dataclasses.replace(cfg, token_budget=5), store, 0)


def test_token_budget_sae_records_its_budget(planted) -> None:
    store, _ = planted
    art = SAEMethod(width=32, k=2, training_tokens=20_000, token_budget=1000, batch_rows=128, buffer_rows=512,
                    lr=3e-3, converge_min_steps=50, device="cpu", progress=False).fit(store, 3)
    b = art.info["budget"]
    assert b["mode"] == "token_budget" and b["token_budget"] == 1000
    assert b["pool_contexts"] == 15 and b["pool_tokens"] == 15 * 65 <= 1000 and b["pool_rows"] == 15 * 64
    assert b["epochs"] == pytest.approx(b["rows_trained"] / b["pool_rows"]) and b["epochs"] > 1
    assert art.name.endswith("-tokens1000") and art.info["explained_variance"] > 0.5


def test_mean_b_dec_init_fixes_an_offset_residual_stream(tmp_path: Path) -> None:
    """Rows far from the origin (as the model's residual stream: mean norm ~ spread) and few steps: sae-lens'
    zero b_dec in raw units leaves explained variance far below the mean-initialised, normalised SAE."""
    g = torch.Generator().manual_seed(4)
    true = torch.nn.functional.normalize(torch.randn(N_TRUE, D, generator=g), dim=1)
    idx = torch.stack([torch.randperm(N_TRUE, generator=g)[:2] for _ in range(64 * 32)])
    x = (3 * true[idx]).sum(1) + 30 * torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    store = write_synthetic_store(tmp_path / "offset", {0: x.reshape(64, 32, D)})
    common = {"width": 32, "k": 2, "training_tokens": 100 * 128, "batch_rows": 128, "buffer_rows": 512, "lr": 3e-3,
              "converge_tol": 0, "device": "cpu", "progress": False}
    old = SAEMethod(init_b_dec="zeros", normalize_activations="none", **common).fit(store, 0)
    new = SAEMethod(**common).fit(store, 0)
    assert old.info["explained_variance"] < 0.3 and new.info["explained_variance"] > 0.8  # measured: 0.05, 0.91


# ---------------------------------------------------------------------------------------------------------
# Reproducibility: what is guaranteed (README, Reproducibility; `python -m bench.reproducibility` measures the rest)


@pytest.fixture(scope="module")
def wide_heldout(tmp_path_factory: pytest.TempPathFactory):
    """A store whose held-out chunk (6 contexts x 128 rows x d 64 = 49k values) is large enough for torch to split a
    flat .sum() over it across threads (above its 32,768-element grain), so a thread-dependent sum would show."""
    g = torch.Generator().manual_seed(5)
    true = torch.nn.functional.normalize(torch.randn(48, 64, generator=g), dim=1)
    idx = torch.randint(0, 48, (64 * 128, 3), generator=g)
    x = (true[idx] * (1 + torch.rand(64 * 128, 3, 1, generator=g))).sum(1) + 0.05 * torch.randn(64 * 128, 64,
                                                                                                 generator=g)
    return write_synthetic_store(tmp_path_factory.mktemp("wide"), {0: x.reshape(64, 128, 64)})


def _repro_fit(store, **kw) -> SAEArtefact:
    return SAEMethod(width=64, k=4, training_tokens=20 * 256, batch_rows=256, buffer_rows=1024, lr=3e-3,
                     eval_every=5, device="cpu", progress=False, **kw).fit(store, 0)


def _blas_thread_invariant() -> bool:
    """Whether this BLAS gives the same GEMMs (training's shapes, plain and transposed) at 1 and 2 threads."""
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(256, 64, generator=g), torch.randn(64, 64, generator=g), torch.randn(64, 256, generator=g)
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append((a @ b, c @ a, a.T @ a))
    finally:
        torch.set_num_threads(before)
    return all(torch.equal(x, y) for x, y in zip(*out))


def _without_timings(info: dict) -> dict:
    tr = {k: v for k, v in info["training"].items()
          if k not in ("train_seconds", "eval_seconds", "rows_per_second")}
    cost = {k: v for k, v in info["cost"].items() if k not in ("wall_seconds", "peak_memory_bytes")}
    return {**info, "training": tr, "cost": cost}


def test_same_seed_and_thread_count_retrain_bit_identical_with_provenance(wide_heldout, monkeypatch) -> None:
    """Same store, seed and thread count: the same tensors bit for bit and the same curve and metrics; the artefact
    records the thread count, the CPU, the BLAS and the store's activations hash; steps run with deterministic
    algorithms at train_threads, and the process's settings are restored after."""
    from sae_lens.training.sae_trainer import SAETrainer

    seen = set()
    step = SAETrainer.step

    def watched(self, batch):
        seen.add((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        return step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", watched)
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    a, b = _repro_fit(wide_heldout, train_threads=1), _repro_fit(wide_heldout, train_threads=1)
    assert seen == {(1, True)}
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert _without_timings(a.info) == _without_timings(b.info)
    rep = a.info["training"]["reproducibility"]
    assert rep["threads"] == 1 and rep["deterministic_algorithms"] is True and rep["seed"] == 0
    assert rep["cpu"]["model_name"] and rep["blas"]["blas"] and rep["blas"]["aten_cpu_capability"]
    assert len(rep["activations_sha256"]) == 64 and "bit-identical" in rep["reproduces"]
    c = _repro_fit(wide_heldout, train_threads=1, seed=1)
    assert not torch.equal(c.tensors["W_enc"], a.tensors["W_enc"])  # the seed does change the run


def test_thread_count_leaves_training_bit_identical_where_the_blas_does(wide_heldout) -> None:
    """On a BLAS whose GEMMs do not depend on the thread count (MKL on this CPU), training does not either: held-out
    sums are per row then exact (a flat float .sum() over the held-out chunk differed at 1 vs 2 threads, EV by
    1e-7), and the eval curve (the stopping rule) and final metrics are the same floats."""
    if not _blas_thread_invariant():
        pytest.skip("this BLAS's GEMMs differ between 1 and 2 threads: only a fixed thread count reproduces")
    one, two = _repro_fit(wide_heldout, train_threads=1), _repro_fit(wide_heldout, train_threads=2)
    assert two.info["training"]["reproducibility"]["threads"] == 2
    for k in one.tensors:
        assert torch.equal(one.tensors[k], two.tensors[k]), k
    assert one.info["training"]["curve"] == two.info["training"]["curve"]
    assert one.info["explained_variance"] == two.info["explained_variance"]


def test_train_threads_is_recorded_only_when_set() -> None:
    """Rows' method_config and cached cfg.json read as before the field existed (a rerun compares equal to the
    committed reference's rows); a set value round-trips."""
    assert "train_threads" not in SAEConfig().to_dict()
    cfg = SAEConfig(train_threads=2)
    assert cfg.to_dict()["train_threads"] == 2 and SAEConfig.from_dict(cfg.to_dict()) == cfg
    assert SAEConfig.from_dict(SAEConfig().to_dict()) == SAEConfig()


def test_heldout_stats_do_not_depend_on_the_thread_count() -> None:
    from methods.sae import heldout_stats

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 64, generator=g) + 2
    w = torch.randn(64, 64, generator=g) / 8
    enc, dec = (lambda v: torch.relu(v @ w)), (lambda f: f @ w.T)
    before, out = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(heldout_stats(enc, dec, x, 0.1))
    finally:
        torch.set_num_threads(before)
    assert out[0] == out[1]


def test_run_provenance_names_cpu_and_blas() -> None:
    from bench.runner import machine_info

    from bench.reproducibility import blas_info, cpu_info

    m = machine_info()
    assert m["cpu_model"] == cpu_info()["model_name"] and m["cpu_model"]
    assert m["blas"].startswith(f"{blas_info()['blas']}") and "LAPACK" in m["blas"]
    assert m["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch_threads"] == torch.get_num_threads()
    if Path("/proc/cpuinfo").exists():
        assert "family/model/stepping" in m["cpu_id"]
    if torch.backends.mkl.is_available():
        assert blas_info()["mkl"] and "Math Kernel Library" in blas_info()["mkl"]
    assert all(isinstance(v, (str, int, type(None))) for v in m.values())  # one flat line in the report header


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("params, match", [
    ({"architecture": "gated"}, "unknown SAE architecture"),
    ({"width": 0}, "width must be > 0"),
    ({"width": 8, "k": 9}, "k must be in 1..width"),
    ({"training_tokens": 100, "batch_rows": 256}, "batch_rows <= training_tokens"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations"),
    ({"converge_window": 1.0}, "0 < converge_window < 1"),
    ({"heldout_frac": 0.0}, "0 < heldout_frac < 1"),
    ({"token_budget": 0}, "token_budget must be > 0"),
    ({"init_b_dec": "median"}, "init_b_dec in"),
    ({"train_threads": 0}, "train_threads must be >= 1"),
])
def test_bad_config_is_refused(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SAEMethod(**params)


def test_nan_rows_are_refused(tmp_path: Path) -> None:
    acts = torch.randn(8, 16, 8)
    acts[3, 2, 1] = float("nan")
    store = write_synthetic_store(tmp_path / "nan", {0: acts})
    with pytest.raises(ValueError, match="NaN"):
        SAEMethod(width=8, k=2, training_tokens=256, batch_rows=64, buffer_rows=128, device="cpu").fit(store, 0)


def test_encode_checks_width(topk_art: SAEArtefact) -> None:
    with pytest.raises(ValueError, match=r"expected activations \[N, 32\]"):
        topk_art.encode(torch.zeros(3, 31))
    with pytest.raises(ValueError, match="unknown readout"):
        topk_art.encode(torch.zeros(3, 32), readout="binary")


def test_jumprelu_stops_on_the_nmse_rule_only_near_its_target_l0() -> None:
    from methods.sae import JUMPRELU_L0_SLACK, SAEConfig, l0_reached

    jump = SAEConfig(architecture="jumprelu", width=64, k=8, training_tokens=4096, batch_rows=256, buffer_rows=512)
    topk = SAEConfig(architecture="topk", width=64, k=8, training_tokens=4096, batch_rows=256, buffer_rows=512)
    assert not l0_reached(jump, 198.0) and not l0_reached(jump, JUMPRELU_L0_SLACK * 8 + 0.01)
    assert l0_reached(jump, 8.0) and l0_reached(jump, JUMPRELU_L0_SLACK * 8) and l0_reached(jump, 8 / JUMPRELU_L0_SLACK)
    assert not l0_reached(jump, 0.0) and not l0_reached(jump, 8 / JUMPRELU_L0_SLACK - 0.01)  # a silent SAE: no stop
    assert l0_reached(topk, 198.0)  # TopK's L0 is k by construction: the NMSE rule alone decides


def test_quantile_init_starts_each_jumprelu_latent_at_its_target_firing_rate() -> None:
    """Oracle: numpy's quantile of the pre-activations sae-lens computes; the SAE then fires k/width of the time."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    from methods.sae import init_thresholds_from_data

    width, k, d = 64, 4, 16
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=width, jumprelu_sparsity_loss_mode="quadratic",
                                                        target_l0=float(k), device="cpu"))
    x = torch.randn(2048, d) * 3 + 1
    with torch.no_grad():
        pre = sae.encode_with_hidden_pre(x)[1].numpy()
    got = init_thresholds_from_data(sae, x, k)
    want = np.maximum(np.quantile(pre, 1 - k / width, axis=0), 0.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(sae.threshold.data, got)
    with torch.no_grad():
        l0 = float((sae.encode_with_hidden_pre(x)[0] != 0).sum(1).float().mean())
    assert l0 == pytest.approx(k, abs=0.1)  # vs sae-lens' constant 0.01 start: about half of the 64 latents fire


def test_jumprelu_init_fields_validate_and_stay_out_of_old_records() -> None:
    base = SAEConfig(architecture="jumprelu").to_dict()
    assert "jumprelu_init" not in base and "jumprelu_init_threshold" not in base  # defaults: old records unchanged
    assert SAEConfig(architecture="jumprelu", jumprelu_init="quantile").to_dict()["jumprelu_init"] == "quantile"
    with pytest.raises(ValueError, match="jumprelu_init in"):
        SAEConfig(architecture="jumprelu", jumprelu_init="median")
