"""Cross-entropy over the vocabulary, chunk by chunk: the loss never holds the [tokens, V] logits in float32.

`cross_entropy` in deepseek.py upcasts the whole bf16 logits tensor: N·V·4 bytes (8 × 2048 rows × a 129K
vocabulary: 8.5 GB) before the log-softmax, and autograd keeps its softmax for the backward — the out-of-memory
that long sequences and large vocabularies hit. Here rows go through in chunks of `chunk`:

    forward   per chunk c:  z = logits[c] in float32 (float64 stays float64)   [chunk, V], freed after the chunk
                            lse = logsumexp(z)  and  z[target]  [chunk]
              loss = Σ (lse − z[target]) / n_targets            (labels = -100 rows contribute nothing)
    backward  per chunk c:  dlogits[c] = (softmax(z) − onehot(target)) · g / n_targets, recomputed from the saved
                            logits and lse, written in the logits' dtype

Saved for the backward: the logits the lm_head already produced, and lse [N] in float32. Peak float32 memory in
the loss: one chunk (chunk × V × 4 bytes, ~0.5 GB for 1024 rows of a 129K vocabulary) instead of N × V × 4.
On CUDA with train.compile the compiled `cross_entropy` already fuses the upcast away; this is for the eager
paths (train.compile=false, the CPU) and for shapes where even the fused kernel's working set is too large.
"""

from __future__ import annotations

import torch


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # logits [N, V] (any float dtype), labels [N] with -100 = no target
        valid = labels != -100
        safe = labels.clamp_min(0)
        acc = torch.promote_types(logits.dtype, torch.float32)    # float32, or float64 for float64 logits
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=acc)                  # [N]
        total = torch.zeros((), device=logits.device, dtype=acc)
        for s in range(0, logits.shape[0], chunk):
            z = logits[s:s + chunk].to(acc)                                                   # [c, V]
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            target = z.gather(1, safe[s:s + chunk, None]).squeeze(1)                         # [c]
            total = total + ((lse[s:s + chunk] - target) * valid[s:s + chunk]).sum()
        count = valid.sum().clamp_min(1)
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.chunk = chunk
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse, count = ctx.saved_tensors
        scale = grad.to(lse.dtype) / count                                                    # d loss / d (row loss)
        valid = labels != -100
        safe = labels.clamp_min(0)
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            p = torch.exp(logits[s:s + ctx.chunk].to(lse.dtype) - lse[s:s + ctx.chunk, None])  # [c, V] softmax
            p.scatter_add_(1, safe[s:s + ctx.chunk, None], -torch.ones_like(p[:, :1]))       # − onehot(target)
            out[s:s + ctx.chunk] = p * (scale * valid[s:s + ctx.chunk])[:, None]
        return out, None, None


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean CE over labels != -100 (0 when there are none), as `deepseek.cross_entropy`, computed `chunk` rows
    at a time. logits [..., V], labels [...] (same leading shape)."""
    return _ChunkedCrossEntropy.apply(logits.flatten(0, -2), labels.flatten(), chunk)
