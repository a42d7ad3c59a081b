"""Causal-intervention effect: does ablating / steering along a dictionary feature move the model's answer?

Protocol, on a causal prompt set (bench.prompts: prompt, target, contrast, attribute), at hook
`blocks.{L}.hook_resid_post`:

1. Feature selection (train half of a seeded split stratified by attribute). Run the model to layer L on the
   train prompts and encode the residual at the last prompt position. For each attribute a (the answer value,
   e.g. "Europe"), pick the feature with the largest mean activation on prompts of a minus the mean on the
   other train prompts (one matrix product over all K; readout as `metrics.feature_selection.default_readout`:
   EP's dense cosine, other methods their default). An attribute needs at least one train prompt and the
   train half needs at least two attributes. `features=` overrides the selection (e.g. canonical SAE labels).
2. Interventions on the held-out half, applied at every non-BOS position (BOS residuals are left untouched:
   their norm is atypical in real models and no method is fitted on them), with w the chosen unit direction and
   c the artefact's centre:
   - ablate at scale s: x - s * ((x - c) . w) w for a prompt whose target attribute is a (w = f_a's direction).
     s = 1 is `Artefact.ablate(x, [f_a])` (the projection of x - c onto w removed); the sweep is
     `CausalConfig.ablation_scales` (default (1,): the plain ablation only). Expected: the logit difference
     target - contrast drops.
   - steer: x + alpha * w (`Artefact.steer`) for a prompt whose *contrast* attribute is c, i.e. push the
     residual toward the other answer (steering toward the answer the model already gives cannot flip it).
     alpha = multiple x mean residual norm at L (mean ||x|| over the non-BOS positions of the train prompts);
     the multiples are `CausalConfig.alphas` (default 0.5, 1, 2, 4).
3. Controls, per attribute, with the same geometry (centre c, same scales and alphas):
   - control_* (selected random control): K seeded random unit directions (K = the artefact's K, so a
     dictionary of 26k features is compared with the best of 26k random directions; generated in chunks of
     CONTROL_CHUNK), read out on the same train residuals as the artefact is (EP, and methods whose selection
     readout is cosine or binary: cosine of x - c with each direction; others: the projection (x - c) . w), and
     the same selection rule as step 1 picks one per attribute. "Beats the control" therefore means "beats what
     selecting among as many arbitrary directions achieves", not "beats one arbitrary direction". (Until this
     change the control was a single unselected random direction per attribute.) With `features=` an attribute
     absent from the train half has no selected control: it falls back to its unselected direction (detail says
     how many).
   - unselected_control_* (the former control): one seeded random unit direction per attribute, unselected;
     reported with the headline rows only (ablation at s = 1, steering at the chosen alpha).
4. Measures, per held-out prompt, first token of target and contrast (one forward per condition over the
   held-out prompts, batched by length; each batch's clean residual at L is computed once and every intervention
   runs only the blocks after L, which gives the same numbers as a full forward with a hook at L):
   - delta_logit_diff = (logit_t - logit_c)[intervened] - (logit_t - logit_c)[clean]: negative = works.
   - flip_rate: share of prompts whose logit difference changes sign (pass a set filtered with
     bench.prompts.filter_correct so every clean difference is positive and a flip means "now answers the
     contrast").
   - control_delta, control_flip_rate: the same with the selected random control; delta_vs_control: paired per
     prompt, delta - control_delta (negative = the feature beats the selected control).
   - kl: mean KL(clean || intervened) of next-token distributions over every non-BOS position of unrelated
     texts, computed per direction (attribute) and averaged over the prompts that use it (side effect).
   - effect_per_kl = mean(-delta) / mean(kl): effect bought per nat of collateral damage.
   - delta_at_kl (and control_delta_at_kl), one row per target t in `CausalConfig.kl_targets` (`kl=t` in detail):
     the dose-response curve read at equal collateral damage. Per direction the sweep points are
     (strength 0, KL 0, delta 0), exact since strength 0 is a no-op, plus every measured strength (ablation
     scales, steering alphas) in ascending order; the first adjacent pair whose KL brackets t gives the
     prompt's delta by linear interpolation in strength (`values_at_kl`). NaN (counted as `nan=` in detail,
     `unmeasured=` of them for answers whose KL was not measured, see kl_attributes) where t lies outside the
     measured KL range: never extrapolated. With a single sweep point this reduces to delta * t / KL (linear
     from the origin), so sweep several strengths to read a real curve. Methods, and a method and its control,
     can be compared here at equal KL instead of each at its own strength.
   Steering rows are reported for the whole sweep (`causal.steer.curve.*`, `alpha=` in detail) and for the best
   alpha (`causal.steer.*`), chosen on the train prompts (largest flip-rate margin over the selected control, then
   largest delta margin, then the smaller alpha), so the headline number is not tuned on held-out prompts.
   Ablation rows `causal.ablate.*` are at s = 1; with other scales in the sweep, `causal.ablate.curve.*`
   (`scale=` in detail) cover every scale.
5. Statistics. Every held-out prompt whose answer is the same is ablated (or steered) with the same selected
   direction, so prompts are not independent: each row's `clusters` maps a prompt to
   `{relation or prompt-set name}/{owner}` (owner: the target answer for ablation, the contrast answer for
   steering), and CIs are percentile bootstraps over clusters (metrics.common.cluster_bootstrap_ci).

Detail format: `{prompt set}; key=value; ...; free text`: the first `;` token is the prompt-set name, then the
setting (curve rows: `alpha=` multiple of the mean norm or `scale=`; best-alpha rows: `best_alpha=` and
`chosen=train`, so headline rows of methods that chose different alphas still pair; `alpha_abs=` the absolute
strength; at-KL rows: `kl=`, `nan=`, `unmeasured=`), then
`clusters=` and `prompts=` (the clusters and prompts behind the row's value), then the hook and selection notes.

DiffMean (supervised, `diffmean_causal_metrics`): its concept-set directions say nothing about prompt answers,
so the supervised baseline is fitted on the causal train prompts themselves: per attribute a,
unit(mean last-position residual of train prompts answering a - mean of the other train prompts), centre = the
mean last-position residual of all train prompts (the point the mean differences are taken about: ablation sets
each prompt's component along w to the train average), K = number of attributes, feature of a = its own
direction. Same interventions, controls (K random directions, projection readout, same rule) and rows.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from methods.base import Artefact, MethodConfig
from methods.common import EPS
from metrics.common import MetricRow, cluster_bootstrap_ci, mean_row, row
from metrics.feature_selection import default_readout

# Unrelated sentences for the KL side effect: plain prose far from every shipped prompt set.
DEFAULT_UNRELATED_TEXTS: tuple[str, ...] = (
    "The weather was mild and the market opened early on Tuesday morning.",
    "She poured the tea, sat by the window and read the letter twice.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "The committee will publish its report after the summer recess.",
)
CONTROL_CHUNK = 4096  # random control directions generated and read out at once (4096 x 2304 float64: 75 MB)


@dataclass
class CausalConfig:
    """Settings of the causal-intervention protocol."""

    train_frac: float = 0.5  # share of prompts used to select features (split stratified by attribute)
    split_seed: int = 0  # seed of the train/held-out split
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # steering strengths, in units of the mean residual norm
    # ablation strengths s (x - s * projection about the centre); 1 is the plain ablation and is always measured.
    # Each extra scale costs a forward pass over the held-out prompts and the unrelated texts per arm.
    ablation_scales: tuple[float, ...] = (1.0,)
    # KL targets (nats, on the unrelated texts) at which delta_at_kl reads each dose-response curve. Log-spaced
    # over the range seen in practice: plain ablations cost ~0.01-0.6 nats (random controls ~0.02), steering at
    # 0.5x the mean norm already ~2 nats, so 0.01-3 covers both without asking for extrapolation.
    kl_targets: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    readout: str | None = None  # readout for feature selection; None: metrics.feature_selection.default_readout
    control_seed: int = 0  # seed of the random control directions (selected pool and unselected)
    batch_size: int = 64  # texts per forward pass (texts are batched by length, see length_groups)
    # side-effect KL is measured for at most this many answers' directions (each costs a forward pass over every
    # unrelated text per condition): those owning the most held-out prompts, ties by name; 0 measures all. KL and
    # effect-per-KL rows cover the prompts of those answers only (their detail says how many).
    kl_attributes: int = 16
    seed: int = 0  # bootstrap seed

    def __post_init__(self) -> None:
        for name in ("alphas", "ablation_scales"):
            if any(float(v) < 0 for v in getattr(self, name)):
                raise ValueError(f"CausalConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.ablation_scales:
            raise ValueError("CausalConfig.ablation_scales is empty; the default is (1.0,)")
        if any(float(t) <= 0 for t in self.kl_targets):
            raise ValueError(f"CausalConfig.kl_targets must be > 0 nats, got {self.kl_targets}")


class _FixedDirections(Artefact):
    """Minimal artefact holding given unit directions and a centre: the random control's geometry."""

    method = "random-control"

    def __init__(self, dirs_KD: torch.Tensor, center_D: torch.Tensor):
        super().__init__(MethodConfig(), {"directions": dirs_KD, "center": center_D}, {"label": "random-control"})

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        return x @ self.directions.T


class CausalDiffMean(Artefact):
    """The supervised causal baseline: one mean-difference direction per answer of the causal train prompts."""

    method = "diffmean"
    supervised = True
    readouts = ("projection",)

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        x = self.check_input(x)
        return (x - self.center.to(x)) @ self.directions.to(x).T


# ---------------------------------------------------------------------------------------------------------
# Feature selection


class UnusablePrompts(ValueError):
    """A prompt set whose answered prompts cannot be intervened on (fewer than 2 answer values among the train
    prompts, or no held-out prompt whose answer has a train prompt): a fact about the model's answers on this set,
    not a broken input; the causal family skips the set for the cell and records why."""


def _attribute_index(attributes: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    names = sorted(set(attributes))
    if len(names) < 2:
        raise UnusablePrompts(f"feature selection needs prompts of at least 2 attributes, got {names}; use a "
                              "prompt set with several answer values (e.g. city_continent) or pass features= "
                              "explicitly")
    return names, torch.tensor([names.index(a) for a in attributes])


def _contrast_scores(feats_NK: torch.Tensor, attr_idx: torch.Tensor, n_attr: int) -> torch.Tensor:
    """[A, K]: per attribute, mean feature on its prompts minus mean on the other prompts (the selection score)."""
    member_AN = torch.nn.functional.one_hot(attr_idx, n_attr).T.to(feats_NK.dtype)
    n_in = member_AN.sum(1, keepdim=True)
    sum_in = member_AN @ feats_NK
    return sum_in / n_in - (feats_NK.sum(0, keepdim=True) - sum_in) / (len(attr_idx) - n_in)


def select_causal_features(
    artefact: Artefact, acts_ND: torch.Tensor, attributes: Sequence[str], readout: str | None = None
) -> dict[str, int]:
    """Per attribute, the feature maximising mean activation on its prompts minus mean on the other prompts."""
    names, attr_idx = _attribute_index(attributes)
    readout = default_readout(artefact, readout)  # the same readout concept metrics select with (EP: cosine)
    x = artefact.check_input(acts_ND)
    with torch.no_grad():
        feats_NK = (artefact.encode(x, readout=readout) if readout is not None else artefact.encode(x)).float()
    best = _contrast_scores(feats_NK, attr_idx, len(names)).argmax(dim=1)
    return {a: int(best[i]) for i, a in enumerate(names)}


def control_readout(artefact: Artefact, readout: str | None = None) -> str:
    """The readout the random control is selected with, mirroring the artefact's selection readout: "cosine"
    (of x - centre with each direction) where that is cosine or binary (a one-hot of the cosine argmax, which
    chunked random directions cannot reproduce, so its dense cosine stands in), else "projection"."""
    r = default_readout(artefact, readout)
    if r is None:
        r = getattr(artefact.config, "readout", None)
    return "cosine" if r in ("cosine", "binary") else "projection"


def random_control_chunks(K: int, d: int, seed: int, chunk: int = CONTROL_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, unit directions [n, d] float32) over K seeded random directions, `chunk` at a time (one generator
    drawn in order, so the directions depend on K, d, seed and chunk only)."""
    g = torch.Generator().manual_seed(seed)
    for s in range(0, K, chunk):
        w = torch.randn(min(chunk, K - s), d, generator=g, dtype=torch.float64)
        yield s, (w / w.norm(dim=1, keepdim=True)).float()


def select_random_control(acts_ND: torch.Tensor, attributes: Sequence[str], center_D: torch.Tensor, K: int,
                          seed: int, readout: str = "projection", chunk: int = CONTROL_CHUNK
                          ) -> tuple[dict[str, int], torch.Tensor]:
    """The selected random control: among K seeded random unit directions (random_control_chunks), per attribute
    the one with the largest selection score (select_causal_features' rule) under `readout` ("cosine" or
    "projection", about `center_D`). Returns ({attribute: index in the pool}, directions [A, d] in sorted
    attribute order). Lowest index on ties, as argmax over the whole pool."""
    if readout not in ("cosine", "projection"):
        raise ValueError(f"control readout must be 'cosine' or 'projection', got {readout!r}")
    names, attr_idx = _attribute_index(attributes)
    xc = acts_ND.float() - center_D.float().to(acts_ND.device)
    if readout == "cosine":
        xc = xc / (xc.norm(dim=1, keepdim=True) + EPS)
    best_v = torch.full((len(names),), -float("inf"))
    best_i = torch.zeros(len(names), dtype=torch.long)
    best_w = torch.zeros(len(names), acts_ND.shape[1])
    with torch.no_grad():
        for s, w in random_control_chunks(K, acts_ND.shape[1], seed, chunk):
            v, j = _contrast_scores((xc @ w.to(xc).T).float().cpu(), attr_idx, len(names)).max(dim=1)
            better = v > best_v  # strict: an earlier chunk keeps its ties
            best_v, best_i = torch.where(better, v, best_v), torch.where(better, s + j, best_i)
            best_w[better] = w[j[better]]
    return {a: int(best_i[i]) for i, a in enumerate(names)}, best_w


def causal_diffmean_directions(acts_ND: torch.Tensor, attributes: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """(sorted attributes, unit directions [A, d]): unit(mean of the prompts answering a - mean of the others)."""
    names, attr_idx = _attribute_index(attributes)
    diff = _contrast_scores(acts_ND.double(), attr_idx, len(names))
    return names, (diff / diff.norm(dim=1, keepdim=True).clamp_min(EPS)).float()


# ---------------------------------------------------------------------------------------------------------
# Interventions


def scaled_ablate(x: torch.Tensor, w: torch.Tensor, center: torch.Tensor, scale: float) -> torch.Tensor:
    """x - scale * ((x - c) . u) u, u = w / ||w||: s = 1 removes the projection onto w about c (Artefact.ablate)."""
    u = w.to(x) / w.norm().clamp_min(EPS).to(x)
    return x - scale * ((x - center.to(x)) @ u)[:, None] * u


def steer(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """x + alpha * w (Artefact.steer for a unit direction w)."""
    return x + alpha * w.to(x)


def values_at_kl(kl_S: Sequence[float], values_NS: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """[N, T]: the values of N units at each KL target, from a sweep of S strengths in ascending order with one
    KL per strength (shared by the units: one direction) and one value per unit and strength. For each target the
    first adjacent pair of sweep points whose KL brackets it (lo <= t <= hi, either order) gives
    v_i + (t - kl_i) / (kl_{i+1} - kl_i) * (v_{i+1} - v_i), i.e. linear interpolation in strength when KL and
    value are both linear in strength between the points; NaN where no pair brackets t (never extrapolated) or
    the KL is not finite."""
    kl = np.asarray(kl_S, dtype=float)
    v = np.asarray(values_NS, dtype=float).reshape(-1, len(kl))
    out = np.full((v.shape[0], len(targets)), np.nan)
    if not np.isfinite(kl).all():
        return out
    for j, t in enumerate(targets):
        if len(kl) == 1 and kl[0] == t:
            out[:, j] = v[:, 0]
        for i in range(len(kl) - 1):
            lo, hi = kl[i], kl[i + 1]
            if min(lo, hi) <= t <= max(lo, hi):
                f = 0.0 if hi == lo else (t - lo) / (hi - lo)
                out[:, j] = v[:, i] + f * (v[:, i + 1] - v[:, i])
                break
    return out


# ---------------------------------------------------------------------------------------------------------
# Forward passes under interventions

# apply(x [n, d] float32, key) -> intervened x; key is an attribute index (or a feature id).
Apply = Callable[[torch.Tensor, int], torch.Tensor]


def _hook(apply: Apply, keys: Sequence[int | None]) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A resid hook applying `apply` per row group (rows sharing a key) at positions >= 1; None = untouched."""
    groups: dict[int, list[int]] = {}
    for r, k in enumerate(keys):
        if k is not None:
            groups.setdefault(int(k), []).append(r)

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = act.clone()
        d = act.shape[-1]
        for k, rows in groups.items():
            sub = act[rows, 1:]
            new = apply(sub.reshape(-1, d).float(), k)
            out[rows, 1:] = new.reshape(sub.shape).to(act.dtype)
        return out

    return fn


def length_groups(lengths: Sequence[int], batch_size: int, slack: float = 1.25) -> list[list[int]]:
    """Indices grouped for batching with little padding: ascending length, at most `batch_size` per group, and the
    longest text in a group at most `slack` x the shortest (plus one token)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        g = groups[-1] if groups else None
        if g is None or len(g) >= batch_size or lengths[i] > slack * lengths[g[0]] + 1:
            groups.append([i])
        else:
            g.append(i)
    return groups


def _takes_token_ids(backend: Any) -> bool:
    """Whether the backend's final_logits can unembed selected vocabulary columns only (`token_ids=`)."""
    try:
        return "token_ids" in inspect.signature(backend.final_logits).parameters
    except (TypeError, ValueError):
        return False


class _Texts:
    """Texts tokenised once and batched by length, with each batch's clean residual at the intervention layer
    cached: an intervention then runs only the blocks after that layer. The batches are fixed, so the clean and
    every intervened pass see the same layout (a no-op intervention reproduces the clean numbers exactly)."""

    def __init__(self, backend: Any, texts: Sequence[str], layer: int, batch_size: int):
        self.backend, self.layer, self.n = backend, layer, len(texts)
        self.token_ids = _takes_token_ids(backend)
        lengths = [1 + len(backend.encode_text(t)) for t in texts]
        self.batches = []  # (indices, lengths, resid_post at layer [b, T, d])
        for idx in length_groups(lengths, batch_size):
            toks, lens = backend.to_tokens([texts[i] for i in idx])
            self.batches.append((idx, lens, backend.run_layers(toks, [layer])[layer]))

    def final(self, apply: Apply | None, keys: Sequence[int | None]) -> Iterator[tuple[list[int], torch.Tensor,
                                                                                      torch.Tensor]]:
        """Per batch: (text indices, lengths, last block's residual) with `apply` at the layer (None = clean)."""
        for idx, lens, resid in self.batches:
            x = resid if apply is None else _hook(apply, [keys[i] for i in idx])(resid, None)
            yield idx, lens, self.backend.run_from_layer(x, self.layer)

    def logit_diffs(self, t_ids: torch.Tensor, c_ids: torch.Tensor, apply: Apply | None,
                    keys: Sequence[int | None]) -> np.ndarray:
        """logit(target) - logit(contrast) at the next token after each text (only the target and contrast
        columns are unembedded when the backend supports `token_ids=`)."""
        out = np.zeros(self.n)
        with torch.no_grad():
            for idx, lens, resid in self.final(apply, keys):
                rows = torch.arange(len(idx))
                i = torch.tensor(idx)
                last = resid[rows, lens.to(resid.device) - 1]
                t, c = t_ids[i], c_ids[i]
                if self.token_ids:
                    vocab = torch.unique(torch.cat([t, c]))
                    logits = self.backend.final_logits(last, token_ids=vocab.tolist()).float().cpu()
                    t, c = torch.searchsorted(vocab, t), torch.searchsorted(vocab, c)
                else:
                    logits = self.backend.final_logits(last).float().cpu()
                out[idx] = (logits[rows, t] - logits[rows, c]).double().numpy()
        return out

    def last_and_mean_norm(self) -> tuple[torch.Tensor, float]:
        """Clean residual at the last position of each text [n, d], and the mean norm over non-BOS positions."""
        last, total, count = None, 0.0, 0
        for idx, lens, resid in self.batches:
            r = resid.float().cpu()
            last = last if last is not None else torch.zeros(self.n, r.shape[-1])
            last[idx] = r[torch.arange(len(idx)), lens - 1]
            pos = torch.arange(r.shape[1])[None]
            valid = (pos < lens[:, None]) & (pos >= 1)
            total, count = total + float(r[valid].norm(dim=-1).double().sum()), count + int(valid.sum())
        return last, total / count

    def log_probs(self, apply: Apply | None, keys: Sequence[int | None]) -> Iterator[tuple[int, torch.Tensor]]:
        """(text index, next-token log-probabilities [len - 1, vocab] at positions 1..len-1), batch by batch."""
        with torch.no_grad():
            for idx, lens, resid in self.final(apply, keys):
                lp = torch.log_softmax(self.backend.final_logits(resid).float(), dim=-1).cpu()
                for j, i in enumerate(idx):
                    yield i, lp[j, 1 : int(lens[j])].clone()  # a copy, so the padded batch is not kept alive


def _kl_per_text(clean: Mapping[int, torch.Tensor], inter: Iterable[tuple[int, torch.Tensor]]) -> np.ndarray:
    """Per text, the mean over positions of KL(clean || intervened); intervened log-probs are streamed."""
    out = np.zeros(len(clean))
    for i, q in inter:
        p = clean[i]
        out[i] = (p.exp() * (p - q)).sum(-1).mean().item()
    return out


# ---------------------------------------------------------------------------------------------------------
# Rows


class _Units(NamedTuple):
    """The held-out prompts a condition applies to: ids, clusters, and the row-detail pieces."""

    ids: list[str]
    clusters: list[str]
    name: str  # prompt-set name: the first token of every detail
    notes: str  # hook and selection notes: the last tokens of every detail


def _detail(u: _Units, setting: Sequence[str], keep: np.ndarray) -> str:
    clusters = {c for c, k in zip(u.clusters, keep) if k}
    return "; ".join([u.name, *setting, f"clusters={len(clusters)}", f"prompts={int(keep.sum())}", u.notes])


def _mrow(artefact: Artefact, metric: str, values: np.ndarray, u: _Units, setting: Sequence[str], seed: int,
          layer: int) -> MetricRow:
    """Mean over the prompts (NaN left out) with a cluster-bootstrap CI, units and clusters."""
    values = np.asarray(values, dtype=float)
    return mean_row(artefact, metric, values, seed, _detail(u, setting, ~np.isnan(values)), layer, u.ids,
                    u.clusters)


def _ratio_row(artefact: Artefact, metric: str, num: np.ndarray, den: np.ndarray, u: _Units,
               setting: Sequence[str], seed: int, layer: int) -> MetricRow:
    """mean(num) / mean(den) over prompts with finite den, CI by resampling clusters (num and den jointly)."""
    k = ~np.isnan(den)
    num, den, clusters = num[k], den[k], [c for c, keep in zip(u.clusters, k) if keep]
    value = float(num.mean() / den.mean()) if len(num) and den.mean() > 0 else float("nan")
    ci = cluster_bootstrap_ci(num, clusters, den, seed=seed) if np.isfinite(value) else (float("nan"),) * 2
    return row(artefact, metric, value, ci, n=len(num), seed=seed, detail=_detail(u, setting, k), layer=layer)


class _Arms(NamedTuple):
    """Per-prompt logit differences and per-prompt KL of the feature and the selected control at one strength."""

    feat: np.ndarray
    ctrl: np.ndarray
    kl: np.ndarray  # NaN for prompts whose answer's KL was not measured
    ctrl_kl: np.ndarray


def _condition_rows(artefact: Artefact, prefix: str, u: _Units, setting: Sequence[str], clean: np.ndarray,
                    m: _Arms, seed: int, layer: int, unselected: np.ndarray | None = None) -> list[MetricRow]:
    """The rows of one intervention condition at one strength, over the prompts it applies to."""
    delta, cdelta = m.feat - clean, m.ctrl - clean
    flip = ((m.feat > 0) != (clean > 0)).astype(float)
    cflip = ((m.ctrl > 0) != (clean > 0)).astype(float)

    def kl(v: np.ndarray) -> np.ndarray:  # KL rows cover the prompts whose answer's KL was measured
        return np.where(np.isnan(m.kl), np.nan, v)

    rows = [
        _mrow(artefact, f"{prefix}.delta_logit_diff", delta, u, setting, seed, layer),
        _mrow(artefact, f"{prefix}.flip_rate", flip, u, setting, seed, layer),
        _mrow(artefact, f"{prefix}.control_delta", cdelta, u, setting, seed, layer),
        _mrow(artefact, f"{prefix}.control_flip_rate", cflip, u, setting, seed, layer),
        _mrow(artefact, f"{prefix}.delta_vs_control", delta - cdelta, u, setting, seed, layer),
        _mrow(artefact, f"{prefix}.kl", m.kl, u, setting, seed, layer),
        _mrow(artefact, f"{prefix}.control_kl", kl(m.ctrl_kl), u, setting, seed, layer),
        _ratio_row(artefact, f"{prefix}.effect_per_kl", -delta, m.kl, u, setting, seed, layer),
        _ratio_row(artefact, f"{prefix}.control_effect_per_kl", -cdelta, kl(m.ctrl_kl), u, setting, seed, layer),
    ]
    if unselected is not None:
        udelta = unselected - clean
        rows += [_mrow(artefact, f"{prefix}.unselected_control_delta", udelta, u, setting, seed, layer),
                 _mrow(artefact, f"{prefix}.unselected_control_flip_rate",
                       ((unselected > 0) != (clean > 0)).astype(float), u, setting, seed, layer)]
    return rows


def _at_kl_rows(artefact: Artefact, prefix: str, u: _Units, clean: np.ndarray, sweep: Sequence[tuple[float, _Arms]],
                targets: Sequence[float], seed: int, layer: int) -> list[MetricRow]:
    """delta_at_kl and control_delta_at_kl per KL target: each prompt's delta read off its direction's sweep
    (values_at_kl), with the exact no-op point (strength 0, KL 0, delta 0) first."""
    sweep = sorted(sweep, key=lambda p: p[0])
    if sweep[0][0] != 0.0:
        zero = np.zeros_like(clean)
        sweep = [(0.0, _Arms(clean, clean, zero, zero)), *sweep]
    rows = []
    for metric, diffs, kls in (("delta_at_kl", "feat", "kl"), ("control_delta_at_kl", "ctrl", "ctrl_kl")):
        delta_NS = np.stack([getattr(m, diffs) - clean for _, m in sweep], axis=1)
        kl_NS = np.stack([getattr(m, kls) for _, m in sweep], axis=1)
        out = np.full((len(clean), len(targets)), np.nan)
        for c in sorted(set(u.clusters)):  # prompts of one cluster share one direction, hence one KL curve
            rows_c = np.array([x == c for x in u.clusters])
            out[rows_c] = values_at_kl(kl_NS[rows_c][0], delta_NS[rows_c], targets)
        unmeasured = int(np.isnan(kl_NS).any(axis=1).sum())
        for j, t in enumerate(targets):
            v = out[:, j]
            setting = [f"kl={t:g}", f"nan={int(np.isnan(v).sum())}", f"unmeasured={unmeasured}"]
            rows.append(_mrow(artefact, f"{prefix}.{metric}", v, u, setting, seed, layer))
    return rows


# ---------------------------------------------------------------------------------------------------------
# The metric


def _first_tokens(backend: Any, answers: Sequence[str]) -> torch.Tensor:
    return torch.tensor([backend.first_token(a) for a in answers], dtype=torch.long)


def _check_answers(prompts: Sequence[Any], t_ids: torch.Tensor, c_ids: torch.Tensor) -> None:
    same = [p.prompt for p, t, c in zip(prompts, t_ids.tolist(), c_ids.tolist()) if t == c]
    if same:
        raise ValueError(f"{len(same)} prompt(s) have target and contrast with the same first token "
                         f"(e.g. {same[0]!r}), so their logit difference is always 0; with a byte-level "
                         "tokenizer drop the leading space of targets/contrasts")


class _Part(NamedTuple):
    """One half of the prompt set, with per-prompt intervention keys for one condition family."""

    texts: list[str]
    batches: _Texts  # the texts, batched, with their clean residual at the layer
    t_ids: torch.Tensor  # first token of each target
    c_ids: torch.Tensor  # first token of each contrast
    owners: list[str]  # the attribute whose direction acts on each prompt (target: ablate; contrast: steer)
    keys: list[int | None]  # that attribute's index in the runner's attributes, None when it has no feature
    mask: np.ndarray  # prompts the condition applies to


def kl_attributes(attrs: Sequence[str], heldout: Sequence[Any], cap: int) -> list[str]:
    """The answers whose directions' side-effect KL is measured: all of them when there are at most `cap` (or cap
    is 0), else the `cap` owning the most held-out prompts as target or contrast, ties by name."""
    if cap <= 0 or len(attrs) <= cap:
        return list(attrs)
    counts = Counter(p.attribute for p in heldout) + Counter(p.contrast.strip() for p in heldout)
    return sorted(sorted(attrs, key=lambda a: (-counts[a], a))[:cap])


ARMS = ("feature", "control", "unselected")


class _Runner:
    """Forward passes at one layer with, per attribute (sorted), three directions about one centre: the selected
    feature's, the selected random control's and the unselected random direction."""

    def __init__(self, dirs: Mapping[str, torch.Tensor], center: torch.Tensor, attrs: list[str], backend: Any,
                 layer: int, unrelated: list[str], cfg: CausalConfig, heldout: Sequence[Any] = ()):
        self.backend, self.layer, self.bs = backend, layer, cfg.batch_size
        self.dirs = {k: v.float() for k, v in dirs.items()}  # arm -> [A, d]
        self.center, self.attrs, self.unrelated = center.float(), attrs, unrelated
        self.kl_attrs = kl_attributes(self.attrs, heldout, cfg.kl_attributes)
        # Side effect: every (attribute, unrelated text) pair; the clean pass uses the same batches, so a no-op
        # intervention gives exactly zero KL.
        self.rep = _Texts(backend, [t for _ in self.kl_attrs for t in unrelated], layer, self.bs)
        self.rep_keys = [self.attrs.index(a) for a in self.kl_attrs for _ in unrelated]
        self.clean_lp = dict(self.rep.log_probs(None, self.rep_keys))  # text index -> clean log-probs
        self._kl: dict[tuple[str, str, float], dict[str, float]] = {}

    def part(self, prompts: Any, role: str, batches: _Texts | None = None) -> _Part:
        """Keys of a prompt half; role "target" (ablate the answer's feature) or "contrast" (steer toward it).
        `batches`: the half's texts already batched (shared by both roles)."""
        owners = [p.attribute if role == "target" else p.contrast.strip() for p in prompts.prompts]
        keys = [self.attrs.index(o) if o in self.attrs else None for o in owners]
        batches = batches or _Texts(self.backend, prompts.texts, self.layer, self.bs)
        return _Part(prompts.texts, batches, _first_tokens(self.backend, prompts.targets),
                     _first_tokens(self.backend, prompts.contrasts), owners, keys,
                     np.array([k is not None for k in keys], dtype=bool))

    def apply(self, arm: str, kind: str, strength: float) -> Apply:
        """The intervention of one arm: ablation at scale `strength` (kind "ablate") or steering by it."""
        dirs, c = self.dirs[arm], self.center
        if kind == "ablate":
            return lambda x, a: scaled_ablate(x, dirs[a], c, strength)
        return lambda x, a: steer(x, dirs[a], strength)

    def diffs(self, part: _Part, arm: str | None = None, kind: str = "", strength: float = 0.0) -> np.ndarray:
        """Logit differences over the whole part: clean when arm is None."""
        if arm is None:
            return part.batches.logit_diffs(part.t_ids, part.c_ids, None, [None] * len(part.texts))
        return part.batches.logit_diffs(part.t_ids, part.c_ids, self.apply(arm, kind, strength), part.keys)

    def kl_by_attr(self, arm: str, kind: str, strength: float) -> dict[str, float]:
        """Side-effect KL of each measured attribute's direction (cached: it does not depend on the prompts)."""
        key = (arm, kind, float(strength))
        if key not in self._kl:
            kl = _kl_per_text(self.clean_lp, self.rep.log_probs(self.apply(arm, kind, strength), self.rep_keys))
            self._kl[key] = dict(zip(self.kl_attrs, kl.reshape(len(self.kl_attrs), len(self.unrelated)).mean(1)))
        return self._kl[key]

    def measure(self, part: _Part, kind: str, strength: float) -> _Arms:
        """Feature and selected-control diffs and KL at one strength, over the prompts of the condition."""
        m = part.mask
        kl = {arm: self.kl_by_attr(arm, kind, strength) for arm in ("feature", "control")}
        per_prompt = {arm: np.array([kl[arm].get(o, np.nan) for o in part.owners])[m] for arm in kl}
        return _Arms(self.diffs(part, "feature", kind, strength)[m], self.diffs(part, "control", kind, strength)[m],
                     per_prompt["feature"], per_prompt["control"])

    def choose_alpha(self, part: _Part, alphas: Sequence[float]) -> int:
        """Index of the steering strength with the best flip-rate margin over the control (then delta margin)."""
        if not part.mask.any() or len(alphas) < 2:
            return 0
        clean, m = self.diffs(part), part.mask
        scores = []
        for alpha in alphas:
            feat = self.diffs(part, "feature", "steer", alpha)[m]
            ctrl = self.diffs(part, "control", "steer", alpha)[m]
            flips = np.mean((feat > 0) != (clean[m] > 0)) - np.mean((ctrl > 0) != (clean[m] > 0))
            scores.append((round(float(flips), 9), float(np.mean(ctrl - feat)), -alpha))
        return max(range(len(alphas)), key=lambda i: scores[i])


def _resolve_layer(artefact: Artefact, backend: Any, layer: int | None) -> int:
    L = int(layer if layer is not None else artefact.info.get("layer", -1))
    if L < 0:
        raise ValueError(f"{artefact.name}: no layer in artefact.info; pass layer=")
    backend.check_layers([L])
    if artefact.d_model != backend.d_model:
        raise ValueError(f"{artefact.name} has d={artefact.d_model} but {backend.name} has d_model="
                         f"{backend.d_model}; use the model the artefact was built on")
    return L


class _Setup(NamedTuple):
    """The split, the train residuals and the unrelated texts: what precedes feature selection."""

    train: Any
    test: Any
    train_texts: _Texts
    last_ND: torch.Tensor  # clean last-position residual of each train prompt
    mean_norm: float  # mean residual norm over the non-BOS positions of the train prompts
    unrelated: list[str]


def _setup(backend: Any, prompt_set: Any, L: int, unrelated_texts: Sequence[str] | None, cfg: CausalConfig
           ) -> _Setup:
    unrelated = list(unrelated_texts) if unrelated_texts is not None else list(DEFAULT_UNRELATED_TEXTS)
    if not unrelated:
        raise ValueError("unrelated_texts is empty; pass a few sentences unrelated to the prompt set (or None)")
    train, test = prompt_set.split(cfg.train_frac, cfg.split_seed)
    for half in (train, test):
        _check_answers(half.prompts, _first_tokens(backend, half.targets), _first_tokens(backend, half.contrasts))
    train_texts = _Texts(backend, train.texts, L, cfg.batch_size)
    last_ND, mean_norm = train_texts.last_and_mean_norm()
    return _Setup(train, test, train_texts, last_ND, mean_norm, unrelated)


def _run(artefact: Artefact, backend: Any, prompt_set: Any, setup: _Setup, features: Mapping[str, int],
         control_kind: str, cfg: CausalConfig, L: int) -> list[MetricRow]:
    """Every causal row of one artefact with its features chosen: both conditions, sweeps, controls, KL reads."""
    train, test = setup.train, setup.test
    attrs = sorted(features)
    d = artefact.d_model
    gen = torch.Generator().manual_seed(cfg.control_seed)
    rand_AD = torch.randn(len(attrs), d, generator=gen)  # the unselected control (the protocol's former control)
    unselected = rand_AD / rand_AD.norm(dim=1, keepdim=True)
    train_attrs = [p.attribute for p in train.prompts]
    _, sel_AD = select_random_control(setup.last_ND, train_attrs, artefact.center, artefact.K, cfg.control_seed,
                                      control_kind)
    sel_names = sorted(set(train_attrs))
    control = unselected.clone()
    for i, a in enumerate(attrs):
        if a in sel_names:
            control[i] = sel_AD[sel_names.index(a)]
    n_fallback = sum(a not in sel_names for a in attrs)
    feat_AD = artefact.directions[[int(features[a]) for a in attrs]].float()
    run = _Runner({"feature": feat_AD, "control": control, "unselected": unselected}, artefact.center, attrs,
                  backend, L, setup.unrelated, cfg, test.prompts)
    abl = run.part(test, "target")
    ste = run.part(test, "contrast", abl.batches)
    if not abl.mask.any() and not ste.mask.any():
        raise UnusablePrompts(f"prompt set {prompt_set.name!r}: no held-out prompt has a target or contrast "
                              "attribute with a selected feature (every answer value occurs once?); use a set with "
                              "repeated answers (city_continent, city_country, first_letter) or pass features=")
    clean = run.diffs(abl)  # same texts for both roles
    notes = f"hook {backend.hook_name(L)}; {len(features)} attribute features selected on {len(train)} train " \
            f"prompts; control: the best of {artefact.K} random directions by the same rule ({control_kind} readout)"
    notes += f", {n_fallback} answers without train prompts use an unselected one" if n_fallback else ""
    notes += "" if len(run.kl_attrs) == len(run.attrs) else \
        f"; KL measured for the {len(run.kl_attrs)} answers with the most held-out prompts"

    def units(part: _Part) -> _Units:
        keep = np.flatnonzero(part.mask)
        return _Units([f"{i}:{part.texts[i]}" for i in keep],
                      [f"{test.prompts[i].relation or prompt_set.name}/{part.owners[i]}" for i in keep],
                      prompt_set.name, notes)

    rows: list[MetricRow] = []
    if abl.mask.any():
        u, c = units(abl), clean[abl.mask]
        scales = sorted({float(s) for s in cfg.ablation_scales} | {1.0})
        sweep = [(s, run.measure(abl, "ablate", s)) for s in scales]
        for s, m in sweep:
            if s == 1.0:
                rows += _condition_rows(artefact, "causal.ablate", u, ["scale=1"], c, m, cfg.seed, L,
                                        run.diffs(abl, "unselected", "ablate", 1.0)[abl.mask])
            if set(scales) != {1.0}:
                rows += _condition_rows(artefact, "causal.ablate.curve", u, [f"scale={s:g}"], c, m, cfg.seed, L)
        rows += _at_kl_rows(artefact, "causal.ablate", u, c, sweep, cfg.kl_targets, cfg.seed, L)
    if ste.mask.any():
        u, c = units(ste), clean[ste.mask]
        alphas = [float(a) * setup.mean_norm for a in cfg.alphas]
        # chosen on train, not on held-out prompts
        best = run.choose_alpha(run.part(train, "contrast", setup.train_texts), alphas)
        sweep = []
        for i, (mult, alpha) in enumerate(zip(cfg.alphas, alphas)):
            m = run.measure(ste, "steer", alpha)
            sweep.append((alpha, m))
            strength = [f"alpha={mult:g}", f"alpha_abs={alpha:.4g}"]
            rows += _condition_rows(artefact, "causal.steer.curve", u, strength, c, m, cfg.seed, L)
            if i == best:
                best_u = u._replace(notes=f"best alpha, chosen on train prompts; {notes}")
                # best_alpha=, not alpha=: headline rows of methods whose chosen alphas differ must still pair
                best_s = [f"best_alpha={mult:g}", strength[1], "chosen=train"]
                rows += _condition_rows(artefact, "causal.steer", best_u, best_s, c, m, cfg.seed, L,
                                        run.diffs(ste, "unselected", "steer", alpha)[ste.mask])
        rows += _at_kl_rows(artefact, "causal.steer", u, c, sweep, cfg.kl_targets, cfg.seed, L)
    return rows


def causal_metrics(
    artefact: Artefact,
    backend: Any,
    prompt_set: Any,
    unrelated_texts: Sequence[str] | None = None,
    config: CausalConfig | None = None,
    layer: int | None = None,
    features: Mapping[str, int] | None = None,
) -> list[MetricRow]:
    """Ablation and steering effects of the feature selected per attribute, against a selected random control."""
    cfg = config or CausalConfig()
    L = _resolve_layer(artefact, backend, layer)
    setup = _setup(backend, prompt_set, L, unrelated_texts, cfg)
    if features is None:
        features = select_causal_features(artefact, setup.last_ND, [p.attribute for p in setup.train.prompts],
                                          cfg.readout)
    bad = {a: f for a, f in features.items() if not 0 <= int(f) < artefact.K}
    if bad:
        raise ValueError(f"features out of range 0..{artefact.K - 1}: {bad}")
    return _run(artefact, backend, prompt_set, setup, features, control_readout(artefact, cfg.readout), cfg, L)


def diffmean_causal_metrics(
    backend: Any,
    prompt_set: Any,
    layer: int,
    unrelated_texts: Sequence[str] | None = None,
    config: CausalConfig | None = None,
    label: str = "diffmean",
    info: Mapping[str, Any] | None = None,
) -> list[MetricRow]:
    """The supervised baseline's causal rows: DiffMean fitted on the causal train prompts (module docstring), one
    direction per answer, with the same interventions, controls (K = number of answers) and rows; the rows carry
    `label` as their method and supervised=True."""
    cfg = config or CausalConfig()
    backend.check_layers([layer])
    setup = _setup(backend, prompt_set, layer, unrelated_texts, cfg)
    names, dirs = causal_diffmean_directions(setup.last_ND, [p.attribute for p in setup.train.prompts])
    art = CausalDiffMean(MethodConfig(), {"directions": dirs, "center": setup.last_ND.mean(0)},
                         {"model": getattr(backend, "name", ""), **(info or {}), "label": label, "layer": layer,
                          "attributes": names, "fitted_on": f"{prompt_set.name} train prompts"})
    return _run(art, backend, prompt_set, setup, {a: i for i, a in enumerate(names)}, "projection", cfg, layer)
