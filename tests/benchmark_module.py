"""Benchmarks are scripts, not an installed package: tests load one by its file name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(filename: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{Path(filename).stem}", BENCHMARKS / filename)
    assert spec is not None and spec.loader is not None, filename
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it, as importlib's recipe does: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
