"""The on-device inference path never imports torch, not even indirectly.

Each check runs in a fresh interpreter (this pytest process has torch loaded already):
the whole path (.fedge model message -> torch-free ONNX graph -> ONNX Runtime, the
predict CLI, the hot-swapping follower and the HTTP endpoint; model messages of specs with
options in their header (MPT models at default and other prune ratio and seed, whose scores are
materialised with numpy into the model's graph template, an MLP of another width, a 6-channel
Conv-4), against logits torch computed in this process; a message with an option the model
lacks, refused) runs, then the script reports every torch* module in sys.modules.
A second run blocks `import torch` outright, as on a device where torch is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    r'''
    import importlib.abc, json, sys, tempfile, urllib.request
    from pathlib import Path

    BLOCK = sys.argv[1] == "block"

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"torch is not installed on this device ({name})")
            return None

    if BLOCK:
        sys.meta_path.insert(0, NoTorch())
        try:
            import torch  # noqa: F401
            raise SystemExit("the torch blocker does not work")
        except ImportError:
            pass

    import numpy as np

    from fedge.models import onnx_graph
    from fedge.edge_agent.infer import LiveModel, ModelFollower, Predictor, start_server
    from fedge.cli.infer import main
    from fedge.models.wire.messages import build_model_message

    rng = np.random.default_rng(0)

    def mlp_state(scale):
        shapes = [("net.1", 200, 784), ("net.3", 200, 200), ("net.5", 10, 200)]
        out = {}
        for name, n_out, n_in in shapes:
            out[f"{name}.weight"] = (rng.normal(size=(n_out, n_in)) * scale / np.sqrt(n_in)).astype(np.float32)
            out[f"{name}.bias"] = (rng.normal(size=n_out) * 0.1).astype(np.float32)
        return out

    def numpy_mlp(state, x):
        h = x.reshape(len(x), -1)
        for i, layer in enumerate((1, 3, 5)):
            h = h @ state[f"net.{layer}.weight"].T + state[f"net.{layer}.bias"]
            if i < 2:
                h = np.maximum(h, 0)
        return h

    meta = {"in_shape": [1, 28, 28], "num_classes": 10}
    state_a, state_b = mlp_state(1.5), mlp_state(1.5)
    x = rng.normal(size=(16, 1, 28, 28)).astype(np.float32)
    tmp = Path(tempfile.mkdtemp())
    fedge_file = tmp / "final_model.fedge"
    fedge_file.write_bytes(build_model_message("fleet", "run-1", 1, "mlp", state_a, meta=meta))

    # 1. a .fedge file -> ONNX graph -> onnxruntime, checked against plain numpy
    pred = Predictor.load(fedge_file)
    diff_a = float(np.abs(pred.logits(x) - numpy_mlp(state_a, x)).max())
    onnx_file = tmp / "model.onnx"
    onnx_file.write_bytes(onnx_graph.from_envelope(fedge_file.read_bytes())[0].SerializeToString())

    # 2. the predict CLI on .npy inputs
    np.save(tmp / "x.npy", x)
    rc = main(["predict", "--model", str(onnx_file), str(tmp / "x.npy"), "--json"])

    # 3. the long-running mode: follower swaps in model messages, HTTP serves them
    live = LiveModel()
    follower = ModelFollower(live, fleet="fleet")
    server, _ = start_server(live, port=0, follower=follower)
    url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    classes = []
    for version, state in ((1, state_a), (2, state_b)):
        assert follower.handle(build_model_message("fleet", "run-1", version, "mlp", state, meta=meta))
        req = urllib.request.Request(url, data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
        classes.append((body["model"]["version"], body["classes"], numpy_mlp(state, x).argmax(1).tolist()))
    server.shutdown()
    server.server_close()

    # 4. specs from the wire (header model_options): MPT scores (not weights) materialised with numpy
    # (prune ratio and seed from the header), graph templates filled at any width and channel count;
    # the expected logits were computed by torch in the test process
    mpt = {}
    for name in json.loads((Path(sys.argv[2]) / "mpt.json").read_text()):
        envelope = Path(sys.argv[2]) / f"{name}.fedge"
        xm = np.load(Path(sys.argv[2]) / f"{name}.x.npy")
        want = np.load(Path(sys.argv[2]) / f"{name}.logits.npy")
        served = Predictor.load(envelope)
        follow = ModelFollower(LiveModel(), fleet="fleet")
        swapped = follow.handle(envelope.read_bytes())
        rc_mpt = main(["predict", "--model", str(envelope), str(Path(sys.argv[2]) / f"{name}.x.npy"), "--json"])
        mpt[name] = {"diff": float(np.abs(served.logits(xm) - want).max()), "swapped": swapped, "cli_rc": rc_mpt,
                     "followed_diff": float(np.abs(follow.live.get().logits(xm) - want).max()),
                     "describe": served.describe()}

    # 5. a message with an option its model lacks: refused, naming it, by the builder, the CLI and the follower
    unknown = Path(sys.argv[2]) / "unknown.fedge"
    try:
        onnx_graph.from_envelope(unknown.read_bytes())
        refused = None
    except onnx_graph.GraphError as exc:
        refused = str(exc)
    follow = ModelFollower(LiveModel(), fleet="fleet")
    unknown_follow = [follow.handle(unknown.read_bytes()), follow.last_error]
    unknown_rc = main(["predict", "--model", str(unknown), str(tmp / "x.npy")])

    print("RESULT " + json.dumps({
        "diff_a": diff_a, "cli_rc": rc, "classes": classes, "mpt": mpt,
        "unknown": {"error": refused, "follower": unknown_follow, "cli_rc": unknown_rc},
        "torch_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")),
    }))
    '''
)


#: label -> (registered name, model_options, in_shape, num_classes): what travels in the header and meta
SPECS = {
    "mlp-mpt": ("mlp-mpt", {}, (1, 28, 28), 10),
    "conv4-mpt": ("conv4-mpt", {}, (1, 28, 28), 10),
    "mlp-mpt-r0.5-s11": ("mlp-mpt", {"prune_ratio": 0.5, "seed": 11}, (1, 28, 28), 10),
    "mlp-h64": ("mlp", {"hidden": 64}, (1, 28, 28), 10),
    "conv4-6ch": ("conv4", {}, (6, 8, 8), 4),
}


@pytest.fixture(scope="module")
def mpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model messages of SPECS (MPT: scores on the wire) and torch's logits for them, made here, where
    torch is; and a message whose header sets an option its model lacks."""
    import numpy as np

    from fedge.models.export import torch_logits
    from fedge.models.registry import build_model, get_state
    from fedge.models.spec import ModelSpec
    from fedge.models.wire.messages import build_model_message

    out = tmp_path_factory.mktemp("mpt")
    for label, (name, options, shape, classes) in SPECS.items():
        spec = ModelSpec(name, options)
        model = build_model(spec, shape, classes, seed=2).eval()
        (out / f"{label}.fedge").write_bytes(build_model_message(
            "fleet", "run-m", 1, spec, get_state(model), meta={"in_shape": list(shape), "num_classes": classes}))
        x = np.random.default_rng(3).normal(size=(16, *shape)).astype(np.float32)
        np.save(out / f"{label}.x.npy", x)
        np.save(out / f"{label}.logits.npy", torch_logits(model, x))
    (out / "mpt.json").write_text(json.dumps(list(SPECS)))
    (out / "unknown.fedge").write_bytes(build_model_message(
        "fleet", "run-u", 1, ModelSpec("mlp", {"prune_ratio": 0.5}), get_state(build_model("mlp")),
        meta={"in_shape": [1, 28, 28], "num_classes": 10}))
    return out


def _run(mode: str, mpt: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(mpt)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:]
    return json.loads(line[-1][len("RESULT "):])


def _check(result: dict) -> None:
    assert result["diff_a"] <= 1e-4, result["diff_a"]  # ONNX Runtime vs plain numpy on the same weights
    assert result["cli_rc"] == 0
    (v1, got1, want1), (v2, got2, want2) = result["classes"]
    assert (v1, v2) == (1, 2)
    assert got1 == want1 and got2 == want2 and got1 != got2  # the hot swap really changed the model
    assert sorted(result["mpt"]) == sorted(SPECS)
    for label, served in result["mpt"].items():
        name, options, shape, _ = SPECS[label]
        assert served["diff"] <= 1e-4 and served["followed_diff"] <= 1e-4, (label, served)
        assert served["swapped"] and served["cli_rc"] == 0, (label, served)
        assert served["describe"]["builder"] == "template" and served["describe"]["model"] == name, (label, served)
        assert served["describe"]["model_options"] == options and served["describe"]["in_shape"] == list(shape)
    unknown = result["unknown"]
    words = "model mlp has no option 'prune_ratio'; its options: hidden"
    assert words in (unknown["error"] or ""), unknown
    assert unknown["follower"][0] is False and words in unknown["follower"][1], unknown
    assert unknown["cli_rc"] == 2


def test_inference_path_leaves_torch_out_of_sys_modules(mpt_dir: Path) -> None:
    result = _run("plain", mpt_dir)
    assert result["torch_modules"] == [], f"the inference path imported {result['torch_modules']}"
    _check(result)


def test_inference_path_works_where_torch_is_not_installed(mpt_dir: Path) -> None:
    result = _run("block", mpt_dir)
    assert result["torch_modules"] == []
    _check(result)
