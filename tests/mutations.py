"""Mutation check: plant one-line bugs the suite must catch, run the tests meant to catch each, restore the file.

    .venv/bin/python tests/mutations.py              # every mutation (about 8 minutes on 2 cores)
    .venv/bin/python tests/mutations.py hinge bids   # only those whose name contains one of the words
    .venv/bin/python tests/mutations.py --list

Each mutation replaces one exact fragment of one source file (it must occur exactly once, so a mutation that no
longer applies is reported, not silently skipped), runs its tests with ``pytest -x -q``, and puts the file back
byte for byte, also on Ctrl-C or SIGTERM. A mutation is "caught" when its tests fail, "missed" when they pass.
Prints one line per mutation and exits 1 if any is missed or no longer applies. Run it on a clean tree (it
refuses files with uncommitted changes) and under flock /tmp/torch.lock on a shared machine.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One planted bug: in ``path`` replace ``old`` (found exactly once) by ``new``; ``tests`` must then fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MODEL_VS_ORACLE = "tests/hyperdas/test_model.py::test_two_pass_step_equals_literal_four_pass"
PER_ATTRIBUTE_VS_ORACLE = (
    "tests/hyperdas/test_model.py::test_one_basis_per_attribute_equals_the_literal_step_with_each_examples_own_basis"
)
ENTITY_SCOPE_VS_ORACLE = (
    "tests/hyperdas/test_model.py::test_an_entity_scoped_step_equals_the_literal_step_on_masks_cut_to_the_entities"
)
EDITOR_DROPOUT_VS_ORACLE = (
    "tests/hyperdas/test_model.py::"
    "test_editor_dropout_drops_every_blocks_output_before_the_residual_and_only_in_training"
)
CURVE_VS_PLAIN_RUN = (
    "tests/train/test_trainer.py::test_a_learning_curve_changes_nothing_about_training_and_scores_the_model_of_its_step"
)

MUTATIONS = (
    Mutation(
        "causal and isolate loss weights swapped",
        "hyperdas/model.py",
        "torch.where(is_causal.bool(), weights.causal, weights.isolate)",
        "torch.where(is_causal.bool(), weights.isolate, weights.causal)",
        ("tests/hyperdas/test_losses.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "the reference's discontinuous sparsity term instead of the hinge",
        "hyperdas/model.py",
        "return F.relu(taken - 1.0).sum(dim=1).mean()",
        "return torch.where(taken > 1.0, taken, 0.0).sum(dim=1).mean()",
        ("tests/hyperdas/test_losses.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "sparsity penalty counts the SELF row",
        "hyperdas/model.py",
        "taken = selection[:, :-1].sum(dim=2)",
        "taken = selection.sum(dim=2)",
        ("tests/hyperdas/test_losses.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "padded label tokens counted in the per-example mean",
        "hyperdas/model.py",
        "counts = (label_ids != IGNORE_INDEX).sum(dim=1).clamp_min(1)",
        "counts = torch.full_like(label_ids[:, 0], label_ids.shape[1])",
        ("tests/hyperdas/test_losses.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "bidding_argmax without the bids",
        "hyperdas/selection.py",
        "bids = bids * source_mask[:, :, None]",
        "bids = source_rows * source_mask[:, :, None]",
        ("tests/hyperdas/test_selection.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "global_argmax ignores the source mask",
        "hyperdas/selection.py",
        "pair_ok = source_mask[:, :, None] & base_mask[:, None, :]",
        "pair_ok = base_mask[:, None, :].expand(-1, ts, -1)",
        ("tests/hyperdas/test_selection.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "no L2 normalisation of the editor's keys",
        "hyperdas/editor.py",
        "inv_norm = norm.to(torch.promote_types(norm.dtype, torch.float32)).clamp_min(1e-12).reciprocal()",
        "inv_norm = torch.ones_like(norm, dtype=torch.promote_types(norm.dtype, torch.float32))",
        ("tests/hyperdas/test_editor.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "the editor's key positions without the layer index",
        "hyperdas/editor.py",
        "positions = (token_positions[:, :, None] * n + layer_index).reshape(b, width * n)",
        "positions = (token_positions[:, :, None] * n + 0 * layer_index).reshape(b, width * n)",
        ("tests/hyperdas/test_editor.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "MaskSelect's square root of the mask taken after the sigmoid (NaN gradient where it underflows)",
        "hyperdas/subspace.py",
        "root = torch.exp(0.5 * F.logsigmoid(self._scaled_logits(encoding)))",
        "root = torch.sigmoid(self._scaled_logits(encoding)).sqrt()",
        ("tests/hyperdas/test_subspace.py",),
    ),
    Mutation(
        "the subspace overlap's diagonal counts each example paired with itself",
        "hyperdas/subspace_overlap.py",
        "out[a][b] = (inner - na) / (na * (na - 1)) if na > 1 else None",
        "out[a][b] = inner / (na * na) if na > 1 else None",
        ("tests/hyperdas/test_subspace_overlap.py",),
    ),
    Mutation(
        "ReflectSelect applies only its first reflection when given several",
        "hyperdas/subspace.py",
        "for k in range(1, self.reflections):",
        "for k in range(1, 1):",
        ("tests/hyperdas/test_model.py::test_several_reflections_equal_the_literal_product_of_householder_matrices",),
    ),
    Mutation(
        "per-attribute bases: every example gets the first attribute's basis",
        "hyperdas/subspace.py",
        "return rotation[attribute_index]  # (B, D, r)",
        "return rotation[torch.zeros_like(attribute_index)]  # (B, D, r)",
        (PER_ATTRIBUTE_VS_ORACLE,),
    ),
    Mutation(
        "per-attribute bases: the model's index of an attribute counts from the end",
        "hyperdas/model.py",
        "return torch.tensor([names.index(a) for a in batch.attribute], dtype=torch.long, device=device)",
        "return torch.tensor([-1 - names.index(a) for a in batch.attribute], dtype=torch.long, device=device)",
        (PER_ATTRIBUTE_VS_ORACLE,),
    ),
    Mutation(
        "editor dropout applied after the MLP's residual instead of to its output",
        "hyperdas/editor.py",
        "return x + drop(self.mlp(self.mlp_norm(x)))",
        "return drop(x + self.mlp(self.mlp_norm(x)))",
        (EDITOR_DROPOUT_VS_ORACLE,),
    ),
    Mutation(
        "the selection head's query not rotated (PyTorch path)",
        "kernels/selection_head_reference.py",
        "relative = base_positions - query_positions[:, None]",
        "relative = base_positions",
        ("tests/kernels/test_selection_head.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "the selection head's query not rotated (Triton kernels)",
        "kernels/selection_head.py",
        "cos, sin = _rope_tables(base_positions - query_positions[:, None], inv_freq)",
        "cos, sin = _rope_tables(base_positions, inv_freq)",
        ("tests/kernels/test_selection_head.py",),
    ),
    Mutation(
        "no re-orthonormalisation of R when it starts in float64",
        "hyperdas/subspace.py",
        "q, r = torch.linalg.qr(at_least_fp32(self.weight))",
        "q, r = (self.weight, torch.eye(self.weight.shape[1], dtype=self.weight.dtype)) "
        "if self.weight.dtype == torch.float64 else torch.linalg.qr(at_least_fp32(self.weight))",
        ("tests/hyperdas/test_subspace.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "R rounded to the weights' dtype (bf16 under DeepSpeed)",
        "hyperdas/subspace.py",
        "        return q * signs",
        "        return (q * signs).to(self.weight.dtype)",
        ("tests/hyperdas/test_subspace.py",),
    ),
    Mutation(
        "ReflectSelect's W rounded to the encoding's dtype",
        "hyperdas/subspace.py",
        "return basis[None] - 2.0 * v[:, :, None] * vtr[:, None, :]  # (B, D, r)",
        "return (basis[None] - 2.0 * v[:, :, None] * vtr[:, None, :]).to(encoding.dtype)",
        ("tests/hyperdas/test_subspace.py",),
    ),
    Mutation(
        "MaskSelect's temperature not saved",
        "hyperdas/subspace.py",
        "def get_extra_state(self)",
        "def get_extra_state_unused(self)",
        ("tests/hyperdas/test_subspace.py", "tests/hyperdas/test_model.py"),
    ),
    Mutation(
        "R trained at the editor's lr with decay",
        "hyperdas/subspace.py",
        "optimizer_group = ROTATION_GROUP  # R trains at its own rate",
        "optimizer_group = None  # R trains at its own rate",
        ("tests/hyperdas/test_model.py",),
    ),
    Mutation(
        "MaskSelect's tau never annealed",
        "hyperdas/model.py",
        "self.subspace.set_temperature(start + (end - start) * fraction)",
        "self.subspace.set_temperature(start)",
        ("tests/hyperdas/test_model.py",),
    ),
    Mutation(
        "the selection temperature never applied",
        "hyperdas/model.py",
        "soft = sharpen(soft, self.selection_temperature)",
        "soft = soft",
        ("tests/hyperdas/test_model.py",),
    ),
    Mutation(
        "a hard mode's selection not passed straight through to the soft A",
        "hyperdas/model.py",
        "return straight_through(selection, encoded.soft)",
        "return selection",
        (MODEL_VS_ORACLE,),
    ),
    Mutation(
        "the trainer patching with the soft A whatever train_selection_mode says",
        "train/trainer.py",
        "mode=self.config.model.train_selection_mode,",
        'mode="soft",',
        ("tests/train/test_trainer.py::test_a_hard_train_selection_mode_is_the_mode_every_training_step_patches_with",),
    ),
    Mutation(
        "hyperdas eval --split train scoring the test split",
        "train/evaluate.py",
        "split_rows = getattr(data, split)",
        "split_rows = data.test",
        ("tests/train/test_cli.py::test_eval_of_the_train_split_reads_the_trained_pairs_and_says_so",),
    ),
    Mutation(
        "the evaluation loop reusing its split's name for a batch's statistics (crashed past one batch)",
        "train/evaluate.py",
        "rows = selection_stats(selection.float().cpu(), batch)\n"
        '                    stats[name].extend(r | {"index": i} for i, r in zip(indices, rows, strict=True))',
        "split_rows = selection_stats(selection.float().cpu(), batch)\n"
        '                    stats[name].extend(r | {"index": i} for i, r in zip(indices, split_rows, strict=True))',
        ("tests/train/test_trainer.py::test_run_writes_the_run_folder",),
    ),
    Mutation(
        "the selection temperature never annealed",
        "hyperdas/model.py",
        "self.selection_temperature = start + (end - start) * fraction",
        "self.selection_temperature = end",
        ("tests/hyperdas/test_model.py",),
    ),
    Mutation(
        "the schedule stops short of its end on the last step",
        "train/schedule.py",
        "return StepSchedule(self.lr_scale(step), weights, step / max(self.total_steps - 1, 1))",
        "return StepSchedule(self.lr_scale(step), weights, step / max(self.total_steps, 1))",
        ("tests/train/test_trainer.py", "tests/train/test_schedule.py"),
    ),
    Mutation(
        "sparsity weight on during the warm-up's last step",
        "train/schedule.py",
        "if fraction < loss.sparsity_warmup_fraction:",
        "if fraction < loss.sparsity_warmup_fraction - 0.2:",
        ("tests/train/test_trainer.py", "tests/train/test_schedule.py"),
    ),
    Mutation(
        "no gradient clipping",
        "train/engine.py",
        "norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip)",
        "norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])",
        ("tests/train/test_trainer.py",),
    ),
    Mutation(
        "SIGTERM not turned into a checkpoint",
        "train/trainer.py",
        "SIGNALS = (signal.SIGINT, signal.SIGTERM)",
        "SIGNALS = (signal.SIGINT,)",
        ("tests/train/test_trainer.py",),
    ),
    Mutation(
        "the interchange drops the SELF share",
        "kernels/interchange_reference.py",
        "mixed = torch.bmm(Af[:, :Ts].transpose(1, 2), Sf) + Af[:, Ts, :, None] * hf",
        "mixed = torch.bmm(Af[:, :Ts].transpose(1, 2), Sf)",
        ("tests/kernels/test_interchange.py", MODEL_VS_ORACLE),
    ),
    Mutation(
        "DeepSpeed builds its shm op again (and waits on a stale lock)",
        "train/distributed.py",
        "deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False",
        "SHM_COMM_OP.upper()",
        ("tests/train/test_deepspeed_launch.py::test_joining_builds_no_deepspeed_op_and_ignores_a_stale_build_lock",),
    ),
    Mutation(
        "known prompts checked in padded batches (a bf16 answer then depends on its batch)",
        "hyperdas/data/known.py",
        "equal_length_batches([len(r) + len(lab) for r, lab in zip(rows, labels, strict=True)], batch_size)",
        "equal_length_batches([0] * len(rows), batch_size)",
        ("tests/hyperdas/test_data_known.py",),
    ),
    Mutation(
        "the run's precision not passed to the model's autocast",
        "train/engine.py",
        "model.compute_dtype = torch.bfloat16 if config.uses_bf16(self.device.type) else None",
        "model.compute_dtype = None",
        ("tests/train/test_engine_precision.py",),
    ),
    Mutation(
        "the attention implementation not following the weights to float64",
        "hyperdas/targets.py",
        "        super()._apply(fn, recurse)\n        self._set_attention_kernel()",
        "        super()._apply(fn, recurse)",
        ("tests/hyperdas/test_targets.py",),
    ),
    Mutation(
        "the learning curve scores the test split for both splits",
        "train/learning_curve.py",
        "                split=split,\n",
        '                split="test",\n',
        (CURVE_VS_PLAIN_RUN,),
    ),
    Mutation(
        "checkpoints leave the learning curve out, so a resumed run loses its earlier points",
        "train/trainer.py",
        "self.engine.save(partial, client_state=self.state.__dict__.copy())",
        'self.engine.save(partial, client_state={k: v for k, v in self.state.__dict__.items() if k != "curve"})',
        ("tests/train/test_trainer.py::test_a_resumed_run_continues_its_learning_curve",),
    ),
    Mutation(
        "evaluate_batch runs the ceiling's patched pass even when told not to",
        "hyperdas/model.py",
        "            if ceiling:\n",
        "            if True:\n",
        ("tests/hyperdas/test_evaluate_batch.py",),
    ),
    Mutation(
        "a state cache of some layers runs the layers above them too",
        "hyperdas/state_cache.py",
        "mask.to(device), last_layer=last)",
        "mask.to(device))",
        ("tests/hyperdas/test_state_cache.py",),
    ),
    Mutation(
        "hidden_states ignores last_layer",
        "hyperdas/targets.py",
        "self.layers[start:stop]",
        "self.layers[start:]",
        ("tests/hyperdas/test_state_cache.py",),
    ),
    Mutation(
        "no warning for a bf16 target on a CPU that emulates bf16",
        "hyperdas/targets.py",
        '    if device.type != "cpu" or native_half_precision(dtype, device):\n',
        "    if True:\n",
        ("tests/hyperdas/test_targets.py",),
    ),
    Mutation(
        "model.torch_dtype=auto is bf16 even where the CPU emulates it",
        "hyperdas/targets.py",
        '    return "bfloat16" if native_half_precision(torch.bfloat16, device) else "float32"\n',
        '    return "bfloat16"\n',
        ("tests/hyperdas/test_targets.py", "tests/train/test_run_config.py"),
    ),
    Mutation(
        "the checkout's kernels/ folder shadows the Hugging Face kernels package transformers imports",
        "kernels/__init__.py",
        'if __name__ == "kernels":\n',
        "if False:\n",
        ("tests/kernels/test_top_level_name.py",),
    ),
    Mutation(
        "the selection head left trainable when the positions are given (ZeRO-3 then moves it)",
        "hyperdas/model.py",
        "            self.selection_head.requires_grad_(False)\n",
        "            pass\n",
        (
            "tests/train/test_deepspeed_zero.py::"
            "test_zero3_training_with_the_positions_given_leaves_the_selection_head_as_built",
        ),
    ),
    Mutation(
        "a run with no named device stays on the CPU although a GPU is there",
        "hyperdas/targets.py",
        '    return torch.device("cuda" if torch.cuda.is_available() else "cpu")\n',
        '    return torch.device("cpu")\n',
        ("tests/hyperdas/test_targets.py",),
    ),
    Mutation(
        "the saved run config says auto, so a resume elsewhere may run in another dtype",
        "train/config.py",
        "    config.model.torch_dtype = resolve_run_dtype(config.model.torch_dtype)\n",
        "",
        ("tests/train/test_run_config.py",),
    ),
    Mutation(
        "a model built with torch_dtype=auto saves auto, not the dtype it ran in",
        "hyperdas/model.py",
        '            config.torch_dtype = str(target.dtype).removeprefix("torch.")\n',
        "            pass\n",
        ("tests/hyperdas/test_targets.py",),
    ),
    Mutation(
        "the learning curve pays for the subspace analysis it never shows",
        "train/learning_curve.py",
        "                analysis=False,\n",
        "",
        (CURVE_VS_PLAIN_RUN,),
    ),
    Mutation(
        "the learning curve pays for the ceiling it never shows",
        "train/learning_curve.py",
        "                ceiling=False,\n",
        "",
        (CURVE_VS_PLAIN_RUN,),
    ),
    Mutation(
        "the entity scope leaves out the last entity token",
        "hyperdas/data/batch.py",
        "(index <= last[:, None])",
        "(index < last[:, None])",
        (ENTITY_SCOPE_VS_ORACLE,),
    ),
    Mutation(
        "the last-entity-token scope takes the whole entity",
        "hyperdas/data/batch.py",
        "entity_span_mask(last if last_only else first, last,",
        "entity_span_mask(first, last,",
        (ENTITY_SCOPE_VS_ORACLE,),
    ),
    Mutation(
        "selectable_base=entity (or entity_last) is ignored",
        "hyperdas/model.py",
        '            base_mask = base_mask & batch.entity_mask("base", self.config.selectable_base == '
        "PositionScope.entity_last)\n",
        "            pass\n",
        (ENTITY_SCOPE_VS_ORACLE,),
    ),
    Mutation(
        "selectable_source=entity (or entity_last) is ignored",
        "hyperdas/model.py",
        """            source_mask = source_mask & batch.entity_mask(
                "source", self.config.selectable_source == PositionScope.entity_last
            )
""",
        "            pass\n",
        (ENTITY_SCOPE_VS_ORACLE,),
    ),
)


class _Stop(Exception):
    """SIGTERM arrived: restore the file and stop."""


def _raise_stop(signum, frame):
    raise _Stop


def dirty(paths: set[str]) -> list[str]:
    """Those of ``paths`` with uncommitted changes (a mutation must restore exactly what git has)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--", *sorted(paths)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [line[3:] for line in out.splitlines()]


def run_one(mutation: Mutation) -> str:
    """'caught', 'missed' or 'does not apply' (the fragment is no longer in the file exactly once)."""
    path = REPO / mutation.path
    original = path.read_bytes()
    text = original.decode()
    if text.count(mutation.old) != 1:
        return "does not apply"
    try:
        path.write_text(text.replace(mutation.old, mutation.new))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_bytes(original)
    return "missed" if result.returncode == 0 else "caught"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", help="run only mutations whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.words or any(w.lower() in m.name.lower() for w in args.words)]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.path}; tests: {' '.join(m.tests)}")
        return 0
    changed = dirty({m.path for m in chosen})
    if changed:
        print(f"refusing to mutate files with uncommitted changes: {changed}; commit or stash them first")
        return 2
    signal.signal(signal.SIGTERM, _raise_stop)
    outcomes = []
    try:
        for m in chosen:
            started = time.perf_counter()
            outcome = run_one(m)
            outcomes.append(outcome)
            print(f"{outcome:15s} {time.perf_counter() - started:6.1f} s  {m.name}  ({m.path})", flush=True)
    except (KeyboardInterrupt, _Stop):
        print("interrupted; the file being mutated was restored")
        return 130
    caught = outcomes.count("caught")
    print(f"{caught} of {len(outcomes)} caught")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
