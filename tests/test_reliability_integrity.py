"""Issue 19: never delete what the user owns, verify every identity before reuse, fail in one line on real faults.

Each test makes the real fault where it can: a real small file system (tmpfs) for a full disk, a real swapped
artefact folder, a real edited index.json or manifest, a real in-place bit flip that puts mtime back (os.utime).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import fakes
import pandas as pd
import pytest
import torch

import bench.cache as cache
import bench.models as models
from bench.cli import main, narrow_suite
from bench.suites import get_suite

ROOT = Path(__file__).resolve().parents[1]
SMOL = "smollm2-135m"


# ---------------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real, tiny tmpfs at `path` for the duration (skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs a tmpfs, and mounting one needs root (not available here)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the full-disk case needs one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path) -> None:
    """Fill a file system to the last byte."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as f:
        for size in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


def one_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]  # no bars
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def flip_in_place(path: Path, offset: int = -5, keep_times: bool = True) -> None:
    """Flip one bit in place (same inode, same size) and put atime/mtime back, as bit rot or a careless edit."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x04]))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino


def forge_memo(clean: dict[Path, str]) -> None:
    """Make the on-disk hash memo vouch for the files' clean sha256 at their current stat (what bit rot below the
    file system looks like to it: nothing about the file changed), and forget what this process hashed."""
    memo_path = cache.cache_dir() / "file-hashes.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    for p, sha in clean.items():
        memo[str(p.resolve())] = {**cache._stat_key(p.resolve()), "sha256": sha}
    memo_path.write_text(json.dumps(memo))
    cache._CONTENT_VERIFIED.clear()


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    cache._CONTENT_VERIFIED.clear()
    yield tmp_path / "cache"
    cache._CONTENT_VERIFIED.clear()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} about cats and dogs {i * 7}"}) for i in range(40)))
    return f"jsonl:{path}"


def _req(corpus, **kw):
    from bench.store import ExtractionRequest

    base = dict(model="tiny-gemma2", layers=[1], corpus=corpus, tokens=400, ctx_len=32, batch_contexts=4,
                shard_contexts=8)
    return ExtractionRequest(**{**base, **kw})


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A narrowed smoke run (PCA at layer 1: build and retrieval) in its own cache, shared by the run-level tests."""
    from bench.runner import run_suite

    root = tmp_path_factory.mktemp("integrity")
    old = os.environ.get("EPBENCH_CACHE")
    os.environ["EPBENCH_CACHE"] = str(root / "cache")
    try:
        suite = narrow_suite(get_suite("smoke"), layers=[1], methods=["pca"], metrics=["build", "retrieval"])
        run = run_suite(suite, root / "results", run_id="r", progress=False, report=False)
        yield suite, run.dir, root
    finally:
        if old is None:
            os.environ.pop("EPBENCH_CACHE", None)
        else:
            os.environ["EPBENCH_CACHE"] = old


def _copy_run(smoke_run, dst: Path) -> Path:
    _, run_dir, _ = smoke_run
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(".lock", "browser"))
    return dst


def _values(run_dir: Path) -> pd.Series:
    df = pd.read_parquet(run_dir / "rows.parquet")
    df = df[~df.metric.str.contains("wall_seconds|peak_memory|rows_per_s")]
    return df.set_index(["cell_id", "metric", "detail"])["value"].sort_index()


# ---------------------------------------------------------------------------------------------------------
# 1. browse never deletes what it did not write


def _synthetic_artefact(tmp_path: Path, info: dict | None = None):
    """A random-directions artefact on a synthetic store filed under its id in the cache (no model needed)."""
    from bench.store import stores_root, write_synthetic_store
    from methods.random_directions import RandomDirections

    g = torch.Generator().manual_seed(0)
    store = write_synthetic_store(tmp_path / "s", {1: torch.randn(8, 6, 12, generator=g)})
    filed = stores_root() / store.id
    filed.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(store.path), filed)
    from bench.store import ActivationStore

    art = RandomDirections(k=4, seed=0).fit(ActivationStore(filed), 1)
    art.info.update(info or {})
    return art.save(tmp_path / "arts" / "random")


def test_browse_refuses_a_folder_it_did_not_write_and_replaces_its_own(tmp_path, cache_env, smoke_run, capsys):
    art_dir = _synthetic_artefact(tmp_path)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    (tmp_path / "site.tmp").mkdir()  # a user's folder with the name the old code used as its scratch folder
    (tmp_path / "site.tmp" / "keep.txt").write_text("keep")
    assert main(["browse", str(art_dir), "--out", str(user)]) == 2
    assert "is not empty and is not a site written by `epbench browse`" in one_line(capsys.readouterr().err)
    assert (user / "notes.txt").read_text() == "my notes" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    run_dir = _copy_run(smoke_run, tmp_path / "results" / "r")  # --out results/<run>: the run's own folder
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert main(["browse", str(art_dir), "--out", str(run_dir)]) == 2
    assert "not a site written by `epbench browse`" in one_line(capsys.readouterr().err)
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    site = tmp_path / "site"
    assert main(["browse", str(art_dir), "--out", str(site)]) == 0
    assert (site / ".epbench-browser").is_file() and (site / "index.html").is_file()
    assert main(["browse", str(art_dir), "--out", str(site)]) == 0  # its own site: replaced whole
    assert (tmp_path / "site.tmp" / "keep.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site.")]  # no scratch folder left


# ---------------------------------------------------------------------------------------------------------
# 2. report on a real full disk: the previous report stays whole, the error names the path


def test_report_on_a_real_full_disk_keeps_the_previous_report(tmp_path, smoke_run, capsys):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        run_dir = _copy_run(smoke_run, disk / "results" / "r")
        assert main(["report", "r", "--results-dir", str(disk / "results")]) == 0
        previous = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".md", ".png")}
        assert run_dir / "REPORT.md" in previous
        capsys.readouterr()
        fill(disk)
        assert main(["report", "r", "--results-dir", str(disk / "results")]) == 1
        line = one_line(capsys.readouterr().err)
        assert f"{run_dir}/" in line and "No space left on device" in line and "free disk space" in line
        assert {p: p.read_bytes() for p in previous} == previous  # every earlier file whole
        assert not [p for p in run_dir.rglob("*.tmp")]
        # the report's own write, on a full disk: the error names REPORT.md, the old report is kept
        from bench.report import write_text_atomic

        with pytest.raises(OSError) as e:
            write_text_atomic(run_dir / "REPORT.md", "x" * 100_000)
        assert e.value.filename == str(run_dir / "REPORT.md")
        assert (run_dir / "REPORT.md").read_bytes() == previous[run_dir / "REPORT.md"]


# ---------------------------------------------------------------------------------------------------------
# 3. a cached artefact in the wrong slot is never scored


def _ctx(cache_env, methods):
    import dataclasses

    from bench.context import ModelContext
    from bench.store import write_synthetic_store

    g = torch.Generator().manual_seed(0)
    store = write_synthetic_store(cache_env.parent / "store", {L: torch.randn(16, 8, 12, generator=g) for L in (1, 2)})
    suite = dataclasses.replace(get_suite("smoke"), layers=[1, 2], concept_sets=[], methods=methods)
    return ModelContext(suite, "synthetic", progress=False, store=store)


def _root(cache_env, method):
    return next(p for p in cache_env.glob(f"artefacts/*/{method}-*/*") if p.is_dir())


def test_a_swapped_or_copied_artefact_folder_or_an_edited_index_is_rebuilt(cache_env, capsys):
    from bench.suites import MethodSpec

    ctx = _ctx(cache_env, [MethodSpec("pca", {"k": 3}), MethodSpec("random", {"k": 5}, seeds=[0, 1])])
    clean = {label: ctx._load_or_build(ctx.spec(label)) for label in ("pca", "random")}
    pca, rnd = _root(cache_env, "pca"), _root(cache_env, "random")

    def reload(label):
        ctx._artefacts.clear()
        fresh = type(ctx)(ctx.suite, "synthetic", progress=False, store=ctx.store)
        return fresh._load_or_build(fresh.spec(label))

    # swapped layer folders: each intact, each in the other's slot
    (a,), (b,) = (list((pca / f"L0{L}").iterdir()) for L in (1, 2))
    a.rename(pca / "tmp")
    b.rename(a)
    (pca / "tmp").rename(b)
    capsys.readouterr()
    again = reload("pca")
    assert "is not the artefact this slot asks for (fitted at layer 2, not 1)" in capsys.readouterr().out
    for L in (1, 2):
        torch.testing.assert_close(again[L][0].directions, clean["pca"][L][0].directions, rtol=0, atol=0)
    # an edited index.json: layer 1 listed with layer 2's artefacts
    index = json.loads((rnd / "index.json").read_text())
    (rnd / "index.json").write_text(json.dumps({"1": index["2"], "2": index["2"]}))
    assert reload("random") is not None and "fitted at layer 2, not 1" in capsys.readouterr().out
    # one seed's folder copied over the other's: both intact, one seed twice
    index = json.loads((rnd / "index.json").read_text())
    shutil.rmtree(rnd / index["1"][1])
    shutil.copytree(rnd / index["1"][0], rnd / index["1"][1])
    again = reload("random")
    assert "a second copy of random" in capsys.readouterr().out
    assert [a.config.seed for a in again[1]] == [0, 1]
    # another method's folder copied into this slot
    shutil.rmtree(rnd / index["1"][0])
    shutil.copytree(pca / json.loads((pca / "index.json").read_text())["1"][0], rnd / index["1"][0])
    reload("random")
    assert "method 'pca', the spec 'random' needs 'random'" in capsys.readouterr().out
    # an artefact of another store (same spec, same layer) in this slot
    other = _ctx(cache_env.parent / "other-cache", [MethodSpec("pca", {"k": 3})])
    other_art = other.build(other.spec("pca"))[1][0]
    rel = json.loads((pca / "index.json").read_text())["1"][0]
    shutil.rmtree(pca / rel)
    other_art.info["store_id"] = "0123456789abcdef"
    other_art.save(pca / rel)
    reload("pca")
    assert f"fitted on store 0123456789abcdef, not {ctx.store.id}" in capsys.readouterr().out


def test_a_checkpointed_fit_in_the_wrong_slot_is_fitted_again(cache_env, monkeypatch, capsys):
    from bench.suites import MethodSpec
    from methods.random_directions import RandomDirections

    ctx = _ctx(cache_env, [MethodSpec("random", {"k": 5}, seeds=[0, 1])])
    spec = ctx.spec("random")
    real_fit = RandomDirections.fit
    calls = []

    def fit(self, store, layer, concepts=None):
        calls.append((self.config.seed, layer))
        if len(calls) == 3 and stop:
            raise KeyboardInterrupt
        return real_fit(self, store, layer)

    monkeypatch.setattr(RandomDirections, "fit", fit)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        ctx._load_or_build(spec)
    stop = False
    fits = next(cache_env.glob("artefacts/*/random-*/*/fits"))
    (l1,), (l2,) = (list((fits / f"L0{L}").iterdir()) for L in (1, 2))
    shutil.rmtree(l1)
    shutil.copytree(l2, l1)  # layer 2's fit where layer 1's checkpoint belongs
    calls.clear()
    built = ctx._load_or_build(spec)
    assert "checkpointed fit unusable, fitting it again" in capsys.readouterr().out
    assert (0, 1) in calls and [a.info["layer"] for a in built[1]] == [1, 1]


# ---------------------------------------------------------------------------------------------------------
# 4. a store folder under another request's id is never reused


def test_a_store_under_another_requests_id_is_re_extracted(tmp_path, cache_env, corpus, capsys):
    from bench.corpora import get_corpus
    from bench.store import extract, find_stores, request_id

    big = extract(_req(corpus, tokens=600, seed=0), root=tmp_path / "s", progress=False)
    small_req = _req(corpus, tokens=200, seed=1)
    sid = request_id(small_req, get_corpus(corpus, seed=1).fingerprint(), models.weights_identity("tiny-gemma2"))
    shutil.copytree(big.path, tmp_path / "s" / sid)  # the seed-0, 600-token store under the seed-1 id
    found = [s.path.name for s in find_stores("tiny-gemma2", 1, tmp_path / "s")]
    assert sid not in found and big.id in found  # the copy is skipped with a warning naming it
    assert f"skipping damaged store {tmp_path / 's' / sid}" in capsys.readouterr().out
    small = extract(small_req, root=tmp_path / "s", progress=False)
    assert "holds another request" in capsys.readouterr().out
    assert small.id == sid and small.manifest["request"]["seed"] == 1 and small.n_tokens <= 200 + 32
    # an edited manifest that claims the request but records another
    m = json.loads((small.path / "manifest.json").read_text())
    m["request"]["tokens"] = 600
    (small.path / "manifest.json").write_text(json.dumps(m))
    again = extract(small_req, root=tmp_path / "s", progress=False)
    assert "holds another request" in capsys.readouterr().out and again.manifest["request"]["tokens"] == 200


# ---------------------------------------------------------------------------------------------------------
# 5, 6. weights and tokenizer: checked by content, not by a stat memo


@pytest.fixture
def fake_gguf_build(cache_env, monkeypatch):
    """Replace the (45 s) GGUF dequantisation by a deterministic small state; count the builds."""
    return fakes.fake_gguf_build(monkeypatch)


def test_bit_rot_in_cached_weights_that_keeps_mtime_is_detected(fake_gguf_build, capsys):
    clean = models.weights_identity(SMOL)
    weights = fake_gguf_build[0] / "model.safetensors"
    sha = cache.sha256_bytes_of_file(weights)
    flip_in_place(weights)
    forge_memo({weights: sha})  # the stat memo now vouches for the rotten file: it must not be trusted for weights
    assert models.weights_identity(SMOL) == clean and len(fake_gguf_build) == 2
    assert "model.safetensors does not match the sha256 recorded" in capsys.readouterr().out


def test_a_changed_or_truncated_tokenizer_is_detected_and_rebuilt(fake_gguf_build, capsys):
    clean = models.weights_identity(SMOL)
    tok = fake_gguf_build[0] / "tokenizer" / "tokenizer.json"
    spec = json.loads(tok.read_text())
    spec["normalizer"] = {"type": "Lowercase"}  # other tokens for the same weights
    tok.write_text(json.dumps(spec))
    cache._CONTENT_VERIFIED.clear()
    assert models.weights_identity(SMOL) == clean and len(fake_gguf_build) == 2
    assert f"{tok} is missing, extra or changed" in capsys.readouterr().out
    tok.write_text(tok.read_text()[:100])  # truncated
    cache._CONTENT_VERIFIED.clear()
    assert models.weights_identity(SMOL) == clean and len(fake_gguf_build) == 3
    # a cache from before tokenizer hashes were recorded is rebuilt, once
    cfg = fake_gguf_build[0] / "tl_config.json"
    meta = json.loads(cfg.read_text())
    del meta["tokenizer_sha256"]
    cfg.write_text(json.dumps(meta))
    assert models.weights_identity(SMOL) == clean and len(fake_gguf_build) == 4
    assert "records no tokenizer sha256" in capsys.readouterr().out
    assert models.weights_identity(SMOL) == clean and len(fake_gguf_build) == 4


def test_identities_cover_the_tokenizer(fake_gguf_build, monkeypatch):
    ident = models.weights_identity(SMOL)
    meta = json.loads((fake_gguf_build[0] / "tl_config.json").read_text())
    assert ident == models.cache_identity(meta) != models.cache_identity({**meta, "tokenizer_sha256": {"x": "0"}})
    tiny = models.tiny_weights_identity("tiny-gemma2")
    real = models.byte_tokenizer

    def other_tokenizer():
        from tokenizers import normalizers

        tk = real()
        tk.backend_tokenizer.normalizer = normalizers.Lowercase()
        return tk

    monkeypatch.setattr(models, "byte_tokenizer", other_tokenizer)
    assert models.tiny_weights_identity("tiny-gemma2") != tiny


def test_hub_tokenizer_files_are_verified_against_their_git_address(tmp_path, cache_env, monkeypatch):
    import hashlib

    hub = tmp_path / "hub"
    repo_dir, snap = fakes.fake_hub_repo(hub, monkeypatch)
    files = [("model-00001.safetensors", b"weights one", "sha256"), ("config.json", b"{}", "git"),
             ("tokenizer_config.json", b'{"add_bos_token": true}', "git")]
    for name, content, kind in files:
        addr = (hashlib.sha256(content).hexdigest() if kind == "sha256"
                else hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest())
        (repo_dir / "blobs" / addr).write_bytes(content)
        (snap / name).symlink_to(repo_dir / "blobs" / addr)
    ident = models.weights_identity("gemma-2-2b")
    blob = (snap / "tokenizer_config.json").resolve()
    blob.write_bytes(b'{"add_bos_token": false}')
    cache._CONTENT_VERIFIED.clear()
    with pytest.raises(RuntimeError, match=r"tokenizer_config.json of google/gemma-2-2b\) is corrupted"):
        models.weights_identity("gemma-2-2b")
    assert len(ident) == 64


def test_store_shard_bit_flip_that_keeps_mtime_is_repaired(tmp_path, cache_env, corpus, capsys):
    from bench.store import StoreError, extract

    store = extract(_req(corpus), root=tmp_path / "s", progress=False)
    clean = store.all_rows(1).acts.clone()
    shard = store.path / "L01" / "shard_00000.safetensors"
    flip_in_place(shard)  # ctime moves, whatever mtime says: the memo misses, the reuse check repairs it
    again = extract(_req(corpus), root=tmp_path / "s", progress=False)
    assert "needs repair" in capsys.readouterr().out
    torch.testing.assert_close(again.all_rows(1).acts, clean, rtol=0, atol=0)
    sha = cache.sha256_bytes_of_file(shard)
    flip_in_place(shard)
    forge_memo({shard: sha})  # damage the memo cannot see: the read refuses it and the next extract repairs it
    reused = extract(_req(corpus), root=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="shard_00000.safetensors is corrupted"):
        reused.all_rows(1)
    repaired = extract(_req(corpus), root=tmp_path / "s", progress=False)
    assert "needs repair" in capsys.readouterr().out
    torch.testing.assert_close(repaired.all_rows(1).acts, clean, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# 7, 8. cells carry a checksum; report and browse read only verified rows


def _flip_value(cell: Path) -> None:
    """Change one digit of the first row's value, keeping the file valid JSON (a one-bit flip)."""
    text = cell.read_text()
    at = text.index('"value": ') + len('"value": ')
    while not text[at].isdigit():
        at += 1
    text = text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1:]
    cell.write_text(text)


def test_a_flipped_cell_is_named_recomputed_and_never_reaches_the_tables(tmp_path, smoke_run, capsys, monkeypatch):
    from bench.runner import read_cell, run_suite, verify_tables

    suite, _, _ = smoke_run
    run_dir = _copy_run(smoke_run, tmp_path / "results" / "r")
    clean = _values(run_dir)
    cell = next(p for p in sorted((run_dir / "cells").glob("*.json")) if "retrieval" in p.name)
    assert "sha256" in json.loads(cell.read_text())
    _flip_value(cell)
    assert read_cell(cell) is None and f"cell file {cell} is damaged" in capsys.readouterr().out
    assert verify_tables(run_dir) is True
    out = capsys.readouterr().out
    assert f"cell file {cell} is damaged" in out and "older than the cells" not in out
    assert not set(_values(run_dir).index.get_level_values(0)) & {cell.stem}  # left out, not read damaged
    assert main(["report", "r", "--results-dir", str(tmp_path / "results")]) == 1
    assert f"cell file {cell} is damaged" in one_line(capsys.readouterr().err)
    monkeypatch.setenv("EPBENCH_CACHE", str(smoke_run[2] / "cache"))
    run_suite(suite, tmp_path / "results", run_id="r", progress=False, report=False)
    assert f"cell file {cell} is damaged (its sha256 does not match its content); it will be recomputed" \
        in capsys.readouterr().out
    pd.testing.assert_series_equal(_values(run_dir).drop(index=cell.stem, level=0),
                                   clean.drop(index=cell.stem, level=0))
    assert (_values(run_dir).loc[cell.stem].index == clean.loc[cell.stem].index).all()


def test_legacy_cells_without_a_checksum_are_read_and_said_so_once(tmp_path, capsys):
    from bench.runner import read_cell

    committed = sorted((ROOT / "results" / "reference" / "cells").glob("*.json"))[:3]
    assert committed, "results/reference/cells is part of the repository"
    dst = tmp_path / "cells"
    dst.mkdir()
    for p in committed:  # as cells written before checksums existed: the same records without their sha256
        rec = json.loads(p.read_text())
        rec.pop("sha256", None)
        (dst / p.name).write_text(json.dumps(rec))
    recs = [read_cell(p) for p in sorted(dst.glob("*.json"))]
    assert all(r is not None and "sha256" not in r for r in recs)
    assert capsys.readouterr().out.count("carry no checksum") == 1


def test_browse_rebuilds_damaged_tables_before_reading_them(tmp_path, smoke_run, capsys, monkeypatch):
    from bench.browser import BrowseConfig, browse

    run_dir = _copy_run(smoke_run, tmp_path / "results" / "r")
    monkeypatch.setenv("EPBENCH_CACHE", str(smoke_run[2] / "cache"))
    clean = browse("r", tmp_path / "clean", BrowseConfig(sample_contexts=8), tmp_path / "results")
    p = run_dir / "rows.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x10
    p.write_bytes(bytes(data))
    capsys.readouterr()
    site = browse("r", tmp_path / "site", BrowseConfig(sample_contexts=8), tmp_path / "results")
    assert "rows.parquet is missing or damaged" in capsys.readouterr().out

    def metrics(s):
        text = (s / "data" / "index.js").read_text()
        return [a["metrics"] for a in json.loads(text[text.index("(") + 1:text.rindex(")")])["artefacts"]]

    assert metrics(site) == metrics(clean) and metrics(site)[0]


# ---------------------------------------------------------------------------------------------------------
# 9, 15. concept files


def _concept_file(tmp_path, rows):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


BASE = [{"text": t, "concept": "cats", "category": c, "split": s} for t, c, s in
        [("a cat", "positive", "train"), ("a car", "negative", "train"), ("the cat", "positive", "test"),
         ("the car", "negative", "test")]]


def test_contradictory_labels_and_non_string_texts_are_refused(tmp_path):
    from bench.concepts import load_concept_file

    load_concept_file(_concept_file(tmp_path, BASE))
    bad = BASE + [{"text": "a cat", "concept": "cats", "category": "negative", "split": "train"}]
    with pytest.raises(ValueError, match=r"c.jsonl:5: this text is labelled 'negative' for concept 'cats', but "
                                         r"line 1 labels it 'positive'"):
        load_concept_file(_concept_file(tmp_path, bad))
    for value in (12345, ["a", "b"], {"t": 1}, True):
        rows = BASE + [{"text": value, "concept": "cats", "category": "negative", "split": "test"}]
        with pytest.raises(ValueError, match=r"c.jsonl:5: text is a \w+ .*not a string"):
            load_concept_file(_concept_file(tmp_path, rows))


def test_a_huge_line_in_a_concept_file_is_cut_far_past_the_context(tmp_path, capsys):
    from bench.concepts import MAX_TEXT_CHARS, load_concept_file

    huge = "cat " * 2_500_000  # 10 MB on one line
    rows = BASE + [{"text": huge, "concept": "cats", "category": "positive", "split": "test"}]
    t0 = time.perf_counter()
    cs = load_concept_file(_concept_file(tmp_path, rows))
    tokens = [len(t) for t in cs.texts()]
    assert max(tokens) == MAX_TEXT_CHARS and "were cut there" in capsys.readouterr().out
    trunc = cs.count_truncated(models.byte_tokenizer(), 64)
    assert trunc.n_truncated == 1 and time.perf_counter() - t0 < 20
    assert cs.texts()[-1] == huge[:MAX_TEXT_CHARS]


# ---------------------------------------------------------------------------------------------------------
# 10. every field from an artefact or a run is escaped in the page


def test_hostile_artefact_info_never_runs_script_in_the_page(tmp_path, cache_env):
    from bench.browser import browse

    hostile = '<img src=x onerror="window.__pwned=1">'
    art_dir = _synthetic_artefact(tmp_path, {"p": hostile, "theta": 0.5, "label": f"random{hostile}",
                                             "cost": {"tokens": hostile, "rows": 1}})
    site = browse(str(art_dir), tmp_path / "site")
    text = (site / "data" / "index.js").read_text()
    entry = json.loads(text[text.index("(") + 1:text.rindex(")")])["artefacts"][0]
    assert entry["p"] is None and entry["cost"]["tokens"] is None  # numbers only, from Python
    # and the page escapes even what an older or edited index.js holds
    index = json.loads(text[text.index("(") + 1:text.rindex(")")])
    index["artefacts"][0].update(p=hostile, layer=hostile)
    (site / "data" / "index.js").write_text(f"EPB.index({json.dumps(index)});\n")
    try:
        from bench.browser.chromium import chromium, chromium_paths, open_site

        chromium_paths()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"headless Chromium is not installed ({e})")
    drv = chromium(tmp_path / "profile")
    try:
        open_site(drv, site)
        aid = index["artefacts"][0]["id"]
        drv.get((site / "index.html").resolve().as_uri() + f"#/a/{aid}")
        time.sleep(0.5)
        assert drv.execute_script("return window.__pwned === undefined")
        assert hostile in drv.find_element("id", "main").text  # shown as text
        assert not drv.find_elements("css selector", "#main img")
    finally:
        drv.quit()


# ---------------------------------------------------------------------------------------------------------
# 11. a real full disk during extract, build --out and export: one line, no partial file


def test_a_real_full_disk_is_one_line_for_extract_build_and_export(tmp_path, cache_env, corpus, capsys):
    with tmpfs(tmp_path / "disk", "96k") as disk:
        args = ["--model", "tiny-gemma2", "--corpus", corpus, "--tokens", "3000", "--ctx-len", "64"]
        assert main(["extract", "--layers", "1", *args, "--store-dir", str(disk / "stores"), "--quiet"]) == 1
        line = one_line(capsys.readouterr().err)
        assert f"{disk}/stores/" in line and "No space left on device" in line and "free disk space" in line
        assert not list(disk.rglob("*.tmp"))
        # build --out on the full disk (its store elsewhere)
        fill(disk)
        assert main(["build", "--method", "pca", "--layer", "1", *args, "--out", str(disk / "arts"), "--k", "8"]) == 1
        line = one_line(capsys.readouterr().err)
        assert f"{disk}/arts" in line and "No space left on device" in line
        assert not list(disk.rglob("*.tmp")) and not list(disk.rglob("artefact.safetensors"))
        art = _synthetic_artefact(tmp_path / "art")
        assert main(["export", str(art), "--format", "sae-lens", str(disk / "sae")]) == 1
        line = one_line(capsys.readouterr().err)
        assert f"{disk}/sae" in line and "No space left on device" in line
        assert not (disk / "sae").exists() and not list(disk.glob(".sae.*"))


# ---------------------------------------------------------------------------------------------------------
# 12, 13, 14, 16. one line, never a traceback or a hang


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch (or no GPU)")
def test_a_method_device_this_torch_cannot_use_is_one_line(tmp_path, cache_env, capsys):
    assert main(["run", "--suite", "smoke", "--method", "ep:device=cuda", "--results-dir", str(tmp_path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "method 'ep:device=cuda': device=cuda" in line and "use device=cpu" in line
    assert not (tmp_path / "smoke").exists() and not list(tmp_path.iterdir())


def test_a_ray_address_nobody_listens_on_fails_in_seconds(tmp_path, cache_env, capsys):
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    t0 = time.perf_counter()
    rc = main(["run", "--suite", "smoke", "--layers", "1", "--method", "pca", "--metrics", "build",
               "--executor", "ray", "--address", f"127.0.0.1:{port}", "--results-dir", str(tmp_path), "--no-report"])
    assert rc == 1 and time.perf_counter() - t0 < 30  # runtime: the cluster, not the command line
    line = one_line(capsys.readouterr().err)
    assert f"no Ray cluster answers at --address 127.0.0.1:{port}" in line and "ray start --head" in line
    from bench.executors import check_address

    with pytest.raises(ValueError, match="is not host:port"):
        check_address("somewhere")


@pytest.mark.parametrize("source, what", [
    ("SUITE = Suite(name='x',\n", "syntax error at line 1"),
    ("from bench.suites import Suite\nOTHER = 1\n", "it defines no SUITE"),
    ("import epbench_no_such_module\n", "ModuleNotFoundError"),
])
def test_a_broken_suite_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, source, what):
    import bench.suites as suites

    name = f"broken_{abs(hash(source)) % 10_000}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.setattr(suites, "__path__", [str(tmp_path), *suites.__path__])
    monkeypatch.setattr(suites, "available_suites", lambda: [name])
    assert main(["run", "--suite", name, "--results-dir", str(tmp_path / "r")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"suite file {tmp_path / name}.py cannot be loaded ({what}" in line
    sys.modules.pop(f"bench.suites.{name}", None)


def test_browse_flags_and_unknown_methods_are_one_line(tmp_path, smoke_run, capsys, monkeypatch):
    _copy_run(smoke_run, tmp_path / "results" / "r")
    monkeypatch.setenv("EPBENCH_CACHE", str(smoke_run[2] / "cache"))
    for flag, value in (("--sample-contexts", "0"), ("--top-contexts", "-1"), ("--shard-features", "0")):
        assert main(["browse", "r", "--results-dir", str(tmp_path / "results"), flag, value]) == 2
        assert f"{flag} must be an integer >= 1, got {value}" in one_line(capsys.readouterr().err)
    assert main(["browse", "r", "--results-dir", str(tmp_path / "results"), "--methods", "nosuch"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--methods nosuch: not a method spec or artefact label" in line and "pca" in line
    assert not (tmp_path / "results" / "r" / "browser").exists()


def test_a_pickle_or_garbage_under_sae_lens_names_is_one_line(tmp_path, cache_env, capsys):
    import pickle  # noqa: S403 - written only, to be refused; the loader never unpickles

    from bench.store import write_synthetic_store
    from methods.sae import SAEConfig, load_from_path

    store = write_synthetic_store(tmp_path / "s", {1: torch.randn(4, 6, 12)})
    d = tmp_path / "sae"
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 12, "d_sae": 8}))
    (d / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": [[1.0]]}))
    with pytest.raises(ValueError, match="sae_weights.safetensors is missing or not a safetensors file"):
        load_from_path(SAEConfig(path=str(d)), store, 1)
    (d / "cfg.json").write_text("{garbage")
    with pytest.raises(ValueError, match="cfg.json is not a JSON object"):
        load_from_path(SAEConfig(path=str(d)), store, 1)
    from safetensors.torch import save_file

    save_file({"W_enc": torch.zeros(12, 8)}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"architecture": "no-such-architecture", "d_in": "twelve"}))
    with pytest.raises(ValueError, match=r"is not a loadable sae-lens SAE \(") as e:
        load_from_path(SAEConfig(path=str(d)), store, 1)
    assert "\n" not in str(e.value)


def test_a_prompt_longer_than_the_context_is_one_line(tiny_model):
    with pytest.raises(ValueError, match=r"is \d+ tokens with BOS, longer than the context of tiny-gemma2 \(256 "
                                         r"tokens\); shorten it or remove it"):
        tiny_model.to_tokens(["x" * 400])
    toks, lengths = tiny_model.to_tokens(["x" * 400], ctx_len=64)  # cut to a context length: fine
    assert int(lengths[0]) == 64
