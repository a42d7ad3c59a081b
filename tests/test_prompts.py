"""Causal prompt sets: the shipped facts (hand-written and countryinfo), deterministic contrasts and splits, user
jsonl files, and filter_correct (batched)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.prompts import (
    COUNTRY_SETS,
    COUNTRY_TEMPLATES,
    HANDWRITTEN_SETS,
    CausalPrompt,
    PromptSet,
    _render,
    filter_correct,
    get_prompt_set,
    load_prompt_file,
    load_prompt_jsonl,
    refusal_prompts,
    relation_counts,
)


@pytest.mark.parametrize("name", HANDWRITTEN_SETS)
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

    kept = filter_correct(ps, score_fn, batch_size=len(ps))  # one batch: indices above are prompt indices
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


# ---------------------------------------------------------------------------------------------------------
# countryinfo relations


def test_render_puts_the_space_on_the_answer():
    assert _render("The capital of {subject} is {answer}", "Chad") == ("The capital of Chad is", " ")
    assert _render('capital("{subject}") = "{answer}', "Chad") == ('capital("Chad") = "', "")
    assert _render("Q: {subject}?\nA:\n{answer}", "Chad") == ("Q: Chad?\nA:\n", "")
    with pytest.raises(ValueError, match="end with"):
        _render("{answer} is the capital of {subject}", "Chad")


@pytest.mark.parametrize("name", COUNTRY_SETS)
def test_country_sets_are_well_formed(name):
    ps = get_prompt_set(name)
    relation = name[len("country_"):]
    templates = COUNTRY_TEMPLATES[relation]
    assert len(templates) >= 3 and len(ps) >= 150 * len(templates) // 2 and ps.n_written == len(ps)
    assert len(set(ps.texts)) == len(ps)
    assert {p.template for p in ps.prompts} == {f"{relation}/{i}" for i in range(len(templates))}
    for p in ps.prompts:
        assert p.relation == relation and p.attribute == p.target.strip()
        # the template decides the leading space, and target and contrast share it
        prefix = _render(templates[int(p.template.split("/")[1])], "X")[1]
        assert p.target == prefix + p.attribute and p.contrast.startswith(prefix) and not p.prompt.endswith(" ")
        assert p.target.split()[0] != p.contrast.split()[0]
    assert get_prompt_set(name) == ps  # deterministic
    assert relation_counts(ps) == {relation: len(ps)}


def test_country_facts_match_countryinfo_and_common_knowledge():
    from countryinfo import CountryInfo

    caps = {(p.prompt, p.target) for p in get_prompt_set("country_capital").prompts}
    assert ("The capital of Germany is", " Berlin") in caps
    assert ('capital("France") = "Paris"\ncapital("Germany") = "', "Berlin") in caps  # no space after a quote
    assert not any(p.startswith("France: Paris") and p.endswith("\nFrance:") for p, _ in caps)  # few-shot subject
    for p in get_prompt_set("country_capital").prompts[::40]:  # oracle: countryinfo's own per-country lookup
        country = p.prompt[len("The capital of "):-len(" is")] if p.template == "capital/0" else None
        if country:
            assert CountryInfo(country).capital() == p.attribute
    cont = {p.prompt: p.attribute for p in get_prompt_set("country_continent").prompts}
    assert cont["Brazil is located on the continent of"] == "South America"
    assert cont["Canada is located on the continent of"] == "North America"
    assert cont["India is located on the continent of"] == "Asia"
    lang = {p.prompt: p.attribute for p in get_prompt_set("country_language").prompts}
    assert lang["The official language of Mexico is"] == "Spanish"
    dem = {p.prompt: p.attribute for p in get_prompt_set("country_demonym").prompts}
    assert dem["Country: Germany\nDemonym:"] == "German"


def test_country_contrasts_are_plausible():
    ps = get_prompt_set("country_capital")
    capitals = {p.attribute for p in ps.prompts}
    assert all(p.contrast.strip() in capitals and p.contrast != p.target for p in ps.prompts)
    cont = get_prompt_set("country_continent")
    assert {p.contrast.strip() for p in cont.prompts} <= {p.attribute for p in cont.prompts}


# ---------------------------------------------------------------------------------------------------------
# user jsonl files


def _jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_user_prompt_file(tmp_path):
    recs = [{"prompt": 'Say "', "target": "yes", "contrast": "no", "relation": "say", "template": "q1"},
            {"prompt": "The sky is", "target": " blue", "contrast": " green"}]
    f = _jsonl(tmp_path / "mine.jsonl", recs)
    ps = load_prompt_jsonl(f)
    assert ps.name == "mine" and ps.n_written == 2
    assert ps.prompts[0] == CausalPrompt('Say "', "yes", "no", "yes", "say", "q1")  # no space forced on answers
    assert ps.prompts[1] == CausalPrompt("The sky is", " blue", " green", "blue", "", "")
    assert get_prompt_set(str(f)) == ps and get_prompt_set(f"jsonl:{f}") == ps


@pytest.mark.parametrize("content, match", [
    ([{"prompt": "a", "target": " b"}], r"bad\.jsonl:1: missing or empty field\(s\) \['contrast'\]"),
    ([{"prompt": "a", "target": " b", "contrast": " c"}, "{oops"], r"bad\.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "target": " New York", "contrast": " New Delhi"}], r"bad\.jsonl:1: .*same word"),
    ([], r"bad\.jsonl: no prompts"),
])
def test_user_prompt_file_errors(tmp_path, content, match):
    f = _jsonl(tmp_path / "bad.jsonl", content)
    with pytest.raises(ValueError, match=match):
        load_prompt_jsonl(f)


def test_user_prompt_file_not_utf8_and_missing(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"prompt": "a", "target": " b", "contrast": " c"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not valid UTF-8"):
        load_prompt_jsonl(f)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        get_prompt_set(str(tmp_path / "absent.jsonl"))


# ---------------------------------------------------------------------------------------------------------
# filter_correct in batches, refusal prompts


def test_filter_correct_batches_give_the_unbatched_result():
    ps = get_prompt_set("country_continent")
    sizes = []

    def score_fn(prompts, targets, contrasts):
        sizes.append(len(prompts))
        # a deterministic per-prompt verdict that does not depend on the batch it arrives in
        ok = np.array([hash_ok(p, t) for p, t in zip(prompts, targets)])
        return np.where(ok, 1.0, -1.0), ok

    whole = filter_correct(ps, score_fn, batch_size=len(ps))
    assert sizes == [len(ps)]
    sizes.clear()
    batched = filter_correct(ps, score_fn, batch_size=7)
    assert max(sizes) == 7 and sum(sizes) == len(ps) and len(sizes) == -(-len(ps) // 7)
    assert batched == whole and 0 < batched.n_kept < len(ps)
    with pytest.raises(ValueError, match="batch_size"):
        filter_correct(ps, score_fn, batch_size=0)


def hash_ok(prompt, target):
    from bench.corpora import hash_unit

    return hash_unit(prompt + target) < 0.5


def test_refusal_prompts(tmp_path):
    rp = refusal_prompts()
    assert len(rp.harmful) == len(rp.harmless) >= 50
    assert len(set(rp.harmful)) == len(rp.harmful) and not set(rp.harmful) & set(rp.harmless)
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"harmful": ["a", "b", "c", "d"], "harmless": ["a"]}))
    with pytest.raises(ValueError, match="r.json: needs as many harmless"):
        refusal_prompts(bad)


@pytest.mark.slow
def test_country_prompts_answered_by_the_embedded_model(smollm2):
    """The real model answers a good share of a sample of the countryinfo prompts (all: see the README)."""
    ps = get_prompt_set("country_language")
    sample = PromptSet("sample", ps.prompts[::12], len(ps.prompts[::12]))
    kept = filter_correct(sample, smollm2.score_prompts)
    assert kept.n_kept >= 0.3 * len(sample) and kept.n_kept < len(sample)
