"""The names of the authors' code, so the seed README's usage works with only the import path changed:

from hyperdas.compat import LlamaInterpreterConfig, LlamaInterpreter
config = LlamaInterpreterConfig.from_pretrained("meta-llama/Meta-Llama-3-8B")
config.torch_dtype = torch.bfloat16
config.num_editing_heads = 32
config.chop_editor_at_layer = 4
config.intervention_layer = 20
config._attn_implementation = "eager"
config.initialize_from_scratch = True
interpreter = LlamaInterpreter(config, subspace_module="ReflectSelect", das_dimension=2)
"""

from __future__ import annotations

from hyperdas.config import HyperDASConfig
from hyperdas.model import HyperDAS
from hyperdas.targets import FrozenTarget


class LlamaInterpreterConfig(HyperDASConfig):
    """HyperDASConfig under the authors' name; also takes their ``_attn_implementation`` attribute."""

    @property
    def _attn_implementation(self) -> str:
        return self.attn_implementation.value

    @_attn_implementation.setter
    def _attn_implementation(self, value: str) -> None:
        self.attn_implementation = value


def LlamaInterpreter(  # noqa: N802 (the authors' class name, kept as a factory)
    config: HyperDASConfig,
    subspace_module: str | None = None,
    das_dimension: int | None = None,
    target: FrozenTarget | None = None,
) -> HyperDAS:
    """Build a HyperDAS model the way the authors' ``LlamaInterpreter(config, ...)`` did."""
    if subspace_module is not None:
        config.subspace_module = subspace_module
    if das_dimension is not None:
        config.das_dimension = das_dimension
    return HyperDAS(config, target)
