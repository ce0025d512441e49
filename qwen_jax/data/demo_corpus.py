"""A seeded generator of synthetic data on which a tiny model learns visibly within minutes on CPU.

The world is small on purpose: sixteen fictional countries with three attributes each, and
addition and subtraction of numbers under six, about a hundred questions in all, so that a model
of about a million parameters learns a visible share of them within minutes on a CPU. Every kind
of record asks about the same world, so the stages build on each other: pre-training text states
each fact as prose and as a "Q: ... A: ..." line (as web text holds FAQs; a fact seen only as
prose is stored but hard to recall as an answer), chat records ask the questions in ChatML with
exact short answers (SFT, judged by exact match), and preference pairs contrast the right answer
with the answer to another question (DPO). Everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import zlib
from collections.abc import Iterable, Iterator

_SYLLABLES = (
    "zor",
    "vi",
    "quel",
    "mar",
    "tin",
    "ka",
    "lo",
    "ren",
    "dus",
    "pha",
    "bel",
    "gor",
    "ni",
    "sa",
    "tor",
    "ul",
    "ve",
    "xan",
    "yel",
    "mi",
    "dra",
    "kes",
    "ob",
    "fen",
)
_COUNTRY_ENDINGS = ("ia", "and", "os", "ara", "ene")
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
_ANIMALS = ("fox", "owl", "bear", "wolf", "heron", "lynx", "otter", "crane", "hare", "seal")

DEMO_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class Country:
    name: str
    capital: str
    color: str
    animal: str


def make_world(seed: int = 0, num_countries: int = 16) -> list[Country]:
    """Fictional countries with distinct names and capitals."""
    rng = random.Random(seed)
    names: set[str] = set()
    countries = []
    while len(countries) < num_countries:
        name = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(_COUNTRY_ENDINGS)
        capital = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)
        name, capital = name.capitalize(), capital.capitalize()
        if name in names or capital in names:
            continue
        names.update((name, capital))
        countries.append(Country(name, capital, rng.choice(_COLORS), rng.choice(_ANIMALS)))
    return countries


def _fact_sentences(c: Country) -> list[str]:
    return [
        f"The capital of {c.name} is {c.capital}.",
        f"{c.capital} is the capital of {c.name}.",
        f"The flag of {c.name} is {c.color}.",
        f"The national animal of {c.name} is the {c.animal}.",
    ]


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """A question body like '5 + 3', its answer, and the result of the other operation on the
    same numbers; subtraction never goes below zero."""
    a, b = rng.randrange(6), rng.randrange(6)
    if rng.random() < 0.5:
        return f"{a} + {b}", str(a + b), str(a - b)
    a, b = max(a, b), min(a, b)
    return f"{a} - {b}", str(a - b), str(a + b)


def is_held_out(question: str) -> bool:
    """About one question in four belongs to the eval splits only (a stable hash of its text)."""
    return zlib.crc32(question.encode()) % 4 == 0


def _question(
    rng: random.Random, world: list[Country], held_out: bool, arithmetic_only: bool = False
) -> tuple[str, str, str]:
    """`_any_question` from the train or the held-out questions."""
    while True:
        question = _any_question(rng, world, 0 if arithmetic_only else None)
        if is_held_out(question[0]) == held_out:
            return question


def _any_question(
    rng: random.Random, world: list[Country], kind: int | None = None
) -> tuple[str, str, str]:
    """(question, right answer, wrong answer): an arithmetic question (kind 0) or one about a
    country (kinds 1-3: capital, flag color, animal), drawn at random unless `kind` says. The wrong
    answer answers another question: the other operation on the same numbers, or another
    attribute of the same country."""
    kind = rng.randrange(4) if kind is None else kind
    if kind == 0:
        expr, answer, other = _arithmetic(rng)
        # With 0 as the second number both operations agree; then the rejected answer is off by one.
        return f"What is {expr}?", answer, other if other != answer else str(int(other) + 1)
    c = rng.choice(world)
    attributes = {"capital": c.capital, "color": c.color, "animal": c.animal}
    asked = ("capital", "color", "animal")[kind - 1]
    question = {
        "capital": f"What is the capital of {c.name}?",
        "color": f"What color is the flag of {c.name}?",
        "animal": f"What is the national animal of {c.name}?",
    }[asked]
    rejected = rng.choice([attributes[k] for k in attributes if k != asked])
    return question, attributes[asked], rejected


def recall_questions(world: list[Country]) -> dict[str, list[tuple[str, str]]]:
    """Every question of the demo world with its answer, by kind: 'arithmetic' and 'country'."""
    arithmetic = [(f"What is {a} + {b}?", str(a + b)) for a in range(6) for b in range(6)]
    arithmetic += [(f"What is {a} - {b}?", str(a - b)) for a in range(6) for b in range(a + 1)]
    country = [
        (q, a)
        for c in world
        for q, a in (
            (f"What is the capital of {c.name}?", c.capital),
            (f"What color is the flag of {c.name}?", c.color),
            (f"What is the national animal of {c.name}?", c.animal),
        )
    ]
    return {"arithmetic": arithmetic, "country": country}


def pretrain_docs(seed: int, n: int, world: list[Country]) -> Iterator[dict]:
    """Short documents of 3-8 statements: arithmetic, country facts, or questions with answers.

    The questions are drawn from all of them, held-out ones included: held-out questions are new
    to SFT and DPO, not to the model's knowledge.
    """
    rng = random.Random(seed)
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(3, 8)):
            kind = rng.random()
            if kind < 0.3:
                expr, answer, _ = _arithmetic(rng)
                lines.append(f"{expr} = {answer}")
            elif kind < 0.65:
                lines.append(rng.choice(_fact_sentences(rng.choice(world))))
            else:
                question, answer, _ = _any_question(rng, world)
                lines.append(f"Q: {question}\nA: {answer}")
        yield {"text": "\n".join(lines)}


_BOILERPLATE = (
    "Home | About | Contact | Log in",
    "Accept cookies to continue. Read our privacy policy.",
    "Share this page",
    "Copyright reserved. All rights reserved.",
)
_JUNK_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789" + "#" * 6 + "@%&*~^|<>"


def _junk(rng: random.Random) -> str:
    """Character soup, as broken encodings and scraped markup leave it."""
    lines = []
    for _ in range(rng.randint(4, 10)):
        words = ("".join(rng.choices(_JUNK_CHARACTERS, k=rng.randint(2, 14))) for _ in range(12))
        lines.append(" ".join(words))
    return "\n".join(lines)


def _boilerplate(rng: random.Random) -> str:
    """A page of navigation and notices, its lines repeated."""
    return "\n".join(rng.choice(_BOILERPLATE) for _ in range(rng.randint(10, 20)))


def noisy_pretrain_docs(seed: int, clean: list[dict]) -> Iterator[dict]:
    """`clean` in order, with noise after some documents, as crawled text has it: character
    soup, repeated boilerplate, exact copies (case or spacing changed) and near copies (a few
    words added) of earlier documents. Noise records carry `noise` (its kind), so a filter's
    result can be checked against what was planted."""
    rng = random.Random(seed)
    for i, doc in enumerate(clean):
        yield doc
        kind = rng.random()
        if kind < 0.15:
            yield {"text": _junk(rng), "noise": "junk"}
        elif kind < 0.30:
            yield {"text": _boilerplate(rng), "noise": "boilerplate"}
        elif kind < 0.37:
            text = clean[rng.randrange(i + 1)]["text"]
            text = text.upper() if rng.random() < 0.5 else text.replace(" ", "  ")
            yield {"text": text, "noise": "exact_copy"}
        elif kind < 0.44:
            yield {
                "text": clean[rng.randrange(i + 1)]["text"] + " Read more.",
                "noise": "near_copy",
            }


def long_docs(seed: int, n: int, world: list[Country]) -> Iterator[dict]:
    """Longer texts (a few hundred tokens): an almanac entry per country plus arithmetic tables."""
    rng = random.Random(seed)
    for _ in range(n):
        c = rng.choice(world)
        parts = [f"{c.name} is a country.", *_fact_sentences(c)]
        for _ in range(rng.randint(20, 60)):
            if rng.random() < 0.3:
                parts.append(rng.choice(_fact_sentences(rng.choice(world))))
            else:
                expr, answer, _ = _arithmetic(rng)
                parts.append(f"{expr} = {answer}.")
        yield {"text": " ".join(parts)}


def chat_records(
    seed: int, n: int, world: list[Country], held_out: bool = False, arithmetic_only: bool = False
) -> Iterator[dict]:
    """Conversations of one or two question/answer turns, a quarter of them with a system prompt.

    Train and eval conversations ask disjoint questions (`is_held_out`); the facts behind both
    are stated in the pre-training text, so eval measures recall through the chat format.
    """
    rng = random.Random(seed)
    for _ in range(n):
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": DEMO_SYSTEM_PROMPT})
        for _ in range(1 if rng.random() < 0.7 else 2):
            question, answer, _ = _question(rng, world, held_out, arithmetic_only)
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        yield {"messages": messages}


def sentence_answer(answer: str) -> str:
    """The answer style the preference pairs teach, '5' -> '5.' (SFT answers with the bare value;
    the style needs no knowledge beyond the answer, so the tiny model learns it within 100 steps,
    where a longer phrase or restating the question was not learned: docs/results.md)."""
    return f"{answer}."


def preference_records(
    seed: int, n: int, world: list[Country], held_out: bool = False
) -> Iterator[dict]:
    """Arithmetic questions whose chosen answer is right and a sentence (`sentence_answer`); the
    rejected answer is, alternately, the right value given bare (as SFT taught) or a sentence
    with the other operation's result. DPO thus teaches an answer style on top of what the model
    knows; held-out pairs ask questions no pair trained on."""
    del world  # the tiny model does not learn the country facts within the demo's budget
    rng = random.Random(seed)
    for i in range(n):
        question, answer, wrong = _question(rng, [], held_out, arithmetic_only=True)
        rejected = answer if i % 2 == 0 else sentence_answer(wrong)
        yield {"prompt": question, "chosen": sentence_answer(answer), "rejected": rejected}


def grpo_prompt_records(
    seed: int, n: int, world: list[Country], held_out: bool = False
) -> Iterator[dict]:
    """Arithmetic questions in TRL's prompt-only format with the answer the exact-match reward
    reads: {"prompt": "What is 3 + 4?", "answer": "7"}; held-out prompts ask questions no
    training prompt asks."""
    del world
    rng = random.Random(seed)
    for _ in range(n):
        question, answer, _ = _question(rng, [], held_out, arithmetic_only=True)
        yield {"prompt": question, "answer": answer}


# File name -> (generator, number of records, seed offset, extra arguments). Every split has its
# own seed stream; chat and preference eval splits ask only held-out arithmetic questions (the
# ~1M-parameter model learns the arithmetic in pre-training, not the country facts: measured in
# docs/results.md, "The demo").
_SPLITS = {
    "pretrain.jsonl": (pretrain_docs, 3000, 1, {}),
    "pretrain_eval.jsonl": (pretrain_docs, 100, 2, {}),
    "long_docs.jsonl": (long_docs, 120, 3, {}),
    "chat_train.jsonl": (chat_records, 2000, 4, {}),
    "chat_eval.jsonl": (chat_records, 100, 5, {"held_out": True, "arithmetic_only": True}),
    "preference_train.jsonl": (preference_records, 1000, 6, {}),
    "preference_eval.jsonl": (preference_records, 100, 7, {"held_out": True}),
    "grpo_prompts.jsonl": (grpo_prompt_records, 1000, 9, {}),
    "grpo_eval.jsonl": (grpo_prompt_records, 100, 10, {"held_out": True}),
}


def demo_records(name: str, seed: int = 0, scale: float = 1.0) -> list[dict]:
    """The records of one demo file (see `_SPLITS`); `scale` shrinks or grows every split."""
    generator, n, offset, kwargs = _SPLITS[name]
    world = make_world(seed)
    return list(generator(seed * 1000 + offset, max(1, round(n * scale)), world, **kwargs))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


RAW_PRETRAIN = "pretrain_raw.jsonl"  # pretrain.jsonl with noise: what the demo filters


def write_demo_data(
    directory: str | os.PathLike, seed: int = 0, scale: float = 1.0
) -> dict[str, str]:
    """Writes every demo split as JSONL into `directory`, and `RAW_PRETRAIN`; returns file name
    -> path."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name in _SPLITS:
        path = os.path.join(directory, name)
        write_jsonl(path, demo_records(name, seed, scale))
        paths[name] = path
    paths[RAW_PRETRAIN] = os.path.join(directory, RAW_PRETRAIN)
    clean = demo_records("pretrain.jsonl", seed, scale)
    write_jsonl(paths[RAW_PRETRAIN], noisy_pretrain_docs(seed * 1000 + 8, clean))
    return paths


def tokenizer_training_texts(seed: int = 0) -> Iterator[str]:
    """The text the demo tokenizer is trained on: every kind of demo record, chats as ChatML."""
    for name in ("pretrain.jsonl", "long_docs.jsonl"):
        for record in demo_records(name, seed):
            yield record["text"]
    for record in demo_records("chat_train.jsonl", seed):
        # Role names and the newline after them must become tokens too.
        yield "".join(f"{m['role']}\n{m['content']}\n" for m in record["messages"])
    yield "system\nuser\nassistant\ntool\n"
