"""`fedge agent`: run this machine as a fleet device."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import zipfile
from pathlib import Path

import numpy as np

from fedge.cli.common import add_broker_args, add_logging_args, broker_from_args, setup_logging, stop_event_on_signals
from fedge.models.errors import ConfigError

log = logging.getLogger("fedge.agent")


def load_local_data(spec: str, num_classes: int = 10):  # noqa: ANN201 - returns models.data.Split
    """--data: a .npz written by `fedge partition` (x, y), an idx folder, or 'synthetic'; checked
    here, at start, so bad data stops the agent with a message instead of failing every round."""
    from fedge.models.data import DataError, Split, load_idx_dataset, synthetic  # noqa: PLC0415

    if spec == "synthetic":
        log.warning("--data synthetic: training on generated data (a demo, never for a real fleet)")
        return synthetic(n_train=1000, num_classes=num_classes).train
    path = Path(spec)
    if path.is_dir():
        data = load_idx_dataset(path).train
        check_examples(spec, data.x, data.y, num_classes)
        return data
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or folder")
    if path.suffix != ".npz":
        raise DataError(f"--data {spec}: expected a .npz file from `fedge partition`, an idx folder or 'synthetic'")
    if not zipfile.is_zipfile(path):  # numpy would guess a pickle and suggest allow_pickle
        with path.open("rb") as f:
            head = f.read(16)
        raise DataError(f"--data {spec}: not a readable .npz (a .npz is a zip of arrays x and y, as `fedge partition` "
                        f"writes with numpy.savez; this file starts with {head!r})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
            arrays = {k: npz[k] for k in ("x", "y") if k in found}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:  # a truncated or foreign file
        raise DataError(f"--data {spec}: not a readable .npz from `fedge partition` ({exc})") from None
    missing = {"x", "y"} - set(arrays)
    if missing:
        raise DataError(f"--data {spec}: missing arrays {sorted(missing)} (found {found})")
    if arrays["x"].dtype.kind not in "fiu" or arrays["y"].dtype.kind not in "iu":
        raise DataError(f"--data {spec}: x must hold numbers and y integer labels, got {arrays['x'].dtype} and "
                        f"{arrays['y'].dtype}")
    x, y = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) != len(y) or len(y) == 0:
        raise DataError(f"--data {spec}: x must be [N,C,H,W] (or [N,H,W]) with one label per image, got {x.shape}, {y.shape}")
    check_examples(spec, x, y, num_classes)
    return Split(x, y)


def check_examples(spec: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """Refuse data no round can train on: labels outside the task, NaN/Inf values, and images
    stored channels-last ([N, H, W, C]; every model takes [N, C, H, W])."""
    from fedge.models.data import DataError  # noqa: PLC0415

    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"--data {spec}: labels must be in [0, {num_classes}), found {y.min()}..{y.max()}")
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise DataError(f"--data {spec}: x holds {bad} NaN or Inf value(s) (first in example "
                        f"{int(np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))[0])}); "
                        f"training on them makes every update NaN")
    c, h, w = x.shape[1:]
    if w in (1, 3) and c not in (1, 3) and c == h:
        raise DataError(f"--data {spec}: x is {list(x.shape)}, which looks channels-last ([N, H, W, C] with {w} "
                        f"channel(s)); fedge wants [N, C, H, W]: save x.transpose(0, 3, 1, 2)")


def default_device_id() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "device"


def default_private_path(data: str, fleet: str, device_id: str) -> Path | None:
    """--private-state's default: beside the local data (in it, for an idx folder); None for synthetic data."""
    path = Path(data)
    if not path.exists():
        return None
    return (path if path.is_dir() else path.parent) / f"fedge-agent-private-{fleet}-{device_id}.npz"


def add_agent_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "agent",
        help="run this machine as a device: train on local data when the hub asks",
        description="Connect to the fleet's MQTT broker, announce this device (profile, dataset size), "
                    "train on local data whenever the hub selects it, and publish one update per round "
                    "(QoS 1). Reconnects with backoff; SIGINT/SIGTERM shut it down cleanly.",
        epilog="example: fedge agent --broker mqtt://hub.local --profile rpi4 --data parts/dev003.npz",
    )
    add_broker_args(parser, required=False)
    parser.add_argument("--profile", default="rpi4", help="built-in profile name or a YAML file (default: %(default)s)")
    parser.add_argument("--data", metavar="FILE",
                        help="local training data (required): a .npz from `fedge partition` (x [N,C,H,W] float32, "
                             "y int labels), an idx folder, or 'synthetic' for generated demo data")
    parser.add_argument("--num-classes", type=int, default=10, help="label count of the fleet's task")
    parser.add_argument("--device-id", default=default_device_id(), help="this device's id (default: hostname)")
    parser.add_argument("--seed", type=int, default=0, help="base seed for local shuffling")
    parser.add_argument("--once", action="store_true", help="exit when the hub announces the run finished")
    parser.add_argument("--hub-public-key", metavar="FILE",
                        help="hub_ed25519.pub from `fedge keys init`: accept only models and tasks the hub signed. "
                             "WITHOUT IT the agent trains any model and task that anyone with write access to "
                             "the broker's model/round topics publishes (it logs a warning at start)")
    parser.add_argument("--device-key", metavar="FILE",
                        help="this device's key from `fedge keys enroll` (devices/<id>.key): tag every update")
    parser.add_argument("--seen-file", metavar="FILE",
                        help="where the newest accepted (run epoch, run, model version) is kept, so replays of "
                             "earlier runs are refused after a restart (default: fedge-agent-seen-FLEET.json "
                             "next to --data, else --device-key, else --hub-public-key; none: memory only)")
    parser.add_argument("--private-state", metavar="FILE",
                        help="where this device keeps its private tensors (a model's per-device head, which never "
                             "leaves it), so they survive a restart (default: fedge-agent-private-FLEET-DEVICE.npz "
                             "next to --data when it is a file or folder; else memory only)")
    add_logging_args(parser)
    parser.set_defaults(func=run_agent)
    return parser


def run_agent(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from fedge.edge_agent.agent import Agent  # noqa: PLC0415
    from fedge.edge_agent.pool import TrainingPool  # noqa: PLC0415
    from fedge.edge_agent.profile import load_profile  # noqa: PLC0415
    from fedge.models.wire import Topics  # noqa: PLC0415

    setup_logging(args)
    if not args.broker:
        raise ConfigError("--broker (or FEDGE_BROKER) is required, e.g. --broker mqtt://hub.local:1883")
    if not args.data:  # never a silent default: a real device must not join a fleet with generated data
        raise ConfigError("--data is required: the .npz from `fedge partition` (or your own x/y .npz, or an idx "
                          "folder) this device trains on; --data synthetic trains on generated data for a demo")
    profile = load_profile(args.profile)
    torch.set_num_threads(min(profile.threads, os.cpu_count() or 1))
    data = load_local_data(args.data, args.num_classes)
    stop = stop_event_on_signals()
    pool = TrainingPool(workers=1, device=profile.device)
    from fedge.models.wire.keys import hub_verifier, read_device_key  # noqa: PLC0415

    verifier = hub_verifier(args.hub_public_key) if args.hub_public_key else None
    device_key = read_device_key(args.device_key) if args.device_key else None
    from fedge.models.wire.freshness import RunGuard, default_guard_path  # noqa: PLC0415

    beside = (args.data if Path(args.data).exists() else None) or args.device_key or args.hub_public_key
    seen = args.seen_file or (default_guard_path(beside, "agent", args.fleet) if beside else None)
    log.info("newest accepted run kept in %s", seen or "memory only (replays of earlier runs are refused until a restart)")
    private = args.private_state or default_private_path(args.data, args.fleet, args.device_id)
    log.info("private tensors (if the model has any) kept in %s", private or "memory only (lost at a restart)")
    agent = Agent(args.device_id, profile, broker_from_args(args), Topics(args.fleet, args.topic_prefix), data,
                  args.num_classes, pool, seed=args.seed, hub_verifier=verifier, device_key=device_key,
                  guard=RunGuard(args.fleet, seen), private_state=private)
    agent.start()
    log.info("device %s online with %d samples (profile %s); waiting for round tasks", args.device_id, len(data), profile.name)
    try:
        while not stop.wait(0.5):
            if args.once and agent.finished.is_set():
                log.info("hub announced the run finished")
                break
    finally:
        agent.stop()
        pool.close()
    log.info("trained %d round(s); sent %d bytes, received %d bytes", agent.rounds_trained, agent.bytes_up, agent.bytes_down)
    return 0
