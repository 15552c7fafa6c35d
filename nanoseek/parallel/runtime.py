"""`parallelize(model, cfg)`: the single-device model, laid out over the ranks, behind one training API.

The trainer keeps one loop for every layout. It builds the usual model on every rank (same seed, or
loaded from a checkpoint), calls `parallelize`, builds its optimizer over `par.parameters()`, and per
step calls `par.forward_backward(micro_batches, ...)` and `par.clip_grad_norm_(...)`; one process gets
`Parallel.single(model)`, a world of size 1, so no trainer branches on the layout. What changes with
the layout is hidden here:

    dp  (fsdp | ddp | hfreduce)  each rank takes its rows of every global batch; gradients are averaged
    ep                           MoE layers keep E/ep experts and exchange tokens (expert.py)
    pp                           the model is cut into stages run by a pipeline schedule (pipeline.py)

The objective is `nanoseek.model.loss.training_loss` everywhere (whole model, pipeline stages, one process).
Losses are normalised by the step's GLOBAL target counts, so the gradients equal the single-device ones
(tests/test_parallel_*.py check this to float32 tolerance). Checkpoints are gathered into the
single-device layout (checkpoint.py), so any layout can resume any other.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.errors import UserError
from nanoseek.model.loss import target_counts, training_loss
from nanoseek.parallel.checkpoint import full_model, load_optimizer_state_dict, optimizer_state_dict
from nanoseek.parallel.config import ParallelConfig
from nanoseek.parallel.expert import EPComm, apply_expert_parallel, is_expert_param
from nanoseek.parallel.fsdp import apply_fsdp
from nanoseek.parallel.hfreduce import GradReducer
from nanoseek.parallel.mesh import ParallelContext, init_distributed
from nanoseek.parallel.pipeline import PipelineLoss, cut_stages, make_schedule


class Parallel:
    """One model laid out over the ranks of `ctx`: `parts` are this rank's modules (the model itself, or its
    pipeline stages), `schedule` the pipeline schedule (None without pp), `reducers` the ddp/hfreduce
    gradient averagers (empty under FSDP, which reduces inside backward)."""

    def __init__(self, model: nn.Module, ctx: ParallelContext):
        self.model, self.ctx = model, ctx
        cfg = ctx.cfg
        self.stats: dict = {}
        self.ep_comm = None
        if cfg.ep > 1:
            self.ep_comm = EPComm(group=ctx.ep_group, group_bwd=ctx.ep_group_bwd, ep=cfg.ep, rank=ctx.ep_rank)
            apply_expert_parallel(model, self.ep_comm, dedup=cfg.ep_dedup)
        model.to(ctx.device)
        self.schedule, self._schedule_shape = None, None
        if cfg.pp > 1:
            self.parts, self.stage_ids = cut_stages(model, ctx)
            self.loss = PipelineLoss(model.loss_fn, 0.0, cfg.dp)
        else:
            self.parts, self.stage_ids = [model], [0]
        self.reducers = []
        self.parts_use_bf16 = False                          # activations between stages are bf16 under FSDP bf16
        if ctx.distributed and cfg.dp > 1 and cfg.dp_mode == "fsdp":
            self.parts_use_bf16 = cfg.param_dtype == "bfloat16"
            apply_fsdp(self.parts, ctx)
        elif ctx.distributed and cfg.dp > 1:
            self._make_reducers(host=cfg.dp_mode == "hfreduce")

    @classmethod
    def single(cls, model: nn.Module) -> "Parallel":
        """One process: a world of size 1 on the model's device (every collective a no-op), so a trainer has
        one code path for every layout."""
        device = next(model.parameters()).device
        return cls(model, ParallelContext(cfg=ParallelConfig().resolve(1), device=device))

    # -- parameters --------------------------------------------------------------------------------
    def named_parameters(self):
        """(single-device FQN, parameter) for this rank's parameters, each once."""
        seen = set()
        for part in self.parts:
            for name, p in part.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def module(self) -> nn.Module:
        """A module over this rank's parameters (what to build the optimizer on)."""
        return self.parts[0] if len(self.parts) == 1 else nn.ModuleList(self.parts)

    def _make_reducers(self, host: bool) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        named = list(self.named_parameters())
        dense = [p for n, p in named if not (cfg.ep > 1 and is_expert_param(n))]
        expert = [p for n, p in named if cfg.ep > 1 and is_expert_param(n)]
        self.reducers = [GradReducer(dense, ctx.dp_group, cfg.bucket_mb, host)]
        if expert and cfg.dp // cfg.ep > 1:
            self.reducers.append(GradReducer(expert, ctx.edp_mesh.get_group(), cfg.bucket_mb, host))
        for r in self.reducers:
            r.armed = cfg.pp == 1

    # -- one step's forward and backward -----------------------------------------------------------
    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]], mtp_lambda: float = 0.3,
                         balance_alpha: float = 1e-4, autocast=contextlib.nullcontext) -> dict[str, float]:
        """Accumulate the gradient of CE + λ·MTP + α·L_bal over the step's GLOBAL batch (micro: list of
        (input_ids, labels) [B, T] as every rank reads them). Returns dp-averaged metrics."""
        ctx, cfg = self.ctx, self.ctx.cfg
        n_mtp = len(getattr(self.model, "mtp", ()))
        micro = [(ctx.shard_batch(x), ctx.shard_batch(y)) for x, y in micro]
        counts = [target_counts(y, n_mtp) for _, y in micro]                  # where the labels are: no sync
        totals = torch.stack(counts).sum(0).to(ctx._coll_device)
        ctx.all_reduce(totals, "sum", "dp")                                    # [1 + D] global target counts
        totals = totals.to(ctx.device)
        if cfg.pp > 1:
            return self._pipeline_step(micro, totals, mtp_lambda, balance_alpha, autocast)
        parts = torch.zeros(3, device=ctx.device)
        fsdp = hasattr(self.model, "set_requires_gradient_sync")
        for i, ((x, y), n) in enumerate(zip(micro, counts)):
            last = i == len(micro) - 1
            if fsdp:
                self.model.set_requires_gradient_sync(last)
            for r in self.reducers:
                r.armed = last
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with autocast():
                out = self.model(x, labels=y)
            loss, share = training_loss(out.loss, out.mtp_losses, out.balance_loss, n.to(ctx.device), totals,
                                        mtp_lambda=mtp_lambda, balance_alpha=balance_alpha,
                                        micro_batches=len(micro), dp=cfg.dp)
            loss.backward()
            parts = parts + share
        self.finish_grads()
        return self._metrics(parts)

    def _metrics(self, parts: torch.Tensor) -> dict[str, float]:
        """This rank's [3] shares of (CE, MTP, balance), summed over the dp ranks (one collective, one sync)."""
        t = parts.double().to(self.ctx._coll_device)
        self.ctx.all_reduce(t, "sum", "dp")
        ce, mtp, bal = t.tolist()
        return {"loss": ce, "mtp_loss": mtp, "balance_loss": bal}

    def _pipeline_step(self, micro, totals, mtp_lambda, balance_alpha, autocast) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        x = torch.cat([m[0] for m in micro]).to(ctx.device)
        y = torch.cat([m[1] for m in micro]).to(ctx.device)
        if x.shape[0] % cfg.microbatches:
            raise UserError(f"per-rank batch {x.shape[0]} is not divisible by parallel.microbatches={cfg.microbatches}")
        shape = (x.shape[0] // cfg.microbatches, x.shape[1])
        if shape != self._schedule_shape:                   # stages are built for one micro-batch shape
            act = torch.bfloat16 if self.parts_use_bf16 else torch.float32
            self.stages, self.schedule = make_schedule(self.parts, self.stage_ids, ctx, self.loss, shape, act, self.stats)
            self._schedule_shape = shape
        self.loss.mtp_lambda, self.loss.totals = mtp_lambda, totals
        self.loss.parts.clear()
        for part in self.parts:
            part.balance_coef = balance_alpha / cfg.microbatches
            part.balance_values.clear()
        with autocast():
            self.schedule.step(x, target=y, return_outputs=False)
        self.finish_grads()
        parts = torch.stack(self.loss.parts).sum(0).cpu() if self.loss.parts else torch.zeros(3)
        bal = sum((torch.stack(p.balance_values).sum() for p in self.parts if p.balance_values), torch.zeros(()))
        parts[2] = bal.cpu() / (cfg.microbatches * cfg.dp)                    # balance share, as training_loss's
        t = parts.double().to(ctx._coll_device)
        ctx.all_reduce(t, "sum", "pp")                      # only one stage holds the CE; balance sums over layers
        return self._metrics(t)

    def finish_grads(self) -> None:
        """ddp / hfreduce: wait for the gradient averages (call after your own backward if you do not use
        forward_backward); FSDP reduces inside backward, so this is a no-op there."""
        for r in self.reducers:
            r.finish()
            r.armed = self.ctx.cfg.pp == 1

    # -- gradient clipping over all shards ---------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm of all gradients (every stage, shard and expert counted once); scale if > max_norm."""
        from torch.distributed.tensor import DTensor
        ctx, cfg = self.ctx, self.ctx.cfg
        if not ctx.distributed:                               # one process: torch's own clip, as always
            return float(torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm if max_norm > 0 else math.inf))
        # squared norms by how a gradient is spread: [dp-sharded, edp-sharded expert, expert, replicated]
        sq = torch.zeros(4, device=ctx.device)
        grads = []
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            expert, sharded = cfg.ep > 1 and is_expert_param(name), isinstance(p.grad, DTensor)
            g = p.grad.to_local() if sharded else p.grad
            grads.append(g)
            sq[(1 if sharded else 2) if expert else (0 if sharded else 3)] += g.float().pow(2).sum()
        if ctx.distributed:
            if cfg.dp > 1:
                dist.all_reduce(sq[0:1], group=ctx.dp_group)
            if cfg.dp // cfg.ep > 1:
                dist.all_reduce(sq[1:2], group=ctx.edp_mesh.get_group())
            if cfg.ep > 1:
                dist.all_reduce(sq[1:3], group=ctx.ep_group)    # each ep rank holds different experts
        total = sq.sum()
        if cfg.pp > 1:
            dist.all_reduce(total, group=ctx.pp_group)
        norm = float(total.sqrt())
        if max_norm > 0 and math.isfinite(max_norm) and norm > max_norm and grads:
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
        return norm

    # -- the single-device view (checkpoints, evaluation) ------------------------------------------
    def full_model(self) -> nn.Module | None:
        """On global rank 0 the model in its single-device form (the model itself on one process, a gathered
        copy otherwise); None on the other ranks. Every rank must call it (it gathers)."""
        return full_model(self) if self.ctx.distributed else self.model

    def optimizer_state_dict(self, optimizer, make_optimizer) -> dict | None:
        """The optimizer's state as the single-device optimizer's state_dict (rank 0; None elsewhere)."""
        return optimizer_state_dict(self, optimizer, make_optimizer) if self.ctx.distributed else optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer, state: dict, make_optimizer) -> None:
        """Load a single-device optimizer state_dict, whichever layout saved it."""
        if self.ctx.distributed:
            load_optimizer_state_dict(self, optimizer, state, make_optimizer)
        else:
            optimizer.load_state_dict(state)

    # -- MoE balancing under data parallel ---------------------------------------------------------
    def reduce_loads(self, loads: torch.Tensor) -> torch.Tensor:
        """Sum the [L_moe, E] expert loads over every rank: dp ranks saw different tokens, and under pp each
        stage counted only its own layers (the others stay zero)."""
        if not self.ctx.distributed:
            return loads
        out = loads.to(self.ctx._coll_device).clone()
        dist.all_reduce(out)
        return out.to(loads.device)


def parallelize(model: nn.Module, cfg: ParallelConfig | None = None, ctx: ParallelContext | None = None) -> Parallel:
    """Start the process group (from torchrun's env) if needed and lay `model` out over the ranks."""
    ctx = ctx or init_distributed(cfg)
    return Parallel(model, ctx)
