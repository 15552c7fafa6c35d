"""DeepSeekMoE (V3 §2.1.2): fine-grained routed experts + shared experts, auxiliary-loss-free balancing.

Routing runs in float32 (the gate is one of the few fp32 parts, V3 §3.3). The selection bias b only decides
WHICH experts a token goes to; the mixing weights come from the unbiased scores, so b needs no gradient and
is moved by the load-based rule in `update_router_biases` instead. Group-limited routing keeps each token on
at most `topk_group` of `n_group` expert groups (node-limited routing: groups = nodes under expert parallel).

Execution: the N·K (token, expert) pairs are sorted by expert and every expert runs once on its contiguous
slice (no token dropping). All expert GEMMs go through `grouped_mm`, the seam that FP8 replaces; moving rows
to the experts and back goes through `MoE.dispatcher`, the seam that expert parallelism replaces. A decode step
of enough rows runs every expert densely instead (`MoE.every_expert_pays`). Shapes stay static and nothing reads
the device from the host, so on CUDA a whole MoE layer compiles into one graph
(`nanoseek.model.compile.compile_blocks`). Moving rows into and out of expert order uses only gathers and dense
sums, forward and backward: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model import packed_linears
from nanoseek.model.recompute import recomputing


class MLP(packed_linears.Packable):
    """SwiGLU feed-forward: dense layers (first_k_dense_replace) and the shared experts."""

    PACK = ("gate_proj", "up_proj")         # one GEMM when decoding (nanoseek.model.packed_linears)

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed_linears.run(self, x)
        return self.down_proj(F.silu(gate) * up)


class _RouterLogits(torch.autograd.Function):
    """logits = x·Wᵀ in fp32, also under autocast: expert selection is decided by small score gaps, so the gate
    stays out of low precision (V3 §3.3). The backward GEMMs run in the activations' precision (the autocast
    dtype, else x's) with fp32 accumulation, like every other layer's; an fp32 model stays fp32 throughout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        low = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        ctx.save_for_backward(x.to(low), weight)
        ctx.x_dtype = x.dtype
        with torch.autocast(kind, enabled=False):
            return F.linear(x.float(), weight.float())                             # [N, E]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors                                              # x in the low dtype
        with torch.autocast(x.device.type, enabled=False):
            g = grad.to(x.dtype)
            return (g @ weight.to(x.dtype)).to(ctx.x_dtype), (g.t() @ x).to(weight.dtype)


def _top2_sum(groups: torch.Tensor) -> torch.Tensor:
    """Sum of the two largest values along the last dim (= topk(2).values.sum(-1), ties included), as two
    max-reductions that fuse into one kernel; torch.topk's per-row radix selection is slow on short rows."""
    first = groups.amax(-1, keepdim=True)
    is_first = groups == first
    second = groups.masked_fill(is_first, float("-inf")).amax(-1, keepdim=True)
    second = torch.where(is_first.sum(-1, keepdim=True) > 1, first, second)      # a tied maximum counts twice
    return (first + second).squeeze(-1)


def _top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim (the set torch.topk picks, up to exact ties), by a sort:
    rows here are short (E <= 256), where a per-row sort beats torch.topk's radix selection on the GPU."""
    return x.sort(dim=-1, descending=True).indices[..., :k].contiguous()


class Router(nn.Module):
    """Scores, group-limited top-k selection with the balancing bias, and normalised mixing weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.norm_topk_prob = cfg.scoring_func, cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # b of V3 §2.1.2 (selection only) and the per-expert token counts it is updated from
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the bias and counters: a γ = 1e-3 step vanishes in bf16.
        super()._apply(fn, recurse)
        for name in ("e_score_correction_bias", "expert_load"):
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = self._buffers[name].float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> scores [N, E] fp32, expert ids [N, K], weights [N, K] fp32."""
        logits = _RouterLogits.apply(x, self.weight)                                 # [N, E] fp32
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias                     # [N, E], selection only
        if self.topk_group < self.n_group:
            groups = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # [N, G, E/G]
            # group score: sum of its top-2 (V3); the max for V2's softmax router
            group_scores = _top2_sum(groups) if self.scoring_func == "sigmoid" else groups.amax(-1)
            kept = _top_indices(group_scores, self.topk_group)                      # [N, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        idx = _top_indices(choice, self.top_k)                                       # [N, K]
        weights = scores.gather(1, idx)                                              # unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, idx, weights * self.routed_scaling_factor


def _cpu_grouped_mm_works() -> bool:
    """torch._grouped_mm has a CPU kernel (fp32 included) in recent torch; older builds raise. Probed once."""
    try:
        x, w = torch.ones(4, 4), torch.ones(1, 4, 4)
        return bool(torch._grouped_mm(x, w, offs=torch.tensor([4], dtype=torch.int32)).eq(4).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_CPU_GROUPED_MM = _cpu_grouped_mm_works()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e @ w[e]^T for x [N, in] sorted by expert, w [E, out, in], offs [E] int32 cumulative
    row ends -> [N, out]. One kernel where torch has one: bf16 on CUDA, fp32 on the CPU (2-3x a
    Python loop over 16 small experts, forward + backward); else a loop over the experts' row blocks
    (`split`, whose backward is one concatenation: slicing instead would zero-fill a full-size gradient per
    expert). The loop reads offs on the host."""
    if x.is_cuda and hasattr(torch, "_grouped_mm"):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        if dtype == torch.bfloat16:
            return torch._grouped_mm(x.bfloat16(), w.bfloat16().transpose(-2, -1), offs=offs)
    elif (x.device.type == "cpu" and _CPU_GROUPED_MM and x.dtype == w.dtype == torch.float32   # CPU training dtype
          and not torch.compiler.is_compiling()    # (torch 2.11's compiled _grouped_mm takes bf16 only)
          and not torch.is_autocast_enabled("cpu") and x.shape[-1] % 4 == 0 and w.shape[1] % 4 == 0):  # 16 B strides
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    outs = [F.linear(rows, w[i]) for i, rows in enumerate(x.split(sizes)) if rows.shape[0]]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


class _Dispatch(torch.autograd.Function):
    """x_sorted = x[order // K]: every token copied to its K slots in expert order (`order`: sorted position ->
    (token, k) slot, `inverse` the reverse map). The generic backward of this gather scatter-adds N·K rows onto
    N with atomics; here it gathers the slot gradients back through `inverse` and sums over k."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x[order // top_k]                                                  # [N*K, H]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse].view(-1, ctx.top_k, grad.shape[-1]).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """y[t] = Σ_k w[t, k] · y_sorted[inverse[t·K + k]]: expert outputs back to their tokens, mixed. Gathers
    only, forward and backward (the generic backward of the gather would scatter-add)."""

    @staticmethod
    def forward(ctx, y_sorted: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_sorted, weights, order, inverse)
        N, K = weights.shape
        y = y_sorted[inverse].view(N, K, -1)                                      # [N, K, H] (token, k) order
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)                     # [N, H]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y_sorted, weights, order, inverse = ctx.saved_tensors
        N, K = weights.shape
        y = y_sorted[inverse].view(N, K, -1)
        grad_w = (y * grad.unsqueeze(1)).sum(-1)                                  # [N, K]
        grad_y = grad[order // K] * weights.view(-1)[order].unsqueeze(-1).to(grad.dtype)  # [N*K, H] expert order
        return grad_y, grad_w.to(weights.dtype), None, None


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored fused as transformers >= 5 does: gate_up_proj [E, 2I, H] (gate rows first),
    down_proj [E, H, I]."""

    TWINS = ("gate_up_proj", "down_proj")   # cast by the GEMMs under autocast (nanoseek.model.packed_linears.twins)

    def __init__(self, n_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, H] grouped by expert, tokens_per_expert [E] -> [N, H]."""
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        gate, up = grouped_mm(x_sorted, self.gate_up_proj, offs).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj, offs)

    def every_expert(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k·E_{idx_k}(x) computed by running EVERY expert on every row, weight 0 off the row's route:
        x [N, H], idx/weights [N, K] -> [N, H]. The decode step's form (see `MoE.every_expert_pays`): two dense
        GEMMs instead of a sort, two gathers and a grouped GEMM over near-empty groups."""
        E, two_i, H = self.gate_up_proj.shape
        w = torch.zeros(x.shape[0], E, device=x.device, dtype=weights.dtype).scatter_(1, idx, weights)  # [N, E]
        gate, up = (x @ self.gate_up_proj.view(E * two_i, H).t()).view(-1, E, two_i).chunk(2, dim=-1)
        act = F.silu(gate) * up * w[..., None].to(up.dtype)                                 # [N, E, I]
        # [E, N, I] @ [E, I, H] -> [E, N, H], summed over the experts (down_proj read in place, no copy)
        return torch.bmm(act.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0)


def expert_order(flat_idx: torch.Tensor, counts: torch.Tensor,
                 by_rank: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stable sort of the N·K routed slots by expert: order [N·K] (sorted position -> slot) and inverse
    (slot -> sorted position), from expert ids flat_idx [N·K] and tokens per expert counts [E].

    by_rank (default: on CUDA for few slots, a decode step): each slot's position is its expert's first
    position plus its rank among the earlier slots of that expert, a cumsum over the one-hot [N·K, E], in place
    of a radix sort that cost ~25 us per layer at batch 64 on an H200. Else (training; the CPU, where the sort
    is cheap): the sort, which scales better."""
    E = counts.shape[0]
    arange = torch.arange(flat_idx.numel(), device=flat_idx.device)
    if by_rank is None:
        by_rank = flat_idx.is_cuda and flat_idx.numel() * E <= 1 << 18
    if not by_rank:
        order = flat_idx.argsort(stable=True)
        return order, torch.empty_like(order).scatter_(0, order, arange)
    onehot = flat_idx[:, None] == torch.arange(E, device=flat_idx.device)        # [N*K, E] (F.one_hot syncs)
    rank = onehot.cumsum(0).gather(1, flat_idx[:, None])[:, 0] - 1                # earlier slots, same expert
    inverse = (counts.cumsum(0) - counts)[flat_idx] + rank
    return torch.empty_like(inverse).scatter_(0, inverse, arange), inverse


class LocalDispatch:
    """The default dispatcher: every routed expert lives in this process.

    A dispatcher is the seam between routing and the expert computation: it takes the routed rows x [N, H]
    (already in the GEMM dtype), expert ids idx [N, K], mixing weights [N, K] and tokens per expert [E],
    and returns Σ_k w_k·E_{idx_k}(x) [N, H]. `MoE.forward` (router, load counting, dtype, shared experts,
    balance loss) stays the model's own; expert parallelism (nanoseek.parallel.expert) swaps in a
    dispatcher that ships rows to the ranks holding their experts, as torchtitan's ExpertParallel does.
    `experts(x_sorted, tokens_per_expert)` runs the expert GEMMs; a dispatcher may wrap it (the per-expert
    EP path runs this local sort around remote experts)."""

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                 experts) -> torch.Tensor:
        order, inverse = expert_order(idx.view(-1), counts)
        x_sorted = _Dispatch.apply(x, order, inverse, idx.shape[1])               # [N*K, H] grouped by expert
        return _Combine.apply(experts(x_sorted, counts), weights, order, inverse)  # [N, H]


class MoE(nn.Module):
    """y = Σ_k w_k · Expert_{idx_k}(x) + SharedExperts(x), plus the sequence-wise balance statistic.

    `dispatcher` (a plain attribute, not a module: it holds no parameters) moves routed rows to their
    experts and back; `LocalDispatch` unless expert parallelism replaced it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.dispatcher = LocalDispatch()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, H] -> (y [B, T, H], balance loss Σ_i f_i P_i averaged over the B sequences; None in eval
        mode, where no loss uses it: a decode step saves its ~10 kernels per layer)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)                                                   # [N, H]
        scores, idx, weights = self.gate(flat)                                    # [N, E], [N, K], [N, K]
        flat_idx = idx.view(-1)                                                   # [N*K]
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx))               # tokens per expert [E]
        if self.training and not recomputing():                                  # once per token, not again
            with torch.no_grad():                                                 # in a checkpoint's replay
                self.gate.expert_load += counts
        if torch.is_autocast_enabled(x.device.type):                             # move rows in the GEMM dtype
            flat = flat.to(torch.get_autocast_dtype(x.device.type))
        if self.every_expert_pays(flat):
            y = self.experts.every_expert(flat, idx, weights).to(x.dtype)              # [N, H]
        else:
            y = self.dispatcher(flat, idx, weights, counts, self.experts).to(x.dtype)  # [N, H]
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, H), self._balance_loss(scores, idx, B, T) if self.training else None

    # Rows up to which a GEMM over ALL experts stays bound by reading their weights: it does N flops per weight
    # byte read (2N per bf16 weight), under the bf16 ridge point of an H100/H200 (~700 TFLOP/s achieved over
    # 3.3-4.8 TB/s: 150-200 flops per byte).
    EVERY_EXPERT_MAX_ROWS = 128

    def every_expert_pays(self, x: torch.Tensor) -> bool:
        """Whether `GroupedExperts.every_expert` is the faster way for these N rows: a decode step on CUDA (no
        gradient, experts local and not FP8) with N·K ≥ 2E routed slots — then ≥ 86 % of the experts are touched
        (1 − e^-2), so the routed GEMMs read nearly all expert weights anyway — and N ≤ EVERY_EXPERT_MAX_ROWS, so
        the E/K-fold FLOPs of the dense pass hide under that read. On an H200 at batch 64 (`small`: 64 experts, top-6)
        the grouped GEMM read the weights at ~2 TB/s, with ~10 us of group setup, ranking and gathers per layer."""
        N = x.shape[0]
        return (x.is_cuda and not torch.is_grad_enabled() and type(self.dispatcher) is LocalDispatch
                and type(self.experts) is GroupedExperts          # FP8 experts keep their own arithmetic
                and 2 * self.n_experts <= N * self.top_k and N <= self.EVERY_EXPERT_MAX_ROWS)

    def _balance_loss(self, scores: torch.Tensor, idx: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """V3 eq. 17-20: f_i = E/(K·T)·#tokens of the sequence sent to i, P_i = mean_t s_i,t / Σ_j s_j,t."""
        E, K = self.n_experts, self.top_k
        P = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)       # [B, E]
        hits = torch.zeros(B, E, dtype=scores.dtype, device=scores.device)
        hits.scatter_add_(1, idx.view(B, T * K), torch.ones(B, T * K, dtype=scores.dtype, device=scores.device))
        f = hits * (E / (K * T))                                                  # [B, E], no gradient
        return (f * P).sum(-1).mean()


# ---- auxiliary-loss-free balancing, exposed to the trainer (V3 §2.1.2) ----

def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of the model, MTP modules included, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_loads(model: nn.Module) -> torch.Tensor:
    """[L_moe, E] token counts accumulated since the last bias update (all-reduce this under data parallel)."""
    layers = moe_layers(model)
    if not layers:
        return torch.zeros(0, 0)
    return torch.stack([m.gate.expert_load for m in layers])


@torch.no_grad()
def update_router_biases(model: nn.Module, loads: torch.Tensor, gamma: float) -> None:
    """b_i += γ · sign(mean(c) − c_i) per layer (underloaded experts get more tokens), then reset the counts."""
    for m, c in zip(moe_layers(model), loads):
        c = c.to(m.gate.e_score_correction_bias)
        m.gate.e_score_correction_bias += gamma * torch.sign(c.mean() - c)
        m.gate.expert_load.zero_()


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: (max load − mean load) / mean load, for loads [L_moe, E] -> [L_moe]."""
    loads = loads.float()
    mean = loads.mean(-1)
    return (loads.amax(-1) - mean) / mean.clamp_min(1e-12)
