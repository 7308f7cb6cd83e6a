"""The wire format: codecs round-trip, and the envelope rejects every kind of damage."""

from __future__ import annotations

import struct
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.models.wire import EnvelopeError, check_against, decode, decode_tensors, encode, encode_tensors
from fedge.models.wire.envelope import MAGIC, PREFIX_SIZE
from fedge.models.wire.messages import build_update_message, parse_update


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
