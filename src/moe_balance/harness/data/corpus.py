"""Tokenized corpora: the BPE tokenizer, the token streams of both splits, and their disk cache.

`prepare_corpus` loads and splits the documents, trains (or loads) the tokenizer on the train
split, tokenizes both splits into memory-mapped .npy arrays under a cache directory keyed by a
hash of everything that decides them, and returns them as a `TokenizedCorpus`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..._optional import require
from .._files import atomic_write
from .documents import Document, load_documents
from .split import _unit_hash, split_documents

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT = "<|endoftext|>"
"""Special token appended after every document (the document separator)."""

TOKENIZER_TRAIN_CHARS = 20_000_000
"""At most this many characters of training text go into BPE training (keeps it under a minute)."""

_FORMAT = 1  # bump when the cache layout or tokenization changes, so old caches are ignored
_ENCODE_CHUNK = 64  # documents per encode_batch call: parallel enough, and a smooth progress bar


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(
    docs: Iterable[Document], vocab_size: int = 8192, *, path: Path, progress: bool = False
) -> Tokenizer:
    """Byte-level BPE tokenizer trained on `docs` (first TOKENIZER_TRAIN_CHARS characters).

    Cached: if `path` exists it is loaded and `docs` is ignored. The vocabulary holds the 256
    byte symbols, the EOT special token and merges, up to `vocab_size` (fewer for tiny corpora).
    """
    path = Path(path)
    if path.is_file():
        return _load_tokenizer(path)
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOT}), got {vocab_size}")
    tok = require("tokenizers", "training a tokenizer")
    pre_tokenizers = tok.pre_tokenizers
    tokenizer = tok.Tokenizer(tok.models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tok.decoders.ByteLevel()
    trainer = tok.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(_capped_texts(docs, TOKENIZER_TRAIN_CHARS), trainer=trainer)
    atomic_write(path, lambda tmp: tmp.write_text(tokenizer.to_str(), encoding="utf-8"))
    return _load_tokenizer(path)


def _load_tokenizer(path: Path) -> Tokenizer:
    tokenizer = require("tokenizers", "loading a tokenizer").Tokenizer.from_file(str(path))
    # A literal "<|endoftext|>" inside a document is plain text, so EOT ids mark only the
    # separators. The flag is not saved in tokenizer.json, hence set on every load.
    tokenizer.encode_special_tokens = True
    return tokenizer


def _capped_texts(docs: Iterable[Document], max_chars: int) -> Iterator[str]:
    """Texts of `docs` in order, the last one cut so that max_chars are yielded in total."""
    left = max_chars
    for doc in docs:
        if left <= 0:
            return
        yield doc.text[:left]
        left -= len(doc.text)


# ----------------------------------------------------------------------------------------------
# Tokenized corpus


@dataclass
class TokenSplit:
    """One split as a single token stream: all documents concatenated, each followed by EOT."""

    tokens: np.ndarray  # (n_tokens,) uint16 or uint32, memory-mapped
    doc_starts: np.ndarray  # (n_docs,) int64: offset of each document's first token, increasing
    doc_domains: np.ndarray  # (n_docs,) int64: index into TokenizedCorpus.domains

    def domain_at(self, positions: np.ndarray) -> np.ndarray:
        """Domain index of the document holding each token position: (...,) -> (...,) int64."""
        return self.doc_domains[np.searchsorted(self.doc_starts, positions, side="right") - 1]


@dataclass
class TokenizedCorpus:
    """Tokenizer plus train and validation token streams, as built by `prepare_corpus`."""

    tokenizer: Tokenizer
    vocab_size: int  # the tokenizer's actual size: every token id is < vocab_size
    train: TokenSplit
    val: TokenSplit
    domains: list[str]  # sorted domain names

    @property
    def eot_id(self) -> int:
        """Id of the EOT token that follows every document."""
        return self.tokenizer.token_to_id(EOT)


def prepare_corpus(
    spec: str | None = None,
    *,
    vocab_size: int = 8192,
    cache_dir: Path = Path(".cache/moe_balance"),
    val_fraction: float = 0.05,
    seed: int = 0,
    max_train_tokens: int | None = None,
    progress: bool = True,
    tokenizer_file: Path | None = None,
) -> TokenizedCorpus:
    """Load, split, tokenize and cache the corpus for `spec` (see `load_documents`).

    The tokenizer is trained on the train split only. Results live in `cache_dir/<key>/`, where
    the key hashes the documents' names, domains and contents and the other arguments; a second
    call only re-reads the documents to compute the key. `max_train_tokens` keeps that many
    train tokens, taken from a fixed pseudo-random order of the train documents.
    tokenizer_file: a model's own ``tokenizer.json`` to tokenize with instead of training one
    (``vocab_size`` is then ignored); documents are separated by its EOT token when it has one.
    """
    if max_train_tokens is not None and max_train_tokens < 1:
        raise ValueError(f"max_train_tokens must be None or >= 1, got {max_train_tokens}")
    cache_dir = Path(cache_dir)
    docs = load_documents(spec, cache_dir=cache_dir)
    if len(docs) < 2:
        raise ValueError(f"data spec {spec!r} gave {len(docs)} document; need >= 2 to split")
    train_docs, val_docs = _ordered_split(docs, val_fraction, seed)
    params = {"format": _FORMAT, "vocab_size": vocab_size, "val_fraction": val_fraction,
              "seed": seed, "max_train_tokens": max_train_tokens}
    if tokenizer_file is not None:
        params["tokenizer"] = hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest()
    out = cache_dir / _short_hash(json.dumps(params, sort_keys=True), _docs_digest(docs))
    if not (out / "meta.json").is_file():
        if tokenizer_file is not None:
            tokenizer = _load_tokenizer(Path(tokenizer_file))
        else:
            tokenizer = _cached_train_tokenizer(train_docs, vocab_size, cache_dir, progress)
        _build_corpus(out, tokenizer, train_docs, val_docs, max_train_tokens, progress)
    return _load_corpus(out)


def _ordered_split(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, val) by `split_documents`, each in a fixed pseudo-random order of the names."""
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    # A fixed hash order (not load order) so truncation and tokenizer capping sample all domains.
    train_docs, val_docs = (
        sorted(split, key=lambda d: _unit_hash(f"order:{seed}:{d.name}"))
        for split in (train_docs, val_docs)
    )
    return train_docs, val_docs


def _cached_train_tokenizer(train_docs: list[Document], vocab_size: int, cache_dir: Path,
                            progress: bool) -> Tokenizer:
    """`train_tokenizer` on the train split, cached under cache_dir/tokenizers/ by a hash of
    its settings and the train documents (several corpora can share one tokenizer)."""
    tokenizer_key = _short_hash(
        json.dumps([_FORMAT, vocab_size, TOKENIZER_TRAIN_CHARS]), _docs_digest(train_docs))
    return train_tokenizer(
        train_docs, vocab_size, path=cache_dir / "tokenizers" / f"{tokenizer_key}.json",
        progress=progress)


def _build_corpus(out: Path, tokenizer: Tokenizer, train_docs: list[Document],
                  val_docs: list[Document], max_train_tokens: int | None, progress: bool) -> None:
    """Tokenize both splits into `out`; meta.json, written last, marks the cache complete."""
    domains = sorted({d.domain for d in train_docs + val_docs})
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.uint32
    counts = {}
    for name, docs, limit in (("train", train_docs, max_train_tokens), ("val", val_docs, None)):
        counts[name] = _build_split(out, name, tokenizer, docs, limit, domains, dtype, progress)
    atomic_write(out / "tokenizer.json", lambda tmp: tmp.write_text(tokenizer.to_str(), encoding="utf-8"))
    meta = {"format": _FORMAT, "domains": domains, "counts": counts}
    atomic_write(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


def _build_split(out: Path, name: str, tokenizer: Tokenizer, docs: list[Document], limit: int | None,
                 domains: list[str], dtype, progress: bool) -> dict[str, int]:
    """Tokenize one split into out/NAME_{tokens,starts,domains}.npy; return its counts."""
    tokens, starts = _encode_docs(tokenizer, docs, max_tokens=limit, desc=f"tokenize {name}",
                                  progress=progress)
    doc_domains = np.array([domains.index(d.domain) for d in docs[:len(starts)]], np.int64)
    for suffix, array in (("tokens", tokens.astype(dtype)), ("starts", starts),
                          ("domains", doc_domains)):
        atomic_write(out / f"{name}_{suffix}.npy", lambda tmp, a=array: _save_npy(tmp, a))
    return {"tokens": len(tokens), "docs": len(starts)}


def _encode_docs(tokenizer: Tokenizer, docs: list[Document], *, max_tokens: int | None,
                 desc: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `docs`, each followed by EOT, cut after `max_tokens`.

    Returns (tokens (n_tokens,) int64, doc_starts (n_docs,) int64); documents that would start
    past the cut are left out, so n_docs <= len(docs).
    """
    eot = tokenizer.token_to_id(EOT)
    separator = [] if eot is None else [eot]  # a model's own tokenizer may have no EOT token
    pieces, total = [], 0
    tqdm = require("tqdm", "progress bars").tqdm
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress) as bar:
        for i in range(0, len(docs), _ENCODE_CHUNK):
            chunk = docs[i:i + _ENCODE_CHUNK]
            for enc in tokenizer.encode_batch([d.text for d in chunk], add_special_tokens=False):
                pieces.append(np.array(enc.ids + separator, dtype=np.int64))
                total += len(pieces[-1])
            bar.update(len(chunk))
            if max_tokens is not None and total >= max_tokens:
                break
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    tokens = np.concatenate(pieces)[:max_tokens]
    return tokens, starts[starts < len(tokens)]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temp name
        np.save(f, array)


def _load_corpus(out: Path) -> TokenizedCorpus:
    meta = json.loads((out / "meta.json").read_text())
    tokenizer = _load_tokenizer(out / "tokenizer.json")
    splits = [
        TokenSplit(
            tokens=np.load(out / f"{name}_tokens.npy", mmap_mode="r"),
            doc_starts=np.load(out / f"{name}_starts.npy"),
            doc_domains=np.load(out / f"{name}_domains.npy"),
        )
        for name in ("train", "val")
    ]
    return TokenizedCorpus(tokenizer, tokenizer.get_vocab_size(), *splits, meta["domains"])


def _docs_digest(docs: Iterable[Document]) -> str:
    """Hash of the documents' names, domains and texts, independent of their order."""
    h = hashlib.sha256()
    for doc in sorted(docs, key=lambda d: d.name):
        for field in (doc.name, doc.domain, doc.text):
            h.update(field.encode())
            h.update(b"\0")
    return h.hexdigest()


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
