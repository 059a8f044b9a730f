"""The deterministic train/validation split of documents, by a hash of each document's name.

A document's side depends only on the seed and its own name, never on the other documents or
their order, so adding a file to a corpus moves no other file across the split.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

from .documents import Document


def split_documents(
    docs: Iterable[Document], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by document name -> (train, val), input order kept.

    A document goes to validation iff a hash of (seed, name) falls below `val_fraction`, so its
    side does not depend on input order or on the other documents, with one exception: each
    domain with >= 2 documents, and the whole set if it has >= 2, gets at least one document on
    each side (the one whose hash is nearest the threshold moves).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    docs = list(docs)
    by_domain: dict[str, list[Document]] = defaultdict(list)
    for doc in docs:
        by_domain[doc.domain].append(doc)
    val: set[str] = set()
    for group in by_domain.values():
        val |= _val_names(group, val_fraction, seed)
    val = _both_sides(docs, val, seed)
    return [d for d in docs if d.name not in val], [d for d in docs if d.name in val]


def _val_names(docs: list[Document], val_fraction: float, seed: int) -> set[str]:
    val = {d.name for d in docs if _unit_hash(f"{seed}:{d.name}") < val_fraction}
    return _both_sides(docs, val, seed)


def _both_sides(docs: list[Document], val: set[str], seed: int) -> set[str]:
    """`val`, adjusted so that >= 2 distinct names put at least one on each side."""
    names = sorted({d.name for d in docs}, key=lambda n: _unit_hash(f"{seed}:{n}"))
    if len(names) < 2:
        return val
    if not val & set(names):
        return val | {names[0]}
    if set(names) <= val:
        return val - {names[-1]}
    return val


def _unit_hash(key: str) -> float:
    """A deterministic float in [0, 1) from a string."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
