"""Activation checkpointing (`train.activation_checkpointing`) and bf16 training of dense models.

Checkpointing must change memory, not mathematics: the gradients of a checkpointed step equal those of a plain
one (float64, dense Qwen3 and DeepSeek-V3 with MoE + MTP), the MoE expert loads are counted once per token
although the forward runs twice, and fewer tensors are kept for the backward.
"""

from types import SimpleNamespace

import pytest
import torch

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.files import read_jsonl
from nanoseek.model import build_model, expert_loads, set_activation_checkpointing
from nanoseek.train.optim import OptimConfig
from nanoseek.train.trainer import (CheckpointConfig, TrainConfig, TrainEvalConfig, forward_backward, prepare_model,
                                    train)

DEEPSEEK = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=2, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                       n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                       qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, num_nextn_predict_layers=1)
QWEN3 = DenseConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=12, model_type="qwen3", max_position_embeddings=64)


def batches(n=2, B=2, T=12, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (B, T), generator=g)
        y = torch.randint(0, vocab, (B, T), generator=g)
        y[:, :3] = -100                                   # a prompt's worth of ignored targets
        out.append((x, y))
    return out


def step(cfg, checkpoint: bool):
    """(grads by name, expert loads or None, tensors saved for the backward) of one 2-micro-batch step."""
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    set_activation_checkpointing(model, checkpoint)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_backward(model, batches(), TrainConfig(batch_size=2, seq_len=12), torch.device("cpu"))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    loads = expert_loads(model) if isinstance(cfg, ModelConfig) else None
    return grads, loads, sum(saved)


@pytest.mark.parametrize("cfg", [QWEN3, DEEPSEEK], ids=["qwen3", "deepseek_v3"])
def test_checkpointed_gradients_equal_plain_ones(cfg):
    plain, loads, saved = step(cfg, False)
    ckpt, ckpt_loads, ckpt_saved = step(cfg, True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-12, atol=1e-14, msg=name)
    assert ckpt_saved < saved / 2                        # the layers' activations were not kept
    if loads is not None:                                # each token counted once, not again in the replay
        assert torch.equal(ckpt_loads, loads)
        assert torch.all(loads.sum(-1) == 2 * 2 * 12 * cfg.num_experts_per_tok)


def test_no_checkpoint_when_no_backward_follows():
    """Generation (a KV cache, or no_grad) never pays the recomputation: the forward is the plain one."""
    model = set_activation_checkpointing(build_model(QWEN3).eval())
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        cache = model.new_cache(2, 8)
        assert torch.allclose(model(ids, cache=cache).logits, ref, atol=1e-6)


def test_bf16_checkpointed_training_of_a_dense_model(tmp_path):
    """train.precision = "bf16" + train.activation_checkpointing on a Qwen3 student: fp32 master weights,
    a bf16-autocast step whose loss is the fp32 one to bf16 rounding, and the loss falls."""
    x = torch.cat([b[0] for b in batches(4, seed=1)])
    y = torch.cat([b[1] for b in batches(4, seed=1)])
    y = torch.cat([x[:, 1:], torch.full((len(x), 1), -100)], dim=1)   # learnable: next token of a fixed row

    class Rows:
        pos = 0

        def __iter__(self):
            while True:
                i = (self.pos * 2) % len(x)
                self.pos += 1
                yield x[i:i + 2], y[i:i + 2]

        def state_dict(self):
            return {"pos": self.pos}

        def load_state_dict(self, s):
            self.pos = s["pos"]

    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        tc = TrainConfig(steps=12, batch_size=2, seq_len=12, precision=precision, activation_checkpointing=True)
        cfg = SimpleNamespace(train=tc, optim=OptimConfig(lr=3e-3, warmup_steps=1),
                              eval=TrainEvalConfig(every=0), checkpoint=CheckpointConfig(every=0, final=False))
        model = prepare_model(build_model(QWEN3), tc, torch.device("cpu"))
        assert all(layer.checkpoint for layer in model.model.layers)
        train(model, cfg, tmp_path / precision, Rows(), progress=False)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[precision] = [r["loss"] for r in read_jsonl(tmp_path / precision / "metrics.jsonl")]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=2e-2)
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.2


def test_grpo_update_with_checkpointing_equals_the_plain_one(tmp_path, base_checkpoint, monkeypatch):
    """`train.activation_checkpointing` of the RL config reaches the policy update: the checkpointed layers run
    there, and the step's weights equal the plain run's."""
    from dataclasses import replace

    from safetensors.torch import load_file

    import nanoseek.model.block as block
    from nanoseek.rl.trainer import train_rl
    from test_grpo import tiny_rl_config

    calls = []
    plain = block.checkpointed
    monkeypatch.setattr(block, "checkpointed", lambda *a: calls.append(1) or plain(*a))
    for on in (False, True):
        cfg = tiny_rl_config(base_checkpoint, 1)
        cfg = replace(cfg, train=replace(cfg.train, activation_checkpointing=on), eval=replace(cfg.eval, problems=0))
        train_rl(cfg, tmp_path / str(on), progress=False)
        assert bool(calls) == on
    a, b = (load_file(tmp_path / str(on) / "final" / "model.safetensors") for on in (False, True))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert any(not torch.equal(a[k], t) for k, t in load_file(base_checkpoint / "model.safetensors").items())
