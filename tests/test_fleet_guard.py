"""What a device must not accept from above, over a private Mosquitto locked down as
docs/operations.md says (no anonymous clients, passwords, the ACL of `fedge acl` for two fleets
appended into one file, signed models and tasks):

- fleet isolation: a device of fleet A can neither publish on fleet B's topics of the same
  device name nor read B's model, round task or hub status, while its own fleet works;
- replays: a recorded signed task + model of an earlier run is not trained, a `finished` of an
  earlier run does not end the current one, `serve` does not roll back to an earlier run's or
  an older version, a message signed for another fleet is refused; all of it also after a
  device restart (the guard file), while a genuinely new run is accepted.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedge.hub.acl import device_user, hub_user_of, mosquitto_acl, set_passwords
from fedge.models.wire import decode
from fedge.models.wire.messages import TaskMessage, build_model_message, build_task_message, parse_update
from fedge.models.wire.topics import Topics
from fedge.models.wire.transport import BrokerConfig, MqttLink

from .inbox import Inbox
from .mosquitto_proc import MosquittoProcess

pytestmark = pytest.mark.usefixtures("private_mosquitto_tools")

FLEETS = ("fleet-a", "fleet-b")
DEVICE = "pi"  # the same device name in both fleets


@pytest.fixture(scope="module")
def locked_broker():
    """One Mosquitto for two fleets: `fedge acl` output of each fleet appended into one file."""
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix="fedge-fleets-"))
    folder.chmod(0o755)  # mosquitto started as root reads it as user 'mosquitto'
    users = [hub_user_of(f) for f in FLEETS] + [device_user(f, DEVICE) for f in FLEETS]
    passwords = {user: secrets.token_urlsafe(12) for user in users}
    passwd = set_passwords(folder / "passwd", passwords.items())
    passwd.chmod(0o644)
    acl = folder / "fedge.acl"
    acl.write_text("".join(mosquitto_acl(f, [DEVICE], prefix) for f in FLEETS))
    acl.chmod(0o644)
    broker = MosquittoProcess(folder / "broker", allow_anonymous=False,
                              extra_config=f"password_file {passwd}\nacl_file {acl}\n").start()
    yield {"broker": broker, "prefix": prefix, "passwords": passwords}
    broker.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _cfg(env, user: str) -> BrokerConfig:
    return BrokerConfig(host="127.0.0.1", port=env["broker"].port, username=user, password=env["passwords"][user])


def _link(cfg: BrokerConfig, subs: dict[str, Inbox] | None = None) -> MqttLink:
    link = MqttLink(cfg, client_id=f"guard-test-{secrets.token_hex(4)}", clean_session=True)
    for topic, inbox in (subs or {}).items():
        link.subscribe(topic, inbox)
    link.start(timeout=10)
    time.sleep(0.3)  # SUBACKs
    return link


def _publish(link: MqttLink, topic: str, payload: bytes) -> None:
    link.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)


# ----------------------------------------------------------------------------- isolation
def test_appended_acls_keep_two_fleets_apart(locked_broker):
    env = locked_broker
    a, b = (Topics(f, env["prefix"]) for f in FLEETS)
    hub_a_inbox, hub_b_inbox, dev_inbox = Inbox(), Inbox(), Inbox()
    hub_a = _link(_cfg(env, hub_user_of(FLEETS[0])), {a.all_device_updates: hub_a_inbox})
    hub_b = _link(_cfg(env, hub_user_of(FLEETS[1])), {b.all_device_updates: hub_b_inbox})
    # the device of fleet A subscribes to its own fleet's topics and tries fleet B's
    dev_a = _link(_cfg(env, device_user(FLEETS[0], DEVICE)),
                  {a.model: dev_inbox, b.model: dev_inbox, b.round: dev_inbox, b.hub_status: dev_inbox,
                   f"{b.base}/#": dev_inbox})
    try:
        dev_a.publish(b.device_update(DEVICE), b"A's pi posing as B's pi", qos=1).wait_for_publish(5)
        dev_a.publish(b.device_status(DEVICE), b"A's pi status in B", qos=1).wait_for_publish(5)
        dev_a.publish(a.device_update(DEVICE), b"A's pi in its own fleet", qos=1).wait_for_publish(5)
        _publish(hub_b, b.model, b"B's model")
        _publish(hub_b, b.round, b"B's task")
        _publish(hub_b, b.hub_status, b"B's hub status")
        _publish(hub_a, a.model, b"A's model")
        # the controls: the device works in its own fleet, in both directions
        assert hub_a_inbox.wait(lambda t, p: p == b"A's pi in its own fleet"), hub_a_inbox.items
        assert dev_inbox.wait(lambda t, p: p == b"A's model"), dev_inbox.items
        time.sleep(1.5)
        assert not [p for _, p in hub_b_inbox.items], hub_b_inbox.items  # nothing of A's pi reached B's hub
        assert not [t for t, _ in dev_inbox.items if t.startswith(b.base)], dev_inbox.items  # read nothing of B
        # and the device of fleet B is not blocked by fleet A's section (same device name)
        dev_b_inbox = Inbox()
        dev_b = _link(_cfg(env, device_user(FLEETS[1], DEVICE)), {b.model: dev_b_inbox, a.model: dev_b_inbox})
        dev_b.publish(b.device_update(DEVICE), b"B's pi", qos=1).wait_for_publish(5)
        assert hub_b_inbox.wait(lambda t, p: p == b"B's pi")
        assert dev_b_inbox.wait(lambda t, p: p == b"B's model")
        time.sleep(0.5)
        assert all(t == b.model for t, _ in dev_b_inbox.items), dev_b_inbox.items
        dev_b.stop()
    finally:
        for link in (hub_a, hub_b, dev_a):
            for topic in (a.model, b.model, b.round, b.hub_status):
                if link in (hub_a, hub_b) and topic.startswith((a if link is hub_a else b).base):
                    _publish(link, topic, b"")  # clear retained messages for the next test
            link.stop()


# ----------------------------------------------------------------------------- replays
@pytest.fixture
def keys(tmp_path):
    from fedge.cli import main

    folder = tmp_path / "keys"
    assert main(["keys", "init", "--dir", str(folder)]) == 0
    assert main(["keys", "enroll", DEVICE, "--dir", str(folder)]) == 0
    return folder


class Run:
    """A hub run (a real Hub, constructed but not run) and its genuine signed messages."""

    def __init__(self, env, keys: Path, store_dir: Path, data) -> None:  # noqa: ANN001
        from fedge.hub.config import HubConfig
        from fedge.hub.hub import Hub
        from fedge.hub.store import RunStore

        cfg = HubConfig(fleet=FLEETS[0], prefix=env["prefix"], model="mlp", keys_dir=str(keys),
                        in_shape=data.in_shape, num_classes=data.num_classes, train={"lr": 0.05, "batch_size": 32})
        self.hub = Hub(cfg, _cfg(env, hub_user_of(FLEETS[0])), RunStore(store_dir))
        self.run_id, self.epoch = self.hub.run_id, self.hub.epoch

    def model(self, version: int = 0) -> bytes:
        return self.hub.model_payload(version, self.hub.global_state)

    def task(self, state: str = "open", selected: tuple[str, ...] = (DEVICE,), version: int = 0) -> bytes:
        task = TaskMessage(fleet=FLEETS[0], run=self.run_id, round=version + 1, model_version=version,
                           selected=list(selected), deadline=time.time() + 120, train={"epochs": 1}, state=state,
                           epoch=self.epoch)
        return build_task_message(task, self.hub._signer)


@pytest.fixture
def fleet_a(locked_broker, keys, tmp_path, small_data):
    """Fleet A's hub link (for publishing), an inbox of device updates, and a factory of runs."""
    env = locked_broker
    t = Topics(FLEETS[0], env["prefix"])
    updates, statuses = Inbox(), Inbox()
    hub = _link(_cfg(env, hub_user_of(FLEETS[0])), {t.all_device_updates: updates, t.all_device_status: statuses})
    count = iter(range(100))
    yield {"env": env, "topics": t, "hub": hub, "updates": updates, "statuses": statuses,
           "run": lambda: Run(env, keys, tmp_path / "runs" / f"run{next(count)}", small_data)}
    for topic in (t.model, t.round, t.device_status(DEVICE)):
        _publish(hub, topic, b"")
    hub.stop()


def _agent(fleet, keys: Path, guard_file: Path | None, data):  # noqa: ANN001, ANN202
    from fedge.edge_agent.agent import Agent
    from fedge.edge_agent.pool import TrainingPool
    from fedge.edge_agent.profile import load_profile
    from fedge.models.wire.freshness import RunGuard
    from fedge.models.wire.keys import HUB_PUBLIC, hub_verifier, read_device_key

    profile = dataclasses.replace(load_profile("sim"), model="mlp")
    pool = TrainingPool(workers=1, threads_per_worker=1)
    agent = Agent(DEVICE, profile, _cfg(fleet["env"], device_user(FLEETS[0], DEVICE)), fleet["topics"], data,
                  10, pool, hub_verifier=hub_verifier(keys / HUB_PUBLIC),
                  device_key=read_device_key(keys / "devices" / f"{DEVICE}.key"),
                  guard=RunGuard(FLEETS[0], guard_file))
    agent.start()
    time.sleep(0.3)
    return agent, pool


def _trained(fleet, run: Run, timeout: float = 20.0) -> bool:
    """Did the device answer a task of `run` (a tagged update naming that run)?"""
    def match(topic: str, payload: bytes) -> bool:
        try:
            return bool(payload) and parse_update(decode(payload)).run == run.run_id
        except ValueError:
            return False
    return fleet["updates"].wait(match, timeout)


def _stop(agent, pool) -> None:  # noqa: ANN001
    agent.stop()
    pool.close()


def test_a_replayed_earlier_run_is_not_trained_even_after_a_restart(fleet_a, keys, tmp_path, small_data):
    t, hub = fleet_a["topics"], fleet_a["hub"]
    data = small_data.train.subset(np.arange(256))
    earlier, current = fleet_a["run"](), fleet_a["run"]()
    assert earlier.epoch < current.epoch
    guard_file = tmp_path / "device" / "seen.json"

    # control: the recorded earlier run is a working attack on a device that has no guard state
    naive, naive_pool = _agent(fleet_a, keys, tmp_path / "naive" / "seen.json", data)
    _publish(hub, t.model, earlier.model())
    _publish(hub, t.round, earlier.task())
    assert _trained(fleet_a, earlier), "the control device should train the earlier run's task"
    _stop(naive, naive_pool)
    _publish(hub, t.round, b"")  # clear the retained replay: the next device starts before any run
    _publish(hub, t.model, b"")
    time.sleep(0.3)
    fleet_a["updates"].items.clear()

    agent, pool = _agent(fleet_a, keys, guard_file, data)
    try:
        _publish(hub, t.model, current.model())  # the current run: trained
        _publish(hub, t.round, current.task())
        assert _trained(fleet_a, current)
        _publish(hub, t.model, earlier.model())  # the replay of the earlier run: refused
        _publish(hub, t.round, earlier.task())
        assert not _trained(fleet_a, earlier, timeout=3.0)
        assert agent.guard.refused >= 1 and "earlier run" in agent.guard.last_refusal
        # the reason shows in the device's retained status
        assert fleet_a["statuses"].wait(lambda tp, p: b"earlier run" in p), fleet_a["statuses"].items
    finally:
        _stop(agent, pool)
    assert guard_file.exists()

    # a restart: the replay (still retained on the broker) is refused from the guard file...
    agent, pool = _agent(fleet_a, keys, guard_file, data)
    try:
        assert agent.guard.newest is not None and agent.guard.newest.epoch == current.epoch
        assert not _trained(fleet_a, earlier, timeout=3.0)
        assert agent.guard.refused >= 1
        # ...and a genuinely new run is accepted
        newer = fleet_a["run"]()
        _publish(hub, t.model, newer.model())
        _publish(hub, t.round, newer.task())
        assert _trained(fleet_a, newer)
        assert agent.guard.newest.run == newer.run_id
    finally:
        _stop(agent, pool)


def test_a_replayed_finished_of_an_earlier_run_does_not_end_the_current_one(fleet_a, keys, tmp_path, small_data):
    t, hub = fleet_a["topics"], fleet_a["hub"]
    earlier, current = fleet_a["run"](), fleet_a["run"]()
    agent, pool = _agent(fleet_a, keys, tmp_path / "seen.json", small_data.train.subset(np.arange(64)))
    try:
        _publish(hub, t.round, current.task(selected=()))  # the current run is open (this device not selected)
        assert _wait(lambda: agent.guard.newest is not None and agent.guard.newest.run == current.run_id)
        _publish(hub, t.round, earlier.task(state="finished"))
        assert not agent.finished.wait(2.0)
        assert "earlier run" in (agent.guard.last_refusal or "")
        _publish(hub, t.round, current.task(state="finished"))  # control: the current run's end does end it
        assert agent.finished.wait(10)
    finally:
        _stop(agent, pool)


def test_messages_signed_for_another_fleet_are_refused(fleet_a, keys, tmp_path, small_data):
    """The same hub key signs two fleets' messages: the fleet id in the signed header decides."""
    from fedge.edge_agent.infer import LiveModel, ModelFollower
    from fedge.models.wire.keys import HUB_PUBLIC, hub_signer, hub_verifier

    t, hub = fleet_a["topics"], fleet_a["hub"]
    current = fleet_a["run"]()
    signer = hub_signer(keys)
    tensors = current.hub.global_state
    meta = {"in_shape": list(small_data.in_shape), "num_classes": small_data.num_classes}
    other_model = build_model_message(FLEETS[1], current.run_id, 0, "mlp", tensors, meta=meta, signer=signer,
                                      epoch=current.epoch + 1)
    other_task = build_task_message(TaskMessage(
        fleet=FLEETS[1], run=current.run_id, round=1, model_version=0, selected=[DEVICE], deadline=time.time() + 60,
        train={}, state="open", epoch=current.epoch + 1), signer)
    agent, pool = _agent(fleet_a, keys, tmp_path / "seen.json", small_data.train.subset(np.arange(64)))
    live = LiveModel()
    follower = ModelFollower(live, fleet=FLEETS[0], verifier=hub_verifier(keys / HUB_PUBLIC),
                             guard_file=tmp_path / "serve-seen.json")
    follower.connect(_cfg(fleet_a["env"], device_user(FLEETS[0], DEVICE)), prefix=fleet_a["env"]["prefix"])
    try:
        _publish(hub, t.model, other_model)
        _publish(hub, t.round, other_task)
        assert _wait(lambda: follower.rejected >= 1)
        assert "fleet" in follower.last_error and live.peek() is None
        assert not _trained(fleet_a, current, timeout=2.0)
        assert agent.guard.newest is None  # nothing of the other fleet moved the device's position
        _publish(hub, t.model, current.model(1))  # control: its own fleet's (trained) model is served
        assert live.wait_for(lambda p: p is not None, 20)
    finally:
        follower.stop()
        _stop(agent, pool)


def test_serve_does_not_roll_back_to_a_replayed_model(fleet_a, keys, tmp_path):
    from fedge.edge_agent.infer import LiveModel, ModelFollower
    from fedge.models.wire.keys import HUB_PUBLIC, hub_verifier

    t, hub = fleet_a["topics"], fleet_a["hub"]
    earlier, current = fleet_a["run"](), fleet_a["run"]()
    guard_file = tmp_path / "serve" / "seen.json"

    def follow() -> tuple[LiveModel, ModelFollower]:
        live = LiveModel()
        follower = ModelFollower(live, fleet=FLEETS[0], verifier=hub_verifier(keys / HUB_PUBLIC), guard_file=guard_file)
        follower.connect(_cfg(fleet_a["env"], device_user(FLEETS[0], DEVICE)), prefix=fleet_a["env"]["prefix"])
        return live, follower

    def serving(live: LiveModel) -> tuple[str, int] | None:
        pred = live.peek()
        return (pred.info.get("run"), pred.info.get("version")) if pred else None

    live, follower = follow()
    try:
        _publish(hub, t.model, current.model(0))  # a run's untrained version 0 is never served
        assert _wait(lambda: follower.ignored >= 1) and live.peek() is None
        _publish(hub, t.model, current.model(1))
        assert _wait(lambda: serving(live) == (current.run_id, 1))
        for replay, why in ((earlier.model(1), "earlier run"), (current.model(0), "older than the accepted")):
            rejected = follower.rejected
            _publish(hub, t.model, replay)
            assert _wait(lambda r=rejected: follower.rejected > r), follower.status()
            assert why in follower.last_error
            assert serving(live) == (current.run_id, 1)
        assert live.swaps == 1
    finally:
        follower.stop()
    # after a restart the retained replay is still refused; a new run is followed from its first trained version
    live, follower = follow()
    try:
        assert _wait(lambda: follower.rejected >= 1) and live.peek() is None
        newer = fleet_a["run"]()
        _publish(hub, t.model, newer.model(0))
        assert _wait(lambda: follower.ignored >= 1) and live.peek() is None
        _publish(hub, t.model, newer.model(1))
        assert _wait(lambda: serving(live) == (newer.run_id, 1))
    finally:
        follower.stop()


def _wait(predicate, timeout: float = 10.0) -> bool:  # noqa: ANN001
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
