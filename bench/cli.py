"""`epbench` command line: extract, build, score, run, report, browse, export (also `python -m bench`).

Exit status: 0 done; 2 the command line is wrong (a usage error: unknown name, bad value, missing input named on it),
nothing was started; 1 the command was valid but failed while working (disk full, a damaged file found on the way,
an unreachable cluster), finished work kept. One flag name per concept in every subcommand: `--model(s)`,
`--layer(s)`, `--method(s)` (singular and plural spellings are aliases).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

DEFAULT_STORE_TOKENS = 200_000
EXIT_RUNTIME, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """The command line is wrong (exit 2): raised while checking arguments, before any work starts."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Errors raised inside are the command line's fault (the checks that run before any work): UsageError."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, KeyError, LookupError, FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from None


def version_text() -> str:
    """`epbench --version`: the package version and the git commit of the checkout it runs from."""
    from importlib.metadata import PackageNotFoundError, version

    from bench.runner import git_commit

    try:
        v = version("epbench")
    except PackageNotFoundError:
        v = "unknown (not installed: pip install -e .)"
    return f"epbench {v} (commit {git_commit()})"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (so `--tokens 0` is refused instead of meaning "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


STORE_DEFAULTS = {"tokens": DEFAULT_STORE_TOKENS, "ctx_len": 128, "dtype": "float32", "seed": 0}


def stop_time(text: str, now: float | None = None) -> float:
    """`--stop-after` as a time.time() value: a duration from now (90m, 2.5h, 45s) or a clock time in ISO 8601
    (2026-12-02T16:00Z; without a zone, local time)."""
    import datetime

    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1:] in units:
            seconds = float(text[:-1]) * units[text[-1]]
            if seconds <= 0:
                raise ValueError
            return now + seconds
        when = datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a duration (90m, 2.5h, 45s) nor an ISO 8601 time "
                                         "(2026-12-02T16:00Z)") from None
    if when <= now:
        raise argparse.ArgumentTypeError(f"{text!r} is in the past; give a later time or a duration (90m)")
    return when


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """--concepts / --prompts: the user's own evaluation data in place of a suite's."""
    p.add_argument("--concepts", nargs="+", default=None, metavar="SPEC",
                   help="concept sets: wordnet, bbc, axbench:DIR, jsonl:PATH, csv:PATH (columns text, concept, "
                        "category, split)")
    p.add_argument("--prompts", nargs="+", default=None, metavar="FILE",
                   help="causal prompt sets: shipped names (country_capital, ...) or PATH.jsonl files of "
                        "prompt, target, contrast (used whole unless --max-prompts)")
    p.add_argument("--max-prompts", type=_positive_int, default=None, metavar="N",
                   help="a seeded sample of N written prompts per prompt set (printed in the report); default: "
                        "every prompt of a --prompts file, the suite's own cap for its shipped sets")


def _add_store_args(p: argparse.ArgumentParser, layers: bool = True, defaults: bool = True) -> None:
    """Store flags. With defaults=False the request flags default to None, so a command can tell which were
    given (build: a flag given must match the store used; unset ones accept any existing store)."""
    d = STORE_DEFAULTS if defaults else dict.fromkeys(STORE_DEFAULTS)
    p.add_argument("--model", default="smollm2-135m", help="registered model name (default: smollm2-135m)")
    if layers:
        p.add_argument("--layers", "--layer", dest="layers", type=int, nargs="+", required=True,
                       help="layers to capture (resid_post)")
    p.add_argument("--corpus", default="default", help="corpus spec: default, bbc, wordnet, jsonl:PATH, hf:NAME")
    p.add_argument("--max-docs", type=_positive_int, default=None,
                   help="use the first N documents of the corpus (required for a streamed hf: dataset)")
    p.add_argument("--tokens", type=_positive_int, default=d["tokens"],
                   help=f"token budget, BOS included (default {DEFAULT_STORE_TOKENS})")
    p.add_argument("--ctx-len", type=_positive_int, default=d["ctx_len"],
                   help="context length in tokens, BOS included (default 128)")
    p.add_argument("--dtype", default=d["dtype"], choices=["float32", "float16"], help="storage dtype (default float32)")
    p.add_argument("--seed", type=int, default=d["seed"], help="corpus order seed (default 0)")
    p.add_argument("--store-dir", default=None, help="stores root (default: $EPBENCH_CACHE/stores)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


class _Version(argparse.Action):
    """--version, computed only when asked (it reads the git commit)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *a: Any) -> None:
        print(version_text())
        parser.exit()


def cmd_extract(args: argparse.Namespace) -> int:
    from bench.store import ExtractionRequest, extract

    req = ExtractionRequest(model=args.model, layers=args.layers, corpus=args.corpus, tokens=args.tokens,
                            ctx_len=args.ctx_len, dtype=args.dtype, seed=args.seed, max_docs=args.max_docs)
    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with usage_errors():  # a request the model or corpus cannot serve; I/O failures stay runtime errors
        store = extract(req, root=args.store_dir, force=args.force, progress=not args.quiet, device=args.device)
    dt = time.time() - t0
    m = store.manifest
    mb = m["bytes"] / 2**20
    per_layer_100k = mb / len(store.layers) / (store.n_tokens / 1e5)
    print(f"store     {store.path}")
    print(f"model     {store.model} (weights sha256 {m['model']['weights_sha256'][:12]}, d_model {store.d_model})")
    print(f"layers    {store.layers}  hooks {list(m['hooks'].values())}")
    print(f"corpus    {m['corpus'].get('name')}  contexts {store.n_contexts}  tokens {store.n_tokens}  rows {store.n_rows}")
    print(f"size      {mb:.1f} MiB ({per_layer_100k:.1f} MiB per 100k tokens per layer, {m['dtype']})")
    if "extraction_seconds" in m and m.get("finished", "") >= started:
        secs = m["extraction_seconds"]
        print(f"time      {secs:.1f} s extracting ({store.n_tokens / secs:,.0f} tokens/s, model load included)")
    else:
        print(f"time      {dt:.1f} s: reused the existing store (content-addressed; --force rebuilds it)")
    return 0


def _field_type(f: dataclasses.Field, hints: dict[str, Any]) -> tuple[Any, str | None]:
    """argparse type and nargs for a config dataclass field."""
    t = hints[f.name]
    origin, targs = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in targs if a is not type(None)]
        t = non_none[0] if non_none else str
        origin, targs = typing.get_origin(t), typing.get_args(t)
    if origin in (list, tuple, Sequence):
        return (targs[0] if targs else str), "+"
    if t is bool:
        return (lambda s: s.lower() in ("1", "true", "yes", "y")), None
    if origin is typing.Literal:
        return type(targs[0]), None
    return (t if t in (int, float, str) else str), None


def config_parser(config_cls: type, prog: str) -> argparse.ArgumentParser:
    """An argparse parser generated from a method config dataclass (one `--field` per field)."""
    p = argparse.ArgumentParser(prog=prog, add_help=False, usage=argparse.SUPPRESS)
    hints = typing.get_type_hints(config_cls)
    docs = config_cls.field_docs() if hasattr(config_cls, "field_docs") else {}
    group = p.add_argument_group(f"{config_cls.__name__} options (the method's config; documented in its source)")
    for f in dataclasses.fields(config_cls):
        typ, nargs = _field_type(f, hints)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=typ, nargs=nargs,
                           default=argparse.SUPPRESS,
                           help=f"{docs.get(f.name, '')} (default: {default})".strip().replace("%", "%%"))
    return p


def cmd_build(args: argparse.Namespace, extra: list[str]) -> int:
    from methods.registry import get_method
    from bench.store import ExtractionRequest, extract, find_stores

    from bench.models import weights_identity

    if args.help:
        print(args.build_parser.format_help())
        if args.method:
            print(config_parser(get_method(args.method).config_cls, f"epbench build --method {args.method}")
                  .format_help())
        return 0
    if not args.method or args.layer is None:
        args.build_parser.error("--method and --layer are required (see epbench build --method NAME --help)")
    with usage_errors():
        cls = get_method(args.method)
        params = vars(config_parser(cls.config_cls, f"epbench build --method {args.method}").parse_args(extra))
        cls(**params)  # validate the parameters before any extraction
        check_method_device(args.method, params)
    # a store flag that was given must hold for the store used; flags left unset accept any existing store
    given = {k: getattr(args, k) for k in STORE_DEFAULTS if getattr(args, k) is not None}
    if args.max_docs is not None:
        given["max_docs"] = args.max_docs
    with usage_errors():
        stores = find_stores(args.model, args.layer, args.store_dir, args.corpus,
                             weights_id=weights_identity(args.model), request=given)
        if stores:
            store = stores[0]
        else:
            req = ExtractionRequest(model=args.model, layers=[args.layer], corpus=args.corpus, max_docs=args.max_docs,
                                    **{**STORE_DEFAULTS, **{k: v for k, v in given.items() if k != "max_docs"}})
            store = extract(req, root=args.store_dir, device=args.device)
    from bench.context import ModelContext
    from bench.suites import MethodSpec

    suite = dataclasses.replace(load_suite("default"), models=[args.model], layers=[args.layer],
                                concept_sets=[args.concepts], device=args.device)
    ctx = ModelContext(suite, args.model, store=store)
    built = ctx.build(MethodSpec(args.method, params))
    out_root = Path(args.out or Path("results") / "artefacts")
    print(f"store {store.path} ({store.n_tokens} tokens, {store.n_rows} rows)")
    print(f"{'artefact':<22}{'K':>8}{'rows':>10}{'tokens':>11}{'GFLOP':>10}{'wall s':>9}{'peak MiB':>10}  path")
    from bench.cache import as_os_error

    for art in built[args.layer]:
        path = out_root / store.model / f"L{args.layer:02d}" / _folder_name(art.name)
        try:
            art.save(path)
        except Exception as e:  # a real full disk raises safetensors' SafetensorError: one line naming the path
            io_error = as_os_error(e, path)
            if io_error is None:
                raise
            raise io_error from e
        c = art.cost
        extra_info = f"  theta={art.info['theta']:.4f}" if "theta" in art.info else ""
        print(f"{art.name:<22}{art.K:>8}{c.rows:>10}{c.tokens:>11}{c.flops / 1e9:>10.2f}{c.wall_seconds:>9.2f}"
              f"{c.peak_memory_bytes / 2**20:>10.1f}  {path}{extra_info}")
    return 0


def _folder_name(label: str) -> str:
    """The artefact folder for a label (`ep:p=2` -> `ep_p2`): one short path component, never nested."""
    from bench.cache import safe_name

    return safe_name(label.replace("=", ""))


def load_suite(name: str):
    """`bench.suites.get_suite`, with a broken suite file (a syntax error, no SUITE, a failing import) reported in
    one line naming the file and the fix instead of a traceback."""
    from bench.suites import get_suite

    try:
        return get_suite(name)
    except (SyntaxError, ImportError, AttributeError, NameError, TypeError) as e:
        import importlib.util

        try:
            where = importlib.util.find_spec(f"bench.suites.{name}").origin
        except (ImportError, AttributeError, ValueError):
            where = str(Path(__file__).resolve().parent / "suites" / f"{name}.py")
        if isinstance(e, SyntaxError):
            what = f"syntax error at line {e.lineno}: {e.msg}"
        elif isinstance(e, AttributeError) and "SUITE" in str(e):
            what = "it defines no SUITE"
        else:
            what = f"{type(e).__name__}: {e}"
        raise ValueError(f"suite file {where} cannot be loaded ({what}); fix it (it must define SUITE = Suite(...)) "
                         "or pick another --suite") from None


def _suite_from_args(args: argparse.Namespace):
    """The named suite, narrowed by --model/--layers/--method/--metrics."""
    suite = load_suite(args.suite)
    suite = narrow_suite(suite, models=args.model, layers=args.layers, methods=args.method, metrics=args.metrics)
    return with_data(suite, args.concepts, args.prompts, args.max_prompts)


def with_data(suite, concepts: list[str] | None = None, prompts: list[str] | None = None,
              max_prompts: int | None = None):
    """A copy of `suite` evaluated on these concept-set specs and prompt sets; user files are checked now.

    The user's prompt sets are used whole (the suite's `max_prompts` cap is for its shipped sets) unless
    `max_prompts` asks for a seeded sample, which the report prints as "N sampled of M written"."""
    from bench.concepts import get_concept_set
    from bench.prompts import get_prompt_set

    suite = dataclasses.replace(suite)
    if concepts:
        for spec in concepts:
            if spec not in ("wordnet", "bbc") and not spec.startswith("axbench:"):
                get_concept_set(spec)  # a bad user file or unknown spec fails here, before any model loads
        suite.concept_sets = list(concepts)
    if prompts:
        for spec in prompts:
            get_prompt_set(spec)  # an unknown name or bad file fails here
        suite.prompt_sets = list(prompts)
        suite.max_prompts = None
    if max_prompts is not None:
        suite.max_prompts = max_prompts
    if concepts or prompts:  # the suite's own line describes the data it ships, not the user's
        mine = [f"concept sets {', '.join(_data_name(c) for c in concepts)}" if concepts else "",
                f"prompt sets {', '.join(_data_name(p) for p in prompts)}" if prompts else ""]
        suite.evidence = (f"the `{suite.name}` suite's grid on your data ({'; '.join(m for m in mine if m)}): the "
                          "evidence is as strong as its n (the Evaluation data table below); with few units a `no "
                          "detectable difference` is weak evidence of equivalence")
    return suite


def _data_name(spec: str) -> str:
    """A data spec as the report names it: a file by its name, not its absolute path."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("jsonl", "csv", "axbench"):
        return f"{kind}:{Path(rest).name}"
    return Path(spec).name if "/" in spec else spec


def narrow_suite(suite, models=None, layers=None, methods=None, metrics=None):
    """A copy of `suite` restricted to the given models, layers, method specs and metric families.

    A method name the suite already configures keeps the suite's parameters; any other name or spec string
    (`ep:p=2`, a plugin name) is parsed as a new method spec.
    """
    from bench.suites import METRIC_FAMILIES, MethodSpec

    suite = dataclasses.replace(suite)
    if models:
        from bench.models import LOADERS

        unknown = [m for m in models if m not in LOADERS]
        if unknown:  # before any run folder is made
            raise ValueError(f"unknown model(s) {unknown}; available: {', '.join(sorted(LOADERS))}")
        suite.models = list(models)
    if layers:
        suite.layers = sorted(set(layers))
        suite.model_layers = {}  # the layers asked for, for every model
    if methods:
        known = {s.label: s for s in suite.methods}
        specs = []
        for text in methods:
            if text in known:
                specs.append(known[text])
                continue
            spec = MethodSpec.parse(text)
            _rejoin_paths(spec)
            # the suite's spec of the same label (e.g. `kmeans@K`) lends its params and budget rule, else the first
            # spec of the same method its params
            same = next((s for s in suite.methods if s.label == spec.label), None)
            base = same or next((s for s in suite.methods if s.method == spec.method), None)
            if base is not None:
                spec.params = {**base.params, **spec.params}
            if same is not None:
                for name in ("match_p", "seeds", "k_per_width", "rows_as_target"):
                    if not getattr(spec, name):
                        setattr(spec, name, getattr(same, name))
            specs.append(spec)
        from methods.registry import get_method

        for spec in specs:
            get_method(spec.method).config_cls.from_dict(spec.params)  # unknown names / bad values fail here, now
        suite.methods = specs
        # the suite's per-family subsets cap its own grid; a spec the user added joins every family it applies to
        added = [s.label for s in specs if s.label not in known]
        suite.family_artefacts = {f: list(keep) + added for f, keep in suite.family_artefacts.items()}
    if metrics and metrics != ["all"]:
        suite.metrics = [m for m in METRIC_FAMILIES if m in set(metrics)]
        unknown = set(metrics) - set(METRIC_FAMILIES)
        if unknown:
            raise ValueError(f"unknown metric families {sorted(unknown)}; valid: {', '.join(METRIC_FAMILIES)}, all")
    for spec in suite.methods:
        check_method_device(spec.label, spec.params)  # e.g. ep:device=cuda on a CPU-only torch: one line, now
    suite.__post_init__()
    from bench.cells import expand_cells

    if not expand_cells(suite):
        raise ValueError(f"nothing to run: no metric family of {suite.metrics} applies to the methods "
                         f"{[s.label for s in suite.methods]} (e.g. recon needs a method that decodes, correspondence "
                         "EP and an SAE); pick other --metrics or --methods")
    return suite



def _rejoin_paths(spec) -> None:
    """A `/` in a method spec separates list items (`ep:p=1/2/4`), so `sae:path=/data/sae` reads as a list: for a
    field that takes one string (a path), the items are joined back."""
    from methods.registry import get_method

    try:
        hints = typing.get_type_hints(get_method(spec.method).config_cls)
    except (ValueError, TypeError, NameError):
        return
    for key, value in list(spec.params.items()):
        hint = hints.get(key)
        takes_str = hint is str or (typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType",
                                    None)) and str in typing.get_args(hint)
                                    and not any(typing.get_origin(a) is list for a in typing.get_args(hint)))
        if takes_str and isinstance(value, list):
            spec.params[key] = "/".join("" if v is None else str(v) for v in value)


def check_method_device(label: str, params: dict[str, Any]) -> None:
    """A method's `device=` this torch cannot use, refused in one line before anything runs."""
    from bench.models import pick_device

    for key, value in params.items():
        if (key == "device" or key.endswith("_device")) and isinstance(value, str) and value:
            try:
                pick_device(value)
            except ValueError as e:
                reason = str(e).split(": ", 1)[-1].split("; use")[0]
                raise ValueError(f"method {label!r}: {key}={value}: {reason}; use {key}=cpu (or leave {key} "
                                 "unset: cuda when available)") from None


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import run_suite

    with usage_errors():
        suite = _suite_from_args(args)
    run = run_suite(suite, args.results_dir, args.run_id, force=args.force, report=not args.no_report,
                    executor=args.executor, address=args.address, stop_at=args.stop_after,
                    amend=args.amend, first=args.first)
    print_table(run.dir)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from bench.runner import run_suite

    with usage_errors():
        base = load_suite("default")
        suite = narrow_suite(base, models=[args.model], layers=args.layers, methods=args.methods,
                             metrics=args.metrics)
        suite = dataclasses.replace(suite, name="score",
                                    store_tokens=args.tokens if args.tokens is not None else base.store_tokens)
        suite = with_data(suite, args.concepts, args.prompts, args.max_prompts)
    t0 = time.time()
    run = run_suite(suite, args.results_dir, args.run_id, force=args.force, report=False)
    print_table(run.dir)
    print(f"\n[epbench] scored in {time.time() - t0:.0f} s; rows in {run.dir / 'rows.csv'}")
    return 0


def print_table(run_dir: Path) -> None:
    """The headline table of a run, in the terminal."""
    from bench.report import headline_md, load_rows, load_run_info, primary_concept_set

    df = load_rows(run_dir)
    print("\n".join(headline_md(df, primary_concept_set(df, load_run_info(run_dir)))))


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import report_main

    try:
        print(report_main(args.run_id, Path(args.results_dir)))
    except FileNotFoundError as e:  # no such run: the command line names what is not there
        raise UsageError(str(e)) from None
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from bench.browser import BrowseConfig, browse, site_size
    from bench.browser.site import check_out, check_run_filters, resolve_target

    with usage_errors():  # what to browse, which of it and where to write it, checked before any work
        kind, path = resolve_target(args.target, args.results_dir)
        check_out(Path(args.out) if args.out else path / "browser")
        cfg = BrowseConfig(sample_contexts=args.sample_contexts, top_contexts=args.top_contexts,
                           shard_features=args.shard_features, layers=args.layers, methods=args.methods)
        if kind == "run":
            check_run_filters(path, cfg)
    t0 = time.time()
    out = browse(args.target, args.out, cfg, args.results_dir)
    print(f"browser   {out / 'index.html'} ({site_size(out) / 2**20:.1f} MiB, {time.time() - t0:.0f} s); "
          "open it in a browser, no server needed")
    if args.screenshot:
        from bench.browser.chromium import screenshot

        print(f"screenshot {screenshot(out, Path(args.screenshot))} (headless Chromium)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bench.export import export_sae_lens
    from methods.base import load_artefact

    with usage_errors():  # an artefact folder, readout or k that cannot be exported (I/O failures stay runtime)
        art = load_artefact(args.artefact)
        out, check = export_sae_lens(art, args.out, readout=args.readout, k=args.k, basis=args.basis,
                                     source=str(args.artefact), model_name=args.model_name)
    print(f"exported  {art.name} (K={art.K}) -> {out} (sae-lens: SAE.load_from_disk({str(out)!r}))")
    print(f"model     cfg metadata model_name {json.loads((out / 'cfg.json').read_text())['metadata']['model_name']!r} "
          "(--model-name sets it for the tool you load it with)")
    print(f"quality   {check.line() if check else 'not measured: the store it was built on is not on this machine'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, help="print the version and commit, then exit")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("extract", help="capture resid_post activations into the shared store")
    _add_store_args(p)
    p.add_argument("--force", action="store_true", help="delete and rebuild the store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("build", add_help=False,
                       help="build a method artefact from the store; other --flags set method config")
    p.add_argument("-h", "--help", action="store_true", help="this help; with --method NAME, also its options")
    p.add_argument("--method", "--methods", dest="method", default=None,
                   help="method name (built-in or plugin); required")
    p.add_argument("--layer", "--layers", dest="layer", type=int, default=None, help="layer to build at; required")
    p.add_argument("--concepts", default="wordnet", help="concept set for supervised methods (diffmean)")
    p.add_argument("--out", default=None, help="artefacts root (default results/artefacts)")
    _add_store_args(p, layers=False, defaults=False)
    p.set_defaults(build_parser=p)

    p = sub.add_parser("run", help="run a benchmark suite (resumes finished cells), then write its report")
    p.add_argument("--suite", default="default", help="suite name (bench/suites/<name>.py)")
    p.add_argument("--model", "--models", dest="model", nargs="+", default=None, help="restrict to these models")
    p.add_argument("--layers", "--layer", dest="layers", type=int, nargs="+", default=None,
                   help="restrict to these layers")
    p.add_argument("--methods", "--method", dest="method", nargs="+", default=None,
                   help="restrict to / add these method specs or plugins")
    p.add_argument("--metrics", nargs="+", default=None, help="restrict to these metric families")
    _add_data_args(p)
    p.add_argument("--run-id", default=None, help="results/<run-id> (default: <suite>-<config hash>)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--force", action="store_true", help="recompute finished cells")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where cells run: this process (default) or a Ray cluster (pip install 'epbench[ray]')")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (auto, host:6379, ray://host:10001); default: start one on this machine")
    p.add_argument("--amend", action="store_true",
                   help="resume a run whose suite changed only in method specs, or in the layers of models, none "
                        "of whose cells has finished (e.g. a baseline reduced for budget before it ran); the change is "
                        "recorded in run.json")
    p.add_argument("--stop-after", type=stop_time, default=None, metavar="TIME",
                   help="start no cell after this (a duration: 150m, 2.5h; or a time: 2026-12-02T16:00Z); the cell "
                        "in flight finishes and the run stays resumable (for sessions of limited length)")
    p.add_argument("--first", nargs="+", default=None, metavar="PATTERN",
                   help="run the unfinished cells whose id matches these globs first, in the order given (e.g. "
                        "'*random_K__cost' '*random_K*': a sitting uses the fits it already has before starting one "
                        "it may not finish); results do not depend on the order")

    p = sub.add_parser("score", help="score methods on one model and layer; prints one table")
    p.add_argument("--model", "--models", dest="model", default="smollm2-135m")
    p.add_argument("--layers", "--layer", dest="layers", type=int, nargs="+", required=True,
                   help="layer(s) to score at")
    p.add_argument("--methods", "--method", dest="methods", nargs="+",
                   default=["ep:p=2", "sae", "kmeans", "pca", "random", "diffmean"])
    p.add_argument("--metrics", nargs="+", default=["all"])
    _add_data_args(p)
    p.add_argument("--tokens", type=_positive_int, default=None,
                   help="store token budget (default: the default suite's)")
    p.add_argument("--run-id", default=None)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("report", help="write results/<run-id>/REPORT.md and plots (latest run by default)")
    p.add_argument("run_id", nargs="?", default=None)
    p.add_argument("--results-dir", default="results")

    p = sub.add_parser("browse", help="write a static feature browser (results/<run-id>/browser/index.html)")
    p.add_argument("target", help="run id, run directory, or artefact directory (cfg.json or a folder of them)")
    p.add_argument("--out", default=None, help="site folder (default: <run or artefact dir>/browser)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--layers", "--layer", dest="layers", type=int, nargs="+", default=None, help="only these layers")
    p.add_argument("--methods", "--method", dest="methods", nargs="+", default=None,
                   help="only these method spec or artefact labels")
    p.add_argument("--sample-contexts", type=int, default=None,
                   help="scan only the first N store contexts for evidence (default: the whole store)")
    p.add_argument("--top-contexts", type=int, default=5, help="top-activating contexts per feature")
    p.add_argument("--shard-features", type=int, default=256, help="feature cards per lazily loaded file")
    p.add_argument("--screenshot", default=None, metavar="PNG",
                   help="also save a PNG of an EP region beside its best SAE match (headless Chromium)")

    p = sub.add_parser("export", help="export an artefact to another library's format (sae-lens)")
    p.add_argument("artefact", help="artefact directory (cfg.json + artefact.safetensors)")
    p.add_argument("--format", required=True, choices=["sae-lens"])
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--readout", default=None, help="readout to reproduce (default: topk for EP/k-means, else dense)")
    p.add_argument("--k", type=int, default=1, help="k of the topk readout (EP/k-means)")
    p.add_argument("--basis", default="exemplar", choices=["exemplar", "mean"], help="EP basis")
    p.add_argument("--model-name", default=None,
                   help="model name written into cfg.json metadata for downstream tools (default: the Hugging Face "
                        "repo id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct, google/gemma-3-270m)")

    args, extra = parser.parse_known_args(argv)
    try:
        if args.cmd == "build":
            return cmd_build(args, extra)
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        return {"extract": cmd_extract, "run": cmd_run, "score": cmd_score, "report": cmd_report,
                "browse": cmd_browse, "export": cmd_export}[args.cmd](args)
    except UsageError as e:
        print(f"epbench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"epbench: error: {msg}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as e:  # disk full, read-only or unwritable folders: one line naming the path and the fix
        print(f"epbench: error: {os_error_line(e)}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as e:  # a library's I/O error that is not an OSError (safetensors on a full disk)
        from bench.cache import as_os_error

        io_error = as_os_error(e, _output_of(args))
        if io_error is None:
            raise
        print(f"epbench: error: {os_error_line(io_error)}", file=sys.stderr)
        return EXIT_RUNTIME


def _output_of(args: argparse.Namespace) -> str:
    """Where a command writes, for an I/O error that names no file."""
    from bench.cache import cache_dir

    for name in ("out", "store_dir", "results_dir"):
        if getattr(args, name, None):
            return str(getattr(args, name))
    return str(cache_dir())


def os_error_line(e: OSError) -> str:
    """One line for an OSError: the path, what went wrong, and what to do (finished work is always kept)."""
    import errno

    where = e.filename or "the output folder"
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        fix = "free disk space, then rerun the same command: finished work is kept and it resumes"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "that location is not writable: pass a writable --results-dir / --store-dir / --out or set EPBENCH_CACHE"
    else:
        fix = "check the path, then rerun the same command (finished work is kept)"
    return f"{where}: {what}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
