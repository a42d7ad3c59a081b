"""Causal prompt sets: the shipped facts, deterministic contrasts and splits, and filter_correct."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.prompts import PROMPT_SETS, CausalPrompt, PromptSet, filter_correct, get_prompt_set, load_prompt_file


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_prompt_sets_are_well_formed(name):
    ps = get_prompt_set(name)
    assert ps.name == name and len(ps) >= 40 and ps.n_written == len(ps) and ps.n_kept is None
    assert len(set(ps.texts)) == len(ps)
    for p in ps.prompts:
        assert isinstance(p, CausalPrompt)
        assert p.target.startswith(" ") and p.contrast.startswith(" ") and not p.prompt.endswith(" ")
        assert p.target.split()[0] != p.contrast.split()[0]  # first tokens can differ
        assert p.attribute == p.target.strip()
        assert p.contrast in {q.target for q in ps.prompts}  # contrast is another member's answer
    assert get_prompt_set(name) == ps  # deterministic


def test_known_prompts():
    caps = {p.prompt: p.target for p in get_prompt_set("capitals").prompts}
    assert caps["The capital of France is"] == " Paris"
    cont = {p.prompt: p.target for p in get_prompt_set("city_continent").prompts}
    assert cont["Lima is a city on the continent of"] == " South America"
    letters = get_prompt_set("first_letter").prompts
    assert all(p.target == " " + p.prompt.split('"')[-2][0].upper() for p in letters)


def test_split_is_disjoint_deterministic_and_stratified():
    ps = get_prompt_set("city_continent")
    train, test = ps.split(0.5, seed=0)
    assert len(train) + len(test) == len(ps) and len(train) == 20
    assert not set(train.texts) & set(test.texts)
    assert train == ps.split(0.5, seed=0)[0]
    assert train.texts != ps.split(0.5, seed=1)[0].texts
    assert {p.attribute for p in train.prompts} == {p.attribute for p in test.prompts}  # every continent in both
    assert train.name == "city_continent/train"
    with pytest.raises(ValueError):
        ps.split(1.0)


def test_filter_correct_with_fake_scores():
    ps = get_prompt_set("capitals")
    seen = {}

    def score_fn(prompts, targets, contrasts):
        seen["args"] = (prompts, targets, contrasts)
        n = len(prompts)
        diff = np.where(np.arange(n) % 2 == 0, 1.5, -0.5)  # even prompts prefer the target
        top1 = np.arange(n) % 4 != 0  # ... but every 4th is not the model's top-1
        diff[2] = np.nan
        return diff, top1

    kept = filter_correct(ps, score_fn)
    assert seen["args"] == (ps.texts, ps.targets, ps.contrasts)
    expect = [p for i, p in enumerate(ps.prompts) if i % 2 == 0 and i % 4 != 0 and i != 2]
    assert kept.prompts == expect and kept.n_kept == len(expect) and kept.n_written == len(ps)
    a, b = kept.split()
    assert a.n_kept == len(a) and b.n_kept == len(b)


def test_filter_correct_rejects_wrong_shapes():
    ps = get_prompt_set("first_letter")
    with pytest.raises(ValueError, match="expected"):
        filter_correct(ps, lambda p, t, c: (np.zeros(3), np.ones(3, bool)))
    empty = PromptSet("e", [], 0)
    assert filter_correct(empty, lambda p, t, c: 1 / 0).n_kept == 0


def test_unknown_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="capitals, city_country, city_continent, first_letter"):
        get_prompt_set("colours")
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"name": "x", "template": "no slot", "items": []}))
    with pytest.raises(ValueError, match="subject"):
        load_prompt_file(p)
