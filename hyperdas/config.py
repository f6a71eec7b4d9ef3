"""HyperDASConfig: everything that defines a HyperDAS model (the trained parts and where they act).

The closed sets (subspace module, selection mode, dtype, attention kernel) are string enums: a member equals
its name as a string, and a name outside the set is an error that lists the allowed ones. Every field is
checked for its type when the config is made, and an attribute that is not a field cannot be set, so a typo
(``config.num_editng_heads = 32``) is an error instead of a silent no-op.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path


class StrEnum(str, Enum):
    """A string enum whose str() and format() are its value on every Python version."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def parse(cls, value, what: str):
        """``value`` as a member, or a ValueError naming ``what``, the value and the allowed names."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {value!r}; allowed: {[m.value for m in cls]}") from None


class SubspaceModule(StrEnum):
    """How the encoding picks the subspace W (METHOD.md §4)."""

    ReflectSelect = "ReflectSelect"  # noqa: N815 (the paper's names)
    MaskSelect = "MaskSelect"  # noqa: N815
    DAS = "DAS"
    full = "full"


class SelectionMode(StrEnum):
    """How the soft selection A becomes the one an evaluation uses (METHOD.md §3)."""

    soft = "soft"
    column_argmax = "column_argmax"
    bidding_argmax = "bidding_argmax"
    global_argmax = "global_argmax"
    groundtruth = "groundtruth"


class PositionScope(StrEnum):
    """The positions of a run (base or source) the selection may use (METHOD.md §3, §5), and so the tokens of
    that run the editor reads."""

    prefix = "prefix"  # the paper's: every prefix token, the template's words and in-context example included
    entity = "entity"  # only the run's entity tokens
    entity_last = "entity_last"  # only the run's last entity token: the position MDAS patches


class DType(StrEnum):
    """The target's weights and forward dtype (the trained parts keep fp32 masters whatever it is); "auto" is
    bfloat16 where the device computes it natively and float32 elsewhere (hyperdas.targets.resolve_target_dtype)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"
    auto = "auto"

    @classmethod
    def _missing_(cls, value):
        """A torch.dtype (``torch.bfloat16``, as the paper's code sets it) names its member too."""
        return cls.__members__.get(str(value).removeprefix("torch."))


class EditorReads(StrEnum):
    """Which runs the editor's cross-attention reads (the paper's ablations drop one of them)."""

    both = "both"
    source = "source"
    base = "base"


class AttentionKernel(StrEnum):
    """The target's attention implementation: "auto" is eager on CPU, SDPA on GPU and for float64."""

    auto = "auto"
    sdpa = "sdpa"
    eager = "eager"


SUBSPACE_MODULES = tuple(m.value for m in SubspaceModule)
SELECTION_MODES = tuple(m.value for m in SelectionMode)
#: the splits an evaluation reads: the held-out templates (the result) or the pairs trained on
EVAL_SPLITS = ("test", "train")


def check_type(value, hint, name: str):
    """``value`` coerced to the annotation ``hint`` (enums from their names, ints for floats), or a ValueError."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{name} may not be None")
    for option in options:
        if isinstance(option, type) and issubclass(option, StrEnum):
            return option.parse(value, name)
    if bool in options:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if int in options:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if float in options:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name} must be a number, got {value!r}")
    if str in options and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    for option in options:
        if typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            if not isinstance(value, (list, tuple)) or isinstance(value, str):
                raise ValueError(f"{name} must be a list, got {value!r}")
            return [check_type(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    return value


def plain_values(value):
    """Dataclasses, dicts and lists as plain dicts and lists, enum members as their names (for YAML and JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    return value.value if isinstance(value, Enum) else value


def refuse_unknown_field(cls, name: str) -> None:
    """Raise AttributeError for a name that is neither a field nor an attribute of ``cls``, with suggestions."""
    names = [f.name for f in fields(cls)]
    if name in names or hasattr(cls, name):
        return
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise AttributeError(f"{cls.__name__} has no field {name!r}{hint} Fields: {names}")


@dataclass
class HyperDASConfig:
    """The model's configuration. Defaults are the embedded default's; METHOD.md gives the paper's.

    The paper's names (`chop_editor_at_layer`, `num_editing_heads`, `intervention_layer`,
    `initialize_from_scratch`, `das_dimension`) are kept so a researcher coming from it types what they know.
    """

    #: the frozen target: "smollm2-135m" (embedded default), a local folder or a hub name.
    target: str = "smollm2-135m"
    #: k: patch the residual stream at the output of decoder layer k-1 (= hidden_states[k]).
    #: Paper: 15 of Llama-3-8B's 32; here 10 of SmolLM2's 30, where the entity's attributes are readable.
    intervention_layer: int = 10
    #: r: subspace size of ReflectSelect / MaskSelect / DAS. Paper: 128 of D=4096.
    das_dimension: int = 32
    #: how the subspace is chosen: a per-example reflection of a learned basis (default), a mask, one static
    #: basis for every example, or the whole vector.
    subspace_module: SubspaceModule = SubspaceModule.ReflectSelect
    #: K: ReflectSelect's Householder reflections per example, W = H_K ··· H_1 R. Paper: 1, with which any two
    #: examples' subspaces share r − 2 of r dimensions (README); K lets them differ in up to 2K.
    num_reflections: int = 1
    #: one learned basis R_a per attribute instead of the paper's one shared R, picked by the attribute the pair's
    #: instruction names: W = H_K ··· H_1 R_a (ReflectSelect) or W = R_a (DAS): each attribute gets a subspace of
    #: its own, as MDAS trains one per attribute, while the editor still chooses WHERE (and reflects R_a).
    basis_per_attribute: bool = False
    #: which attribute each of those bases belongs to, in order: hyperdas train fills it from data.attributes
    #: before it builds the model, and a saved model keeps it. None unless basis_per_attribute.
    basis_attributes: list[str] | None = None
    #: L: editor depth, built from the target's first L decoder layers. Paper's best ablation: 8.
    chop_editor_at_layer: int = 2
    #: heads of the selection head; None = the target's number of attention heads.
    num_editing_heads: int | None = None
    #: fresh random editor weights instead of copies of the target's first L layers.
    initialize_from_scratch: bool = False
    #: ablations: the runs the editor attends to ("both"; "source" or "base": none of the other run's tokens),
    #: and one cross-attention block for both runs instead of one each ("symmetric", needs "both").
    editor_reads: EditorReads = EditorReads.both
    editor_symmetric: bool = False
    #: residual dropout in the editor: the share of each block's output zeroed in training (0 = none, the
    #: paper's). A regulariser for the editor, which otherwise fits the training templates (README).
    editor_dropout: float = 0.0
    #: share the target's (frozen) embedding table instead of training a copy: saves V x D parameters.
    freeze_editor_embeddings: bool = True
    #: MaskSelect's sigmoid temperature, annealed linearly from start to end over training.
    mask_temperature_start: float = 50.0
    mask_temperature_end: float = 0.1
    #: τ of the selection softmax over the source axis (A = softmax(logits / τ)), annealed linearly from start
    #: to end over training: an end below 1 hardens A toward one-hot columns, so the hard inference modes see
    #: the selection the model was trained with. 1 -> 1 is the paper's (no annealing).
    selection_temperature_start: float = 1.0
    selection_temperature_end: float = 1.0
    #: the selection the training step patches with: "soft" (the paper's), or a hard mode trained straight
    #: through (its one-hot selection in the forward, the soft A's gradient in the backward), so the mode that
    #: is evaluated is the mode that was trained. "groundtruth" is the WHICH-without-WHERE ablation: every step
    #: patches the last entity token with the source's last entity token, so only the editor and the subspace
    #: learn (the selection head is frozen and stays at its initialisation: of that run's modes only
    #: groundtruth measures anything).
    train_selection_mode: SelectionMode = SelectionMode.soft
    #: where the selection may write in the base and read in the source: "prefix" (the paper's: every token
    #: before the suffix) or "entity" (only that run's entity tokens). The editor's keys of that run are masked
    #: alike, as the intervention mask masks them (METHOD.md §2). "entity" keeps WHERE on the entities while the
    #: head still chooses among their tokens: the soft selection otherwise moves mostly template words.
    #: "entity_last": only the last entity token, MDAS's position; on the base side the head then chooses only
    #: what that token takes and from which source tokens (WHERE in the source, not in the base).
    selectable_base: PositionScope = PositionScope.prefix
    selectable_source: PositionScope = PositionScope.prefix
    #: the attributes the model was trained to localise (set by the trainer from its training data): a batch
    #: whose instruction names another is refused, not answered by a guess. None: not recorded.
    trained_attributes: list[str] | None = None
    #: fused Triton kernels: None = on CUDA only, True = always (CUDA required), False = plain PyTorch.
    use_fused_kernels: bool | None = None
    #: recompute each editor layer in backward instead of storing its activations (non-reentrant).
    checkpoint_editor_layers: bool = False
    #: recompute target layers k..end in backward.
    checkpoint_target_layers: bool = False
    #: the target's weights and forward dtype; the trained parts keep fp32 masters and run under autocast to it.
    #: "auto": bf16 where the device has native bf16 units, fp32 elsewhere (a run config resolves it at load).
    torch_dtype: DType = DType.bfloat16
    #: the target's attention kernel (see hyperdas.targets.attention_kernel_for).
    attn_implementation: AttentionKernel = AttentionKernel.auto

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, check_type(getattr(self, f.name), hints[f.name], f.name))

    def __setattr__(self, name: str, value) -> None:
        refuse_unknown_field(type(self), name)
        hints = typing.get_type_hints(type(self))
        if name in hints:
            value = check_type(value, hints[name], name)
        super().__setattr__(name, value)

    # --- the paper's spelling ---------------------------------------------------------------------
    @property
    def name_or_path(self) -> str:
        return self.target

    @name_or_path.setter
    def name_or_path(self, value: str) -> None:
        self.target = value

    @classmethod
    def from_pretrained(cls, target: str, **overrides) -> HyperDASConfig:
        """A config for a target (the seed README's `LlamaInterpreterConfig.from_pretrained(name)`)."""
        config = cls(target=target)
        for name, value in overrides.items():
            setattr(config, name, value)
        return config

    # --- checks and persistence ---------------------------------------------------------------------
    def validate(self, num_layers: int | None = None, hidden_size: int | None = None) -> None:
        """Raise ValueError naming any bad value and what is allowed (called before any heavy work)."""
        if self.das_dimension < 1:
            raise ValueError(f"das_dimension must be >= 1, got {self.das_dimension}")
        if self.chop_editor_at_layer < 1:
            raise ValueError(f"chop_editor_at_layer must be >= 1, got {self.chop_editor_at_layer}")
        if self.editor_symmetric and self.editor_reads != EditorReads.both:
            raise ValueError(
                f"editor_symmetric reads both runs with one block: it needs editor_reads=both, got {self.editor_reads}"
            )
        if self.num_reflections < 1:
            raise ValueError(f"num_reflections must be >= 1, got {self.num_reflections}")
        if self.num_reflections > 1 and self.subspace_module != SubspaceModule.ReflectSelect:
            raise ValueError(
                f"num_reflections {self.num_reflections} applies to ReflectSelect only, not {self.subspace_module}"
            )
        if self.basis_per_attribute and self.subspace_module not in (SubspaceModule.ReflectSelect, SubspaceModule.DAS):
            raise ValueError(
                f"basis_per_attribute applies to ReflectSelect and DAS (the modules with one basis R), "
                f"not {self.subspace_module}"
            )
        if self.basis_attributes is not None:
            if not self.basis_per_attribute:
                raise ValueError(
                    f"basis_attributes {self.basis_attributes} given without basis_per_attribute=true: "
                    "set both, or neither"
                )
            if not self.basis_attributes or len(set(self.basis_attributes)) != len(self.basis_attributes):
                raise ValueError(f"basis_attributes must name distinct attributes, got {self.basis_attributes}")
        if not 0.0 <= self.editor_dropout < 1.0:
            raise ValueError(f"editor_dropout must be in [0, 1), got {self.editor_dropout}")
        if self.num_editing_heads is not None and self.num_editing_heads < 1:
            raise ValueError(f"num_editing_heads must be >= 1 or None, got {self.num_editing_heads}")
        if not 0 < self.mask_temperature_end <= self.mask_temperature_start:
            raise ValueError(
                f"mask temperatures must satisfy 0 < end <= start, got start {self.mask_temperature_start}, "
                f"end {self.mask_temperature_end}"
            )
        if not 0 < self.selection_temperature_end <= self.selection_temperature_start:
            raise ValueError(
                f"selection temperatures must satisfy 0 < end <= start, got start "
                f"{self.selection_temperature_start}, end {self.selection_temperature_end}"
            )
        if num_layers is not None:
            if not 0 <= self.intervention_layer <= num_layers - 1:
                raise ValueError(
                    f"intervention_layer {self.intervention_layer} is out of range for a {num_layers}-layer "
                    f"target: allowed 0..{num_layers - 1}"
                )
            if self.chop_editor_at_layer > num_layers:
                raise ValueError(
                    f"chop_editor_at_layer {self.chop_editor_at_layer} exceeds the target's {num_layers} layers"
                )
        if hidden_size is not None and self.subspace_module != SubspaceModule.full and self.das_dimension > hidden_size:
            raise ValueError(
                f"das_dimension {self.das_dimension} exceeds the target's hidden size {hidden_size}: "
                f"allowed 1..{hidden_size}"
            )

    def to_dict(self) -> dict:
        return plain_values(self)

    @classmethod
    def from_dict(cls, values: dict) -> HyperDASConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HyperDASConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    def save(self, folder: Path) -> None:
        (Path(folder) / "hyperdas_config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> HyperDASConfig:
        path = Path(folder) / "hyperdas_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is not a HyperDAS checkpoint folder")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is damaged ({err}); the checkpoint folder {folder} cannot be used") from err
        return cls.from_dict(values)
