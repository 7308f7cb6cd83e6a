"""What a finished run leaves behind: runs/<id>/run.json, final model, partition report, plot.

Every score is named by the model's task family (models/families.py): run.json leads with the
family's `headline` metric and carries all of its metrics; a classification run also keeps
the `*_accuracy` keys it had before families, and no other family's run has them."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedge.models.export import export_run
from fedge.models.families import METRIC_LABELS, Family
from fedge.models.mpt_nets import save_mask_file
from fedge.models.registry import model_family, model_options, set_state
from fedge.models.spec import ModelSpec

from .task_kinds import weighted_mean

if TYPE_CHECKING:  # pragma: no cover
    from .hub import Hub


def machine_info() -> dict[str, Any]:
    """Recorded with every result so numbers are never quoted without their machine."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    return info


def write_results(results: dict[str, Any], out: str | Path, plot: Callable[[dict[str, Any], Path], Any]) -> Path:
    """A benchmark's record: `results` as JSON at `out` and `plot(results, path)` beside it (the
    same name, .png), so every benchmarks/ script leaves the pair docs/benchmarks.md cites."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    return out


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


def has_accuracy(family: Family) -> bool:
    """Whether the family scores 'accuracy' (classification): only then do run.json, summaries
    and round records carry the accuracy keys from before families."""
    return "accuracy" in family.metric_names


def device_means(record: dict) -> dict[str, float] | None:
    """An evaluate round's metrics, each the sample-weighted mean of the devices' own (their
    reports in the record's `device_metrics`); None for a round without reports."""
    devices = record.get("device_metrics") or {}
    reports = {d: (int(m.get("num_samples", 0)), m) for d, m in devices.items()}
    names = sorted({k for _, m in reports.values() for k, v in m.items() if k != "num_samples" and isinstance(v, (int, float))})
    return {k: v for k in names if (v := weighted_mean(reports, k)) is not None} or None


def summarise(history: list[dict], family: Family) -> dict[str, Any]:
    """The top-level keys every run.json (and `fedge hub`'s summary.json) carries, whatever
    produced it."""
    ups = [r["bytes_up"] / max(1, len(r["participants"])) for r in history]
    downs = [r["bytes_down"] / max(1, len(r["selected"])) for r in history]
    bodies = [r["bytes_up_body"] / max(1, len(r["participants"])) for r in history if r.get("bytes_up_body") is not None]
    evaluated = [r for r in history if r.get("device_metrics")]
    device = device_means(evaluated[-1]) if evaluated else None
    out: dict[str, Any] = {
        "rounds_completed": len(history),
        # the latest evaluate round (run plans): each metric, the sample-weighted mean of the devices' own
        "device_metrics_mean": device,
        "uplink_bytes_per_device": statistics.mean(ups) if ups else None,
        "uplink_body_bytes_per_device": statistics.mean(bodies) if bodies else None,  # without header and digest
        "downlink_bytes_per_device": statistics.mean(downs) if downs else None,
        "seconds_per_round": statistics.median(r["seconds"] for r in history) if history else None,
    }
    if has_accuracy(family):
        out["device_accuracy"] = device.get("accuracy") if device else None
    return out


def final_summary(family: Family, final: dict[str, float] | None) -> dict[str, Any]:
    """The final model's keys: `family`, `headline` (the metric the run leads with),
    `final_metrics` (every metric of the family; None without a test set or for a model whose
    head stays on the devices), `final_loss`, and for classification `final_accuracy`."""
    out: dict[str, Any] = {"family": family.name, "headline": family.headline, "final_metrics": final or None,
                           "final_loss": final.get("loss") if final else None}
    if has_accuracy(family):
        out["final_accuracy"] = final.get("accuracy") if final else None
    return out


def central_summary(family: Family, final: dict[str, float] | None, central: dict | None) -> dict[str, Any]:
    """The centralised baseline's keys: `central_metrics`, `federated_over_central` (the ratio
    of the headline metrics, when both are there), and for classification `central_accuracy`."""
    metrics = central.get("metrics") if central else None
    out: dict[str, Any] = {"central_metrics": metrics}
    if has_accuracy(family):
        out["central_accuracy"] = metrics.get("accuracy") if metrics else None
    mine, theirs = (final or {}).get(family.headline), (metrics or {}).get(family.headline)
    if mine is not None and theirs:
        out["federated_over_central"] = mine / theirs
    return out


def report_rounds(history: list[dict], family: Family) -> list[dict]:
    """The round records as run.json shows them: without the accuracy fields (always null)
    where the family has no accuracy."""
    if has_accuracy(family):
        return history
    return [{k: v for k, v in r.items() if k not in ("accuracy", "device_accuracy")} for r in history]


def plot_name(family: Family) -> str:
    """The plot's file name: the headline metric's (accuracy.png for classification, f1.png ...)."""
    return f"{family.headline}.png"


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name)


def plot_metrics(path: Path, history: list[dict], central: dict | None, title: str, family: Family) -> str:
    """Test metrics per round of the global model: the headline (solid; with the centralised
    baseline's per-epoch curve) and the family's other metrics but loss (thin, dashed), in %.
    The y label names the headline and is written into the PNG's 'Description', so a reader
    (or a test) can tell what the file shows. Returns that label."""
    import matplotlib  # noqa: PLC0415 - slow to import; only the end-of-run plot needs it

    matplotlib.use("Agg")  # before pyplot: a hub on a server has no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def curve(records: list[dict], key: str, x: str) -> tuple[list[Any], list[float]]:
        points = [(r[x], (r.get("metrics") or r).get(key)) for r in records]
        return [p for p, v in points if v is not None], [100 * v for _, v in points if v is not None]

    headline = family.headline
    ylabel = f"test {metric_label(headline)} (%)"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*curve(history, headline, "round"), marker="o", ms=3, label=f"{metric_label(headline)}, federated (global model)")
    for other in family.metric_names:
        if other not in ("loss", headline):
            ax.plot(*curve(history, other, "round"), lw=1, ls="--", label=metric_label(other))
    if central and central.get("curve"):
        ax.plot(*curve(central["curve"], headline, "epoch"), marker="s", ms=3,
                label=f"{metric_label(headline)}, centralised (same model, 1 epoch per round)")
    ax.set_xlabel("round / epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title, "Description": f"y: {ylabel}"})
    plt.close(fig)
    return ylabel


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
    elif hub.family.name == "contrastive":  # models/export.py refuses it: a projection is no prediction
        onnx = {"skipped": f"{hub.config.model} outputs a projection for its training loss, not a prediction to serve"}
    elif not os.environ.get("FEDGE_NO_ONNX"):
        onnx = export_run(run_dir)
        files["onnx"] = onnx.get("onnx")
    return files, onnx


def write_run_report(
    run_dir: Path, hub: Hub, history: list[dict], final: dict[str, float] | None,
    central: dict | None, partition_counts: list[list[int]], fleet_config: Any, wall_time: float,
) -> dict[str, Any]:
    """runs/<id>/run.json, the final model files, partition.json and the plot. `final`: the
    family's metrics of the final global model on the full test set (hub.metrics)."""
    run_dir = Path(run_dir)
    family = model_family(hub.config.model)
    files, onnx = write_final_model(run_dir, hub)
    (run_dir / "partition.json").write_text(json.dumps(
        {"devices": {f"dev{i:03d}": counts for i, counts in enumerate(partition_counts)},
         "images_per_device": [sum(c) for c in partition_counts]}, indent=1))
    report: dict[str, Any] = {
        "run_id": hub.run_id,
        # the spec (registered name, options set away from their defaults) and every option's value
        "model": {**hub.config.model.to_json(), "all_options": model_options(hub.config.model)},
        **final_summary(family, final),
        **central_summary(family, final, central),
        **summarise(history, family),
        "wall_time_s": wall_time,
        "rejected_updates": len(hub.store.rejections()),
        "transport": getattr(fleet_config, "transport", "mqtt"),  # inproc: the simulator's in-memory broker
        "config": _jsonable(fleet_config),
        "rounds": report_rounds(history, family),
        "central": central,
        "machine": machine_info(),
        "files": {**files, "partition": "partition.json", "plot": plot_name(family)},
        "onnx": onnx,
    }
    (run_dir / "run.json").write_text(json.dumps(report, indent=1, default=str))
    title = f"{hub.run_id}: {hub.config.model}, {len(partition_counts)} devices"
    plot_metrics(run_dir / plot_name(family), history, central, title, family)
    return report
