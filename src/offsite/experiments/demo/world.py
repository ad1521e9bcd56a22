"""A small generated world: people with facts, told as varied prose, and a quiz about them.

The demo needs a pretrained model whose knowledge lives in its weights, and nothing may be
downloaded, so the project makes its own: a seeded list of invented people (pronounceable
generated names), each linked by five relations (home, job, food, colour, pet) to values from
pools of ten. The *corpus* tells every fact many times in declarative sentences drawn from several
templates, in shuffled order, so that a model has to store the fact rather than a fixed word
sequence (facts seen in one phrasing only are hard to retrieve with another, see Allen-Zhu & Li,
"Physics of Language Models 3.1"). Values are dealt so that each is equally frequent: guessing
the most common answer scores chance.

The *quiz* is ten-way multiple choice: complete a sentence about a person (``"Ameth lives in"`` ->
one of the ten towns), scored by log-likelihood like any OT task. Splits are by person:
fine-tuning sees the facts of some people, and the test split asks about other people, whose
facts were seen only in pretraining. A fine-tuned adapter can therefore only answer test
questions by reading knowledge stored in the rest of the model, which the full model has and an
emulator has lost in part.

A harder question form, ``style="blank"`` (``"Fill in the blank: Ameth lives in ___."`` then
``Answer:``), is kept as an option: a model this small learns that format on the emulator in a
way that does not carry over to the full model (measured: plug-in at or below emulator FT), so
the demo does not use it.
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
POOL_SIZE = 10
POOLS = {
    "job": ["baker", "tailor", "miller", "carpenter", "potter", "weaver", "fisher", "healer", "brewer", "painter"],
    "food": ["apples", "cheese", "plums", "soup", "honey", "bread", "mushrooms", "pears", "noodles", "walnuts"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "grey", "brown", "pink", "white"],
    # "town" and "animal" are invented per world (see generate_world).
}


@dataclasses.dataclass(frozen=True)
class Relation:
    """One kind of fact: its value pool, how the corpus says it, how the quiz asks it."""

    key: str
    pool: str
    sentences: tuple  # "{n}" is the person, "{v}" the value

    def blanks(self) -> list:
        """Sentence beginnings that the value completes (templates ending in ``{v}.``)."""
        return [t[: -len("{v}.")].rstrip() for t in self.sentences if t.endswith("{v}.")]


RELATIONS = [
    Relation("home", "town", ("{n} lives in {v}.", "{n} has a house in {v}.", "The home of {n} is in {v}.",
                              "{n} is a resident of {v}.", "{v} is where {n} lives.")),
    Relation("job", "job", ("{n} works as a {v}.", "By profession, {n} is a {v}.", "{n} earns a living as a {v}.",
                            "{n} is a {v} by trade.", "The job of {n} is {v}.")),
    Relation("food", "food", ("{n} loves to eat {v}.", "The favourite food of {n} is {v}.",
                              "Every day {n} eats {v}.", "{n} likes {v} more than any other food.",
                              "Nothing pleases {n} like {v}.")),
    Relation("colour", "colour", ("The favourite colour of {n} is {v}.", "{n} always wears {v}.",
                                  "Most things {n} owns are {v}.", "{n} likes the colour {v} best.",
                                  "{n} painted the front door {v}.")),
    Relation("pet", "animal", ("{n} keeps a {v} as a pet.", "{n} owns a little {v}.", "The pet of {n} is a {v}.",
                               "At home, {n} feeds a tame {v}.", "{n} takes care of a {v} every day.")),
]
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class World:
    """The generated people and the pool of values each relation draws from."""

    seed: int
    people: list  # [{"name": str, <relation key>: value, ...}] in generation order
    pools: dict  # pool name -> list of POOL_SIZE values
    relations: list  # relation keys in use
    splits: dict  # split name -> list of person names


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)


def _unique_words(rng: random.Random, count: int, make, taken: list) -> list:
    out = []
    while len(out) < count:
        word = make().capitalize()
        # Refuse prefixes of one another too, so no name or answer is a truncation of another.
        if not any(word.startswith(t) or t.startswith(word) for t in taken):
            taken.append(word)
            out.append(word)
    return out


def generate_world(people: int = 120, seed: int = 0, relations=None, split_fractions=(0.5, 0.15, 0.35)) -> World:
    """Invent ``people`` persons and their facts, and split the persons into train/validation/test.

    Values are dealt from shuffled decks that hold every pool value equally often *within each
    split*, so no answer is more common than another anywhere. Dealing over all persons at once
    would make the values frequent in the training split rare in the test split, and a model
    that learnt the training answers' frequencies would score below chance on the test.

    Args:
        people: number of persons.
        seed: everything is derived from this seed (same seed, same world).
        relations: relation keys to use (default all of :data:`RELATIONS`).
        split_fractions: share of persons in train, validation, test.
    """
    rng = random.Random(seed)
    keys = list(relations or [r.key for r in RELATIONS])
    taken: list = []
    names = _unique_words(rng, people, lambda: _word(rng, 2), taken)
    pools = {"town": _unique_words(rng, POOL_SIZE, lambda: _word(rng, 1) + rng.choice(TOWN_ENDINGS), taken),
             "animal": [w.lower() for w in _unique_words(rng, POOL_SIZE, lambda: _word(rng, 2), taken)],
             **{k: list(v) for k, v in POOLS.items()}}
    order = list(names)
    rng.shuffle(order)
    n_train, n_val = round(split_fractions[0] * people), round(split_fractions[1] * people)
    splits = {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
              "test": order[n_train + n_val:]}
    records = {n: {"name": n} for n in names}
    for rel in _relations(keys):
        for members in splits.values():
            for name, index in zip(members, _deck(rng, len(members), POOL_SIZE)):
                records[name][rel.key] = pools[rel.pool][index]
    records = [records[n] for n in names]
    return World(seed=seed, people=records, pools=pools, relations=keys, splits=splits)


def _deck(rng: random.Random, count: int, size: int) -> list:
    deck = [i % size for i in range(count)]
    rng.shuffle(deck)
    return deck


def _relations(keys) -> list:
    return [r for r in RELATIONS if r.key in keys]


def biography(world: World, person: dict, rng: random.Random) -> str:
    """One paragraph with every fact of ``person``, in random order and random phrasings."""
    rels = _relations(world.relations)
    rng.shuffle(rels)
    return " ".join(rng.choice(r.sentences).format(n=person["name"], v=person[r.key]) for r in rels)


def corpus(world: World, variants: int = 8) -> list:
    """Pretraining documents: ``variants`` independently drawn biographies per person, shuffled."""
    rng = random.Random(f"corpus-{world.seed}")
    docs = [biography(world, p, rng) for _ in range(variants) for p in world.people]
    rng.shuffle(docs)
    return docs


def questions(world: World, split: str, choices: int = POOL_SIZE, style: str = "cloze") -> list:
    """Multiple-choice records (the project's MC schema) about the persons of one split.

    Each question is the beginning of a sentence about the person (a corpus phrasing, as the
    context with an empty question: ``style="cloze"``) or that beginning in a fill-in-the-blank
    wrapper the corpus never uses (``style="blank"``). The choices are values of the relation's
    pool (all ten by default), so the question type alone gives nothing away; the gold position
    is random.
    """
    rng = random.Random(f"task-{world.seed}-{split}")
    by_name = {p["name"]: p for p in world.people}
    out = []
    for name in world.splits[split]:
        person = by_name[name]
        for rel in _relations(world.relations):
            gold = person[rel.key]
            options = rng.sample([v for v in world.pools[rel.pool] if v != gold], choices - 1)
            label = rng.randrange(choices)
            options.insert(label, gold)
            stem = rng.choice(rel.blanks()).format(n=name)
            if style == "cloze":
                body = {"context": stem, "question": ""}
            else:
                body = {"context": "", "question": f"Fill in the blank: {stem} ___."}
            out.append({"id": f"{split}-{name}-{rel.key}", **body, "choices": options, "label": label})
    rng.shuffle(out)
    return out


def write_world(world: World, out, variants: int = 8, choices: int = POOL_SIZE, style: str = "cloze") -> dict:
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
        lines = [json.dumps(r, ensure_ascii=False) for r in questions(world, split, choices, style)]
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["world"].write_text(json.dumps(dataclasses.asdict(world), indent=1) + "\n", encoding="utf-8")
    return paths
