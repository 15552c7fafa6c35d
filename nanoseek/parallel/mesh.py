"""Process groups from the torchrun environment, and the collectives the trainer needs.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. We start one process group
(NCCL for CUDA tensors plus gloo for CPU tensors on GPUs, gloo alone on CPU) and lay the ranks out as a
3-D device mesh `(pp, edp, ep)`:

    pp   pipeline stages (outermost: stage-to-stage traffic is small, it can cross nodes)
    edp  "expert data parallel": ranks that hold the SAME experts and average their gradients
    ep   expert parallel (innermost: the all-to-all is the heaviest traffic, keep it inside a node)

Data parallelism is `dp = edp × ep` (the flattened mesh dim "dp"): every dp rank reads its own slice of
the batch, so EP ranks are DP ranks too, as in V3 §3.2. With one process everything degenerates to a
context whose groups are None and whose collectives are no-ops, so the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanoseek.errors import UserError
from nanoseek.parallel.config import ParallelConfig


@dataclass
class ParallelContext:
    cfg: ParallelConfig
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None            # DeviceMesh (pp, edp, ep) or None for one process
    dp_mesh: object = None         # 1-D DeviceMesh over the dp ranks of this pipeline stage
    edp_mesh: object = None        # 1-D DeviceMesh over ranks holding the same experts
    ep_group: object = None
    ep_group_bwd: object = None    # second communicator so the DualPipeV overlap's two directions can overlap
    pp_group: object = None
    dp_group: object = None
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ---------------------------------------------------------------------------------
    def shard_batch(self, x: torch.Tensor) -> torch.Tensor:
        """This dp rank's rows of a global batch [B, ...] (every rank builds the same global batch)."""
        dp = self.cfg.dp
        if dp == 1:
            return x
        if x.shape[0] % dp:
            raise UserError(f"batch size {x.shape[0]} is not divisible by parallel.dp={dp}; make it a multiple")
        n = x.shape[0] // dp
        return x[self.dp_rank * n:(self.dp_rank + 1) * n]

    def shard_list(self, items: list) -> list:
        """Round-robin share of a list for this dp rank (GRPO prompts: whole groups stay on one rank)."""
        return items[self.dp_rank::self.cfg.dp]

    # -- reductions ---------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum", group: str = "dp") -> torch.Tensor:
        """In-place all-reduce of a tensor over the named group ("dp", "pp", "ep" or "world")."""
        pg = {"dp": self.dp_group, "pp": self.pp_group, "ep": self.ep_group, "world": dist.group.WORLD}[group]
        if not self.distributed or (pg is None and group != "world"):
            return t
        size = dist.get_world_size(pg)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
        if op == "mean":
            t.div_(size)
        return t

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over the dp group (one collective for all of them)."""
        if not self.distributed or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self._coll_device)
        self.all_reduce(t, "mean", "dp")
        return dict(zip(keys, t.tolist()))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _coll_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init_distributed(cfg: ParallelConfig | None = None) -> ParallelContext:
    """Start (or join) the process group from torchrun's environment and build the mesh."""
    cfg = cfg or ParallelConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = cfg.resolve(world)
    if world == 1:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return ParallelContext(cfg=cfg, device=dev)
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "cuda:nccl,cpu:gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    edp = cfg.dp // cfg.ep
    mesh = init_device_mesh(device.type, (cfg.pp, edp, cfg.ep), mesh_dim_names=("pp", "edp", "ep"))
    dp_mesh = mesh["edp", "ep"]._flatten("dp")
    ctx = ParallelContext(
        cfg=cfg, rank=rank, world=world, device=device, mesh=mesh, dp_mesh=dp_mesh, edp_mesh=mesh["edp"],
        ep_group=mesh.get_group("ep"), pp_group=mesh.get_group("pp"), dp_group=dp_mesh.get_group(),
        pp_rank=mesh.get_local_rank("pp"), dp_rank=dp_mesh.get_local_rank(), ep_rank=mesh.get_local_rank("ep"),
    )
    if cfg.ep > 1 and cfg.pp > 1 and cfg.schedule == "dualpipev" and cfg.overlap:
        ctx.ep_group_bwd = _same_ranks_group(ctx.ep_group)
    return ctx


def _same_ranks_group(group):
    """A second process group over the same ranks (new_group must be called on every rank, in order)."""
    mine = dist.get_process_group_ranks(group)
    all_groups = [None] * dist.get_world_size()
    dist.all_gather_object(all_groups, mine)
    out = None
    for ranks in sorted({tuple(r) for r in all_groups}):
        g = dist.new_group(list(ranks))
        if list(ranks) == mine:
            out = g
    return out


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
