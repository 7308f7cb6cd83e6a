"""Accuracy against bits on the air, every uplink and downlink method in one run (issue 14).

Each cell is one `fedge fleet --recipe paper003 ...` process: the real hub and agents, every
update through its uplink codec and every model through its downlink codec, on paper003's
shards (100 devices, 10 per round, 2 classes x 20 images), with the MLP counterparts of
paper003's models (`mlp`, `mlp-mpt`, ...) so the grid runs on a 2-core CPU. Per method it
reports best and final accuracy (mean +- population std over the seeds), the measured bits
per weight of the uplink and downlink (envelope bytes x 8 / the model's shared weights; for
the uplink also the body alone, as the hub records it per round: `bytes_up_body`), and the
peak RSS of one device's training process (one local round in a fresh process: the child of
`benchmarks/mpt_device.py`, on the MLP model).

A cell whose run.json already exists under --runs-dir is collected, not rerun, so an
interrupted grid resumes.

    python benchmarks/bits.py                                  # 30 rounds, seeds 0 1 2, inproc
    python benchmarks/bits.py --methods fedavg score-avg --seeds 0 --rounds 5 --out /tmp/bits.json
    python benchmarks/bits.py --transport mqtt                 # the same grid through Mosquitto

Conv-4 (paper003's own model) needs a GPU: not part of this CPU grid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fedge.hub.report import machine_info, write_results  # noqa: E402
from fedge.hub.sim.recipes import PAPER003_METHODS  # noqa: E402
from fedge.models.registry import build_model, get_state, model_spec, split_state  # noqa: E402

FEDAVG_BITS = 64.0  # dense FedAvg: 32 bits per weight up and 32 down


@dataclass(frozen=True)
class Method:
    """One row: a paper003 method on an MLP model, with the downlink codec it is run with."""

    method: str  # --method of recipe paper003
    model: str  # the MLP counterpart of the method's Conv-4 model
    model_codec: str = "fp32"
    label: str = ""
    extra: tuple[str, ...] = ()  # more `fedge fleet` flags (strategy options)


METHODS: dict[str, Method] = {
    "fedavg": Method("fedavg", "mlp", label="dense FedAvg, fp32 up and down"),
    "score-avg": Method("mpt-fl-1/32", "mlp-mpt", label="MPT score averaging, fp32 scores up and down"),
    "mask-1bit": Method("mpt-fl-1bit", "mlp-mpt", label="MPT, 1-bit top-k mask up (mpt-mask)"),
    "sign-1bit": Method("mpt-fl-1bit-sign", "mlp-mpt", label="MPT, 1-bit sign of the score change up (sign-delta)"),
    "sign-1bit-ef": Method("mpt-fl-1bit-sign-ef", "mlp-mpt", extra=("--server-lr", "2"),
                           label="MPT, 1-bit sign up with device error feedback, server lr 2"),
    "fedpm": Method("fedpm", "mlp-fedpm", label="FedPM, one sampled mask up (mask1), Beta posterior"),
    "fedpm-rc": Method("fedpm-rc", "mlp-fedpm", label="FedPM, the mask range-coded (maskrc)"),
    "fedavg-q8": Method("fedavg", "mlp", model_codec="q8", label="dense FedAvg, fp32 up, q8 down"),
    "score-avg-q8": Method("mpt-fl-1/32", "mlp-mpt", model_codec="q8", label="MPT score averaging, fp32 up, q8 down"),
    "fedpm-rc-q8": Method("fedpm-rc", "mlp-fedpm", model_codec="q8", label="FedPM range-coded up, q8 scores down"),
}


def run_id(key: str, seed: int, transport: str, rounds: int) -> str:
    return f"{key.replace('/', '_')}-s{seed}-{transport}-r{rounds}"


def command(key: str, seed: int, args: argparse.Namespace) -> list[str]:
    m = METHODS[key]
    return ["fedge", "fleet", "--recipe", "paper003", "--method", m.method, "--model", m.model,
            "--model-codec", m.model_codec, "--rounds", str(args.rounds), "--seed", str(seed), "--eval-size", "0",
            "--transport", args.transport, "--runs-dir", args.runs_dir,
            "--run-id", run_id(key, seed, args.transport, args.rounds), "--no-progress", *m.extra]


def shared_weights(model: str) -> int:
    """The elements a model envelope or an update carries: the model's shared tensors."""
    shared, _private = split_state(model_spec(model), get_state(build_model(model, seed=0)))
    return int(sum(v.size for v in shared.values()))


def run_cell(key: str, seed: int, args: argparse.Namespace, weights: int) -> dict:
    cmd = command(key, seed, args)
    path = Path(args.runs_dir) / run_id(key, seed, args.transport, args.rounds) / "run.json"
    if not path.exists():
        exe = Path(sys.executable).with_name("fedge")
        subprocess.run([str(exe), *cmd[1:]], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL)
    run = json.loads(path.read_text())
    rounds = run["rounds"]
    acc = [r["accuracy"] for r in rounds]
    up = [r["bytes_up"] / max(1, len(r["participants"])) for r in rounds]
    body = [r["bytes_up_body"] / max(1, len(r["participants"])) for r in rounds]  # as the hub measured them
    down = [r["bytes_down"] / max(1, len(r["selected"])) for r in rounds]
    cell = {"key": key, "seed": seed, "transport": run["transport"], "rounds": len(acc),
            "command": "OMP_NUM_THREADS=1 " + " ".join(cmd), "accuracy": acc,
            "best_accuracy": max(acc), "final_accuracy": acc[-1],
            "uplink_bits_per_weight": [8 * b / weights for b in up],
            "uplink_body_bits_per_weight": [8 * b / weights for b in body],
            "uplink_header_bytes": statistics.mean(u - b for u, b in zip(up, body)),
            "downlink_bits_per_weight": [8 * b / weights for b in down],
            "wall_time_s": run["wall_time_s"]}
    print(f"{key:14s} seed {seed}: best {100 * cell['best_accuracy']:.2f} final {100 * cell['final_accuracy']:.2f} "
          f"up {statistics.mean(cell['uplink_bits_per_weight']):.3f} b/w down "
          f"{statistics.mean(cell['downlink_bits_per_weight']):.2f} b/w ({cell['wall_time_s']:.0f} s)", flush=True)
    return cell


def device_rss(key: str) -> dict:
    """Peak RSS of one device's local round of this method (fresh process, 1 thread)."""
    from mpt_device import run_mode  # noqa: PLC0415 - the benchmark's own child; sys.path has benchmarks/

    m = METHODS[key]
    spec = PAPER003_METHODS[m.method]
    opt = {k: v for k, v in spec["train"].items() if k in ("optimizer", "lr", "momentum", "weight_decay")}
    runs = [run_mode(m.model, spec["strategy"], opt, {}) for _ in range(3)]
    return {"peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "rss_after_imports_mb": statistics.median(r["rss_after_imports_mb"] for r in runs)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values)


def summary(cells: list[dict], key: str, weights: int, rss: dict | None) -> dict:
    mine = [c for c in cells if c["key"] == key]
    best, best_sd = mean_std([100 * c["best_accuracy"] for c in mine])
    final, final_sd = mean_std([100 * c["final_accuracy"] for c in mine])
    up = statistics.mean(b for c in mine for b in c["uplink_bits_per_weight"])
    up_body = statistics.mean(b for c in mine for b in c["uplink_body_bits_per_weight"])
    down = statistics.mean(b for c in mine for b in c["downlink_bits_per_weight"])
    return {"key": key, **vars(METHODS[key]), "seeds": [c["seed"] for c in mine], "weights": weights,
            "best_mean": best, "best_std": best_sd, "final_mean": final, "final_std": final_sd,
            "best_per_seed": [100 * c["best_accuracy"] for c in mine],
            "uplink_bits_per_weight": up, "uplink_body_bits_per_weight": up_body,
            "uplink_header_bytes": statistics.mean(c["uplink_header_bytes"] for c in mine),
            "downlink_bits_per_weight": down, "bits_per_weight_per_round": up + down,
            "device_peak_rss_mb": rss["peak_rss_mb"] if rss else None}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, row in enumerate(results["summary"]):
        color = f"C{i % 10}"
        left.errorbar(row["bits_per_weight_per_round"], row["best_mean"], yerr=row["best_std"], fmt="o",
                      color=color, capsize=3, label=f"{row['key']}: {row['best_mean']:.1f} %, "
                                                     f"{row['bits_per_weight_per_round']:.2f} b/w")
        runs = [c["accuracy"] for c in results["cells"] if c["key"] == row["key"]]
        n = min(len(r) for r in runs)
        right.plot(range(1, n + 1), [100 * statistics.mean(r[j] for r in runs) for j in range(n)], color=color,
                   label=row["key"])
    left.axvline(FEDAVG_BITS, color="k", ls=":", lw=1, label="FedAvg fp32: 64 bits / weight / round")
    left.set_xscale("log")
    left.set_xlabel("bits per weight per round, uplink + downlink (measured envelopes)")
    left.set_ylabel("best test accuracy (%), mean +- std over seeds")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=7)
    right.set_xlabel("round")
    right.set_ylabel(f"test accuracy (%), mean of {len(results['seeds'])} seeds")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"paper003 shards, MLP counterparts, {results['rounds']} rounds, {results['transport']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS), help="rows to run")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--transport", choices=["inproc", "mqtt"], default="inproc")
    ap.add_argument("--no-rss", action="store_true", help="skip the device peak-RSS measurement")
    ap.add_argument("--runs-dir", default="runs/bits", help="where the fleet runs go (run from the repo root)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bits.json"))
    args = ap.parse_args()
    results = {"command": "python benchmarks/bits.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
               "rounds": args.rounds, "seeds": args.seeds, "transport": args.transport,
               "recipe": "paper003 (100 devices, 10 per round, 2 classes x 20 images), MLP counterparts",
               "cells": [], "summary": []}
    sizes = {key: shared_weights(METHODS[key].model) for key in args.methods}
    for seed in args.seeds:
        for key in args.methods:
            results["cells"].append(run_cell(key, seed, args, sizes[key]))
    for key in args.methods:
        rss = None if args.no_rss else device_rss(key)
        results["summary"].append(summary(results["cells"], key, sizes[key], rss))
    out = write_results(results, args.out, plot)
    for row in results["summary"]:
        rss = f"{row['device_peak_rss_mb']:.0f} MB" if row["device_peak_rss_mb"] else "-"
        print(f"{row['key']:14s} best {row['best_mean']:.2f} +- {row['best_std']:.2f}  final {row['final_mean']:.2f} "
              f"+- {row['final_std']:.2f}  up {row['uplink_bits_per_weight']:.3f} (body "
              f"{row['uplink_body_bits_per_weight']:.3f}) down {row['downlink_bits_per_weight']:.2f} bits/weight  "
              f"device RSS {rss}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
