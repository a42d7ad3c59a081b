"""Causal prompt sets: prompts with a measurable next-token target and a contrast answer, for causal-intervention
metrics.

Sources:
- `country_capital`, `country_continent`, `country_demonym`, `country_language`: facts about ~250 countries
  from the PyPI package `countryinfo` (capital, region/subregion, demonym, first official language), each
  relation asked through several templates (`COUNTRY_TEMPLATES`).
- `capitals`, `city_country`, `city_continent`, `first_letter`: short hand-written lists (bench/data/*.json).
- a user file `PATH.jsonl` (or `jsonl:PATH`): one prompt per line, see `load_prompt_jsonl`.

Each prompt's `target` and `contrast` carry exactly the text the model would produce next: a template written
"The capital of {subject} is {answer}" yields prompt "The capital of France is" and target " Paris", while
'capital("{subject}") = "{answer}' yields target "Paris" with no space. Scores are taken on the answers' *first
token* only: multi-token answers (" Buenos Aires") are judged by " Buenos", and contrasts are chosen so their first
word differs from the target's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from bench.corpora import hash_unit, jsonl_records

DATA_DIR = Path(__file__).parent / "data"
HANDWRITTEN_SETS = ("capitals", "city_country", "city_continent", "first_letter")
COUNTRY_SETS = ("country_capital", "country_continent", "country_demonym", "country_language")
PROMPT_SETS = HANDWRITTEN_SETS + COUNTRY_SETS
FILTER_BATCH = 32  # prompts scored per forward pass in filter_correct: bounds the [batch, vocab] logits


class CausalPrompt(NamedTuple):
    prompt: str  # ends right before the answer, no trailing space
    target: str  # correct answer as the model would write it next, e.g. " Paris" (or "Paris" after a quote)
    contrast: str  # a plausible wrong answer of the same relation, e.g. " Berlin"
    attribute: str  # the target value without the space ("Paris", "Europe", "A"): groups prompts by answer
    relation: str = ""  # e.g. "capital"
    template: str = ""  # template id within the relation, e.g. "capital/2"


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
    n_sampled: int | None = None  # a seeded sample of this many of the n_written prompts was used (None: all)

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


# ---------------------------------------------------------------------------------------------------------
# Country facts from PyPI `countryinfo`

# Several phrasings per relation; `{answer}` ends each template and whatever precedes it (a space or nothing)
# is the start of the answer the model writes. Few-shot templates name their demonstration countries in
# FEW_SHOT_COUNTRIES, which are then left out of that template.
COUNTRY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {subject} is {answer}",
        "{subject}'s capital city is {answer}",
        "France: Paris\nJapan: Tokyo\nKenya: Nairobi\n{subject}: {answer}",
        'capital("France") = "Paris"\ncapital("{subject}") = "{answer}',
    ),
    "continent": (
        "{subject} is located on the continent of {answer}",
        "Country: {subject}\nContinent: {answer}",
        "France is in Europe. Japan is in Asia. Kenya is in Africa. {subject} is in {answer}",
    ),
    "demonym": (
        "Country: {subject}\nDemonym: {answer}",
        "Country: France\nDemonym: French\n\nCountry: {subject}\nDemonym: {answer}",
        "People from France are French. People from Japan are Japanese. People from {subject} are {answer}",
    ),
    "language": (
        "The official language of {subject} is {answer}",
        "In {subject}, most people speak {answer}",
        "Country: {subject}\nLanguage: {answer}",
        "In France people speak French. In Japan people speak Japanese. In {subject} people speak {answer}",
    ),
}
# Templates dropped after measuring SmolLM2-135M-Instruct: "Q: What is the capital of {subject}?\nA:", "{subject}
# is a country in", "A person from {subject} is called", "The people of {subject} are called" (<6% correct each).
FEW_SHOT_COUNTRIES = ("France", "Japan", "Kenya")
# ISO 639-1 (and -3) codes countryinfo lists as a country's first language -> English name; a country whose
# first language is missing here has no language prompt.
LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "es": "Spanish", "ar": "Arabic", "pt": "Portuguese", "nl": "Dutch",
    "de": "German", "zh": "Chinese", "it": "Italian", "el": "Greek", "ko": "Korean", "ro": "Romanian",
    "my": "Burmese", "no": "Norwegian", "ps": "Pashto", "sq": "Albanian", "ca": "Catalan", "hy": "Armenian",
    "az": "Azerbaijani", "bn": "Bengali", "be": "Belarusian", "bs": "Bosnian", "ms": "Malay", "bg": "Bulgarian",
    "km": "Khmer", "hr": "Croatian", "cs": "Czech", "da": "Danish", "et": "Estonian", "am": "Amharic",
    "fi": "Finnish", "ka": "Georgian", "hu": "Hungarian", "is": "Icelandic", "hi": "Hindi", "id": "Indonesian",
    "fa": "Persian", "ga": "Irish", "he": "Hebrew", "ja": "Japanese", "kk": "Kazakh", "ky": "Kyrgyz", "lo": "Lao",
    "lv": "Latvian", "lt": "Lithuanian", "mk": "Macedonian", "mt": "Maltese", "mn": "Mongolian", "ne": "Nepali",
    "pl": "Polish", "ru": "Russian", "sr": "Serbian", "sk": "Slovak", "sl": "Slovenian", "so": "Somali",
    "af": "Afrikaans", "si": "Sinhala", "sv": "Swedish", "tg": "Tajik", "sw": "Swahili", "th": "Thai",
    "tr": "Turkish", "tk": "Turkmen", "uk": "Ukrainian", "uz": "Uzbek", "vi": "Vietnamese", "fo": "Faroese",
    "kl": "Greenlandic", "dv": "Dhivehi", "ti": "Tigrinya", "dz": "Dzongkha", "rw": "Kinyarwanda",
    "sm": "Samoan", "la": "Latin", "bi": "Bislama", "cnr": "Montenegrin",
}


class CountryFact(NamedTuple):
    """One fact: the country, the answer, and the answer's group (continent) for choosing plausible contrasts."""

    subject: str
    answer: str
    group: str


def _continent(info: dict) -> str:
    region = str(info.get("region") or "")
    if region != "Americas":
        return region
    # countryinfo's region "Americas" is two continents; its intermediate region says which.
    return "South America" if info.get("intermediateregion") == "South America" else "North America"


def country_facts() -> dict[str, list[CountryFact]]:
    """Facts per relation (capital, continent, demonym, language) for every country countryinfo describes fully."""
    try:
        import countryinfo
    except ImportError:
        raise RuntimeError("the country prompt sets need the PyPI package countryinfo: run `make install` "
                           "(pip install -c constraints.txt countryinfo)") from None
    facts: dict[str, list[CountryFact]] = {r: [] for r in COUNTRY_TEMPLATES}
    seen: set[str] = set()
    for country in countryinfo.all_countries():
        info = country.info()
        name = str(info.get("name") or "").strip()
        # "Virgin Islands, U.S." and "Saint Martin (French part)" are catalogue names nobody writes in prose.
        if not name or name in seen or any(ch in name for ch in "(),"):
            continue
        seen.add(name)
        continent = _continent(info)
        if not continent:
            continue
        values = {
            "capital": str(info.get("capital") or "").strip(),
            "continent": continent,
            # "Antiguan,Barbudan": the first demonym is the one used for the whole country.
            "demonym": str(info.get("demonym") or "").split(",")[0].strip(),
            "language": LANGUAGE_NAMES.get((info.get("languages") or [""])[0], ""),
        }
        for relation, answer in values.items():
            if answer:
                facts[relation].append(CountryFact(name, answer, continent))
    return facts


def _render(template: str, subject: str) -> tuple[str, str]:
    """(prompt, answer prefix): the prompt ends before the answer; spaces right before `{answer}` go to it."""
    if not template.endswith("{answer}") or "{subject}" not in template:
        raise ValueError(f"template {template!r} must contain {{subject}} and end with {{answer}}")
    head = template[: -len("{answer}")].replace("{subject}", subject)
    prompt = head.rstrip(" ")
    return prompt, head[len(prompt):]


def _plausible_contrast(facts: list[CountryFact], i: int, salt: str) -> str:
    """Another country's answer, from the same continent when one there differs in its first word."""
    mine = _first_word(facts[i].answer)
    differ = [f.answer for f in facts if _first_word(f.answer) != mine]
    if not differ:
        raise ValueError(f"no answer differs from {facts[i].answer!r} to contrast with")
    near = sorted({f.answer for f in facts if f.group == facts[i].group and _first_word(f.answer) != mine})
    pool = near or sorted(set(differ))
    return pool[int(hash_unit(f"contrast:{salt}:{facts[i].subject}") * len(pool))]


def country_prompts(relation: str) -> PromptSet:
    """All templates of one country relation over every country that has the fact (`country_<relation>`)."""
    if relation not in COUNTRY_TEMPLATES:
        raise ValueError(f"unknown country relation {relation!r}; valid: {', '.join(COUNTRY_TEMPLATES)}")
    facts = country_facts()[relation]
    prompts = []
    for t_idx, template in enumerate(COUNTRY_TEMPLATES[relation]):
        few_shot = any(c in template for c in FEW_SHOT_COUNTRIES)
        for i, fact in enumerate(facts):
            if few_shot and fact.subject in FEW_SHOT_COUNTRIES:
                continue
            prompt, prefix = _render(template, fact.subject)
            contrast = _plausible_contrast(facts, i, relation)
            prompts.append(CausalPrompt(prompt, prefix + fact.answer, prefix + contrast, fact.answer, relation,
                                        f"{relation}/{t_idx}"))
    return PromptSet(f"country_{relation}", prompts, n_written=len(prompts))


# ---------------------------------------------------------------------------------------------------------
# The user's own prompts

PROMPT_FILE_HELP = ('one JSON object per line: {"prompt": ..., "target": ..., "contrast": ...} (+ optional '
                    '"relation", "template"); target and contrast are the text the model writes next, including '
                    'any leading space')


def load_prompt_jsonl(path: str | Path, name: str | None = None) -> PromptSet:
    """A prompt set from a jsonl file of prompt, target, contrast (+ optional relation, template) records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} ({PROMPT_FILE_HELP})")
    prompts = []
    for lineno, rec in jsonl_records(path, PROMPT_FILE_HELP):
        missing = [k for k in ("prompt", "target", "contrast") if not isinstance(rec.get(k), str) or not rec[k]]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing or empty field(s) {missing}; {PROMPT_FILE_HELP}")
        if _first_word(rec["target"]) == _first_word(rec["contrast"]):
            raise ValueError(f"{path}:{lineno}: target {rec['target']!r} and contrast {rec['contrast']!r} start "
                             "with the same word, so their first tokens cannot be told apart")
        relation = str(rec.get("relation", ""))
        prompts.append(CausalPrompt(rec["prompt"], rec["target"], rec["contrast"], rec["target"].strip(), relation,
                                    str(rec.get("template", ""))))
    if not prompts:
        raise ValueError(f"{path}: no prompts; {PROMPT_FILE_HELP}")
    return PromptSet(name or path.stem, prompts, n_written=len(prompts))


def get_prompt_set(name: str) -> PromptSet:
    """A shipped prompt set (PROMPT_SETS) or a user jsonl file (`PATH.jsonl` or `jsonl:PATH`)."""
    if name in HANDWRITTEN_SETS:
        return load_prompt_file(DATA_DIR / f"{name}.json")
    if name in COUNTRY_SETS:
        return country_prompts(name[len("country_"):])
    if name.startswith("jsonl:"):
        return load_prompt_jsonl(name[len("jsonl:"):])
    if name.endswith(".jsonl"):
        return load_prompt_jsonl(name)
    raise ValueError(f"unknown prompt set {name!r}; valid: {', '.join(PROMPT_SETS)}, or a file PATH.jsonl")


class RefusalPrompts(NamedTuple):
    """Harmful requests and harmless ones of the same form, paired by position (for the refusal metric)."""

    harmful: list[str]
    harmless: list[str]


def refusal_prompts(path: str | Path | None = None) -> RefusalPrompts:
    """The shipped harmful/harmless request pairs (bench/data/refusal.json), or a json file of that shape."""
    path = Path(path) if path is not None else DATA_DIR / "refusal.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        harmful, harmless = [str(x) for x in spec["harmful"]], [str(x) for x in spec["harmless"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected JSON with lists 'harmful' and 'harmless' ({type(e).__name__}: {e})"
                         ) from None
    if len(harmful) != len(harmless) or len(harmful) < 4:
        raise ValueError(f"{path}: needs as many harmless as harmful requests (paired), at least 4 each; got "
                         f"{len(harmful)} and {len(harmless)}")
    return RefusalPrompts(harmful, harmless)


def relation_counts(prompt_set: PromptSet) -> dict[str, int]:
    """Prompts per relation (after filtering: correctly answered prompts per relation)."""
    out: dict[str, int] = {}
    for p in prompt_set.prompts:
        out[p.relation or prompt_set.name] = out.get(p.relation or prompt_set.name, 0) + 1
    return out


def filter_correct(prompt_set: PromptSet, score_fn: ScoreFn, batch_size: int = FILTER_BATCH) -> PromptSet:
    """Keep the prompts the model gets right: target logit > contrast logit and target's first token is top-1.

    Scored `batch_size` prompts at a time, so thousands of prompts never hold more than one batch of logits.
    """
    n = len(prompt_set.prompts)
    if n == 0:
        return PromptSet(prompt_set.name, [], prompt_set.n_written, 0, prompt_set.n_sampled)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kept = []
    for lo in range(0, n, batch_size):
        batch = prompt_set.prompts[lo:lo + batch_size]
        m = len(batch)
        logit_diff, top1 = score_fn([p.prompt for p in batch], [p.target for p in batch],
                                    [p.contrast for p in batch])
        logit_diff = np.asarray(logit_diff, dtype=np.float64).reshape(-1)
        top1 = np.asarray(top1).reshape(-1)
        if logit_diff.shape != (m,) or top1.shape != (m,):
            raise ValueError(f"score_fn returned shapes {logit_diff.shape} and {top1.shape}; expected ({m},) each")
        keep = (logit_diff > 0) & top1.astype(bool)  # NaN compares False, so a NaN score drops the prompt
        kept += [p for p, k in zip(batch, keep) if k]
    return PromptSet(prompt_set.name, kept, prompt_set.n_written, len(kept), prompt_set.n_sampled)

