"""Paper 003's table and figure: every method x seed of the paper003 recipe, in one run.

    python benchmarks/paper003.py --seeds 0 1 2 --rounds 100                 # the table
    python benchmarks/paper003.py --sweep --rounds 100                       # accuracy vs prune ratio

Federated methods run through the fleet: the real hub and agents over real MQTT (embedded
broker) with `--transport mqtt`, or over the in-memory broker with `--transport inproc`
(the same code, envelopes and codecs; only the transport differs, and both give the same
global model). Writes JSON + PNG to benchmarks/results/.
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

from fedge.hub.report import machine_info, summarise, write_results  # noqa: E402
from fedge.hub.sim.central import train_central  # noqa: E402
from fedge.hub.sim.fleet import Fleet  # noqa: E402
from fedge.hub.sim.recipes import PAPER003_METHODS, paper003  # noqa: E402
from fedge.hub.store import RunStore  # noqa: E402
from fedge.models.data import load_dataset  # noqa: E402
from fedge.models.partition import partition  # noqa: E402
from fedge.models.registry import build_model, count_parameters, model_family  # noqa: E402


def model_bytes(spec, in_shape, num_classes) -> tuple[int, float, int]:  # noqa: ANN001 - spec: ModelSpec
    """(final model size in bytes, sparsity, file bytes). Dense models: 4 bytes per weight.
    MPT and BNN: the payload of their real 1-bit file (MPT: the mask, the frozen weights
    regenerate from the seed; BNN: the weight signs), and the whole file with its header."""
    model = build_model(spec, in_shape, num_classes)
    if not spec.name.startswith(("conv4-mpt", "mlp-mpt", "conv4-bnn")):
        n = count_parameters(model)
        return n * 4, 0.0, n * 4
    from fedge.models.mpt_nets import to_mask_file  # noqa: PLC0415

    one_bit = to_mask_file(model)
    kept = sum(layer.kept for layer in one_bit.layers)
    return one_bit.mask_payload_bytes, 1 - kept / one_bit.total_weights, len(one_bit.to_bytes())


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
    size, sparsity, file_size = model_bytes(cfg.hub.model, ds.in_shape, ds.num_classes)
    out = {"method": method, "seed": seed, "model": cfg.hub.model.name, "prune_ratio": prune_ratio,
           "size_bytes": size, "sparsity": sparsity, "file_bytes": file_size}
    if not spec["federated"]:
        progress = _StopAfter(args.stop_after)
        out.update(uplink=0, downlink=0)
        try:
            train_central(ds, parts, cfg.hub.model, cfg.hub.train, epochs=args.rounds, seed=seed,
                          profile=args.profile, curve=progress)
        except Exception as exc:  # torch may wrap Stopped (e.g. load_state_dict re-raises a RuntimeError)
            if not (_STOPPING or isinstance(exc, Stopped)) or not progress:
                raise
            print(f"{method} seed {seed}: stopped after {len(progress)} of {args.rounds} epochs (kept as partial)")
        out.update(accuracy=[r["accuracy"] for r in progress], rounds_done=len(progress))
    else:
        cfg.transport = args.transport
        cfg.stop_after = args.stop_after  # the schedule still spans --rounds
        cfg.run_id = f"p003-{method.replace('/', '_')}-p{prune_ratio}-s{seed}-{int(time.time())}"
        fleet = Fleet(cfg, dataset=ds)
        try:
            with fleet:
                rounds = fleet.run()["rounds"]
        except Exception as exc:
            rounds = RunStore(fleet.run_dir).rounds() if (_STOPPING or isinstance(exc, Stopped)) else []
            if not rounds:
                raise
            print(f"{method} seed {seed}: stopped after {len(rounds)} of {args.rounds} rounds (kept as partial)")
        sizes = summarise(rounds, model_family(cfg.hub.model))
        out.update(accuracy=[r["accuracy"] for r in rounds], rounds_done=len(rounds),
                   uplink=sizes["uplink_bytes_per_device"], downlink=sizes["downlink_bytes_per_device"])
    out["ran_on"] = _ran_on(args.profile)
    out["best_accuracy"] = max(out["accuracy"])
    out["final_accuracy"] = out["accuracy"][-1]
    out["seconds"] = time.time() - started
    print(f"{method:18s} p={prune_ratio:.2f} seed {seed}: best {out['best_accuracy']:.4f} "
          f"final {out['final_accuracy']:.4f} ({out['seconds']:.0f}s)", flush=True)
    return out


class _StopAfter(list):
    """Epoch records of a centralised cell; with a limit, the cell stops (kept as partial) once it
    holds that many (federated cells stop through the fleet's stop_after). The schedule still spans
    --rounds, so the first N are the same as those of a full run: a cheap way to fill a comparison
    at N rounds on a slow machine."""

    def __init__(self, limit: int | None) -> None:
        super().__init__()
        self.limit = limit

    def append(self, record: dict) -> None:  # type: ignore[override]
        super().append(record)
        if self.limit is not None and len(self) >= self.limit:
            raise Stopped()


def _ran_on(profile: str) -> str:
    """The accelerator or CPU a cell trained on: merged tables may join cells from several machines."""
    import platform  # noqa: PLC0415

    if profile == "desktop-gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
               "file_bytes": max((c.get("file_bytes", 0) for c in mine), default=0) or None,
               "sparsity": mine[0]["sparsity"], "uplink_bytes": mine[0]["uplink"], "downlink_bytes": mine[0]["downlink"],
               "ran_on": sorted({c.get("ran_on", "?") for c in mine})}
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
    ap.add_argument("--sweep-seeds", nargs="*", type=int,
                    help="seeds of the sweep cells (default: the first of --seeds)")
    ap.add_argument("--stop-after", type=int, metavar="N",
                    help="stop every cell after N rounds/epochs and keep it as partial; the lr schedule "
                         "still spans --rounds, so the cell matches the first N rounds of a full run")
    ap.add_argument("--transport", choices=["mqtt", "inproc"], default="mqtt",
                    help="federated cells: the fleet over real MQTT (default) or over the in-memory broker "
                         "(same hub, agents, codecs and global model; faster)")
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
            enough = min(args.rounds, args.stop_after or args.rounds)
            results["cells"] = [c for c in old["cells"] if _rounds(c) >= enough]  # partial cells rerun
    signal.signal(signal.SIGTERM, _stop)
    done = {(c["method"], c["seed"], c["prune_ratio"]) for c in results["cells"]}
    plan = [] if args.sweep_only else [(m, s, 0.8) for m in args.methods for s in args.seeds]
    if args.sweep or args.sweep_only:  # ratio 0.8 and FedAvg come from the table's cells
        plan += [(m, s, p) for s in (args.sweep_seeds or args.seeds[:1]) for p in args.ratios
                 for m in args.sweep_methods]
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
        if _STOPPING:
            break  # stopped mid-cell: the partial cell is saved, nothing more runs
    return _write(results, out)


def merge(files: list[str], out: Path) -> int:
    """Join result files of parallel runs (one per method) into one table and figure."""
    results: dict = {"cells": [], "launches": []}
    for f in files:
        part = json.loads(Path(f).read_text())
        for key in ("machine", "cuda", "rounds", "transport"):
            results.setdefault(key, part.get(key))
        if part.get("rounds") != results["rounds"]:
            raise SystemExit(f"{f}: ran with --rounds {part.get('rounds')}, the others with {results['rounds']}; "
                             "the cosine schedule spans --rounds, so their cells are not comparable")
        results["launches"] += [x for x in part.get("launches", []) if x not in results["launches"]]
        # a merged file can be merged again: its cells keep the part they came from
        results["cells"] += [{"part": Path(f).name, "ran_on": part.get("cuda") or "CPU", **c} for c in part["cells"]]
    results["cells"] = _longest_per_cell(results["cells"])
    results["command"] = "python benchmarks/paper003.py --merge " + " ".join(Path(f).name for f in files)
    return _write(results, out)


def _longest_per_cell(cells: list[dict]) -> list[dict]:
    """One cell per (method, seed, prune ratio): where parts overlap, the one that ran longest."""
    best: dict[tuple, dict] = {}
    for c in cells:
        key = (c["method"], c["seed"], c["prune_ratio"])
        if key not in best or _rounds(c) > _rounds(best[key]):
            best[key] = c
    return list(best.values())


def _write(results: dict, out: Path) -> int:
    """Table, JSON, plot and a printed summary of whatever cells `results` holds."""
    results["table"] = table(results["cells"])
    write_results(results, out, _plot)
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
            stats = [_mean_std(pts[p]) for p in ratios]
            seeds = "/".join(str(len(pts[p])) for p in ratios)
            ax.errorbar([100 * p for p in ratios], [m for m, _ in stats], yerr=[sd for _, sd in stats], marker=marker,
                        capsize=3, label=f"MPT-FL {method.rsplit('-', 1)[-1]} (seeds per point: {seeds})")
    fed = [100 * max(c["accuracy"][:common]) for c in cells if c["method"] == "fedavg"]
    if fed:
        mean, sd = _mean_std(fed)
        ax.axhline(mean, color="k", ls="--", label=f"FedAvg (dense, no pruning; {len(fed)} seeds, band = std)")
        ax.axhspan(mean - sd, mean + sd, color="k", alpha=0.08)
    ax.set_xlabel("prune ratio (% of weights removed)")
    ax.set_ylabel(f"best test accuracy in {common} rounds (%)")
    ax.set_title("accuracy vs prune ratio (mean ± std over seeds)")
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
    ran_on = sorted({c.get("ran_on") or results.get("cuda") or "CPU" for c in cells})
    curves.set_title(f"paper003 on Fashion-MNIST, prune ratio 0.8 ({' + '.join(ran_on)})", fontsize=10)
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
