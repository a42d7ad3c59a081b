"""Paired verdicts (bench.verdict) and the claims scorecard (bench.claims) against hand-computed and planted data."""

import json
import math

import numpy as np
import pandas as pd
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
        cells.append(_cell("m", L, "random", "random", "detection.auroc",
                           dict(zip(concepts, base + 0.1 + rng.normal(0, 0.01, size=40)))))
    run = _write(tmp_path, cells)
    vs = {(v.comparison.a, v.comparison.b): v for v in verdict_table(run)}
    ep_sae = vs[("ep:p=2", "sae")]
    assert ep_sae.verdict == "better" and ep_sae.result.n == 40  # a concept counts once over both layers
    assert ep_sae.result.diff == pytest.approx(0.1, abs=0.01) and ep_sae.result.ci_low > 0
    assert vs[("ep:p=2", "random")].verdict == "no detectable difference"
    assert vs[("sae", "random")].verdict == "worse"


def test_lower_is_better_for_causal_deltas_and_control_pairing(tmp_path):
    prompts = [f"{i}:prompt {i}" for i in range(30)]
    rng = np.random.default_rng(1)
    ctrl = rng.normal(0, 0.1, size=30)
    cells = []
    for kind in ("ablate", "steer"):  # both deltas: more negative = the answer moved more toward the contrast
        cells += [_cell("m", 8, "ep:p=2", "ep", f"causal.{kind}.delta_logit_diff", dict(zip(prompts, ctrl - 1.0))),
                  _cell("m", 8, "ep:p=2", "ep", f"causal.{kind}.control_delta", dict(zip(prompts, ctrl)))]
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
    assert comps[("sae", "random")].kind == "vs random" and "K differs" in comps[("sae", "random")].note
    assert "K differs" in comps[("ep:p=4", "sae")].note


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
    sae_art = {"name": "sae", "family": "sae", "K": 64, "tokens": 5000, "rows": 4900, "flops": 1e9, "seed": 0,
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
    text = write_report(run).read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections.index("## Verdict") < sections.index("## The paper's claims, scored") < sections.index("## Headline")
    assert "**better**" in text  # +0.2 on 12 concepts, exact sign-flip p = 2/4096 before Holm
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
