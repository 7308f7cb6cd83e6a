"""Dense FedAvg vs each MPT strategy on one device, in one run: bytes on the air per round,
peak RSS of the training process, and seconds per local round (Conv-4, paper003's device).

Each mode trains in its own fresh process (so peak RSS is that mode's alone): one local
round of paper003 (40 images, 5 epochs, batch 10) starting from a received global state,
then it builds the real update envelope it would publish.

    python benchmarks/mpt_device.py          # writes benchmarks/results/mpt_device.{json,png}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {  # mode: (model, strategy, optimiser settings)
    "fedavg (dense fp32)": ("conv4", "fedavg", {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9}),
    "mpt-score-avg (1/32)": ("conv4-mpt", "mpt-score-avg", {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}),
    "mpt-mask (1/32, 1-bit up)": ("conv4-mpt", "mpt-mask", {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}),
}

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
torch.set_num_threads(1)
from edge_agent.trainer import LocalTrainer, TrainConfig, uplink_state
from hub.strategies import UPDATE_CODEC
from models.registry import build_model, get_state
from models.wire.messages import build_model_message, build_update_message
model, strategy, opt = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.normal(size=(40, 1, 28, 28)).astype(np.float32)); y = torch.from_numpy(rng.integers(0, 2, 40))
state = get_state(build_model(model, seed=0))
trainer = LocalTrainer(model, (1, 28, 28), 10)
cfg = TrainConfig(epochs=5, batch_size=10, **opt)
times = []
for r in range(3):
    t = time.perf_counter()
    res = trainer.train(state, x, y, cfg, seed=r)
    codec = UPDATE_CODEC.get(strategy, "fp32")
    up = build_update_message("f", "run", "dev000", 1, 0, uplink_state(trainer, res, codec), 40, codec=codec)
    times.append(time.perf_counter() - t)
down = build_model_message("f", "run", 0, model, state)
print(json.dumps({"uplink_bytes": len(up), "downlink_bytes": len(down), "seconds_per_local_round": min(times),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_imports_mb": base,
                  "trained_tensor_mb": sum(v.nbytes for v in res.state.values()) / 2**20}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mpt_device.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from hub.report import machine_info

    results = {"command": "python benchmarks/mpt_device.py", "machine": machine_info(), "threads": 1, "modes": {}}
    for mode, (model, strategy, opt) in MODES.items():
        proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), model, strategy, json.dumps(opt)],
                              capture_output=True, text=True, check=True)
        results["modes"][mode] = {"model": model, "strategy": strategy, **json.loads(proc.stdout.strip().splitlines()[-1])}
        row = results["modes"][mode]
        print(f"{mode:28s} up {row['uplink_bytes']:>10,d} B  down {row['downlink_bytes']:>10,d} B  "
              f"peak RSS {row['peak_rss_mb']:6.0f} MB  local round {row['seconds_per_local_round']:.2f} s", flush=True)
    dense = results["modes"]["fedavg (dense fp32)"]
    for row in results["modes"].values():
        row["uplink_ratio_vs_fedavg"] = dense["uplink_bytes"] / row["uplink_bytes"]
        row["rss_ratio_vs_fedavg"] = row["peak_rss_mb"] / dense["peak_rss_mb"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    _plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, key, label in zip(axes, ("uplink_bytes", "peak_rss_mb", "seconds_per_local_round"),
                              ("uplink bytes / round (log)", "peak RSS (MB)", "s per local round")):
        ax.bar(range(len(modes)), [results["modes"][m][key] for m in modes], color=["#888", "#1f77b4", "#2ca02c"])
        ax.set_xticks(range(len(modes)), [m.split(" ")[0] for m in modes], rotation=15)
        ax.set_title(label, fontsize=10)
        if key == "uplink_bytes":
            ax.set_yscale("log")
    fig.suptitle("Conv-4 on one device: dense FedAvg vs MPT (1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
