"""Command-line entry points for ONNX export and torch-free on-device inference.

fedge/cli.py registers them:

    add_export_parser(top_level_subparsers)     # fedge export RUN_OR_MODEL --out model.onnx
    agent_sub = ...                             # the `fedge agent` group's subparsers
    add_predict_parser(agent_sub)               # fedge agent predict --model m.onnx x.npy ...
    add_serve_parser(agent_sub)                 # fedge agent serve --broker URL --fleet F

Each sets `func(args) -> int`. Standalone: `python -m fedge.cli.infer {export,predict,serve} ...`.
Importing this module imports neither torch nor onnxruntime; predict/serve never import
torch, export does (lazily).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedge.cli.common import MODEL_OPTION_HELP, add_broker_args, broker_from_args, model_spec_from_args
from fedge.models.errors import FedgeError


def _labels(value: str | None) -> list[str] | None:
    if not value or value == "none":
        return None
    if value == "fashion-mnist":
        from fedge.edge_agent.infer import FASHION_LABELS  # noqa: PLC0415

        return list(FASHION_LABELS)
    return [s.strip() for s in value.split(",")]


def _verifier(path: str | None):  # noqa: ANN202
    """hub_ed25519.pub (or the keys folder holding it) -> signature verifier; None without."""
    if not path:
        return None
    from fedge.models.wire.keys import hub_verifier  # noqa: PLC0415 - torch-free; imports cryptography

    return hub_verifier(path)


def _add_common_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--labels", default=None,
                   help="class names: 'fashion-mnist' or a comma-separated list (default: class numbers only)")
    p.add_argument("--hub-public-key", metavar="FILE", dest="hub_public_key", default=None,
                   help="the hub's public key (hub_ed25519.pub, or the keys folder), as for `fedge agent`: "
                        ".fedge models and followed models must carry its signature")
    p.add_argument("--hub-key", dest="hub_public_key", help=argparse.SUPPRESS)  # the old spelling


# ----------------------------------------------------------------------------- predict
def _floats(text: str) -> tuple[float, ...]:
    """'0.5' or '0.48,0.46,0.41' (one per channel)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas, e.g. 0.5 or 0.48,0.46,0.41") from None


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="classify (or segment) .npy arrays or images with an ONNX model (no torch needed)",
        description="Classify inputs with ONNX Runtime (a segmentation model prints each input's share of positive "
                    "pixels, and its mask with --json). --model takes an .onnx file or a fedge model "
                    "message (.fedge, e.g. runs/<id>/final_model.fedge; MPT and BNN models too), whose graph "
                    "template is filled without torch. "
                    "Inputs: .npy float32 arrays shaped like the model input or a batch [N, C, H, W] "
                    "(already normalised), .npy uint8 pixels, or images (.png, .jpg; needs Pillow), which are "
                    "scaled to [0,1] and normalised with --mean/--std.",
    )
    p.add_argument("--model", required=True, help=".onnx file or .fedge model message")
    p.add_argument("inputs", nargs="+", help=".npy arrays and/or image files")
    p.add_argument("--mean", type=_floats, default=None,
                   help="normalisation mean for pixels: one value for every channel or one per channel, comma-separated "
                        "(default: Fashion-MNIST 0.2860)")
    p.add_argument("--std", type=_floats, default=None,
                   help="normalisation std for pixels, like --mean (default: Fashion-MNIST 0.3530)")
    p.add_argument("--json", action="store_true", help="print one JSON object per input instead of a table")
    _add_common_infer(p)
    p.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    from fedge.edge_agent.infer import FASHION_MEAN, FASHION_STD, Predictor, load_inputs  # noqa: PLC0415

    labels = _labels(args.labels)
    try:
        predictor = Predictor.load(args.model, threads=args.threads, verifier=_verifier(args.hub_public_key))
        x, names = load_inputs(args.inputs, predictor.in_shape,
                               FASHION_MEAN if args.mean is None else args.mean, FASHION_STD if args.std is None else args.std)
        pred = predictor.predict(x)
    except (FedgeError, OSError) as exc:
        print(f"fedge agent predict: error: {exc}", file=sys.stderr)
        return 2
    if pred.mask is not None:  # segmentation: the share of positive pixels per input (the mask itself with --json)
        for name, mask, share, conf in zip(names, pred.mask, pred.positive_fraction.tolist(), pred.confidence.tolist()):
            if args.json:
                print(json.dumps({"input": name, "positive_fraction": round(share, 6), "confidence": round(conf, 6),
                                  "mask": mask.astype(int).tolist()}))
            else:
                print(f"{name}\t{share:.4f}\t{conf:.4f}")
        return 0
    for name, cls, conf in zip(names, pred.classes.tolist(), pred.confidence.tolist()):
        label = labels[cls] if labels and cls < len(labels) else None
        if args.json:
            print(json.dumps({"input": name, "class": cls, "label": label, "confidence": round(conf, 6)}))
        else:
            print(f"{name}\t{cls}\t{conf:.4f}" + (f"\t{label}" if label else ""))
    return 0


# ----------------------------------------------------------------------------- serve
def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve predictions over local HTTP, swapping in each new global model from the hub",
        description="Long-running inference: loads --model (if given), subscribes to the fleet's model topic "
                    "(if --broker is given) and swaps in every new global model, rebuilt as ONNX without torch. "
                    "HTTP on --host:--port: GET /health, GET /model, POST /predict with JSON "
                    '{"inputs": [...]} or a raw .npy body (Content-Type: application/x-npy).',
    )
    p.add_argument("--model", default=None, help="initial .onnx or .fedge model (optional with --broker)")
    # the same broker flags as `fedge hub` and `fedge agent`; --broker only from the command line here, and
    # --fleet (no default) names the fleet whose global model is followed
    add_broker_args(p, required=False, env=False, fleet_default=None)
    p.add_argument("--prefix", dest="topic_prefix", help=argparse.SUPPRESS)  # the old spelling of --topic-prefix
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1: local clients only)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8765; 0 = any free port)")
    p.add_argument("--save", default=None,
                   help="write every swapped-in model to this .onnx path (atomically) and start from it next time")
    p.add_argument("--seen-file", default=None,
                   help="where the newest accepted (run epoch, run, version) is kept so a replayed older model "
                        "is refused after a restart (default: fedge-serve-seen-FLEET.json next to --save, "
                        "else next to --hub-public-key; neither: kept in memory only)")
    _add_common_infer(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from fedge.edge_agent.infer import DEFAULT_PORT, LiveModel, ModelFollower, Predictor, make_server  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from fedge.models.wire.keys import KeyFileError  # noqa: PLC0415 - torch-free

    try:
        verifier = _verifier(args.hub_public_key)
    except KeyFileError as exc:
        print(f"fedge agent serve: error: {exc}", file=sys.stderr)
        return 2
    if not args.model and not args.broker:
        print("fedge agent serve: error: give --model, --broker (with --fleet), or both", file=sys.stderr)
        return 2
    if args.broker and not args.fleet:
        print("fedge agent serve: error: --broker needs --fleet", file=sys.stderr)
        return 2
    live = LiveModel()
    initial = args.model or (args.save if args.save and Path(args.save).is_file() else None)
    if initial:
        try:
            live.swap(Predictor.load(initial, threads=args.threads, verifier=verifier))
        except (FedgeError, OSError) as exc:
            print(f"fedge agent serve: error: {exc}", file=sys.stderr)
            return 2
    follower = None
    if args.broker:
        from fedge.models.wire.freshness import default_guard_path  # noqa: PLC0415 - torch-free

        beside = args.save or args.hub_public_key
        seen = args.seen_file or (default_guard_path(beside, "serve", args.fleet) if beside else None)
        try:
            follower = ModelFollower(live, fleet=args.fleet, verifier=verifier, threads=args.threads,
                                     save_to=args.save, guard_file=seen)
        except ValueError as exc:
            print(f"fedge agent serve: error: {exc}", file=sys.stderr)
            return 2
        try:
            follower.connect(broker_from_args(args), prefix=args.topic_prefix)
        except (FedgeError, OSError) as exc:  # OSError includes ConnectionError
            print(f"fedge agent serve: error: {exc}", file=sys.stderr)
            return 2
    port = DEFAULT_PORT if args.port is None else args.port
    try:
        server = make_server(live, args.host, port, follower=follower, labels=_labels(args.labels))
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"fedge agent serve: error: cannot listen on {args.host}:{port}: {exc.strerror or exc}"
              f"{'; another program (another serve?) uses it: pick one with --port' if exc.errno == errno.EADDRINUSE else ''}",
              file=sys.stderr)
        if follower is not None:
            follower.stop()
        return 2
    host, port = server.server_address[:2]
    current = live.peek()
    model = f"{current.spec or 'an unnamed model'}" if current is not None else "no model until the hub sends one"
    print(f"serving predictions on http://{host}:{port} (GET /health, POST /predict) with {model}; Ctrl-C stops", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:  # noqa: ARG001
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if follower is not None:
            follower.stop()
    return 0


# ----------------------------------------------------------------------------- export
def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected e.g. 1,28,28") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"shape {text!r}: dimensions must be positive")
    return dims


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export a run's final model (or a model) to ONNX, optionally int8",
        description="Export to ONNX (dynamic batch axis, opset 17), check it with onnx.checker and against torch. "
                    "RUN_OR_MODEL: a run folder (uses final_model.fedge or its newest checkpoint), a run id under "
                    "--runs-dir, a .fedge model message, or a registry model name (fresh seeded weights) with "
                    "its --model-option flags.",
    )
    p.add_argument("source", metavar="RUN_OR_MODEL")
    p.add_argument("--model-option", action="append", metavar="NAME=VALUE", help=MODEL_OPTION_HELP)
    p.add_argument("--out", default=None, help="output .onnx (default: next to the source, or ./<model>.onnx)")
    p.add_argument("--runs-dir", default="runs", help="where run ids are looked up (default runs)")
    p.add_argument("--int8", choices=("dynamic", "static"), default=None,
                   help="also write <out>.int8.onnx: dynamic (weights only, no data) or static (calibrated)")
    p.add_argument("--calib", default="fashion-mnist",
                   help="static int8 calibration inputs: fashion-mnist, synthetic, or a .npy batch (default fashion-mnist)")
    p.add_argument("--calib-size", type=int, default=512, help="calibration samples (default 512)")
    p.add_argument("--data-root", default=None, help="dataset folder for --calib fashion-mnist")
    p.add_argument("--builder", choices=("torch", "graph"), default="torch",
                   help="torch: torch.onnx legacy exporter (default); graph: fill the model's shipped graph "
                        "template without torch, as a device does")
    p.add_argument("--in-shape", type=_shape, default=(1, 28, 28), help="input shape for a model name (default 1,28,28)")
    p.add_argument("--num-classes", type=int, default=10, help="classes for a model name (default 10)")
    p.add_argument("--seed", type=int, default=0, help="init seed for a model name (default 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_export)
    return p


def _calibration(args: argparse.Namespace, n: int):  # noqa: ANN202
    import numpy as np  # noqa: PLC0415

    from fedge.models.data import DataError, load_dataset  # noqa: PLC0415

    if args.calib.endswith(".npy"):
        try:
            return np.load(args.calib, allow_pickle=False).astype(np.float32)[:n]
        except ValueError as exc:
            raise DataError(f"--calib {args.calib}: not a numeric .npy array ({exc})") from None

    ds = load_dataset(args.calib, args.data_root, download=False)
    return ds.train.x[:n]


def _export_source(args: argparse.Namespace) -> Any:
    """RUN_OR_MODEL as export() takes it: a run or file path as given, a model name with its
    --model-option flags (or the old NAME@RATIO shorthand) as a ModelSpec."""
    from fedge.models.errors import ConfigError  # noqa: PLC0415

    on_disk = Path(args.source).exists() or (Path(args.runs_dir) / args.source).is_dir()
    if on_disk:
        if args.model_option:
            raise ConfigError(f"--model-option sets an option of a model name, not of the run or file {args.source}")
        return args.source
    return model_spec_from_args(args.source, args.model_option) if "@" in args.source or args.model_option \
        else args.source


def cmd_export(args: argparse.Namespace) -> int:
    from fedge.models.export import export, summary_json  # noqa: PLC0415

    try:
        calib = _calibration(args, args.calib_size) if args.int8 == "static" else None
        summary = export(_export_source(args), out=args.out, runs_dir=args.runs_dir, int8=args.int8, calibration=calib,
                         builder=args.builder, in_shape=tuple(args.in_shape), num_classes=args.num_classes, seed=args.seed)
    except (FedgeError, OSError) as exc:
        print(f"fedge export: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(summary_json(summary))
    else:
        print(f"wrote {summary['onnx']} ({summary['bytes'] / 1024:.0f} KiB, {summary['model']}, input "
              f"[batch, {', '.join(map(str, summary['in_shape']))}]); onnx.checker ok; "
              f"max |torch - onnxruntime| = {summary['max_abs_diff']:.2e}")
        if "int8" in summary:
            print(f"wrote {summary['int8']} ({summary['int8_bytes'] / 1024:.0f} KiB, int8 {summary['int8_method']})")
    return 0


# ----------------------------------------------------------------------------- standalone
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedge.cli.infer",
                                     description="fedge ONNX export and torch-free inference")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    add_predict_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
