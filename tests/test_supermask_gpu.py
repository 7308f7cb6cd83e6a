"""The supermask op's accelerator branches (torch.topk masks, unpacked masks kept for backward,
cached float weights, whole-tensor score gradients) against the CPU path, which the rest of
the suite covers. Skipped where no CUDA device is present; run on a lent GPU machine with
`python -m pytest -q tests/test_supermask_gpu.py`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedge.models.registry import build_model
from fedge.models.supermask import model_masks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 convolutions would differ from the CPU by ~1e-3; compare full float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("name", ["mlp-mpt", "conv4-mpt", "conv4-mpt11"])
def test_gpu_forward_backward_and_step_match_the_cpu(name):
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    models = {dev: build_model(name, (1, 28, 28), 10, seed=3).to(dev) for dev in ("cpu", "cuda")}
    grads, logits = {}, {}
    for dev, model in models.items():
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        out = model(x.to(dev))
        F.cross_entropy(out, y.to(dev)).backward()
        logits[dev] = out.detach().cpu()
        grads[dev] = {k: p.grad.detach().cpu() for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-4, atol=1e-4)
    assert grads["cpu"] and grads["cuda"].keys() == grads["cpu"].keys()
    for k in grads["cpu"]:
        torch.testing.assert_close(grads["cuda"][k], grads["cpu"][k], rtol=1e-3, atol=1e-6, msg=k)
    masks = {dev: model_masks(model) for dev, model in models.items()}
    for k, m in masks["cpu"].items():
        assert (masks["cuda"][k] == m).mean() > 0.999, k  # after one step; exact ties may rank differently
