"""Issue 9 items 6, 7, 11, 14 and the store cases of 12: extract verifies and repairs, a damaged store never
blocks a healthy one, one writer per store, tokenization stops at the budget, malformed manifests recover."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.store import ExtractionRequest, extract, find_stores, iter_contexts

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"Document {i} is about {'cats and dogs' if i % 2 else 'stock markets'}. " * (2 + i % 4) for i in range(40)]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    return f"jsonl:{p}"


def _req(corpus, **kw):
    base = dict(model="tiny-gemma2", layers=[1, 3], corpus=corpus, tokens=1500, ctx_len=32, batch_contexts=4,
                shard_contexts=8)
    return ExtractionRequest(**{**base, **kw})


def _bytes(store) -> dict[str, bytes]:
    return {str(p.relative_to(store.path)): p.read_bytes() for p in sorted(store.path.rglob("*.safetensors"))}


def test_extract_on_a_damaged_store_repairs_it_in_place(tmp_path, corpus, capsys):
    store = extract(_req(corpus), root=tmp_path / "s", progress=False)
    clean = _bytes(store)
    flipped = store.path / "L03" / "shard_00001.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-7] ^= 0x20  # same size: only a sha256 check sees it
    flipped.write_bytes(bytes(data))
    (store.path / "meta" / "shard_00002.safetensors").unlink()
    again = extract(_req(corpus), root=tmp_path / "s", progress=False)
    out = capsys.readouterr().out
    assert "needs repair" in out and again.path == store.path
    assert _bytes(again) == clean  # byte-identical to the undamaged store
    assert again.damaged_files() == []


@pytest.mark.parametrize("manifest", ['{"status": "complete"}', "[1, 2, 3]", '{"status": "compl'])
def test_a_manifest_of_the_wrong_shape_is_rewritten_by_the_next_extract(tmp_path, corpus, manifest):
    store = extract(_req(corpus), root=tmp_path / "s", progress=False)
    clean = _bytes(store)
    (store.path / "manifest.json").write_text(manifest)
    assert _bytes(extract(_req(corpus), root=tmp_path / "s", progress=False)) == clean


def test_a_damaged_store_is_skipped_with_a_warning_naming_it(tmp_path, corpus, capsys):
    small = extract(_req(corpus, tokens=800), root=tmp_path / "s", progress=False)
    big = extract(_req(corpus), root=tmp_path / "s", progress=False)
    assert [s.id for s in find_stores("tiny-gemma2", 3, tmp_path / "s")] == [big.id, small.id]
    victim = big.path / "L03" / "shard_00000.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    assert [s.id for s in find_stores("tiny-gemma2", 3, tmp_path / "s")] == [small.id]
    assert f"skipping damaged store {big.path}" in capsys.readouterr().out


HOLD = """
import sys, time
from bench.cache import file_lock
with file_lock(sys.argv[1], "test holder"):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_extract_of_the_same_store_waits_for_the_first(tmp_path, corpus, capsys, monkeypatch):
    from bench.models import weights_identity
    from bench.corpora import get_corpus
    from bench.store import request_id

    req = _req(corpus)
    sid = request_id(req, get_corpus(req.corpus).fingerprint(), weights_identity(req.model))
    lock = tmp_path / "s" / f"{sid}.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "2"], stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "holding"
    t0 = time.time()
    store = extract(req, root=tmp_path / "s", progress=False)
    proc.wait()
    assert time.time() - t0 > 1.0 and "waiting for store" in capsys.readouterr().out
    assert store.id == sid


class _CountingBackend:
    """encode_text over a real tokenizer, counting how many characters it was asked to encode."""

    def __init__(self, tokenizer):
        self.tok, self.bos_id, self.chars = tokenizer, 0, 0

    def encode_text(self, text):
        self.chars += len(text)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def _tokenizers():
    from bench.cache import cache_dir
    from bench.models import byte_tokenizer

    out = [byte_tokenizer()]
    smol = Path.home() / ".cache" / "epbench" / "models" / "smollm2-135m" / "tokenizer"
    for d in (cache_dir() / "models" / "smollm2-135m" / "tokenizer", smol):
        if d.is_dir():
            from transformers import AutoTokenizer

            out.append(AutoTokenizer.from_pretrained(d))
            break
    return out


def test_tokenization_stops_at_the_budget_and_gives_the_same_contexts():
    from bench.corpora import Document

    words = " ".join(f"word{i % 97} and-some, punctuation." for i in range(60_000))  # ~2 MB, one line
    for tok in _tokenizers():
        backend = _CountingBackend(tok)
        docs = [Document(0, "short one.", "t"), Document(1, words, "t"), Document(2, "after", "t")]
        fast = list(iter_contexts(docs, backend, 64, None, token_budget=2000))
        assert backend.chars < 200_000  # not the whole 2 MB document
        full_ids = backend.encode_text(words)  # the oracle: whole-document tokenization, then chunking
        expect = [[0] + backend.encode_text("short one.")]
        expect += [[0] + full_ids[i: i + 63] for i in range(0, len(full_ids), 63)]
        total, want = 0, []
        for ctx in expect:
            if total >= 2000:
                break
            want.append(ctx)
            total += len(ctx)
        assert [c.tokens for c in fast] == want


@pytest.mark.slow
def test_a_10_mb_single_line_document_is_cheap_for_a_small_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "huge.jsonl"
    p.write_text(json.dumps({"text": "lorem ipsum dolor sit amet " * 400_000}) + "\n")
    t0 = time.time()
    store = extract(ExtractionRequest(model="tiny-gemma2", layers=[1], corpus=f"jsonl:{p}", tokens=2000,
                                      ctx_len=64), root=tmp_path / "s", progress=False)
    assert time.time() - t0 < 20 and 2000 <= store.n_tokens < 2100


@pytest.mark.parametrize("entry", ["[]", '{"name": "bbc"}', '{"na'])
def test_a_malformed_cached_corpus_fingerprint_is_recomputed(tmp_path, monkeypatch, entry):
    from bench import corpora

    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path))
    fresh = corpora.get_corpus("bbc", seed=3).fingerprint()
    (cached,) = (tmp_path / "corpus-fingerprints").glob("bbc-*.json")
    cached.write_text(entry)
    assert corpora.get_corpus("bbc", seed=3).fingerprint() == fresh
    assert json.loads(cached.read_text()) == fresh
