"""Stacked training (edge_agent/stacked.py) and fused MLP training (edge_agent/fused_mlp.py) vs
LocalTrainer.train's autograd loop one job at a time: the same jobs, the same machine and torch
threads, in one run; reported as ratios (sequential autograd seconds / stacked seconds, and
sequential autograd seconds / sequential fused seconds: above 1, the other path is faster).
Fused applies to plain MLPs only; for conv4 its column is the autograd loop again.

Cases (random data of the stated shape, labels random: only the timing matters, and the
stacked result is checked against the sequential one):

* paper001: 10 devices x 6,000 images 1x28x28, mlp (hidden 200), batch 32, 1 epoch, SGD lr 0.01
  momentum 0.9 (paper 001's recipe, Fashion-MNIST-shaped data);
* fleet1000: 100 devices x 60 images (a 1,000-device fleet's 10 % per round), mlp, batch 10
  (paper 003's small-device batch), 1 epoch, the same SGD;
* conv4: 10 devices x 60 images 1x28x28, conv4, batch 10, 1 epoch, the same SGD;
* fleet4, fleet8 (only with --cases): 4 or 8 devices x 60 images, mlp, batch 10: small groups;
* stack sizes: fleet1000 again with at most 5 ... 100 devices per stacked step (max_stack),
  which sets edge_agent.stacked.CPU_STACK_BYTES.

    python benchmarks/stacked_training.py          # writes benchmarks/results/stacked_training.{json,png}
    python benchmarks/stacked_training.py --cases fleet4,fleet8 --threads 1 --repeats 5 --stack-sizes '' \
        --out benchmarks/results/stacked_training_small.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedge.edge_agent.fused_mlp import fused_reason  # noqa: E402
from fedge.edge_agent.stacked import StackJob, stack_size, train_stacked  # noqa: E402
from fedge.edge_agent.trainer import LocalTrainer, TrainConfig  # noqa: E402
from fedge.hub.report import machine_info, write_results  # noqa: E402
from fedge.models.registry import build_model, count_parameters, get_state  # noqa: E402

CASES = {  # name: (model, devices, images per device, batch size)
    "paper001": ("mlp", 10, 6000, 32),
    "fleet1000": ("mlp", 100, 60, 10),
    "conv4": ("conv4", 10, 60, 10),
    "fleet4": ("mlp", 4, 60, 10),  # small groups: where stacking stops paying (prefer_stacked's threshold)
    "fleet8": ("mlp", 8, 60, 10),
}
DEFAULT_CASES = "paper001,fleet1000,conv4"
SHAPE = (1, 28, 28)


def _jobs(model: str, devices: int, per_device: int) -> list[StackJob]:
    gen = torch.Generator().manual_seed(0)
    state = get_state(build_model(model, SHAPE, 10, seed=0))
    return [StackJob(state, torch.randn(per_device, *SHAPE, generator=gen),
                     torch.randint(0, 10, (per_device,), generator=gen), seed=i) for i in range(devices)]


def _time(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _case(name: str, threads: int, repeats: int, device: str = "cpu") -> dict:
    model, devices, per_device, batch = CASES[name]
    torch.set_num_threads(threads)
    trainer = LocalTrainer(model, SHAPE, 10, device=device, fused=False)
    fused_trainer = LocalTrainer(model, SHAPE, 10, device=device)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, momentum=0.9)
    jobs = _jobs(model, devices, per_device)

    def sequential() -> list:
        return [trainer.train(j.state, j.x, j.y, cfg, j.seed) for j in jobs]

    def stacked() -> list:
        return train_stacked(trainer.model, trainer.family, jobs, cfg)

    def fused() -> list:
        return [fused_trainer.train(j.state, j.x, j.y, cfg, j.seed) for j in jobs]

    ref, got, fus = sequential(), stacked(), fused()  # warm-up (first vmap call), and the equality check
    diff = max(float(np.abs(r.state[k] - g.state[k]).max()) for r, g in zip(ref, got) for k in r.state)
    fused_diff = max(float(np.abs(r.state[k] - g.state[k]).max()) for r, g in zip(ref, fus) for k in r.state)
    seq_s, stk_s, fus_s = [], [], []
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits all three
        seq_s.append(_time(sequential))
        stk_s.append(_time(stacked))
        fus_s.append(_time(fused))
    seq, stk, fus_med = statistics.median(seq_s), statistics.median(stk_s), statistics.median(fus_s)
    is_fused = fused_reason(fused_trainer.model, fused_trainer.family, cfg) is None
    row = {"case": name, "model": model, "devices": devices, "per_device": per_device, "batch_size": batch,
           "threads": threads, "device": device, "parameters": count_parameters(trainer.model),
           "stack_size": stack_size(trainer.model),
           "sequential_s": seq_s, "stacked_s": stk_s, "median_sequential_s": seq, "median_stacked_s": stk,
           "ratio": seq / stk, "max_abs_diff": diff,
           "fused": is_fused, "fused_s": fus_s, "median_fused_s": fus_med, "fused_ratio": seq / fus_med,
           "fused_max_abs_diff": fused_diff, "per_job_s": {"autograd": seq / devices, "stacked": stk / devices,
                                                           "fused": fus_med / devices}}
    print(f"{name:10s} {device} threads={threads}: sequential {seq:.2f} s, stacked {stk:.2f} s, ratio {seq / stk:.2f}x "
          f"(max |diff| {diff:.1e}); fused{'' if is_fused else ' (n/a: autograd)'} {fus_med:.2f} s, "
          f"ratio {seq / fus_med:.2f}x (max |diff| {fused_diff:.1e})", flush=True)
    return row


def _stack_sweep(threads: int, repeats: int, sizes: list[int]) -> list[dict]:
    model, devices, per_device, batch = CASES["fleet1000"]
    torch.set_num_threads(threads)
    trainer = LocalTrainer(model, SHAPE, 10, fused=False)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, momentum=0.9)
    jobs = _jobs(model, devices, per_device)
    train_stacked(trainer.model, trainer.family, jobs[:10], cfg)
    rows = []
    for size in sizes:
        secs = [_time(lambda s=size: train_stacked(trainer.model, trainer.family, jobs, cfg, max_stack=s))
                for _ in range(repeats)]
        rows.append({"max_stack": size, "threads": threads, "seconds": secs, "median_s": statistics.median(secs)})
        print(f"fleet1000 max_stack={size:3d} threads={threads}: {statistics.median(secs):.2f} s", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--stack-sizes", default="5,10,20,50,100", help="max_stack values for the sweep ('' skips it)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the rule for GPUs in stacked.prefer_stacked)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stacked_training.json"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    results: dict = {"command": "python benchmarks/stacked_training.py " + " ".join(sys.argv[1:]),
                     "machine": machine_info(), "data": "random tensors of the stated shape (timing only)",
                     "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "epochs": 1}, "rows": [], "sweep": []}
    for t in threads:
        for name in args.cases.split(","):
            results["rows"].append(_case(name, t, args.repeats, args.device))
    if args.stack_sizes:
        for t in threads:
            results["sweep"] += _stack_sweep(t, args.repeats, [int(s) for s in args.stack_sizes.split(",")])
    results["machine"]["torch_threads"] = threads
    out = write_results(results, args.out, _plot)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 6.5, 3.8), squeeze=False)
    ax = axes[0][0]
    rows = results["rows"]
    labels = [f"{r['case']}\n{r.get('device', 'cpu')} {r['threads']} thr" for r in rows]
    pos = np.arange(len(rows))
    width = 0.4 if any("fused_ratio" in r for r in rows) else 0.8
    bars = ax.bar(pos - (width / 2 if width < 0.8 else 0), [r["ratio"] for r in rows], width, label="stacked",
                  color="#1f77b4")
    for bar, r in zip(bars, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['ratio']:.2f}x", ha="center", va="bottom",
                fontsize=8)
    if width < 0.8:
        fused_rows = [r.get("fused_ratio", 0.0) for r in rows]
        fbars = ax.bar(pos + width / 2, fused_rows, width, label="fused (MLP only)", color="#2ca02c")
        for bar, r in zip(fbars, rows):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                    f"{r.get('fused_ratio', 0.0):.2f}x" if r.get("fused") else "n/a", ha="center", va="bottom",
                    fontsize=8)
        ax.legend()
    ax.set_xticks(pos, labels)
    ax.axhline(1.0, color="#888", lw=1)
    ax.set_ylabel("autograd one-by-one s / path s")
    ax.set_title("stacked and fused vs one-by-one autograd training (>1: faster)")
    if sweep:
        ax2 = axes[0][1]
        for t in sorted({s["threads"] for s in sweep}):
            pts = [s for s in sweep if s["threads"] == t]
            ax2.plot([s["max_stack"] for s in pts], [s["median_s"] for s in pts], marker="o", label=f"{t} threads")
        ax2.set_xscale("log")
        ax2.set_xlabel("devices per stacked step (max_stack)")
        ax2.set_ylabel("seconds, 100 devices x 60 images")
        ax2.set_title("fleet1000: stack size")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
