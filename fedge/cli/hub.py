"""`fedge hub`, `fedge fleet` and `fedge partition`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedge.cli.common import (
    MODEL_OPTION_HELP,
    add_broker_args,
    add_logging_args,
    broker_from_args,
    model_spec_from_args,
    setup_logging,
    stop_event_on_signals,
)
from fedge.cli.status import add_status_args, status_server
from fedge.hub.config import HubConfig
from fedge.hub.plan import parse_plan
from fedge.hub.strategies import STRATEGIES
from fedge.hub.task_kinds import TASK_KINDS
from fedge.models.data import DATASETS, DEFAULT_FASHION_ROOT
from fedge.models.errors import ConfigError, FedgeError
from fedge.models.partition import PARTITIONERS, PartitionSpec
from fedge.models.wire.codecs import ALL_CODECS, MODEL_CODECS

log = logging.getLogger("fedge")
HUB_DEFAULTS = HubConfig()
# strategy options with a command-line flag (--server-lr -> server_lr): the constructor parameter names
STRATEGY_OPTION_FLAGS = ("server_lr", "server_momentum", "proximal_mu", "trim_fraction", "byzantine", "prior", "posterior",
                         "prob_clip", "posterior_decay")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_round_args(parser: argparse.ArgumentParser,
                    title: str = "rounds (defaults come from the recipe, else fedge's defaults)") -> None:
    g = parser.add_argument_group(title)
    g.add_argument("--model", help="registered model name (mlp, conv4, conv4-mpt, ...; `fedge models` lists them)")
    g.add_argument("--model-option", action="append", metavar="NAME=VALUE", help=MODEL_OPTION_HELP)
    g.add_argument("--rounds", type=_positive_int, help="maximum number of rounds (at least 1)")
    g.add_argument("--plan", metavar="KIND:ROUNDS,...",
                   help="the run as stages, in order, instead of --rounds: e.g. train:20,evaluate:1 trains 20 rounds, "
                        "then every selected device evaluates the final model on its own data and reports the model "
                        "family's metrics, e.g. loss and accuracy (no tensors sent; the run store records each device's "
                        "and the sample-weighted mean). Kinds: " + ", ".join(TASK_KINDS) + ". Stop rules (--target, "
                        "--min-weight-change) end "
                        "a train stage early; --resume continues at the stage where the run stopped")
    g.add_argument("--clients-per-round", type=int, help="devices selected per round (0 = all online)")
    g.add_argument("--deadline", type=float, help="seconds a round waits for stragglers")
    g.add_argument("--quorum", type=float, help="fraction of selected devices whose updates close a round early")
    g.add_argument("--min-updates", type=int, help="fewest updates to aggregate; fewer re-runs the round")
    g.add_argument("--target", "--target-accuracy", dest="target_score", type=float, metavar="SCORE",
                   help="stop once the global model's headline test metric reaches this (0-1): the model family's, "
                        "accuracy for classification, f1 for segmentation, probe_accuracy for contrastive "
                        "(--target-accuracy: the old name)")
    g.add_argument("--min-weight-change", type=float, help="stop once the relative weight change falls below this")
    g.add_argument("--strategy", choices=list(STRATEGIES), metavar="NAME",
                   help=f"aggregation rule: {', '.join(STRATEGIES)} (default fedavg); the options below "
                        "set its parameters")
    s = parser.add_argument_group("strategy options (only for the strategies named; others refuse them)")
    s.add_argument("--server-lr", type=float, metavar="ETA",
                   help="fedavgm, fedadam: server learning rate on the round's pseudo-gradient "
                        "(default 1.0 for fedavgm, 0.01 for fedadam)")
    s.add_argument("--server-momentum", type=float, metavar="BETA",
                   help="fedavgm: server momentum in [0, 1) (default 0.9; 0 with --server-lr 1 is FedAvg)")
    s.add_argument("--proximal-mu", type=float, metavar="MU",
                   help="fedprox: weight of the proximal term mu/2 ||w - w_global||^2 in each device's local "
                        "loss, sent in the task (default 0.01; 0 trains as FedAvg)")
    s.add_argument("--trim-fraction", type=float, metavar="F",
                   help="trimmed-mean: share of the largest and of the smallest values dropped per weight "
                        "(default 0.1)")
    s.add_argument("--byzantine", type=int, metavar="F",
                   help="krum, multi-krum: devices that may lie (Krum's f; default 1)")
    s.add_argument("--prior", type=float, metavar="A0",
                   help="fedpm: the Beta(A0, A0) prior of each weight's keep-probability (default 1, uniform)")
    s.add_argument("--posterior", choices=("reset", "accumulate"),
                   help="fedpm: start each round's posterior from the prior (reset, default) or keep the counts")
    s.add_argument("--posterior-decay", type=float, metavar="G",
                   help="fedpm with --posterior accumulate: old counts are multiplied by G each round (default 1)")
    s.add_argument("--prob-clip", type=float, metavar="EPS",
                   help="fedpm: keep-probabilities sent down are clipped to [EPS, 1 - EPS] (default 0.01)")
    g.add_argument("--lr", type=float, help="local learning rate sent with each task")
    g.add_argument("--epochs", type=int, help="local epochs per round")
    g.add_argument("--batch-size", type=int, help="local batch size (capped by each device's profile)")
    g.add_argument("--update-codec", choices=list(ALL_CODECS), help="codec devices use for updates")
    g.add_argument("--model-codec", choices=list(MODEL_CODECS),
                   help="codec of the model the hub sends each round: fp32 (default), fp16 (half the downlink "
                        "bytes), q8, q6 or q4 (8, 6 or 4 bits per weight plus a float32 offset and scale per block of "
                        "256: 8.25, 6.25, 4.25 bits per weight); the hub keeps and checkpoints the exact fp32 "
                        "model and adds the rounding back to the devices' updates")
    g.add_argument("--eval-size", type=int, help="test images evaluated each round (0 = all)")
    g.add_argument("--max-samples", type=_positive_int, metavar="N",
                   help="most training examples one update may claim (its FedAvg weight); an update claiming "
                        "more, or more than its device announced when it joined, is rejected and stored "
                        f"(default {HUB_DEFAULTS.max_samples})")
    g.add_argument("--seed", type=int, help="seed of model init, selection and partitions")


def _apply_round_args(cfg, args: argparse.Namespace) -> None:  # noqa: ANN001 - HubConfig
    if getattr(args, "model", None) or getattr(args, "model_option", None):
        cfg.model = model_spec_from_args(args.model or cfg.model, args.model_option)
    mapping = {"rounds": "rounds", "clients_per_round": "clients_per_round",
               "deadline": "deadline_s", "quorum": "quorum", "min_updates": "min_updates",
               "target_score": "target_score", "min_weight_change": "min_weight_change",
               "strategy": "strategy", "update_codec": "update_codec", "model_codec": "model_codec",
               "eval_size": "eval_size", "seed": "seed", "max_samples": "max_samples"}
    for arg, attr in mapping.items():
        value = getattr(args, arg, None)
        if value is not None:
            setattr(cfg, attr, value)
    if getattr(args, "plan", None):
        if getattr(args, "rounds", None) is not None:
            raise ConfigError(f"give --rounds or --plan, not both: the plan {args.plan!r} names each stage's rounds")
        cfg.plan = parse_plan(args.plan)
    for key in STRATEGY_OPTION_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            cfg.strategy_options = {**cfg.strategy_options, key: value}
    for arg, key in (("lr", "lr"), ("epochs", "epochs"), ("batch_size", "batch_size")):
        value = getattr(args, arg, None)
        if value is not None:
            cfg.train = {**cfg.train, key: value}
    cfg.check()  # a bad strategy option or codec fails here, naming the flag's setting, before anything starts


def _ints(flag: str, text: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers from the command line."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected whole numbers separated by commas, e.g. 100,200") from None


def _apply_partition_args(spec: PartitionSpec, args: argparse.Namespace) -> PartitionSpec:
    """Partition flags given on the command line override `spec` (`--sizes` implies kind sizes);
    shared by `fedge fleet` and `fedge partition` so both read the flags the same way."""
    for arg, attr in (("partition", "kind"), ("per_device", "per_device"), ("dominant_fraction", "dominant_fraction"),
                      ("classes_per_device", "classes_per_device"), ("images_per_class", "images_per_class"),
                      ("alpha", "alpha")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(spec, attr, value)
    if getattr(args, "sizes", None):
        spec.kind = "sizes"
        spec.sizes = list(_ints("--sizes", args.sizes))
    return spec


# ----------------------------------------------------------------------------- hub
def add_hub_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "hub", help="run the server: rounds, aggregation, persistence, evaluation",
        description="Track online devices, run rounds (select, deadline, quorum, stop rule), aggregate, "
                    "evaluate on a server test set, and persist every round in runs/<id>/ "
                    "(SQLite + checkpoints) so `--resume` continues after a crash.",
        epilog="examples: fedge hub --broker mqtt://localhost --model mlp --rounds 30 --min-devices 4;  "
               "fedge hub --broker mqtt://localhost --model conv4-mpt --model-option prune_ratio=0.9",
    )
    add_broker_args(p, required=False)
    _add_round_args(p, f"rounds (unset: fedge's defaults, e.g. {HUB_DEFAULTS.rounds} rounds, deadline "
                       f"{HUB_DEFAULTS.deadline_s:g} s, quorum {HUB_DEFAULTS.quorum:g}, all online devices per round)")
    p.add_argument("--min-devices", type=int, default=1,
                   help="online devices needed before a round starts (default: %(default)s)")
    p.add_argument("--wait-devices", type=float, default=600,
                   help="seconds to wait for --min-devices before giving up; the hub logs who is online "
                        "meanwhile (default: %(default)s)")
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS, help="server test set for evaluation")
    p.add_argument("--data-root", help=f"dataset folder (fashion-mnist default: {DEFAULT_FASHION_ROOT})")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate (no test set on the server)")
    p.add_argument("--in-shape", help="model input shape with --no-eval (C,H,W; default 1,28,28, or the "
                                      "resumed run's)")
    p.add_argument("--runs-dir", default="runs", help="where runs/<id>/ is written (default: %(default)s)")
    p.add_argument("--run-id", help="name of a new run (default: hub-<timestamp>)")
    p.add_argument("--resume", metavar="RUN",
                   help="continue run RUN: its id under --runs-dir (give the same --runs-dir as the run), or its "
                        "folder; the hub prints the exact command when it starts")
    p.add_argument("--keys-dir", help="keys folder from `fedge keys init/enroll`: sign models and tasks, "
                                      "accept only updates tagged with an enrolled device's key")
    add_status_args(p)
    add_logging_args(p)
    p.set_defaults(func=run_hub)


def _find_run(args: argparse.Namespace) -> Path:
    """--resume RUN: a run folder, or a run id under --runs-dir; ConfigError naming where it looked."""
    given = Path(args.resume)
    run_dir = given if given.is_dir() else Path(args.runs_dir) / args.resume
    if (run_dir / "run.sqlite").exists():
        return run_dir
    runs_dir = Path(args.runs_dir)
    there = sorted(d.name for d in runs_dir.glob("*") if (d / "run.sqlite").exists()) if runs_dir.is_dir() else []
    seen = f"runs there: {', '.join(there[-5:])}" if there else "no runs there"
    raise ConfigError(f"--resume {args.resume}: no run store at {run_dir / 'run.sqlite'} ({seen}); give the "
                      f"--runs-dir the run was started with, or the run's folder")


def resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    """The command that continues this run from any folder: the same broker, evaluation and
    status-page flags, the run folder's absolute --runs-dir (never a password: that stays in
    FEDGE_MQTT_PASSWORD or --password)."""
    import shlex  # noqa: PLC0415 - only here

    broker = broker_from_args(args)
    words = ["fedge", "hub", "--broker", broker.url]
    if broker.username:
        words += ["--username", broker.username]
    for flag, value in (("--ca-file", args.ca_file), ("--cert-file", args.cert_file), ("--key-file", args.key_file)):
        if value:
            words += [flag, str(Path(value).resolve())]
    if args.no_eval:
        words.append("--no-eval")
    else:
        if args.dataset != "fashion-mnist":
            words += ["--dataset", args.dataset]
        if args.data_root:
            words += ["--data-root", str(Path(args.data_root).resolve())]
    if args.status_port is not None:  # the resumed hub serves its status page where this one did
        words += ["--status-port", str(args.status_port)]
        if args.status_host != "127.0.0.1":
            words += ["--status-host", args.status_host]
    words += ["--runs-dir", str(run_dir.parent.resolve()), "--resume", run_dir.name]
    return shlex.join(words)


def run_hub(args: argparse.Namespace) -> int:
    from fedge.hub.config import HubConfig  # noqa: PLC0415
    from fedge.hub.hub import Hub  # noqa: PLC0415
    from fedge.hub.report import final_summary, summarise, write_final_model  # noqa: PLC0415
    from fedge.hub.sim.fleet import new_run_id  # noqa: PLC0415
    from fedge.hub.store import RunStore  # noqa: PLC0415
    from fedge.models.data import load_dataset  # noqa: PLC0415

    setup_logging(args)
    if not args.broker:
        raise ConfigError("--broker (or FEDGE_BROKER) is required, e.g. --broker mqtt://localhost:1883")
    if args.resume:
        run_dir = _find_run(args)
        store = RunStore(run_dir)
        cfg = HubConfig.from_json(store.get_meta("config"))
        if store.get_meta("status") == "finished" and args.rounds is None:
            print(f"run {run_dir.name} already finished after round {store.last_round()}: nothing to train; its "
                  f"summary follows (--rounds N with --resume trains it further)", file=sys.stderr)
        if args.rounds is not None:
            if cfg.plan:
                raise ConfigError(f"--resume --rounds: run {run_dir.name} follows a plan "
                                  f"({', '.join(f'{st.kind}:{st.rounds}' for st in cfg.stages())}); --rounds does not apply")
            cfg.rounds = args.rounds
            store.set_meta("config", cfg.to_json())
        if args.keys_dir:
            cfg.keys_dir = str(Path(args.keys_dir).resolve())
            store.set_meta("config", cfg.to_json())
    else:
        cfg = HubConfig(fleet=args.fleet, prefix=args.topic_prefix, min_devices=args.min_devices,
                        wait_devices_s=args.wait_devices)
        _apply_round_args(cfg, args)
        cfg.keys_dir = str(Path(args.keys_dir).resolve()) if args.keys_dir else None
        run_dir = Path(args.runs_dir) / (args.run_id or new_run_id("hub"))
        if (run_dir / "run.sqlite").exists():
            raise ConfigError(f"run {run_dir} exists; use --resume {run_dir.name} or another --run-id")
        store = None
    test_x = test_y = None
    if not args.no_eval:
        ds = load_dataset(args.dataset, args.data_root, download=True)
        test_x, test_y = ds.test.x, ds.test.y
        cfg.in_shape, cfg.num_classes = ds.in_shape, ds.num_classes
    elif args.in_shape or not args.resume:  # a resumed run keeps its own input shape
        cfg.in_shape = _ints("--in-shape", args.in_shape or "1,28,28")
    store = store or RunStore(run_dir)
    hub = Hub(cfg, broker_from_args(args), store, test_x, test_y)
    again = resume_command(args, run_dir)
    log.info("run %s in %s/; to continue it after a crash or stop: %s", run_dir.name, run_dir, again)
    stop = stop_event_on_signals()
    import threading  # noqa: PLC0415

    threading.Thread(target=lambda: (stop.wait(), hub.stop()), daemon=True).start()
    try:
        with status_server(args, hub):
            history = hub.run()
    except (FedgeError, TimeoutError):
        print(f"run {run_dir.name} is kept; continue it with: {again}", file=sys.stderr)
        raise
    if stop.is_set():
        print(f"hub stopped after {len(history)} round(s); continue with: {again}", file=sys.stderr)
    files, _ = write_final_model(run_dir, hub) if history and not stop.is_set() else ({}, None)
    # the last round's test metrics (of --eval-size images; `fedge fleet` scores the final model on all)
    summary = {"run_dir": str(run_dir), "rounds": len(history),
               **final_summary(hub.family, history[-1]["metrics"] if history else None),
               **summarise(history, hub.family), "files": files}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if not stop.is_set() else 130


# ----------------------------------------------------------------------------- fleet
def add_fleet_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fleet", help="simulate a whole fleet on this machine (each device a real agent, over MQTT or in memory)",
        description="Run N virtual devices (each with its own connection and data partition) and a hub "
                    "in one process. With --transport mqtt (default) and no --broker an MQTT broker is started "
                    "in-process; --transport inproc runs the same hub and agents over an in-memory broker. Writes "
                    "runs/<id>/run.json (with the transport), final_model.fedge, partition.json and a plot of the model "
                    "family's headline metric (accuracy.png; f1.png for segmentation, probe_accuracy.png for contrastive).",
        epilog="examples:\n  fedge fleet                          # 10 devices, Fashion-MNIST, 10 rounds\n"
               "  fedge fleet --recipe paper001        # paper 001 (30 rounds + centralised baseline)\n"
               "  fedge fleet --broker mqtt://127.0.0.1:1883 --devices 20 --partition dirichlet --alpha 0.3\n"
               "  fedge fleet --model conv4-mpt --model-option prune_ratio=0.9 --model-option seed=7",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", help="a paper's experiment design (paper001, paper003); flags below override it")
    p.add_argument("--method", help="paper003: dnn-central, mpt-central-1/32, fedavg, bnn-fl-1/1, bnn-fl-1/32, "
                                    "mpt-fl-1/1, mpt-fl-1/32 (default), mpt-fl-1bit (mask uplink), "
                                    "mpt-fl-1bit-sign (sign-delta uplink)")
    p.add_argument("--prune-ratio", type=float, help="paper003: fraction of weights REMOVED (0.8 keeps 20 %%)")
    p.add_argument("--profile", help="device profile of the virtual devices (default sim; desktop-gpu trains on CUDA)")
    p.add_argument("--transport", choices=["mqtt", "inproc"],
                   help="mqtt (default): every device a real MQTT client of the embedded broker or --broker; "
                        "inproc: the same hub and agents over an in-memory broker (same envelopes, codecs, "
                        "admission and aggregation, no sockets; same global model as mqtt)")
    p.add_argument("--broker", default=None, help="external MQTT broker URL (default: embedded broker; mqtt only)")
    p.add_argument("--fleet", help="fleet id (topic level)")
    p.add_argument("--topic-prefix", help="topic root (default fedge/v1)")
    p.add_argument("--devices", type=int, help="number of virtual devices (default 10)")
    p.add_argument("--dataset", choices=DATASETS,
                   help="fashion-mnist (default), mnist, cifar10, synthetic, synthetic-pairs (6-channel image pairs)")
    p.add_argument("--data-root", help="dataset folder")
    p.add_argument("--partition", choices=PARTITIONERS, help="how data is split over devices (default dominant)")
    p.add_argument("--per-device", type=int, help="images per device (iid, dominant)")
    p.add_argument("--dominant-fraction", type=float, help="dominant: share of the device's own label (0.55)")
    p.add_argument("--classes-per-device", type=int, help="shards: labels per device")
    p.add_argument("--images-per-class", type=int, help="shards: images per label per device")
    p.add_argument("--alpha", type=float, help="dirichlet concentration")
    p.add_argument("--sizes", help="sizes: comma-separated images per device")
    p.add_argument("--backend", choices=("process", "thread", "ray"),
                   help="where the devices' training runs: process (default: worker processes beside the "
                        "fleet, the devices' data in shared memory), thread (inside the fleet process) or "
                        "ray (Ray actors, a local Ray or the cluster of RAY_ADDRESS; pip install ray)")
    p.add_argument("--workers", type=int, help="training workers shared by all devices (default: one per core; "
                                                "one with a GPU profile)")
    p.add_argument("--threads", type=int, help="torch threads for training in total (default: all cores)")
    p.add_argument("--central", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the same model centrally on the union of the partitions")
    p.add_argument("--runs-dir", help="where runs/<id>/ is written (default runs)")
    p.add_argument("--run-id", help="name of the run folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_round_args(p)
    add_status_args(p)
    add_logging_args(p)
    p.set_defaults(func=run_fleet)


def fleet_config_from_args(args: argparse.Namespace):  # noqa: ANN201 - FleetConfig
    from fedge.hub.config import HubConfig  # noqa: PLC0415
    from fedge.hub.sim.fleet import FleetConfig  # noqa: PLC0415
    from fedge.hub.sim.recipes import get_recipe  # noqa: PLC0415

    if args.recipe:
        cfg = get_recipe(args.recipe, method=args.method, prune_ratio=args.prune_ratio)
    else:
        cfg = FleetConfig(partition=PartitionSpec(kind="dominant"),
                          hub=HubConfig(fleet="demo", rounds=10, deadline_s=300, train={"lr": 0.05, "batch_size": 32}))
        if args.dataset is None and args.data_root is None and not Path(DEFAULT_FASHION_ROOT).is_dir():
            log.warning("Fashion-MNIST not found at %s (apt-get install dataset-fashion-mnist); "
                        "using the generated dataset instead", DEFAULT_FASHION_ROOT)
            cfg.dataset = "synthetic"
            cfg.partition = PartitionSpec(kind="iid")
    for arg, attr in (("profile", "profile"), ("transport", "transport"), ("broker", "broker"), ("devices", "devices"),
                      ("dataset", "dataset"),
                      ("data_root", "data_root"),
                      ("backend", "backend"), ("workers", "workers"), ("threads", "threads"), ("central", "central"),
                      ("runs_dir", "runs_dir"), ("run_id", "run_id"), ("seed", "seed")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(cfg, attr, value)
    part = _apply_partition_args(cfg.partition, args)
    if args.partition and args.partition != "dominant" and not args.per_device and args.recipe is None:
        part.per_device = None
    if args.devices is not None and args.recipe is None and not args.per_device:
        part.per_device = None  # split the whole training set over the requested devices
    if args.fleet:
        cfg.hub.fleet = args.fleet
    if args.topic_prefix:
        cfg.hub.prefix = args.topic_prefix
    _apply_round_args(cfg.hub, args)
    cfg.hub.min_devices = cfg.devices
    cfg.progress = not args.no_progress
    return cfg


def run_fleet(args: argparse.Namespace) -> int:
    from fedge.hub.sim.fleet import Fleet  # noqa: PLC0415

    setup_logging(args)
    if args.verbose < 2 and not args.quiet:  # the progress bar tells the story; -v: the hub's and devices' lines
        logging.getLogger("fedge").setLevel(logging.INFO if args.verbose else logging.WARNING)
    cfg = fleet_config_from_args(args)
    stop = stop_event_on_signals()
    with Fleet(cfg) as fleet:
        hub = fleet.make_hub()
        import threading  # noqa: PLC0415

        threading.Thread(target=lambda: (stop.wait(), hub.stop()), daemon=True).start()
        with status_server(args, hub):
            report = fleet.run(hub)
    # the family's names (final_metrics: every metric; headline: the one it leads with), and for
    # classification the *_accuracy keys from before families
    keys = ("run_id", "family", "headline", "final_metrics", "final_accuracy", "device_metrics_mean", "device_accuracy",
            "central_metrics", "central_accuracy", "federated_over_central", "rounds_completed",
            "uplink_bytes_per_device", "downlink_bytes_per_device", "seconds_per_round", "wall_time_s")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=1))
    model_files = "final_model.fedge/.onnx" if report.get("files", {}).get("onnx") else "final_model.fedge"
    print(f"results: {fleet.run_dir}/ (run.json, {report['files']['plot']}, {model_files}, partition.json)")
    if report.get("final_metrics") is None and hub.private_names:
        print(f"no test metrics: {hub.config.model} keeps its head on each device; the hub holds only the "
              f"shared tensors (docs/protocol.md 6.6)")
    if stop.is_set():  # interrupted (Ctrl-C, SIGTERM): what ran is saved, but the run did not finish
        print(f"stopped after {report.get('rounds_completed')} round(s)", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------- partition
def add_partition_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "partition", help="split a dataset into per-device .npz files for real agents",
        description="Write one .npz (x, y) per device, for `fedge agent --data FILE` on real hardware, "
                    "plus partition.json with the class counts per device.",
    )
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS, help="dataset to split (default: %(default)s)")
    p.add_argument("--data-root", help=f"dataset folder (fashion-mnist default: {DEFAULT_FASHION_ROOT})")
    p.add_argument("--devices", type=_positive_int, default=10, help="number of device files (default: %(default)s)")
    p.add_argument("--partition", default="iid", choices=PARTITIONERS,
                   help="iid: a uniform random share each; dominant: each device mostly one label (see "
                        "--dominant-fraction); shards: a few labels each; dirichlet: label shares drawn with --alpha; "
                        "sizes: --sizes images each (default: %(default)s)")
    p.add_argument("--per-device", type=_positive_int,
                   help="iid, dominant: images per device (default: the training set split evenly; dominant: the "
                        "largest size its labels allow)")
    p.add_argument("--dominant-fraction", type=float, default=0.55,
                   help="dominant: share of each device's images with its own label (default: %(default)s)")
    p.add_argument("--classes-per-device", type=int, default=2, help="shards: labels per device (default: %(default)s)")
    p.add_argument("--images-per-class", type=int, default=20,
                   help="shards: images of each of its labels per device (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="dirichlet: concentration; small values give each device few labels (default: %(default)s)")
    p.add_argument("--sizes", help="sizes: comma-separated images per device, one per device (e.g. 100,500,200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder for devNNN.npz and partition.json")
    p.set_defaults(func=run_partition)


def run_partition(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415

    from fedge.models.data import load_dataset  # noqa: PLC0415
    from fedge.models.partition import class_counts, partition  # noqa: PLC0415

    ds = load_dataset(args.dataset, args.data_root, seed=args.seed)
    spec = _apply_partition_args(PartitionSpec(), args)
    parts = partition(ds.train.y, args.devices, spec, seed=args.seed, num_classes=ds.num_classes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(parts):
        np.savez_compressed(out / f"dev{i:03d}.npz", x=ds.train.x[idx], y=ds.train.y[idx])
    counts = class_counts(ds.train.y, parts, ds.num_classes)
    (out / "partition.json").write_text(json.dumps({f"dev{i:03d}": c for i, c in enumerate(counts)}, indent=1))
    sizes = sorted(len(idx) for idx in parts)
    each = f"{sizes[0]} images each" if sizes[0] == sizes[-1] else f"{sizes[0]}-{sizes[-1]} images each"
    print(f"wrote {len(parts)} device files to {out}{os.sep} ({each}; class counts in {out / 'partition.json'})")
    return 0
