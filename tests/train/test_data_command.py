"""`hyperdas data`: defaults for every option, a build then a reuse, and clear errors with exit code 2."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

# imported before any test patches hyperdas.targets.load_target: imported during a patch, hyperdas.model would
# bind the planted loader for good (test_cli's eval, run after this file, then loaded a PlantedTarget)
import hyperdas.model  # noqa: F401
import hyperdas.targets
from hyperdas.data.build import DataRequest
from hyperdas.testing import PlantedTarget
from hyperdas.train import cli, data_command
from hyperdas.train.config import load_run_config


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERDAS_CACHE", str(tmp_path))
    return tmp_path / "data"


def _parse(argv):
    parser = argparse.ArgumentParser()
    data_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_no_arguments_means_the_main_jobs_data():
    main_job = load_run_config().data_request()
    assert data_command.request_from_args(_parse([])) == main_job
    # README's example; the dtype is what the main job's torch_dtype=auto means on this machine
    example = DataRequest(attributes=("Country", "Continent", "Language"), target_dtype=main_job.target_dtype)
    assert main_job.key() == example.key()
    assert main_job.target_dtype in ("bfloat16", "float32")
    assert data_command.request_from_args(_parse(["--dtype", "auto"])) == main_job  # the same resolution
    args = _parse(["--attributes", "Country, Language", "--isolate-attributes", "Timezone", "--sources", "wikipedia"])
    request = data_command.request_from_args(args)
    assert request.attributes == ("Country", "Language") and request.isolate_attributes == ("Timezone",)
    assert request.sources == ("wikipedia",)
    verb = data_command.request_from_args(_parse(["--domain", "verb"]))
    assert verb.asks_for_all and verb.requested_attributes() == (
        "Definition",
        "Singular",
        "Past Tense",
        "Pronunciation",
    )


PLANTED = ["--target", "planted", "--dtype", "float32", "--entities-per-template", "3"]


def test_build_then_reuse(smollm2, data_cache, monkeypatch, capsys):
    loads = []

    def load(name, device=None, **kwargs):
        loads.append((name, device))
        return PlantedTarget(smollm2.tokenizer)

    monkeypatch.setattr(hyperdas.targets, "load_target", load)
    argv = ["data", *PLANTED, "--max-examples", "12", "--test-share", "0.25", "--quiet", "--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "known prompts (the target answers" in out and "train  Country             causal" in out
    assert "examples: train 9, test 3 (built" in out
    folder = Path(out.split("data: ")[1].strip())
    assert folder.parent == data_cache and (folder / "filter_report.json").is_file()
    assert loads == [("planted", "cpu")]

    assert cli.main(argv) == 0  # the second time loads the data, not the target
    assert "(reused;" in capsys.readouterr().out
    assert len(loads) == 1


def test_out_is_the_dataset_folder(smollm2, data_cache, tmp_path, monkeypatch, capsys):
    from datasets import load_from_disk

    know_it_all = PlantedTarget(smollm2.tokenizer)
    monkeypatch.setattr(hyperdas.targets, "load_target", lambda name, dtype=None, device=None: know_it_all)
    out_dir = tmp_path / "mine"
    assert cli.main(["data", *PLANTED, "--max-examples", "12", "--quiet", "--out", str(out_dir)]) == 0
    assert f"data: {out_dir}\n" in capsys.readouterr().out
    assert len(load_from_disk(str(out_dir))["train"]) > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--domain", "mars"], "unknown RAVEL domain 'mars'; allowed: city, nobel_prize_winner"),
        (["--attributes", "Country,Mayor"], "unknown attribute 'Mayor' for RAVEL domain 'city'; allowed: Country"),
        (
            ["--domain", "occupation", "--attributes", "Gender Bias"],
            "'Gender Bias' of RAVEL domain 'occupation' has no",
        ),
        (["--max-examples", "0"], "max_examples must be at least 1"),
        (["--attributes", ""], "empty attribute list ''"),
        (["--device", "tpu"], "--device 'tpu'; allowed: cpu, cuda"),
    ],
)
def test_bad_options_exit_2_with_the_message(argv, message, data_cache, capsys):
    assert cli.main(["data", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyperdas data: error: ") and message in err


def test_zero_examples_exit_2_with_the_counts(smollm2, data_cache, monkeypatch, capsys):
    knows_nothing = PlantedTarget(smollm2.tokenizer, set())
    monkeypatch.setattr(hyperdas.targets, "load_target", lambda name, dtype=None, device=None: knows_nothing)
    argv = ["data", *PLANTED, "--attributes", "Country,Continent", "--max-examples", "4", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "can be made from the prompts target 'planted' knows" in err
    assert "train  Country                 0 /    66" in err


def test_the_console_script_reports_errors(data_cache):
    script = Path(sys.executable).with_name("hyperdas")
    if not script.is_file():
        pytest.skip("the hyperdas console script is not installed next to this python (pip install -e .)")
    done = subprocess.run([str(script), "data", "--domain", "mars"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown RAVEL domain 'mars'" in done.stderr
