"""Packed projections (nanoseek.model.packed_linears): q|k|v, gate|up and MLA's q_a|kv_a as one GEMM when decoding, with
the parameters re-pointed at views of the packed tensor (CPU models packed explicitly; the engine packs CUDA ones)."""

from __future__ import annotations

import copy

import torch

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.model import build_model, packed_linears
from nanoseek.train.lora import LoRAConfig, apply_lora

DENSE = DenseConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, attention_bias=True, model_type="qwen2")


def _decode_logits(model, ids):
    """Logits of a prefill of ids[:, :-2] then two cached decode steps: [B, T, V]."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        out = [model(ids[:, :-2], cache=cache).logits]
        out += [model(ids[:, t:t + 1], cache=cache).logits for t in (ids.shape[1] - 2, ids.shape[1] - 1)]
    return torch.cat(out, 1)


def _groups(model):
    return [m for m in model.modules() if getattr(m, "PACK", ())]


def test_packed_linears_keep_parameters_and_outputs_and_runs_one_gemm_per_group():
    for cfg in (DENSE, ModelConfig.preset("tiny")):
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        ids = torch.randint(0, 128, (2, 9))
        before = _decode_logits(model, ids)
        params = dict(model.named_parameters())
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert packed_linears.pack(model, devices=("cpu",)) is True
        assert packed_linears.pack(model, devices=("cpu",)) is False                   # already packed: nothing moves
        assert dict(model.named_parameters()).keys() == params.keys()
        assert all(p is params[n] for n, p in model.named_parameters())        # the same Parameter objects
        after = model.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
        groups = _groups(model)
        assert len(groups) >= 2 * cfg.num_hidden_layers                         # attention and MLP of each layer
        for m in groups:
            g = m._packed
            assert torch.equal(g.weight, torch.cat([getattr(m, n).weight for n in g.names]))
            assert getattr(m, g.names[0]).weight.data_ptr() == g.weight.data_ptr()
        calls = []
        real = torch.nn.functional.linear
        torch.nn.functional.linear = lambda *a: calls.append(a[1].shape) or real(*a)
        try:
            with packed_linears.decoding():
                inside = _decode_logits(model, ids)
            n_inside = len(calls)
            calls.clear()
            outside = _decode_logits(model, ids)
        finally:
            torch.nn.functional.linear = real
        assert torch.allclose(inside, before, atol=1e-5) and torch.equal(outside, before)
        per_group = sum(len(m.PACK) - 1 for m in _groups(model.model))           # GEMMs saved per forward (MTP
                                                                                # blocks do not run in a decode)
        assert len(calls) - n_inside == 3 * per_group                           # three forwards


def test_optimizer_steps_reach_the_packed_weights_and_a_lost_view_is_repacked_in_place():
    torch.manual_seed(0)
    model = build_model(DENSE)
    with torch.inference_mode():                                              # a caller decoding in inference mode
        packed_linears.pack(model, devices=("cpu",))
    attn = model.model.layers[0].self_attn
    buffer = attn._packed.weight
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True).step()
    assert torch.equal(buffer[:attn.q_proj.weight.shape[0]], attn.q_proj.weight)   # updated in place: still views
    attn.k_proj.weight.data = attn.k_proj.weight.data.clone() + 1.0                # e.g. a load that replaced .data
    assert packed_linears.pack(model, devices=("cpu",)) is True
    assert attn._packed.weight is buffer                                          # the same storage, new values
    assert torch.equal(buffer, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert attn.k_proj.weight.data_ptr() == buffer[attn.q_proj.weight.shape[0]:].data_ptr()


def test_a_copy_of_a_packed_model_carries_no_packed_tensors():
    model = build_model(DENSE)
    packed_linears.pack(model, devices=("cpu",))
    twin = copy.deepcopy(model)
    assert all(m._packed is None for m in _groups(twin)) and all(m._packed is not None for m in _groups(model))
    ids = torch.randint(0, 128, (2, 8))
    assert torch.equal(twin(ids).logits, model(ids).logits)
    twin.model.layers[0].self_attn.q_proj.weight.data.zero_()                 # its own storage
    assert model.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0


def test_groups_that_cannot_be_packed_stay_separate():
    model = build_model(DENSE)
    assert packed_linears.pack(model) is False                                       # CPU weights: the engine packs CUDA only
    apply_lora(model, LoRAConfig(r=4, alpha=8))                            # LoRA linears are not plain nn.Linear
    packed_linears.pack(model, devices=("cpu",))
    assert model.model.layers[0].self_attn._packed is None and model.model.layers[0].mlp._packed is None


def test_autocast_decoding_from_low_precision_twins_is_bit_identical_and_follows_updates():
    """fp32 masters under bf16 autocast (the GRPO trainer's rollouts): the static engine decoding from the bf16
    twins (packed groups included) samples the tokens and log-probs of decoding from the masters, bit for bit;
    its decode steps' GEMMs read bf16 weights; an optimizer step between calls reaches the twins, refreshed in
    place (the same storage, so captured graphs stay valid)."""
    from functools import partial
    from unittest import mock

    from nanoseek.sampling.rollout import SamplingConfig, generate

    pack, twins, linear = packed_linears.pack, packed_linears.twins, torch.nn.functional.linear
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [1, 2, 3]]
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.9, stop=[], decode="static")
    for model_cfg in (DENSE, ModelConfig.preset("tiny")):
        torch.manual_seed(0)
        model = build_model(model_cfg).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(20)                               # sharper logits: rounding would show

        def run(devices, dtypes):
            spy = lambda x, w, *a: dtypes.append(w.dtype) or linear(x, w, *a)   # noqa: E731
            with mock.patch.object(packed_linears, "pack", partial(pack, devices=devices)), \
                    mock.patch.object(packed_linears, "twins", partial(twins, devices=devices)), \
                    mock.patch.object(torch.nn.functional, "linear", spy), torch.autocast("cpu", dtype=torch.bfloat16):
                return generate(model, prompts, cfg, [], generator=torch.Generator().manual_seed(1))

        masters, low = [], []
        want = run((), masters)                                         # nothing packed: autocast casts the masters
        got = run(("cpu",), low)
        tw = packed_linears._TWINS[model][1]
        assert tw and all(t.dtype == torch.bfloat16 for t in tw.values())
        assert torch.bfloat16 not in masters and low.count(torch.bfloat16) > len(low) // 2
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logprobs, want.logprobs)
        storage = {n: t.data_ptr() for n, t in tw.items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        got = run(("cpu",), [])
        assert {n: t.data_ptr() for n, t in packed_linears._TWINS[model][1].items()} == storage
        want = run((), [])
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logprobs, want.logprobs)
