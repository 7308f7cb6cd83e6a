"""What defines a run: one dataclass, persisted with the run so that `--resume` needs nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedge.models.errors import ConfigError
from fedge.models.spec import ModelSpec
from fedge.models.wire.codecs import MODEL_CODECS
from fedge.models.wire.envelope import DEFAULT_MAX_BYTES
from fedge.models.wire.topics import ROOT

from .plan import Stage, stages_of
from .strategies import Strategy, make_strategy


@dataclass
class HubConfig:
    """Everything that defines a run; persisted so `--resume` needs nothing else."""

    fleet: str = "default"
    prefix: str = ROOT
    model: ModelSpec = ModelSpec("mlp")  # a registered name alone (e.g. "conv4") also works; check() makes it a spec
    in_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    rounds: int = 10
    clients_per_round: int = 0  # 0 = every online device
    min_devices: int = 0  # online devices needed before a round starts (0: 1, or the whole simulated fleet)
    wait_devices_s: float = 120.0
    deadline_s: float = 120.0  # stragglers past this are ignored for the round (paper 004)
    quorum: float = 1.0  # fraction of the selected whose updates close the round early
    min_updates: int = 1  # fewer at the deadline: the round is re-run with a new selection
    max_round_retries: int = 3
    # stop a train stage once the global model's headline metric (its family's: accuracy, f1,
    # probe_accuracy) reaches this; runs stored before families called it target_accuracy
    target_score: float | None = None
    min_weight_change: float | None = None
    strategy: str = "fedavg"
    # the strategy's constructor options, e.g. {"server_momentum": 0.9} (hub/strategies/, option_names)
    strategy_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # lr, epochs, batch_size, optimizer, momentum
    update_codec: str | None = None
    model_codec: str = "fp32"  # the published model only (fp16 halves the downlink, q8 ~quarters it); checkpoints stay fp32
    seed: int = 0
    max_payload: int = DEFAULT_MAX_BYTES
    keep_checkpoints: int = 2
    eval_size: int = 0  # test images evaluated each round (0 = all); the final model sees all
    resume_grace_s: float = 30.0
    keys_dir: str | None = None  # sign models/tasks, require enrolled device tags (models/wire/keys.py)
    eval_device: str = "cpu"  # where the hub evaluates ("cuda" on a GPU server)
    # most examples one update may claim (its FedAvg weight); also at most what its device
    # announced when it joined (protocol.md, admission of updates)
    max_samples: int = 1_000_000
    # the run's stages in order (hub/plan.py), e.g. [{"kind": "train", "rounds": 20}, {"kind": "evaluate",
    # "rounds": 1}]; empty: one train stage of `rounds` rounds. A stage's "params" go in its tasks;
    # a train stage's override `train` for that stage
    plan: list[dict[str, Any]] = field(default_factory=list)

    def check(self) -> None:
        """Refuse settings no run can work with, before anything is published or stored."""
        if not self.plan and (isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1):
            raise ConfigError(f"rounds must be a positive integer, got {self.rounds!r}: a run of no rounds trains nothing")
        from fedge.models.registry import model_spec  # noqa: PLC0415 - torch only once a run is configured, not for CLI parsing

        self.model = model_spec(self.model)  # refuses an unknown model, option or value; drops defaults
        if len(self.in_shape) < 1 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.in_shape):
            raise ConfigError(f"in_shape must be positive whole numbers (C, H, W), got {list(self.in_shape)}")
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise ConfigError(f"max_samples must be a positive integer, got {self.max_samples!r}")
        if self.model_codec not in MODEL_CODECS:
            raise ConfigError(f"model codec {self.model_codec!r} cannot carry a model; use one of {', '.join(MODEL_CODECS)}")
        self.make_strategy().task_codec(self.update_codec)
        self.stages()

    def stages(self) -> list[Stage]:
        """The run plan's stages (one train stage of `rounds` rounds without a plan)."""
        return stages_of(self.plan, self.rounds)

    def total_rounds(self) -> int:
        """Rounds the plan holds at most (stop rules may end a train stage sooner)."""
        return sum(stage.rounds for stage in self.stages())

    def make_strategy(self) -> Strategy:
        """This run's aggregation strategy, built from its name and options (fresh server state)."""
        return make_strategy(self.strategy, self.strategy_options)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = (self.model if isinstance(self.model, ModelSpec) else ModelSpec(self.model)).to_json()
        data["in_shape"] = list(self.in_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HubConfig:
        data = dict(data)
        data["in_shape"] = tuple(data.get("in_shape", (1, 28, 28)))
        data["model"] = ModelSpec.from_json(data.get("model", "mlp"))  # checked by check(), as every config is
        if "target_accuracy" in data:  # a run stored before task families
            data.setdefault("target_score", data.pop("target_accuracy"))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
