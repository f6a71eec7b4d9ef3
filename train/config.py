"""Run configuration: typed dataclasses loaded from YAML (train/configs/) with `key=value` overrides.

`hyperdas train`, `hyperdas baseline` and `train/launch.py` read the same file. Overrides use dotted keys for
the sections, e.g. `hyperdas train model.intervention_layer=12 optim.editor_lr=1e-4 epochs=2`; values are YAML
(`1e-4`, `true`, `[Country, Continent]`; a bare name for a list key is a one-element list). OmegaConf's
structured configs do the merging and the type checks: an unknown key, a value of the wrong type or a name
outside a closed set is an error naming the key, before any model or data is loaded.

`resume=DIR` continues the run in DIR with the config it was started with; of the overrides given beside it
only the ones that do not change what was trained so far (``RESUMABLE``) are applied, the others are refused.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from hyperdas.config import SELECTION_MODES, HyperDASConfig, SelectionMode, StrEnum, plain_values
from hyperdas.data.build import DataRequest

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "smollm2_city.yaml"
RUN_CONFIG_FILE = "run_config.yaml"
#: keys that `resume=` may change: how long to train on, how to log, save and evaluate.
RESUMABLE = (
    "resume",
    "max_steps",
    "epochs",
    "log_every",
    "save_every",
    "eval_batch_size",
    "eval_max_examples",
    "eval_modes",
    "heatmap_examples",
    "state_cache",
    "curve_every",
    "curve_examples",
)

_DATA = DataRequest()


class StateCacheMode(StrEnum):
    """Where the frozen target's train-prompt states are kept (hyperdas.state_cache.plan_storage)."""

    auto = "auto"
    memory = "memory"
    disk = "disk"
    off = "off"


class Precision(StrEnum):
    """The trained parts' compute precision under autocast: bf16 on CUDA by default, fp32 on CPU."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class DataConfig:
    """Which counterfactual data to build: the run's view of hyperdas.data.build.DataRequest, whose target and
    dtype are the model's and whose seed is the run's unless ``seed`` is set. Defaults are DataRequest's, so a
    run and `hyperdas data` with the same values share one cached dataset."""

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
    #: seeds the pairing; None = the run's seed. Set it to vary the training seed on the same data.
    seed: int | None = None


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
    """Per-example weights and the sparsity ramp (0 before its warm-up, then start -> end linearly; the
    schedule is train/schedule.py)."""

    causal_loss_weight: float = 3.5
    iso_loss_weight: float = 0.5
    sparsity_weight_start: float = 0.15
    sparsity_weight_end: float = 1.5
    sparsity_warmup_fraction: float = 0.5


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
    #: test examples evaluated, spread over attributes and kinds (None = all).
    eval_max_examples: int | None = None
    eval_modes: list[SelectionMode] = field(default_factory=lambda: list(SelectionMode))
    #: the trained parts' autocast: "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16". Masters are fp32.
    precision: Precision = Precision.auto
    seed: int = 0
    out_dir: str = "runs/smollm2-city"
    #: replace the results of an earlier run in out_dir (without it a used out_dir is refused).
    overwrite: bool = False
    save_every: int = 100
    #: a plain log line every this many steps (for non-interactive logs; the progress bar is live).
    log_every: int = 10
    #: number of test pairs drawn in the selection heatmap.
    heatmap_examples: int = 4
    #: a learning-curve point (soft and floor on both splits, train/learning_curve.py) every this many steps,
    #: and at the first and last step; 0 = none. It does not change training; it costs evaluation time.
    curve_every: int = 0
    #: pairs per split at each learning-curve point, spread over attributes and kinds (the same at every point).
    curve_examples: int = 96
    #: a run folder to continue from its last checkpoint (same data order).
    resume: str | None = None
    #: a DeepSpeed JSON config (a path, or a file name in train/configs/); None = single-process PyTorch.
    deepspeed: str | None = None
    #: batches of similar lengths (one example per data shard still; see trainer.step_batches): less padding,
    #: but batches of one length band; off by default, as the main job scored lower with it (README).
    group_by_length: bool = False
    #: the frozen target's states of the train prompts, computed once and reused every epoch: "auto" (memory,
    #: else disk, else off, by size), "memory", "disk" or "off" (the target runs every step).
    state_cache: StateCacheMode = StateCacheMode.auto

    def uses_bf16(self, device_type: str) -> bool:
        """Whether ``precision`` means bf16 compute for the trained parts on this device type (fp32 masters):
        the one reading of it, for the plain engine's autocast and DeepSpeed's bf16 mode alike."""
        return self.precision == Precision.bf16 or (self.precision == Precision.auto and device_type == "cuda")

    def data_request(self) -> DataRequest:
        """The data request this run makes (its target and dtype, its seed), validated."""
        data = self.data
        return DataRequest(
            domain=data.domain,
            attributes=tuple(data.attributes),
            isolate_attributes=tuple(data.isolate_attributes) if data.isolate_attributes else None,
            target=self.model.target,
            target_dtype=resolve_run_dtype(self.model.torch_dtype),
            max_examples=data.max_examples,
            test_share=data.test_share,
            seed=self.seed if data.seed is None else data.seed,
            sources=tuple(data.sources),
            entities_per_template=data.entities_per_template,
        ).validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad value and what is allowed (no side effects)."""
        self.model.validate()
        self.data_request()
        if self.data.filter_batch_size < 1:
            raise ValueError(f"data.filter_batch_size must be >= 1, got {self.data.filter_batch_size}")
        if not self.eval_modes:
            raise ValueError(f"eval_modes is empty; allowed: some of {list(SELECTION_MODES)}")
        for name in ("global_batch_size", "eval_batch_size", "save_every", "log_every", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "micro_batch_size", "eval_max_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")
        if self.heatmap_examples < 0:
            raise ValueError(f"heatmap_examples must be >= 0, got {self.heatmap_examples}")
        if self.curve_every < 0:
            raise ValueError(f"curve_every must be >= 0 (0: no learning curve), got {self.curve_every}")
        if self.curve_examples < 1:
            raise ValueError(f"curve_examples must be >= 1, got {self.curve_examples}")
        for name in ("editor_lr", "rotation_lr", "mask_lr"):
            if not getattr(self.optim, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self.optim, name)}")
        if self.optim.weight_decay < 0 or not self.optim.grad_clip > 0:
            raise ValueError(
                f"optim.weight_decay must be >= 0 and optim.grad_clip > 0, got "
                f"{self.optim.weight_decay} and {self.optim.grad_clip}"
            )
        if not 0.0 <= self.optim.warmup_fraction < 1.0 or not 0.0 <= self.loss.sparsity_warmup_fraction <= 1.0:
            raise ValueError("optim.warmup_fraction must be in [0, 1) and loss.sparsity_warmup_fraction in [0, 1]")
        if self.model.use_fused_kernels and not _fused_kernels_possible():
            raise ValueError(
                "model.use_fused_kernels=true needs a CUDA device (or TRITON_INTERPRET=1); this machine "
                "has none: use null (fused on CUDA only) or false"
            )


def resolve_run_dtype(name: str) -> str:
    """The concrete target dtype a run on this machine uses for ``model.torch_dtype`` ("auto": bfloat16 on CUDA
    or a CPU with native bf16 units, float32 on other CPUs; see hyperdas.targets.resolve_target_dtype)."""
    if name != "auto":
        return str(name)
    from hyperdas.targets import resolve_target_dtype, run_device

    return resolve_target_dtype(name, run_device())


def _fused_kernels_possible() -> bool:
    import torch  # imported here, with the kernels' helper, so `hyperdas train --help` stays light

    from hyperdas.kernels.common import interpreter_active

    return interpreter_active() or torch.cuda.is_available()


# --- loading -----------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} not found; the shipped ones are in {CONFIG_DIR}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"run config {path} is not valid YAML: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"run config {path} must be a mapping of keys (model:, data:, epochs: ...), "
            f"got a YAML {type(values).__name__}"
        )
    return values


def _hint_at(dotted: str):
    """The type annotation of a dotted key of RunConfig, or None when it names no field."""
    cls = RunConfig
    hint = None
    for part in dotted.split("."):
        if cls is None or not hasattr(cls, "__dataclass_fields__"):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = hints[part]
        cls = hint if hasattr(hint, "__dataclass_fields__") else None
    return hint


def _is_list(hint) -> bool:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(typing.get_origin(option) is list for option in options)


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    """`key=value` strings -> (dotted key, YAML value); a bare value for a list key becomes a one-element list."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. model.intervention_layer=12)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
        if value is not None and not isinstance(value, list) and _is_list(_hint_at(key)):
            value = [value]
        parsed.append((key, value))
    return parsed


def _nest(pairs: list[tuple[str, object]]) -> dict:
    nested: dict = {}
    for dotted, value in pairs:
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {part!r} is not a section")
        node[leaf] = value
    return nested


def _unknown_key_message(key: str) -> str:
    *parents, leaf = key.split(".")
    cls = RunConfig if not parents else _hint_at(".".join(parents))
    names = [f.name for f in fields(cls)] if hasattr(cls, "__dataclass_fields__") else []
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f"; did you mean {' or '.join('.'.join([*parents, c]) for c in close)}?" if close else ""
    return f"unknown config key(s) [{key!r}]{hint} Allowed{' in ' + '.'.join(parents) if parents else ''}: {names}"


def build_run_config(*sources: dict, where: str = "config") -> RunConfig:
    """Merge plain dicts (later ones win) over RunConfig's defaults into a checked RunConfig (not validated)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *(OmegaConf.create(s) for s in sources))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise ValueError(f"{where}: {_unknown_key_message(err.full_key or err.key)}") from None
    except OmegaConfBaseException as err:
        message = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ValueError(f"{where}: config key {err.full_key}: {message}") from None


def resolve_deepspeed_path(value: str | None, config_file: Path | None) -> str | None:
    """A run config's DeepSpeed JSON as an absolute path: as given, beside the run config, or a shipped one."""
    if value is None:
        return None
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute() and config_file is not None:
        candidates.append(config_file.resolve().parent / path)
    if not path.is_absolute():
        candidates.append(CONFIG_DIR / path.name)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"DeepSpeed config {value!r} not found (looked at {tried}); the shipped ones are "
        f"{sorted(p.name for p in CONFIG_DIR.glob('*.json'))} in {CONFIG_DIR}"
    )


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (default: the main job's), apply `key=value` overrides, validate.

    With ``resume=DIR`` among the overrides the config is DIR's own run_config.yaml, with only the RESUMABLE
    overrides applied (a ValueError names any other).
    """
    pairs = parse_overrides(overrides or [])
    resume = dict(pairs).get("resume")
    if resume:
        return _resume_config(Path(str(resume)), pairs, path)
    file = Path(path) if path else DEFAULT_CONFIG
    config = build_run_config(_read_yaml(file), where=f"run config {file}")
    config = build_run_config(plain_values(config), _nest(pairs), where="overrides") if pairs else config
    config.deepspeed = resolve_deepspeed_path(config.deepspeed, file)
    # resolved once, here, so the saved run_config.yaml (and a resume on another machine) names the dtype used
    config.model.torch_dtype = resolve_run_dtype(config.model.torch_dtype)
    config.validate()
    return config


def _resume_config(folder: Path, pairs: list[tuple[str, object]], path) -> RunConfig:
    saved = folder / RUN_CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"cannot resume: {saved} not found ({folder} is not a hyperdas run folder)")
    if path is not None and Path(path).resolve() not in (DEFAULT_CONFIG.resolve(), saved.resolve()):
        raise ValueError(f"resume={folder} continues that run with its own config ({saved}); drop --config {path}")
    refused = sorted(key for key, _ in pairs if key not in RESUMABLE)
    if refused:
        raise ValueError(
            f"resume={folder} cannot change {refused}: they would change what was trained so far. "
            f"Allowed beside resume: {list(RESUMABLE[1:])}; or start a new run"
        )
    base = _read_yaml(saved)
    config = build_run_config(base, _nest(pairs), where=f"run config {saved}")
    config.resume, config.out_dir = str(folder), str(folder)
    config.deepspeed = resolve_deepspeed_path(config.deepspeed, saved)
    config.validate()
    return config


def run_config_to_dict(config: RunConfig) -> dict:
    """Plain values only (enum members as their names), as YAML and JSON write them."""
    return plain_values(config)


def save_run_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(run_config_to_dict(config), sort_keys=False))


def _describe_type(hint) -> str:
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return "|".join(m.value for m in hint)
    if typing.get_origin(hint) is list:
        return f"list of {_describe_type(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe_type(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def config_keys_help() -> str:
    """Every key=value a run config takes, with its type and default (for `hyperdas train --help`)."""
    lines = []

    def walk(cls, prefix: str, instance) -> None:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            value = getattr(instance, f.name)
            if hasattr(hints[f.name], "__dataclass_fields__"):
                walk(hints[f.name], f"{prefix}{f.name}.", value)
                continue
            kind = _describe_type(hints[f.name])
            shown = plain_values(value)
            lines.append(f"  {prefix}{f.name}: {kind} = {shown}")

    defaults = load_run_config()
    walk(RunConfig, "", defaults)
    return "\n".join(lines)
