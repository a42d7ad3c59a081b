"""Published figures (bench/data/published.yaml) and the paper tables that print ours beside them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.common import (
    MISSING, TOKENS, cell_of, first_metric, md_table, method_sort_key, normalise_model, setting_of,
)

PUBLISHED_PATH = Path(__file__).parents[1] / "data" / "published.yaml"
PUBLISHED_KEYS = ("table", "model", "layer", "p", "method", "metric", "value", "approx", "source", "note")
PUBLISHED_OPTIONAL = ("setting",)  # keys an entry may add

# --------------------------------------------------------------------------------------------------------
# Published figures
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """One published figure and the setting it was measured in (see the schema in published.yaml)."""

    table: str  # paper table id (ep_size, detection, correspondence, probing, cost, ood, refusal)
    model: str
    layer: int | None  # None: the source does not state it
    p: float | None  # EP percentile; None: not tied to one p, or not stated
    method: str | None  # method family; None: a model-level figure
    metric: str  # epbench metric name it corresponds to
    value: float | None  # None: a qualitative claim
    approx: bool  # the source says "about"
    source: str
    note: str
    setting: str | None = None  # our row's setting (concept set...) must contain this, case-insensitively

    def matches(self, model: str, layer: int, family: str, p: float | None, setting: str = "") -> bool:
        """Whether our row's setting is the one this figure was measured in (None fields match anything)."""
        return (self.model == model and (self.layer is None or self.layer == layer)
                and (self.method is None or self.method == family)
                and (self.p is None or (p is not None and math.isclose(self.p, p)))
                and (self.setting is None or self.setting.lower() in setting.lower()))

    def loose(self, p: float | None) -> str:
        """Which parts of our setting the source leaves open: '' when the match is exact."""
        open_ = (["any L"] if self.layer is None else []) + (["any p"] if self.p is None and p is not None else [])
        return ", ".join(open_)


def load_published(path: Path = PUBLISHED_PATH) -> list[Published]:
    """The published figures of bench/data/published.yaml, validated."""
    import yaml

    if not Path(path).exists():
        raise FileNotFoundError(f"published figures not found at {path}; "
                                "reinstall epbench (bench/data is package data)")
    doc = yaml.safe_load(Path(path).read_text())
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a mapping with an `entries` list")
    out = []
    for i, e in enumerate(entries):
        keys = set(e) if isinstance(e, dict) else set()
        if not set(PUBLISHED_KEYS) <= keys <= set(PUBLISHED_KEYS) | set(PUBLISHED_OPTIONAL):
            raise ValueError(f"{path}: entry {i} has keys {sorted(keys)}; every entry needs {list(PUBLISHED_KEYS)} "
                             f"and may add {list(PUBLISHED_OPTIONAL)}")
        out.append(Published(
            table=str(e["table"]), model=normalise_model(e["model"]),
            layer=None if e["layer"] is None else int(e["layer"]), p=None if e["p"] is None else float(e["p"]),
            method=None if e["method"] is None else str(e["method"]), metric=str(e["metric"]),
            value=None if e["value"] is None else float(e["value"]), approx=bool(e["approx"]),
            source=str(e["source"]), note=str(e["note"]),
            setting=None if e.get("setting") is None else str(e["setting"])))
    return out


# --------------------------------------------------------------------------------------------------------
# Paper tables
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperTable:
    """A paper comparison: which of our metrics it shows, and how our rows are split."""

    id: str  # matches Published.table
    title: str
    quantities: tuple[tuple[str, tuple[str, ...]], ...]  # (column label, metric names: first present wins)
    families: tuple[str, ...] | None = None  # our method families it shows; None: all
    by_setting: bool = False  # one row per setting (first `;` segment of detail: concept set, OOD set)
    intro: str = ""


PAPER_TABLES = (
    PaperTable("ep_size", "Dictionary size K and tokens streamed vs p",
               (("K", ("build.K",)), ("tokens", TOKENS), ("theta", ("build.theta",)),
                ("‖c‖", ("build.center_norm",))),
               families=("ep",),
               intro="Published builds: Pile, context 128, batches of 128 prompts, seed 0, sat_window 1; K and tokens "
                     "depend on the corpus and batch geometry, so check this run's config before comparing."),
    PaperTable("detection", "AxBench latent concept detection (mean AUROC)",
               (("AUROC", ("detection.auroc",)), ("best-latent AUROC", ("detection.auroc_best_latent",))),
               by_setting=True,
               intro="Published: 500 AxBench concepts on gemma-2-2b-it L20; EP p1 uses the region chosen on train "
                     "(supervised choice), SAE the Gemma Scope feature labelled with the concept, SAE-A the latent "
                     "with the best train AUROC. Our SAE `AUROC` uses the same train-split selection rule as EP, not a "
                     "concept label; `best-latent AUROC` is the SAE-A protocol. The `set` column names our concept "
                     "set: AxBench figures sit beside our AxBench rows only."),
    PaperTable("correspondence", "EP-SAE feature correspondence (share of features with best F1 > 0.5)",
               (("share F1>0.5", ("correspondence.share_f1>0.5",)), ("mean best F1", ("correspondence.mean_best_f1",)),
                ("reverse share", ("correspondence.reverse_share_f1>0.5",))),
               by_setting=True, intro="Published: EP regions vs Gemma Scope 16k features at gemma-2-2b L12."),
    PaperTable("probing", "One-hot probe retention (binary-readout probe accuracy / raw-activation probe accuracy)",
               (("retention", ("probing.onehot_retention",)), ("acc one-hot", ("probing.acc_readout",)),
                ("acc raw", ("probing.acc_raw",))), by_setting=True),
    PaperTable("cost", "Compute: SAE training tokens over EP build tokens",
               (("token ratio", ("cost.token_ratio_sae_over_ep",)), ("FLOP ratio", ("cost.flop_ratio_sae_over_ep",)),
                ("EP tokens", TOKENS), ("SAE training tokens", ("cost.sae_training_tokens",))), families=("ep",),
               intro="A token ratio, not a FLOP count; our FLOP ratio estimates SAE FLOPs unless they were published "
                     "(see the cost rows' detail)."),
    PaperTable("ood", "Out-of-distribution signal (distance to the nearest dictionary element)",
               (("OOD AUROC", ("ood.auroc",)), ("within-theta rate", ("ood.within_theta_rate",))), by_setting=True),
    PaperTable("refusal", "Refusal (gemma-2-2b-it L20)",
               (("baseline refusal", ("causal.refusal.baseline_rate",)),
                ("top-region ablation", ("causal.refusal.ablate_top_region",)))),
)


def fmt_published(e: Published, loose: str = "") -> str:
    """A published value as the source gives it: `~` when approximate, `qualitative` when not a number."""
    if e.value is None:
        s = "qualitative"
    else:
        v = e.value
        s = f"{v:.1e}".replace("e+0", "e") if abs(v) >= 1e6 and e.approx else (
            f"{int(v):,}" if v == int(v) and abs(v) >= 10 else f"{v:g}")
        s = ("~" if e.approx else "") + s
    return s + (f" ({loose})" if loose else "")


def _who(e: Published) -> str:
    """The method family a published figure describes (`model` for model-level figures)."""
    return e.method or "model"


def _fmt_opt(v: float | None) -> str:
    return MISSING if v is None else (f"{int(v)}" if float(v).is_integer() else f"{v:g}")


def paper_table_md(df: pd.DataFrame, spec: PaperTable, published: list[Published]) -> list[str]:
    """One paper table: matched settings (ours | published), ours alone, and published figures not run here."""
    pubs = [e for e in published if e.table == spec.id]
    names = {m for _, ms in spec.quantities for m in ms}
    d = df[df["metric"].isin(names)]
    if spec.families is not None:
        d = d[d["method_family"].isin(spec.families)]
    d = d.assign(setting=d["detail"].map(setting_of) if spec.by_setting else "")
    out = [f"### {spec.title}", ""] + ([spec.intro, ""] if spec.intro else [])
    groups = []  # (model, layer, method, setting, rows, matched published)
    for (model, layer, method, setting), rows in d.groupby(["model", "layer", "method", "setting"], sort=False):
        fam, p = rows["method_family"].iloc[0], float(rows["p"].iloc[0])
        p_ = p if np.isfinite(p) else None
        # qualitative claims are listed with the published figures, never set beside a number of ours
        matched = [e for e in pubs
                   if e.value is not None and e.matches(rows["model_key"].iloc[0], int(layer), fam, p_, setting)]
        groups.append((model, int(layer), method, setting, rows, matched, p_))
    groups.sort(key=lambda g: (g[0], g[1], method_sort_key(g[4]["method_family"].iloc[0],
                                                            g[6] if g[6] is not None else math.nan, g[2]), g[3]))
    used = {id(e) for g in groups for e in g[5]}
    set_col = ["set"] if spec.by_setting else []

    def ours_cells(rows: pd.DataFrame, qs) -> list[str]:
        return [(c.fmt() if (c := cell_of(first_metric(rows, ms))) else MISSING) for _, ms in qs]

    matched = [g for g in groups if g[5]]
    if matched:
        body = []
        for model, layer, method, setting, rows, es, p in matched:
            for lbl, ms in spec.quantities:
                c = cell_of(first_metric(rows, ms))
                pe = [e for e in es if e.metric in ms]
                if c is None and not pe:
                    continue
                body.append([model, str(layer), rows["display"].iloc[0], *([setting] if spec.by_setting else []), lbl,
                             c.fmt() if c else MISSING, fmt_published(pe[0], pe[0].loose(p)) if pe else MISSING])
        head = ["model", "L", "method", *set_col, "quantity", "ours", "published"]
        out += ["**ours beside published (same model, layer, p, method family and named concept set)**", "",
                md_table(head, body, right=(1, len(head) - 2, len(head) - 1)), ""]
        label = {m: lbl for lbl, ms in spec.quantities for m in ms}
        notes = sorted({(label.get(e.metric, e.metric), _who(e), e.note) for g in matched for e in g[5]})
        sources = sorted({e.source for g in matched for e in g[5]})
        out += [f"- published {q} ({w}): {n}" for q, w, n in notes] + [f"- published source: {'; '.join(sources)}", ""]
    for model in sorted({g[0] for g in groups if not g[5]}):
        alone = [g for g in groups if not g[5] and g[0] == model]
        qs = [(lbl, ms) for lbl, ms in spec.quantities if any(g[4]["metric"].isin(ms).any() for g in alone)]
        body = [[str(layer), rows["display"].iloc[0], *([setting] if spec.by_setting else []), *ours_cells(rows, qs)]
                for _, layer, _, setting, rows, _, _ in alone]
        head = ["L", "method", *set_col, *[f"{lbl} (ours)" for lbl, _ in qs]]
        out += [f"**ours ({model}, no published counterpart)**", "",
                md_table(head, body, right=[0, *range(2 + len(set_col), len(head))]), ""]
    rest = [e for e in pubs if id(e) not in used]
    if rest:
        label = {m: lbl for lbl, ms in spec.quantities for m in ms}
        body = [[e.model, _fmt_opt(e.layer), _fmt_opt(e.p), e.method or "(model)", label.get(e.metric, e.metric),
                 fmt_published(e)] for e in rest]
        sources = sorted({e.source for e in rest})
        out += [(f"**published ({'; '.join(sources)}), not run here**: listed for reference, not our results "
                f"({MISSING} = not stated in the source)"), "",
                md_table(["model", "L", "p", "method", "quantity", "published"], body, right=(1, 2, 5)), ""]
        notes = sorted({(label.get(e.metric, e.metric), _who(e), e.note) for e in rest})
        out += [f"- {q} ({w}): {n}" for q, w, n in notes] + [""]
    if not groups and not pubs:
        out += ["(no rows)", ""]
    return out


def paper_md(df: pd.DataFrame, published: list[Published], plots: dict[str, str]) -> list[str]:
    """All paper tables, each after a note on how published figures are matched."""
    out = ["## Paper tables", "",
           ("Published figures come from bench/data/published.yaml. They sit beside ours only where model, layer, "
           "p (EP), method family and, where the source names one, the concept set match the published setting; "
           "`(any L)` / `(any p)` after a published value "
           "means the source does not state that part of its setting, so only the stated parts were matched. "
           "Everywhere else our values stand alone and the published figures are listed separately: a published "
           "number never stands in for ours."), ""]
    for spec in PAPER_TABLES:
        out += paper_table_md(df, spec, published)
        if spec.id == "ep_size" and "k_vs_p" in plots:
            out += [f"![EP dictionary size K vs p]({plots['k_vs_p']})", ""]
        if spec.id == "correspondence" and "correspondence" in plots:
            out += [f"![EP-SAE correspondence]({plots['correspondence']})", ""]
    return out
