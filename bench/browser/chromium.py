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
