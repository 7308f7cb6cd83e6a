"""The wire format: codecs round-trip, and the envelope rejects every kind of damage."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.models.wire import EnvelopeError, check_against, decode, decode_tensors, encode, encode_tensors
from fedge.models.wire.envelope import MAGIC, PREFIX_SIZE
from fedge.models.wire.messages import (
    TaskMessage,
    build_model_message,
    build_task_message,
    build_update_message,
    parse_model,
    parse_task,
    parse_update,
)


def _tensors(seed: int = 0) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict(
        [("a.weight", rng.normal(size=(20, 7)).astype(np.float32)), ("a.bias", rng.normal(size=(20,)).astype(np.float32)),
         ("scalarish", np.array([3.5], dtype=np.float32))]
    )


def test_fp32_round_trip_is_bit_exact():
    tensors = _tensors()
    fields, body = encode_tensors(tensors, "fp32")
    env = decode(encode({"kind": "model", **fields}, body))
    out = decode_tensors(env.header, env.body)
    assert list(out) == list(tensors)
    for name in tensors:
        assert out[name].dtype == np.float32
        assert out[name].tobytes() == tensors[name].tobytes()


def test_fp16_round_trip_halves_the_body_within_fp16_precision():
    tensors = _tensors()
    f32 = encode_tensors(tensors, "fp32")[1]
    fields, body = encode_tensors(tensors, "fp16")
    assert len(body) * 2 == len(f32)
    out = decode_tensors(fields, body)
    for name in tensors:
        np.testing.assert_allclose(out[name], tensors[name], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("codec", "bits"), [("q8", 8), ("q6", 6), ("q4", 4)])
def test_block_quantised_round_trip_is_within_half_a_step_of_each_block(codec, bits):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(1000).astype(np.float32)
    scores[7] = 500.0  # one outlier coarsens only its own block of 256
    tensors = OrderedDict(w=rng.standard_normal((30, 40)).astype(np.float32), s=scores,
                          c=np.full((3,), 2.5, np.float32), e=np.zeros((0, 4), np.float32))
    fields, body = encode_tensors(tensors, codec)
    codes = [-(-n * bits // 8) for n in (1200, 1000, 3, 0)]  # per tensor its codes, padded to a byte
    assert len(body) == (8 * 5 + codes[0]) + (8 * 4 + codes[1]) + (8 + codes[2])  # blocks' offset+scale, codes
    out = decode_tensors(fields, body)
    assert [(k, v.shape, v.dtype) for k, v in out.items()] == [(k, v.shape, np.float32) for k, v in tensors.items()]
    levels = 2**bits - 1
    for name, arr in tensors.items():
        flat, got = arr.reshape(-1), out[name].reshape(-1)
        for start in range(0, flat.size, 256):
            blk = flat[start:start + 256]
            step = (float(blk.max()) - float(blk.min())) / levels
            assert np.abs(got[start:start + 256] - blk).max() <= step / 2 + 1e-6 * (1 + np.abs(blk).max())
            if step > 0:  # the codes use the whole range: the block's min and max come back exactly
                assert got[start:start + 256].min() == blk.min()
    np.testing.assert_array_equal(out["c"], tensors["c"])  # a constant block is exact
    assert np.abs(out["s"][256:] - scores[256:]).max() < 4.0 / levels  # blocks without the outlier stay fine
    assert encode_tensors(tensors, codec) == (fields, body)  # deterministic: every device decodes the same


@pytest.mark.parametrize(("codec", "size"), [("q8", 316), ("q6", 241), ("q4", 166)])
def test_block_quantised_codecs_refuse_bad_bodies_and_non_finite_input(codec, size):
    from fedge.models.errors import ConfigError

    tensors = OrderedDict(w=np.arange(300, dtype=np.float32))
    fields, body = encode_tensors(tensors, codec)
    assert len(body) == size  # 2 blocks x 8 bytes + ceil(300 x bits / 8)
    for cut in (body[:-1], body + b"\0"):
        with pytest.raises(EnvelopeError, match=f"needs {size} for codec {codec}"):
            decode_tensors(fields, cut)
    for bad in (float("nan"), -1.0, float("inf")):
        damaged = body[:4] + struct.pack("<f", bad) + body[8:]  # block 0's scale
        with pytest.raises(EnvelopeError, match=f"{codec} offset or scale"):
            decode_tensors(fields, damaged)
    damaged = struct.pack("<f", float("nan")) + body[4:]  # block 0's offset
    with pytest.raises(EnvelopeError, match=f"{codec} offset or scale"):
        decode_tensors(fields, damaged)
    with pytest.raises(ConfigError, match="NaN or Inf"):
        encode_tensors(OrderedDict(w=np.array([1.0, np.nan], np.float32)), codec)


def _valid() -> bytes:
    return build_update_message("f", "r", "dev1", 1, 0, _tensors(), num_samples=10)


def test_valid_update_parses():
    upd = parse_update(decode(_valid()))
    assert (upd.device, upd.round, upd.num_samples) == ("dev1", 1, 10)


@pytest.mark.parametrize("cut", [0, 5, PREFIX_SIZE, 40, -1, -33])
def test_truncated_payload_is_rejected(cut):
    data = _valid()
    with pytest.raises(EnvelopeError, match="truncated"):
        decode(data[:cut])


def test_wrong_magic_and_version_are_rejected():
    data = bytearray(_valid())
    with pytest.raises(EnvelopeError, match="magic"):
        decode(b"XXXX" + bytes(data[4:]))
    data[4] = 99
    with pytest.raises(EnvelopeError, match="protocol version 99"):
        decode(bytes(data))


def test_digest_mismatch_is_rejected():
    data = bytearray(_valid())
    data[PREFIX_SIZE + 3] ^= 0x01  # flip a bit in the header
    with pytest.raises(EnvelopeError, match="digest mismatch"):
        decode(bytes(data))
    data = bytearray(_valid())
    data[-40] ^= 0xFF  # flip a body byte
    with pytest.raises(EnvelopeError, match="digest mismatch"):
        decode(bytes(data))


def test_header_that_is_not_json_is_rejected():
    import hashlib

    head = b"{not json"
    framed = struct.pack(">4sBBII", MAGIC, 1, 0, len(head), 0) + head
    with pytest.raises(EnvelopeError, match="not UTF-8 JSON"):
        decode(framed + hashlib.sha256(framed).digest())


def test_unknown_kind_and_oversize_are_rejected():
    with pytest.raises(EnvelopeError, match="unknown message kind"):
        decode(encode({"kind": "gossip"}))
    with pytest.raises(EnvelopeError, match="exceeds the limit"):
        decode(_valid(), max_bytes=100)


def test_authentication_tag_is_checked():
    key = b"k" * 32
    tagged = build_update_message("f", "r", "dev1", 1, 0, _tensors(), num_samples=10, key=key)
    assert decode(tagged, key=key).tag is not None
    with pytest.raises(EnvelopeError, match="does not match"):
        decode(tagged, key=b"other-key")
    with pytest.raises(EnvelopeError, match="not authenticated"):
        decode(_valid(), key=key)


def test_manifest_and_body_must_agree():
    fields, body = encode_tensors(_tensors(), "fp32")
    with pytest.raises(EnvelopeError, match="manifest needs"):
        decode_tensors(fields, body[:-4])
    with pytest.raises(EnvelopeError, match="unknown codec"):
        decode_tensors({**fields, "codec": "int3"}, body)
    with pytest.raises(EnvelopeError, match="bad tensor manifest"):
        decode_tensors({**fields, "tensors": [["a", [-1]]]}, body)


def test_shape_and_nan_checks_against_the_model():
    ref = _tensors()
    bad = _tensors()
    bad["a.bias"] = np.zeros(21, dtype=np.float32)
    with pytest.raises(EnvelopeError, match="shape"):
        check_against(bad, ref)
    nan = _tensors()
    nan["a.weight"][0, 0] = np.nan
    with pytest.raises(EnvelopeError, match="NaN or Inf"):
        check_against(nan, ref)
    missing = OrderedDict(list(_tensors().items())[:2])
    with pytest.raises(EnvelopeError, match="names do not match"):
        check_against(missing, ref)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_raises_only_its_own_error_on_arbitrary_bytes(data):
    try:
        env = decode(data)
    except EnvelopeError:
        return
    assert env.kind in ("model", "task", "update")


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_decoder_survives_mutations_of_a_valid_message(data):
    raw = bytearray(_valid())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        parse_update(decode(bytes(raw[:cut])))
    except EnvelopeError:
        pass


# ----------------------------------------------------------------------------- header fuzzing
# Byte mutations almost always die at the magic or digest check. These re-encode validly (a fresh
# digest), so the header and manifest validation behind it is what gets fuzzed.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# archetypal wrong values (each JSON type, empty and odd containers), then anything JSON
_bad_values = st.sampled_from([None, True, 0, -1, 2**40, 1.5, "", "x", [], [1], [["a"]], ["a", 1], {}, {"a": 1}]) | _json_values
_MESSAGES = {
    "update": (lambda: build_update_message("f", "r", "dev1", 1, 0, _tensors(), num_samples=10), parse_update),
    "model": (lambda: build_model_message("f", "r", 3, "mlp", _tensors(), meta={"in_shape": [1, 28, 28]}), parse_model),
    "task": (lambda: build_task_message(TaskMessage("f", "r", 2, 1, ["dev1"], 1e9, {"lr": 0.1}, "open", "fp16")),
             parse_task),
}


def test_model_meta_that_is_not_an_object_is_rejected():
    """Found by the fuzz test below: a list `meta` used to escape as TypeError/ValueError."""
    env = decode(_MESSAGES["model"][0]())
    for bad in ([1], [["a"]], True, "x"):
        with pytest.raises(EnvelopeError, match="'meta' must be an object"):
            parse_model(decode(encode({**env.header, "meta": bad}, env.body)))


def _mutated_header(data: st.DataObject, header: dict) -> dict:
    header = dict(header)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        action = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "manifest"]),
                           label="action")
        keys = sorted(header)
        if action == "replace" and keys:
            header[data.draw(st.sampled_from(keys))] = data.draw(_bad_values)
        elif action == "delete" and keys:
            header.pop(data.draw(st.sampled_from(keys)))
        elif action == "add":
            header[data.draw(st.text(max_size=8))] = data.draw(_json_values)
        elif action == "manifest":  # a plausible manifest with wrong names, shapes or dims
            header["tensors"] = data.draw(st.lists(st.tuples(
                st.sampled_from(["a.weight", "a.bias", "scalarish", "x"]),
                st.lists(st.integers(-3, 30), max_size=3)).map(list), max_size=4))
            header["codec"] = data.draw(st.sampled_from(["fp32", "fp16", "mask1", "sign1", "int3"]))
    return header


@settings(max_examples=3000, deadline=None)
@given(st.data())
def test_header_validation_survives_re_encoded_mutations(data):
    kind = data.draw(st.sampled_from(sorted(_MESSAGES)), label="kind")
    build, parse = _MESSAGES[kind]
    env = decode(build())
    header = _mutated_header(data, env.header)
    body = env.body if data.draw(st.integers(0, 4), label="keep body") else data.draw(st.binary(max_size=200))
    raw = encode(header, body)  # valid frame and digest: only the content is wrong
    try:
        msg = parse(decode(raw))
    except EnvelopeError:
        return  # the project's own error, naming the bad field
    # anything accepted is a well-formed message of its kind
    assert msg.fleet == header["fleet"] and isinstance(msg.fleet, str) and isinstance(msg.run, str)
    if kind == "update":
        assert isinstance(msg.round, int) and isinstance(msg.num_samples, int) and msg.num_samples >= 1
        assert isinstance(msg.metrics, dict) and isinstance(msg.base_version, int)
    if kind == "model":
        assert isinstance(msg.version, int) and isinstance(msg.model, str) and isinstance(msg.meta, dict)
    if kind == "task":
        assert msg.state in ("open", "finished") and all(isinstance(d, str) for d in msg.selected)
        assert isinstance(msg.train, dict) and isinstance(msg.round, int)
    if kind != "task":
        for name, arr in msg.tensors.items():
            assert isinstance(name, str) and arr.dtype == np.float32


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_header_bytes_mutated_with_a_fresh_digest(data):
    """Raw header bytes changed (and lengths and digest recomputed): JSON and UTF-8 errors too."""
    import hashlib

    env = decode(_valid())
    head = bytearray(json.dumps(env.header, separators=(",", ":"), sort_keys=True).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(head) - 1))
        head[pos] = data.draw(st.integers(0, 255))
    framed = struct.pack(">4sBBII", MAGIC, 1, 0, len(head), len(env.body)) + bytes(head) + env.body
    try:
        upd = parse_update(decode(framed + hashlib.sha256(framed).digest()))
    except EnvelopeError:
        return
    assert isinstance(upd.round, int) and upd.num_samples >= 1
