"""Every heuristic rule: a document that passes it (the same clean document for all) and one
that fails it, removed by that rule and no earlier one, with the measured value in the reason.
The n-gram rules are each tested on a stage holding only that rule (one n-gram repeated affects
every shorter n-gram too)."""

import pytest

from qwen_jax.data.quality import heuristics
from qwen_jax.data.quality.stage import Document

SENTENCES = [
    "The river runs past the old mill and under a stone bridge.",
    "Farmers bring apples to the market with their carts every Saturday.",
    "A small school stands near the church at the end of the road.",
    "Children learn to read and write there before they move to the city.",
    "In winter the lake freezes and people skate across it with lanterns.",
    "The baker opens his shop early, so that bread is warm for breakfast.",
    "Travellers often stop at the inn to rest their horses for a night.",
    "Old maps of the valley hang on the walls of the town hall.",
    "Every spring a fair brings music, dancing and games to the square.",
    "Most houses have gardens with roses, beans and a few hens.",
    "The doctor visits the farms on a bicycle when the weather is dry.",
    "Visitors say that the view from the hill is worth the long climb.",
]
CLEAN = "\n".join(SENTENCES)


def _verdict(stage, text):
    doc = Document({"text": text}, text, "test:1")
    stage.process([doc])
    return doc.removed


def _without_stop_words(text):
    return "\n".join(
        " ".join(w for w in line.split() if w.lower().strip(".,") not in heuristics.STOP_WORDS)
        for line in text.split("\n")
    )


FILLER = "\n".join(
    f"Line {i} tells of town number {i} in the region, with its own market." for i in range(10)
)

CASES = [
    # GopherQuality, rules in their order
    (heuristics.GopherQuality(), "word_count", "The cat sat on the mat."),
    (heuristics.GopherQuality(max_words=200), "word_count", CLEAN + "\n" + CLEAN),
    (
        heuristics.GopherQuality(),
        "mean_word_length",
        " ".join(["incomprehensibilities", "the", "counterrevolutionaries", "and"] * 20),
    ),
    (heuristics.GopherQuality(), "symbol_word_ratio", CLEAN + "\n" + "#news " * 25),
    (heuristics.GopherQuality(), "bullet_lines", "\n".join("- " + s for s in SENTENCES)),
    (
        heuristics.GopherQuality(),
        "ellipsis_lines",
        "\n".join(s[:-1] + "…" if i < 5 else s for i, s in enumerate(SENTENCES)),
    ),
    (heuristics.GopherQuality(), "alpha_words", CLEAN + "\n" + " ".join(["1234"] * 40)),
    (heuristics.GopherQuality(), "stop_words", _without_stop_words(CLEAN)),
    # GopherRepetition
    (heuristics.GopherRepetition(), "duplicate_lines", CLEAN + ("\n" + SENTENCES[0]) * 6),
    (
        heuristics.GopherRepetition(),
        "duplicate_lines",  # few repeated lines, but they hold many of the characters
        "\n".join(SENTENCES[:4]) + ("\n" + " ".join(SENTENCES[4:8])) * 2,
    ),
    (
        heuristics.GopherRepetition(),
        "duplicate_paragraphs",
        "\n\n".join(SENTENCES[i] + "\n" + SENTENCES[i + 1] for i in range(0, 12, 2))
        + "\n\nYes." * 5,
    ),
    *(
        (
            heuristics.GopherRepetition(max_top_ngram={n: limit}, max_duplicated_ngram={}),
            f"top_{n}gram",
            "\n".join(
                s + " " + " ".join(["golden", "harvest", "festival", "season"][:n])
                for s in SENTENCES
            ),
        )
        for n, limit in ((2, 0.2), (3, 0.18), (4, 0.16))
    ),
    *(
        (
            heuristics.GopherRepetition(max_top_ngram={}, max_duplicated_ngram={n: limit}),
            f"duplicated_{n}gram",
            "\n".join(
                s[:-1] + " under the bright and cold northern sky near the sea." if i < 6 else s
                for i, s in enumerate(SENTENCES)
            ),
        )
        for n, limit in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    ),
    # C4
    (heuristics.C4Rules(), "lorem_ipsum", CLEAN + "\nLorem ipsum dolor sit amet."),
    (heuristics.C4Rules(), "curly_bracket", CLEAN + "\nfunction f() { return 1; }"),
    (heuristics.C4Rules(), "javascript", CLEAN + "\nPlease enable JavaScript to view this page."),
    (heuristics.C4Rules(), "policy", CLEAN + "\nBy using this site you accept our Privacy Policy."),
    (heuristics.C4Rules(), "terminal_punctuation", "\n".join(s[:-1] for s in SENTENCES)),
    (heuristics.C4Rules(), "min_sentences", "A single line of text that ends here."),
]


@pytest.mark.parametrize(
    "stage,rule,text", CASES, ids=[f"{c[0].name}-{c[1]}-{i}" for i, c in enumerate(CASES)]
)
def test_rule_removes_for_its_reason_and_passes_clean_text(stage, rule, text):
    assert _verdict(stage, CLEAN) is None
    removed = _verdict(stage, text)
    assert removed is not None and removed[0] == f"{stage.name}/{rule}", removed
    if rule not in ("lorem_ipsum", "curly_bracket"):
        assert any(c.isdigit() for c in removed[1]), removed  # the measured value is named


def test_every_rule_is_tested():
    named = {(type(s).__name__, r) for s, r, _ in CASES}
    for stage in (heuristics.GopherQuality(), heuristics.GopherRepetition(), heuristics.C4Rules()):
        for rule, _ in stage.rules():
            assert (type(stage).__name__, rule) in named, rule


def test_measures():
    words = "a b c a b c a b".split()
    # "a b" occurs 3 times: 2 characters each, of 8.
    assert heuristics.top_ngram_fraction(words, 2) == pytest.approx(6 / 8)
    # 2-grams seen before cover positions 3..7: 5 of 8 characters.
    assert heuristics.duplicated_ngram_fraction(words, 2) == pytest.approx(5 / 8)
    assert heuristics.top_ngram_fraction("a b c d".split(), 2) == 0.0
