"""Captioning and embedding shared by the processes of `accelerate launch` / `torchrun`, gathered by the main one.

    python -m training.evaluate ...                                     # one process: nothing changes
    accelerate launch --multi_gpu --num_processes 2 -m training.evaluate ...    # two share the image work
    accelerate launch --cpu --num_processes 2 --mpirun_hostfile training/localhost.hostfile -m training.evaluate ...

The main process runs the evaluation as always, through `ShardedCaptioner`: each `caption_paths` or
`embed_paths` call is broadcast as an order, every process takes every n-th batch (the same batches one process
would make, so the same captions), and the results are gathered back in order. The other processes only `serve`
those orders until the main one says it is done (`release`, also on an error, so none waits forever).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DONE = ("done",)


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


# how launchers announce the number of processes: torchrun, OpenMPI / Intel MPI / MVAPICH (accelerate's --cpu)
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def process_count() -> tuple[int, int]:
    """(this process's rank, number of processes), initialising the launcher's process group if there is one.

    Without a launcher (no world size above 1) nothing is initialised: the dashboard's threads never touch it."""
    if max(int(os.environ.get(name) or 1) for name in WORLD_SIZE_VARIABLES) <= 1:
        return 0, 1
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=, CPU processes would each count as one
    return state.process_index, state.num_processes


def _broadcast(order: tuple | None) -> tuple:
    box = [order]
    _distributed().broadcast_object_list(box, src=0)
    return box[0]


def _my_batches(items: list, batch_size: int) -> list[tuple[int, list]]:
    dist = _distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    return [(index, batch) for index, batch in enumerate(batches) if index % world == rank]


def _gather(results: list[tuple[int, object]]) -> list:
    """Every process's (batch index, result) pairs, as one list in batch order."""
    dist = _distributed()
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, results)
    return [result for _, result in sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])]


def _work(captioner, order: tuple) -> list:
    kind, items, batch_size, options = order
    if kind == "caption":
        done = [(index, list(captioner.caption_paths(batch, batch_size=batch_size, progress=False, **options)))
                for index, batch in _my_batches(items, batch_size)]
    else:
        done = [(index, captioner.embed_paths(batch, batch_size=batch_size, progress=False))
                for index, batch in _my_batches(items, batch_size)]
    return _gather(done)


def serve(captioner) -> None:
    """A non-main process: do its share of every order until the main process is done."""
    while (order := _broadcast(None)) != DONE:
        _work(captioner, order)
    _leave()


def release() -> None:
    """The main process is done: the others stop serving (a no-op with one process)."""
    if _distributed() is not None and _distributed().get_rank() == 0:
        _broadcast(DONE)
        _leave()


def _leave() -> None:
    """Every process, once the main one is done: meet, then close the process group here. Left to interpreter
    exit, gloo's threads can abort a process that has written everything ("terminate called without an active
    exception", SIGABRT: pytorch/pytorch#190489); it happened once in CI."""
    dist = _distributed()
    dist.barrier()
    dist.destroy_process_group()


class ShardedCaptioner:
    """The main process's captioner: everything as the wrapped one, image batches shared by all processes."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def caption_paths(self, items, batch_size: int = 64, num_beams: int = 1, references: dict | None = None,
                      progress: bool = True, desc: str = "captioning", hook=None) -> Iterator[tuple]:
        items = [(int(pid), Path(path)) for pid, path in items]
        options = {"num_beams": num_beams, "references": references}
        results = _work(self.inner, _broadcast(("caption", items, batch_size, options)))
        done = 0
        for batches in results:
            for ids, batch, skipped in batches:
                done += len(ids) + len(skipped)
                if hook is not None:
                    hook(desc, done, len(items))
                yield ids, batch, skipped

    def embed_paths(self, items, batch_size: int = 128, progress: bool = True, desc: str = "embedding",
                    hook=None) -> tuple[list[int], np.ndarray, list[int]]:
        items = [(int(pid), Path(path)) for pid, path in items]
        results = _work(self.inner, _broadcast(("embed", items, batch_size, {})))
        if hook is not None:
            hook(desc, len(items), len(items))
        kept = [pid for ids, _, _ in results for pid in ids]
        chunks = [matrix for ids, matrix, _ in results if len(ids)]
        skipped = [pid for _, _, bad in results for pid in bad]
        matrix = np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)
        return kept, matrix.astype(np.float32), skipped
