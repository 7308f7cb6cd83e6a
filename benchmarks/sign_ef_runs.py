"""Collect `fedge fleet` runs of the 1-bit sign uplink variants into one JSON + plot.

The runs themselves are plain CLI runs (docs/benchmarks.md, "1-bit uplink: stochastic signs
and error feedback", gives the loop); this only reads each run.json under
RUNS/<method>/s<seed>/ and records best/final accuracy and uplink bytes per device.

    python benchmarks/sign_ef_runs.py RUNS --out benchmarks/results/sign_ef_mlp.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from fedge.hub.report import write_results


def collect(root: Path) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for run_json in sorted(root.glob("*/s*/*/run.json")):
        method, seed = run_json.parts[-4], int(run_json.parts[-3][1:])
        run = json.loads(run_json.read_text())
        accs = [r["accuracy"] for r in run["rounds"] if r.get("accuracy") is not None]
        entry = methods.setdefault(method, {"seeds": {}, "strategy_options": run["config"]["hub"]["strategy_options"]})
        entry["seeds"][seed] = {"best": max(accs), "final": run["final_accuracy"], "curve": accs,
                                "uplink_bytes_per_device": run["uplink_bytes_per_device"],
                                "rounds": run["rounds_completed"]}
        entry["machine"] = run.get("machine")
    for entry in methods.values():
        seeds = entry["seeds"].values()
        for key in ("best", "final"):
            values = [s[key] for s in seeds]
            entry[f"{key}_mean"] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"runs_dir": str(root), "methods": methods}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, entry in results["methods"].items():
        for i, (_seed, run) in enumerate(sorted(entry["seeds"].items())):
            ax.plot(range(1, len(run["curve"]) + 1), run["curve"], alpha=0.7,
                    color=f"C{list(results['methods']).index(method)}", label=method if i == 0 else None)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("MLP-MPT, paper003 split: score averaging vs 1-bit sign uplinks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", default="benchmarks/results/sign_ef_mlp.json")
    args = parser.parse_args()
    results = collect(args.runs)
    write_results(results, args.out, plot)
    for method, entry in results["methods"].items():
        print(f"{method:28s} best {100 * entry['best_mean']:.2f} +- {100 * entry['best_std']:.2f}  "
              f"final {100 * entry['final_mean']:.2f} +- {100 * entry['final_std']:.2f}  seeds {sorted(entry['seeds'])}")


if __name__ == "__main__":
    main()
