"""Training and evaluation windows cut from a tokenized split.

``BatchSampler.batch(index)`` is a pure function of (seed, index), so a resumed run sees
exactly the batches an uninterrupted one would; ``eval_windows`` is a fixed set of
non-overlapping windows spread over the whole validation split.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import TokenSplit


class BatchSampler:
    """Random windows for training: many short windows from many documents per batch.

    `batch(index)` depends only on (seed, index), never on earlier calls, so a resumed run sees
    exactly the same data. Windows start at uniformly random offsets and may cross document
    boundaries (the EOT token separates documents); a window's domain is that of its first token.
    """

    def __init__(self, split: TokenSplit, *, seq_len: int, batch_size: int, seed: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if len(split.tokens) <= seq_len + 1:
            raise ValueError(
                f"split has {len(split.tokens)} tokens, too few for windows of seq_len + 1 = "
                f"{seq_len + 1}: use a smaller seq_len or more data")
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` -> (tokens (batch_size, seq_len + 1) int64, domain (batch_size,) int64).

        Inputs are tokens[:, :-1] and next-token targets tokens[:, 1:].
        """
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        n_starts = len(self.split.tokens) - self.seq_len  # last window ends at the last token
        starts = rng.integers(0, n_starts, size=self.batch_size)
        return _windows(self.split, starts, self.seq_len)


def eval_windows(
    split: TokenSplit, *, seq_len: int, max_tokens: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation windows spread evenly over the whole split, in batches.

    About max_tokens // seq_len non-overlapping windows of seq_len + 1 tokens (fewer if the split
    is short), the first at the split's start and the last at its end. Returns a list of
    (tokens (n, seq_len + 1) int64, domain (n,) int64) with n <= batch_size; identical every call.
    """
    if seq_len < 1 or max_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"seq_len, max_tokens and batch_size must be >= 1, "
            f"got {seq_len}, {max_tokens}, {batch_size}")
    window, n_tokens = seq_len + 1, len(split.tokens)
    if n_tokens < window:
        raise ValueError(f"split has {n_tokens} tokens, fewer than one window of {window}")
    n = max(1, min(max_tokens // seq_len, n_tokens // window))
    # floor(i * span / (n - 1)) steps by >= floor(span / (n - 1)) >= window: no overlap.
    span = n_tokens - window
    starts = np.arange(n, dtype=np.int64) * span // max(n - 1, 1)
    return [_windows(split, starts[i:i + batch_size], seq_len) for i in range(0, n, batch_size)]


def _windows(
    split: TokenSplit, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens at `starts` (n,) -> (tokens (n, seq_len + 1), domain (n,))."""
    index = starts[:, None] + np.arange(seq_len + 1)
    tokens = torch.from_numpy(np.asarray(split.tokens[index], dtype=np.int64))
    return tokens, torch.from_numpy(split.domain_at(starts).astype(np.int64))
