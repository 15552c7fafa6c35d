"""The split-K decode attention kernel (nanoseek.kernels.decode_attention) against a float64 softmax(q·kᵀ)·v, and
a dense model's decode through it against SDPA. CUDA only (Triton)."""

from __future__ import annotations

import pytest
import torch

from nanoseek.config import DenseConfig
from nanoseek.model import attention, build_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernel)")


def _reference(q, k, v, keep, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale                      # [B, H, G, S]
    s = s.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v.double()


def _keep(B, S, gen):
    """Left padding, a filled prefix of random length, and the last (scratch) slot, as the static decoder has."""
    a = torch.arange(S)
    pad = torch.randint(0, 9, (B, 1), generator=gen)
    filled = torch.randint(10, S - 1, (B, 1), generator=gen)
    return ((a >= pad) & (a < filled)) | (a == S - 1)


@cuda
@pytest.mark.parametrize("B,H,G,d,dv,S", [
    (1, 2, 7, 64, 64, 320),         # Qwen2.5-0.5B's GQA at batch 1: many chunks per (row, head), merged
    (64, 2, 7, 64, 64, 320),        # ... at batch 64: two chunks
    (160, 2, 7, 64, 64, 320),       # ... at batch 160: one chunk, no merge
    (3, 4, 1, 128, 128, 100),       # no grouping, a cache length no block divides
    (2, 8, 16, 128, 64, 70),        # v narrower than k
])
def test_kernel_matches_float64_attention(B, H, G, d, dv, S):
    gen = torch.Generator().manual_seed(B * S)
    from nanoseek.kernels.decode_attention import decode_attention
    dev, bf = "cuda", torch.bfloat16
    cache_k = torch.randn(3, B, H, S, d, generator=gen).to(dev, bf)           # views of a bigger [L, ...] cache
    cache_v = torch.randn(3, B, H, S, dv, generator=gen).to(dev, bf)
    k, v = cache_k[1], cache_v[1]
    q = torch.randn(B, H, G, d, generator=gen).to(dev, bf)
    keep = _keep(B, S, gen).to(dev)
    scale = d ** -0.5
    ref = _reference(q, k, v, keep, scale)
    out = decode_attention(q, k, v, keep, scale)
    assert out.shape == (B, H, G, dv) and out.dtype == bf
    assert (out.double() - ref).abs().max().item() < 2e-2                     # bf16 output rounding
    compiled = torch.compile(lambda *a: decode_attention(*a, scale), fullgraph=True)
    assert (compiled(q, k, v, keep).double() - ref).abs().max().item() < 2e-2


@cuda
def test_decode_steps_through_the_kernel_match_sdpa(monkeypatch):
    """A cached decode of a few tokens of a dense GQA model: the same logits (bf16 tolerance) with the kernel and
    with SDPA, and the kernel ran in every decode step of every layer."""
    from nanoseek.kernels import decode_attention as kernel
    calls = []
    run = kernel.decode_attention
    monkeypatch.setattr(kernel, "decode_attention", lambda *a: calls.append(1) or run(*a))
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, attention_bias=True)
    with torch.device("cuda"):
        model = build_model(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (3, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                                                             # a left-padded row
    outs = []
    for use in (True, False):
        attention.DECODE_KERNEL = use
        try:
            cache = model.new_cache(3, 16)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = [model(ids[:, :8], position_ids=pos[:, :8], attention_mask=mask[:, :8], cache=cache).logits]
                for t in range(8, 12):
                    logits.append(model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], attention_mask=mask[:, :t + 1],
                                        cache=cache).logits)
            outs.append(torch.cat(logits, 1).float())
        finally:
            attention.DECODE_KERNEL = True
    assert (outs[0][:, 8:] - outs[1][:, 8:]).abs().max().item() < 5e-2 * outs[1].abs().max().item()
    assert torch.equal(outs[0][:, :8], outs[1][:, :8])                          # the prefill does not use it
    assert len(calls) == 4 * cfg.num_hidden_layers                              # every decode step, every layer
