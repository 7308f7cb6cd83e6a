"""The shipped ONNX graph templates: one `<model>.onnx` per registered model (package data).

Each file is the model's graph exported once with torch, with the weight initializers emptied
and a slot table in its metadata (models/onnx_graph.py reads and fills it, torch-free). Rebuild
them after changing an architecture or registering a model:

    python -m fedge.models.onnx_templates.build          # all registered models
    python -m fedge.models.onnx_templates.build --check  # exit 1 if a shipped one is out of date

Importing this package imports nothing else (build.py, which needs torch, is not imported here).
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent
SUFFIX = ".onnx"

__all__ = ["SUFFIX", "TEMPLATE_DIR"]
