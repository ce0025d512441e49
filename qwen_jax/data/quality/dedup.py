"""Exact and near-duplicate removal, streaming, keeping each cluster's first document.

Exact: documents whose normalised text (Unicode NFC, case-folded, whitespace runs collapsed to
one space) is equal; the first in input order stays.

Near: MinHash signatures of word n-gram shingles (datasketch) and locality-sensitive hashing
over bands. A document is a duplicate when LSH finds a kept document whose estimated Jaccard
similarity (the share of equal signature entries) reaches the threshold; the candidates LSH
returns below it are not removed, which is what keeps precision high. Removed documents are not
indexed, so every cluster is a star around the document that was kept first, and each removed
record names it (`dup_cluster`, its input location) with the estimated similarity
(`dup_jaccard`). Kept documents carry their own location as `dup_cluster`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import unicodedata
from typing import Any

import numpy as np

from qwen_jax.data.quality.stage import Document, StageDefaults


def normalize(text: str) -> str:
    """The text equality is judged on: NFC, case-folded, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclasses.dataclass
class ExactDedup(StageDefaults):
    """Removes documents whose normalised text equals an earlier document's.

    Memory: 8 bytes of digest and the location of each distinct document.
    """

    name: str = "exact_dedup"

    def __post_init__(self):
        self._first: dict[int, str] = {}
        self._added: dict[int, str] = {}

    def process(self, docs: list[Document]) -> None:
        self._added = {}
        for doc in docs:
            key = _digest(normalize(doc.text).encode("utf-8"))
            first = self._first.get(key)
            if first is None:
                self._first[key] = self._added[key] = doc.loc
            else:
                doc.record["dup_cluster"] = first
                doc.remove(f"{self.name}/duplicate", f"same normalised text as {first}")

    def chunk_state(self) -> Any:
        return self._added

    def restore(self, chunk_states: list[Any]) -> None:
        self._first = {}
        for added in chunk_states:
            self._first.update(added)


def _hash32(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little")


def shingles(text: str, ngram: int) -> list[bytes]:
    """The distinct word n-grams of the normalised text (the whole text when it is shorter)."""
    words = normalize(text).split(" ")
    if len(words) <= ngram:
        return [" ".join(words).encode("utf-8")]
    return list(
        {" ".join(words[i : i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)}
    )


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """The sorted distinct 32-bit hashes of the document's shingles (for exact Jaccard)."""
    return np.unique(np.fromiter((_hash32(s) for s in shingles(text, ngram)), np.uint32))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted distinct hash arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


@dataclasses.dataclass
class NearDedup(StageDefaults):
    """MinHash-LSH near-duplicate removal with exact verification.

    LSH over MinHash bands proposes candidates (tuned for `candidate_threshold`, below the
    threshold, so that few true pairs are missed); the Jaccard similarity of the candidate's and
    the document's shingle sets (32-bit hashes, kept for every kept document) decides, so a
    removal is never an estimate's error.

    Attributes:
      threshold: the Jaccard similarity (of word n-gram sets) at and above which a document is
        a near duplicate.
      ngram: words per shingle.
      num_perm: MinHash permutations (signature length).
      bands: LSH bands; None lets datasketch choose bands and rows for `candidate_threshold`.
        bands * rows must not exceed num_perm.
      candidate_threshold: the similarity LSH is tuned for; None: threshold - 0.1.
      seed: the MinHash permutations' seed.
    """

    name: str = "near_dedup"
    threshold: float = 0.8
    ngram: int = 5
    num_perm: int = 128
    bands: int | None = None
    candidate_threshold: float | None = None
    seed: int = 1

    def __post_init__(self):
        import datasketch

        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"NearDedup.threshold must be in (0, 1], got {self.threshold}")
        params = None
        if self.bands is not None:
            rows = self.num_perm // self.bands
            if rows < 1:
                raise ValueError(
                    f"NearDedup: {self.bands} bands need at least as many permutations"
                )
            params = (self.bands, rows)
        candidates = self.candidate_threshold or max(0.05, self.threshold - 0.1)
        self._lsh = datasketch.MinHashLSH(
            threshold=candidates, num_perm=self.num_perm, params=params
        )
        self._shingles: dict[str, np.ndarray] = {}
        self._order: dict[str, int] = {}
        self._added: list[tuple[str, np.ndarray, np.ndarray]] = []
        # One MinHash object's permutations, shared by every signature (the same seed and size).
        self._template = datasketch.MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=int)

    def _minhash(self, hashes: np.ndarray, hashvalues: np.ndarray | None = None):
        import datasketch

        minhash = datasketch.MinHash(
            num_perm=self.num_perm,
            seed=self.seed,
            hashfunc=int,  # the shingles arrive hashed to 32 bits: permuted as they are
            hashvalues=hashvalues,
            permutations=self._template.permutations,
            scheme=self._template.scheme,
        )
        if hashvalues is None:
            minhash.update_batch(hashes.tolist())
        return minhash

    def process(self, docs: list[Document]) -> None:
        self._added = []
        for doc in docs:
            hashes = shingle_hashes(doc.text, self.ngram)
            minhash = self._minhash(hashes)
            best, similarity = None, -1.0
            # Ties go to the earliest kept document.
            for candidate in sorted(self._lsh.query(minhash), key=self._order.__getitem__):
                value = jaccard(self._shingles[candidate], hashes)
                if value > similarity:
                    best, similarity = candidate, value
            if best is not None and similarity >= self.threshold:
                doc.record["dup_cluster"] = best
                doc.record["dup_jaccard"] = round(similarity, 4)
                doc.remove(f"{self.name}/near_duplicate", f"Jaccard {similarity:.3f} with {best}")
                continue
            doc.record["dup_cluster"] = doc.loc
            self._index(doc.loc, hashes, minhash)
            self._added.append((doc.loc, hashes, minhash.hashvalues))

    def _index(self, key: str, hashes: np.ndarray, minhash) -> None:
        self._lsh.insert(key, minhash, check_duplication=False)
        self._shingles[key] = hashes
        self._order[key] = len(self._order)

    def score_fields(self) -> list[str]:
        return ["dup_jaccard"]

    def chunk_state(self) -> Any:
        """The kept documents' keys, shingle hashes and signatures."""
        return list(self._added)

    def restore(self, chunk_states: list[Any]) -> None:
        self.__post_init__()
        for added in chunk_states:
            for key, hashes, hashvalues in added:
                self._index(key, hashes, self._minhash(hashes, hashvalues))
