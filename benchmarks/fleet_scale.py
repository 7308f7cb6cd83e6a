"""How the fleet simulator scales: N virtual devices, each its own MQTT connection, on one machine.

Runs `fedge fleet` (the user's command, as a child process) for each fleet size and records
start-up time (process start to the first round opening), peak RSS of the fleet process and of
any child processes (training workers, if the fleet has them), the most threads the process
had, the median seconds per round and the final accuracy. Sampled every 0.25 s from /proc via
psutil.

    python benchmarks/fleet_scale.py                      # 100, 300, 1000 devices, 60 images each, over Mosquitto
    python benchmarks/fleet_scale.py --devices 1000 --partition dirichlet --out benchmarks/results/fleet_scale_1000.json
    python benchmarks/fleet_scale.py --devices 1000 --partition dirichlet --transport inproc \
        --out benchmarks/results/fleet_scale_1000_inproc.json

Writes benchmarks/results/fleet_scale.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedge.hub.report import machine_info, write_results  # noqa: E402

ROUND_OPEN = re.compile(r"round 1 \(train\) open")


def run_one(devices: int, args: argparse.Namespace) -> dict:
    fleet_id = f"scale{devices}-{uuid.uuid4().hex[:6]}"
    split = ["--partition", "dirichlet", "--alpha", str(args.alpha)] if args.partition == "dirichlet" else \
        ["--partition", "iid", "--per-device", str(args.per_device)]
    cmd = [str(Path(sys.executable).parent / "fedge"), "fleet", "--devices", str(devices), *split, "--model", args.model,
           "--clients-per-round", str(args.clients_per_round),
           "--rounds", str(args.rounds), "--fleet", fleet_id, "--runs-dir", str(ROOT / "runs" / "bench"),
           "--no-progress", "-v"]
    cmd += ["--transport", "inproc"] if args.transport == "inproc" else ["--broker", args.broker]
    log_path = ROOT / "runs" / "bench" / f"{fleet_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        ps = psutil.Process(proc.pid)
        peak_rss = peak_children = 0
        peak_threads = 0
        startup_s = None
        while proc.poll() is None:
            try:
                peak_rss = max(peak_rss, ps.memory_info().rss)
                peak_threads = max(peak_threads, ps.num_threads())
                kids = 0
                for child in ps.children(recursive=True):
                    try:
                        kids += child.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                peak_children = max(peak_children, kids)
            except psutil.NoSuchProcess:
                break
            if startup_s is None and ROUND_OPEN.search(log_path.read_text(errors="replace")):
                startup_s = time.time() - started
            time.sleep(0.25)
        out = proc.stdout.read() if proc.stdout else ""
    wall = time.time() - started
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        return {"devices": devices, "ok": False, "returncode": proc.returncode, "error": tail, "wall_s": wall,
                "peak_threads": peak_threads, "peak_rss_mb": peak_rss / 2**20}
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
    run = json.loads((ROOT / "runs" / "bench" / summary["run_id"] / "run.json").read_text())
    seconds = [r["seconds"] for r in run["rounds"]]
    return {"devices": devices, "ok": True, "startup_s": startup_s, "wall_s": wall,
            "peak_rss_mb": peak_rss / 2**20, "peak_children_rss_mb": peak_children / 2**20,
            "peak_threads": peak_threads, "seconds_per_round": seconds,
            "median_seconds_per_round": statistics.median(seconds), "final_accuracy": summary.get("final_accuracy"),
            "log": str(log_path.relative_to(ROOT))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="100,300,1000", help="fleet sizes, comma-separated")
    ap.add_argument("--transport", choices=["mqtt", "inproc"], default="mqtt")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients-per-round", type=int, default=100)
    ap.add_argument("--partition", choices=["iid", "dirichlet"], default="iid",
                    help="iid (default): --per-device images each, the same work per round at every fleet size; "
                         "dirichlet: the whole training set over the devices (1,000 devices: about 60 each)")
    ap.add_argument("--per-device", type=int, default=60)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet_scale.json"))
    args = ap.parse_args()

    results: dict = {"command": "python benchmarks/fleet_scale.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
                     "transport": args.transport, "broker": args.broker if args.transport == "mqtt" else None,
                     "rounds": args.rounds, "clients_per_round": args.clients_per_round, "model": args.model,
                     "partition": (f"dirichlet alpha={args.alpha}, the whole training set over the devices"
                                   if args.partition == "dirichlet" else f"iid, {args.per_device} images per device"),
                     "runs": []}
    for n in (int(v) for v in args.devices.split(",")):
        print(f"{n} devices over {args.transport} ...", flush=True)
        row = run_one(n, args)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        results["runs"].append(row)
    out = write_results(results, args.out, _plot)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["ok"]]
    if not runs:
        return
    n = [r["devices"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, label in ((axes[0], "startup_s", "start-up s (to round 1 open)"),
                           (axes[1], "median_seconds_per_round", "median s per round"),
                           (axes[2], "peak_rss_mb", "peak RSS MiB")):
        ax.plot(n, [r[key] or 0 for r in runs], "o-")
        ax.set_xlabel("devices")
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"fedge fleet over {results['transport']}, {results['model']}, "
                 f"{results['clients_per_round']} devices per round", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
