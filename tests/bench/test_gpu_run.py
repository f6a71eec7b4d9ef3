"""bench/gpu_run.py, the one prepared GPU run, checked on CPU so it cannot rot between the chances of a GPU.

- The smoke run end to end (``--smoke``: CPU, tiny shapes, Triton in its interpreter) in a subprocess: every step
  ends ok, or skipped only for a package this machine lacks; the five result files are there and readable by
  bench/make_tables.py and bench/goals.py; the largest-batch search finds exactly the simulated device's limit;
  ZeRO-3's model states, read off DeepSpeed's buffers, equal bench/memory_model.py's.
- Failures are recorded and the run goes on: a step whose command fails, one that raises, one that overruns
  its limit (killed), then one that works; pytest's failures, per-test time limits and skips reach the table.
- The goals are read off result files correctly (met, missed, not measured, reported).
- Triton autotuning has a small fixed candidate set (the GPU run's budget assumes it).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import gpu_run  # noqa: E402
from goals import read as read_goals  # noqa: E402
from make_tables import load_rows  # noqa: E402

SMOKE_TIMEOUT_S = 420
STEP_LABELS = [label for label, _ in gpu_run.STEPS]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str, float]:
    """One smoke run: (its folder, its stdout, its wall time). The budget is loose so a loaded machine passes."""
    out = tmp_path_factory.mktemp("gpu_smoke")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(BENCH / "gpu_run.py"), "--smoke", "--out", str(out), "--budget-s", "300"],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )
    wall = time.monotonic() - start
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return out, result.stdout, wall


def test_smoke_run_ends_every_step_and_ends_with_the_table(smoke):
    out, stdout, _ = smoke
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert [label for label in STEP_LABELS if not any(row["step"] == label for row in rows)] == []
    for row in rows:
        if row["status"] == "skipped":  # only for a package this machine lacks, or a -k that selects nothing
            assert any(why in row["why"] for why in ("does not import", "no test selected")), row
        else:
            assert row["status"] == "ok", row
    zero3 = [row for row in rows if row["step"] == "5 ZeRO-3"]
    assert len(zero3) == 2 and all(row["status"] == ("ok" if _importable("deepspeed") else "skipped") for row in zero3)
    tests = [row for row in rows if row["step"] == "2 kernel tests"]
    assert {row["what"] for row in tests} == {p.name for p in (BENCH.parent / "tests" / "kernels").glob("test_*.py")}
    assert sum(row["data"]["counts"]["passed"] for row in tests if row["data"]["counts"]) >= 2  # the fused steps
    # the output (and summary.md) end with the one table of steps, a row per result
    last_lines = stdout.strip().splitlines()[-len(rows) - 2 :]
    assert last_lines[0].startswith("| step | what | status |") and all(line.startswith("| ") for line in last_lines)
    assert (out / "summary.md").read_text().strip().splitlines()[-len(rows) :] == last_lines[2:]


def test_smoke_run_writes_readable_results(smoke):
    out, _, wall = smoke
    names = sorted(p.name for p in out.iterdir())
    bench_files = [n for n in names if n.endswith(".json") and not n.startswith("summary")]
    assert len(names) == 5 and "run.log" in names and len(bench_files) == 2, names
    assert all(p.is_file() for p in out.iterdir())  # flat: the device tool returns files, two folders deep at most
    kernels = next(out / n for n in bench_files if not n.endswith("_step.json"))
    rows = load_rows([kernels])
    assert {r["op"] for r in rows} == {"interchange", "selection_head", "cross_attention"}
    assert {(r["op"], r["mode"]) for r in rows if r["path"] in ("reference", "naive")} == {
        (op, mode) for op in ("interchange", "selection_head", "cross_attention") for mode in ("fwd", "fwd_bwd")
    }
    step = json.loads((out / next(n for n in bench_files if n.endswith("_step.json"))).read_text())
    assert step["errors"] == []
    assert sorted(b["name"] for b in step["benchmarks"]) == sorted(
        f"training_step_at_scale[{path}-{kernels}]"
        for path in ("two_pass", "four_pass")
        for kernels in ("fused", "unfused")
    )
    assert {r["path"] for r in load_rows([out / n for n in bench_files]) if r["op"] == "training_step"} == {
        "two_pass",
        "four_pass",
    }
    goals = read_goals([out / n for n in bench_files])
    assert len(goals) == 8 and goals[0].status == "not measured"  # no fused interchange timing on CPU
    assert wall < SMOKE_TIMEOUT_S


def test_smoke_largest_batch_search_finds_the_simulated_limit(smoke):
    out, _, _ = smoke
    step = json.loads(next(out.glob("*_step.json")).read_text())
    searches = step["largest_batch"]
    assert [s["setting"] for s in searches] == ["plain two-pass step", "editor + target checkpointing"]
    for search in searches:
        # the pretend device holds exactly what memory_model.py predicts for predicted_largest pairs
        assert search["largest_fit"] == search["predicted_largest"] > 0, search
        assert search["smallest_failure"] == search["largest_fit"] + 1, search
        assert all(p["fits"] == (p["batch"] <= search["largest_fit"]) for p in search["probes"]), search
    assert searches[1]["largest_fit"] > searches[0]["largest_fit"]  # checkpointing lets more pairs fit
    assert step["batch_ratio_checkpointed_over_plain"] == searches[1]["largest_fit"] / searches[0]["largest_fit"]


@pytest.mark.skipif(not _importable("deepspeed"), reason="deepspeed is not installed (install.sh installs it)")
def test_smoke_zero3_model_states_match_the_memory_model(smoke):
    out, _, _ = smoke
    rows = json.loads((out / "summary.json").read_text())["rows"]
    result = next(row["data"]["result"] for row in rows if row["what"] == "train/configs/zero3.json")
    predicted = {k: v for k, v in result["state_bytes"]["predicted"].items() if k != "gathered"}
    assert result["state_bytes"]["measured"] == predicted
    assert len(result["step_seconds"]) == len(result["losses"]) == 3
    assert all(loss == loss for loss in result["losses"])  # finite, not NaN


# --- failures are recorded and the run goes on ------------------------------------------------------------


def test_failing_raising_and_overrunning_steps_are_recorded(tmp_path, monkeypatch):
    def fails(run, label):
        outcome = run.command("fails", [sys.executable, "-c", "import sys; print('ValueError: boom'); sys.exit(3)"], 30)
        return [gpu_run.Row(label, "exit 3", "failed", outcome.seconds, gpu_run.failure_reason(outcome))]

    def raises(run, label):
        raise RuntimeError("the step itself broke")

    def overruns(run, label):
        outcome = run.command("overruns", [sys.executable, "-c", "import time; time.sleep(60)"], 1)
        return [
            gpu_run.Row(
                label,
                "sleeps",
                "timed out" if outcome.returncode is None else "ok",
                outcome.seconds,
                gpu_run.failure_reason(outcome),
            )
        ]

    def works(run, label):
        outcome = run.command("works", [sys.executable, "-c", "print('fine')"], 30)
        return [gpu_run.Row(label, "prints", "ok" if outcome.returncode == 0 else "failed", outcome.seconds)]

    monkeypatch.setattr(gpu_run, "STEPS", (("a", fails), ("b", raises), ("c", overruns), ("d", works)))
    start = time.monotonic()
    assert gpu_run.main(["--smoke", "--out", str(tmp_path)]) == 1
    assert time.monotonic() - start < 30  # the sleeper was killed at its limit
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [(r["step"], r["status"]) for r in rows] == [
        ("a", "failed"),
        ("b", "failed"),
        ("c", "timed out"),
        ("d", "ok"),
    ]
    assert rows[0]["why"] == "exit 3: ValueError: boom"
    assert rows[1]["why"] == "RuntimeError: the step itself broke"
    assert rows[2]["why"] == "killed at its time limit of 1 s"
    log = (tmp_path / "run.log").read_text()
    assert "===== overruns: killed at its time limit" in log and "===== works: exit 0" in log and "fine" in log
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 2 + 4  # header, separator, the four rows


def test_pytest_failures_time_limits_and_skips_reach_the_row(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        textwrap.dedent("""
        import time
        import pytest

        def test_passes():
            assert True

        def test_fails():
            assert 1 == 2, "one is not two"

        def test_overruns():
            time.sleep(30)

        @pytest.mark.skip(reason="needs CUDA")
        def test_skipped():
            pass
    """)
    )
    run = gpu_run.Run(tmp_path, smoke=True, cuda=False, limits=gpu_run.SMOKE_LIMITS)
    junit = tmp_path / "junit.xml"
    outcome = run.command("sample", gpu_run.pytest_command(tests, junit, 1.0), 60)
    row = gpu_run.pytest_row("2 kernel tests", tests.name, outcome, junit)
    assert row.status == "failed" and outcome.seconds < 20
    counts = row.data["counts"]
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 2, 0, 1)
    assert any("one is not two" in f for f in counts["failures"])
    assert any(f.startswith("test_overruns") and "time limit of 1 s" in f for f in counts["failures"])
    assert counts["skip_reasons"] == {"needs CUDA": 1}
    assert "1 passed, 2 failed, 0 errors, 1 skipped" in row.why


def test_largest_batch_search_is_exact_near_its_start_and_bounded_far_from_it():
    from training_step_at_scale import Probe, search_largest_batch

    def device_holding(limit: int):
        return lambda batch: Probe(batch, batch <= limit, predicted_bytes=0)

    near = search_largest_batch(device_holding(37), 30, seconds_for=lambda b: 0.0, time_left=lambda: 1.0)
    assert (near["largest_fit"], near["smallest_failure"]) == (37, 38)
    assert [p["batch"] for p in near["probes"]] == [30, 45, 37, 41, 39, 38]
    far = search_largest_batch(device_holding(1000), 1, seconds_for=lambda b: 0.0, time_left=lambda: 1.0)
    assert len(far["probes"]) == 8 and far["stopped"] == "probe limit (8)" and far["smallest_failure"] is None
    timed = search_largest_batch(device_holding(1000), 8, seconds_for=float, time_left=lambda: 20.0)
    assert max(p["batch"] for p in timed["probes"]) <= 20 and timed["stopped"].startswith("time limit")
    assert timed["largest_fit"] == max(p["batch"] for p in timed["probes"])
    none = search_largest_batch(device_holding(0), 4, seconds_for=lambda b: 0.0, time_left=lambda: 1.0)
    assert (none["largest_fit"], none["stopped"]) == (0, "not even one pair fits")
    big = search_largest_batch(device_holding(700), 640, seconds_for=lambda b: 0.0, time_left=lambda: 1.0)
    assert big["largest_fit"] <= 700 < big["smallest_failure"] <= big["largest_fit"] * 1.05 + 1


# --- the goals ---------------------------------------------------------------------------------------------


def _bench(name: str, mean: float, **info) -> dict:
    return {"name": name, "stats": {"mean": mean}, "extra_info": info}


def test_goals_are_read_off_the_results(tmp_path):
    kernels = tmp_path / "gpu.json"
    kernels.write_text(
        json.dumps(
            {
                "machine_info": {"device": "GPU"},
                "benchmarks": [
                    _bench(
                        "i1",
                        1.0,
                        op="interchange",
                        case="hyperdas",
                        path="fused",
                        mode="fwd",
                        fraction_of_copy_bandwidth=0.85,
                    ),
                    _bench("i2", 2.0, op="interchange", case="hyperdas", path="fused", mode="fwd_bwd"),
                    _bench(
                        "i3", 5.0, op="interchange", case="hyperdas", path="reference", mode="fwd_bwd"
                    ),  # 2.5x: missed
                    _bench(
                        "test_selection_head[fused-fwd_bwd]", 1.0, path="fused", mode="fwd_bwd", peak_memory_bytes=10
                    ),
                    _bench(
                        "test_selection_head[naive-fwd_bwd]", 4.0, path="naive", mode="fwd_bwd", peak_memory_bytes=120
                    ),
                    _bench("c1", 1.0, op="cross_attention", method="triton", mode="fwd_bwd", shape="small"),
                    _bench("c2", 1.5, op="cross_attention", method="sdpa_flash", mode="fwd_bwd", shape="small"),
                    _bench("c3", 2.0, op="cross_attention", method="triton", mode="fwd_bwd", shape="large"),
                    _bench("c4", 1.8, op="cross_attention", method="sdpa_flash", mode="fwd_bwd", shape="large"),  # 0.9x
                ],
            }
        )
    )
    step = tmp_path / "gpu_step.json"
    case, mode = "llama3-8b B=16 (random weights)", "fwd+bwd+adamw"
    step.write_text(
        json.dumps(
            {
                "machine_info": {"device": "GPU"},
                "benchmarks": [
                    _bench("s1", 1.0, op="training_step", case=f"{case}, fused kernels", path="two_pass", mode=mode),
                    _bench("s2", 1.4, op="training_step", case=f"{case}, fused kernels", path="four_pass", mode=mode),
                    _bench("s3", 3.0, op="training_step", case=f"{case}, unfused kernels", path="two_pass", mode=mode),
                    _bench("s4", 3.6, op="training_step", case=f"{case}, unfused kernels", path="four_pass", mode=mode),
                ],
                "largest_batch": [
                    {"setting": "plain two-pass step", "largest_fit": 50},
                    {"setting": "editor + target checkpointing", "largest_fit": 210},
                ],
            }
        )
    )
    goals = {g.goal: g for g in read_goals([kernels, step])}
    status = {name: (g.status, None if g.figure is None else round(g.figure, 3)) for name, g in goals.items()}
    assert status == {
        "interchange forward >= 80% of copy bandwidth": ("met", 0.85),
        "interchange forward+backward >= 3x eager": ("MISSED", 2.5),
        "interchange forward+backward >= 5x pyvene": ("not measured", None),
        "selection head >= 10x lower peak memory than unfused": ("met", 12.0),
        "selection head >= 3x faster than unfused (fwd+bwd)": ("met", 4.0),
        "cross-attention fwd+bwd at least as fast as SDPA flash": ("MISSED", 0.9),  # the slower of two cases
        "two-pass step speed-up over the four-pass step (fused)": ("reported", 1.4),
        "largest batch with checkpointing >= 4x the plain step's": ("met", 4.2),
    }


def test_autotuning_has_a_small_fixed_candidate_set(monkeypatch):
    from hyperdas.kernels import cross_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled (GPU) candidates, not the interpreter's one
    for kind in ("fwd", "bwd"):
        configs = cross_attention._configs(kind)
        assert 1 <= len(configs) <= 8
        again = cross_attention._configs(kind)
        assert [(c.kwargs, c.num_warps, c.num_stages) for c in configs] == [
            (c.kwargs, c.num_warps, c.num_stages) for c in again
        ]
