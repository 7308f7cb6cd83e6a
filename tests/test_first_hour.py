"""The first hour of a new user (issue 12): each mistake or surprise of the README walk-through
and of everyday use, as a real `fedge` process against a real broker, with the message it must
print. One test per item of the issue's list."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedge.models.wire.transport import BrokerConfig

from .inbox import raw_client
from .test_cli import FEDGE, _run

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()




def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path


def _images(n: int = 64, shape: tuple[int, ...] = (1, 28, 28), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, n)


class Lines:
    """A process's merged output, read on a thread, so a test can wait for one line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self._new = proc, [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match | None:
        end = time.time() + timeout
        with self._new:
            while time.time() < end:
                for line in self.lines:
                    found = re.search(pattern, line)
                    if found:
                        return found
                self._new.wait(0.2)
        return None

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _popen(args: list[str], **kw) -> Lines:
    return Lines(subprocess.Popen(FEDGE + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                  **kw))


# ----------------------------------------------------------------------------- 1. partition
def test_dominant_split_over_few_devices_works(tmp_path):
    """The README's `fedge partition ... --devices 3 --partition dominant` and `fedge fleet --devices 3`
    (the demo's dominant split) used to need 11000 images of a label that has 6000."""
    out = _run(["partition", "--dataset", "synthetic", "--devices", "3", "--partition", "dominant",
                "--out", str(tmp_path / "parts")])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote 3 device files" in out.stdout and "images each" in out.stdout
    counts = json.loads((tmp_path / "parts" / "partition.json").read_text())
    assert all(row[d] == max(row) for d, row in enumerate(counts.values()))  # each device: its own label dominates
    fleet = _run(["fleet", "--transport", "inproc", "--dataset", "synthetic", "--devices", "3", "--rounds", "1",
                  "--runs-dir", str(tmp_path / "runs"), "--run-id", "three", "--no-progress"])
    assert fleet.returncode == 0, fleet.stderr[-2000:]
    run = json.loads((tmp_path / "runs" / "three" / "run.json").read_text())
    assert run["rounds_completed"] == 1 and run["final_accuracy"] > 0.2  # one round; chance is 0.1
    too_big = _run(["partition", "--dataset", "synthetic", "--devices", "3", "--partition", "dominant",
                    "--per-device", "100000", "--out", str(tmp_path / "big")])
    assert too_big.returncode == 2 and "use --per-device" in too_big.stderr and "Traceback" not in too_big.stderr


# ----------------------------------------------------------------------------- 2, 3. waiting, run id, resume
def test_hub_says_what_it_waits_for_and_how_to_resume(tmp_path, mosquitto_url, topic_prefix):
    """While it waits the hub says who is online; it prints the run id and a resume command that
    works from another folder (the run store is found without repeating --runs-dir by hand)."""
    started_in, elsewhere = tmp_path / "a", tmp_path / "b"
    started_in.mkdir()
    elsewhere.mkdir()
    common = ["--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--fleet", "wait"]
    out = _run(["hub", *common, "--no-eval", "--min-devices", "2", "--wait-devices", "2", "--runs-dir", "state/runs",
                "--run-id", "r1"], cwd=started_in, env=ENV)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "waiting for devices: 0 of 2 online (none yet)" in out.stderr
    assert "only 0 device(s) online after 2s; need 2 (--min-devices)" in out.stderr and "Traceback" not in out.stderr
    command = re.search(r"continue it with: (fedge hub .*)", out.stderr).group(1)
    assert f"--runs-dir {started_in / 'state' / 'runs'} --resume r1" in command and "--no-eval" in command
    words = shlex.split(command)
    assert words[:2] == ["fedge", "hub"]
    again = _run(words[1:], cwd=elsewhere, env=ENV)
    assert "resuming run r1" in again.stderr, again.stderr[-2000:]
    assert "no run store" not in again.stderr and again.returncode == 2  # found it; still no devices
    assert "(default: 600)" in " ".join(_run(["hub", "--help"]).stdout.split())
    # the README's resume line names the hub command's --runs-dir
    hub_dir = re.search(r"fedge hub --broker .*?--runs-dir (\S+)", README, flags=re.S).group(1)
    resume = re.search(r"After a crash or reboot: `(fedge hub [^`]*--resume <run-id>[^`]*)`", README).group(1)
    assert f"--runs-dir {hub_dir}" in resume


# ----------------------------------------------------------------------------- 2, 4. -v, per-round lines
def test_verbose_hub_and_agent_say_what_each_round_did(tmp_path, mosquitto_url, topic_prefix):
    data = _npz(tmp_path / "dev0.npz", *_images(200))
    common = ["--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--fleet", "loud"]
    agent = _popen(["agent", *common, "--profile", "sim", "--data", str(data), "--device-id", "pi0", "--once"])
    hub = _run(["hub", *common, "--no-eval", "--rounds", "1", "--min-devices", "1", "--wait-devices", "60",
                "--runs-dir", str(tmp_path), "--run-id", "loud", "-v"], timeout=240, env=ENV)
    assert hub.returncode == 0, hub.stderr[-3000:]
    assert "round 1 (train) open: 1 device(s) selected (pi0)" in hub.stderr
    assert re.search(r"accepted update from pi0 for round 1: 200 samples, .* \d+ bytes", hub.stderr), hub.stderr[-3000:]
    agent.proc.wait(60)
    assert re.search(r"pi0: round 1: trained on 200 samples, loss \d+\.\d+, \d+\.\d s, sent \d+ bytes", agent.text), \
        agent.text[-2000:]


# ----------------------------------------------------------------------------- 4. failures reach the hub
def test_devices_that_cannot_train_are_named_by_the_hub_which_stops_waiting(tmp_path, mosquitto_url, topic_prefix):
    """pi-broken's job fails (its private-state file is corrupt), pi-small's data does not fit the
    model: both say so in their status, the hub logs who and why and closes each attempt at once
    instead of waiting out the deadline (4 attempts x 120 s before)."""
    broken = tmp_path / "head.npz"
    broken.write_bytes(b"PK\x03\x04 not a zip")
    common = ["--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--fleet", "sad"]
    agents = [
        _popen(["agent", *common, "--profile", "sim", "--data", str(_npz(tmp_path / "a.npz", *_images(64))),
                "--device-id", "pi-broken", "--private-state", str(broken)]),
        _popen(["agent", *common, "--profile", "sim", "--data", str(_npz(tmp_path / "b.npz", *_images(64, (1, 14, 14)))),
                "--device-id", "pi-small"]),
    ]
    try:
        started = time.time()
        hub = _run(["hub", *common, "--no-eval", "--model", "mlp-private-head", "--rounds", "1", "--min-devices", "2",
                    "--deadline", "120", "--wait-devices", "60", "--runs-dir", str(tmp_path), "--run-id", "sad"],
                   timeout=240, env=ENV)
        took = time.time() - started
    finally:
        for agent in agents:
            agent.proc.send_signal(signal.SIGTERM)
            agent.proc.wait(30)
    assert hub.returncode == 2, hub.stderr[-3000:]
    assert took < 90, took  # no deadline was waited out
    err = hub.stderr
    assert "device pi-broken failed round 1: DataError: private state" in err, err[-3000:]
    assert "device pi-small refused round 1: the model takes inputs [1, 28, 28], this device's data is " \
           "[1, 14, 14] (channels, height, width)" in err
    assert "fedge hub: error: round 1 failed 4 times" in err and "pi-broken failed: DataError" in err
    assert "ignored for this round" not in err and "Traceback" not in err
    assert "pi-broken: train task of round 1 failed: DataError: private state" in agents[0].text


# ----------------------------------------------------------------------------- 4, 5. bad data at start
def test_agent_refuses_bad_data_and_missing_data_at_start(tmp_path):
    no_broker = ["--broker", "mqtt://127.0.0.1:1", "--profile", "sim"]
    x, y = _images(16)
    cases = {
        "channels-last": (_npz(tmp_path / "hwc.npz", x.transpose(0, 2, 3, 1), y), "looks channels-last"),
        "nan": (_npz(tmp_path / "nan.npz", np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y),
                "x holds 1 NaN or Inf value(s) (first in example 0)"),
        "text": (tmp_path / "notes.npz", "not a readable .npz (a .npz is a zip of arrays x and y"),
    }
    (tmp_path / "notes.npz").write_text("x,y\n1,2\n")
    for name, (path, message) in cases.items():
        out = _run(["agent", *no_broker, "--data", str(path)], timeout=120)
        assert out.returncode == 2 and f"fedge agent: error: --data {path}: " in out.stderr, (name, out.stderr[-2000:])
        assert message in out.stderr and "Traceback" not in out.stderr and "pickle" not in out.stderr, name
    missing = _run(["agent", *no_broker], timeout=120)
    assert missing.returncode == 2 and "fedge agent: error: --data is required" in missing.stderr
    assert "--data synthetic" in missing.stderr


# ----------------------------------------------------------------------------- 6, 10. serve
def _model_message(run: str, version: int, epoch: int) -> bytes:
    from fedge.models.registry import build_model, get_state
    from fedge.models.wire.messages import build_model_message

    state = get_state(build_model("mlp", (1, 28, 28), 10, seed=version))
    return build_model_message("home", run, version, "mlp", state, meta={"in_shape": [1, 28, 28], "num_classes": 10},
                               epoch=epoch)


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _serving(port: int, want: tuple[str, int] | None, timeout: float = 30) -> dict:
    end = time.time() + timeout
    while True:
        _, health = _health(port)
        model = health.get("model") or {}
        if (model.get("run"), model.get("version")) == (want or (None, None)) or time.time() > end:
            return health
        time.sleep(0.2)


def test_serve_keeps_the_trained_model_when_a_new_run_starts(tmp_path, mosquitto_url, topic_prefix):
    """A new run's version 0 is its untrained initial model: serve keeps the trained one until the
    new run's first trained version. serve takes the broker flags of hub and agent (--topic-prefix)."""
    serve = _popen(["agent", "serve", "--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--fleet", "home",
                    "--port", "0"])
    hub = raw_client(mosquitto_url)
    topic = f"{topic_prefix}/home/model"
    try:
        port = int(serve.wait_for(r"serving predictions on http://127\.0\.0\.1:(\d+)").group(1))
        hub.publish(topic, _model_message("run-a", 3, epoch=1), qos=1, retain=True).wait_for_publish(5)
        assert _serving(port, ("run-a", 3))["model"]["version"] == 3
        hub.publish(topic, _model_message("run-b", 0, epoch=2), qos=1, retain=True).wait_for_publish(5)
        assert serve.wait_for("run run-b started; keeps serving the current model", 30), serve.text[-2000:]
        code, health = _health(port)
        assert code == 200 and (health["model"]["run"], health["model"]["version"]) == ("run-a", 3), health
        hub.publish(topic, _model_message("run-b", 1, epoch=2), qos=1, retain=True).wait_for_publish(5)
        assert _serving(port, ("run-b", 1))["model"]["run"] == "run-b"
    finally:
        hub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        hub.loop_stop()
        hub.disconnect()
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(30)


def test_serve_and_predict_flags_match_hub_and_agent():
    from fedge.cli import build_parser

    serve_help = " ".join(_run(["agent", "serve", "--help"]).stdout.split())
    for flag in ("--topic-prefix", "--hub-public-key", "--username", "--password", "--ca-file"):
        assert flag in serve_help, flag
    assert "--prefix" not in serve_help.replace("--topic-prefix", "") and "--hub-key" not in serve_help
    old = build_parser().parse_args(["agent", "serve", "--prefix", "p/v1", "--hub-key", "k.pub", "--fleet", "f"])
    assert (old.topic_prefix, old.hub_public_key) == ("p/v1", "k.pub")  # the old spellings still work
    assert build_parser().parse_args(["agent", "predict", "--model", "m.onnx", "x.npy", "--hub-key", "k"]).hub_public_key == "k"
    assert "recipe" not in _run(["hub", "--help"]).stdout
    partition_help = " ".join(_run(["partition", "--help"]).stdout.split())
    for flag in ("--dataset", "--devices", "--partition", "--per-device", "--dominant-fraction", "--classes-per-device",
                 "--images-per-class", "--alpha", "--sizes", "--seed", "--out"):
        assert re.search(rf"{flag} (\{{[^}}]*\}}|[A-Z_]+) [a-z]", partition_help), flag  # flag, metavar, words


# ----------------------------------------------------------------------------- 7. rounds
@pytest.mark.parametrize("command", ["hub", "fleet"])
@pytest.mark.parametrize("rounds", ["0", "-1"])
def test_no_rounds_is_refused(tmp_path, command, rounds):
    from fedge.hub.config import HubConfig
    from fedge.models.errors import ConfigError

    out = _run([command, "--rounds", rounds, "--broker", "mqtt://127.0.0.1:1", "--runs-dir", str(tmp_path)])
    assert out.returncode == 2 and f"argument --rounds: must be a positive integer, got {rounds}" in out.stderr
    assert not list(tmp_path.iterdir())  # no run, no untrained final_model
    with pytest.raises(ConfigError, match="rounds must be a positive integer, got 0"):
        HubConfig(rounds=0).check()


# ----------------------------------------------------------------------------- 8. clean errors
def _model_file(path: Path) -> Path:
    """A real model file for serve: a .fedge model message, which predict and serve load like an .onnx."""
    path.write_bytes(_model_message("run-a", 1, epoch=1))
    return path


def test_bad_files_busy_port_and_missing_run_are_one_line_errors(tmp_path):
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"this is not protobuf")
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), np.float32))
    for args in (["agent", "predict", "--model", str(corrupt), str(tmp_path / "x.npy")],
                 ["agent", "serve", "--model", str(corrupt), "--port", "0"]):
        out = _run(args, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"error: {corrupt}: not an ONNX model onnxruntime can load" in out.stderr and "Traceback" not in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _run(["agent", "serve", "--model", str(_model_file(tmp_path / "m.fedge")), "--port", str(port)], timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"fedge agent serve: error: cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "--port" in out.stderr and "Traceback" not in out.stderr
    missing = _run(["hub", "--broker", "mqtt://127.0.0.1:1", "--resume", "nope", "--runs-dir", str(tmp_path)])
    assert missing.returncode == 2 and "fedge hub: error: --resume nope: no run store at" in missing.stderr
    assert "--runs-dir" in missing.stderr


# ----------------------------------------------------------------------------- 9. install
def test_readme_says_what_the_install_pulls_and_how_to_get_the_cpu_build():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    default, cpu = (next(b for b in blocks if "pip install torch==" in b and ("whl/cpu" in b) == want)
                    for want in (False, True))
    pins = re.search(r"torch==\S+ torchvision==\S+", default).group(0)
    assert f"pip install {pins} --index-url https://download.pytorch.org/whl/cpu" in cpu  # the same versions
    assert "pip install -e '.[dev]'" in cpu and "fedge fleet" in cpu
    assert "5.7 GB" in README and "CUDA" in README and "**Without a GPU**" in README


# ----------------------------------------------------------------------------- 10. keys, password, SIGTERM
def test_the_hub_is_not_enrolled_as_a_device(tmp_path):
    out = _run(["keys", "enroll", "hub", "pi-kitchen", "--dir", str(tmp_path)])
    assert out.returncode == 2 and "fedge keys: error: 'hub' is not a device id" in out.stderr
    assert "fedge keys init" in out.stderr and not (tmp_path / "devices").exists()  # nothing written


def test_a_wrong_password_fails_at_once(mosquitto_bin, mosquitto_passwd_bin):
    from fedge.hub.acl import set_passwords

    from .mosquitto_proc import MosquittoProcess

    folder = Path(tempfile.mkdtemp(prefix="fedge-pw-"))  # readable by the 'mosquitto' user, unlike tmp_path
    folder.chmod(0o755)
    passwd = set_passwords(folder / "passwd", [("pi@home", "right")])
    passwd.chmod(0o644)
    broker = MosquittoProcess(folder / "broker", allow_anonymous=False, extra_config=f"password_file {passwd}\n").start()
    try:
        started = time.time()
        out = _run(["agent", "--broker", broker.url, "--username", "pi@home", "--password", "wrong", "--fleet", "home",
                    "--data", "synthetic", "--profile", "sim", "--device-id", "pi"], timeout=120)
        took = time.time() - started
    finally:
        broker.stop()
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.search(r"fedge agent: error: .* refused the login .*: (Not authorized|Bad user name or password)$",
                     out.stderr.strip().splitlines()[-1]), out.stderr[-2000:]
    assert took < 15, took  # not the 20 s connect timeout of a broker that does not answer


def test_hub_stopped_mid_round_says_it_is_shutting_down(tmp_path, mosquitto_url, topic_prefix):
    """A device is selected and never answers; SIGTERM stops the hub: it says it shuts down and how to
    continue, and does not call the device late."""
    status = f"{topic_prefix}/home/dev/pi-quiet/status"
    device = raw_client(mosquitto_url)
    device.publish(status, json.dumps({"state": "online", "num_samples": 100}), qos=1, retain=True).wait_for_publish(5)
    hub = _popen(["hub", "--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--fleet", "home", "--no-eval",
                  "--rounds", "2", "--deadline", "120", "--runs-dir", str(tmp_path), "--run-id", "quiet"])
    try:
        assert hub.wait_for(r"round 1 \(train\) open: 1 device\(s\) selected \(pi-quiet\)", 60), hub.text[-2000:]
        hub.proc.send_signal(signal.SIGTERM)
        assert hub.proc.wait(30) == 130
    finally:
        device.publish(status, b"", qos=1, retain=True).wait_for_publish(5)
        device.loop_stop()
        device.disconnect()
    hub.wait_for("continue with", 5)
    assert "received SIGTERM, shutting down" in hub.text
    assert "shutting down: round 1 stays open with 0/1 answer(s); --resume continues it" in hub.text
    assert "ignored for this round" not in hub.text and "Traceback" not in hub.text
    assert f"hub stopped after 0 round(s); continue with: fedge hub --broker {mosquitto_url}" in hub.text


@pytest.mark.parametrize(("argv", "typo", "meant"), [
    (["agent", "--devcie-id", "pi-x", "--data", "synthetic"], "--devcie-id", "--device-id"),
    (["agent", "--brokr", "mqtt://127.0.0.1:1883"], "--brokr", "--broker"),
    (["hub", "--rouds", "5"], "--rouds", "--rounds"),
    (["agent", "serve", "--topic-prefx", "a/v1"], "--topic-prefx", "--topic-prefix"),
])
def test_a_misspelt_flag_is_named_with_the_closest_real_one(argv, typo, meant, capsys):
    """argparse alone answered `fedge agent --devcie-id pi-x` with "invalid choice: 'pi-x'"
    (the value taken for the agent's ACTION), never naming the typo."""
    from fedge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"unrecognized option {typo} (did you mean {meant}?)" in err and "invalid choice" not in err


def test_two_clients_with_one_device_id_get_a_warning_that_says_so(mosquitto_url, caplog):
    """Two agents started with the same --device-id take the MQTT session from each other
    forever; before, each only logged "disconnected (Unspecified error); reconnecting" at INFO."""
    import logging
    import secrets

    from fedge.models.wire.transport import QUICK_DROPS_TO_WARN, MqttLink

    client_id = f"same-id-{secrets.token_hex(4)}"
    caplog.set_level(logging.WARNING, logger="fedge")
    links = [MqttLink(BrokerConfig.from_url(mosquitto_url), client_id, clean_session=True) for _ in range(2)]
    try:
        for link in links:
            link.start(timeout=10)
        deadline = time.time() + 30
        while time.time() < deadline and "must be unique" not in caplog.text:
            time.sleep(0.2)
    finally:
        for link in links:
            link.stop()
    assert f"right after {QUICK_DROPS_TO_WARN} connects in a row: is another client using the id {client_id!r}" in caplog.text


def test_resuming_a_finished_run_says_it_is_finished(tmp_path, mosquitto_url, topic_prefix):
    """Before, `--resume` of a finished run printed its summary again with no word that nothing ran."""
    done = _run(["fleet", "--transport", "inproc", "--dataset", "synthetic", "--partition", "iid", "--devices", "2",
                 "--rounds", "1", "--runs-dir", str(tmp_path), "--run-id", "done1", "--no-progress", "-q"])
    assert done.returncode == 0, done.stderr
    again = _run(["hub", "--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--runs-dir", str(tmp_path),
                  "--resume", "done1", "--no-eval"])
    assert again.returncode == 0, again.stderr
    assert "run done1 already finished after round 1: nothing to train" in again.stderr
    assert json.loads(again.stdout[again.stdout.index("{"):])["rounds"] == 1  # the run's one round, not a new one
