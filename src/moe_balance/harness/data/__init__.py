"""Text corpora for CPU training: load, split by file, BPE-tokenize, cache, sample windows."""

from .corpus import (  # noqa: F401
    EOT, TOKENIZER_TRAIN_CHARS, Document, TokenizedCorpus, TokenSplit, load_documents, prepare_corpus,
    split_documents, train_tokenizer,
)
