"""Expert parallelism (V3 §3.2.2): each of the `ep` ranks holds E/ep experts; tokens travel to them.

Placement is contiguous (rank r owns experts [r·E/ep, (r+1)·E/ep)), and so are the router's groups, so the
group-limited routing of the model ("each token reaches at most `topk_group` of `n_group` groups", V3's
M = 4 nodes) becomes a limit on how many RANKS a token reaches whenever group boundaries fall on rank
boundaries (`n_group % ep == 0` or `ep % n_group == 0`; checked). Two dispatch paths:

- dedup (default, V3's way): a token is sent ONCE to every rank that hosts any of its K experts, together
  with which local experts and mixing weights it needs there; the rank returns one partial sum Σ_k w_k·E_k(x)
  per token. Traffic per token is the number of distinct ranks it visits (≤ topk_group·max(1, ep/n_group)),
  not K (`DedupDispatch`).
- per-expert: the model's local sort by expert, with `GroupedExperts` run over the ranks: the K copies of
  each token travel to the experts' ranks and back (`PerExpertDispatch`).

Either is installed as the layer's `MoE.dispatcher` (the seam the model exposes, as torchtitan's
ExpertParallel hooks do); the router, load counting, autocast cast, shared experts and balance loss stay the
model's own `MoE.forward`.

Both use `all_to_all_single` with uneven splits through a differentiable wrapper; every wait goes through
`overlap.wait` so the DualPipeV F&B step can hide it. Gradient scale: each rank's loss is its own mean, the
data-parallel average divides by dp, but an expert's gradient arrives summed over the ep ranks that sent it
tokens, so `_ScaleGrad` gives the expert computation a 1/ep weight-gradient factor (and compensates on the
activations) — then averaging expert gradients over the `edp` ranks holding the same experts is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.errors import UserError
from nanoseek.model.moe import LocalDispatch, moe_layers
from nanoseek.parallel import overlap


@dataclass
class EPComm:
    """What the patched MoE layers share: the groups, this rank's place, and traffic counters."""

    group: object
    group_bwd: object = None       # a second communicator for backward-direction all-to-alls (overlap)
    ep: int = 1
    rank: int = 0
    stats: dict = field(default_factory=lambda: {"tokens": 0, "rows": 0, "remote_rows": 0, "calls": 0})


# ---- differentiable all-to-all -----------------------------------------------------------------

def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, role: str) -> torch.Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; returns the rows received, [sum(out_splits), ...]."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    overlap.wait(work, role)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, comm: EPComm):
        ctx.splits, ctx.group = (out_splits, in_splits), comm.group_bwd or comm.group
        return _all_to_all(x, out_splits, in_splits, comm.group, "F")

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group, "B"), None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _exchange_counts(send: torch.Tensor, comm: EPComm) -> torch.Tensor:
    """send [ep, ...] counts per destination -> [ep, ...] counts per source (a tiny all-to-all)."""
    return _all_to_all(send, [1] * comm.ep, [1] * comm.ep, comm.group, "F")


def _local_experts(experts: nn.Module, x: torch.Tensor, counts: torch.Tensor, ep: int) -> torch.Tensor:
    """Run this rank's experts with a 1/ep weight-gradient factor and unchanged activation gradients."""
    y = experts(_ScaleGrad.apply(x, float(ep)), counts)
    return _ScaleGrad.apply(y, 1.0 / ep)


# ---- dedup path: one copy of a token per destination rank (replaces MoE.forward) -----------------

def dispatch_combine(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: nn.Module,
                     comm: EPComm) -> torch.Tensor:
    """x [N, H], expert ids idx [N, K] (global), mixing weights [N, K] -> Σ_k w_k·E_{idx_k}(x) [N, H]."""
    N, K = idx.shape
    ep = comm.ep
    n_local = experts.gate_up_proj.shape[0]
    dest = torch.div(idx, n_local, rounding_mode="floor")                          # [N, K] rank of each choice
    visits = torch.zeros(N, ep, dtype=torch.bool, device=x.device).scatter_(1, dest, True)   # [N, ep]
    send_rank, send_tok = visits.t().nonzero(as_tuple=True)                       # [S] rows, by rank then token
    here = dest[send_tok] == send_rank[:, None]                                   # [S, K] choice lives there
    local_e = torch.where(here, idx[send_tok] - send_rank[:, None] * n_local, -1)  # [S, K] local expert or -1
    w_rows = weights[send_tok] * here                                              # [S, K]

    send_counts = visits.sum(0)                                                    # [ep]
    recv_counts = _exchange_counts(send_counts, comm)
    in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()
    st = comm.stats
    st["tokens"] += N
    st["rows"] += len(send_tok)
    st["remote_rows"] += len(send_tok) - in_splits[comm.rank]
    st["calls"] += 1

    recv_x = _AllToAll.apply(x[send_tok], out_splits, in_splits, comm)             # [M, H]
    recv_w = _AllToAll.apply(w_rows.to(x.dtype), out_splits, in_splits, comm)      # [M, K]
    recv_e = _all_to_all(local_e, out_splits, in_splits, comm.group, "F")          # [M, K]

    row, k = (recv_e >= 0).nonzero(as_tuple=True)                                  # (row, choice) pairs here
    e = recv_e[row, k]
    order = e.argsort(stable=True)
    row, k, e = row[order], k[order], e[order]
    counts = torch.bincount(e, minlength=n_local)                                  # [E_local]
    y = _local_experts(experts, recv_x[row], counts, ep) * recv_w[row, k, None]    # [P, H]
    partial = torch.zeros_like(recv_x).index_add(0, row, y)                        # [M, H] one sum per row
    back = _AllToAll.apply(partial, in_splits, out_splits, comm)                   # [S, H]
    return torch.zeros_like(x).index_add(0, send_tok, back)


class DedupDispatch:
    """MoE dispatcher for the dedup path: `dispatch_combine` over this rank's experts and the others'."""

    def __init__(self, comm: EPComm):
        self.comm = comm

    def __call__(self, x, idx, weights, counts, experts) -> torch.Tensor:
        return dispatch_combine(x, idx, weights, experts, self.comm)


# ---- per-expert path: GroupedExperts.forward over ranks (the documented seam) ---------------------

def experts_over_ranks(experts: nn.Module, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                       comm: EPComm) -> torch.Tensor:
    """x_sorted [N, H] by global expert, tokens_per_expert [E] -> [N, H], experts on their ranks."""
    ep, n_local = comm.ep, experts.gate_up_proj.shape[0]
    send = tokens_per_expert.view(ep, n_local)                                     # [ep, E_local] I send
    recv = _exchange_counts(send, comm)                                            # [ep, E_local] I receive
    in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    st = comm.stats
    st["rows"] += x_sorted.shape[0]
    st["remote_rows"] += x_sorted.shape[0] - in_splits[comm.rank]
    st["calls"] += 1
    got = _AllToAll.apply(x_sorted, out_splits, in_splits, comm)                   # [M, H] by (source, expert)
    expert_of_row = torch.arange(n_local, device=got.device).repeat(ep).repeat_interleave(recv.flatten())
    order = expert_of_row.argsort(stable=True)                                     # -> by (expert, source)
    y = _local_experts(experts, got[order], recv.sum(0), ep)
    y = torch.empty_like(y).index_copy_(0, order, y)
    return _AllToAll.apply(y, in_splits, out_splits, comm)


class PerExpertDispatch:
    """MoE dispatcher for the per-expert path: the local sort by expert (`LocalDispatch`) around experts that
    run on their ranks (`experts_over_ranks`)."""

    def __init__(self, comm: EPComm):
        self.comm, self.local = comm, LocalDispatch()

    def __call__(self, x, idx, weights, counts, experts) -> torch.Tensor:
        return self.local(x, idx, weights, counts, lambda xs, c: experts_over_ranks(experts, xs, c, self.comm))


# ---- applying it to a model ----------------------------------------------------------------------

def check_layout(cfg, ep: int) -> None:
    """Experts must split evenly, and router groups must fall on rank boundaries (node-limited routing)."""
    E, G = cfg.n_routed_experts, cfg.n_group
    if E % ep:
        raise UserError(f"parallel.ep={ep} must divide n_routed_experts={E}")
    if G % ep and ep % G:
        raise UserError(f"parallel.ep={ep} and n_group={G}: one must divide the other so that router groups "
                        "map onto ranks (V3 node-limited routing); change parallel.ep")


def max_ranks_per_token(cfg, ep: int) -> int:
    """Upper bound on the distinct ranks a token visits: its topk_group groups span max(1, ep/G) ranks each."""
    span = max(1, ep // cfg.n_group)
    return min(cfg.topk_group * span, cfg.num_experts_per_tok, ep)


def apply_expert_parallel(model: nn.Module, comm: EPComm, dedup: bool = True) -> None:
    """Keep only this rank's slice of every MoE layer's experts and route tokens to the others' (in place)."""
    check_layout(model.config, comm.ep)
    for moe in moe_layers(model):
        ex = moe.experts
        n_local = ex.gate_up_proj.shape[0] // comm.ep
        sl = slice(comm.rank * n_local, (comm.rank + 1) * n_local)
        for name in ("gate_up_proj", "down_proj"):
            setattr(ex, name, nn.Parameter(getattr(ex, name).detach()[sl].clone()))
        moe.dispatcher = DedupDispatch(comm) if dedup else PerExpertDispatch(comm)


def is_expert_param(name: str) -> bool:
    """Parameters that expert parallelism shards along dim 0 (their FQNs keep the single-device names)."""
    return ".experts." in name
