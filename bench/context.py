"""What the cells of one model share: its stores, data sets and fitted artefacts.

`ModelContext` loads lazily and caches. Artefacts are cached by (store id, method spec, inputs) under the epbench
cache, so cells of every family share one build; a multi-fit build checkpoints each fit. Budget-matched specs
(`MethodSpec.match`) are built here at their targets' K or tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
import torch

from bench.activations import TextActivations
from bench.cache import atomic_write_json, cache_dir, file_lock, safe_name, unique_tmp
from bench.store import ActivationStore, ExtractionRequest, extract
from bench.suites import ALL_LAYERS, MethodSpec, Suite, sae_spec  # noqa: F401  (sae_spec re-exported)
from bench.verdict import EV_FLOOR  # an SAE below it is marked "undertrained" wherever it appears
from methods.base import Artefact, ArtefactError, load_artefact
from metrics.common import MetricRow

if TYPE_CHECKING:
    from bench.cells import Cell


class ModelContext:
    """Everything the cells of one model share, loaded lazily and cached (stores are content-addressed)."""

    def __init__(self, suite: Suite, model: str, progress: bool = True, store: ActivationStore | None = None):
        self.suite, self.model_name, self.progress = suite, model, progress
        self.layers = suite.layers_for(model)  # the layers this model is read at
        self.extras_dir: Path | None = None  # set by the Run: results/<run-id>/extras
        self.cells_dir: Path | None = None  # set by the Run: its finished cells (match targets' recorded budgets)
        if store is not None:
            self.__dict__["store"] = store  # pre-fill the cached property
        self._artefacts: dict[str, dict[int, list[Artefact]]] = {}
        self._text_acts: dict[tuple[str, int], TextActivations] = {}
        # id(artefact) -> (the artefact, where `_fit` saved it): moved into the index's place rather than written twice
        self._checkpoints: dict[int, tuple[Artefact, Path]] = {}

    # data ---------------------------------------------------------------------------------------------------
    @cached_property
    def backend(self):
        from bench.models import load_model

        return load_model(self.model_name, self.suite.device)

    @cached_property
    def store(self) -> ActivationStore:
        s = self.suite
        req = ExtractionRequest(model=self.model_name, layers=self.layers, corpus=s.corpus, tokens=s.store_tokens,
                                ctx_len=s.ctx_len, seed=s.seed, dtype=s.store_dtype_for(self.model_name))
        return extract(req, progress=self.progress, device=s.device)

    def text_store(self, name: str, texts: list[str]) -> ActivationStore:
        """A store over evaluation texts (one context per text, truncated to ctx_len), content-addressed."""
        from bench.corpora import Document, ListCorpus

        corpus = ListCorpus(name, [Document(i, t, name) for i, t in enumerate(texts)])
        req = ExtractionRequest(model=self.model_name, layers=self.layers, corpus=name,
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
            if name in ("wordnet", "bbc") or name.split(":")[0] == "saeprobes":  # built-in sources take sizes
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
                print(f"[epbench] prompt set {ps.name}: a seeded sample of {cap} of its {len(ps)} prompts "
                      "(max_prompts; --max-prompts changes it)", flush=True)
                ps = PromptSet(ps.name, [ps.prompts[i] for i in keep], n_written=len(ps), n_sampled=cap)
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
            out["prompt_sets"] = {ps.name: {"written": ps.n_written, "sampled": ps.n_sampled, "kept": ps.n_kept}
                                  for ps in self.prompt_sets.values()}

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

    def spec_layers(self, spec: MethodSpec) -> list[int]:
        """The layers a spec is built at here: every layer of this model, or those its `at_layers` names."""
        return spec.layers_of(self.model_name, self.layers)

    def artefacts(self, label: str, layer: int) -> list[Artefact]:
        """The artefacts of one method spec at one layer (built for all of its layers at once, cached on disk)."""
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

    def cell_artefacts(self, cell: Cell) -> list[Artefact]:
        """The artefacts a cell scores: the spec's at the cell's layer, less any the suite leaves out of the family."""
        keep = self.suite.family_artefacts.get(cell.family)
        arts = self.artefacts(cell.spec, cell.layer)
        return [a for a in arts if keep is None or a.name in keep or cell.spec in keep]

    def artefact_summaries(self, cell: Cell) -> list[dict[str, Any]]:
        """The budget and fit evidence of the artefacts a per-layer cell scored (recorded in its cell file)."""
        if cell.layer == ALL_LAYERS:
            return []
        out = []
        for a in self.cell_artefacts(cell):
            c, info = a.cost, a.info
            out.append({"name": a.name, "family": a.method, "K": a.K, "tokens": c.tokens, "rows": c.rows,
                        "fit_rows": fit_rows(a), "flops": c.flops, "seed": getattr(a.config, "seed", None),
                        "p": info.get("p"),
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
        inputs: dict[str, Any] = {"layers": sorted(self.spec_layers(spec)), "code": code.hexdigest()}
        files = self.loaded_files(spec)
        if files:  # a dictionary loaded from disk is as new as its files' bytes, not its path string
            inputs["files"] = files
        if cls.supervised:
            inputs["concept_sets"] = {
                name: hashlib.sha256(cs.examples[["text", "concept", "category", "split"]].to_json().encode())
                .hexdigest() for name, cs in self.concept_sets.items()}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]

    def loaded_files(self, spec: MethodSpec) -> dict[str, str]:
        """sha256 of every file a spec loads from disk (its `path=` / `*_path=` parameters, `{layer}` filled for each
        suite layer; a directory: every file under it), keyed by parameter, layer and file. A path that does not
        exist is left to the method's loader, which names it."""
        from bench.cache import content_sha256

        out: dict[str, str] = {}
        for key, value in sorted(spec.params.items()):
            if not (key == "path" or key.endswith("_path")) or not isinstance(value, str):
                continue
            for layer in sorted(self.layers):
                where = Path(value.replace("{layer}", str(layer))).expanduser()
                files = sorted(f for f in where.rglob("*") if f.is_file()) if where.is_dir() else \
                    [where] if where.is_file() else []
                for f in files:
                    out[f"{key}@L{layer}:{f.relative_to(where) if f != where else f.name}"] = content_sha256(f)
        return out

    def _load_cached(self, root: Path, spec: MethodSpec | None = None) -> dict[int, list[Artefact]] | None:

        """The artefacts under `root` if every one verifies, is the one its slot asks for (`_check_slot`: method,
        layer, store, label and slot stamp of `spec`) and every suite layer is there; None when absent.

        A damaged or misplaced one (hash, shape, NaN, missing file, torn or edited index, copied or swapped folder)
        is reported and None returned, so it is rebuilt.
        """
        index = root / "index.json"
        if not index.exists():
            return None
        try:
            saved = json.loads(index.read_text())
            out = {int(L): [load_artefact(root / p) for p in paths] for L, paths in saved.items()}
            want = self.spec_layers(spec) if spec is not None else self.layers
            if set(out) != set(want):
                raise ArtefactError(f"{index} covers layers {sorted(out)}, not {sorted(want)}")
            for L, paths in saved.items():
                seen: set[str] = set()
                for rel, art in zip(paths, out[int(L)]):
                    self._check_slot(art, spec, int(L), root / rel, folder=Path(rel))
                    ident = json.dumps([art.name, art.config.to_dict(), art.info.get("concept_set"),
                                        art.info.get("p")], sort_keys=True, default=str)
                    if ident in seen:
                        raise ArtefactError(f"{root / rel}: a second copy of {art.name} at layer {L} in {index}")
                    seen.add(ident)
            return out
        except (ArtefactError, ValueError, TypeError, AttributeError, KeyError, OSError) as e:
            print(f"[epbench] cached artefact unusable, rebuilding it: {e}", flush=True)
            return None

    def _check_slot(self, art: Artefact, spec: MethodSpec | None, layer: int, where: Path,
                    folder: Path | None = None, what: dict[str, Any] | None = None) -> None:
        """Refuse an artefact (ArtefactError) that is not the one this slot asks for: its method, layer and store
        must be the spec's, the layer's and this context's store's, its label the one its folder was written for
        (a matched spec's label and target), and the slot stamp written with it (spec key: method, params, match,
        seeds; layer; the fit's own key, params and seed included, for a checkpoint) must be this slot's. Its
        hashes only say the files are intact; a copied or swapped folder or an edited index.json is intact too.
        Artefacts cached before stamps were written are checked on everything but the stamp."""
        def bad(why: str) -> ArtefactError:
            return ArtefactError(f"{where} is not the artefact this slot asks for ({why}): a copied or swapped "
                                 "artefact folder, or an edited index.json")

        info = art.info
        if spec is not None and art.method != spec.method:
            raise bad(f"method {art.method!r}, the spec {spec.label!r} needs {spec.method!r}")
        if "layer" in info and info["layer"] != layer:
            raise bad(f"fitted at layer {info['layer']}, not {layer}")
        if "store_id" in info and info["store_id"] != self.store.id:
            raise bad(f"fitted on store {info['store_id']}, not {self.store.id}")
        stamp = info.get("slot")
        if stamp is not None:
            want = self._slot_stamp(spec, layer, what) if spec is not None else None
            if not isinstance(stamp, dict) or stamp.get("layer") != layer or (
                    want is not None and any(stamp.get(k) != v for k, v in want.items())):
                raise bad(f"it was saved for slot {stamp}, this one is {want or {'layer': layer}}")
        if spec is not None and spec.match and not (art.name.startswith(f"{spec.label}(") and "matched_to" in info):
            raise bad(f"label {art.name!r}, not an artefact of the matched spec {spec.label!r}")
        if folder is not None and (folder.parent.name != f"L{layer:02d}"
                                   or not folder.name.endswith(f"-{safe_name(art.name)}")):
            raise bad(f"label {art.name!r} at layer {layer} is not what its folder {folder} was written for")
        for key in ("concept_set", "matched_to"):
            if what is not None and key in what and json.loads(json.dumps(info.get(key), default=str)) != \
                    json.loads(json.dumps(what[key], default=str)):
                raise bad(f"{key} {info.get(key)!r}, this fit is for {what[key]!r}")

    def _slot_stamp(self, spec: MethodSpec, layer: int, what: dict[str, Any] | None = None) -> dict[str, Any]:
        """What an artefact records (info["slot"]) about the slot it was built for; `what`: one fit's own inputs."""
        out: dict[str, Any] = {"spec": self.spec_key(spec), "layer": layer}
        if what is not None:
            out["fit"] = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return out

    def _load_or_build(self, spec: MethodSpec) -> dict[int, list[Artefact]]:
        root = self._artefact_dir(spec) / self.inputs_key(spec)
        cached = self._load_cached(root, spec)
        if cached is not None:
            return cached
        with file_lock(root.parent / f"{root.name}.lock", f"the {spec.label} artefact build in {root}"):
            cached = self._load_cached(root, spec)  # another process may have built it while we waited
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
                held, checkpoint = self._checkpoints.pop(id(a), (None, None))
                a.info.setdefault("slot", self._slot_stamp(spec, L))  # a checkpoint carries its own (with its fit)
                if held is a and checkpoint.is_dir():
                    shutil.rmtree(root / rel, ignore_errors=True)  # left by an earlier interrupted save
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    checkpoint.replace(root / rel)
                else:
                    a.save(root / rel)
                paths[str(L)].append(rel)
        atomic_write_json(root / "index.json", paths)
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
                    art = load_artefact(path)
                    self._check_slot(art, spec, layer, path, what=what)
                    self._checkpoints[id(art)] = (art, path)
                    return art
                except ArtefactError as e:
                    print(f"[epbench] checkpointed fit unusable, fitting it again: {e}", flush=True)
        art = _labelled(spec, fit())
        if path is not None:
            art.info["slot"] = self._slot_stamp(spec, layer, what)  # saved with it: checked when it is reused
            art.save(path)
            self._checkpoints[id(art)] = (art, path)
        return art

    def build(self, spec: MethodSpec, fits_dir: Path | None = None) -> dict[int, list[Artefact]]:
        """Fit one method spec at every suite layer (EP: all layers and percentiles from one pass); each other fit
        is checkpointed under `fits_dir` when given (see `_fit`)."""
        from methods.registry import get_method

        cls = get_method(spec.method)
        layers = self.spec_layers(spec)
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
            for t in self._recorded_targets(label, layer) or self.artefacts(label, layer):
                if not spec.match_p or t.info.get("p") in spec.match_p:
                    targets.setdefault(t.name, t)
        if not targets:
            raise ValueError(f"method spec {spec.label!r}: no artefact of {spec.match_to} (p in {spec.match_p or 'any'})"
                             f" at layer {layer} to match; check match_to / match_p against the suite's methods")
        return list(targets.values())

    def _recorded_targets(self, label: str, layer: int) -> list[RecordedTarget]:
        """A match target's budgets as its finished build cell in this run recorded them, when that spec is not
        loaded here: a later sitting (fresh caches) then matches to it without refitting it (the reference SAE:
        about 40 min here). Empty when there is no such verified record; the target is then built."""
        from bench.cells import Cell
        from bench.runner import read_cell

        if self.cells_dir is None or label in self._artefacts:
            return []
        rec = read_cell(self.cells_dir / f"{Cell(self.model_name, layer, label, 'build').id}.json")
        if rec is None or rec.get("store_id") != self.store.id or not rec.get("artefacts"):
            return []
        try:
            return [RecordedTarget(a["name"], a["family"], int(a["K"]), self.store.d_model,
                                   RecordedCost(int(a["rows"]), int(a["tokens"])),
                                   {"p": a.get("p"), **({"n_train_rows": int(a["fit_rows"])}
                                                         if a["family"] == "kmeans" else {})})
                    for a in rec["artefacts"]]
        except (KeyError, TypeError, ValueError):
            return []  # a record from before these fields were kept

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
            p = target.info.get("p")
            seeds = next((v for k, v in spec.match_seeds.items() if p is not None and float(k) == float(p)), spec.seeds)
            for params in _seeded({**spec.params, **budget}, seeds):
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


class RecordedCost(NamedTuple):
    rows: int
    tokens: int


class RecordedTarget(NamedTuple):
    """What budget matching reads of a target artefact (`budget_params`, `fit_rows`), from its build cell."""

    name: str
    method: str
    K: int
    d_model: int
    cost: RecordedCost
    info: dict[str, Any]


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
    out: dict[str, Any] = {name: int(target.K)}
    if spec.method == "sae" and spec.k_per_width:
        # sparsity scaled to width: L0 = width x k_per_width, at least 1 and at most the spec's k (a fixed L0 above
        # the width where the ratio reaches it, as width sweeps usually hold L0)
        out["k"] = int(min(int(spec.params.get("k", 32)), max(1, round(target.K * spec.k_per_width))))
    if spec.method == "sae" and target.K < int(out.get("k", spec.params.get("k", 1))):
        return None  # fewer latents than the TopK k
    if spec.rows_as_target:
        out["n_rows"] = fit_rows(target)  # the same store prefix the target streamed (both read in store order)
    return out


def fit_rows(a: Artefact) -> int:
    """The rows an artefact's fit really read: k-means' training rows (not the centre's calibration read), else its
    cost's rows (EP: the discovery stream; an SAE: the rows it trained on)."""
    if a.method == "kmeans" and a.info.get("n_train_rows") is not None:
        return int(a.info["n_train_rows"])
    return int(a.cost.rows)


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
