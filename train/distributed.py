"""Joining and leaving the process group that the launcher (deepspeed or torchrun) set up."""

from __future__ import annotations

import gc
import os

import torch

#: DeepSpeed's shared-memory all-reduce op, which its torch backend JIT-compiles on the first join.
SHM_COMM_OP = "deepspeed_shm_comm"


def init_distributed() -> None:
    """Join the process group set up by the launcher (nccl on CUDA, gloo on CPU), once per process.

    DeepSpeed's torch backend would first JIT-compile its ``deepspeed_shm_comm`` op into the torch extensions
    folder (about 60 s on a fresh machine, every rank at once, under a file lock that an interrupted build
    leaves behind, after which every later launch waits on it forever, silently). The op only serves
    ``inference_all_reduce`` (DeepSpeed-Inference's tensor parallelism), which training never calls, so it is
    marked incompatible before joining and DeepSpeed skips it: no launch builds or waits for anything.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # DeepSpeed keeps this dict: the edit persists
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)


def leave_distributed() -> None:
    """Leave the process group cleanly, once per process, after the last collective (no-op if never joined).

    Every process first meets the others at a barrier, then DeepSpeed's own destroy both destroys every
    torch process group and drops DeepSpeed's module-level references to them (its clone of the world group
    above all). ``torch.distributed.destroy_process_group`` alone leaves that clone alive until interpreter
    teardown, where gloo can abort the finished process ("terminate called without an active exception",
    exit -6) and the launcher then kills its peers. Drop your own references to the engine before calling, and
    do not call it after an error on this process: its peers may be inside a collective it will never join.
    """
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()  # engine objects in reference cycles may still hold process groups
    ds_comm.destroy_process_group()
