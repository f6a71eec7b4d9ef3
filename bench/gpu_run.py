"""Every owed GPU figure in one run of under 9 minutes on an H100/H200: ``python3 bench/gpu_run.py --out DIR``.

On the GPU machine, with the deepspeed and pyvene wheels carried in .whl/ (docs/gpu_run.md builds them), the
one command (on one line; it is split here only to fit):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl;
    PYTHONPATH=/tmp/site python3 bench/gpu_run.py --out $OUT

On CPU, the same script end to end at tiny shapes in under 2 minutes (tests/bench/test_gpu_run.py runs it):

    python bench/gpu_run.py --smoke --out /tmp/gpu-smoke

Steps, each in subprocesses with time limits; a step that fails, crashes or overruns is recorded and the run
goes on to the next:
1. environment: bench/device_stamp.py (device, driver, versions, date, copy bandwidth, matmul TFLOP/s, the
   autotuning candidates of every autotuned kernel);
2. kernel tests: pytest on each file of tests/kernels (Llama-3-8B shapes on CUDA, every gradient checked), a
   few files at once (they check results, not speed), every test under a time limit (bench/time_limit.py);
3. kernel benchmarks: pytest --benchmark-only on the interchange, selection-head and cross-attention suites,
   one after another with the device to themselves, merged into one device-stamped JSON;
4. training step: bench/training_step_at_scale.py (two-pass vs four-pass, fused on/off, largest batches);
5. ZeRO-3: bench/zero3_step.py with train/configs/zero3.json and zero3_offload.json (skipped, and said so,
   when the deepspeed wheel does not import).
No new step starts once --budget-s is spent, and each subprocess's limit is cut to what is left, so the run
ends within the budget plus a few seconds. hyperdas is installed (editable, no dependencies, no index) first
if it does not import.

Writes into DIR, flat (the device tool returns at most 8 files), after every step so an interrupted run keeps
what it did:
    summary.md                  the stamp, the goals (bench/goals.py) and the table of what ran, failed and why
    summary.json                the same, with every step's data (test counts, failures, figures, ZeRO-3 memory)
    <device>_<date>.json        the kernel benchmarks (pytest-benchmark JSON): copy to bench/results/
    <device>_<date>_step.json   the training step and largest batches: likewise (bench/make_tables.py reads both)
    run.log                     every subprocess's command, exit status, time and output, in order
The output ends with the table of steps. Exit status 0 when no step failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from subprocess_outcomes import Outcome, Row, RunLog, failure_reason, pytest_row

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
KERNEL_BENCHMARKS = ("test_interchange.py", "test_selection_head.py", "test_cross_attention.py")
ZERO3_CONFIGS = ("zero3", "zero3_offload")
#: the smoke run's selection of tests/kernels (CI runs them all anyway): the Llama-3-8B tests (skipped without
#: CUDA), the fused step, and each file's quick checks of dispatch and error messages.
SMOKE_TEST_SELECTION = "llama3_8b or fused_step or dispatch or clear"
#: a step is not started with less time than this left in the budget.
MIN_START_S = 10.0


@dataclass(frozen=True)
class Limits:
    """Time limits in seconds: the whole run, each subprocess (cut to what is left of the run), and what the
    tests, the benchmarks and the training step leave of the budget for the steps after them (the figures
    that matter most come in steps 3 and 4, so slow tests must not starve them)."""

    budget: float
    environment: float
    test_file: float
    per_test: float
    test_jobs: int
    benchmark_file: float
    per_benchmark: float
    training_step: float
    zero3: float
    tests_leave: float
    benchmarks_leave: float
    training_leave: float


GPU_LIMITS = Limits(
    budget=510,
    environment=90,
    test_file=180,
    per_test=120,
    test_jobs=4,
    benchmark_file=150,
    per_benchmark=90,
    training_step=210,
    zero3=150,
    tests_leave=320,
    benchmarks_leave=190,
    training_leave=50,
)
SMOKE_LIMITS = Limits(
    budget=150,
    environment=40,
    test_file=60,
    per_test=30,
    test_jobs=2,
    benchmark_file=60,
    per_benchmark=40,
    training_step=75,
    zero3=45,
    tests_leave=70,
    benchmarks_leave=50,
    training_leave=15,
)


class Run:
    """The state of one run: where it writes, its environment, its deadline and its rows so far."""

    def __init__(self, out: Path, smoke: bool, cuda: bool, limits: Limits):
        self.out = out
        self.smoke = smoke
        self.cuda = cuda
        self.limits = limits
        self.started = time.monotonic()
        self.started_utc = datetime.datetime.now(datetime.timezone.utc)
        self.deadline = self.started + limits.budget
        self.work = Path(tempfile.mkdtemp(prefix="gpu_run_"))
        self.log = RunLog(out / "run.log")
        self.rows: list[Row] = []
        self.stamp: dict = {}
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p),
        )
        if not cuda:
            self.env["TRITON_INTERPRET"] = "1"

    def prefix(self) -> str:
        """File-name prefix of the device-stamped results: <device>_<UTC start>."""
        slug = self.stamp.get("device_slug", "unknown-device")
        return f"{slug}_{self.started_utc:%Y%m%dT%H%M%SZ}"

    @property
    def benchmark_json(self) -> Path:
        return self.out / f"{self.prefix()}.json"

    @property
    def step_json(self) -> Path:
        return self.out / f"{self.prefix()}_step.json"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, nominal: float, leave: float = 0.0) -> float:
        """A subprocess's time limit: ``nominal``, cut to what is left of the budget less ``leave``."""
        return max(0.0, min(nominal, self.time_left() - leave))

    def command(
        self, title: str, command: list[str], nominal_limit: float, extra_env: dict | None = None, leave: float = 0.0
    ) -> Outcome:
        """Run a command in its own process group from the repository root; kill the group at its limit."""
        limit = self.limit(nominal_limit, leave)
        env = self.env | (extra_env or {})
        start = time.monotonic()
        with tempfile.TemporaryFile("w+") as sink:
            process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            try:
                returncode: int | None = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = None
            sink.seek(0)
            output = sink.read()
        outcome = Outcome(returncode, time.monotonic() - start, output, limit)
        self.log.add(title, command, outcome)
        return outcome


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / script), *args]


def pytest_command(file: Path, junit: Path, per_test: float, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "-p",
        "time_limit",
        "--time-limit",
        f"{per_test:g}",
        f"--junitxml={junit}",
        str(file),
        *extra,
    ]


# --- the steps -------------------------------------------------------------------------------------------------


def step_environment(run: Run, label: str) -> list[Row]:
    stamp_file = run.work / "stamp.json"
    outcome = run.command(
        "environment",
        python("device_stamp.py", "--json", str(stamp_file), *(["--smoke"] if run.smoke else [])),
        run.limits.environment,
    )
    if outcome.returncode != 0 or not stamp_file.is_file():
        return [
            Row(
                label,
                "device_stamp.py",
                "failed" if outcome.returncode else "timed out",
                outcome.seconds,
                failure_reason(outcome),
            )
        ]
    run.stamp = json.loads(stamp_file.read_text())
    s = run.stamp
    why = (
        f"{s['device']}, driver {s.get('driver')}, torch {s['versions']['torch']}, triton "
        f"{s['versions']['triton']}; copy {s['copy_GBps']:.4g} GB/s, {s['matmul_dtype']} matmul "
        f"{s['matmul_TFLOPs']:.4g} TFLOP/s; autotune candidates {s['autotune_candidates']}"
    )
    return [Row(label, "device_stamp.py", "ok", outcome.seconds, why, {"stamp": s})]


def step_kernel_tests(run: Run, label: str) -> list[Row]:
    files = sorted((REPO / "tests" / "kernels").glob("test_*.py"))
    extra = ["-k", SMOKE_TEST_SELECTION] if run.smoke else []

    def one(file: Path) -> Row:
        if run.limit(run.limits.test_file, run.limits.tests_leave) < MIN_START_S:
            return Row(label, file.name, "skipped", why="the run's time budget is spent")
        junit = run.work / f"junit_tests_{file.stem}.xml"
        command = pytest_command(file.relative_to(REPO), junit, run.limits.per_test, *extra)
        outcome = run.command(f"kernel tests {file.name}", command, run.limits.test_file, leave=run.limits.tests_leave)
        return pytest_row(label, file.name, outcome, junit)

    with ThreadPoolExecutor(max_workers=run.limits.test_jobs) as pool:
        return list(pool.map(one, files))


def step_kernel_benchmarks(run: Run, label: str) -> list[Row]:
    rows, results = [], []
    extra = ["--benchmark-only"] + (["--benchmark-max-time=0.05", "--benchmark-min-rounds=2"] if run.smoke else [])
    for name in KERNEL_BENCHMARKS:
        what = f"bench/{name}"
        if run.limit(run.limits.benchmark_file, run.limits.benchmarks_leave) < MIN_START_S:
            rows.append(Row(label, what, "skipped", why="the run's time budget is spent"))
            continue
        junit, result = run.work / f"junit_bench_{Path(name).stem}.xml", run.work / f"bench_{Path(name).stem}.json"
        command = pytest_command(
            Path("bench") / name, junit, run.limits.per_benchmark, *extra, f"--benchmark-json={result}"
        )
        outcome = run.command(
            f"kernel benchmarks {name}", command, run.limits.benchmark_file, leave=run.limits.benchmarks_leave
        )
        row = pytest_row(label, what, outcome, junit)
        if result.is_file():
            data = json.loads(result.read_text())
            results.append(data)
            row.data["benchmarks"] = len(data.get("benchmarks", []))
            row.why = f"{row.data['benchmarks']} benchmarks; {row.why}"
        rows.append(row)
    if results:
        merged = dict(results[0])
        merged["benchmarks"] = [bench for result in results for bench in result.get("benchmarks", [])]
        run.benchmark_json.write_text(json.dumps(merged, indent=2) + "\n")
    return rows


def size(nbytes: float | None) -> str:
    """Bytes in GiB, or MiB below 1 GiB; "—" when not measured."""
    if nbytes is None:
        return "—"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def describe_step(result: dict) -> str:
    parts = []
    for bench in result.get("benchmarks", []):
        info = bench["extra_info"]
        peak = info.get("peak_memory_bytes")
        parts.append(
            f"{bench['name'].split('[')[1].rstrip(']')} {bench['stats']['mean']:.3g} s "
            f"({info['pairs_per_second']:.3g} pairs/s{'' if peak is None else f', peak {size(peak)}'})"
        )
    return "; ".join(parts)


def describe_largest(result: dict) -> str:
    parts = []
    for entry in result.get("largest_batch", []):
        probes = ", ".join(f"{p['batch']} {'fits' if p['fits'] else 'fails'}" for p in entry.get("probes", []))
        found = entry.get("largest_fit", "unfinished")
        parts.append(
            f"{entry['setting']}: {found} (predicted {entry['predicted_largest']}; probes {probes or 'none'}; "
            f"{entry.get('stopped', 'stopped early')})"
        )
    ratio = result.get("batch_ratio_checkpointed_over_plain")
    return "; ".join(parts) + (f"; ratio {ratio:.2f}x" if ratio else "")


def step_training(run: Run, label: str) -> list[Row]:
    limit = run.limit(run.limits.training_step, run.limits.training_leave)
    if limit < MIN_START_S:
        return [Row(label, "training_step_at_scale.py", "skipped", why="the run's time budget is spent")]
    command = python(
        "training_step_at_scale.py",
        "--json",
        str(run.step_json),
        "--budget-s",
        f"{limit - 15:.0f}",
        *(["--smoke"] if run.smoke else []),
    )
    alloc = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # less fragmentation after out-of-memory probes
    outcome = run.command("training step", command, limit, alloc)
    result = json.loads(run.step_json.read_text()) if run.step_json.is_file() else {}
    errors = "; ".join(f"{e['what']}: {e['error']}" for e in result.get("errors", []))
    if outcome.returncode == 0:
        status, why = "ok", describe_step(result)
    else:
        status = "timed out" if outcome.returncode is None else "failed"
        why = "; ".join(part for part in (errors or failure_reason(outcome), describe_step(result)) if part)
    rows = [
        Row(
            label,
            "two-pass vs four-pass, fused on/off",
            status,
            outcome.seconds,
            why,
            {"result": {k: v for k, v in result.items() if k != "largest_batch"}},
        )
    ]
    searched = result.get("largest_batch", [])
    if len(searched) == 2 and all("largest_fit" in entry for entry in searched):
        rows.append(
            Row(
                label,
                "largest batch: plain vs checkpointing",
                "ok",
                0.0,
                describe_largest(result),
                {"largest_batch": searched},
            )
        )
    else:
        rows.append(
            Row(
                label,
                "largest batch: plain vs checkpointing",
                status,
                0.0,
                f"not finished: {describe_largest(result) or why}",
                {"largest_batch": searched},
            )
        )
    return rows


def step_zero3(run: Run, label: str) -> list[Row]:
    rows = []
    for config in ZERO3_CONFIGS:
        what = f"train/configs/{config}.json"
        if run.limit(run.limits.zero3) < MIN_START_S:
            rows.append(Row(label, what, "skipped", why="the run's time budget is spent"))
            continue
        result_file = run.work / f"zero3_{config}.json"
        command = python(
            "zero3_step.py", "--config", config, "--json", str(result_file), *(["--smoke"] if run.smoke else [])
        )
        outcome = run.command(f"ZeRO-3 {config}", command, run.limits.zero3)
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if outcome.returncode != 0:
            rows.append(
                Row(
                    label,
                    what,
                    "timed out" if outcome.returncode is None else "failed",
                    outcome.seconds,
                    failure_reason(outcome),
                    {"result": result},
                )
            )
        elif result.get("status") == "skipped":
            rows.append(Row(label, what, "skipped", outcome.seconds, result["why"], {"result": result}))
        else:
            states = result["state_bytes"]
            why = (
                f"offload {result['offload']}, steps {', '.join(f'{t:.2f}' for t in result['step_seconds'])} s; "
                f"peak {size(result['peak_memory_bytes'])} (predicted {size(result['predicted_peak_bytes'])}); "
                f"model states {size(sum(states['measured'].values()))} (predicted "
                f"{size(sum(v for k, v in states['predicted'].items() if k != 'gathered'))})"
            )
            rows.append(Row(label, what, "ok", outcome.seconds, why, {"result": result}))
    return rows


STEPS: tuple[tuple[str, Callable[[Run, str], list[Row]]], ...] = (
    ("1 environment", step_environment),
    ("2 kernel tests", step_kernel_tests),
    ("3 kernel benchmarks", step_kernel_benchmarks),
    ("4 training step", step_training),
    ("5 ZeRO-3", step_zero3),
)


# --- the summary --------------------------------------------------------------------------------------------


def run_table(rows: list[Row]) -> str:
    lines = ["| step | what | status | time | why / figures |", "| --- | --- | --- | ---: | --- |"]
    for row in rows:
        why = row.why.replace("|", "/").replace("\n", " ")
        lines.append(f"| {row.step} | {row.what} | {row.status} | {row.seconds:.0f} s | {why} |")
    return "\n".join(lines)


def write_summary(run: Run) -> tuple[str, str]:
    """summary.json and summary.md from the rows so far; returns the goals' and the steps' markdown tables."""
    from goals import as_dicts, read, render

    results = [f for f in (run.benchmark_json, run.step_json) if f.is_file()]
    goals = read(results) if results else []
    elapsed = time.monotonic() - run.started
    summary = {
        "started_utc": run.started_utc.isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "budget_s": run.limits.budget,
        "smoke": run.smoke,
        "stamp": run.stamp,
        "files": [f.name for f in sorted(run.out.iterdir())],
        "goals": as_dicts(goals),
        "rows": [asdict(row) for row in run.rows],
    }
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    s = run.stamp
    header = [
        f"# GPU run {summary['started_utc']}{' (smoke, CPU)' if run.smoke else ''}: {elapsed:.0f} s "
        f"of a {run.limits.budget:.0f} s budget",
        "",
    ]
    if run.smoke:
        header += [
            "A smoke run: CPU, tiny shapes, Triton in its interpreter, out-of-memory simulated. It checks the "
            "script; its figures, the goals' included, mean nothing.",
            "",
        ]
    if s:
        header += [
            f"{s['device']} (driver {s.get('driver')}, CUDA {s.get('cuda_runtime')}), Python {s['python']}, "
            + ", ".join(f"{k} {v}" for k, v in s["versions"].items())
            + f"; copy {s['copy_GBps']:.4g} GB/s, "
            f"{s['matmul_dtype']} matmul {s['matmul_TFLOPs']:.4g} TFLOP/s.",
            "",
        ]
    goals_table, steps_table = render(goals) if goals else "(no results yet)", run_table(run.rows)
    markdown = "\n".join(
        header + ["## Goals", "", goals_table, "", "## What ran, what failed and why", "", steps_table, ""]
    )
    (run.out / "summary.md").write_text(markdown)
    return goals_table, steps_table


def ensure_hyperdas(run: Run) -> Row | None:
    """Install hyperdas (editable, no dependencies, no index) when it does not import; the row says how it went."""
    if importlib.util.find_spec("hyperdas") is not None and importlib.util.find_spec("hyperdas.kernels") is not None:
        return None
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-e",
        str(REPO),
    ]
    outcome = run.command("install hyperdas", command, 120)
    status = "ok" if outcome.returncode == 0 else "failed"
    why = "pip install -e . (no deps, no index)" if status == "ok" else failure_reason(outcome)
    return Row("0 install", "hyperdas", status, outcome.seconds, why)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (created; flat)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, under 2 minutes: checks this script")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"stop starting work after this long (default {GPU_LIMITS.budget:.0f}; smoke {SMOKE_LIMITS.budget:.0f})",
    )
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device here: the GPU run needs one (use --smoke for the CPU check of this script)")
    limits = SMOKE_LIMITS if args.smoke else GPU_LIMITS
    if args.budget_s is not None:
        limits = Limits(**(asdict(limits) | {"budget": args.budget_s}))
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.smoke, cuda, limits)
    installed = ensure_hyperdas(run)
    if installed is not None:
        run.rows.append(installed)
    goals_table, steps_table = write_summary(run)
    try:
        for label, step in STEPS:
            try:
                rows = step(run, label)
            except Exception as err:  # noqa: BLE001 - a broken step is recorded; the next one still runs
                rows = [Row(label, "(the step itself)", "failed", 0.0, f"{type(err).__name__}: {err}")]
            run.rows.extend(rows)
            goals_table, steps_table = write_summary(run)
            print(
                f"[{time.monotonic() - run.started:4.0f} s] {label}: "
                + ", ".join(f"{row.what} {row.status}" for row in rows),
                flush=True,
            )
    finally:
        shutil.rmtree(run.work, ignore_errors=True)  # junit reports and per-file JSON, merged into DIR by now
    print(f"\n{goals_table}\n\n{steps_table}")
    return 1 if any(row.status in ("failed", "timed out") for row in run.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
