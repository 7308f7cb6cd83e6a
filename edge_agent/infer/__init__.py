"""On-device inference with ONNX Runtime: numpy + onnxruntime (+ onnx, imported only to rebuild
a graph from a fedge model message), never torch.

* `Predictor` (predictor.py)      one ONNX Runtime session (from an .onnx file, ONNX bytes, a ModelProto or a
                   fedge model envelope) with predict/logits helpers.
* `LiveModel` (live.py)      the model currently served; `swap()` replaces it atomically, requests
                   already running finish on the model they started with.
* `ModelFollower` (live.py)  subscribes to the fleet's model topic and swaps in every new global model
                   (rebuilt torch-free: models.onnx_graph fills the model's graph template).
* `make_server` (server.py)    a small JSON HTTP endpoint (standard library http.server) for local
                   clients: GET /health, GET /model, POST /predict. Binds 127.0.0.1 by default.
* `load_inputs` (inputs.py)    .npy arrays and (with Pillow) grayscale/RGB images -> a float32 batch.

Torch-free, also indirectly: an import-linter contract (pyproject.toml) forbids torch here, and
tests/test_infer_no_torch.py checks it in a fresh interpreter with torch blocked.
"""

from .inputs import FASHION_LABELS, FASHION_MEAN, FASHION_STD, IMAGE_SUFFIXES, load_inputs
from .live import LiveModel, ModelFollower, NoModelYet
from .predictor import InferenceError, Prediction, Predictor, session_options, softmax
from .server import DEFAULT_PORT, MAX_REQUEST_BYTES, make_server, start_server

__all__ = [
    "DEFAULT_PORT",
    "FASHION_LABELS",
    "FASHION_MEAN",
    "FASHION_STD",
    "IMAGE_SUFFIXES",
    "MAX_REQUEST_BYTES",
    "InferenceError",
    "LiveModel",
    "ModelFollower",
    "NoModelYet",
    "Prediction",
    "Predictor",
    "load_inputs",
    "make_server",
    "session_options",
    "softmax",
    "start_server",
]
