"""Paired verdicts (bench.verdict) and the claims scorecard (bench.claims) against hand-computed and planted data."""

import json
import math

import numpy as np
import pandas as pd
import torch
import pytest

from bench.claims import NOT_TESTABLE, REPRODUCED, claim_refusal, claim_saturation, rows_table
from bench.verdict import (
    CONTROL,
    Comparison,
    VerdictConfig,
    artefact_table,
    compare,
    holm,
    paired_test,
    plan_comparisons,
    unit_table,
    verdict_table,
)


def test_holm_matches_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(1*0.04, running 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.2, float("nan"), 0.6])  # NaN is not a test: m = 2
    assert out[0] == pytest.approx(0.4) and math.isnan(out[1]) and out[2] == pytest.approx(0.6)


def test_sign_flip_p_is_exact_for_small_n():
    cfg = VerdictConfig()
    r = paired_test(np.ones(5), 1.0, 0.0, cfg)  # only the all-plus and all-minus patterns reach |mean| = 1
    assert r.p == pytest.approx(2 / 32) and r.diff == 1.0 and r.ci_low == r.ci_high == 1.0
    assert paired_test(np.array([1.0, -1.0, 1.0, -1.0]), 0, 0, cfg).p == pytest.approx(1.0)


def _cell(model, layer, method, family, metric, units, seed=0, artefact=None):
    values = list(units.values())
    row = {"method": method, "method_config": "{}", "model": model, "layer": layer, "metric": metric,
           "value": float(np.mean(values)), "ci_low": 0.0, "ci_high": 0.0, "n": len(values), "seed": seed,
           "supervised": False, "detail": "wordnet; readout=x", "units": units}
    art = artefact or {"name": method, "family": family, "K": 100, "tokens": 1000, "rows": 990, "flops": 1.0,
                       "seed": seed, "p": None, "matched_to": None, "quality": None}
    return {"cell": {"model": model, "layer": layer, "spec": method, "family": metric.split(".")[0]},
            "cell_id": f"{method}-{layer}-{metric}-{seed}", "method_family": family, "artefacts": [art],
            "rows": [row]}


def _write(tmp_path, cells):
    d = tmp_path / "run" / "cells"
    d.mkdir(parents=True)
    for i, c in enumerate(cells):
        (d / f"{i:03d}.json").write_text(json.dumps(c))
    return tmp_path / "run"


RANDOM_ART = {"name": "random", "family": "random", "K": 100, "tokens": 1000, "rows": 990, "flops": 1.0, "seed": 0,
              "p": None, "matched_to": None, "quality": None}


def test_planted_difference_is_found_and_null_is_not(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.1, size=40)
    concepts = [f"c{i}" for i in range(40)]
    cells = []
    for L in (4, 8):
        cells.append(_cell("m", L, "ep:p=2", "ep", "detection.auroc", dict(zip(concepts, base + 0.1))))
        for seed in (0, 1):  # two fit seeds of the SAE: averaged per unit before pairing
            noise = rng.normal(0, 0.01, size=40)
            cells.append(_cell("m", L, "sae", "sae", "detection.auroc", dict(zip(concepts, base + noise)), seed))
        for target in ("ep:p=2", "sae"):  # random directions at each artefact's K
            art = {**RANDOM_ART, "name": f"random@K({target})", "matched_to": {"artefact": target, "kind": "K"}}
            cells.append(_cell("m", L, f"random@K({target})", "random", "detection.auroc",
                               dict(zip(concepts, base + 0.1 + rng.normal(0, 0.01, size=40))), artefact=art))
    run = _write(tmp_path, cells)
    vs = {(v.comparison.a, v.comparison.b): v for v in verdict_table(run)}
    ep_sae = vs[("ep:p=2", "sae")]  # the same K (100): compared, as exploratory
    assert ep_sae.verdict == "better" and ep_sae.result.n == 40  # a concept counts once over both layers
    assert ep_sae.result.diff == pytest.approx(0.1, abs=0.01) and ep_sae.result.ci_low > 0
    assert ep_sae.result.by_layer["L4"] == pytest.approx(0.1, abs=0.01) and set(ep_sae.result.by_layer) == {"L4", "L8"}
    assert vs[("ep:p=2", "random@K(ep:p=2)")].verdict == "no detectable difference"
    assert vs[("sae", "random@K(sae)")].verdict == "worse"
    assert ("ep:p=2", "random@K(sae)") not in vs  # a control of another artefact's K is not this one's control


def test_lower_is_better_for_causal_deltas_and_control_pairing(tmp_path):
    prompts = [f"{i}:prompt {i}" for i in range(30)]
    rng = np.random.default_rng(1)
    ctrl = rng.normal(0, 0.1, size=30)
    cells = []
    for kind in ("ablate", "steer"):  # both deltas: more negative = the answer moved more toward the contrast
        cells += [_cell("m", 8, "ep:p=2", "ep", f"causal.{kind}.delta_logit_diff", dict(zip(prompts, ctrl - 1.0))),
                  _cell("m", 8, "ep:p=2", "ep", f"causal.{kind}.control_delta", dict(zip(prompts, ctrl)))]
    for c in cells:  # each prompt its own direction here: one cluster per prompt, recorded as such
        c["rows"][0]["clusters"] = {u: u for u in prompts}
    run = _write(tmp_path, cells)
    vs = {v.comparison.metric: v for v in verdict_table(run) if v.comparison.b == CONTROL}
    assert set(vs) == {"causal.ablate.delta_logit_diff", "causal.steer.delta_logit_diff"}
    for v in vs.values():
        assert v.verdict == "better" and v.result.diff == pytest.approx(-1.0)


def test_random_control_is_matched_by_k_when_available():
    arts = pd.DataFrame([
        {"method": "ep:p=4", "family": "ep", "K": 545, "tokens": 40_000, "matched_to": None},
        {"method": "random", "family": "random", "K": 512, "tokens": 40_000, "matched_to": None},
        {"method": "random@K(ep:p=4)", "family": "random", "K": 545, "tokens": 40_000,
         "matched_to": {"artefact": "ep:p=4", "kind": "K"}},
        {"method": "sae", "family": "sae", "K": 2048, "tokens": 52_000, "matched_to": None},
    ])
    comps = {(c.a, c.b): c for c in plan_comparisons(arts, ["detection.auroc"])}
    assert ("ep:p=4", "random@K(ep:p=4)") in comps and ("ep:p=4", "random") not in comps
    assert ("sae", "random") not in comps  # a random control of another size is never the control
    assert ("random@K(ep:p=4)", "random") not in comps
    # with no random@K matched to it, the SAE's control is a random spec of its own K at every layer, never another
    layered = pd.DataFrame([{**r, "model": "m", "layer": L, "K": r["K"] if r["method"] != "random" else k}
                            for L, k in ((4, 2048), (8, 2048)) for r in arts.to_dict("records")])
    pairs = {(c.a, c.b) for c in plan_comparisons(layered, ["detection.auroc"])}
    assert ("sae", "random") in pairs and ("ep:p=4", "random") not in pairs
    layered.loc[(layered["method"] == "random") & (layered["layer"] == 8), "K"] = 512
    assert ("sae", "random") not in {(c.a, c.b) for c in plan_comparisons(layered, ["detection.auroc"])}
    assert comps[("ep:p=4", "sae")].family == "exploratory"  # planned; refused later unless K matches


def test_steering_is_compared_with_its_same_strength_control_only():
    arts = pd.DataFrame([
        {"method": "ep:p=4", "family": "ep", "K": 545, "tokens": 40_000, "matched_to": None},
        {"method": "sae", "family": "sae", "K": 2048, "tokens": 52_000, "matched_to": None},
    ])
    comps = plan_comparisons(arts, ["causal.ablate.delta_logit_diff", "causal.steer.delta_logit_diff"])
    ablate = {(c.a, c.b) for c in comps if c.metric == "causal.ablate.delta_logit_diff"}
    steer = {(c.a, c.b) for c in comps if c.metric == "causal.steer.delta_logit_diff"}
    assert ("ep:p=4", "sae") in ablate  # no strength to tune: methods compared directly
    assert steer == {("ep:p=4", CONTROL), ("sae", CONTROL)}  # each method steers at its own train-chosen strength


def test_too_few_units_gives_no_verdict(tmp_path):
    cells = [_cell("m", 4, "a", "ep", "detection.auroc", {"x": 1.0, "y": 0.9}),
             _cell("m", 4, "b", "sae", "detection.auroc", {"x": 0.1, "y": 0.2})]
    units = unit_table(cells)
    assert compare(units, Comparison("a", "b", "k", "detection.auroc"), VerdictConfig()) is None
    assert artefact_table(cells)["K"].tolist() == [100, 100]


def test_claims_refusal_not_testable_on_a_compliant_model_and_saturation():
    row = {"method": "model", "model": "m", "layer": 8, "metric": "refusal.baseline.harmful_rate", "value": 0.05,
           "n": 40, "detail": "harmful", "seed": 0}
    df = rows_table([{"method_family": "", "rows": [row]}])
    c = claim_refusal(df)
    assert c.status == NOT_TESTABLE and "0.05" in c.measured
    def build(p, sat, K, tokens):
        return [{"method": f"ep:p={p}", "model": "m", "layer": 8, "metric": m, "value": v, "n": 1, "detail": "",
                 "seed": 0} for m, v in (("build.percentile", p), ("build.saturated", sat), ("build.K", K),
                                         ("build.tokens", tokens))]

    s = claim_saturation(rows_table([{"method_family": "ep", "rows": build(8, 1.0, 150, 9e4) + build(1, 0.0, 5e3, 1e6)}]))
    assert s.status == REPRODUCED and "K 150 after 90,000 tokens (saturated)" in s.measured
    # a "saturated" flag on the store's last batch is not saturation before the store ended
    s = claim_saturation(rows_table([{"method_family": "ep", "rows": build(8, 1.0, 150, 1e6) + build(1, 0.0, 5e3, 1e6)}]))
    assert s.status != REPRODUCED and "store ended" in s.measured


def test_report_opens_with_verdicts_and_scorecard_and_marks_undertrained_saes(tmp_path):
    from bench.report import write_report

    rng = np.random.default_rng(2)
    concepts = [f"c{i}" for i in range(12)]
    base = rng.normal(0.7, 0.05, size=12)
    sae_art = {"name": "sae", "family": "sae", "K": 100, "tokens": 5000, "rows": 4900, "flops": 1e9, "seed": 0,
               "p": None, "matched_to": None,
               "quality": {"explained_variance": 0.31, "undertrained": True, "converged": False, "epochs": 2.0,
                           "stop_reason": "cap"},
               "training_curve": {"rows": [100, 200], "heldout_explained_variance": [0.1, 0.31], "l0": [4, 4],
                                  "dead_fraction": [0.5, 0.2], "dense_fraction": [0.0, 0.0]}}
    seed1 = {**sae_art, "seed": 1, "quality": {**sae_art["quality"], "explained_variance": 0.8, "undertrained": False}}
    matched = {**sae_art, "name": "sae@K(ep:p=2)", "matched_to": {"artefact": "ep:p=2", "kind": "K"}}
    cells = [_cell("m", 4, "ep:p=2", "ep", "detection.auroc", dict(zip(concepts, base + 0.2))),
             _cell("m", 4, "sae", "sae", "detection.auroc", dict(zip(concepts, base)), artefact=sae_art),
             _cell("m", 4, "sae", "sae", "retrieval.precision@10", dict(zip(concepts, base)), seed=1, artefact=seed1),
             _cell("m", 4, "sae@K", "sae", "retrieval.precision@10", dict(zip(concepts, base)), artefact=matched)]
    build = dict(cells[1]["rows"][0], metric="build.heldout_explained_variance", value=0.31, units=None)
    cells[1]["rows"].append(build)
    run = _write(tmp_path, cells)
    rows = [{**{k: v for k, v in r.items() if k != "units"}, "method_family": c["method_family"], "suite": "t",
             "cell_id": c["cell_id"], "store_id": "s", "git_commit": "abc", "started": "", "finished": ""}
            for c in cells for r in c["rows"]]
    pd.DataFrame(rows).to_parquet(run / "rows.parquet")
    pd.DataFrame(rows).to_csv(run / "rows.csv", index=False)
    page = write_report(run).read_text()
    sections = [line for line in page.splitlines() if line.startswith("## ")]
    assert sections[:3] == ["## Bottom line", "## Primary comparisons: EP against baselines of the same K",
                            "## Metrics along the dictionary-size axis"]
    assert sections.index("## The paper's claims, scored") < sections.index("## Budgets")
    assert "DETAILS.md" in page and len(page.encode()) < 100_000
    text = (run / "DETAILS.md").read_text()
    assert "**better**" in text  # +0.2 on 12 concepts at the same K, exact sign-flip p = 2/4096 (exploratory)
    assert "sae (EV 0.31) ⚠" in text and "undertrained" in text
    assert (run / "plots" / "sae_training.png").exists()
    baselines = text[text.index("## Baselines at their best"):text.index("## Seed spread")]
    sae_rows = [line.split("|")[1:4] for line in baselines.splitlines() if line.startswith("| sae")]
    assert [[x.strip() for x in r] for r in sae_rows] == [["sae", "4", "0"], ["sae", "4", "1"],
                                                          ["sae@K(ep:p=2)", "4", "0"]]  # every fit, every seed


def test_resuming_a_run_with_another_suite_grid_is_refused(tmp_path):
    import dataclasses

    from bench.runner import Run
    from bench.suites import get_suite

    suite = get_suite("smoke")
    Run(suite, tmp_path, "r", progress=False)
    Run(suite, tmp_path, "r", progress=False)  # the same grid resumes
    reworded = dataclasses.replace(suite, description="reworded", evidence="reworded")
    assert Run(reworded, tmp_path, "r", progress=False).meta["config"]["evidence"] == "reworded"  # text only
    other = dataclasses.replace(suite, store_tokens=7_000)
    with pytest.raises(ValueError, match=r"another smoke suite \(differs in \['store_tokens'\]\).*--force"):
        Run(other, tmp_path, "r", progress=False)
    assert Run(other, tmp_path, "r", force=True, progress=False).meta["config"]["store_tokens"] == 7_000


def test_an_unfinished_run_says_so_at_the_top(tmp_path):
    from bench.report import write_report

    cells = [_cell("m", 4, "ep:p=2", "ep", "detection.auroc", {f"c{i}": 0.5 + i / 100 for i in range(6)})]
    run = _write(tmp_path, cells)
    rows = [{**{k: v for k, v in r.items() if k != "units"}, "method_family": "ep", "suite": "full", "cell_id": "x",
             "store_id": "s", "git_commit": "abc", "started": "", "finished": ""} for r in cells[0]["rows"]]
    pd.DataFrame(rows).to_parquet(run / "rows.parquet")
    (run / "run.json").write_text(json.dumps({"run_id": "full", "suite": "full", "started": "2026-11-30T03:00:00Z"}))
    head = write_report(run).read_text()[:2000]
    assert "**Unfinished run**: 1 cells have finished so far" in head and "--run-id full" in head


def test_a_suite_field_added_since_the_run_started_resumes_at_its_default(tmp_path):
    from bench.runner import Run
    from bench.suites import get_suite

    suite = get_suite("smoke")
    Run(suite, tmp_path, "r", progress=False)
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    del meta["config"]["max_prompts"]  # as written before the field existed
    (tmp_path / "r" / "run.json").write_text(json.dumps(meta))
    assert Run(suite, tmp_path, "r", progress=False).meta["config"]["max_prompts"] is None


def _art(name, family, K, matched=None):
    return {"name": name, "family": family, "K": K, "tokens": 1000, "rows": 990, "fit_rows": 990, "flops": 1.0,
            "seed": 0, "p": None, "matched_to": matched, "quality": None}


def test_unlike_dictionary_sizes_are_refused_not_compared(tmp_path):
    from bench.verdict import verdicts_and_refusals

    concepts = [f"c{i}" for i in range(20)]
    base = np.linspace(0.5, 0.9, 20)
    cells = []
    for L, k_sae in ((4, 105), (8, 130)):  # within 10% at L4, 30% off at L8
        cells += [_cell("m", L, "ep:p=4", "ep", "detection.auroc", dict(zip(concepts, base + 0.05)),
                        artefact=_art("ep:p=4", "ep", 100)),
                  _cell("m", L, "sae", "sae", "detection.auroc", dict(zip(concepts, base)),
                        artefact=_art("sae", "sae", k_sae)),
                  _cell("m", L, "kmeans", "kmeans", "detection.auroc", dict(zip(concepts, base)),
                        artefact=_art("kmeans", "kmeans", 2048))]
    table = verdicts_and_refusals(_write(tmp_path, cells))
    vs = {(v.comparison.a, v.comparison.b): v for v in table.verdicts}
    assert vs[("ep:p=4", "sae")].comparison.layers == [4]  # L8 refused, said in the note
    assert "L8: K 100 vs 130" in vs[("ep:p=4", "sae")].comparison.note
    assert ("ep:p=4", "kmeans") not in vs
    assert [(r.a, r.b) for r in table.refused] == [("ep:p=4", "kmeans")] and "K 100 vs 2,048" in table.refused[0].reason


def test_clustered_units_count_once_and_small_n_is_underpowered(tmp_path):
    from bench.verdict import VerdictConfig, compare, decide, min_p

    # 36 prompts in 6 clusters (answers): prompts of one answer share a direction, so n = 6, not 36
    prompts = [f"{i}:p{i}" for i in range(36)]
    clusters = {u: f"rel/{i % 6}" for i, u in enumerate(prompts)}
    a = {u: -1.0 - 0.1 * (i % 6) for i, u in enumerate(prompts)}
    cell = _cell("m", 8, "ep:p=2", "ep", "causal.ablate.delta_logit_diff", a)
    cell["rows"][0]["clusters"] = clusters
    ctrl = _cell("m", 8, "ep:p=2", "ep", "causal.ablate.control_delta", {u: 0.0 for u in prompts})
    ctrl["rows"][0]["clusters"] = clusters
    units = unit_table([cell, ctrl])
    comp = Comparison("ep:p=2", CONTROL, "vs control", "causal.ablate.delta_logit_diff")
    r = compare(units, comp, VerdictConfig())
    assert r.n == 6 and r.n_units == 36 and r.p == pytest.approx(2 / 64)  # exact: all 6 cluster signs agree
    assert r.diff == pytest.approx(np.mean([-1.0 - 0.1 * j for j in range(6)]))
    # alone, 2/64 < 0.05 passes; beside a second test Holm needs 2 x 2/64 >= 0.05: it cannot pass at n = 6
    one = decide([r], [comp], VerdictConfig())
    assert one[0].verdict == "better"
    two = decide([r, r], [comp, Comparison("x", CONTROL, "k", "causal.ablate.delta_logit_diff")], VerdictConfig())
    assert [v.verdict for v in two] == ["underpowered (n = 6)"] * 2 and min_p(6, VerdictConfig()) == 2 / 64


def test_primary_family_is_declared_by_the_plan_and_pooled_over_p(tmp_path):
    from bench.suites import MetricPair, VerdictPlan

    concepts = [f"c{i}" for i in range(30)]
    base = np.linspace(0.5, 0.9, 30)
    cells = []
    for p, K, gain in ((2, 500, 0.04), (8, 60, 0.02)):
        ep = f"ep:p={p}"
        cells.append(_cell("m", 4, ep, "ep", "detection.auroc", dict(zip(concepts, base + gain)),
                           artefact=_art(ep, "ep", K)))
        b = f"sae@K({ep})"
        cells.append(_cell("m", 4, b, "sae", "detection.auroc", dict(zip(concepts, base)),
                           artefact=_art(b, "sae", K, {"artefact": ep, "kind": "K"})))
    plan = VerdictPlan(primary_baselines=["sae@K"], primary_metrics=[MetricPair("det", "detection.auroc")])
    vs = verdict_table(_write(tmp_path, cells), plan=plan)
    primary = [v for v in vs if v.comparison.family == "primary"]
    assert [(v.comparison.a, v.comparison.b) for v in primary] == [
        ("ep:p=2", "sae@K(ep:p=2)"), ("ep:p=8", "sae@K(ep:p=8)"), ("EP (pooled over p)", "sae@K (pooled)")]
    assert primary[2].result.diff == pytest.approx(0.03)  # per concept the mean over p of (EP_p - SAE@K_p)
    assert all(v.verdict == "better" for v in primary)
    assert all(v.comparison.family == "exploratory" for v in vs if v not in primary)


def test_random_draws_of_different_k_are_independent():
    from methods.random_directions import draw_seed, random_unit_directions

    small = random_unit_directions(8, 16, draw_seed(0, 4, 8))
    large = random_unit_directions(16, 16, draw_seed(0, 4, 16))
    assert not torch.allclose(small, large[:8])  # not a prefix of one draw
    assert torch.equal(small, random_unit_directions(8, 16, draw_seed(0, 4, 8)))  # but reproducible


def test_causal_rows_without_clusters_are_refused_not_counted_per_prompt(tmp_path):
    from bench.verdict import verdicts_and_refusals

    prompts = [f"{i}:p{i}" for i in range(30)]
    cells = [_cell("m", 8, "ep:p=2", "ep", "causal.ablate.delta_logit_diff", {u: -1.0 for u in prompts}),
             _cell("m", 8, "ep:p=2", "ep", "causal.ablate.control_delta", {u: 0.0 for u in prompts})]
    table = verdicts_and_refusals(_write(tmp_path, cells))  # legacy cells: no clusters recorded
    assert not table.verdicts and "record no clusters" in table.refused[0].reason


def test_a_spec_without_finished_cells_can_be_amended_on_request_and_the_change_is_recorded(tmp_path, capsys):
    import dataclasses

    from bench.runner import Run, amended_models, amended_specs, write_cell
    from bench.suites import get_suite

    suite = get_suite("smoke")
    run = Run(suite, tmp_path, "r", progress=False)
    for cell in run.cells():
        if cell.spec in ("ep", "pca") and cell.family == "build":  # the finished part of the run
            write_cell(run.cell_path(cell), {"cell": cell.__dict__, "cell_id": cell.id, "rows": [{"value": 1.0}]})
    del run

    def amended(**changes):
        return dataclasses.replace(suite, methods=[dataclasses.replace(m, **changes.get(m.label, {}))
                                                   for m in suite.methods])

    fewer_p = amended(**{"kmeans@K": {"match_p": [4]}})
    with pytest.raises(ValueError, match=r"changes only method specs kmeans@K, none of which has a finished cell: "
                                         r"pass --amend"):
        Run(fewer_p, tmp_path, "r", progress=False)  # never silently
    meta = Run(fewer_p, tmp_path, "r", progress=False, amend=True).meta
    (a,) = meta["amendments"]
    assert a["specs"] == ["kmeans@K"] and a["sitting"] == 1 and len(meta["sittings"]) == 2  # a refusal: no sitting
    assert next(m for m in a["after"]["methods"] if m["label"] == "kmeans@K")["match_p"] == [4]
    assert "amended run" in capsys.readouterr().out
    assert Run(fewer_p, tmp_path, "r", progress=False).meta["config"] == meta["config"]  # later sittings: no flag
    # what may not be amended: a spec with a finished cell, one a finished spec is matched to, the reference SAE
    cfg = json.loads(json.dumps(suite.to_dict(), default=str))
    for label, change in (("pca", {"params": {"k": 4}}), ("ep", {"params": {"percentiles": [2]}}),
                          ("sae", {"params": {"width": 8}})):
        other = {**cfg, "methods": [{**m, **change} if m["label"] == label else m for m in cfg["methods"]]}
        finished = {"pca"} if label != "ep" else {"sae@K"}
        assert amended_specs(cfg, other, finished) == [], label
    assert amended_specs(cfg, {**cfg, "methods": cfg["methods"][:-1]}, {"pca"}) == ["sae@tokens"]  # removed
    with pytest.raises(ValueError, match=r"differs in \['store_tokens'\]\).*--force") as e:
        Run(dataclasses.replace(fewer_p, store_tokens=7_000), tmp_path, "r", progress=False, amend=True)
    assert "--amend" not in str(e.value)
    # a model's layers: amendable only while that model has no finished cell (here every cell is the one model's)
    with pytest.raises(ValueError, match=r"differs in \['model_layers'\]\).*--force") as e:
        Run(dataclasses.replace(fewer_p, model_layers={"tiny-gemma2": [1]}), tmp_path, "r", progress=False, amend=True)
    assert "--amend" not in str(e.value)
    two = {**cfg, "models": ["a", "b"], "layers": [1, 2, 3], "model_layers": {"b": [2, 4, 6]}}
    assert amended_models(two, {**two, "model_layers": {"b": [2, 4]}}, {"a"}) == ["b"]
    assert amended_models(two, {**two, "model_layers": {"b": [2, 4]}}, {"b"}) == []
    assert amended_models(two, {**two, "layers": [1, 2]}, {"b"}) == ["a"]  # the suite layers are a's, not b's
    assert amended_models(two, {**two, "layers": [1, 2]}, {"a"}) == []
    assert amended_models(two, {**two, "models": ["a"]}, set()) == []  # dropping a model is not an amendment


def test_a_model_without_finished_cells_can_be_read_at_other_layers_on_request(tmp_path):
    import dataclasses

    from bench.runner import Run, amendment_words, write_cell
    from bench.suites import get_suite

    suite = dataclasses.replace(get_suite("smoke"), models=["tiny-gemma2", "other"])
    run = Run(suite, tmp_path, "r", progress=False)
    cell = next(c for c in run.cells() if c.model == "tiny-gemma2" and c.family == "build")
    write_cell(run.cell_path(cell), {"cell": cell.__dict__, "cell_id": cell.id, "rows": [{"value": 1.0}]})
    del run
    fewer = dataclasses.replace(suite, model_layers={"other": [2]})
    with pytest.raises(ValueError, match=r"changes only the layers of other, none of which has a finished cell: "
                                         r"pass --amend"):
        Run(fewer, tmp_path, "r", progress=False)
    run = Run(fewer, tmp_path, "r", progress=False, amend=True)
    (a,) = run.meta["amendments"]
    assert a["models"] == ["other"] and a["before"] == {"model_layers": {}} and a["after"] == {"model_layers":
                                                                                                 {"other": [2]}}
    assert {c.layer for c in run.cells() if c.model == "other" and c.family == "build"} == {2}
    assert amendment_words(a) == "the layers of other (from the suite layers to [2])"


def test_detection_claim_uses_an_sae_built_at_eps_k_at_some_layers_only():
    """No primary sae@K row at EP's finest p, but an SAE matched to it at one layer: claim (a) is that comparison."""
    from bench.claims import claim_detection

    concepts = [f"c{i}" for i in range(30)]
    base = np.random.default_rng(3).normal(0.7, 0.05, size=30)
    ep_art = {**RANDOM_ART, "name": "ep:p=1", "family": "ep", "K": 500, "p": 1.0}
    matched = {**RANDOM_ART, "name": "sae@K-p1(ep:p=1)", "family": "sae", "K": 500,
               "matched_to": {"artefact": "ep:p=1", "kind": "K", "K": 500}}
    cells = []
    for L in (4, 8):
        cells.append(_cell("m", L, "ep:p=1", "ep", "detection.auroc", dict(zip(concepts, base + 0.1)), artefact=ep_art))
        cells.append(_cell("m", L, "sae", "sae", "detection.auroc", dict(zip(concepts, base)),
                           artefact={**RANDOM_ART, "name": "sae", "family": "sae", "K": 2048}))
        build = _cell("m", L, "ep:p=1", "ep", "build.percentile", {"x": 1.0}, artefact=ep_art)
        build["rows"][0]["units"] = None
        cells.append(build)
    cells.append(_cell("m", 8, "sae@K-p1(ep:p=1)", "sae", "detection.auroc", dict(zip(concepts, base)),
                       artefact=matched))
    df, units, arts = rows_table(cells), unit_table(cells), artefact_table(cells)
    v2 = claim_detection(df, units, [], arts)[0]
    assert v2.status == REPRODUCED and "(a) at EP's K where an SAE was built there (L8)" in v2.measured
    assert "ep:p=1 0.8" in v2.measured and "sae@K-p1(ep:p=1) 0.7" in v2.measured and "n 30" in v2.measured
    no_sae = [c for c in cells if c["cell"]["spec"] != "sae@K-p1(ep:p=1)"]
    v2 = claim_detection(rows_table(no_sae), unit_table(no_sae), [], artefact_table(no_sae))[0]
    assert v2.status == NOT_TESTABLE and "(a) no SAE at EP's K" in v2.measured


def test_a_model_without_finished_cells_can_take_another_store_dtype_on_request(tmp_path):
    import dataclasses

    from bench.runner import Run, amendment_words, write_cell
    from bench.suites import get_suite

    suite = dataclasses.replace(get_suite("smoke"), models=["tiny-gemma2", "other"], store_dtype="float16")
    run = Run(suite, tmp_path, "r", progress=False)
    cell = next(c for c in run.cells() if c.model == "tiny-gemma2" and c.family == "build")
    write_cell(run.cell_path(cell), {"cell": cell.__dict__, "cell_id": cell.id, "rows": [{"value": 1.0}]})
    del run
    wide = dataclasses.replace(suite, model_store_dtype={"other": "float32"})
    assert wide.store_dtype_for("other") == "float32" and wide.store_dtype_for("tiny-gemma2") == "float16"
    (a,) = Run(wide, tmp_path, "r", progress=False, amend=True).meta["amendments"]
    assert a["models"] == ["other"]
    assert amendment_words(a) == "the store dtype of other (from the suite store dtype to float32)"
    # not for a model with a finished cell: its stored rows would change under its results
    with pytest.raises(ValueError, match="another smoke suite"):
        Run(dataclasses.replace(wide, model_store_dtype={"other": "float32", "tiny-gemma2": "float32"}), tmp_path,
            "r", progress=False, amend=True)
