"""The shared activation store: extract once, every method and metric reads the same rows.

Layout of a store directory (`<cache>/stores/<id>/`, id = content hash of the request):

    manifest.json                     what was extracted (model, weights sha256, hooks, ctx_len, dtype, BOS/pad
                                      policy, tokenizer, corpus fingerprint, order, seed, counts, shards);
                                      "status" is "complete" only after the last shard landed
    meta/shard_00000.safetensors      per row: context_id, doc_id, position, token_id (int64);
                                      per context: context_tokens [n_ctx, ctx_len] (pad-filled), context_doc
    L06/shard_00000.safetensors       "acts": [rows, d_model] for layer 6 (one folder per layer)
    shards/shard_00000.json           written last for each shard: rows, context range, sha256 of its files

Row order: contexts in corpus order (documents chunked into pieces of ctx_len - 1 tokens, BOS prepended),
rows within a context by position; BOS (position 0) and right padding are excluded. Shard files are written to
a temporary name and renamed, and a shard counts only once its JSON exists, so a killed run never leaves a
shard that reads as complete; rerunning resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from bench.cache import cache_dir, file_lock, forget_sha256, mismatched_files, remember_sha256, save_safetensors

STORE_FORMAT_VERSION = 1
BOS_POLICY = "BOS prepended to every context; the BOS position is excluded from rows"
PAD_POLICY = "contexts right-padded to ctx_len; pad positions are excluded from rows"


class StoreError(RuntimeError):
    """A store is missing, incomplete or corrupted; the message names the file and the fix."""


@dataclass
class ExtractionRequest:
    """What to extract. Every field is part of the store's identity (its content hash)."""

    model: str
    layers: list[int]
    corpus: str = "default"
    tokens: int = 200_000  # token budget, BOS included (contexts are taken whole until it is reached)
    ctx_len: int = 128
    dtype: str = "float32"  # storage dtype: float32 or float16
    seed: int = 0  # corpus order seed
    max_contexts_per_doc: int | None = None  # None: chunk whole documents; 1: one (truncated) context per doc
    batch_contexts: int = 32  # forward-pass batch
    shard_contexts: int = 128  # contexts per shard (multiple of batch_contexts)
    max_docs: int | None = None  # first n documents of the corpus (needed for a streamed hf: dataset)

    def __post_init__(self) -> None:
        self.layers = sorted({int(L) for L in self.layers})
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, not {self.dtype!r}")
        if self.tokens <= 0 or self.ctx_len < 2:
            raise ValueError(f"tokens must be > 0 and ctx_len >= 2 (got tokens={self.tokens}, ctx_len={self.ctx_len})")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"max_docs must be >= 1, got {self.max_docs}")
        if self.shard_contexts % self.batch_contexts:
            raise ValueError("shard_contexts must be a multiple of batch_contexts")


class ActivationBatch(NamedTuple):
    """Rows of consecutive contexts. `acts` is [N, d] float32, or {layer: [N, d]} for multi-layer reads."""

    acts: Any
    context_ids: torch.Tensor  # [N] int64, index of the context in store order
    doc_ids: torch.Tensor  # [N] int64, document id in the corpus
    positions: torch.Tensor  # [N] int64, position in its context (BOS is 0, so rows start at 1)
    token_ids: torch.Tensor  # [N] int64
    n_tokens: int  # tokens behind these rows, BOS included


def stores_root(root: str | Path | None = None) -> Path:
    return Path(root) if root else cache_dir() / "stores"


def _atomic_write_json(path: Path, obj: Any) -> None:
    from bench.cache import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Save through a unique temporary name (removed on any failure; a full disk is an OSError naming `path`, not
    safetensors' own error); returns the file's sha256."""
    return save_safetensors(tensors, path)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("epbench", "torch", "transformer-lens", "transformers", "sae-lens", "numpy"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            pass
    return out


# ---------------------------------------------------------------------------------------------------------
# Contexts


class Context(NamedTuple):
    doc_id: int
    tokens: list[int]  # BOS + up to ctx_len - 1 text tokens


def encode_upto(backend: Any, text: str, limit: int) -> list[int]:
    """The first `limit` tokens of `text`, exactly as encoding the whole text would give them, without encoding
    all of a huge document: prefixes of doubling length are encoded until two agree on the first `limit` tokens."""
    n = max(4096, 8 * limit)
    if len(text) <= 2 * n:
        return backend.encode_text(text)[:limit]
    prev = backend.encode_text(text[:n])
    while 2 * n < len(text):
        n *= 2
        nxt = backend.encode_text(text[:n])
        if len(prev) > limit and prev[:limit] == nxt[:limit]:
            return nxt[:limit]
        prev = nxt
    return backend.encode_text(text)[:limit]


def iter_contexts(documents: Any, backend: Any, ctx_len: int, max_contexts_per_doc: int | None,
                  token_budget: int | None = None) -> Iterator[Context]:
    """Chunk each document into BOS + (ctx_len - 1)-token contexts, in corpus order, until `token_budget` tokens
    (BOS included) are covered; a document is tokenized only as far as the contexts it can still contribute."""
    step = ctx_len - 1
    total = 0
    for doc in documents:
        if token_budget is not None and total >= token_budget:
            return
        limit = None
        if token_budget is not None:  # whole contexts of step text tokens + BOS until the budget is passed
            limit = -(-(token_budget - total) // (step + 1)) * step
        if max_contexts_per_doc is not None:
            limit = min(limit or step * max_contexts_per_doc, step * max_contexts_per_doc)
        ids = backend.encode_text(doc.text) if limit is None else encode_upto(backend, doc.text, limit)
        for i in range(0, len(ids), step):
            if token_budget is not None and total >= token_budget:
                return
            ctx = Context(doc.doc_id, [backend.bos_id] + ids[i : i + step])
            total += len(ctx.tokens)
            yield ctx


def plan_contexts(documents: Any, backend: Any, req: ExtractionRequest) -> list[Context]:
    """All contexts the request covers: whole contexts until the token budget (BOS included) is reached."""
    out = list(iter_contexts(documents, backend, req.ctx_len, req.max_contexts_per_doc, req.tokens))
    if not out:
        raise ValueError(f"corpus {req.corpus!r} produced no tokens; check that it has non-empty documents")
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading


class ActivationStore:
    """A complete store on disk; streams rows back in batches with bounded memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise StoreError(f"{mpath} not found: not an activation store (run `epbench extract`)")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except (UnicodeDecodeError, ValueError) as e:
            raise StoreError(f"{mpath} is corrupted ({e}); rerun the same `epbench extract` to repair it") from e
        if not _manifest_shape_ok(self.manifest):
            raise StoreError(f"{mpath} does not have the shape of a store manifest; rerun the same "
                             "`epbench extract` to repair it (or delete the store folder)")
        if self.manifest.get("status") != "complete":
            raise StoreError(f"store {self.path} is incomplete (interrupted?); rerun the same `epbench extract` to resume")
        self._shards: list[dict[str, Any]] = self.manifest["shards"]
        self._cache: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for sh in self._shards:
            for rel, meta in sh["files"].items():
                p = self.path / rel
                if not p.exists():
                    raise StoreError(f"shard file {p} is missing; rerun the same `epbench extract` to rebuild it")
                if p.stat().st_size != meta["bytes"]:
                    raise StoreError(f"shard file {p} is truncated ({p.stat().st_size} of {meta['bytes']} bytes); "
                                     f"rerun the same `epbench extract` to rebuild it")

    def damaged_files(self) -> list[Path]:
        """Shard files whose bytes no longer match the sha256 recorded at write time (stat-keyed memo: only files
        changed since they were last verified are read)."""
        return mismatched_files({self.path / rel: m["sha256"] for sh in self._shards for rel, m in sh["files"].items()})

    # identity ---------------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def model(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["model"]["d_model"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_contexts(self) -> int:
        return int(self.manifest["n_contexts"])

    def hook_name(self, layer: int) -> str:
        return self.manifest["hooks"][str(layer)]

    def provenance(self, layer: int | None = None) -> dict[str, Any]:
        """What an artefact or result records about the data it came from."""
        out = {"store_id": self.id, "model": self.model, "weights_sha256": self.manifest["model"]["weights_sha256"],
               "corpus": self.manifest["corpus"]["name"], "ctx_len": self.manifest["ctx_len"]}
        if layer is not None:
            out.update(layer=layer, hook=self.hook_name(layer))
        return out

    def check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in store {self.id} (layers {self.layers}); extract it first")

    # shard access -------------------------------------------------------------------------------------------
    def _load(self, kind: str, index: int) -> dict[str, torch.Tensor]:
        """Load one shard file after checking its sha256 (keeps only the last shard of each kind in memory)."""
        key = (kind, index)
        if key not in self._cache:
            rel = f"{kind}/shard_{index:05d}.safetensors"
            p = self.path / rel
            data = p.read_bytes()
            expected = self._shards[index]["files"][rel]["sha256"]
            if hashlib.sha256(data).hexdigest() != expected:
                forget_sha256([p])  # so the next open hashes it again and repairs it, whatever its stat says
                raise StoreError(f"shard file {p} is corrupted (sha256 mismatch); rerun the same command: "
                                 "`epbench extract` (and every run, which extracts first) repairs damaged shards")
            self._cache = {k: v for k, v in self._cache.items() if k[0] != kind}
            self._cache[key] = load_bytes(data)
        return self._cache[key]

    def _context_rows(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Row start offsets per context of a shard (for slicing whole contexts)."""
        ctx = self._load("meta", index)["context_id"].numpy()
        lo = self._shards[index]["contexts"][0]
        n = self._shards[index]["contexts"][1] - lo
        counts = np.bincount(ctx - lo, minlength=n)
        return np.concatenate([[0], np.cumsum(counts)]), counts

    def batches(
        self,
        layer: int | Sequence[int],
        batch_contexts: int = 128,
        shuffle_seed: int | None = None,
        max_tokens: int | None = None,
    ) -> Iterator[ActivationBatch]:
        """Rows of `batch_contexts` consecutive contexts per batch (128 contexts x 127 rows: the paper's batch).

        With several layers, `acts` is a dict layer -> [N, d] over the same rows. `shuffle_seed` permutes shard
        order and contexts within each shard (block shuffle, so memory stays at one shard). `max_tokens` stops
        before the batch that would start past the budget (tokens include BOS).
        """
        layers = [layer] if isinstance(layer, int) else list(layer)
        for L in layers:
            self.check_layer(L)
        rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        order = rng.permutation(len(self._shards)) if rng is not None else range(len(self._shards))
        pending: list[tuple[int, int]] = []  # (shard, context offset) of the batch being filled
        seen_tokens = 0

        def emit(items: list[tuple[int, int]]) -> ActivationBatch:
            parts: dict[str, list] = {"acts": [], "context_id": [], "doc_id": [], "position": [], "token_id": []}
            for sh, off in items:
                starts, _ = self._context_rows(sh)
                a, b = int(starts[off]), int(starts[off + 1])
                meta = self._load("meta", sh)
                for k in ("context_id", "doc_id", "position", "token_id"):
                    parts[k].append(meta[k][a:b])
                parts["acts"].append({L: self._load(f"L{L:02d}", sh)["acts"][a:b] for L in layers})
            acts = {L: torch.cat([p[L] for p in parts["acts"]]).float() for L in layers}
            n_rows = sum(len(x) for x in parts["position"])
            return ActivationBatch(
                acts[layers[0]] if isinstance(layer, int) else acts,
                torch.cat(parts["context_id"]),
                torch.cat(parts["doc_id"]),
                torch.cat(parts["position"]),
                torch.cat(parts["token_id"]),
                n_rows + len(items),  # + one BOS per context
            )

        for sh in order:
            n_ctx = self._shards[sh]["contexts"][1] - self._shards[sh]["contexts"][0]
            offs = rng.permutation(n_ctx) if rng is not None else range(n_ctx)
            for off in offs:
                pending.append((int(sh), int(off)))
                if len(pending) == batch_contexts:
                    batch = emit(pending)
                    pending = []
                    if max_tokens is not None and seen_tokens >= max_tokens:
                        return
                    seen_tokens += batch.n_tokens
                    yield batch
        if pending and not (max_tokens is not None and seen_tokens >= max_tokens):
            yield emit(pending)

    def all_rows(self, layer: int | Sequence[int]) -> ActivationBatch:
        """Every row of the store in order (for small stores such as concept sets)."""
        parts = list(self.batches(layer, batch_contexts=max(1, self.n_contexts)))
        return parts[0]

    def context_tokens(self, context_id: int) -> list[int]:
        """Token ids of one context (BOS first, padding removed)."""
        for i, sh in enumerate(self._shards):
            lo, hi = sh["contexts"]
            if lo <= context_id < hi:
                meta = self._load("meta", i)
                toks = meta["context_tokens"][context_id - lo]
                return toks[: int(meta["context_len"][context_id - lo])].tolist()
        raise IndexError(f"context {context_id} not in store ({self.n_contexts} contexts)")


def _manifest_shape_ok(m: Any) -> bool:
    """A manifest is a dict with a request and model dict and, once complete, a list of shard records."""
    if not (isinstance(m, dict) and isinstance(m.get("model"), dict) and isinstance(m.get("request"), dict)):
        return False
    if m.get("status") != "complete":
        return True
    shards = m.get("shards")
    return (isinstance(shards, list) and isinstance(m.get("layers"), list)
            and all(isinstance(sh, dict) and isinstance(sh.get("files"), dict) and isinstance(sh.get("contexts"), list)
                    for sh in shards))


def identity_problem(path: Path, manifest: dict[str, Any]) -> str:
    """"" when a store's manifest is the store its folder is named for: the request, corpus fingerprint and weights
    identity it records hash to its id, and the id is the folder's name; else what is wrong. (A folder copied or
    renamed under another request's id, or a manifest edited to claim another request, is never reused.)
    Synthetic stores (`write_synthetic_store`: arrays, no request) are named by their content and not checked."""
    sid = manifest.get("id")
    if isinstance(sid, str) and sid.startswith("synthetic-"):
        return ""
    try:
        want = request_id(ExtractionRequest(**manifest["request"]), manifest["corpus"],
                          manifest["model"]["weights_id"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"its manifest does not record a whole request, corpus and weights identity ({type(e).__name__}: {e})"
    if want != sid:
        return f"the request, corpus and weights its manifest records hash to {want}, not to its id {sid}"
    if path.name != sid:
        return f"it is the store {sid} under the folder name {path.name}"
    return ""


def open_verified(path: Path) -> tuple[ActivationStore | None, str]:
    """(store, "") when the store at `path` is complete, is the store its folder is named for (`identity_problem`)
    and every shard matches its sha256; else (None, why)."""
    try:
        store = ActivationStore(path)
    except StoreError as e:
        return None, str(e)
    problem = identity_problem(Path(path), store.manifest)
    if problem:
        return None, f"not the store it is filed as: {problem}"
    bad = store.damaged_files()
    if bad:
        return None, f"{len(bad)} shard file(s) damaged (sha256 mismatch), first {bad[0]}"
    return store, ""


# ---------------------------------------------------------------------------------------------------------
# Writing


def request_id(req: ExtractionRequest, corpus_fingerprint: dict[str, Any], weights_id: str) -> str:
    """A store's id: hash of the request, the corpus fingerprint and the weights identity
    (`bench.models.weights_identity`), so other weights or other texts never reuse a store."""
    request = asdict(req)
    if request["max_docs"] is None:  # added later: absent when unset, so earlier store ids stay valid
        del request["max_docs"]
    blob = json.dumps({"v": STORE_FORMAT_VERSION, "request": request, "corpus": corpus_fingerprint,
                       "weights": weights_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _shard_complete(path: Path, index: int) -> dict[str, Any] | None:
    """The shard's record if its JSON exists and every file it names has the recorded size."""
    jp = path / "shards" / f"shard_{index:05d}.json"
    if not jp.exists():
        return None
    try:
        rec = json.loads(jp.read_text())
        ok = all((path / rel).exists() and (path / rel).stat().st_size == m["bytes"] for rel, m in rec["files"].items())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a torn or malformed record: the shard is recomputed
    return rec if ok else None


def _context_table(contexts: Sequence[Context], ctx_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    toks = torch.full((len(contexts), ctx_len), pad_id, dtype=torch.long)
    for i, c in enumerate(contexts):
        toks[i, : len(c.tokens)] = torch.tensor(c.tokens)
    return {
        "context_tokens": toks,
        "context_len": torch.tensor([len(c.tokens) for c in contexts], dtype=torch.long),
        "context_doc": torch.tensor([c.doc_id for c in contexts], dtype=torch.long),
    }


def _write_shard(path: Path, si: int, ctx_range: tuple[int, int], meta: dict[str, torch.Tensor],
                 acts: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Write one shard's files atomically, then its JSON record (which is what marks it complete)."""
    files: dict[str, dict[str, Any]] = {}
    for kind, tensors in [("meta", meta)] + [(f"L{L:02d}", {"acts": a.contiguous()}) for L, a in acts.items()]:
        rel = f"{kind}/shard_{si:05d}.safetensors"
        (path / kind).mkdir(parents=True, exist_ok=True)
        sha = _atomic_save(tensors, path / rel)
        files[rel] = {"sha256": sha, "bytes": (path / rel).stat().st_size}
    rec = {"index": si, "contexts": list(ctx_range), "rows": int(meta["position"].numel()),
           "tokens": int(meta["context_len"].sum()), "files": files}
    (path / "shards").mkdir(exist_ok=True)
    _atomic_write_json(path / "shards" / f"shard_{si:05d}.json", rec)
    return rec


def _finish(path: Path, manifest: dict[str, Any], records: list[dict[str, Any]],
            seconds: float | None = None) -> "ActivationStore":
    if seconds is not None:  # the call that completed the store (a resumed run counts its last call only)
        manifest["extraction_seconds"] = round(seconds, 2)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest.update(
        status="complete",
        shards=records,
        n_contexts=sum(r["contexts"][1] - r["contexts"][0] for r in records),
        n_rows=sum(r["rows"] for r in records),
        n_tokens=sum(r["tokens"] for r in records),
        bytes=sum(m["bytes"] for r in records for m in r["files"].values()),
    )
    _atomic_write_json(path / "manifest.json", manifest)
    # the hashes were computed as the files were written: record them so the next verification is a stat
    remember_sha256({path / rel: m["sha256"] for r in records for rel, m in r["files"].items()})
    return ActivationStore(path)


def write_synthetic_store(
    path: str | Path,
    acts_by_layer: dict[int, torch.Tensor],
    shard_contexts: int = 64,
    model: str = "synthetic",
    doc_ids: Sequence[int] | None = None,
) -> "ActivationStore":
    """Write arrays [n_ctx, T, d] per layer as a store (every context full length; T + 1 tokens with BOS).

    For tests and for users bringing their own activations: the result reads exactly like an extracted store.
    """
    path = Path(path)
    layers = sorted(acts_by_layer)
    n_ctx, T, d = acts_by_layer[layers[0]].shape
    doc_ids = list(doc_ids) if doc_ids is not None else list(range(n_ctx))
    contexts = [Context(doc_ids[i], [0] + [1 + (i * T + t) % 1000 for t in range(T)]) for i in range(n_ctx)]
    sid = hashlib.sha256(b"".join(acts_by_layer[L].numpy().tobytes() for L in layers)).hexdigest()[:16]
    manifest = {
        "format_version": STORE_FORMAT_VERSION, "id": f"synthetic-{sid}", "status": "in_progress",
        "request": {"model": model, "layers": layers, "corpus": "synthetic", "tokens": n_ctx * (T + 1),
                    "ctx_len": T + 1},
        "model": {"name": model, "source": "arrays", "weights_sha256": sid, "weights_id": sid, "d_model": d, "n_layers": max(layers) + 1},
        "layers": layers, "hooks": {str(L): f"blocks.{L}.hook_resid_post" for L in layers}, "ctx_len": T + 1,
        "dtype": "float32", "bos_policy": BOS_POLICY, "pad_policy": PAD_POLICY,
        "tokenizer": {"name": "none", "vocab_size": 1001, "bos_token_id": 0, "pad_token_id": 0},
        "corpus": {"name": "synthetic", "n_docs": len(set(doc_ids))}, "order": "array order", "seed": 0,
        "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.mkdir(parents=True, exist_ok=True)
    records = []
    for si, lo in enumerate(range(0, n_ctx, shard_contexts)):
        hi = min(n_ctx, lo + shard_contexts)
        rows = hi - lo
        meta = {
            "context_id": torch.arange(lo, hi).repeat_interleave(T),
            "doc_id": torch.tensor(doc_ids[lo:hi]).repeat_interleave(T),
            "position": torch.arange(1, T + 1).repeat(rows),
            "token_id": torch.tensor([t for c in contexts[lo:hi] for t in c.tokens[1:]]),
        }
        meta.update(_context_table(contexts[lo:hi], T + 1, 0))
        acts = {L: acts_by_layer[L][lo:hi].reshape(rows * T, d).float() for L in layers}
        records.append(_write_shard(path, si, (lo, hi), meta, acts))
    return _finish(path, manifest, records)


def extract(
    req: ExtractionRequest,
    root: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
    corpus: Any = None,
) -> ActivationStore:
    """Extract (or reuse, or resume) the store for `req`; returns it opened.

    `corpus` passes an in-memory Corpus (e.g. a concept set's texts) instead of resolving `req.corpus`.
    """
    from bench.corpora import get_corpus
    from bench.models import LOADERS, weights_identity
    from bench.synth import extract_synthetic, is_synthetic

    if is_synthetic(req.model):  # samples of a sae_lens.synthetic model, with their ground truth (bench/synth.py)
        return extract_synthetic(req, root=root, force=force, progress=progress)
    if req.model not in LOADERS:
        raise ValueError(f"unknown model {req.model!r}; available: {', '.join(sorted(LOADERS))}")
    corpus = corpus if corpus is not None else get_corpus(req.corpus, seed=req.seed, max_docs=req.max_docs)
    fingerprint = corpus.fingerprint()
    weights_id = weights_identity(req.model)  # verified weights, without loading the model
    sid = request_id(req, fingerprint, weights_id)
    path = stores_root(root) / sid
    path.parent.mkdir(parents=True, exist_ok=True)
    # one writer per store: a second extract of the same request waits, then finds the store complete
    with file_lock(path.parent / f"{sid}.lock", f"store {sid}", wait=True):
        if force and path.exists():
            shutil.rmtree(path)
        reused = _reuse_or_prepare_repair(path, req, fingerprint, weights_id, root, force)
        if reused is not None:
            return reused
        return _extract_locked(req, path, sid, weights_id, fingerprint, corpus, progress, device)


def _reuse_or_prepare_repair(path: Path, req: ExtractionRequest, fingerprint: dict[str, Any], weights_id: str,
                             root: str | Path | None, force: bool) -> ActivationStore | None:
    """The verified store when it is complete and healthy (or a healthy wider one); else None, after removing
    the records of damaged shards so the extraction below rewrites exactly those."""
    mpath = path / "manifest.json"
    try:
        recorded = json.loads(mpath.read_text()) if mpath.exists() else None
    except (OSError, UnicodeDecodeError, ValueError):
        recorded = None  # torn: repaired below
    if _manifest_shape_ok(recorded) and (problem := identity_problem(path, recorded)):
        # another request's store filed under this request's id (a copied or renamed folder, an edited manifest):
        # never reused or resumed; it is derived data, so it is replaced by a fresh extraction of this request
        print(f"[epbench] store {path} holds another request ({problem}); re-extracting it for this request",
              flush=True)
        shutil.rmtree(path)
    if mpath.exists():
        store, problem = open_verified(path)
        if store is not None:
            return store
        try:
            manifest = json.loads(mpath.read_text())
            shards = manifest.get("shards") if isinstance(manifest, dict) else None
        except (OSError, UnicodeDecodeError, ValueError):
            shards = None  # a torn manifest is rewritten below; shards carry their own records
        if isinstance(shards, list) and manifest.get("status") == "complete":
            print(f"[epbench] store {path} needs repair: {problem}; re-extracting the damaged shards", flush=True)
            bad = {Path(p).resolve() for p in mismatched_files(
                {path / rel: m.get("sha256") for sh in shards if isinstance(sh, dict)
                 for rel, m in sh.get("files", {}).items()})}
            for sh in shards:
                files = sh.get("files", {}) if isinstance(sh, dict) else {}
                if any((path / rel).resolve() in bad for rel in files):
                    (path / "shards" / f"shard_{sh['index']:05d}.json").unlink(missing_ok=True)
    elif not force:
        wider = _superset_store(req, fingerprint, weights_id, stores_root(root))
        if wider is not None:
            return wider
    return None


def _extract_locked(req: ExtractionRequest, path: Path, sid: str, weights_id: str, fingerprint: dict[str, Any],
                    corpus: Any, progress: bool, device: str | None) -> ActivationStore:
    """Extract (resuming at the first missing shard) while holding the store's lock."""
    from bench.models import load_model

    mpath = path / "manifest.json"
    t_start = time.perf_counter()
    backend = load_model(req.model, device)
    if backend.weights_id != weights_id:
        raise StoreError(f"the weights of {req.model} changed while loading (identity {backend.weights_id[:12]} "
                         f"loaded, {weights_id[:12]} expected); rerun the same command")
    layers = backend.check_layers(req.layers)
    if req.ctx_len > backend.n_ctx:
        raise ValueError(f"ctx_len {req.ctx_len} exceeds the context of {req.model} ({backend.n_ctx} tokens); "
                         f"use --ctx-len {backend.n_ctx} or less")
    contexts = plan_contexts(corpus.documents(), backend, req)
    path.mkdir(parents=True, exist_ok=True)
    for tmp in path.rglob("*.tmp"):
        tmp.unlink()  # leftovers of a killed write; never read

    manifest: dict[str, Any] = {
        "format_version": STORE_FORMAT_VERSION,
        "id": sid,
        "status": "in_progress",
        "request": asdict(req),
        "model": {"name": req.model, "source": backend.source, "weights_sha256": backend.weights_sha256,
                  "weights_id": weights_id, "d_model": backend.d_model, "n_layers": backend.n_layers},
        "layers": layers,
        "hooks": {str(L): backend.hook_name(L) for L in layers},
        "ctx_len": req.ctx_len,
        "dtype": req.dtype,
        "bos_policy": BOS_POLICY,
        "pad_policy": PAD_POLICY,
        "tokenizer": {"name": getattr(backend.tokenizer, "name_or_path", "") or req.model,
                      "vocab_size": len(backend.tokenizer), "bos_token_id": backend.bos_id,
                      "pad_token_id": backend.pad_id},
        "corpus": fingerprint,
        "order": "corpus order; each document chunked into contexts of ctx_len-1 tokens with BOS prepended",
        "seed": req.seed,
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
            if old["model"]["weights_sha256"] != backend.weights_sha256:
                raise StoreError(f"{path} was started with different weights of {req.model}; "
                                 "rerun with --force to rebuild it")
            manifest["created"] = old.get("created", manifest["created"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            pass
    _atomic_write_json(mpath, manifest)

    np_dtype = torch.float32 if req.dtype == "float32" else torch.float16

    n_shards = (len(contexts) + req.shard_contexts - 1) // req.shard_contexts
    total_tokens = sum(len(c.tokens) for c in contexts)
    records: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"extract {req.model} L{layers}",
               disable=not progress)
    for si in range(n_shards):
        lo, hi = si * req.shard_contexts, min(len(contexts), (si + 1) * req.shard_contexts)
        rec = _shard_complete(path, si)
        if rec is not None and rec["contexts"] == [lo, hi]:
            records.append(rec)
            bar.update(sum(len(c.tokens) for c in contexts[lo:hi]))
            continue
        acts: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
        meta: dict[str, list] = {"context_id": [], "doc_id": [], "position": [], "token_id": []}
        for b in range(lo, hi, req.batch_contexts):
            chunk = contexts[b : min(hi, b + req.batch_contexts)]
            longest = max(len(c.tokens) for c in chunk)  # pad to the batch's longest context, not ctx_len
            out = backend.run_layers(_context_table(chunk, longest, backend.pad_id)["context_tokens"], layers)
            for i, c in enumerate(chunk):
                n = len(c.tokens)
                for L in layers:
                    rows = out[L][i, 1:n]  # what is stored: BOS and padding are not
                    check_storable(rows, req, L)
                    acts[L].append(rows.to("cpu", np_dtype))
                meta["context_id"].append(torch.full((n - 1,), b + i, dtype=torch.long))
                meta["doc_id"].append(torch.full((n - 1,), c.doc_id, dtype=torch.long))
                meta["position"].append(torch.arange(1, n, dtype=torch.long))
                meta["token_id"].append(torch.tensor(c.tokens[1:], dtype=torch.long))
            bar.update(sum(len(c.tokens) for c in chunk))
        meta_t = {k: torch.cat(v) for k, v in meta.items()}
        meta_t.update(_context_table(contexts[lo:hi], req.ctx_len, backend.pad_id))
        rec = _write_shard(path, si, (lo, hi), meta_t, {L: torch.cat(acts[L]) for L in layers})
        records.append(rec)
    bar.close()
    return _finish(path, manifest, records, time.perf_counter() - t_start)


FLOAT16_MAX = 65_504.0


def check_storable(x: torch.Tensor, req: ExtractionRequest, layer: int) -> None:
    """Refuse activations the store cannot hold: NaN/inf from the model, or values beyond float16's range in a
    float16 store (they would be written as inf and fail every method later, far from the cause)."""
    top = x.detach().abs().amax()
    if not torch.isfinite(top):
        raise StoreError(f"{req.model} produced NaN/inf activations at layer {layer}: the model's forward pass is "
                         "broken (check its weights and dtype); nothing was stored for this batch")
    if req.dtype == "float16" and float(top) > FLOAT16_MAX:
        raise StoreError(f"{req.model} activations reach |x| = {float(top):,.0f} at layer {layer}, beyond float16's "
                         f"range ({FLOAT16_MAX:,.0f}): store this model in float32 (a suite's "
                         f"model_store_dtype={{'{req.model}': 'float32'}}, or store_dtype='float32')")


def _superset_store(req: ExtractionRequest, fingerprint: dict[str, Any], weights_id: str,
                    root: Path) -> ActivationStore | None:
    """A complete store of the same request, corpus and weights that captured more layers (a layer's rows do not
    depend on which other layers were captured in the same pass)."""
    want = asdict(req)
    if want["max_docs"] is None:
        del want["max_docs"]  # older manifests do not record it
    for mp in sorted(root.glob("*/manifest.json")) if root.exists() else []:
        try:
            m = json.loads(mp.read_text())
        except json.JSONDecodeError:
            continue
        if not _manifest_shape_ok(m):
            continue
        have = m.get("request", {})
        if (m.get("status") == "complete" and m.get("corpus") == fingerprint
                and m.get("model", {}).get("weights_id") == weights_id
                and set(req.layers) <= set(have.get("layers", []))
                and all(have.get(k) == v for k, v in want.items() if k != "layers")):
            store, problem = open_verified(mp.parent)
            if store is not None:
                return store
            print(f"[epbench] skipping damaged store {mp.parent}: {problem}", flush=True)
    return None


def find_stores(model: str | None = None, layer: int | None = None, root: str | Path | None = None,
                corpus: str | None = None, weights_id: str | None = None,
                request: dict[str, Any] | None = None) -> list[ActivationStore]:
    """Complete, verified stores under root matching model / layer / corpus name / weights identity / request
    fields (e.g. {"tokens": 4000, "ctx_len": 64}), largest first. A damaged store is skipped with a warning naming
    it, so it never blocks a healthy one."""
    out = []
    base = stores_root(root)
    if not base.exists():
        return out
    for mp in sorted(base.glob("*/manifest.json")):
        try:
            m = json.loads(mp.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            print(f"[epbench] skipping store {mp.parent}: unreadable manifest", flush=True)
            continue
        if not _manifest_shape_ok(m) or m.get("status") != "complete":
            continue
        if model and m["model"].get("name") != model:
            continue
        if layer is not None and layer not in m["layers"]:
            continue
        if corpus and m["request"].get("corpus") != corpus:
            continue
        if weights_id and m["model"].get("weights_id") != weights_id:
            continue
        if request and any(m["request"].get(k) != v for k, v in request.items()):
            continue
        store, problem = open_verified(mp.parent)
        if store is None:
            print(f"[epbench] skipping damaged store {mp.parent}: {problem} (rerun its `epbench extract` to repair "
                  "it)", flush=True)
            continue
        out.append(store)
    return sorted(out, key=lambda s: -s.n_tokens)
