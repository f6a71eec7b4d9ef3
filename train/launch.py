"""Train HyperDAS with DeepSpeed: one process per device, under torchrun or the deepspeed launcher.

Same run config as `hyperdas train`, same trainer (train/trainer.py); only the engine differs. The DeepSpeed
JSON (train/configs/*.json, see docs/scale_out.md) says how the work is split; the run config says what is
trained, with which global batch, whatever the number of processes.

    # one process (DeepSpeed, e.g. ZeRO-3 with offload on a single device)
    python train/launch.py --config train/configs/llama3_8b_city.yaml --deepspeed train/configs/zero3_offload.json
    # one node, 8 devices
    torchrun --nproc_per_node 8 train/launch.py --config train/configs/llama3_8b_city.yaml \\
        --deepspeed train/configs/zero3.json
    deepspeed --num_gpus 8 train/launch.py --config train/configs/llama3_8b_city.yaml \\
        --deepspeed train/configs/zero3.json
    # several nodes, listed in a hostfile ("host slots=8" per line); the script is given the same hostfile
    # so it can check the launcher used it (the launcher only warns about a missing one and trains locally)
    deepspeed --hostfile hostfile train/launch.py --hostfile hostfile --config train/configs/llama3_8b_city.yaml \\
        --deepspeed train/configs/zero3.json
    # continue a run from its last checkpoint (same data order)
    torchrun --nproc_per_node 8 train/launch.py resume=runs/llama3-8b-city

On CPU the processes talk over gloo, on CUDA over nccl. Key=value overrides work as for `hyperdas train`.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from pathlib import Path

_HOSTFILE_LINE = re.compile(r"^\s*(\S+)\s+slots\s*=\s*(\d+)\s*$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train/launch.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="run config YAML (default: the embedded default's)")
    parser.add_argument(
        "--deepspeed", default=None, help="DeepSpeed JSON (default: the run config's `deepspeed` field)"
    )
    parser.add_argument(
        "--hostfile",
        type=Path,
        default=None,
        help="the hostfile given to the deepspeed launcher: checked, and its slots compared with the processes started",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides, as for hyperdas train")
    return parser


def check_hostfile(path: Path) -> dict[str, int]:
    """Parse a DeepSpeed hostfile (``hostname slots=N`` per line, ``#`` comments) or fail clearly.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not of that form, a host repeats, or no host is listed.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"hostfile {path} not found. The deepspeed launcher would silently train on this node alone; write "
            "one line per node, e.g. `node1 slots=8`, or drop --hostfile to use the local devices only."
        )
    hosts: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _HOSTFILE_LINE.match(text)
        if not match:
            raise ValueError(f"hostfile {path}, line {number}: {line!r} is not of the form `hostname slots=N`")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise ValueError(f"hostfile {path}, line {number}: host {host!r} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"hostfile {path} lists no host; write one line per node, e.g. `node1 slots=8`")
    return hosts


def check_world_matches_hostfile(hosts: dict[str, int], world_size: int, path: Path) -> None:
    """Refuse a launch whose process count is not the hostfile's slot count (the launcher fell back to one node).

    Raises:
        ValueError: ``world_size`` differs from the sum of the slots.
    """
    slots = sum(hosts.values())
    if world_size != slots:
        raise ValueError(
            f"hostfile {path} lists {slots} slots on {len(hosts)} hosts but {world_size} processes were started: "
            "the launcher did not use this hostfile (a different --hostfile, or --include/--num_gpus narrowed it); "
            "give the script the hostfile the launcher really uses, or none"
        )


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_environment() -> None:
    """Without a launcher, make this process a group of one (rank 0 of 1) on a free local port."""
    if "RANK" in os.environ:
        return
    port = free_local_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        if args.hostfile is not None:
            hosts = check_hostfile(args.hostfile)
            check_world_matches_hostfile(hosts, int(os.environ.get("WORLD_SIZE", "1")), args.hostfile)
        return _train(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"train/launch.py (rank {rank}): error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from hyperdas.train.config import load_run_config
    from hyperdas.train.deepspeed_engine import DeepSpeedSetup
    from hyperdas.train.distributed import leave_distributed
    from hyperdas.train.trainer import Trainer

    config = load_run_config(args.config, args.overrides)
    ds_path = args.deepspeed or config.deepspeed
    if ds_path is None:
        raise ValueError(
            "no DeepSpeed config: pass --deepspeed (train/configs/zero3.json, zero3_offload.json, zero2.json or "
            "ddp.json) or set `deepspeed:` in the run config; for one process without DeepSpeed use hyperdas train"
        )
    config.deepspeed = str(ds_path)
    single_process_environment()
    setup = DeepSpeedSetup(ds_path)
    trainer = Trainer(config, setup)
    out_dir = trainer.out_dir
    interrupted = None
    try:
        metrics = trainer.run()
    except KeyboardInterrupt as stop:
        # every process was interrupted and saved its part of the checkpoint, so all can still leave together
        interrupted = str(stop)
    # On any other error, no clean leave: peers may wait in a collective this process will never join (a barrier
    # or a destroy would hang); the launcher stops them.
    del trainer  # the engine's process-group references must go before the groups are destroyed
    leave_distributed()
    if interrupted is not None:
        if setup.is_main:
            print(f"train/launch.py: {interrupted}; continue with the same command and resume={out_dir}")
        return 130
    if setup.is_main:
        from hyperdas.report import metrics_table

        print(metrics_table(metrics))
        print(f"\nrun folder: {out_dir} (report.md, metrics.json, model/, checkpoints/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
