"""The target interface against the plain transformers forward (same logits, same states)."""

from __future__ import annotations

import warnings

import pytest
import torch

from hyperdas.config import HyperDASConfig
from hyperdas.model import HyperDAS, load_configured_target
from hyperdas.targets import (
    UnsupportedTargetError,
    architecture_of,
    attention_kernel_for,
    build_random_target,
    embedded_default_folder,
    emulated_half_precision_warning,
    load_target,
    position_ids_from_mask,
    resolve_target_dtype,
    run_device,
)
from hyperdas.testing import tiny_llama_config


def _left_padded_batch(tokenizer, texts):
    rows = [tokenizer(t, add_special_tokens=True).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    return ids, mask


TEXTS = ["Vienna is a city in the country of", "Paris", "The capital of Japan, the largest city, is"]


def _check_against_hf(target, tol):
    ids, mask = _left_padded_batch(target.tokenizer, TEXTS)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        ref = target.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    states = target.hidden_states(ids, mask)
    n = target.num_states
    assert states.shape == (ids.shape[0], ids.shape[1], n, target.hidden_size)
    real = mask.bool()
    # embeddings and every decoder layer but the last (HF applies the final norm to its last entry)
    for k in range(n - 1):
        torch.testing.assert_close(states[:, :, k][real], ref.hidden_states[k][real], **tol)
    # logits at chosen positions, from every start layer, equal the full forward's logits there
    positions = torch.stack([torch.arange(ids.shape[1] - 3, ids.shape[1])] * ids.shape[0])
    expected = ref.logits.gather(1, positions[..., None].expand(-1, -1, ref.logits.shape[-1]))
    real_at = mask.gather(1, positions).bool()  # compare where the position holds a real token
    assert real_at.sum() >= 7
    for k in (0, 1, n - 1):
        got = target.run_from_layer(states[:, :, k], k, mask, positions)
        torch.testing.assert_close(got[real_at], expected[real_at], **tol)


def test_tiny_llama_matches_hf_forward(tiny_target_f64):
    _check_against_hf(tiny_target_f64, dict(rtol=1e-9, atol=1e-9))


def test_embedded_default_matches_hf_forward(smollm2):
    assert smollm2.num_layers == 30 and smollm2.hidden_size == 576
    _check_against_hf(smollm2, dict(rtol=1e-4, atol=1e-4))


def test_embedded_default_is_cached_as_safetensors(smollm2):
    folder = embedded_default_folder()
    assert (folder / "config.json").is_file()
    assert list(folder.glob("*.safetensors"))


def test_gradients_reach_the_given_states(tiny_target_f64):
    ids, mask = _left_padded_batch(tiny_target_f64.tokenizer, TEXTS)
    states = tiny_target_f64.hidden_states(ids, mask)
    h = states[:, :, 2].clone().requires_grad_(True)
    logits = tiny_target_f64.run_from_layer(h, 2, mask, torch.zeros(len(TEXTS), 1, dtype=torch.long) + ids.shape[1] - 1)
    logits.sum().backward()
    assert h.grad is not None and h.grad[:, -1].abs().sum() > 0
    assert all(p.grad is None for p in tiny_target_f64.parameters())


def test_checkpointed_layers_give_the_same_gradients(tiny_target_f64):
    ids, mask = _left_padded_batch(tiny_target_f64.tokenizer, TEXTS)
    states = tiny_target_f64.hidden_states(ids, mask)
    last = torch.full((len(TEXTS), 1), ids.shape[1] - 1)
    grads = []
    for flag in (False, True):
        h = states[:, :, 1].clone().requires_grad_(True)
        tiny_target_f64.run_from_layer(h, 1, mask, last, checkpoint_layers=flag).square().sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_eager_kernel_equals_sdpa_states_logits_and_gradients(smollm2, dtype):
    """ "auto" runs HF's eager attention on CPU (faster there); it must equal torch SDPA on a left-padded batch."""
    target = build_random_target(tiny_llama_config(len(smollm2.tokenizer)), tokenizer=smollm2.tokenizer, dtype=dtype)
    ids, mask = _left_padded_batch(target.tokenizer, TEXTS)
    end = ids.shape[1] - 1
    earlier = torch.where(mask[:, end - 2].bool(), end - 2, end)  # logits at real tokens only
    last = torch.stack([earlier, torch.full_like(earlier, end)], dim=1)  # (B, 2)
    results = {}
    for kernel in ("auto", "sdpa"):
        target.attention = kernel
        states = target.hidden_states(ids, mask)
        assert target.config._attn_implementation == ("eager" if kernel == "auto" else "sdpa")
        h = states[:, :, 1].clone().requires_grad_(True)
        logits = target.run_from_layer(h, 1, mask, last)
        logits.float().square().mean().backward()
        results[kernel] = (states, logits, h.grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    real = mask.bool()
    (states, logits, grad), (states_ref, logits_ref, grad_ref) = results["auto"], results["sdpa"]
    torch.testing.assert_close(states[real], states_ref[real], **tol)  # padding positions hold no meaning
    torch.testing.assert_close(logits, logits_ref, **tol)
    torch.testing.assert_close(grad, grad_ref, **tol)  # all of it: padding positions must get none in both
    assert grad[~real].abs().max() == 0 and grad[real].abs().max() > 0


def test_attention_kernel_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_kernel_for(cpu, torch.bfloat16) == "eager"
    assert attention_kernel_for(cpu, torch.float64) == "sdpa"  # eager's float32 softmax would lose float64
    assert attention_kernel_for(cuda, torch.bfloat16) == "sdpa"
    assert attention_kernel_for(cpu, torch.float32, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match=r"unknown attention kernel 'flash'.*'auto', 'sdpa', 'eager'"):
        attention_kernel_for(cpu, torch.float32, "flash")


def test_the_attention_implementation_is_set_when_the_weights_or_the_request_change(smollm2):
    """Set once per change, never per call: at construction, after .to()/.double() (here on a parent module,
    as HyperDAS(...).double() does) and when ``attention`` is set."""
    target = build_random_target(tiny_llama_config(len(smollm2.tokenizer)), tokenizer=smollm2.tokenizer)
    assert target.config._attn_implementation == "eager"  # float32 on CPU
    parent = torch.nn.Sequential(target).double()
    assert target.dtype == torch.float64 and target.config._attn_implementation == "sdpa"
    parent.float()
    assert target.config._attn_implementation == "eager"
    target.attention = "sdpa"
    assert target.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        target.attention = "flash"
    assert target.attention == "sdpa"


def test_layer_out_of_range_is_a_clear_error(tiny_target):
    h = torch.zeros(1, 2, tiny_target.hidden_size)
    with pytest.raises(ValueError, match=r"layer 9 is out of range: allowed 0\.\.3"):
        tiny_target.run_from_layer(h, 9, torch.ones(1, 2), torch.zeros(1, 1, dtype=torch.long))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedTargetError, match=r"'gpt2' is not supported.*llama"):
        architecture_of(GPT2Config())


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedTargetError, match="cannot load target"):
        load_target(str(tmp_path / "nope"))


@pytest.mark.parametrize("native", [True, False])
def test_a_half_precision_target_on_a_cpu_that_emulates_it_warns_before_the_slow_work(native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    message = emulated_half_precision_warning(torch.bfloat16, cpu)
    assert (message is None) == native
    if not native:
        assert torch.backends.cpu.get_cpu_capability() in message and "model.torch_dtype=float32" in message
    assert emulated_half_precision_warning(torch.float32, cpu) is None
    assert emulated_half_precision_warning(torch.bfloat16, torch.device("cuda")) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_target(dtype=torch.bfloat16)
    slow = [w for w in caught if "no native torch.bfloat16 units" in str(w.message)]
    assert len(slow) == (0 if native else 1)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_the_device_computes_bf16_natively(native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    expected = "bfloat16" if native else "float32"
    assert resolve_target_dtype("auto", "cpu") == expected
    assert resolve_target_dtype("auto", torch.device("cuda")) == expected  # a pre-Ampere GPU emulates bf16 too
    for named in ("float32", "bfloat16", "float16", "float64"):  # a named dtype is the caller's choice
        assert resolve_target_dtype(named, "cpu") == named


@pytest.mark.parametrize("gpu", [True, False])
def test_a_run_without_a_named_device_goes_to_the_gpu_if_there_is_one_and_picks_its_dtype_there(gpu, monkeypatch):
    from hyperdas.train.config import resolve_run_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # a CPU without bf16 units
    assert run_device() == torch.device("cuda" if gpu else "cpu")
    assert resolve_run_dtype("auto") == ("bfloat16" if gpu else "float32")


@pytest.mark.parametrize("native", [True, False])
def test_a_model_configured_auto_runs_and_records_the_resolved_dtype(native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    config = HyperDASConfig(target="smollm2-135m", torch_dtype="auto", intervention_layer=3, chop_editor_at_layer=1)
    target = load_configured_target(config, device="cpu")
    assert target.dtype == (torch.bfloat16 if native else torch.float32)
    model = HyperDAS(config, target)
    assert model.config.torch_dtype == ("bfloat16" if native else "float32")
