"""Many processes through torch.distributed: ``torchrun --nproc-per-node N -m lqframe.cli run …``.

torchrun starts N copies of the same command (on one machine, or several with its ``--nnodes`` /
``--rdzv-endpoint`` flags) and sets ``RANK``/``WORLD_SIZE``; :func:`group_from_env` joins them in one
process group (gloo on CPUs, NCCL on GPUs, each process on its ``LOCAL_RANK``'s GPU). Every process
reads the same model and cuts the same windows; then:

* **calibration windows are split** in contiguous shares (rank r: windows ``r·n/N … (r+1)·n/N``); each
  process runs only its share through each block, and keeps only its share's activations;
* **statistics are reduced in one fixed order**, whatever N: the accumulator's state is handed from
  rank to rank (:meth:`Group.chain`), each adding its windows in window order exactly as one process
  adds all of them, and the last rank broadcasts the sum — so the sums are bit for bit those of a
  single process (a plain all-reduce would add partial sums in a tree, and float64 addition is not
  associative: the statistics, and through them the codes, would depend on N);
* **the matrices of a block are decomposed in parallel**, each by one rank (balanced by size), and
  every compressed layer is broadcast, so that all ranks propagate the same compressed block;
* **evaluation** splits the windows too; per-window log-likelihoods are gathered and added in window
  order, as one process adds them;
* **rank 0 writes** the checkpoint, the report and the progress files (each rank writes the next
  block's inputs of its own windows, keyed by window, so that a run resumes whatever N).

The checkpoint of an N-process run is byte-identical to the one-process run (tests/test_distributed.py).
A failing rank ends its process with the error; torchrun then stops the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Group", "SINGLE", "group_from_env"]


class Group:
    """The processes of a run (one, unless torch.distributed is initialized)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Rank ``rank``'s (default: this one's) contiguous share of ``n`` items."""
        r = self.rank if rank is None else rank
        return r * n // self.world, (r + 1) * n // self.world

    def share(self, n: int) -> range:
        return range(*self.bounds(n))

    def assign(self, sizes: Sequence[float]) -> list[int]:
        """An owner rank per item, balancing the summed sizes (largest first to the least loaded;
        ties to the lower rank) — the same on every rank."""
        load = [0.0] * self.world
        owner = [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            r = min(range(self.world), key=lambda k: (load[k], k))
            owner[i] = r
            load[r] += sizes[i]
        return owner

    # ------------------------------------------------------------------ communication
    def broadcast(self, obj: Any, src: int, device: torch.device | None = None) -> Any:
        """``obj`` of rank ``src`` on every rank. ``device``: the receivers get the tensors inside it
        on this device (pickled tensors would otherwise come back on the sender's device index: on
        GPUs, another process's GPU)."""
        if not self.active:
            return obj
        import io

        import torch.distributed as dist

        payload = obj
        if device is not None and self.rank == src:
            buf = io.BytesIO()
            torch.save(obj, buf)
            payload = buf.getvalue()
        box = [payload if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        if self.rank == src or device is None:
            return obj if self.rank == src else box[0]
        return torch.load(io.BytesIO(box[0]), map_location=device, weights_only=False)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def chain(self, state: Any, step) -> Any:
        """``step(state) -> state`` run rank after rank in rank order, each starting from the state
        the rank before it ended with (``state`` on rank 0); every rank gets the last rank's result."""
        if not self.active:
            return step(state)
        import torch.distributed as dist

        if self.rank > 0:
            box = [None]
            dist.recv_object_list(box, src=self.rank - 1)
            state = box[0]
        state = step(state)
        if self.rank < self.world - 1:
            dist.send_object_list([state], dst=self.rank + 1)
        return self.broadcast(state, self.world - 1)


SINGLE = Group()


def group_from_env(device: torch.device | None = None) -> Group:
    """The process group torchrun describes in the environment (joined once), or :data:`SINGLE`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Group(dist.get_rank(), dist.get_world_size())
