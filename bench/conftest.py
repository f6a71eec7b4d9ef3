"""Shared set-up for every benchmark in bench/: device-stamped JSON results and a memory probe.

`python -m pytest bench/ --benchmark-only` saves its results to
bench/results/<device>_<UTC date and time>.json (unless --benchmark-json names another file), with the
device (GPU name or CPU model, from bench/device_stamp.py), the driver, the versions of torch, triton,
transformers, pyvene and deepspeed and the UTC date in the JSON's machine_info. bench/make_tables.py turns
those files into the README's tables.

On CPU, torch runs on HYPERDAS_BENCH_CPU_THREADS threads (default 1): CPU timings only compare the PyTorch
paths, and on a shared or oversubscribed machine OpenMP's spin-waiting makes multi-threaded timings of small
ops swing by 100x. The thread count is stamped into machine_info.

Fixture `memory_probe` measures one call of a step function:
- `peak_bytes(step)`: CUDA only, torch.cuda.max_memory_allocated during the step minus what was allocated
  before it; None on CPU, where no allocator statistics exist for torch (tracemalloc does not see them).
- `saved_bytes(step)`: on any device, the bytes autograd keeps for backward during the step (unique
  storages of the tensors packed by saved_tensors_hooks, minus the inputs' own storages): the activation
  memory a training step pays for.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from device_stamp import device_name, device_slug, driver_version, package_version

RESULTS = Path(__file__).resolve().parent / "results"


_STARTED = datetime.datetime.now(datetime.timezone.utc)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Pin CPU threads; default --benchmark-json to bench/results/<device>_<date>.json when benchmarks run."""
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("HYPERDAS_BENCH_CPU_THREADS", "1")))
    option = config.option
    if getattr(option, "benchmark_json", "absent") is not None:
        return  # pytest-benchmark missing, or the user chose a file
    if getattr(option, "benchmark_disable", False) or getattr(option, "benchmark_skip", False):
        return
    if getattr(option, "collectonly", False):
        return
    RESULTS.mkdir(exist_ok=True)
    option.benchmark_json = RESULTS / f"{device_slug()}_{_STARTED:%Y%m%dT%H%M%SZ}.json"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Stamp the device, the library versions and the date into the saved JSON."""
    machine_info.update(
        {
            "device": device_name(),
            "device_kind": "cuda" if torch.cuda.is_available() else "cpu",
            "cuda_version": torch.version.cuda,
            "driver": driver_version() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "transformers": package_version("transformers"),
            "pyvene": package_version("pyvene"),
            "deepspeed": package_version("deepspeed"),
            "date_utc": _STARTED.isoformat(timespec="seconds"),
            "torch_num_threads": torch.get_num_threads(),
        }
    )


class MemoryProbe:
    """Peak CUDA memory and autograd-saved bytes of one call of a step (see the module docstring)."""

    @staticmethod
    def peak_bytes(step: Callable[[], object]) -> int | None:
        if not torch.cuda.is_available():
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    @staticmethod
    def saved_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
        """Bytes of the storages autograd saves during step, not counting the storages of `exclude`."""
        inputs = {t.untyped_storage().data_ptr() for t in exclude}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in inputs:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        return sum(storages.values())


@pytest.fixture(scope="session")
def memory_probe() -> MemoryProbe:
    return MemoryProbe()
