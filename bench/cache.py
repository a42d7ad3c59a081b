"""Where epbench keeps what it derives once and reuses: model weights, activation stores, artefacts."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of epbench's user cache: $EPBENCH_CACHE, else $XDG_CACHE_HOME/epbench, else ~/.cache/epbench."""
    root = os.environ.get("EPBENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "epbench"
    return Path(root)
