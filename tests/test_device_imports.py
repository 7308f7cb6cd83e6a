"""The device's training path imports nothing its job does not run (issue 14, item 4): no
torchvision, and no torch._dynamo, which torch.optim's optimisers import when built and which
brings sympy, triton and torch.distributed (~150 MB resident, docs/benchmarks.md).

A fresh interpreter (this pytest process has imported all of fedge) imports what `fedge agent`
imports (fedge.cli.agent, then the modules run_agent imports), trains through the agent's own
TrainingPool with the same requests the agent submits (SGD on an MLP, Adam on Conv-4 MPT),
evaluates the trained MLP through the pool, and reports sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

FORBIDDEN = ("torchvision", "torch._dynamo", "torch._inductor", "sympy", "triton", "onnx", "onnxruntime",
             "matplotlib")

SCRIPT = textwrap.dedent(
    r'''
    import json, sys, threading

    import fedge.cli.agent  # noqa: F401 - `fedge agent`'s module
    import torch
    from fedge.edge_agent.agent import Agent  # noqa: F401 - what run_agent imports
    from fedge.edge_agent.pool import TrainingPool
    from fedge.edge_agent.profile import load_profile  # noqa: F401
    from fedge.edge_agent.shared_data import LocalData
    from fedge.edge_agent.trainer import TrainConfig
    from fedge.edge_agent.work import EvaluateRequest, TrainRequest
    from fedge.models.data import synthetic
    from fedge.models.registry import build_model, get_state
    from fedge.models.spec import ModelSpec
    from fedge.models.wire.messages import build_update_message

    torch.set_num_threads(1)
    data = synthetic(n_train=800, n_test=400, seed=1)
    shape = tuple(data.train.x.shape[1:])
    train = LocalData(torch.from_numpy(data.train.x), torch.from_numpy(data.train.y))
    pool = TrainingPool(workers=1)

    def run(spec, request):
        got, done = [], threading.Event()
        pool.submit((spec, shape, 10), request, lambda outcome: (got.append(outcome), done.set()))
        assert done.wait(300), "the pool did not answer"
        if isinstance(got[0], Exception):
            raise got[0]
        return got[0]

    mlp = ModelSpec("mlp")
    start = get_state(build_model(mlp, shape, 10, seed=0))
    trained = run(mlp, TrainRequest(start, train, TrainConfig(epochs=2, batch_size=32, lr=0.05), seed=1, codec="fp32"))
    test = LocalData(torch.from_numpy(data.test.x), torch.from_numpy(data.test.y))
    metrics = run(mlp, EvaluateRequest(trained.state, test, batch_size=100))

    mpt = ModelSpec("conv4-mpt")
    small = LocalData(train.x[:40], train.y[:40])
    cfg = TrainConfig(epochs=1, batch_size=10, lr=0.01, optimizer="adam")
    masks = run(mpt, TrainRequest(get_state(build_model(mpt, shape, 10, seed=0)), small, cfg, seed=2, codec="mask1"))
    envelope = build_update_message("f", "run", "dev000", 1, 0, masks.state, 40, codec="mask1")
    pool.close()
    print(json.dumps({"accuracy": metrics["accuracy"], "mask_bytes": len(envelope),
                      "modules": sorted(sys.modules)}))
    '''
)


def test_training_path_imports_no_torchvision_nor_dynamo() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=root, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["accuracy"] > 0.5, out["accuracy"]  # it trained for real: 10 classes, chance is 0.1
    assert 0 < out["mask_bytes"] < 300_000  # Conv-4's 1.9 M weights at 1 bit
    loaded = [m for m in out["modules"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not loaded, f"the device's training path imported {loaded[:10]}"
    assert "torch" in out["modules"] and "fedge.edge_agent.optimiser" in out["modules"]
