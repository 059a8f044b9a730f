"""The small two-domain corpus several tests train on: pseudo-prose and pseudo-code files of
seeded random words (the same files for the same arguments, on every machine)."""

from pathlib import Path

import torch

GREEK = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def write_two_domain_corpus(root: Path, words: list[str] = GREEK, files: int = 24) -> Path:
    """``files`` prose files of 600 words and as many code files of 150 functions under root."""
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(files):
        drawn = [words[j] for j in torch.randint(0, len(words), (600,), generator=gen).tolist()]
        (root / f"prose_{i}.txt").write_text(" ".join(drawn) + ".\n")
        (root / f"code_{i}.py").write_text("\n".join(f"def {w}_{k}(x):\n    return x + {k}"
                                                     for k, w in enumerate(drawn[:150])))
    return root
