"""Paper 003's table and figure: every method x seed of the paper003 recipe, in one run.

    python benchmarks/paper003.py --seeds 0 1 2 --rounds 100                 # the table
    python benchmarks/paper003.py --sweep --rounds 100                       # accuracy vs prune ratio

Federated methods run through the fleet (real MQTT, embedded broker) with `--transport mqtt`
or through the plain in-process loop with `--transport plain` (identical training,
selection, seeds and aggregation code; only the transport differs; bytes on the air are
then computed by encoding one real update and model message). Writes JSON + PNG to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hub.baseline import plain_fedavg  # noqa: E402
from hub.central import train_central  # noqa: E402
from hub.fleet import Fleet  # noqa: E402
from hub.recipes import PAPER003_METHODS, paper003  # noqa: E402
from hub.report import machine_info  # noqa: E402
from hub.strategies import UPDATE_CODEC  # noqa: E402
from models.data import load_dataset  # noqa: E402
from models.partition import partition  # noqa: E402
from models.registry import build_model, count_parameters, get_state  # noqa: E402
from models.wire.messages import build_model_message, build_update_message  # noqa: E402


def model_bytes(model_name: str, in_shape, num_classes) -> tuple[int, float]:  # noqa: ANN001
    """(final model size in bytes, sparsity): 4 bytes per weight for dense models; one bit per
    weight for MPT (the mask; frozen weights regenerate from the seed) and BNN (the signs)."""
    model = build_model(model_name, in_shape, num_classes)
    if model_name.startswith("conv4-mpt") or model_name.startswith("mlp-mpt"):
        from models.supermask import frozen_weight_count, supermask_layers  # noqa: PLC0415

        n = frozen_weight_count(model)
        kept = sum(layer.kept for _, layer in supermask_layers(model))
        return (n + 7) // 8, 1 - kept / n
    n = count_parameters(model)
    return (n * 4, 0.0) if not model_name.startswith("conv4-bnn") else ((n + 7) // 8, 0.0)


def wire_bytes(model_name: str, strategy: str, in_shape, num_classes) -> tuple[int, int]:  # noqa: ANN001
    """Bytes of one real update envelope (uplink) and one model envelope (downlink)."""
    model = build_model(model_name, in_shape, num_classes)
    state = get_state(model)
    codec = UPDATE_CODEC.get(strategy, "fp32")
    if codec == "mask1":
        from models.supermask import model_masks  # noqa: PLC0415

        up_state = model_masks(model)
    else:
        up_state = state
    up = build_update_message("f", "run", "dev000", 1, 0, up_state, 40, {"loss": 0.0}, codec=codec)
    down = build_model_message("f", "run", 0, model_name, state)
    return len(up), len(down)


class Stopped(Exception):
    """SIGTERM (e.g. from `timeout`): the cell in progress is saved as partial, not lost."""


_STOPPING: list[bool] = []


def _stop(signum, frame) -> None:  # noqa: ANN001
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the final write
    _STOPPING.append(True)
    raise Stopped()


def run_method(method: str, seed: int, args, ds, prune_ratio: float = 0.8) -> dict:  # noqa: ANN001
    cfg = paper003(method, prune_ratio)
    cfg.seed = seed
    cfg.hub.seed = seed
    cfg.hub.rounds = args.rounds
    cfg.hub.eval_size = args.eval_size
    cfg.profile = args.profile
    cfg.progress = False
    cfg.runs_dir = str(ROOT / "runs" / "paper003")
    spec = PAPER003_METHODS[method]
    parts = partition(ds.train.y, cfg.devices, cfg.partition, seed=seed, num_classes=ds.num_classes)
    started = time.time()
    size, sparsity = model_bytes(cfg.hub.model, ds.in_shape, ds.num_classes)
    out = {"method": method, "seed": seed, "model": cfg.hub.model, "prune_ratio": prune_ratio,
           "size_bytes": size, "sparsity": sparsity}
    progress: list[dict] = []
    if not spec["federated"] or args.transport == "plain":
        up, down = wire_bytes(cfg.hub.model, cfg.hub.strategy, ds.in_shape, ds.num_classes)
        out.update(uplink=0 if not spec["federated"] else up, downlink=0 if not spec["federated"] else down)
        try:
            if not spec["federated"]:
                train_central(ds, parts, cfg.hub.model, cfg.hub.train, epochs=args.rounds, seed=seed,
                              profile=args.profile, curve=progress)
            else:
                plain_fedavg(ds, parts, cfg.hub, profile_name=args.profile, history=progress)
        except Exception:  # torch may wrap Stopped (e.g. load_state_dict re-raises a RuntimeError)
            if not _STOPPING or not progress:
                raise
            print(f"{method} seed {seed}: stopped after {len(progress)} of {args.rounds} rounds (kept as partial)")
        out.update(accuracy=[r["accuracy"] for r in progress], rounds_done=len(progress))
    else:
        cfg.run_id = f"p003-{method.replace('/', '_')}-p{prune_ratio}-s{seed}-{int(time.time())}"
        with Fleet(cfg, dataset=ds) as fleet:
            report = fleet.run()
        out.update(accuracy=[r["accuracy"] for r in report["rounds"]], rounds_done=len(report["rounds"]),
                   uplink=report["uplink_bytes_per_device"], downlink=report["downlink_bytes_per_device"])
    out["best_accuracy"] = max(out["accuracy"])
    out["final_accuracy"] = out["accuracy"][-1]
    out["seconds"] = time.time() - started
    print(f"{method:18s} p={prune_ratio:.2f} seed {seed}: best {out['best_accuracy']:.4f} "
          f"final {out['final_accuracy']:.4f} ({out['seconds']:.0f}s)", flush=True)
    return out


def _rounds(cell: dict) -> int:
    return int(cell.get("rounds_done", len(cell["accuracy"])))


def common_rounds(cells: list[dict]) -> int:
    """Rounds every federated cell reached: a partial cell is compared with the others there."""
    fed = [_rounds(c) for c in cells if PAPER003_METHODS.get(c["method"], {}).get("federated")]
    return min(fed) if fed else 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def table(cells: list[dict]) -> list[dict]:
    """One row per method at prune ratio 0.8: best accuracy over the rounds each seed ran, and
    best accuracy within the rounds every federated cell reached (the fair comparison when
    some cells were stopped early)."""
    common = common_rounds(cells)
    rows = []
    for method in PAPER003_METHODS:
        mine = [c for c in cells if c["method"] == method and c["prune_ratio"] == 0.8]
        if not mine:
            continue
        best, best_sd = _mean_std([100 * c["best_accuracy"] for c in mine])
        row = {"method": method, "best_accuracy_mean": best, "best_accuracy_std": best_sd, "seeds": len(mine),
               "rounds": min(_rounds(c) for c in mine), "size_bytes": mine[0]["size_bytes"],
               "sparsity": mine[0]["sparsity"], "uplink_bytes": mine[0]["uplink"], "downlink_bytes": mine[0]["downlink"]}
        if PAPER003_METHODS[method]["federated"] and common:
            at, at_sd = _mean_std([100 * max(c["accuracy"][:common]) for c in mine])
            row.update(common_rounds=common, best_at_common_mean=at, best_at_common_std=at_sd)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=list(PAPER003_METHODS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--eval-size", type=int, default=0, help="test images per round (0 = all 10,000)")
    ap.add_argument("--sweep", action="store_true", help="also run MPT-FL 1/32 and 1/1 at prune ratios 0.5, 0.8, 0.9")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.9],
                    help="prune ratios of the sweep besides 0.8 (which comes from the table's cells)")
    ap.add_argument("--sweep-methods", nargs="*", default=["mpt-fl-1/32", "mpt-fl-1/1"])
    ap.add_argument("--transport", choices=["plain", "mqtt"], default="mqtt")
    ap.add_argument("--profile", default="sim", help="device profile (desktop-gpu trains on CUDA)")
    ap.add_argument("--data-root")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper003.json"))
    ap.add_argument("--merge", nargs="*", help="only merge cells from these result files into --out (table + plot)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge is not None:
        return merge(args.merge, out)
    ds = load_dataset("fashion-mnist", args.data_root)
    results = {"command": "python benchmarks/paper003.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "rounds": args.rounds, "transport": args.transport, "cells": []}
    if out.exists():  # resume: keep cells already measured with the same settings
        old = json.loads(out.read_text())
        if old.get("rounds") == args.rounds and old.get("transport") == args.transport:
            results["cells"] = [c for c in old["cells"] if _rounds(c) >= args.rounds]  # partial cells rerun
    signal.signal(signal.SIGTERM, _stop)
    done = {(c["method"], c["seed"], c["prune_ratio"]) for c in results["cells"]}
    plan = [] if args.sweep_only else [(m, s, 0.8) for m in args.methods for s in args.seeds]
    if args.sweep or args.sweep_only:  # ratio 0.8 and FedAvg come from the table's cells
        plan += [(m, args.seeds[0], p) for p in args.ratios for m in args.sweep_methods]
    out.parent.mkdir(parents=True, exist_ok=True)
    for method, seed, ratio in plan:
        if (method, seed, ratio) in done:
            continue
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            results["cells"].append(run_method(method, seed, args, ds, ratio))
        except Exception:
            if not _STOPPING:
                raise
            break
        finally:
            results["table"] = table(results["cells"])
            out.write_text(json.dumps(results, indent=1))
        done.add((method, seed, ratio))
        if results["cells"][-1].get("rounds_done", args.rounds) < args.rounds:
            break  # stopped mid-cell: the partial cell is saved, nothing more runs
    return _write(results, out)


def merge(files: list[str], out: Path) -> int:
    """Join result files of parallel runs (one per method) into one table and figure."""
    results: dict = {"cells": []}
    for f in files:
        part = json.loads(Path(f).read_text())
        for key in ("machine", "cuda", "rounds", "transport"):
            results.setdefault(key, part.get(key))
        results["cells"] += [{**c, "part": Path(f).name} for c in part["cells"]]
    results["command"] = "python benchmarks/paper003.py --merge " + " ".join(Path(f).name for f in files)
    return _write(results, out)


def _write(results: dict, out: Path) -> int:
    """Table, JSON, plot and a printed summary of whatever cells `results` holds."""
    results["table"] = table(results["cells"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    _plot(results, out.with_suffix(".png"))
    for row in results["table"]:
        common = (f"  best in {row['common_rounds']} rounds {row['best_at_common_mean']:6.2f} +- "
                  f"{row['best_at_common_std']:.2f}") if "common_rounds" in row else ""
        print(f"{row['method']:18s} {row['best_accuracy_mean']:6.2f} +- {row['best_accuracy_std']:.2f} ({row['seeds']} seeds, "
              f">= {row['rounds']} rounds){common}  size {row['size_bytes']:>9,d}  sparsity {row['sparsity']:.0%}  "
              f"up {row['uplink_bytes']:>10,.0f}  down {row['downlink_bytes']:>10,.0f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(results: dict, path: Path) -> None:
    """Left: best accuracy against prune ratio (paper 003's figure 1), every point taken within
    the same number of rounds. Right: test accuracy per round, mean over seeds, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    common = common_rounds(cells) or results.get("rounds") or 1
    fig, (ax, curves) = plt.subplots(1, 2, figsize=(13, 4.5))
    for method, marker in (("mpt-fl-1/32", "o"), ("mpt-fl-1/1", "s")):
        pts: dict[float, list[float]] = {}
        for c in cells:
            if c["method"] == method:
                pts.setdefault(c["prune_ratio"], []).append(100 * max(c["accuracy"][:common]))
        if len(pts) > 1:
            ratios = sorted(pts)
            ax.plot([100 * p for p in ratios], [statistics.mean(pts[p]) for p in ratios], marker=marker,
                    label=f"MPT-FL {method.rsplit('-', 1)[-1]}")
    fed = [100 * max(c["accuracy"][:common]) for c in cells if c["method"] == "fedavg"]
    if fed:
        ax.axhline(statistics.mean(fed), color="k", ls="--", label="FedAvg (dense, no pruning)")
    ax.set_xlabel("prune ratio (% of weights removed)")
    ax.set_ylabel(f"best test accuracy in {common} rounds (%)")
    ax.set_title("accuracy vs prune ratio (mean over the seeds run)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    for method, spec in PAPER003_METHODS.items():
        runs = [c["accuracy"] for c in cells if c["method"] == method and c["prune_ratio"] == 0.8]
        if not runs or not spec["federated"]:
            continue
        n = min(len(r) for r in runs)
        curves.plot(range(1, n + 1), [100 * statistics.mean(r[i] for r in runs) for i in range(n)], label=method)
    curves.set_xlabel("round")
    curves.set_ylabel("test accuracy (%)")
    curves.set_title(f"paper003 on Fashion-MNIST, prune ratio 0.8 ({results.get('cuda') or 'CPU'})")
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
