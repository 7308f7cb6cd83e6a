"""One lying device in ten: FedAvg vs coordinate median vs trimmed mean vs (multi-)Krum.

Every cell is a full fleet run (same data, seeds and rounds) over the embedded MQTT broker,
or with `--transport inproc` over the in-memory one (the same hub and agents, same result),
with device 0 sending scaled or sign-flipped updates; plus a no-attack FedAvg reference.

    python benchmarks/poisoning.py --rounds 10   # writes benchmarks/results/poisoning.{json,png}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedge.hub.config import HubConfig  # noqa: E402
from fedge.hub.report import machine_info, write_results  # noqa: E402
from fedge.hub.sim.fleet import Fleet, FleetConfig  # noqa: E402
from fedge.models.data import load_dataset, synthetic  # noqa: E402
from fedge.models.partition import PartitionSpec  # noqa: E402

STRATEGIES = ["fedavg", "median", "trimmed-mean", "krum", "multi-krum"]
ATTACKS = ["none", "scaled", "sign-flip"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--per-device", type=int, default=1000, help="training images per device (iid)")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--transport", choices=["mqtt", "inproc"], default="mqtt",
                    help="the fleet's transport (same global model either way; inproc is faster)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "poisoning.json"))
    args = ap.parse_args()
    ds = synthetic(args.devices * args.per_device, 1000) if args.dataset == "synthetic" else load_dataset(args.dataset)
    results = {"command": "python benchmarks/poisoning.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
               "rounds": args.rounds, "devices": args.devices, "attackers": 1, "dataset": ds.name,
               "transport": args.transport, "cells": []}
    for attack in ATTACKS:
        for strategy in STRATEGIES if attack != "none" else ["fedavg"]:
            cfg = FleetConfig(
                devices=args.devices, dataset=ds.name, partition=PartitionSpec("iid", per_device=args.per_device),
                transport=args.transport, runs_dir=str(ROOT / "runs" / "poisoning"), progress=False,
                attackers={} if attack == "none" else {0: attack},
                hub=HubConfig(fleet="poison", prefix=f"poison/{attack}/{strategy}", model="mlp", rounds=args.rounds,
                              strategy=strategy, deadline_s=600, eval_size=0,
                              train={"epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.9}),
            )
            started = time.time()
            with Fleet(cfg, dataset=ds) as fleet:
                report = fleet.run()
            cell = {"attack": attack, "strategy": strategy, "final_accuracy": report["final_accuracy"],
                    "accuracy_per_round": [r["accuracy"] for r in report["rounds"]], "seconds": time.time() - started}
            results["cells"].append(cell)
            print(f"{attack:10s} {strategy:13s} accuracy {cell['final_accuracy']:.4f}", flush=True)
    out = write_results(results, args.out, _plot)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.15
    ref = next(c["final_accuracy"] for c in results["cells"] if c["attack"] == "none")
    for i, strategy in enumerate(STRATEGIES):
        vals = [next((c["final_accuracy"] for c in results["cells"] if c["attack"] == a and c["strategy"] == strategy), 0)
                for a in ATTACKS[1:]]
        ax.bar([j + i * width for j in range(len(vals))], [100 * v for v in vals], width, label=strategy)
    ax.axhline(100 * ref, color="k", ls="--", lw=1, label="FedAvg, no attacker")
    ax.set_xticks([j + 2 * width for j in range(len(ATTACKS) - 1)], ATTACKS[1:])
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"1 attacker in {results['devices']} devices, {results['rounds']} rounds, {results['dataset']}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
