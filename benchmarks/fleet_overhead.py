"""What MQTT costs the fleet simulator: the same fleet over the in-memory transport and over
real brokers, on the same work, in one run.

Same data split (paper 001: 10 devices, dominant label 55 %), same model, same seeds, same
torch threads, same hub and agents; the only difference is the transport: the in-memory
broker, or a real MQTT broker (embedded amqtt, and Mosquitto when reachable).

    python benchmarks/fleet_overhead.py --rounds 5            # writes benchmarks/results/fleet_overhead.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedge.hub.config import HubConfig  # noqa: E402
from fedge.hub.report import machine_info, write_results  # noqa: E402
from fedge.hub.sim.fleet import Fleet, FleetConfig  # noqa: E402
from fedge.models.data import load_dataset, synthetic  # noqa: E402
from fedge.models.partition import PartitionSpec  # noqa: E402


def _mosquitto_up(host: str = "127.0.0.1", port: int = 1883) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for both sides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet_overhead.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    ds = synthetic(6000, 1000) if args.dataset == "synthetic" else load_dataset(args.dataset)
    spec = PartitionSpec("dominant", dominant_fraction=0.55) if args.dataset != "synthetic" else PartitionSpec("iid")

    def hub_cfg(prefix: str) -> HubConfig:
        return HubConfig(fleet="bench", prefix=prefix, model=args.model, rounds=args.rounds, deadline_s=600,
                         in_shape=ds.in_shape, num_classes=ds.num_classes, eval_size=2000,
                         train={"epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.9})

    results: dict = {"command": "python benchmarks/fleet_overhead.py " + " ".join(sys.argv[1:]),
                     "machine": machine_info(), "rounds": args.rounds, "devices": args.devices,
                     "model": args.model, "dataset": ds.name, "threads": args.threads, "runs": {}}
    brokers = [("inproc", "inproc", None), ("embedded", "mqtt", None)]
    if _mosquitto_up():
        brokers.append(("mosquitto", "mqtt", "mqtt://127.0.0.1:1883"))
    for name, transport, url in brokers:
        print(f"fleet over {name} broker: {args.rounds} rounds ...", flush=True)
        cfg = FleetConfig(devices=args.devices, dataset=ds.name, partition=spec, transport=transport, broker=url,
                          workers=1,
                          threads=args.threads, runs_dir=str(ROOT / "runs" / "bench"), progress=False,
                          hub=hub_cfg(f"bench/{uuid.uuid4().hex[:8]}"))
        started = time.time()
        with Fleet(cfg, dataset=ds) as fleet:
            report = fleet.run()
        rounds = report["rounds"]
        results["runs"][name if name == "inproc" else f"fleet-{name}"] = {
            "seconds": [r["seconds"] for r in rounds], "accuracy": [r["accuracy"] for r in rounds],
            "uplink_bytes_per_device": report["uplink_bytes_per_device"],
            "downlink_bytes_per_device": report["downlink_bytes_per_device"], "wall_s": time.time() - started,
        }

    base = statistics.median(results["runs"]["inproc"]["seconds"])
    summary = {}
    for name, run in results["runs"].items():
        med = statistics.median(run["seconds"])
        summary[name] = {"median_seconds_per_round": med, "ratio_to_inproc": med / base,
                         "final_accuracy": run["accuracy"][-1],
                         "uplink_bytes_per_device": run["uplink_bytes_per_device"],
                         "downlink_bytes_per_device": run["downlink_bytes_per_device"]}
        if name != "inproc":
            summary[name]["same_accuracy_as_inproc"] = run["accuracy"] == results["runs"]["inproc"]["accuracy"]
    results["summary"] = summary
    out = write_results(results, args.out, _plot)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = list(results["runs"])
    meds = [results["summary"][n]["median_seconds_per_round"] for n in names]
    bars = ax.bar(names, meds, color=["#888"] + ["#1f77b4"] * (len(names) - 1))
    for bar, name in zip(bars, names):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"x{results['summary'][name]['ratio_to_inproc']:.2f}",
                ha="center", va="bottom")
    ax.set_ylabel("median seconds per round")
    ax.set_title(f"{results['devices']} devices, {results['model']}, {results['dataset']}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
