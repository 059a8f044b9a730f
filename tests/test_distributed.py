"""Data parallel on 2 gloo processes: counts and losses see the whole global batch."""

import torch
import torch.distributed as dist

from moe_balance import AuxLoss, LossFree, MoE, MoEConfig, update_balancers
from moe_balance.parallel import init_parallel, parallelize
from moe_balance.testing import init_gloo, spawn

CONFIG = MoEConfig(d_model=8, num_experts=4, top_k=1, expert_hidden_size=4,
                   balancers=(LossFree(update_rate=1e-3), AuxLoss(coeff=1.0, scope="global_batch")))


def rank_data(rank):
    return torch.randn(12, 8, generator=torch.Generator().manual_seed(100 + rank)) + 2.0 * rank


def worker(rank, world, port, results):
    init_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        layer = parallelize(MoE(CONFIG), init_parallel(1))  # the balancers count over the data group
        out = layer(rank_data(rank))
        (out.y.sum() + out.aux_loss).backward()
        local_counts = layer.balancers[0].pending_counts.clone()
        update_balancers(layer)
        results[rank] = {"bias": layer.expert_bias.clone(), "local_counts": local_counts,
                         "global_loss": out.losses["aux_loss/global_batch"].detach().clone()}
    finally:
        dist.destroy_process_group()


def test_two_ranks_update_the_same_bias_from_global_counts():
    results = spawn(worker, 2)

    # single-process reference: the same layer sees both ranks' data
    torch.manual_seed(0)
    layer = MoE(CONFIG)
    counts = [layer(rank_data(r)).decision.routed_tokens_per_expert for r in range(2)]
    for r in range(2):
        assert torch.equal(results[r]["local_counts"], counts[r])
    total = (counts[0] + counts[1]).double()
    expected_bias = (1e-3 * torch.sign(total.mean() - total)).float()
    assert not torch.equal(torch.sign(counts[0].double().mean() - counts[0]).float(), torch.sign(total.mean() - total).float()), \
        "test data should make the local and global update differ"
    for r in range(2):
        assert torch.equal(results[r]["bias"], expected_bias)

    # the global-batch loss on each rank uses f from both ranks' counts and P from its own tokens
    from moe_balance.balancing import normalized_probs, switch_loss_from_counts
    for r in range(2):
        scores = layer(rank_data(r)).decision.scores
        expected = switch_loss_from_counts(normalized_probs(scores), counts[0] + counts[1])
        torch.testing.assert_close(results[r]["global_loss"], expected.detach())


def local_worker(rank, world, port, results):
    init_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        layer = MoE(CONFIG)  # not parallelized: the balancers never reach for the default group
        layer(rank_data(rank)).y.sum().backward()
        counts = layer.balancers[0].pending_counts.clone()
        update_balancers(layer)
        results[rank] = {"bias": layer.expert_bias.clone(), "counts": counts}
    finally:
        dist.destroy_process_group()


def test_an_unparallelized_layer_updates_from_its_own_counts():
    results = spawn(local_worker, 2)
    for r in range(2):
        counts = results[r]["counts"].double()
        assert torch.equal(results[r]["bias"], (1e-3 * torch.sign(counts.mean() - counts)).float())
    assert not torch.equal(results[0]["bias"], results[1]["bias"])
