"""Benchmark suites: a declared grid of models x layers x method specs x metric families.

A suite module defines `SUITE = Suite(...)`; `get_suite(name)` finds `bench/suites/<name>.py`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

METRIC_FAMILIES = (
    "build", "retrieval", "detection", "probing", "ood", "causal", "recon", "cost", "correspondence", "stability",
    "refusal", "sparse_probing", "compositional", "ground_truth",
)
# Families computed once per (model, method spec) across all layers rather than per layer.
CROSS_LAYER_FAMILIES = ("stability",)
ALL_LAYERS = -1  # the layer of a cross-layer family's cell

# Short parameter aliases accepted in method strings such as "ep:p=2" or "sae:width=2048,k=32".
ALIASES = {"ep": {"p": "percentiles"}, "kmeans": {}}


def _parse_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


MATCH_KINDS = ("K", "tokens")


@dataclass
class MetricPair:
    """One headline quantity of the primary family: EP's metric (its representative and selection rule) against
    the baseline's metric under the same rule. `name` is what the report prints."""

    name: str
    metric: str  # EP's metric
    metric_b: str = ""  # the baseline's metric ("" = the same); the rule must be the same on both sides
    setting: str = ""  # a setting filter, e.g. "kl=0.1" for steering at matched collateral damage ("" = all)


def _default_primary_metrics() -> list[MetricPair]:
    return [
        MetricPair("detection AUROC, contrast rule, exemplar", "detection.auroc"),
        MetricPair("detection AUROC, contrast rule, region mean", "detection.auroc.region_mean", "detection.auroc"),
        MetricPair("detection AUROC, SAE-A rule, exemplar", "detection.auroc_best_latent"),
        MetricPair("detection AUROC, SAE-A rule, region mean", "detection.auroc_best_latent.region_mean",
                   "detection.auroc_best_latent"),
        MetricPair("retrieval precision@10", "retrieval.precision@10"),
        MetricPair("one-hot probe retention above the majority floor", "probing.onehot_retention_norm"),
        MetricPair("sparse probe accuracy, k = 1", "sparse_probing.acc@1"),
        MetricPair("causal ablation, logit-difference change", "causal.ablate.delta_logit_diff"),
        MetricPair("ablation at matched KL 0.1 nat", "causal.ablate.delta_at_kl", setting="kl=0.1"),
        MetricPair("steering at matched KL 0.1 nat", "causal.steer.delta_at_kl", setting="kl=0.1"),
    ]


@dataclass
class VerdictPlan:
    """What a suite's verdict compares, declared before any result is seen (bench.verdict reads it from run.json).

    Primary family: EP at each percentile against each baseline in `primary_baselines` built at that EP
    artefact's K (a `match="K"` spec), on each pair of `primary_metrics`, plus one row per (baseline, metric)
    pooled over EP's percentiles (per unit, the mean over p of the paired differences). Holm runs within the primary
    family; every other comparison is secondary, Holm within its own family, and labelled exploratory.
    """

    primary_baselines: list[str] = field(default_factory=lambda: ["sae@K", "kmeans@K"])  # matched spec labels
    primary_metrics: list[MetricPair] = field(default_factory=_default_primary_metrics)
    pool_over_p: bool = True  # add the pooled-over-percentiles row per (baseline, metric)
    k_tolerance: float = 0.10  # two dictionaries are at matched K at a layer when |K_b / K_a - 1| <= this
    alpha: float = 0.05  # family-wise error rate within each family (Holm)


@dataclass
class MethodSpec:
    """One method configuration of the grid. `label` names its cells; `params` override config defaults.

    Budget matching: `match="K"` builds one artefact per artefact of the specs named in `match_to` at the same
    layer, with its size parameter (k-means/random/PCA `k`, SAE `width`) set to that artefact's K; `match="tokens"`
    trains on exactly the tokens that artefact streamed (SAE). `match_p` keeps only EP targets at these
    percentiles. Matched artefacts are labelled `<label>(<target>)`, e.g. `kmeans@K(ep:p=4)`. `k_per_width` scales
    a matched SAE's TopK k with its width; `rows_as_target` fits a matched k-means on the rows its target streamed.
    `seeds`: fit once per seed (stochastic methods); rows carry the fit seed, verdicts average over seeds.
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    match: str = ""  # "", "K" or "tokens"
    match_to: list[str] = field(default_factory=list)  # spec labels whose artefacts set the budget
    match_p: list[float] = field(default_factory=list)  # EP percentiles to match (empty: every target)
    seeds: list[int] = field(default_factory=list)  # empty: the config's own seed only
    k_per_width: float | None = None  # match="K" SAEs: TopK k = clip(round(width x this), 1, params' k)
    rows_as_target: bool = False  # match="K": fit on as many store rows as the target streamed (`n_rows`)
    match_seeds: dict[float, list[int]] = field(default_factory=dict)  # EP target p -> its seeds (else `seeds`),
    # e.g. one seed where a fit at that p's K costs an hour on a CPU
    at_layers: dict[str, list[int]] = field(default_factory=dict)  # model -> the only layers this spec is built and
    # scored at (a model not named: none); empty: every layer of every model. E.g. one layer of a fit too costly
    # for all of them

    def layers_of(self, model: str, model_layers: list[int]) -> list[int]:
        """The layers of `model_layers` (a model's layers in the suite) this spec is built and scored at."""
        if not self.at_layers:
            return list(model_layers)
        return [L for L in model_layers if L in self.at_layers.get(model, [])]

    def __post_init__(self) -> None:
        self.label = self.label or (f"{self.method}@{self.match}" if self.match else self.method)
        if self.match and self.match not in MATCH_KINDS:
            raise ValueError(f"method spec {self.label!r}: match must be one of {MATCH_KINDS}, not {self.match!r}")
        if self.match and not self.match_to:
            raise ValueError(f"method spec {self.label!r}: match={self.match!r} needs match_to (spec labels)")

    # --- method strings (`epbench run --method ...`): parse and its inverse ----------------------------------
    # Keys of a method string that set MethodSpec fields, not method config parameters, and how each is read.
    SPEC_KEYS = ("match_to", "match_p", "seeds", "match_seeds", "k_per_width", "rows_as_target", "label",
                 "at_layers")

    @staticmethod
    def _single_string(key: str, value: str) -> bool:
        """Whether a value with `/` in it is one string, not a `/`-separated list: a path (`/x`, `./x`, `../x`,
        `~/x`, or any value of a key named `path` or ending in `_path` / `_dir`) or a `{layer}` template."""
        return (value.startswith(("/", "./", "../", "~")) or key == "path" or key.endswith(("_path", "_dir"))
                or "{" in value)

    @classmethod
    def _parse_item(cls, key: str, value: str) -> Any:
        """One `key=value` of a method string: a path or template stays a string, `a/b/c` is a list, else a scalar."""
        if "/" in value and not cls._single_string(key, value):
            return [_parse_value(x) for x in value.split("/")]
        return _parse_value(value)

    @classmethod
    def _spec_field(cls, text: str, key: str, value: str) -> Any:
        """The value of a spec-field key (`match_to=ep/sae`, `seeds=0/1/2`, `k_per_width=1/64`, ...)."""
        if key == "label":
            return value
        if key == "match_to":
            return value.split("/")  # spec labels, never numbers
        if key == "k_per_width":  # a fraction (1/64) or a number
            num, sep, den = value.partition("/")
            try:
                return float(num) / float(den) if sep else float(num)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"method spec {text!r}: k_per_width must be a number or a fraction such as 1/64, "
                                 f"not {value!r}") from None
        if key == "match_seeds":  # `1:0/2:0/1`: EP target p, then that target's seeds
            out: dict[float, list[int]] = {}
            for part in value.split("/"):
                p, _, seed = part.partition(":")
                try:
                    out.setdefault(float(p), []).append(int(seed))
                except ValueError:
                    raise ValueError(f"method spec {text!r}: match_seeds takes p:seed pairs separated by `/` (e.g. "
                                     f"match_seeds=1:0/2:0), not {value!r}") from None
            return out
        if key == "at_layers":  # `smollm2-135m:12/gemma-3-270m:9`: model, then one of its layers
            layers: dict[str, list[int]] = {}
            for part in value.split("/"):
                model, _, layer = part.rpartition(":")
                try:
                    layers.setdefault(model, []).append(int(layer))
                except ValueError:
                    model = ""
                if not model:
                    raise ValueError(f"method spec {text!r}: at_layers takes model:layer pairs separated by `/` (e.g. "
                                     f"at_layers=smollm2-135m:12), not {value!r}")
            return layers
        if key == "rows_as_target":
            v = _parse_value(value)
            if not isinstance(v, bool):
                raise ValueError(f"method spec {text!r}: rows_as_target must be true or false, not {value!r}")
            return v
        items = [_parse_value(x) for x in value.split("/")]
        want = int if key == "seeds" else (int, float)
        if not all(isinstance(x, want) and not isinstance(x, bool) for x in items):
            raise ValueError(f"method spec {text!r}: {key} takes numbers separated by `/` (e.g. {key}=1/2), "
                             f"not {value!r}")
        return items

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """A method string: `name` or `name:key=value,key=value`; a budget-matched spec `name@K:match_to=LABELS`
        (or `name@tokens:...`). See the README, "Method strings".

        - `/` separates list items (`ep:p=1/2/4`, `kmeans:k=16/64`), except in a value that looks like a path
          (starts with `/`, `./`, `../` or `~`, or its key is `path` or ends in `_path` / `_dir`) or holds a
          `{layer}` template: `sae:path=/x/y_L{layer}` is one string.
        - `@K` / `@tokens` after the name set `match`; the keys `match_to` (spec labels, `/`-separated),
          `match_p` (EP percentiles), `seeds`, `k_per_width` (a number or a fraction such as `1/64`),
          `rows_as_target` (true/false) and `label` set the MethodSpec fields of the same names, never config
          parameters. A matched spec is labelled `name@KIND` plus its config parameters (`kmeans@K`,
          `sae@K:lr=0.001`): the labels the suites give their matched specs and the verdict plan names
          (`sae@K`, `kmeans@K`); `label=` overrides it.
        """
        head, _, rest = text.partition(":")
        name, at, match = head.partition("@")
        if at and match not in MATCH_KINDS:
            raise ValueError(f"method spec {text!r}: `@{match}` is not a budget to match; write {name}@K "
                             f"(the target's K) or {name}@tokens (its streamed tokens), e.g. {name}@K:match_to=ep")
        if not name:
            raise ValueError(f"method spec {text!r}: no method name before `{':' if rest else '@'}`")
        params: dict[str, Any] = {}
        fields: dict[str, Any] = {}
        kept: list[str] = []  # the config items, as written: a matched spec's label
        for item in filter(None, rest.split(",")):
            if "=" not in item:
                raise ValueError(f"method spec {text!r}: expected key=value, got {item!r}")
            k, v = item.split("=", 1)
            if k == "match":
                raise ValueError(f"method spec {text!r}: the budget to match goes after the name: write "
                                 f"{name}@{v or 'K'}:match_to=... (e.g. {name}@K:match_to=ep)")
            if k in cls.SPEC_KEYS:
                fields[k] = cls._spec_field(text, k, v)
                continue
            k = ALIASES.get(name, {}).get(k, k)
            params[k] = cls._parse_item(k, v)
            kept.append(item)
        if name == "ep" and "percentiles" in params and not isinstance(params["percentiles"], list):
            params["percentiles"] = [params["percentiles"]]
        if match and not fields.get("match_to"):
            raise ValueError(f"method spec {text!r}: {name}@{match} copies another spec's budget: name it with "
                             f"match_to, e.g. {name}@{match}:match_to=ep (labels separated by `/`)")
        if not match and any(k in fields for k in ("match_to", "match_p", "match_seeds", "k_per_width",
                                                    "rows_as_target")):
            raise ValueError(f"method spec {text!r}: match_to / match_p / k_per_width / rows_as_target belong to a "
                             f"budget-matched spec: write {name}@K:... or {name}@tokens:...")
        label = fields.pop("label", None)
        if label is None:
            label = (f"{name}@{match}" + (":" + ",".join(kept) if kept else "")) if match else text
        return cls(name, params, label=label, match=match, **fields)

    def to_text(self) -> str:
        """This spec as a method string that `MethodSpec.parse` reads back into an equal spec."""
        def fmt(v: Any) -> str:
            if isinstance(v, (list, tuple)):
                return "/".join(fmt(x) for x in v)
            if v is None or isinstance(v, bool):
                return str(v).lower()
            return repr(v) if isinstance(v, float) else str(v)

        items = [f"{k}={fmt(v)}" for k, v in self.params.items()]
        if self.match_to:
            items.append(f"match_to={fmt(self.match_to)}")
        if self.match_p:
            items.append(f"match_p={fmt(self.match_p)}")
        if self.seeds:
            items.append(f"seeds={fmt(self.seeds)}")
        if self.match_seeds:
            items.append("match_seeds=" + "/".join(f"{float(p):g}:{seed}" for p, seeds in self.match_seeds.items()
                                                    for seed in seeds))
        if self.k_per_width is not None:
            items.append(f"k_per_width={fmt(float(self.k_per_width))}")
        if self.rows_as_target:
            items.append("rows_as_target=true")
        if self.at_layers:
            items.append("at_layers=" + "/".join(f"{m}:{L}" for m, layers in self.at_layers.items() for L in layers))
        head = f"{self.method}@{self.match}" if self.match else self.method
        text = head + (":" + ",".join(items) if items else "")
        if MethodSpec.parse(text).label != self.label:
            text += ("," if items else ":") + f"label={self.label}"
        if MethodSpec.parse(text) != self:
            raise ValueError(f"method spec {self.label!r} has no method string (a value holds `,`, `=` or `/` that "
                             f"a method string cannot carry): {text!r}")
        return text

    def key(self) -> str:
        ident: dict[str, Any] = {"method": self.method, "params": self.params}
        if self.match or self.seeds:  # keys of specs without them are unchanged (existing caches stay valid)
            ident.update(match=self.match, match_to=self.match_to, match_p=self.match_p, seeds=self.seeds)
        if self.k_per_width or self.rows_as_target:
            ident.update(k_per_width=self.k_per_width, rows_as_target=self.rows_as_target)
        if self.match_seeds:
            ident.update(match_seeds={str(float(k)): v for k, v in sorted(self.match_seeds.items())})
        blob = json.dumps(ident, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class Suite:
    """A benchmark grid and the data it is evaluated on."""

    name: str
    description: str
    models: list[str]
    layers: list[int]  # every model's layers, unless `model_layers` names the model
    methods: list[MethodSpec]
    metrics: list[str] = field(default_factory=lambda: list(METRIC_FAMILIES))
    corpus: str = "default"  # build stream
    store_tokens: int = 60_000  # activation rows the methods are built on (tokens, BOS included)
    store_dtype: str = "float32"  # storage dtype of the build store (float16 halves the disk of a large store)
    model_store_dtype: dict[str, str] = field(default_factory=dict)  # per-model store dtype, e.g. float32 for a
    # model whose residual stream exceeds float16's range (Gemma's reaches |x| ~ 6e4 and beyond); others: store_dtype
    ctx_len: int = 128
    concept_sets: list[str] = field(default_factory=lambda: ["wordnet", "bbc"])
    concept_examples: int = 20  # per concept and category and split (wordnet/bbc)
    concept_test_examples: int | None = None  # wordnet/bbc: exactly this many test examples per concept and
    # category (train up to as many) instead of concept_examples; 50 gives wordnet 40 concepts, bbc 5
    max_concepts: int | None = None
    # names in bench.prompts.PROMPT_SETS (e.g. country_capital, country_continent, country_demonym,
    # country_language) or user files PATH.jsonl (prompt, target, contrast per line)
    prompt_sets: list[str] = field(default_factory=lambda: ["capitals", "city_country", "city_continent"])
    max_prompts: int | None = None  # per causal set, a seeded sample of this many written prompts (None: all)
    ood_sets: list[str] = field(default_factory=lambda: ["random_tokens", "shuffled_words"])
    side_effect_texts: int = 16  # unrelated texts for KL side effects and loss recovered
    family_layers: dict[str, list[int]] = field(default_factory=dict)  # e.g. {"causal": [12]}: fewer layers for
    # the expensive model-in-the-loop families; every other family runs at every layer
    family_artefacts: dict[str, list[str]] = field(default_factory=dict)  # e.g. {"causal": ["ep:p=2", "sae"]}:
    # artefact labels (or spec labels) a family scores; a family not named here scores every artefact
    causal_alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # steering strengths (x mean norm)
    causal_ablation_scales: list[float] = field(default_factory=lambda: [1.0])  # ablation doses s (x the projection)
    causal_kl_targets: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0])  # nats: causal
    # effects are also read off each dose-response curve at these KLs on unrelated text (matched collateral damage)
    causal_unrelated_texts: int = 4  # unrelated texts the causal side effect (KL) is measured on
    seed: int = 0
    evidence: str = ""  # what level of evidence the suite gives (printed at the top of its report)
    device: str | None = None
    needs_hub: bool = False  # weights come from the Hugging Face hub: fail fast offline
    verdicts: VerdictPlan = field(default_factory=VerdictPlan)  # the primary family and matching tolerance
    model_layers: dict[str, list[int]] = field(default_factory=dict)  # per-model layers (e.g. the same relative
    # depths of models with other layer counts); a model not named here uses `layers`

    def __post_init__(self) -> None:
        labels = {m.label for m in self.methods}
        for m in self.methods:
            missing = [t for t in m.match_to if t not in labels]
            if missing:
                raise ValueError(f"suite {self.name}: method spec {m.label!r} has match_to {missing!r} not in the suite "
                                 f"(methods: {sorted(labels)}); add them, e.g. --method {' '.join(missing)} {m.label}")
        unknown = sorted(set(self.metrics) - set(METRIC_FAMILIES))
        if unknown:
            raise ValueError(f"suite {self.name}: unknown metric families {unknown}; valid: {list(METRIC_FAMILIES)}")

    def layers_for(self, model: str) -> list[int]:
        """The layers a model is read at."""
        return list(self.model_layers.get(model, self.layers))

    def store_dtype_for(self, model: str) -> str:
        """The dtype a model's build store is written in."""
        return self.model_store_dtype.get(model, self.store_dtype)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for m in out["methods"]:  # written only when set, so a run recorded before the field existed resumes
            if not m["at_layers"]:
                del m["at_layers"]
        return out

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]


def sae_spec(suite: Suite) -> MethodSpec | None:
    """The SAE that EP's correspondence, cost and ground-truth cells compare with: the spec labelled `sae`, else
    the first SAE spec not matched to another's budget, else the first SAE spec."""
    saes = sorted((s for s in suite.methods if s.method == "sae"), key=lambda s: (s.label != "sae", bool(s.match)))
    return saes[0] if saes else None


def available_suites() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def get_suite(name: str) -> Suite:
    """Load `bench/suites/<name>.py`'s SUITE."""
    if name not in available_suites():
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(available_suites())}")
    return import_module(f"bench.suites.{name}").SUITE
