"""DeepSeek-V3 model: parity with transformers, decode == full path, routing / balancing / MTP against
float64 references written from docs/DESIGN.md §3, and the V3 parameter accounting on the meta device."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from nanoseek.config import ModelConfig
from nanoseek.model import DeepseekV3ForCausalLM, build_model, expert_loads, max_violation, update_router_biases
from nanoseek.model import moe as moe_mod
from nanoseek.model.rope import rope_frequencies

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                max_position_embeddings=128, num_nextn_predict_layers=1)
    return ModelConfig(**{**base, **kw})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norms and a nonzero selection bias, so those code paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model


def hf_config(cfg: ModelConfig):
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"}, "rope_type": "yarn",
                "rope_theta": cfg.rope_theta}
    fields = ("vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers num_attention_heads "
              "n_shared_experts n_routed_experts routed_scaling_factor kv_lora_rank q_lora_rank qk_rope_head_dim "
              "v_head_dim qk_nope_head_dim n_group topk_group num_experts_per_tok first_k_dense_replace "
              "norm_topk_prob max_position_embeddings rms_norm_eps").split()
    return DeepseekV3Config(**{f: getattr(cfg, f) for f in fields}, num_key_value_heads=cfg.num_attention_heads,
                            rope_parameters=rope, attn_implementation="eager")


# ---------------------------------------------------------------- (1) parity with transformers

@pytest.mark.parametrize("q_lora,groups,yarn", [(None, (1, 1), False), (32, (4, 2), True),
                                                (32, (8, 3), False), (None, (8, 3), True)])
def test_logits_match_transformers(q_lora, groups, yarn):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny_cfg(q_lora_rank=q_lora, n_group=groups[0], topk_group=groups[1], rope_scaling=YARN if yarn else None)
    ours = randomize(DeepseekV3ForCausalLM(cfg)).eval()
    ref = transformers.DeepseekV3ForCausalLM(hf_config(cfg)).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_yarn_frequencies_blend_interpolation_and_extrapolation():
    plain, _ = rope_frequencies(64, 10000.0, None)
    yarn, attn_factor = rope_frequencies(64, 10000.0, {**YARN, "original_max_position_embeddings": 4096})
    assert torch.allclose(yarn[:4], plain[:4]) and torch.allclose(yarn[-4:], plain[-4:] / YARN["factor"])
    assert attn_factor == 1.0


# ---------------------------------------------------------------- (2) latent decode path == full path

def decode(model, ids, mask, prefill):
    """Prefill `prefill` tokens, then feed the rest one at a time through the latent cache."""
    B, T = ids.shape
    cache = model.new_cache(B, T + 2)
    chunks = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache).logits]
    for t in range(prefill, T):
        chunks.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    assert cache.length == T
    return torch.cat(chunks, 1), cache


def test_decode_path_matches_full_forward_with_left_padding():
    torch.manual_seed(1)
    cfg = tiny_cfg(rope_scaling=YARN, num_hidden_layers=2, first_k_dense_replace=0)
    model = randomize(DeepseekV3ForCausalLM(cfg)).eval()
    B, T, pad = 3, 18, 5
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    padded = ids.clone()                                  # row 1: its first T-pad tokens, left-padded
    padded[1, pad:], padded[1, :pad] = ids[1, :T - pad], 0
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :pad] = 0
    real = mask.bool()
    with torch.no_grad():
        full = model(ids).logits
        full_padded = model(padded, attention_mask=mask).logits
        # padding is invisible to the real tokens (RoPE is relative, so default arange positions are fine)
        assert (full_padded[1, pad:] - full[1, :T - pad]).abs().max() < 1e-5
        cache = model.new_cache(B, T)
        assert cache.latent.shape == (2, B, T, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        dec = torch.cat([model(ids[:, :7], cache=cache).logits] +
                        [model(ids[:, t:t + 1], cache=cache).logits for t in range(7, T)], 1)
        assert (dec - full).abs().max() < 1e-5
        dec_padded, cache = decode(model, padded, mask, prefill=7)
        assert (dec_padded - full_padded)[real].abs().max() < 1e-5
        # keeping / reordering rows (finished-sequence removal) leaves decoding consistent
        cache.select(torch.tensor([2, 0]))
        nxt = torch.randint(0, cfg.vocab_size, (2, 1))
        step = model(nxt, attention_mask=torch.ones(2, T + 1, dtype=torch.long), cache=cache).logits
        again = model(torch.cat([padded[[2, 0]], nxt], 1)).logits[:, -1:]
        assert (step - again).abs().max() < 1e-5


# ---------------------------------------------------------------- (3) routing vs a float64 reference

def reference_route(x, weight, bias, cfg):
    """docs/DESIGN.md §3 routing, one token at a time, in float64."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    chosen, mix = [], []
    for tok in x:
        s = torch.sigmoid(weight @ tok)
        sel = s + bias
        g = torch.stack([sel[j * E // G:(j + 1) * E // G].sort(descending=True).values[:2].sum() for j in range(G)])
        keep = set(g.argsort(descending=True)[:cfg.topk_group].tolist())
        sel = torch.tensor([sel[e].item() if e // (E // G) in keep else -math.inf for e in range(E)],
                           dtype=torch.float64)
        idx = sel.argsort(descending=True)[:K]
        w = s[idx] / s[idx].sum() * cfg.routed_scaling_factor
        chosen.append(idx)
        mix.append(w)
    return torch.stack(chosen), torch.stack(mix)


def reference_moe(x, layer, idx, w):
    """y = Σ_k w_k · SwiGLU_{idx_k}(x) + shared(x), float64."""
    gu, down = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
    I = down.shape[-1]
    sh = layer.shared_experts
    out = []
    for t, tok in enumerate(x.double()):
        y = torch.zeros_like(tok)
        for e, we in zip(idx[t].tolist(), w[t]):
            h = gu[e] @ tok
            y = y + we * (down[e] @ (F.silu(h[:I]) * h[I:]))
        y = y + sh.down_proj.weight.double() @ (F.silu(sh.gate_proj.weight.double() @ tok) * (sh.up_proj.weight.double() @ tok))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 3)])
def test_routing_and_moe_output_match_float64_reference(groups):
    torch.manual_seed(2)
    cfg = tiny_cfg(n_group=groups[0], topk_group=groups[1])
    model = randomize(DeepseekV3ForCausalLM(cfg))
    layer = model.model.layers[1].mlp
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.3)                     # spread the scores so choices are well separated
    x = torch.randn(1, 24, cfg.hidden_size)
    ref_idx, ref_w = reference_route(x[0], layer.gate.weight, layer.gate.e_score_correction_bias, cfg)
    _, idx, w = layer.gate(x[0])
    order = idx.sort(-1)
    ref_order = ref_idx.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    assert torch.allclose(w.gather(1, order.indices).double(), ref_w.gather(1, ref_order.indices), atol=1e-6)
    with torch.no_grad():
        y, _ = layer(x)
    assert torch.allclose(y[0].double(), reference_moe(x[0], layer, ref_idx, ref_w), atol=1e-5)


def test_only_selected_experts_run():
    torch.manual_seed(3)
    cfg = tiny_cfg(n_routed_experts=32, n_group=8, topk_group=2, num_experts_per_tok=2)
    layer = DeepseekV3ForCausalLM(cfg).model.layers[1].mlp
    N, H, I, K = 10, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    x = torch.randn(1, N, H)
    seen = []
    real = moe_mod.grouped_mm

    def spy(a, w, offs):
        seen.append(torch.diff(offs, prepend=offs.new_zeros(1)))
        return real(a, w, offs)

    with pytest.MonkeyPatch.context() as mp, FlopCounterMode(display=False) as flops:
        mp.setattr(moe_mod, "grouped_mm", spy)
        # FlopCounterMode has no formula for torch._grouped_mm: count the per-expert loop it equals
        # (test_model_speed.py::test_grouped_mm_matches_per_expert_loop)
        mp.setattr(moe_mod, "_CPU_GROUPED_MM", False)
        layer(x)
    _, idx, _ = layer.gate(x[0])
    expected = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
    assert len(seen) == 2 and all(torch.equal(s.long(), expected) for s in seen)
    shared = 3 * H * I * cfg.n_shared_experts
    # router + N·K expert SwiGLUs + shared experts: a dense all-experts pass would cost E/K times more
    assert flops.get_total_flops() == 2 * N * (H * cfg.n_routed_experts + K * 3 * H * I + shared)


def test_every_expert_pass_equals_the_routed_experts_in_float64():
    """The decode step's dense form (every expert on every row, weight 0 off the route) gives the routed sum."""
    torch.manual_seed(5)
    cfg = tiny_cfg()
    layer = DeepseekV3ForCausalLM(cfg).model.layers[1].mlp.double()
    x = torch.randn(40, cfg.hidden_size, dtype=torch.float64)
    _, idx, w = layer.gate(x)
    counts = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
    with torch.no_grad():
        routed = layer.dispatcher(x, idx, w, counts, layer.experts)
        dense = layer.experts.every_expert(x, idx, w)
    assert torch.allclose(dense, routed, rtol=1e-12, atol=1e-13)
    with torch.no_grad():                                       # the CPU keeps the routed path (compute-bound)
        assert not layer.every_expert_pays(torch.randn(64, cfg.hidden_size, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_sized_batches_take_the_every_expert_pass_on_cuda():
    torch.manual_seed(6)
    cfg = tiny_cfg(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4)
    layer = DeepseekV3ForCausalLM(cfg).model.layers[1].mlp.cuda().bfloat16()
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    rows = lambda n: torch.randn(n, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        assert layer.every_expert_pays(rows(2 * E // K + 1)) and layer.every_expert_pays(rows(128))
        assert not layer.every_expert_pays(rows(2 * E // K - 1)) and not layer.every_expert_pays(rows(129))
        x = rows(64)
        _, idx, w = layer.gate(x)
        counts = torch.bincount(idx.flatten(), minlength=E)
        routed = layer.dispatcher(x, idx, w, counts, layer.experts).float()
        dense = layer.experts.every_expert(x, idx, w).float()
    assert not layer.every_expert_pays(x)                       # with a gradient: training keeps the routed path
    assert (dense - routed).abs().max() <= 2e-2 * routed.abs().max()


@pytest.mark.parametrize("by_rank", [True, False])
@pytest.mark.parametrize("slots,E", [(1, 64), (8, 64), (512, 64), (5000, 8)])
def test_expert_order_is_the_stable_sort_by_expert(slots, E, by_rank):
    """Both ways of ordering routed slots (one-hot ranks, a decode step's way on CUDA; the sort) give the
    stable argsort, and inverse is its inverse permutation."""
    idx = torch.randint(0, E, (slots,), generator=torch.Generator().manual_seed(slots))
    order, inverse = moe_mod.expert_order(idx, torch.bincount(idx, minlength=E), by_rank)
    assert torch.equal(order, idx.argsort(stable=True))
    assert torch.equal(inverse[order], torch.arange(slots))


# ---------------------------------------------------------------- (4) auxiliary-loss-free balancing

def test_bias_update_lowers_max_violation_on_skewed_router():
    torch.manual_seed(4)
    cfg = tiny_cfg(n_group=1, topk_group=1, num_experts_per_tok=2)
    layer = DeepseekV3ForCausalLM(cfg).model.layers[1].mlp.train()
    u = torch.randn(cfg.hidden_size)
    u = u / u.norm()
    with torch.no_grad():                  # experts 0-2 love the shared direction u: a heavily skewed router
        layer.gate.weight[:3] += 0.4 * u
    weight_before = layer.gate.weight.clone()
    batches = [torch.randn(2, 32, cfg.hidden_size) * 0.3 + 2 * u for _ in range(8)]
    vio = []
    with torch.no_grad():
        for step in range(200):
            layer(batches[step % 8])
            loads = expert_loads(layer)
            vio.append(max_violation(loads)[0].item())
            update_router_biases(layer, loads, gamma=1e-3)
            assert layer.gate.expert_load.sum() == 0
    assert vio[0] > 3.0                            # the skew is real: ~all tokens go to 3 of 16 experts
    assert sum(vio[-20:]) / 20 < 0.25 * vio[0]
    assert torch.equal(layer.gate.weight, weight_before)
    assert layer.gate.e_score_correction_bias.requires_grad is False


def test_bias_update_rule_and_fp32_bias():
    model = DeepseekV3ForCausalLM(tiny_cfg())
    loads = torch.tensor([[4.0, 0.0, 2.0, 2.0] * 4] * 3)              # 3 MoE layers (2 trunk + 1 MTP)
    update_router_biases(model, loads, gamma=0.5)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(bias, torch.tensor([-0.5, 0.5, 0.0, 0.0] * 4))
    assert torch.allclose(max_violation(loads), torch.full((3,), 1.0))
    model.to(torch.bfloat16)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


# ---------------------------------------------------------------- (5) sequence-wise balance loss

def test_balance_loss_matches_float64_formula():
    torch.manual_seed(5)
    cfg = tiny_cfg()
    layer = randomize(DeepseekV3ForCausalLM(cfg)).model.layers[1].mlp
    B, T, E, K = 3, 10, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(B, T, cfg.hidden_size)
    _, loss = layer(x)
    expected = 0.0
    for b in range(B):
        idx, _ = reference_route(x[b], layer.gate.weight, layer.gate.e_score_correction_bias, cfg)
        s = torch.sigmoid(x[b].double() @ layer.gate.weight.double().T)          # [T, E]
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.tensor([E / (K * T) * (idx == i).sum().item() for i in range(E)], dtype=torch.float64)
        expected += (f * P).sum().item() / B
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()                                                   # reaches the router through P_i
    assert layer.gate.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- (6) multi-token prediction

def test_mtp_loss_matches_manual_computation():
    torch.manual_seed(6)
    D = 2
    cfg = tiny_cfg(num_nextn_predict_layers=D, num_hidden_layers=2)
    model = randomize(DeepseekV3ForCausalLM(cfg))
    B, T = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()                  # already-aligned labels
    labels[0, 3] = labels[1, 9] = -100
    out = model(inputs, labels=labels)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100))

    # reference: depth k only exists for positions i < T-k, so run it on the truncated sequence
    pos = torch.arange(T).expand(B, T)
    cos, sin = model.model.rotary_emb(pos)
    h, losses = out.hidden_states, []
    for k, m in enumerate(model.mtp, start=1):
        n = T - k
        emb = model.model.embed_tokens(inputs[:, k:])                   # token i+k for i < n
        x = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(h[:, :n])], -1))
        x = x + m.self_attn(m.input_layernorm(x), cos[:, :n], sin[:, :n])
        y, _ = m.mlp(m.post_attention_layernorm(x))
        h = m.shared_head.norm(x + y)
        logits = model.lm_head(h)
        losses.append(F.cross_entropy(logits.flatten(0, 1), labels[:, k:].flatten(), ignore_index=-100))
    assert torch.allclose(out.mtp_loss, torch.stack(losses).mean(), atol=1e-6)
    assert model(inputs).mtp_loss == 0


# ---------------------------------------------------------------- (7) V3 accounting on the meta device

def test_deepseek_v3_parameter_accounting_on_meta():
    cfg = ModelConfig.preset("deepseek-v3")
    with torch.device("meta"):
        model = build_model(cfg)
    named = dict(model.named_parameters())
    trunk = sum(p.numel() for n, p in named.items() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in named.items() if n.startswith("mtp."))
    routed = sum(p.numel() for n, p in named.items() if ".experts." in n and not n.startswith("mtp."))
    E, K, emb = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.vocab_size * cfg.hidden_size
    activated = trunk - routed * (E - K) // E
    assert round(trunk / 1e9, 2) == 671.03                    # docs/DESIGN.md §3: total (MTP excluded, as the report counts)
    assert round(activated / 1e9, 2) == 37.55                 # with embedding and head
    assert round((activated - emb) / 1e9, 1) == 36.6          # without the input embedding
    assert round(mtp / 1e9, 1) == 11.6                        # MTP unique
    assert round((mtp + 2 * emb) / 1e9, 1) == 13.5            # with the hub's stored embedding/head copies
    assert round((trunk + mtp + 2 * emb) / 1e9) == 684        # checkpoint ≈ 685B
    assert all(p.is_meta for p in named.values())
    # MLA cache: 576 values/token/layer, 70,272 bytes/token over 61 layers in bf16
    cache = model.new_cache(1, 1, dtype=torch.bfloat16)
    assert cache.latent[:, 0, 0].numel() * cache.latent.element_size() == 70272


def test_meta_model_materialises_with_init_weights():
    cfg = tiny_cfg(rope_scaling=YARN)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = DeepseekV3ForCausalLM(cfg)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if "norm" in name:
            assert torch.equal(p, q)
        else:
            assert abs(p.std().item() - 0.02) < 0.005, name
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 8))).logits).all()
