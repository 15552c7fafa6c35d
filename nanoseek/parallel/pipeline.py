"""Pipeline parallelism on `torch.distributed.pipelining` (V3 §3.2.1): stage cut, loss, schedules, bubbles.

The cut. Stages are contiguous runs of decoder layers; the first also owns the embedding, the last the
final norm, the head and the MTP modules. MTP depth k needs the embeddings of tokens i+k and the shared
head: the head is on the last stage already, and the first stage computes the MTP token embeddings
(`embed(ids shifted by k)`, the table lives there) and sends them down the pipeline next to the hidden
state, so no parameter is duplicated and the embedding's gradient from the MTP loss flows back through the
ordinary P2P backward. Cost: D extra [mb, T, H] activations per stage boundary. Layers are split so that
decoder layers + MTP modules are spread evenly (the last stage counts its MTP modules as layers).

Schedules: gpipe, 1f1b (one stage per rank), zbv (ZB-V zero bubble) and dualpipev (two stages per rank in
a V, so rank 0 holds both the first and the last stage). DualPipeV's overlapped F&B steps run through
`overlap.register`.

A stage is the model with the parts it does not own set to None (`StageModel`), running the model's own
pieces. Losses: the last stage's loss for a micro-batch is its term of the one training objective
(`nanoseek.model.loss.training_loss`, token shares of the WHOLE step's targets), so micro-batch and rank sums
equal the single-device token means exactly, masks and all. The balance loss of a stage's MoE layers enters
where it is computed, through `_AuxLoss` (identity forward; its backward injects α/m into the loss's
gradient), since it never reaches the last stage.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nanoseek.errors import UserError
from nanoseek.model.deepseek import DeepseekV3ForCausalLM, shift_labels
from nanoseek.model.loss import target_counts, training_loss
from nanoseek.model.moe import moe_layers
from nanoseek.parallel import overlap


def split_layers(n_layers: int, n_mtp: int, n_stages: int) -> list[range]:
    """Contiguous decoder-layer ranges per stage; the last stage also runs the n_mtp MTP blocks."""
    units = n_layers + n_mtp
    if n_layers < n_stages - 1 or units < n_stages:
        raise UserError(f"{n_layers} layers (+{n_mtp} MTP) cannot fill {n_stages} pipeline stages; "
                        "lower parallel.pp or use a 1-stage-per-rank schedule")
    sizes = [units // n_stages + (s < units % n_stages) for s in range(n_stages)]
    sizes[-1] -= n_mtp                        # the last stage's share includes its MTP blocks
    while sizes[-1] < 0:                      # very few layers: move MTP's share back
        sizes[-1] += 1
        sizes[max(i for i in range(n_stages - 1) if sizes[i] > 1)] -= 1
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


class _AuxLoss(torch.autograd.Function):
    """Returns h unchanged; in backward adds `coef · aux` to the objective (grad coef for aux)."""

    @staticmethod
    def forward(ctx, h, aux, coef: float):
        ctx.save_for_backward(aux)
        ctx.coef = coef
        return h.clone()        # a fresh tensor: zero-bubble backward detaches outputs in place

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.coef), None


class StageModel(DeepseekV3ForCausalLM):
    """A pipeline stage: the model itself with the parts other stages own set to None (decoder layers outside
    `layers`; the embedding off the first stage; the final norm, head and MTP modules off the last). It shares
    every parameter, buffer and parameter name with the model and runs the model's own pieces (`decode`,
    `mtp_embeddings`, `mtp_forward`, the head); only the calling convention is the pipeline's, tensors in and
    tensors out:

        first stage:  (input_ids [b, T],)          others: (h [b, T, H], *mtp_embs)
        inner stages: (h [b, T, H], *mtp_embs)      last:   (logits [b, T, V], *mtp_logits)

    The MTP token embeddings come from the first stage (the table lives there) and travel next to h, so no
    parameter is duplicated. The balance statistic of a stage's MoE layers never reaches the loss on the last
    stage; `_AuxLoss` injects α/m times its gradient where it is computed."""

    @classmethod
    def cut(cls, model: DeepseekV3ForCausalLM, layers: range, first: bool, last: bool) -> "StageModel":
        stage, trunk = _shallow(model, cls), _shallow(model.model)
        trunk.layers = nn.ModuleList([layer if i in layers else None for i, layer in enumerate(model.model.layers)])
        if not first:
            trunk.embed_tokens = None
        if not last:
            trunk.norm, stage.lm_head, stage.mtp = None, None, nn.ModuleList()
        stage.model = trunk
        stage.first, stage.last = first, last
        stage.n_mtp = model.config.num_nextn_predict_layers
        stage.balance_coef = 0.0                 # α / microbatches, set by the runner each step
        stage.balance_values = []                # this step's balance statistics (detached), for the metrics
        stage.has_moe = bool(moe_layers(stage))
        return stage

    def _aux(self, h: torch.Tensor, balance: torch.Tensor) -> torch.Tensor:
        if not self.has_moe:
            return h
        self.balance_values.append(balance.detach())
        return _AuxLoss.apply(h, balance, self.balance_coef) if self.training and torch.is_grad_enabled() else h

    def forward(self, *inputs: torch.Tensor):
        if self.first:
            ids = inputs[0]
            h, embs = self.model.embed_tokens(ids), self.mtp_embeddings(ids)
        else:
            h, *embs = inputs
        B, T = h.shape[:2]
        cos, sin = self.model.rotary_emb(torch.arange(T, device=h.device).expand(B, T))
        h, balance = self.decode(h, cos, sin)
        if not self.last:
            return (self._aux(h, balance), *embs)
        h = self.model.norm(h)
        outs = [self.lm_head(h)]
        for h_k, b in self.mtp_forward(h, embs, cos, sin):
            outs.append(self.lm_head(h_k))
            balance = balance + b
        outs[0] = self._aux(outs[0], balance)
        return tuple(outs)


def _shallow(module: nn.Module, cls: type | None = None) -> nn.Module:
    """A new module object over the same parameters, buffers and children, with its own tables (children,
    hooks, ...): replacing a child of the copy, or FSDP hooking it, leaves the original alone."""
    out = (cls or type(module)).__new__(cls or type(module))
    out.__dict__ = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    return out


class PipelineLoss:
    """loss_fn(outputs, labels) for the schedule: the last stage's term of `training_loss` for one micro-batch,
    with the step's global target counts (all micro-batches and data-parallel ranks); the balance term is
    injected by the stages (`_AuxLoss`)."""

    def __init__(self, ce_fn, mtp_lambda: float, dp: int):
        self.ce_fn, self.mtp_lambda, self.dp = ce_fn, mtp_lambda, dp
        self.totals: torch.Tensor | None = None  # [1 + D] global target counts of the current step
        self.parts: list[torch.Tensor] = []      # per micro-batch: detached [3] shares of (CE, MTP, balance)

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        logits, *mtp_logits = outputs if isinstance(outputs, tuple) else (outputs,)
        ce = self.ce_fn(logits, labels)
        mtp_ce = (torch.stack([self.ce_fn(lg, shift_labels(labels, k)) for k, lg in enumerate(mtp_logits, 1)])
                  if mtp_logits else None)
        loss, parts = training_loss(ce, mtp_ce, None, target_counts(labels, len(mtp_logits)), self.totals,
                                    mtp_lambda=self.mtp_lambda, balance_alpha=0.0, micro_batches=1, dp=self.dp)
        self.parts.append(parts)
        return loss


def stage_indices(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """Stages this rank runs: one per rank, or (r, 2·pp−1−r) for the V-shaped schedules."""
    if schedule in ("zbv", "dualpipev"):
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank]


def cut_stages(model: nn.Module, ctx) -> tuple[list[StageModel], list[int]]:
    """This rank's stage modules of `model` and their stage indices."""
    cfg = ctx.cfg
    if model.config.tie_word_embeddings:
        raise UserError("pipeline parallel needs untied embeddings (the head is on the last stage); "
                        "set parallel.pp=1 for a model with tie_word_embeddings")
    n_stages = cfg.pp * cfg.stages_per_rank
    ranges = split_layers(len(model.model.layers), len(model.mtp), n_stages)
    mine = stage_indices(ctx.pp_rank, cfg.pp, cfg.schedule)
    return [StageModel.cut(model, ranges[s], s == 0, s == n_stages - 1) for s in mine], mine


def make_schedule(modules, mine, ctx, loss: PipelineLoss, mb_shape: tuple[int, int], act_dtype: torch.dtype,
                  stats: dict | None = None):
    """Wrap the (possibly FSDP-sharded) stage modules in PipelineStages for micro-batches of `mb_shape`
    [b, T] and build the schedule. Shapes are given up front (meta tensors), so torch runs no
    shape-inference forward (which would count expert loads and balance terms of a fake batch)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as S

    cfg = ctx.cfg
    n_stages = cfg.pp * cfg.stages_per_rank
    b, T = mb_shape
    H, V = modules[0].config.hidden_size, modules[0].config.vocab_size
    meta = dict(device="meta")
    hidden = tuple(torch.empty(b, T, H, dtype=act_dtype, requires_grad=True, **meta) for _ in range(1 + modules[0].n_mtp))
    stages = []
    for m, s in zip(modules, mine):
        inputs = (torch.empty(b, T, dtype=torch.long, **meta),) if s == 0 else hidden
        outputs = tuple(torch.empty(b, T, V, **meta) for _ in range(1 + m.n_mtp)) if s == n_stages - 1 else hidden
        stages.append(PipelineStage(m, s, n_stages, ctx.device, input_args=inputs, output_args=outputs,
                                    group=ctx.pp_group))
    cls = {"gpipe": S.ScheduleGPipe, "1f1b": S.Schedule1F1B, "zbv": S.ScheduleZBVZeroBubble,
           "dualpipev": S.ScheduleDualPipeV}[cfg.schedule]
    schedule = cls(stages[0] if cfg.stages_per_rank == 1 else stages, cfg.microbatches, loss_fn=loss,
                   scale_grads=False)
    if cfg.schedule == "dualpipev" and cfg.overlap and cfg.ep > 1:
        overlap.register(schedule, stats)
    return stages, schedule


# ---- bubbles (DualPipe paper / docs/DESIGN.md §5) ---------------------------------------------------------

def bubble_time(schedule: str, pp: int, F: float, B: float, W: float, FB: float | None = None) -> float:
    """Idle time per rank per step, F/B/W = forward, full backward (incl. W), weight-backward of one stage.

    1F1B (PP−1)(F+B); ZB1P (PP−1)(F+B−2W); DualPipeV (PP/2−1)(F&B+B−3W) with PP = the number of STAGES
    (2 per rank, so PP/2−1 = ranks−1) and F&B the time of one overlapped forward+backward pair."""
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) * (F + B)
    if schedule == "zbv":
        return (pp - 1) * (F + B - 2 * W)
    if schedule == "dualpipev":
        return (pp - 1) * ((F + B if FB is None else FB) + B - 3 * W)
    raise ValueError(schedule)


def bubble_fraction(schedule: str, pp: int, microbatches: int, F: float, B: float, W: float,
                    FB: float | None = None) -> float:
    """bubble / (bubble + work), work = every (stage, micro-batch) forward and backward this rank runs."""
    per_rank = 2 if schedule in ("zbv", "dualpipev") else 1
    work = per_rank * microbatches * (F + B)
    bubble = bubble_time(schedule, pp, F, B, W, FB)
    return bubble / (bubble + work)


def schedule_table(schedule: str, pp: int, microbatches: int) -> list[list]:
    """Per-rank compute actions of a schedule: torch's own tables for the V shapes; the textbook orders for
    GPipe (all F then all B) and 1F1B (pp−1−r warm-up forwards, then alternate) built here."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType as C
    if schedule in ("zbv", "dualpipev"):
        from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
        ops = get_schedule_ops({"zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}[schedule], pp, microbatches,
                               num_stages_per_rank=2)
        keep = (C.FORWARD, C.FULL_BACKWARD, C.BACKWARD_INPUT, C.BACKWARD_WEIGHT, C.OVERLAP_F_B)
        return [[a for a in rank if a is not None and a.computation_type in keep] for rank in ops]
    table = []
    for r in range(pp):
        f = [_Action(r, C.FORWARD, i) for i in range(microbatches)]
        b = [_Action(r, C.FULL_BACKWARD, i) for i in range(microbatches)]
        if schedule == "gpipe":
            table.append(f + b)
            continue
        warm = min(pp - 1 - r, microbatches)
        steady = [a for pair in zip(f[warm:], b) for a in pair]
        table.append(f[:warm] + steady + b[microbatches - warm:])
    return table


def simulate_bubble(schedule: str, pp: int, microbatches: int, F: float, B: float, W: float,
                    FB: float | None = None) -> list[float]:
    """Idle time per rank of the schedule's table with fixed per-stage F, B (full), W and F&B durations and
    free communication: each action starts when its rank is free and its inputs exist."""
    from torch.distributed.pipelining.schedules import _ComputationType as C
    n_stages = pp * (2 if schedule in ("zbv", "dualpipev") else 1)
    kind = {C.FORWARD: "F", C.FULL_BACKWARD: "I", C.BACKWARD_INPUT: "I", C.BACKWARD_WEIGHT: "W"}
    dur = {C.FORWARD: F, C.FULL_BACKWARD: B, C.BACKWARD_INPUT: B - W, C.BACKWARD_WEIGHT: W}

    def needs(a):
        s, mb, k = a.stage_index, a.microbatch_index, kind[a.computation_type]
        if k == "F":
            return [(s - 1, mb, "F")] if s > 0 else []
        if k == "W":
            return [(s, mb, "I")]
        return [(s, mb, "F")] + ([(s + 1, mb, "I")] if s < n_stages - 1 else [])

    table = schedule_table(schedule, pp, microbatches)
    done: dict = {}
    clock, busy, pos = [0.0] * pp, [0.0] * pp, [0] * pp
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pos[r] < len(table[r]):
                a = table[r][pos[r]]
                subs = a.sub_actions if a.computation_type == C.OVERLAP_F_B else (a,)
                own = {(x.stage_index, x.microbatch_index, kind[x.computation_type]) for x in subs}
                deps = [d for x in subs for d in needs(x) if d not in own]
                if not all(d in done for d in deps):
                    break
                t = (FB if FB is not None else F + B) if len(subs) > 1 else dur[a.computation_type]
                clock[r] = max([clock[r]] + [done[d] for d in deps]) + t
                busy[r] += t
                done.update((k, clock[r]) for k in own)
                pos[r] += 1
                progress = True
    if any(pos[r] < len(table[r]) for r in range(pp)):
        raise RuntimeError(f"schedule {schedule} deadlocks in simulation")
    span = max(clock)
    return [span - b for b in busy]
