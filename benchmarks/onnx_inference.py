"""ONNX Runtime vs torch for on-device inference: size, memory, start-up, latency, int8 cost.

For MLP and Conv-4 (dense fp32, int8 dynamic, int8 static; MPT variants later):

* trains the model briefly on Fashion-MNIST (SGD, seeded), exports it with models.export;
* accuracy on the test set of torch, ONNX fp32 and both int8 files (the int8 accuracy cost);
* for every runtime variant a fresh subprocess that only imports its runtime, loads the
  model and predicts: peak RSS (its ru_maxrss; spawned from a small launcher process so the
  parent's size does not leak into it), start-up time (spawn -> first
  prediction returned), latency at batch 1 and 64 on 1 thread (median and p90);
* writes benchmarks/results/onnx_inference.json and .png and prints the rerun command.

Variants: torch (nn.Module + state_dict, torch.set_num_threads(1)), onnx-fp32 (.onnx file),
onnx-fp32-from-fedge (the device's hot-swap path: a .fedge model message rebuilt into ONNX
without torch), onnx-int8-dynamic, onnx-int8-static. ONNX sessions: 1 intra-op thread.

    python benchmarks/onnx_inference.py            # ~5-10 min on 2 cores
    python benchmarks/onnx_inference.py --quick    # smoke run (~1 min), writes *.quick.*

Top-level imports are stdlib only: the child processes import just what they measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("torch", "onnx-fp32", "onnx-fp32-from-fedge", "onnx-int8-dynamic", "onnx-int8-static")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- child process
def _timed(fn, x, min_iters: int, min_seconds: float, max_iters: int) -> dict:  # noqa: ANN001
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "n": len(times)}


def child(args: argparse.Namespace) -> int:
    """Import one runtime, load one model, predict; print timings as one JSON line."""
    t0 = time.perf_counter()
    import numpy as np  # noqa: PLC0415

    x = np.load(args.inputs)
    if args.runtime == "torch":
        import torch  # noqa: PLC0415

        from fedge.models.nets import MLP, Conv4  # noqa: PLC0415

        torch.set_num_threads(1)
        t_import = time.perf_counter()
        net = {"mlp": MLP, "conv4": Conv4}[args.model_name](tuple(x.shape[1:]), 10)
        net.load_state_dict(torch.load(args.file, weights_only=True))
        net.eval()

        def predict(batch):  # noqa: ANN001, ANN202
            with torch.inference_mode():
                return net(torch.from_numpy(batch)).numpy()
    else:
        from fedge.edge_agent.infer import Predictor  # noqa: PLC0415

        t_import = time.perf_counter()
        pred = Predictor.load(args.file, threads=1)
        predict = pred.logits
    t_load = time.perf_counter()
    first = predict(x[:1])
    t_first = time.perf_counter()
    first_done_wall = time.time()
    assert first.shape == (1, 10)
    for _ in range(3):
        predict(x[:1])
    b1 = _timed(lambda b: predict(b), x[:1], 30, args.seconds, 5000)
    predict(x[:64])
    b64 = _timed(lambda b: predict(b), x[:64], 10, args.seconds, 1000)
    import resource  # noqa: PLC0415

    print("CHILD " + json.dumps({
        "import_s": t_import - t0, "load_s": t_load - t_import, "first_predict_s": t_first - t_load,
        "first_done_wall": first_done_wall, "latency_b1": b1, "latency_b64": b64,
        "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "self_vmhwm_kb": _vmhwm_kb(),
        "torch_loaded": "torch" in sys.modules,
    }), flush=True)
    return 0


def _vmhwm_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def spawn_and_measure(cmd: list[str]) -> dict:
    """Run cmd to completion; its exit code, output, ru_maxrss (os.wait4) and spawn time."""
    import tempfile  # noqa: PLC0415

    env = {**os.environ, **CHILD_ENV}
    # output goes to files, not pipes: the child is reaped with os.wait4 (for its own
    # ru_maxrss) before its output is read, which would deadlock on a full pipe
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        spawned = time.time()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        return {"rc": proc.returncode, "out": out_f.read().decode(), "err": err_f.read().decode(),
                "maxrss_kb": usage.ru_maxrss, "spawned": spawned}


def launcher() -> int:
    """A small process that spawns the measured children.

    Linux keeps the larger of the pre-exec and post-exec peak RSS in ru_maxrss, and a child
    forked from the ~1 GB parent (torch, data) starts as a copy of it. Children forked from
    this ~10 MB launcher instead report their own peak.
    """
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(spawn_and_measure(json.loads(line))), flush=True)
    return 0


class Launcher:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--launcher"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))

    def run(self, cmd: list[str]) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_child(launch: Launcher, runtime: str, model_name: str, file: Path, inputs: Path, seconds: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--runtime", runtime, "--model-name", model_name,
           "--file", str(file), "--inputs", str(inputs), "--seconds", str(seconds)]
    done = launch.run(cmd)
    if done["rc"] != 0:
        raise RuntimeError(f"child {runtime} {model_name} failed ({done['rc']}): {done['err'][-2000:]}")
    line = [ln for ln in done["out"].splitlines() if ln.startswith("CHILD ")][-1]
    res = json.loads(line[len("CHILD "):])
    res["startup_s"] = res.pop("first_done_wall") - done["spawned"]
    # The process's own peak: getrusage(RUSAGE_SELF).ru_maxrss read in the child (KiB on Linux; equals
    # its VmHWM). os.wait4's figure also covers helpers it forked: `import torch` runs `ldconfig -p`
    # from a ~450 MB process, and that fork's inherited peak lands there; kept as a second number.
    res["peak_rss_mb"] = res["self_maxrss_kb"] / 1024
    res["peak_rss_incl_children_mb"] = done["maxrss_kb"] / 1024
    return res


# ----------------------------------------------------------------------------- parent
def machine() -> dict:
    import numpy  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415
    import torch  # noqa: PLC0415

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "numpy": numpy.__version__}


def train(name: str, x, y, epochs: int, seed: int):  # noqa: ANN001, ANN201
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from fedge.models.registry import build_model  # noqa: PLC0415

    torch.manual_seed(seed)
    model = build_model(name, tuple(x.shape[1:]), 10, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if name == "mlp" else 0.02, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def plot(path: Path, results: dict) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    models = list(results["models"])
    panels = [("file size (MB)", lambda v: v["file_bytes"] / 1e6, False),
              ("peak RSS of a predicting process (MB)", lambda v: v["peak_rss_mb"], False),
              ("start-up: spawn to first prediction (s)", lambda v: v["startup_s"], False),
              ("latency, batch 1, 1 thread (ms, median)", lambda v: v["latency_b1"]["median_ms"], True),
              ("latency, batch 64, 1 thread (ms, median)", lambda v: v["latency_b64"]["median_ms"], True),
              ("test accuracy (%)", lambda v: 100 * v["accuracy"] if v.get("accuracy") is not None else np.nan, False)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    width = 0.8 / len(VARIANTS)
    for ax, (title, get, log) in zip(axes.flat, panels):
        for i, variant in enumerate(VARIANTS):
            vals = [get(results["models"][m]["variants"][variant]) for m in models]
            bars = ax.bar(np.arange(len(models)) + (i - (len(VARIANTS) - 1) / 2) * width, vals, width, label=variant)
            for bar, v in zip(bars, vals):
                if np.isfinite(v):
                    ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(np.arange(len(models)), models)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        if title.startswith("test accuracy"):
            finite = [get(results["models"][m]["variants"][v]) for m in models for v in VARIANTS]
            lo = np.nanmin(finite)
            ax.set_ylim(max(0, lo - 5), 100)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"fedge on-device inference: ONNX Runtime vs torch ({results['machine']['cpu']}, "
                 f"{results['machine']['cpus']} cores)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_parent(args: argparse.Namespace, argv: list[str]) -> int:
    launch = Launcher()  # first, while this process is still small
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from fedge.models.data import DataError, load_dataset, synthetic  # noqa: PLC0415
    from fedge.models.export import export_onnx, quantize_int8, torch_logits  # noqa: PLC0415
    from fedge.models.registry import get_state  # noqa: PLC0415
    from fedge.models.wire.messages import build_model_message  # noqa: PLC0415

    weights = dict(w.split("=", 1) for w in args.weights)
    rerun = "cd " + shlex.quote(str(ROOT)) + " && " + shlex.join([sys.executable, "benchmarks/onnx_inference.py", *argv])
    torch.set_num_threads(os.cpu_count() or 1)
    load_start = os.getloadavg()
    try:
        ds = load_dataset("fashion-mnist", args.data_root)
    except DataError as exc:
        print(f"Fashion-MNIST not available ({exc}); using the synthetic set", file=sys.stderr)
        ds = synthetic(20000, 5000)
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    # model files live in a scratch folder (sizes go to the JSON; ~25 MB of binaries stay out of git)
    work = Path(args.keep_files) if args.keep_files else Path(tempfile.mkdtemp(prefix="fedge-onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "inputs.npy"
    np.save(inputs, ds.test.x[:64])
    n_eval = min(args.eval_images, len(ds.test))
    ex, ey = ds.test.x[:n_eval], ds.test.y[:n_eval]
    results: dict = {"benchmark": "onnx_inference", "dataset": ds.name, "machine": machine(), "command": rerun,
                     "config": vars(args), "models": {}}
    for name in args.models.split(","):
        if name not in ("mlp", "conv4"):
            raise SystemExit(f"--models: {name!r} is not benchmarked yet (mlp, conv4; MPT variants: see docs/inference.md)")
        n_train = args.mlp_train if name == "mlp" else args.conv4_train
        t = time.time()
        if name in weights:  # a real run's model instead of the quick training below
            from fedge.models.export import load_source  # noqa: PLC0415
            from fedge.models.registry import build_model, set_state  # noqa: PLC0415

            spec, tensors, shape, classes, _ = load_source(weights[name])
            if spec.name != name or tuple(shape) != ds.in_shape:
                raise SystemExit(f"--weights {name}={weights[name]} holds {spec} for input {shape}")
            model = build_model(spec, shape, classes)
            set_state(model, tensors)
            model.eval()
            n_train = 0
        else:
            model = train(name, ds.train.x[:n_train], ds.train.y[:n_train], args.epochs, args.seed)
        train_s = time.time() - t
        files = {
            "torch": work / f"{name}.pt",
            "onnx-fp32": work / f"{name}.onnx",
            "onnx-fp32-from-fedge": work / f"{name}.fedge",
            "onnx-int8-dynamic": work / f"{name}.int8-dynamic.onnx",
            "onnx-int8-static": work / f"{name}.int8-static.onnx",
        }
        torch.save(model.state_dict(), files["torch"])
        export_onnx(model, files["onnx-fp32"], ds.in_shape, meta={"model": name})
        files["onnx-fp32-from-fedge"].write_bytes(build_model_message(
            "bench", "bench", 1, name, get_state(model), meta={"in_shape": list(ds.in_shape), "num_classes": 10}))
        quantize_int8(files["onnx-fp32"], files["onnx-int8-dynamic"], "dynamic")
        calib = ds.train.x[len(ds.train) - args.calib_images :]  # not among the training images used above
        quantize_int8(files["onnx-fp32"], files["onnx-int8-static"], "static", calibration=calib)

        from fedge.edge_agent.infer import Predictor  # noqa: PLC0415

        ref = torch_logits(model, ex)
        entry: dict = {"weights": weights.get(name), "train_images": n_train, "epochs": args.epochs, "train_s": train_s,
                       "eval_images": n_eval,
                       "variants": {}}
        for variant in VARIANTS:
            if variant == "torch":
                logits = ref
            else:
                logits = Predictor.load(files[variant], threads=os.cpu_count() or 1).logits(ex, batch_size=500)
            acc = float((logits.argmax(1) == ey).mean())
            entry["variants"][variant] = {
                "file": files[variant].name, "file_bytes": files[variant].stat().st_size,
                "accuracy": acc, "max_abs_diff_vs_torch": float(np.abs(logits - ref).max()),
                "class_agreement_vs_torch": float((logits.argmax(1) == ref.argmax(1)).mean()),
            }
        for _rep in range(args.repeats):
            for variant in VARIANTS:
                runtime = "torch" if variant == "torch" else "onnx"
                res = run_child(launch, runtime, name, files[variant], inputs, args.seconds)
                v = entry["variants"][variant]
                v.setdefault("runs", []).append(res)
        for variant in VARIANTS:
            v = entry["variants"][variant]
            best = min(v["runs"], key=lambda r: r["startup_s"])
            for key in ("startup_s", "import_s", "load_s", "first_predict_s"):
                v[key] = min(r[key] for r in v["runs"])
            v["peak_rss_mb"] = min(r["peak_rss_mb"] for r in v["runs"])
            v["peak_rss_incl_children_mb"] = min(r["peak_rss_incl_children_mb"] for r in v["runs"])
            v["latency_b1"] = min((r["latency_b1"] for r in v["runs"]), key=lambda d: d["median_ms"])
            v["latency_b64"] = min((r["latency_b64"] for r in v["runs"]), key=lambda d: d["median_ms"])
            v["torch_loaded"] = best["torch_loaded"]
            v["accuracy_cost_vs_torch"] = entry["variants"]["torch"]["accuracy"] - v["accuracy"]
        results["models"][name] = entry
        print(f"{name}: weights from {weights[name]}" if name in weights else
              f"{name}: trained on {n_train} images in {train_s:.0f}s", flush=True)
        for variant in VARIANTS:
            v = entry["variants"][variant]
            print(f"  {variant:22s} {v['file_bytes'] / 1e6:7.2f} MB  acc {100 * v['accuracy']:6.2f}%  "
                  f"RSS {v['peak_rss_mb']:6.0f} MB  start-up {v['startup_s']:5.2f} s  "
                  f"b1 {v['latency_b1']['median_ms']:8.3f} ms  b64 {v['latency_b64']['median_ms']:8.2f} ms", flush=True)
    launch.close()
    results["load_average"] = {"start": load_start, "end": os.getloadavg()}
    if not args.keep_files:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "onnx_inference.quick" if args.quick else "onnx_inference"  # a smoke run keeps the real results
    out_json = RESULTS / f"{stem}.json"
    out_json.write_text(json.dumps(results, indent=1))
    plot(RESULTS / f"{stem}.png", results)
    print(f"wrote {out_json.relative_to(ROOT)} and benchmarks/results/{stem}.png")
    print(f"rerun: {rerun}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,conv4")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST idx folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--mlp-train", type=int, default=60000, help="training images for the MLP (default all 60000)")
    p.add_argument("--conv4-train", type=int, default=6000, help="training images for Conv-4 (default 6000: 2-core budget)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval-images", type=int, default=10000, help="test images for accuracy (default all 10000)")
    p.add_argument("--calib-images", type=int, default=512, help="static int8 calibration images (from the train split tail)")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timing window per latency measurement")
    p.add_argument("--repeats", type=int, default=2, help="subprocess runs per variant; the best is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", action="append", default=[], metavar="MODEL=RUN_OR_FEDGE",
                   help="use a run's final model (run folder or .fedge) instead of training, e.g. conv4=runs/<id>")
    p.add_argument("--keep-files", default=None, help="write the model files to this folder and keep them")
    p.add_argument("--quick", action="store_true", help="smoke run: small training and eval sets, 1 repeat")
    # child mode (internal)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launcher", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runtime", help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.launcher:
        return launcher()
    if args.quick:
        args.mlp_train, args.conv4_train, args.eval_images, args.repeats, args.seconds = 5000, 1000, 1000, 1, 0.5
    return main_parent(args, argv)


if __name__ == "__main__":
    sys.exit(main())
