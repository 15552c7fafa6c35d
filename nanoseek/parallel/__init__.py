"""Parallelism on torch.distributed (docs/DESIGN.md §5, V3 §3.2), applied to the single-device model from outside.

    config.py      ParallelConfig: the `[parallel]` recipe section (dp, ep, pp, schedule, ...)
    mesh.py        process group from torchrun's env, the (pp, edp, ep) device mesh, collectives
    runtime.py     parallelize(model, cfg) -> Parallel: forward_backward, clip_grad_norm_, reduce_loads
    expert.py      expert parallel: all-to-all dispatch/combine, node-limited routing on ranks
    fsdp.py        FSDP2 data parallel with mixed precision
    hfreduce.py    gradient all-reduce through host memory (Fire-Flyer HFReduce) or NCCL, overlapped
    pipeline.py    stage cut, pipeline loss, schedules (1F1B, ZB-V, DualPipeV), bubble formulas
    overlap.py     DualPipeV's overlapped forward+backward (comm of one micro-batch under compute of another)
    checkpoint.py  gather to / slice from the single-device layout (resume on any layout)
    launch.py      run a function on N local processes like torchrun (tests, --quick benchmarks)
"""

from nanoseek.parallel.config import ParallelConfig
from nanoseek.parallel.mesh import ParallelContext, init_distributed
from nanoseek.parallel.runtime import Parallel, parallelize

__all__ = ["ParallelConfig", "ParallelContext", "init_distributed", "Parallel", "parallelize"]
