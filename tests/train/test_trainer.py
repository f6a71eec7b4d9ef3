"""The training loop: data order, resume after a checkpoint or Ctrl-C, evaluation and the run folder."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from datasets import Dataset

from hyperdas.data.collate import Collator
from hyperdas.data.examples import make_examples
from hyperdas.model import HyperDAS
from hyperdas.subspace import MaskSelect
from hyperdas.targets import build_random_target
from hyperdas.testing import tiny_llama_config
from hyperdas.train import trainer as trainer_module
from hyperdas.train.config import LossConfig, OptimConfig, RunConfig, load_run_config
from hyperdas.train.data_source import RunData
from hyperdas.train.engine import PlainEngine
from hyperdas.train.schedule import sparsity_weight_at
from hyperdas.train.trainer import Trainer, process_slices, step_batches


class TinySetup:
    """Single process on a random 3-layer Llama with SmolLM2's tokenizer (filtering would keep nothing)."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def check(self, config: RunConfig) -> None:
        """A random-weight target has no config.json to check against; HyperDAS checks it when built."""

    def build(self, config: RunConfig):
        target = build_random_target(tiny_llama_config(len(self.tokenizer)), tokenizer=self.tokenizer, seed=0)
        target.name = config.model.target
        torch.manual_seed(config.seed)
        return PlainEngine(HyperDAS(config.model, target), config)

    def barrier(self):
        return None


@pytest.fixture()
def tiny_run(monkeypatch, tmp_path, smollm2):
    """A run config and setup for the tiny target, with unfiltered RAVEL examples as its data."""
    rows = make_examples("city", ["Country", "Continent"], n_per_kind=6, seed=0)
    train = Dataset.from_list([r for r in rows if r["split"] == "train"])
    test = Dataset.from_list([r for r in rows if r["split"] == "test"])

    def fake_data(config, target, setup):
        return RunData(train, test, Collator(target.tokenizer), tmp_path / "data")

    monkeypatch.setattr(trainer_module, "load_run_data", fake_data)
    config = load_run_config(
        None,
        [
            "model.target=tiny",
            "model.intervention_layer=1",
            "model.das_dimension=4",
            "model.chop_editor_at_layer=1",
            "model.num_editing_heads=5",
            "model.torch_dtype=float32",
            "global_batch_size=4",
            "micro_batch_size=2",
            "max_steps=5",
            "save_every=2",
            "eval_batch_size=3",  # several evaluation batches: state must last the loop
            "eval_modes=[soft,column_argmax,groundtruth]",
            "heatmap_examples=2",
            f"out_dir={tmp_path / 'run'}",
            "optim.editor_lr=1e-3",
        ],
    )
    return config, TinySetup(smollm2.tokenizer)


def _losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_step_batches_are_a_seeded_permutation_and_processes_split_them():
    epoch0 = step_batches(23, 4, seed=1, epoch=0)
    assert len(epoch0) == 5 and all(len(b) == 4 for b in epoch0)
    flat = [i for b in epoch0 for i in b]
    assert len(set(flat)) == 20 and set(flat) <= set(range(23))
    assert epoch0 == step_batches(23, 4, seed=1, epoch=0)
    assert epoch0 != step_batches(23, 4, seed=1, epoch=1)
    lengths = [(7 * i) % 11 for i in range(23)]
    grouped = step_batches(23, 4, seed=1, epoch=0, lengths=lengths)
    assert sorted(map(sorted, grouped)) != sorted(map(sorted, epoch0)) and len(grouped) == 5
    assert sorted(i for b in grouped for i in b) == sorted(flat)  # the same examples, regrouped
    for b in grouped:
        assert [i % 4 for i in b] == [0, 1, 2, 3]  # still one example of every shard, in shard order
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped]
    unsorted = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch0]
    assert sum(spread) < sum(unsorted)
    batch = list(range(100, 112))
    parts = [process_slices(batch, rank, 3, 2) for rank in range(3)]
    assert all(len(p) == 2 and all(len(m) == 2 for m in p) for p in parts)
    assert sorted(i for p in parts for m in p for i in m) == batch


def _train_only(config, setup) -> Trainer:
    trainer = Trainer(config, setup)
    trainer.prepare()
    trainer.train()
    return trainer


def test_run_writes_the_run_folder(tiny_run):
    config, setup = tiny_run
    trainer = Trainer(config, setup)
    metrics = trainer.run()
    out = trainer.out_dir
    for name in (
        "metrics.json",
        "report.md",
        "selection_heatmap.png",
        "run_config.yaml",
        "train_log.jsonl",
        "selection_positions.png",
        "subspace_pca.png",
        "subspace_analysis.safetensors",
    ):
        assert (out / name).is_file(), name
    from safetensors import safe_open

    with safe_open(str(out / "subspace_analysis.safetensors"), "pt") as handle:
        reflections, labels = handle.get_tensor("reflection"), json.loads(handle.metadata()["labels"])
    assert reflections.shape == (len(labels), 40) and len(labels) == len(set(r["index"] for r in labels)) > 0
    torch.testing.assert_close(reflections.norm(dim=1), torch.ones(len(labels)))
    assert (out / "model" / "hyperdas.safetensors").is_file()
    assert set(metrics) == {"floor", "ceiling", "soft", "column_argmax", "groundtruth"}
    assert set(metrics["soft"]["selection"]["overall"]) >= {"moved", "base_entity_share", "source_entity_share"}
    assert "selection" not in metrics["floor"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    report = (out / "report.md").read_text()
    assert "| soft | **overall** |" in report and "| floor | **overall** |" in report
    assert "- soft: disentangle" in report and "points over the floor" in report
    assert "| soft |" in report.split("By position class")[1] and "![pca](subspace_pca.png)" in report
    overlap = json.loads((out / "subspace_overlap.json").read_text())
    attributes = sorted({r["attribute"] for r in labels})
    assert sorted(overlap) == attributes and all(sorted(row) == attributes for row in overlap.values())
    r = config.model.das_dimension  # ReflectSelect's subspaces share r − 2 of r dimensions at least
    values = [v for row in overlap.values() for v in row.values() if v is not None]
    assert values and all((r - 2) / r - 1e-6 <= v <= 1 + 1e-6 for v in values)
    assert "| attribute | " + " | ".join(attributes) + " |" in report
    assert len(_losses(out)) == 5
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000004", "step_000005"]  # the last two are kept
    trained = sorted(set(trainer.data.train["attribute"]))
    assert (
        len(trained) >= 1
        and HyperDAS.from_pretrained(out / "model", target=trainer.engine.model.target).config.trained_attributes
        == trained
    )


def _crash_in_step_4(config, setup, monkeypatch) -> None:
    """Train ``config`` until its 4th step raises (a simulated crash); the real step is put back after."""
    real_step = Trainer._one_step

    def crash_in_step_4(self, indices):
        if self.state.step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, indices)

    monkeypatch.setattr(Trainer, "_one_step", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train_only(config, setup)
    monkeypatch.setattr(Trainer, "_one_step", real_step)


def test_a_crash_loses_only_the_steps_since_the_last_checkpoint(tiny_run, tmp_path, monkeypatch):
    config, setup = tiny_run
    uninterrupted = _losses(_train_only(config, setup).out_dir)

    config.out_dir = str(tmp_path / "crashed")
    _crash_in_step_4(config, setup, monkeypatch)
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text().strip() == "step_000002"

    saved = tmp_path / "crashed" / "run_config.yaml"
    resumed = Trainer(load_run_config(saved, [f"resume={tmp_path / 'crashed'}"]), setup)
    resumed.prepare()
    assert resumed.state.step == 2
    resumed.train()
    torch.testing.assert_close(_losses(tmp_path / "crashed"), uninterrupted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resume_matches(tiny_run, tmp_path, monkeypatch, signum):
    config, setup = tiny_run
    uninterrupted = _losses(_train_only(config, setup).out_dir)

    config.out_dir = str(tmp_path / "interrupted")
    trainer = Trainer(config, setup)
    trainer.prepare()
    real_step = Trainer._one_step

    def step_then_interrupt(self, indices):
        record = real_step(self, indices)
        if self.state.step == 2:  # the 3rd step is running: Ctrl-C (or a scheduler's SIGTERM) arrives during it
            os.kill(os.getpid(), signum)
        return record

    monkeypatch.setattr(Trainer, "_one_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved at step 3"):
        trainer.train()
    monkeypatch.setattr(Trainer, "_one_step", real_step)
    assert (tmp_path / "interrupted" / "checkpoints" / "latest").read_text().strip() == "step_000003"

    resumed = Trainer(
        load_run_config(tmp_path / "interrupted" / "run_config.yaml", [f"resume={tmp_path / 'interrupted'}"]), setup
    )
    resumed.prepare()
    resumed.train()
    torch.testing.assert_close(_losses(tmp_path / "interrupted"), uninterrupted, rtol=1e-5, atol=1e-6)


def test_too_few_examples_for_one_batch_is_a_clear_error(tiny_run):
    config, setup = tiny_run
    config.global_batch_size = 4096
    trainer = Trainer(config, setup)
    trainer.prepare()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        trainer.train()


def test_resume_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a hyperdas run folder"):
        Trainer(RunConfig(resume=str(tmp_path)))


def test_a_used_out_dir_is_refused_unless_resumed_or_overwritten(tiny_run):
    config, setup = tiny_run
    _train_only(config, setup)
    with pytest.raises(ValueError, match="holds an earlier run.*resume=.*overwrite=true"):
        Trainer(config, setup)
    config.overwrite = True
    trainer = _train_only(config, setup)
    checkpoints = sorted(p.name for p in (trainer.out_dir / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000004", "step_000005"] and len(_losses(trainer.out_dir)) == 5


def _resumed(folder, setup) -> Trainer:
    trainer = Trainer(load_run_config(None, [f"resume={folder}"]), setup)
    trainer.prepare()
    return trainer


def test_a_missing_or_damaged_latest_checkpoint_resumes_from_the_one_before(tiny_run, tmp_path, capsys):
    config, setup = tiny_run
    reference = _losses(_train_only(config, setup).out_dir)
    config.out_dir = str(tmp_path / "damaged")
    config.max_steps = 4
    _train_only(config, setup)  # checkpoints at steps 2 and 4; latest = step_000004
    folder = tmp_path / "damaged" / "checkpoints"
    state = folder / "step_000004" / "engine_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    resumed = _resumed(tmp_path / "damaged", setup)
    assert resumed.state.step == 2
    assert "step_000004 cannot be loaded" in capsys.readouterr().out
    resumed.config.max_steps = 5
    resumed.train()
    torch.testing.assert_close(_losses(tmp_path / "damaged"), reference, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_000004", "step_000005"]

    import shutil

    shutil.rmtree(folder / "step_000005")  # latest now names a missing folder
    resumed = _resumed(tmp_path / "damaged", setup)
    assert resumed.state.step == 4
    assert "names step_000005, which is missing" in capsys.readouterr().out


def test_resume_without_any_checkpoint_is_a_clear_error(tiny_run, setup_free_run_folder):
    _, setup = tiny_run
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        _resumed(setup_free_run_folder, setup)


@pytest.fixture
def setup_free_run_folder(tmp_path, tiny_run):
    config, _ = tiny_run
    folder = tmp_path / "empty_run"
    folder.mkdir()
    from hyperdas.train.config import save_run_config

    config.out_dir = str(folder)
    save_run_config(config, folder / "run_config.yaml")
    return folder


def test_ctrl_c_during_evaluation_says_where_the_model_is(tiny_run, monkeypatch, capsys):
    from hyperdas.train import train_command

    config, setup = tiny_run

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "evaluate", interrupt)
    monkeypatch.setattr(trainer_module, "PlainSetup", lambda: setup)
    monkeypatch.setattr(train_command, "load_run_config", lambda path, overrides: config)
    args = train_command.argparse.Namespace(config=None, overrides=[])
    assert train_command.run(args) == 130
    err = capsys.readouterr().err
    assert "interrupted after training, during evaluation" in err and "hyperdas eval --checkpoint" in err


def test_optimizer_and_loss_defaults_are_the_documented_ones():
    """README's configuration table (the embedded default's editor lr; the rest as METHOD.md)."""
    optim, loss = OptimConfig(), LossConfig()
    assert (optim.editor_lr, optim.rotation_lr, optim.mask_lr) == (5e-4, 1e-3, 1e-2)
    assert (optim.weight_decay, optim.grad_clip, optim.warmup_fraction) == (0.01, 4.0, 0.0)
    assert (loss.causal_loss_weight, loss.iso_loss_weight) == (3.5, 0.5)
    assert (loss.sparsity_weight_start, loss.sparsity_weight_end, loss.sparsity_warmup_fraction) == (0.15, 1.5, 0.5)


def test_sparsity_weight_is_zero_for_half_the_steps_then_ramps_linearly(tiny_run):
    loss = LossConfig()
    for fraction, weight in [(0.0, 0.0), (0.49, 0.0), (0.5, 0.15), (0.75, 0.825), (1.0, 1.5)]:
        assert sparsity_weight_at(loss, fraction) == pytest.approx(weight, rel=1e-12), fraction
    config, setup = tiny_run
    trainer = Trainer(config, setup)
    trainer.prepare()
    assert trainer.total_steps == 5
    weights = [trainer.schedule.at(step).loss_weights for step in range(5)]
    assert [w.sparsity for w in weights] == pytest.approx([0.0, 0.0, 0.0, 0.15 + 1.35 / 5, 0.15 + 1.35 * 3 / 5])
    assert all((w.causal, w.isolate) == (3.5, 0.5) for w in weights)


def test_mask_select_anneals_over_the_steps_and_is_saved_at_the_end(tiny_run, monkeypatch, tmp_path):
    """τ goes linearly from 50 at the first step to 0.1 at the last, and the export carries 0.1."""
    config, setup = tiny_run
    config.model.subspace_module = "MaskSelect"
    seen = []
    real_forward = MaskSelect.forward

    def recording(self, encoding, attribute_index=None):
        seen.append(self.temperature)
        return real_forward(self, encoding, attribute_index)

    monkeypatch.setattr(MaskSelect, "forward", recording)
    trainer = _train_only(config, setup)
    expected = [50.0 + (0.1 - 50.0) * step / 4 for step in range(5) for _micro in range(2)]
    assert seen == pytest.approx(expected, rel=1e-12)
    trainer.engine.export_trained(tmp_path / "export")
    loaded = HyperDAS.from_pretrained(tmp_path / "export", target=trainer.engine.model.target)
    assert loaded.subspace.temperature == pytest.approx(0.1, rel=1e-12)


def test_the_engine_clips_the_gradient_norm_to_grad_clip(tiny_run, monkeypatch):
    """The optimizer sees gradients of norm grad_clip (4.0) when they are larger; step() reports the norm before."""
    config, setup = tiny_run
    config.micro_batch_size = None  # one micro-batch per step
    trainer = Trainer(config, setup)
    trainer.prepare()
    engine = trainer.engine
    groups = {g["name"]: (g["lr"], g["weight_decay"]) for g in engine.optimizer.param_groups}
    assert groups == {"editor": (1e-3, 0.01), "rotation": (1e-3, 0.0)}  # the run's editor lr; R without decay
    seen = []

    def recording_step(*args, **kwargs):
        seen.append(float(torch.nn.utils.get_total_norm([p.grad for p in engine.params if p.grad is not None])))

    monkeypatch.setattr(engine.optimizer, "step", recording_step)
    batch = trainer.data.collate(trainer.data.train, list(range(4)))
    for scale in (1e4, 1e-6):
        out = engine.forward(batch)
        engine.backward(out.loss * scale)
        before = engine.step()
        if before > 4.0:
            assert seen[-1] == pytest.approx(4.0, rel=1e-5)
        else:
            assert seen[-1] == pytest.approx(before, rel=1e-6)
    assert seen[0] == pytest.approx(4.0, rel=1e-5) and seen[1] < 4.0


def test_a_hard_train_selection_mode_is_the_mode_every_training_step_patches_with(tiny_run, monkeypatch):
    """train_selection_mode=bidding_argmax: each micro-batch's forward selects in that mode (straight through),
    and the head still learns (its weights move, which the hard selection alone could not make them do)."""
    config, setup = tiny_run
    config.model.train_selection_mode = "bidding_argmax"
    seen = []
    real_select = HyperDAS.select

    def recording(self, batch, encoded, mode):
        seen.append((mode, torch.is_grad_enabled()))
        return real_select(self, batch, encoded, mode)

    monkeypatch.setattr(HyperDAS, "select", recording)
    trainer = Trainer(config, setup)
    trainer.prepare()
    head = trainer.engine.model.selection_head.query_proj.weight
    before = head.detach().clone()
    trainer.train()
    assert seen == [("bidding_argmax", True)] * (5 * 2)  # 5 steps of 2 micro-batches
    assert not torch.equal(head.detach(), before)


def test_groundtruth_training_patches_the_entity_tokens_and_trains_the_subspace_but_not_the_head(tiny_run, monkeypatch):
    """train_selection_mode=groundtruth (positions given, the WHICH-without-WHERE ablation): every step patches
    last entity token <- last entity token, the editor and the subspace learn, the selection head cannot."""
    config, setup = tiny_run
    config.model.train_selection_mode = "groundtruth"
    patched = []
    real_intervene = HyperDAS.intervene

    def recording(self, batch, encoded, selection, full_vector=False):
        if torch.is_grad_enabled():
            patched.append(
                (selection.detach().clone(), batch.base_entity_last.clone(), batch.source_entity_last.clone())
            )
        return real_intervene(self, batch, encoded, selection, full_vector)

    monkeypatch.setattr(HyperDAS, "intervene", recording)
    trainer = Trainer(config, setup)
    trainer.prepare()
    model = trainer.engine.model
    head = {n: p.detach().clone() for n, p in model.selection_head.named_parameters()}
    subspace = {n: p.detach().clone() for n, p in model.subspace.named_parameters()}
    trainer.train()
    assert len(patched) == 5 * 2  # 5 steps of 2 micro-batches, each patched once with grad
    for selection, base_last, source_last in patched:  # (B, Ts+1, Tb): source last entity token -> base last
        rows = torch.arange(len(base_last))
        expected = torch.zeros_like(selection)
        expected[:, -1] = 1.0  # every other base position keeps itself (the SELF row)
        expected[rows, -1, base_last] = 0.0
        expected[rows, source_last, base_last] = 1.0
        assert torch.equal(selection, expected)
    assert all(torch.equal(p.detach(), head[n]) for n, p in model.selection_head.named_parameters())
    assert any(not torch.equal(p.detach(), subspace[n]) for n, p in model.subspace.named_parameters())


def test_per_attribute_bases_are_built_for_the_runs_attributes_and_train_only_where_asked(tiny_run, tmp_path):
    """model.basis_per_attribute=true: the trainer names the bases after data.attributes before it builds the
    model (Country, Continent, Language); the data trains Country and Continent only, so Language's basis stays at
    its initialisation (the rotation group has no weight decay) while theirs move; the export keeps the names.
    Bases named explicitly without one of the data's attributes are refused before training."""
    config, setup = tiny_run
    config.model.basis_per_attribute = True
    trainer = Trainer(config, setup)
    trainer.prepare()
    model = trainer.engine.model
    assert model.config.basis_attributes == ["Continent", "Country", "Language"]
    assert model.config.trained_attributes == ["Continent", "Country"]
    start = model.subspace.rotation.weight.detach().clone()
    trainer.train()
    moved = (model.subspace.rotation.weight.detach() - start).flatten(1).abs().amax(dim=1)
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == 0
    trainer.engine.export_trained(tmp_path / "export")
    loaded = HyperDAS.from_pretrained(tmp_path / "export", target=model.target)
    assert loaded.config.basis_attributes == ["Continent", "Country", "Language"]
    config.model.basis_attributes = ["Country"]
    config.out_dir = str(tmp_path / "run2")
    with pytest.raises(ValueError, match=r"basis_attributes \['Country'\] has no basis for \['Continent'\]"):
        Trainer(config, setup).prepare()


def _trained_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.engine.model.trained_state_dict().items()}


def test_a_learning_curve_changes_nothing_about_training_and_scores_the_model_of_its_step(
    tiny_run, tmp_path, monkeypatch
):
    from hyperdas.train import learning_curve
    from hyperdas.train.evaluate import evaluate
    from hyperdas.train.learning_curve import read_curve

    asked = []  # (split, max_examples, modes, ceiling, analysis) of every evaluation a point makes
    scored = []  # the entries each of those evaluations returned, and whether it collected an analysis

    def recording_evaluate(engine, data, modes, batch_size, **kwargs):
        asked.append(
            (
                kwargs["split"],
                kwargs["max_examples"],
                tuple(modes),
                kwargs.get("ceiling", True),
                kwargs.get("analysis", True),
            )
        )
        result = evaluate(engine, data, modes, batch_size, **kwargs)
        scored.append((sorted(result.metrics), result.analysis is not None))
        return result

    monkeypatch.setattr(learning_curve, "evaluate", recording_evaluate)

    config, setup = tiny_run
    plain = _train_only(config, setup)
    plain_log = [json.loads(line) for line in (plain.out_dir / "train_log.jsonl").read_text().splitlines()]
    plain_weights = _trained_weights(plain)
    assert not (plain.out_dir / "learning_curve.jsonl").exists()

    config.out_dir, config.curve_every, config.curve_examples = str(tmp_path / "curved"), 2, 7
    curved = Trainer(config, setup)
    curved.run()
    out = curved.out_dir
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # bitwise: every logged value but the clock, and every trained weight
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in log] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in plain_log
    ]
    weights = _trained_weights(curved)
    assert weights.keys() == plain_weights.keys()
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)

    points = read_curve(out)
    assert [p["step"] for p in points] == [0, 2, 4, 5]  # the first step, every curve_every, the last
    # each point scores both splits, and skips the ceiling's patched pass and the subspace analysis (vectors and
    # their (D, D) overlap sums): the curve never shows them
    assert asked == [("train", 7, ("soft",), False, False), ("test", 7, ("soft",), False, False)] * 4
    assert scored == [(["floor", "soft"], False)] * 8
    assert points == curved.state.curve
    for p in points:
        for split in ("train", "test"):
            assert p[split]["pairs"] == min(7, len(getattr(curved.data, split)))
            soft = p[split]["soft"]
            assert soft["disentangle"] == pytest.approx((soft["cause"] + soft["isolate"]) / 2)
    # the floor does not move with training: the same pairs, no intervention
    assert all(p[s]["floor"] == points[0][s]["floor"] for p in points for s in ("train", "test"))
    # the last point is the exported model's score on the same pairs, loaded afresh from model/
    exported = PlainEngine(HyperDAS.from_pretrained(out / "model", target=curved.engine.model.target), config)
    for split in ("train", "test"):
        fresh = evaluate(exported, curved.data, ["soft"], 3, max_examples=7, heatmap_examples=0, seed=0, split=split)
        overall = fresh.metrics["soft"]["overall"]
        assert {k: overall[k] for k in ("cause", "isolate", "disentangle")} == points[-1][split]["soft"]
    report = (out / "report.md").read_text()
    assert "## Learning curve" in report and "![curve](learning_curve.png)" in report
    assert len([line for line in report.split("## Learning curve")[1].splitlines() if line.startswith("| 5 |")]) == 1
    assert (out / "learning_curve.png").is_file()


def test_a_resumed_run_continues_its_learning_curve(tiny_run, tmp_path, monkeypatch):
    from hyperdas.train.learning_curve import read_curve

    config, setup = tiny_run
    config.curve_every, config.curve_examples = 2, 5
    whole = read_curve(_train_only(config, setup).out_dir)

    config.out_dir = str(tmp_path / "crashed")
    _crash_in_step_4(config, setup, monkeypatch)
    assert [p["step"] for p in read_curve(tmp_path / "crashed")] == [0, 2]  # what the step-2 checkpoint holds

    resumed = Trainer(
        load_run_config(tmp_path / "crashed" / "run_config.yaml", [f"resume={tmp_path / 'crashed'}"]), setup
    )
    resumed.prepare()
    resumed.train()
    again = read_curve(tmp_path / "crashed")
    assert [p["step"] for p in again] == [0, 2, 4, 5]
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in again]
    assert strip == [{k: v for k, v in p.items() if k != "seconds"} for p in whole]
