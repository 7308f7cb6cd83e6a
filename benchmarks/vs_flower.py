"""fedge's fleet simulator against Flower's simulation on paper 001, in one run on one machine.

Paper 001's experiment (10 devices, MLP 784-200-200-10, Fashion-MNIST, `dominant` split with
6,000 images and 55 % one label per device, all devices every round, 1 local epoch, batch 32,
SGD lr 0.01 momentum 0.9, FedAvg), run four ways one after another:

  fedge-embedded   `fedge fleet --recipe paper001 --no-central` as a user runs it (embedded broker)
  fedge-mosquitto  the same over Mosquitto: `--broker mqtt://127.0.0.1:1883 --fleet <unique id>`
  fedge-inproc     the same with `--transport inproc` (no sockets)
  flower           Flower's simulation (Ray actors), benchmarks/flower_paper001.py, in its own venv

Every fedge run is the `fedge` command of this virtualenv, started as a subprocess; its times
and accuracies are read from runs/<id>/run.json. Before them, this script writes the
experiment file the Flower side reads (it cannot import fedge): each device's indices from
fedge's own partition function with the recipe's seed, fedge's seeded initial weights and
each (round, device) job's seed, so both sides train the same devices from the same start
with the same batches.

Round time on both sides: from the round's start (fedge: the hub opens the round; Flower:
the strategy configures training) until the aggregated model has been evaluated on all
10,000 test images and recorded. The median skips round 1 (it carries one-off costs: fedge's
hub waits for the devices' first statuses, each Ray actor loads the training set); it is
reported on its own, and the total wall time (process start to exit, start-up included).

    python benchmarks/vs_flower.py                       # 30 rounds, all four -> benchmarks/results/vs_flower.{json,png}
    python benchmarks/vs_flower.py --quick --only fedge-inproc,flower
    python3 -m venv /work/flower-venv && /work/flower-venv/bin/pip install torch==2.14.1 'flwr[simulation]' numpy
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedge.edge_agent.trainer import job_seed  # noqa: E402
from fedge.hub.report import machine_info, write_results  # noqa: E402
from fedge.hub.sim.recipes import get_recipe  # noqa: E402
from fedge.models.data import DEFAULT_FASHION_ROOT, load_dataset  # noqa: E402
from fedge.models.normalisation import NORMALISATION  # noqa: E402
from fedge.models.partition import class_counts, partition  # noqa: E402
from fedge.models.registry import build_model, get_state, model_options  # noqa: E402

RUNS = ("fedge-embedded", "fedge-mosquitto", "fedge-inproc", "flower")
FLOWER_SCRIPT = ROOT / "benchmarks" / "flower_paper001.py"
DEFAULT_FLOWER_PYTHON = "/work/flower-venv/bin/python"
FLOWER_VENV_HINT = ("python3 -m venv /work/flower-venv && /work/flower-venv/bin/pip install torch==2.14.1 "
                    "'flwr[simulation]' numpy")
ROUND_TIME = ("round start (fedge: hub opens the round; Flower: strategy.configure_train) to the aggregated model "
              "evaluated on all 10,000 test images and recorded; median over rounds 2..R (round 1 reported apart)")


def device_id(index: int) -> str:
    """The fleet simulator's name for its device `index` (hub.sim.fleet: dev000, dev001, ...)."""
    return f"dev{index:03d}"


def write_experiment(path: Path, rounds: int, data_root: str | None) -> dict[str, Any]:
    """The experiment file the Flower side reads, made with fedge's own functions from the
    paper001 recipe: partition indices, initial weights, job seeds, training settings and
    normalisation. Returns the per-device class counts (to check each fedge run's split)."""
    cfg = get_recipe("paper001")
    ds = load_dataset(cfg.dataset, data_root, seed=cfg.seed)
    parts = partition(ds.train.y, cfg.devices, cfg.partition, seed=cfg.seed, num_classes=ds.num_classes)
    initial = get_state(build_model(cfg.hub.model, ds.in_shape, ds.num_classes, seed=cfg.hub.seed))
    seeds = np.array([[job_seed(cfg.seed, r, device_id(d)) for d in range(cfg.devices)] for r in range(1, rounds + 1)],
                     dtype=np.int64)
    mean, std = NORMALISATION[cfg.dataset]
    train = {"epochs": 1, "weight_decay": 0.0, **cfg.hub.train}
    settings = {"recipe": "paper001", "dataset": cfg.dataset, "devices": cfg.devices, "rounds": rounds,
                "device_ids": [device_id(d) for d in range(cfg.devices)], "train": train,
                "hidden": int(model_options(cfg.hub.model)["hidden"]),
                "normalisation": {"mean": float(mean[0]), "std": float(std[0])},
                "tensor_order": [f"init:{k}" for k in initial]}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, settings=np.array(json.dumps(settings)), indices=np.concatenate(parts),
             sizes=np.array([len(p) for p in parts], dtype=np.int64), seeds=seeds,
             **{f"init:{k}": v for k, v in initial.items()})
    return {device_id(i): c for i, c in enumerate(class_counts(ds.train.y, parts, ds.num_classes))}


def fedge_command(name: str, rounds: int, work: Path, run_id: str, broker: str, data_root: str | None) -> list[str]:
    """The `fedge fleet` command line of one fedge run (the recipe's defaults otherwise)."""
    exe = Path(sys.executable).with_name("fedge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedge.cli"]
    cmd += ["fleet", "--recipe", "paper001", "--no-central", "--rounds", str(rounds),
            "--runs-dir", str(work), "--run-id", run_id]
    if data_root:
        cmd += ["--data-root", data_root]
    if name == "fedge-mosquitto":
        cmd += ["--broker", broker, "--fleet", f"vsflower-{uuid.uuid4().hex[:10]}"]
    elif name == "fedge-inproc":
        cmd += ["--transport", "inproc"]
    return cmd


def _timed(cmd: list[str], log: Path) -> float:
    """Run `cmd` with its output in `log`; its wall time, start-up included. Fails loudly."""
    started = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"{' '.join(cmd)} exited with {done.returncode}; last lines of {log}:\n{tail}")
    return wall


def _round_summary(seconds: list[float], accuracy: list[float], final_accuracy: float, wall: float) -> dict[str, Any]:
    later = seconds[1:] or seconds  # a 1-round run has nothing but round 1
    return {"median_seconds_per_round": statistics.median(later), "first_round_seconds": seconds[0],
            "total_wall_seconds": wall, "startup_and_teardown_seconds": wall - sum(seconds),
            "final_accuracy": final_accuracy, "rounds": len(seconds), "seconds": seconds, "accuracy": accuracy}


def run_fedge(name: str, rounds: int, work: Path, broker: str, data_root: str | None,
              expected_counts: dict[str, list[int]]) -> dict[str, Any]:
    run_id = f"{name}-{uuid.uuid4().hex[:6]}"
    cmd = fedge_command(name, rounds, work, run_id, broker, data_root)
    print(f"{name}: {' '.join(cmd)}", flush=True)
    wall = _timed(cmd, work / f"{run_id}.log")
    report = json.loads((work / run_id / "run.json").read_text())
    split = json.loads((work / run_id / "partition.json").read_text())["devices"]
    if split != expected_counts:
        raise SystemExit(f"{name}: the run's split ({work / run_id / 'partition.json'}) is not the one in the experiment "
                         f"file the Flower side trains on; the paper001 recipe and write_experiment disagree")
    rounds_ = report["rounds"]
    out = _round_summary([r["seconds"] for r in rounds_], [r["accuracy"] for r in rounds_], report["final_accuracy"], wall)
    out.update(command=" ".join(cmd[1:]).replace(str(work), "<work>"), run_json=str(work / run_id / "run.json"),
               transport=report["transport"], fleet_wall_time_s=report["wall_time_s"])
    return out


def run_flower(flower_python: str, rounds: int, work: Path, exp_path: Path, data_root: str | None,
               actors: int) -> dict[str, Any]:
    if not Path(flower_python).exists():
        why = f"no Flower virtualenv at {flower_python}; create it with: {FLOWER_VENV_HINT} (or pass --flower-python)"
        print(f"flower: skipped: {why}", flush=True)
        return {"skipped": why}
    out_json = work / f"flower-{uuid.uuid4().hex[:6]}.json"
    cmd = [flower_python, str(FLOWER_SCRIPT), "--experiment", str(exp_path), "--rounds", str(rounds),
           "--actors", str(actors), "--threads", "1", "--out", str(out_json),
           "--data-root", data_root or DEFAULT_FASHION_ROOT]
    print(f"flower: {' '.join(cmd)}", flush=True)
    wall = _timed(cmd, out_json.with_suffix(".log"))
    record = json.loads(out_json.read_text())
    rounds_ = record["rounds"]
    out = _round_summary([r["seconds"] for r in rounds_], [r["accuracy"] for r in rounds_], record["final_accuracy"], wall)
    out.update(command=" ".join(["<flower-python>", *cmd[1:]]).replace(str(work), "<work>").replace(str(ROOT) + "/", ""),
               versions={k: record[k] for k in ("flwr", "ray", "torch", "python")},
               actors=record["actors"], threads_per_actor=record["threads_per_actor"],
               server_torch_threads=record["server_torch_threads"], simulation_s=record["simulation_s"])
    return out


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 1883), timeout=2):
            return True
    except OSError:
        return False


def parse_only(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or ",".join(RUNS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise SystemExit(f"--only {text!r}: choose from {', '.join(RUNS)} (comma-separated)")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="3 rounds, results under --work (a smoke run)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(RUNS)} (default: all)")
    ap.add_argument("--flower-python", default=DEFAULT_FLOWER_PYTHON,
                    help="python of the Flower virtualenv (default: %(default)s)")
    ap.add_argument("--actors", type=int, default=2, help="Flower: Ray actors, 1 CPU and 1 torch thread each")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="the Mosquitto of fedge-mosquitto")
    ap.add_argument("--data-root", help=f"Fashion-MNIST idx folder (default {DEFAULT_FASHION_ROOT})")
    ap.add_argument("--work", default=str(ROOT / "runs" / "vs_flower"), help="run folders, logs, experiment file")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/vs_flower.json; --quick: under --work)")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    if rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {rounds}")
    names = parse_only(args.only)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (work / "vs_flower_quick.json" if args.quick
                                           else ROOT / "benchmarks" / "results" / "vs_flower.json")

    exp_path = work / "experiment.npz"
    counts = write_experiment(exp_path, rounds, args.data_root)
    results: dict[str, Any] = {
        "command": "python benchmarks/vs_flower.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "rounds": rounds, "recipe": "paper001", "round_time": ROUND_TIME,
        "notes": "fedge: `fedge fleet` defaults (1 training worker, torch threads = all cores); Flower: "
                 f"{args.actors} Ray actors x 1 torch thread (client_resources num_cpus=1), server evaluation in the "
                 "driver process", "runs": {}}
    for name in names:
        load_before = os.getloadavg()[0]
        if name == "flower":
            results["runs"][name] = run_flower(args.flower_python, rounds, work, exp_path, args.data_root, args.actors)
        elif name == "fedge-mosquitto" and not _reachable(args.broker):
            why = f"no MQTT broker at {args.broker} (start Mosquitto or pass --broker)"
            print(f"{name}: skipped: {why}", flush=True)
            results["runs"][name] = {"skipped": why}
        else:
            results["runs"][name] = run_fedge(name, rounds, work, args.broker, args.data_root, counts)
        if "skipped" not in results["runs"][name]:
            # the machine's 1-minute load average before and after: on a shared machine, a run under more
            # load than the others is slower for that reason alone
            results["runs"][name]["load_average_1min"] = [load_before, os.getloadavg()[0]]
    flower = results["runs"].get("flower", {})
    for name, run in results["runs"].items():
        if name != "flower" and "skipped" not in run and "skipped" not in flower and flower:
            run["fedge_over_flower"] = run["median_seconds_per_round"] / flower["median_seconds_per_round"]
    write_results(results, out, plot)
    for name, run in results["runs"].items():
        if "skipped" in run:
            print(f"{name:16s} skipped: {run['skipped']}")
            continue
        ratio = f", {run['fedge_over_flower']:.2f}x Flower's" if "fedge_over_flower" in run else ""
        print(f"{name:16s} {run['median_seconds_per_round']:.2f} s/round (round 1: {run['first_round_seconds']:.2f} s)"
              f"{ratio}, total {run['total_wall_seconds']:.1f} s, final accuracy {100 * run['final_accuracy']:.2f} %")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if args.quick:  # a smoke run leaves its run folders for inspection
        print(f"run folders and logs: {work}")
    return 0


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: r for n, r in results["runs"].items() if "skipped" not in r}
    if not done:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(done)
    meds = [done[n]["median_seconds_per_round"] for n in names]
    bars = ax.bar(names, meds, color=["#ff7f0e" if n == "flower" else "#1f77b4" for n in names])
    for bar, name in zip(bars, names):
        run = done[name]
        label = f"{100 * run['final_accuracy']:.1f} %"
        if "fedge_over_flower" in run:
            label += f"\n{run['fedge_over_flower']:.2f}x Flower"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), label, ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("median seconds per round (rounds 2..R)")
    ax.set_ylim(0, max(meds) * 1.3)
    machine = results["machine"]
    ax.set_title(f"paper001, {results['rounds']} rounds, {machine['cpus']} CPUs, torch {machine['torch']}\n"
                 "bar label: final test accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
