"""`epbench browse`: a static, offline feature browser for a run (or for saved artefacts).

The site is plain HTML/CSS/JS (bench/browser/static) plus data written as JavaScript files, because a page
opened from disk (file://) may not fetch JSON: `data/index.js` (every dictionary, its headline metrics, and per
feature compact arrays: a label token, the rows it fires on, its maximum, EP members; the concepts that select
it) loads with the page; each block of `shard_features` feature cards is `data/f/<artefact>/<block>.js` (gzipped
JSON as base64), injected as a <script> only when a card of that block opens, and the store contexts it shows come
in blocks of CONTEXT_BLOCK the same way. The text lookups (bench/browser/text.py) are sharded the same way under
`data/search/` and `data/fire/`, loaded only for the words a query holds.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.browser.cards import CardConfig, Evidence, Examples, best_matches, concept_picks, sample_rows, scan, top_sets
from bench.browser.logits import Unembedding, logit_effects, unembedding
from bench.browser.text import StringTable, TokenText, fire_entries, fnv1a, n_shards, postings_of, window_words
from metrics.feature_selection import default_readout
from methods.base import Artefact, load_artefact

STATIC = Path(__file__).parent / "static"
CONTEXT_BLOCK = 32  # store contexts per data file (a card loads the blocks of the contexts it shows)
HEADLINE = ("retrieval.precision@10", "detection.auroc", "probing.onehot_retention", "ood.auroc",
            "correspondence.mean_best_f1", "recon.explained_variance", "recon.loss_recovered",
            "stability.direction.mean_cos")
CHANCE_AUROC = 0.6  # a concept pick below this test AUROC is shown greyed as "at chance", not as a finding


@dataclass
class BrowseConfig(CardConfig):
    """What `epbench browse` writes (card sizes come from CardConfig)."""

    shard_features: int = 256  # feature cards per lazily loaded data file
    layers: list[int] | None = None  # only these layers (default: every layer of the run)
    methods: list[str] | None = None  # only these method spec or artefact labels (default: all)

    def __post_init__(self) -> None:
        flags = {"sample_contexts": "--sample-contexts", "top_contexts": "--top-contexts",
                 "shard_features": "--shard-features"}
        for name in ("sample_contexts", "top_contexts", "shard_features", "before", "after", "bins", "members",
                     "match_top_n", "match_contexts", "negative_contexts", "bands", "band_examples", "logit_tokens",
                     "fire_features", "fire_min_count", "search_features"):
            value = getattr(self, name)
            if name == "sample_contexts" and value is None:
                continue  # the whole store
            low = 0 if name in ("before", "after", "members", "negative_contexts", "band_examples",
                                "logit_tokens", "fire_features", "search_features") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                flag = flags.get(name, name)
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")


SITE_MARKER = ".epbench-browser"  # written into every site folder: `browse` replaces only folders holding it
_SITE_FILES = {"index.html", "app.js", "style.css", "data", SITE_MARKER}


def check_out(out: Path) -> None:
    """Refuse (one line, nothing written) an --out folder that is not empty and not a site `browse` wrote: the site
    replaces the folder whole, so anything else in it (a user's files, a run's cells) would be lost."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a new folder for the site (nothing was written)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    names = {p.name for p in out.iterdir()}
    ours = (out / SITE_MARKER).is_file() or (names <= _SITE_FILES and (out / "data" / "index.js").is_file())
    if not ours:
        shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"--out {out} is not empty and is not a site written by `epbench browse` (it holds {shown}); "
                         "choose a new or empty folder (nothing was written or deleted)")


class LayerSource(NamedTuple):
    """The artefacts of one model and layer, with the data their cards are computed from."""

    model: str
    layer: int
    artefacts: list[Artefact]
    store: Any  # ActivationStore of the build stream (top contexts, EP members)
    tokenizer: Any  # a Hugging Face tokenizer, or None (token ids are shown)
    concepts: dict[str, tuple[Any, Any]]  # concept set name -> (ConceptSet, TextActivations)
    match_inputs: Any  # TextActivations (unit text) or a [N, d] tensor (unit token) for F1 matching
    match_unit: str
    unembed: Unembedding | None = None  # for logit effects; None: `logits_note` says why there are none
    logits_note: str = ""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def artefact_id(model: str, layer: int, art: Artefact) -> str:
    """The id of a dictionary in the site (its data folder name and URL component)."""
    return _safe(f"{model}__L{layer:02d}__{art.name}")


def _num_or_none(v: Any, digits: int = 4) -> float | None:
    """A field read from an artefact's info (anyone may have written it): a finite number, or None for anything
    else, so no string from a shared artefact ever reaches the page as a number would (the page escapes all text
    as well)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return _num(v, digits)


def _num(v: Any, digits: int = 4) -> Any:
    """JSON-safe rounded number (None for NaN / inf)."""
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


# ---------------------------------------------------------------------------------------------------------
# Sources: a run directory, or saved artefacts


def resolve_target(target: str, results_dir: str | Path = "results") -> tuple[str, Path]:
    """('run', run dir) or ('artefacts', dir) for a run id, run directory or artefact directory."""
    for p in (Path(target), Path(results_dir) / target):
        if (p / "run.json").is_file():
            return "run", p
        if (p / "cfg.json").is_file() or (p / "index.json").is_file() or _holds_artefacts(p):
            return "artefacts", p
    raise FileNotFoundError(f"{target}: neither a run (results/<run-id>/run.json) nor an artefact directory "
                            "(cfg.json, or a folder of artefact directories each with one); pass `epbench run`'s "
                            "run id or a directory written by `epbench build`")


def _holds_artefacts(p: Path) -> bool:
    """A folder with an artefact directory (cfg.json) somewhere below it: `epbench build --out` into several."""
    return p.is_dir() and next(p.rglob("cfg.json"), None) is not None


def suite_of_run(run_dir: Path) -> Any:
    """The Suite a run recorded in run.json."""
    from bench.suites import MethodSpec, Suite

    cfg = json.loads((run_dir / "run.json").read_text())["config"]
    names = {f.name for f in dataclasses.fields(Suite)}
    return Suite(**{**{k: v for k, v in cfg.items() if k in names},
                    "methods": [MethodSpec(**m) for m in cfg["methods"]]})


def _wanted(art_or_label: str, methods: list[str] | None) -> bool:
    return methods is None or art_or_label in methods


def check_run_filters(run_dir: Path, cfg: BrowseConfig) -> tuple[Any, list[int]]:
    """The run's suite and the layers to browse; --layers / --methods that name nothing in the run are refused
    (ValueError, one line) before any work."""
    suite = suite_of_run(run_dir)
    layers = [L for L in suite.layers if cfg.layers is None or L in cfg.layers]
    if not layers:
        raise ValueError(f"{run_dir}: none of layers {cfg.layers} is in the run (layers {suite.layers})")
    if cfg.methods is not None:
        unknown = [m for m in cfg.methods if m not in {s.label for s in suite.methods}
                   and not any(m.startswith((f"{s.label}:", f"{s.label}(", f"{s.label}[", f"{s.method}:"))
                               for s in suite.methods)]
        if unknown:
            raise ValueError(f"--methods {' '.join(unknown)}: not a method spec or artefact label of {run_dir} "
                             f"(its specs: {', '.join(s.label for s in suite.methods)}; artefact labels such as "
                             "ep:p=2 work too)")
    return suite, layers


def run_sources(run_dir: Path, cfg: BrowseConfig) -> list[LayerSource]:
    """One LayerSource per (model, layer) of a run: artefacts through ModelContext (the run's cache)."""
    from bench.context import ModelContext

    suite, layers = check_run_filters(run_dir, cfg)
    out = []
    for model in suite.models:
        ctx = ModelContext(suite, model, progress=False)
        for L in layers:
            arts = [a for s in suite.methods if L in ctx.spec_layers(s) for a in ctx.artefacts(s.label, L)
                    if cfg.methods is None or s.label in cfg.methods or a.name in cfg.methods]
            arts = list({a.name: a for a in arts}.values())  # once each (`ep` and `ep:p=8` both give ep:p=8)
            if not arts:
                raise ValueError(f"--methods {' '.join(cfg.methods or [])}: no artefact of {run_dir} at layer {L} "
                                 "has that spec or artefact label; `epbench browse` without --methods lists them all")
            concepts = {n: (cs, ctx.concept_acts(n, L)) for n, cs in ctx.concept_sets.items()}
            inputs = ctx.heldout_acts(L) if concepts else sample_rows(ctx.store, L, cfg.match_contexts).acts
            backend, note = _backend(model, lambda: ctx.backend)
            out.append(LayerSource(model, L, arts, ctx.store, getattr(backend, "tokenizer", None), concepts, inputs,
                                   "text" if concepts else "token", *_unembed(backend, note)))
    return out


def artefact_sources(root: Path, cfg: BrowseConfig) -> list[LayerSource]:
    """LayerSources for one saved artefact (cfg.json) or every artefact under a folder of them."""
    from bench.store import open_verified, stores_root

    paths = [root] if (root / "cfg.json").is_file() else sorted(p.parent for p in root.rglob("cfg.json"))
    groups: dict[tuple[str, str, int], list[Artefact]] = {}
    for p in paths:
        art = load_artefact(p)
        key = (art.info.get("store_id", ""), str(art.info.get("model", "")), int(art.info.get("layer", -1)))
        if (cfg.layers is None or key[2] in cfg.layers) and _wanted(art.name, cfg.methods):
            groups.setdefault(key, []).append(art)
    out = []
    for (store_id, model, L), arts in sorted(groups.items()):
        spath = stores_root() / store_id
        if not (spath / "manifest.json").is_file():
            raise FileNotFoundError(f"{spath}: the store {arts[0].name} was built on is not in the cache; "
                                    "re-extract it (`epbench extract` with the same request) or set EPBENCH_CACHE")
        store, problem = open_verified(spath)  # every shard's sha256, and the folder is the store it claims
        if store is None or store.id != store_id:
            raise ValueError(f"{spath}: not the verified store {store_id} that {arts[0].name} was built on "
                             f"({problem or f'it holds store {store.id}'}); rerun its `epbench extract` to repair it")
        from bench.models import load_model

        backend, note = _backend(model, lambda: load_model(model, "cpu"))
        out.append(LayerSource(model, L, arts, store, getattr(backend, "tokenizer", None), {},
                               sample_rows(store, L, cfg.match_contexts).acts, "token", *_unembed(backend, note)))
    return out


def _backend(model: str, load: Any) -> tuple[Any, str]:
    """(the model's ModelBackend, "") or (None, why not): without it the site shows token ids, no logit effects."""
    try:
        return load(), ""
    except (KeyError, ValueError, RuntimeError, OSError, NotImplementedError) as e:  # e.g. a synthetic store
        first = (str(e).splitlines() or [""])[0][:200]
        return None, f"no logit effects: model {model!r} could not be loaded ({type(e).__name__}: {first})"


def _unembed(backend: Any, note: str) -> tuple[Unembedding | None, str]:
    if backend is None:
        return None, note
    try:
        U = unembedding(backend)
    except AttributeError as e:  # a backend without a transformer-lens unembedding
        return None, f"no logit effects: {backend.name} exposes no unembedding ({e})"
    return U, U.note


# ---------------------------------------------------------------------------------------------------------
# Cards and the index


class _Tokens:
    """Token ids the site uses, per model, with a memo of store contexts."""

    def __init__(self):
        self.used: dict[str, set[int]] = {}
        self.contexts: dict[str, dict[int, list[int]]] = {}  # store id -> context id -> token ids
        self.shown: dict[str, set[int]] = {}  # store id -> contexts the site shows whole (top contexts)

    def context(self, store: Any, cid: int) -> list[int]:
        memo = self.contexts.setdefault(store.id, {})
        if cid not in memo:
            memo[cid] = store.context_tokens(cid)
        return memo[cid]

    def use(self, model: str, ids: list[int]) -> None:
        self.used.setdefault(model, set()).update(ids)

    def show(self, store: Any, model: str, cid: int) -> None:
        """Ship context `cid` whole (its block of contexts loads with the cards that show it)."""
        shown = self.shown.setdefault(store.id, set())
        if cid not in shown:
            shown.add(cid)
            self.use(model, self.context(store, cid))


def _ep_members(art: Artefact, store: Any, tokens: _Tokens, model: str, k: int, cfg: BrowseConfig,
                member_ctx: dict[str, np.ndarray]) -> dict[str, Any]:
    """Member count, coherence, distance mean / std and closest / farthest members as [context, position, distance]."""
    t = art.tensors
    n = float(t["member_count"][k])
    mean = float(t["dist_sum"][k]) / max(n, 1.0)
    out: dict[str, Any] = {"n": int(n), "coh": _num(t["coherence"][k]), "dmean": _num(mean),
                           "dstd": _num(math.sqrt(max(float(t["dist_sqsum"][k]) / max(n, 1.0) - mean * mean, 0.0)))}
    for kind in ("closest", "farthest"):
        items = []
        for j in range(min(cfg.members, member_ctx[kind].shape[1])):
            cid = int(member_ctx[kind][k, j])
            if cid >= 0:
                tokens.show(store, model, cid)
                items.append([cid, int(t[f"{kind}_position"][k, j]), _num(t[f"{kind}_distance"][k, j])])
        out[kind[:5]] = items
    return out


def _label_tokens(art: Artefact, top: Examples, store: Any, tokens: _Tokens, model: str) -> list[int]:
    """Per feature the token that names it: EP's exemplar token, else the token at its strongest activation."""
    out = []
    for k in range(art.K):
        if art.method == "ep":
            cid, pos = int(art.tensors["exemplar_context"][k]), int(art.tensors["exemplar_position"][k])
        else:
            cid, pos = int(top.context[k, 0]), int(top.position[k, 0])
        out.append(tokens.context(store, cid)[pos] if cid >= 0 else -1)
    tokens.use(model, [t for t in out if t >= 0])
    return out


def _headline(rows: Any, model: str, layer: int, name: str) -> dict[str, Any]:
    """The run's value of each HEADLINE metric for one dictionary (rows already on one concept set)."""
    if rows is None:
        return {}
    d = rows[(rows["model"] == model) & (rows["layer"] == layer) & (rows["method"] == name)]
    return {m: _num(d.loc[d["metric"] == m, "value"].mean(), 3) for m in HEADLINE if (d["metric"] == m).any()}


def same_as_run(rows: Any, model: str, layer: int, art: Artefact) -> bool | None:
    """Whether `art` is the artefact the run measured: its build row's wall seconds (a float no rebuild repeats)
    and K equal the artefact's; None without build rows. False means the artefact cache was rebuilt since the run
    (e.g. the method's code changed), so the cards describe another fit than the run's metrics."""
    if rows is None:
        return None
    d = rows[(rows["model"] == model) & (rows["layer"] == layer) & (rows["method"] == art.name)]
    secs, K = d.loc[d["metric"] == "build.wall_seconds", "value"], d.loc[d["metric"] == "build.K", "value"]
    if secs.empty or K.empty:
        return None
    return bool(math.isclose(float(secs.iloc[0]), art.cost.wall_seconds, rel_tol=1e-9) and int(K.iloc[0]) == art.K)


class _Text:
    """The site's text lookups (bench/browser/text.py), filled dictionary by dictionary."""

    def __init__(self):
        self.decoders: dict[str, TokenText] = {}  # model -> decoded single tokens
        self.tables: dict[str, StringTable] = {}  # store id -> its token strings
        self.search: dict[str, list] = {}  # word -> [dictionary position, feature, score, ...]
        self.fire: dict[str, dict[str, list]] = {}  # model -> token string -> [dictionary, feature, mean, ...]
        self.fire_counts: dict[str, dict[str, int]] = {}  # model -> token string -> occurrences in the store

    def text(self, src: LayerSource) -> TokenText:
        return self.decoders.setdefault(src.model, TokenText(src.tokenizer))

    def token_rows(self, src: LayerSource, min_count: int) -> Any:
        """scan's hook: the store's string table (built once per store from the first scan's counts)."""
        def rows(counts: np.ndarray, K: int) -> Any:
            if src.store.id not in self.tables:
                self.tables[src.store.id] = StringTable(self.text(src), counts, min_count)
            return self.tables[src.store.id].rows(K)
        return rows

    def add_search(self, pos: int, src: LayerSource, ev: Evidence, top: list[list[list]], e: np.ndarray,
                   tokens: _Tokens, cap: int) -> None:
        """Index the words of the top-context windows the cards of dictionary `pos` show (values in 10**e)."""
        if cap == 0:
            return
        text, scored = self.text(src), {}
        for k, rows in enumerate(top):
            vmax, words_k = float(ev.vmax[k]) / 10.0 ** int(e[k]), scored.setdefault(k, {})
            for cid, start, _, _, vals in rows:
                ids = tokens.context(src.store, cid)[start:start + len(vals)]
                for w, score in window_words(text, ids, np.asarray(vals, dtype=np.float64), vmax).items():
                    words_k[w] = max(words_k.get(w, 0), score)
        for w, post in postings_of(scored, cap).items():
            self.search.setdefault(w, []).extend(x for k, score in post for x in (pos, k, score))

    def add_fire(self, pos: int, src: LayerSource, ev: Evidence, n: int) -> dict[str, int]:
        """Dictionary `pos`'s features per token string; returns how many of the store's strings it covers."""
        table = self.tables.get(src.store.id)
        if ev.token_sums is None or table is None or n == 0:
            return {"strings": 0, "store_strings": 0 if table is None else len(table.strings)}
        fire, counts = self.fire.setdefault(src.model, {}), self.fire_counts.setdefault(src.model, {})
        for string, feats in fire_entries(table, ev.token_sums, n).items():
            fire.setdefault(string, []).extend(x for k, m in feats for x in (pos, k, _num(m, 3)))
        for string, c in zip(table.strings[:len(ev.token_sums)], table.counts.tolist()):
            counts[string] = max(counts.get(string, 0), c)
        return {"strings": len(ev.token_sums), "store_strings": len(table.strings)}

    def write(self, data: Path) -> dict[str, Any]:
        """Write the shards; returns what the index says about them."""
        out: dict[str, Any] = {"search": None, "fire": {}}
        if self.search:
            n = n_shards(sum(len(v) for v in self.search.values()) // 3)
            for i, part in enumerate(_sharded(self.search, n)):
                _js_packed(data / "search" / f"{i}.js", "search", "", i, part)
            out["search"] = {"shards": n, "words": len(self.search)}
        for model, table in self.fire.items():
            n = n_shards(sum(len(v) for v in table.values()) // 3)
            for i, part in enumerate(_sharded(table, n)):
                _js_packed(data / "fire" / _safe(model) / f"{i}.js", "fire", model, i, part)
            counts = self.fire_counts[model]
            strings = sorted(counts, key=lambda s: (-counts[s], s))
            _js_packed(data / "fire" / _safe(model) / "strings.js", "fireStrings", model, 0,
                       {"strings": strings, "counts": [counts[s] for s in strings]})
            out["fire"][model] = {"shards": n, "strings": len(strings)}
        return out


def _sharded(table: dict[str, Any], n: int) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{} for _ in range(n)]
    for key in sorted(table):
        parts[fnv1a(key) % n][key] = table[key]
    return parts


def _exponents(ev: Evidence) -> np.ndarray:
    """Per feature the power of ten its window values are stored in: 3 significant digits of its largest |value|
    on the store (so at most 999 units)."""
    big = np.maximum(np.abs(np.nan_to_num(ev.vmin)), np.abs(np.nan_to_num(ev.vmax)))
    return np.where(big > 0, np.floor(np.log10(np.where(big > 0, big, 1.0))) - 2, 0).astype(np.int64)


def _example_rows(ex: Examples, e: np.ndarray, before: int, ks: range) -> list[list[list]]:
    """Per feature of `ks` its examples as [context, window start, position, value, [window values in units of
    10**e]]."""
    win = ex.window[ks.start:ks.stop]
    T, W = win.shape[1], win.shape[2]
    valid = ~np.isnan(win)
    i0 = valid.argmax(axis=2)
    i1 = W - valid[:, :, ::-1].argmax(axis=2)
    q = np.rint(np.nan_to_num(win) / (10.0 ** e[ks.start:ks.stop])[:, None, None]).astype(np.int64)
    out = []
    for j, k in enumerate(ks):
        rows = []
        for t in range(T):
            cid = int(ex.context[k, t])
            if cid >= 0:
                a, b, p = int(i0[j, t]), int(i1[j, t]), int(ex.position[k, t])
                rows.append([cid, p - before + a, p, _num(ex.value[k, t]), q[j, t, a:b].tolist()])
        out.append(rows)
    return out


def _logit_effects(art: Artefact, src: LayerSource, n: int) -> tuple[tuple | None, str]:
    """(top ids, values, bottom ids, values) as lists per feature, or (None, why there are none)."""
    if src.unembed is None:
        return None, src.logits_note or "no logit effects: no model"
    if src.unembed.W_U.shape[0] != art.d_model:
        return None, (f"no logit effects: the model's d_model {src.unembed.W_U.shape[0]} is not the artefact's "
                      f"{art.d_model}")
    if n == 0:
        return None, "no logit effects (logit_tokens = 0)"
    return tuple(t.tolist() for t in logit_effects(art.directions, src.unembed, n)), src.unembed.note


def layer_cards(src: LayerSource, cfg: BrowseConfig, tokens: _Tokens, rows: Any, lookups: _Text,
                write: Any, offset: int = 0) -> list[dict]:
    """The index entries of one model and layer; each block of `shard_features` cards goes to `write(artefact id,
    block, cards)` as soon as it is made. `offset` is the position of this layer's first dictionary in the site's
    list (matches refer to dictionaries by position)."""
    ids = [artefact_id(src.model, src.layer, a) for a in src.artefacts]
    sets = top_sets(src.artefacts, src.match_inputs, src.match_unit, cfg.match_top_n)
    entries = []
    for i, (aid, art) in enumerate(zip(ids, src.artefacts)):
        t0 = time.perf_counter()
        ev = scan(art, src.store, src.layer, cfg, token_rows=lookups.token_rows(src, cfg.fire_min_count))
        matches = []
        for j, other in enumerate(src.artefacts):
            if other.method != art.method:
                best, f1 = best_matches(sets[i], sets[j])
                matches.append((offset + j, best, f1))  # index of the other dictionary in the site
        picks: dict[int, list] = {}
        concept_index: dict[str, list] = {}
        for name, (cs, acts) in src.concepts.items():
            if art.supervised and art.info.get("concept_set") not in (None, name):
                continue
            for concept, k, auc in concept_picks(art, cs, acts):
                picks.setdefault(k, []).append([name, concept, _num(auc, 3), bool(auc >= CHANCE_AUROC)])
                concept_index[f"{name}/{concept}"] = [k, _num(auc, 3)]
        member_ctx = {kind: art.tensors[f"{kind}_context"].numpy() for kind in ("closest", "farthest")} \
            if art.method == "ep" else {}
        e = _exponents(ev)
        top = _example_rows(ev.top, e, cfg.before, range(art.K))  # all of them: the search index reads them
        logits, logits_note = _logit_effects(art, src, cfg.logit_tokens)
        text = lookups.text(src)
        for block, a0 in enumerate(range(0, art.K, cfg.shard_features)):
            ks = range(a0, min(art.K, a0 + cfg.shard_features))
            neg = _example_rows(ev.negative, e, cfg.before, ks)
            bands = [_example_rows(s, e, cfg.before, ks) for s in ev.bands.samples]
            feats = []
            for j, k in enumerate(ks):
                card: dict[str, Any] = {
                    "k": k, "e": int(e[k]), "min": _num(ev.vmin[k]), "max": _num(ev.vmax[k]),
                    "top": top[k], "neg": neg[j],
                    "bands": [[_num(ev.bands.lo[k, b]), _num(ev.bands.hi[k, b]), int(ev.bands.count[k, b]),
                               bands[b][j]] for b in range(cfg.bands)],
                    "hist": [_num(ev.hist.lo[k]), _num(ev.hist.hi[k]), ev.hist.counts[k].tolist(),
                             int(ev.hist.zeros[k]), ev.hist.rows],
                    "match": [[j2, int(best[k]), _num(f1[k], 3)] for j2, best, f1 in matches if best[k] >= 0],
                    "concepts": picks.get(k, []),
                }
                if logits is not None:  # [[promoted: [id, text, logit], ...], [suppressed: ...]]
                    card["logit"] = [[[t, text(t), _num(v, 3)] for t, v in zip(logits[0][k], logits[1][k])],
                                     [[t, text(t), _num(v, 3)] for t, v in zip(logits[2][k], logits[3][k])]]
                if art.method == "ep":
                    card["ep"] = _ep_members(art, src.store, tokens, src.model, k, cfg, member_ctx)
                for ex in (*top[k], *neg[j], *(x for b in bands for x in b[j])):
                    tokens.show(src.store, src.model, ex[0])
                feats.append(card)
            write(aid, block, feats)
        lookups.add_search(offset + i, src, ev, top, e, tokens, cfg.search_features)
        fire = lookups.add_fire(offset + i, src, ev, cfg.fire_features)
        cost = art.cost
        same = same_as_run(rows, src.model, src.layer, art)
        if same is False:
            print(f"epbench browse: warning: {art.name} at layer {src.layer} is not the artefact the run measured "
                  "(the artefact cache was rebuilt since, e.g. its method code changed); its cards describe the "
                  "rebuilt fit, its metrics the run's", file=sys.stderr)
        entry = {
            "id": aid, "model": src.model, "layer": src.layer, "name": art.name, "method": art.method,
            "K": art.K, "supervised": art.supervised, "store": src.store.id,
            "readout": default_readout(art) or getattr(art.config, "readout", None) or art.readouts[0],
            "theta": _num_or_none(art.info.get("theta")), "p": _num_or_none(art.info.get("p")),
            "cost": {"tokens": _num_or_none(cost.tokens, 12), "rows": _num_or_none(cost.rows, 12),
                     "flops": _num_or_none(cost.flops, 3), "seconds": _num_or_none(cost.wall_seconds, 3),
                     "device": str(cost.device)},
            "metrics": _headline(rows, src.model, src.layer, art.name),
            "labels": _label_tokens(art, ev.top, src.store, tokens, src.model),
            "rows": ev.rows, "contexts": ev.contexts, "store_contexts": src.store.n_contexts,
            "pos": ev.positive.tolist(), "max": [_num(v, 3) for v in ev.vmax.tolist()],
            "logits": {"ok": logits is not None, "note": logits_note}, "fire": fire,
            "concepts": concept_index, "shard": cfg.shard_features,
            "card_seconds": _num(time.perf_counter() - t0, 3), "same_as_run": same,
        }
        if art.method == "ep":
            entry["members"] = [int(x) for x in art.tensors["member_count"].tolist()]
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------------------
# Writing the site


def _js(path: Path, call: str, *args: Any) -> int:
    """Write `EPB.<call>(args...)` atomically; returns the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"EPB.{call}(" + ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=False) for a in args) + ");\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return len(text.encode())


def _js_packed(path: Path, call: str, key: str, block: int, obj: Any) -> int:
    """Write `EPB.<call>(key, block, "<base64 of gzipped JSON>")`: cards compress ~4x; the page inflates them
    with the browser's own DecompressionStream (no library, no network)."""
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return _js(path, call, key, block, base64.b64encode(gzip.compress(raw, 6, mtime=0)).decode())


def write_site(out: Path, sources: list[LayerSource], cfg: BrowseConfig, rows: Any = None,
               title: str = "", meta: dict[str, Any] | None = None) -> Path:
    """Compute every card and write the site into `out` (index.html, app.js, style.css, data/)."""
    from bench.cache import unique_tmp

    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(out)  # a name no user folder has (never `<out>.tmp`, which may be the user's)
    try:
        _write_site_into(tmp, out, sources, cfg, rows, title, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_site_into(tmp: Path, out: Path, sources: list[LayerSource], cfg: BrowseConfig, rows: Any, title: str,
                     meta: dict[str, Any] | None) -> None:
    """Write the site into the fresh folder `tmp`, then swap it in for `out` (a site `browse` wrote, or nothing)."""
    from bench.cache import unique_tmp

    data = tmp / "data"
    tokens, lookups, entries = _Tokens(), _Text(), []
    for src in sources:
        def write(aid: str, block: int, feats: list[dict]) -> None:
            _js_packed(data / "f" / aid / f"{block}.js", "shard", aid, block, feats)

        entries += layer_cards(src, cfg, tokens, rows, lookups, write, offset=len(entries))
    for model, used in tokens.used.items():
        text = lookups.decoders.get(model) or TokenText(None)
        _js(data / "vocab" / f"{_safe(model)}.js", "vocab", model, {str(i): text(i) for i in sorted(used)})
    for sid, shown in tokens.shown.items():
        ctxs, blocks = tokens.contexts[sid], sorted({c // CONTEXT_BLOCK for c in shown})
        for b in blocks:
            _js(data / "contexts" / _safe(sid) / f"{b}.js", "contexts", sid, b,
                {str(c): ctxs[c] for c in sorted(shown) if c // CONTEXT_BLOCK == b})
    index = {"title": title, "context_block": CONTEXT_BLOCK,
             "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "meta": meta or {},
             "config": dataclasses.asdict(cfg), "artefacts": entries, "headline": list(HEADLINE),
             "chance_auroc": CHANCE_AUROC, **lookups.write(data)}
    _js(data / "index.js", "index", index)
    for name in ("index.html", "app.js", "style.css"):
        shutil.copy(STATIC / name, tmp / name)
    (tmp / SITE_MARKER).write_text("written by `epbench browse`; the next browse to this folder replaces it whole\n")
    check_out(out)  # again, just before replacing: nothing else may have been put there meanwhile
    old = None
    if out.exists():
        old = unique_tmp(out)
        out.replace(old)
    tmp.replace(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def site_size(out: Path) -> int:
    """Bytes on disk of every file of the site."""
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def browse(target: str, out: str | Path | None = None, config: BrowseConfig | None = None,
           results_dir: str | Path = "results") -> Path:
    """Write the browser for a run id / run directory / artefact directory; returns the site folder."""
    cfg = config or BrowseConfig()
    kind, path = resolve_target(target, results_dir)
    check_out(Path(out) if out else path / "browser")  # before any work: never replace what browse did not write
    rows, meta = None, {}
    if kind == "run":
        from bench.report.common import load_rows, load_run_info
        from bench.report.tables import on_concept_set, primary_concept_set

        sources = run_sources(path, cfg)
        run = json.loads((path / "run.json").read_text())
        meta = {k: run.get(k) for k in ("run_id", "suite", "git_commit", "started", "finished")}
        if (path / "REPORT.md").exists():  # the run's verdict page, linked from the index
            meta["report"] = os.path.relpath(path / "REPORT.md", Path(out) if out else path / "browser")
        if (path / "cells").is_dir():
            from bench.runner import verify_tables

            verify_tables(path)  # as `report` does: derived tables checked against the cells, rebuilt if off
        if (path / "rows.parquet").exists() or (path / "rows.csv").exists():
            rows = load_rows(path)
            meta["concept_set"] = primary_concept_set(rows, load_run_info(path))
            rows = on_concept_set(rows, meta["concept_set"])
    else:
        sources = artefact_sources(path, cfg)
        if not sources:
            raise ValueError(f"{path}: no artefact matched --layers {cfg.layers} / --methods {cfg.methods}")
    return write_site(Path(out) if out else path / "browser", sources, cfg, rows, title=path.name, meta=meta)
