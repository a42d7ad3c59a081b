"""Plots of a run: each metric by method and layer, quality vs cost, K vs p, stability, correspondence."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.report.common import MAIN_METRIC, TOKENS, _safe, cell_of, families_in, ordered_methods, setting_of
from bench.report.published import Published
from bench.report.tables import on_concept_set

# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------
def _plt():
    """pyplot on the Agg backend with the seaborn theme (imported lazily: slow, and only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def _save(fig, path: Path) -> None:
    """Lay out, write and close a figure (every plot of the report the same way)."""
    import matplotlib.pyplot as plt

    from bench.cache import atomic_path

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a full disk keeps the previous plot whole; the error names `path`
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def _cells_by(d: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One pooled Cell per group of `keys` as columns value / lo / hi / k."""
    recs = []
    for k, rows in d.groupby(keys, sort=False):
        c = cell_of(rows)
        recs.append({**dict(zip(keys, k if isinstance(k, tuple) else (k,))), "value": c.value, "lo": c.lo,
                     "hi": c.hi, "k": c.k})
    return pd.DataFrame(recs)


def plot_metric_bars(df: pd.DataFrame, metric: str, path: Path) -> None:
    """Bars of one metric by method (x) and layer (hue), a panel per model, with CI error bars."""
    plt, sns = _plt()
    d = df[df["metric"] == metric]
    models = sorted(d["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.0, 1.1 * d["method"].nunique() + 2.5) * len(models), 3.8),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        dm = d[d["model"] == model]
        methods = ordered_methods(dm)
        layers = sorted(dm["layer"].unique())
        cells = _cells_by(dm, ["method", "layer"]).set_index(["method", "layer"])
        width = 0.8 / len(layers)
        colors = sns.color_palette("deep", len(layers))
        for j, layer in enumerate(layers):
            xs, ys = [], []
            for i, (m, _) in enumerate(methods):
                if (m, layer) not in cells.index:
                    continue
                c = cells.loc[(m, layer)]
                if not np.isfinite(c["value"]):  # NaN / inf: no bar (the table shows the value)
                    continue
                x = i - 0.4 + width * (j + 0.5)
                xs.append(x)
                ys.append(c["value"])
                if np.isfinite(c["lo"]) and np.isfinite(c["hi"]):
                    ax.errorbar(x, c["value"], yerr=[[max(c["value"] - c["lo"], 0)], [max(c["hi"] - c["value"], 0)]],
                                color="black", lw=1, capsize=2)
            ax.bar(xs, ys, width=width * 0.95, color=colors[j], label=f"L{layer}")
        ax.set_xticks(range(len(methods)), [disp for _, disp in methods], rotation=30, ha="right")
        vals = cells["value"].to_numpy(float)
        vals = vals[np.isfinite(vals)]
        if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 30:  # counts spanning decades
            ax.set_yscale("log")
        ax.set_title(model)
        ax.set_ylabel(metric)
        ax.legend(title="layer", fontsize=7)
    fig.suptitle(f"{metric} (95% CI; * bars without CI pool several settings)", fontsize=9)
    _save(fig, path)


def plot_pareto(df: pd.DataFrame, path: Path) -> str | None:
    """Quality (detection AUROC, else retrieval p@10) vs build tokens (log x), frontier drawn; None if no data."""
    quality = next((m for m in ("detection.auroc", "retrieval.precision@10") if (df["metric"] == m).any()), None)
    if quality is None:
        return None
    q = _cells_by(df[df["metric"] == quality], ["model", "layer", "method", "display"])
    tok = df[df["metric"].isin(TOKENS)]
    tok = tok[tok["metric"] == next(m for m in TOKENS if (tok["metric"] == m).any())] if len(tok) else tok
    if q.empty or tok.empty:
        return None
    t = tok.groupby(["model", "layer", "method"])["value"].mean().rename("tokens").reset_index()
    pts = q.merge(t, on=["model", "layer", "method"])
    pts = pts[pts["tokens"] > 0]
    if pts.empty:
        return None
    plt, _sns = _plt()
    models = sorted(pts["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(6.0 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        pm = pts[pts["model"] == model].sort_values("tokens")
        for _, r in pm.iterrows():
            ok = np.isfinite(r["lo"]) and np.isfinite(r["hi"])
            ax.errorbar(r["tokens"], r["value"], yerr=[[r["value"] - r["lo"]], [r["hi"] - r["value"]]] if ok else None,
                        fmt="o", ms=5, capsize=2)
            ax.annotate(f"{r['display']} L{r['layer']}", (r["tokens"], r["value"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        best, fx, fy = -math.inf, [], []
        for _, r in pm.iterrows():  # cheapest first: a point is on the frontier if it beats all cheaper ones
            if r["value"] > best:
                best = r["value"]
                fx.append(r["tokens"])
                fy.append(r["value"])
        ax.step(fx, fy, where="post", color="grey", lw=1, ls="--", label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel("build tokens (log; pretrained SAEs: loading only)")
        ax.set_ylabel(quality)
        ax.set_title(model)
        ax.legend(fontsize=7)
    _save(fig, path)
    return quality


def plot_k_vs_p(df: pd.DataFrame, published: list[Published], path: Path) -> bool:
    """EP K vs p per (model, layer), with published K (hollow, dashed) where the same model and layer were run."""
    d = df[(df["method_family"] == "ep") & (df["metric"] == "build.K") & df["p"].notna()]
    if d.empty:
        return False
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for i, ((model, mkey, layer), g) in enumerate(d.groupby(["model", "model_key", "layer"])):
        g = g.groupby("p")["value"].mean().sort_index()
        color = sns.color_palette("deep")[i % 10]
        ax.plot(g.index, g.values, "o-", color=color, label=f"ours {model} L{layer}")
        pub = sorted((e.p, e.value) for e in published if e.table == "ep_size" and e.metric == "build.K"
                     and e.model == mkey and e.layer == layer and e.p is not None and e.value is not None)
        if pub:
            ax.plot([x for x, _ in pub], [y for _, y in pub], "o--", mfc="none", color=color,
                    label=f"published {model} L{layer}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ps = sorted(set(d["p"]) | {e.p for e in published if e.table == "ep_size" and e.p is not None
                               and (e.model, e.layer) in set(zip(d["model_key"], d["layer"]))})
    ax.set_xticks(ps, [f"{x:g}" for x in ps])
    ax.minorticks_off()
    ax.set_xlabel("percentile p")
    ax.set_ylabel("K (regions)")
    ax.set_title("EP dictionary size vs p")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def _pair_order(pair: str) -> tuple:
    nums = [int(x) for x in re.findall(r"\d+", pair)]
    return (len(nums) == 0, nums, pair)


def plot_stability(df: pd.DataFrame, path: Path) -> bool:
    """Each stability metric vs the pair it compares (layer pairs, seed pairs), a line per method."""
    d = df[df["family"] == "stability"]
    if d.empty:
        return False
    d = d.assign(pair=d["detail"].map(setting_of).replace("", "(unnamed)"))
    metrics = sorted(d["metric"].unique())
    plt, _sns = _plt()
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        dm = d[d["metric"] == metric]
        pairs = sorted(dm["pair"].unique(), key=_pair_order)
        for model in sorted(dm["model"].unique()):
            for method, disp in ordered_methods(dm[dm["model"] == model]):
                c = _cells_by(dm[(dm["model"] == model) & (dm["method"] == method)], ["pair"]).set_index("pair")
                xs = [i for i, p in enumerate(pairs) if p in c.index]
                ys = [c.loc[pairs[i], "value"] for i in xs]
                lab = disp if dm["model"].nunique() == 1 else f"{model} {disp}"
                ax.plot(xs, ys, "o-", label=lab)
        ax.set_xticks(range(len(pairs)), pairs, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    _save(fig, path)
    return True


def plot_correspondence(df: pd.DataFrame, run_dir: Path, path: Path) -> str | None:
    """Histogram of per-region best F1 from extras/correspondence_*.npy, else bars of the F1 > 0.5 share."""
    files = sorted((run_dir / "extras").glob("correspondence_*.npy"))
    plt, _sns = _plt()
    if files:
        fig, ax = plt.subplots(figsize=(6.0, 4.0))
        for f in files:
            v = np.load(f, allow_pickle=False).astype(float).ravel()
            v = v[np.isfinite(v)]
            share = float((v > 0.5).mean()) if len(v) else float("nan")
            ax.hist(v, bins=np.linspace(0, 1, 21), histtype="step", lw=1.5,
                    label=f"{f.stem.removeprefix('correspondence_')} (n={len(v)}, F1>0.5: {share:.1%})")
        ax.axvline(0.5, color="grey", ls="--", lw=1)
        ax.set_xlabel("best-match F1 per region")
        ax.set_ylabel("regions")
        ax.set_title("EP-SAE correspondence")
        ax.legend(fontsize=7)
        _save(fig, path)
        return "histogram"
    if (df["metric"] == "correspondence.share_f1>0.5").any():
        plot_metric_bars(df, "correspondence.share_f1>0.5", path)
        return "share"
    return None


def plot_sae_curves(cells: list[dict[str, Any]], path: Path) -> bool:
    """Each trained SAE's training curve (from the run's build cells). Top row: the SAE spec(s) trained to
    convergence, every seed (colour: layer, line style: seed) on held-out EV, L0, dead and dense fractions. Bottom row,
    when the run has budget-matched SAEs (`sae@K(...)`, `sae@tokens(...)`): their held-out EV, one panel per layer."""
    from bench.verdict import EV_FLOOR

    main: dict[tuple[str, int, int], dict] = {}  # (name, layer, seed) -> curve, SAEs trained to convergence
    matched: dict[tuple[str, int, int], dict] = {}  # the same for budget-matched SAEs (their record names a target)
    for c in cells:
        for a in c.get("artefacts", []):
            if a.get("training_curve") and a["training_curve"].get("rows"):
                key = (a["name"], int(c["cell"]["layer"]), a.get("seed") or 0)
                (matched if a.get("matched_to") else main)[key] = a["training_curve"]
    if not main and not matched:
        return False
    plt, _sns = _plt()
    layers = sorted({k[1] for k in [*main, *matched]})
    panels = [("heldout_explained_variance", "held-out explained variance"), ("l0", "L0 (held-out)"),
              ("dead_fraction", "dead latent fraction"), ("dense_fraction", "dense latent fraction")]
    ncols = max(len(panels), len(layers) if matched else 0)
    nrows = int(bool(main)) + int(bool(matched))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    colours = {L: f"C{i}" for i, L in enumerate(layers)}
    styles = ["-", "--", ":", "-."]

    def finish(ax: Any, title: str, ev: bool) -> None:
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training rows", fontsize=8)
        ax.set_xscale("log")
        if ev:
            ax.axhline(EV_FLOOR, color="red", ls="--", lw=0.8)

    row = 0
    if main:
        for ax, (key, title) in zip(axes[row], panels):
            for (name, L, seed), cv in sorted(main.items()):
                if key in cv:
                    ax.plot(cv["rows"], cv[key], color=colours[L], ls=styles[seed % len(styles)], lw=1,
                            label=f"{name} L{L} seed {seed}")
            finish(ax, title, key == "heldout_explained_variance")
        axes[row][len(panels) - 1].legend(fontsize=5, loc="best")
        row += 1
    if matched:
        for ax, L in zip(axes[row], layers):
            names: list[str] = []  # colour per target; the legend names each once
            for (name, layer, seed), cv in sorted(matched.items()):
                if layer == L and "heldout_explained_variance" in cv:
                    first = name not in names
                    names += [name] if first else []
                    ax.plot(cv["rows"], cv["heldout_explained_variance"], color=f"C{names.index(name) % 10}",
                            ls=styles[seed % len(styles)], lw=1, label=name if first else None)
            finish(ax, f"budget-matched SAEs, L{L}: held-out EV", True)
            ax.legend(fontsize=5, loc="best")
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)  # the unused panels of the shorter row
    _save(fig, path)
    return True


def make_plots(df: pd.DataFrame, run_dir: Path, published: list[Published], concept_set: str | None,
               cells: list[dict[str, Any]]) -> dict[str, str]:
    """Write every plot under run_dir/plots; returns {name: path relative to run_dir}. `cells`: the run's cell
    records (for the SAE training curves).

    Concept-family plots show `concept_set` only (one measured value with its CI per bar)."""
    df = on_concept_set(df, concept_set)
    pdir = run_dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for fam in families_in(df):
        metrics = sorted(df.loc[df["family"] == fam, "metric"].unique())
        main = MAIN_METRIC.get(fam) if MAIN_METRIC.get(fam) in metrics else metrics[0]
        name = f"family_{_safe(fam)}.png"
        plot_metric_bars(df, main, pdir / name)
        out[f"family:{fam}"] = f"plots/{name}"
    if plot_pareto(df, pdir / "pareto.png"):
        out["pareto"] = "plots/pareto.png"
    if plot_k_vs_p(df, published, pdir / "ep_k_vs_p.png"):
        out["k_vs_p"] = "plots/ep_k_vs_p.png"
    if plot_stability(df, pdir / "stability.png"):
        out["stability"] = "plots/stability.png"
    if plot_correspondence(df, run_dir, pdir / "correspondence.png"):
        out["correspondence"] = "plots/correspondence.png"
    if plot_sae_curves(cells, pdir / "sae_training.png"):
        out["sae_curves"] = "plots/sae_training.png"
    return out


def curve_points(units: pd.DataFrame, arts: pd.DataFrame, metric: str, n_boot: int = 400, seed: int = 0
                 ) -> pd.DataFrame:
    """Per (model, layer, method): K, the mean over independent clusters of the seed-averaged per-unit values of
    `metric`, and a 95% bootstrap interval over clusters (the same clusters the verdicts use)."""
    u = units[units["metric"] == metric]
    if u.empty or arts.empty:
        return pd.DataFrame()
    v = u.groupby(["model", "layer", "method", "setting", "unit", "cluster"], as_index=False)["value"].mean()
    v["base"] = v["setting"].str.split(";").str[0].str.strip()
    c = v.groupby(["model", "layer", "method", "base", "cluster"], as_index=False)["value"].mean()
    rng = np.random.default_rng(seed)
    recs = []
    sizes = arts.groupby(["model", "layer", "method"])[["K", "family"]].first()
    for (model, layer, method), g in c.groupby(["model", "layer", "method"]):
        if (model, layer, method) not in sizes.index:
            continue
        x = g["value"].to_numpy()
        boot = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1) if len(x) > 1 else x
        K, family = sizes.loc[(model, layer, method)]
        recs.append({"model": model, "layer": int(layer), "method": method, "family": family, "K": int(K),
                     "value": float(x.mean()), "lo": float(np.quantile(boot, 0.025)),
                     "hi": float(np.quantile(boot, 0.975)), "n": len(x)})
    return pd.DataFrame(recs)


def curve_line(method: str, family: str) -> str:
    """Which line of a metric-vs-K plot a dictionary belongs to: EP by p, each matched spec (e.g. `sae@K`) as one
    curve over its targets, every other artefact its own point."""
    if family == "ep":
        return "EP (p sweep)"
    return method.split("(")[0] if "(" in method else method


def plot_metric_vs_k(points: pd.DataFrame, metric: str, path: Path) -> bool:
    """One panel per (model, layer): the metric against dictionary size K (log x), one line per method, with
    95% intervals over clusters; unmatched single artefacts are points."""
    if points.empty:
        return False
    plt, sns = _plt()
    panels = list(points.groupby(["model", "layer"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    points = points.assign(line=[curve_line(m, f) for m, f in zip(points["method"], points["family"])])
    lines = sorted(points["line"].unique(), key=lambda s: (not s.startswith("EP"), s))
    colours = dict(zip(lines, sns.color_palette("tab10", len(lines))))
    for ax, (model, layer) in zip(axes[0], panels):
        p = points[(points["model"] == model) & (points["layer"] == layer)]
        for line, g in p.groupby("line"):
            g = g.sort_values("K")
            style = "-o" if len(g) > 1 else "s"
            ax.errorbar(g["K"], g["value"], yerr=[g["value"] - g["lo"], g["hi"] - g["value"]], fmt=style,
                        ms=4, capsize=2, lw=1.2, color=colours[line], label=line)
        ax.set_xscale("log")
        ax.set_xlabel("dictionary size K (log)")
        ax.set_title(f"{model} L{layer}")
    axes[0][0].set_ylabel(metric)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.28)
    from bench.cache import atomic_path

    try:
        with atomic_path(path) as tmp:  # a full disk keeps the previous plot whole; the error names `path`
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return True
