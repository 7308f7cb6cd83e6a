"""A private RabbitMQ node with the MQTT plugin, for tests that run fedge on a second broker.

Never touches a RabbitMQ the machine already runs: the node has its own name, Erlang cookie
(HOME), distribution port, epmd port, data and log folders, config file and enabled-plugins
file, all under the test's folder; it listens for MQTT only (no AMQP listener), on loopback.
The node and its epmd are this process's children, each in its own process group: stop() signals
those groups, and on Linux they also get SIGTERM if the test process dies first.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedge.hub.broker import free_port

# Debian/Ubuntu: /usr/sbin/rabbitmq-server is a wrapper that switches to the `rabbitmq` user and
# writes into /var/log/rabbitmq; the real start script is this one (it honours RABBITMQ_* variables).
DEBIAN_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")

# a CONNECT (MQTT 3.1.1, clean session, keepalive 60 s, client id "fedge-probe") and its success CONNACK
_CONNECT = bytes([0x10, 23, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 11]) + b"fedge-probe"
_CONNACK_OK = bytes([0x20, 2, 0, 0])


def rabbitmq_server_script() -> str | None:
    """The script that starts a RabbitMQ node from environment variables, or None if not installed."""
    if DEBIAN_SCRIPT.exists():
        return str(DEBIAN_SCRIPT)
    found = shutil.which("rabbitmq-server")  # the generic-unix tarball, Homebrew: the script itself
    return found if found and Path(found).resolve().name == "rabbitmq-server" else None


def mqtt_connack(port: int, timeout: float = 2.0) -> bool:
    """True if the port answers an MQTT CONNECT with an accepting CONNACK (the plugin is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(_CONNECT)
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    return False
                answer += chunk
            sock.sendall(bytes([0xE0, 0]))  # DISCONNECT
            return answer == _CONNACK_OK
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the test process dies, so a killed pytest
    leaves no node behind (the start script execs down to the Erlang VM, which keeps the setting)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RabbitMQProcess:
    """One RabbitMQ node, MQTT plugin enabled, anonymous MQTT logins mapped to guest (loopback only)."""

    def __init__(self, workdir: Path, mqtt_port: int | None = None, extra_config: str = "") -> None:
        self.workdir = Path(workdir)
        self.mqtt_port = mqtt_port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"fedge-test-{secrets.token_hex(4)}@localhost"
        self.log_dir = self.workdir / "log"
        self.extra_config = extra_config
        self.proc: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        self.version: str | None = None  # RabbitMQ's version, read from the node's log once it started

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def _environment(self) -> dict[str, str]:
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)
        (self.workdir / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"  # MQTT only: no AMQP port to find or to clash
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\nmqtt.default_user = guest\nmqtt.default_pass = guest\n"
            "log.console = false\nlog.file.level = info\n"
            f"{self.extra_config}\n"
        )
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf (the shared node's)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(home),  # the Erlang cookie: this node's own
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),  # its own epmd: the shared one is left alone
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),  # absent: none
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
        })
        return env

    def _log_tail(self) -> str:
        texts = [p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.out"))]
        texts += [p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log"))]
        return "\n".join(t[-1500:] for t in texts)

    def start(self, timeout: float = 90.0) -> RabbitMQProcess:
        """Start this node's epmd, then the node, and wait until its MQTT listener accepts a CONNECT."""
        script = rabbitmq_server_script()
        epmd = shutil.which("epmd")
        if script is None or epmd is None:
            raise RuntimeError(f"{'rabbitmq-server' if script is None else 'epmd (Erlang)'} is not installed "
                               "(apt-get install rabbitmq-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = self._environment()
        # in the foreground, our child: the node finds it and starts no daemon of its own
        self.epmd = subprocess.Popen([epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        out = open(self.workdir / "rabbitmq-server.out", "ab")
        self.proc = subprocess.Popen([script], env=env, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        out.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                status, tail = self.proc.returncode, self._log_tail()
                self.stop()
                raise RuntimeError(f"rabbitmq-server exited with status {status}: {tail}")
            if mqtt_connack(self.mqtt_port):
                self.version = self._version()
                return self
            time.sleep(0.25)
        tail = self._log_tail()
        self.stop()
        raise RuntimeError(f"RabbitMQ's MQTT listener on {self.mqtt_port} did not accept a CONNECT within {timeout}s: {tail}")

    def _version(self) -> str | None:
        """From the node's log: `Starting RabbitMQ 3.10.8 on Erlang 25.2.3`."""
        for path in sorted(self.log_dir.glob("*.log")):
            match = re.search(r"RabbitMQ (\d+\.\d+\.\d+) on Erlang", path.read_text(errors="replace"))
            if match:
                return match.group(1)
        return None

    def stop(self) -> None:
        """Stop this node (SIGTERM to its process group: a clean shutdown), then its epmd."""
        for proc, grace in ((self.proc, 30), (self.epmd, 5)):
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            except ProcessLookupError:
                pass
