"""Rule-based document filters: the Gopher quality and repetition rules (Rae et al. 2021,
appendix A) and the C4 rules (Raffel et al. 2020, section 2.2), with their published thresholds
as defaults.

Each stage checks its rules in order and removes a document at the first rule it fails; the
rule's name and the measured value are the counted reason (`gopher_quality/word_count`,
`"12 words < 50"`). The C4 rules judge whole documents (C4 dropped lines; here a document is
kept or removed as written, so the output stays a subset of the input).

Definitions: words are whitespace-separated tokens with surrounding punctuation stripped (empty
ones dropped); lines are the non-blank lines; paragraphs are separated by blank lines; a line or
paragraph is duplicated when an equal one came earlier in the document; the duplicated n-gram
fraction is the share of word characters covered by n-grams that occurred earlier in the
document; the top n-gram fraction is the share of word characters the most frequent repeated
n-gram covers (its length times its count).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import string
from collections.abc import Callable, Mapping

from qwen_jax.data.quality.stage import Document, StageDefaults

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "●", "○", "◦", "▪", "‣", "-", "*", "–")
ELLIPSES = ("...", "…")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’")
JAVASCRIPT = "javascript"
POLICY_PHRASES = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


class Text:
    """The measures the rules share, computed once per document."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        return [w for w in (t.strip(string.punctuation) for t in self.text.split()) if w]

    @functools.cached_property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.split("\n") if line.strip()]

    @functools.cached_property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in re.split(r"\n\s*\n", self.text) if p.strip()]

    @functools.cached_property
    def word_chars(self) -> int:
        return sum(len(w) for w in self.words)


def _duplicated(items: list[str]) -> list[str]:
    """The items equal to an earlier one."""
    seen: set[str] = set()
    repeats = []
    for item in items:
        if item in seen:
            repeats.append(item)
        seen.add(item)
    return repeats


def top_ngram_fraction(words: list[str], n: int) -> float:
    """Characters covered by the most frequent n-gram that occurs more than once, as a share of
    all word characters."""
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    counts = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    return 0.0 if count < 2 else sum(len(w) for w in gram) * count / total


def duplicated_ngram_fraction(words: list[str], n: int) -> float:
    """Word characters covered by n-grams that occurred earlier in the document, as a share of
    all word characters (each word counted once)."""
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            covered[i : i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total


Rule = Callable[[Text], str | None]  # the reason a document fails, or None


class _RuleStage(StageDefaults):
    """A stage that removes a document at the first of its `rules()` it fails."""

    name: str

    def rules(self) -> list[tuple[str, Rule]]:
        raise NotImplementedError

    def process(self, docs: list[Document]) -> None:
        rules = self.rules()
        for doc in docs:
            text = Text(doc.text)
            for rule, check in rules:
                reason = check(text)
                if reason is not None:
                    doc.remove(f"{self.name}/{rule}", reason)
                    break


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclasses.dataclass
class GopherQuality(_RuleStage):
    """Gopher's quality rules: document length, word shape, symbols, bullets and ellipses,
    alphabetic words, stop words."""

    name: str = "gopher_quality"
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2

    def rules(self) -> list[tuple[str, Rule]]:
        def word_count(t: Text):
            n = len(t.words)
            if n < self.min_words:
                return f"{n} words < {self.min_words}"
            if n > self.max_words:
                return f"{n} words > {self.max_words}"

        def mean_word_length(t: Text):
            mean = _fraction(t.word_chars, len(t.words))
            if not self.min_mean_word_length <= mean <= self.max_mean_word_length:
                return (
                    f"mean word length {mean:.2f} outside "
                    f"[{self.min_mean_word_length}, {self.max_mean_word_length}]"
                )

        def symbol_word_ratio(t: Text):
            symbols = t.text.count("#") + sum(t.text.count(e) for e in ELLIPSES)
            ratio = _fraction(symbols, len(t.words))
            if ratio > self.max_symbol_word_ratio:
                return f"symbol-to-word ratio {ratio:.3f} > {self.max_symbol_word_ratio}"

        def bullet_lines(t: Text):
            share = _fraction(sum(line.startswith(BULLETS) for line in t.lines), len(t.lines))
            if share > self.max_bullet_lines:
                return f"{share:.2f} of lines start with a bullet > {self.max_bullet_lines}"

        def ellipsis_lines(t: Text):
            share = _fraction(sum(line.endswith(ELLIPSES) for line in t.lines), len(t.lines))
            if share > self.max_ellipsis_lines:
                return f"{share:.2f} of lines end with an ellipsis > {self.max_ellipsis_lines}"

        def alpha_words(t: Text):
            share = _fraction(sum(any(c.isalpha() for c in w) for w in t.words), len(t.words))
            if share < self.min_alpha_words:
                return f"{share:.2f} of words have a letter < {self.min_alpha_words}"

        def stop_words(t: Text):
            found = sum(w.lower() in STOP_WORDS for w in t.words)
            if found < self.min_stop_words:
                return f"{found} stop words < {self.min_stop_words}"

        return [
            ("word_count", word_count),
            ("mean_word_length", mean_word_length),
            ("symbol_word_ratio", symbol_word_ratio),
            ("bullet_lines", bullet_lines),
            ("ellipsis_lines", ellipsis_lines),
            ("alpha_words", alpha_words),
            ("stop_words", stop_words),
        ]


@dataclasses.dataclass
class GopherRepetition(_RuleStage):
    """Gopher's repetition rules: duplicated lines and paragraphs (by count and by characters),
    the most frequent 2-4-grams, and duplicated 5-10-grams."""

    name: str = "gopher_repetition"
    max_duplicate_lines: float = 0.3
    max_duplicate_paragraphs: float = 0.3
    max_duplicate_line_chars: float = 0.2
    max_duplicate_paragraph_chars: float = 0.2
    max_top_ngram: Mapping[int, float] = dataclasses.field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    max_duplicated_ngram: Mapping[int, float] = dataclasses.field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    def rules(self) -> list[tuple[str, Rule]]:
        def repeated(kind: str, items: Callable[[Text], list[str]], max_count, max_chars):
            def check(t: Text):
                parts = items(t)
                repeats = _duplicated(parts)
                share = _fraction(len(repeats), len(parts))
                if share > max_count:
                    return f"{share:.2f} of {kind} are repeats > {max_count}"
                chars = _fraction(sum(map(len, repeats)), sum(map(len, parts)))
                if chars > max_chars:
                    return f"repeated {kind} hold {chars:.2f} of characters > {max_chars}"

            return check

        def ngrams(what: str, measure, n: int, limit: float) -> Rule:
            def check(t: Text):
                share = measure(t.words, n)
                if share > limit:
                    return f"{what.format(n=n)} cover {share:.3f} of characters > {limit}"

            return check

        return [
            (
                "duplicate_lines",
                repeated(
                    "lines",
                    lambda t: t.lines,
                    self.max_duplicate_lines,
                    self.max_duplicate_line_chars,
                ),
            ),
            (
                "duplicate_paragraphs",
                repeated(
                    "paragraphs",
                    lambda t: t.paragraphs,
                    self.max_duplicate_paragraphs,
                    self.max_duplicate_paragraph_chars,
                ),
            ),
            *(
                (f"top_{n}gram", ngrams("the top {n}-gram's repeats", top_ngram_fraction, n, v))
                for n, v in sorted(self.max_top_ngram.items())
            ),
            *(
                (
                    f"duplicated_{n}gram",
                    ngrams("duplicated {n}-grams", duplicated_ngram_fraction, n, v),
                )
                for n, v in sorted(self.max_duplicated_ngram.items())
            ),
        ]


@dataclasses.dataclass
class C4Rules(_RuleStage):
    """C4's rules, judged per document: placeholder text, code, JavaScript notices, policy
    boilerplate, lines without terminal punctuation, too few sentences."""

    name: str = "c4"
    max_javascript_lines: float = 0.0
    max_policy_lines: float = 0.0
    min_terminal_punctuation_lines: float = 0.5
    min_sentences: int = 3

    def rules(self) -> list[tuple[str, Rule]]:
        def lorem_ipsum(t: Text):
            if "lorem ipsum" in t.text.lower():
                return "contains 'lorem ipsum'"

        def curly_bracket(t: Text):
            if "{" in t.text:
                return "contains '{'"

        def lines_with(kind: str, phrases: tuple[str, ...], limit: float) -> Rule:
            def check(t: Text):
                hits = sum(any(p in line.lower() for p in phrases) for line in t.lines)
                share = _fraction(hits, len(t.lines))
                if share > limit:
                    return f"{share:.2f} of lines are {kind} > {limit}"

            return check

        def terminal_punctuation(t: Text):
            share = _fraction(
                sum(line.endswith(TERMINAL_PUNCTUATION) for line in t.lines), len(t.lines)
            )
            if share < self.min_terminal_punctuation_lines:
                return (
                    f"{share:.2f} of lines end in terminal punctuation < "
                    f"{self.min_terminal_punctuation_lines}"
                )

        def sentences(t: Text):
            n = len(_SENTENCE_END.findall(t.text))
            if n < self.min_sentences:
                return f"{n} sentences < {self.min_sentences}"

        return [
            ("lorem_ipsum", lorem_ipsum),
            ("curly_bracket", curly_bracket),
            (
                "javascript",
                lines_with("JavaScript notices", (JAVASCRIPT,), self.max_javascript_lines),
            ),
            ("policy", lines_with("policy boilerplate", POLICY_PHRASES, self.max_policy_lines)),
            ("terminal_punctuation", terminal_punctuation),
            ("min_sentences", sentences),
        ]
