"""Dense Llama/Qwen2/Qwen3 student: logits against transformers, padding, KV-cache decoding, loss, errors."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from nanoseek.config import DenseConfig
from nanoseek.errors import UserError
from nanoseek.model import build_model
from nanoseek.model.dense import DenseForCausalLM

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 2.0}


HF = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
      "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny(model_type="llama", tied=False, rope=None, **over):
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tied, rope_theta=10000.0, max_position_embeddings=256)
    kw.update(over)
    hf_cls, model_cls = HF[model_type]
    hf = model_cls(hf_cls(**kw, rope_parameters={"rope_theta": 10000.0, **rope} if rope else None)).eval()
    with torch.no_grad():                       # transformers initialises biases to zero: make them count
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
            if name.endswith(("q_norm.weight", "k_norm.weight")):   # Qwen3's per-head gains, away from 1
                p.uniform_(0.5, 1.5)
    ours = DenseForCausalLM(DenseConfig(**kw, model_type=model_type, rope_scaling=rope)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def left_padded(B=3, T=12, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : 3 * b] = 0                    # row b has 3b pad slots on the left
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("model_type,tied,rope", [
    ("llama", False, None), ("llama", True, LLAMA3), ("llama", False, LINEAR), ("qwen2", False, None),
    ("qwen2", True, YARN), ("qwen3", False, None), ("qwen3", True, YARN)])
def test_logits_match_transformers(model_type, tied, rope):
    torch.manual_seed(0)
    hf, ours = tiny(model_type, tied, rope, **({"head_dim": 24} if model_type == "qwen3" else {}))
    assert (ours.model.layers[0].self_attn.q_proj.bias is not None) == (model_type == "qwen2")
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 40))         # 40 > original context 16: the rope scaling matters
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-5
        ids, mask, pos = left_padded()
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (ref[real] - out[real]).abs().max() <= 1e-5
    assert torch.isfinite(out).all()            # padded query rows stay finite


def test_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    _, model = tiny("qwen2", num_key_value_heads=1)   # MQA: one shared K/V head
    ids, mask, pos = left_padded(B=3, T=14)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = model.new_cache(3, 16)
        assert cache.k.shape == (2, 3, 1, 16, 16)
        P = 8                                        # prefill 8 slots, then decode one token at a time
        out = model(ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P], cache=cache).logits
        assert cache.length == P
        steps = [out]
        for t in range(P, 14):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                               cache=cache).logits)
        dec = torch.cat(steps, dim=1)
        real = mask.bool()
        assert (dec[real] - full[real]).abs().max() <= 1e-5

        # dropping a finished row keeps the others decoding exactly
        cache = model.new_cache(3, 16)
        model(ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P], cache=cache)
        cache.select(torch.tensor([2, 0]))
        step = model(ids[[2, 0], P:P + 1], attention_mask=mask[[2, 0], :P + 1], position_ids=pos[[2, 0], P:P + 1],
                     cache=cache).logits
        assert (step[:, 0] - full[[2, 0], P]).abs().max() <= 1e-5
        with pytest.raises(UserError, match="KV cache holds 16"):
            model(ids, cache=cache)


def test_qwen3_cache_decoding_matches_transformers():
    """Qwen3's q/k norm runs on the new tokens only, before RoPE and the cache: decoding one token at a time
    from a prefill gives transformers' full-sequence logits (head_dim 24 != hidden 64 / 4 heads)."""
    torch.manual_seed(0)
    hf, model = tiny("qwen3", head_dim=24)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (24,)
    assert model.model.layers[0].self_attn.q_proj.bias is None
    ids, mask, pos = left_padded(B=3, T=14)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        cache = model.new_cache(3, 16)
        assert cache.k.shape == (2, 3, 2, 16, 24)
        P = 8
        steps = [model(ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P], cache=cache).logits]
        for t in range(P, 14):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                               cache=cache).logits)
    real = mask.bool()
    assert (torch.cat(steps, dim=1)[real] - ref[real]).abs().max() <= 1e-5


def test_loss_and_output_fields():
    torch.manual_seed(0)
    model = build_model(DenseConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4))
    assert isinstance(model, DenseForCausalLM)
    ids = torch.randint(0, 50, (2, 9))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)   # aligned: target of position t
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    keep = labels != -100
    ref = F.cross_entropy(out.logits.double()[keep], labels[keep])
    assert abs(out.loss.item() - ref.item()) < 1e-6
    assert out.mtp_loss.item() == 0 and out.balance_loss.item() == 0
    assert out.hidden_states.shape == (2, 9, 32) and out.logits.shape == (2, 9, 50)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model(ids).loss is None


def test_meta_build_counts_and_errors():
    cfg = DenseConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, model_type="qwen2", tie_word_embeddings=True)
    with torch.device("meta"):
        model = build_model(cfg)
    H, hd, I, L = 64, 8, 160, 3
    attn = H * 8 * hd + 8 * hd + 2 * (H * 2 * hd + 2 * hd) + 8 * hd * H     # q, k, v (+ biases), o
    per_layer = attn + 3 * H * I + 2 * H
    assert sum(p.numel() for p in model.parameters()) == 1000 * H + L * per_layer + H
    with pytest.raises(UserError, match="rope_scaling type 'dynamic'"):
        DenseForCausalLM(cfg.replace(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(UserError, match="needs 'low_freq_factor'"):
        DenseForCausalLM(cfg.replace(rope_scaling={"rope_type": "llama3", "factor": 8.0}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_heads", [2, 8])
def test_masked_attention_on_cuda_matches_float64_and_builds_no_cudnn_plan(kv_heads):
    """A masked call (padded rows: lengths that change per batch) runs the memory-efficient kernel, grouped k/v
    heads repeated for it, and gives the float64 attention of the same mask; the causal call keeps torch's order."""
    from torch.profiler import ProfilerActivity, profile

    from nanoseek.model.attention import attention_mask_for, sdpa

    g = torch.Generator().manual_seed(0)
    B, H, T, D = 3, 8, 37, 64
    q, k, v = (torch.randn(B, h, T, D, generator=g).cuda().bfloat16().requires_grad_()
               for h in (H, kv_heads, kv_heads))
    pad = torch.ones(B, T, dtype=torch.long)
    pad[0, :5] = pad[2, :11] = 0                                                  # left padding
    mask = attention_mask_for(pad.cuda(), T, 0, q.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = sdpa(q, k, v, mask)
        out.float().square().sum().backward()
    kernels = " ".join(e.key.lower() for e in prof.key_averages())
    assert "cudnn" not in kernels and ("fmha" in kernels or "efficient" in kernels), kernels[:400]
    rep = H // kv_heads
    kk, vv = (x.detach().double().repeat_interleave(rep, dim=1) for x in (k, v))
    s = (q.detach().double() @ kk.transpose(-1, -2)) * D ** -0.5
    ref = s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    assert (out.double() - ref).abs().max() < 2e-2
    assert q.grad.isfinite().all() and k.grad.shape == k.shape
    narrow = sdpa(q, k, v[..., :48], mask)           # MLA's shape: v narrower than q/k, taken unpadded
    assert narrow.shape[-1] == 48 and (narrow.double() - ref[..., :48]).abs().max() < 2e-2
