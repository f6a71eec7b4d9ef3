"""A cache of the frozen target's hidden states per prompt, so the no-grad target pass runs once per prompt.

The target never trains and a run's pairs are drawn from a fixed set of prompts, so each prompt's states (all
N = n_layers + 1 of them: what the editor reads, and layer k, where the interchange patches) are the same in
every epoch. ``StateCache.fill`` computes them once (batched, no grad, sorted by length, left padded) and
keeps each prompt's real-token states (T, N, D) in the target's dtype, in memory or in a memory-mapped file;
``states_for(batch)`` assembles a collated batch's (base (B, Tb, N, D), source (B, Ts, N, D)) from them, zero
on the padding (which every consumer masks). A cache is bound to one target: its fingerprint and dtype are
checked on every use, and prompts are keyed by their token ids, so another target, dtype or data never reads
it (a prompt it lacks makes ``states_for`` return None: the caller runs the live pass).

Sizing: ``plan_storage`` counts the bytes the prompts need before anything is computed (SmolLM2-135M, T = 22,
bf16: 31 x 576 x 2 bytes = 36 KB a token, about 0.8 MB a prompt; Llama-3-8B at T = 64: 33 x 4096 x 2 bytes a
token, about 17 MB a prompt) and picks memory when it fits in a share of the available memory, a file when it
fits on disk, and no cache (the live pass, with a one-line notice) otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyperdas.data.batch import PairBatch

#: how the states are kept: chosen by size ("auto"), forced, or no cache ("off")
STORAGES = ("auto", "memory", "disk", "off")
#: "auto" keeps the cache in memory when it takes at most this share of the available memory
MEMORY_SHARE = 0.4
#: and on disk when it takes at most this share of the free disk space
DISK_SHARE = 0.5


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a quarter of the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


@dataclass(frozen=True)
class StoragePlan:
    """Where a cache of ``nbytes`` goes ("memory", "disk" or "off") and why, in one line."""

    storage: str
    nbytes: int
    reason: str


def plan_storage(nbytes: int, requested: str, folder: Path) -> StoragePlan:
    """Choose the storage for ``nbytes`` of states (``requested`` one of ``STORAGES``)."""
    if requested not in STORAGES:
        raise ValueError(f"state_cache {requested!r}; allowed: {list(STORAGES)}")
    gib = nbytes / 2**30
    if requested == "off":
        return StoragePlan("off", nbytes, "state cache off (state_cache=off): the target runs every step")
    memory = available_memory_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(folder).free
    if requested == "memory" or (requested == "auto" and nbytes <= MEMORY_SHARE * memory):
        return StoragePlan("memory", nbytes, f"state cache: {gib:.2f} GiB in memory ({memory / 2**30:.1f} GiB free)")
    if requested == "disk" or nbytes <= DISK_SHARE * disk:
        return StoragePlan("disk", nbytes, f"state cache: {gib:.2f} GiB memory-mapped under {folder}")
    return StoragePlan(
        "off",
        nbytes,
        f"state cache off: {gib:.2f} GiB fits neither memory ({memory / 2**30:.1f} GiB free) nor disk "
        f"({disk / 2**30:.1f} GiB free under {folder}); the target runs every step",
    )


def real_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, ...]]:
    """The real-token ids of each left-padded row of (B, T)."""
    mask = attention_mask.bool().cpu()
    ids = input_ids.cpu()
    return [tuple(ids[b][mask[b]].tolist()) for b in range(ids.shape[0])]


class StateCache:
    """Every layer's states of a fixed set of prompts of one target.

    Each ``fill`` stores its new prompts in one contiguous (tokens, N, D) segment, in memory or memory-mapped
    from a file in a temporary folder (removed by ``close``).

    Args:
        target: the ``FrozenTarget`` whose states are kept.
        storage: "memory" or "disk" (see ``plan_storage``).
        folder: where a "disk" cache makes its temporary folder (default: the system's temporary folder).
        layers: which of the N states to keep (a layer sweep needs only its layers); None: all of them.
    """

    def __init__(
        self, target, storage: str = "memory", folder: str | Path | None = None, layers: Sequence[int] | None = None
    ):
        if storage not in ("memory", "disk"):
            raise ValueError(f"StateCache storage {storage!r}; allowed: memory, disk")
        self.fingerprint = target.fingerprint
        self.dtype = target.dtype
        self.layers = None if layers is None else list(layers)
        if self.layers is not None and not all(0 <= k < target.num_states for k in self.layers):
            raise ValueError(f"layers {self.layers} out of range: allowed 0..{target.num_states - 1}")
        self.states_per_token = target.num_states if layers is None else len(self.layers)
        self.hidden_size = target.hidden_size
        self.storage = storage
        self._target = target
        self._index: dict[tuple[int, ...], tuple[int, int, int]] = {}  # ids -> (segment, first token, length)
        self._segments: list[torch.Tensor] = []  # (tokens, N, D) each
        self._tmp = Path(tempfile.mkdtemp(prefix="hyperdas-states-", dir=folder)) if storage == "disk" else None

    @staticmethod
    def bytes_needed(target, rows: Iterable[Sequence[int]], layers: Sequence[int] | None = None) -> int:
        """The bytes the distinct ``rows`` take in a cache of ``target`` (of ``layers`` only, when given)."""
        itemsize = torch.empty((), dtype=target.dtype).element_size()
        tokens = sum(len(r) for r in {tuple(r) for r in rows})
        per_token = target.num_states if layers is None else len(layers)
        return tokens * per_token * target.hidden_size * itemsize

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._segments)

    # --- filling -------------------------------------------------------------------------------------
    def _new_segment(self, tokens: int) -> torch.Tensor:
        shape = (tokens, self.states_per_token, self.hidden_size)
        if self.storage == "memory":
            return torch.empty(shape, dtype=self.dtype)
        path = self._tmp / f"segment-{len(self._segments)}.bin"
        numel = tokens * self.states_per_token * self.hidden_size
        return torch.from_file(str(path), shared=True, size=numel, dtype=self.dtype).view(shape)

    @torch.no_grad()
    def fill(
        self, rows: Iterable[Sequence[int]], batch_size: int = 32, progress: bool = True, steps: int | None = None
    ) -> int:
        """Compute and keep the states of every row not cached yet; returns how many were computed.

        Args:
            rows: token-id rows (real tokens only, as the collator makes them).
            batch_size: rows per no-grad forward.
            progress: show a progress bar.
            steps: run exactly this many forwards (the extra ones on a one-token row, their states dropped), so
                that every process of a ZeRO-3 run, whose forwards are collective, runs as many as the busiest
                one; None: as many as needed.
        """
        from hyperdas.data.collate import left_pad

        todo = sorted({tuple(r) for r in rows} - self._index.keys(), key=len)
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        real = len(batches)
        if steps is not None:
            if steps < real:
                raise ValueError(f"fill needs {real} forwards, more than the {steps} asked for")
            batches += [[(0,)]] * (steps - real)
        if todo:
            segment = self._new_segment(sum(len(r) for r in todo))
            self._segments.append(segment)
        used = 0
        device = self._target.device
        # the layers above the highest kept one never run
        last = None if self.layers is None else max(self.layers, default=0)
        for number, batch in enumerate(tqdm(batches, desc="caching target states", disable=not progress, leave=False)):
            ids, mask, offsets = left_pad(batch, 0)  # padding ids are masked out: any valid id does
            states = self._target.hidden_states(ids.to(device), mask.to(device), last_layer=last)
            if number >= real:
                continue
            if self.layers is not None:
                states = states[:, :, self.layers]
            states = states.to("cpu", self.dtype)
            for row, offset, per_row in zip(batch, offsets, states, strict=True):
                segment[used : used + len(row)] = per_row[offset:]
                self._index[row] = (len(self._segments) - 1, used, len(row))
                used += len(row)
        return len(todo)

    # --- reading -------------------------------------------------------------------------------------
    def check_target(self, target) -> None:
        """Refuse a target other than the one the cache was filled with (its fingerprint or dtype differ)."""
        if target.dtype != self.dtype or target.fingerprint != self.fingerprint:
            raise ValueError(
                f"this state cache holds states of target {self.fingerprint} in {self.dtype}; the model's target is "
                f"{target.fingerprint} in {target.dtype}: build a cache for it"
            )

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """(B, T, N, D) states of a left-padded (B, T) batch (N: the kept layers), zero on padding; None if any row
        is missing."""
        slots = [self._index.get(row) for row in real_rows(input_ids, attention_mask)]
        if any(slot is None for slot in slots):
            return None
        width = input_ids.shape[1]
        out = torch.zeros(len(slots), width, self.states_per_token, self.hidden_size, dtype=self.dtype)
        for b, (segment, first, length) in enumerate(slots):
            out[b, width - length :] = self._segments[segment][first : first + length]
        return out

    def states_for(
        self, batch: PairBatch, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(base (B, Tb, N, D), source (B, Ts, N, D)) of a collated batch, on ``device``; None on any miss."""
        base = self.lookup(batch.base_input_ids, batch.base_attention_mask)
        source = self.lookup(batch.source_input_ids, batch.source_attention_mask) if base is not None else None
        if source is None:
            return None
        if device is not None:
            base, source = base.to(device, non_blocking=True), source.to(device, non_blocking=True)
        return base, source

    def close(self) -> None:
        """Drop the states (and a disk cache's files)."""
        self._segments, self._index = [], {}
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
