"""The README's API example runs as written and does what it says."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    layer, out = namespace["layer"], namespace["out"]
    assert out.y.shape == (8, 128, 512)
    assert out.aux_loss.item() == 0.0
    # update_balancers ran once: the bias moved by exactly +/-u (or 0 for an exactly average expert)
    assert set(layer.expert_bias.abs().unique().tolist()) <= {0.0, torch.tensor(1e-3).item()}
    assert int(layer.balancers[0].num_updates) == 1
