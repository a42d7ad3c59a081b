"""Causal prompt sets: prompts with a measurable next-token target and a contrast answer, built from
facts we wrote ourselves (bench/data/*.json), for causal-intervention metrics.

Each prompt's `target` and `contrast` carry the leading space they have after the prompt (" Paris").
Scores are taken on their *first token* only: multi-token answers (" Buenos Aires") are judged by
" Buenos", and contrasts are chosen so their first word differs from the target's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from bench.corpora import hash_unit

DATA_DIR = Path(__file__).parent / "data"
PROMPT_SETS = ("capitals", "city_country", "city_continent", "first_letter")


class CausalPrompt(NamedTuple):
    prompt: str  # ends right before the answer, no trailing space
    target: str  # correct answer with its leading space, e.g. " Paris"
    contrast: str  # another set member's answer, e.g. " Berlin"
    attribute: str  # the target value without the space ("Paris", "Europe", "A"): groups prompts by answer


# score_fn(prompts, targets, contrasts) -> (logit(target) - logit(contrast), target is the top-1 token),
# both over the first token of target/contrast; supplied by the model backend.
ScoreFn = Callable[[list[str], list[str], list[str]], tuple[np.ndarray, np.ndarray]]


@dataclass
class PromptSet:
    """A named list of causal prompts; `n_kept` is set once filtered to those the model gets right."""

    name: str
    prompts: list[CausalPrompt]
    n_written: int
    n_kept: int | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.prompt for p in self.prompts]

    @property
    def targets(self) -> list[str]:
        return [p.target for p in self.prompts]

    @property
    def contrasts(self) -> list[str]:
        return [p.contrast for p in self.prompts]

    def split(self, train_frac: float = 0.5, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """Seeded train/test split, stratified by attribute (each answer value spread over both halves)."""
        if not 0 < train_frac < 1:
            raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")

        # Order by (random key of the attribute, random key of the prompt), then deal prompts out at the
        # train_frac rate: prompts sharing an attribute are adjacent, so they land in both halves.
        def key(i: int) -> tuple[float, float, int]:
            p = self.prompts[i]
            return (hash_unit(f"split-attr:{seed}:{p.attribute}"), hash_unit(f"split:{seed}:{p.prompt}"), i)

        order = sorted(range(len(self.prompts)), key=key)
        train_idx = sorted(i for r, i in enumerate(order) if int((r + 1) * train_frac) > int(r * train_frac))
        test_idx = sorted(set(range(len(self.prompts))) - set(train_idx))

        def part(idx: list[int], suffix: str) -> PromptSet:
            n_kept = None if self.n_kept is None else len(idx)
            return PromptSet(f"{self.name}/{suffix}", [self.prompts[i] for i in idx], len(idx), n_kept)

        return part(train_idx, "train"), part(test_idx, "test")


def _first_word(answer: str) -> str:
    return answer.split()[0] if answer.split() else answer


def _contrast_index(subjects: list[str], answers: list[str], i: int) -> int:
    """A hash-chosen other item whose answer starts with a different word: deterministic, never the target."""
    cands = [j for j in range(len(answers)) if _first_word(answers[j]) != _first_word(answers[i])]
    if not cands:
        raise ValueError(f"prompt set has no answer different from {answers[i]!r} to contrast with")
    return cands[int(hash_unit(f"contrast:{subjects[i]}") * len(cands))]


def load_prompt_file(path: str | Path) -> PromptSet:
    """Build a prompt set from a json file: {name, template with {subject}, items: [{subject, answer}]}."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        name, template, items = spec["name"], spec["template"], spec["items"]
        subjects = [str(it["subject"]) for it in items]
        answers = [str(it["answer"]).strip() for it in items]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected JSON with name, template and items of subject/answer "
                         f"({type(e).__name__}: {e})") from None
    if "{subject}" not in template:
        raise ValueError(f"{path}: template must contain {{subject}}")
    prompts = []
    for i, (subject, answer) in enumerate(zip(subjects, answers)):
        contrast = answers[_contrast_index(subjects, answers, i)]
        prompts.append(CausalPrompt(template.format(subject=subject).rstrip(), " " + answer, " " + contrast, answer))
    return PromptSet(name, prompts, n_written=len(prompts))


def get_prompt_set(name: str) -> PromptSet:
    """One of the shipped prompt sets: capitals, city_country, city_continent, first_letter."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; valid: {', '.join(PROMPT_SETS)}")
    return load_prompt_file(DATA_DIR / f"{name}.json")


def filter_correct(prompt_set: PromptSet, score_fn: ScoreFn) -> PromptSet:
    """Keep the prompts the model gets right: target logit > contrast logit and target's first token is top-1."""
    n = len(prompt_set.prompts)
    if n == 0:
        return PromptSet(prompt_set.name, [], prompt_set.n_written, 0)
    logit_diff, top1 = score_fn(prompt_set.texts, prompt_set.targets, prompt_set.contrasts)
    logit_diff = np.asarray(logit_diff, dtype=np.float64).reshape(-1)
    top1 = np.asarray(top1).reshape(-1)
    if logit_diff.shape != (n,) or top1.shape != (n,):
        raise ValueError(f"score_fn returned shapes {logit_diff.shape} and {top1.shape}; expected ({n},) each")
    keep = (logit_diff > 0) & top1.astype(bool)  # NaN compares False, so a NaN score drops the prompt
    kept = [p for p, k in zip(prompt_set.prompts, keep) if k]
    return PromptSet(prompt_set.name, kept, prompt_set.n_written, len(kept))
