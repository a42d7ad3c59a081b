"""The Artefact contract, checked: does a method (a plugin) give every metric family what it reads?

    pytest bench/ --method NAME -k contract       # what a plugin author runs (bench/conftest.py collects this file)
    python -c "from bench.plugin_contract import check_method; print(check_method('NAME:k=8').format())"

`check_method(spec)` fits the method on a small synthetic store (planted sparse directions about an offset
centre, two layers, `TOY` rows x d) and checks, each failure a `problem` naming the fix:

- the classes: a `methods.base.Method` with a non-empty `name`; a `MethodConfig` dataclass whose every field has
  a default and that takes the spec's parameters; an `Artefact` class whose `method` is the registered name and
  whose `config_cls` is the method's (a saved artefact is loaded by that name, its config by that class);
  `readouts` a non-empty tuple of names; `supervised` the same on the method and the artefact; a declared
  `size_param` a config field;
- the fit: returns an instance of the artefact class; `info["cost"]` is a `Cost` with rows, tokens and wall
  seconds above zero (an all-zero cost reads as a free build in every table and ratio); `info`'s `layer` and
  `store_id`, where given, are the fit's;
- the geometry: `directions` [K, d] finite, unit rows; `center` [d] finite;
- reading: `encode(x)` and `encode(x, r)` for every readout give finite [N, K]; `assign(x)` gives [N] indices in
  [0, K) and [N] scores; with `reconstructs`, `decode(encode(x))` gives finite [N, d];
- interventions: `ablate(x, [0])` and `steer(x, 0, 1.0)` give finite [N, d];
- persistence: `save` then `load_artefact` gives the same class, config, info, cost, directions and encodings.

Softer findings are `notes` (FLOPs or peak memory not counted, no `check_input`, decode without `reconstructs`,
a low explained variance, info values that JSON cannot hold). `families` says, per metric family of
`bench.suites.METRIC_FAMILIES`, whether the method takes part and why (from `bench.cells`' own rule, so it
cannot drift from the runner), plus whether it can be budget-matched (`NAME@K:match_to=ep`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

TOY = {"d": 32, "n_contexts": 64, "tokens_per_context": 32, "true_features": 16, "layers": (0, 1), "seed": 0}
UNIT_TOL = 1e-3  # | ||direction|| - 1 | allowed
ROUND_TRIP_TOL = 1e-6  # encode after save/load vs before (absolute, and relative to the largest activation)


class ContractError(AssertionError):
    """A method breaks the Artefact contract: the message lists every problem and its fix."""


@dataclasses.dataclass
class ContractReport:
    """What `check_method` found: `problems` break the contract, `notes` do not; `families`: (family, joins, why)."""

    method: str
    source: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    families: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)
    cost: dict[str, Any] = dataclasses.field(default_factory=dict)
    K: int | None = None
    fit_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def joins(self, family: str) -> bool:
        return any(f == family and j for f, j, _ in self.families)

    def format(self) -> str:
        toy = f"{TOY['n_contexts'] * TOY['tokens_per_context']} rows x d {TOY['d']}"
        out = [f"contract of {self.method}{f' ({self.source})' if self.source else ''}: "
               f"{'OK' if self.ok else f'BROKEN ({len(self.problems)} problem(s))'}"]
        if self.K is not None:
            out.append(f"  fitted on a toy store of {toy}: K = {self.K} in {self.fit_seconds:.3g} s")
        if self.cost:
            c = self.cost
            out.append(f"  cost row: rows {c.get('rows')}, tokens {c.get('tokens')}, FLOPs {c.get('flops', 0):.4g}, "
                       f"wall {c.get('wall_seconds', 0):.4g} s, peak memory {c.get('peak_memory_bytes')} B, "
                       f"device {c.get('device')}")
        out += [f"  problem: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        if self.families:
            width = max(len(f) for f, _, _ in self.families)
            out.append("  metric families:")
            out += [f"    {f:<{width}}  {'yes' if j else 'no '}  {why}" for f, j, why in self.families]
        return "\n".join(out)


def assert_contract(spec: Any, **kw: Any) -> ContractReport:
    """`check_method`, raising ContractError (with the whole report) when the contract is broken."""
    report = check_method(spec, **kw)
    if not report.ok:
        raise ContractError(report.format())
    return report


# ---------------------------------------------------------------------------------------------------------
# The toy store


def toy_activations(layers: tuple[int, ...] = TOY["layers"]) -> dict[int, torch.Tensor]:
    """[n_contexts, T, d] per layer: 2 of `true_features` planted unit directions active per row (magnitudes 1..4),
    plus noise, about an offset mean; the second layer is the first slightly rotated."""
    g = torch.Generator().manual_seed(TOY["seed"])
    n, T, d, F = TOY["n_contexts"], TOY["tokens_per_context"], TOY["d"], TOY["true_features"]
    dirs = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(F, generator=g)[:2] for _ in range(n * T)])
    mag = 1.0 + 3.0 * torch.rand(n * T, 2, generator=g)
    x = (mag[:, :, None] * dirs[idx]).sum(1) + 0.05 * torch.randn(n * T, d, generator=g) + 2.0 * dirs[0]
    out = {}
    for i, L in enumerate(layers):
        rot = torch.linalg.qr(torch.eye(d) + 0.05 * i * torch.randn(d, d, generator=g))[0]
        out[L] = (x @ rot).reshape(n, T, d).float()
    return out


def toy_store(path: str | Path):
    """The contract's store (bench.store.write_synthetic_store of `toy_activations`)."""
    from bench.store import write_synthetic_store

    return write_synthetic_store(path, toy_activations(), shard_contexts=16, model="contract-toy")


def toy_concepts(store, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For supervised methods: two concepts (rows whose projection on a random direction is high vs low)."""
    x = store.all_rows(layer).acts.float()
    g = torch.Generator().manual_seed(1)
    out = {}
    for name in ("concept_a", "concept_b"):
        s = x @ torch.nn.functional.normalize(torch.randn(x.shape[1], generator=g), dim=0)
        order = torch.argsort(s)
        out[name] = (x[order[-128:]], x[order[:128]])
    return out


# ---------------------------------------------------------------------------------------------------------
# The check


@contextmanager
def _registered(name: str, cls: type) -> Iterator[None]:
    """Make `name` resolve to `cls` in the registry while the check runs (for a class not installed as a plugin)."""
    import methods.registry as registry

    before = registry._REGISTERED.get(name)
    registry._REGISTERED[name] = cls
    try:
        yield
    finally:
        if before is None:
            registry._REGISTERED.pop(name, None)
        else:
            registry._REGISTERED[name] = before


def check_method(spec: Any, params: dict[str, Any] | None = None, workdir: str | Path | None = None
                 ) -> ContractReport:
    """Check a method against the Artefact contract: `spec` is a method string (`NAME` or `NAME:key=value`) or a
    Method class; `params` override its config. Never raises for a broken method: read `report.problems`."""
    from bench.suites import MethodSpec
    from methods.base import Method
    from methods.registry import get_method

    if isinstance(spec, type):
        cls, name, given = spec, getattr(spec, "name", "") or spec.__name__, dict(params or {})
    else:
        parsed = MethodSpec.parse(str(spec))
        name, given = parsed.method, {**parsed.params, **(params or {})}
        report = ContractReport(name)
        try:
            cls = get_method(name)
        except (KeyError, TypeError, ImportError, AttributeError) as e:
            report.problems.append(f"cannot resolve method {name!r}: {e}")
            return report
    report = ContractReport(name, source=f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        report.problems.append(f"{cls!r} is not a methods.base.Method subclass")
        return report
    with _registered(name, cls):
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="epbench-contract-") as tmp:
                _check(cls, name, given, Path(tmp), report)
        else:
            _check(cls, name, given, Path(workdir), report)
    return report


def _check(cls: type, name: str, params: dict[str, Any], work: Path, report: ContractReport) -> None:
    art_cls = _check_classes(cls, name, params, report)
    if art_cls is None:
        return
    store = toy_store(work / "store")
    layer = TOY["layers"][0]
    try:
        method = cls(cls.config_cls.from_dict(params))
    except (TypeError, ValueError) as e:
        report.problems.append(f"config: {e}")
        return
    concepts = toy_concepts(store, layer) if cls.supervised else None
    t0 = time.perf_counter()
    try:
        art = method.fit(store, layer, concepts=concepts) if concepts is not None else method.fit(store, layer)
    except Exception as e:  # noqa: BLE001 - any failure of a plugin's fit is the report's content
        report.problems.append(f"fit failed on the toy store ({store.n_rows} rows x d {store.d_model}, layer {layer}): "
                               f"{type(e).__name__}: {e}; if the defaults need a larger store, pass parameters "
                               f"(`--method '{name}:key=value'`)")
        return
    report.fit_seconds = time.perf_counter() - t0
    from methods.base import Artefact

    if not isinstance(art, art_cls):
        report.problems.append(f"fit returned {type(art).__name__}, not an instance of its artefact_cls "
                               f"{art_cls.__name__}" + ("" if isinstance(art, Artefact) else " (not an Artefact)"))
        if not isinstance(art, Artefact):
            return
    x = store.all_rows(layer).acts.float()[:256]
    geometry_ok = _check_geometry(art, store, report)
    encode_ok = geometry_ok and _check_reading(art, x, report)
    _check_cost_and_info(art, store, layer, report)
    if encode_ok:
        _check_interventions(art, x, report)
        _check_round_trip(art, x, work / "artefact", report)
    report.families = _families(cls, name, art, encode_ok, report)


def _check_classes(cls: type, name: str, params: dict[str, Any], report: ContractReport):
    from methods.base import Artefact, MethodConfig

    if not cls.name:
        report.problems.append(f"{cls.__name__}.name is empty: set it to the registered name ({name!r})")
    cfg_cls = getattr(cls, "config_cls", None)
    if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, MethodConfig) and dataclasses.is_dataclass(cfg_cls)):
        report.problems.append(f"{cls.__name__}.config_cls must be a @dataclass subclass of MethodConfig")
        return None
    try:
        cfg_cls()
    except TypeError as e:
        report.problems.append(f"{cfg_cls.__name__}() fails ({e}): give every config field a default")
    art_cls = getattr(cls, "artefact_cls", None)
    if not (isinstance(art_cls, type) and issubclass(art_cls, Artefact)):
        report.problems.append(f"{cls.__name__}.artefact_cls must be a subclass of methods.base.Artefact")
        return None
    if art_cls.method != name:
        report.problems.append(f"{art_cls.__name__}.method is {art_cls.method!r}: set it to {name!r}, the name "
                               "load_artefact resolves a saved artefact's class by")
    if art_cls.config_cls is not cfg_cls:
        report.problems.append(f"{art_cls.__name__}.config_cls is {art_cls.config_cls.__name__}, not "
                               f"{cfg_cls.__name__}: a saved artefact's config is rebuilt with the artefact's class")
    ro = art_cls.readouts
    if not (isinstance(ro, tuple) and ro and all(isinstance(r, str) and r for r in ro)):
        report.problems.append(f"{art_cls.__name__}.readouts must be a non-empty tuple of names, not {ro!r}")
    if bool(cls.supervised) != bool(art_cls.supervised):
        report.problems.append(f"supervised is {cls.supervised} on {cls.__name__} but {art_cls.supervised} on "
                               f"{art_cls.__name__}: the runner reads the method's, the metrics the artefact's")
    size = _size_param(cls, name)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    if size is not None and size not in fields:
        report.problems.append(f"size_param {size!r} is not a field of {cfg_cls.__name__} ({sorted(fields)})")
    unknown = sorted(set(params) - fields)
    if unknown:
        report.problems.append(f"parameter(s) {unknown} are not fields of {cfg_cls.__name__} ({sorted(fields)})")
        return None
    return art_cls


def _size_param(cls: type, name: str) -> str | None:
    from bench.context import SIZE_PARAMS

    return getattr(cls, "size_param", None) or SIZE_PARAMS.get(name)


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


def _check_geometry(art, store, report: ContractReport) -> bool:
    d = store.d_model
    try:
        D = art.directions
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"directions raises {type(e).__name__}: {e}")
        return False
    if not (isinstance(D, torch.Tensor) and D.ndim == 2 and D.shape[1] == d and D.shape[0] >= 1
            and D.is_floating_point()):
        report.problems.append(f"directions must be a float tensor [K, d] with d = {d} (the store's width) and K >= 1,"
                               f" got {_shape(D)}")
        return False
    report.K = int(D.shape[0])
    if not _finite(D):
        report.problems.append("directions hold NaN/inf")
        return False
    norms = D.float().norm(dim=1)
    if bool(((norms - 1).abs() > UNIT_TOL).any()):
        report.problems.append(f"directions are not unit-norm (row norms {float(norms.min()):.4g} to "
                               f"{float(norms.max()):.4g}): metrics compare them by dot product (stability, OOD, "
                               "causal); store torch.nn.functional.normalize(W, dim=1)")
    c = art.center
    if not (isinstance(c, torch.Tensor) and tuple(c.shape) == (d,) and _finite(c)):
        report.problems.append(f"center must be a finite [d] = [{d}] tensor (the point ablation pivots on), got "
                               f"{_shape(c)}")
    return True


def _check_reading(art, x: torch.Tensor, report: ContractReport) -> bool:
    N, K, ok = x.shape[0], art.K, True
    for ro in (None, *art.readouts):
        try:
            f = art.encode(x) if ro is None else art.encode(x, ro)
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"encode(x{'' if ro is None else f', {ro!r}'}) raises {type(e).__name__}: {e}")
            ok = False
            continue
        what = "encode(x)" if ro is None else f"encode(x, {ro!r})"
        if not (isinstance(f, torch.Tensor) and tuple(f.shape) == (N, K)):
            report.problems.append(f"{what} must return [N, K] = [{N}, {K}], got {_shape(f)}")
            ok = False
        elif not _finite(f):
            report.problems.append(f"{what} holds NaN/inf")
            ok = False
    try:
        art.encode(torch.zeros(2, art.d_model + 1))
        report.notes.append("encode accepts activations of the wrong width: call self.check_input(x) first (it "
                            "names the model/hook mismatch and refuses NaN rows)")
    except Exception:  # noqa: BLE001 - refusing is what we want
        pass
    try:
        a = art.assign(x)
        idx, score = a.index, a.score
        if not (tuple(idx.shape) == (N,) and not idx.is_floating_point() and int(idx.min()) >= 0
                and int(idx.max()) < K and tuple(score.shape) == (N,)):
            report.problems.append(f"assign(x) must give index [N] (integers in [0, K)) and score [N], got "
                                   f"{_shape(idx)} {idx.dtype} and {_shape(score)}")
            ok = False
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"assign(x) raises {type(e).__name__}: {e}")
        ok = False
    from methods.base import Artefact
    from metrics.reconstruction import explained_variance, reconstruct

    overrides_decode = type(art).decode is not Artefact.decode
    if art.reconstructs:
        try:
            xh = reconstruct(art, x)
            if not (tuple(xh.shape) == tuple(x.shape) and _finite(xh)):
                report.problems.append(f"decode(encode(x)) must give finite [N, d] = {list(x.shape)}, got {_shape(xh)}")
            else:
                ev = explained_variance(x, xh)
                report.notes.append(f"explained variance of decode(encode(x)) on the toy store: {ev:.3f}")
                if ev < 0:
                    report.notes.append("explained variance below 0: decode(encode(x)) is worse than the mean; "
                                        "does decode invert the default readout?")
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"reconstructs is True but decode(encode(x)) raises {type(e).__name__}: {e}")
    elif overrides_decode:
        report.notes.append("decode() is implemented but reconstructs is False: set reconstructs = True to join recon")
    return ok


def _check_cost_and_info(art, store, layer: int, report: ContractReport) -> None:
    from methods.base import Cost

    info = art.info if isinstance(art.info, dict) else {}
    if not isinstance(art.info, dict):
        report.problems.append(f"info must be a dict, not {type(art.info).__name__}")
    raw = info.get("cost")
    if not isinstance(raw, dict):
        report.problems.append("info['cost'] is missing: record Cost(rows=..., tokens=..., flops=..., wall_seconds="
                               "..., peak_memory_bytes=...).to_dict() (methods.common.BuildMeter measures seconds and "
                               "memory; tokens_behind(context_ids) counts tokens)")
        return
    try:
        cost = Cost(**raw)
    except TypeError as e:
        report.problems.append(f"info['cost'] is not a Cost ({e}): use Cost(...).to_dict()")
        return
    report.cost = cost.to_dict()
    fields = ("rows", "tokens", "flops", "wall_seconds", "peak_memory_bytes")
    if all(not getattr(cost, f) for f in fields):
        report.problems.append("cost is all zeros: every table would print this build as free (0 tokens, 0 s) and "
                               "its cost ratios as 0; measure it (methods.common.BuildMeter, tokens_behind)")
    else:
        missing = [f for f in ("rows", "tokens", "wall_seconds") if not getattr(cost, f) > 0]
        if missing:
            report.problems.append(f"cost reports {', '.join(f'{f} = 0' for f in missing)}: rows read, the tokens "
                                   "behind them (BOS included) and wall seconds are measurable for every build, and a "
                                   "0 reads as free")
        for f in ("flops", "peak_memory_bytes"):
            if not getattr(cost, f) > 0:
                report.notes.append(f"cost.{f} is 0 (not counted): the quality-vs-cost tables show it as 0")
        if 0 < cost.tokens < cost.rows:
            report.notes.append(f"cost.tokens {cost.tokens} < rows {cost.rows}: tokens count the BOS of every context "
                                "too (methods.common.tokens_behind)")
    if "layer" in info and info["layer"] != layer:
        report.problems.append(f"info['layer'] is {info['layer']!r}, the fit was at layer {layer}")
    if "store_id" in info and info["store_id"] != store.id:
        report.problems.append(f"info['store_id'] is {info['store_id']!r}, the fit read store {store.id}")
    if "store_id" not in info or "layer" not in info:
        report.notes.append("info lacks store provenance: add **store.provenance(layer) (or methods.common.base_info)"
                            " so a run can verify which store and layer a cached artefact was fitted on")
    try:
        json.dumps(info)
    except (TypeError, ValueError) as e:
        report.notes.append(f"info holds values JSON cannot hold ({e}): they are saved as text")


def _check_interventions(art, x: torch.Tensor, report: ContractReport) -> None:
    x = x[:16]
    for what, fn in (("ablate(x, [0])", lambda: art.ablate(x, [0])), ("steer(x, 0, 1.0)", lambda: art.steer(x, 0, 1.0))):
        try:
            y = fn()
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"{what} raises {type(e).__name__}: {e}")
            continue
        if not (isinstance(y, torch.Tensor) and tuple(y.shape) == tuple(x.shape) and _finite(y)):
            report.problems.append(f"{what} must give finite [N, d] = {list(x.shape)}, got {_shape(y)}")


def _check_round_trip(art, x: torch.Tensor, path: Path, report: ContractReport) -> None:
    from methods.base import load_artefact

    try:
        art.save(path)
        back = load_artefact(path)
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"save/load round trip fails: {type(e).__name__}: {e}")
        return
    diffs = []
    if type(back) is not type(art):
        diffs.append(f"class {type(back).__name__} instead of {type(art).__name__}")
    if back.config.to_dict() != json.loads(json.dumps(art.config.to_dict(), default=str)):
        diffs.append("config")
    if back.info != json.loads(json.dumps(art.info, default=str)):
        diffs.append("info")
    if back.cost != art.cost:
        diffs.append("cost")
    if back.directions.shape != art.directions.shape or not torch.equal(back.directions.cpu().float(),
                                                                         art.directions.cpu().float()):
        diffs.append("directions")
    for ro in (None, *art.readouts):
        try:
            a = art.encode(x) if ro is None else art.encode(x, ro)
            b = back.encode(x) if ro is None else back.encode(x, ro)
        except Exception as e:  # noqa: BLE001
            diffs.append(f"encode({ro}) after load raises {type(e).__name__}: {e}")
            continue
        scale = float(a.abs().max()) if a.numel() else 0.0
        if a.shape != b.shape or float((a.float() - b.float()).abs().max()) > ROUND_TRIP_TOL * max(1.0, scale):
            diffs.append(f"encode(x{'' if ro is None else f', {ro!r}'})")
    if diffs:
        report.problems.append(f"save/load round trip differs in {', '.join(diffs)}: keep every piece of state in "
                               "self.tensors (saved) and self.info / config (JSON), nothing in other attributes")


# ---------------------------------------------------------------------------------------------------------
# Which families a method takes part in


def _families(cls: type, name: str, art, encode_ok: bool, report: ContractReport) -> list[tuple[str, bool, str]]:
    from bench.cells import _applies
    from bench.suites import METRIC_FAMILIES, MethodSpec, Suite

    spec = MethodSpec(name)
    suite = Suite(name="contract", description="", models=["contract-toy"], layers=[0, 1],
                  methods=[MethodSpec("ep"), MethodSpec("sae"), spec], prompt_sets=["capitals"])
    broken = "encode / assign / directions break the contract (see the problems)"
    supervised = bool(cls.supervised)
    ep = name == "ep"
    why = {  # what each family reads of the artefact (the yes/no comes from bench.cells' rule)
        "build": "K and the cost row (tokens, rows, FLOPs, wall seconds, peak memory)",
        "retrieval": "the feature chosen on train texts ranks test texts by encode(x) (max over tokens)",
        "detection": "AUROC of the chosen feature's encode(x) (max over tokens), two selection rules",
        "probing": ("a probe on the mean-pooled `binary` readout" if "binary" in art.readouts
                    else "a probe on the one-hot of assign(x) (no `binary` readout)"),
        "sparse_probing": "probes on the k features of encode(x) with the largest train mean difference",
        "ood": "1 - max cosine of (x - center) to directions" if not ep else "assign(x)'s nearest-exemplar distance",
        "cost": "encode(x) throughput",
        "compositional": "its own partition of the toy rows, assign(x)",
        "ground_truth": "on synthetic models (suite synth): directions against the true features, encode as code",
        "correspondence": ("EP regions matched to the suite's SAE features by top-k co-activation" if ep else
                           "it matches EP regions to the suite's SAE; other methods enter only as its chance level "
                           "(random directions and k-means built at EP's K)"),
        "causal": ("a supervised spec is replaced by DiffMean fitted on the causal train prompts" if supervised
                   else "ablation (project out of x - center) and steering (add alpha x direction) of the feature "
                        "chosen on train prompts: reads directions and center, not ablate()/steer()"),
        "recon": ("decode(encode(x)) spliced into the model (loss recovered, explained variance)"
                  if art.reconstructs else "needs reconstructs = True and a decode() that inverts encode"),
        "stability": ("supervised directions are the concepts themselves at every layer" if supervised else
                      "matching of directions (and top-k co-activation) across adjacent layers; needs >= 2 layers"),
        "refusal": ("supervised" if supervised else "ablates the direction that best separates harmful from harmless "
                    "prompts (on a chat model that refuses)"),
    }
    needs_encode = set(METRIC_FAMILIES) - {"build"}
    out = []
    for fam in METRIC_FAMILIES:
        joins = _applies(spec, fam, suite) and not (fam == "causal" and supervised)
        text = why.get(fam, "")
        if joins and fam in needs_encode and not encode_ok:
            joins, text = False, broken
        out.append((fam, joins, text))
    size = _size_param(cls, name)
    out.append(("matching (@K)", size is not None,
                f"`{name}@K:match_to=ep` sets `{size}` to each target's K" if size is not None else
                "declare `size_param` (the config field that sets K) on the Method class to be built at another "
                "spec's K"))
    return out


# ---------------------------------------------------------------------------------------------------------
# The pytest entry point (bench/conftest.py collects this module: `pytest bench/ --method NAME -k contract`)


def test_plugin_contract(contract_spec, contract_reports, tmp_path):
    """The contract of one `--method` (a plugin): fails with the report when it is broken."""
    import pytest

    report = check_method(contract_spec, workdir=tmp_path)
    contract_reports.append((contract_spec, report))
    if not report.ok:
        pytest.fail(report.format(), pytrace=False)
