"""1-bit Multi-Prize Lottery Tickets: supermask layers, 1-bit storage, mask files, training."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bitarray import bitarray
from torch import nn

from fedge.models import bits
from fedge.models.bits import keep_count
from fedge.models.maskfile import MaskFile, MaskFileError
from fedge.models.mpt_nets import MPTMLP, MPTConv4, build_from_mask_file, build_mpt, to_mask_file
from fedge.models.registry import build_model, count_parameters, get_state, set_state
from fedge.models.supermask import (
    BinaryActivation,
    BinaryLinear,
    SignActivation,
    SupermaskConv2d,
    SupermaskLayer,
    SupermaskLinear,
    binary_weight_layers,
    mask_from_scores,
    materialize,
    model_masks,
    set_scores_from_masks,
    supermask_layers,
    topk_mask,
)

CONV4_WEIGHTS = 1_932_352
# per-layer weight counts of Conv-4 on 1x28x28 and what 0.8 keeps: n - floor(0.8 n) = ceil(0.2 n)
CONV4_LAYERS = [576, 36_864, 73_728, 147_456, 1_605_632, 65_536, 2_560]
CONV4_KEPT = [116, 7_373, 14_746, 29_492, 321_127, 13_108, 512]


@pytest.fixture(autouse=True)
def _one_thread():
    # the CI box has 2 cores shared with other jobs; one intra-op thread is much faster there
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def conv4() -> MPTConv4:
    torch.manual_seed(0)
    return MPTConv4((1, 28, 28), 10, variant="mpt-1/32", prune_ratio=0.8, seed=0)


# ----------------------------------------------------------------------------- pruning counts


def test_keep_count_rule():
    assert [keep_count(n, 0.8) for n in CONV4_LAYERS] == CONV4_KEPT
    for n in CONV4_LAYERS + [1, 7, 10, 99, 1001]:
        assert keep_count(n, 0.8) == n - math.floor(0.8 * n + 1e-7) == -(-2 * n // 10)  # ceil(0.2 n), exact ints
    assert keep_count(100, 0.29) == 71  # 0.29 * 100 = 28.999999999999996 in floats; still removes 29
    assert keep_count(10, 0.0) == 10
    with pytest.raises(ValueError):
        keep_count(10, 1.0)
    with pytest.raises(ValueError):
        keep_count(10, -0.1)


def test_conv4_supermask_keeps_20_percent_per_layer(conv4):
    masks = model_masks(conv4)
    assert [m.size for m in masks.values()] == CONV4_LAYERS
    assert [int(m.sum()) for m in masks.values()] == CONV4_KEPT
    for m in masks.values():
        assert abs(m.mean() - 0.2) < 1.0 / m.size + 1e-12
    # the mask is the top-k of |scores|: every kept |score| >= every pruned |score|
    for name, layer in supermask_layers(conv4):
        s = layer.scores.detach().abs().numpy()
        assert s[masks[name]].min() >= s[~masks[name]].max()


def test_conv4_weight_count_and_state_holds_only_scores(conv4):
    assert sum(layer.frozen.numel for _, layer in supermask_layers(conv4)) == CONV4_WEIGHTS
    assert count_parameters(conv4) == CONV4_WEIGHTS  # the scores, one per frozen weight
    state = get_state(conv4)
    assert list(state) == [name for name, _ in supermask_layers(conv4)]
    assert all(k.endswith(".scores") for k in state)
    assert sum(v.size for v in state.values()) == CONV4_WEIGHTS
    assert set(conv4.state_dict()) == set(state)
    # frozen weights are neither parameters nor buffers
    assert [n for n, _ in conv4.named_parameters()] == list(state)
    assert list(conv4.buffers()) == []
    # the frozen weights are held as 1 bit each
    assert sum(layer.frozen.nbytes for _, layer in supermask_layers(conv4)) == CONV4_WEIGHTS // 8 == 241_544


def test_state_of_11_variant_has_scores_and_bn_buffers():
    model = build_model("conv4-mpt11", seed=0)
    state = get_state(model)
    assert all(k.endswith((".scores", ".running_mean", ".running_var")) for k in state)
    assert sum(k.endswith(".scores") for k in state) == 7
    assert sum(k.endswith(".running_mean") for k in state) == 6
    assert sum(v.size for k, v in state.items() if k.endswith(".scores")) == CONV4_WEIGHTS
    assert not any(isinstance(m, nn.BatchNorm2d) and m.affine for m in model.modules())
    # set_state round trip and FedAvg of states is score averaging
    from fedge.hub.strategies import fedavg

    other = build_model("conv4-mpt11", seed=1)
    avg = fedavg(state, [(state, 1), (get_state(other), 3)])
    for k in state:
        np.testing.assert_allclose(avg[k], 0.25 * state[k] + 0.75 * get_state(other)[k], rtol=1e-6, atol=1e-7)
    set_state(model, avg)
    for k, v in get_state(model).items():
        np.testing.assert_array_equal(v, avg[k])


def test_frozen_weights_come_from_the_seed_not_torch_rng():
    a = build_model("mlp-mpt", seed=1)
    b = build_model("mlp-mpt", seed=2)
    for (_na, la), (_nb, lb) in zip(supermask_layers(a), supermask_layers(b)):
        assert la.frozen.signs == lb.frozen.signs  # same frozen weights on every participant
        assert not torch.equal(la.scores, lb.scores)  # scores come from torch's (seeded) RNG
    c = MPTMLP(variant="mpt-1/32", seed=7)
    assert dict(supermask_layers(c))["net.1.scores"].frozen.signs != dict(supermask_layers(a))["net.1.scores"].frozen.signs
    # signed constant: W = sign(N(0,1)) * sqrt(2 / fan_in), about half positive
    layer = dict(supermask_layers(a))["net.1.scores"]
    w = layer.frozen.tensor()
    assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / 784)))
    assert abs(float((w > 0).float().mean()) - 0.5) < 0.01
    scale = np.float32(math.sqrt(2 / 784))
    np.testing.assert_array_equal(w.numpy(), np.where(bits.regenerate_signs(0, 0, (200, 784)), scale, -scale))


# ----------------------------------------------------------------------------- bits


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1000, 4099])
def test_pack_unpack_round_trip(n):
    rng = np.random.default_rng(n)
    arr = rng.random(n) < 0.3
    packed = bits.pack_bits(arr)
    assert len(packed) == bits.packed_size(n) == math.ceil(n / 8)
    np.testing.assert_array_equal(bits.unpack_bits(packed, n), arr)
    ba = bits.to_bitarray(arr)
    assert isinstance(ba, bitarray) and len(ba) == n
    assert ba.tobytes() == packed  # same byte layout as the file payload
    assert ba.tolist() == arr.tolist()
    np.testing.assert_array_equal(bits.from_bitarray(ba, n), arr)
    # reading at a bit offset (how a mask file's layers are cut)
    both = bits.pack_bits(np.concatenate([~arr, arr]))
    np.testing.assert_array_equal(bits.unpack_bits(both, (n,), offset_bits=n), arr)


def test_pack_bits_order_is_msb_first():
    assert bits.pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=bool)) == bytes([0b10000001, 0b10000000])
    with pytest.raises(ValueError):
        bits.pack_bits(np.array([0, 2]))


def test_conv4_masks_and_signs_survive_bitarray_round_trip(conv4):
    for _name, layer in supermask_layers(conv4):
        mask = layer.mask().numpy()
        signs = layer.frozen.sign_array()
        for arr in (mask, signs):
            ba = bits.to_bitarray(arr)
            back = bits.from_bitarray(ba, arr.shape)
            assert back.dtype == np.bool_ and back.shape == arr.shape
            np.testing.assert_array_equal(back, arr)
            np.testing.assert_array_equal(bits.unpack_bits(bits.pack_bits(arr), arr.shape), arr)
        # the stored signs are exactly the signs of the materialised weight
        np.testing.assert_array_equal(layer.frozen.tensor().numpy() > 0, signs)


def test_bits_module_is_torch_free():
    code = ("import sys, fedge.models.bits, fedge.models.maskfile, fedge.models.wire; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------- straight-through estimators


@pytest.mark.parametrize("init", ["signed_constant", "kaiming_normal"])
def test_straight_through_gradient_reaches_scores_only(init):
    torch.manual_seed(0)
    layer = SupermaskLinear(30, 20, prune_ratio=0.5, binarize=True, seed=3, index=1, weight_init=init)
    assert [n for n, _ in layer.named_parameters()] == ["scores"]
    x = torch.randn(8, 30, requires_grad=True)
    w_eff = layer.effective_weight()
    w_eff.retain_grad()
    loss = (F.linear(x, w_eff) ** 2).sum()
    loss.backward()
    w = layer.frozen.tensor()
    assert not w.requires_grad
    expected = w_eff.grad * w * torch.sign(layer.scores.detach())
    torch.testing.assert_close(layer.scores.grad, expected)
    assert float(layer.scores.grad.abs().sum()) > 0
    assert float(layer.scores.grad[~layer.mask()].abs().sum()) > 0  # pruned weights get gradient too
    # forward: alpha * sign(W) * m with alpha = sum(|W| m) / kept
    m = layer.mask()
    alpha = float((w.abs() * m).sum() / layer.kept)
    torch.testing.assert_close(w_eff.detach(), alpha * torch.sign(w) * m)
    assert layer.alpha() == pytest.approx(alpha, rel=1e-6)
    if init == "signed_constant":
        assert alpha == pytest.approx(math.sqrt(2 / 30), rel=1e-6)


def _two_step_forward(layer: SupermaskLayer, x: torch.Tensor) -> torch.Tensor:
    """The reference: autograd through op(x, SupermaskWeight(|scores|)), which keeps w_eff."""
    return layer.apply_weight(x, layer.effective_weight())


def _loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, two_step: bool):
    layers = [layer for _, layer in supermask_layers(model)]
    for layer in layers:
        layer.scores.grad = None
        if two_step:
            layer.forward = _two_step_forward.__get__(layer)
    x = x.clone().requires_grad_(True)
    try:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return float(loss.detach()), [layer.scores.grad.clone() for layer in layers], x.grad


@pytest.mark.parametrize("name", ["conv4-mpt", "conv4-mpt11", "mlp-mpt"])
def test_rematerialising_op_gives_the_two_step_numbers(name):
    """SupermaskOp (w_eff rebuilt in backward) must not change training numerics."""
    torch.manual_seed(0)
    model = build_model(name, seed=0)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    loss_ref, grads_ref, gx_ref = _loss_and_grads(model, x, y, two_step=True)
    loss, grads, gx = _loss_and_grads(model, x, y, two_step=False)
    assert loss == pytest.approx(loss_ref, rel=1e-6, abs=1e-7)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_conv4_mpt_trains_on_channels_last_images(threads):
    """Images loaded as (N, 28, 28) and reshaped have strides (784, 1, 28, 1), which torch
    reads as channels-last: convolutions then return channels-last weight gradients, and the
    score gradient (formed on a flat view) must come out right anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = build_model("conv4-mpt", seed=0)
        x, y = torch.randn(10, 28, 28, 1).permute(0, 3, 1, 2), torch.randint(0, 10, (10,))
        loss_ref, grads_ref, _ = _loss_and_grads(model, x, y, two_step=True)
        loss, grads, _ = _loss_and_grads(model, x, y, two_step=False)
    finally:
        torch.set_num_threads(before)
    assert loss == pytest.approx(loss_ref, rel=1e-6, abs=1e-7)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["signed_constant", "kaiming_normal"])
@pytest.mark.parametrize("binarize", [True, False])
def test_rematerialising_op_single_layers(init, binarize):
    torch.manual_seed(1)
    lin = SupermaskLinear(40, 24, prune_ratio=0.7, binarize=binarize, seed=2, index=0, weight_init=init)
    conv = SupermaskConv2d(3, 8, 3, padding=1, prune_ratio=0.7, binarize=binarize, seed=2, index=1, weight_init=init)
    for layer, x in ((lin, torch.randn(5, 40)), (conv, torch.randn(2, 3, 9, 9))):
        outs = []
        for two_step in (True, False):
            layer.scores.grad = None
            xr = x.clone().requires_grad_(True)
            out = _two_step_forward(layer, xr) if two_step else layer(xr)
            (out.sin().sum()).backward()
            outs.append((out.detach(), layer.scores.grad.clone(), xr.grad))
        for ref, got in zip(*outs):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def _saved_bytes(fn) -> int:  # noqa: ANN001
    """Bytes autograd saves for backward while fn() runs (parameters excluded: they are not copies)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_rematerialising_op_does_not_keep_the_float_weight():
    torch.manual_seed(0)
    layer = SupermaskLinear(512, 256, prune_ratio=0.8, seed=0, index=4)
    x = torch.randn(4, 512, requires_grad=True)  # an inner layer: backward needs dL/dx, hence w_eff
    fused = _saved_bytes(lambda: layer(x))
    two_step = _saved_bytes(lambda: _two_step_forward(layer, x))
    w_bytes = 4 * 512 * 256
    assert two_step >= w_bytes  # the reference keeps w_eff for backward
    assert fused <= x.numel() * 4 + w_bytes // 8  # x and the mask as packed bits


@pytest.mark.parametrize("n,kept", [(1_605_632, 321_127), (100_000, 20_000), (100, 20), (10, 3)])
@pytest.mark.parametrize("kind", ["normal", "ties", "signed_ties"])
def test_lean_mask_equals_topk(n, kept, kind):
    gen = torch.Generator().manual_seed(n)
    scores = {
        "normal": lambda: torch.randn(n, generator=gen),
        "ties": lambda: torch.randint(-3, 4, (n,), generator=gen).float(),
        "signed_ties": lambda: torch.randint(-2, 3, (n,), generator=gen).float() * 0.5,
    }[kind]()
    mask = mask_from_scores(scores, kept)
    assert torch.equal(mask, topk_mask(scores.abs(), kept))
    assert int(mask.sum()) == kept
    with pytest.raises(ValueError):
        mask_from_scores(torch.full((n,), float("nan")), kept)


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (64,), (65,), (3, 5, 7), (256, 6272)])
def test_sign_bits_are_packed_signs(shape):
    assert bits.regenerate_sign_bits(2, 5, shape) == bits.pack_bits(bits.regenerate_signs(2, 5, shape))


def test_trainer_leaves_no_gradients_behind():
    from fedge.edge_agent.trainer import LocalTrainer, TrainConfig

    trainer = LocalTrainer("conv4-mpt", (1, 28, 28), 10)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    trainer.train(get_state(trainer.model), x, y, TrainConfig(epochs=1, batch_size=4, lr=0.1), seed=0)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_conv4_training_step_updates_scores_and_masks(conv4):
    model = MPTConv4(variant="mpt-1/32", seed=0)
    model.load_state_dict(conv4.state_dict())
    before = model_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _, layer in supermask_layers(model):
        assert layer.scores.grad is not None and torch.isfinite(layer.scores.grad).all()
    after = model_masks(model)
    assert any((before[k] != after[k]).any() for k in before)
    assert [int(m.sum()) for m in after.values()] == CONV4_KEPT


def test_binary_activation_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.25, 0.999, 1.5], requires_grad=True)
    y = BinaryActivation()(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.sum().backward()
    expected = [0.0, 0.0, 1.0, 2.0, 1.5, 2 * (1 - 0.999), 0.0]
    np.testing.assert_allclose(x.grad.numpy(), expected, atol=1e-6)
    assert SignActivation()(x.detach()).tolist() == y.tolist()


def test_bnn_latent_weights_get_clipped_straight_through_gradient():
    layer = BinaryLinear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.2, 1.5, -3.0]] * 3))
    out = layer(torch.ones(2, 4))
    alpha = float(layer.weight.detach().abs().mean())
    torch.testing.assert_close(out, torch.full((2, 3), alpha * (1 - 1 + 1 - 1)))
    out.sum().backward()
    g = layer.weight.grad[0]
    assert g[0] != 0 and g[1] != 0 and g[2] == 0 and g[3] == 0  # zero where |w| > 1
    state = get_state(build_model("conv4-bnn", seed=0))
    assert sum(v.size for v in state.values()) == CONV4_WEIGHTS and all(k.endswith(".weight") for k in state)


# ----------------------------------------------------------------------------- materialize


@pytest.mark.parametrize("name", ["conv4-mpt", "conv4-mpt11", "conv4-bnn", "conv4-bnn11", "mlp-mpt"])
def test_materialize_matches_the_model(name):
    model = build_model(name, seed=0)
    x = torch.randn(6, 1, 28, 28)
    if name.endswith("11"):  # give BatchNorm non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(torch.randn(16, 1, 28, 28) * 2 + 0.3)
    model.eval()
    dense = materialize(model)
    plain = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, SignActivation)
    assert isinstance(dense, nn.Sequential)
    assert all(isinstance(m, plain) for m in dense.children())
    assert not any(isinstance(m, (SupermaskLayer, BinaryActivation)) for m in dense.modules())
    with torch.no_grad():
        diff = (dense(x) - model(x)).abs().max().item()
    assert diff < 1e-5
    if name.startswith("conv4"):
        assert count_parameters(dense) == CONV4_WEIGHTS
    if "mpt" in name:
        for (_sname, layer), lin in zip(supermask_layers(model), [m for m in dense if isinstance(m, (nn.Conv2d, nn.Linear))]):
            nz = lin.weight.detach() != 0
            assert int(nz.sum()) == layer.kept
            assert set(lin.weight.detach().abs()[nz].unique().tolist()) == pytest.approx([layer.alpha()], rel=1e-6)


# ----------------------------------------------------------------------------- mask files


def test_conv4_mask_file_size_and_round_trip(conv4, tmp_path):
    mf = to_mask_file(conv4)
    assert mf.model == "conv4-mpt" and mf.variant == "mpt-1/32" and mf.seed == 0
    assert mf.mask_payload_bytes == 241_544 == CONV4_WEIGHTS // 8
    assert len(mf.mask_payload()) == 241_544
    assert [layer.kept for layer in mf.layers] == CONV4_KEPT
    assert mf.extras == {}
    path = tmp_path / "conv4.fmask"
    size = mf.save(path)
    assert 241_544 < size < 241_544 + 4096  # the payload plus a small header
    back = MaskFile.load(path)
    for k, m in mf.masks.items():
        np.testing.assert_array_equal(back.masks[k], m)
    assert [(l.name, l.shape, l.alpha) for l in back.layers] == [(l.name, l.shape, l.alpha) for l in mf.layers]

    rebuilt = build_from_mask_file(path)
    for k, m in model_masks(rebuilt).items():
        np.testing.assert_array_equal(m, mf.masks[k])
    x = torch.randn(3, 1, 28, 28)
    conv4.eval()
    with torch.no_grad():
        assert (rebuilt(x) - conv4(x)).abs().max().item() < 1e-5
        assert (build_from_mask_file(path, dense=True)(x) - conv4(x)).abs().max().item() < 1e-5


def test_mask_file_rejects_corruption():
    model = build_mpt("mlp", variant="mpt-1/32", seed=0)
    data = bytearray(to_mask_file(model).to_bytes())
    assert MaskFile.from_bytes(bytes(data)).model == "mlp-mpt"
    bad = bytearray(data)
    bad[-10] ^= 0x01
    with pytest.raises(MaskFileError):
        MaskFile.from_bytes(bytes(bad))
    with pytest.raises(MaskFileError):
        MaskFile.from_bytes(bytes(data[:-1]))
    with pytest.raises(MaskFileError):
        MaskFile.from_bytes(b"NOTAMASK" + bytes(data[8:]))
    with pytest.raises(ValueError, match="1-bit file"):
        to_mask_file(build_model("conv4", seed=0))  # a dense model has no 1-bit form


@pytest.mark.parametrize("name", ["conv4-bnn", "conv4-bnn11"])
def test_bnn_file_is_one_bit_per_weight_and_rebuilds_the_same_model(name, tmp_path):
    """BNN-FL's final model: the latent weights' signs plus alpha = mean|w| per layer (and the
    BatchNorm statistics for 1/1), 1 bit per weight like the MPT mask file."""
    model = build_model(name, seed=3)
    with torch.no_grad():  # a trained-looking latent state and, for 1/1, BatchNorm statistics
        for _, layer in binary_weight_layers(model):
            layer.weight.mul_(torch.rand_like(layer.weight) * 2)
        model.train()
        model(torch.randn(16, 1, 28, 28))
    model.eval()
    mf = to_mask_file(model)
    assert mf.bits == "sign" and mf.total_weights == 1_932_352
    size = mf.save(tmp_path / "final_model.bnn")
    extras = sum(4 * v.size for v in mf.extras.values())
    assert mf.mask_payload_bytes == 241_544 and 241_544 + extras < size < 241_544 + extras + 4096
    rebuilt = build_from_mask_file(tmp_path / "final_model.bnn")
    with torch.no_grad():
        for (_, mine), (_, back) in zip(binary_weight_layers(model), binary_weight_layers(rebuilt)):
            torch.testing.assert_close(back.binary_weight(), mine.binary_weight(), rtol=1e-6, atol=0)
        for (k, buf), (_, back_buf) in zip(model.named_buffers(), rebuilt.named_buffers()):
            assert not buf.is_floating_point() or torch.equal(buf, back_buf), k  # the counter is not needed
        if name == "conv4-bnn":  # 1/1 logits can differ where a binary activation sits on a tie
            x = torch.randn(4, 1, 28, 28)
            assert (rebuilt(x) - model(x)).abs().max().item() < 1e-4
    if name == "conv4-bnn":  # `fedge export` reads the file; 1/1 parity is not enforced (sign ties)
        from fedge.models.export import export  # noqa: PLC0415

        summary = export(tmp_path / "final_model.bnn", out=tmp_path / "bnn.onnx")
        assert summary["model"] == "conv4-bnn" and summary["max_abs_diff"] < 1e-3, summary
    bad = bytearray((tmp_path / "final_model.bnn").read_bytes())
    bad[-1 - extras] ^= 0x80  # a flipped sign bit
    with pytest.raises(MaskFileError, match="CRC"):
        MaskFile.from_bytes(bytes(bad))


def test_mask_file_of_format_v1_still_loads():
    """Files written before sign files existed (v1, no "bits" field) are masks."""
    data = to_mask_file(build_mpt("mlp", variant="mpt-1/32", seed=0)).to_bytes()
    (hlen,) = struct.unpack_from("<I", data, 8)
    head = json.loads(data[12 : 12 + hlen])
    assert head.pop("bits") == "mask"
    head["version"] = 1
    raw = json.dumps(head).encode()
    old = MaskFile.from_bytes(data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + hlen :])
    assert old.bits == "mask" and old.model == "mlp-mpt"


def test_mask_file_of_11_model_carries_bn_statistics():
    model = build_mpt("mlp", variant="mpt-1/1", seed=5)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 28, 28) + 0.5)
    model.eval()
    mf = MaskFile.from_bytes(to_mask_file(model).to_bytes())
    assert set(mf.extras) == {k for k in get_state(model) if not k.endswith(".scores")}
    rebuilt = build_from_mask_file(mf)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert (rebuilt(x) - model(x)).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- mask aggregation helpers


def test_topk_mask_and_keep_probability_helpers():
    a, b, c = (build_model("mlp-mpt", seed=s) for s in (1, 2, 3))
    # the torch-free masks of a score state are the model's own masks
    for model in (a, b):
        state = get_state(model)
        for k, m in model_masks(model).items():
            np.testing.assert_array_equal(bits.topk_mask(state[k], keep_count(m.size, 0.8)), m)
    masks = [model_masks(m) for m in (a, b, c)]
    p = bits.keep_probability(masks, weights=[1, 1, 2])
    for k in p:
        expected = 0.25 * masks[0][k] + 0.25 * masks[1][k] + 0.5 * masks[2][k]
        np.testing.assert_allclose(p[k], expected, atol=1e-7)
    # scores from keep probabilities: the top-k prefers weights kept more often
    scores = bits.scores_from_keep_prob(p, previous=get_state(a))
    new_masks = {k: bits.topk_mask(s, keep_count(s.size, 0.8)) for k, s in scores.items()}
    for k in p:
        kept_p = p[k][new_masks[k]]
        dropped_p = p[k][~new_masks[k]]
        assert kept_p.min() >= dropped_p.max() - 1e-7
    # a model's masks can be written back as scores and are reproduced exactly
    target = model_masks(b)
    set_scores_from_masks(a, target)
    for k, m in model_masks(a).items():
        np.testing.assert_array_equal(m, target[k])


# ----------------------------------------------------------------------------- training


def test_mlp_mpt_learns_synthetic_data_through_local_trainer():
    from fedge.edge_agent.trainer import LocalTrainer, TrainConfig
    from fedge.models.data import synthetic
    from fedge.models.evaluate import evaluate

    ds = synthetic(n_train=1000, n_test=500, seed=0)
    trainer = LocalTrainer("mlp-mpt", ds.in_shape, ds.num_classes)
    start = get_state(build_model("mlp-mpt", ds.in_shape, ds.num_classes, seed=0))
    x, y = torch.from_numpy(ds.train.x), torch.from_numpy(ds.train.y)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=1e-4)
    result = trainer.train(start, x, y, cfg, seed=0)
    assert list(result.state) == list(start)  # only the scores travel
    model = build_model("mlp-mpt", ds.in_shape, ds.num_classes)
    set_state(model, result.state)
    acc = evaluate(model, torch.from_numpy(ds.test.x), torch.from_numpy(ds.test.y))["accuracy"]
    print("mlp-mpt accuracy after 2 local epochs:", acc)
    assert acc > 0.4, acc  # chance is 0.1
    # the trained masks still keep exactly 20 % per layer
    for _name, layer in supermask_layers(model):
        assert int(layer.mask().sum()) == keep_count(layer.frozen.numel, 0.8)


@pytest.mark.parametrize("name", ["mlp-mpt", "conv4-mpt"])
def test_materialized_model_exports_to_onnx(name, tmp_path):
    import warnings

    import onnxruntime as ort
    model = build_model(name, seed=0).eval()
    dense = materialize(model)
    x = torch.randn(3, 1, 28, 28)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(dense, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"], opset_version=17)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - model(x).numpy()).max() < 1e-5
