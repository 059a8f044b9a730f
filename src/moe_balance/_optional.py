"""Optional dependencies: which extra installs each one, and one readable error when it is missing.

The core layer needs only torch and numpy. The harness needs the ``train`` extra, Hugging Face
data sets and models the ``hf`` extra; those packages are imported where they are used, so a
missing one fails with a line naming the extra instead of a traceback at import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the extra of moe-balance that installs it
EXTRAS = {
    "tokenizers": "train",
    "tqdm": "train",
    "tensorboard": "train",
    "matplotlib": "train",
    "safetensors": "train",
    "scipy": "train",
    "accelerate": "hf",
    "datasets": "hf",
    "transformers": "hf",
}


class MissingDependency(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    return f"pip install 'moe-balance[{extra}]'" if extra else f"pip install {top}"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise `MissingDependency` saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingDependency(f"{purpose} needs the `{top}` package, which is not installed: "
                                f"{install_hint(top)}", name=top) from e


def missing_dependency_message(err: ImportError) -> str | None:
    """One line for an ImportError of an optional package (ours or raised deep in a library),
    None for anything else (a broken install should still show its traceback)."""
    if isinstance(err, MissingDependency):
        return str(err)
    name = (err.name or "").split(".")[0]
    if name in EXTRAS:
        return f"the optional package `{name}` is not installed: {install_hint(name)}"
    return None
