"""Frozen-random-decoder SAE: the decoder is fixed at random unit directions, only the encoder is trained.

The baseline of arXiv 2602.14111: if an SAE whose dictionary is random directions scores like a trained one, the
metric measures the encoder's fit, not the dictionary. Here: W_dec [K, d] = `random_unit_directions(width, d, seed)`
(uniform on the sphere, the same draw as the `random` method's), never updated; W_enc [d, K] (initialised to
W_dec^T, as sae-lens does), b_enc [K] and b_dec [d] (initialised to the training pool's mean) are trained with
Adam on the TopK reconstruction loss ||x - x_hat||^2 summed over d, mean over rows, where
f = TopK_k(ReLU-after-top-k of (x - b_dec) W_enc + b_enc) (sae-lens' TopK: the k largest pre-activations, ReLU),
x_hat = f W_dec + b_dec. No auxiliary dead-latent loss.

Conventions follow methods/sae.py's trained TopK: `k`, `lr` (3e-4), `batch_rows`, the held-out tail of the store
(`heldout_frac`), the stopping rule (best held-out NMSE of the last `converge_window` of steps < `converge_tol`
below the best before, then a linear lr decay over `lr_decay_frac` of the run; caps `training_tokens` /
`max_epochs`), rows scaled to mean norm sqrt(d) while training (`normalize_activations`) with the scale folded
into b_enc and b_dec at the end (TopK is positively homogeneous, so W_enc and the frozen W_dec are unchanged), and
`token_budget` (train on the store prefix EP reads first). Tensors: W_enc, W_dec, b_enc, b_dec; `to_sae_lens()`
rebuilds the equivalent sae-lens TopK SAE.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Sequence

import torch

from methods.base import Artefact, Method, MethodConfig
from methods.common import PeakMemory

if TYPE_CHECKING:
    from bench.store import ActivationStore

NORMALIZATIONS = ("none", "expected_average_only_in")


@dataclasses.dataclass
class FrozenDecoderSAEConfig(MethodConfig):
    """A TopK SAE whose decoder stays at random unit directions; the encoder and both biases are trained."""

    width: int = 4096  # number of latents K (random decoder directions)
    k: int = 32  # active latents per row (TopK)
    training_tokens: int = 2_000_000  # cap on rows trained on (the pool is looped over as often as needed)
    max_epochs: float | None = None  # cap on passes over the training pool (None: only training_tokens caps)
    converge_tol: float = 0.01  # stop once held-out NMSE improved by < this fraction over the last window; 0: cap
    converge_window: float = 0.1  # the window: this fraction of the steps taken so far
    converge_min_steps: int = 200  # the rule is checked from this step on
    eval_every: int = 0  # steps between held-out evaluations; 0: auto (cap / 100, eval <= 11% of training)
    heldout_frac: float = 0.1  # the store's last contexts (store order) held out of training
    heldout_max_rows: int = 8192  # held-out rows evaluated
    token_budget: int | None = None  # train only on the store prefix of this many tokens
    lr: float = 3e-4  # Adam learning rate: constant until the stopping rule, then linear decay to 0
    lr_decay_frac: float = 0.2  # the decay's share of the run
    batch_rows: int = 4096  # rows per optimiser step
    buffer_rows: int = 65_536  # sae-lens mixing buffer: rows shuffled together before batches are served
    normalize_activations: str = "expected_average_only_in"  # rows scaled to mean norm sqrt(d), folded in; or none
    dense_threshold: float = 0.1  # a latent active on more than this fraction of held-out rows counts as dense
    seed: int = 0  # the random decoder, encoder init, store shuffle and mixing-buffer order
    device: str | None = None  # None: CUDA when available
    progress: bool = False  # a per-batch row bar

    def __post_init__(self) -> None:
        if self.width <= 0 or not 0 < self.k <= self.width:
            raise ValueError(f"need width > 0 and 1 <= k <= width, got width={self.width}, k={self.k}")
        if self.batch_rows <= 0 or self.training_tokens < self.batch_rows or self.buffer_rows < self.batch_rows:
            raise ValueError(f"need 0 < batch_rows <= training_tokens and buffer_rows >= batch_rows, got "
                             f"{self.batch_rows}, {self.training_tokens}, {self.buffer_rows}")
        if self.lr <= 0 or not 0 <= self.lr_decay_frac < 1:
            raise ValueError(f"need lr > 0 and 0 <= lr_decay_frac < 1, got {self.lr}, {self.lr_decay_frac}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got "
                             f"{self.normalize_activations!r}")
        if not 0 < self.heldout_frac < 1 or self.heldout_max_rows < 1 or not 0 < self.converge_window < 1:
            raise ValueError("need 0 < heldout_frac < 1, heldout_max_rows >= 1 and 0 < converge_window < 1")


class FrozenDecoderSAEArtefact(Artefact):
    """W_enc [d, K], W_dec [K, d] (the frozen random unit directions), b_enc [K], b_dec [d]."""

    method = "frozen_sae"
    reconstructs = True
    readouts = ("latent", "pre")
    config_cls = FrozenDecoderSAEConfig
    tensor_shapes = {"W_enc": ("d", "K"), "W_dec": ("K", "d"), "b_enc": ("K",), "b_dec": ("d",)}

    @property
    def directions(self) -> torch.Tensor:
        w = self.tensors["W_dec"].float()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        """TopK latents [N, K] (`latent`, default) or the dense pre-activations (`pre`)."""
        readout = readout or "latent"
        if readout not in self.readouts:
            raise ValueError(f"{self.name}: unknown readout {readout!r}; choose one of {self.readouts}")
        x = self.check_input(x)
        t = {k: v.to(x.device, torch.float32) for k, v in self.tensors.items()}
        pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
        return pre if readout == "pre" else _topk(pre, int(self.config.k))

    @torch.no_grad()
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        if f.ndim != 2 or f.shape[1] != self.K:
            raise ValueError(f"{self.name}: expected features [N, {self.K}], got {tuple(f.shape)}")
        return f.float() @ self.tensors["W_dec"].to(f.device).float() + self.tensors["b_dec"].to(f.device).float()

    def ablate_latents(self, x: torch.Tensor, features: Sequence[int]) -> torch.Tensor:
        f = self.encode(x)
        keep = torch.zeros(self.K, dtype=f.dtype, device=f.device)
        keep[list(features)] = 1.0
        return x - (self.decode(f * keep) - self.tensors["b_dec"].to(f.device).float())

    def to_sae_lens(self) -> Any:
        """The equivalent sae-lens inference TopK SAE (b_dec subtracted from the input, as here)."""
        from sae_lens import SAE

        sae = SAE.from_dict({"architecture": "topk", "d_in": self.d_model, "d_sae": self.K, "k": int(self.config.k),
                             "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                             "normalize_activations": "none", "rescale_acts_by_decoder_norm": False,
                             "metadata": {"model_name": self.info.get("model"), "hook_name": self.info.get("hook")}})
        sae.load_state_dict({k: v.float() for k, v in self.tensors.items()})
        return sae


def _topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter_(1, idx, vals.relu())


def _nmse(x: torch.Tensor, params: dict[str, torch.Tensor], W_dec: torch.Tensor, k: int) -> tuple[float, float]:
    """(held-out NMSE about the mean, mean L0) of the current parameters on rows x (already scaled)."""
    with torch.no_grad():
        f = _topk((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], k)
        err = float((x - (f @ W_dec + params["b_dec"])).pow(2).sum())
        var = float((x.double() - x.double().mean(0)).pow(2).sum())
        return err / var if var > 0 else float("inf"), float((f != 0).sum(1).float().mean())


class FrozenDecoderSAE(Method):
    """Train the encoder of a TopK SAE whose decoder is fixed at random unit directions."""

    name = "frozen_sae"
    config_cls = FrozenDecoderSAEConfig
    artefact_cls = FrozenDecoderSAEArtefact
    size_param = "width"  # what K-matching (MethodSpec match="K") sets

    def fit(self, store: "ActivationStore", layer: int,
            concepts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> FrozenDecoderSAEArtefact:
        from sae_lens.training.mixing_buffer import mixing_buffer
        from tqdm.auto import tqdm

        from bench.store import library_versions
        from methods.random_directions import random_unit_directions
        from methods.sae import _Convergence, _linear_decay, _Meter, _pool_batches, _split, training_flops

        cfg: FrozenDecoderSAEConfig = self.config
        store.check_layer(layer)
        d = store.d_model
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        split = _split(cfg, store, layer)
        cap_rows = cfg.training_tokens if cfg.max_epochs is None else \
            min(cfg.training_tokens, math.ceil(cfg.max_epochs * split.train_rows))
        cap_steps = max(1, cap_rows // cfg.batch_rows)
        decay_cap = round(cfg.lr_decay_frac * cap_steps)
        held = split.heldout_rows.to(device)
        eval_every = cfg.eval_every or max(1, cap_steps // 100, math.ceil(3 * held.shape[0] / cfg.batch_rows))
        meter = _Meter()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        curve: dict[str, list[float]] = {"step": [], "rows": [], "heldout_nmse": [], "l0": [], "lr": [],
                                         "train_loss": []}
        bar = tqdm(unit="row", unit_scale=True, disable=not cfg.progress,
                   desc=f"train frozen-decoder SAE w{cfg.width} on {store.model} L{layer}")
        with PeakMemory(device) as mem, torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)
            W_dec = random_unit_directions(cfg.width, d, cfg.seed).to(device)  # frozen: never given to the optimiser
            W_dec_init = W_dec.clone()
            rows = mixing_buffer(cfg.buffer_rows, cfg.batch_rows,
                                 _pool_batches(store, layer, split.train_contexts, cfg.seed, meter))

            def draw() -> torch.Tensor:
                b = next(rows).to(device)
                meter.rows += b.shape[0]
                return b

            # the first batches set the activation scale, then are trained on like every other batch
            first = [draw() for _ in range(max(1, min(8, split.train_rows // cfg.batch_rows)))]
            scale = 1.0
            if cfg.normalize_activations == "expected_average_only_in":
                scale = math.sqrt(d) / float(torch.cat(first).norm(dim=1).mean())
            params = {"W_enc": W_dec.T.clone().contiguous(), "b_enc": torch.zeros(cfg.width, device=device),
                      "b_dec": split.train_mean.float().to(device) * scale}
            for p in params.values():
                p.requires_grad_(True)
            opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
            sched = None
            conv = _Convergence(cfg.converge_tol, cfg.converge_window, eval_every, cfg.converge_min_steps)
            held_s = held * scale
            window: list[float] = []

            def evaluate(step: int) -> str | None:
                nmse, l0 = _nmse(held_s, params, W_dec, cfg.k)
                for key, v in (("step", step), ("rows", step * cfg.batch_rows), ("heldout_nmse", nmse), ("l0", l0),
                               ("lr", opt.param_groups[0]["lr"]),
                               ("train_loss", sum(window) / len(window) if window else float("nan"))):
                    curve[key].append(v)
                window.clear()
                return conv.add(step, nmse) if decay_start is None else None

            stop_reason, decay_start, step, end = "", None, 0, cap_steps
            evaluate(0)
            pending = list(first)
            while step < end:
                x = (pending.pop(0) if pending else draw()) * scale
                f = _topk((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], cfg.k)
                loss = (f @ W_dec + params["b_dec"] - x).pow(2).sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                window.append(float(loss.detach()))
                step += 1
                bar.update(x.shape[0])
                if step % eval_every == 0 or step == end:
                    why = evaluate(step)
                    if step == end and not stop_reason:
                        stop_reason = f"cap: {cap_steps} steps ({cap_rows} rows = {cap_rows / split.train_rows:.2f} " \
                                      "epochs of the pool)"
                    if why and decay_start is None:
                        stop_reason, decay_start = why, step
                        end = min(cap_steps, step + round(step * cfg.lr_decay_frac / (1 - cfg.lr_decay_frac)))
                if decay_start is None and decay_cap > 0 and step >= cap_steps - decay_cap:
                    decay_start = step
                if decay_start == step and end > step:
                    sched = _linear_decay(opt, end - step)
            bar.close()
            if not torch.equal(W_dec, W_dec_init):
                raise RuntimeError("frozen_sae: the decoder changed during training (it must stay frozen)")
            tensors = {"W_enc": params["W_enc"].detach().float().cpu().contiguous(),
                       "W_dec": W_dec.float().cpu().contiguous(),
                       "b_enc": (params["b_enc"].detach() / scale).float().cpu().contiguous(),
                       "b_dec": (params["b_dec"].detach() / scale).float().cpu().contiguous()}
        wall = time.perf_counter() - t0
        trained = step * cfg.batch_rows
        info = {**store.provenance(layer), "versions": library_versions(),
                "label": f"frozen_sae:w{cfg.width}-k{cfg.k}" + (
                    f"-tokens{cfg.token_budget}" if cfg.token_budget is not None else ""),
                "decoder": f"frozen: random_unit_directions({cfg.width}, {d}, seed={cfg.seed})",
                "activation_scale": scale,
                "training": {"rows": trained, "steps": step, "epochs": trained / split.train_rows,
                             "converged": stop_reason.startswith("converged"), "stop_reason": stop_reason,
                             "lr_decay_start_step": decay_start, "eval_every": eval_every, "cap_steps": cap_steps,
                             "curve": curve},
                "budget": {"token_budget": cfg.token_budget, "pool_tokens": split.train_tokens,
                           "pool_rows": split.train_rows, "rows_trained": trained,
                           "budget_clamped_to_pool": split.budget_clamped},
                "cost": {"rows": meter.rows, "tokens": meter.tokens, "flops": training_flops(trained, cfg.width, d),
                         "wall_seconds": wall, "peak_memory_bytes": mem.peak, "device": device}}
        art = FrozenDecoderSAEArtefact(cfg, tensors, info)
        x = split.heldout_rows
        xh = art.decode(art.encode(x))
        var = float((x.double() - x.double().mean(0)).pow(2).sum())
        art.info["explained_variance"] = 1.0 - float((x - xh).double().pow(2).sum()) / var
        return art
