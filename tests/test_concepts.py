"""Concept sets: balance, split disjointness, no overlap with the build stream, determinism, AxBench loading."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench.concepts import (
    CATEGORIES,
    RELATED_LEXNAMES,
    RELATED_TOPICS,
    bbc_topics,
    get_concept_set,
    load_axbench,
    wordnet_lexnames,
)
from bench.corpora import LEXNAMES, get_corpus, wordnet_synsets


@pytest.fixture(scope="module")
def wn():
    return wordnet_lexnames()


@pytest.fixture(scope="module")
def bbc():
    return bbc_topics()


@pytest.fixture(scope="module")
def stream_units():
    """Every gloss line and paragraph of the default build stream, and its full text."""
    units, texts = set(), []
    for d in get_corpus("default").documents():
        texts.append(d.text)
        units.update(d.text.split("\n\n") if d.source.startswith("bbc/") else d.text.split("\n"))
    return units, "\x00".join(texts)


def _check_structure(cs):
    ex = cs.examples
    assert list(ex.columns[:6]) == ["example_id", "text_id", "text", "concept", "category", "split"]
    texts = cs.texts()
    assert len(texts) == len(set(texts))
    assert (ex["text"] == [texts[i] for i in ex["text_id"]]).all()
    # one text, one split: nothing seen in training is tested, for any concept
    assert (ex.groupby("text_id")["split"].nunique() == 1).all()
    for c in cs.concepts:
        rows = cs.for_concept(c)
        assert not set(rows[rows.split == "train"].text) & set(rows[rows.split == "test"].text)
        assert rows.groupby("text").size().max() == 1  # no text labelled twice for one concept


def test_wordnet_balanced_and_disjoint(wn):
    _check_structure(wn)
    assert len(wn.concepts) >= 35 and "noun.animal" in wn.concepts
    assert {"noun.Tops", "noun.motive"} <= set(wn.meta["skipped_too_few"])  # too small to be concepts
    counts = wn.counts()
    assert (counts.values == 20).all()  # 40 per concept, half train, equal negatives and hard negatives


def test_wordnet_labels_follow_lexnames(wn):
    lex_of = {s.text: s.lexname for s in wordnet_synsets("eval")}
    for c in ("noun.animal", "verb.motion", "adj.all"):
        rows = wn.for_concept(c)
        by_cat = {k: {lex_of[t] for t in g.text} for k, g in rows.groupby("category")}
        assert by_cat["positive"] == {c}
        assert by_cat["hard negative"] <= set(RELATED_LEXNAMES[c])
        assert not by_cat["negative"] & ({c} | set(RELATED_LEXNAMES[c]))


def test_related_lexnames_map():
    assert set(RELATED_LEXNAMES) == set(LEXNAMES)
    for lex, rel in RELATED_LEXNAMES.items():
        assert rel and lex not in rel and set(rel) <= set(LEXNAMES)
        if not lex.startswith("adv."):
            assert all(r.split(".")[0] == lex.split(".")[0] for r in rel)


def test_bbc_balanced_and_related(bbc):
    _check_structure(bbc)
    assert bbc.concepts == ["business", "entertainment", "politics", "sport", "tech"]
    assert (bbc.counts().values == 40).all()
    topic_of = {}
    for c in bbc.concepts:
        topic_of.update({t: c for t in bbc.for_concept(c).query("category == 'positive'").text})
    for c in bbc.concepts:
        hard = bbc.for_concept(c).query("category == 'hard negative'").text
        assert {topic_of[t] for t in hard} == set(RELATED_TOPICS[c])


def test_no_concept_text_in_build_stream(wn, bbc, stream_units):
    units, joined = stream_units
    for cs in (wn, bbc):
        texts = cs.texts()
        assert not set(texts) & units
        for t in texts[::25]:  # substring check on a sample: the full check is the unit set above
            assert t not in joined


def test_determinism():
    a = wordnet_lexnames(n_concepts=4, per_concept=10, seed=3)
    b = wordnet_lexnames(n_concepts=4, per_concept=10, seed=3)
    c = wordnet_lexnames(n_concepts=4, per_concept=10, seed=4)
    pd.testing.assert_frame_equal(a.examples, b.examples)
    assert a.concepts == b.concepts and len(a.concepts) == 4
    assert not a.examples["text"].equals(c.examples["text"])
    pd.testing.assert_frame_equal(bbc_topics(per_concept=20, seed=1).examples,
                                  bbc_topics(per_concept=20, seed=1).examples)


def test_as_corpus(bbc):
    corpus = bbc.as_corpus()
    docs = list(corpus.documents())
    assert [d.text for d in docs] == bbc.texts() and [d.doc_id for d in docs] == list(range(len(docs)))
    assert corpus.fingerprint() == bbc_topics().as_corpus().fingerprint()


def test_get_concept_set_specs():
    assert get_concept_set("bbc", per_concept=10).name == "bbc"
    with pytest.raises(ValueError, match="wordnet, bbc, axbench:"):
        get_concept_set("imdb")


# ----------------------------------------------------------------------------------------------
# AxBench


def _write_axbench(root, train=None, test=None, meta=None):
    (root / "generate").mkdir(parents=True)
    (root / "inference").mkdir()
    if meta is None:
        meta = [{"concept_id": 0, "concept": "rental services"}, {"concept_id": 1, "concept": "C++ syntax"},
                {"concept_id": 2, "concept": "fantasy worlds"}]
    (root / "generate" / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    if train is None:
        train = [("in", f"c{c} positive {i}", "x", c, "positive") for c in (0, 1, 2) for i in range(3)]
        train += [("in", f"shared negative {i}", "EEEEE", -1, "negative") for i in range(4)]
    if test is None:
        test = []
        for c in (0, 1, 2):
            test += [("in", f"c{c} test positive {i}", "x", c, "positive") for i in range(2)]
            test += [("in", f"c{c} test negative {i}", "x", c, "negative") for i in range(2)]
            # AxBench hard negatives name the contrast concepts in output_concept, not the concept itself
            test += [("in", f"c{c} hard {i}", "bank//river", c, "hard negative") for i in range(2)]
        test.append(("in", "c0 positive 0", "x", 0, "positive"))  # leaked from train: dropped
    cols = ["input", "output", "output_concept", "concept_id", "category"]
    pd.DataFrame(train, columns=cols).to_parquet(root / "generate" / "train_data.parquet")
    pd.DataFrame(test, columns=cols).to_parquet(root / "inference" / "latent_eval_data.parquet")
    return root


def test_load_axbench_keeps_hard_negatives(tmp_path):
    root = _write_axbench(tmp_path / "prod_2b_l20_v1")
    cs = load_axbench(root)
    _check_structure(cs)
    assert cs.concepts == ["rental services", "C++ syntax", "fantasy worlds"]
    counts = cs.counts()
    for c in cs.concepts:
        assert counts.loc[(c, "test"), "hard negative"] == 2
        assert counts.loc[(c, "test"), "positive"] == 2 and counts.loc[(c, "test"), "negative"] == 2
        # the 4 shared (concept_id -1) negatives are negatives of every concept
        assert counts.loc[(c, "train"), "negative"] == 4 and counts.loc[(c, "train"), "positive"] == 3
    assert cs.meta["dropped_test_overlap"] == 1
    assert len(cs.texts()) == 9 + 4 + 18  # each shared negative stored once
    assert get_concept_set(f"axbench:{root}").examples.equals(cs.examples)


def test_load_axbench_selection(tmp_path):
    root = _write_axbench(tmp_path / "ax")
    assert load_axbench(root, concept_ids=[2]).concepts == ["fantasy worlds"]
    assert load_axbench(root, max_concepts=2).concepts == ["rental services", "C++ syntax"]
    with pytest.raises(ValueError, match=r"concept_id\(s\) \[7\]"):
        load_axbench(root, concept_ids=[7])


def test_load_axbench_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="AxBench folder not found"):
        load_axbench(tmp_path / "absent")
    root = _write_axbench(tmp_path / "a")
    (root / "inference" / "latent_eval_data.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="latent_eval_data.parquet"):
        load_axbench(root)
    bad = [("in", "text", "x", 0, "positive")]
    root = _write_axbench(tmp_path / "b", train=bad)
    pd.DataFrame({"input": ["in"], "concept_id": [0], "category": ["positive"]}).to_parquet(
        root / "generate" / "train_data.parquet")
    with pytest.raises(ValueError, match=r"train_data\.parquet: missing column 'output'"):
        load_axbench(root)
    root = _write_axbench(tmp_path / "c", train=[("in", "t", "x", 0, "neutral")])
    with pytest.raises(ValueError, match=r"unknown value\(s\) \['neutral'\]"):
        load_axbench(root)
    root = _write_axbench(tmp_path / "d", meta=[{"concept_id": 0, "concept": "only one"}])
    with pytest.raises(ValueError, match="no concept name"):
        load_axbench(root)


def test_categories_constant():
    assert CATEGORIES == ("positive", "negative", "hard negative")
