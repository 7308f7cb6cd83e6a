"""Command-line pieces shared by `fedge agent`, `fedge hub` and `fedge export`: broker flags,
logging, and the model flags (--model NAME --model-option NAME=VALUE)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from fedge.models.spec import ModelSpec
from fedge.models.wire.topics import ROOT
from fedge.models.wire.transport import BrokerConfig

MODEL_OPTION_HELP = ("an option of the model, NAME=VALUE (repeatable), e.g. prune_ratio=0.9 for the MPT models, "
                     "hidden=100 for the MLPs; `fedge models` lists each model's options")


def model_spec_from_args(model: str | ModelSpec, options: list[str] | None = None) -> ModelSpec:
    """The checked ModelSpec of --model and its --model-option flags: where the command line's
    text becomes a spec, the one place that also reads the old shorthand NAME@RATIO
    (`conv4-mpt@0.9` = `--model conv4-mpt --model-option prune_ratio=0.9`)."""
    from fedge.models.errors import ConfigError  # noqa: PLC0415 - keeps `fedge --help` light
    from fedge.models.registry import model_spec, parse_model_options  # noqa: PLC0415 - torch, needed only here

    name, at, ratio = model.partition("@") if isinstance(model, str) else (model.name, "", "")
    base = model if isinstance(model, ModelSpec) else ModelSpec(name)
    if at and not ratio:
        raise ConfigError(f"--model {model}: the shorthand is NAME@RATIO, e.g. conv4-mpt@0.9")
    given = parse_model_options(name, [f"prune_ratio={ratio}"]) if at else {}
    flags = parse_model_options(name, options or [])
    clash = sorted(set(given) & set(flags))
    if clash:
        raise ConfigError(f"--model {model} already sets {', '.join(clash)}; drop the @ shorthand or the --model-option")
    return model_spec(base, {**given, **flags})


def add_broker_args(parser: argparse.ArgumentParser, required: bool = True, default: str | None = None,
                    env: bool = True, fleet_default: str | None = "default") -> None:
    """The broker flags of every command that talks MQTT (hub, agent, agent serve), spelled the
    same everywhere. `env=False`: --broker is only what the command line says (serve follows a
    hub only when asked); `fleet_default=None`: --fleet has no default."""
    group = parser.add_argument_group("broker connection")
    group.add_argument(
        "--broker", required=required and default is None,
        default=default or (os.environ.get("FEDGE_BROKER") if env else None),
        help="MQTT broker URL: mqtt://[user[:pass]@]host[:port] or mqtts://... for TLS" + (" (env FEDGE_BROKER)" if env else ""),
    )
    group.add_argument("--username", help="MQTT username (overrides the URL's)")
    group.add_argument("--password", default=os.environ.get("FEDGE_MQTT_PASSWORD"),
                       help="MQTT password (env FEDGE_MQTT_PASSWORD keeps it out of `ps`)")
    group.add_argument("--ca-file", help="CA certificate (PEM) that signed the broker's certificate; implies TLS")
    group.add_argument("--cert-file", help="client certificate (PEM) for brokers that require one")
    group.add_argument("--key-file", help="private key (PEM) of --cert-file")
    group.add_argument("--fleet", default=fleet_default,
                       help="fleet id: one hub and its devices" + (" (default: %(default)s)" if fleet_default else ""))
    group.add_argument("--topic-prefix", default=ROOT, help="topic root (default: %(default)s)")


def broker_from_args(args: argparse.Namespace) -> BrokerConfig:
    return BrokerConfig.from_url(
        args.broker, username=args.username, password=args.password, ca_file=args.ca_file,
        cert_file=args.cert_file, key_file=args.key_file,
    )


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output: -v adds fedge's debug lines (each update, status and task), "
                             "-vv also the libraries'")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def setup_logging(args: argparse.Namespace) -> None:
    """INFO by default; -v: fedge's own DEBUG lines; -vv: everyone's; -q: warnings only."""
    verbose = getattr(args, "verbose", 0)
    level = logging.WARNING if getattr(args, "quiet", False) else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if verbose == 1 and not getattr(args, "quiet", False):
        logging.getLogger("fedge").setLevel(logging.DEBUG)
    for noisy in ("amqtt", "transitions", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM, so long-running commands shut down cleanly."""
    event = threading.Event()

    def handler(signum: int, frame: object) -> None:
        logging.getLogger("fedge").info("received %s, shutting down", signal.Signals(signum).name)
        event.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return event
