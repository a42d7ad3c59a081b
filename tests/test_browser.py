"""`epbench browse`: card data checked against independent recomputation and the run's own metric rows, and the
site driven in a real headless Chromium (search a token, open a card, see shaded contexts and the match)."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.browser import BrowseConfig, browse
from bench.browser.cards import sample_rows
from bench.browser.site import artefact_id, run_sources

SHARD = 64  # small blocks so the smoke dictionaries span several shard files


def _js_args(path: Path) -> list:
    """The arguments of the one EPB.<call>(...) in a data file."""
    text = path.read_text(encoding="utf-8")
    return json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A narrowed smoke run (EP, SAE, PCA; build, detection, correspondence) and its browser."""
    from bench.cli import narrow_suite
    from bench.runner import run_suite
    from bench.suites import get_suite

    root = tmp_path_factory.mktemp("browse")
    old = os.environ.get("EPBENCH_CACHE")
    os.environ["EPBENCH_CACHE"] = str(root / "cache")
    try:
        suite = narrow_suite(get_suite("smoke"), layers=[1], methods=["ep", "sae", "pca"],
                             metrics=["build", "detection", "correspondence"])
        run = run_suite(suite, root / "results", run_id="smoke", progress=False, report=False)
        cfg = BrowseConfig(shard_features=SHARD)
        out = browse("smoke", config=cfg, results_dir=root / "results")
        (src,) = run_sources(run.dir, cfg)
        yield out, run.dir, src, cfg, root
    finally:
        if old is None:
            os.environ.pop("EPBENCH_CACHE", None)
        else:
            os.environ["EPBENCH_CACHE"] = old


def _cards(out: Path, aid: str) -> list[dict]:
    files = sorted((out / "data" / "f" / aid).glob("*.js"), key=lambda p: int(p.stem))
    return [c for f in files for c in json.loads(gzip.decompress(base64.b64decode(_js_args(f)[2])))]


def _index(out: Path) -> dict:
    return _js_args(out / "data" / "index.js")[0]


def test_site_is_sharded_and_the_index_holds_no_cards(site):
    out, _, src, _, _ = site
    index = _index(out)
    assert {a["name"] for a in index["artefacts"]} == {a.name for a in src.artefacts}
    for a in index["artefacts"]:
        assert len(list((out / "data" / "f" / a["id"]).glob("*.js"))) == math.ceil(a["K"] / SHARD)
        assert len(a["labels"]) == a["K"]
    assert '"top"' not in (out / "data" / "index.js").read_text()
    assert (out / "index.html").is_file() and (out / "app.js").is_file()
    assert "http" not in (out / "index.html").read_text() + (out / "app.js").read_text()  # nothing from a network


@pytest.mark.parametrize("method", ["ep", "pca", "sae"])
def test_top_contexts_and_histograms_match_a_direct_recomputation(site, method):
    out, _, src, cfg, _ = site
    art = next(a for a in src.artefacts if a.method == method)
    cards = _cards(out, artefact_id(src.model, src.layer, art))
    sample = sample_rows(src.store, src.layer, cfg.sample_contexts)
    readout = "cosine" if method == "ep" else None
    f = art.encode(sample.acts, readout)
    ctx = sample.context_ids
    for k in range(0, art.K, max(1, art.K // 7)):
        card = cards[k]
        assert card["k"] == k
        per_ctx = {int(c): float(f[ctx == c, k].max()) for c in torch.unique(ctx)}
        want = sorted((v, -c) for c, v in per_ctx.items() if v > 0)[::-1][:cfg.top_contexts]
        got = [(c[3], c[0]) for c in card["top"]]
        np.testing.assert_allclose([v for v, _ in got], [v for v, _ in want], rtol=1e-3)  # the strongest contexts
        np.testing.assert_allclose([per_ctx[c] for _, c in got], [v for v, _ in got], rtol=1e-3)  # (ties: any order)
        for cid, start, peak, value, digits in card["top"]:
            rows = (ctx == cid) & (sample.positions >= start) & (sample.positions < start + len(digits))
            assert start <= peak < start + len(digits)
            assert digits[peak - start] == str(int(round(value / want[0][0] * 9)))  # shaded relative to the top
            expect = "".join(str(int(round(float(v) * 9))) for v in (f[rows, k].clamp_min(0) / want[0][0]).clamp(0, 1))
            assert digits == expect
        lo, hi, counts, zeros, n = card["hist"]
        assert n == len(f) and sum(counts) + zeros == n and zeros == int((f[:, k] == 0).sum())
        if sum(counts):
            nz = f[:, k][f[:, k] != 0]
            assert math.isclose(lo, float(nz.min()), rel_tol=1e-3) and math.isclose(hi, float(nz.max()), rel_tol=1e-3)


def test_matches_and_concepts_agree_with_the_runs_own_metric_rows(site):
    out, run_dir, src, _, _ = site
    rows = pd.read_parquet(run_dir / "rows.parquet")
    ep = next(a for a in src.artefacts if a.method == "ep")
    sae = next(a for a in src.artefacts if a.method == "sae")
    sae_pos = [a["id"] for a in _index(out)["artefacts"]].index(artefact_id(src.model, src.layer, sae))
    cards = _cards(out, artefact_id(src.model, src.layer, ep))
    # the correspondence cell saved each live EP region's best F1 against the SAE: the card's match is that F1
    (extra,) = run_dir.glob(f"extras/correspondence_*_{ep.name.replace(':', '_')}.npy")
    f1_metric = np.sort(np.load(extra))
    f1_cards = [next((m[2] for m in c["match"] if m[0] == sae_pos), 0.0) for c in cards]
    live = np.sort([f for f in f1_cards if f > 0])
    np.testing.assert_allclose(live, f1_metric[f1_metric > 0], atol=1e-3)
    # concepts: the mean of the cards' test AUROCs is the run's detection.auroc for the artefact
    for art in src.artefacts:
        aucs = [c[2] for card in _cards(out, artefact_id(src.model, src.layer, art)) for c in card["concepts"]]
        want = rows[(rows.method == art.name) & (rows.metric == "detection.auroc")].value.item()
        assert len(aucs) == len(src.concepts["bbc"][0].concepts)
        assert math.isclose(np.mean(aucs), want, abs_tol=2e-3), art.name


def test_the_site_works_in_headless_chromium(site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bench.browser.chromium import chromium, open_site

    out, _, src, _, root = site
    index = _index(out)
    ep_entry = next(a for a in index["artefacts"] if a["method"] == "ep")
    vocab = _js_args(out / "data" / "vocab" / f"{src.model}.js")[1]
    token = vocab[str(ep_entry["labels"][0])].strip()
    assert token, "the first EP region's exemplar token is blank; pick a test model whose tokens print"
    drv = chromium(root / "chromium-profile")
    try:
        load_ms = open_site(drv, out)
        assert load_ms < 5000
        rows = drv.find_elements(By.CSS_SELECTOR, "#artefacts tr.art")
        assert len(rows) == len(index["artefacts"])
        drv.find_element(By.ID, "search").send_keys(token)
        hits = WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results a.result"))
        ep_hit = next(h for h in hits if ep_entry["name"] in h.text)
        ep_hit.click()
        card = WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card"))[0]
        assert WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card .ctx .tok.lit"))
        assert card.find_elements(By.CSS_SELECTOR, ".ctx .tok.peak")
        assert card.find_elements(By.CSS_SELECTOR, ".member")  # closest / farthest members
        assert card.find_elements(By.CSS_SELECTOR, "svg.hist rect")
        matches = card.find_elements(By.CSS_SELECTOR, "table.matches a.match")
        assert matches and any("sae" in m.find_element(By.XPATH, "../..").text for m in matches)
        card.find_element(By.CSS_SELECTOR, "a.cmp").click()  # EP region beside its best SAE latent
        pair = WebDriverWait(drv, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 2 and
                                            d.find_elements(By.CSS_SELECTOR, ".card"))
        assert "sae" in pair[1].find_element(By.TAG_NAME, "h2").text
        assert not [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        drv.quit()


def test_bad_target_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run"):
        browse(str(tmp_path / "nothing"), results_dir=tmp_path)


def test_browse_an_artefact_directory(site, tmp_path):
    out, _, src, _, _ = site
    art = next(a for a in src.artefacts if a.method == "pca")
    path = art.save(tmp_path / "pca")
    site_dir = browse(str(path), config=BrowseConfig(top_contexts=2))
    assert site_dir == path / "browser"
    (entry,) = _index(site_dir)["artefacts"]
    assert entry["K"] == art.K and entry["metrics"] == {}  # no run, no rows
    cards = _cards(site_dir, entry["id"])
    assert len(cards) == art.K and all(len(c["top"]) <= 2 for c in cards)


def test_cards_are_of_the_artefacts_the_run_measured(site):
    out, run_dir, src, _, _ = site
    from bench.browser.site import same_as_run
    from bench.report.common import load_rows

    assert all(a["same_as_run"] for a in _index(out)["artefacts"])
    rows, art = load_rows(run_dir), copy.copy(src.artefacts[0])
    art.info = {**art.info, "cost": {**art.info["cost"], "wall_seconds": art.cost.wall_seconds + 1.0}}  # a rebuild
    assert same_as_run(rows, src.model, src.layer, art) is False


def test_the_index_links_the_runs_report(site):
    _, run_dir, _, cfg, root = site
    (run_dir / "REPORT.md").write_text("# report\n")
    out = browse("smoke", config=cfg, results_dir=root / "results", out=root / "elsewhere")
    assert _index(out)["meta"]["report"] == os.path.relpath(run_dir / "REPORT.md", out)
    assert 'id="report-link"' in (out / "app.js").read_text()
