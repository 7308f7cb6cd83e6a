"""A small JSON HTTP endpoint for local clients (standard library http.server): GET /health,
GET /model, POST /predict. Binds 127.0.0.1 by default."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from .live import LiveModel, ModelFollower, NoModelYet
from .predictor import InferenceError

log = logging.getLogger("fedge.infer")

DEFAULT_PORT = 8765
MAX_REQUEST_BYTES = 64 * 1024 * 1024


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
                   "labels": [...] (when known), "model": {...}}; a segmentation model answers
                   {"masks": [N x 1 x H x W of 0/1], "positive_fraction": [...], "confidence": [...], "model": {...}}
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
            out: dict[str, Any] = {"confidence": pred.confidence.tolist(), "model": predictor.describe()}
            if pred.mask is not None:  # segmentation: the per-pixel masks (0/1) and their positive share
                out.update({"masks": pred.mask.astype(np.uint8).tolist(), "positive_fraction": pred.positive_fraction.tolist()})
            elif pred.classes is not None:
                out["classes"] = pred.classes.tolist()
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
