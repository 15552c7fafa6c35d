"""Run a function on N local processes the way `torchrun` would (tests and `benchmarks/parallel.py --quick`).

Each child gets torchrun's environment variables and one intra-op thread (CI has 2 cores), so code under
test goes through `init_distributed()` exactly as in a real launch. An exception in any child re-raises in
the parent with the child's traceback.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local_rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, nprocs: int, *args) -> None:
    """Call `fn(*args)` in `nprocs` fresh processes with torchrun's env; `fn` must be a module-level function."""
    mp.start_processes(_child, args=(nprocs, _free_port(), fn, args), nprocs=nprocs, start_method="spawn")
