"""Building HyperDAS for a resolved DeepSpeed config; under ZeRO-3 with the frozen target created partitioned.

transformers' ``HfDeepSpeedConfig`` is alive while ``from_pretrained`` runs, so it builds the target inside
``deepspeed.zero.Init``: no process ever holds all of the target's weights at once (one module is gathered at a
time while loading). The editor is built from a gathered, plain copy of the target's first L layers and
partitioned by ``deepspeed.initialize``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from hyperdas.config import HyperDASConfig
from hyperdas.model import HyperDAS
from hyperdas.targets import FrozenTarget, load_target, resolve_target_dtype
from hyperdas.train.config import RunConfig
from hyperdas.train.ds_config import zero_stage


def enable_zero3_construction(ds_config: dict) -> object:
    """From now on, transformers builds every model ZeRO-3 partitioned, for as long as the returned handle lives.

    ``from_pretrained`` (``load_target``) and ``from_config`` (``build_random_target``) then create the model
    inside ``deepspeed.zero.Init`` and initialise or load each module gathered, so no process holds the whole
    model. transformers only keeps a weak reference to the handle (an ``HfDeepSpeedConfig``): the caller must
    keep it, and should count parameters on the meta device before calling this.
    """
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _plain_copy(module: nn.Module) -> nn.Module:
    """A copy of a (gathered) ZeRO-3 module whose parameters are ordinary tensors with no DeepSpeed state.

    ``copy.deepcopy`` would copy each partitioned parameter's DeepSpeed attributes (its id, its shard) too;
    pre-seeding the memo with fresh parameters makes deepcopy use those instead.
    """
    memo = {id(p): nn.Parameter(p.data.clone(), requires_grad=False) for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _set_dotted(root: nn.Module, dotted: str, module: nn.Module) -> None:
    *parents, leaf = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def editor_source(target: FrozenTarget, num_layers: int, with_embeddings: bool) -> FrozenTarget:
    """A stand-in target holding plain copies of what the editor is built from (gathered from ZeRO-3).

    It has the target's config and the target's first ``num_layers`` decoder layers, final norm and rotary
    embedding (and embedding table when the editor trains its own copy), nothing else: ~L/n_layers of the
    target, gathered on every process once while the model is built.
    """
    import deepspeed

    parts = [target.final_norm] + list(target.layers[:num_layers])
    if with_embeddings:
        parts.append(target.embed_tokens)
    params = [p for part in parts for p in part.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        shell = nn.Module()
        layers = nn.ModuleList(_plain_copy(layer) for layer in target.layers[:num_layers])
        _set_dotted(shell, target.arch.layers, layers)
        _set_dotted(shell, target.arch.final_norm, _plain_copy(target.final_norm))
        _set_dotted(shell, target.arch.rotary_emb, copy.deepcopy(target.rotary_emb))
        if with_embeddings:
            _set_dotted(shell, target.arch.embed_tokens, _plain_copy(target.embed_tokens))
    shell.config = target.config
    return FrozenTarget(shell, target.tokenizer, target.name, target.arch)


def build_model(
    run: RunConfig, ds_config: dict, device_type: str, make_target: Callable[..., FrozenTarget] = load_target
) -> tuple[HyperDAS, object | None]:
    """The HyperDAS model for a resolved DeepSpeed config; under ZeRO-3 the target is loaded partitioned.

    Args:
        make_target: ``make_target(name, dtype=...)`` gives the frozen target (default `load_target`; a builder
            of random weights from a config serves speed and memory work at sizes not downloaded).

    Returns:
        (model, keep-alive handle): under ZeRO-3 the handle is transformers' ``HfDeepSpeedConfig``, which
        must outlive the model; None otherwise.
    """
    model_config: HyperDASConfig = run.model
    named = resolve_target_dtype(model_config.torch_dtype, device_type)
    dtype = torch.bfloat16 if run.uses_bf16(device_type) else getattr(torch, named)
    handle = None
    if zero_stage(ds_config) < 3:
        torch.manual_seed(run.seed)
        target = make_target(model_config.target, dtype=dtype)
        model = HyperDAS(model_config, target)
    else:
        handle = enable_zero3_construction(ds_config)
        target = make_target(model_config.target, dtype=dtype)
        source = editor_source(target, model_config.chop_editor_at_layer, not model_config.freeze_editor_embeddings)
        torch.manual_seed(run.seed)
        model = HyperDAS(model_config, target, editor_source=source)
    if ds_config.get("bf16", {}).get("enabled", False):
        # bf16 working weights; DeepSpeed's optimizer keeps the fp32 masters (ZeRO-3 would otherwise partition
        # the fp32 parts as they are and keep a second fp32 copy)
        for name, part in model.named_children():
            if name != "target":
                part.to(torch.bfloat16)
    return model, handle
