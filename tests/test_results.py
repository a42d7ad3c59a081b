"""bench.results: a run's rows, per-unit values and artefacts as tidy DataFrames, detail facts as columns, and
metrics that cannot inform flagged (on fake cell files, and on real retrieval rows of planted data)."""

import json

import numpy as np
import pandas as pd
import pytest

from bench.results import load, parse_detail, tidy_rows
from bench.runner import write_cell

METHODS = ("ep:p=2", "sae", "kmeans@K(ep:p=2)")


def _row(method, metric, value, detail, layer=4, units=None, clusters=None):
    r = {"method": method, "method_config": "{}", "model": "m", "layer": layer, "metric": metric, "value": value,
         "ci_low": value, "ci_high": value, "n": len(units or {}) or 1, "seed": 0, "supervised": False,
         "detail": detail}
    if units is not None:
        r["units"] = units
    if clusters is not None:
        r["clusters"] = clusters
    return r


def _cell(method, family, rows, layer=4):
    art = {"name": method, "family": method.split(":")[0].split("@")[0], "K": 100, "tokens": 1000, "rows": 990,
           "flops": 1.0, "seed": 0, "p": 2.0 if method.startswith("ep") else None, "matched_to": None,
           "quality": None}
    return {"cell": {"model": "m", "layer": layer, "spec": method, "family": family},
            "cell_id": f"m__L{layer:02d}__{method}__{family}", "method_family": art["family"],
            "store_id": "s0", "git_commit": "abc", "started": "t0", "finished": "t1", "artefacts": [art],
            "rows": rows}


def _cells():
    cells = []
    for i, m in enumerate(METHODS):
        concepts = {"c1": 1 / 3, "c2": 1 / 3}
        cells.append(_cell(m, "retrieval", [
            # at the ceiling for every method on wordnet: uninformative there
            _row(m, "retrieval.precision@50", 1 / 3, "wordnet; readout=default; ceiling=0.333333; pool_texts=30",
                 units=concepts),
            # on bbc one method is below the ceiling: it informs there
            _row(m, "retrieval.precision@50", 1 / 3 - 0.1 * (i == 1), "bbc; readout=default; ceiling=0.333333"),
            _row(m, "retrieval.precision@10", 0.7 - 0.1 * i, "wordnet; readout=default; ceiling=0.7"),
            # a run written before the fact was key=value
            _row(m, "retrieval.legacy@50", 0.3333333, "wordnet; readout=default; ceiling 0.333"),
            _row(m, "retrieval.purity@10", 0.5 + 0.1 * i,
                 "wordnet; readout=cosine; firing=15; K=20; min_texts=10; n_texts=140; nonzero_share=0.681"),
        ]))
        cells.append(_cell(m, "probing", [_row(m, "probing.acc", 0.5, "wordnet; floor=0.5; mean-pooled")]))
        cells.append(_cell(m, "causal", [
            _row(m, "causal.ablate.delta_at_kl", -0.5 * (i + 1),
                 "country_capital; kl=0.1; nan=0; clusters=2; prompts=3; hook blocks.8.hook_resid_post",
                 layer=8, units={"p0": -0.4, "p1": -0.6, "p2": -0.5}, clusters={"p0": "a", "p1": "a", "p2": "b"}),
        ], layer=8))
        cells.append(_cell(m, "stability", [
            _row(m, "stability.share", 0.4, "layers 4->8; K_a=5407, K_b=5102; hungarian; share of min(K_a, K_b) = 5102",
                 layer=-1),
            _row(m, "compositional.ari_c2", 0.2, "toy; p=4; n=12; K=30", layer=-1),
        ], layer=-1))
    return cells


def _write_run(root, cells, run_id="myrun"):
    d = root / run_id
    (d / "cells").mkdir(parents=True)
    for c in cells:
        write_cell(d / "cells" / f"{c['cell_id']}.json", c)
    (d / "run.json").write_text(json.dumps({"suite": "fake", "git_commit": "abc", "config": {"layers": [4, 8]}}))
    return d


@pytest.fixture
def run(tmp_path):
    return _write_run(tmp_path, _cells())


def test_parse_detail_splits_setting_facts_and_prose():
    assert parse_detail("wordnet; readout=cosine; ceiling=0.333; latent with best train AUROC") == (
        "wordnet", {"readout": "cosine", "ceiling": "0.333"}, "latent with best train AUROC")
    # pairs only, separated by ", ": each its own fact; prose with " = " stays prose
    assert parse_detail("layers 4->8; K_a=5407, K_b=5102; share of min(K_a, K_b) = 5102") == (
        "layers 4->8", {"K_a": "5407", "K_b": "5102"}, "share of min(K_a, K_b) = 5102")
    # a value may hold spaces and commas; a key never holds a space
    assert parse_detail("x; alpha=0.5x mean resid norm (85.69); best alpha=2x, chosen on train")[1] == {
        "alpha": "0.5x mean resid norm (85.69)"}
    assert parse_detail("vs sae:topk-w2048-k32; top-100 of 589 texts; readouts signed/None") == (
        "vs sae:topk-w2048-k32", {}, "top-100 of 589 texts; readouts signed/None")
    assert parse_detail("") == ("", {}, "") and parse_detail(None) == ("", {}, "")
    assert parse_detail("bbc; ceiling 0.333")[1] == {"ceiling": "0.333"}  # runs before ceiling=


def test_load_gives_tidy_rows_with_facts_as_columns(run, tmp_path):
    r = load("myrun", results_dir=tmp_path)
    assert r.dir == run and load(run).rows.equals(r.rows)  # a run id under results_dir, or the directory itself
    rows = r.rows
    assert len(rows) == 3 * 9 and r.run["suite"] == "fake"
    assert {"setting", "readout", "ceiling", "pool_texts", "kl", "clusters", "prompts", "K_a", "K_b", "p",
            "detail_n", "uninformative", "uninformative_reason", "cell_id", "store_id"} <= set(rows.columns)
    assert rows["n"].dtype.kind == "i"  # the row's own n is untouched; the detail's n= is detail_n
    for col in ("ceiling", "kl", "K_a", "clusters", "detail_n"):
        assert rows[col].dtype.kind == "f", col  # numeric (NaN where a row has no such fact)
    assert rows["readout"].dropna().isin(["default", "cosine"]).all()
    causal = rows[rows.metric == "causal.ablate.delta_at_kl"].iloc[0]
    assert causal.setting == "country_capital" and causal.kl == 0.1 and causal.prompts == 3
    assert causal.detail == "hook blocks.8.hook_resid_post"  # what is not a key=value stays text
    stab = rows[rows.metric == "stability.share"].iloc[0]
    assert (stab.setting, stab.K_a, stab.K_b, stab.detail) == ("layers 4->8", 5407, 5102,
                                                               "hungarian; share of min(K_a, K_b) = 5102")
    assert rows.loc[rows.metric == "retrieval.purity@10", "detail"].eq("").all()


def test_uninformative_flags_metric_settings_at_their_ceiling_or_floor(run):
    rows = load(run).rows
    flagged = rows[rows.uninformative]
    assert set(zip(flagged.metric, flagged.setting)) == {
        ("retrieval.precision@50", "wordnet"),  # every method at ceiling=0.333333
        ("retrieval.legacy@50", "wordnet"),  # "ceiling 0.333" (written to 3 decimals: compared at that precision)
        ("probing.acc", "wordnet"),  # every method at floor=0.5
    }
    assert len(flagged) == 3 * 3
    assert flagged.loc[flagged.metric == "probing.acc", "uninformative_reason"].iloc[0] == "every value at its floor (0.5)"
    # one method below the ceiling on bbc, below it on p@10: those inform
    assert not rows[(rows.metric == "retrieval.precision@50") & (rows.setting == "bbc")].uninformative.any()
    assert rows.loc[~rows.uninformative, "uninformative_reason"].eq("").all()


def test_units_join_the_rows_on_the_same_columns(run):
    r = load(run)
    u = r.units
    assert {"model", "layer", "method", "family", "metric", "setting", "pair_setting", "seed", "unit", "cluster",
            "value", "kl"} <= set(u.columns)
    c = u[u.metric == "causal.ablate.delta_at_kl"]
    assert len(c) == 3 * 3 and set(c.setting) == {"country_capital"} and set(c.kl) == {0.1}
    assert set(c.pair_setting) == {"country_capital; kl=0.1"}  # what verdicts pair on (bench.verdict.unit_table)
    assert dict(zip(c[c.method == "sae"].unit, c[c.method == "sae"].cluster)) == {"p0": "a", "p1": "a", "p2": "b"}
    joined = c.merge(r.rows, on=["model", "layer", "method", "metric", "seed", "setting", "kl"],
                     suffixes=("_unit", ""))
    assert len(joined) == len(c)
    means = joined.groupby("method").agg(unit_mean=("value_unit", "mean"), value=("value", "first"))
    assert np.allclose(means.unit_mean, -0.5)  # the units behind each row
    p50 = u[(u.metric == "retrieval.precision@50")]
    assert set(p50.unit) == {"c1", "c2"} and set(p50.setting) == {"wordnet"}


def test_artefacts_and_run(run):
    r = load(run)
    a = r.artefacts
    assert set(a.method) == set(METHODS) and {"model", "layer", "K", "tokens", "rows", "flops", "seeds"} <= set(a)
    assert r.run["config"] == {"layers": [4, 8]}


def test_tables_are_verified_and_rebuilt_from_the_cells(run, capsys):
    first = load(run).rows  # no rows.parquet yet: written from the cells
    assert (run / "rows.parquet").exists()
    (run / "rows.parquet").write_bytes(b"damaged")
    again = load(run).rows
    assert "rebuilding the tables" in capsys.readouterr().out
    pd.testing.assert_frame_equal(first, again)
    # a cell added after the tables were written: the tables are stale and rebuilt
    extra = _cell("pca", "probing", [_row("pca", "probing.acc", 0.9, "wordnet; floor=0.5")])
    write_cell(run / "cells" / f"{extra['cell_id']}.json", extra)
    rows = load(run).rows
    assert "pca" in set(rows.method)
    assert not rows[rows.metric == "probing.acc"].uninformative.any()  # pca is above the floor: it now informs


def test_missing_run_is_named_with_the_runs_there(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="runs there: myrun"):
        load("nope", results_dir=tmp_path)


def test_retrieval_writes_its_ceiling_as_a_fact_and_p_at_50_is_flagged_on_planted_data():
    from bench.planted import make_planted
    from methods.random_directions import (
        RandomArtefact,
        RandomConfig,
        random_unit_directions,
    )
    from metrics.retrieval import retrieval_metrics

    p = make_planted(n_concepts=4, n_background=6, per_concept=12, d=32, seed=3)
    rand = RandomArtefact(RandomConfig(k=16), {"directions": random_unit_directions(16, 32, seed=0)},
                          {"label": "random", "layer": 0})
    rows = [r.to_dict() for a in (p.oracle, rand) for r in retrieval_metrics(a, p.concept_set, p.text_acts)]
    df = tidy_rows(pd.DataFrame(rows).drop(columns=["units", "clusters"], errors="ignore"))
    p50 = df[df.metric == "retrieval.precision@50"]
    assert p50.ceiling.notna().all() and p50.pool_texts.notna().all() and p50.detail.eq("").all()
    assert p50.pool_texts.iloc[0] < 50  # every pool is smaller than 50: p@50 is its ceiling for any method
    assert p50.uninformative.all() and "ceiling" in p50.uninformative_reason.iloc[0]
    p10 = df[df.metric == "retrieval.precision@10"]
    assert not p10.uninformative.any()  # the oracle beats random directions here
    purity = df[df.metric == "retrieval.purity@10"]
    assert {"firing", "K", "min_texts", "n_texts", "nonzero_share"} <= set(purity.dropna(axis=1).columns)
