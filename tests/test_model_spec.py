"""A model is a ModelSpec (registered name + checked options), never a string parsed back: the
options' schema and errors, the command line (with the old NAME@RATIO shorthand, there only),
profile-free configs, the model envelope's `model_options`, mask files and private stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedge.models.errors import ConfigError
from fedge.models.registry import (
    build_model,
    get_state,
    mask_file_spec,
    model_options,
    model_spec,
    parameter_count,
    parse_model_options,
    set_state,
)
from fedge.models.spec import ModelSpec

MPT = ModelSpec("mlp-mpt", {"prune_ratio": 0.5, "seed": 3, "hidden": 32})


def test_a_spec_is_a_hashable_value_with_sorted_options() -> None:
    a = ModelSpec("conv4-mpt", {"seed": 2, "prune_ratio": 0.9})
    b = ModelSpec("conv4-mpt", [("prune_ratio", 0.9), ("seed", 2)])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.options == (("prune_ratio", 0.9), ("seed", 2)) and a.option("seed") == 2 and a.option("x", 7) == 7
    assert str(a) == "conv4-mpt(prune_ratio=0.9, seed=2)" and str(ModelSpec("mlp")) == "mlp"
    assert ModelSpec.from_json(json.loads(json.dumps(a.to_json()))) == a
    assert ModelSpec.from_json("mlp") == ModelSpec("mlp")  # a run config stored before specs
    for bad in (None, 3, {"options": {}}, {"name": "mlp", "options": [1]}):
        with pytest.raises(ConfigError, match="a model is"):
            ModelSpec.from_json(bad)


def test_model_spec_checks_against_the_registration_and_drops_defaults() -> None:
    assert model_spec("conv4-mpt", {"prune_ratio": 0.8, "seed": 0}) == ModelSpec("conv4-mpt")
    assert model_spec(ModelSpec("conv4-mpt", {"prune_ratio": 0.9})) == ModelSpec("conv4-mpt", {"prune_ratio": 0.9})
    assert model_spec("mlp", {"hidden": 64.0}).option("hidden") == 64  # an integral float is a fine integer
    assert model_spec("conv4-mpt", {"prune_ratio": 0}).option("prune_ratio") == 0.0
    assert model_options("conv4-mpt") == {"prune_ratio": 0.8, "seed": 0}
    assert model_options(MPT) == {"prune_ratio": 0.5, "seed": 3, "hidden": 32}


@pytest.mark.parametrize("spec, match", [
    (ModelSpec("resnet9"), r"unknown model 'resnet9'; known models: conv4, .*mlp"),
    (ModelSpec("conv4-mpt", {"prune": 0.5}),
     r"model conv4-mpt has no option 'prune'; its options: prune_ratio \(a number in \[0, 1\), default 0.8\); "
     r"seed \(an integer in \[0, 4294967295\], default 0\)"),
    (ModelSpec("conv4", {"hidden": 3}), r"model conv4 has no option 'hidden'; it takes no options"),
    (ModelSpec("conv4-mpt", {"prune_ratio": 1.0}), r"option prune_ratio=1.0 is not a number in \[0, 1\)"),
    (ModelSpec("conv4-mpt", {"prune_ratio": -0.1}), r"option prune_ratio=-0.1 is not a number in \[0, 1\)"),
    (ModelSpec("conv4-mpt", {"prune_ratio": "0.9"}), r"option prune_ratio='0.9' is not a number"),
    (ModelSpec("conv4-mpt", {"prune_ratio": float("nan")}), r"option prune_ratio=nan is not a number"),
    (ModelSpec("mlp", {"hidden": True}), r"option hidden=True is not an integer in \[1, 65536\]"),
    (ModelSpec("mlp", {"hidden": 2.5}), r"option hidden=2.5 is not an integer"),
    (ModelSpec("mlp", {"hidden": 0}), r"option hidden=0 is not an integer in \[1, 65536\]"),
    # options are never read out of the name inside: the shorthand is the command line's alone
    (ModelSpec("conv4-mpt@0.9"), r"unknown model 'conv4-mpt@0.9'.*options are not part of the name"),
])
def test_bad_specs_name_the_model_the_option_and_what_is_allowed(spec, match) -> None:
    with pytest.raises(ConfigError, match=match):
        model_spec(spec)
    with pytest.raises(ConfigError, match=match):
        build_model(spec)  # every registry function checks what it is given


def test_options_change_what_is_built() -> None:
    assert get_state(build_model(ModelSpec("mlp", {"hidden": 16})))["net.1.weight"].shape == (16, 784)
    assert parameter_count(ModelSpec("mlp", {"hidden": 16}), (1, 28, 28), 10) < parameter_count("mlp", (1, 28, 28), 10)
    from fedge.models.supermask import supermask_layers

    kept = {r: [layer.kept for _, layer in supermask_layers(build_model(ModelSpec("mlp-mpt", {"prune_ratio": r})))]
            for r in (0.5, 0.9)}
    assert all(a > b for a, b in zip(kept[0.5], kept[0.9]))
    frozen = [list(supermask_layers(build_model(ModelSpec("mlp-mpt", {"seed": s}))))[0][1].frozen.tensor() for s in (0, 1)]
    assert not np.array_equal(frozen[0].numpy(), frozen[1].numpy())  # the seed picks the frozen weights


def test_command_line_text_becomes_a_spec_once() -> None:
    from fedge.cli.common import model_spec_from_args

    assert parse_model_options("conv4-mpt", ["prune_ratio=0.9", "seed=4"]) == {"prune_ratio": 0.9, "seed": 4}
    assert model_spec_from_args("conv4-mpt", ["prune_ratio=0.9"]) == ModelSpec("conv4-mpt", {"prune_ratio": 0.9})
    # the old shorthand, still read at the command line: NAME@RATIO is the prune ratio
    assert model_spec_from_args("conv4-mpt@0.9") == ModelSpec("conv4-mpt", {"prune_ratio": 0.9})
    assert model_spec_from_args("mlp-mpt@0.5", ["hidden=64"]) == ModelSpec("mlp-mpt", {"prune_ratio": 0.5, "hidden": 64})
    assert model_spec_from_args(ModelSpec("conv4-mpt", {"seed": 1}), ["prune_ratio=0.9"]) == \
        ModelSpec("conv4-mpt", {"prune_ratio": 0.9, "seed": 1})  # flags on top of a recipe's model
    for model, options, match in (
        ("conv4-mpt", ["prune_ratio"], r"model option 'prune_ratio': expected NAME=VALUE"),
        ("conv4-mpt", ["prune_ratio=lots"], r"option prune_ratio='lots' is not a number in \[0, 1\)"),
        ("conv4-mpt", ["seed=1.5"], r"option seed='1.5' is not an integer"),
        ("mlp", ["prune_ratio=0.9"], r"model mlp has no option 'prune_ratio'; its options: hidden"),
        ("conv4@0.9", [], r"model conv4 has no option 'prune_ratio'; it takes no options"),
        ("conv4-mpt@", [], r"the shorthand is NAME@RATIO"),
        ("conv4-mpt@0.9", ["prune_ratio=0.5"], r"already sets prune_ratio"),
    ):
        with pytest.raises(ConfigError, match=match):
            model_spec_from_args(model, options)


def test_fleet_and_recipe_flags_give_the_hub_a_spec() -> None:
    from fedge.cli import build_parser
    from fedge.cli.hub import fleet_config_from_args

    def config(*argv: str):  # noqa: ANN202
        return fleet_config_from_args(build_parser().parse_args(["fleet", "--dataset", "synthetic", *argv]))

    assert config("--model", "conv4-mpt", "--model-option", "prune_ratio=0.9", "--model-option", "seed=7").hub.model == \
        ModelSpec("conv4-mpt", {"prune_ratio": 0.9, "seed": 7})
    assert config("--model", "conv4-mpt@0.95").hub.model == ModelSpec("conv4-mpt", {"prune_ratio": 0.95})
    assert config("--recipe", "paper003", "--prune-ratio", "0.5").hub.model == ModelSpec("conv4-mpt", {"prune_ratio": 0.5})
    assert config("--recipe", "paper003", "--method", "fedavg", "--prune-ratio", "0.5").hub.model == ModelSpec("conv4")
    with pytest.raises(ConfigError, match="model mlp has no option 'prune_ratio'"):
        config("--model", "mlp", "--model-option", "prune_ratio=0.9")


def test_hub_config_stores_the_spec_and_reads_older_configs() -> None:
    from fedge.hub.config import HubConfig

    cfg = HubConfig(model=ModelSpec("conv4-mpt", {"prune_ratio": 0.9, "seed": 0}))
    cfg.check()
    assert cfg.model == ModelSpec("conv4-mpt", {"prune_ratio": 0.9})  # canonical: the default seed dropped
    stored = json.loads(json.dumps(cfg.to_json()))
    assert stored["model"] == {"name": "conv4-mpt", "options": {"prune_ratio": 0.9}}
    assert HubConfig.from_json(stored).model == cfg.model
    old = HubConfig.from_json({**stored, "model": "mlp"})  # a run store written before specs
    old.check()
    assert old.model == ModelSpec("mlp")
    plain = HubConfig(model="conv4")  # a plain registered name is fine, and becomes a spec
    plain.check()
    assert plain.model == ModelSpec("conv4")
    for bad, match in (({"name": "conv4-mpt", "options": {"prune_ratio": 2}}, "prune_ratio=2 is not"),
                       ("conv4-mpt@0.9", "unknown model 'conv4-mpt@0.9'")):
        with pytest.raises(ConfigError, match=match):
            HubConfig.from_json({**stored, "model": bad}).check()


def test_model_envelope_carries_non_default_options_and_older_ones_parse() -> None:
    from fedge.models.wire import EnvelopeError, decode, encode
    from fedge.models.wire.messages import build_model_message, parse_model

    state = get_state(build_model(MPT, seed=0))
    payload = build_model_message("f", "r", 1, MPT, state, meta={"in_shape": [1, 28, 28], "num_classes": 10})
    env = decode(payload)
    assert env.header["model"] == "mlp-mpt"
    assert env.header["model_options"] == {"hidden": 32, "prune_ratio": 0.5, "seed": 3}
    msg = parse_model(env)
    assert msg.spec == MPT and model_spec(msg.spec) == MPT and list(msg.tensors) == list(state)
    plain = decode(build_model_message("f", "r", 1, ModelSpec("mlp"), get_state(build_model("mlp"))))
    assert "model_options" not in plain.header  # a model at its defaults: the header as before specs
    assert parse_model(plain).spec == ModelSpec("mlp") and parse_model(plain).model_options == {}
    for options, match in (([1], "'model_options' must be an object"), ({"seed": [1]}, "model option 'seed' must be"),
                           ({"seed": True}, "model option 'seed' must be")):
        header = {**plain.header, "model_options": options}
        with pytest.raises(EnvelopeError, match=match):
            parse_model(decode(encode(header, plain.body)))


def test_mask_file_round_trip_gives_back_the_spec(tmp_path) -> None:
    from fedge.models.export import load_source
    from fedge.models.maskfile import MaskFile
    from fedge.models.mpt_nets import build_from_mask_file, save_mask_file, to_mask_file

    model = build_model(MPT, seed=5)
    path = tmp_path / "m.mask"
    save_mask_file(model, path, model_name=MPT.name)
    mask_file = MaskFile.load(path)
    assert (mask_file.model, mask_file.prune_ratio, mask_file.seed, mask_file.meta["hidden"]) == ("mlp-mpt", 0.5, 3, 32)
    assert mask_file_spec(mask_file) == MPT
    rebuilt = build_from_mask_file(mask_file)
    twin = build_model(mask_file_spec(mask_file))  # what the spec alone builds: the same frozen weights
    set_state(twin, get_state(rebuilt))
    x = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)
    import torch

    with torch.no_grad():
        assert torch.equal(twin.eval()(torch.from_numpy(x)), rebuilt(torch.from_numpy(x)))
    spec, _, shape, classes, _ = load_source(path)
    assert (spec, shape, classes) == (MPT, (1, 28, 28), 10)
    bnn = ModelSpec("mlp-bnn", {"hidden": 16})
    assert mask_file_spec(to_mask_file(build_model(bnn), bnn.name)) == bnn  # a sign file: no prune ratio
    default = to_mask_file(build_model("conv4-mpt"), "conv4-mpt")
    assert mask_file_spec(default) == ModelSpec("conv4-mpt")


def test_private_store_keeps_the_spec_it_belongs_to(tmp_path) -> None:
    from fedge.edge_agent.private_store import PrivateStore

    wide, narrow = ModelSpec("mlp-private-head", {"hidden": 64}), ModelSpec("mlp-private-head", {"hidden": 32})
    head = {"head.weight": np.ones((10, 64), np.float32), "head.bias": np.zeros(10, np.float32)}
    PrivateStore(tmp_path / "p.npz").save(wide, head)
    back = PrivateStore(tmp_path / "p.npz").load(wide)
    assert back is not None and np.array_equal(back["head.weight"], head["head.weight"])
    assert PrivateStore(tmp_path / "p.npz").load(narrow) is None  # kept for other options: start afresh
    # a file written before specs holds a plain name: read as that model at its defaults
    np.savez(tmp_path / "old.npz", __model__=np.array("mlp-private-head"), **head)
    assert PrivateStore(tmp_path / "old.npz").load(ModelSpec("mlp-private-head")) is not None


def test_export_takes_a_model_name_with_options(tmp_path, capsys) -> None:
    from fedge.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", "mlp", "--model-option", "hidden=24", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "mlp" and summary["model_options"] == {"hidden": 24}
    import onnx

    weights = {i.name: tuple(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert (24, 784) in weights.values()
    assert main(["export", "mlp", "--model-option", "width=2", "--out", str(out)]) == 2
    assert "model mlp has no option 'width'; its options: hidden" in capsys.readouterr().err


def test_design_doc_shows_the_real_code() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    section = (root / "docs" / "design.md").read_text().split("## Models are specs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    sources = "".join((root / f).read_text() for f in ("models/spec.py", "models/registry.py", "fedge/cli/common.py",
                                                         "models/wire/messages.py"))
    assert len(blocks) == 8
    for block in blocks:
        assert block in sources, block[:80]


@pytest.mark.parametrize("spec, meta, reason", [
    (ModelSpec("mlp", {"width": 3}), {"in_shape": [1, 28, 28], "num_classes": 10},
     "model mlp has no option 'width'; its options: hidden"),
    (ModelSpec("mlp-mpt", {"prune_ratio": 1.5}), {}, "option prune_ratio=1.5 is not a number in [0, 1)"),
    (ModelSpec("mlp"), {"in_shape": [6, 8, 8], "num_classes": 10}, "the model takes inputs [6, 8, 8], this device's data"),
])
def test_a_device_refuses_a_model_it_cannot_build_and_says_why(spec, meta, reason) -> None:
    """A hub (or anyone who may publish on the model topic) sends a model whose spec or input
    the device does not know: the device trains nothing and names the reason in its status."""
    import time

    from fedge.edge_agent.agent import Agent
    from fedge.edge_agent.pool import TrainingPool
    from fedge.edge_agent.profile import load_profile
    from fedge.models.data import synthetic
    from fedge.models.wire import Topics
    from fedge.models.wire.inproc import InprocBroker
    from fedge.models.wire.messages import TaskMessage, build_model_message, build_task_message

    from .inbox import Inbox

    broker, topics = InprocBroker(), Topics("spec")
    hub = broker.link("hub").start()
    statuses = Inbox()
    hub.subscribe(topics.device_status("dev"), statuses)
    pool = TrainingPool(workers=1)
    agent = Agent("dev", load_profile("sim"), broker.link, topics, synthetic(n_train=50, n_test=10).train, 10, pool,
                  warn_unverified=False).start()
    try:
        tensors = get_state(build_model(ModelSpec(spec.name)))
        hub.publish(topics.model, build_model_message("spec", "run", 0, spec, tensors, meta=meta), retain=True)
        hub.publish(topics.round, build_task_message(TaskMessage("spec", "run", 1, 0, ["dev"], time.time() + 30,
                                                                 {"epochs": 1}, "open")), retain=True)
        assert statuses.wait(lambda _t, p: b"refused" in p), statuses.items
        refused = json.loads(statuses.items[-1][1])["refused"]
        assert refused["round"] == 1 and reason in refused["reason"], refused
        assert agent.rounds_trained == 0
    finally:
        agent.stop()
        pool.close()
        hub.stop()


@pytest.mark.parametrize("spec", [
    ModelSpec("mlp", {"width": 3}),
    ModelSpec("mlp", {"prune_ratio": 0.5}),
    ModelSpec("conv4", {"hidden": 64}),
    ModelSpec("mlp-mpt", {"prune_ratio": 1.5}),
    ModelSpec("conv4-mpt", {"seed": -2}),
    ModelSpec("mlp-bnn", {"hidden": "wide"}),
])
def test_a_serving_device_refuses_an_option_in_the_trainers_words(spec) -> None:
    """The torch-free template fill (models/onnx_graph.py) checks a header's options against the
    declarations its template stores, with the registry's Option.check and spec.unknown_option:
    the same error text as the registry (one home), though it cannot import the registry."""
    from fedge.models import onnx_graph

    with pytest.raises(ConfigError) as trainer:
        model_spec(spec)
    with pytest.raises(onnx_graph.GraphError) as device:
        onnx_graph.build_onnx(spec, get_state(build_model(spec.name)))
    assert str(device.value) == str(trainer.value)


def test_exported_files_and_the_predictor_carry_the_spec(tmp_path) -> None:
    """Both builders write the spec's options (those off their defaults) into the ONNX metadata;
    the predictor reads the spec back (what `fedge agent serve` prints and GET /model answers)."""
    from fedge.edge_agent.infer import Predictor
    from fedge.models.export import export

    for builder in ("torch", "graph"):
        for spec in (MPT, ModelSpec("mlp-mpt"), ModelSpec("mlp", {"hidden": 16})):
            summary = export(spec, out=tmp_path / f"{builder}.onnx", builder=builder)
            assert summary["model_options"] == spec.options_dict()
            predictor = Predictor.load(tmp_path / f"{builder}.onnx")
            assert predictor.spec == spec and predictor.describe()["model_options"] == spec.options_dict(), builder


def test_a_seeded_build_is_the_same_while_another_thread_builds_models():
    """Seeded initial weights do not depend on what other threads build meanwhile (a pool thread
    building its trainer while an agent builds its seeded head drew from the same global generator)."""
    import threading

    import numpy as np

    from fedge.models.registry import build_model, get_state

    reference = get_state(build_model("mlp", (1, 28, 28), 10, seed=0))
    stop = threading.Event()

    def unseeded() -> None:
        while not stop.is_set():
            build_model("mlp", (1, 28, 28), 10)

    other = threading.Thread(target=unseeded, daemon=True)
    other.start()
    try:
        for _ in range(30):
            state = get_state(build_model("mlp", (1, 28, 28), 10, seed=0))
            assert all(np.array_equal(state[k], reference[k]) for k in reference)
    finally:
        stop.set()
        other.join(10)
