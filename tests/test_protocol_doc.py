"""Keeps docs/protocol.md honest where it can be checked mechanically: a device written from
the page alone must get the same tensors, constants, defaults, frozen weights and key
formats as the code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path

import numpy as np
import pytest

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()


def _table_rows(after: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with `after`, or that follows the
    line starting with `after`; without the header row."""
    lines = DOC[DOC.index(after):].splitlines()
    lines = lines if lines[0].startswith("|") else lines[1:]
    rows, started = [], False
    for line in lines:
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif started:
            break
    return rows[1:]  # without the header row


def _documented_tensors() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    out = {}
    for name in re.findall(r"^Tensors of `([^`]+)` on \[1, 28, 28\] with 10 classes", DOC, flags=re.M):
        rows = _table_rows(f"Tensors of `{name}` on")
        out[name] = [(r[0].strip("`"), tuple(int(d) for d in re.findall(r"\d+", r[1]))) for r in rows]
    return out


def test_every_model_has_a_tensor_table_matching_its_state() -> None:
    from fedge.models.registry import build_model, get_state, model_names

    documented = _documented_tensors()
    assert sorted(documented) == model_names()
    for name, tensors in documented.items():
        state = get_state(build_model(name, (1, 28, 28), 10))
        assert tensors == [(k, tuple(v.shape)) for k, v in state.items()], name


def test_normalisation_constants_and_ranges() -> None:
    from fedge.models.data import NORMALISATION, _normalise

    rows = {r[0].strip("`"): r for r in _table_rows("| dataset | in_shape |")}
    assert set(rows) == set(NORMALISATION)
    for name, (mean, std) in NORMALISATION.items():
        row = rows[name]
        assert (tuple(float(v) for v in row[2].split(",")), tuple(float(v) for v in row[3].split(","))) == (mean, std)
        lo, hi = (float(v) for v in re.findall(r"-?\d+\.\d+", row[4]))
        channels = int(re.findall(r"\d+", row[1])[0])
        got = _normalise(np.array([0, 255], dtype=np.uint8).reshape(2, 1, 1, 1).repeat(channels, axis=1), (mean, std))
        assert got.dtype == np.float32
        assert got[:, 0].reshape(-1) == pytest.approx([lo, hi], abs=1e-4)
        assert np.array_equal(got, got[:, :1].repeat(channels, axis=1))  # one value: the same for every channel


def test_training_defaults_and_keys() -> None:
    from fedge.edge_agent.profile import Profile
    from fedge.edge_agent.trainer import TrainConfig

    rows = _table_rows("| `train` key |")
    keys = [r[0].strip("`") for r in rows]
    assert keys == list(TrainConfig.__dataclass_fields__)
    resolved = TrainConfig.resolve(Profile(name="x"), {})
    for row in rows:
        documented = re.search(r"default (\S+)$|^([\d.]+) ", row[3])
        value = (documented.group(1) or documented.group(2)).strip("`")
        assert str(getattr(resolved, row[0].strip("`"))) == value, row
    # each key overrides the profile; batch_size only downwards
    task = {"epochs": 3, "batch_size": 8, "lr": 0.01, "optimizer": "adam", "momentum": 0.5, "weight_decay": 1e-4}
    assert TrainConfig.resolve(Profile(name="x"), task) == TrainConfig(**task)
    assert TrainConfig.resolve(Profile(name="x", batch_size=16), {"batch_size": 64}).batch_size == 16


def test_frozen_weight_reference_code_and_check_values() -> None:
    from fedge.models.bits import regenerate_sign_bits, weight_scale
    from fedge.models.registry import build_model
    from fedge.models.supermask import supermask_layers

    code = re.search(r"```python\n(M32, M64.*?)```", DOC, flags=re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the documented reference implementation
    sign_bytes = namespace["sign_bytes"]
    for seed, index, numel in ((0, 0, 576), (0, 6, 2560), (7, 3, 1001), (2**32 - 1, 1, 9)):
        assert sign_bytes(seed, index, numel) == regenerate_sign_bits(seed, index, (numel,))

    rows = _table_rows("| L | first 8 bytes")
    layers = list(supermask_layers(build_model("conv4-mpt")))
    assert len(rows) == len(layers)
    for row, (_, layer) in zip(rows, layers):
        shape = tuple(int(d) for d in re.findall(r"\d+", row[2]))
        assert (int(row[0]), shape) == (layer.frozen.index, layer.weight_shape)
        bits = regenerate_sign_bits(0, layer.frozen.index, shape)
        assert bits[:8].hex() == row[1].strip("`")
        assert hashlib.sha256(bits).hexdigest()[:16] == row[4].strip("`")
        assert float(row[3]) == pytest.approx(float(np.float32(weight_scale(shape))), rel=1e-7)
        w = layer.frozen.tensor().numpy().reshape(-1)
        signs = np.unpackbits(np.frombuffer(bits, np.uint8), count=w.size).astype(bool)
        assert np.array_equal(w, np.where(signs, np.float32(weight_scale(shape)), -np.float32(weight_scale(shape))))


def test_hmac_and_ed25519_as_documented(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fedge.models.wire import decode
    from fedge.models.wire.keys import enroll_device, hub_signer, init_hub_keys, read_device_key
    from fedge.models.wire.messages import TaskMessage, build_task_message, build_update_message

    text = enroll_device(tmp_path, "dev1").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text)
    key = bytes.fromhex(text.strip())  # the documented recipe: strip, hex-decode
    (tmp_path / "upper.key").write_text(" " + text.upper() + "\r\n")
    assert read_device_key(tmp_path / "upper.key") == key
    msg = build_update_message("f", "r", "dev1", 1, 0, {"a": np.ones(3, np.float32)}, 5, key=read_device_key(
        tmp_path / "devices" / "dev1.key"))
    end = 14 + int.from_bytes(msg[6:10], "big") + int.from_bytes(msg[10:14], "big")
    digest = hashlib.sha256(msg[:end]).digest()
    assert msg[5] == 0x01 and msg[end : end + 32] == digest
    assert msg[end + 32 :] == hmac.new(key, digest, hashlib.sha256).digest()
    decode(msg, key=key)

    _, pub = init_hub_keys(tmp_path)
    lines = pub.read_text().splitlines()
    assert lines[0] == "-----BEGIN PUBLIC KEY-----" and lines[-1] == "-----END PUBLIC KEY-----"
    der = base64.b64decode("".join(lines[1:-1]))
    prefix = re.search(r"fixed prefix `([0-9a-f ]+)`", DOC).group(1).replace(" ", "")
    assert len(der) == 44 and der[:12].hex() == prefix
    task = build_task_message(TaskMessage("f", "r", 1, 0, ["dev1"], 1.0, {}, "open"), hub_signer(tmp_path))
    end = 14 + int.from_bytes(task[6:10], "big")
    assert task[5] == 0x02 and len(task) == end + 32 + 64
    Ed25519PublicKey.from_public_bytes(der[12:]).verify(task[end + 32 :], task[end : end + 32])


def test_mqtt_size_table() -> None:
    from fedge.models.wire import Topics
    from fedge.models.wire.envelope import DEFAULT_MAX_BYTES

    topics = Topics("f")
    rows = _table_rows("| topic | topic bytes |")
    for row, topic in zip(rows, (topics.model, topics.device_update("d")), strict=True):
        assert row[0].strip("`").split(" ")[0].strip("`") == topic
        assert int(row[1]) == len(topic)
        largest = 268_435_455 - 2 - len(topic) - 2
        assert int(row[2].replace(",", "")) == largest < DEFAULT_MAX_BYTES
    assert f"{DEFAULT_MAX_BYTES:,}" in DOC


def test_refused_and_failed_status_records_as_documented() -> None:
    """§5: the devices' `refused` / `failed` records carry the documented fields, and the hub counts
    one only for the attempt it names (run, round and the task's deadline)."""
    from fedge.models.wire.messages import DECLINED_FIELDS, DECLINED_KINDS, TaskMessage, declined_in, declined_record

    section = DOC[DOC.index("## 5. Status JSON"):DOC.index("## 6.")]
    rows = {r[0].strip("`"): r for r in _table_rows("| field | type | required | meaning |")}  # §5's table
    for kind in DECLINED_KINDS:
        assert kind in rows and kind in section, kind
    documented = tuple(re.findall(r'"(\w+)":', rows["refused"][3]))
    assert documented == DECLINED_FIELDS
    task = TaskMessage("f", "run-1", 3, 2, ["d"], 1764120000.25, {}, "open")
    record = declined_record(task, "no")
    assert tuple(record) == DECLINED_FIELDS
    for kind in DECLINED_KINDS:
        assert declined_in({"state": "online", kind: record}, task) == (kind, "no")
    rerun = TaskMessage("f", "run-1", 3, 2, ["d"], 1764120300.5, {}, "open")  # the same round re-run: a new deadline
    assert declined_in({"state": "online", "failed": record}, rerun) is None
    assert declined_in({"state": "online", "failed": {**record, "deadline": None}}, task) is None


def test_model_options_table_matches_the_registrations() -> None:
    from fedge.models.registry import model_names, option_schema

    documented = {}
    for row in _table_rows("| models | option |"):
        for model in re.findall(r"`([^`]+)`", row[0]):
            documented[model, row[1].strip("`")] = (row[2], row[3])
    registered = {(name, o.name): o for name in model_names() for o in option_schema(name)}
    assert set(documented) == set(registered)
    for key, option in registered.items():
        kind, default = documented[key]
        assert str(option.default) == default, key
        assert kind.startswith({int: "int", float: "number"}[option.kind]), key
        bounds = re.search(r"\[([^,]+), ([^\])]+)([\])])", kind)
        low, high = (eval(v.replace("^", "**"), {"__builtins__": {}}) for v in bounds.group(1, 2))  # "2^32 - 1"
        assert (low, high, bounds.group(3) == ")") == (option.low, option.high, option.high_open), key
    assert "| `model_options` | object |" in DOC
