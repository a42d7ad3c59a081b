"""`epbench browse`: card data checked against independent recomputation (over the whole store, the model's
unembedding and the run's own metric rows), and the site driven in a real headless Chromium (search a token and a
word of the contexts, the "fires on this text" box, the sortable feature list, a card with its shaded contexts,
per-token values, quantile bands, negative contexts, logit effects, members and the match)."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.browser import BrowseConfig, browse
from bench.browser import cards as card_mod
from bench.browser import logits as logit_mod
from bench.browser.site import CHANCE_AUROC, artefact_id, resolve_target, run_sources

SHARD = 64  # small blocks so the smoke dictionaries span several shard files


def _js_args(path: Path) -> list:
    """The arguments of the one EPB.<call>(...) in a data file."""
    text = path.read_text(encoding="utf-8")
    return json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")


def _packed(path: Path):
    return json.loads(gzip.decompress(base64.b64decode(_js_args(path)[2])))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A narrowed smoke run (EP, SAE, PCA; build, detection, correspondence) and its browser, written with blocks so
    small that every dictionary's store scan and logit effects run in many chunks (the merge across chunks is what
    the recomputations below check)."""
    from bench.cli import narrow_suite
    from bench.runner import run_suite
    from bench.suites import get_suite

    root = tmp_path_factory.mktemp("browse")
    old = os.environ.get("EPBENCH_CACHE")
    os.environ["EPBENCH_CACHE"] = str(root / "cache")
    block, vocab_chunk = card_mod.BLOCK_ELEMS, logit_mod.VOCAB_CHUNK
    try:
        suite = narrow_suite(get_suite("smoke"), layers=[1], methods=["ep", "sae", "pca"],
                             metrics=["build", "detection", "correspondence"])
        run = run_suite(suite, root / "results", run_id="smoke", progress=False, report=False)
        cfg = BrowseConfig(shard_features=SHARD)
        card_mod.BLOCK_ELEMS, logit_mod.VOCAB_CHUNK = 4000, 50  # 1-3 contexts per chunk, 6 vocabulary blocks
        out = browse("smoke", config=cfg, results_dir=root / "results")
        card_mod.BLOCK_ELEMS, logit_mod.VOCAB_CHUNK = block, vocab_chunk
        (src,) = run_sources(run.dir, cfg)
        yield out, run.dir, src, cfg, root
    finally:
        card_mod.BLOCK_ELEMS, logit_mod.VOCAB_CHUNK = block, vocab_chunk
        if old is None:
            os.environ.pop("EPBENCH_CACHE", None)
        else:
            os.environ["EPBENCH_CACHE"] = old


def _cards(out: Path, aid: str) -> list[dict]:
    files = sorted((out / "data" / "f" / aid).glob("*.js"), key=lambda p: int(p.stem))
    return [c for f in files for c in _packed(f)]


def _index(out: Path) -> dict:
    return _js_args(out / "data" / "index.js")[0]


def _features(art, store, layer) -> tuple[torch.Tensor, object]:
    rows = store.all_rows(layer)
    return art.encode(rows.acts, "cosine" if art.method == "ep" else None).float(), rows


def test_site_is_sharded_and_the_index_holds_no_cards(site):
    out, _, src, _, _ = site
    index = _index(out)
    assert {a["name"] for a in index["artefacts"]} == {a.name for a in src.artefacts}
    for a in index["artefacts"]:
        assert len(list((out / "data" / "f" / a["id"]).glob("*.js"))) == math.ceil(a["K"] / SHARD)
        assert len(a["labels"]) == len(a["pos"]) == len(a["max"]) == a["K"]
        assert len(a.get("members", a["labels"])) == a["K"]
    assert '"top"' not in (out / "data" / "index.js").read_text()
    assert (out / "index.html").is_file() and (out / "app.js").is_file()
    assert "http" not in (out / "index.html").read_text() + (out / "app.js").read_text()  # nothing from a network


def _check_examples(got: list, f_k: torch.Tensor, rows, e: int, cfg: BrowseConfig) -> None:
    """Every example's window: the feature's values on consecutive tokens of its context, to 3 digits of 10**e."""
    for cid, start, pos, value, vals in got:
        assert start <= pos < start + len(vals) <= start + cfg.window
        assert pos - start <= cfg.before and start + len(vals) - 1 - pos <= cfg.after
        in_ctx = rows.context_ids == cid
        want = {int(p): float(v) for p, v in zip(rows.positions[in_ctx], f_k[in_ctx])}
        assert math.isclose(value, want[pos], rel_tol=1e-3, abs_tol=1e-6)
        expect = [want[p] for p in range(start, start + len(vals))]
        np.testing.assert_allclose(np.array(vals) * 10.0 ** e, expect, atol=0.5001 * 10.0 ** e + 1e-6)
        # the window is as wide as the context allows
        assert len(vals) == min(pos + cfg.after, max(want)) - max(pos - cfg.before, min(want)) + 1


@pytest.mark.parametrize("method", ["ep", "pca", "sae"])
def test_evidence_matches_a_direct_recomputation_over_the_whole_store(site, method):
    out, _, src, cfg, _ = site
    art = next(a for a in src.artefacts if a.method == method)
    entry = next(a for a in _index(out)["artefacts"] if a["name"] == art.name)
    cards = _cards(out, entry["id"])
    f, rows = _features(art, src.store, src.layer)
    ctx = rows.context_ids
    assert entry["rows"] == len(f) and entry["contexts"] == src.store.n_contexts == len(torch.unique(ctx))
    assert entry["contexts"] > 8  # a store larger than any one chunk: the cards merged many
    signed = bool((f < 0).any())
    assert signed == (method != "sae")  # the SAE's readout is non-negative, EP's cosine and PCA's are not
    for k in range(0, art.K, max(1, art.K // 9)):
        card, fk = cards[k], f[:, k]
        assert card["k"] == k and entry["pos"][k] == int((fk > 0).sum())
        assert math.isclose(entry["max"][k], float(fk.max()), rel_tol=5.1e-3, abs_tol=1e-6)  # 3 digits
        # top contexts: the strongest distinct contexts of the whole store
        per_ctx = {int(c): float(fk[ctx == c].max()) for c in torch.unique(ctx)}
        want = sorted((v, -c) for c, v in per_ctx.items() if v > 0)[::-1][:cfg.top_contexts]
        np.testing.assert_allclose([c[3] for c in card["top"]], [v for v, _ in want], rtol=1e-3)
        np.testing.assert_allclose([per_ctx[c[0]] for c in card["top"]], [c[3] for c in card["top"]], rtol=1e-3)
        _check_examples(card["top"], fk, rows, card["e"], cfg)
        # most negative contexts, where the readout goes below 0
        per_min = {int(c): float(fk[ctx == c].min()) for c in torch.unique(ctx)}
        want = sorted(v for v in per_min.values() if v < 0)[:cfg.negative_contexts]
        np.testing.assert_allclose([c[3] for c in card["neg"]], want, rtol=1e-3)
        assert len({c[0] for c in card["neg"]}) == len(card["neg"])
        _check_examples(card["neg"], fk, rows, card["e"], cfg)
        # quantile bands of the positive activations: exact counts and ranges, edges near the exact quantiles
        pos = np.sort(fk[fk > 0].numpy())
        counts = [b[2] for b in card["bands"]]
        assert sum(counts) == len(pos) and len(counts) == cfg.bands
        cum = np.cumsum(counts)
        for b, (lo, hi, n, samples) in enumerate(card["bands"]):
            group = pos[cum[b] - n:cum[b]]  # bands are consecutive runs of the sorted activations
            if n:
                assert math.isclose(lo, group[0], rel_tol=1e-3) and math.isclose(hi, group[-1], rel_tol=1e-3)
            if b < cfg.bands - 1 and len(pos):
                rank = math.ceil((b + 1) * len(pos) / cfg.bands)  # the exact (b+1)/bands quantile: pos[rank - 1]
                assert cum[b] >= rank and pos[cum[b] - 1] <= pos[rank - 1] * (1 + 1 / card_mod.LOG_BINS) * (1 + 1e-6)
            assert len(samples) == min(cfg.band_examples, n)
            for x in samples:
                assert lo - 1e-3 * abs(lo) <= x[3] <= hi + 1e-3 * abs(hi)
            _check_examples(samples, fk, rows, card["e"], cfg)
        lo, hi, counts, zeros, n = card["hist"]
        assert n == len(f) and sum(counts) + zeros == n and zeros == int((fk == 0).sum())
        if sum(counts):
            nz = fk[fk != 0]
            assert math.isclose(lo, float(nz.min()), rel_tol=1e-3) and math.isclose(hi, float(nz.max()), rel_tol=1e-3)


def test_logit_effects_are_the_unembedding_of_the_direction_after_the_final_norm(site):
    from bench.models import load_model

    out, _, src, cfg, _ = site
    m = load_model(src.model, "cpu")
    assert m.model.cfg.normalization_type == "RMS"  # unprocessed weights: the norm's scale is still ln_final.w
    for art in src.artefacts:
        entry = next(a for a in _index(out)["artefacts"] if a["name"] == art.name)
        assert entry["logits"]["ok"] and "ln_final.w" in entry["logits"]["note"]
        logits = (art.directions * m.model.ln_final.w.detach()) @ m.model.W_U.detach()  # [K, vocab], in one go
        top, bottom = logits.topk(cfg.logit_tokens, dim=1), (-logits).topk(cfg.logit_tokens, dim=1)
        for k, card in enumerate(_cards(out, entry["id"])):
            up, down = card["logit"]
            three = dict(rtol=5.1e-3, atol=1e-6)  # values kept to 3 significant digits
            np.testing.assert_allclose([x[2] for x in up], top.values[k].tolist(), **three)
            np.testing.assert_allclose([x[2] for x in down], (-bottom.values[k]).tolist(), **three)
            np.testing.assert_allclose(logits[k, [x[0] for x in up]].tolist(), [x[2] for x in up], **three)
            assert all(x[1] == m.tokenizer.decode([x[0]]) for x in up + down)


def test_a_folded_final_norm_is_detected():
    from types import SimpleNamespace

    from bench.browser.logits import logit_effects, unembedding

    W_U, w = torch.randn(6, 40), torch.rand(6) + 0.5
    model = SimpleNamespace(cfg=SimpleNamespace(normalization_type="RMSPre"), W_U=W_U * w[:, None])
    U = unembedding(SimpleNamespace(model=model, name="folded"))
    assert U.scale is None and "folded into W_U" in U.note
    raw = unembedding(SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(normalization_type="RMS"), W_U=W_U,
                                                            ln_final=SimpleNamespace(w=w)), name="raw"))
    d = torch.nn.functional.normalize(torch.randn(3, 6), dim=1)
    for a, b in zip(logit_effects(d, U, 5), logit_effects(d, raw, 5)):  # the same effects either way
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


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


def test_concept_picks_at_chance_are_not_findings(site):
    out, _, _, _, _ = site
    picks = [p for a in _index(out)["artefacts"] for c in _cards(out, a["id"]) for p in c["concepts"]]
    assert all(p[3] == (p[2] >= CHANCE_AUROC) for p in picks)
    assert any(not p[3] for p in picks) and any(p[3] for p in picks)  # the smoke run has both kinds


def _window_text(vocab: dict, ctxs: dict, example: list) -> str:
    cid, start, _, _, vals = example
    return "".join(vocab[str(t)] for t in ctxs[cid][start:start + len(vals)])


def _site_contexts(out: Path) -> dict[int, list[int]]:
    return {int(c): t for p in (out / "data" / "contexts").rglob("*.js") for c, t in _js_args(p)[2].items()}


def test_text_search_index_and_fire_table_match_a_recomputation(site):
    from bench.browser.text import fnv1a

    out, _, src, cfg, _ = site
    index = _index(out)
    arts = index["artefacts"]
    vocab = _js_args(out / "data" / "vocab" / f"{src.model}.js")[1]
    ctxs = _site_contexts(out)
    n = index["search"]["shards"]
    shards = [_packed(out / "data" / "search" / f"{i}.js") for i in range(n)]
    for shard_i, shard in enumerate(shards):
        assert all(fnv1a(w) % n == shard_i for w in shard)
    postings = {w: p for s in shards for w, p in s.items()}
    # every word of every top-context window, from the cards and the tokenizer's text, lowercased
    want: dict[str, dict[int, set]] = {}
    for ai, a in enumerate(arts):
        for card in _cards(out, a["id"]):
            for ex in card["top"]:
                for w in re.findall(r"\w+", _window_text(vocab, ctxs, ex)):
                    if len(w) <= 40:
                        want.setdefault(w.lower(), {}).setdefault(ai, set()).add(card["k"])
    assert set(postings) == set(want)
    for w, post in postings.items():
        got: dict[int, set] = {}
        for i in range(0, len(post), 3):
            got.setdefault(post[i], set()).add(post[i + 1])
            assert 0 <= post[i + 2] <= 9
        for ai, ks in want[w].items():
            assert got[ai] <= ks and len(got[ai]) == min(len(ks), cfg.search_features)
    # fire table: mean activation per token string over the whole store, every id decoding to it pooled
    tok = src.tokenizer
    strings = _packed(out / "data" / "fire" / src.model / "strings.js")
    fn = index["fire"][src.model]["shards"]
    fire = {s: p for i in range(fn) for s, p in _packed(out / "data" / "fire" / src.model / f"{i}.js").items()}
    for art in src.artefacts:
        ai = next(i for i, a in enumerate(arts) if a["name"] == art.name)
        f, rows = _features(art, src.store, src.layer)
        text = np.array([tok.decode([int(t)]) for t in rows.token_ids])
        assert min(strings["counts"]) >= cfg.fire_min_count
        for s in strings["strings"][:12] + strings["strings"][-3:]:
            rows_s = torch.from_numpy(text == s)
            assert strings["counts"][strings["strings"].index(s)] == int(rows_s.sum())
            means = f[rows_s].mean(0)
            post = fire[s]
            got = [(post[i + 1], post[i + 2]) for i in range(0, len(post), 3) if post[i] == ai]
            assert len(got) == min(cfg.fire_features, art.K)
            three = dict(rtol=5.1e-3, atol=1e-6)  # means kept to 3 significant digits
            np.testing.assert_allclose([m for _, m in got], means.topk(len(got)).values.tolist(), **three)
            np.testing.assert_allclose([float(means[k]) for k, _ in got], [m for _, m in got], **three)


def _synthetic_artefact(tmp_path: Path, n_ctx: int = 24):
    """A random-directions artefact on a synthetic store filed under its id in the cache (no model behind it)."""
    from bench.store import ActivationStore, stores_root, write_synthetic_store
    from methods.random_directions import RandomDirections

    g = torch.Generator().manual_seed(0)
    store = write_synthetic_store(tmp_path / "s", {1: torch.randn(n_ctx, 6, 12, generator=g)}, shard_contexts=8)
    filed = stores_root() / store.id
    filed.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(store.path), filed)
    store = ActivationStore(filed)
    return RandomDirections(k=4, seed=0).fit(store, 1), store


def test_no_model_means_no_logit_effects_and_a_cap_reads_only_the_first_contexts(site, tmp_path):
    art, store = _synthetic_artefact(tmp_path, n_ctx=150)
    path = art.save(tmp_path / "random")
    # by default the whole store, past the 128 contexts older versions sampled
    whole = browse(str(path), out=tmp_path / "whole", config=BrowseConfig())
    (entry,) = _index(whole)["artefacts"]
    assert entry["contexts"] == entry["store_contexts"] == 150 and entry["rows"] == 150 * 6
    f, rows = _features(art, store, 1)
    for k, card in enumerate(_cards(whole, entry["id"])):
        per_ctx = {int(c): float(f[rows.context_ids == c, k].max()) for c in torch.unique(rows.context_ids)}
        assert [c[0] for c in card["top"]] == sorted(per_ctx, key=lambda c: -per_ctx[c])[:len(card["top"])]
    assert max(c[0] for card in _cards(whole, entry["id"]) for c in card["top"]) >= 128
    out = browse(str(path), out=tmp_path / "site", config=BrowseConfig(sample_contexts=8))
    (entry,) = _index(out)["artefacts"]
    assert not entry["logits"]["ok"] and "could not be loaded" in entry["logits"]["note"]
    assert "synthetic" in entry["logits"]["note"]
    cards = _cards(out, entry["id"])
    assert all("logit" not in c for c in cards)
    assert entry["contexts"] == 8 and entry["store_contexts"] == 150 and entry["rows"] == 8 * 6
    assert all(ex[0] < 8 for c in cards for ex in c["top"] + c["neg"] + [x for b in c["bands"] for x in b[3]])
    _, _, _, _, root = site
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bench.browser.chromium import chromium, open_site

    drv = chromium(root / "chromium-nomodel")
    try:
        open_site(drv, out, f"#/f/{entry['id']}/0")
        card = WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card"))[0]
        assert "could not be loaded" in card.find_element(By.CSS_SELECTOR, ".logits-none").text
        assert "the first 8 of the store's 150 contexts" in card.text.lower()  # (headings are upper-cased by CSS)
    finally:
        drv.quit()


def test_browse_a_folder_of_artefact_directories(site, tmp_path, capsys):
    from bench.cli import main

    out, _, src, _, _ = site
    folder = tmp_path / "arts"
    for method in ("pca", "sae"):
        next(a for a in src.artefacts if a.method == method).save(folder / method)
    assert not (folder / "index.json").exists() and not (folder / "cfg.json").exists()
    assert resolve_target(str(folder)) == ("artefacts", folder)
    site_dir = browse(str(folder), config=BrowseConfig(top_contexts=2))
    assert site_dir == folder / "browser"
    entries = _index(site_dir)["artefacts"]
    assert sorted(e["method"] for e in entries) == ["pca", "sae"] and all(e["metrics"] == {} for e in entries)
    for e in entries:
        assert len(_cards(site_dir, e["id"])) == e["K"] and all(len(c["top"]) <= 2 for c in _cards(site_dir, e["id"]))
    assert main(["browse", str(folder), "--out", str(tmp_path / "cli-site")]) == 0  # the command line too
    assert (tmp_path / "cli-site" / "index.html").is_file() and "browser" in capsys.readouterr().out


def test_the_site_works_in_headless_chromium(site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bench.browser.chromium import chromium, open_site

    out, _, src, cfg, root = site
    index = _index(out)
    arts = index["artefacts"]
    ep_entry = next(a for a in arts if a["method"] == "ep")
    vocab = _js_args(out / "data" / "vocab" / f"{src.model}.js")[1]
    token = vocab[str(ep_entry["labels"][0])].strip()
    assert token, "the first EP region's exemplar token is blank; pick a test model whose tokens print"
    wait = lambda d, f: WebDriverWait(d, 10).until(f)  # noqa: E731
    drv = chromium(root / "chromium-profile")
    try:
        load_ms = open_site(drv, out)
        assert load_ms < 5000
        assert len(drv.find_elements(By.CSS_SELECTOR, "#artefacts tr.art")) == len(arts)
        drv.find_element(By.ID, "search").send_keys(token)
        hits = wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#results a.result"))
        next(h for h in hits if ep_entry["name"] in h.text).click()
        card = wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, ".card"))[0]
        k = int(card.get_attribute("data-k"))
        data = _cards(out, ep_entry["id"])[k]
        assert wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, ".card .ctx.top .tok.lit"))
        # per-token values on hover: the example token's title is its activation
        first = card.find_elements(By.CSS_SELECTOR, ".ctx.top")[0]
        toks = first.find_elements(By.CSS_SELECTOR, ".tok")
        cid, start, pos, value, vals = data["top"][0]
        assert len(toks) == len(vals)
        assert max(len(x[4]) for x in data["top"] + data["neg"]) == cfg.window == 32  # 32-token windows
        peak = first.find_element(By.CSS_SELECTOR, ".tok.peak")
        assert math.isclose(float(peak.get_attribute("title")), value, rel_tol=5e-3, abs_tol=10.0 ** data["e"])
        for t, v in zip(toks, vals):
            assert math.isclose(float(t.get_attribute("title")), v * 10.0 ** data["e"], rel_tol=6e-3, abs_tol=1e-9)
        assert len(card.find_elements(By.CSS_SELECTOR, ".ctx.neg")) == len(data["neg"]) > 0  # cosine is signed
        assert len(card.find_elements(By.CSS_SELECTOR, ".ctx.sample")) == sum(len(b[3]) for b in data["bands"]) > 0
        assert card.find_elements(By.CSS_SELECTOR, ".ctx .tok.peak")
        assert card.find_elements(By.CSS_SELECTOR, ".member")  # closest / farthest members
        assert card.find_elements(By.CSS_SELECTOR, "svg.hist rect")
        # logit effects: the card's promoted and suppressed tokens, escaped text
        cells = card.find_elements(By.CSS_SELECTOR, "table.logits td.tokcell")
        up = [c.text for c in cells if "up" in c.get_attribute("class")]
        assert len(up) == cfg.logit_tokens and len(cells) == 2 * cfg.logit_tokens
        assert "ln_final.w" in card.text
        matches = card.find_elements(By.CSS_SELECTOR, "table.matches a.match")
        assert matches and any("sae" in m.find_element(By.XPATH, "../..").text for m in matches)
        card.find_element(By.CSS_SELECTOR, "a.cmp").click()  # EP region beside its best SAE latent
        pair = wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 2 and
                    d.find_elements(By.CSS_SELECTOR, ".card"))
        assert "sae" in pair[1].find_element(By.TAG_NAME, "h2").text
        # concept picks at chance are greyed, not findings
        ai, kc = next((ai, c["k"]) for ai, a in enumerate(arts) for c in _cards(out, a["id"])
                      if any(not p[3] for p in c["concepts"]))
        drv.get((out / "index.html").resolve().as_uri() + f"#/f/{arts[ai]['id']}/{kc}")
        rows = wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, ".card table.concepts tr.at-chance"))
        assert all("at chance" in r.text for r in rows)
        assert all("at chance" not in r.text for r in drv.find_elements(By.CSS_SELECTOR, "table.concepts tr.finding"))
        assert not [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        drv.quit()


def test_feature_list_search_and_fires_box_in_headless_chromium(site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bench.browser.chromium import chromium, open_site

    out, _, src, _, root = site
    arts = _index(out)["artefacts"]
    wait = lambda d, f: WebDriverWait(d, 10).until(f)  # noqa: E731
    sae = next(a for a in arts if a["method"] == "sae")
    drv = chromium(root / "chromium-list")
    try:
        open_site(drv, out, f"#/a/{sae['id']}")
        wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#features tr.feat"))
        drv.find_element(By.CSS_SELECTOR, "th[data-sort=rate]").click()  # densest first
        shown = [int(r.get_attribute("data-k")) for r in drv.find_elements(By.CSS_SELECTOR, "#features tr.feat")]
        want = sorted(range(sae["K"]), key=lambda k: (-sae["pos"][k], k))
        assert shown == want[:len(shown)] and len(shown) == min(100, sae["K"])
        drv.find_element(By.CSS_SELECTOR, "th[data-sort=max]").click()
        shown = [int(r.get_attribute("data-k")) for r in drv.find_elements(By.CSS_SELECTOR, "#features tr.feat")]
        assert shown[0] == int(np.argmax([m if m is not None else -1e30 for m in sae["max"]]))
        rate = sorted(100 * p / sae["rows"] for p in sae["pos"])[len(sae["pos"]) // 2]
        rate = math.floor(rate * 1e6) / 1e6  # what the box holds: the median firing rate, rounded down
        drv.find_element(By.ID, "list-min-rate").send_keys(f"{rate:.6f}")

        def listed(d):
            ks = [int(r.get_attribute("data-k")) for r in d.find_elements(By.CSS_SELECTOR, "#features tr.feat")]
            return ks if len(ks) < sae["K"] else None

        kept = wait(drv, listed)
        assert kept == sorted((k for k in range(sae["K"]) if 100 * sae["pos"][k] / sae["rows"] >= rate),
                              key=lambda k: (-(sae["max"][k] if sae["max"][k] is not None else -1e30), k))
        drv.find_elements(By.CSS_SELECTOR, "#features tr.feat a")[0].click()  # open the first, then next / previous
        card = wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, ".card"))[0]
        assert int(card.get_attribute("data-k")) == kept[0]
        card.find_element(By.CSS_SELECTOR, ".nav a.next").click()
        wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, f".card[data-k='{kept[1]}']"))
        drv.find_element(By.CSS_SELECTOR, ".nav a.prev").click()
        wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, f".card[data-k='{kept[0]}']"))
        # full-text search: a word of a card's top contexts finds that feature
        vocab = _js_args(out / "data" / "vocab" / f"{src.model}.js")[1]
        ctxs, n = _site_contexts(out), _index(out)["search"]["shards"]
        postings = {w: p for i in range(n) for w, p in _packed(out / "data" / "search" / f"{i}.js").items()}
        sae_pos = arts.index(sae)
        k, word = next((c["k"], w.lower()) for c in _cards(out, sae["id"]) for ex in c["top"]
                       for w in re.findall(r"[A-Za-z]{3,}", _window_text(vocab, ctxs, ex))
                       if (sae_pos, c["k"]) in zip(postings[w.lower()][::3], postings[w.lower()][1::3]))
        open_site(drv, out)
        drv.find_element(By.ID, "search").send_keys(word)
        hits = wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#text-results a.text-hit"))
        hit = next(h for h in hits if h.get_attribute("href").endswith(f"#/f/{sae['id']}/{k}"))
        hit.click()
        card = wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, f".card[data-k='{k}'] .ctx.top"))
        assert any(word in c.text.lower() for c in card)
        # "features that fire on this text": pieces of the store's token strings, features, and the stated approximation
        open_site(drv, out)
        drv.find_element(By.ID, "fires").send_keys("the food of")
        wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#fire-results a.fire-hit"))
        note = drv.find_element(By.ID, "fire-note").text
        assert "context-free" in note.lower() and "longest match" in note
        segs = drv.find_elements(By.CSS_SELECTOR, "#fire-results .seg")
        assert re.sub(r"\s", "", "".join(s.text for s in segs)) == "thefoodof"  # every character in some piece
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
