"""Per-text activations for evaluation data (concept sets, OOD corpora), read back from the activation store."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TextActivations(NamedTuple):
    """Token rows of a list of texts at one layer (BOS excluded); rows grouped by text, in order."""

    acts: torch.Tensor  # [N, d] float32
    text_ids: torch.Tensor  # [N] int64 in 0..n_texts-1
    n_texts: int


def pool_max(features: torch.Tensor, text_ids: torch.Tensor, n_texts: int) -> torch.Tensor:
    """Per-text maximum over tokens of per-token features [N, K] -> [n_texts, K] (AxBench's latent score)."""
    out = torch.full((n_texts, features.shape[1]), float("-inf"), dtype=features.dtype)
    return out.scatter_reduce(0, text_ids.view(-1, 1).expand_as(features), features, reduce="amax")


def pool_mean(features: torch.Tensor, text_ids: torch.Tensor, n_texts: int) -> torch.Tensor:
    """Per-text mean over tokens [n_texts, K] (SAEBench sparse-probing pooling)."""
    sums = torch.zeros((n_texts, features.shape[1]), dtype=features.dtype).index_add_(0, text_ids, features)
    counts = torch.bincount(text_ids, minlength=n_texts).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]
