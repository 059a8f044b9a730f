"""torch.compile on the CPU: where the layer's graph breaks, and that compiled training equals eager."""

import pytest
import torch
import torch._dynamo as dynamo

from moe_balance import LossFree, MoE, MoEConfig, update_balancers


def layer(dtype):
    torch.manual_seed(0)
    return MoE(MoEConfig(d_model=32, num_experts=8, top_k=2, expert_hidden_size=32,
                         balancers=(LossFree(rule="adaptive"),))).to(dtype)


def test_bf16_routing_and_dispatch_compile_without_a_graph_break():
    moe = layer(torch.bfloat16)
    x = torch.randn(64, 32).bfloat16()
    moe.eval()
    dynamo.reset()
    assert dynamo.explain(lambda t: moe(t).y)(x).graph_break_count == 0
    # training: exactly one break, the count hook (its backward updates the balancer's buffers)
    moe.train()
    dynamo.reset()
    explained = dynamo.explain(lambda t: moe(t).y)(x)
    assert explained.graph_break_count == 1
    assert "disable" in str(explained.break_reasons[0].reason)
    assert "observe_on_backward" in explained.break_reasons[0].user_stack[-1].line


@pytest.mark.parametrize("dtype, backend", [(torch.bfloat16, "inductor"), (torch.float32, "aot_eager")],
                         ids=["bf16-inductor", "fp32-aot_eager"])
def test_compiled_training_steps_equal_eager(dtype, backend):
    def run(compiled):
        moe = layer(dtype)
        forward = torch.compile(lambda t: moe(t).y, backend=backend) if compiled else (lambda t: moe(t).y)
        steps = []
        for step in range(3):
            x = torch.randn(64, 32, generator=torch.Generator().manual_seed(step)).to(dtype).requires_grad_()
            y = forward(x)
            y.float().square().sum().backward()
            counts = moe.balancers[0].pending_counts.clone()
            update_balancers(moe)
            steps.append((y.detach().float(), x.grad.float(), moe.router.weight.grad.clone(), counts,
                          moe.expert_bias.clone()))
        return steps

    dynamo.reset()
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for eager, compiled in zip(run(False), run(True)):
        for a, b in zip(eager[:3], compiled[:3]):
            torch.testing.assert_close(b, a, **tolerance)
        assert torch.equal(compiled[3], eager[3])  # the counts the bias update used: exact
        assert int(compiled[3].sum()) == 64 * 2
        torch.testing.assert_close(compiled[4], eager[4], rtol=0, atol=1e-6)
