"""The suite runner: expands a suite into cells, computes each once, appends tidy rows to results/<run-id>/.

A cell is (model, layer, method spec, metric family); cross-layer families use layer -1 ("all layers").
Finished cells are JSON files under `results/<run-id>/cells/`; a rerun skips them (resume), `force` recomputes.
Artefacts are cached by (store id, method spec) under the epbench cache, so cells of every family share one build.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from bench.activations import TextActivations
from bench.cache import atomic_write_text, cache_dir, file_lock, hold_lock, safe_name, unique_tmp
from bench.store import ActivationStore, ExtractionRequest, extract, library_versions
from bench.suites import CROSS_LAYER_FAMILIES, MethodSpec, Suite
from methods.base import Artefact, ArtefactError, load_artefact
from metrics.common import MetricRow

ALL_LAYERS = -1


@dataclass(frozen=True)
class Cell:
    model: str
    layer: int  # ALL_LAYERS for cross-layer families
    spec: str  # MethodSpec.label
    family: str

    @property
    def id(self) -> str:
        layer = "all" if self.layer == ALL_LAYERS else f"L{self.layer:02d}"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{self.model}__{layer}__{self.spec}__{self.family}")


def expand_cells(suite: Suite) -> list[Cell]:
    """Every cell of the grid, builds first so later cells reuse the artefacts."""
    cells = []
    for model in suite.models:
        for spec in suite.methods:
            for family in suite.metrics:
                if not _applies(spec, family, suite):
                    continue
                if family in CROSS_LAYER_FAMILIES:
                    if len(suite.layers) > 1:
                        cells.append(Cell(model, ALL_LAYERS, spec.label, family))
                    continue
                # a family limited to layers the (narrowed) suite lacks falls back to every suite layer
                layers = [L for L in suite.family_layers.get(family, []) if L in suite.layers] or suite.layers
                cells.extend(Cell(model, layer, spec.label, family) for layer in layers)
    order = {f: i for i, f in enumerate(suite.metrics)}
    return sorted(cells, key=lambda c: (suite.models.index(c.model), order[c.family] != 0, c.layer == ALL_LAYERS,
                                        order[c.family], c.layer))


def _applies(spec: MethodSpec, family: str, suite: Suite) -> bool:
    """Whether a family has anything to measure for a method (e.g. no loss recovered without a decoder)."""
    from methods.registry import get_method

    cls = get_method(spec.method)
    keep = suite.family_artefacts.get(family)
    if keep is not None and not any(k == spec.label or k.startswith((f"{spec.label}:", f"{spec.label}("))
                                    for k in keep):
        return False  # the suite scores none of this spec's artefacts on this family
    if family == "correspondence":
        return spec.method == "ep" and _sae_spec(suite) is not None
    if family == "recon":
        return bool(cls.artefact_cls.reconstructs)
    if family == "causal":
        return not cls.supervised and bool(suite.prompt_sets)
    if family == "stability":
        return not cls.supervised  # DiffMean's features are the concepts themselves at every layer
    if family == "refusal":
        return not cls.supervised
    return True


def _sae_spec(suite: Suite) -> MethodSpec | None:
    return next((s for s in suite.methods if s.method == "sae"), None)


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _atomic_json(path: Path, obj: Any) -> None:
    """Write JSON through a unique temporary file (no clash between processes; nothing partial left on ENOSPC)."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


class ModelContext:
    """Everything the cells of one model share, loaded lazily and cached (stores are content-addressed)."""

    def __init__(self, suite: Suite, model: str, progress: bool = True, store: ActivationStore | None = None):
        self.suite, self.model_name, self.progress = suite, model, progress
        self.extras_dir: Path | None = None  # set by the Run: results/<run-id>/extras
        if store is not None:
            self.__dict__["store"] = store  # pre-fill the cached property
        self._artefacts: dict[str, dict[int, list[Artefact]]] = {}
        self._text_acts: dict[tuple[str, int], TextActivations] = {}

    # data ---------------------------------------------------------------------------------------------------
    @cached_property
    def backend(self):
        from bench.models import load_model

        return load_model(self.model_name, self.suite.device)

    @cached_property
    def store(self) -> ActivationStore:
        s = self.suite
        req = ExtractionRequest(model=self.model_name, layers=s.layers, corpus=s.corpus, tokens=s.store_tokens,
                                ctx_len=s.ctx_len, seed=s.seed, dtype=s.store_dtype)
        return extract(req, progress=self.progress, device=s.device)

    def text_store(self, name: str, texts: list[str]) -> ActivationStore:
        """A store over evaluation texts (one context per text, truncated to ctx_len), content-addressed."""
        from bench.corpora import Document, ListCorpus

        corpus = ListCorpus(name, [Document(i, t, name) for i, t in enumerate(texts)])
        req = ExtractionRequest(model=self.model_name, layers=self.suite.layers, corpus=name,
                                tokens=10**12, ctx_len=self.suite.ctx_len, max_contexts_per_doc=1)
        return extract(req, progress=self.progress, device=self.suite.device, corpus=corpus)

    def text_acts(self, name: str, texts: list[str], layer: int) -> TextActivations:
        key = (name, layer)
        if key not in self._text_acts:
            rows = self.text_store(name, texts).all_rows(layer)
            self._text_acts[key] = TextActivations(rows.acts, rows.doc_ids, len(texts))
        return self._text_acts[key]

    @cached_property
    def concept_sets(self) -> dict[str, Any]:
        from bench.concepts import get_concept_set

        s = self.suite
        out = {}
        for name in s.concept_sets:
            kw: dict[str, Any] = {}
            if name in ("wordnet", "bbc"):
                kw["per_concept"] = s.concept_examples
                if s.concept_test_examples:
                    kw["test_examples"] = s.concept_test_examples
            if name == "wordnet" and s.max_concepts:
                kw["n_concepts"] = s.max_concepts
            out[name] = get_concept_set(name, seed=s.seed, **kw)
        return out

    def concept_acts(self, name: str, layer: int) -> TextActivations:
        return self.text_acts(f"concepts:{name}", self.concept_sets[name].texts(), layer)

    @cached_property
    def prompt_sets(self) -> dict[str, Any]:
        from bench.prompts import PromptSet, filter_correct, get_prompt_set

        out = {}
        for n in self.suite.prompt_sets:
            ps = get_prompt_set(n)
            cap = self.suite.max_prompts
            if cap is not None and len(ps) > cap:  # a seeded sample of the written prompts, before filtering
                keep = np.sort(np.random.default_rng(self.suite.seed).choice(len(ps), size=cap, replace=False))
                ps = PromptSet(ps.name, [ps.prompts[i] for i in keep], n_written=cap)
            out[n] = filter_correct(ps, self.backend.score_prompts)
        return out

    @cached_property
    def unrelated_texts(self) -> list[str]:
        """Held-out prose for side effects (KL) and loss recovered: texts of the first concept set."""
        texts = next(iter(self.concept_sets.values())).texts() if self.concept_sets else []
        rng = np.random.default_rng(self.suite.seed)
        pick = rng.choice(len(texts), size=min(self.suite.side_effect_texts, len(texts)), replace=False)
        return [texts[i] for i in sorted(pick)]

    def data_summary(self) -> dict[str, Any]:
        """How much evaluation data the cells used so far: per concept set its n and truncated texts, per prompt
        set the prompts written and kept (answered correctly). Recorded in run.json and printed by the report."""
        out: dict[str, Any] = {}
        if "concept_sets" in self.__dict__:
            out["concept_sets"] = {
                name: {**cs.summary().to_dict(),
                       "truncated": cs.count_truncated(self.backend.tokenizer, self.suite.ctx_len).to_dict()}
                for name, cs in self.concept_sets.items()}
        if "prompt_sets" in self.__dict__:
            out["prompt_sets"] = {name: {"written": ps.n_written, "kept": ps.n_kept}
                                  for name, ps in self.prompt_sets.items()}
        return out

    @cached_property
    def refusal_baseline(self) -> list[MetricRow]:
        """Baseline refusal of the chat model on the harmful and harmless request sets (computed once)."""
        from metrics.refusal import baseline_refusal_rows

        return baseline_refusal_rows(self.backend)

    @cached_property
    def ood_texts(self) -> dict[str, list[str]]:
        from bench.corpora import ood_texts

        reference = self.unrelated_id_texts
        return {n: ood_texts(n, reference, tokenizer=self.backend.tokenizer, seed=self.suite.seed)
                for n in self.suite.ood_sets}

    @cached_property
    def unrelated_id_texts(self) -> list[str]:
        """In-distribution held-out texts for the OOD metric: every concept-set text (never in the build stream)."""
        return [t for cs in self.concept_sets.values() for t in cs.texts()]

    def heldout_acts(self, layer: int) -> TextActivations:
        """TextActivations of `unrelated_id_texts`: the concept sets' activations, concatenated."""
        parts = [self.concept_acts(name, layer) for name in self.concept_sets]
        offsets = np.cumsum([0] + [p.n_texts for p in parts])
        return TextActivations(torch.cat([p.acts for p in parts]),
                               torch.cat([p.text_ids + int(o) for p, o in zip(parts, offsets)]), int(offsets[-1]))

    # artefacts ----------------------------------------------------------------------------------------------
    def spec(self, label: str) -> MethodSpec:
        return next(s for s in self.suite.methods if s.label == label)

    def artefacts(self, label: str, layer: int) -> list[Artefact]:
        """The artefacts of one method spec at one layer (built for every suite layer at once, cached on disk)."""
        if label not in self._artefacts:
            self._artefacts[label] = self._load_or_build(self.spec(label))
        return self._artefacts[label][layer]

    def save_extra(self, name: str, values: np.ndarray) -> None:
        """Per-unit values behind a metric (e.g. per-region best F1), as npy under the run's extras/ folder."""
        if self.extras_dir is None:
            return
        self.extras_dir.mkdir(parents=True, exist_ok=True)
        path = self.extras_dir / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".npy")
        tmp = unique_tmp(path)
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a bare temporary name
            np.save(f, np.asarray(values, dtype=np.float32))
        tmp.replace(path)

    def cell_artefacts(self, cell: "Cell") -> list[Artefact]:
        """The artefacts a cell scores: the spec's at the cell's layer, less any the suite leaves out of the family."""
        keep = self.suite.family_artefacts.get(cell.family)
        arts = self.artefacts(cell.spec, cell.layer)
        return [a for a in arts if keep is None or a.name in keep or cell.spec in keep]

    def artefact_summaries(self, cell: "Cell") -> list[dict[str, Any]]:
        """The budget and fit evidence of the artefacts a per-layer cell scored (recorded in its cell file)."""
        if cell.layer == ALL_LAYERS:
            return []
        out = []
        for a in self.cell_artefacts(cell):
            c, info = a.cost, a.info
            out.append({"name": a.name, "family": a.method, "K": a.K, "tokens": c.tokens, "rows": c.rows,
                        "flops": c.flops, "seed": getattr(a.config, "seed", None), "p": info.get("p"),
                        "matched_to": info.get("matched_to"), "quality": fit_quality(a)})
            if cell.family == "build" and a.method == "sae":  # the training curve, once per artefact
                out[-1]["training_curve"] = (info.get("training") or {}).get("curve")
        return out

    def _artefact_dir(self, spec: MethodSpec) -> Path:
        return cache_dir() / "artefacts" / self.store.id / f"{spec.method}-{self.spec_key(spec)}"

    def spec_key(self, spec: MethodSpec) -> str:
        """The spec's key, extended by its match targets' keys (their K / tokens decide what is built)."""
        if not spec.match:
            return spec.key()

        parts = [spec.key()] + [self.spec_key(self.spec(label)) for label in spec.match_to]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]

    def inputs_key(self, spec: MethodSpec) -> str:
        """Hash of what an artefact is fitted on beyond store and settings: the suite layers, the concept sets
        (names and labelled texts) for supervised methods, and the method's code (its module and methods.common)."""
        import inspect

        from methods.registry import get_method

        cls = get_method(spec.method)
        code = hashlib.sha256()
        for mod in (inspect.getmodule(cls), inspect.getmodule(Artefact)):
            src = inspect.getsourcefile(mod) if mod is not None else None
            code.update(Path(src).read_bytes() if src else repr(cls).encode())
        code.update((Path(__file__).resolve().parents[1] / "methods" / "common.py").read_bytes())
        inputs: dict[str, Any] = {"layers": sorted(self.suite.layers), "code": code.hexdigest()}
        if cls.supervised:
            inputs["concept_sets"] = {
                name: hashlib.sha256(cs.examples[["text", "concept", "category", "split"]].to_json().encode())
                .hexdigest() for name, cs in self.concept_sets.items()}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]

    def _load_cached(self, root: Path) -> dict[int, list[Artefact]] | None:
        """The artefacts under `root` if every one verifies and every suite layer is there; None when absent.

        A damaged one (hash, shape, NaN, missing file, torn index) is reported and None returned, so it is rebuilt.
        """
        index = root / "index.json"
        if not index.exists():
            return None
        try:
            saved = json.loads(index.read_text())
            out = {int(L): [load_artefact(root / p) for p in paths] for L, paths in saved.items()}
            if set(out) != set(self.suite.layers):
                raise ArtefactError(f"{index} covers layers {sorted(out)}, not {sorted(self.suite.layers)}")
            return out
        except (ArtefactError, ValueError, TypeError, AttributeError, KeyError, OSError) as e:
            print(f"[epbench] cached artefact unusable, rebuilding it: {e}", flush=True)
            return None

    def _load_or_build(self, spec: MethodSpec) -> dict[int, list[Artefact]]:
        root = self._artefact_dir(spec) / self.inputs_key(spec)
        cached = self._load_cached(root)
        if cached is not None:
            return cached
        with file_lock(root.parent / f"{root.name}.lock", f"the {spec.label} artefact build in {root}"):
            cached = self._load_cached(root)  # another process may have built it while we waited
            if cached is not None:
                return cached
            return self._build_and_save(spec, root)

    def _build_and_save(self, spec: MethodSpec, root: Path) -> dict[int, list[Artefact]]:
        (root / "index.json").unlink(missing_ok=True)  # the index is rewritten last, once every artefact landed
        built = self.build(spec, fits_dir=root / "fits")
        paths: dict[str, list[str]] = {}
        for L, arts in built.items():
            paths[str(L)] = []
            for i, a in enumerate(arts):
                rel = f"L{L:02d}/{i:02d}-{safe_name(a.name)}"  # a concept-set path in a label never nests
                a.save(root / rel)
                paths[str(L)].append(rel)
        _atomic_json(root / "index.json", paths)
        shutil.rmtree(root / "fits", ignore_errors=True)  # the per-fit checkpoints are in the index now
        return built

    def _fit(self, spec: MethodSpec, fits_dir: Path | None, layer: int, what: dict[str, Any],
             fit: Callable[[], Artefact]) -> Artefact:
        """One fit of `spec` at `layer`, labelled; with `fits_dir`, saved there as soon as it is done and reused when
        the build runs again, so an interrupted multi-fit build (seeds x layers x targets) resumes at the next fit."""
        path = None
        if fits_dir is not None:
            key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
            path = fits_dir / f"L{layer:02d}" / key
            if (path / "cfg.json").exists():
                try:
                    return load_artefact(path)
                except ArtefactError as e:
                    print(f"[epbench] checkpointed fit unusable, fitting it again: {e}", flush=True)
        art = _labelled(spec, fit())
        if path is not None:
            art.save(path)
        return art

    def build(self, spec: MethodSpec, fits_dir: Path | None = None) -> dict[int, list[Artefact]]:
        """Fit one method spec at every suite layer (EP: all layers and percentiles from one pass); each other fit
        is checkpointed under `fits_dir` when given (see `_fit`)."""
        from methods.registry import get_method

        cls = get_method(spec.method)
        layers = self.suite.layers
        if spec.match:
            return {L: self._build_matched(spec, L, fits_dir) for L in layers}
        if spec.method == "ep":
            method = cls(**spec.params)
            built = method.fit_many(self.store, layers)
            return {L: [built[(L, p)] for p in method.config.percentiles] for L in layers}
        out: dict[int, list[Artefact]] = {L: [] for L in layers}
        for params in _seeded(spec.params, spec.seeds):
            method = cls(**params)
            for L in layers:
                if cls.supervised:
                    for name in self.concept_sets:
                        out[L].append(self._fit(spec, fits_dir, L, {"params": params, "concept_set": name},
                                                partial(self._fit_supervised, method, name, L)))
                elif hasattr(method, "fit_many") and spec.method == "kmeans" and isinstance(method.config.k, list):
                    out[L] += [_labelled(spec, a) for a in method.fit_many(self.store, L)]
                else:
                    out[L].append(self._fit(spec, fits_dir, L, {"params": params},
                                            partial(method.fit, self.store, L)))
        return out

    def _fit_supervised(self, method: Any, name: str, layer: int) -> Artefact:
        art = method.fit(self.store, layer, concepts=self.concept_fit_data(name, layer))
        art.info["concept_set"] = name
        art.info["label"] = f"{art.name}[{short_data_label(name)}]"
        return art

    def match_targets(self, spec: MethodSpec, layer: int) -> list[Artefact]:
        """The artefacts (one per name: seeds share a budget) whose K or tokens a matched spec copies."""
        targets: dict[str, Artefact] = {}
        for label in spec.match_to:
            for t in self.artefacts(label, layer):
                if not spec.match_p or t.info.get("p") in spec.match_p:
                    targets.setdefault(t.name, t)
        if not targets:
            raise ValueError(f"method spec {spec.label!r}: no artefact of {spec.match_to} (p in {spec.match_p or 'any'})"
                             f" at layer {layer} to match; check match_to / match_p against the suite's methods")
        return list(targets.values())

    def _build_matched(self, spec: MethodSpec, layer: int, fits_dir: Path | None = None) -> list[Artefact]:
        """One artefact per target (per seed) with the target's K or token budget; labelled `<spec>(<target>)`."""
        from methods.registry import get_method

        cls = get_method(spec.method)
        out = []
        for target in self.match_targets(spec, layer):
            budget = budget_params(spec, cls, target)
            if budget is None:
                print(f"[epbench] {spec.label}: skipping {target.name} at layer {layer} (K={target.K} is not a valid "
                      f"{spec.method} size here)", flush=True)
                continue
            matched_to = {"artefact": target.name, "kind": spec.match, "K": target.K, "tokens": target.cost.tokens,
                          "rows": target.cost.rows}
            for params in _seeded({**spec.params, **budget}, spec.seeds):
                out.append(self._fit(spec, fits_dir, layer, {"params": params, "matched_to": matched_to},
                                     partial(self._fit_matched, cls(**params), layer, spec.label, matched_to)))
        return out

    def _fit_matched(self, method: Any, layer: int, label: str, matched_to: dict[str, Any]) -> Artefact:
        art = method.fit(self.store, layer)
        art.info["label"] = f"{label}({matched_to['artefact']})"
        art.info["matched_to"] = matched_to
        return art

    def concept_fit_data(self, name: str, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Train-split token rows per concept: (positives, negatives incl. hard negatives), for DiffMean."""
        cs, ta = self.concept_sets[name], self.concept_acts(name, layer)
        train = cs.examples[cs.examples["split"] == "train"]
        out = {}
        for concept in cs.concepts:
            ex = train[train["concept"] == concept]
            pos = torch.tensor(sorted(set(ex.loc[ex["category"] == "positive", "text_id"])))
            neg = torch.tensor(sorted(set(ex.loc[ex["category"] != "positive", "text_id"])))
            out[concept] = (ta.acts[torch.isin(ta.text_ids, pos)], ta.acts[torch.isin(ta.text_ids, neg)])
        return out

    def for_concept_set(self, arts: list[Artefact], name: str) -> list[Artefact]:
        """Supervised artefacts are scored only on the concept set they were fitted on."""
        return [a for a in arts if not a.supervised or a.info.get("concept_set") == name]


# ---------------------------------------------------------------------------------------------------------
# Metric families: each (context, cell) -> rows


# Config field that sets a method's dictionary size (plugins may declare `size_param` on their Method class).
SIZE_PARAMS = {"kmeans": "k", "random": "k", "pca": "k", "sae": "width"}


def _labelled(spec: MethodSpec, art: Artefact) -> Artefact:
    """A fit of a spec with its own label (e.g. `kmeans@K-p1`) carries that label unless the fit set one."""
    if spec.label != spec.method and art.info.get("label", art.method) == art.method:
        art.info["label"] = spec.label
    return art


def budget_params(spec: MethodSpec, cls: type, target: Artefact) -> dict[str, Any] | None:
    """Config overrides giving `spec` the target's budget: its K (size parameter) or its streamed tokens."""
    if spec.match == "tokens":
        if spec.method != "sae":
            raise ValueError(f"{spec.label}: match='tokens' is implemented for trained SAEs (token_budget) only")
        return {"token_budget": int(target.cost.tokens)}
    name = getattr(cls, "size_param", None) or SIZE_PARAMS.get(spec.method)
    if name is None:
        raise ValueError(f"{spec.label}: method {spec.method!r} has no size parameter to match K with; "
                         "declare `size_param` on its Method class")
    if spec.method == "pca" and target.K > target.d_model:
        return None  # PCA has at most d components
    if spec.method == "sae" and target.K < int(spec.params.get("k", 1)):
        return None  # fewer latents than the TopK k
    return {name: int(target.K)}


from bench.verdict import EV_FLOOR  # noqa: E402  (an SAE below it is marked "undertrained" wherever it appears)


def fit_quality(a: Artefact) -> dict[str, Any] | None:
    """Evidence that a fitted baseline is at its best: SAE held-out EV / convergence, k-means iterations."""
    info = a.info
    if a.method == "sae" and info.get("source") == "trained":
        ev = info.get("explained_variance")  # held-out, after training
        tr = info.get("training") or {}
        clamped = bool((info.get("budget") or {}).get("budget_clamped_to_pool"))
        return {"explained_variance": ev, "undertrained": ev is None or ev < EV_FLOOR, "ev_floor": EV_FLOOR,
                "converged": tr.get("converged"), "epochs": tr.get("epochs"),
                "stop_reason": (tr.get("stop_reason") or "") + ("; token budget clamped to the pool before the "
                                                                "held-out tail" if clamped else "")}
    if a.method == "kmeans":
        return {k: info.get(k) for k in ("iterations", "objective", "converged", "stop_reason")}
    if a.method == "ep":
        return {"stop_reason": info.get("stop_reason"), "tokens_streamed": info.get("tokens_streamed")}
    return None


def short_data_label(spec: str) -> str:
    """A data spec as a table label: `axbench:/long/path/prod_2b_l20_v1` -> `axbench:prod_2b_l20_v1`."""
    kind, sep, where = spec.partition(":")
    return f"{kind}:{Path(where).name or where}" if sep else spec


def _seeded(params: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """One parameter set per fit seed (the params as given when no seeds are listed)."""
    return [params] if not seeds else [{**params, "seed": s} for s in seeds]


def _build_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.common import row

    rows = []
    for a in ctx.cell_artefacts(cell):
        c = a.cost
        values = {"build.K": a.K, "build.tokens": c.tokens, "build.rows": c.rows, "build.flops": c.flops,
                  "build.wall_seconds": c.wall_seconds, "build.peak_memory_mb": c.peak_memory_bytes / 2**20}
        if "theta" in a.info:
            values.update({"build.theta": a.info["theta"], "build.percentile": a.info["p"],
                           "build.center_norm": a.info["calibration"]["center_norm"],
                           "build.saturated": float(str(a.info.get("stop_reason", "")).startswith("saturat"))})
        q = fit_quality(a) or {}
        if a.method == "sae" and q:
            values.update({"build.heldout_explained_variance": q["explained_variance"],
                           "build.converged": float(bool(q["converged"])), "build.epochs": q["epochs"]})
        if a.method == "kmeans" and q.get("iterations") is not None:
            values.update({"build.iterations": q["iterations"], "build.converged": float(bool(q["converged"])),
                           "build.objective": q["objective"]})
        # stop reasons (free text with measured numbers) stay in the cell's artefact records, not in row details
        rows += [row(a, k, float("nan") if v is None else v, layer=cell.layer) for k, v in values.items()]
    return rows


def _with_setting(setting: str, detail: str) -> str:
    """Detail led by the data set it was measured on (unless the metric already put it first)."""
    if not detail:
        return setting
    return detail if detail.split(";")[0].strip() == setting else f"{setting}; {detail}"


def _concept_family(fn_name: str) -> Callable[[ModelContext, Cell], list[MetricRow]]:
    def run(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
        import importlib

        module, func = fn_name.split(":")
        fn = getattr(importlib.import_module(module), func)
        rows = []
        for name, cs in ctx.concept_sets.items():
            ta = ctx.concept_acts(name, cell.layer)
            for a in ctx.for_concept_set(ctx.cell_artefacts(cell), name):
                for r in fn(a, cs, ta, seed=ctx.suite.seed):
                    r.detail = _with_setting(name, r.detail)
                    rows.append(r)
        return rows

    return run


def _ood_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.ood import ood_metrics

    ind = ctx.heldout_acts(cell.layer)
    oods = {n: ctx.text_acts(f"ood:{n}", t, cell.layer) for n, t in ctx.ood_texts.items()}
    rows = []
    for a in ctx.cell_artefacts(cell):
        rows += ood_metrics(a, ind, oods, theta=a.info.get("theta"), seed=ctx.suite.seed)
    return rows


def _causal_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.causal import CausalConfig, causal_metrics

    rows = []
    cfg = CausalConfig(seed=ctx.suite.seed, alphas=tuple(ctx.suite.causal_alphas))
    for name, ps in ctx.prompt_sets.items():
        for a in ctx.cell_artefacts(cell):
            if a.supervised:
                continue  # DiffMean directions are per concept set, not per prompt attribute
            for r in causal_metrics(a, ctx.backend, ps, ctx.unrelated_texts[: ctx.suite.causal_unrelated_texts],
                                    config=cfg, layer=cell.layer):
                r.detail = _with_setting(name, r.detail)
                rows.append(r)
    return rows


def _recon_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.reconstruction import reconstruction_metrics

    rows = []
    for a in ctx.cell_artefacts(cell):
        rows += reconstruction_metrics(a, ctx.backend, ctx.unrelated_texts, layer=cell.layer, ctx_len=ctx.suite.ctx_len,
                                       seed=ctx.suite.seed)
    return rows


def _cost_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.cost import compare_costs, encode_throughput

    acts = next(ctx.store.batches(cell.layer, batch_contexts=32)).acts
    rows = []
    arts = ctx.cell_artefacts(cell)
    for a in arts:
        rows += encode_throughput(a, acts, seed=ctx.suite.seed)
    sae = _sae_spec(ctx.suite)
    if ctx.spec(cell.spec).method == "ep" and sae is not None:
        for a in arts:
            rows += compare_costs(a, ctx.artefacts(sae.label, cell.layer)[0], seed=ctx.suite.seed)
    return rows


def _correspondence_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.correspondence import correspondence_metrics

    sae = ctx.artefacts(_sae_spec(ctx.suite).label, cell.layer)[0]
    inputs = ctx.heldout_acts(cell.layer)
    rows = []
    for a in ctx.cell_artefacts(cell):
        extras: dict[str, np.ndarray] = {}
        rows += correspondence_metrics(a, sae, inputs, unit="text", seed=ctx.suite.seed, extras=extras)
        ctx.save_extra(f"correspondence_{cell.model}_L{cell.layer:02d}_{a.name}", extras["best_f1"])
    return rows


def _stability_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.stability import StabilityConfig, concept_stability, cross_layer_stability

    layers = ctx.suite.layers
    per_layer = {L: ctx.artefacts(cell.spec, L) for L in layers}
    cfg = StabilityConfig(seed=ctx.suite.seed, max_tokens=min(ctx.suite.store_tokens, 30_000))
    rows = []
    for i in range(len(per_layer[layers[0]])):  # one chain per variant (EP percentile, k-means k, concept set)
        chain = {L: per_layer[L][i] for L in layers}
        rows += cross_layer_stability(chain, store=ctx.store, config=cfg)
        name = next(iter(ctx.concept_sets), None)
        if name is not None:
            acts = {L: ctx.concept_acts(name, L) for L in layers}
            for r in concept_stability(chain, ctx.concept_sets[name], acts, config=cfg):
                r.detail = _with_setting(name, r.detail)
                rows.append(r)
    return rows


REFUSAL_FLOOR = 0.5  # below this baseline refusal rate there is no refusal to ablate: only the baseline is reported


def _refusal_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    """The model's baseline refusal rate (in the first refusal cell of the grid) and, when the model refuses,
    the refusal rate after ablating each artefact's best harmful-vs-harmless region."""
    from metrics.refusal import refusal_ablation_metrics

    first = next(c for c in expand_cells(ctx.suite) if c.family == "refusal" and c.model == cell.model)
    rows = list(ctx.refusal_baseline) if cell == first else []
    rate = next(r.value for r in ctx.refusal_baseline if r.metric == "refusal.baseline.harmful_rate")
    if rate >= REFUSAL_FLOOR:
        for a in ctx.cell_artefacts(cell):
            rows += refusal_ablation_metrics(a, ctx.backend, layer=cell.layer)
    elif not rows:  # a valid measurement: nothing to ablate; recorded so the cell is not an empty finish
        from metrics.common import row

        rows = [row(a, "refusal.not_applicable", rate, layer=cell.layer,
                    detail=f"baseline harmful refusal {rate:.2f} < {REFUSAL_FLOOR}: no refusal to ablate")
                for a in ctx.cell_artefacts(cell)]
    return rows


FAMILIES: dict[str, Callable[[ModelContext, Cell], list[MetricRow]]] = {
    "build": _build_rows,
    "retrieval": _concept_family("metrics.retrieval:retrieval_metrics"),
    "detection": _concept_family("metrics.detection:detection_metrics"),
    "probing": _concept_family("metrics.probing:probing_metrics"),
    "ood": _ood_rows,
    "causal": _causal_rows,
    "recon": _recon_rows,
    "cost": _cost_rows,
    "correspondence": _correspondence_rows,
    "stability": _stability_rows,
    "refusal": _refusal_rows,
}


# ---------------------------------------------------------------------------------------------------------
# The run: results directory, resume, provenance


class Run:
    """One run of a suite: `results/<run-id>/` with run.json, cells/*.json, rows.parquet, rows.csv."""

    def __init__(self, suite: Suite, results_dir: str | Path = "results", run_id: str | None = None,
                 force: bool = False, progress: bool = True):
        self.suite = suite
        self.run_id = run_id or f"{suite.name}-{suite.key()}"
        self.dir = Path(results_dir) / self.run_id
        self.cells_dir = self.dir / "cells"
        self.progress = progress
        self.dir.mkdir(parents=True, exist_ok=True)
        # one process per run directory: a second `epbench run` of the same run id refuses in one line
        hold_lock(self.dir / ".lock", f"run {self.dir}", wait=False)
        if force and self.cells_dir.exists():
            for p in self.cells_dir.glob("*.json"):
                p.unlink()
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self._contexts: dict[str, ModelContext] = {}
        meta_path = self.dir / "run.json"
        old = None if force else _read_run_json(meta_path)
        config = json.loads(json.dumps(suite.to_dict(), default=str))
        if old is not None and old.get("config") is not None:
            # a field added to Suite since the run started reads as its default: the grid is unchanged
            was = {**_suite_defaults(suite, set(config) - set(old["config"])), **old["config"]}
            changed = sorted(k for k in set(config) | set(was) if config.get(k) != was.get(k))
            if changed:
                raise ValueError(f"run {self.dir} was started with another {suite.name} suite (differs in {changed});"
                                 " resuming would mix two grids: pass --force to restart it or choose another --run-id")
            old["config"] = config
        self.meta = old or {
            "run_id": self.run_id, "suite": suite.name, "config": config,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_seconds": 0.0}
        self.meta.update(versions=library_versions(), git_commit=git_commit(), machine=machine_info())
        _atomic_json(meta_path, self.meta)

    def context(self, model: str) -> ModelContext:
        if model not in self._contexts:
            if self.suite.needs_hub:
                from bench.models import HUB_MODELS, check_hub_access

                if model in HUB_MODELS:
                    check_hub_access(HUB_MODELS[model])
            self._contexts[model] = ModelContext(self.suite, model, self.progress)
            self._contexts[model].extras_dir = self.dir / "extras"
        return self._contexts[model]

    def cells(self) -> list[Cell]:
        return expand_cells(self.suite)

    def cell_path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.id}.json"

    def is_done(self, cell: Cell) -> bool:
        return read_cell(self.cell_path(cell)) is not None

    def run_cell(self, cell: Cell) -> list[MetricRow]:
        """Compute one cell (or read it back when a previous run finished it) and record its rows."""
        path = self.cell_path(cell)
        done = read_cell(path)
        if done is not None:
            return [MetricRow(**r) for r in done["rows"]]
        ctx = self.context(cell.model)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        t0 = time.perf_counter()
        try:
            rows = FAMILIES[cell.family](ctx, cell)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise RuntimeError(f"cell {cell.id} failed: {type(e).__name__}: {e} (finished cells are kept; "
                               "rerun to resume)") from e
        if not rows:  # a family that measured nothing (e.g. no artefact fitted on this concept set) is an error
            raise RuntimeError(f"cell {cell.id} produced no rows: nothing was scored for {cell.spec} on "
                               f"{cell.family}; check the method's inputs (concept sets, layers) and rerun "
                               "(finished cells are kept)")
        wall = time.perf_counter() - t0
        record = {
            "cell": cell.__dict__, "cell_id": cell.id, "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_seconds": wall,
            "store_id": ctx.store.id, "method_family": ctx.spec(cell.spec).method,
            "git_commit": self.meta["git_commit"],
            "artefacts": ctx.artefact_summaries(cell),
            "rows": [r.to_dict() for r in rows],
        }
        _atomic_json(path, record)
        loaded = {k for k in ("concept_sets", "prompt_sets") if k in ctx.__dict__}  # what this process built
        if loaded - set(self.meta.get("data", {}).get(cell.model, {})):
            self.meta.setdefault("data", {})[cell.model] = ctx.data_summary()
        self.meta["wall_seconds"] = float(self.meta.get("wall_seconds", 0.0)) + wall
        _atomic_json(self.dir / "run.json", self.meta)
        self.write_tables()
        return rows

    def records(self) -> Iterator[dict[str, Any]]:
        yield from _cell_records(self.cells_dir)

    def write_tables(self) -> Path:
        """Rebuild rows.parquet / rows.csv from the finished cells (tidy rows + provenance columns)."""
        return write_tables(self.dir, self.suite.name, self.meta["git_commit"])

    def finish(self) -> None:
        self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _atomic_json(self.dir / "run.json", self.meta)
        self.write_tables()


def read_cell(path: Path) -> dict[str, Any] | None:
    """A finished cell's record, or None when it is absent or unreadable (then it is recomputed, and says so)."""
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
        if isinstance(rec, dict) and isinstance(rec.get("rows"), list) and rec["rows"] and "cell_id" in rec:
            return rec
        problem = "has no rows or no cell_id"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"is unreadable ({e})"
    print(f"[epbench] cell file {path} {problem}; it will be recomputed", flush=True)
    return None


def _cell_records(cells_dir: Path) -> Iterator[dict[str, Any]]:
    for p in sorted(cells_dir.glob("*.json")):
        rec = read_cell(p)
        if rec is not None:
            yield rec


def _suite_defaults(suite: Suite, names: set[str]) -> dict[str, Any]:
    """The JSON form of the Suite fields' defaults for `names`."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(suite):
        if f.name in names:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = json.loads(json.dumps(value, default=str))
    return out


def _read_run_json(path: Path) -> dict[str, Any] | None:
    """run.json if it parses as an object; None when absent or damaged (it is rewritten from the suite)."""
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        if isinstance(meta, dict):
            return meta
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    print(f"[epbench] {path} is damaged; rewriting it from the suite (cells are kept)", flush=True)
    return None


def _cells_digest(cells_dir: Path) -> str:
    """sha256 over the names and bytes of every cell file: what the derived tables must have been built from."""

    h = hashlib.sha256()
    for p in sorted(cells_dir.glob("*.json")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


TABLES_RECORD = "tables.json"  # sha256 of rows.parquet, rows.csv and of the cells they were built from


def write_tables(run_dir: Path, suite_name: str, git_commit_: str) -> Path:
    """rows.parquet and rows.csv from cells/*.json (the source of truth), plus tables.json recording their sha256."""

    import pandas as pd

    run_dir = Path(run_dir)
    cells_dir = run_dir / "cells"
    digest = _cells_digest(cells_dir)
    rows = []
    for rec in _cell_records(cells_dir):
        for r in rec["rows"]:
            r = {k: v for k, v in r.items() if k != "units"}  # per-unit values stay in the cell files
            rows.append({**r, "suite": suite_name, "cell_id": rec["cell_id"],
                         "method_family": rec.get("method_family"), "store_id": rec.get("store_id"),
                         "git_commit": rec.get("git_commit", git_commit_), "started": rec.get("started"),
                         "finished": rec.get("finished")})
    df = pd.DataFrame(rows)
    hashes = {}
    for name, write in (("rows.parquet", lambda p: df.to_parquet(p, index=False)),
                        ("rows.csv", lambda p: df.to_csv(p, index=False))):
        tmp = unique_tmp(run_dir / name)
        try:
            write(tmp)
            hashes[name] = hashlib.sha256(tmp.read_bytes()).hexdigest()
            tmp.replace(run_dir / name)
        finally:
            tmp.unlink(missing_ok=True)
    _atomic_json(run_dir / TABLES_RECORD, {"cells_sha256": digest, "files": hashes, "n_rows": len(df)})
    return run_dir / "rows.parquet"


def verify_tables(run_dir: str | Path) -> bool:
    """Check rows.parquet / rows.csv against tables.json and the cells; rebuild them from the cells when a table
    is missing, damaged or stale. Returns True when they were rebuilt (and says why)."""

    run_dir = Path(run_dir)
    record_path = run_dir / TABLES_RECORD
    problem = ""
    try:
        record = json.loads(record_path.read_text())
        if record["cells_sha256"] != _cells_digest(run_dir / "cells"):
            problem = "they are older than the cells"
        for name, sha in record["files"].items():
            p = run_dir / name
            if not problem and (not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != sha):
                problem = f"{p} is missing or damaged (sha256 differs from {record_path})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        problem = f"{record_path} is missing or damaged"
    if not problem:
        return False
    meta = _read_run_json(run_dir / "run.json") or {}
    print(f"[epbench] rebuilding the tables of {run_dir} from its cells: {problem}", flush=True)
    write_tables(run_dir, str(meta.get("suite", "unknown")), str(meta.get("git_commit", "unknown")))
    return True


def run_suite(suite: Suite, results_dir: str | Path = "results", run_id: str | None = None, force: bool = False,
              progress: bool = True, report: bool = True, executor: str = "local", address: str | None = None) -> Run:
    """Run every cell (skipping finished ones), then write the report. `executor="ray"` runs the same cells on a
    Ray cluster (`address`; see bench.executors)."""
    from tqdm.auto import tqdm

    run = Run(suite, results_dir, run_id, force, progress)
    cells = run.cells()
    todo = [c for c in cells if not run.is_done(c)]
    print(f"[epbench] suite {suite.name}: {len(cells)} cells, {len(cells) - len(todo)} already finished "
          f"-> {run.dir}", flush=True)
    if executor != "local":
        from bench.executors import run_cells

        run_cells(run, todo, executor, address=address, progress=progress)
    else:
        run.meta["executor"] = {"name": "local"}
        for cell in tqdm(todo, desc=f"suite {suite.name}", unit="cell", disable=not progress):
            run.run_cell(cell)
    run.finish()
    if report:
        from bench.report import write_report

        print(f"[epbench] report: {write_report(run.dir)}", flush=True)
    return run
