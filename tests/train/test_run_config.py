"""Run configs: every bad value is a one-line error naming the key and what is allowed, before any heavy work."""

from __future__ import annotations

import pytest
import yaml

from hyperdas.config import SelectionMode
from hyperdas.train.config import CONFIG_DIR, load_run_config, resolve_deepspeed_path, save_run_config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.das_dimension=3.5",
            "config key model.das_dimension: Value '3.5' of type 'float' could not be converted to Integer",
        ),
        ("model.intervention_layer=10.5", "config key model.intervention_layer"),
        ("epochs=2.5", "config key epochs: Value '2.5'"),
        ("optim.editor_lr=fast", "config key optim.editor_lr: Value 'fast' of type 'str' could not be converted"),
        ("optim.editor_lr=-1", "optim.editor_lr must be > 0, got -1.0"),
        ("max_steps=0", "max_steps must be >= 1 or null, got 0"),
        ("max_steps=-3", "max_steps must be >= 1 or null, got -3"),
        ("eval_max_examples=0", "eval_max_examples must be >= 1 or null, got 0"),
        ("eval_modes=[]", "eval_modes is empty"),
        ("eval_modes=[soft,argmax]", "config key eval_modes[1]: Invalid value 'argmax', expected one of [soft,"),
        ("data.attributes=[]", "attributes is empty; allowed: 'all' or names from"),
        ("data.attributes=[Continent", "override 'data.attributes=[Continent': the value is not valid YAML"),
        ("data.attributes=[Mayor]", "unknown attribute 'Mayor' for RAVEL domain 'city'"),
        ("data.domain=town", "unknown RAVEL domain 'town'"),
        ("model.subspace_module=Boundless", "Invalid value 'Boundless', expected one of [ReflectSelect, MaskSelect"),
        (
            "model.num_editng_heads=3",
            "unknown config key(s) ['model.num_editng_heads']; did you mean model.num_editing_heads?",
        ),
        ("no_such_key=1", "unknown config key(s) ['no_such_key']"),
        ("state_cache=ram", "config key state_cache: Invalid value 'ram', expected one of [auto, memory, disk, off]"),
        ("model.use_fused_kernels=true", "model.use_fused_kernels=true needs a CUDA device"),
        ("global_batch_size=0", "global_batch_size must be >= 1"),
        ("curve_every=-5", "curve_every must be >= 0 (0: no learning curve), got -5"),
        ("curve_examples=0", "curve_examples must be >= 1, got 0"),
        ("epochs", "override 'epochs' is not of the form key=value"),
    ],
)
def test_a_bad_override_names_the_key_and_what_is_allowed(override, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite sets it for the kernels on CPU
    with pytest.raises(ValueError) as caught:
        load_run_config(None, [override])
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bare_name_for_a_list_key_is_a_one_element_list():
    config = load_run_config(None, ["data.attributes=Continent", "data.isolate_attributes=Country", "eval_modes=soft"])
    assert config.data.attributes == ["Continent"] and config.data.isolate_attributes == ["Country"]
    assert config.eval_modes == [SelectionMode.soft]


def test_broken_yaml_files_are_named(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [intervention_layer: 3\n")
    with pytest.raises(ValueError, match=f"run config {broken} is not valid YAML"):
        load_run_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs: 3\n")
    with pytest.raises(ValueError, match=f"run config {listed} must be a mapping of keys.*got a YAML list"):
        load_run_config(listed)
    with pytest.raises(FileNotFoundError, match="run config .*missing.yaml not found"):
        load_run_config(tmp_path / "missing.yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text("epochs: [")
    with pytest.raises(ValueError, match=f"run config {run / 'run_config.yaml'} is not valid YAML"):
        load_run_config(None, [f"resume={run}"])


def test_resume_applies_only_what_does_not_change_the_training_so_far(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_run_config(load_run_config(None, ["epochs=3", f"out_dir={run}"]), run / "run_config.yaml")
    resumed = load_run_config(None, [f"resume={run}", "max_steps=34", "log_every=5"])
    assert (resumed.max_steps, resumed.log_every, resumed.epochs) == (34, 5, 3)
    assert resumed.out_dir == str(run) and resumed.resume == str(run)
    with pytest.raises(ValueError, match=r"cannot change \['model.intervention_layer', 'optim.editor_lr'\]"):
        load_run_config(None, [f"resume={run}", "optim.editor_lr=1e-3", "model.intervention_layer=5"])
    with pytest.raises(ValueError, match="drop --config"):
        load_run_config(CONFIG_DIR / "llama3_8b_city.yaml", [f"resume={run}"])
    with pytest.raises(FileNotFoundError, match="is not a hyperdas run folder"):
        load_run_config(None, [f"resume={tmp_path / 'nothing'}"])


def test_a_deepspeed_path_is_found_from_any_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository
    config = load_run_config(CONFIG_DIR / "llama3_8b_city.yaml")
    assert config.deepspeed == str((CONFIG_DIR / "zero3.json").resolve())
    beside = tmp_path / "mine.json"
    beside.write_text("{}")
    assert resolve_deepspeed_path("mine.json", tmp_path / "run.yaml") == str(beside.resolve())
    with pytest.raises(FileNotFoundError, match=r"DeepSpeed config 'nope.json' not found \(looked at"):
        resolve_deepspeed_path("nope.json", tmp_path / "run.yaml")


def test_the_saved_run_config_loads_back_the_same(tmp_path):
    config = load_run_config(None, ["model.subspace_module=MaskSelect", "eval_modes=[soft,groundtruth]"])
    save_run_config(config, tmp_path / "run_config.yaml")
    assert yaml.safe_load((tmp_path / "run_config.yaml").read_text())["model"]["subspace_module"] == "MaskSelect"
    assert load_run_config(tmp_path / "run_config.yaml") == config


def test_train_help_lists_every_key_and_each_domains_attributes(capsys):
    from hyperdas.train.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for line in (
        "model.intervention_layer: int = 10",
        "state_cache: auto|memory|disk|off = auto",
        "verb: Definition, Singular, Past Tense, Pronunciation",
        "resume=DIR continues DIR",
    ):
        assert line in text


def test_the_data_seed_follows_the_run_seed_unless_set():
    """data.seed unset: the pairing is seeded by the run's seed; set, the training seed varies on fixed data."""
    assert load_run_config(overrides=["seed=3"]).data_request().seed == 3
    fixed = load_run_config(overrides=["seed=3", "data.seed=0"])
    assert (fixed.seed, fixed.data_request().seed) == (3, 0)
    assert fixed.data_request().key() == load_run_config().data_request().key()  # the main job's data, reused


@pytest.mark.parametrize("native", [True, False])
def test_the_main_job_picks_its_target_dtype_for_the_machine_and_saves_the_one_it_picked(native, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = "bfloat16" if native else "float32"
    config = load_run_config()  # the shipped main job says torch_dtype: auto
    assert config.model.torch_dtype == expected
    assert config.data_request().target_dtype == expected  # the known prompts are checked in that dtype
    save_run_config(config, tmp_path / "run_config.yaml")
    assert yaml.safe_load((tmp_path / "run_config.yaml").read_text())["model"]["torch_dtype"] == expected
    # a run folder moved to the other kind of machine resumes in the dtype it was trained in
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: not native)
    assert load_run_config(None, [f"resume={tmp_path}"]).model.torch_dtype == expected
    assert load_run_config(None, ["model.torch_dtype=float32"]).model.torch_dtype == "float32"
