"""A private Mosquitto for tests that stop, restart or reconfigure a broker.

Never touches the machine's shared broker: each instance has its own port, config file and
persistence folder under the test's tmp_path.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from fedge.hub.broker import free_port


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (str(Path("/usr/sbin/mosquitto")) if Path("/usr/sbin/mosquitto").exists() else None)


class MosquittoProcess:
    def __init__(self, workdir: Path, extra_config: str = "", port: int | None = None,
                 allow_anonymous: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        (self.workdir / "data").mkdir(exist_ok=True)
        (self.workdir / "data").chmod(0o777)  # mosquitto started as root drops to its own user
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            f"persistence true\npersistence_location {self.workdir / 'data'}/\n"
            f"{extra_config}\n"
        )
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_seconds: float = 1.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()
