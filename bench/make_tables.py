"""Print the README's benchmark tables (markdown) from the device-stamped JSON in bench/results/.

    python bench/make_tables.py                      # every bench/results/*.json
    python bench/make_tables.py bench/results/x.json # chosen files

One table per op (extra_info["op"], else the test function's name). Each row: case, mode, path, device,
mean time, speed-up against the reference path of the same file, case and mode (the path named
`reference`, `naive`, `eager` or `four_pass`: reference time / this time, so > 1 is faster), achieved GB/s or TFLOP/s,
peak CUDA memory and the bytes autograd saved for backward, where the benchmark recorded them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_PATHS = ("reference", "naive", "eager", "four_pass")
PEAK_KEYS = ("peak_memory_bytes", "peak_mem_bytes")


def _mib(value: float | int | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f} MiB"


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _device(machine_info: dict) -> str:
    device = machine_info.get("device") or machine_info.get("cpu", {}).get("brand_raw") or "unknown device"
    date = machine_info.get("date_utc", "")[:10]
    return f"{device} ({date})" if date else device


def load_rows(files: list[Path]) -> list[dict]:
    """One row per benchmark in each file, with the fields the tables show (and its whole extra_info as "info")."""
    rows = []
    for file in files:
        data = json.loads(file.read_text())
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue  # not a pytest-benchmark file (e.g. memory_model.py's predictions)
        device = _device(data.get("machine_info", {}))
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            test_name = bench["name"].split("[")[0]
            params = bench.get("params") or {}
            rows.append(
                {
                    "file": file.name,
                    "op": info.get("op") or test_name.removeprefix("test_"),
                    "case": str(info.get("case") or bench.get("group") or info.get("shape") or test_name),
                    "mode": str(info.get("mode") or params.get("mode") or ""),
                    "path": str(info.get("path") or info.get("method") or bench.get("param") or bench["name"]),
                    "device": device,
                    "mean": bench["stats"]["mean"],
                    "GBps": info.get("GBps"),
                    "tflops": info.get("tflops"),
                    "peak": next((info[k] for k in PEAK_KEYS if info.get(k) is not None), None),
                    "saved": info.get("saved_for_backward_bytes"),
                    "info": info,
                }
            )
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup = reference mean / mean, within one file, op, case and mode."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["file"], row["op"], row["case"], row["mode"])].append(row)
    for members in groups.values():
        by_path = {row["path"]: row for row in members}
        reference = next((by_path[p] for p in REFERENCE_PATHS if p in by_path), None)
        for row in members:
            row["speedup"] = reference["mean"] / row["mean"] if reference else None


def render(rows: list[dict]) -> str:
    """Markdown: one '### op' heading and table per op."""
    out = []
    by_op: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_op[row["op"]].append(row)
    for op in sorted(by_op):
        out += [
            f"### {op}",
            "",
            "| case | mode | path | device | mean time | speed-up vs reference | throughput | peak memory | "
            "saved for backward |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in sorted(by_op[op], key=lambda r: (r["device"], r["case"], r["mode"], r["path"])):
            if row["GBps"] is not None:
                throughput = f"{row['GBps']:.3g} GB/s"
            elif row["tflops"] is not None:
                throughput = f"{row['tflops']:.3g} TFLOP/s"
            else:
                throughput = "—"
            speedup = "—" if row["speedup"] is None else f"{row['speedup']:.2f}×"
            out.append(
                f"| {row['case']} | {row['mode']} | {row['path']} | {row['device']} | {_time(row['mean'])} | "
                f"{speedup} | {throughput} | {_mib(row['peak'])} | {_mib(row['saved'])} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="result JSON files (default: bench/results/*.json)")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.json"))
    if not files:
        raise SystemExit(f"no benchmark results in {RESULTS}; run `python -m pytest bench/ --benchmark-only` first")
    rows = load_rows(files)
    add_speedups(rows)
    print(render(rows))


if __name__ == "__main__":
    main()
