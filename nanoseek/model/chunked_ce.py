"""Log-softmax over the vocabulary, chunk by chunk: never a float32 [tokens, V] tensor kept, rarely one made.

Upcasting a whole bf16 logits tensor before the log-softmax costs N·V·4 bytes (8 × 2048 rows × a 129K
vocabulary: 8.5 GB; an RL micro-batch of 64 × 288 rows × Qwen's 152K: 11 GB), and autograd keeps the softmax
for the backward — the out-of-memory that long sequences and large vocabularies hit, in pretraining and in the RL
update alike (TRL users' most common one). Here rows go through in chunks of about `chunk`:

    forward   per chunk c:  z = logits[c] in float32 (float64 stays float64)   [c, V], freed after the chunk
                            lse = logsumexp(z),  log p(target) = z[target] − lse       [c]
    backward  per chunk c:  dlogits[c] = (onehot(target) − softmax(z)) · g[c], recomputed from the saved
                            logits and lse, written in the logits' dtype

Saved for the backward: the logits the lm_head already produced, the targets, and lse in float32. Peak float32
memory: one chunk (chunk × V × 4 bytes, ~0.6 GB for 1024 rows of a 152K vocabulary).

    token_logprobs          log p(target) per position, with this backward: the RL update's log-probs
    chunked_cross_entropy   its masked mean (train.loss_chunk; labels -100 = no target)
    token_entropy           the softmax entropy per position, chunked, no gradient (a metric)

On CUDA the per-chunk arithmetic can run compiled (`compiled=True`: the RL trainer passes what `train.compile`
says). In pretraining with train.compile the compiled `cross_entropy` of block.py already fuses the upcast away;
these serve the eager paths (the RL update, train.compile=false, the CPU) and shapes where even the fused kernel's
working set is too large.
"""

from __future__ import annotations

import torch


def _rows_per_chunk(logits: torch.Tensor, chunk: int) -> int:
    """Leading-dim rows of logits [R, ..., V] that hold about `chunk` positions (at least one): chunking
    [B, T, V] over B keeps a sliced view (RL's response columns) uncopied."""
    per_row = logits[0, ..., 0].numel() if logits.shape[0] else 1
    return max(1, chunk // per_row)


# The per-chunk arithmetic. Eager, each is a chain of full passes over a float32 [c, ..., V] chunk (upcast,
# subtract, exp, sum, ...): a GRPO update of a Qwen2.5-0.5B-shaped model spent ~250 of its ~600 ms of kernel time
# in them on an H200 (benchmarks/RESULTS.md, 2026-12-04). Compiled on CUDA (torch.compile, dynamic shapes: one
# compilation for every chunk size) they read the bf16 chunk once or twice and write only the result.

def _lse(z: torch.Tensor) -> torch.Tensor:
    """z [c, ..., V] -> log Σ exp z [c, ...] in float32 (float64 for float64 z)."""
    return torch.logsumexp(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)


def _grad(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(g · log p(target))/dz = (onehot(target) − softmax(z)) · g for a chunk, in z's dtype."""
    p = torch.exp(z.to(lse.dtype) - lse[..., None])                                      # softmax [c, ..., V]
    hit = torch.arange(z.shape[-1], device=z.device) == targets[..., None]               # onehot(target)
    return ((hit.to(p.dtype) - p) * grad[..., None]).to(z.dtype)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    """H = Σ p·(lse − z) per position (no cancellation between two large terms), float32 (float64)."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    return (torch.exp(z - lse) * (lse - z)).sum(-1)


_COMPILED: dict = {}


def _on(device: torch.device, fn, compiled: bool):
    """fn as it runs on `device`: compiled (once per process) when asked and on CUDA; eager on the CPU, whose
    tiny shapes gain nothing worth a compilation."""
    if not compiled or device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int, compiled: bool) -> torch.Tensor:
        # logits [R, ..., V] (any float dtype), targets [R, ...] in [0, V) -> log p [R, ...] in float32 (float64)
        lse = torch.empty(targets.shape, device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))
        step, lse_of = _rows_per_chunk(logits, chunk), _on(logits.device, _lse, compiled)
        for s in range(0, logits.shape[0], step):
            lse[s:s + step] = lse_of(logits[s:s + step])
        logp = logits.gather(-1, targets[..., None]).squeeze(-1).to(lse.dtype) - lse       # z[target] − lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk, ctx.compiled = chunk, compiled
        return logp

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = grad.to(lse.dtype)
        out = torch.empty_like(logits)
        step, grad_of = _rows_per_chunk(logits, ctx.chunk), _on(logits.device, _grad, ctx.compiled)
        for s in range(0, logits.shape[0], step):
            out[s:s + step] = grad_of(logits[s:s + step], targets[s:s + step], lse[s:s + step], grad[s:s + step])
        return out, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                   compiled: bool = False) -> torch.Tensor:
    """log softmax(logits)[target] in float32 (float64 for float64 logits), with its gradient: logits [R, ..., V],
    targets [R, ...] (indices in [0, V)) -> [R, ...]. compiled: the chunk arithmetic through torch.compile on CUDA."""
    return _TokenLogprobs.apply(logits, targets, chunk, compiled)


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean CE over labels != -100 (0 when there are none), as block.py's `cross_entropy`, computed `chunk`
    positions at a time. logits [..., V], labels [...] (same leading shape)."""
    valid = labels != -100
    logp = token_logprobs(logits, labels.clamp_min(0), chunk)
    return -(logp * valid).sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk: int = 1024, compiled: bool = False) -> torch.Tensor:
    """Entropy of the softmax at each position in float32 (float64 for float64 logits), no gradient:
    logits [R, ..., V] -> [R, ...]."""
    out = torch.empty(logits.shape[:-1], device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))
    step, entropy_of = _rows_per_chunk(logits, chunk), _on(logits.device, _entropy, compiled)
    for s in range(0, logits.shape[0], step):
        out[s:s + step] = entropy_of(logits[s:s + step])
    return out
