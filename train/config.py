"""Run configuration: dataclasses loaded from YAML (train/configs/) with `key=value` overrides.

`hyperdas train` and `train/launch.py` read the same file. Overrides use dotted keys for the sections,
e.g. `hyperdas train model.intervention_layer=12 optim.editor_lr=1e-4 epochs=2 resume=runs/city`; values are
parsed as YAML scalars (`1e-4`, `true`, `[Country, Continent]`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hyperdas.config import SELECTION_MODES, HyperDASConfig, plain_values
from hyperdas.data.build import DataRequest
from hyperdas.state_cache import STORAGES

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "smollm2_city.yaml"


_DATA = DataRequest()


@dataclass
class DataConfig:
    """Which counterfactual data to build: the run's view of hyperdas.data.build.DataRequest, whose target and
    dtype are the model's and whose seed is the run's. Defaults are DataRequest's, so a run and `hyperdas data`
    with the same values share one cached dataset."""

    domain: str = _DATA.domain
    #: attributes to localise (causal examples); [all] = every attribute of the domain with enough known prompts.
    attributes: list[str] = field(default_factory=lambda: list(_DATA.attributes))
    #: attributes isolate examples query; None = the other requested ones (or all others, when one is).
    isolate_attributes: list[str] | None = None
    #: examples over both splits together.
    max_examples: int = _DATA.max_examples
    #: share of max_examples in the test split (held-out templates).
    test_share: float = _DATA.test_share
    #: source contexts: "template" (the domain's templates) and/or "wikipedia".
    sources: list[str] = field(default_factory=lambda: list(_DATA.sources))
    #: entities checked per template (the known-prompt universe's size).
    entities_per_template: int = _DATA.entities_per_template
    #: prompts per checking forward pass.
    filter_batch_size: int = 64


@dataclass
class OptimConfig:
    """AdamW with three learning rates (METHOD.md, Training). Paper (Llama-3-8B): 4e-5 / 1e-3 / 1e-2."""

    editor_lr: float = 5e-4
    rotation_lr: float = 1e-3
    mask_lr: float = 1e-2
    weight_decay: float = 0.01
    grad_clip: float = 4.0
    #: fraction of steps over which the learning rates warm up linearly from 0 (0 = constant).
    warmup_fraction: float = 0.0


@dataclass
class LossConfig:
    """Per-example weights and the sparsity schedule (0 before warm-up, then start -> end linearly)."""

    causal_loss_weight: float = 3.5
    iso_loss_weight: float = 0.5
    sparsity_weight_start: float = 0.15
    sparsity_weight_end: float = 1.5
    sparsity_warmup_fraction: float = 0.5

    def sparsity_weight(self, fraction: float) -> float:
        """The sparsity weight at training progress ``fraction`` in [0, 1]."""
        if fraction < self.sparsity_warmup_fraction:
            return 0.0
        span = max(1.0 - self.sparsity_warmup_fraction, 1e-12)
        t = min((fraction - self.sparsity_warmup_fraction) / span, 1.0)
        return self.sparsity_weight_start + t * (self.sparsity_weight_end - self.sparsity_weight_start)


@dataclass
class RunConfig:
    """One training run. Defaults are the embedded default's main job; see train/configs/ for others."""

    model: HyperDASConfig = field(default_factory=HyperDASConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 4
    #: stop after this many optimizer steps (None = epochs decide).
    max_steps: int | None = None
    #: counterfactual pairs per optimizer step, whatever the number of processes.
    global_batch_size: int = 16
    #: pairs per forward on one process; None = global_batch_size / processes (no accumulation).
    micro_batch_size: int | None = None
    eval_batch_size: int = 64
    #: cap on test examples evaluated per mode (None = all).
    eval_max_examples: int | None = None
    eval_modes: list[str] = field(default_factory=lambda: list(SELECTION_MODES))
    #: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16". Masters are always fp32.
    precision: str = "auto"
    seed: int = 0
    out_dir: str = "runs/smollm2-city"
    save_every: int = 100
    #: a plain log line every this many steps (for non-interactive logs; the progress bar is live).
    log_every: int = 10
    #: number of test pairs drawn in the selection heatmap.
    heatmap_examples: int = 4
    #: a run folder to continue from its last checkpoint (same data order).
    resume: str | None = None
    #: a DeepSpeed JSON config; None = single-process PyTorch.
    deepspeed: str | None = None
    #: batches of similar lengths (one example per data shard still; see trainer.step_batches): less padding.
    group_by_length: bool = True
    #: the frozen target's states of the train prompts, computed once and reused every epoch: "auto" (memory,
    #: else disk, else off, by size), "memory", "disk" or "off" (the target runs every step).
    state_cache: str = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the bad value and what is allowed."""
        self.model.validate()
        if self.state_cache not in STORAGES:
            raise ValueError(f"state_cache {self.state_cache!r}; allowed: {list(STORAGES)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r}; allowed: auto, fp32, bf16")
        unknown = [m for m in self.eval_modes if m not in SELECTION_MODES]
        if unknown:
            raise ValueError(f"unknown eval mode(s) {unknown}; allowed: {list(SELECTION_MODES)}")
        for name in ("global_batch_size", "eval_batch_size", "save_every", "log_every", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _build(cls, values: dict, where: str):
    """Recursively build dataclass ``cls`` from a dict, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    """Scalars as the field declares them: YAML reads `1e-4` as a string, and ints may stand for floats."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"config key {key} may not be null")
    for kind in (bool, int, float):
        if kind in allowed and not (kind is int and bool in allowed):
            if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
                return value
    if float in allowed and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config key {key} must be a number, got {value!r}") from None
    if int in allowed and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"config key {key} must be an integer, got {value!r}") from None
    if (int in allowed or float in allowed) and not isinstance(value, (int, float)) and str not in allowed:
        raise ValueError(f"config key {key} must be a number, got {value!r}")
    return value


def _set_dotted(values: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    """`key=value` strings -> (dotted key, YAML-parsed value)."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. model.intervention_layer=12)")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (default: the embedded default's) and apply `key=value` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} not found; the shipped ones are in {CONFIG_DIR}")
    values = yaml.safe_load(path.read_text()) or {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(values, key, value)
    config = _build(RunConfig, values, "")
    config.validate()
    return config


def run_config_to_dict(config: RunConfig) -> dict:
    """Plain values only (enum members as their names), as YAML and JSON write them."""
    return plain_values(config)


def save_run_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(run_config_to_dict(config), sort_keys=False))
