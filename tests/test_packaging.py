"""The wheel installs one import name, `fedge.*`, and nothing at the top level that could clash
with another distribution (PyPI's `hub`, `models`) or be shadowed by a project's own `models/`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".hypothesis", ".data", ".whl", "results")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=SKIP)  # build from a copy: no build/ folder left in the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    (found,) = (tmp / "dist").glob("fedge-*.whl")
    return found


def test_wheel_holds_only_the_fedge_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedge"}, tops
    # every package folder of the checkout is in the wheel (the package list in pyproject.toml is explicit)
    folders = {"fedge": "fedge", "models": "fedge/models", "hub": "fedge/hub", "edge_agent": "fedge/edge_agent",
               "firmware_profiles": "fedge/firmware_profiles"}
    for folder, installed in folders.items():
        for init in (REPO / folder).rglob("__init__.py"):
            module = f"{installed}/{init.relative_to(REPO / folder).as_posix()}"
            assert module in names, f"{module} is missing from the wheel: add its package to pyproject.toml"
    for module in ("fedge/models/wire/envelope.py", "fedge/hub/hub.py", "fedge/hub/sim/fleet.py",
                   "fedge/edge_agent/agent.py", "fedge/cli/__init__.py", "fedge/firmware_profiles/rpi4.yaml",
                   "fedge/hub/status_page.html"):
        assert module in names, module
    # the graph templates a torch-free device fills (package data): one per template in the checkout
    for template in (REPO / "models" / "onnx_templates").glob("*.onnx"):
        assert f"fedge/models/onnx_templates/{template.name}" in names, f"{template.name} is missing from the wheel"
    assert "fedge/models/onnx_templates/conv4-mpt.onnx" in names


def test_installed_wheel_imports_as_fedge_only(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # Run from an empty folder with only the installed copy on the path: the checkout is not seen.
    first = f"import sys; sys.path.insert(0, {str(site)!r}); "
    code = (first + "import fedge.hub, fedge.models, fedge.edge_agent, fedge.models.wire, fedge.edge_agent.profile as p;"
            f"assert fedge.hub.__file__.startswith({str(site)!r}), fedge.hub.__file__;"
            "from fedge.models.onnx_graph import load_template;"
            f"assert str(load_template('conv4-mpt').proto.graph.input[0].name) == 'input';"
            "print(len(p.available_profiles()))")
    ok = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert int(ok.stdout) >= 5  # the profile YAML files travel as package data
    for top in ("models", "hub", "edge_agent", "firmware_profiles"):
        gone = subprocess.run([sys.executable, "-I", "-c", f"{first}import {top}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert gone.returncode != 0 and "No module named" in gone.stderr, (top, gone.stderr)
