"""Windows: the pure training sampler and the fixed evaluation windows."""

import numpy as np
import pytest
import torch

from moe_balance.harness.data import TokenSplit
from moe_balance.harness.sampling import BatchSampler, eval_windows


def _arange_split(n: int = 1000, boundary: int = 500) -> TokenSplit:
    """Token i has value i; documents start at 0 (domain 0) and at `boundary` (domain 1)."""
    return TokenSplit(tokens=np.arange(n, dtype=np.uint16), doc_starts=np.array([0, boundary]),
                      doc_domains=np.array([0, 1]))


# ----------------------------------------------------------------------------------------------
# BatchSampler


def test_batch_sampler_is_pure_and_windows_are_contiguous():
    split = _arange_split()
    sampler = BatchSampler(split, seq_len=16, batch_size=64, seed=3)
    tokens, domain = sampler.batch(5)
    assert tokens.shape == (64, 17) and tokens.dtype == torch.int64
    assert domain.shape == (64,) and domain.dtype == torch.int64
    # Token i has value i: each row is a contiguous window, targets are inputs shifted by one.
    starts = tokens[:, 0]
    assert torch.equal(tokens, starts[:, None] + torch.arange(17))
    assert torch.equal(tokens[:, 1:], tokens[:, :-1] + 1)
    assert int(starts.min()) >= 0 and int(tokens.max()) <= 999
    assert torch.equal(domain, (starts >= 500).long())

    fresh = BatchSampler(split, seq_len=16, batch_size=64, seed=3)
    fresh.batch(0)
    assert torch.equal(fresh.batch(5)[0], tokens)  # no hidden iterator state
    assert not torch.equal(sampler.batch(6)[0], tokens)
    other_seed = BatchSampler(split, seq_len=16, batch_size=64, seed=4)
    assert not torch.equal(other_seed.batch(5)[0], tokens)


def test_batch_sampler_covers_the_whole_split():
    sampler = BatchSampler(_arange_split(n=40), seq_len=8, batch_size=256, seed=0)
    starts = sampler.batch(0)[0][:, 0]
    assert int(starts.min()) == 0 and int(starts.max()) == 40 - 9  # last window ends at the end


@pytest.mark.parametrize(
    "kwargs, message",
    [({"seq_len": 0}, "seq_len"), ({"batch_size": 0}, "batch_size"),
     ({"seq_len": 999}, "too few"), ({"seed": -1}, "seed")])
def test_batch_sampler_validates(kwargs, message):
    args = {"seq_len": 8, "batch_size": 4, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        BatchSampler(_arange_split(), **args)


# ----------------------------------------------------------------------------------------------
# eval_windows


def test_eval_windows_spread_over_split():
    split = _arange_split()
    batches = eval_windows(split, seq_len=9, max_tokens=200, batch_size=8)
    again = eval_windows(split, seq_len=9, max_tokens=200, batch_size=8)
    assert len(batches) == len(again)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))

    tokens = torch.cat([t for t, _ in batches])
    domain = torch.cat([d for _, d in batches])
    assert [len(t) for t, _ in batches] == [8, 8, 6]
    assert tokens.shape == (22, 10) and tokens.dtype == torch.int64  # 200 // 9 windows
    starts = tokens[:, 0]
    assert torch.equal(tokens, starts[:, None] + torch.arange(10))
    assert int(starts[0]) == 0 and int(tokens[-1, -1]) == 999  # both ends of the split
    assert torch.all(starts[1:] - starts[:-1] >= 10)  # non-overlapping
    assert torch.all(starts[1:] - starts[:-1] <= 50)  # spread evenly, not bunched
    assert torch.equal(domain, (starts >= 500).long())


def test_eval_windows_clamps_to_short_split():
    tokens = torch.cat([t for t, _ in eval_windows(_arange_split(n=35), seq_len=4,
                                                   max_tokens=10_000, batch_size=100)])
    assert tokens.shape == (7, 5)  # every token used exactly once
    assert torch.equal(tokens.flatten(), torch.arange(35))
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(_arange_split(n=35), seq_len=40, max_tokens=100, batch_size=1)
