"""Concept sets: balance, split disjointness, no overlap with the build stream, determinism, the 50-test-example
sizes and their summary, truncation counts, AxBench loading and the user's jsonl/csv files."""

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
    load_concept_file,
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
    with pytest.raises(ValueError, match="wordnet, bbc, saeprobes.*, axbench:"):
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


# ----------------------------------------------------------------------------------------------
# Sizes: 50 test examples per class, summary, truncation


@pytest.fixture(scope="module")
def wn50():
    return wordnet_lexnames(test_examples=50)


def test_wordnet_fifty_test_examples_per_class(wn50, stream_units):
    _check_structure(wn50)
    eval_count = {}
    for syn in wordnet_synsets("eval"):
        eval_count[syn.lexname] = eval_count.get(syn.lexname, 0) + 1
    # oracle: every lexname with >= 60 held-out glosses (50 test + 10 train) is a concept
    assert len(wn50.concepts) >= 40
    assert set(wn50.concepts) <= {lex for lex, n in eval_count.items() if n >= 60}
    counts = wn50.counts()
    test = counts.xs("test", level="split")
    assert (test.values == 50).all()  # positives, negatives and hard negatives
    train = counts.xs("train", level="split")
    assert (train.values >= 10).all() and (train.values <= 50).all()
    assert not set(wn50.texts()) & stream_units[0]  # still disjoint from the build stream
    s = wn50.summary()
    assert s.n_concepts == len(wn50.concepts) and s.short_concepts == [] and s.target_test == 50
    assert s.min_per_class["test"] == {c: 50 for c in CATEGORIES}
    assert s.total_per_class["test"]["positive"] == 50 * len(wn50.concepts)
    assert s.total_per_class["train"]["negative"] == int(train["negative"].sum())
    assert s.n_texts == len(wn50.texts()) and s.n_examples == len(wn50.examples)
    assert s.to_dict()["min_per_class"]["train"]["positive"] == int(train["positive"].min())


def test_bbc_fifty_test_examples_and_short_summary():
    b = bbc_topics(test_examples=50)
    _check_structure(b)
    assert (b.counts().values == 50).all()
    small = wordnet_lexnames(n_concepts=3, per_concept=10)
    s = small.summary()
    assert s.short_concepts == small.concepts and s.min_per_class["test"]["positive"] == 5


def test_count_truncated_matches_a_direct_count(wn):
    from bench.models import byte_tokenizer

    texts = wn.texts()
    words = wn.count_truncated(lambda t: t.split(), ctx_len=12)  # a function text -> ids
    expect = sum(len(t.split()) > 11 for t in texts)  # a context holds BOS + ctx_len - 1 tokens
    assert (words.n_texts, words.n_truncated) == (len(texts), expect) and 0 < expect < len(texts)
    assert words.share == pytest.approx(expect / len(texts))
    assert words.max_tokens == max(len(t.split()) for t in texts)
    tok = wn.count_truncated(byte_tokenizer(), ctx_len=64)  # a Hugging Face tokenizer: one token per byte
    assert tok.n_truncated == sum(len(t.encode()) > 63 for t in texts)
    assert tok.to_dict()["ctx_len"] == 64
    with pytest.raises(ValueError, match="ctx_len"):
        wn.count_truncated(byte_tokenizer(), ctx_len=1)


# ----------------------------------------------------------------------------------------------
# The user's own files


def _user_rows():
    rows = []
    for c in ("cats", "boats"):
        for split in ("train", "test"):
            rows += [{"text": f"{c} {split} pos {i}", "concept": c, "category": "positive", "split": split}
                     for i in range(3)]
            rows += [{"text": f"{c} {split} neg {i}", "concept": c, "category": "negative", "split": split}
                     for i in range(2)]
            rows.append({"text": f"{c} {split} hard", "concept": c, "category": "hard_negative", "split": split})
    return rows


def _write_user(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
                        encoding="utf-8")
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_user_concept_file(tmp_path, fmt):
    rows = _user_rows()
    path = _write_user(tmp_path / f"mine.{fmt}", rows, fmt)
    cs = get_concept_set(f"{fmt}:{path}")
    _check_structure(cs)
    assert cs.name == f"{fmt}:mine" and cs.concepts == ["cats", "boats"]
    counts = cs.counts()
    assert (counts["positive"] == 3).all() and (counts["negative"] == 2).all()
    assert (counts["hard negative"] == 1).all()  # hard_negative in the file
    got = sorted(zip(cs.examples.text, cs.examples.concept, cs.examples.split))
    assert got == sorted((r["text"], r["concept"], r["split"]) for r in rows)
    assert cs.summary().min_per_class["test"] == {"positive": 3, "negative": 2, "hard negative": 1}
    assert load_concept_file(path).examples.equals(cs.examples)


def test_user_concept_file_errors(tmp_path):
    rows = _user_rows()

    def fails(name, content, match, fmt="jsonl"):
        path = _write_user(tmp_path / f"{name}.{fmt}", content, fmt)
        with pytest.raises(ValueError, match=match):
            get_concept_set(f"{fmt}:{path}")

    fails("nocol", [{k: v for k, v in r.items() if k != "split"} for r in rows], r"nocol\.jsonl:1: missing column")
    fails("nocolcsv", [{k: v for k, v in r.items() if k != "concept"} for r in rows],
          r"nocolcsv\.csv:1: missing column\(s\) \['concept'\]", fmt="csv")
    fails("cat", rows[:4] + [{**rows[4], "category": "neutral"}], r"cat\.jsonl:5: unknown category 'neutral'")
    fails("catcsv", rows[:4] + [{**rows[4], "category": "neutral"}], r"catcsv\.csv:6: unknown category", fmt="csv")
    fails("split", [{**rows[0], "split": "dev"}], r"split\.jsonl:1: unknown split 'dev'")
    fails("empty", [r for r in rows if not (r["concept"] == "boats" and r["split"] == "test"
                                            and r["category"] == "positive")],
          r"empty\.jsonl: concept 'boats' has no positive examples in the test split")
    fails("twosplits", rows + [{**rows[0], "split": "test"}], r"twosplits\.jsonl:\d+: this text is also in the train")
    fails("json", rows[:2] + ["{not json"], r"json\.jsonl:3: not valid JSON")
    fails("blank", [{**rows[0], "text": "  "}], r"blank\.jsonl:1: empty text")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text,concept,category,split\n" + b"caf\xe9,c,positive,train\n")
    with pytest.raises(ValueError, match=r"latin\.csv:2: not UTF-8"):
        get_concept_set(f"csv:{latin}")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        get_concept_set(f"jsonl:{tmp_path / 'absent.jsonl'}")
    with pytest.raises(ValueError, match="jsonl:/path/file.jsonl"):
        get_concept_set("parquet:x")


def test_cli_user_data_flags(tmp_path, capsys):
    """--concepts / --prompts replace the suite's data; a bad file fails in one line before any model loads."""
    from bench.cli import main, with_data
    from bench.suites import get_suite

    good = _write_user(tmp_path / "good.csv", _user_rows(), "csv")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The sky is", "target": " blue", "contrast": " green"}) + "\n")
    suite = with_data(get_suite("smoke"), [f"csv:{good}", "bbc"], [str(prompts), "country_capital"])
    assert suite.concept_sets == [f"csv:{good}", "bbc"] and suite.prompt_sets == [str(prompts), "country_capital"]
    assert with_data(suite) == suite
    bad = _write_user(tmp_path / "bad.jsonl", [{**_user_rows()[0], "category": "maybe"}], "jsonl")
    assert main(["score", "--layer", "1", "--model", "tiny-gemma2", "--concepts", f"jsonl:{bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:1: unknown category 'maybe'" in err
    assert main(["run", "--suite", "smoke", "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "prompt file not found" in capsys.readouterr().err
