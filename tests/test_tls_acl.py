"""Nobody in who doesn't belong: a private Mosquitto with a TLS-only listener, passwords and
the ACL that `fedge acl` writes. A real hub and real agents (each device its own MQTT user)
train over mqtts with signed models and tagged updates; wrong passwords, plain TCP, unknown
CAs, devices writing or reading another device's topics are all stopped by the broker."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from fedge.hub.acl import device_user, mosquitto_acl, set_passwords
from fedge.models.wire.topics import Topics
from fedge.models.wire.transport import BrokerConfig, MqttLink

from .inbox import Inbox
from .mosquitto_proc import MosquittoProcess

pytestmark = pytest.mark.usefixtures("private_mosquitto_tools")

FLEET = "secure"
HUB_USER = "hub"
DEVICES = ("dev-a", "dev-b")


# ----------------------------------------------------------------------------- PKI
def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o644)  # mosquitto started as root reads it as user 'mosquitto'
    return path


def _make_ca(name: str):  # noqa: ANN202
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(ca_key, ca_cert):  # noqa: ANN001, ANN202
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def pki():
    """CA, a server certificate for 127.0.0.1/localhost, an unrelated CA, and a password file.

    In a folder of its own (not pytest's 0700 tmp tree) so that the 'mosquitto' user can read it.
    """
    from cryptography.hazmat.primitives import serialization

    folder = Path(tempfile.mkdtemp(prefix="fedge-tls-"))
    folder.chmod(0o755)
    ca_key, ca_cert = _make_ca("fedge test CA")
    server_key, server_cert = _make_server_cert(ca_key, ca_cert)
    _, other_ca = _make_ca("someone else's CA")
    pem = serialization.Encoding.PEM
    files = {
        "ca": _write_pem(folder / "ca.crt", ca_cert.public_bytes(pem)),
        "other_ca": _write_pem(folder / "other-ca.crt", other_ca.public_bytes(pem)),
        "cert": _write_pem(folder / "server.crt", server_cert.public_bytes(pem)),
        "key": _write_pem(folder / "server.key", server_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())),
    }
    passwords = {user: secrets.token_urlsafe(12) for user in (HUB_USER, *(device_user(FLEET, d) for d in DEVICES))}
    files["passwd"] = set_passwords(folder / "passwd", passwords.items())
    files["passwd"].chmod(0o644)
    yield {"dir": folder, "files": files, "passwords": passwords}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def secure_broker(pki, topic_prefix):
    """A private Mosquitto: TLS-only listener, no anonymous clients, passwords, the fleet's ACL."""
    workdir = Path(tempfile.mkdtemp(prefix="broker-", dir=pki["dir"]))
    workdir.chmod(0o755)
    acl = workdir / "fedge.acl"
    acl.write_text(mosquitto_acl(FLEET, DEVICES, topic_prefix, HUB_USER))
    acl.chmod(0o644)
    f = pki["files"]
    broker = MosquittoProcess(workdir, allow_anonymous=False, extra_config=(
        f"cafile {f['ca']}\ncertfile {f['cert']}\nkeyfile {f['key']}\n"
        f"password_file {f['passwd']}\nacl_file {acl}\n"
    )).start()
    yield broker
    broker.stop()


def _cfg(pki, broker: MosquittoProcess, user: str | None, password: str | None = None, **kw) -> BrokerConfig:
    """Settings for `user`; a device id stands for its MQTT username DEVICE@FLEET."""
    user = device_user(FLEET, user) if user in DEVICES else user
    base = {"host": "127.0.0.1", "port": broker.port, "tls": True, "ca_file": str(pki["files"]["ca"]),
            "username": user, "password": password if password is not None else pki["passwords"].get(user)}
    return BrokerConfig(**{**base, **kw})


def _link(cfg: BrokerConfig, name: str, subs: dict[str, Inbox] | None = None) -> MqttLink:
    link = MqttLink(cfg, client_id=f"tls-test-{name}-{secrets.token_hex(3)}", clean_session=True)
    for topic, inbox in (subs or {}).items():
        link.subscribe(topic, inbox)
    link.start(timeout=10)  # returns after the SUBACKs: from here on, messages reach the inboxes
    return link


def _refused(cfg: BrokerConfig, name: str, timeout: float = 3.0) -> str:
    link = MqttLink(cfg, client_id=f"tls-test-{name}-{secrets.token_hex(3)}", clean_session=True)
    try:
        with pytest.raises(ConnectionError) as err:
            link.start(timeout=timeout)
    finally:
        link.client.loop_stop()
        link.client.disconnect()
    return str(err.value)


# ----------------------------------------------------------------------------- (a)
def test_hub_and_two_devices_learn_over_mqtts_with_acl_and_keys(pki, secure_broker, topic_prefix, small_data,
                                                                tmp_path):
    import dataclasses

    import numpy as np

    from fedge.cli import main
    from fedge.edge_agent.agent import Agent
    from fedge.edge_agent.pool import TrainingPool
    from fedge.edge_agent.profile import load_profile
    from fedge.hub.config import HubConfig
    from fedge.hub.hub import Hub
    from fedge.hub.store import RunStore
    from fedge.models.wire.keys import HUB_PUBLIC, hub_verifier, read_device_key

    keys = tmp_path / "keys"
    assert main(["keys", "init", "--dir", str(keys)]) == 0
    assert main(["keys", "enroll", *DEVICES, "--dir", str(keys)]) == 0

    hub_cfg = HubConfig(fleet=FLEET, prefix=topic_prefix, model="mlp", rounds=2, min_devices=2, deadline_s=30,
                        wait_devices_s=30, train={"lr": 0.05, "batch_size": 32}, keys_dir=str(keys),
                        in_shape=small_data.in_shape, num_classes=small_data.num_classes)
    hub = Hub(hub_cfg, _cfg(pki, secure_broker, HUB_USER), RunStore(tmp_path / "runs" / "tls"),
              small_data.test.x, small_data.test.y)
    topics = Topics(FLEET, topic_prefix)
    profile = dataclasses.replace(load_profile("sim"), model="mlp")
    pool = TrainingPool(workers=1, threads_per_worker=1)
    halves = np.array_split(np.random.default_rng(0).permutation(len(small_data.train.y)), len(DEVICES))
    agents = []
    try:
        for device, idx in zip(DEVICES, halves):
            agent = Agent(device, profile, _cfg(pki, secure_broker, device), topics, small_data.train.subset(idx),
                          small_data.num_classes, pool, hub_verifier=hub_verifier(keys / HUB_PUBLIC),
                          device_key=read_device_key(keys / "devices" / f"{device}.key"))
            agents.append(agent.start())
        history = hub.run()
        assert all(agent.finished.wait(10) for agent in agents)
    finally:
        for agent in agents:
            agent.stop()
        pool.close()
    assert [r["round"] for r in history] == [1, 2]
    assert all(r["participants"] == sorted(DEVICES) for r in history)
    assert history[-1]["accuracy"] > 0.4, history  # chance is 0.1
    assert hub.store.rejections() == []
    assert all(agent.rounds_trained == 2 for agent in agents)


# ----------------------------------------------------------------------------- (b), (c)
def test_only_known_users_with_the_right_ca_get_in(pki, secure_broker):
    ok = _link(_cfg(pki, secure_broker, "dev-a"), "good")  # the control: right user, password and CA
    ok.stop()
    results: dict[str, str] = {}
    cases = {
        "wrong password": _cfg(pki, secure_broker, "dev-a", password="not-the-password"),
        "unknown user": _cfg(pki, secure_broker, "mallory", password="whatever"),
        "anonymous": _cfg(pki, secure_broker, None),
        "plain TCP": _cfg(pki, secure_broker, "dev-a", tls=False, ca_file=None),
        "system CAs only": _cfg(pki, secure_broker, "dev-a", ca_file=None),
        "another CA": _cfg(pki, secure_broker, "dev-a", ca_file=str(pki["files"]["other_ca"])),
    }
    threads = [threading.Thread(target=lambda n=n, c=c: results.__setitem__(n, _refused(c, n.replace(" ", "-"))))
               for n, c in cases.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted(cases), results  # each one raised ConnectionError
    for name in ("wrong password", "unknown user", "anonymous"):  # refused in CONNACK
        assert results[name].endswith(("Not authorized", "Bad user name or password")), results[name]
    for name in ("plain TCP", "system CAs only", "another CA"):  # no TLS session, so never a CONNACK
        assert "no connection" in results[name] and "authorized" not in results[name], results[name]


# ----------------------------------------------------------------------------- (d), (e)
def test_a_device_cannot_write_or_read_another_devices_topics(pki, secure_broker, topic_prefix):
    t = Topics(FLEET, topic_prefix)
    hub_inbox, snoop_inbox = Inbox(), Inbox()
    hub = _link(_cfg(pki, secure_broker, HUB_USER), "hub", {t.all_device_updates: hub_inbox})
    # dev-a tries to read dev-b's updates directly, by wildcard and through the whole fleet's
    # topics (MqttLink hands a message to the first matching subscription: all go to one inbox)
    snoop = _link(_cfg(pki, secure_broker, "dev-a"), "snoop",
                  {t.device_update("dev-b"): snoop_inbox, t.all_device_updates: snoop_inbox,
                   f"{t.base}/#": snoop_inbox})
    dev_b = _link(_cfg(pki, secure_broker, "dev-b"), "dev-b")
    try:
        # (d) dev-b publishes as dev-a: the broker drops it (PUBACK, but never delivered)
        dev_b.publish(t.device_update("dev-a"), b"forged by dev-b", qos=1).wait_for_publish(5)
        dev_b.publish(t.round, b"forged task", qos=1, retain=True).wait_for_publish(5)
        dev_b.publish(t.device_update("dev-b"), b"dev-b's own update", qos=1).wait_for_publish(5)
        assert hub_inbox.wait_for(b"dev-b's own update"), hub_inbox.items
        hub.publish(t.round, b"the hub's task", qos=1, retain=True).wait_for_publish(5)
        assert snoop_inbox.wait_for(b"the hub's task")  # the control: devices do read the round topic
        # no sleep needed: the broker handled each forgery (PUBACK) before the control message that
        # followed it, so had it forwarded a forgery, that would have reached the inbox first
        assert b"forged by dev-b" not in hub_inbox.payloads()
        assert b"forged task" not in snoop_inbox.payloads()
        # (e) dev-a saw nothing of dev-b's update, though the hub got it
        assert all(not topic.startswith(f"{t.base}/dev/") for topic, _ in snoop_inbox.items), snoop_inbox.items
        assert b"dev-b's own update" not in snoop_inbox.payloads()
    finally:
        for link in (hub, snoop, dev_b):
            link.stop()
