"""Where epbench keeps what it derives once and reuses (model weights, activation stores, artefacts), plus the
integrity helpers every cache writer shares: a stat-keyed file-hash memo, unique temporary names, file locks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator

_MEMO_NAME = "file-hashes.json"


def cache_dir() -> Path:
    """Root of epbench's user cache: $EPBENCH_CACHE, else $XDG_CACHE_HOME/epbench, else ~/.cache/epbench."""
    root = os.environ.get("EPBENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "epbench"
    return Path(root)


def sha256_bytes_of_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks (no memo: always reads the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> dict[str, int]:
    """What the memo keys a file's hash by. ctime is in it because no user-space write can keep it: `os.utime` can
    put mtime back after an in-place edit, but the kernel sets ctime to now on every write and every utime."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


_CONTENT_VERIFIED: dict[str, tuple[dict[str, int], str]] = {}  # path -> (stat key, sha256) hashed by this process


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in full once per process (per stat key); never answered from the on-disk memo.

    For identities a reuse decision rests on (model weights, tokenizers, GGUF files): a stat key, even with ctime,
    cannot see bit rot below the file system, so each process reads such a file once (~1 s per 500 MB). The hash
    is also recorded in the on-disk memo for other callers.
    """
    path = Path(path).resolve()
    key = _stat_key(path)
    hit = _CONTENT_VERIFIED.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    sha = sha256_bytes_of_file(path)
    if _stat_key(path) == key:
        _CONTENT_VERIFIED[str(path)] = (key, sha)
        remember_sha256({path: sha})
    return sha


def forget_sha256(paths: list[Path] | list[str]) -> None:
    """Drop memo entries (e.g. of a file a read found damaged), so the next check hashes it again."""
    memo_path = cache_dir() / _MEMO_NAME
    with contextlib.suppress(OSError):
        memo = _read_memo(memo_path)
        gone = [str(Path(p).resolve()) for p in paths]
        if any(g in memo for g in gone):
            for g in gone:
                memo.pop(g, None)
            atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))
    for g in paths:
        _CONTENT_VERIFIED.pop(str(Path(g).resolve()), None)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised by (absolute path, size, mtime_ns, ctime_ns, inode) so an unchanged file is read
    once.

    Any write through the file system (bit flip, truncation, replacement, even one followed by `os.utime` to put
    mtime back) changes ctime, so the memo never answers for bytes written since it hashed them. It cannot see
    damage below the file system; identities a reuse decision rests on use `content_sha256` instead, and store
    shards are hashed again on every read. The memo lives in <cache>/file-hashes.json; a torn or unreadable memo
    is just ignored (the file is hashed again).
    """
    path = Path(path).resolve()
    memo_path = cache_dir() / _MEMO_NAME
    key = _stat_key(path)
    memo = _read_memo(memo_path)
    hit = memo.get(str(path))
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in key.items()) and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    sha = sha256_bytes_of_file(path)
    if _stat_key(path) != key:  # changed while we read it: do not memoise a hash of moving bytes
        return sha
    memo = _read_memo(memo_path)  # re-read: another process may have added entries meanwhile
    memo[str(path)] = {**key, "sha256": sha}
    with contextlib.suppress(OSError):  # a read-only or full cache only costs a re-hash next time
        atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))
    return sha


def mismatched_files(expected: dict[Path, str]) -> list[Path]:
    """The files among `expected` (path -> sha256) that are missing or whose bytes do not hash to it.

    Uses the same stat-keyed memo as file_sha256, read and written once for the whole batch (a store has
    thousands of shard files); only files changed since they were last hashed are read.
    """
    memo_path = cache_dir() / _MEMO_NAME
    memo = _read_memo(memo_path)
    bad, added = [], False
    for path, want in expected.items():
        path = Path(path).resolve()
        try:
            key = _stat_key(path)
        except OSError:
            bad.append(path)
            continue
        hit = memo.get(str(path))
        if isinstance(hit, dict) and all(hit.get(k) == v for k, v in key.items()) and "sha256" in hit:
            sha = hit["sha256"]
        else:
            sha = sha256_bytes_of_file(path)
            if _stat_key(path) == key:
                memo[str(path)], added = {**key, "sha256": sha}, True
        if sha != want:
            bad.append(path)
    if added:
        with contextlib.suppress(OSError):
            latest = _read_memo(memo_path)
            latest.update({k: v for k, v in memo.items()})
            atomic_write_text(memo_path, json.dumps(latest, indent=0, sort_keys=True))
    return bad


def remember_sha256(hashes: dict[Path, str]) -> None:
    """Record hashes just computed while writing these files (one memo write), so verifying them later is a stat."""
    memo_path = cache_dir() / _MEMO_NAME
    with contextlib.suppress(OSError):
        memo = _read_memo(memo_path)
        for path, sha in hashes.items():
            path = Path(path).resolve()
            memo[str(path)] = {**_stat_key(path), "sha256": sha}
        atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))


def _read_memo(memo_path: Path) -> dict[str, Any]:
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def safe_name(label: str, limit: int = 60) -> str:
    """One path component for a label: no separators or odd characters (a data path inside a label must not nest
    folders), at most `limit` characters, long labels shortened with a hash of the whole so they stay unique."""
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("._") or "unnamed"
    if len(name) > limit:
        name = f"{name[: limit - 11]}-{hashlib.sha256(label.encode()).hexdigest()[:10]}"
    return name


def unique_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other process or thread uses (host, pid and a random part)."""
    tag = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
    return path.with_name(f".{path.name}.{tag}.tmp")


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON through `atomic_write_text` (no clash between processes; nothing partial left on ENOSPC)."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a unique temporary file, fsync it and rename it over `path`; no partial file remains, the
    previous file is kept intact on any failure, and an OSError names `path` (not the temporary name)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _named(e: OSError, path: Path, tmp: Path | None = None) -> OSError:
    """The same OSError naming `path` when it named nothing or only the temporary file."""
    if e.filename is None or (tmp is not None and e.filename in (str(tmp), tmp)):
        return OSError(e.errno, e.strerror or str(e), str(path))
    return e


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A unique temporary name beside `path` to write; renamed over `path` when the block succeeds, removed on any
    failure (a full disk, Ctrl-C), so `path` is either the previous file or the complete new one. OSErrors and
    safetensors' own I/O errors (a real full disk raises SafetensorError, not an OSError) come out as an OSError
    naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path)
    try:
        yield tmp
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _named(e, path, tmp) from e
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        io_error = as_os_error(e, path)
        if io_error is not None:
            raise io_error from e
        raise


def as_os_error(e: BaseException, path: str | Path) -> OSError | None:
    """An OSError naming `path` for a library's I/O failure that is not an OSError (safetensors' SafetensorError
    "I/O error: No space left on device (os error 28)"); None for any other exception."""
    if isinstance(e, OSError):
        return _named(e, Path(path))
    m = re.search(r"\(os error (\d+)\)", str(e))
    if type(e).__name__ == "SafetensorError" and m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return None


def save_safetensors(tensors: dict[str, Any], path: str | Path) -> str:
    """safetensors' save_file through `atomic_path` (fsynced); returns the sha256 of the file written."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            os.fsync(f.fileno())
    sha = h.hexdigest()
    with contextlib.suppress(OSError):  # the bytes were just hashed as written: this process need not read them again
        _CONTENT_VERIFIED[str(path.resolve())] = (_stat_key(path.resolve()), sha)
    return sha


class LockBusy(RuntimeError):
    """Another process holds the lock and we were asked not to wait."""


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, wait: bool = True) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if needed) for the duration of the block.

    `what` names the locked thing in the one-line message. With wait=False a held lock raises LockBusy
    immediately; with wait=True the caller blocks (and is told once that it waits). The kernel drops the lock
    when the holder dies, so a killed process never leaves a stale lock behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise LockBusy(f"{what} is in use by {holder} (lock {path}); wait for it to finish or stop it") from None
            print(f"[epbench] waiting for {what}: in use by {holder} (lock {path})", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


_HELD: dict[str, Any] = {}  # lock path -> entered file_lock context, held until release or process exit


def hold_lock(path: str | Path, what: str, wait: bool = False) -> None:
    """Take an exclusive lock on `path` for the rest of this process (idempotent within the process).

    For long-lived owners such as a run directory: a second process refuses (LockBusy, one line) or waits, while
    code in the same process may open the same run again. The kernel releases it when the process ends.
    """
    key = str(Path(path).resolve())
    if key in _HELD:
        return
    lock = file_lock(path, what, wait)
    lock.__enter__()  # the generator keeps the fd open until release_lock() or process exit
    _HELD[key] = lock


def release_lock(path: str | Path) -> None:
    """Release a lock taken with hold_lock (no-op when this process does not hold it)."""
    lock = _HELD.pop(str(Path(path).resolve()), None)
    if lock is not None:
        lock.__exit__(None, None, None)
