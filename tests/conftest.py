"""Shared fixtures: real brokers (embedded amqtt and the machine's Mosquitto), unique topic
prefixes so concurrent runs never see each other's messages, and small generated data."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from urllib.parse import urlparse

import pytest

MOSQUITTO_URL = os.environ.get("FEDGE_TEST_BROKER", "mqtt://127.0.0.1:1883")
# CI (.ci/run) sets FEDGE_REQUIRE_ALL=1 (FEDGE_REQUIRE_MOSQUITTO=1 still works): then nothing that
# should run may skip; a missing broker, binary or data set fails the test with its reason.
REQUIRE_ALL = bool(os.environ.get("FEDGE_REQUIRE_ALL") or os.environ.get("FEDGE_REQUIRE_MOSQUITTO"))


def skip_or_fail(reason: str) -> None:
    """Skip on a developer machine; fail under CI, where a missing requirement is a broken set-up."""
    if REQUIRE_ALL:
        pytest.fail(f"required but missing (FEDGE_REQUIRE_ALL): {reason}", pytrace=False)
    pytest.skip(reason)


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 1883), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def embedded_broker():
    from fedge.hub.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    yield broker.url
    broker.stop()


@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    if not _reachable(MOSQUITTO_URL):
        skip_or_fail(f"no Mosquitto at {MOSQUITTO_URL} (start it, or set FEDGE_TEST_BROKER)")
    return MOSQUITTO_URL


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    """The mosquitto binary, for tests that start a private broker."""
    from .mosquitto_proc import mosquitto_binary

    binary = mosquitto_binary()
    if binary is None:
        skip_or_fail("mosquitto binary not installed (apt-get install mosquitto)")
    return binary


@pytest.fixture(scope="session")
def mosquitto_passwd_bin() -> str:
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        skip_or_fail("mosquitto_passwd not installed (apt-get install mosquitto)")
    return binary


@pytest.fixture(scope="session")
def private_mosquitto_tools(mosquitto_bin: str, mosquitto_passwd_bin: str) -> None:
    """For modules that start their own Mosquitto with passwords and an ACL
    (`pytestmark = pytest.mark.usefixtures("private_mosquitto_tools")`)."""


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_url(request) -> str:
    """Each MQTT integration test runs against both real brokers."""
    if request.param == "embedded":
        return request.getfixturevalue("embedded_broker")
    return request.getfixturevalue("mosquitto_url")


@pytest.fixture
def topic_prefix() -> str:
    return f"fedge-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def small_data():
    from fedge.models.data import synthetic

    return synthetic(n_train=1600, n_test=400, seed=1)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    from .fault_tally import TALLY

    if TALLY.faults:
        terminalreporter.write_line(
            f"fault suite: {TALLY.faults} faults injected, {TALLY.rounds} rounds completed, "
            f"{TALLY.lost} updates lost"
        )
