"""`fedge keys` and `fedge acl` through the real command line entry point, and the ACL text
checked against Mosquitto's matching rules (without a broker; tests/test_tls_acl.py runs it
in a real one)."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from fedge.cli import main
from fedge.hub.acl import device_rules, device_user, mosquitto_acl
from fedge.models.wire.keys import HUB_PRIVATE, HUB_PUBLIC, hub_signer, hub_verifier, read_device_key
from fedge.models.wire.topics import Topics


# ----------------------------------------------------------------------------- ACL
def allowed(acl_text: str, user: str, access: str, topic: str) -> bool:
    """Mosquitto's acl_file semantics, enough for fedge's file: `pattern` lines apply to every
    user with %u replaced, `topic` lines to the `user` block they follow; read/write/readwrite."""
    current = None
    for raw in acl_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split(None, 2)
        if words[0] == "user":
            current = words[1]
            continue
        kind, perm, pattern = words if len(words) == 3 else (words[0], "readwrite", words[1])
        if kind == "pattern":
            pattern = pattern.replace("%u", user)
        elif kind != "topic" or current != user:
            continue
        if access in perm and mqtt.topic_matches_sub(pattern, topic):
            return True
    return False


def test_acl_gives_each_device_its_own_topics_and_the_hub_its_fleet():
    prefix = "fedge/v1"
    t = Topics("home", prefix)
    acl = mosquitto_acl("home", ["pi-kitchen", "pi-garage"], prefix)
    assert "user hub@home\ntopic readwrite fedge/v1/home/#" in acl
    assert "user pi-kitchen@home\ntopic write fedge/v1/home/dev/pi-kitchen/status" in acl
    assert not any(line.startswith("pattern") for line in acl.splitlines())  # patterns reach every fleet

    for device, other in (("pi-kitchen", "pi-garage"), ("pi-garage", "pi-kitchen")):
        user = device_user("home", device)
        assert not allowed(acl, device, "read", t.model)  # a bare device id is nobody
        for topic in (t.device_status(device), t.device_update(device)):
            assert allowed(acl, user, "write", topic)
            assert not allowed(acl, user, "read", topic)
        for topic in (t.device_status(other), t.device_update(other), t.model, t.round, t.hub_status,
                      f"{t.base}/dev/{device}/other", "fedge/v1/other-fleet/model", f"fedge/v1/other/dev/{device}/update"):
            assert not allowed(acl, user, "write", topic), topic
        for topic in (t.model, t.round, t.hub_status):
            assert allowed(acl, user, "read", topic)
        for topic in (t.device_update(other), t.device_status(other), "fedge/v1/other-fleet/round"):
            assert not allowed(acl, user, "read", topic), topic

    for topic in (t.model, t.round, t.hub_status, t.device_update("x"), t.device_status("x")):
        assert allowed(acl, "hub@home", "write", topic) and allowed(acl, "hub@home", "read", topic)
    assert not allowed(acl, "hub@home", "write", "fedge/v1/other-fleet/round")
    assert not allowed(acl, "hub@home", "read", "$SYS/broker/clients/total")


def test_acls_of_two_fleets_concatenate_without_crossing():
    """The operator's recipe for one broker and several fleets: append each fleet's output."""
    both = mosquitto_acl("home", ["pi"]) + mosquitto_acl("lab", ["pi"])
    home, lab = Topics("home"), Topics("lab")
    for mine, theirs, fleet in ((home, lab, "home"), (lab, home, "lab")):
        user = device_user(fleet, "pi")
        assert allowed(both, user, "write", mine.device_update("pi")) and allowed(both, user, "read", mine.model)
        for topic in (theirs.device_update("pi"), theirs.device_status("pi")):
            assert not allowed(both, user, "write", topic), (user, topic)
        for topic in (theirs.model, theirs.round, theirs.hub_status):
            assert not allowed(both, user, "read", topic), (user, topic)
        assert not allowed(both, f"hub@{fleet}", "write", theirs.round)


def test_acl_options_and_bad_names():
    acl = mosquitto_acl("lab", ["d1"], "tenant7/fedge", hub_user="fedge-hub")
    assert "user fedge-hub\ntopic readwrite tenant7/fedge/lab/#" in acl
    assert ("read", "tenant7/fedge/lab/round") in device_rules("lab", "d1", "tenant7/fedge")
    for fleet, prefix, user in (("a/b", "p", "hub"), ("#", "p", "hub"), ("f", "p/#", "hub"), ("f", "p/+", "hub"),
                                ("f", "p/%u", "hub"), ("f", "p q", "hub"), ("f", "/p", "hub"), ("f", "p/", "hub"),
                                ("f", "", "hub"), ("f", "p", "hub user"), ("f", "p", "h/b"), ("f", "p", "")):
        with pytest.raises(ValueError):
            mosquitto_acl(fleet, ["d1"], prefix, user)
    for device in ("a@b", "a/b", "+", ""):
        with pytest.raises(ValueError, match="device id"):
            mosquitto_acl("f", [device])


def test_acl_command_writes_the_file_or_prints_it(tmp_path, capsys):
    out = tmp_path / "etc" / "fedge.acl"
    assert main(["acl", "--fleet", "home", "--devices", "a", "b", "--topic-prefix", "x/y", "--hub-user", "srv",
                 "--out", str(out)]) == 0
    assert out.read_text() == mosquitto_acl("home", ["a", "b"], "x/y", "srv")
    capsys.readouterr()
    keys = tmp_path / "keys"
    assert main(["keys", "enroll", "pi-1", "pi-2", "--dir", str(keys)]) == 0
    capsys.readouterr()
    assert main(["acl", "--fleet", "home", "--keys-dir", str(keys)]) == 0
    assert capsys.readouterr().out == mosquitto_acl("home", ["pi-1", "pi-2"])
    assert main(["acl", "--fleet", "home"]) == 2  # no devices named
    assert "--devices" in capsys.readouterr().err
    assert main(["acl", "--fleet", "bad/fleet", "--devices", "a"]) == 2
    assert "fleet id" in capsys.readouterr().err
    assert main(["acl", "--fleet", "home", "--devices", "a", "--passwords", "hub=x"]) == 2  # needs --password-file
    with pytest.raises(SystemExit):
        main(["acl", "--fleet", "home", "--password-file", "pw", "--passwords", "no-equals-sign"])


def test_acl_command_creates_and_updates_the_password_file(tmp_path, mosquitto_passwd_bin):
    pw = tmp_path / "passwd"
    assert main(["acl", "--fleet", "home", "--devices", "pi-1", "--out", str(tmp_path / "a.acl"),
                 "--password-file", str(pw), "--passwords", "hub=one", "pi-1=two"]) == 0
    first = dict(line.split(":", 1) for line in pw.read_text().splitlines())
    assert sorted(first) == ["hub", "pi-1"]
    assert all("one" not in h and "two" not in h for h in first.values())  # hashed, never stored plain
    assert main(["acl", "--fleet", "home", "--devices", "pi-1", "--password-file", str(pw),
                 "--passwords", "pi-1=three", "pi-2=four"]) == 0
    second = dict(line.split(":", 1) for line in pw.read_text().splitlines())
    assert sorted(second) == ["hub", "pi-1", "pi-2"]
    assert second["hub"] == first["hub"] and second["pi-1"] != first["pi-1"]


# ----------------------------------------------------------------------------- keys
def test_keys_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert main(["keys", "init", "--dir", str(keys)]) == 0
    out = capsys.readouterr().out
    assert "created hub key pair" in out and HUB_PUBLIC in out
    assert oct((keys / HUB_PRIVATE).stat().st_mode & 0o777) == "0o600"
    pub = (keys / HUB_PUBLIC).read_bytes()
    assert hub_verifier(keys)(b"d" * 32, hub_signer(keys)(b"d" * 32))

    assert main(["keys", "init", "--dir", str(keys)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (keys / HUB_PUBLIC).read_bytes() == pub

    assert main(["keys", "init", "--dir", str(keys), "--force"]) == 0  # rotation
    assert "rotated" in capsys.readouterr().out
    assert (keys / HUB_PUBLIC).read_bytes() != pub


def test_keys_enroll_rotate_and_list(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert main(["keys", "init", "--dir", str(keys)]) == 0
    assert main(["keys", "enroll", "pi-kitchen", "pi-garage", "--dir", str(keys)]) == 0
    out = capsys.readouterr().out
    for device in ("pi-kitchen", "pi-garage"):
        path = keys / "devices" / f"{device}.key"
        assert f"copy {path} to device {device}" in out
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert len(read_device_key(path)) == 32
    old = read_device_key(keys / "devices" / "pi-kitchen.key")

    # one already enrolled: nothing is written, not even the new device
    assert main(["keys", "enroll", "pi-new", "pi-kitchen", "--dir", str(keys)]) == 2
    assert "already enrolled: pi-kitchen" in capsys.readouterr().err
    assert not (keys / "devices" / "pi-new.key").exists()
    assert read_device_key(keys / "devices" / "pi-kitchen.key") == old

    assert main(["keys", "enroll", "pi-kitchen", "--dir", str(keys), "--force"]) == 0
    assert "rotated pi-kitchen" in capsys.readouterr().out
    assert read_device_key(keys / "devices" / "pi-kitchen.key") != old

    assert main(["keys", "enroll", "bad/id", "--dir", str(keys)]) == 2
    assert "device id" in capsys.readouterr().err

    assert main(["keys", "list", "--dir", str(keys)]) == 0
    listing = capsys.readouterr().out
    assert "2 enrolled device(s)" in listing
    assert "pi-garage" in listing and "pi-kitchen" in listing and "WARNING" not in listing
    (keys / "devices" / "pi-garage.key").chmod(0o644)
    assert main(["keys", "list", "--dir", str(keys)]) == 0
    assert "WARNING: mode 0644" in capsys.readouterr().out


def test_keys_enroll_before_init_and_list_of_nothing(tmp_path, capsys):
    keys = tmp_path / "k"
    assert main(["keys", "list", "--dir", str(keys)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["keys", "enroll", "pi-1", "--dir", str(keys)]) == 0
    assert "fedge keys init" in capsys.readouterr().err
    assert main(["keys", "list", "--dir", str(keys)]) == 0
    out = capsys.readouterr().out
    assert "hub key: none" in out and "1 enrolled device(s)" in out
    with pytest.raises(SystemExit):
        main(["keys"])  # an action is required
