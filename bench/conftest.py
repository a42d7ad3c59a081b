"""pytest plugin for the benchmark suites: `pytest bench/ --suite default` collects one test per cell.

`pytest bench/ --method NAME` also runs the plugin contract check (`bench/plugin_contract.py`, collected as a test
module here) for every `--method` that is not a built-in method, or, without `--method`, for every method installed
through the `epbench.methods` entry points; the terminal summary prints each report (which metric families the
method joins and why). `-k contract` runs only the contract.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("epbench", "epbench benchmark suites")
    group.addoption("--suite", default="smoke", help="suite to collect (bench/suites/<name>.py); default smoke")
    group.addoption("--method", action="append", default=None,
                    help="restrict to / add a method spec or plugin name (repeatable), e.g. --method ep:p=2")
    group.addoption("--model", action="append", default=None, help="restrict to a model (repeatable)")
    group.addoption("--layer", action="append", type=int, default=None, help="restrict to a layer (repeatable)")
    group.addoption("--metric", action="append", default=None, help="restrict to a metric family (repeatable)")
    group.addoption("--run-id", default=None, help="results/<run-id> (default <suite>-<config hash>)")
    group.addoption("--results-dir", default="results", help="where runs are written")
    group.addoption("--recompute", action="store_true", help="recompute cells finished by an earlier run")
    group.addoption("--executor", default="local", choices=["local", "ray"],
                    help="ray: compute the selected cells on a Ray cluster first; the tests then read them back")
    group.addoption("--address", default=None, help="Ray cluster address for --executor ray (default: start one)")


def pytest_collect_file(file_path, parent):
    """Collect bench/plugin_contract.py (an importable module, not named test_*) for its contract test."""
    if (file_path.name == "plugin_contract.py" and file_path.parent == Path(__file__).parent
            and not parent.session.isinitpath(file_path)):  # named on the command line: pytest collects it itself
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _contract_specs(config) -> list[str]:
    """The method strings whose contract is checked: non-built-in `--method`s, else the installed plugins."""
    from methods.registry import _BUILTIN, _plugins

    if config.option.method:
        return [m for m in config.option.method if m.split(":")[0].split("@")[0] not in _BUILTIN]
    return sorted(_plugins())


CONTRACT_REPORTS = []  # (spec, ContractReport) of this session, printed in the terminal summary


@pytest.fixture
def contract_reports():
    return CONTRACT_REPORTS


def pytest_terminal_summary(terminalreporter):
    if CONTRACT_REPORTS:
        terminalreporter.section("epbench plugin contract")
        for _, report in CONTRACT_REPORTS:
            terminalreporter.write_line(report.format())


def _suite(config):
    from bench.cli import narrow_suite
    from bench.suites import get_suite

    o = config.option
    return narrow_suite(get_suite(o.suite), models=o.model, layers=o.layer, methods=o.method, metrics=o.metric)


def pytest_generate_tests(metafunc):
    if "contract_spec" in metafunc.fixturenames:
        specs = _contract_specs(metafunc.config)
        metafunc.parametrize("contract_spec", specs, ids=specs)
    if "cell" in metafunc.fixturenames:
        from bench.runner import expand_cells

        cells = expand_cells(_suite(metafunc.config))
        metafunc.parametrize("cell", cells, ids=[c.id for c in cells])


@pytest.fixture(scope="session")
def suite_run(request):
    """The Run all cells of this session append to; the report is written when the session ends."""
    from bench.runner import Run

    o = request.config.option
    run = Run(_suite(request.config), o.results_dir, o.run_id, force=o.recompute, progress=False)
    if o.executor != "local":
        from bench.executors import run_cells

        selected = [item.callspec.params["cell"] for item in request.session.items
                    if hasattr(item, "callspec") and "cell" in item.callspec.params]
        # a cell that fails on the cluster leaves no file: its test recomputes it here and fails with its error
        run_cells(run, [c for c in selected if not run.is_done(c)], o.executor, address=o.address, progress=False,
                  raise_on_failure=False)
    else:
        run.meta["executor"] = {"name": "local"}
    yield run
    run.finish()
    from bench.report import write_report

    write_report(run.dir)
