"""HyperDASConfig: everything that defines a HyperDAS model (the trained parts and where they act)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SUBSPACE_MODULES = ("ReflectSelect", "MaskSelect", "DAS", "full")
SELECTION_MODES = ("soft", "column_argmax", "bidding_argmax", "global_argmax", "groundtruth")


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
    #: "ReflectSelect" (default: per-example Householder reflection of a learned basis), "MaskSelect",
    #: "DAS" (one static basis for every example), "full" (patch the whole vector).
    subspace_module: str = "ReflectSelect"
    #: L: editor depth, built from the target's first L decoder layers. Paper's best ablation: 8.
    chop_editor_at_layer: int = 2
    #: heads of the selection head; None = the target's number of attention heads.
    num_editing_heads: int | None = None
    #: fresh random editor weights instead of copies of the target's first L layers.
    initialize_from_scratch: bool = False
    #: share the target's (frozen) embedding table instead of training a copy: saves V x D parameters.
    freeze_editor_embeddings: bool = True
    #: MaskSelect's sigmoid temperature, annealed linearly from start to end over training.
    mask_temperature_start: float = 50.0
    mask_temperature_end: float = 0.1
    #: fused Triton kernels: None = on CUDA only, True = always (CUDA required), False = plain PyTorch.
    use_fused_kernels: bool | None = None
    #: recompute each editor layer in backward instead of storing its activations (non-reentrant).
    checkpoint_editor_layers: bool = False
    #: recompute target layers k..end in backward.
    checkpoint_target_layers: bool = False
    #: target weights' dtype: "bfloat16" (default: the trained parts keep fp32 masters), "float32" or "float16".
    torch_dtype: str = "bfloat16"

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
        return cls(target=target, **overrides)

    # --- checks and persistence ---------------------------------------------------------------------
    def validate(self, num_layers: int | None = None, hidden_size: int | None = None) -> None:
        """Raise ValueError naming any bad value and what is allowed (called before any heavy work)."""
        if not isinstance(self.torch_dtype, str):  # the paper's code sets a torch.dtype here
            self.torch_dtype = str(self.torch_dtype).removeprefix("torch.")
        if self.subspace_module not in SUBSPACE_MODULES:
            raise ValueError(f"unknown subspace_module {self.subspace_module!r}; allowed: {list(SUBSPACE_MODULES)}")
        if self.das_dimension < 1:
            raise ValueError(f"das_dimension must be >= 1, got {self.das_dimension}")
        if self.chop_editor_at_layer < 1:
            raise ValueError(f"chop_editor_at_layer must be >= 1, got {self.chop_editor_at_layer}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"torch_dtype {self.torch_dtype!r}; allowed: float32, bfloat16, float16, float64")
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
        if hidden_size is not None and self.subspace_module != "full" and self.das_dimension > hidden_size:
            raise ValueError(
                f"das_dimension {self.das_dimension} exceeds the target's hidden size {hidden_size}: "
                f"allowed 1..{hidden_size}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

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
        return cls.from_dict(json.loads(path.read_text()))
