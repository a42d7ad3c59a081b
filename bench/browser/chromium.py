"""Headless Debian Chromium through selenium, for the browser tests and the index load-time benchmark."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# Chromium as root in a container needs --no-sandbox; the rest keep it from reaching the network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


def chromium_paths() -> tuple[str, str]:
    """(chromium binary, chromedriver), or a one-line error naming the fix."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        raise FileNotFoundError("chromium / chromedriver not found on PATH: run `make install` (it apt-installs "
                                "the Debian packages chromium and chromium-driver)")
    return binary, driver


def chromium(user_data_dir: str | Path) -> Any:
    """A headless Chromium WebDriver with a fresh profile in `user_data_dir` (caller quits it)."""
    from selenium import webdriver

    binary, driver = chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={Path(user_data_dir).resolve()}")
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


def open_site(drv: Any, site: Path, hash_: str = "", timeout: float = 20.0) -> float:
    """Open the site's index.html from disk; wait until the index has rendered; returns its load time in ms."""
    from selenium.webdriver.support.ui import WebDriverWait

    drv.get((Path(site).resolve() / "index.html").as_uri() + hash_)
    WebDriverWait(drv, timeout).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    return float(drv.execute_script("return EPB.loadMs"))


def showcase_hash(site: Path) -> str:
    """The side-by-side view of an EP region with a close SAE match: of the first EP dictionary's regions with at
    least 10 members, the one whose best SAE match has the highest F1 (the index page without EP or SAE)."""
    import base64
    import gzip
    import json

    def args(path: Path) -> list:
        text = path.read_text(encoding="utf-8")
        return json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")

    arts = args(site / "data" / "index.js")[0]["artefacts"]
    ep = next((i for i, a in enumerate(arts) if a["method"] == "ep"), None)
    saes = {i for i, a in enumerate(arts) if a["method"] == "sae"}
    if ep is None or not saes:
        return ""
    best = (-1.0, -1, -1, -1)  # (F1, EP region, SAE dictionary, SAE latent)
    for f in sorted((site / "data" / "f" / arts[ep]["id"]).glob("*.js")):
        for card in json.loads(gzip.decompress(base64.b64decode(args(f)[2]))):
            for j, k, f1 in card["match"]:
                if j in saes and card["ep"]["n"] >= 10 and (f1 or 0) > best[0]:
                    best = (f1, card["k"], j, k)
    if best[1] < 0:
        return ""
    return f"#/cmp/{arts[ep]['id']}/{best[1]}/{arts[best[2]]['id']}/{best[3]}"


def screenshot(site: Path, png: Path, hash_: str | None = None, height: int | None = None) -> Path:
    """A PNG of the site (default: `showcase_hash`), e.g. for the README; `height` (pixels) widens the window's
    height to show a whole card (at most that many pixels; default: the 1000-pixel window)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="epbench-chromium-") as profile:
        drv = chromium(profile)
        try:
            open_site(drv, site, showcase_hash(site) if hash_ is None else hash_)
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(drv, 20).until(lambda d: d.find_elements("css selector", ".card .ctx, #artefacts"))
            if height:
                full = int(drv.execute_script("return document.documentElement.scrollHeight"))
                drv.set_window_size(1400, min(height, full + 140))  # + the browser's own chrome
            png.parent.mkdir(parents=True, exist_ok=True)
            drv.save_screenshot(str(png))
        finally:
            drv.quit()
    return png


def card_screenshots(site: Path, out_dir: Path, height: int = 2600) -> list[Path]:
    """PNGs of the showcase EP region's card and of its best SAE match's card (`showcase_hash`):
    out_dir/browser_ep_card.png and browser_sae_card.png."""
    parts = showcase_hash(site).split("/")  # #/cmp/<ep>/<k>/<sae>/<k>
    if len(parts) != 6:
        raise ValueError(f"{site}: no EP region with an SAE match to show (needs an EP and an SAE dictionary)")
    return [screenshot(site, Path(out_dir) / f"browser_{kind}_card.png", f"#/f/{aid}/{k}", height)
            for kind, aid, k in (("ep", parts[2], parts[3]), ("sae", parts[4], parts[5]))]


if __name__ == "__main__":  # python -m bench.browser.chromium SITE OUT_DIR
    import sys

    for p in card_screenshots(Path(sys.argv[1]), Path(sys.argv[2])):
        print(p)
