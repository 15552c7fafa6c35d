"""The fast training path of the DeepSeek-V3 model computes the same function as the plain one: the MoE row
dispatch with its gather-only backward, regional compilation (`compile_blocks`), and on CUDA the grouped
expert GEMM against a per-expert loop in fp32."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model import build_model
from nanoseek.model import moe as moe_mod
from nanoseek.model.compile import compile_blocks


def test_dispatch_and_combine_match_plain_indexing_forward_and_backward():
    torch.manual_seed(0)
    N, K, H = 7, 3, 5
    x = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(N, K, dtype=torch.float64, requires_grad=True)
    order = torch.randint(0, 4, (N * K,)).argsort(stable=True)          # slots sorted by a random expert id
    inverse = order.argsort()
    experts = torch.randn(N * K, H, dtype=torch.float64)                 # a stand-in per-row expert map
    dy = torch.randn(N, H, dtype=torch.float64)

    y = moe_mod._Combine.apply(moe_mod._Dispatch.apply(x, order, inverse, K) * experts, w, order, inverse)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    # the plain formulation: autograd's own scatter-add backward through an index_copy / gather
    slots = torch.empty(N * K, H, dtype=torch.float64).index_copy(0, order, x[order // K] * experts)
    y_ref = (slots.view(N, K, H) * w.unsqueeze(-1)).sum(1)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    assert torch.allclose(gx, gx_ref, rtol=0, atol=1e-12) and torch.allclose(gw, gw_ref, rtol=0, atol=1e-12)


def test_router_selection_helpers_match_topk():
    torch.manual_seed(0)
    x = torch.randn(50, 4, 8)
    x[0, 0, 3] = x[0, 0, 5] = x[0, 0].max() + 1                          # a tied maximum counts twice
    assert torch.equal(moe_mod._top2_sum(x), x.topk(2, dim=-1).values.sum(-1))
    flat = x.view(50, 32)
    got = moe_mod._top_indices(flat, 6).sort(-1).values
    assert torch.equal(got, flat.topk(6, dim=-1).indices.sort(-1).values)


def _masked_grouped_mm(x, w, offs):
    """Every expert on every row, rows outside its slice masked: traceable without host reads (CPU compile)."""
    rows = torch.arange(x.shape[0])[:, None]
    ends = offs.long()
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    sel = ((rows >= starts) & (rows < ends)).to(x.dtype)                  # [N, E]
    return torch.einsum("ne,nei->ni", sel, torch.einsum("nh,eih->nei", x, w))


def test_compile_blocks_matches_eager_and_leaves_decoding_eager(monkeypatch):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids = torch.randint(cfg.vocab_size, (2, 17))
    monkeypatch.setattr(moe_mod, "grouped_mm", _masked_grouped_mm)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(ids[:, :-1], labels=ids[:, 1:])
        (out.loss + 0.3 * out.mtp_loss + 0.1 * out.balance_loss).backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads()
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    compile_blocks(model, backend=counting_backend, fullgraph=True)
    loss_c, grads_c = loss_and_grads()
    assert calls, "compiled blocks were not used"
    # dense block, MoE block, MTP block, loss: one graph each, shared by the layers of a kind
    assert len(calls) <= 4 + 2
    assert torch.allclose(loss, loss_c, atol=1e-6)
    assert all(torch.allclose(g, gc, atol=1e-6) for g, gc in zip(grads, grads_c))

    model.eval()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        full = model(ids[:1, :4]).logits                          # a new shape: compiled again
        n = len(calls)
        step = torch.cat([model(ids[:1, t:t + 1], cache=cache).logits for t in range(4)], dim=1)
    assert len(calls) == n                        # decoding with a cache goes around the compiled blocks
    assert torch.allclose(full, step, atol=1e-5)


@pytest.mark.parametrize("device, dtype, H, tol", [
    pytest.param("cuda", torch.bfloat16, 256, 1e-2, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ("cpu", torch.float32, 256, 1e-6),                          # torch's CPU grouped kernel (aligned widths)
    ("cpu", torch.float32, 254, 1e-6),                          # unaligned width: the per-expert split loop
])
def test_grouped_mm_matches_per_expert_loop(device, dtype, H, tol):
    torch.manual_seed(0)
    E, I = 16, 96
    counts = torch.randint(0, 70, (E,))
    counts[[1, 5]] = 0                                          # empty experts, odd group sizes
    offs = counts.cumsum(0).to(device, torch.int32)
    M = int(counts.sum())
    x = torch.randn(M, H, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(E, I, H, device=device) * H ** -0.5).to(dtype).requires_grad_()
    dy = torch.randn(M, I, device=device, dtype=dtype)
    moe_mod.grouped_mm(x, w, offs).backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ends = offs.tolist()
    yr = torch.cat([F.linear(xr[s:e], wr[i]) for i, (s, e) in enumerate(zip([0] + ends[:-1], ends))])
    yr.backward(dy.double())
    y = moe_mod.grouped_mm(x, w, offs)
    for got, ref in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < tol


def test_benchmark_master_weights_step_as_fp32_adamw(load_benchmark):
    """benchmarks/train_step.py --dtype master: the fp32 masters take exactly fp32 AdamW's steps on the same
    (bf16) gradients, and the bf16 parameters are the masters rounded, after every step."""
    bench = load_benchmark("train_step")
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4, generator=g).bfloat16())
    unused = torch.nn.Parameter(torch.zeros(3).bfloat16())         # no gradient: left as it is
    ref = w.detach().float().clone().requires_grad_()
    masters = bench.MasterWeights([w, unused], lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(8, 4, generator=g).bfloat16()
        w.grad, ref.grad = grad.clone(), grad.float()
        masters.step()
        masters.zero_grad()
        opt.step()
        assert torch.equal(masters.masters[0], ref.detach()) and torch.equal(w.detach(), ref.detach().bfloat16())
        assert w.grad is None and not unused.any()
