"""What a finished run leaves behind: runs/<id>/run.json, final model, partition report, plot."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedge.models.export import export_run
from fedge.models.mpt_nets import save_mask_file
from fedge.models.registry import model_options, set_state
from fedge.models.spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from .hub import Hub


def machine_info() -> dict[str, Any]:
    """Recorded with every result so numbers are never quoted without their machine."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    return info


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, ModelSpec):
        return obj.to_json()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def summarise(history: list[dict]) -> dict[str, Any]:
    """The top-level keys every run.json carries, whatever produced it."""
    ups = [r["bytes_up"] / max(1, len(r["participants"])) for r in history]
    downs = [r["bytes_down"] / max(1, len(r["selected"])) for r in history]
    evaluated = [r["device_accuracy"] for r in history if r.get("device_accuracy") is not None]
    return {
        "rounds_completed": len(history),
        # the latest evaluate round's sample-weighted mean of the devices' own scores (run plans)
        "device_accuracy": evaluated[-1] if evaluated else None,
        "uplink_bytes_per_device": statistics.mean(ups) if ups else None,
        "downlink_bytes_per_device": statistics.mean(downs) if downs else None,
        "seconds_per_round": statistics.median(r["seconds"] for r in history) if history else None,
    }


def plot_accuracy(path: Path, history: list[dict], central: dict | None, title: str) -> None:
    import matplotlib  # noqa: PLC0415 - slow to import; only the end-of-run plot needs it

    matplotlib.use("Agg")  # before pyplot: a hub on a server has no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = [r["round"] for r in history if r.get("accuracy") is not None]
    accs = [100 * r["accuracy"] for r in history if r.get("accuracy") is not None]
    ax.plot(rounds, accs, marker="o", ms=3, label="federated (global model)")
    if central and central.get("curve"):
        ax.plot([c["epoch"] for c in central["curve"]], [100 * c["accuracy"] for c in central["curve"]],
                marker="s", ms=3, label="centralised (same model, 1 epoch per round)")
    ax.set_xlabel("round / epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_one_bit_file(run_dir: Path, hub: Hub) -> Path | None:
    """MPT and BNN runs also leave the compact 1-bit model: final_model.mask (MPT: the mask,
    seed and per-layer scales) or final_model.bnn (BNN: the weight signs and per-layer scales)."""

    variant = str(getattr(hub.model, "variant", ""))
    if not variant.startswith(("mpt", "bnn")):
        return None

    set_state(hub.model, hub.global_state)
    path = run_dir / ("final_model.mask" if variant.startswith("mpt") else "final_model.bnn")
    save_mask_file(hub.model, path, model_name=hub.config.model.name)  # the file stores the options itself
    return path


def write_final_model(run_dir: Path, hub: Hub) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's final model as a fedge model file, as a 1-bit file (MPT and BNN runs) and as
    ONNX (fp32 + int8; skipped when FEDGE_NO_ONNX is set). Returns (files, export summary)."""
    final_model = Path(run_dir) / "final_model.fedge"
    final_model.write_bytes(hub.model_payload(hub.version, hub.global_state, codec="fp32"))
    files: dict[str, Any] = {"model": final_model.name}
    one_bit = _write_one_bit_file(Path(run_dir), hub)
    if one_bit is not None:
        key = "mask_model" if one_bit.suffix == ".mask" else "bnn_model"
        files.update({key: one_bit.name, f"{key}_bytes": one_bit.stat().st_size})
    onnx = None
    if hub.private_names:  # the hub holds the shared tensors only: no complete model to export
        onnx = {"skipped": f"{hub.config.model} keeps {', '.join(sorted(hub.private_names))} on each device; "
                           f"final_model.fedge holds only the shared tensors"}
    elif not os.environ.get("FEDGE_NO_ONNX"):
        onnx = export_run(run_dir)
        files["onnx"] = onnx.get("onnx")
    return files, onnx


def write_run_report(
    run_dir: Path, hub: Hub, history: list[dict], final: tuple[float | None, float | None],
    central: dict | None, partition_counts: list[list[int]], fleet_config: Any, wall_time: float,
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    files, onnx = write_final_model(run_dir, hub)
    (run_dir / "partition.json").write_text(json.dumps(
        {"devices": {f"dev{i:03d}": counts for i, counts in enumerate(partition_counts)},
         "images_per_device": [sum(c) for c in partition_counts]}, indent=1))
    report: dict[str, Any] = {
        "run_id": hub.run_id,
        # the spec (registered name, options set away from their defaults) and every option's value
        "model": {**hub.config.model.to_json(), "all_options": model_options(hub.config.model)},
        "final_accuracy": final[1],
        "final_loss": final[0],
        "central_accuracy": central["accuracy"] if central else None,
        **summarise(history),
        "wall_time_s": wall_time,
        "rejected_updates": len(hub.store.rejections()),
        "transport": getattr(fleet_config, "transport", "mqtt"),  # inproc: the simulator's in-memory broker
        "config": _jsonable(fleet_config),
        "rounds": history,
        "central": central,
        "machine": machine_info(),
        "files": {**files, "partition": "partition.json", "plot": "accuracy.png"},
        "onnx": onnx,
    }
    if central and central.get("accuracy") and final[1] is not None:
        report["federated_over_central"] = final[1] / central["accuracy"]
    (run_dir / "run.json").write_text(json.dumps(report, indent=1, default=str))
    title = f"{hub.run_id}: {hub.config.model}, {len(partition_counts)} devices"
    plot_accuracy(run_dir / "accuracy.png", history, central, title)
    return report
