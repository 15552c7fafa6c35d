"""How a run starts: the device, autocast, seeds, CPU threads, and joining the ranks torchrun launched."""

from __future__ import annotations

import contextlib
import gc
import os
import random
from typing import Iterator

import numpy as np
import torch

from nanoseek.errors import UserError
from nanoseek.parallel import ParallelConfig, init_distributed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name!r} but no CUDA device is visible; use train.device=\"cpu\"")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device={name!r} is not a device; use auto, cpu or cuda") from None


def autocast(device: torch.device, precision: str):
    """bf16 autocast for "bf16" and "fp8" (the FP8 GEMMs run inside it, everything else in bf16); fp32 plain."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision in ("bf16", "fp8"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise UserError(f"train.precision={precision!r}; choose fp32, bf16 or fp8")



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_torch(tc) -> torch.device:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    if tc.precision not in ("fp32", "bf16", "fp8"):
        raise UserError(f"train.precision={tc.precision!r}; choose fp32, bf16 or fp8")
    if tc.batch_size < 1 or tc.grad_accum < 1 or tc.steps < 1 or tc.seq_len < 2:
        raise UserError("train.steps, train.batch_size and train.grad_accum must be >= 1 and train.seq_len >= 2")
    return device


def steps_with_gc(steps: range, full_every: int = 100) -> Iterator[int]:
    """Iterate over a training loop's `steps`, running Python's cyclic garbage collector between steps
    instead of wherever an allocation count trips it.

    Once the first step has compiled its graphs the process holds many long-lived Python objects (graphs, guards,
    generated code), and an automatic full collection over them stops the host wherever it falls: on the H200 a
    run of 12 GRPO steps of ~1.05 s made 3 of them, 0.18-0.29 s each (benchmarks/RESULTS.md), a fifth of a step.
    So automatic collection is off inside the loop; after the first step everything alive is collected once and
    frozen (`gc.freeze`: out of every later traversal), each later step ends with a young-generation collection
    (milliseconds: what a step allocates), and every `full_every` steps with a full one over what is not frozen.
    torchtitan's trainers switch automatic collection off for the same reason. The collector's settings are
    restored when the loop ends or fails."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i, step in enumerate(steps):
            yield step
            if i == 0 or (i + 1) % full_every == 0:
                gc.collect()
            else:
                gc.collect(1)
            if i == 0:
                gc.freeze()
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def join_ranks(pc: ParallelConfig, tc, device: torch.device):
    """(ParallelContext, this rank's device) when torchrun launched several processes (WORLD_SIZE > 1):
    join the process group (NCCL on GPUs, gloo on CPU) and check the batch splits over the layout. On one
    process: (None, device), after checking that the [parallel] section asks for one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        pc.resolve(1)
        return None, device
    if device.type != ("cuda" if torch.cuda.is_available() else "cpu"):
        raise UserError(f"train.device={tc.device!r} under torchrun: the ranks use "
                        f"{'the GPUs' if torch.cuda.is_available() else 'the CPU'}; set train.device=\"auto\"")
    ctx = init_distributed(pc)
    batch = getattr(tc, "batch_size", None)
    if batch is not None:
        dp, mb = ctx.cfg.dp, ctx.cfg.microbatches
        if batch % dp:
            raise UserError(f"train.batch_size={batch} is not divisible by parallel.dp={dp}: every data-parallel "
                            "rank takes an equal share of each batch; make it a multiple")
        if ctx.cfg.pp > 1 and (batch // dp * tc.grad_accum) % mb:
            raise UserError(f"{batch // dp * tc.grad_accum} rows per rank per step do not split into "
                            f"parallel.microbatches={mb}; change train.batch_size or parallel.microbatches")
    return ctx, ctx.device


@contextlib.contextmanager
def rank0_first(ctx):
    """Rank 0 runs the body (writing the run directory: config, tokenizer, data shards) before the other
    ranks run it (reading what rank 0 wrote). All ranks have checked the run directory by then. Several
    nodes need the run directory on a file system they share."""
    if ctx is None or not ctx.distributed:
        yield
        return
    ctx.barrier()
    if not ctx.is_main:
        ctx.barrier()
    yield
    if ctx.is_main:
        ctx.barrier()
