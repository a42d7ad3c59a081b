"""Helpers the method adapters share: EP's centred-unit geometry, validated stream reading, build metering."""

from __future__ import annotations

import resource
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

import psutil
import torch

from methods.base import Cost

if TYPE_CHECKING:
    from bench.store import ActivationStore

EPS = 1e-12  # the same guard EP uses when normalising centred rows

class CenterAccumulator:
    """Running sums for the spherical mean centre c = <mean(x), m> * m, m = normalise(mean(x / ||x||))."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.sum_unit_D = torch.zeros(d, dtype=torch.float64, device=device)  # float64: millions of rows, no drift
        self.sum_D = torch.zeros(d, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, x_ND: torch.Tensor) -> None:
        x = x_ND.to(self.sum_D.device, torch.float64)
        self.sum_unit_D += (x / x.norm(dim=1, keepdim=True).clamp_min(EPS)).sum(0)
        self.sum_D += x.sum(0)
        self.n += x.shape[0]

    def center(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The centre [d] (float32 unless asked otherwise)."""
        if self.n == 0:
            raise ValueError("no rows were accumulated: cannot compute a centre")
        m_D = self.sum_unit_D / self.n
        m_D = m_D / m_D.norm().clamp_min(EPS)
        magnitude = torch.dot(self.sum_D / self.n, m_D)
        return (magnitude * m_D).to(dtype)


def spherical_center(x_ND: torch.Tensor) -> torch.Tensor:
    """EP's calibration centre of a block of rows: <mean(x), m> * m with m the spherical mean direction."""
    acc = CenterAccumulator(x_ND.shape[1])
    acc.update(x_ND)
    return acc.center()


def centred_unit(x_ND: torch.Tensor, center_D: torch.Tensor) -> torch.Tensor:
    """u = (x - c) / (||x - c|| + 1e-12), the rows on EP's centred unit sphere."""
    xc = x_ND - center_D
    return xc / (xc.norm(dim=1, keepdim=True) + EPS)


def check_rows(x_ND: torch.Tensor, where: str) -> torch.Tensor:
    """Float32 rows, refusing NaN/inf with the count of bad rows."""
    x_ND = x_ND.float()
    finite = torch.isfinite(x_ND).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{where}: {int((~finite).sum())} activation row(s) contain NaN/inf; "
                         "re-extract the store in float32 or drop the affected contexts")
    return x_ND


def stream_rows(
    store: "ActivationStore", layer: int, batch_contexts: int = 128, shuffle_seed: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validated (acts [N, d], context_ids [N]) per store batch, in stream order or a seeded block shuffle."""
    store.check_layer(layer)
    for batch in store.batches(layer, batch_contexts=batch_contexts, shuffle_seed=shuffle_seed):
        yield check_rows(batch.acts, f"store {store.id} layer {layer}"), batch.context_ids


def tokens_behind(context_ids: torch.Tensor) -> int:
    """Model tokens behind a set of rows: the rows plus one BOS per distinct context."""
    return int(context_ids.numel() + torch.unique(context_ids).numel())


class BuildMeter:
    """Wall time and peak memory growth of a build: process RSS on CPU, allocator peak on CUDA."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self._proc = psutil.Process()

    def __enter__(self) -> "BuildMeter":
        self.t0 = time.perf_counter()
        self.rss0 = self._proc.memory_info().rss
        self.peak_rss = self.rss0
        self.maxrss0 = self._maxrss()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda0 = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall_seconds = time.perf_counter() - self.t0
        self.sample()

    @staticmethod
    def _maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def sample(self) -> None:
        """Record the current RSS (call between batches; the kernel's high-water mark covers the rest)."""
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def peak_memory_bytes(self) -> int:
        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated(self.device) - self.cuda0)
        # A new process high-water mark during the build is exact; otherwise the sampled RSS is a lower bound.
        maxrss = self._maxrss()
        peak = maxrss if maxrss > self.maxrss0 else self.peak_rss
        return int(max(0, peak - self.rss0))

    def cost(self, rows: int, tokens: int, flops: float, extra_wall: float = 0.0) -> Cost:
        """The Cost of this build; `extra_wall` adds shared work (reading) done outside the meter."""
        return Cost(rows=int(rows), tokens=int(tokens), flops=float(flops),
                    wall_seconds=float(self.wall_seconds + extra_wall),
                    peak_memory_bytes=self.peak_memory_bytes(), device=self.device)


def base_info(store: "ActivationStore | None", layer: int, label: str, cost: Cost, **extra: Any) -> dict[str, Any]:
    """The info every baseline artefact records: label, cost, store provenance and library versions."""
    from bench.store import library_versions

    info: dict[str, Any] = {"label": label, "cost": cost.to_dict()}
    if store is not None:
        info.update(store.provenance(layer))
    else:
        info["layer"] = layer
    info["versions"] = library_versions() | extra.pop("versions", {})
    info.update(extra)
    return info


def dense_readouts(x_ND: torch.Tensor, center_D: torch.Tensor, dirs_KD: torch.Tensor, readout: str,
                   topk: int) -> torch.Tensor:
    """EP's readouts for unit directions about a centre: binary, topk, cosine, signed."""
    xc = x_ND - center_D
    signed = xc @ dirs_KD.T  # = ||x_c|| * cos, since directions are unit
    if readout == "signed":
        return signed
    cos = signed / (xc.norm(dim=1, keepdim=True) + EPS)
    if readout == "cosine":
        return cos
    if readout == "binary":
        return torch.zeros_like(cos).scatter_(1, cos.argmax(dim=1, keepdim=True), 1.0)
    if readout == "topk":
        if topk < 1:
            raise ValueError(f"the topk readout needs k >= 1, got {topk}")
        act = signed.clamp_min(0)
        vals, idx = act.topk(min(topk, act.shape[1]), dim=1)
        return torch.zeros_like(act).scatter_(1, idx, vals)
    raise ValueError(f"unknown readout {readout!r}; choose one of binary, topk, cosine, signed")


class PeakMemory:
    """Peak memory growth over a block: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device | str, interval: float = 0.005):
        self.device, self.interval, self.peak = torch.device(device), interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._proc.memory_info().rss)
            self.peak = int(self._max - self._base)
