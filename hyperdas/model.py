"""HyperDAS: frozen target + editor + selection head + subspace module, wired into one training step.

One step (ARCHITECTURE.md, "How data flows"), running the target TWICE rather than the reference's four times:

1. one no-grad pass over base and source together (a 2B batch, hidden states only, no LM head);
2. editor over the instruction, cross-attending to source and base states -> encoding e (B, D);
3. selection A (B, Ts+1, Tb) and basis W (B, D, r) from e;
4. interchange at layer k: h' = h + W Wᵀ (Aᵀ[:Ts] S + A_Ts ⊙ h − h) (fused on CUDA);
5. target layers k..end on the patched base states, logits at the label positions only, with grad;
6. weighted cross-entropy on the labels + the hinge sparsity penalty on A.
No (B, D, D) and no (B, Ts, Tb, D) tensor is ever made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hyperdas.config import HyperDASConfig, PositionScope, SelectionMode
from hyperdas.data.batch import PairBatch
from hyperdas.editor import Editor, RunKeys
from hyperdas.kernels.common import interpreter_active
from hyperdas.kernels.interchange import interchange
from hyperdas.selection import SelectionHead, apply_selection_mode, sharpen, straight_through
from hyperdas.subspace import MASK_GROUP, ROTATION_GROUP, MaskSelect, build_subspace
from hyperdas.targets import (
    FrozenTarget,
    load_target,
    position_ids_from_mask,
    precision_context,
    resolve_target_dtype,
    run_device,
)

WEIGHTS_FILE = "hyperdas.safetensors"
IGNORE_INDEX = -100


@dataclass
class LossWeights:
    """Per-example loss weights and the sparsity weight of the current step (METHOD.md, Training)."""

    causal: float = 3.5
    isolate: float = 0.5
    sparsity: float = 0.0


#: evaluation references beside the selection modes (``HyperDAS.evaluate_batch``)
FLOOR = "floor"
CEILING = "ceiling"


@dataclass
class Encoded:
    """The mode-independent part of a step on one batch.

    Attributes:
        h: raw base states at layer k (B, Tb, D); s: raw source states at layer k (B, Ts, D).
        encoding: the editor's encoding e (B, D).
        soft: the soft selection A (B, Ts+1, Tb), float32.
        basis: W (B, D, r), (D, r), or None for the whole vector.
        base_mask, source_mask: (B, Tb), (B, Ts) bool selectable positions (cut to the entity, or to its last
            token, where config.selectable_base / selectable_source says so).
    """

    h: torch.Tensor
    s: torch.Tensor
    encoding: torch.Tensor
    soft: torch.Tensor
    basis: torch.Tensor | None
    base_mask: torch.Tensor
    source_mask: torch.Tensor


@dataclass
class BatchEvaluation:
    """One evaluation batch: label logits (B, P, V) and the selection used, per mode and reference, the
    subspace module's per-example analysis vectors (``describe``: ReflectSelect's reflections v (B, K·D), ...) and
    the basis W it patched with ((B, D, r) per example, (D, r) static, None for the whole vector)."""

    logits: dict[str, torch.Tensor]
    selections: dict[str, torch.Tensor | None]
    analysis: dict[str, torch.Tensor]
    basis: torch.Tensor | None = None


@dataclass
class HyperDASOutput:
    """What one forward gives.

    Attributes:
        loss: weighted CE + sparsity weight x penalty (scalar), or None without labels.
        ce_loss: the weighted cross-entropy part (scalar).
        sparsity_penalty: mean over the batch of Σ_i max(σ_i − 1, 0), σ_i = Σ_j A_ij (scalar).
        logits: (B, P, V) at the label positions.
        selection: A (B, Ts+1, Tb) as used (after the inference mode).
    """

    loss: torch.Tensor | None
    ce_loss: torch.Tensor | None
    sparsity_penalty: torch.Tensor
    logits: torch.Tensor
    selection: torch.Tensor


def left_pad_to(x: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    """Left-pad (B, T, ...) to (B, width, ...) with ``value``."""
    extra = width - x.shape[1]
    if extra == 0:
        return x
    pad = x.new_full((x.shape[0], extra, *x.shape[2:]), value)
    return torch.cat([pad, x], dim=1)


def sparsity_penalty(selection: torch.Tensor) -> torch.Tensor:
    """Hinge on how much each source token is taken: mean_b Σ_i max(Σ_j A_ij − 1, 0), real source rows only.
    ReLU's gradient is 0 at the kink Σ_j A_ij = 1, which a hard (straight-through) selection hits exactly."""
    taken = selection[:, :-1].sum(dim=2)  # (B, Ts)
    return F.relu(taken - 1.0).sum(dim=1).mean()


def weighted_label_loss(
    logits: torch.Tensor, label_ids: torch.Tensor, is_causal: torch.Tensor, weights: LossWeights
) -> torch.Tensor:
    """Mean over the batch of w_b · (mean CE over example b's label tokens), w = causal or isolate weight."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; float64 stays
    batch, positions, vocab = logits.shape
    per_token = F.cross_entropy(  # on (B·P, V) rows: its (B, V, P) layout is far slower on CPU
        logits.reshape(batch * positions, vocab), label_ids.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch, positions)
    counts = (label_ids != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    per_example = per_token.sum(dim=1) / counts
    example_weight = torch.where(is_causal.bool(), weights.causal, weights.isolate).to(per_example.dtype)
    return (example_weight * per_example).mean()


def load_configured_target(config: HyperDASConfig, device: str | torch.device | None = None) -> FrozenTarget:
    """The frozen target ``config`` names, in its dtype ("auto" resolved for ``device``) and attention kernel."""
    where = device if device is not None else run_device()
    dtype = resolve_target_dtype(config.torch_dtype, where)
    return load_target(
        config.target,
        dtype=getattr(torch, dtype),
        device=device,
        attn_implementation=config.attn_implementation,
    )


class HyperDAS(nn.Module):
    """The HyperDAS model. Only the editor, the selection head and the subspace module train.

    Args:
        config: the model configuration.
        target: the frozen target; loaded from ``config.target`` when None.
        editor_source: what the editor's first L layers are copied from, when not ``target`` itself (under
            ZeRO-3, plain gathered copies of the partitioned target's layers; see hyperdas.train.zero3_build).
    """

    def __init__(
        self, config: HyperDASConfig, target: FrozenTarget | None = None, editor_source: FrozenTarget | None = None
    ):
        super().__init__()
        config.validate()
        if target is None:
            target = load_configured_target(config)
        config.validate(num_layers=target.num_layers, hidden_size=target.hidden_size)
        if config.torch_dtype == "auto":  # a saved model names the dtype it ran in, not what "auto" meant here
            config.torch_dtype = str(target.dtype).removeprefix("torch.")
        self.config = config
        self.target = target
        d = target.hidden_size
        heads = config.num_editing_heads or target.config.num_attention_heads
        self.editor = Editor(
            target if editor_source is None else editor_source,
            config.chop_editor_at_layer,
            config.initialize_from_scratch,
            not config.freeze_editor_embeddings,
            reads_source=config.editor_reads != "base",
            reads_base=config.editor_reads != "source",
            symmetric=config.editor_symmetric,
            dropout=config.editor_dropout,
        )
        self.editor.gradient_checkpointing = config.checkpoint_editor_layers
        self.editor.use_triton = config.use_fused_kernels  # every fused op takes the one switch
        self.selection_head = SelectionHead(d, heads)
        if config.train_selection_mode == SelectionMode.groundtruth:
            # WHICH without WHERE: no step reads the head, so it is frozen rather than left to the optimizer,
            # which under ZeRO-3 moved it anyway (tests/train/test_deepspeed_zero.py)
            self.selection_head.requires_grad_(False)
        if config.basis_per_attribute and not config.basis_attributes:
            raise ValueError(
                "basis_per_attribute needs basis_attributes, the attributes to keep a basis for (hyperdas train "
                "fills it from data.attributes; in Python, set config.basis_attributes=[...])"
            )
        self.subspace = build_subspace(
            config.subspace_module,
            d,
            config.das_dimension,
            config.mask_temperature_start,
            config.num_reflections,
            len(config.basis_attributes) if config.basis_per_attribute else None,
        )
        # training anneals it from the start value (set_progress); a built or loaded model selects at the end one
        self.selection_temperature = config.selection_temperature_end
        #: the trained parts' autocast dtype (a run's precision; train/engine.py sets it), None = the target's
        self.compute_dtype: torch.dtype | None = None
        # fp32 master weights for everything trained, whatever the target's dtype (float64 stays, for tests)
        trained_dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
        for part in (self.editor, self.selection_head, self.subspace):
            part.to(trained_dtype)

    # --- the trained parts ------------------------------------------------------------------------
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("target.")]

    def param_groups(self, editor_lr: float, rotation_lr: float, mask_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: editor + selection head (editor_lr, decay), basis R (rotation_lr, no decay),
        MaskSelect's mask projection (mask_lr, decay). A part declares its group by an ``optimizer_group``
        attribute (hyperdas/subspace.py); every parameter under it joins that group, the rest the editor's."""
        settings = {
            "editor": (editor_lr, weight_decay),
            ROTATION_GROUP: (rotation_lr, 0.0),
            MASK_GROUP: (mask_lr, weight_decay),
        }
        group_of: dict[int, str] = {}
        for module in self.modules():  # parents before children: the innermost declaration wins
            declared = getattr(module, "optimizer_group", None)
            if declared is not None:
                if declared not in settings:
                    raise ValueError(
                        f"{type(module).__name__} declares optimizer group {declared!r}: allowed {sorted(settings)}"
                    )
                group_of.update({id(p): declared for p in module.parameters()})
        members: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
        for _, param in self.trainable_named_parameters():
            members[group_of.get(id(param), "editor")].append(param)
        groups = [
            {"name": name, "params": members[name], "lr": lr, "weight_decay": decay}
            for name, (lr, decay) in settings.items()
        ]
        return [g for g in groups if g["params"]]

    def set_progress(self, fraction: float) -> None:
        """Anneal what depends on training progress (the selection's and MaskSelect's temperatures), fraction
        in [0, 1]."""
        fraction = min(max(fraction, 0.0), 1.0)
        start, end = self.config.selection_temperature_start, self.config.selection_temperature_end
        self.selection_temperature = start + (end - start) * fraction
        if isinstance(self.subspace, MaskSelect):
            start, end = self.config.mask_temperature_start, self.config.mask_temperature_end
            self.subspace.set_temperature(start + (end - start) * fraction)

    def _use_triton(self, device: torch.device) -> bool | None:
        """The kernels' switch: None lets each op pick (Triton on CUDA), True/False force it."""
        flag = self.config.use_fused_kernels
        if flag and device.type != "cuda" and not interpreter_active():
            raise ValueError(
                "use_fused_kernels=True needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); use null (auto) or false"
            )
        return flag

    # --- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_states(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad target pass over base and source together -> (B, Tb, N, D), (B, Ts, N, D)."""
        tb, ts = batch.base_input_ids.shape[1], batch.source_input_ids.shape[1]
        width = max(tb, ts)
        ids = torch.cat([left_pad_to(batch.base_input_ids, width), left_pad_to(batch.source_input_ids, width)])
        mask = torch.cat(
            [left_pad_to(batch.base_attention_mask, width), left_pad_to(batch.source_attention_mask, width)]
        )
        states = self.target.hidden_states(ids, mask)  # (2B, T, N, D)
        b = batch.base_input_ids.shape[0]
        return states[:b, width - tb :], states[b:, width - ts :]

    def instruction_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        if self.editor.embed_tokens is not None:
            return self.editor.embed_tokens(ids)
        with torch.no_grad():
            return self.target.embed_tokens(ids)

    def forward(
        self,
        batch: PairBatch | Mapping[str, object],
        mode: str = "soft",
        loss_weights: LossWeights | None = None,
        states: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> HyperDASOutput:
        """One HyperDAS forward on a collated batch (``hyperdas.data.batch.PairBatch``, its fields and shapes).

        Args:
            batch: the collated batch (a dict of its fields is taken too).
            mode: the selection mode (``config.SELECTION_MODES``); a hard mode other than groundtruth patches
                its one-hot selection and passes the soft A's gradient back (straight-through, ``select``),
                the sparsity hinge included.
            loss_weights: per-kind and sparsity weights (default ``LossWeights()``).
            states: the target's (base (B, Tb, N, D), source (B, Ts, N, D)) states of this batch, e.g. from a
                ``hyperdas.state_cache.StateCache``; None runs the no-grad target pass.

        With a bf16/fp16 target the forward runs under autocast to the target's dtype (the trained parts
        keep fp32 masters), unless the caller already enabled autocast.
        """
        batch = PairBatch.from_mapping(batch)
        with self.precision_context(batch.base_input_ids.device):
            encoded = self.encode(batch, states)
            selection = self.select(batch, encoded, mode)
            logits = self.intervene(batch, encoded, selection)
            penalty = sparsity_penalty(selection)
            weights = loss_weights or LossWeights()
            ce = loss = None
            if batch.has_labels:
                ce = weighted_label_loss(logits, batch.label_ids, batch.is_causal, weights)
                loss = ce + weights.sparsity * penalty
            return HyperDASOutput(loss, ce, penalty, logits, selection)

    def precision_context(self, device: torch.device):
        """The one autocast of a forward: to ``compute_dtype`` if set, else to a bf16/fp16 target's dtype
        (trained parts stay fp32 masters); nothing if the caller already enabled autocast."""
        return precision_context(self.target.dtype, device, self.compute_dtype)

    def check_attributes(self, attributes) -> None:
        """Refuse attributes the model was not trained on (``config.trained_attributes``; None: no record)."""
        known = self.config.trained_attributes
        unseen = sorted(set(attributes) - set(known)) if known is not None else []
        if unseen:
            raise ValueError(
                f"this model was trained to localise {', '.join(known)}; the batch asks for {', '.join(unseen)}, "
                "which its editor never saw in an instruction (it would answer with a guess). Evaluate it on its "
                "own attributes, or train one that includes these"
            )

    def attribute_index(self, batch: PairBatch, device: torch.device) -> torch.Tensor | None:
        """Each example's row in the per-attribute bases (B,) long, or None when the basis is shared."""
        if not self.config.basis_per_attribute:
            return None
        names = self.config.basis_attributes
        if batch.attribute is None:
            raise ValueError(
                f"this model keeps one basis per attribute ({', '.join(names)}): the batch must say each "
                "example's attribute (PairBatch.attribute)"
            )
        unknown = sorted(set(batch.attribute) - set(names))
        if unknown:
            raise ValueError(
                f"this model keeps bases for {', '.join(names)}; the batch asks for {', '.join(unknown)}, which has "
                "none"
            )
        return torch.tensor([names.index(a) for a in batch.attribute], dtype=torch.long, device=device)

    def encode(self, batch: PairBatch, states: tuple[torch.Tensor, torch.Tensor] | None = None) -> Encoded:
        """Everything of a step that does not depend on the selection mode: states, encoding, soft A, basis W."""
        if batch.attribute is not None:
            self.check_attributes(batch.attribute)
        k = self.config.intervention_layer
        base_states, source_states = states if states is not None else self.target_states(batch)
        if base_states.shape[2] != self.target.num_states or source_states.shape[2] != self.target.num_states:
            raise ValueError(
                f"states with {base_states.shape[2]} / {source_states.shape[2]} layers given; the editor reads all "
                f"{self.target.num_states} of the target's (a cache of some layers only cannot feed HyperDAS)"
            )
        base_mask = batch.base_intervention_mask.bool()
        source_mask = batch.source_intervention_mask.bool()
        if self.config.selectable_base != PositionScope.prefix:
            base_mask = base_mask & batch.entity_mask("base", self.config.selectable_base == PositionScope.entity_last)
        if self.config.selectable_source != PositionScope.prefix:
            source_mask = source_mask & batch.entity_mask(
                "source", self.config.selectable_source == PositionScope.entity_last
            )
        source_keys = RunKeys.from_states(source_states, batch.source_attention_mask, source_mask)
        base_keys = RunKeys.from_states(base_states, batch.base_attention_mask, base_mask)
        encoding = self.editor(
            self.instruction_embeddings(batch.instruction_input_ids),
            batch.instruction_attention_mask,
            source_keys,
            base_keys,
        )  # (B, D)
        use_triton = self._use_triton(encoding.device)
        h, s = base_states[:, :, k], source_states[:, :, k]  # (B, Tb, D), (B, Ts, D)
        soft = self.selection_head(
            encoding,
            h,
            s,
            position_ids_from_mask(batch.base_attention_mask),
            position_ids_from_mask(batch.instruction_attention_mask)[:, -1],  # the encoding's token
            self.editor.inv_freq.float(),
            base_mask,
            source_mask,
            use_triton=use_triton,
        )
        soft = sharpen(soft, self.selection_temperature)  # (B, Ts+1, Tb)
        # W: (B, D, r), (D, r) or None (the whole vector)
        basis = self.subspace(encoding, self.attribute_index(batch, encoding.device))
        return Encoded(h, s, encoding, soft, basis, base_mask, source_mask)

    def select(self, batch: PairBatch, encoded: Encoded, mode: str) -> torch.Tensor:
        """The selection ``mode`` makes of the soft A: (B, Ts+1, Tb). A hard mode other than groundtruth is
        straight-through: its one-hot value, the soft A's gradient (``config.train_selection_mode`` trains it)."""
        selection = apply_selection_mode(
            encoded.soft,
            mode,
            encoded.base_mask,
            encoded.source_mask,
            batch.base_entity_last,
            batch.source_entity_last,
        )
        if mode in ("soft", "groundtruth"):  # soft is A itself; groundtruth does not depend on A
            return selection
        return straight_through(selection, encoded.soft)

    def intervene(
        self, batch: PairBatch, encoded: Encoded, selection: torch.Tensor | None, full_vector: bool = False
    ) -> torch.Tensor:
        """Interchange at layer k with ``selection``, then layers k..end -> label logits (B, P, V).

        ``selection`` None runs the target unpatched (the floor); ``full_vector`` patches the whole vector
        (W = I) instead of the learned subspace.
        """
        k = self.config.intervention_layer
        if selection is None:
            patched = encoded.h
        else:
            basis = None if full_vector else encoded.basis
            use_triton = self._use_triton(encoded.h.device)
            patched = interchange(
                encoded.h, encoded.s, selection, basis, position_mask=encoded.base_mask, use_triton=use_triton
            )
        mask, positions = batch.base_attention_mask, batch.label_positions
        if int(positions.max()) < mask.shape[1] - 1:
            # rows are left padded, so the last column holds every row's last label token: it predicts nothing
            # that is read, and causal attention lets no earlier position see it
            patched, mask = patched[:, :-1], mask[:, :-1]
        return self.target.run_from_layer(
            patched, k, mask, positions, checkpoint_layers=self.config.checkpoint_target_layers
        )

    @torch.no_grad()
    def evaluate_batch(
        self,
        batch: PairBatch | Mapping[str, object],
        modes: list[str],
        states: tuple[torch.Tensor, torch.Tensor] | None = None,
        ceiling: bool = True,
    ) -> BatchEvaluation:
        """Label logits of every mode and of the two references, from ONE target pass and ONE editor pass.

        Beside each of ``modes``: ``FLOOR`` (no intervention: the target's own answer) and, unless ``ceiling`` is
        False, ``CEILING`` (the whole vector of the last source entity token patched into the last base entity
        token: how much cause the layer allows, isolation ignored; False saves its patched pass where nobody
        reads it, as in a learning curve). ``analysis`` holds the subspace module's per-example vectors.
        """
        batch = PairBatch.from_mapping(batch)
        with self.precision_context(batch.base_input_ids.device):
            encoded = self.encode(batch, states)
            logits = {FLOOR: self.intervene(batch, encoded, None)}
            selections: dict[str, torch.Tensor | None] = {FLOOR: None}
            groundtruth = self.select(batch, encoded, "groundtruth")
            if ceiling:
                logits[CEILING] = self.intervene(batch, encoded, groundtruth, full_vector=True)
                selections[CEILING] = groundtruth
            for mode in modes:
                selections[mode] = groundtruth if mode == "groundtruth" else self.select(batch, encoded, mode)
                logits[mode] = self.intervene(batch, encoded, selections[mode])
            return BatchEvaluation(logits, selections, self.subspace.describe(encoded.encoding), encoded.basis)

    # --- persistence (the trained parts and the config; never the target's weights) ----------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().contiguous() for n, t in self.state_dict().items() if not n.startswith("target.")}

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the config, the target's identity and the trained weights (safetensors) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        save_file(
            self.trained_state_dict(),
            str(folder / WEIGHTS_FILE),
            metadata={
                "target": self.target.name,
                "hidden_size": str(self.target.hidden_size),
                "num_layers": str(self.target.num_layers),
            },
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, target: FrozenTarget | None = None, **overrides) -> HyperDAS:
        """Load a saved HyperDAS. ``target`` defaults to the one named in the checkpoint's config.

        Raises:
            ValueError: the checkpoint was trained on a target of another shape, or its weights do not fit
                this config.
        """
        folder = Path(folder)
        config = HyperDASConfig.load(folder)
        for key, value in overrides.items():
            setattr(config, key, value)
        weights_path = folder / WEIGHTS_FILE
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path} not found: {folder} is not a HyperDAS checkpoint folder")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights_path), "pt") as handle:
                meta = handle.metadata() or {}
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{weights_path} cannot be read ({err}): the file is damaged; export the model "
                "again (hyperdas train resume=RUN finishes and exports a run)"
            ) from err
        if target is not None:
            saved = (int(meta.get("hidden_size", -1)), int(meta.get("num_layers", -1)))
            if saved != (target.hidden_size, target.num_layers):
                raise ValueError(
                    f"checkpoint {folder} was trained on target {meta.get('target')!r} (hidden size {saved[0]}, "
                    f"{saved[1]} layers); the given target {target.name!r} has hidden size {target.hidden_size} "
                    f"and {target.num_layers} layers"
                )
        model = cls(config, target)
        expected = model.trained_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = sorted(n for n in set(state) & set(expected) if state[n].shape != expected[n].shape)
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"checkpoint {folder} does not match its config: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, wrong shape {wrong_shape[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model
