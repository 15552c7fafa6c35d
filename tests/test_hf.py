"""Hugging Face interop through disk, against transformers, in both directions.

transformers saves -> nanoseek loads, and nanoseek saves -> transformers `AutoModelForCausalLM` loads, with
float32 logits equal to 1e-5; plus per-expert / fused / sharded / FP8 checkpoints, MTP, and bad files.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from nanoseek import load_pretrained
from nanoseek.config import ModelConfig
from nanoseek.errors import UserError
from nanoseek.hf import dequantize_fp8, save_pretrained
from nanoseek.model import build_model

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
V3 = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
          num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
          first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
          max_position_embeddings=128)
IDS = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))   # 40 > 16: yarn matters


def hf_deepseek(q_lora_rank=16, yarn=False, n_group=4, topk_group=2, mtp=0):
    torch.manual_seed(0)
    cfg = DeepseekV3Config(**V3, q_lora_rank=q_lora_rank, n_group=n_group, topk_group=topk_group,
                           rope_parameters=YARN if yarn else None, num_nextn_predict_layers=mtp)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():                       # a trained selection bias, so routing depends on it
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.3)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def hf_load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("q_lora_rank,yarn,n_group,topk_group",
                         [(None, False, 1, 1), (16, True, 4, 2), (16, False, 2, 1), (None, True, 4, 4)])
def test_deepseek_v3_parity_both_ways(tmp_path, q_lora_rank, yarn, n_group, topk_group):
    hf = hf_deepseek(q_lora_rank, yarn, n_group, topk_group, mtp=1)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no MTP layer"):   # transformers writes the MTP depth, not the MTP
        ours = load_pretrained(tmp_path / "hf").eval()
    ref = logits(hf)
    assert (logits(ours) - ref).abs().max() <= 1e-5

    save_pretrained(ours, tmp_path / "ours")
    back, info = hf_load(tmp_path / "ours")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (logits(back) - ref).abs().max() <= 1e-5


def test_mtp_saved_as_hub_layer(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**{k: v for k, v in V3.items() if k != "num_key_value_heads"}, q_lora_rank=16, n_group=4,
                      topk_group=2, num_nextn_predict_layers=2)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.3)
    save_pretrained(model, tmp_path / "m")
    files = load_file(tmp_path / "m" / "model.safetensors")
    L = cfg.num_hidden_layers
    for k in (L, L + 1):                        # MTP module k at hub layer L + k, with the stored copies
        for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                    "self_attn.kv_b_proj.weight", "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
            assert f"model.layers.{k}.{key}" in files
        assert torch.equal(files[f"model.layers.{k}.embed_tokens.weight"], files["model.embed_tokens.weight"])
        assert torch.equal(files[f"model.layers.{k}.shared_head.head.weight"], files["lm_head.weight"])
    assert not any(k.endswith("gate_up_proj") for k in files)       # per-expert keys only

    again = load_pretrained(tmp_path / "m").eval()
    labels = IDS.roll(-1, dims=1)
    with torch.no_grad():
        a, b = model(IDS, labels=labels), again(IDS, labels=labels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_loss, b.mtp_loss) and a.mtp_loss > 0

    # transformers has no MTP module: it loads the trunk, with nothing missing, and sets the MTP layers aside
    hf, info = hf_load(tmp_path / "m")
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(k.startswith((f"model.layers.{L}.", f"model.layers.{L + 1}."))
                                           for k in info["unexpected_keys"])
    assert (logits(hf) - a.logits).abs().max() <= 1e-5

    # the stored head copy must be the shared head
    files[f"model.layers.{L}.shared_head.head.weight"] += 1
    save_file(files, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"model\.layers\.{L}\.shared_head\.head\.weight"):
        load_pretrained(tmp_path / "m")


def test_fused_sharded_and_bf16(tmp_path):
    hf = hf_deepseek()
    ref = logits(hf)
    # transformers >= 5 holds experts fused in memory: a checkpoint written from that state dict
    (tmp_path / "fused").mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "fused" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    assert (logits(load_pretrained(tmp_path / "fused")) - ref).abs().max() <= 1e-5

    # a sharded hub checkpoint (index + several files), read by us
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    ours = load_pretrained(tmp_path / "sharded")
    assert (logits(ours) - ref).abs().max() <= 1e-5

    # sharded by us, read by transformers; and bf16 on disk keeps the router bias in fp32
    save_pretrained(ours, tmp_path / "ours", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back, info = hf_load(tmp_path / "ours")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (logits(back) - ref).abs().max() <= 1e-5

    save_pretrained(ours, tmp_path / "bf16", dtype=torch.bfloat16)
    files = load_file(tmp_path / "bf16" / "model.safetensors")
    assert files["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert files["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    half = load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert half.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block quantiser: scale = amax / 448 per 128x128 block, E4M3 values."""
    out_f, in_f = w.shape
    scale = torch.empty(math.ceil(out_f / block), math.ceil(in_f / block))
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = blk.abs().max().clamp_min(1e-12) / 448
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_dequant_within_e4m3_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g, dtype=torch.float64)
    w[:128, 128:] *= 1e-3                       # blocks of very different magnitude, partial edge blocks
    w[256:, :] *= 50
    q, scale = quantize_fp8(w.float())
    assert scale.shape == (3, 2)
    deq = dequantize_fp8(q, scale).double()
    s = scale.double().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    # E4M3: 3 mantissa bits -> relative rounding error <= 2^-4; subnormal step 2^-9 -> absolute <= 2^-10·scale
    assert ((deq - w).abs() <= w.abs() * 2**-4 + s * 2**-10 + 1e-12).all()
    assert (deq - w).abs().max() > 0            # it really was quantised


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    hf = hf_deepseek()
    hf.save_pretrained(tmp_path / "fp8")
    files = load_file(tmp_path / "fp8" / "model.safetensors")
    reference = {}
    for key in list(files):                     # what V3 ships in FP8: every linear weight but gate and head
        t = files[key]
        if t.ndim == 2 and key.endswith("proj.weight"):
            q, scale = quantize_fp8(t)
            files[key], files[key + "_scale_inv"] = q, scale
            reference[key] = q.double() * scale.double().repeat_interleave(128, 0)[:t.shape[0]].repeat_interleave(
                128, 1)[:, :t.shape[1]]
    save_file(files, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    ours = load_pretrained(tmp_path / "fp8")
    hf_state = hf.state_dict()                  # the float64 dequantisation, fed to transformers (fused experts)
    hf_state.update({k: r.float() for k, r in reference.items() if ".mlp.experts." not in k})
    for layer in range(1, V3["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([reference[f"{p}.{e}.gate_proj.weight"], reference[f"{p}.{e}.up_proj.weight"]])
                   for e in range(8)]
        hf_state[f"{p}.gate_up_proj"] = torch.stack(gate_up).float()
        hf_state[f"{p}.down_proj"] = torch.stack([reference[f"{p}.{e}.down_proj.weight"] for e in range(8)]).float()
    hf.load_state_dict(hf_state)
    assert (logits(ours) - logits(hf)).abs().max() <= 1e-5


def test_deepseek_v2_parity_both_ways(tmp_path):
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(**V3, q_lora_rank=None, n_shared_experts=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.scoring_func == "softmax"
    ref = logits(hf)
    assert (logits(ours) - ref).abs().max() <= 1e-5
    save_pretrained(ours, tmp_path / "ours")
    back, info = hf_load(tmp_path / "ours")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (logits(back) - ref).abs().max() <= 1e-5


DENSE = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
         "llama": (LlamaConfig, LlamaForCausalLM)}


@pytest.mark.parametrize("model_type,tied,extra", [
    ("qwen2", False, {}), ("qwen2", True, {}), ("llama", False, {}), ("llama", True, {}),
    ("llama", False, {"attention_bias": True}),                  # Llama's o_proj takes the bias too
    ("qwen3", False, {"head_dim": 12}),                          # 4 heads x 12 = 48 != hidden 32
    ("qwen3", True, {"head_dim": 8, "attention_bias": True})])
def test_dense_parity_both_ways(tmp_path, model_type, tied, extra):
    torch.manual_seed(0)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tied, **extra)
    cfg_cls, model_cls = DENSE[model_type]
    hf = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):          # qwen2's q/k/v bias, nonzero
                p.normal_(std=0.1)
            if name.endswith("norm.weight"):    # gains (Qwen3's per-head q_norm / k_norm among them) away from 1
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert type(ours).__name__ == "DenseForCausalLM" and ours.config.model_type == model_type
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ref = logits(hf)
    assert (logits(ours) - ref).abs().max() <= 1e-5
    save_pretrained(ours, tmp_path / "ours")
    assert ("lm_head.weight" in load_file(tmp_path / "ours" / "model.safetensors")) != tied
    back, info = hf_load(tmp_path / "ours")
    assert type(back) is model_cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (logits(back) - ref).abs().max() <= 1e-5


def test_bad_checkpoints_are_user_errors(tmp_path):
    hf = hf_deepseek()
    good = tmp_path / "good"
    hf.save_pretrained(good, max_shard_size="40KB")
    files = sorted(good.glob("*.safetensors"))

    def variant(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    with pytest.raises(UserError, match="not a directory"):
        load_pretrained(tmp_path / "nowhere")
    d = variant("noconfig")
    (d / "config.json").unlink()
    with pytest.raises(UserError, match="config.json"):
        load_pretrained(d)
    d = variant("gpt2")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="'gpt2' is not supported"):
        load_pretrained(d)
    d = variant("truncated")
    shard = d / files[1].name
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(UserError, match=files[1].name):
        load_pretrained(d)
    d = variant("lostshard")
    (d / files[0].name).unlink()
    with pytest.raises(UserError, match=f"{files[0].name} is named by"):
        load_pretrained(d)

    def edit(name, key, value=None):
        """Copy the checkpoint and set (or, with value None, drop) one tensor in the shard that holds it."""
        d = variant(name)
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        f = d / index.get(key, files[0].name)
        state = load_file(f)
        state.pop(key, None) if value is None else state.update({key: value})
        save_file(state, f, metadata={"format": "pt"})
        return d

    cases = [
        ("model.layers.2.self_attn.kv_b_proj.weight", None, r"lacks tensor 'model\.layers\.2\.self_attn\.kv_b_proj\.weight'"),
        ("model.layers.2.mlp.experts.5.up_proj.weight", None, r"model\.layers\.2\.mlp\.experts: checkpoint has 23"),
        ("model.norm.weight", torch.ones(7), r"'model\.norm\.weight' has shape \(7,\)"),
        ("model.layers.1.mlp.experts.3.down_proj.weight", torch.ones(32, 9),
         r"'model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight' has shape \(32, 9\)"),
        ("model.layers.0.self_attn.extra.weight", torch.ones(2), r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"),
        ("model.layers.0.mlp.up_proj.weight", torch.ones(48, 32).to(torch.float8_e4m3fn),
         r"'model\.layers\.0\.mlp\.up_proj\.weight' has no 'model\.layers\.0\.mlp\.up_proj\.weight_scale_inv'"),
    ]
    for i, (key, value, message) in enumerate(cases):
        with pytest.raises(UserError, match=message):
            load_pretrained(edit(f"case{i}", key, value))
