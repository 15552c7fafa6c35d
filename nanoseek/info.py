"""`nanoseek info`: what a model config costs, counted on the real module tree.

The model is built on the meta device (no memory, any size, 671B included) and its parameters are counted by
name, so the figures describe the code that trains, not a formula that could drift from it. Conventions,
because papers mix them:

* total: the main model (embedding, decoder, head), as V3 reports 671B; MTP modules (V3 §2.2) are counted
  apart: unique, and with the embedding/head copies the hub checkpoint stores for each (685B on disk for V3).
* activated per token: shared weights + K of E routed experts per MoE layer, three ways: with embedding and
  head (V3's 37B), without the embedding (V3's 36.6B: the head is a matmul each token pays for), and without
  both (the `small` preset's 139M).
* training FLOPs per token: 6·N + attention, N = activated matmul weights (head and MTP modules included,
  embedding excluded: it is a lookup); attention = 3·(L + D)·n_h·(d_qk + d_v)·S: forward QKᵀ and AV cost
  2·n_h·(d_qk + d_v) per context token, the mean causal context is S/2, backward is twice the forward.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nanoseek.config import DenseConfig, ModelConfig, _read_json, config_from_hf_dict
from nanoseek.model import build_model

V3_PRETRAIN_GPU_HOURS = 2.664e6   # V3 report Table 1: H800 GPU-hours for pre-training on 14.8T tokens
V3_PRETRAIN_TOKENS = 14.8e12


def load_config(args: argparse.Namespace) -> ModelConfig | DenseConfig:
    if args.config:
        path = Path(args.config)
        return config_from_hf_dict(_read_json(path / "config.json" if path.is_dir() else path))
    return ModelConfig.preset(args.preset or "tiny")


def account(cfg: ModelConfig | DenseConfig, seq_len: int = 4096) -> dict:
    """Parameter, KV-cache and FLOP accounting of `cfg`, counted on a meta-device model."""
    with torch.device("meta"):
        model = build_model(cfg)
    moe = isinstance(cfg, ModelConfig)
    depth = cfg.num_nextn_predict_layers if moe else 0
    params = dict(model.named_parameters())          # tied weights appear once

    def size(keep, activated=False) -> int:
        """Parameters whose name passes `keep`; with `activated`, K of the E fused routed experts."""
        n = 0
        for name, p in params.items():
            if keep(name):
                routed = activated and ".mlp.experts." in name
                n += p.numel() // cfg.n_routed_experts * cfg.num_experts_per_tok if routed else p.numel()
        return n

    def is_mtp(name):
        return name.startswith("mtp.")

    total, mtp = size(lambda n: not is_mtp(n)), size(is_mtp)
    activated = size(lambda n: not is_mtp(n), activated=True)
    embed = model.model.embed_tokens.weight.numel()
    head = model.lm_head.weight.numel()
    head_own = 0 if cfg.tie_word_embeddings else head          # a tied head adds no parameters
    # matmul weights a token meets in training: 2-D+ tensors but the embedding lookup, and the head once per
    # output (main + each MTP depth)
    body = size(lambda n: params[n].ndim >= 2 and n not in ("model.embed_tokens.weight", "lm_head.weight"),
                activated=True)
    n_matmul = body + (1 + depth) * head

    L, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    if moe:  # MLA caches c_kv and the shared rotated k_pe; MHA would cache per-head K [d_qk] and V [d_v]
        d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
        kv_values = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    else:    # GQA caches K and V for n_kv heads
        d_qk = d_v = cfg.head_dim
        kv_values = L * 2 * cfg.num_key_value_heads * cfg.head_dim
    mha_values = L * heads * (d_qk + d_v)
    attn_flops = 3 * (L + depth) * heads * (d_qk + d_v) * seq_len
    return {
        "model_type": cfg.model_type,
        "total_params": total,
        "total_params_with_mtp": total + mtp,
        "activated_params": activated,
        "activated_params_no_embedding": activated - embed,
        "activated_params_no_embedding_no_head": activated - embed - head_own,
        "mtp_params": mtp,
        "mtp_params_with_copies": mtp + depth * (embed + head),
        "checkpoint_params": total + mtp + depth * (embed + head),
        "kv_cache_bytes_per_token": 2 * kv_values,          # bf16, over all L layers (MTP not cached)
        "mha_kv_cache_bytes_per_token": 2 * mha_values,
        "seq_len": seq_len,
        "train_matmul_params": n_matmul,
        "train_flops_per_token": 6 * n_matmul + attn_flops,
        "train_flops_formula": "6*N_matmul_activated(+head, +MTP) + 3*(L+D)*n_heads*(d_qk+d_v)*seq_len",
    }


def cost(acc: dict, tokens: float, peak_tflops: float, mfu: float, usd_per_hour: float) -> dict:
    """GPU-hours and dollars to train on `tokens` at `mfu` of `peak_tflops`, beside V3's reported hours."""
    flops = tokens * acc["train_flops_per_token"]
    hours = flops / (peak_tflops * 1e12 * mfu) / 3600
    v3_flops = V3_PRETRAIN_TOKENS * acc["train_flops_per_token"]
    return {
        "tokens": tokens, "peak_tflops": peak_tflops, "mfu": mfu, "usd_per_hour": usd_per_hour,
        "train_flops": flops, "gpu_hours": hours, "usd": hours * usd_per_hour,
        "v3_report_gpu_hours": V3_PRETRAIN_GPU_HOURS, "v3_report_usd": V3_PRETRAIN_GPU_HOURS * usd_per_hour,
        # the MFU at which this config on V3's 14.8T tokens would take exactly V3's reported hours
        "v3_report_implied_mfu": v3_flops / (V3_PRETRAIN_GPU_HOURS * 3600 * peak_tflops * 1e12),
    }


def _h(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:#.4g}{unit}"
    return f"{n:.0f}"


def _print_table(a: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"nanoseek info: {a['source']} ({a['model_type']})", show_lines=False)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("convention", style="dim")
    t.add_row("total parameters", _h(a["total_params"]), "embedding + decoder + head, without MTP (V3: 671B)")
    t.add_row("  with MTP", _h(a["total_params_with_mtp"]), "MTP modules counted once (they share embedding/head)")
    t.add_row("activated / token", _h(a["activated_params"]), "with embedding and head (V3: 37B)")
    t.add_row("  without embedding", _h(a["activated_params_no_embedding"]), "head still counted (V3: 36.6B)")
    t.add_row("  without embedding, head", _h(a["activated_params_no_embedding_no_head"]), "decoder only")
    t.add_row("MTP parameters", _h(a["mtp_params"]), "unique")
    t.add_row("  with stored copies", _h(a["mtp_params_with_copies"]), "+ embedding and head copies in the checkpoint")
    t.add_row("checkpoint parameters", _h(a["checkpoint_params"]), "what the hub layout stores")
    kv, mha = a["kv_cache_bytes_per_token"], a["mha_kv_cache_bytes_per_token"]
    t.add_row("KV cache / token", f"{kv:,} B", "bf16, all layers (MLA latent, or GQA K+V)")
    t.add_row("  MHA, same head dims", f"{mha:,} B", f"{mha / kv:.1f}x")
    t.add_row("train FLOPs / token", _h(a["train_flops_per_token"]),
              f"6*{_h(a['train_matmul_params'])} + attention at seq_len {a['seq_len']}")
    if "cost" in a:
        c = a["cost"]
        t.add_row("training FLOPs", f"{c['train_flops']:.3g}", f"{_h(c['tokens'])} tokens")
        t.add_row("GPU-hours", _h(c["gpu_hours"]), f"{c['peak_tflops']:g} TFLOP/s peak at {c['mfu']:.0%} MFU")
        t.add_row("cost", f"${_h(c['usd'])}", f"at ${c['usd_per_hour']:g}/GPU-hour")
        t.add_row("V3 report, pre-training", _h(c["v3_report_gpu_hours"]) + " h",
                  f"H800, 14.8T tokens, ${_h(c['v3_report_usd'])}; this config would need "
                  f"{c['v3_report_implied_mfu']:.0%} MFU to match")
    Console().print(t)
    print(f"train FLOPs formula: {a['train_flops_formula']}")
