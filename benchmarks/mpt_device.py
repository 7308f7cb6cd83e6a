"""Dense FedAvg vs each MPT strategy on one device, in one run: bytes on the air per round,
peak RSS of the training process, and seconds per local round (Conv-4, paper003's device).

Each mode trains in its own fresh process (so peak RSS is that mode's alone): one local
round of paper003 (40 images, 5 epochs, batch 10) starting from a received global state,
then it builds the real update envelope it would publish; like edge_agent.agent, it keeps
that payload (and nothing else of the round) into the next round. Every mode runs REPEATS times, each
in a fresh process, and the median is reported, with the RSS after imports and ru_maxrss
after each phase of the first round (where the peak is reached).

Peak RSS also counts heap pages glibc keeps after free(): by default its mmap threshold
grows to the largest block freed so far, so later layer-sized temporaries come from the heap
and stay resident. Every mode is therefore also run with a fixed threshold
(MALLOC_MMAP_THRESHOLD_=131072: blocks over 128 KiB are returned to the OS when freed), where
peak RSS follows the memory actually live; both columns are reported, for every mode.

    python benchmarks/mpt_device.py          # writes benchmarks/results/mpt_device.{json,png}
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
REPEATS = 3
ALLOCATORS = {"default": {}, "fixed_mmap_threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
MODES = {  # mode: (model, strategy, optimiser settings)
    "fedavg (dense fp32)": ("conv4", "fedavg", {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9}),
    "mpt-score-avg (1/32)": ("conv4-mpt", "mpt-score-avg", {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}),
    "mpt-mask (1/32, 1-bit up)": ("conv4-mpt", "mpt-mask", {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}),
    "sign-delta (1/32, 1-bit up)": ("conv4-mpt", "sign-delta", {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}),
}

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def cuda_libs_mb():  # resident pages of the CUDA libraries a CUDA build of torch maps even on the CPU
    total, cuda, end = 0, False, None
    for line in open("/proc/self/smaps"):
        f = line.split()
        if len(f) >= 5 and "-" in f[0] and ":" in f[3]:  # a mapping's header
            lo, hi = (int(a, 16) for a in f[0].split("-"))
            path = f[5] if len(f) > 5 else ""
            if path or lo != end:  # an anonymous mapping right after a library's last one is its .bss
                cuda = "/nvidia/" in path or "/cuda/bindings/" in path or os.path.basename(path).startswith(
                    ("libtorch_cuda", "libc10_cuda", "libtorch_nvshmem"))
            end = hi
        elif f[0] == "Rss:" and cuda:
            total += int(f[1])
    return total / 1024
import numpy as np, torch
torch.set_num_threads(1)
from fedge.edge_agent.trainer import LocalTrainer, TrainConfig, uplink_state
from fedge.hub.strategies import make_strategy
from fedge.models.registry import build_model, get_state
from fedge.models.wire.messages import build_model_message, build_update_message
model, strategy, opt = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
base, phases = rss(), {}
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.normal(size=(40, 1, 28, 28)).astype(np.float32)); y = torch.from_numpy(rng.integers(0, 2, 40))
state = get_state(build_model(model, seed=0))
trainer = LocalTrainer(model, (1, 28, 28), 10)
phases["model built"] = peak()
cfg = TrainConfig(epochs=5, batch_size=10, **opt)
times = []
for r in range(3):
    t = time.perf_counter()
    res = trainer.train(state, x, y, cfg, seed=r)
    phases.setdefault("first round trained", peak())
    codec = make_strategy(strategy).codec or "fp32"
    res.state = uplink_state(trainer, res, codec, state)  # as edge_agent.agent does
    trained_mb = sum(p.numel() * 4 for p in trainer.model.parameters()) / 2**20
    up = build_update_message("f", "run", "dev000", 1, 0, res.state, 40, codec=codec)
    del res  # the agent keeps only the published payload (its _last_update) into the next round
    phases.setdefault("first update encoded", peak())
    times.append(time.perf_counter() - t)
down = build_model_message("f", "run", 0, model, state)
print(json.dumps({"uplink_bytes": len(up), "downlink_bytes": len(down), "seconds_per_local_round": min(times),
                  "peak_rss_mb": peak(), "rss_after_imports_mb": base, "peak_rss_by_phase_mb": phases,
                  "trained_tensor_mb": trained_mb, "cuda_libraries_rss_mb": cuda_libs_mb(),
                  "torch": torch.__version__, "torch_cuda": torch.version.cuda}))
"""


def run_mode(model: str, strategy: str, opt: dict, malloc_env: dict[str, str]) -> dict:
    """One fresh process: the child's measurements."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), model, strategy, json.dumps(opt)],
                          capture_output=True, text=True, check=True, env={**env, "OMP_NUM_THREADS": "1", **malloc_env})
    return json.loads(proc.stdout.strip().splitlines()[-1])


RSS_KEYS = ("peak_rss_mb", "peak_rss_runs_mb", "rss_after_imports_mb", "peak_above_imports_mb", "peak_rss_by_phase_mb",
            "cuda_libraries_rss_mb", "peak_without_cuda_libraries_mb")


def median_of(runs: list[dict]) -> dict:
    """Median over fresh-process runs of every number (bytes are identical run to run)."""
    out = dict(runs[-1])
    for key in ("peak_rss_mb", "rss_after_imports_mb", "seconds_per_local_round", "cuda_libraries_rss_mb"):
        out[key] = statistics.median(r[key] for r in runs)
    out["peak_rss_by_phase_mb"] = {k: statistics.median(r["peak_rss_by_phase_mb"][k] for r in runs)
                                   for k in runs[0]["peak_rss_by_phase_mb"]}
    out["peak_rss_runs_mb"] = [r["peak_rss_mb"] for r in runs]
    out["peak_above_imports_mb"] = statistics.median(r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in runs)
    out["peak_without_cuda_libraries_mb"] = statistics.median(r["peak_rss_mb"] - r["cuda_libraries_rss_mb"] for r in runs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mpt_device.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from fedge.hub.report import machine_info, write_results

    results = {"command": "python benchmarks/mpt_device.py", "machine": machine_info(), "threads": 1,
               "repeats": REPEATS, "statistic": "median over fresh processes", "allocators": ALLOCATORS, "modes": {}}
    runs: dict[tuple[str, str], list[dict]] = {(mode, a): [] for mode in MODES for a in ALLOCATORS}
    for _ in range(REPEATS):  # interleaved, so a slow spell of the machine hits every mode
        for mode, (model, strategy, opt) in MODES.items():
            for alloc, malloc_env in ALLOCATORS.items():
                runs[mode, alloc].append(run_mode(model, strategy, opt, malloc_env))
    for mode, (model, strategy, _opt) in MODES.items():
        fixed = median_of(runs[mode, "fixed_mmap_threshold"])
        results["modes"][mode] = {"model": model, "strategy": strategy, **median_of(runs[mode, "default"]),
                                  "fixed_mmap_threshold": {k: fixed[k] for k in RSS_KEYS}}
        row = results["modes"][mode]
        print(f"{mode:28s} up {row['uplink_bytes']:>10,d} B  down {row['downlink_bytes']:>10,d} B  "
              f"peak RSS {row['peak_rss_mb']:6.1f} MB (runs {', '.join(f'{v:.1f}' for v in row['peak_rss_runs_mb'])}; "
              f"after imports {row['rss_after_imports_mb']:.1f}); fixed mmap threshold "
              f"{row['fixed_mmap_threshold']['peak_rss_mb']:.1f} MB  CUDA libraries {row['cuda_libraries_rss_mb']:.1f} MB, "
              f"peak without them {row['peak_without_cuda_libraries_mb']:.1f} / "
              f"{row['fixed_mmap_threshold']['peak_without_cuda_libraries_mb']:.1f} MB  "
              f"local round {row['seconds_per_local_round']:.2f} s",
              flush=True)
    dense = results["modes"]["fedavg (dense fp32)"]
    for row in results["modes"].values():
        row["uplink_ratio_vs_fedavg"] = dense["uplink_bytes"] / row["uplink_bytes"]
        row["rss_ratio_vs_fedavg"] = row["peak_rss_mb"] / dense["peak_rss_mb"]
        row["peak_rss_vs_fedavg_mb"] = row["peak_rss_mb"] - dense["peak_rss_mb"]
        row["fixed_mmap_threshold"]["peak_rss_vs_fedavg_mb"] = (
            row["fixed_mmap_threshold"]["peak_rss_mb"] - dense["fixed_mmap_threshold"]["peak_rss_mb"])
    out = write_results(results, args.out, _plot)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, label in zip(axes, ("uplink_bytes", "peak_rss_mb", "seconds_per_local_round"),
                              ("uplink bytes / round (log)", "peak RSS (MB, median)", "s per local round")):
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(modes)), [m.split(" ")[0] for m in modes], rotation=15)
        if key == "peak_rss_mb":
            _plot_rss(ax, results, modes)
            continue
        ax.bar(range(len(modes)), [results["modes"][m][key] for m in modes], color=["#888", "#1f77b4", "#2ca02c"])
        if key == "uplink_bytes":
            ax.set_yscale("log")
    fig.suptitle(f"Conv-4 on one device: dense FedAvg vs MPT (1 thread, median of {results['repeats']} processes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rss(ax, results: dict, modes: list[str]) -> None:  # noqa: ANN001
    """Default allocator and fixed mmap threshold side by side; the axis starts near the RSS
    after imports (torch alone), which is most of every bar."""
    floor = min(results["modes"][m]["rss_after_imports_mb"] for m in modes)
    for offset, label, get in ((-0.2, "default malloc", lambda r: r["peak_rss_mb"]),
                               (0.2, "fixed mmap threshold", lambda r: r["fixed_mmap_threshold"]["peak_rss_mb"])):
        values = [get(results["modes"][m]) for m in modes]
        ax.bar([i + offset for i in range(len(modes))], values, width=0.4, label=label,
               color="#1f77b4" if offset < 0 else "#ff7f0e")
        for i, v in enumerate(values):
            ax.text(i + offset, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(floor, color="k", lw=0.8, ls=":")
    ax.set_ylim(bottom=floor - 20)
    ax.legend(fontsize=7, loc="lower right")


if __name__ == "__main__":
    sys.exit(main())
