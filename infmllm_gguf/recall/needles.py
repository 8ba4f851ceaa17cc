"""Needles: one-sentence facts hidden in a stream, the question that asks for each, and exact-match scoring.

The verbatim kinds, as needle-in-a-haystack benchmarks use them (`VERBATIM_KINDS`, the default):
a `number` (a five-digit pass key), a `word` (a secret word), and a `fact` stated in one sentence
and asked about in other words (who moved where, asked as where that person works). The kinds
that ask for meaning: a `paraphrase` (the question shares no content word with the fact,
`paraphrases.PARAPHRASES`), an `update` (a pass key stated, later changed: the question asks for
the current one), a `distractor` (a pass key, and nearer the question a sentence that shares the
question's words but not the answer), an `association` (NoLiMa's one-hop: a person lives by a
landmark, the question asks who has been to its city). Every needle of a stream has its own label
(or template), so that many needles can share one stream and each question names exactly one.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np

from .paraphrases import LANDMARKS, NUMBERS, PARAPHRASES

VERBATIM_KINDS = ("number", "word", "fact")
MEANING_KINDS = ("paraphrase", "update", "distractor", "association")
KINDS = VERBATIM_KINDS + MEANING_KINDS

ADJECTIVES = ("amber", "silver", "crimson", "hollow", "northern", "quiet", "golden", "broken", "painted", "frozen",
              "hidden", "ancient", "narrow", "copper", "velvet", "marble", "distant", "iron", "scarlet", "wooden",
              "lonely", "bright", "sunken", "royal")
NOUNS = ("lantern", "cellar", "orchard", "chapel", "harbour", "tower", "garden", "bridge", "library", "mill",
         "stable", "cottage", "vault", "fountain", "gate", "market", "lighthouse", "courtyard", "quarry", "forge",
         "meadow", "attic", "workshop", "pier")
WORDS = ("falcon", "pepper", "glacier", "violin", "saffron", "compass", "thistle", "harvest", "lemonade", "anchor",
         "blossom", "cinnamon", "tornado", "walnut", "puzzle", "velvet", "meteor", "pumpkin", "cobalt", "pebble",
         "trumpet", "mustard", "sapphire", "biscuit", "raccoon", "ginger", "horizon", "marigold", "quartz", "tulip")
FIRST_NAMES = ("Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas", "Keiko",
               "Lorenzo", "Maya", "Nikolai", "Olivia", "Pablo", "Quentin", "Rosa", "Stefan", "Tamara", "Umar",
               "Vera", "Walter", "Yusuf", "Zoe")
SURNAMES = ("Abbott", "Becker", "Castillo", "Dalton", "Eriksen", "Fontaine", "Gallo", "Hartley", "Ivanova", "Jensen",
            "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinn", "Romano", "Sato", "Tanaka",
            "Ueda", "Varga", "Whitaker", "Yilmaz", "Zimmer")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Montreal", "Kyoto", "Dublin", "Santiago", "Vienna", "Cairo", "Helsinki",
          "Melbourne", "Prague", "Lima", "Seoul", "Athens", "Warsaw", "Havana", "Manila", "Bergen", "Porto",
          "Quebec", "Tunis", "Zurich", "Krakow", "Osaka", "Bogota", "Dakar", "Reykjavik", "Valencia", "Hanoi")
JOBS = ("baker", "nurse", "carpenter", "librarian", "pilot", "tailor", "chemist", "gardener", "teacher", "architect")


@dataclass(frozen=True)
class Needle:
    """A fact put in the stream (`statement`), the question asked after the stream, the start of
    the answer fed after the question (so that a small model answers in one form), and the answer.
    `extras`: other sentences that go with it, each with its distance from the question as a
    multiple of the needle's (an update's older value at 1.5, a distractor at 0.5)."""
    kind: str
    statement: str
    question: str
    answer_prefix: str
    answer: str
    extras: tuple[tuple[str, float], ...] = ()

    def prompt(self) -> str:
        """What is fed after the stream: the question and the start of the answer, completion style
        (base and instruct models alike continue it)."""
        return f"\n\nQuestion: {self.question}\nAnswer: {self.answer_prefix}"

    def to_json(self) -> dict:
        return asdict(self)


class NeedleMaker:
    """Draws needles with labels (and people) not used before in its stream, from `rng`."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.labels = [f"{a} {n}" for a in ADJECTIVES for n in NOUNS]
        self.people = [f"{f} {s}" for f in FIRST_NAMES for s in SURNAMES]
        self.paraphrases = list(PARAPHRASES)
        self.landmarks = list(LANDMARKS)
        for pool in (self.labels, self.people, self.paraphrases, self.landmarks):
            rng.shuffle(pool)

    def _pick(self, pool: tuple[str, ...]) -> str:
        return str(pool[self.rng.integers(len(pool))])

    def _take(self, pool: list[str], what: str) -> str:
        if not pool:
            raise ValueError(f"out of distinct {what} for needles: ask for fewer needles in one stream")
        return pool.pop()

    def _key(self) -> str:
        return f"{int(self.rng.integers(10000, 100000))}"

    def make(self, kind: str) -> Needle:
        if kind in ("number", "distractor"):
            label, key = self._take(self.labels, "labels"), self._key()
            distractor = f"The pass key of the {label} is kept in a sealed letter."  # the question's words, no key
            extras = ((distractor, 0.5),) if kind == "distractor" else ()
            return Needle(kind, f"The pass key of the {label} is {key}. Remember it.",
                          f"What is the pass key of the {label}?", f"The pass key of the {label} is", key, extras)
        if kind == "update":
            label, old, key = self._take(self.labels, "labels"), self._key(), self._key()
            return Needle(kind, f"The pass key of the {label} has changed: it is now {key}.",
                          f"What is the pass key of the {label} now?", f"The pass key of the {label} is now", key,
                          ((f"The pass key of the {label} is {old}. Remember it.", 1.5),))
        if kind == "paraphrase":
            statement, question, prefix, values = self._take(self.paraphrases, "paraphrase templates")
            value = self._key() if values == NUMBERS else self._pick(values)
            return Needle(kind, statement.format(v=value), question, prefix, value)
        if kind == "association":
            (landmark, city), person = self._take(self.landmarks, "landmarks"), self._take(self.people, "people")
            name = person.split()[0]
            return Needle(kind, f"Actually, {name} lives next to the {landmark}.",
                          f"Which character has been to {city}?", f"The character who has been to {city} is", name)
        if kind == "word":
            label, word = self._take(self.labels, "labels"), self._pick(WORDS)
            return Needle(kind, f"The secret word of the {label} is {word}. Remember it.",
                          f"What is the secret word of the {label}?", f"The secret word of the {label} is", word)
        if kind == "fact":
            person, city, job = self._take(self.people, "people"), self._pick(CITIES), self._pick(JOBS)
            return Needle(kind, f"Last spring {person} moved to {city} to work as a {job}.",
                          f"In which city does {person} work now?", f"{person} works in", city)
        raise ValueError(f"unknown needle kind {kind!r}; kinds: {', '.join(KINDS)}")


WORD = re.compile(r"\w+")


def answer_words(text: str) -> list[str]:
    """The words of `text`, case-folded, accents and punctuation ignored (Unicode-aware)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return WORD.findall(text.casefold())


def exact_match(reply: str, answer: str) -> bool:
    """Exact match on the reply's first words: the reply begins with the answer's words (case,
    accents and punctuation aside), followed by anything but more digits (" 48213." and "48213,
    remember" match 48213; "4821", "48213 5" and "about 48213" do not)."""
    want = answer_words(answer)
    got = answer_words(reply)
    if not want:
        raise ValueError("an answer with no words cannot be matched")
    return got[:len(want)] == want and (len(got) == len(want) or not got[len(want)].isdigit())

