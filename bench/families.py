"""Metric families: one function per family turns a cell (model, layer, method spec) into metric rows.

Each reads the data and artefacts it needs from the model's `ModelContext` and calls the metric code in `metrics/`;
`FAMILIES` maps a family name (as in `Suite.metrics`) to its function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from bench.context import ModelContext, fit_quality, sae_spec
from metrics.common import MetricRow, row

if TYPE_CHECKING:
    from bench.cells import Cell


def _build_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
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
    """Causal interventions per prompt set. Unsupervised artefacts select their features on the train prompts; a
    supervised spec (DiffMean) is fitted on the causal train prompts themselves, once per prompt set (its
    concept-set artefacts say nothing about prompt answers), and labelled with the spec's label."""
    from metrics.causal import CausalConfig, UnusablePrompts, causal_metrics, diffmean_causal_metrics

    suite = ctx.suite
    cfg = CausalConfig(seed=suite.seed, alphas=tuple(suite.causal_alphas),
                       ablation_scales=tuple(suite.causal_ablation_scales), kl_targets=tuple(suite.causal_kl_targets))
    unrelated = ctx.unrelated_texts[: suite.causal_unrelated_texts]
    arts = ctx.cell_artefacts(cell)
    rows, skipped = [], []
    for name, ps in ctx.prompt_sets.items():
        out = []
        try:
            if any(a.supervised for a in arts):
                model = next((a.info["model"] for a in arts if a.info.get("model")), ctx.model_name)
                out += diffmean_causal_metrics(ctx.backend, ps, cell.layer, unrelated, config=cfg, label=cell.spec,
                                               info={"model": model})
            for a in arts:
                if not a.supervised:
                    out += causal_metrics(a, ctx.backend, ps, unrelated, config=cfg, layer=cell.layer)
        except UnusablePrompts as e:  # the model's answers leave nothing to intervene on: skip the set, say why
            print(f"[epbench] {ctx.model_name} L{cell.layer} {cell.spec}: causal prompt set {name} skipped: {e}",
                  flush=True)
            skipped.append(f"{name} ({e})")
            continue
        for r in out:
            r.detail = _with_setting(name, r.detail)
            rows.append(r)
    if skipped:  # one row per scored dictionary (DiffMean under its spec label), so the report can say so
        detail = f"skipped {len(skipped)} of {len(ctx.prompt_sets)} prompt sets: " + "; ".join(skipped)
        for a in [a for a in arts if not a.supervised] + [a for a in arts if a.supervised][:1]:
            r = row(a, "causal.prompt_sets_skipped", len(skipped), n=len(ctx.prompt_sets), detail=detail,
                    layer=cell.layer)
            r.method = cell.spec if a.supervised else r.method
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
    sae = sae_spec(ctx.suite)
    if ctx.spec(cell.spec).method == "ep" and sae is not None:
        for a in arts:
            rows += compare_costs(a, ctx.artefacts(sae.label, cell.layer)[0], seed=ctx.suite.seed)
    return rows


def _correspondence_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.correspondence import correspondence_metrics

    sae = ctx.artefacts(sae_spec(ctx.suite).label, cell.layer)[0]
    inputs = ctx.heldout_acts(cell.layer)
    rows = []
    for a in ctx.cell_artefacts(cell):
        if a.method != "ep" and not str((a.info.get("matched_to") or {}).get("artefact", "")).startswith("ep:"):
            continue  # a null is only needed at EP's sizes
        extras: dict[str, np.ndarray] = {}
        rows += correspondence_metrics(a, sae, inputs, unit="text", seed=ctx.suite.seed, extras=extras)
        ctx.save_extra(f"correspondence_{cell.model}_L{cell.layer:02d}_{a.name}", extras["best_f1"])
    return rows


def _stability_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    from metrics.stability import (
        StabilityConfig,
        concept_stability,
        cross_layer_stability,
    )

    layers = ctx.spec_layers(ctx.spec(cell.spec))
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
    from bench.cells import expand_cells
    from metrics.refusal import refusal_ablation_metrics

    first = next(c for c in expand_cells(ctx.suite) if c.family == "refusal" and c.model == cell.model)
    rows = list(ctx.refusal_baseline) if cell == first else []
    rate = next(r.value for r in ctx.refusal_baseline if r.metric == "refusal.baseline.harmful_rate")
    if rate >= REFUSAL_FLOOR:
        for a in ctx.cell_artefacts(cell):
            rows += refusal_ablation_metrics(a, ctx.backend, layer=cell.layer)
    elif not rows:  # a valid measurement: nothing to ablate; recorded so the cell is not an empty finish
        rows = [row(a, "refusal.not_applicable", rate, layer=cell.layer,
                    detail=f"baseline harmful refusal {rate:.2f} < {REFUSAL_FLOOR}: no refusal to ablate")
                for a in ctx.cell_artefacts(cell)]
    return rows


def _compositional_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    """The compositional toy (`metrics.compositional`): prompts "{n} ({c1}) {c2}" read at c2. In the suite's first
    EP spec's cell, EP calibrated on the toy itself swept over p plus k-means at each p's K (setting `toy`); in
    every cell, each artefact's own partition of the toy rows (setting `store`). The toy activations are computed
    once per (model, layer) and kept on the context."""
    from metrics.compositional import (
        CompositionalConfig,
        store_partition_rows,
        toy_activations,
        toy_sweep_rows,
    )

    cfg = CompositionalConfig(seed=ctx.suite.seed)
    toys = ctx.__dict__.setdefault("_compositional_toys", {})  # layer -> ToyActivations of this context's model
    if cell.layer not in toys:
        toys[cell.layer] = toy_activations(ctx.backend, cell.layer, cfg, model=ctx.model_name)
    toy = toys[cell.layer]
    rows = []
    if cell.spec == next((s.label for s in ctx.suite.methods if s.method == "ep"), None):
        rows += toy_sweep_rows(toy, cfg)  # once per layer, whatever the number of EP specs
    for a in ctx.cell_artefacts(cell):
        rows += store_partition_rows(a, toy, seed=ctx.suite.seed)
    return rows


FAMILIES: dict[str, Callable[[ModelContext, Cell], list[MetricRow]]] = {
    "build": _build_rows,
    "retrieval": _concept_family("metrics.retrieval:retrieval_metrics"),
    "detection": _concept_family("metrics.detection:detection_metrics"),
    "probing": _concept_family("metrics.probing:probing_metrics"),
    "sparse_probing": _concept_family("metrics.sparse_probing:sparse_probing_metrics"),
    "ood": _ood_rows,
    "causal": _causal_rows,
    "recon": _recon_rows,
    "cost": _cost_rows,
    "correspondence": _correspondence_rows,
    "stability": _stability_rows,
    "refusal": _refusal_rows,
    "compositional": _compositional_rows,
}


def _ground_truth_rows(ctx: ModelContext, cell: Cell) -> list[MetricRow]:
    """Recovery of a synthetic model's true features (metrics/ground_truth.py) on fresh eval samples; a model
    without ground truth gets one `ground_truth.not_applicable` row per artefact (bench.synth.family_applies)."""
    from bench.synth import GroundTruth, eval_data, eval_store, family_applies, ground_truth, is_synthetic_store
    from metrics.ground_truth import ground_truth_metrics, not_applicable_rows

    arts = ctx.cell_artefacts(cell)
    ok, why = family_applies("ground_truth", cell.model)
    if not ok or not is_synthetic_store(ctx.store):
        return not_applicable_rows(arts, why or f"store {ctx.store.id} holds no synthetic samples", cell.layer)
    cache = ctx.__dict__.setdefault("_ground_truth_eval", {})  # eval samples, loaded once per model context
    if "data" not in cache:
        ev = eval_store(cell.model, ctx_len=ctx.suite.ctx_len, seed=ctx.suite.seed, progress=ctx.progress)
        gt: GroundTruth = ground_truth(ev)
        x, acts = eval_data(ev)
        cache["data"] = (ev, gt, gt.feature_dict(), x, acts)
    ev, gt, fd, x, acts = cache["data"]
    sae = sae_spec(ctx.suite)
    k = int(sae.params.get("k", 0)) if sae is not None else 0
    k = k or max(1, round(float(acts.row_ptr.diff().float().mean())))  # no SAE in the suite: the true mean L0
    setting = f"{cell.model} eval samples (store {ev.id}, {x.shape[0]} rows, seed {ev.manifest['seed']})"
    rows = []
    for a in arts:
        extras: dict[str, np.ndarray] = {}
        rows += ground_truth_metrics(a, x, acts, gt.feature_vectors, k=k, setting=setting, feature_dict=fd,
                                     seed=ctx.suite.seed, layer=cell.layer, extras=extras)
        for name, values in extras.items():
            ctx.save_extra(f"ground_truth_{name}_{cell.model}_L{cell.layer:02d}_{a.name}", values)
    return rows


FAMILIES["ground_truth"] = _ground_truth_rows
