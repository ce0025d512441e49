"""Accounting for bad input: every rejected record is counted, the first few are logged with
their file:line, and a source whose bad fraction passes its threshold stops the run.

Rejections happen where a record is parsed (in the Grain map that turns a raw record into a
document), so with worker processes each worker keeps its own tally and enforces the threshold
on its share of the stream.
"""

from __future__ import annotations

import collections
import dataclasses

from absl import logging


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason shown in reports."""


class BadInputError(RuntimeError):
    """Raised when a source has too many bad records."""


@dataclasses.dataclass
class SourceTally:
    seen: int = 0
    bad: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)  # first few (location, reason)

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0


class BadRecordTracker:
    """Counts good and bad records per source and enforces each source's threshold.

    The fraction is judged from a source's first record on, as soon as the count makes it
    meaningful: once `min_bad` of its records were bad (a 30%-bad file fails within its first
    ~35 records) or `min_records` were read (so one bad line among the first few never aborts a
    run, and a file at half the threshold passes: 10 bad records in fewer than 1,000 from a 0.5%
    source has a probability of 3%). `finish()` judges whatever was seen (finite passes).

    Args:
      thresholds: source name -> maximum tolerated bad fraction.
      min_records, min_bad: when the fraction starts being judged (above).
      log_first: how many bad records per source are logged with their location.
    """

    def __init__(
        self,
        thresholds: dict[str, float],
        min_records: int = 1000,
        log_first: int = 5,
        min_bad: int = 10,
    ):
        self._thresholds = dict(thresholds)
        self._min_records = min_records
        self._min_bad = min_bad
        self._log_first = log_first
        self.tallies: dict[str, SourceTally] = collections.defaultdict(SourceTally)

    def good(self, source: str, count: int = 1) -> None:
        self.tallies[source].seen += count
        self._check(source, final=False)

    def bad(self, source: str, location: str, reason: str) -> None:
        tally = self.tallies[source]
        tally.seen += 1
        tally.bad += 1
        # Reasons are aggregated by their kind (text before the first ':') so that reports stay short.
        tally.reasons[reason.split(":")[0]] += 1
        if len(tally.examples) < self._log_first:
            tally.examples.append((location, reason))
            logging.warning("bad record in source %r at %s: %s", source, location, reason)
        self._check(source, final=False)

    def finish(self) -> None:
        """Judges every source on all it has seen (for finite passes: eval, prepare)."""
        for source in list(self.tallies):
            self._check(source, final=True)

    def state(self) -> dict:
        """The tallies as JSON, saved with the data iterator's state."""
        return {
            source: {"seen": t.seen, "bad": t.bad, "reasons": dict(t.reasons)}
            for source, t in self.tallies.items()
        }

    def restore(self, state: dict) -> None:
        """Continues the tallies of a saved `state()`, so a resumed run's totals are the run's."""
        for source, saved in state.items():
            tally = self.tallies[source]
            tally.seen, tally.bad = saved["seen"], saved["bad"]
            tally.reasons = collections.Counter(saved["reasons"])

    def scalars(self) -> dict[str, float]:
        """Per source: records read, bad ones, and bad ones by reason (for metrics.jsonl)."""
        out = {}
        for source, t in sorted(self.tallies.items()):
            out[f"{source}/records"] = t.seen
            out[f"{source}/bad"] = t.bad
            out.update({f"{source}/bad/{reason}": n for reason, n in sorted(t.reasons.items())})
        return out

    def summary(self) -> str:
        lines = []
        for source, t in sorted(self.tallies.items()):
            reasons = ", ".join(f"{r}: {n}" for r, n in t.reasons.most_common()) or "none"
            lines.append(
                f"{source}: {t.seen} records, {t.bad} bad ({t.bad_fraction:.2%}); {reasons}"
            )
        return "\n".join(lines)

    def _check(self, source: str, final: bool) -> None:
        tally = self.tallies[source]
        if not final and tally.seen < self._min_records and tally.bad < self._min_bad:
            return
        limit = self._thresholds.get(source, 0.01)
        if tally.bad_fraction > limit:
            where = "; ".join(f"{loc}: {reason}" for loc, reason in tally.examples)
            raise BadInputError(
                f"Source {source!r}: {tally.bad} of {tally.seen} records are bad "
                f"({tally.bad_fraction:.2%} > max_bad_fraction {limit:.2%}). "
                f"Reasons: {dict(tally.reasons)}. First bad records: {where}"
            )
