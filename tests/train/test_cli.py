"""The command line refuses bad input with a message naming the value, before any heavy work."""

from __future__ import annotations

import time

import pytest

from hyperdas.train.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "model.intervention_layer=30"], "intervention_layer 30 is out of range for a 30-layer target"),
        (["train", "model.das_dimension=600"], "das_dimension 600 exceeds the target's hidden size 576"),
        (["train", "model.subspace_module=Boundless"], "unknown subspace_module 'Boundless'"),
        (["train", "eval_modes=[soft,argmax]"], "unknown eval mode(s) ['argmax']"),
        (["train", "model.target=gpt2-like-folder-that-does-not-exist"], "cannot load target"),
        (["train", "optim.editor_lr=fast"], "config key optim.editor_lr must be a number, got 'fast'"),
        (["train", "no_such_key=1"], "unknown config key(s) ['no_such_key']"),
        (["train", "global_batch_size=7", "micro_batch_size=2"], "micro_batch_size 2 does not divide"),
        (["eval", "--checkpoint", "/nonexistent/run"], "is not a HyperDAS checkpoint folder"),
        (["eval", "--checkpoint", "/nonexistent/run", "--modes", "soft,best"], "unknown mode(s) ['best']"),
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
