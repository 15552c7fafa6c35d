"""Training-step throughput of the `small` preset: nanoseek vs transformers' DeepseekV3ForCausalLM (issue 2, GPU).

    python benchmarks/train_step.py                 # both models, bf16, batch 8 x 2048, one run
    python benchmarks/train_step.py --compile       # torch.compile both models first
    python benchmarks/train_step.py --profile DIR   # also write a torch.profiler table per model into DIR
    python benchmarks/train_step.py --quick         # tiny preset on the CPU: checks the script

One step = forward + backward + fused AdamW on the same config, batch and sequence length. `--dtype bf16` (the
default, as the transformers reference of docs/DESIGN.md §8: 86.8K tokens/s, ~19.5% MFU) keeps the weights in bf16;
`--dtype amp` keeps fp32 masters under bf16 autocast, as nanoseek's trainer does. MFU = tokens/s x training
FLOPs per token (nanoseek.info: 6·N_activated + attention) / the bf16 matmul peak measured in the same run.
transformers' DeepseekV3 has no MTP module, so its FLOPs per token are counted without it; nanoseek trains its
MTP depth (the MTP loss is part of the step).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from common import bf16_peak_tflops, emit, header, time_ms
from nanoseek.config import ModelConfig
from nanoseek.info import account
from nanoseek.model import build_model

# kernel-name fragments -> where the time goes (first match wins)
BUCKETS = [("attention", ("flash", "fmha", "attention", "sdpa")), ("fp8_quant", ("_quant_",)),
           ("fp8_grouped_gemm", ("_gmm",)), ("grouped_gemm", ("grouped", "groupproblemshape")),
           ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "sm90")),
           ("optimizer", ("adam", "multi_tensor")), ("reduce/norm", ("reduce", "norm", "softmax", "cross_entropy")),
           ("index/sort/scatter", ("index", "scatter", "gather", "sort", "topk", "cumsum", "radix")),
           ("copy/cast", ("copy", "cast", "cat", "fill"))]


def build(name: str, cfg: ModelConfig, device: torch.device, dtype: str):
    torch.manual_seed(0)
    param_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if name == "nanoseek":
        with torch.device(device):
            model = build_model(cfg)
        flops_cfg = cfg
    else:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        hf_cfg = DeepseekV3Config(**cfg.to_hf_dict(), attn_implementation="sdpa")
        with torch.device(device):
            model = DeepseekV3ForCausalLM(hf_cfg)
        flops_cfg = cfg.replace(num_nextn_predict_layers=0)          # no MTP module in transformers
    return model.to(param_dtype), flops_cfg


def make_step(name: str, model, opt, device: torch.device, dtype: str):
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "amp" else contextlib.nullcontext()

    def step(ids):
        with amp:
            if name == "nanoseek":
                out = model(ids[:, :-1], labels=ids[:, 1:])
                loss = out.loss + 0.3 * out.mtp_loss + 1e-4 * out.balance_loss
            else:                                                      # transformers shifts labels itself
                loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def profile(step, ids, device: torch.device, path: Path, name: str) -> dict:
    """Profile 3 steps; write torch.profiler's table to `path`; return milliseconds per step by kernel bucket."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.mkdir(parents=True, exist_ok=True)
    (path / f"profile_{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
    buckets: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", getattr(ev, "self_cuda_time_total", 0)) \
            if device.type == "cuda" else ev.self_cpu_time_total
        if not us or (device.type == "cuda" and str(getattr(ev, "device_type", "")).endswith("CPU")):
            continue
        key = ev.key.lower()
        bucket = next((b for b, frags in BUCKETS if any(f in key for f in frags)), "other")
        buckets[bucket] = buckets.get(bucket, 0.0) + us / 1e3 / 3
    return {k: round(v, 2) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="nanoseek,hf", help="comma list of nanoseek, hf")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["bf16", "amp"], default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each model before timing")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR", help="write profiler tables into DIR")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 2 x 64 (CPU-friendly)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    preset = "tiny" if quick else "small"
    cfg = ModelConfig.preset(preset)
    batch, seq = (2, 64) if quick else (args.batch, args.seq)
    steps, warmup = (2, 1) if quick else (args.steps, args.warmup)
    peak = bf16_peak_tflops(device, 512 if quick else 8192)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    tps = {}
    for name in args.models.split(","):
        model, flops_cfg = build(name, cfg, device, args.dtype)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        if args.compile:      # nanoseek: its regional compile (one graph per kind of block); transformers: whole model
            if name == "nanoseek":
                from nanoseek.model.compile import compile_blocks
                compile_blocks(model)
            else:
                model = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        step = make_step(name, model, opt, device, args.dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step(ids)
        first_s = time.perf_counter() - t0
        ms = time_ms(lambda: step(ids), device, warmup=warmup, iters=steps)
        tps[name] = batch * seq / ms * 1e3
        fpt = account(flops_cfg, seq)["train_flops_per_token"]
        record = {**header(device), "bench": "train_step", "model": name, "preset": preset, "params": n_params,
                  "dtype": args.dtype, "compile": args.compile, "batch": batch, "seq": seq, "step_ms": round(ms, 2),
                  "tokens_per_s": round(tps[name]), "flops_per_token": fpt,
                  "mfu": round(tps[name] * fpt / (peak * 1e12), 4), "peak_bf16_tflops": round(peak, 1),
                  "first_step_s": round(first_s, 1),
                  "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                  if device.type == "cuda" else None}
        if name == "hf":
            record["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
        emit(record)
        if args.profile:
            emit({**header(device), "bench": "train_step_profile", "model": name, "ms_per_step_by_kernel":
                  profile(step, ids, device, args.profile, name), "table": str(args.profile / f"profile_{name}.txt")})
        del model, opt, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "nanoseek" in tps and "hf" in tps:
        emit({**header(device), "bench": "train_step_ratio", "nanoseek_over_hf": round(tps["nanoseek"] / tps["hf"], 3),
              "target": 2.0})


if __name__ == "__main__":
    main()
