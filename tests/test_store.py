"""The activation store: one pass for all layers, BOS/pad excluded, content-addressed, resumable, checked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.store import ActivationStore, ExtractionRequest, StoreError, extract, find_stores

TEXTS = [f"Document number {i} talks about {'cats and dogs' if i % 2 else 'stock markets'}." * (1 + i % 5)
         for i in range(60)]


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    return f"jsonl:{p}"


def _req(corpus, **kw):
    base = dict(model="tiny-gemma2", layers=[1, 3], corpus=corpus, tokens=3000, ctx_len=64,
                batch_contexts=4, shard_contexts=8)
    base.update(kw)
    return ExtractionRequest(**base)


def test_extract_captures_all_layers_excluding_bos_and_pad(tmp_path, corpus, tiny_model):
    store = extract(_req(corpus), root=tmp_path / "stores", progress=False)
    m = store.manifest
    assert m["status"] == "complete" and m["layers"] == [1, 3]
    assert m["hooks"] == {"1": "blocks.1.hook_resid_post", "3": "blocks.3.hook_resid_post"}
    for key in ("weights_sha256",):
        assert len(m["model"][key]) == 64
    assert {"ctx_len", "dtype", "bos_policy", "pad_policy", "tokenizer", "corpus", "order", "seed"} <= set(m)
    rows = store.all_rows([1, 3])
    assert rows.acts[1].shape == (store.n_rows, 64) and store.n_rows == store.n_tokens - store.n_contexts
    assert rows.positions.min() == 1  # BOS never stored
    assert store.n_tokens >= 3000
    # rows of context 0 equal a direct forward pass on that context
    toks = store.context_tokens(0)
    direct = tiny_model.run_layers(torch.tensor([toks]), [3])[3][0, 1:]
    sel = rows.context_ids == 0
    torch.testing.assert_close(rows.acts[3][sel], direct, rtol=1e-5, atol=1e-5)
    assert rows.token_ids[sel].tolist() == toks[1:]
    # a padded (short) context contributes only its real tokens
    lengths = [len(store.context_tokens(i)) for i in range(store.n_contexts)]
    assert min(lengths) < 64
    assert sum(length - 1 for length in lengths) == store.n_rows


def test_same_request_reuses_the_store_without_loading_the_model(tmp_path, corpus, monkeypatch):
    first = extract(_req(corpus), root=tmp_path / "s", progress=False)
    monkeypatch.setattr("bench.models.load_model", lambda *a, **k: pytest.fail("model loaded on reuse"))
    t0 = time.time()
    again = extract(_req(corpus), root=tmp_path / "s", progress=False)
    assert again.path == first.path and time.time() - t0 < 5
    assert find_stores("tiny-gemma2", 3, tmp_path / "s")[0].id == first.id
    other = _req(corpus, tokens=2000)
    wid = first.manifest["model"]["weights_id"]
    assert extract.__globals__["request_id"](other, {"x": 1}, wid) != first.id


def test_batches_are_whole_contexts_in_fixed_order_with_optional_shuffle(tmp_path, corpus):
    store = extract(_req(corpus), root=tmp_path / "s", progress=False)
    batches = list(store.batches(1, batch_contexts=5))
    ids = torch.cat([b.context_ids for b in batches])
    assert ids.tolist() == sorted(ids.tolist())
    assert all(len(b.context_ids.unique()) == 5 for b in batches[:-1])
    shuffled = torch.cat([b.context_ids for b in store.batches(1, batch_contexts=5, shuffle_seed=3)])
    assert shuffled.tolist() != ids.tolist() and sorted(shuffled.tolist()) == ids.tolist()
    again = torch.cat([b.context_ids for b in store.batches(1, batch_contexts=5, shuffle_seed=3)])
    assert torch.equal(again, shuffled)
    limited = list(store.batches(1, batch_contexts=5, max_tokens=200))
    assert sum(b.n_tokens for b in limited[:-1]) < 200 <= sum(b.n_tokens for b in limited)


def test_corrupted_and_truncated_shards_are_named(tmp_path, corpus):
    store = extract(_req(corpus), root=tmp_path / "s", progress=False)
    victim = store.path / "L03" / "shard_00001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="L03/shard_00001.safetensors is corrupted"):
        list(ActivationStore(store.path).batches(3))
    victim.write_bytes(bytes(data[:100]))
    with pytest.raises(StoreError, match="shard_00001.safetensors is truncated"):
        ActivationStore(store.path)


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Exception, match="empty"):
        extract(_req(f"jsonl:{empty}"), root=tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        extract(ExtractionRequest(model="nope", layers=[1]), root=tmp_path / "s", progress=False)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="out of range"):
        extract(_req(f"jsonl:{ok}", layers=[9]), root=tmp_path / "s", progress=False)


KILL_SCRIPT = """
import sys
from bench.store import ExtractionRequest, extract
req = ExtractionRequest(model="tiny-gemma2", layers=[1, 3], corpus=sys.argv[2], tokens=20000, ctx_len=64,
                        batch_contexts=4, shard_contexts=8)
extract(req, root=sys.argv[1], progress=False)
"""


def _files(root: Path) -> dict[str, bytes]:
    (store,) = [p for p in root.iterdir() if p.is_dir()]
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*.safetensors"))}


@pytest.mark.slow
def test_kill_9_mid_extraction_resumes_to_an_identical_store(tmp_path, corpus):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    victim_root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(victim_root), corpus], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list(victim_root.glob("*/shards/shard_00002.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (mpath,) = victim_root.glob("*/manifest.json")
    assert json.loads(mpath.read_text())["status"] == "in_progress", "killed too late to test resumption"
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(mpath.parent)
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(victim_root), corpus], env=env, check=True)
    clean_root = tmp_path / "clean"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(clean_root), corpus], env=env, check=True)
    killed, clean = _files(victim_root), _files(clean_root)
    assert killed.keys() == clean.keys() and all(killed[k] == clean[k] for k in clean)
    assert not list(victim_root.rglob("*.tmp"))


def test_a_store_with_more_layers_serves_a_request_for_fewer(tmp_path, corpus, monkeypatch):
    wide = extract(_req(corpus, layers=[1, 2, 3]), root=tmp_path / "s", progress=False)
    monkeypatch.setattr("bench.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert extract(_req(corpus, layers=[3]), root=tmp_path / "s", progress=False).path == wide.path
    with pytest.raises(pytest.fail.Exception):
        extract(_req(corpus, layers=[3], tokens=2000), root=tmp_path / "s", progress=False)


def test_activations_beyond_float16_or_non_finite_are_refused_at_extraction(tmp_path, corpus, monkeypatch):
    """Gemma's residual stream reaches |x| ~ 6e4 (beyond at some tokens): a float16 store would hold inf there and
    every method would fail later; extraction names the model, the layer and the fix instead."""
    from bench.models import ModelBackend
    from bench.store import FLOAT16_MAX, check_storable

    req16, req32 = _req(corpus, dtype="float16"), _req(corpus)
    check_storable(torch.tensor([[1.0, -FLOAT16_MAX]]), req16, 1)  # at the edge: storable
    with pytest.raises(StoreError, match=r"tiny-gemma2 activations reach \|x\| = 70,000 at layer 3, beyond "
                                         r"float16's range .*model_store_dtype=\{'tiny-gemma2': 'float32'\}"):
        check_storable(torch.tensor([[1.0, -7e4]]), req16, 3)
    check_storable(torch.tensor([[1.0, -7e4]]), req32, 3)  # float32 holds it
    with pytest.raises(StoreError, match="produced NaN/inf activations at layer 1"):
        check_storable(torch.tensor([[1.0, float("nan")]]), req32, 1)

    real = ModelBackend.run_layers
    monkeypatch.setattr(ModelBackend, "run_layers",
                        lambda self, toks, layers: {L: x * 1e6 for L, x in real(self, toks, layers).items()})
    with pytest.raises(StoreError, match="beyond float16's range"):
        extract(req16, root=tmp_path / "s16", progress=False)
    assert extract(req32, root=tmp_path / "s32", progress=False).manifest["status"] == "complete"
