"""`nanoseek info`: meta-device counts against an analytic count from the config and docs/DESIGN.md §3 / §8 figures."""

import json

import pytest

from nanoseek.cli import main
from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.info import account


def analytic(cfg: ModelConfig) -> dict:
    """Parameter counts written out from the V3 architecture (V3 §2), independent of the module tree."""
    H, nh, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        attn = H * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * nh * qk
    else:
        attn = H * nh * qk
    attn += H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    attn += cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim) + nh * cfg.v_head_dim * H
    expert = 3 * H * cfg.moe_intermediate_size
    dense = attn + 2 * H + 3 * H * cfg.intermediate_size
    moe_common = attn + 2 * H + cfg.n_shared_experts * expert + cfg.n_routed_experts * H   # + router
    moe_total = moe_common + cfg.n_routed_experts * expert
    moe_active = moe_common + cfg.num_experts_per_tok * expert
    k, L = cfg.first_k_dense_replace, cfg.num_hidden_layers
    embed, head = V * H, 0 if cfg.tie_word_embeddings else V * H
    mtp = cfg.num_nextn_predict_layers * (moe_total + 2 * H * H + 3 * H)   # + eh_proj, enorm, hnorm, head norm
    return {
        "total": embed + head + H + k * dense + (L - k) * moe_total,
        "activated": embed + head + H + k * dense + (L - k) * moe_active,
        "mtp": mtp,
        "kv": 2 * L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        "mha_kv": 2 * L * nh * (qk + cfg.v_head_dim),
    }


@pytest.mark.parametrize("cfg", [ModelConfig.preset("tiny"), ModelConfig.preset("small"),
                                 ModelConfig.preset("deepseek-v2-lite"), ModelConfig.preset("deepseek-v3"),
                                 ModelConfig(tie_word_embeddings=True, q_lora_rank=None, num_nextn_predict_layers=2)],
                         ids=["tiny", "small", "v2-lite", "v3", "tied-noqlora-mtp2"])
def test_meta_count_equals_analytic(cfg):
    a, ref = account(cfg), analytic(cfg)
    assert a["total_params"] == ref["total"]
    assert a["activated_params"] == ref["activated"]
    assert a["mtp_params"] == ref["mtp"]
    assert a["kv_cache_bytes_per_token"] == ref["kv"]
    assert a["mha_kv_cache_bytes_per_token"] == ref["mha_kv"]


def test_deepseek_v3_matches_design_figures():
    a = account(ModelConfig.preset("deepseek-v3"))
    B = 1e9
    assert round(a["total_params"] / B, 2) == 671.03
    assert round(a["activated_params"] / B, 2) == 37.55                 # embedding and head counted
    assert round(a["activated_params_no_embedding"] / B, 1) == 36.6
    assert round(a["mtp_params"] / B, 1) == 11.6
    assert round(a["mtp_params_with_copies"] / B, 1) == 13.5
    assert round(a["checkpoint_params"] / B) == 684                     # "≈ 685B" on the hub
    assert a["kv_cache_bytes_per_token"] == 70_272
    assert 70 < a["mha_kv_cache_bytes_per_token"] / a["kv_cache_bytes_per_token"] < 72   # "~71x"


def test_small_matches_design_figures():
    a = account(ModelConfig.preset("small"))
    M = 1e6
    assert round(a["total_params"] / M) == 896
    assert round(a["activated_params"] / M) == 206
    assert round(a["activated_params_no_embedding_no_head"] / M) == 139


def test_train_flops_formula():
    cfg = ModelConfig.preset("small")
    a, ref = account(cfg, seq_len=2048), analytic(cfg)
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    norms = 2 * H * L + H + L * (cfg.q_lora_rank + cfg.kv_lora_rank)          # non-matmul weights (1-D)
    mtp_active = ref["mtp"] - (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * H * cfg.moe_intermediate_size
    mtp_norms = 5 * H + cfg.q_lora_rank + cfg.kv_lora_rank
    n = (ref["activated"] - V * H - norms) + (mtp_active - mtp_norms) + V * H       # + the head again for MTP
    attn = 3 * (L + 1) * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2048
    assert a["train_flops_per_token"] == 6 * n + attn


def test_cli_json_cost_and_dense_config(tmp_path, capsys):
    assert main(["info", "--preset", "deepseek-v3", "--json", "--tokens", "14.8e12", "--peak-tflops", "989",
                 "--mfu", "0.35", "--usd-per-hour", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("total_params", "activated_params", "mtp_params", "kv_cache_bytes_per_token",
                "mha_kv_cache_bytes_per_token", "train_flops_per_token"):
        assert isinstance(out[key], int) and out[key] > 0
    hours = 14.8e12 * out["train_flops_per_token"] / (989e12 * 0.35) / 3600
    assert out["cost"]["gpu_hours"] == pytest.approx(hours) and out["cost"]["usd"] == pytest.approx(2 * hours)
    assert 2e6 < hours < 4e6                                   # the same scale as V3's reported 2.664M H800 hours

    assert main(["info", "--preset", "deepseek-v3"]) == 0
    assert "671.0B" in capsys.readouterr().out

    cfg = DenseConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, model_type="qwen2")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert main(["info", "--config", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_type"] == "qwen2" and out["mtp_params"] == 0
    assert out["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 2 * 8           # bf16 x (K, V) x layers x n_kv x head_dim
    assert out["mha_kv_cache_bytes_per_token"] == 4 * out["kv_cache_bytes_per_token"]


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["info", "--preset", "deepseek-v9"]) == 2
    assert "unknown preset 'deepseek-v9'" in capsys.readouterr().err
    assert main(["info", "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["info", "--config", str(tmp_path / "config.json")]) == 2
    assert "'gpt2' is not supported" in capsys.readouterr().err
    assert main(["info", "--preset", "tiny", "--mfu", "1.5"]) == 2
