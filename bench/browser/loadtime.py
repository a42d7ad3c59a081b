"""Index load time of the browser for a K ~ 20,000 EP dictionary, measured in headless Chromium.

    python -m bench.browser.loadtime [--rows 20000] [--repeats 5]

EP is fitted (leader clustering, as everywhere) on a synthetic store of Gaussian rows (d = 64) with a percentile so
small that almost every row founds a region, so K lands just under the row count. The site is written by
`browse` like any other; each repeat opens it from disk in a fresh Chromium profile and reads the time from
navigation start until the index table has rendered (EPB.loadMs), then opens one card.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_dictionary(root: Path, rows: int, d: int = 64, tokens_per_context: int = 125):
    """A synthetic store under root/cache and an EP dictionary on it with K close to `rows`."""
    os.environ["EPBENCH_CACHE"] = str(root / "cache")
    from bench.store import stores_root, write_synthetic_store
    from methods.exemplar_partitioning import ExemplarPartitioning

    g = torch.Generator().manual_seed(0)
    n_ctx = max(1, rows // tokens_per_context)
    store = write_synthetic_store(root / "tmp-store", {0: torch.randn(n_ctx, tokens_per_context, d, generator=g)})
    final = stores_root() / store.id
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(store.path), final)
    from bench.store import ActivationStore

    store = ActivationStore(final)
    art = ExemplarPartitioning(percentiles=[1e-5], n_calib=16_000).fit(store, 0)
    return art.save(root / "artefact")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000, help="store rows (K ends just below)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from bench.browser import BrowseConfig, browse, site_size
    from bench.browser.chromium import chromium, open_site
    from methods.base import load_artefact

    with tempfile.TemporaryDirectory(prefix="epbench-loadtime-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        path = build_dictionary(root, args.rows)
        K = load_artefact(path).K
        t1 = time.perf_counter()
        site = browse(str(path), out=root / "site", config=BrowseConfig())
        t2 = time.perf_counter()
        index_kb = (site / "data" / "index.js").stat().st_size / 1024
        print(f"EP dictionary K={K} (d=64, built in {t1 - t0:.1f} s); browse wrote {site_size(site) / 2**20:.1f} MiB "
              f"in {t2 - t1:.1f} s; data/index.js {index_kb:.0f} KiB, "
              f"{len(list((site / 'data' / 'f').rglob('*.js')))} card shards")
        loads, cards = [], []
        for i in range(args.repeats):
            drv = chromium(root / f"profile{i}")
            try:
                loads.append(open_site(drv, site))
                t = time.perf_counter()
                k = (i * 7919) % K
                drv.get((site / "index.html").as_uri() + f"#/f/{drv.execute_script('return EPB.data.artefacts[0].id')}/{k}")
                from selenium.webdriver.support.ui import WebDriverWait

                WebDriverWait(drv, 20).until(lambda dd: dd.find_elements("css selector", ".card .ctx"))
                cards.append((time.perf_counter() - t) * 1000)
            finally:
                drv.quit()
        print(f"index load (navigation start -> index rendered), {args.repeats} fresh Chromium profiles: median "
              f"{statistics.median(loads):.0f} ms, max {max(loads):.0f} ms; target < 1000 ms: "
              f"{'PASS' if max(loads) < 1000 else 'FAIL'}")
        print(f"open one card (page load + its shard): median {statistics.median(cards):.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
