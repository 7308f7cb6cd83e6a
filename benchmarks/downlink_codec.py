"""fp32 vs fp16 vs q8 model downlink on paper003's fleet, in one run: accuracy per round and bytes.

The downlink (the model the hub sends every selected device each round) is what is left of
the bytes on the air once the uplink is 1 bit per weight: 7.7 MB of fp32 scores against
0.24 MB up for Conv-4. `--model-codec fp16` halves it, `q8` (8 bits + a float32 offset
and scale per 256 weights) cuts it to about a quarter; the hub keeps and checkpoints the exact
fp32 model, so the only effect is that devices start local training from rounded values.
This measures that effect: each method x seed runs twice, with the same selection, data and
seeds, once per downlink codec, through the fleet (the real hub and agents, every update
through its uplink codec) over the in-memory transport by default (`--transport mqtt` for
real MQTT; both give the same global model).

Default: the MLP counterparts of paper003's models (mlp, mlp-mpt), so the whole grid runs on
a 2-core CPU in minutes; `--arch conv4` runs the paper's Conv-4.

    python benchmarks/downlink_codec.py                     # writes benchmarks/results/downlink_codec.{json,png}
    python benchmarks/downlink_codec.py --arch conv4 --rounds 50 --profile desktop-gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedge.hub.report import machine_info, write_results  # noqa: E402
from fedge.hub.sim.fleet import Fleet  # noqa: E402
from fedge.hub.sim.recipes import PAPER003_METHODS, paper003  # noqa: E402
from fedge.models.data import load_dataset  # noqa: E402
from fedge.models.registry import build_model, get_state  # noqa: E402
from fedge.models.wire.messages import build_model_message  # noqa: E402

MLP_OF = {"conv4": "mlp", "conv4-mpt": "mlp-mpt"}


def downlink_bytes(model: str, codec: str) -> int:
    """Bytes of one real model envelope in `codec`."""
    return len(build_model_message("f", "run", 0, model, get_state(build_model(model, seed=0)), codec=codec))


def run_cell(method: str, seed: int, codec: str, args: argparse.Namespace, ds) -> dict:  # noqa: ANN001
    cfg = paper003(method)
    model = cfg.hub.model if args.arch == "conv4" else MLP_OF.get(cfg.hub.model.name)
    if model is None:
        raise SystemExit(f"{method}: model {cfg.hub.model} has no MLP counterpart; use --arch conv4")
    cfg.hub.model, cfg.hub.seed, cfg.hub.rounds = model, seed, args.rounds
    cfg.hub.eval_size, cfg.hub.model_codec = args.eval_size, codec
    cfg.seed, cfg.profile, cfg.transport, cfg.progress = seed, args.profile, args.transport, False
    cfg.runs_dir = str(ROOT / "runs" / "downlink_codec")
    cfg.run_id = f"dl-{method.replace('/', '_')}-{codec}-s{seed}-{int(time.time())}"
    started = time.time()
    with Fleet(cfg, dataset=ds) as fleet:
        history = fleet.run()["rounds"]
    acc = [r["accuracy"] for r in history]
    cell = {"method": method, "model": str(model), "seed": seed, "model_codec": codec, "transport": args.transport,
            "accuracy": acc,
            "best_accuracy": max(acc), "final_accuracy": acc[-1], "downlink_bytes": downlink_bytes(model, codec),
            "seconds": time.time() - started}
    print(f"{method:18s} {str(model):8s} seed {seed} {codec}: best {cell['best_accuracy']:.4f} "
          f"final {cell['final_accuracy']:.4f} down {cell['downlink_bytes']:,} B ({cell['seconds']:.0f}s)", flush=True)
    return cell


def summary(cells: list[dict]) -> list[dict]:
    """Per method and codec: best and final accuracy (mean, std over seeds) and the paired
    difference codec - fp32 per seed (same seed, same selection: only the downlink differs)."""
    rows = []
    for method in dict.fromkeys(c["method"] for c in cells):
        for codec in dict.fromkeys(c["model_codec"] for c in cells):
            mine = [c for c in cells if c["method"] == method and c["model_codec"] == codec]
            if not mine:
                continue
            best = [100 * c["best_accuracy"] for c in mine]
            final = [100 * c["final_accuracy"] for c in mine]
            row = {"method": method, "model": mine[0]["model"], "model_codec": codec, "seeds": len(mine),
                   "best_mean": statistics.mean(best), "best_std": statistics.pstdev(best),
                   "final_mean": statistics.mean(final), "downlink_bytes": mine[0]["downlink_bytes"]}
            base = {c["seed"]: c for c in cells if c["method"] == method and c["model_codec"] == "fp32"}
            if codec != "fp32" and base:
                row["best_minus_fp32_per_seed"] = [100 * (c["best_accuracy"] - base[c["seed"]]["best_accuracy"])
                                                   for c in mine if c["seed"] in base]
            rows.append(row)
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for codec, style in (("fp32", "-"), ("fp16", "--"), ("q8", ":"), ("q6", "-."), ("q4", "-")):
            runs = [c["accuracy"] for c in cells if c["method"] == method and c["model_codec"] == codec]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            mean = [100 * statistics.mean(r[i] for r in runs) for i in range(n)]
            down = next(c["downlink_bytes"] for c in cells if c["method"] == method and c["model_codec"] == codec)
            ax.plot(range(1, n + 1), mean, style, lw=0.8 if codec == "q4" else 1.5,
                    label=f"{codec} downlink ({down / 1e6:.2f} MB)")
        ax.set_title(f"{method} ({next(c['model'] for c in cells if c['method'] == method)})")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    codecs = " vs ".join(dict.fromkeys(c["model_codec"] for c in cells))
    fig.suptitle(f"paper003 shards: model downlink {codecs} (same seeds, selection and data)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(path: Path) -> int:
    """Redraw the figure of an existing result file (no training)."""
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=["fedavg", "mpt-fl-1/32", "mpt-fl-1bit-sign"],
                    help=f"paper003 methods ({', '.join(m for m, s in PAPER003_METHODS.items() if s['federated'])})")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--arch", choices=["mlp", "conv4"], default="mlp")
    ap.add_argument("--codecs", nargs="*", default=["fp32", "fp16", "q8"])
    ap.add_argument("--eval-size", type=int, default=0, help="test images per round (0 = all 10,000)")
    ap.add_argument("--profile", default="sim", help="device profile (desktop-gpu trains on CUDA)")
    ap.add_argument("--transport", choices=["inproc", "mqtt"], default="inproc",
                    help="the fleet's transport (same global model either way; inproc is faster)")
    ap.add_argument("--data-root")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "downlink_codec.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG of --out")
    args = ap.parse_args()
    if args.replot:
        return replot(Path(args.out))
    ds = load_dataset("fashion-mnist", args.data_root)
    results = {"command": "python benchmarks/downlink_codec.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
               "arch": args.arch, "rounds": args.rounds, "transport": args.transport, "cells": []}
    for method in args.methods:
        for seed in args.seeds:
            for codec in args.codecs:
                results["cells"].append(run_cell(method, seed, codec, args, ds))
    results["summary"] = summary(results["cells"])
    out = write_results(results, args.out, plot)
    for row in results["summary"]:
        diff = row.get("best_minus_fp32_per_seed")
        extra = f"  {row['model_codec']} - fp32 per seed: {', '.join(f'{d:+.2f}' for d in diff)}" if diff else ""
        print(f"{row['method']:18s} {row['model_codec']}: best {row['best_mean']:.2f} +- {row['best_std']:.2f} "
              f"final {row['final_mean']:.2f}  down {row['downlink_bytes']:,} B{extra}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
