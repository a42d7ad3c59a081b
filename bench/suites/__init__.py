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
    "refusal",
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
class MethodSpec:
    """One method configuration of the grid. `label` names its cells; `params` override config defaults.

    Budget matching: `match="K"` builds one artefact per artefact of the specs named in `match_to` at the same
    layer, with its size parameter (k-means/random/PCA `k`, SAE `width`) set to that artefact's K; `match="tokens"`
    trains on exactly the tokens that artefact streamed (SAE). `match_p` keeps only EP targets at these
    percentiles. Matched artefacts are labelled `<label>(<target>)`, e.g. `kmeans@K(ep:p=4)`.
    `seeds`: fit once per seed (stochastic methods); rows carry the fit seed, verdicts average over seeds.
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    match: str = ""  # "", "K" or "tokens"
    match_to: list[str] = field(default_factory=list)  # spec labels whose artefacts set the budget
    match_p: list[float] = field(default_factory=list)  # EP percentiles to match (empty: every target)
    seeds: list[int] = field(default_factory=list)  # empty: the config's own seed only

    def __post_init__(self) -> None:
        self.label = self.label or (f"{self.method}@{self.match}" if self.match else self.method)
        if self.match and self.match not in MATCH_KINDS:
            raise ValueError(f"method spec {self.label!r}: match must be one of {MATCH_KINDS}, not {self.match!r}")
        if self.match and not self.match_to:
            raise ValueError(f"method spec {self.label!r}: match={self.match!r} needs match_to (spec labels)")

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """`name` or `name:key=value,key=value` (list values with `/`: `ep:p=1/2/4`)."""
        name, _, rest = text.partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            if "=" not in item:
                raise ValueError(f"method spec {text!r}: expected key=value, got {item!r}")
            k, v = item.split("=", 1)
            k = ALIASES.get(name, {}).get(k, k)
            params[k] = [_parse_value(x) for x in v.split("/")] if "/" in v else _parse_value(v)
        if name == "ep" and "percentiles" in params and not isinstance(params["percentiles"], list):
            params["percentiles"] = [params["percentiles"]]
        return cls(name, params, label=text)

    def key(self) -> str:
        ident: dict[str, Any] = {"method": self.method, "params": self.params}
        if self.match or self.seeds:  # keys of specs without them are unchanged (existing caches stay valid)
            ident.update(match=self.match, match_to=self.match_to, match_p=self.match_p, seeds=self.seeds)
        blob = json.dumps(ident, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class Suite:
    """A benchmark grid and the data it is evaluated on."""

    name: str
    description: str
    models: list[str]
    layers: list[int]
    methods: list[MethodSpec]
    metrics: list[str] = field(default_factory=lambda: list(METRIC_FAMILIES))
    corpus: str = "default"  # build stream
    store_tokens: int = 60_000  # activation rows the methods are built on (tokens, BOS included)
    store_dtype: str = "float32"  # storage dtype of the build store (float16 halves the disk of a large store)
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
    causal_unrelated_texts: int = 4  # unrelated texts the causal side effect (KL) is measured on
    seed: int = 0
    evidence: str = ""  # what level of evidence the suite gives (printed at the top of its report)
    device: str | None = None
    needs_hub: bool = False  # weights come from the Hugging Face hub: fail fast offline

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]


def available_suites() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def get_suite(name: str) -> Suite:
    """Load `bench/suites/<name>.py`'s SUITE."""
    if name not in available_suites():
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(available_suites())}")
    return import_module(f"bench.suites.{name}").SUITE
