"""DeepSpeed JSON against the run config, hostfiles and the will-it-fit check: clear errors, no processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from hyperdas.config import HyperDASConfig  # noqa: E402
from hyperdas.train.config import RunConfig  # noqa: E402
from hyperdas.train.ds_config import DeepSpeedConfigError, read_ds_config, resolve_ds_config  # noqa: E402
from hyperdas.train.launch import check_hostfile, check_world_matches_hostfile  # noqa: E402
from hyperdas.train.memory_fit import ParameterCounts, check_model_fits, model_state_bytes  # noqa: E402

CONFIGS = Path(__file__).parents[2] / "train" / "configs"
SHIPPED = ["zero3.json", "zero3_offload.json", "zero2.json", "ddp.json"]


def _run(**overrides) -> RunConfig:
    return RunConfig(**{"global_batch_size": 16, "precision": "bf16", **overrides})


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("world, micro, expected", [(1, None, (16, 1)), (2, None, (8, 1)), (4, 2, (2, 2))])
def test_shipped_configs_resolve_to_the_run_configs_global_batch(name, world, micro, expected):
    ds = resolve_ds_config(read_ds_config(CONFIGS / name), _run(micro_batch_size=micro), world, "cuda")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == expected
    assert ds["train_batch_size"] == 16 == expected[0] * expected[1] * world
    assert ds["gradient_clipping"] == 4.0
    # stage 0 keeps fp32 trained weights and autocasts; from stage 1 DeepSpeed holds bf16 weights, fp32 masters
    assert ds["bf16"]["enabled"] is (name != "ddp.json")


def test_precision_auto_is_fp32_on_cpu():
    ds = resolve_ds_config(read_ds_config(CONFIGS / "zero3.json"), _run(precision="auto"), 2, "cpu")
    assert ds["bf16"]["enabled"] is False


@pytest.mark.parametrize(
    "edit, run, world, message",
    [
        ({}, {"global_batch_size": 10}, 4, "global_batch_size 10 does not divide among 4"),
        ({}, {"micro_batch_size": 3}, 2, "micro_batch_size 3 does not divide the 8 pairs"),
        ({"train_batch_size": 32}, {}, 2, "train_batch_size=32 but the run config's global_batch_size gives 16"),
        ({"gradient_accumulation_steps": 4}, {}, 2, "gradient_accumulation_steps=4"),
        ({"gradient_clipping": 1.0}, {}, 2, "gradient_clipping=1.0 but the run config's optim.grad_clip gives 4.0"),
        ({"optimizer": {"type": "AdamW"}}, {}, 2, "section(s) ['optimizer']"),
        ({"fp16": {"enabled": True}}, {}, 2, "fp16 is not supported"),
        ({"bf16": {"enabled": True}}, {"precision": "fp32"}, 2, "bf16.enabled=True but the run config's precision"),
        ({"zero_optimization": {"stage": 4}}, {}, 2, "zero_optimization.stage 4; allowed: 0, 1, 2, 3"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, {}, 2, "offload_param needs stage 3"),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, {}, 2, "needs stage 1, 2 or 3"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, {}, 2, "sets no nvme_path"),
    ],
)
def test_contradictions_are_refused_by_name(edit, run, world, message):
    ds = {**read_ds_config(CONFIGS / "zero3.json"), **edit}
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve_ds_config(ds, _run(**run), world, "cuda")
    assert message in str(err.value)


def test_json_micro_batch_is_used_when_the_run_config_leaves_it_out(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    ds = resolve_ds_config(read_ds_config(path), _run(), 2, "cuda")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 4)


def test_missing_or_broken_ds_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="zero3.json, zero2.json"):
        read_ds_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{stage: 3")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        read_ds_config(tmp_path / "bad.json")


def test_hostfile_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="hostfile .* not found"):
        check_hostfile(tmp_path / "hostfile")
    good = tmp_path / "good"
    good.write_text("# two nodes\nnode1 slots=8\nnode2 slots=4  # smaller\n\n")
    assert check_hostfile(good) == {"node1": 8, "node2": 4}
    bad = tmp_path / "bad"
    bad.write_text("node1 slots=8\nnode2 8\n")
    with pytest.raises(ValueError, match="line 2: 'node2 8' is not of the form"):
        check_hostfile(bad)
    twice = tmp_path / "twice"
    twice.write_text("node1 slots=8\nnode1 slots=8\n")
    with pytest.raises(ValueError, match="listed twice"):
        check_hostfile(twice)


def test_a_launch_that_did_not_use_the_hostfile_is_refused(tmp_path):
    hosts = {"node1": 8, "node2": 4}
    check_world_matches_hostfile(hosts, 12, tmp_path / "hf")  # every slot started: fine
    with pytest.raises(ValueError, match="lists 12 slots on 2 hosts but 8 processes were started"):
        check_world_matches_hostfile(hosts, 8, tmp_path / "hf")  # the launcher fell back to the local node


# Llama-3-8B with an L=8 editor (counted on the meta device by count_parameters; see the next test).
LLAMA3_8B = ParameterCounts(target=8_030_261_248, editor=2_534_023_168, largest_module=525_336_576)


def test_model_state_bytes_by_hand():
    run = _run()
    zero3 = resolve_ds_config(read_ds_config(CONFIGS / "zero3.json"), run, 8, "cuda")
    states = model_state_bytes(LLAMA3_8B, zero3, 8)
    e, t = LLAMA3_8B.editor, LLAMA3_8B.target
    assert states == {
        "target_weights": 2 * t // 8,
        "editor_weights": 2 * e // 8,
        "gradients": 2 * e // 8 + 4 * e // 8,
        "optimizer": 12 * e // 8,
        "gathered": 2 * 2 * LLAMA3_8B.largest_module,
    }
    ddp = resolve_ds_config(read_ds_config(CONFIGS / "ddp.json"), run, 8, "cuda")
    assert model_state_bytes(LLAMA3_8B, ddp, 8, target_bytes_per_param=2) == {
        "target_weights": 2 * t,
        "editor_weights": 4 * e,
        "gradients": 4 * e,
        "optimizer": 8 * e,
        "gathered": 0,
    }  # = plain PyTorch's: fp32 trained weights and AdamW moments beside a bf16 target
    offload = resolve_ds_config(read_ds_config(CONFIGS / "zero3_offload.json"), run, 1, "cuda")
    assert sum(model_state_bytes(LLAMA3_8B, offload, 1).values()) == 2 * e + 4 * LLAMA3_8B.largest_module


def test_count_parameters_on_the_meta_device():
    from transformers import LlamaConfig

    from hyperdas.train.memory_fit import count_parameters

    llama3 = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    )
    config = HyperDASConfig(target="llama3", intervention_layer=15, das_dimension=128, chop_editor_at_layer=8)
    counts = count_parameters(config, llama3)
    assert counts.target == 8_030_261_248  # Llama-3-8B's published size
    per_layer = 4096 * (4096 + 1024 + 1024 + 4096) * 3 + 3 * 4096 * 14336 + 4 * 4096  # 3 attentions, MLP, 4 norms
    heads = 4 * 4096 * 4096 + 4096 * 128 + 3 * 4096 * 4096 + 4096 + 4096  # selection head; ReflectSelect R, MLP
    assert counts.editor == 8 * per_layer + heads
    assert counts == LLAMA3_8B


def test_a_model_too_large_for_its_stage_is_refused_with_what_would_fit():
    run = _run()
    ddp = resolve_ds_config(read_ds_config(CONFIGS / "ddp.json"), run, 8, "cuda")
    # replicated: 8.03B bf16 target + 2.53B trained x (4 weights + 4 gradients + 8 Adam) bytes = 52.7 GiB
    check_model_fits(LLAMA3_8B, ddp, 8, 80 * 2**30, target_bytes_per_param=2)
    with pytest.raises(DeepSpeedConfigError) as err:
        check_model_fits(LLAMA3_8B, ddp, 8, 40 * 2**30, target_bytes_per_param=2)
    message = str(err.value)
    assert "ZeRO stage 0 on 8 process(es) needs 52.7 GiB" in message and "a device has 40.0 GiB" in message
    assert "zero3.json" in message and "zero3_offload.json" in message
    zero3 = resolve_ds_config(read_ds_config(CONFIGS / "zero3.json"), run, 8, "cuda")
    check_model_fits(LLAMA3_8B, zero3, 8, 40 * 2**30, target_bytes_per_param=2)
