"""Prometheus metrics of one hub, read from its status snapshot at each scrape.

A collector, not counters bumped by the round loop: the loop stays free of monitoring code,
and every number has one source (Hub.status(), the same one the status page shows). Each hub
gets its own CollectorRegistry, so several hubs in one process (tests, the simulator) never
clash. The names are listed, with Grafana queries, in docs/operations.md ("Prometheus metrics").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .admission import REASON_CODES

# upper bounds (seconds) of fedge_round_duration_seconds: rounds take seconds (simulator) to hours (slow devices)
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# counted rejection codes: all but the benign duplicate resend (never a rejection)
REJECTION_CODES = tuple(code for code in REASON_CODES if code != "duplicate")


class HubCollector(Collector):
    """Turns one status snapshot into the fedge_* metric families."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        run, history = s["run"], s["history"]
        info = InfoMetricFamily("fedge_run", "the run this hub serves (value 1; the labels say which)")
        info.add_metric([], {"run": run["id"], "fleet": run["fleet"], "model": run["model"],
                             "model_options": json.dumps(run["model_options"], sort_keys=True, separators=(",", ":")),
                             "strategy": run["strategy"], "headline": run["headline"]})
        yield info
        yield GaugeMetricFamily("fedge_devices_online", "devices whose last status says online", value=s["devices_online"])
        yield GaugeMetricFamily("fedge_devices_known", "devices heard from since the hub started, online or not",
                                value=len(s["devices"]))
        open_round = s["round"]
        yield GaugeMetricFamily("fedge_round_open", "number of the open round (0 between rounds)",
                                value=open_round["round"] if open_round else 0)
        yield GaugeMetricFamily("fedge_round_seconds_left", "seconds until the open round's deadline (0 between rounds)",
                                value=open_round["seconds_left"] if open_round else 0)
        yield GaugeMetricFamily("fedge_round_answers", "answers the open round has accepted (0 between rounds)",
                                value=len(open_round["answered"]) if open_round else 0)
        yield GaugeMetricFamily("fedge_round_declined", "selected devices that refused or failed the open round's "
                                "attempt (0 between rounds)", value=len(open_round["declined"]) if open_round else 0)
        yield GaugeMetricFamily("fedge_stage", "index of the run plan's current stage, from 0 (= stage count once done)",
                                value=s["stage"]["index"])
        yield CounterMetricFamily("fedge_rounds_completed", "rounds completed in this run (resumed runs included)",
                                  value=s["rounds_completed"])
        yield _duration_histogram([r["seconds"] for r in history])
        yield CounterMetricFamily("fedge_updates_accepted", "updates and reports accepted into rounds since the hub "
                                  "started", value=s["answers_accepted"])
        rejected = CounterMetricFamily("fedge_updates_rejected", "updates and reports rejected since the hub started, "
                                       "by reason code", labels=["reason"])
        by_reason = s["rejections"]["by_reason"]
        for code in REJECTION_CODES:
            rejected.add_metric([code], by_reason.get(code, 0))
        yield rejected
        yield CounterMetricFamily("fedge_bytes_in", "bytes of the answers completed rounds accepted (device -> hub)",
                                  value=s["bytes_up_total"])
        yield CounterMetricFamily("fedge_bytes_out", "bytes of model + task completed rounds sent, times the devices "
                                  "selected (hub -> device)", value=s["bytes_down_total"])
        yield from _model_metrics(history, run["headline"])


def _duration_histogram(seconds: list[float]) -> HistogramMetricFamily:
    buckets = [(str(bound), sum(1 for x in seconds if x <= bound)) for bound in DURATION_BUCKETS]
    buckets.append(("+Inf", len(seconds)))
    return HistogramMetricFamily("fedge_round_duration_seconds", "wall time of each completed round, open to close",
                                 buckets=buckets, sum_value=float(sum(seconds)))


def _model_metrics(history: list[dict[str, Any]], headline: str) -> Iterator[Metric]:
    """The global model's version, and its test metrics after the last evaluated round: the
    family's headline (accuracy for classification, f1 for segmentation) and all it reports."""
    if history:
        yield GaugeMetricFamily("fedge_model_version", "version of the global model after the last completed round",
                                value=history[-1].get("model_version") or 0)
    last = next((r for r in reversed(history) if r["headline"] is not None), None)
    if last is None:  # no test set on the hub, or a model with private tensors: no score to export
        return
    top = GaugeMetricFamily("fedge_headline_metric", "the model family's headline test metric of the global model "
                            "after the last evaluated round (label metric: its name)", labels=["metric"])
    top.add_metric([headline], last["headline"])
    yield top
    scores = GaugeMetricFamily("fedge_model_metric", "every test metric of the global model after the last evaluated "
                               "round (loss, accuracy, ...)", labels=["metric"])
    for name, value in sorted(last["metrics"].items()):
        if isinstance(value, (int, float)):
            scores.add_metric([name], float(value))
    yield scores


def metrics_registry(status: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own for one hub's metrics (never the process-wide default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(status))
    return registry
