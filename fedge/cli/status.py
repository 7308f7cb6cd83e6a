"""`--status-port` / `--status-host` of `fedge hub` and `fedge fleet`: the hub's read-only status
page, /status.json and Prometheus /metrics (hub/status_server.py) for the length of the run."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedge.hub.hub import Hub


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {text}")
    return value


def add_status_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("status page and metrics (off unless --status-port is given)")
    g.add_argument("--status-port", type=_port, metavar="PORT",
                   help="serve a read-only status page at http://HOST:PORT/ while the hub runs: devices online/offline "
                        "with last seen, profile and data size; the stage and round with a countdown to its deadline; "
                        "accuracy (the model family's metric) and bytes up/down per round as charts; the last "
                        "rejected updates with reasons. The same port serves /status.json (the page's data) and "
                        "/metrics (Prometheus, names fedge_*; docs/operations.md). 0 picks a free port")
    g.add_argument("--status-host", default="127.0.0.1", metavar="HOST",
                   help="address the status port listens on (default: %(default)s, this machine only; 0.0.0.0 for "
                        "every interface: the page has no password and names your devices)")


@contextlib.contextmanager
def status_server(args: argparse.Namespace, hub: Hub) -> Iterator[None]:
    """Serve `hub`'s status for the `with` block if --status-port was given; a port that is
    taken is a ConfigError naming it (the CLI prints it as one line, exit 2)."""
    if getattr(args, "status_port", None) is None:
        yield
        return
    from fedge.hub.status_server import StatusServer  # noqa: PLC0415 - only with --status-port: no HTTP otherwise

    server = StatusServer(hub.status, host=args.status_host, port=args.status_port)
    with server:
        print(f"status page: {server.url} (data: {server.url}status.json, Prometheus: {server.url}metrics)",
              file=sys.stderr, flush=True)
        yield
