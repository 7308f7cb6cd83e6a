"""The fleet simulator: N virtual devices in one process, each a real agent with its own
data partition, sharing a few training workers (processes by default, hub/sim/workers.py);
plus the real hub. The hub cannot
tell these devices from real ones.

Transports: `mqtt` (each device an MQTT client of an embedded broker, or of `broker`) or
`inproc` (the same hub and agents over an in-memory broker: every message is still a full
encoded envelope, only the sockets are gone). Everything but the transport is one code path.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.profile import load_profile
from fedge.hub.broker import EmbeddedBroker
from fedge.hub.config import HubConfig
from fedge.hub.hub import Hub
from fedge.hub.report import write_run_report
from fedge.hub.store import RunStore
from fedge.models.data import Dataset, load_dataset
from fedge.models.errors import ConfigError
from fedge.models.partition import PartitionSpec, class_counts, partition
from fedge.models.registry import model_spec
from fedge.models.wire import Topics
from fedge.models.wire.inproc import InprocBroker
from fedge.models.wire.keys import HUB_PRIVATE, device_key, enroll_device, hub_verifier, init_hub_keys
from fedge.models.wire.transport import BrokerConfig, LinkFactory, SharedLoopLinks

from .attacks import ATTACKS
from .central import train_central
from .workers import FleetPool, make_pool, process_unsafe

log = logging.getLogger("fedge.fleet")


def new_run_id(prefix: str = "run") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


@dataclass
class FleetConfig:
    devices: int = 10
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    profile: str = "sim"
    backend: str = "process"  # training workers: process (default), thread (in this process) or ray
    workers: int = 0  # training workers (0: one per core on the CPU, one on a GPU)
    threads: int = 0  # torch threads for training in total (0 = all cores)
    transport: str = "mqtt"  # mqtt: real MQTT clients; inproc: the same hub and agents over an in-memory broker
    broker: str | None = None  # mqtt only; None: start an embedded broker in this process
    stop_after: int | None = None  # stop after this round (the plan still spans all its rounds); None: run to the end
    runs_dir: str = "runs"
    run_id: str | None = None
    central: bool = False  # also train the same model centrally on the union (baseline)
    recipe: str | None = None
    seed: int = 0
    progress: bool = True
    connect_parallel: int = 32  # devices connecting at once at start-up (a bound, so the broker is not stormed)
    attackers: dict[int, str] = field(default_factory=dict)  # device index -> hub.attacks name
    private_dir: str | None = None  # models with private tensors: each device's kept in <dir>/<device>.npz; None: memory
    hub: HubConfig = field(default_factory=HubConfig)


TRANSPORTS = ("mqtt", "inproc")


class Fleet:
    """Set up with start(), run rounds with run(), always close()."""

    def __init__(self, cfg: FleetConfig, dataset: Dataset | None = None) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.broker: EmbeddedBroker | None = None
        self.pool: FleetPool | None = None
        self.agents: list[Agent] = []
        self.parts: list[np.ndarray] = []
        self.run_id = cfg.run_id or new_run_id(cfg.recipe or "fleet")
        self.run_dir = Path(cfg.runs_dir) / self.run_id
        self.broker_config: BrokerConfig | None = None  # transport mqtt
        self.inproc: InprocBroker | None = None  # transport inproc
        self.connect: BrokerConfig | LinkFactory | None = None  # what the hub connects with (and extra agents)
        self.device_links: SharedLoopLinks | None = None  # mqtt: the devices' links, all on one network thread

    # -- set-up ----------------------------------------------------------------------
    def start(self) -> Fleet:
        cfg = self.cfg
        if self.dataset is None:
            self.dataset = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed)
        ds = self.dataset
        hub = cfg.hub
        hub.in_shape = ds.in_shape
        hub.num_classes = ds.num_classes
        hub.eval_device = load_profile(cfg.profile).device
        hub.model = model_spec(hub.model)  # a bad model, option or value fails here, before any device starts
        self.parts = partition(ds.train.y, cfg.devices, cfg.partition, seed=cfg.seed, num_classes=ds.num_classes)
        if cfg.transport not in TRANSPORTS:
            raise ConfigError(f"transport {cfg.transport!r}: choose one of {', '.join(TRANSPORTS)}")
        if cfg.transport == "inproc":
            if cfg.broker:
                raise ConfigError(f"--broker {cfg.broker} needs --transport mqtt (inproc runs its own in-memory broker)")
            self.inproc = InprocBroker()
            self.connect = self.inproc.link
        elif cfg.broker:
            self.broker_config = self.connect = BrokerConfig.from_url(cfg.broker)
        else:
            self.broker = EmbeddedBroker().start()
            self.broker_config = self.connect = BrokerConfig.from_url(self.broker.url)
        profile = dataclasses.replace(load_profile(cfg.profile), model=hub.model)
        backend = cfg.backend
        if backend == "process" and (why := process_unsafe(hub.model)):
            log.warning("%s: training in threads of this process instead (define it in an importable "
                        "module to use worker processes)", why)
            backend = "thread"
        self.pool = make_pool(backend, cfg.workers or None, cfg.threads or None, profile.device)
        # where the workers read each device's data (process: one shared-memory block; ray: the object store)
        splits, refs = self.pool.place([ds.train.subset(idx) for idx in self.parts])
        topics = Topics(hub.fleet, hub.prefix)
        if self.broker_config is not None:  # one network thread for every device, not one each
            self.device_links = SharedLoopLinks(self.broker_config)
        agents = []
        for i, split in enumerate(splits):
            agents.append(Agent(
                device_id=f"dev{i:03d}", profile=profile, broker=self.device_links or self.connect, topics=topics,
                data=split, data_ref=refs[i], num_classes=ds.num_classes, pool=self.pool, seed=cfg.seed,
                tamper=ATTACKS[cfg.attackers[i]]() if i in cfg.attackers else None,
                warn_unverified=bool(cfg.broker),  # an embedded or in-memory broker is this process's own
                private_state=Path(cfg.private_dir) / f"dev{i:03d}.npz" if cfg.private_dir else None,
                **self._device_keys(f"dev{i:03d}"),
            ))
        self._start_agents(agents)
        where = self.broker_config.url if self.broker_config else "the in-memory broker"
        log.info("%d virtual devices connected to %s", len(self.agents), where)
        return self

    def _start_agents(self, agents: list[Agent]) -> None:
        """Connect the devices, `connect_parallel` at a time (each waits for its CONNACK and SUBACK),
        with a progress bar. The first failure cancels the devices not yet connecting and is
        raised once those connecting have ended; every device that did connect is in self.agents."""
        bar = tqdm(total=len(agents), desc=f"connecting {len(agents)} devices", unit="device",
                   disable=not self.cfg.progress, leave=False)
        futures: list[Future] = []
        errors: list[BaseException] = []
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.connect_parallel, len(agents))),
                                    thread_name_prefix="fedge-connect") as ex:
                futures = [ex.submit(agent.start) for agent in agents]
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        if not errors:
                            ex.shutdown(wait=False, cancel_futures=True)
                        errors.append(future.exception())
                        continue
                    bar.update(1)
        finally:
            bar.close()
            self.agents = [agent for agent, f in zip(agents, futures)  # close() stops these
                           if f.done() and not f.cancelled() and f.exception() is None]
        if errors:
            raise errors[0]

    def _device_keys(self, device: str) -> dict:
        """With hub.keys_dir set, each virtual device is enrolled and verifies the hub."""
        keys_dir = self.cfg.hub.keys_dir
        if not keys_dir:
            return {}

        if not (Path(keys_dir) / HUB_PRIVATE).exists():
            init_hub_keys(keys_dir)
        key = device_key(keys_dir, device) or (enroll_device(keys_dir, device) and device_key(keys_dir, device))
        return {"hub_verifier": hub_verifier(keys_dir), "device_key": key}

    def close(self) -> None:
        for agent in self.agents:
            try:
                agent.stop()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        if self.device_links:
            self.device_links.close()
        if self.pool:
            self.pool.close()
        if self.broker:
            self.broker.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running ---------------------------------------------------------------------
    def make_hub(self, resume: bool = False, on_round=None) -> Hub:  # noqa: ANN001
        assert self.dataset is not None and self.connect is not None, "call start() first"
        store = RunStore(self.run_dir)
        hub_cfg = self.cfg.hub
        if resume and store.get_meta("config") is not None:
            hub_cfg = HubConfig.from_json(store.get_meta("config"))
        if not hub_cfg.min_devices:
            hub_cfg.min_devices = len(self.agents)
        return Hub(hub_cfg, self.connect, store, self.dataset.test.x, self.dataset.test.y, on_round=on_round)

    def run(self, hub: Hub | None = None) -> dict[str, Any]:
        """Run the hub to completion (or resume it), then write runs/<id>/ and return run.json."""
        started = time.time()
        hub = hub or self.make_hub()
        headline = hub.family.headline
        bar = None
        if self.cfg.progress:
            bar = tqdm(total=hub.config.total_rounds(), desc=f"fleet {self.run_id}", unit="round", initial=hub.store.last_round())

        def on_round(record: dict) -> None:
            stop_after = self.cfg.stop_after
            if stop_after is not None and record["round"] >= stop_after and stop_after < hub.config.total_rounds():
                hub.stop()  # the loop ends after this round; the run stays resumable
            if bar is not None:
                score = (record.get("metrics") or {}).get(headline)
                bar.set_postfix({headline: f"{score:.3f}" if score is not None else "n/a",
                                 "up": f"{record['bytes_up'] / 2**20:.1f}MiB", "down": f"{record['bytes_down'] / 2**20:.1f}MiB"})
                bar.update(1)

        hub.on_round = on_round
        try:
            history = hub.run()
        finally:
            if bar is not None:
                bar.close()
        final = hub.metrics(hub.global_state, full=True)
        train_rounds = sum(1 for r in history if r.get("kind", "train") == "train")
        central = self.train_central(hub.config, epochs=train_rounds) if self.cfg.central else None
        return write_run_report(
            run_dir=self.run_dir, hub=hub, history=history, final=final, central=central,
            partition_counts=class_counts(self.dataset.train.y, self.parts, self.dataset.num_classes),
            fleet_config=self.cfg, wall_time=time.time() - started,
        )

    def train_central(self, hub_cfg: HubConfig, epochs: int) -> dict[str, Any]:
        return train_central(self.dataset, self.parts, hub_cfg.model, hub_cfg.train, epochs, seed=hub_cfg.seed,
                             profile=self.cfg.profile, progress=self.cfg.progress)
