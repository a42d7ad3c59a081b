"""One test per suite cell (model x layer x method spec x metric family); pytest-benchmark times each cell:
the build cell times the build, the cost cell the encode. Quality numbers go into the benchmark's extra_info
and into results/<run-id>/."""

import math


def test_cell(cell, suite_run, benchmark):
    rows = benchmark.pedantic(suite_run.run_cell, args=(cell,), rounds=1, iterations=1)
    for r in rows:
        key = r.metric + (f"[{r.method}|{r.detail}]" if r.detail else f"[{r.method}]")
        benchmark.extra_info[key] = r.value
    assert rows, f"cell {cell.id} produced no rows"
    finite = [r for r in rows if not math.isnan(r.value)]
    assert finite, f"cell {cell.id}: every value is NaN"
