"""`epbench browse`: a static, offline feature browser for a run (or for saved artefacts).

The site is plain HTML/CSS/JS (bench/browser/static) plus data written as JavaScript files, because a page
opened from disk (file://) may not fetch JSON: `data/index.js` (every dictionary, its headline metrics, and per
feature a label token and the concepts that select it) loads with the page; each block of `shard_features`
feature cards is `data/f/<artefact>/<block>.js` (gzipped JSON as base64), injected as a <script> only when a
card of that block opens, and the store contexts it shows come in blocks of CONTEXT_BLOCK the same way.
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

from bench.browser.cards import CardConfig, best_matches, concept_picks, sample_rows, scan, top_sets
from metrics.feature_selection import default_readout
from methods.base import Artefact, load_artefact

STATIC = Path(__file__).parent / "static"
CONTEXT_BLOCK = 32  # store contexts per data file (a card loads the blocks of the contexts it shows)
HEADLINE = ("retrieval.precision@10", "detection.auroc", "probing.onehot_retention", "ood.auroc",
            "correspondence.mean_best_f1", "recon.explained_variance", "recon.loss_recovered",
            "stability.direction.mean_cos")


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
                     "match_top_n"):
            value = getattr(self, name)
            low = 0 if name in ("before", "after", "members") else 1
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
        if (p / "cfg.json").is_file() or (p / "index.json").is_file():
            return "artefacts", p
    raise FileNotFoundError(f"{target}: neither a run (results/<run-id>/run.json) nor an artefact directory "
                            "(cfg.json, or an artefact cache folder with index.json); pass `epbench run`'s run id "
                            "or a directory written by `epbench build`")


def suite_of_run(run_dir: Path) -> Any:
    """The Suite a run recorded in run.json."""
    from bench.suites import MethodSpec, Suite

    cfg = json.loads((run_dir / "run.json").read_text())["config"]
    names = {f.name for f in dataclasses.fields(Suite)}
    return Suite(**{**{k: v for k, v in cfg.items() if k in names},
                    "methods": [MethodSpec(**m) for m in cfg["methods"]]})


def _wanted(art_or_label: str, methods: list[str] | None) -> bool:
    return methods is None or art_or_label in methods


def run_sources(run_dir: Path, cfg: BrowseConfig) -> list[LayerSource]:
    """One LayerSource per (model, layer) of a run: artefacts through ModelContext (the run's cache)."""
    from bench.context import ModelContext

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
    out = []
    for model in suite.models:
        ctx = ModelContext(suite, model, progress=False)
        for L in layers:
            arts = [a for s in suite.methods for a in ctx.artefacts(s.label, L)
                    if cfg.methods is None or s.label in cfg.methods or a.name in cfg.methods]
            if not arts:
                raise ValueError(f"--methods {' '.join(cfg.methods or [])}: no artefact of {run_dir} at layer {L} "
                                 "has that spec or artefact label; `epbench browse` without --methods lists them all")
            concepts = {n: (cs, ctx.concept_acts(n, L)) for n, cs in ctx.concept_sets.items()}
            inputs = ctx.heldout_acts(L) if concepts else sample_rows(ctx.store, L, cfg.sample_contexts).acts
            out.append(LayerSource(model, L, arts, ctx.store, ctx.backend.tokenizer, concepts, inputs,
                                   "text" if concepts else "token"))
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
        out.append(LayerSource(model, L, arts, store, _tokenizer(model), {},
                               sample_rows(store, L, cfg.sample_contexts).acts, "token"))
    return out


def _tokenizer(model: str) -> Any:
    try:
        from bench.models import load_model

        return load_model(model, "cpu").tokenizer
    except (KeyError, ValueError, RuntimeError, OSError):
        return None  # e.g. a synthetic store: the site shows token ids


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


def _label_tokens(art: Artefact, top, store: Any, tokens: _Tokens, model: str) -> list[int]:
    """Per feature the token that names it: EP's exemplar token, else the token at its strongest activation."""
    out = []
    for k in range(art.K):
        if art.method == "ep":
            cid, pos = int(art.tensors["exemplar_context"][k]), int(art.tensors["exemplar_position"][k])
        else:
            cid, pos = int(top.context[k, 0]), int(top.peak[k, 0])
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


def layer_cards(src: LayerSource, cfg: BrowseConfig, tokens: _Tokens, rows: Any,
                offset: int = 0) -> tuple[list[dict], dict]:
    """The index entries and the cards ({artefact id: [card, ...]}) of one model and layer; `offset` is the
    position of this layer's first dictionary in the site's list (matches refer to dictionaries by position)."""
    ids = [artefact_id(src.model, src.layer, a) for a in src.artefacts]
    sample = sample_rows(src.store, src.layer, cfg.sample_contexts)
    sets = top_sets(src.artefacts, src.match_inputs, src.match_unit, cfg.match_top_n)
    entries, cards = [], {}
    for i, (aid, art) in enumerate(zip(ids, src.artefacts)):
        t0 = time.perf_counter()
        top, hist = scan(art, sample, cfg)
        matches = []
        for j, other in enumerate(src.artefacts):
            if other.method != art.method:
                best, f1 = best_matches(sets[i], sets[j])
                matches.append((offset + j, best, f1))  # index of the other dictionary in the site
        picks: dict[int, list] = {}
        concept_index: dict[str, int] = {}
        for name, (cs, acts) in src.concepts.items():
            if art.supervised and art.info.get("concept_set") not in (None, name):
                continue
            for concept, k, auc in concept_picks(art, cs, acts):
                picks.setdefault(k, []).append([name, concept, _num(auc, 3)])
                concept_index[f"{name}/{concept}"] = k
        member_ctx = {kind: art.tensors[f"{kind}_context"].numpy() for kind in ("closest", "farthest")} \
            if art.method == "ep" else {}
        feats = []
        for k in range(art.K):
            card: dict[str, Any] = {
                "k": k,
                "top": [[int(top.context[k, t]), int(top.start[k, t]), int(top.peak[k, t]), _num(top.value[k, t]),
                         top.digits[k][t]] for t in range(top.context.shape[1]) if top.context[k, t] >= 0],
                "hist": [_num(hist.lo[k]), _num(hist.hi[k]), hist.counts[k].tolist(), int(hist.zeros[k]), hist.rows],
                "match": [[j, int(best[k]), _num(f1[k], 3)] for j, best, f1 in matches if best[k] >= 0],
                "concepts": picks.get(k, []),
            }
            if art.method == "ep":
                card["ep"] = _ep_members(art, src.store, tokens, src.model, k, cfg, member_ctx)
            feats.append(card)
        for k in range(art.K):
            for c in feats[k]["top"]:
                tokens.show(src.store, src.model, c[0])
        cost = art.cost
        same = same_as_run(rows, src.model, src.layer, art)
        if same is False:
            print(f"epbench browse: warning: {art.name} at layer {src.layer} is not the artefact the run measured "
                  "(the artefact cache was rebuilt since, e.g. its method code changed); its cards describe the "
                  "rebuilt fit, its metrics the run's", file=sys.stderr)
        entries.append({
            "id": aid, "model": src.model, "layer": src.layer, "name": art.name, "method": art.method,
            "K": art.K, "supervised": art.supervised, "store": src.store.id,
            "readout": default_readout(art) or getattr(art.config, "readout", None) or art.readouts[0],
            "theta": _num_or_none(art.info.get("theta")), "p": _num_or_none(art.info.get("p")),
            "cost": {"tokens": _num_or_none(cost.tokens, 12), "rows": _num_or_none(cost.rows, 12),
                     "flops": _num_or_none(cost.flops, 3), "seconds": _num_or_none(cost.wall_seconds, 3),
                     "device": str(cost.device)},
            "metrics": _headline(rows, src.model, src.layer, art.name),
            "labels": _label_tokens(art, top, src.store, tokens, src.model),
            "concepts": concept_index, "shard": cfg.shard_features,
            "card_seconds": _num(time.perf_counter() - t0, 3), "same_as_run": same,
        })
        cards[aid] = feats
    return entries, cards


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
    return _js(path, call, key, block, base64.b64encode(gzip.compress(raw, 9, mtime=0)).decode())


def _token_text(tokenizer: Any, ids: list[int]) -> dict[str, str]:
    if tokenizer is None:
        return {str(i): f"#{i}" for i in ids}
    return {str(i): tokenizer.decode([i]) for i in ids}


def write_site(out: Path, sources: list[LayerSource], cfg: BrowseConfig, rows: Any = None,
               title: str = "", meta: dict[str, Any] | None = None) -> Path:
    """Compute every card and write the site into `out` (index.html, app.js, style.css, data/)."""
    from bench.cache import unique_tmp

    check_out(out)
    tokens = _Tokens()
    entries: list[dict] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(out)  # a name no user folder has (never `<out>.tmp`, which may be the user's)
    try:
        _write_site_into(tmp, out, sources, cfg, rows, title, meta, tokens, entries)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_site_into(tmp: Path, out: Path, sources: list[LayerSource], cfg: BrowseConfig, rows: Any, title: str,
                     meta: dict[str, Any] | None, tokens: _Tokens, entries: list[dict]) -> None:
    """Write the site into the fresh folder `tmp`, then swap it in for `out` (a site `browse` wrote, or nothing)."""
    from bench.cache import unique_tmp

    data = tmp / "data"
    tokenizers: dict[str, Any] = {}
    for src in sources:
        tokenizers[src.model] = src.tokenizer
        e, cards = layer_cards(src, cfg, tokens, rows, offset=len(entries))
        entries += e
        for aid, feats in cards.items():
            for b in range(0, len(feats), cfg.shard_features):
                _js_packed(data / "f" / aid / f"{b // cfg.shard_features}.js", "shard", aid,
                           b // cfg.shard_features, feats[b:b + cfg.shard_features])
    for model, used in tokens.used.items():
        _js(data / "vocab" / f"{_safe(model)}.js", "vocab", model, _token_text(tokenizers.get(model), sorted(used)))
    for sid, shown in tokens.shown.items():
        ctxs, blocks = tokens.contexts[sid], sorted({c // CONTEXT_BLOCK for c in shown})
        for b in blocks:
            _js(data / "contexts" / _safe(sid) / f"{b}.js", "contexts", sid, b,
                {str(c): ctxs[c] for c in sorted(shown) if c // CONTEXT_BLOCK == b})
    index = {"title": title, "context_block": CONTEXT_BLOCK, "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "meta": meta or {},
             "config": dataclasses.asdict(cfg), "artefacts": entries, "headline": list(HEADLINE)}
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
