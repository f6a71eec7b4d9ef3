"""The command line refuses bad input with a message naming the value, before any heavy work."""

from __future__ import annotations

import json
import time

import pytest

from hyperdas.train.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "model.intervention_layer=30"], "intervention_layer 30 is out of range for a 30-layer target"),
        (["train", "model.das_dimension=600"], "das_dimension 600 exceeds the target's hidden size 576"),
        (["train", "model.subspace_module=Boundless"], "Invalid value 'Boundless', expected one of"),
        (["train", "eval_modes=[soft,argmax]"], "Invalid value 'argmax'"),
        (["train", "model.target=gpt2-like-folder-that-does-not-exist"], "cannot load target"),
        (["train", "optim.editor_lr=fast"], "config key optim.editor_lr: Value 'fast'"),
        (["train", "no_such_key=1"], "unknown config key(s) ['no_such_key']"),
        (["train", "global_batch_size=7", "micro_batch_size=2"], "micro_batch_size 2 does not divide"),
        (["train", "data.attributes=[]"], "attributes is empty"),
        (["train", "out_dir=/proc/version"], "out_dir /proc/version is a file"),
        (["eval", "--checkpoint", "/nonexistent/run"], "is not a HyperDAS checkpoint folder"),
        (["eval", "--checkpoint", "/nonexistent/run", "--modes", "soft,best"], "unknown mode(s) ['best']"),
        (["eval", "--checkpoint", "/nonexistent/run", "--modes", ""], "--modes '' names no mode"),
        (["eval", "--checkpoint", "/nonexistent/run", "--max-examples", "-5"], "--max-examples must be at least 1"),
        (["eval", "--checkpoint", "/nonexistent/run", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["eval", "--checkpoint", "/r/checkpoints/step_000050"], "is a training checkpoint of the run /r"),
        (["baseline", "--method", "pca"], "baseline method 'pca'; allowed"),
        (["baseline", "--layers", "4,x"], "--layers '4,x': give layer numbers"),
        (["baseline", "--layers", "31"], "layer 31 out of range for a 30-layer target"),
        (["compare", "/nonexistent/run"], "is not a hyperdas run or baseline folder"),
    ],
)
def test_bad_input_is_refused_quickly_with_a_clear_message(argv, message, capsys, smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert time.perf_counter() - start < 30  # refused before data building or training
    assert not (tmp_path / "runs").exists()


def test_compare_refuses_a_json_that_is_not_a_metrics_file(tmp_path, capsys):
    """A run folder's subspace_overlap.json (or any other JSON) is named, not read as results."""
    path = tmp_path / "subspace_overlap.json"
    path.write_text(json.dumps({"Country": {"Country": 0.97, "Continent": 0.95}}))
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a metrics.json" in err and "['Country']" in err, err


def test_eval_reads_a_saved_checkpoint_and_writes_results(smollm2, tmp_path, monkeypatch, capsys):
    from datasets import Dataset

    from hyperdas.config import HyperDASConfig
    from hyperdas.data.collate import Collator
    from hyperdas.data.examples import make_examples
    from hyperdas.model import HyperDAS
    from hyperdas.train import data_source
    from hyperdas.train.data_source import RunData

    HyperDAS(HyperDASConfig(intervention_layer=5, chop_editor_at_layer=1, das_dimension=8), smollm2).save_pretrained(
        tmp_path / "ckpt"
    )
    rows = [r for r in make_examples("city", ["Country", "Continent"], n_per_kind=2, seed=1) if r["split"] == "test"]

    def fake_data(config, target, setup):
        assert target.name == "smollm2-135m"
        return RunData(Dataset.from_list(rows), Dataset.from_list(rows), Collator(target.tokenizer), tmp_path)

    monkeypatch.setattr(data_source, "load_run_data", fake_data)
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--modes", "soft,groundtruth"]) == 0
    out = tmp_path / "ckpt" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"floor", "ceiling", "soft", "groundtruth"}
    assert metrics["soft"]["overall"]["n_causal"] + metrics["soft"]["overall"]["n_isolate"] == len(rows)
    assert "| groundtruth | **overall** |" in capsys.readouterr().out


def test_an_unknown_eval_split_is_refused_naming_the_allowed_ones(capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal, before anything is loaded
        main(["eval", "--checkpoint", "/r", "--split", "dev"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--split: invalid choice: 'dev'" in err and "test" in err and "train" in err


def test_eval_of_the_train_split_reads_the_trained_pairs_and_says_so(smollm2, tmp_path, monkeypatch):
    from datasets import Dataset

    from hyperdas.config import HyperDASConfig
    from hyperdas.data.collate import Collator
    from hyperdas.data.examples import make_examples
    from hyperdas.model import HyperDAS
    from hyperdas.train import data_source
    from hyperdas.train.data_source import RunData

    HyperDAS(HyperDASConfig(intervention_layer=5, chop_editor_at_layer=1, das_dimension=8), smollm2).save_pretrained(
        tmp_path / "ckpt"
    )
    rows = make_examples("city", ["Continent"], n_per_kind=3, seed=1)
    train = [r for r in rows if r["split"] == "train"][:5]  # 5 train rows against 6 test rows
    test = [r for r in rows if r["split"] == "test"]
    assert len(train) != len(test)

    def fake_data(config, target, setup):
        return RunData(Dataset.from_list(train), Dataset.from_list(test), Collator(target.tokenizer), tmp_path)

    monkeypatch.setattr(data_source, "load_run_data", fake_data)
    argv = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--modes", "soft", "--split", "train", "--batch-size", "2"]
    assert main(argv) == 0  # three batches: the split's rows must last the whole loop
    out = tmp_path / "ckpt" / "eval-train"
    overall = json.loads((out / "metrics.json").read_text())["soft"]["overall"]
    assert overall["n_causal"] + overall["n_isolate"] == len(train)
    assert "pairs the model was TRAINED on, not a result" in (out / "report.md").read_text()
    assert not (tmp_path / "ckpt" / "eval").exists()


def test_eval_of_a_runs_model_folder_uses_the_runs_data(smollm2, tmp_path, monkeypatch, capsys):
    from datasets import Dataset

    from hyperdas.config import HyperDASConfig
    from hyperdas.data.collate import Collator
    from hyperdas.data.examples import make_examples
    from hyperdas.model import HyperDAS
    from hyperdas.train import data_source
    from hyperdas.train.config import load_run_config, save_run_config
    from hyperdas.train.data_source import RunData

    run = tmp_path / "run"
    model = HyperDAS(HyperDASConfig(intervention_layer=5, chop_editor_at_layer=1, das_dimension=8), smollm2)
    model.save_pretrained(run / "model")
    save_run_config(
        load_run_config(None, ["seed=7", "data.attributes=[Continent]", f"out_dir={run}"]), run / "run_config.yaml"
    )
    rows = [r for r in make_examples("city", ["Continent"], n_per_kind=2, seed=1) if r["split"] == "test"]
    seen = []

    def fake_data(config, target, setup):
        seen.append((config.seed, config.data.attributes))
        return RunData(Dataset.from_list(rows), Dataset.from_list(rows), Collator(target.tokenizer), tmp_path)

    monkeypatch.setattr(data_source, "load_run_data", fake_data)
    assert main(["eval", "--checkpoint", str(run / "model"), "--modes", "soft"]) == 0
    assert seen == [(7, ["Continent"])]  # the run's own data, not the main job's
    assert (run / "model" / "eval" / "metrics.json").is_file()
