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
   their norm is atypical in real models and no method is fitted on them):
   - ablate: `artefact.ablate(x, [f_a])` for a prompt whose target attribute is a. Expected: the logit
     difference target - contrast drops.
   - steer: `artefact.steer(x, f_c, alpha)` for a prompt whose *contrast* attribute is c, i.e. push the
     residual toward the other answer (steering toward the answer the model already gives cannot flip it).
     alpha = multiple x mean residual norm at L (mean ||x|| over the non-BOS positions of the train prompts);
     the multiples are `CausalConfig.alphas` (default 0.5, 1, 2, 4).
3. Measures, per held-out prompt, first token of target and contrast (one forward per condition over the
   held-out prompts, batched by length; each batch's clean residual at L is computed once and every intervention
   runs only the blocks after L, which gives the same numbers as a full forward with a hook at L):
   - delta_logit_diff = (logit_t - logit_c)[intervened] - (logit_t - logit_c)[clean]: negative = works.
   - flip_rate: share of prompts whose logit difference changes sign (pass a set filtered with
     bench.prompts.filter_correct so every clean difference is positive and a flip means "now answers the
     contrast").
   - control_*: the same with a random unit direction per attribute (seeded) in place of the feature,
     using the protocol's default geometry (Artefact.ablate: projection about the artefact's centre;
     Artefact.steer: x + alpha * unit), so the feature is compared with an arbitrary direction of equal norm.
   - delta_vs_control: paired per prompt, delta - control_delta (negative = the feature beats chance).
   - kl: mean KL(clean || intervened) of next-token distributions over every non-BOS position of unrelated
     texts, computed per feature and averaged over the prompts that use it (side effect).
   - effect_per_kl = mean(-delta) / mean(kl): effect bought per nat of collateral damage.
   Steering rows are reported for the whole sweep (`causal.steer.curve.*`, alpha in `detail`) and for the best
   alpha (`causal.steer.*`), chosen on the train prompts (largest flip-rate margin over the control, then
   largest delta margin, then the smaller alpha), so the headline number is not tuned on held-out prompts.
CIs are percentile bootstraps over held-out prompts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from methods.base import Artefact, MethodConfig
from metrics.common import MetricRow, bootstrap_ci, mean_row, row
from metrics.feature_selection import default_readout

# Unrelated sentences for the KL side effect: plain prose far from every shipped prompt set.
DEFAULT_UNRELATED_TEXTS: tuple[str, ...] = (
    "The weather was mild and the market opened early on Tuesday morning.",
    "She poured the tea, sat by the window and read the letter twice.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "The committee will publish its report after the summer recess.",
)


@dataclass
class CausalConfig:
    """Settings of the causal-intervention protocol."""

    train_frac: float = 0.5  # share of prompts used to select features (split stratified by attribute)
    split_seed: int = 0  # seed of the train/held-out split
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # steering strengths, in units of the mean residual norm
    readout: str | None = None  # readout for feature selection; None: metrics.feature_selection.default_readout
    control_seed: int = 0  # seed of the random control directions
    batch_size: int = 64  # texts per forward pass (texts are batched by length, see length_groups)
    # side-effect KL is measured for at most this many answers' directions (each costs a forward pass over every
    # unrelated text per condition): those owning the most held-out prompts, ties by name; 0 measures all. KL and
    # effect-per-KL rows cover the prompts of those answers only (their detail says how many).
    kl_attributes: int = 16
    seed: int = 0  # bootstrap seed


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


# ---------------------------------------------------------------------------------------------------------
# Feature selection


def select_causal_features(
    artefact: Artefact, acts_ND: torch.Tensor, attributes: Sequence[str], readout: str | None = None
) -> dict[str, int]:
    """Per attribute, the feature maximising mean activation on its prompts minus mean on the other prompts."""
    names = sorted(set(attributes))
    if len(names) < 2:
        raise ValueError(f"feature selection needs prompts of at least 2 attributes, got {names}; use a prompt "
                         "set with several answer values (e.g. city_continent) or pass features= explicitly")
    readout = default_readout(artefact, readout)  # the same readout concept metrics select with (EP: cosine)
    x = artefact.check_input(acts_ND)
    with torch.no_grad():
        feats_NK = (artefact.encode(x, readout=readout) if readout is not None else artefact.encode(x)).float()
    attr_idx = torch.tensor([names.index(a) for a in attributes])
    member_AN = torch.nn.functional.one_hot(attr_idx, len(names)).T.float()
    n_in = member_AN.sum(1, keepdim=True)
    mean_in_AK = member_AN @ feats_NK / n_in
    mean_out_AK = (feats_NK.sum(0, keepdim=True) - member_AN @ feats_NK) / (len(attributes) - n_in)
    best = (mean_in_AK - mean_out_AK).argmax(dim=1)
    return {a: int(best[i]) for i, a in enumerate(names)}


# ---------------------------------------------------------------------------------------------------------
# Forward passes under interventions

# apply(x [n, d] float32, key) -> intervened x; key is a feature id (artefact) or attribute index (control).
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


class _Texts:
    """Texts tokenised once and batched by length, with each batch's clean residual at the intervention layer
    cached: an intervention then runs only the blocks after that layer. The batches are fixed, so the clean and
    every intervened pass see the same layout (a no-op intervention reproduces the clean numbers exactly)."""

    def __init__(self, backend: Any, texts: Sequence[str], layer: int, batch_size: int):
        self.backend, self.layer, self.n = backend, layer, len(texts)
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
        """logit(target) - logit(contrast) at the next token after each text."""
        out = np.zeros(self.n)
        with torch.no_grad():
            for idx, lens, resid in self.final(apply, keys):
                rows = torch.arange(len(idx))
                logits = self.backend.final_logits(resid[rows, lens.to(resid.device) - 1]).float().cpu()
                i = torch.tensor(idx)
                out[idx] = (logits[rows, t_ids[i]] - logits[rows, c_ids[i]]).double().numpy()
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
# The metric


def _ratio_row(artefact: Artefact, metric: str, num: np.ndarray, den: np.ndarray, seed: int, detail: str,
               layer: int) -> MetricRow:
    """mean(num) / mean(den) with a bootstrap CI over units (resampled jointly)."""
    value = float(num.mean() / den.mean()) if len(num) and den.mean() > 0 else float("nan")

    def stat(idx: np.ndarray) -> float:
        i = idx.astype(int)
        d = den[i].mean()
        return float(num[i].mean() / d) if d > 0 else float("nan")

    ci = bootstrap_ci(np.arange(len(num)), stat=stat, seed=seed) if np.isfinite(value) else (float("nan"),) * 2
    return row(artefact, metric, value, ci, n=len(num), seed=seed, detail=detail, layer=layer)


def _condition_rows(artefact: Artefact, prefix: str, units: list[str], clean: np.ndarray, feat: np.ndarray,
                    ctrl: np.ndarray, kl: np.ndarray, ctrl_kl: np.ndarray, seed: int, detail: str, layer: int
                    ) -> list[MetricRow]:
    """The rows of one intervention condition, over the prompts it applies to (`units`: their ids)."""
    delta, cdelta = feat - clean, ctrl - clean
    flip = ((feat > 0) != (clean > 0)).astype(float)
    cflip = ((ctrl > 0) != (clean > 0)).astype(float)
    k = np.isfinite(kl)  # prompts whose answer's KL was measured (CausalConfig.kl_attributes)
    kl_units = [u for u, keep in zip(units, k) if keep]
    return [
        mean_row(artefact, f"{prefix}.delta_logit_diff", delta, seed, detail, layer, units),
        mean_row(artefact, f"{prefix}.flip_rate", flip, seed, detail, layer, units),
        mean_row(artefact, f"{prefix}.control_delta", cdelta, seed, detail, layer, units),
        mean_row(artefact, f"{prefix}.control_flip_rate", cflip, seed, detail, layer, units),
        mean_row(artefact, f"{prefix}.delta_vs_control", delta - cdelta, seed, detail, layer, units),
        mean_row(artefact, f"{prefix}.kl", kl[k], seed, detail, layer, kl_units),
        mean_row(artefact, f"{prefix}.control_kl", ctrl_kl[k], seed, detail, layer, kl_units),
        _ratio_row(artefact, f"{prefix}.effect_per_kl", -delta[k], kl[k], seed, detail, layer),
        _ratio_row(artefact, f"{prefix}.control_effect_per_kl", -cdelta[k], ctrl_kl[k], seed, detail, layer),
    ]


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
    owners: list[str]  # the attribute whose feature acts on each prompt (target: ablate; contrast: steer)
    fkeys: list[int | None]  # that attribute's feature, None when it has none
    ckeys: list[int | None]  # that attribute's control-direction index
    mask: np.ndarray  # prompts the condition applies to


def kl_attributes(attrs: Sequence[str], heldout: Sequence[Any], cap: int) -> list[str]:
    """The answers whose directions' side-effect KL is measured: all of them when there are at most `cap` (or cap
    is 0), else the `cap` owning the most held-out prompts as target or contrast, ties by name."""
    if cap <= 0 or len(attrs) <= cap:
        return list(attrs)
    counts = Counter(p.attribute for p in heldout) + Counter(p.contrast.strip() for p in heldout)
    return sorted(sorted(attrs, key=lambda a: (-counts[a], a))[:cap])


class _Runner:
    """Forward passes of one artefact at one layer, with its selected features and the random control."""

    def __init__(self, artefact: Artefact, backend: Any, layer: int, chosen: Mapping[str, int],
                 unrelated: list[str], cfg: CausalConfig, heldout: Sequence[Any] = ()):
        self.artefact, self.backend, self.layer, self.bs = artefact, backend, layer, cfg.batch_size
        self.chosen, self.attrs, self.unrelated = dict(chosen), sorted(chosen), unrelated
        gen = torch.Generator().manual_seed(cfg.control_seed)
        rand_AD = torch.randn(len(self.attrs), artefact.d_model, generator=gen)
        self.control = _FixedDirections(rand_AD / rand_AD.norm(dim=1, keepdim=True), artefact.center.float())
        self.kl_attrs = kl_attributes(self.attrs, heldout, cfg.kl_attributes)
        # Side effect: every (attribute, unrelated text) pair; the clean pass uses the same batches, so a no-op
        # intervention gives exactly zero KL.
        self.rep = _Texts(backend, [t for _ in self.kl_attrs for t in unrelated], layer, self.bs)
        self.rep_f = [self.chosen[a] for a in self.kl_attrs for _ in unrelated]
        self.rep_c = [self.attrs.index(a) for a in self.kl_attrs for _ in unrelated]
        self.clean_lp = dict(self.rep.log_probs(None, self.rep_f))  # text index -> clean log-probs

    def part(self, prompts: Any, role: str, batches: _Texts | None = None) -> _Part:
        """Keys of a prompt half; role "target" (ablate the answer's feature) or "contrast" (steer toward it).
        `batches`: the half's texts already batched (shared by both roles)."""
        owners = [p.attribute if role == "target" else p.contrast.strip() for p in prompts.prompts]
        fkeys = [self.chosen.get(o) for o in owners]
        ckeys = [self.attrs.index(o) if o in self.chosen else None for o in owners]
        batches = batches or _Texts(self.backend, prompts.texts, self.layer, self.bs)
        return _Part(prompts.texts, batches, _first_tokens(self.backend, prompts.targets),
                     _first_tokens(self.backend, prompts.contrasts), owners, fkeys, ckeys,
                     np.array([k is not None for k in fkeys], dtype=bool))

    def applies(self, alpha: float | None) -> tuple[Apply, Apply]:
        """(feature, control) interventions: ablation when alpha is None, else steering by alpha."""
        art, ctrl = self.artefact, self.control
        if alpha is None:
            return (lambda x, f: art.ablate(x, [f])), (lambda x, a: ctrl.ablate(x, [a]))
        return (lambda x, f: art.steer(x, f, alpha)), (lambda x, a: ctrl.steer(x, a, alpha))

    def diffs(self, part: _Part, apply: Apply | None = None, keys: Sequence[int | None] | None = None) -> np.ndarray:
        keys = keys if keys is not None else [None] * len(part.texts)
        return part.batches.logit_diffs(part.t_ids, part.c_ids, apply, keys)

    def kl(self, part: _Part, apply: Apply, control: bool) -> np.ndarray:
        """Per prompt in the condition, the side-effect KL of the direction it uses."""
        keys = self.rep_c if control else self.rep_f
        kl = _kl_per_text(self.clean_lp, self.rep.log_probs(apply, keys))
        per_attr = dict(zip(self.kl_attrs, kl.reshape(len(self.kl_attrs), len(self.unrelated)).mean(1)))
        return np.array([per_attr.get(o, np.nan) for o in part.owners])[part.mask]

    def condition(self, part: _Part, clean: np.ndarray, alpha: float | None) -> tuple[Any, ...]:
        """(prompt ids, clean, feature, control diffs, feature KL, control KL) over the prompts of the condition."""
        f_apply, c_apply = self.applies(alpha)
        feat, ctrl = self.diffs(part, f_apply, part.fkeys), self.diffs(part, c_apply, part.ckeys)
        m = part.mask
        ids = [f"{i}:{t}" for i, (t, keep) in enumerate(zip(part.texts, m)) if keep]
        return ids, clean[m], feat[m], ctrl[m], self.kl(part, f_apply, False), self.kl(part, c_apply, True)

    def choose_alpha(self, part: _Part, alphas: Sequence[float]) -> int:
        """Index of the steering strength with the best flip-rate margin over the control (then delta margin)."""
        if not part.mask.any() or len(alphas) < 2:
            return 0
        clean, m = self.diffs(part), part.mask
        scores = []
        for alpha in alphas:
            f_apply, c_apply = self.applies(alpha)
            feat, ctrl = self.diffs(part, f_apply, part.fkeys)[m], self.diffs(part, c_apply, part.ckeys)[m]
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


def causal_metrics(
    artefact: Artefact,
    backend: Any,
    prompt_set: Any,
    unrelated_texts: Sequence[str] | None = None,
    config: CausalConfig | None = None,
    layer: int | None = None,
    features: Mapping[str, int] | None = None,
) -> list[MetricRow]:
    """Ablation and steering effects of the feature selected per attribute, against a random-direction control."""
    cfg = config or CausalConfig()
    L = _resolve_layer(artefact, backend, layer)
    hook_name = backend.hook_name(L)
    unrelated = list(unrelated_texts) if unrelated_texts is not None else list(DEFAULT_UNRELATED_TEXTS)
    if not unrelated:
        raise ValueError("unrelated_texts is empty; pass a few sentences unrelated to the prompt set (or None)")
    train, test = prompt_set.split(cfg.train_frac, cfg.split_seed)
    for half in (train, test):
        _check_answers(half.prompts, _first_tokens(backend, half.targets), _first_tokens(backend, half.contrasts))

    train_texts = _Texts(backend, train.texts, L, cfg.batch_size)
    last_ND, mean_norm = train_texts.last_and_mean_norm()
    if features is None:
        features = select_causal_features(artefact, last_ND, [p.attribute for p in train.prompts], cfg.readout)
    bad = {a: f for a, f in features.items() if not 0 <= int(f) < artefact.K}
    if bad:
        raise ValueError(f"features out of range 0..{artefact.K - 1}: {bad}")

    run = _Runner(artefact, backend, L, features, unrelated, cfg, test.prompts)
    abl = run.part(test, "target")
    ste = run.part(test, "contrast", abl.batches)
    if not abl.mask.any() and not ste.mask.any():
        raise ValueError(f"prompt set {prompt_set.name!r}: no held-out prompt has a target or contrast attribute "
                         "with a selected feature (every answer value occurs once?); use a set with repeated "
                         "answers (city_continent, city_country, first_letter) or pass features=")
    clean = run.diffs(abl)  # same texts for both roles
    base = f"{prompt_set.name}; hook {hook_name}; {len(features)} attribute features selected on {len(train)} " \
           "train prompts" + ("" if len(run.kl_attrs) == len(run.attrs) else
                              f"; KL measured for the {len(run.kl_attrs)} answers with the most held-out prompts")
    rows: list[MetricRow] = []
    if abl.mask.any():
        rows += _condition_rows(artefact, "causal.ablate", *run.condition(abl, clean, None), cfg.seed, base, L)
    if ste.mask.any():
        alphas = [float(a) * mean_norm for a in cfg.alphas]
        # chosen on train, not on held-out prompts
        best = run.choose_alpha(run.part(train, "contrast", train_texts), alphas)
        for i, (mult, alpha) in enumerate(zip(cfg.alphas, alphas)):
            strength = f"alpha={mult:g}x mean resid norm ({alpha:.4g})"
            curve = _condition_rows(artefact, "causal.steer.curve", *run.condition(ste, clean, alpha), cfg.seed,
                                    f"{strength}; {base}", L)
            rows += curve
            if i == best:
                detail = f"best {strength}, chosen on train prompts; {base}"
                rows += [MetricRow(**{**r.to_dict(), "metric": r.metric.replace(".curve", ""), "detail": detail})
                         for r in curve]
    return rows
