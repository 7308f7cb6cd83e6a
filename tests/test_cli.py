"""The `fedge` command as users run it: real processes, real Mosquitto, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from PIL import Image

from fedge.models.errors import ConfigError, DataError
from fedge.models.wire.transport import BrokerConfig

FEDGE = [sys.executable, "-m", "fedge.cli"]


def _run(args: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(FEDGE + args, capture_output=True, text=True, timeout=timeout, **kw)


def test_help_teaches_the_roles():
    out = _run(["--help"])
    assert out.returncode == 0
    for word in ("fedge fleet", "fedge hub", "fedge agent", "Start here"):
        assert word in out.stdout
    fleet_help = _run(["fleet", "--help"])
    assert "--recipe" in fleet_help.stdout and "embedded broker" in fleet_help.stdout


def test_bad_profile_is_a_clear_error(tmp_path):
    bad = tmp_path / "pi.yaml"
    bad.write_text("name: pi\nbatchsize: 4\n")
    out = _run(["profiles", str(bad)])
    assert out.returncode == 2
    assert "unknown key 'batchsize'" in out.stderr and str(bad) in out.stderr


def test_missing_data_file_is_a_clear_error(tmp_path):
    out = _run(["fleet", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "none"), "--no-progress"])
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "apt-get install dataset-fashion-mnist" in out.stderr


def test_fleet_command_writes_a_complete_run(tmp_path, mosquitto_url, topic_prefix):
    out = _run(["fleet", "--dataset", "synthetic", "--partition", "iid", "--devices", "3", "--rounds", "2",
                "--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--runs-dir", str(tmp_path),
                "--run-id", "cli", "--central", "--no-progress"])
    assert out.returncode == 0, out.stderr[-2000:]
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    for key in ("final_accuracy", "central_accuracy", "uplink_bytes_per_device", "downlink_bytes_per_device",
                "seconds_per_round"):
        assert run[key] is not None, key
    assert run["rounds_completed"] == 2
    assert run["final_accuracy"] > 0.4  # 10 classes: chance is 0.1
    assert run["transport"] == "mqtt"


def test_fleet_command_over_the_in_memory_transport(tmp_path):
    """--transport inproc runs the same fleet without a broker; run.json says so; a broker URL is refused."""
    out = _run(["fleet", "--transport", "inproc", "--dataset", "synthetic", "--partition", "iid", "--devices", "3",
                "--rounds", "2", "--runs-dir", str(tmp_path), "--run-id", "mem", "--no-progress"])
    assert out.returncode == 0, out.stderr[-2000:]
    run = json.loads((tmp_path / "mem" / "run.json").read_text())
    assert run["transport"] == "inproc" and run["config"]["transport"] == "inproc"
    assert run["rounds_completed"] == 2 and run["final_accuracy"] > 0.4  # 10 classes: chance is 0.1
    # the family's names lead; classification keeps its accuracy keys, and its plot is accuracy.png
    assert run["family"] == "classification" and run["headline"] == "accuracy"
    assert run["final_metrics"] == {"loss": run["final_loss"], "accuracy": run["final_accuracy"]}
    with Image.open(tmp_path / "mem" / run["files"]["plot"]) as plot:
        assert run["files"]["plot"] == "accuracy.png" and plot.text["Description"] == "y: test accuracy (%)"
    bad = _run(["fleet", "--transport", "inproc", "--broker", "mqtt://127.0.0.1:1883", "--dataset", "synthetic",
                "--runs-dir", str(tmp_path), "--no-progress"])
    assert bad.returncode == 2 and "needs --transport mqtt" in bad.stderr


def _retained(url: str, topic: str, timeout: float = 5.0) -> dict | None:
    cfg = BrokerConfig.from_url(url)
    got: list[bytes] = []
    arrived = threading.Event()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: (got.append(m.payload), arrived.set())
    client.connect(cfg.host, cfg.port)
    client.subscribe(topic, 1)
    client.loop_start()
    arrived.wait(timeout)
    client.loop_stop()
    client.disconnect()
    return json.loads(got[-1]) if got else None


def test_real_hub_and_agent_processes(tmp_path, mosquitto_url, topic_prefix):
    parts = tmp_path / "parts"
    made = _run(["partition", "--dataset", "synthetic", "--devices", "2", "--out", str(parts)])
    assert made.returncode == 0, made.stderr
    common = ["--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--fleet", "home"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agents = [
        subprocess.Popen(FEDGE + ["agent", *common, "--profile", "sim", "--data", str(parts / f"dev00{i}.npz"),
                                  "--device-id", f"pi{i}", "--once"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(2)
    ]
    hub = _run(["hub", *common, "--dataset", "synthetic", "--rounds", "2", "--min-devices", "2", "--lr", "0.05",
                "--runs-dir", str(tmp_path), "--run-id", "home-run", "--wait-devices", "60"], timeout=240, env=env)
    assert hub.returncode == 0, hub.stderr[-3000:]
    summary = json.loads((tmp_path / "home-run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] > 0.3
    for name in ("final_model.fedge", "final_model.onnx"):  # the hub exports every run's final model
        assert (tmp_path / "home-run" / name).stat().st_size > 0
    for proc in agents:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-2000:]
        assert "hub announced the run finished" in out
        assert "trained 2 round(s)" in out
    status = _retained(mosquitto_url, f"{topic_prefix}/home/dev/pi0/status")
    assert status is not None and status["state"] == "offline"


def test_agent_shuts_down_cleanly_on_sigterm(tmp_path, mosquitto_url, topic_prefix):
    proc = subprocess.Popen(
        FEDGE + ["agent", "--broker", mosquitto_url, "--topic-prefix", topic_prefix, "--fleet", "sig",
                 "--device-id", "pi-sig", "--data", "synthetic"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    topic = f"{topic_prefix}/sig/dev/pi-sig/status"
    deadline = time.time() + 60
    status = None
    while time.time() < deadline:
        status = _retained(mosquitto_url, topic, timeout=1)
        if status and status["state"] == "online":
            break
    assert status and status["state"] == "online" and status["num_samples"] == 1000
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]
    assert "received SIGTERM" in out
    assert _retained(mosquitto_url, topic)["state"] == "offline"


@pytest.mark.parametrize("url", ["http://x", "mqtt://"])
def test_bad_broker_url_is_rejected(url):
    with pytest.raises(ValueError, match="broker URL"):
        BrokerConfig.from_url(url)


def test_bad_number_list_and_corrupt_data_file_are_clear_errors(tmp_path):
    out = _run(["partition", "--dataset", "synthetic", "--devices", "2", "--sizes", "100,lots", "--out", str(tmp_path)])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "fedge partition: error: --sizes '100,lots'" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "dev000.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip file")
    out = _run(["agent", "--broker", "mqtt://127.0.0.1:1", "--data", str(bad), "--profile", "sim"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"fedge agent: error: --data {bad}: not a readable .npz" in out.stderr and "Traceback" not in out.stderr


def _patched_profiles(monkeypatch, exc: BaseException) -> None:
    """Make `fedge profiles` raise `exc` from inside the subcommand."""
    import fedge.cli

    def broken(args):
        raise exc

    monkeypatch.setattr(fedge.cli, "_run_profiles", broken)


@pytest.mark.parametrize("exc", [ConfigError("--flag 3: must be even"), DataError("x.npz: truncated"),
                                 ConnectionError("no broker at mqtt://127.0.0.1:1"),
                                 PermissionError(13, "Permission denied", "/var/lib/fedge")])
def test_fedge_and_connection_errors_are_one_line_and_exit_2(monkeypatch, capsys, exc):
    from fedge.cli import main

    _patched_profiles(monkeypatch, exc)
    assert main(["profiles"]) == 2
    assert capsys.readouterr().err == f"fedge profiles: error: {exc}\n"


@pytest.mark.parametrize("exc", [TypeError("unsupported operand"), KeyError("net.1.scores"),
                                 ValueError("a library's internal check")])
def test_programming_errors_keep_their_traceback(monkeypatch, capsys, exc):
    """A bug inside a subcommand must not be dressed up as bad input (exit 2, "error: ...")."""
    from fedge.cli import main

    _patched_profiles(monkeypatch, exc)
    with pytest.raises(type(exc)) as raised:
        main(["profiles"])
    assert raised.value is exc
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, strategy, options", [
    (["fleet", "--strategy", "fedavgm", "--server-momentum", "0.9", "--server-lr", "0.5"], "fedavgm",
     {"server_momentum": 0.9, "server_lr": 0.5}),
    (["fleet", "--strategy", "fedprox", "--proximal-mu", "0.01"], "fedprox", {"proximal_mu": 0.01}),
    (["hub", "--strategy", "trimmed-mean", "--trim-fraction", "0.2"], "trimmed-mean", {"trim_fraction": 0.2}),
    (["hub", "--strategy", "krum", "--byzantine", "2"], "krum", {"byzantine": 2}),
])
def test_strategy_options_reach_the_run_config_and_persist(argv, strategy, options):
    from fedge.cli import build_parser
    from fedge.cli.hub import _apply_round_args, fleet_config_from_args
    from fedge.hub.config import HubConfig

    args = build_parser().parse_args(argv)
    if argv[0] == "fleet":
        cfg = fleet_config_from_args(args).hub
    else:
        cfg = HubConfig()
        _apply_round_args(cfg, args)
    assert (cfg.strategy, cfg.strategy_options) == (strategy, options)
    back = HubConfig.from_json(json.loads(json.dumps(cfg.to_json())))  # what the run store keeps for --resume
    assert (back.strategy, back.strategy_options) == (strategy, options)
    built = back.make_strategy()
    assert built.name == strategy and all(getattr(built, k) == v for k, v in options.items())


def test_strategy_option_for_another_strategy_is_a_clear_error():
    out = _run(["fleet", "--strategy", "median", "--server-momentum", "0.9", "--no-progress"])
    assert out.returncode == 2
    assert "strategy median has no option server_momentum" in out.stderr, out.stderr
    assert "--proximal-mu" in _run(["hub", "--help"]).stdout


def test_fleet_per_device_is_kept_with_devices():
    """--per-device with --devices sizes each device (1,000 devices x 60 images); without it the
    whole training set is split over the devices."""
    from fedge.cli import build_parser
    from fedge.cli.hub import fleet_config_from_args

    def part(*argv: str):  # noqa: ANN202
        return fleet_config_from_args(build_parser().parse_args(["fleet", "--dataset", "synthetic", *argv])).partition

    assert part("--devices", "1000", "--partition", "iid", "--per-device", "60").per_device == 60
    assert part("--devices", "1000", "--partition", "iid").per_device is None
