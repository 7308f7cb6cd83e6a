"""On-device inference with ONNX Runtime: numpy + onnxruntime (+ onnx, imported only to rebuild
a graph from a fedge model message), never torch.

* `Predictor`      one ONNX Runtime session (from an .onnx file, ONNX bytes, a ModelProto or a
                   fedge model envelope) with predict/logits helpers.
* `LiveModel`      the model currently served; `swap()` replaces it atomically, requests
                   already running finish on the model they started with.
* `ModelFollower`  subscribes to the fleet's model topic and swaps in every new global model
                   (rebuilt torch-free by models.onnx_graph).
* `make_server`    a small JSON HTTP endpoint (standard library http.server) for local
                   clients: GET /health, GET /model, POST /predict. Binds 127.0.0.1 by default.
* `load_inputs`    .npy arrays and (with Pillow) grayscale/RGB images -> a float32 batch.

Must stay torch-free, also indirectly: import nothing from models.registry, models.nets,
models.data, models.evaluate, edge_agent.trainer/pool/agent/profile.
tests/test_infer_no_torch.py checks this in a fresh interpreter with torch blocked.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import onnxruntime as ort

from fedge.models.errors import DataError, FedgeError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger("fedge.infer")

# Fashion-MNIST normalisation used by models.data (duplicated: models.data is not imported here).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".gif", ".webp")
DEFAULT_PORT = 8765
MAX_REQUEST_BYTES = 64 * 1024 * 1024


class InferenceError(DataError):
    """An input or model the predictor cannot use; the text says what is wrong."""


def _fedge_metadata(props: dict[str, str]) -> dict[str, Any]:
    """fedge.* metadata of a session (same as onnx_graph.get_metadata, without importing onnx)."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith("fedge."):
            try:
                out[key[6:]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[6:]] = value
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Prediction:
    classes: np.ndarray  # int64 [N]
    probabilities: np.ndarray  # float32 [N, classes]
    logits: np.ndarray  # float32 [N, classes]

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities[np.arange(len(self.classes)), self.classes]


# ----------------------------------------------------------------------------- predictor
def session_options(threads: int = 1) -> ort.SessionOptions:
    """Sequential execution on `threads` intra-op threads (1 = what a small device should use)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class Predictor:
    """An ONNX Runtime session for a fedge classifier: input [batch, *in_shape] -> logits."""

    def __init__(self, session: ort.InferenceSession, info: dict[str, Any] | None = None) -> None:
        self.session = session
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise InferenceError(f"model has {len(inputs)} inputs; a fedge classifier has exactly one")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        meta = _fedge_metadata(session.get_modelmeta().custom_metadata_map)
        self.info: dict[str, Any] = {**meta, **(info or {})}
        dims = list(inputs[0].shape)[1:]
        if dims and all(isinstance(d, int) for d in dims):
            self.in_shape: tuple[int, ...] = tuple(int(d) for d in dims)
        elif isinstance(self.info.get("in_shape"), list):
            self.in_shape = tuple(int(d) for d in self.info["in_shape"])
        else:
            raise InferenceError(f"cannot tell the model's input shape from {inputs[0].shape}")
        out_dims = list(outputs[0].shape)
        self.num_classes = int(out_dims[-1]) if out_dims and isinstance(out_dims[-1], int) else self.info.get("num_classes")
        self.info.setdefault("in_shape", list(self.in_shape))
        if self.num_classes is not None:
            self.info.setdefault("num_classes", int(self.num_classes))

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, model_bytes: bytes, threads: int = 1, info: dict[str, Any] | None = None) -> Predictor:
        sess = ort.InferenceSession(model_bytes, session_options(threads), providers=["CPUExecutionProvider"])
        return cls(sess, info)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, threads: int = 1, info: dict[str, Any] | None = None) -> Predictor:
        return cls.from_bytes(proto.SerializeToString(), threads, info)

    @classmethod
    def from_envelope(cls, payload: bytes, threads: int = 1, verifier: Any = None) -> Predictor:
        """A fedge model envelope: the graph is rebuilt from its tensors (torch-free). With
        `verifier` (models.wire.keys.hub_verifier) the hub's signature is required."""
        from fedge.models import onnx_graph  # noqa: PLC0415 - onnx is only needed for envelopes

        proto, _msg = onnx_graph.from_envelope(payload, verifier=verifier)
        return cls.from_proto(proto, threads)

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int = 1, verifier: Any = None) -> Predictor:
        """An .onnx file, or a .fedge model envelope (e.g. runs/<id>/final_model.fedge)."""
        path = Path(path)
        if not path.is_file():
            raise InferenceError(f"model file not found: {path}")
        head = path.open("rb").read(4)
        if head == b"FEDG":
            return cls.from_envelope(path.read_bytes(), threads, verifier=verifier)
        sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        return cls(sess, {"file": str(path)})

    # -- inference ---------------------------------------------------------------------
    def as_batch(self, x: Any) -> np.ndarray:
        """One sample shaped like in_shape, or a batch [N, *in_shape], as contiguous float32."""
        arr = np.asarray(x, dtype=np.float32)
        if arr.shape == self.in_shape:
            arr = arr[None]
        elif arr.shape[1:] != self.in_shape:
            if self.in_shape[0] == 1 and arr.shape[-2:] == self.in_shape[1:] and arr.ndim in (2, 3):
                arr = arr.reshape(-1, *self.in_shape)  # [H, W] or [N, H, W] for a 1-channel model
            else:
                raise InferenceError(f"input shape {arr.shape} fits neither {self.in_shape} nor [N, *{self.in_shape}]")
        return np.ascontiguousarray(arr)

    def logits(self, x: Any, batch_size: int = 256) -> np.ndarray:
        batch = self.as_batch(x)
        if len(batch) <= batch_size:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        parts = [self.session.run([self.output_name], {self.input_name: batch[i : i + batch_size]})[0]
                 for i in range(0, len(batch), batch_size)]
        return np.concatenate(parts)

    def predict(self, x: Any, batch_size: int = 256) -> Prediction:
        logits = self.logits(x, batch_size).astype(np.float32, copy=False)
        return Prediction(classes=logits.argmax(axis=1), probabilities=softmax(logits), logits=logits)

    def describe(self) -> dict[str, Any]:
        keys = ("model", "run", "version", "fleet", "in_shape", "num_classes", "builder", "quantized", "file")
        return {k: self.info[k] for k in keys if k in self.info}


# ----------------------------------------------------------------------------- hot swap
class NoModelYet(FedgeError, RuntimeError):
    """Raised by LiveModel.get() before the first model arrived."""


class LiveModel:
    """The model being served. Readers take a reference and run on it without a lock held,
    so a swap never blocks or breaks an in-flight prediction (ORT sessions are thread-safe)."""

    def __init__(self, predictor: Predictor | None = None) -> None:
        self._lock = threading.Lock()
        self._predictor = predictor
        self.swaps = 0
        self.swapped_at: float | None = time.time() if predictor else None
        self.changed = threading.Condition(self._lock)

    def get(self) -> Predictor:
        with self._lock:
            pred = self._predictor
        if pred is None:
            raise NoModelYet("no model loaded yet: waiting for the hub to publish one")
        return pred

    def peek(self) -> Predictor | None:
        with self._lock:
            return self._predictor

    def swap(self, predictor: Predictor) -> Predictor | None:
        with self._lock:
            old, self._predictor = self._predictor, predictor
            self.swaps += 1
            self.swapped_at = time.time()
            self.changed.notify_all()
        return old

    def wait_for(self, predicate, timeout: float) -> bool:  # noqa: ANN001
        """Block until predicate(predictor or None) is true (tests, scripts)."""
        end = time.time() + timeout
        with self._lock:
            while not predicate(self._predictor):
                left = end - time.time()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True

    def status(self) -> dict[str, Any]:
        pred = self.peek()
        return {"ready": pred is not None, "swaps": self.swaps, "swapped_at": self.swapped_at,
                "model": pred.describe() if pred else None}


class ModelFollower:
    """Swaps every new global model from the hub into a LiveModel.

    Accepts a model only in the order of models/wire/freshness.py: a newer run (higher epoch)
    or a higher version of the current run; an earlier run or an older version is refused as a
    replay (counted, reason in status), the same version again is ignored (the retained message
    re-delivered after a reconnect). `guard_file` keeps the newest accepted (epoch, run,
    version) across restarts. With `verifier`, only models signed by the hub's Ed25519 key are
    accepted. A message that fails to decode, verify or build is logged and counted; the
    previous model keeps serving.
    """

    def __init__(
        self, live: LiveModel, fleet: str | None = None, verifier: Any = None, threads: int = 1,
        max_bytes: int | None = None, save_to: str | os.PathLike | None = None,
        guard_file: str | os.PathLike | None = None,
    ) -> None:
        from fedge.models.wire.freshness import RunGuard  # noqa: PLC0415 - torch-free

        self.live = live
        self.fleet = fleet
        if guard_file is not None and fleet is None:
            raise InferenceError("a replay-guard file needs the fleet id")
        self.guard = RunGuard(fleet or "", guard_file)
        self.verifier = verifier  # models.wire.keys.hub_verifier(...): only hub-signed models are served
        self.threads = threads
        self.max_bytes = max_bytes
        self.save_to = Path(save_to) if save_to else None
        self.accepted = 0
        self.ignored = 0
        self.rejected = 0
        self.last_error: str | None = None
        self.link = None
        self._lock = threading.Lock()  # one build at a time; paho delivers on one thread anyway

    def handle(self, payload: bytes) -> bool:
        """Process one model-topic payload; True if it was swapped in."""
        import onnx  # noqa: PLC0415

        from fedge.models import onnx_graph  # noqa: PLC0415 - onnx is only needed for envelopes
        from fedge.models.wire.envelope import EnvelopeError  # noqa: PLC0415 - torch-free
        from fedge.models.wire.freshness import Position, StaleMessage  # noqa: PLC0415 - torch-free

        if not payload:
            return False  # a cleared retained message
        with self._lock:
            try:
                proto, msg = onnx_graph.from_envelope(payload, verifier=self.verifier, max_bytes=self.max_bytes)
                if self.fleet is not None and msg.fleet != self.fleet:
                    raise InferenceError(f"model of fleet {msg.fleet!r}, this device serves fleet {self.fleet!r}")
                position = Position.of(msg)
                reason = self.guard.check(position)
                if reason is not None:
                    raise StaleMessage(reason)
                if position == self.guard.newest and self.live.peek() is not None:
                    self.ignored += 1
                    return False
                current = self.live.peek()
                if current is not None and current.info.get("run") == msg.run and \
                        isinstance(current.info.get("version"), int) and msg.version <= current.info["version"]:
                    self.ignored += 1
                    return False
                predictor = Predictor.from_proto(proto, self.threads)
                self.guard.admit(position)
            except (EnvelopeError, onnx_graph.GraphError, InferenceError, onnx.checker.ValidationError) as exc:
                self.rejected += 1
                self.last_error = str(exc)
                log.warning("model message rejected, still serving the previous model: %s", exc)
                return False
            except Exception as exc:  # noqa: BLE001 - onnxruntime errors: never kill the network thread
                self.rejected += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("model message could not be loaded, still serving the previous model")
                return False
            if self.save_to is not None:
                self._save(proto)
            self.live.swap(predictor)
            self.accepted += 1
        log.info("serving %s run %s version %d", msg.model, msg.run, msg.version)
        return True

    def _save(self, proto: onnx.ModelProto) -> None:
        try:
            self.save_to.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.save_to.with_suffix(self.save_to.suffix + ".tmp")
            tmp.write_bytes(proto.SerializeToString())
            os.replace(tmp, self.save_to)
        except OSError as exc:
            log.warning("could not save the model to %s: %s", self.save_to, exc)

    def on_message(self, topic: str, payload: bytes) -> None:
        """MqttLink handler."""
        self.handle(payload)

    def connect(self, broker: Any, prefix: str | None = None, client_id: str | None = None, timeout: float = 20.0):  # noqa: ANN201
        """Subscribe to the fleet's model topic; `broker` is a BrokerConfig or URL. Returns the link."""
        import uuid  # noqa: PLC0415

        from fedge.models.wire.topics import ROOT, Topics  # noqa: PLC0415 - torch-free
        from fedge.models.wire.transport import BrokerConfig, MqttLink  # noqa: PLC0415 - paho only

        if self.fleet is None:
            raise InferenceError("following a hub needs the fleet id")
        config = broker if isinstance(broker, BrokerConfig) else BrokerConfig.from_url(str(broker))
        topics = Topics(self.fleet, prefix or ROOT)
        # clean session: only the retained (latest) model matters, no queue of stale ones
        self.link = MqttLink(config, client_id or f"fedge-infer-{self.fleet}-{uuid.uuid4().hex[:8]}", clean_session=True)
        self.link.subscribe(topics.model, self.on_message)
        self.link.start(timeout)
        return self.link

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()
            self.link = None

    def status(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "ignored": self.ignored, "rejected": self.rejected,
                "last_error": self.last_error, "connected": bool(self.link and self.link.connected),
                "newest": self.guard.status()["newest"]}


# ----------------------------------------------------------------------------- inputs
def _image(path: Path, in_shape: tuple[int, ...], mean: float, std: float) -> np.ndarray:
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError:
        raise InferenceError(f"{path}: reading images needs Pillow (pip install pillow); or pass .npy arrays") from None
    if len(in_shape) != 3 or in_shape[0] not in (1, 3):
        raise InferenceError(f"{path}: images need a model input of 1 or 3 channels, the model takes {in_shape}")
    channels, height, width = in_shape
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return ((arr - mean) / std).astype(np.float32)


def _array(path: Path, in_shape: tuple[int, ...], mean: float, std: float) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InferenceError(f"{path}: not a readable .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise InferenceError(f"{path}: expected a numeric array")
    if arr.dtype == np.uint8:  # raw pixels: scale and normalise like an image
        arr = (arr.astype(np.float32) / 255.0 - mean) / std
    arr = arr.astype(np.float32)
    if arr.shape == in_shape:
        return arr[None]
    if arr.shape[1:] == in_shape:
        return arr
    if in_shape[0] == 1 and arr.shape[-2:] == in_shape[1:] and arr.ndim in (2, 3):
        return arr.reshape(-1, *in_shape)
    raise InferenceError(f"{path}: shape {arr.shape} fits neither {in_shape} nor [N, *{in_shape}]")


def load_inputs(
    paths: Iterable[str | os.PathLike], in_shape: Sequence[int], mean: float = FASHION_MEAN, std: float = FASHION_STD,
) -> tuple[np.ndarray, list[str]]:
    """Stack inputs into one float32 batch; also returns a label per row ("file" or "file[i]").

    .npy float arrays are taken as already normalised model inputs (one sample or a batch);
    .npy uint8 arrays and image files are raw pixels: scaled to [0, 1], then (x - mean) / std.
    """
    in_shape = tuple(int(d) for d in in_shape)
    batches, labels = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise InferenceError(f"input not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            arr = _array(path, in_shape, mean, std)
        elif suffix in IMAGE_SUFFIXES:
            arr = _image(path, in_shape, mean, std)[None]
        else:
            raise InferenceError(f"{path}: unsupported input type {suffix!r}; use .npy or an image ({', '.join(IMAGE_SUFFIXES)})")
        batches.append(arr)
        labels += [str(path)] if len(arr) == 1 else [f"{path}[{i}]" for i in range(len(arr))]
    if not batches:
        raise InferenceError("no inputs given")
    return np.concatenate(batches), labels


# ----------------------------------------------------------------------------- HTTP
def _decode_request(body: bytes, content_type: str) -> tuple[np.ndarray, dict[str, Any]]:
    if content_type in ("application/x-npy", "application/octet-stream"):
        try:
            return np.load(io.BytesIO(body), allow_pickle=False), {}
        except (ValueError, OSError) as exc:
            raise InferenceError(f"body is not a .npy array: {exc}") from None
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferenceError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise InferenceError('JSON body must be an object with "inputs": a sample or a batch (nested lists)')
    try:
        arr = np.asarray(data["inputs"], dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InferenceError(f'"inputs" is not a numeric array: {exc}') from None
    return arr, data


def make_server(
    live: LiveModel, host: str = "127.0.0.1", port: int = DEFAULT_PORT, follower: ModelFollower | None = None,
    labels: Sequence[str] | None = None,
) -> ThreadingHTTPServer:
    """A threaded HTTP server (not started); port 0 picks a free one (server.server_address).

    GET  /health   {"ready": bool, "swaps": n, "model": {...}, "follower": {...}}; 503 until a model is loaded
    GET  /model    the served model's description
    POST /predict  JSON {"inputs": [...], "probabilities": false, "logits": false} or a raw .npy body
                   (Content-Type: application/x-npy) -> {"classes": [...], "confidence": [...],
                   "labels": [...] (when known), "model": {...}}
    """

    class Handler(BaseHTTPRequestHandler):
        server_version = "fedge-infer/1"

        def log_message(self, fmt: str, *args: Any) -> None:  # route to logging, not stderr
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            path = urlparse(self.path).path
            status = live.status()
            if follower is not None:
                status["follower"] = follower.status()
            if path in ("/", "/health"):
                self._send(200 if status["ready"] else 503, status)
            elif path == "/model":
                self._send(200 if status["ready"] else 503, status["model"] or {"error": "no model yet"})
            else:
                self._send(404, {"error": f"unknown path {path}; use /health, /model or POST /predict"})

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            if url.path != "/predict":
                self._send(404, {"error": f"unknown path {url.path}; POST /predict"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length <= 0 or length > MAX_REQUEST_BYTES:
                self._send(400 if length <= 0 else 413, {"error": f"need a body of 1..{MAX_REQUEST_BYTES} bytes"})
                return
            body = self.rfile.read(length)
            try:
                predictor = live.get()
                arr, opts = _decode_request(body, (self.headers.get("Content-Type") or "").split(";")[0].strip())
                query = parse_qs(url.query)
                pred = predictor.predict(arr)
            except NoModelYet as exc:
                self._send(503, {"error": str(exc)})
                return
            except InferenceError as exc:
                self._send(400, {"error": str(exc)})
                return
            except Exception as exc:  # noqa: BLE001 - onnxruntime failures become a 500, the server lives
                log.exception("prediction failed")
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})
                return
            out: dict[str, Any] = {"classes": pred.classes.tolist(), "confidence": pred.confidence.tolist(),
                                   "model": predictor.describe()}
            if labels:
                out["labels"] = [labels[c] if c < len(labels) else str(c) for c in out["classes"]]
            if opts.get("probabilities") or query.get("probabilities", ["0"])[0] not in ("0", "false"):
                out["probabilities"] = pred.probabilities.tolist()
            if opts.get("logits") or query.get("logits", ["0"])[0] not in ("0", "false"):
                out["logits"] = pred.logits.tolist()
            self._send(200, out)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def start_server(
    live: LiveModel, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """make_server + serve_forever on a daemon thread; stop with server.shutdown()."""
    server = make_server(live, host, port, **kwargs)
    thread = threading.Thread(target=server.serve_forever, name="fedge-infer-http", daemon=True)
    thread.start()
    return server, thread
