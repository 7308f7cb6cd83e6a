"""Entropy-coded mask uplinks: maskrc (range coding with the global keep-probabilities as the
model) and mask1z (zstd of the mask1 bits). Lossless round trips, sizes near the masks'
cross-entropy, and clear EnvelopeErrors for missing or wrong probabilities, a truncated,
padded or corrupt body, and an update naming a model version the hub does not hold."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from fedge.hub.strategies import make_strategy
from fedge.models.errors import ConfigError
from fedge.models.wire import decode
from fedge.models.wire.codecs import P_FLOOR, _mask1_body, decode_tensors, encode_tensors, keep_probs
from fedge.models.wire.envelope import EnvelopeError
from fedge.models.wire.messages import build_update_message, parse_update


def _case(spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    scores = {"net.1.scores": rng.normal(0, spread, (200, 784)).astype(np.float32),
              "net.5.scores": rng.normal(0, spread, (10, 200)).astype(np.float32)}
    probs = keep_probs(scores)
    masks = {k: (rng.random(v.shape) < probs[k]).astype(np.float32) for k, v in scores.items()}
    return scores, probs, masks


def _cross_entropy_bits(masks, probs) -> float:
    return float(sum(-(m * np.log2(probs[k]) + (1 - m) * np.log2(1 - probs[k])).sum() for k, m in masks.items()))


@pytest.mark.parametrize("spread", [0.1, 3.0, 8.0])
def test_range_coded_masks_round_trip_at_their_cross_entropy(spread):
    _, probs, masks = _case(spread)
    fields, body = encode_tensors(masks, "maskrc", model_probs=probs)
    back = decode_tensors(fields, body, model_probs=probs)
    assert list(back) == list(masks) and all(np.array_equal(back[k], masks[k]) for k in masks)
    ideal = _cross_entropy_bits(masks, probs)
    assert len(body) * 8 <= ideal * 1.01 + 4 * 8 + 64  # CRC + the coder's last words
    n = sum(m.size for m in masks.values())
    if spread == 0.1:  # p ~ 0.5: about one bit per weight
        assert 0.98 < len(body) * 8 / n < 1.02
    if spread == 8.0:  # polarised p: far below one bit
        assert len(body) * 8 / n < 0.25


def test_body_layout_is_a_crc_then_little_endian_words():
    _, probs, masks = _case(3.0)
    _, body = encode_tensors(masks, "maskrc", model_probs=probs)
    assert len(body) % 4 == 0
    assert int.from_bytes(body[:4], "little") == zlib.crc32(_mask1_body(masks))


def test_probabilities_are_clipped_so_a_surprising_bit_stays_cheap():
    p = keep_probs({"s": np.array([-1e4, 0.0, 1e4], np.float32)})["s"]
    assert p[0] == P_FLOOR and p[2] == 1 - P_FLOOR and p[1] == 0.5
    masks = {"s": np.array([1, 0, 0], np.float32)}  # both ends against the model
    probs = {"s": p}
    fields, body = encode_tensors(masks, "maskrc", model_probs=probs)
    assert np.array_equal(decode_tensors(fields, body, model_probs=probs)["s"], masks["s"])


def test_zstd_baseline_round_trips_and_refuses_garbage():
    _, _, masks = _case(8.0)
    fields, body = encode_tensors(masks, "mask1z")
    assert all(np.array_equal(decode_tensors(fields, body)[k], masks[k]) for k in masks)
    with pytest.raises(EnvelopeError, match="mask1z"):
        decode_tensors(fields, body[: len(body) // 2])


def test_wrong_missing_or_corrupt_context_gives_envelope_errors():
    scores, probs, masks = _case(3.0)
    fields, body = encode_tensors(masks, "maskrc", model_probs=probs)
    other = keep_probs({k: v + 0.5 for k, v in scores.items()})
    with pytest.raises(EnvelopeError, match="needs the keep-probabilities"):
        decode_tensors(fields, body)
    with pytest.raises(EnvelopeError, match="CRC|does not decode"):
        decode_tensors(fields, body, model_probs=other)
    with pytest.raises(EnvelopeError, match="no keep-probabilities of shape"):
        decode_tensors(fields, body, model_probs={k: v[:5] for k, v in probs.items()})
    for bad in (body[:-8], body[:3], body + b"\0\0\0\0", body[:4] + bytes(len(body) - 4),
                bytes([body[0] ^ 1]) + body[1:]):
        with pytest.raises(EnvelopeError, match="maskrc"):
            decode_tensors(fields, bad, model_probs=probs)
    with pytest.raises(ConfigError, match="needs the keep-probabilities"):
        encode_tensors(masks, "maskrc")


def test_the_update_names_its_base_version_and_decodes_only_with_it():
    scores, probs, masks = _case(3.0)
    held = {4: probs}
    payload = build_update_message("f", "r", "dev0", 5, 4, masks, 40, codec="maskrc", model_probs=probs)
    upd = parse_update(decode(payload), held.get)
    assert upd.base_version == 4 and all(np.array_equal(upd.tensors[k], masks[k]) for k in masks)
    stale = build_update_message("f", "r", "dev0", 5, 3, masks, 40, codec="maskrc", model_probs=probs)
    with pytest.raises(EnvelopeError, match="model version 3"):
        parse_update(decode(stale), held.get)
    with pytest.raises(EnvelopeError, match="model version 4"):
        parse_update(decode(payload))  # a receiver with no probabilities at all


def test_fedpm_takes_the_mask_codecs_and_no_other():
    s = make_strategy("fedpm")
    assert s.task_codec(None) == "mask1"
    assert [s.task_codec(c) for c in ("mask1", "maskrc", "mask1z")] == ["mask1", "maskrc", "mask1z"]
    with pytest.raises(ConfigError, match="must be one of"):
        s.task_codec("fp32")
    with pytest.raises(ConfigError):  # score averaging cannot read a mask
        make_strategy("mpt-score-avg").task_codec("maskrc")
