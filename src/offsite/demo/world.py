"""A small generated world: people with facts, told as varied prose, and a quiz about them.

The demo needs a pretrained model whose knowledge lives in its weights, and nothing may be
downloaded, so the project makes its own: a seeded list of invented people (pronounceable
generated names), each with a home town, job, favourite food, favourite colour and pet. The
*corpus* tells every fact many times in declarative sentences drawn from several templates, in
shuffled order, so that a model has to store the fact rather than a fixed word sequence (facts
seen in one phrasing only are hard to retrieve with another, see Allen-Zhu & Li, "Physics of
Language Models 3.1"). The *task* asks about the same facts as multiple-choice questions in a
``Question: ... / Answer:`` format that never occurs in the corpus.

Splits are by person: fine-tuning teaches the question format on the facts of some people, and the
test split asks about other people, whose facts were seen only in pretraining. A fine-tuned adapter
can therefore only answer test questions by reading knowledge that is stored in the rest of the
model, which is exactly what an emulator lacks and the full model has.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
          "st", "th", "sh", "tr", "fl", "pl"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "io"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "x"]
TOWN_ENDINGS = ["moor", "wick", "ford", "dale", "holm", "stead", "by", "ton", "mouth", "field"]

# Every pool has ten values (towns and pets are invented), so each attribute is a 10x10 Latin square.
JOBS = ["baker", "tailor", "miller", "carpenter", "potter", "weaver", "fisher", "healer", "brewer", "painter"]
FOODS = ["apples", "cheese", "plums", "soup", "honey", "bread", "mushrooms", "pears", "noodles", "walnuts"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "grey", "brown", "pink", "white"]

# Several phrasings per fact; ``{n}`` is the person, ``{v}`` the value.
SENTENCES = {
    "town": ["{n} lives in {v}.", "{n} has a house in {v}.", "The home of {n} is in {v}.",
             "{n} grew up in {v} and still lives there.", "{n} is a resident of {v}."],
    "job": ["{n} works as a {v}.", "{n} is a {v} by trade.", "By profession, {n} is a {v}.",
            "{n} earns a living as a {v}.", "The work of {n} is that of a {v}."],
    "food": ["{n} loves to eat {v}.", "The favourite food of {n} is {v}.", "{n} likes {v} more than any other food.",
             "Every day {n} eats {v}.", "Nothing pleases {n} like a meal of {v}."],
    "colour": ["The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.", "{n} always wears {v}.",
               "{n} painted the front door {v}.", "Most things {n} owns are {v}."],
    "pet": ["{n} keeps a {v} as a pet.", "{n} owns a little {v}.", "The pet of {n} is a {v}.",
            "{n} takes care of a {v}.", "At home, {n} feeds a tame {v}."],
}
# Question forms, used only in the task (the corpus has no questions at all).
QUESTIONS = {
    "town": "Where does {n} live?",
    "job": "What does {n} do for a living?",
    "food": "Which food does {n} like best?",
    "colour": "What is {n}'s favourite colour?",
    "pet": "What kind of animal does {n} keep?",
}
ATTRIBUTES = list(QUESTIONS)
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class World:
    """The generated people and the pool of values each attribute draws from."""

    seed: int
    people: list  # [{"name": "First Last", "town": str, "job": str, ...}] in generation order
    values: dict  # attribute -> list of possible values
    splits: dict  # split name -> list of person names


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)


def _unique_words(rng: random.Random, count: int, make, taken: list) -> list:
    out = []
    while len(out) < count:
        word = make().capitalize()
        # Refuse prefixes of one another too, so no answer is a truncation of another choice.
        if not any(word.startswith(t) or t.startswith(word) for t in taken):
            taken.append(word)
            out.append(word)
    return out


def generate_world(people: int = 120, seed: int = 0, split_fractions=(0.5, 0.15, 0.35)) -> World:
    """Invent a world: ``people`` persons with one value per attribute, split into three groups.

    Values are dealt round-robin over a shuffled deck, so every value is about equally frequent and
    a model cannot score above chance on the quiz by guessing the most common answer.

    Args:
        people: number of persons.
        seed: everything is derived from this seed (same seed, same world).
        split_fractions: share of persons in train, validation, test.
    """
    rng = random.Random(seed)
    size = len(COLOURS)
    taken: list = []
    names = _unique_words(rng, people, lambda: _word(rng, 2), taken)
    values = {
        "town": _unique_words(rng, size, lambda: _word(rng, 1) + rng.choice(TOWN_ENDINGS), taken),
        "job": list(JOBS), "food": list(FOODS), "colour": list(COLOURS),
        "pet": [w.lower() for w in _unique_words(rng, size, lambda: _word(rng, 2), taken)],
    }
    records = [{"name": n} for n in names]
    for attr in ATTRIBUTES:
        deck = [values[attr][i % size] for i in range(people)]
        rng.shuffle(deck)
        for record, value in zip(records, deck):
            record[attr] = value
    order = list(names)
    rng.shuffle(order)
    n_train = round(split_fractions[0] * people)
    n_val = round(split_fractions[1] * people)
    splits = {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
              "test": order[n_train + n_val:]}
    return World(seed=seed, people=records, values=values, splits=splits)


def biography(person: dict, rng: random.Random) -> str:
    """One paragraph with every fact of ``person``, in random order and random phrasings."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    return " ".join(rng.choice(SENTENCES[a]).format(n=person["name"], v=person[a]) for a in attrs)


def corpus(world: World, variants: int = 8) -> list:
    """Pretraining documents: ``variants`` independently drawn biographies per person, shuffled."""
    rng = random.Random(f"corpus-{world.seed}")
    docs = [biography(p, rng) for _ in range(variants) for p in world.people]
    rng.shuffle(docs)
    return docs


def questions(world: World, split: str, choices: int = 4) -> list:
    """Multiple-choice records (the project's MC schema) about the persons of one split.

    Distractors are other values of the same attribute, so the question type alone gives nothing
    away; the gold position is random.
    """
    rng = random.Random(f"task-{world.seed}-{split}")
    by_name = {p["name"]: p for p in world.people}
    out = []
    for name in world.splits[split]:
        person = by_name[name]
        for attr in ATTRIBUTES:
            gold = person[attr]
            options = rng.sample([v for v in world.values[attr] if v != gold], choices - 1)
            label = rng.randrange(choices)
            options.insert(label, gold)
            out.append({"id": f"{split}-{name.replace(' ', '_')}-{attr}", "context": "",
                        "question": QUESTIONS[attr].format(n=name), "choices": options, "label": label})
    rng.shuffle(out)
    return out


def write_world(world: World, out, variants: int = 8, choices: int = 4) -> dict:
    """Write ``corpus.txt`` (one document per line), ``{train,validation,test}.jsonl`` and ``world.json``.

    Returns:
        ``{"corpus": path, "train": path, "validation": path, "test": path, "world": path}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.txt", "world": out / "world.json"}
    paths["corpus"].write_text("\n".join(corpus(world, variants)) + "\n", encoding="utf-8")
    for split in SPLITS:
        paths[split] = out / f"{split}.jsonl"
        lines = [json.dumps(r, ensure_ascii=False) for r in questions(world, split, choices)]
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["world"].write_text(json.dumps(dataclasses.asdict(world), indent=1) + "\n", encoding="utf-8")
    return paths
