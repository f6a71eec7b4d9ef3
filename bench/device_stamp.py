"""The device a benchmark ran on, and the two roofs its ratios are taken against: copy bandwidth and matmul rate.

    python bench/device_stamp.py --json stamp.json      # print and save the stamp
    python bench/device_stamp.py --smoke                # small buffers (a CPU check of the script)

- copy bandwidth: bytes read + written per second by a device-to-device copy of one large buffer, the roof of
  a memory-bound op (the interchange forward's goal is >= 80% of it);
- matmul rate: 2·n³ FLOP per second of an n x n x n matrix product, bf16 on CUDA (fp32 on CPU), the roof of
  the training step.
Both are the median over rounds, timed with CUDA events around several back-to-back calls on a GPU (so launch
and synchronisation overheads do not count) and with a wall clock on CPU.

The stamp also holds the device's name, driver, memory and multiprocessor count, the library versions, the
UTC date and the autotuning candidates of every autotuned Triton kernel of hyperdas.kernels. bench/conftest.py
takes the device name and versions from here for every saved benchmark JSON; bench/gpu_run.py runs this as
its first step.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

PACKAGES = ("torch", "triton", "transformers", "pyvene", "deepspeed", "pytest", "pytest-benchmark")


def device_name() -> str:
    """The GPU's name on CUDA, else the CPU model from /proc/cpuinfo (platform's answer as a fallback)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def device_slug() -> str:
    """The device name as a file-name prefix: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name()).strip("-").lower() or "device"


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi (torch does not report it), None without one."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the time of ``calls`` back-to-back calls of fn, divided by ``calls``."""
    fn()  # warm up (allocation, kernel selection)
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - begin) / calls)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, rounds: int = 5) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and written.

    Args:
        device: where to copy.
        nbytes: buffer size; default 1 GiB on CUDA (far beyond any cache), 64 MiB on CPU.
        rounds: timed rounds (10 copies each on CUDA, 1 on CPU).
    """
    nbytes = nbytes or (2**30 if device.type == "cuda" else 64 * 2**20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = seconds_per_call(lambda: dst.copy_(src), device, 10 if device.type == "cuda" else 1, rounds)
    return 2 * nbytes / seconds / 1e9


def matmul_tflops(device: torch.device, n: int | None = None, rounds: int = 5) -> tuple[float, str]:
    """TFLOP/s of an n x n x n product (2·n³ FLOP), bf16 on CUDA (n = 8192), fp32 on CPU (n = 512); and the dtype."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 512)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = seconds_per_call(lambda: torch.matmul(a, b, out=out), device, 10 if device.type == "cuda" else 1, rounds)
    return 2 * n**3 / seconds / 1e12, str(dtype).removeprefix("torch.")


def autotune_candidates() -> dict[str, int]:
    """How many configurations each autotuned Triton kernel of hyperdas.kernels may try (a fixed, small set)."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    counts = {}
    for module_name in ("cross_attention", "interchange", "selection_head"):
        module = importlib.import_module(f"hyperdas.kernels.{module_name}")
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                counts[f"{module_name}.{name}"] = len(value.configs)
    return counts


def environment_stamp(smoke: bool = False) -> dict:
    """Everything that says where and with what a run was made, with the two measured roofs."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    stamp: dict = {
        "device": device_name(),
        "device_slug": device_slug(),
        "device_kind": device.type,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cuda_runtime": torch.version.cuda,
        "driver": driver_version() if cuda else None,
        "versions": {package: package_version(package) for package in PACKAGES},
        "cpu_threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        stamp.update(
            memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
        )
    stamp["autotune_candidates"] = autotune_candidates()
    stamp["copy_GBps"] = copy_bandwidth_gbps(device, 16 * 2**20 if smoke else None)
    stamp["matmul_TFLOPs"], stamp["matmul_dtype"] = matmul_tflops(device, 256 if smoke else None)
    return stamp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the stamp here")
    parser.add_argument("--smoke", action="store_true", help="small buffers: a quick check of this script")
    args = parser.parse_args(argv)
    stamp = environment_stamp(args.smoke)
    text = json.dumps(stamp, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
