"""The hub's status port during live runs: the page as a real headless Chromium renders it,
/status.json, Prometheus /metrics scraped while values move, `fedge fleet --status-port`,
and the port's errors (a busy port, writes, unknown paths)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fedge.hub.admission import REASON_CODES, Reason
from fedge.hub.config import HubConfig
from fedge.hub.sim.fleet import Fleet, FleetConfig
from fedge.hub.status_server import StatusServer, render_page
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec
from fedge.models.spec import ModelSpec
from fedge.models.wire import Topics
from fedge.models.wire.messages import status_payload

from .conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 32}
EVIL_ID = "<img src=x onerror=document.title='pwned'>"  # a device id is a topic level: any text but '/'


@pytest.fixture(scope="session")
def chromium_bin() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    skip_or_fail("chromium not installed (apt-get install chromium): the status page is tested in headless Chromium")
    raise AssertionError("unreachable")


def _fleet_config(tmp_path, devices: int, rounds: int, model: ModelSpec | str = "mlp", **hub) -> FleetConfig:
    hub_cfg = HubConfig(fleet="status", model=model, rounds=rounds, deadline_s=120, seed=1, train=TRAIN, **hub)
    return FleetConfig(devices=devices, dataset="synthetic", partition=PartitionSpec("iid", per_device=200),
                       transport="inproc", workers=2, runs_dir=str(tmp_path), progress=False, seed=1, hub=hub_cfg)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


# --------------------------------------------------------------------------- the page in Chromium
class _Node:
    def __init__(self, tag: str, attrs: dict[str, str | None]) -> None:
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], []

    def all_text(self) -> str:
        return "".join(self.text + [c.all_text() for c in self.children])

    def find_all(self, tag: str) -> list[_Node]:
        found = [c for c in self.children if c.tag == tag]
        return found + [n for c in self.children for n in c.find_all(tag)]


class _Dom(HTMLParser):
    """The DOM Chromium serialised (--dump-dom): elements by id, their text and descendants."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "line", "circle"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.root = _Node("#root", {})
        self.stack = [self.root]
        self.by_id: dict[str, _Node] = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        node = _Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if node.attrs.get("id"):
            self.by_id[node.attrs["id"]] = node
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag in self.VOID:
            return
        while len(self.stack) > 1 and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data):  # noqa: ANN001
        self.stack[-1].text.append(data)

    def text(self, element_id: str) -> str:
        return self.by_id[element_id].all_text().strip()


def _dump_dom(chromium: str, url: str, tmp_path) -> str:
    """The page after its scripts ran: --virtual-time-budget lets its 2 s poll of status.json fire."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "<body" in out.stdout, out.stderr[-3000:]
    return out.stdout


def test_status_page_in_headless_chromium_during_a_live_run(chromium_bin, tmp_path, small_data):
    """Round 3 held open: dev002 never answers it, dev003 went offline after round 1, a device
    with an HTML id announced itself, and a garbage update was rejected. Chromium must show it all."""
    release = threading.Event()
    config = _fleet_config(tmp_path, devices=4, rounds=20, model=ModelSpec("mlp", {"hidden": 64}), quorum=0.75, min_devices=3)
    with Fleet(config, dataset=small_data) as fleet:
        hub = fleet.make_hub()

        def stall_from_round_3(global_state, local_state):  # noqa: ANN001, ANN202
            if hub.store.last_round() >= 2:  # training for round 3: hold the answer until the test is done
                release.wait(300)
            return local_state

        fleet.agents[2].publish_delay_s = 0.01  # answers from a timer thread, so the stall blocks no trainer
        fleet.agents[2].tamper = stall_from_round_3
        topics = Topics(hub.config.fleet, hub.config.prefix)
        runner = threading.Thread(target=hub.run, daemon=True)
        with StatusServer(hub.status) as server:
            runner.start()
            try:
                hub.wait_for_round(1, 60)
                fleet.agents[3].stop()  # offline from now on: listed with its last seen
                assert fleet.inproc is not None
                fleet.inproc.publish(topics.device_update("dev001"), b"not an envelope")
                fleet.inproc.publish(f"{topics.base}/dev/{EVIL_ID}/status", status_payload(  # a raw topic: Topics refuses the id
                    "offline", device=EVIL_ID, profile={"name": "</script><b id='bold'>x</b>"}), retain=True)
                hub.wait_for_round(3, 120, min_updates=2)  # and it stays open: 2 answers, 3 needed
                dom = _Dom(_dump_dom(chromium_bin, server.url, tmp_path))
            finally:
                release.set()
                hub.stop()
                runner.join(60)
    body = dom.root.find_all("body")[0]
    assert int(body.attrs["data-polls"]) >= 1  # the script fetched status.json itself, not only the inlined snapshot
    assert dom.text("round-number") == "3"
    assert "· mlp(hidden=64) ·" in dom.text("runline")  # the model's spec: its name and options
    assert dom.text("phase") == "collecting"
    minutes, seconds = map(int, re.fullmatch(r"(\d\d):(\d\d)", dom.text("countdown")).groups())
    assert 0 < 60 * minutes + seconds <= 120  # counting down to the 120 s deadline
    assert dom.text("answers").startswith("2/")
    assert "stage 1/1 (train)" in dom.text("round-detail") and "2/20 rounds done" in dom.text("round-detail")
    rows = {r.find_all("td")[0].all_text(): r.all_text() for r in dom.by_id["devices"].find_all("tr")[1:]}
    assert set(rows) == {"dev000", "dev001", "dev002", "dev003", EVIL_ID}
    for device in ("dev000", "dev001", "dev002"):
        assert "online" in rows[device] and "sim" in rows[device] and "200" in rows[device], rows[device]
    assert "offline" in rows["dev003"] and ("ago" in rows["dev003"] or "just now" in rows["dev003"])
    assert "answered" in rows["dev000"] and "selected, training" in rows["dev002"]
    assert "bold" not in dom.by_id and not dom.by_id["devices"].find_all("img")  # device text stays text
    assert "</script><b id='bold'>x</b>" in rows[EVIL_ID]
    assert "pwned" not in dom.root.find_all("title")[0].all_text()
    assert dom.text("online") == "3"
    assert dom.text("headline-label").startswith("accuracy")
    assert dom.text("headline").endswith("%")
    for chart, points in (("chart-headline", 2), ("chart-bytes", 4), ("chart-seconds", 2)):
        svg = dom.by_id[chart]
        assert svg.attrs["data-points"] == str(points), chart
        assert svg.find_all("polyline") and len(svg.find_all("circle")) == points, chart
    rejections = dom.by_id["rejections"].all_text()
    assert "dev001" in rejections and "envelope" in rejections.lower()
    assert "bad_envelope × 1" in dom.text("rejection-codes")


def test_status_names_the_devices_that_declined_the_open_round(chromium_bin, tmp_path, small_data):
    """dev001's task has 4 classes, so it refuses the hub's 10-class model (task_checks.check_input),
    dev002 holds its answer: the round stays open, and status.json, /metrics and the page in
    Chromium say that dev001 declined it and why (issue 12's refusals on issue 11's page)."""
    release = threading.Event()
    with Fleet(_fleet_config(tmp_path, devices=3, rounds=2), dataset=small_data) as fleet:
        hub = fleet.make_hub()
        fleet.agents[1].num_classes = 4  # its data's task: 4 classes, not the model's 10

        def hold(global_state, local_state):  # noqa: ANN001, ANN202
            release.wait(300)
            return local_state

        fleet.agents[2].publish_delay_s = 0.01  # answers from a timer thread, so the hold blocks no trainer
        fleet.agents[2].tamper = hold
        runner = threading.Thread(target=hub.run, daemon=True)
        with StatusServer(hub.status) as server:
            runner.start()
            try:
                hub.wait_for_round(1, 60, min_updates=1)
                end = time.monotonic() + 60
                while time.monotonic() < end and not (hub.status()["round"] or {}).get("declined"):
                    time.sleep(0.1)
                status = json.loads(_get(server.url + "status.json"))
                metrics = _scrape(server.url)
                dom = _Dom(_dump_dom(chromium_bin, server.url, tmp_path))
            finally:
                release.set()
                hub.stop()
                runner.join(60)
    declined = status["round"]["declined"]
    assert list(declined) == ["dev001"] and declined["dev001"]["kind"] == "refused"
    assert declined["dev001"]["reason"].startswith("the model has 10 classes, this device's task has 4")
    assert status["round"]["answered"] == ["dev000"]  # dev002 still holds its answer: the round stays open
    assert {d["id"]: d["declined"] for d in status["devices"]} == {"dev000": None, "dev001": "refused", "dev002": None}
    assert metrics[("fedge_round_declined", ())] == 1 and metrics[("fedge_round_answers", ())] == 1
    assert dom.text("answers").startswith("1/3 answered, 1 declined")
    rows = {r.find_all("td")[0].all_text(): r.all_text() for r in dom.by_id["devices"].find_all("tr")[1:]}
    assert "refused: the model has 10 classes, this device's task has 4" in rows["dev001"]
    assert "answered" in rows["dev000"] and "selected, training" in rows["dev002"]


# --------------------------------------------------------------------------- /metrics
def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(_get(url + "metrics")):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_are_scraped_during_a_run_and_move(tmp_path, small_data):
    with Fleet(_fleet_config(tmp_path, devices=3, rounds=3), dataset=small_data) as fleet:
        hub = fleet.make_hub()
        runner = threading.Thread(target=hub.run, daemon=True)
        with StatusServer(hub.status) as server:
            runner.start()
            try:
                hub.wait_for_round(1, 60)
                first = _scrape(server.url)
                fleet.inproc.publish(Topics(hub.config.fleet, hub.config.prefix).device_update("dev000"), b"\x00junk")
                hub.wait_for_round(2, 60)
                second = _scrape(server.url)
                runner.join(120)
                assert not runner.is_alive()
                last = _scrape(server.url)
            finally:
                hub.stop()
                runner.join(60)

    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value(first, "fedge_devices_online") == 3
    assert value(first, "fedge_round_open") == 1
    assert 0 < value(first, "fedge_round_seconds_left") <= 120
    assert value(first, "fedge_rounds_completed_total") == 0
    assert value(first, "fedge_round_duration_seconds_count") == 0
    assert value(first, "fedge_headline_metric", metric="accuracy") is None  # nothing evaluated yet
    assert value(first, "fedge_updates_rejected_total", reason="bad_envelope") == 0
    info = [k for k in first if k[0] == "fedge_run_info"]
    assert dict(info[0][1])["run"] == hub.run_id and dict(info[0][1])["headline"] == "accuracy"
    assert dict(info[0][1])["model"] == "mlp" and dict(info[0][1])["model_options"] == "{}"

    assert value(second, "fedge_rounds_completed_total") == 1
    assert value(second, "fedge_updates_rejected_total", reason="bad_envelope") == 1
    assert value(second, "fedge_updates_accepted_total") >= 3
    assert value(second, "fedge_bytes_in_total") > 0 and value(second, "fedge_bytes_out_total") > 0
    assert value(last, "fedge_rounds_completed_total") == 3
    assert value(last, "fedge_round_duration_seconds_count") == 3
    assert value(last, "fedge_round_duration_seconds_bucket", le="+Inf") == 3
    assert value(last, "fedge_round_duration_seconds_sum") > 0
    assert value(last, "fedge_updates_accepted_total") == 9
    assert value(last, "fedge_bytes_in_total") > value(second, "fedge_bytes_in_total")
    assert value(last, "fedge_bytes_out_total") > value(second, "fedge_bytes_out_total")
    assert value(last, "fedge_model_version") == 3
    assert value(last, "fedge_round_open") == 0
    # the model learned, and the gauge follows it: accuracy after round 3 above round 1's and chance (0.1)
    accuracy_1 = value(second, "fedge_headline_metric", metric="accuracy")
    accuracy_3 = value(last, "fedge_headline_metric", metric="accuracy")
    assert accuracy_3 > accuracy_1 and accuracy_3 > 0.5, (accuracy_1, accuracy_3)
    assert value(last, "fedge_model_metric", metric="accuracy") == accuracy_3
    assert value(last, "fedge_model_metric", metric="loss") > 0
    assert {dict(k[1])["reason"] for k in last if k[0] == "fedge_updates_rejected_total"} == set(REASON_CODES) - {"duplicate"}
    # each hub has its own registry: nothing in the process-wide default one
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("fedge")]
    # every metric a run exports is in the operations guide's table
    exported = {re.sub(r"_(bucket|count|sum)$", "", name) for name, _ in last}
    assert exported == set(_documented_metrics()), exported ^ set(_documented_metrics())


def _operations_doc() -> str:
    return (REPO / "docs" / "operations.md").read_text()


def _documented_metrics() -> list[str]:
    return re.findall(r"^\| `(fedge_[a-z_]+)` \|", _operations_doc(), flags=re.M)


def test_operations_doc_has_a_valid_grafana_dashboard_and_every_reason_code():
    doc = _operations_doc()
    grafana = doc[doc.index("#### Grafana"):]
    dashboard = json.loads(grafana[grafana.index("```json") + 7:grafana.index("```", grafana.index("```json") + 7)])
    metrics = set(_documented_metrics())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"fedge_[a-z_]+", e)}
    assert used and used <= metrics, used - metrics
    for code in set(REASON_CODES) - {"duplicate"}:
        assert f"| `{code}` |" in doc, code


# --------------------------------------------------------------------------- the CLI flag
def test_fleet_command_serves_its_hub_status(tmp_path):
    """`fedge fleet --status-port 0`: the URL is printed, status.json and /metrics answer during the run."""
    cmd = [sys.executable, "-m", "fedge.cli", "fleet", "--dataset", "synthetic", "--partition", "iid", "--devices", "3",
           "--rounds", "25", "--transport", "inproc", "--runs-dir", str(tmp_path), "--run-id", "watched", "--no-progress",
           "--status-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            found = re.match(r"status page: (http://127\.0\.0\.1:\d+/) ", line)
            if found:
                url = found.group(1)
                break
        assert url, "no 'status page:' line on stderr"
        seen_devices, status = 0, {}
        end = time.monotonic() + 120
        while time.monotonic() < end and not status.get("rounds_completed"):
            status = json.loads(_get(url + "status.json"))
            seen_devices = max(seen_devices, status["devices_online"])
            time.sleep(0.2)
        assert status["run"]["id"] == "watched" and seen_devices == 3
        assert status["history"][0]["headline"] is not None
        assert "fedge_rounds_completed_total" in _get(url + "metrics")
        assert "<svg" in _get(url)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err[-2000:]


def test_help_explains_the_status_port():
    for command in ("hub", "fleet"):
        out = subprocess.run([sys.executable, "-m", "fedge.cli", command, "--help"], capture_output=True, text=True,
                             timeout=120)
        text = " ".join(out.stdout.split())
        assert "--status-port PORT" in text and "--status-host HOST" in text, command
        assert "/metrics" in text and "127.0.0.1" in text and "countdown" in text


def test_busy_status_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"status port {port} on 127.0.0.1 is already in use"):
            StatusServer(lambda: {}, port=port)
        out = subprocess.run([sys.executable, "-m", "fedge.cli", "hub", "--broker", "mqtt://127.0.0.1:1", "--no-eval",
                              "--runs-dir", str(tmp_path), "--status-port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"status port {port} on 127.0.0.1 is already in use" in out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- read-only, safe to render
def test_status_port_is_read_only_and_names_its_paths(tmp_path, small_data):
    with Fleet(_fleet_config(tmp_path, devices=2, rounds=1), dataset=small_data) as fleet:
        hub = fleet.make_hub()
        with StatusServer(hub.status) as server:
            status = json.loads(_get(server.url + "status.json"))
            assert status["run"]["phase"] == "starting" and status["round"] is None and status["history"] == []
            for method in ("POST", "PUT", "DELETE"):
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(urllib.request.Request(server.url + "status.json", data=b"x", method=method))
                assert err.value.code == 501, method
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(server.url + "admin")
            assert err.value.code == 404 and "/status.json" in err.value.read().decode()


def test_inlined_snapshot_cannot_close_the_script():
    page = render_page({"devices": [{"id": "</script><script>alert(1)</script>"}]})
    assert "</script><script>alert(1)" not in page
    assert "\\u003c/script>\\u003cscript>alert(1)" in page


def test_every_rejection_has_a_known_code():
    assert Reason("late", "late or replayed").code == "late"
    with pytest.raises(ValueError, match="not in REASON_CODES"):
        Reason("made-up", "text")
