"""The local optimisers (SGD with momentum, Adam), written with torch's foreach ops: one home
for the update rules of LocalTrainer.train and of the stacked trainer (edge_agent/stacked.py).

Why not torch.optim: building a torch.optim.Optimizer calls methods wrapped in
torch._disable_dynamo, which import torch._dynamo on first use, and with it sympy, mpmath,
triton and parts of torch.distributed (~900 modules, ~150 MB resident on torch 2.14) that a
device's training job never runs (docs/benchmarks.md, "Device memory"). The arithmetic here
is torch.optim's foreach path op for op (torch/optim/sgd.py `_multi_tensor_sgd`,
torch/optim/adam.py `_multi_tensor_adam`, defaults: dampening 0, no Nesterov, no amsgrad,
L2 weight decay added to the gradient), so the trained weights are bit-identical to
torch.optim.SGD / Adam(foreach=True) (tests/test_optimiser.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def sgd_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               bufs: Sequence[torch.Tensor | None] | None, *, lr: float, momentum: float,
               weight_decay: float) -> list[torch.Tensor] | None:
    """One SGD step in place on `params`. `bufs`: their momentum buffers (None, or a None
    entry, before a parameter's first step); returns the buffers to pass next time (a first
    step's are copies of the gradients, as torch.optim.SGD makes them; None without momentum)."""
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum == 0:
        torch._foreach_add_(params, grads, alpha=-lr)
        return None
    if bufs is not None and all(b is not None for b in bufs):
        new = [b for b in bufs if b is not None]
        torch._foreach_mul_(new, momentum)
        torch._foreach_add_(new, grads, alpha=1)
    else:
        new = []
        for i, g in enumerate(grads):
            b = None if bufs is None else bufs[i]
            if b is None:
                b = g.detach().clone()
            else:
                b.mul_(momentum).add_(g, alpha=1)
            new.append(b)
    torch._foreach_add_(params, new, alpha=-lr)
    return new


def adam_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[int], *, lr: float, weight_decay: float) -> None:
    """One Adam step in place on `params` and their moments (`exp_avgs`, `exp_avg_sqs`: zeros
    before the first step); `steps`: each parameter's step number, counting from 1 (bias
    correction)."""
    beta1, beta2 = ADAM_BETAS
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = [(lr / (1 - beta1 ** float(t))) * -1 for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2 ** float(t)) ** 0.5 for t in steps])
    torch._foreach_add_(denom, ADAM_EPS)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


@dataclass
class _State:
    """One parameter's optimiser state (torch.optim keeps it per parameter too)."""

    step: int = 0
    momentum_buffer: torch.Tensor | None = None  # SGD
    exp_avg: torch.Tensor | None = None  # Adam's moments
    exp_avg_sq: torch.Tensor | None = None


class LocalOptimiser:
    """SGD or Adam over a model's trainable parameters, reading their `.grad`: what
    LocalTrainer.train steps with (a new one every round). As in torch.optim, a parameter
    without a gradient is skipped and keeps its state. `release` drops gradients and state
    (momentum, moments) once training is over."""

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizer: str, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.adam = optimizer == "adam"
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.state: dict[int, _State] = {}  # by the parameter's index in `params`

    def zero_grad(self) -> None:
        """Gradients to None (not zeros), so the last step's are not held through the next forward."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params if p.grad is not None]
        states = [self.state.setdefault(i, _State()) for i in live]
        for st in states:
            st.step += 1
        if not self.adam:
            bufs = sgd_update(params, grads, [st.momentum_buffer for st in states], lr=self.lr,
                              momentum=self.momentum, weight_decay=self.weight_decay)
            for st, b in zip(states, bufs or ()):
                st.momentum_buffer = b
            return
        for p, st in zip(params, states):
            if st.exp_avg is None:
                st.exp_avg, st.exp_avg_sq = torch.zeros_like(p), torch.zeros_like(p)
        adam_update(params, grads, [st.exp_avg for st in states if st.exp_avg is not None],
                    [st.exp_avg_sq for st in states if st.exp_avg_sq is not None], [st.step for st in states],
                    lr=self.lr, weight_decay=self.weight_decay)

    def release(self) -> None:
        self.zero_grad()
        self.state.clear()
