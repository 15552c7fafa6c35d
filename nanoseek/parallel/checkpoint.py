"""Checkpoints across layouts: gather into the single-device layout, slice back out on load.

We chose gather-to-rank-0 over `torch.distributed.checkpoint` because nanoseek's checkpoint IS the Hugging
Face directory plus `trainer_state/` (nanoseek.run.checkpoint): gathering gives exactly the files a
single-device run writes, so a 2-rank run's checkpoint resumes on 1 rank (or 4, or any layout) with no
conversion step, and every checkpoint stays loadable by transformers. The price is that rank 0 holds one
full copy on the CPU, which is fine up to the `small` preset and beyond (tens of GB); a 671B model needs
DCP's sharded files instead.

- `gather_full(named_tensors, ctx)` -> {fqn: full CPU tensor} on global rank 0: FSDP shards are
  all-gathered (`DTensor.full_tensor`), expert slices concatenated over the ep group, pipeline stages
  merged over the pp group. Used for weights, gradients (tests) and optimizer moments.
- `optimizer_state_dict` / `load_optimizer_state_dict` convert between a sharded optimizer and the
  state_dict a single-device optimizer of the same kind would have (`make_optimizer(model)` tells the
  parameter order), so `torch.optim.Optimizer.load_state_dict` on one rank reads it unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanoseek.model import build_model
from nanoseek.parallel.expert import is_expert_param


def _full(fqn: str, t: torch.Tensor, ctx) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if ctx.cfg.ep > 1 and is_expert_param(fqn) and t.dim() > 0:
        parts = [torch.empty_like(t) for _ in range(ctx.cfg.ep)]
        dist.all_gather(parts, t.contiguous(), group=ctx.ep_group)
        t = torch.cat(parts)
    return t.detach().cpu()


def gather_full(named, ctx) -> dict[str, torch.Tensor] | None:
    """[(fqn, tensor)] in the same order on every dp rank of a stage -> full tensors on global rank 0."""
    keep = ctx.dp_rank == 0
    out = {}
    for fqn, t in named:
        full = _full(fqn, t, ctx) if ctx.distributed else t.detach().cpu()
        if keep:
            out[fqn] = full
    if ctx.cfg.pp > 1:
        got = [None] * ctx.cfg.pp if ctx.pp_rank == 0 else None
        dist.gather_object(out, got, dst=dist.get_global_rank(ctx.pp_group, 0), group=ctx.pp_group)
        out = {k: v for d in got for k, v in d.items()} if got else {}
    return out if ctx.rank == 0 else None


def _local(fqn: str, full: torch.Tensor, like: torch.Tensor, ctx) -> torch.Tensor:
    """This rank's piece of a full tensor, shaped and placed like `like` (a parameter or its state)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if ctx.cfg.ep > 1 and is_expert_param(fqn) and full.dim() > 0:
        n = full.shape[0] // ctx.cfg.ep
        full = full[ctx.ep_rank * n:(ctx.ep_rank + 1) * n]
    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full.clone()


def model_state_dict(par) -> dict[str, torch.Tensor] | None:
    """The single-device model's state_dict (weights + persistent buffers) on global rank 0."""
    named = []
    for part in par.parts:
        for fqn, t in part.state_dict().items():            # stages keep the model's names
            if fqn not in {n for n, _ in named}:
                named.append((fqn, t))
    return gather_full(named, par.ctx)


def full_model(par):
    """On global rank 0, a plain single-device copy of the trained model (for save_pretrained and
    evaluation); None elsewhere. Every rank must call it (it gathers)."""
    sd = model_state_dict(par)
    if sd is None:
        return None
    with torch.random.fork_rng(devices=[]):       # the throwaway random init must not move the training RNG
        model = build_model(par.model.config)
    model.load_state_dict(sd)
    return model.to(par.ctx.device).train(par.model.training)


def _fqn_order(par, make_optimizer) -> list[list[str]]:
    """Parameter FQNs per param group, in the order a single-device optimizer numbers them."""
    names = {id(p): n for n, p in par.model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in make_optimizer(par.model).param_groups]


def optimizer_state_dict(par, optimizer, make_optimizer) -> dict | None:
    """A sharded optimizer's state as the equivalent single-device optimizer's state_dict (rank 0)."""
    local_fqn = {id(p): n for n, p in par.named_parameters()}
    named = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, v in sorted(optimizer.state.get(p, {}).items()):
                named.append((f"{local_fqn[id(p)]}\0{key}", torch.as_tensor(v)))
    flat = gather_full(named, par.ctx)
    if par.ctx.rank != 0:
        return None
    order = _fqn_order(par, make_optimizer)
    index = {fqn: i for i, fqn in enumerate(f for g in order for f in g)}
    state: dict[int, dict] = {}
    for k, v in flat.items():
        fqn, key = k.split("\0")
        state.setdefault(index[fqn], {})[key] = v
    groups = []
    for g, fqns in zip(optimizer.param_groups, order):
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [index[f] for f in fqns]})
    return {"state": state, "param_groups": groups}


def load_optimizer_state_dict(par, optimizer, state_dict: dict, make_optimizer) -> None:
    """Load a single-device optimizer state_dict (any layout saved it) into this rank's optimizer."""
    order = _fqn_order(par, make_optimizer)
    fqn_of = dict(enumerate(f for g in order for f in g))
    full_state = {fqn_of[int(i)]: s for i, s in state_dict["state"].items()}
    local = dict(par.named_parameters())
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for fqn, p in local.items():
        if fqn not in full_state:
            continue
        optimizer.state[p] = {key: (_local(fqn, v, p, par.ctx) if torch.is_tensor(v) and v.dim() > 0 else v)
                              for key, v in full_state[fqn].items()}
