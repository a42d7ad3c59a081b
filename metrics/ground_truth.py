"""Ground-truth feature recovery on synthetic models (SynthSAEBench's metrics), for every artefact.

Scored on an eval store of fresh samples of the same synthetic model (bench.synth.eval_store: seed
bench.synth.EVAL_SEED + the suite seed, never trained on), against the model's true unit features F [N, d] and each
sample's true activations a [N] (a feature fires on a sample when a > 0). Definitions are sae-lens' (SynthSAEBench,
Chanin & Garriga-Alonso, arXiv 2602.14687; `sae_lens.synthetic.evals`):

- `ground_truth.mcc`: Hungarian one-to-one matching of the artefact's unit directions [K, d] to F by |cos|, the mean
  |cos| of the min(K, N) matched pairs (sae-lens `mean_correlation_coefficient`). Units: the matched true features.
- `ground_truth.uniqueness`: distinct best-|cos| true features over K (sae-lens `feature_uniqueness`).
- `ground_truth.precision` / `.recall` / `.f1`: each latent is a binary classifier for its best-|cos| true
  feature (latent fires: code != 0; feature fires: a > 0); per-latent P/R/F1 (0 where undefined), mean over the K
  latents (sae-lens `ClassificationMetricsCalculator`).
- `ground_truth.l0`: mean latents firing per sample; `ground_truth.dead_fraction`: latents that never fire on the
  eval samples, over K (sae-lens' L0 / dead-latent calculators).
- `ground_truth.explained_variance` (artefacts that decode): 1 - E||x - x_hat||^2 / total variance of x, with
  x_hat = decode(code) (sae-lens `ExplainedVarianceCalculator`); `ground_truth.shrinkage`: mean ||x_hat|| / ||x||.
- Per-feature rows, units = every true feature that fires in the eval samples (so paired verdicts over features
  compare methods on the same units): `ground_truth.feature_recovery` = max over latents of |cos| with the feature;
  `ground_truth.feature_f1` = the best F1 among the latents whose best match is the feature (0 if none).

The code (which latent fires) is each artefact's sparse readout, named in every row's detail:
- SAEs (`sae`, `frozen_sae`): the SAE's own encode (`latent`); directions = unit decoder rows. Their main rows are
  sae-lens' own `eval_sae_on_synthetic_data` on `to_sae_lens()`, replaying exactly the eval samples; epbench's
  recomputation of the same numbers must agree (else this raises: a bug) and supplies the per-unit values.
- EP: its `topk` readout (the k largest ||x - c|| cos(x - c, w), ReLU) with k = the suite SAE's k (the same L0
  budget), basis `exemplar` (directions = exemplar directions); decode = topk code @ exemplars + c. Plus
  `ground_truth.partition_*` (precision, recall, f1, l0): the `binary` readout, the Voronoi partition itself
  (each sample fires its nearest region only), and `ground_truth.mcc_mean_basis`: MCC of the mean directions.
- k-means: the same readouts as EP (its own topk / binary), directions = centroids.
- PCA, random, others: the k entries of largest |projection| (signed values kept: |cos| matching is sign-blind),
  decoded where the method decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from methods.base import Artefact
from metrics.common import MetricRow, bootstrap_ci, row

if TYPE_CHECKING:
    from bench.synth import SparseActs

SAE_METHODS = ("sae", "frozen_sae")  # artefacts with to_sae_lens(): scored by sae-lens' own evaluation
PARTITION_METHODS = ("ep", "kmeans")  # a topk and a binary (partition) readout
SAE_LENS_TOL = 1e-4  # epbench's recomputation vs sae-lens' eval_sae_on_synthetic_data


# ---------------------------------------------------------------------------------------------------------
# Direction metrics (directions only)


def abs_cos(dirs_KD: torch.Tensor, feats_ND: torch.Tensor) -> torch.Tensor:
    """|cos| [K, N] between rows (sae-lens' cosine_similarities, absolute)."""
    a = dirs_KD.float() / dirs_KD.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    b = feats_ND.float() / feats_ND.float().norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (a @ b.T).abs()


@dataclass
class Matching:
    mcc: float
    latents: np.ndarray  # matched latent per pair
    features: np.ndarray  # matched true feature per pair
    cos: np.ndarray  # |cos| per pair


def mcc_matching(dirs_KD: torch.Tensor, feats_ND: torch.Tensor, cos: torch.Tensor | None = None) -> Matching:
    """Hungarian matching maximising summed |cos| (scipy linear_sum_assignment on 1 - |cos|, as sae-lens)."""
    from scipy.optimize import linear_sum_assignment

    cos = abs_cos(dirs_KD, feats_ND) if cos is None else cos
    r, c = linear_sum_assignment(1 - cos.cpu().numpy())
    m = cos[r, c].cpu().numpy()
    return Matching(float(m.mean()) if len(m) else 0.0, r, c, m)


def uniqueness(cos: torch.Tensor) -> float:
    """Distinct best-|cos| true features per latent, over K."""
    return float(cos.argmax(dim=1).unique().numel() / cos.shape[0]) if cos.shape[0] else 0.0


# ---------------------------------------------------------------------------------------------------------
# Firing metrics


@dataclass
class Counts:
    """Per-latent confusion counts of latent firing vs its best-matching true feature firing."""

    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    tn: torch.Tensor

    def per_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(precision, recall, f1) per latent, 0 where undefined (sae-lens' convention)."""
        p = torch.where(self.tp + self.fp > 0, self.tp / (self.tp + self.fp).clamp_min(1), torch.zeros_like(self.tp))
        r = torch.where(self.tp + self.fn > 0, self.tp / (self.tp + self.fn).clamp_min(1), torch.zeros_like(self.tp))
        f = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-30), torch.zeros_like(p))
        return p, r, f


def firing_counts(codes: list[torch.Tensor], acts: list[torch.Tensor], best: torch.Tensor) -> Counts:
    """Accumulate counts over aligned chunks of codes [n, K] and dense true activations [n, N]."""
    K = best.numel()
    z = [torch.zeros(K, dtype=torch.float64) for _ in range(4)]
    for f, a in zip(codes, acts):
        on = f != 0
        gt = a[:, best] > 0
        z[0] += (on & gt).sum(0)
        z[1] += (on & ~gt).sum(0)
        z[2] += (~on & gt).sum(0)
        z[3] += (~on & ~gt).sum(0)
    return Counts(*z)


def feature_f1(f1_K: torch.Tensor, best_K: torch.Tensor, n_features: int) -> torch.Tensor:
    """Per true feature: the best F1 among the latents whose best match it is (0 if none), [N]."""
    out = torch.zeros(n_features, dtype=f1_K.dtype)
    return out.scatter_reduce(0, best_K, f1_K, reduce="amax", include_self=True)


# ---------------------------------------------------------------------------------------------------------
# Readouts


def sparse_code(artefact: Artefact, x_ND: torch.Tensor, k: int, readout: str = "sparse") -> tuple[torch.Tensor, str]:
    """(code [n, K], what it is) for one chunk: the artefact's sparse readout (see the module docstring), or with
    readout="partition" EP's / k-means' binary readout."""
    m = artefact.method
    if readout == "partition":
        return artefact.encode(x_ND, readout="binary"), "binary (nearest region; the partition)"
    if m in SAE_METHODS:
        return artefact.encode(x_ND), "latent (the SAE's encode)"
    if m == "ep":
        kk = min(k, artefact.K)
        return artefact.encode(x_ND, readout="topk", k=kk, basis="exemplar"), f"topk k={kk}, basis exemplar"
    if m == "kmeans":
        kk = min(k, artefact.K)
        return artefact.encode(x_ND, readout="topk", k=kk), f"topk k={kk} (centroids)"
    f = artefact.encode(x_ND).float()
    kk = min(k, f.shape[1])
    idx = f.abs().topk(kk, dim=1).indices
    return torch.zeros_like(f).scatter_(1, idx, f.gather(1, idx)), f"top {kk} by |projection| of its default readout"


def decodes(artefact: Artefact) -> bool:
    from metrics.reconstruction import can_reconstruct

    return can_reconstruct(artefact) and artefact.method != "random"


def _decode(artefact: Artefact, code: torch.Tensor) -> torch.Tensor:
    if artefact.method == "ep":
        return artefact.decode(code, basis="exemplar")
    return artefact.decode(code)


# ---------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scores:
    """Everything the rows are made of, for one artefact and one readout."""

    readout: str
    counts: Counts
    best: torch.Tensor  # [K] best-|cos| true feature per latent
    l0: float
    dead_fraction: float
    explained_variance: float | None
    shrinkage: float | None
    fired: torch.Tensor  # [N] bool: true feature fires on some eval sample


def score_codes(artefact: Artefact, x_ND: torch.Tensor, acts: "SparseActs", best: torch.Tensor, k: int,
                readout: str = "sparse", chunk: int | None = None) -> Scores:
    """Stream the eval samples in chunks: codes, firing counts, L0, dead latents, reconstruction."""
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.synthetic import DeadLatentsCalculator, L0Calculator, ShrinkageCalculator

    K, N = artefact.K, acts.n_features
    chunk = chunk or max(256, min(8192, 2**25 // max(K, N)))
    l0, dead = L0Calculator(), DeadLatentsCalculator(K)
    ev, shrink = ExplainedVarianceCalculator(), ShrinkageCalculator()
    tp = fp = fn = tn = torch.zeros(K, dtype=torch.float64)
    fired = torch.zeros(N, dtype=torch.bool)
    rec = decodes(artefact) and readout == "sparse"
    what = ""
    for s in range(0, x_ND.shape[0], chunk):
        x = x_ND[s : s + chunk]
        a = acts.dense(s, s + x.shape[0])
        with torch.no_grad():
            f, what = sparse_code(artefact, x, k, readout)
        c = firing_counts([f], [a], best)
        tp, fp, fn, tn = tp + c.tp, fp + c.fp, fn + c.fn, tn + c.tn
        fired |= (a > 0).any(0)
        l0.add_batch(f)
        dead.add_batch(f)
        if rec:
            with torch.no_grad():
                xh = _decode(artefact, f).float()
            ev.add_batch(xh, x)
            shrink.add_batch(xh, x)
    return Scores(what, Counts(tp, fp, fn, tn), best, l0.compute(), dead.compute() / K,
                  ev.compute() if rec else None, shrink.compute() if rec else None, fired)


class _Replay:
    """An ActivationGenerator stand-in that replays stored true activations in order (for sae-lens' eval)."""

    def __init__(self, acts: "SparseActs"):
        self.acts, self.pos = acts, 0

    def sample(self, n: int) -> torch.Tensor:
        out = self.acts.dense(self.pos, self.pos + n)
        self.pos += n
        return out


def sae_lens_eval(artefact: Artefact, feature_dict: Any, acts: "SparseActs", chunk: int) -> Any:
    """sae-lens' eval_sae_on_synthetic_data on the artefact's sae-lens SAE, over exactly the eval samples."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    return eval_sae_on_synthetic_data(artefact.to_sae_lens(), feature_dict, _Replay(acts), num_samples=acts.n_rows,
                                      batch_size=chunk)


def ground_truth_metrics(artefact: Artefact, x_ND: torch.Tensor, acts: "SparseActs", features_ND: torch.Tensor,
                         k: int, setting: str, feature_dict: Any = None, seed: int = 0, layer: int | None = None,
                         extras: dict[str, np.ndarray] | None = None) -> list[MetricRow]:
    """The ground_truth rows of one artefact on eval samples x [n, d] with true activations `acts`.

    `setting` leads every row's detail (the eval data; the same for every artefact, so rows pair in verdicts);
    `feature_dict` (a sae-lens FeatureDictionary of the true features) enables sae-lens' own evaluation of SAEs.
    `extras`, when given, receives per-feature arrays (feature_recovery, feature_f1).
    """
    sl = f"sae-lens {version('sae-lens')}"
    N, K = features_ND.shape[0], artefact.K
    cos = abs_cos(artefact.directions, features_ND)
    match = mcc_matching(artefact.directions, features_ND, cos)
    uniq = uniqueness(cos)
    best = cos.argmax(dim=1)
    sc = score_codes(artefact, x_ND, acts, best, k)
    p, r, f1 = sc.counts.per_latent()
    values = {"mcc": match.mcc, "uniqueness": uniq, "precision": float(p.mean()), "recall": float(r.mean()),
              "f1": float(f1.mean()), "l0": sc.l0, "dead_fraction": sc.dead_fraction}
    if sc.explained_variance is not None:
        values.update(explained_variance=sc.explained_variance, shrinkage=sc.shrinkage)
    how = f"readout {sc.readout}; latents matched to true features by |cos| of their directions"
    source = f"epbench's implementation of sae-lens' definitions ({sl} calculators for L0, dead, EV, shrinkage)"
    if artefact.method in SAE_METHODS and feature_dict is not None and hasattr(artefact, "to_sae_lens"):
        res = sae_lens_eval(artefact, feature_dict, acts, chunk=max(256, min(8192, 2**25 // max(K, N))))
        theirs = {"mcc": res.mcc, "uniqueness": res.uniqueness, "precision": res.classification.precision,
                  "recall": res.classification.recall, "f1": res.classification.f1_score, "l0": res.sae_l0,
                  "dead_fraction": res.dead_latents / K, "explained_variance": res.explained_variance,
                  "shrinkage": res.shrinkage}
        off = {m: (values[m], theirs[m]) for m in values if abs(values[m] - theirs[m]) > SAE_LENS_TOL}
        if off:
            raise RuntimeError(f"{artefact.name}: epbench's ground-truth scores disagree with sae-lens' "
                               f"eval_sae_on_synthetic_data (ours, theirs): {off}; a bug in one of the readouts")
        values = {m: float(theirs[m]) for m in values}
        source = f"{sl} eval_sae_on_synthetic_data (replaying the eval samples); epbench's recomputation agrees"
    detail = f"{setting}; {how}; {source}"
    n_of = {"mcc": len(match.cos), "uniqueness": K, "l0": x_ND.shape[0], "explained_variance": x_ND.shape[0],
            "shrinkage": x_ND.shape[0]}
    rows = []
    for m, v in values.items():
        units = None
        if m == "mcc":
            units = {f"f{j}": float(c) for j, c in zip(match.features, match.cos)}
        ci = (float("nan"), float("nan"))
        if m in ("precision", "recall", "f1"):
            ci = bootstrap_ci({"precision": p, "recall": r, "f1": f1}[m].numpy(), seed=seed)
        rows.append(row(artefact, f"ground_truth.{m}", v, ci=ci, n=n_of.get(m, K), seed=seed, detail=detail,
                        layer=layer, units=units))
    # per true feature (units shared by every artefact: paired verdicts over features)
    fired = sc.fired.numpy()
    ids = [f"f{j}" for j in np.flatnonzero(fired)]
    rec = cos.max(dim=0).values.numpy() if K else np.zeros(N)
    ff1 = feature_f1(f1, best, N).numpy()
    for m, per, what in (("feature_recovery", rec, "max over latents of |cos| with the true feature"),
                         ("feature_f1", ff1, "best F1 among the latents whose best match is the feature, 0 if none")):
        vals = per[fired]
        rows.append(row(artefact, f"ground_truth.{m}", float(vals.mean()) if len(vals) else float("nan"),
                        ci=bootstrap_ci(vals, seed=seed), n=len(vals), seed=seed, layer=layer,
                        detail=f"{setting}; {what}, mean over the {len(vals)} true features firing in the eval "
                               f"samples; readout {sc.readout}", units=dict(zip(ids, map(float, vals)))))
        if extras is not None:
            extras[m] = per
    if artefact.method in PARTITION_METHODS:
        part = score_codes(artefact, x_ND, acts, best, k, readout="partition")
        pp, pr, pf = part.counts.per_latent()
        pdetail = f"{setting}; readout {part.readout}; latents matched by |cos| of their directions"
        for m, v, arr in (("precision", float(pp.mean()), pp), ("recall", float(pr.mean()), pr),
                          ("f1", float(pf.mean()), pf)):
            rows.append(row(artefact, f"ground_truth.partition_{m}", v, ci=bootstrap_ci(arr.numpy(), seed=seed),
                            n=K, seed=seed, detail=pdetail, layer=layer))
        rows.append(row(artefact, "ground_truth.partition_l0", part.l0, n=x_ND.shape[0], seed=seed, detail=pdetail,
                        layer=layer))
    if artefact.method == "ep":
        mm = mcc_matching(artefact.mean_directions, features_ND)
        rows.append(row(artefact, "ground_truth.mcc_mean_basis", mm.mcc, n=len(mm.cos), seed=seed, layer=layer,
                        detail=f"{setting}; MCC of EP's mean directions (basis mean)",
                        units={f"f{j}": float(c) for j, c in zip(mm.features, mm.cos)}))
    return rows


def not_applicable_rows(artefacts: list[Artefact], reason: str, layer: int | None = None) -> list[MetricRow]:
    """One `ground_truth.not_applicable` row (NaN) per artefact, naming why (a model without ground truth)."""
    return [row(a, "ground_truth.not_applicable", float("nan"), layer=layer, detail=reason) for a in artefacts]
