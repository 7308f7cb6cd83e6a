"""Graph templates (models/onnx_templates/, filled by models/onnx_graph.py without torch), the numpy
materialiser of MPT / BNN models (models/supermask_numpy.py), and segmentation on the device.

Every check compares with torch on the same tensors: the shipped templates with what torch
exports today, the numpy dense weights with models.supermask.materialize, and ONNX Runtime's
logits from a model message with the torch model's, for every registered model.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fedge.cli.infer import main as cli_main
from fedge.edge_agent.infer import LiveModel, ModelFollower, Predictor, start_server
from fedge.models import onnx_graph
from fedge.models.export import PARITY_ATOL, export, export_onnx, has_binary_activations, torch_logits
from fedge.models.mpt_nets import build_mpt
from fedge.models.onnx_templates import TEMPLATE_DIR
from fedge.models.onnx_templates import build as template_build
from fedge.models.onnx_templates.build import (
    TemplateBuildError,
    build_template,
    dense_form,
    served_models,
    state_off_ties,
    template_differences,
    write_templates,
)
from fedge.models.registry import MODELS, Registered, build_model, get_state, model_names, set_state
from fedge.models.spec import ModelSpec
from fedge.models.supermask import supermask_layers
from fedge.models.supermask_numpy import materialise, sign_weight, supermask_weight
from fedge.models.wire.messages import build_model_message
from tests.test_families import TinySeg, bright_squares

SHAPE = (1, 28, 28)


def _envelope(name: ModelSpec | str, state, shape=SHAPE, classes: int = 10, version: int = 1, **meta) -> bytes:  # noqa: ANN001
    return build_model_message("f1", "run-t", version, name, state,
                               meta={"in_shape": list(shape), "num_classes": classes, **meta})


def _x(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# ----------------------------------------------------------------------------- the shipped templates
@pytest.mark.parametrize("name", served_models())
def test_shipped_template_matches_what_torch_exports_today(name: str) -> None:
    """Fails when an architecture changed (or a model was registered) without
    `python -m fedge.models.onnx_templates.build`; the build itself proves the fresh template
    against torch at two shapes."""
    path = TEMPLATE_DIR / f"{name}.onnx"
    assert path.is_file(), f"no template for {name}: run python -m fedge.models.onnx_templates.build {name}"
    shipped = onnx.load(str(path))
    why = template_differences(shipped, build_template(name))
    assert not why, f"{path.name} is out of date ({'; '.join(why)}): run python -m fedge.models.onnx_templates.build {name}"
    assert path.stat().st_size < 32 * 1024  # the weights are not in it
    template = onnx_graph.Template.from_proto(shipped)
    assert template.model == name and template.family == MODELS[name].family
    for init in shipped.graph.initializer:
        assert init.name in template.slots and not init.raw_data and not init.float_data, init.name
    assert [w.name for w in template.wire] == list(get_state(build_model(name)))


def test_regeneration_command_checks_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert template_build.main(["--check", "mlp"]) == 0
    assert "mlp: ok" in capsys.readouterr().out
    shutil.copy(TEMPLATE_DIR / "conv4.onnx", tmp_path / "mlp.onnx")  # a stale template
    assert template_build.main(["--check", "--dir", str(tmp_path), "mlp", "mlp-mpt"]) == 1
    out = capsys.readouterr()
    assert "mlp: OUT OF DATE" in out.out and "mlp-mpt: OUT OF DATE: missing" in out.out
    assert "python -m fedge.models.onnx_templates.build mlp mlp-mpt" in out.err
    assert template_build.main(["--dir", str(tmp_path), "mlp"]) == 0
    assert template_build.main(["--check", "--dir", str(tmp_path), "mlp"]) == 0
    assert template_build.main(["resnet18"]) == 2 and "unknown model 'resnet18'" in capsys.readouterr().err


class BakedMLP(nn.Module):
    """Flattens with a Python-int reshape: the exporter bakes 784 into a constant."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.n_in = int(np.prod(in_shape))
        self.fc = nn.Linear(self.n_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], self.n_in))


def test_build_refuses_a_graph_that_bakes_a_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODELS, "test-baked", Registered(BakedMLP))
    with pytest.raises(TemplateBuildError, match="depends on in_shape / num_classes.*use nn.Flatten"):
        build_template("test-baked")


# ----------------------------------------------------------------------------- numpy materialiser
@pytest.mark.parametrize("name", ["conv4-mpt", "mlp-mpt", "conv4-mpt11", "conv4-bnn", "mlp-bnn"])
def test_numpy_materialiser_equals_torch_materialize(name: str) -> None:
    model = build_model(name, SHAPE, 10, seed=5)
    dense, recipe, options = dense_form(model)
    want = {k: v.numpy() for k, v in dense.state_dict().items() if v.is_floating_point()}
    got = materialise(recipe, get_state(model), want, options)
    for key, arr in want.items():
        if recipe.get(key, {}).get("op") == "sign":  # alpha = mean|w|: a float sum, torch's up to rounding
            np.testing.assert_allclose(got[key], arr, rtol=1e-6, atol=0, err_msg=key)
            assert np.array_equal(got[key] > 0, arr > 0), key
        else:  # signed-constant MPT weights: bit for bit
            assert np.array_equal(got[key], arr), key


def test_mask_rule_ties_prune_ratios_and_kaiming_weights() -> None:
    """The top-k rule (ties to the lower index), several prune ratios and kaiming-normal frozen weights."""
    for init in ("signed_constant", "kaiming_normal"):
        for ratio in (0.0, 0.5, 0.8, 0.95):
            model = build_mpt("mlp", (1, 6, 6), 4, variant="mpt-1/32", prune_ratio=ratio, seed=7, weight_init=init, hidden=16)
            with torch.no_grad():
                for i, (_name, layer) in enumerate(supermask_layers(model)):
                    if i == 1:  # all-equal |scores|: the lowest indices win the ties
                        layer.scores.copy_(torch.where(torch.rand(layer.scores.shape) < 0.5, 0.25, -0.25))
            for name, layer in supermask_layers(model):
                scores = layer.scores.detach().numpy()
                ours = supermask_weight(scores, 7, layer.frozen.index, ratio, True, init)
                theirs = layer.dense_weight().numpy()
                assert np.array_equal(ours != 0, theirs != 0), (init, ratio, name)
                np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    latent = np.array([[0.5, -0.25], [0.0, -1.0]], np.float32)
    assert sign_weight(latent).tolist() == [[0.4375, -0.4375], [0.4375, -0.4375]]  # sign(0) = +1, mean|w| = 0.4375


# ----------------------------------------------------------------------------- every model from the wire
def _served(name: str, shape: tuple[int, ...] = SHAPE, classes: int = 10, **meta) -> tuple[np.ndarray, np.ndarray, bool]:  # noqa: ANN003
    model = build_model(name, shape, classes, seed=3).eval()
    state = state_off_ties(model)  # 1/1 models: BatchNorm means off the untrained sign ties
    pred = Predictor.from_envelope(_envelope(name, state, shape, classes, **meta))
    x = _x(shape)
    return torch_logits(model, x), pred.logits(x), has_binary_activations(model)


@pytest.mark.parametrize("name", served_models())
def test_every_registered_model_served_from_the_wire_matches_torch(name: str) -> None:
    ref, got, binary = _served(name)
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    if binary:  # sign() ties: exact parity is impossible (export.has_binary_activations), classes agree
        assert agree >= 0.9, f"{name}: classes agree on {agree:.0%}"
    else:
        assert float(np.abs(ref - got).max()) <= PARITY_ATOL * max(1.0, float(np.abs(ref).max())), name
        assert agree == 1.0, name


@pytest.mark.parametrize(("spec", "shape", "classes"), [
    (ModelSpec("conv4-mpt"), (3, 32, 32), 7),
    (ModelSpec("conv4-mpt", {"prune_ratio": 0.5}), (1, 28, 28), 10),
    (ModelSpec("mlp-mpt", {"prune_ratio": 0.5, "seed": 11}), (1, 28, 28), 10),
    (ModelSpec("mlp-mpt", {"prune_ratio": 0.95, "seed": 3, "hidden": 48}), (2, 9, 9), 3),
    (ModelSpec("mlp", {"hidden": 64}), (1, 28, 28), 10),
    (ModelSpec("mlp-bnn", {"hidden": 32}), (1, 28, 28), 10),
    (ModelSpec("mlp-private-head", {"hidden": 16}), (3, 8, 8), 5),
    (ModelSpec("conv4"), (6, 8, 8), 4),
    (ModelSpec("conv4"), (3, 17, 23), 5),
])
def test_templates_take_any_shape_and_the_header_options(spec: ModelSpec, shape: tuple[int, ...], classes: int) -> None:
    """The header's model_options set up the template: the prune ratio and the frozen weights'
    seed (the numpy materialiser regenerates them, bit for bit torch's), and the width (free dims)."""
    model = build_model(spec, shape, classes, seed=4).eval()
    proto, msg = onnx_graph.from_envelope(_envelope(spec, get_state(model), shape, classes))
    assert msg.spec == spec
    pred = Predictor.from_proto(proto)
    x = _x(shape, 32)
    ref, got = torch_logits(model, x), pred.logits(x)
    assert float(np.abs(ref - got).max()) <= PARITY_ATOL and pred.in_shape == shape and pred.num_classes == classes
    assert pred.describe()["model_options"] == spec.options_dict() and pred.spec == spec


def test_the_header_seed_makes_the_frozen_weights() -> None:
    """Scores trained on seed 11's frozen weights give torch's logits only under seed 11; under the
    default seed the same scores select other weights (so the header's seed is really used)."""
    spec = ModelSpec("mlp-mpt", {"prune_ratio": 0.5, "seed": 11})
    model = build_model(spec, SHAPE, 10, seed=4).eval()
    state, x = get_state(model), _x(SHAPE, 32)
    ref = torch_logits(model, x)
    right = Predictor.from_proto(onnx_graph.build_onnx(spec, state)).logits(x)
    wrong = Predictor.from_proto(onnx_graph.build_onnx(ModelSpec("mlp-mpt", {"prune_ratio": 0.5}), state)).logits(x)
    assert float(np.abs(ref - right).max()) <= PARITY_ATOL
    assert float(np.abs(ref - wrong).max()) > 0.1


def test_options_come_from_the_header_only() -> None:
    """A prune_ratio in the message meta is no option (the header's model_options is the one way);
    an option the model lacks is refused with the registry's words, a follower keeps serving."""
    model = build_model("conv4-mpt", SHAPE, 10, seed=4).eval()
    x = _x(SHAPE, 16)
    pred = Predictor.from_envelope(_envelope("conv4-mpt", get_state(model), prune_ratio=0.5))
    assert float(np.abs(torch_logits(model, x) - pred.logits(x)).max()) <= PARITY_ATOL
    assert pred.describe()["model_options"] == {}
    bad = _envelope(ModelSpec("conv4-mpt", {"hidden": 64}), get_state(model))
    want = r"model conv4-mpt has no option 'hidden'; its options: prune_ratio \(a number in \[0, 1\), default 0.8\); seed"
    with pytest.raises(onnx_graph.GraphError, match=want):
        onnx_graph.from_envelope(bad)
    follower = ModelFollower(LiveModel(), fleet="f1")
    assert not follower.handle(bad) and follower.rejected == 1
    assert re.search(want, follower.last_error or ""), follower.last_error


def test_templates_declare_the_registered_options() -> None:
    """Every served template lists its model's registered options, as registered: prune_ratio and
    seed applied by the fill, hidden a shape option sizing the layers."""
    for name in served_models():
        template = onnx_graph.load_template(name)
        registered = {o.name: o for o in MODELS[name].options}
        assert [o.option.name for o in template.options] == list(registered), name
        for entry in template.options:
            want = registered[entry.option.name]
            assert (entry.option.kind, entry.option.default, entry.option.low, entry.option.high) == \
                (want.kind, want.default, want.low, want.high), (name, entry)
            assert entry.role == (onnx_graph.SHAPE if entry.option.name == "hidden" else onnx_graph.FILL), (name, entry)
            assert bool(entry.dims) == (entry.role == onnx_graph.SHAPE), (name, entry)
    mlp = onnx_graph.load_template("mlp")
    assert {w.name: w.shape for w in mlp.wire}["net.3.weight"] == (None, None)  # hidden x hidden: both free
    assert ("net.5.weight", 1) in mlp.options[0].dims and ("net.5.weight", 0) not in mlp.options[0].dims


def test_mpt_export_through_the_graph_builder(tmp_path: Path) -> None:
    """`fedge export --builder graph` fills the template (the device's path), checked against torch by export()."""
    for name in ("conv4-mpt", "mlp-bnn"):
        summary = export(name, out=tmp_path / f"{name}.onnx", builder="graph")
        assert summary["max_abs_diff"] <= PARITY_ATOL and summary["class_agreement"] == 1.0
        assert Predictor.load(tmp_path / f"{name}.onnx").describe()["builder"] == "template"
    assert cli_main(["export", "conv4-mpt11", "--builder", "graph", "--out", str(tmp_path / "m11.onnx"), "--json"]) == 0
    # a spec's options reach the template and the file's metadata, from the API and the command line
    spec = ModelSpec("mlp-mpt", {"prune_ratio": 0.5, "seed": 11, "hidden": 64})
    summary = export(spec, out=tmp_path / "spec.onnx", builder="graph")
    assert summary["max_abs_diff"] <= PARITY_ATOL and summary["model_options"] == spec.options_dict()
    assert Predictor.load(tmp_path / "spec.onnx").spec == spec
    assert cli_main(["export", "mlp", "--model-option", "hidden=64", "--builder", "graph",
                     "--out", str(tmp_path / "h64.onnx")]) == 0
    assert Predictor.load(tmp_path / "h64.onnx").describe()["model_options"] == {"hidden": 64}
    # the filled graph has torch's folded weight layout (no Transpose of a weight), so int8 quantises it
    summary = export("mlp-mpt", out=tmp_path / "q.onnx", builder="graph", int8="dynamic")
    assert "Transpose" not in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert summary["int8_bytes"] < 0.35 * summary["bytes"]


def test_fill_names_the_bad_tensor_or_option() -> None:
    state = get_state(build_model("conv4-mpt", SHAPE, 10, seed=0))

    def fails(match: str, name: ModelSpec | str = "conv4-mpt", tensors=None, **kwargs) -> None:  # noqa: ANN001, ANN003
        with pytest.raises(onnx_graph.GraphError, match=match):
            onnx_graph.build_onnx(name, state if tensors is None else tensors, **kwargs)

    fails(r"conv4-mpt: tensor 'net.2.scores' has shape \[64, 60, 3, 3\], expected \[64, 64, 3, 3\]",
          tensors={**state, "net.2.scores": np.zeros((64, 60, 3, 3), np.float32)})
    fails(r"tensor 'net.0.scores' has shape \[64, 1, 9\], expected \[64, \*, 3, 3\]",
          tensors={**state, "net.0.scores": np.zeros((64, 1, 9), np.float32)})
    fails("tensor 'net.13.scores' contains NaN or Inf", tensors={**state, "net.13.scores": state["net.13.scores"] * np.inf})
    fails("tensor 'net.13.scores' has dtype int64", tensors={**state, "net.13.scores": state["net.13.scores"].astype(np.int64)})
    fails(r"missing \['net.2.scores'\], unexpected \['net.2.weight'\]",
          tensors={**{k: v for k, v in state.items() if k != "net.2.scores"}, "net.2.weight": state["net.2.scores"]})
    fails("'net.0.scores' takes 1 input channels, but its layer receives 3", in_shape=(3, 28, 28))
    fails("the last layer gives 10 outputs per sample but num_classes is 4", num_classes=4)
    fails(r"in_shape must be 3 positive dimensions, got \[784\]", in_shape=(784,))
    fails(r"model conv4-mpt: option prune_ratio=1.5 is not a number in \[0, 1\)", ModelSpec("conv4-mpt", {"prune_ratio": 1.5}))
    fails(r"option seed=-1 is not an integer in \[0, 4294967295\]", ModelSpec("conv4-mpt", {"seed": -1}))
    fails(r"option seed=2.5 is not an integer", ModelSpec("conv4-mpt", {"seed": 2.5}))
    fails(r"model 'conv4-mpt@0.9' is no registered model name \(options are not part of the name", "conv4-mpt@0.9")
    fails(r"model '../conv4-mpt' is no registered model name", "../conv4-mpt")
    mlp = get_state(build_model("mlp"))
    fails(r"model mlp has no option 'prune_ratio'; its options: hidden \(an integer in \[1, 65536\], default 200\)",
          ModelSpec("mlp", {"prune_ratio": 0.5}), tensors=mlp)
    fails(r"mlp: option hidden=64, but tensor 'net.1.weight' is 200 wide along axis 0", ModelSpec("mlp", {"hidden": 64}),
          tensors=mlp)
    shared = {k: v for k, v in get_state(build_model("mlp-private-head")).items() if not k.startswith("head.")}
    fails(r"lacks \['head.weight', 'head.bias'\], which each device keeps for itself", "mlp-private-head", tensors=shared)


def test_template_loader_refuses_a_file_that_is_no_template(tmp_path: Path) -> None:
    export_onnx(build_model("mlp"), tmp_path / "mlp.onnx")  # a plain export: weights, no slot table
    with pytest.raises(onnx_graph.GraphError, match="not a fedge graph template"):
        onnx_graph.load_template("mlp", tmp_path)
    (tmp_path / "mlp-mpt.onnx").write_bytes(b"garbage")
    with pytest.raises(onnx_graph.GraphError, match="not a readable ONNX file"):
        onnx_graph.load_template("mlp-mpt", tmp_path)
    assert onnx_graph.supported_models() == served_models()


def test_a_contrastive_model_gets_no_template_and_says_why() -> None:
    contrastive = [name for name in model_names() if MODELS[name].family == "contrastive"]
    assert contrastive and not set(contrastive) & set(served_models())
    with pytest.raises(TemplateBuildError, match="no prediction a device could serve"):
        build_template(contrastive[0])


# ----------------------------------------------------------------------------- segmentation
@pytest.fixture()
def tiny_seg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # noqa: ANN201
    """TinySeg (tests/test_families.py) registered for the test, fitted for a few steps so its masks mean
    something, with its template written to tmp_path."""
    monkeypatch.setitem(MODELS, "test-tiny-seg", Registered(TinySeg, family="segmentation"))
    (path,) = write_templates(["test-tiny-seg"], tmp_path)
    model = build_model("test-tiny-seg", (1, 16, 16), 1, seed=0)
    x, y = bright_squares(64, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), path


def test_segmentation_model_served_from_the_wire_gives_masks(tiny_seg, tmp_path: Path,  # noqa: ANN001
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    model, template = tiny_seg
    assert onnx_graph.load_template("test-tiny-seg", tmp_path).family == "segmentation"
    x, y = bright_squares(8, seed=3)
    x = x.numpy()
    ref = torch_logits(model, x)
    payload = _envelope("test-tiny-seg", get_state(model), (1, 16, 16), 1)
    pred = Predictor.from_envelope(payload, templates=tmp_path)
    assert pred.describe()["family"] == "segmentation" and pred.num_classes == 1 and pred.in_shape == (1, 16, 16)
    out = pred.predict(x)
    assert out.classes is None and out.mask.shape == (8, 1, 16, 16) and out.mask.dtype == np.bool_
    assert float(np.abs(out.logits - ref).max()) <= PARITY_ATOL
    clear = np.abs(ref) > 1e-4  # pixels not on the 0 boundary
    assert np.array_equal(out.mask[clear], (ref > 0)[clear])
    np.testing.assert_allclose(out.probabilities, 1 / (1 + np.exp(-ref)), atol=1e-5)
    truth = y.numpy() > 0.5
    iou = (out.mask & truth).sum() / (out.mask | truth).sum()
    assert iou > 0.8, iou  # the fitted net finds the squares (an all-negative mask would score 0)
    np.testing.assert_allclose(out.positive_fraction, out.mask.reshape(8, -1).mean(1))
    assert np.all(out.confidence >= 0.5) and np.all(out.confidence <= 1.0)
    # the same through the torch exporter (family in its metadata)
    exported = export_onnx(model, tmp_path / "seg.onnx", (1, 16, 16), meta={"model": "test-tiny-seg", "family": "segmentation"})
    again = Predictor.load(exported).predict(x)
    assert again.family == "segmentation" and np.array_equal(again.mask[clear], out.mask[clear])

    # the follower and HTTP endpoint answer with masks; the CLI with the positive share per input
    live = LiveModel()
    follower = ModelFollower(live, fleet="f1", templates=tmp_path)
    assert follower.handle(payload), follower.last_error
    server, _ = start_server(live, port=0)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/predict",
                                     data=json.dumps({"inputs": x[:2].tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
    finally:
        server.shutdown()
        server.server_close()
    assert "classes" not in body and body["model"]["family"] == "segmentation"
    assert np.array_equal(np.array(body["masks"], dtype=bool), out.mask[:2])
    np.testing.assert_allclose(body["positive_fraction"], out.positive_fraction[:2])
    np.save(tmp_path / "x.npy", x[:3])
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(exported), str(tmp_path / "x.npy")]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [float(r[1]) for r in rows] == pytest.approx(out.positive_fraction[:3].tolist(), abs=1e-4)
    assert template.stat().st_size < 8 * 1024


# ----------------------------------------------------------------------------- docs
def test_design_doc_shows_the_real_code() -> None:
    root = Path(__file__).resolve().parents[1]
    section = (root / "docs" / "design.md").read_text().split("## Inference on the device", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    sources = "".join((root / "models" / f).read_text() for f in ("onnx_graph.py", "supermask_numpy.py",
                                                                  "onnx_templates/build.py"))
    assert len(blocks) >= 2
    for block in blocks:
        assert block in sources, block[:80]


def test_materialised_dense_state_roundtrips_into_torch() -> None:
    """The dense tensors a device computes load into torch's materialised model and give its logits."""
    model = build_model("mlp-mpt", SHAPE, 10, seed=9).eval()
    dense, recipe, options = dense_form(model)
    ours = materialise(recipe, get_state(model), [k for k in dense.state_dict()], options)
    rebuilt, _, _ = dense_form(build_model("mlp-mpt", SHAPE, 10, seed=1))
    set_state(rebuilt, ours)
    x = torch.from_numpy(_x(SHAPE, 8))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), dense(x))
