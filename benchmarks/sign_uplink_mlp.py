"""1-bit sign uplink vs score averaging on MLP-MPT, through the path a user runs (`fedge fleet`).

paper003's sign-uplink question on the CPU: `--method mpt-fl-1bit-sign` (`sign-delta`: each
device sends one bit per weight, the sign of its score change, plus a scale per tensor)
against `--method mpt-fl-1/32` (score averaging, fp32 scores up), both `--model mlp-mpt` on
paper003's shards (100 devices, 10 per round, 2 classes x 20 images), evaluated on all
10,000 test images. Each cell is one `fedge fleet --recipe paper003 ...` process (the real
hub and agents, every update through its uplink codec) over the transports asked for; a
cell whose run.json already exists under --runs-dir is collected, not rerun.

    python benchmarks/sign_uplink_mlp.py                        # 30 rounds, seeds 0 1 2, inproc + mqtt
    python benchmarks/sign_uplink_mlp.py --rounds 100 --transports inproc --out benchmarks/results/sign_uplink_mlp_r100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedge.hub.report import machine_info, write_results  # noqa: E402

METHODS = {"mpt-fl-1bit-sign": "sign uplink (1 bit / weight)", "mpt-fl-1/32": "score averaging (fp32 up)"}


def run_id(method: str, seed: int, transport: str, rounds: int) -> str:
    return f"{'sign' if 'sign' in method else 'score'}-s{seed}-{transport}-r{rounds}"


def command(method: str, seed: int, transport: str, args: argparse.Namespace) -> list[str]:
    return ["fedge", "fleet", "--recipe", "paper003", "--method", method, "--model", "mlp-mpt",
            "--rounds", str(args.rounds), "--seed", str(seed), "--eval-size", "0", "--transport", transport,
            "--runs-dir", args.runs_dir, "--run-id", run_id(method, seed, transport, args.rounds), "--no-progress"]


def run_cell(method: str, seed: int, transport: str, args: argparse.Namespace) -> dict:
    cmd = command(method, seed, transport, args)
    path = Path(args.runs_dir) / run_id(method, seed, transport, args.rounds) / "run.json"
    if not path.exists():
        exe = Path(sys.executable).with_name("fedge")
        subprocess.run([str(exe), *cmd[1:]], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL)
    run = json.loads(path.read_text())
    acc = [r["accuracy"] for r in run["rounds"]]
    cell = {"method": method, "seed": seed, "transport": run["transport"], "rounds": len(acc),
            "command": "OMP_NUM_THREADS=1 " + " ".join(cmd), "accuracy": acc,
            "best_accuracy": max(acc), "final_accuracy": acc[-1],
            "uplink_bytes_per_device": run["uplink_bytes_per_device"],
            "downlink_bytes_per_device": run["downlink_bytes_per_device"], "wall_time_s": run["wall_time_s"]}
    print(f"{method:18s} seed {seed} {transport:6s}: best {100 * cell['best_accuracy']:.2f} "
          f"final {100 * cell['final_accuracy']:.2f} up {cell['uplink_bytes_per_device']:,.0f} B", flush=True)
    return cell


def summary(cells: list[dict]) -> list[dict]:
    """Per method and transport: best and final accuracy, mean and population std over seeds."""
    rows = []
    for method in METHODS:
        for transport in dict.fromkeys(c["transport"] for c in cells):
            mine = [c for c in cells if c["method"] == method and c["transport"] == transport]
            if not mine:
                continue
            best = [100 * c["best_accuracy"] for c in mine]
            final = [100 * c["final_accuracy"] for c in mine]
            rows.append({"method": method, "transport": transport, "seeds": [c["seed"] for c in mine],
                         "best_mean": statistics.mean(best), "best_std": statistics.pstdev(best),
                         "final_mean": statistics.mean(final), "final_std": statistics.pstdev(final),
                         "final_per_seed": final,
                         "uplink_bytes_per_device": statistics.mean(c["uplink_bytes_per_device"] for c in mine)})
    return rows


def same_across_transports(cells: list[dict]) -> bool | None:
    """True when every (method, seed) run over both transports has the same accuracy per round."""
    pairs = {}
    for c in cells:
        pairs.setdefault((c["method"], c["seed"]), {})[c["transport"]] = c["accuracy"]
    both = [p for p in pairs.values() if len(p) > 1]
    return all(len({tuple(a) for a in p.values()}) == 1 for p in both) if both else None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"] if c["transport"] == results["transports"][0]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, label in METHODS.items():
        for c in (c for c in cells if c["method"] == method):
            ax.plot(range(1, len(c["accuracy"]) + 1), [100 * a for a in c["accuracy"]],
                    color="C0" if "sign" in method else "C1", alpha=0.25, lw=0.8)
        runs = [c["accuracy"] for c in cells if c["method"] == method]
        n = min(len(r) for r in runs)
        ax.plot(range(1, n + 1), [100 * statistics.mean(r[i] for r in runs) for i in range(n)],
                color="C0" if "sign" in method else "C1", lw=2, label=f"{method}: {label}, mean of {len(runs)} seeds")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MLP-MPT, paper003 shards: 1-bit sign uplink vs score averaging ({results['transports'][0]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--transports", nargs="*", choices=["inproc", "mqtt"], default=["inproc", "mqtt"])
    ap.add_argument("--runs-dir", default="runs/paper003_mlp", help="where the fleet runs go (run from the repo root)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sign_uplink_mlp.json"))
    args = ap.parse_args()
    results = {"command": "python benchmarks/sign_uplink_mlp.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
               "rounds": args.rounds, "transports": args.transports, "cells": []}
    for transport in args.transports:
        for seed in args.seeds:
            for method in METHODS:
                results["cells"].append(run_cell(method, seed, transport, args))
    results["summary"] = summary(results["cells"])
    results["same_accuracy_across_transports"] = same_across_transports(results["cells"])
    out = write_results(results, args.out, plot)
    for row in results["summary"]:
        print(f"{row['method']:18s} {row['transport']:6s}: best {row['best_mean']:.2f} +- {row['best_std']:.2f} "
              f"final {row['final_mean']:.2f} +- {row['final_std']:.2f}  up {row['uplink_bytes_per_device']:,.0f} B")
    print(f"same accuracy per round across transports: {results['same_accuracy_across_transports']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
