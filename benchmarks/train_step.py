"""Training-step throughput of the `small` preset: nanoseek vs transformers' DeepseekV3ForCausalLM (issue 2, GPU).

    python benchmarks/train_step.py                 # both models, bf16, batch 8 x 2048, one run
    python benchmarks/train_step.py --compile       # torch.compile both models first
    python benchmarks/train_step.py --profile DIR   # also write a torch.profiler table per model into DIR
    python benchmarks/train_step.py --compile --cuda-graph --models nanoseek   # the whole step as one CUDA graph
    python benchmarks/train_step.py --quick         # tiny preset on the CPU: checks the script

One step = forward + backward + fused AdamW on the same config, batch and sequence length. `--dtype bf16` (the
default, as the transformers reference of docs/DESIGN.md §8: 86.8K tokens/s, ~19.5% MFU) keeps the weights in bf16;
`--dtype amp` keeps fp32 masters under bf16 autocast, as nanoseek's trainer does; `--dtype master` computes in bf16
parameters and keeps fp32 masters in the optimizer only (`MasterWeights`: the weights cast once per step instead
of at every use, a bf16 residual stream), the lever for the trainer's setting. MFU = tokens/s x training
FLOPs per token (nanoseek.info: 6·N_activated + attention) / the bf16 matmul peak measured in the same run.
transformers' DeepseekV3 has no MTP module, so its FLOPs per token are counted without it; nanoseek trains its
MTP depth (the MTP loss is part of the step).

`--cuda-graph` captures nanoseek's whole step (forward, backward, AdamW with `capturable=True`) in one CUDA graph
and times its replays: the step with no host in the way, what launch overhead costs. The profile also reports
how long the GPU sat idle per step and in which phase (forward, backward, optimizer) the kernel that ended each
idle gap was launched (a gap means the host launched that kernel late); its kernel buckets come from the
trace's kernel events, each kernel counted once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
    param_dtype = torch.float32 if dtype == "amp" else torch.bfloat16
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


class MasterWeights:
    """AdamW on fp32 master copies of bf16 parameters (Megatron's mixed-precision optimizer): each step copies the
    bf16 gradients into the masters' fp32 ones, steps the masters, and copies them back into the parameters."""

    def __init__(self, params, **adamw):
        self.params = list(params)
        self.masters = [p.detach().float() for p in self.params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        self.opt = torch.optim.AdamW(self.masters, **adamw)

    @torch.no_grad()
    def step(self) -> None:
        pairs = [(m.grad, p.grad) for m, p in zip(self.masters, self.params) if p.grad is not None]
        torch._foreach_copy_([m for m, _ in pairs], [g for _, g in pairs])
        self.opt.step()
        torch._foreach_copy_(self.params, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def make_step(name: str, model, opt, device: torch.device, dtype: str):
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "amp" else contextlib.nullcontext()
    phase = torch.profiler.record_function

    def step(ids):
        with amp, phase("step/forward"):
            if name == "nanoseek":
                out = model(ids[:, :-1], labels=ids[:, 1:])
                loss = out.loss + 0.3 * out.mtp_loss + 1e-4 * out.balance_loss
            else:                                                      # transformers shifts labels itself
                loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        with phase("step/backward"):
            loss.backward()
        with phase("step/optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def graphed(step, ids: torch.Tensor, device: torch.device):
    """The whole step captured in one CUDA graph (after warm-up steps on a side stream, as torch's whole-network
    capture recipe does): returns replay(ids), which copies ids into the captured input and replays. The
    optimizer must be `capturable` (its step count lives on the GPU); gradients are freed by zero_grad
    inside the graph and re-made from the graph's pool on every replay."""
    static = ids.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static)

    def replay(ids):
        static.copy_(ids)
        graph.replay()
    return replay


def bucket_of(kernel: str) -> str:
    key = kernel.lower()
    return next((b for b, frags in BUCKETS if any(f in key for f in frags)), "other")


def gpu_time(trace: dict) -> dict:
    """Where the GPU's time went in a chrome trace: milliseconds of kernels per bucket ("kernels"), busy time, and
    idle time: gaps between consecutive kernels on the GPU (kernels and memcpys/memsets merged over streams),
    each attributed to the phase (`step/...` annotation) during which the kernel after the gap was launched.
    Returns {"kernels", "busy_ms", "idle_ms", "idle_<phase>_ms", "top_gaps"} over the whole profile (callers
    divide by steps)."""
    events = trace["traceEvents"]
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    phases = sorted((e["ts"], e["ts"] + e["dur"], e["name"].split("/")[-1]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name", "").startswith("step/"))
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e["name"], e.get("args", {}).get("correlation"))
                 for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    out = {"kernels": {}, "busy_ms": 0.0, "idle_ms": 0.0}
    gaps = []
    end = None
    for start, stop, name, corr in gpu:
        bucket = bucket_of(name)
        out["kernels"][bucket] = out["kernels"].get(bucket, 0.0) + (stop - start) / 1e3
        if end is not None and start > end:
            launched = launches.get(corr)
            where = next((p for a, b, p in phases if launched is not None and a <= launched <= b), "other")
            key = f"idle_{where}_ms"
            out[key] = out.get(key, 0.0) + (start - end) / 1e3
            out["idle_ms"] += (start - end) / 1e3
            gaps.append(((start - end) / 1e3, where, name[:60]))
        out["busy_ms"] += max(0.0, stop - max(start, end or start)) / 1e3
        end = stop if end is None else max(end, stop)
    out["top_gaps"] = [(round(ms, 3), where, name) for ms, where, name in sorted(gaps, reverse=True)[:12]]
    out["kernels"] = dict(sorted(out["kernels"].items(), key=lambda kv: -kv[1]))
    return out


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
    if device.type == "cuda":                  # kernels from the trace: each counted once, idle gaps between them
        trace = path / f"trace_{name}.json"
        prof.export_chrome_trace(str(trace))
        gpu = gpu_time(json.loads(trace.read_text()))
        trace.unlink()
        return {k: ({b: round(ms / 3, 2) for b, ms in v.items()} if k == "kernels" else
                    round(v / 3, 2) if isinstance(v, float) else v) for k, v in gpu.items()}
    buckets: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.self_cpu_time_total:
            bucket = bucket_of(ev.key)
            buckets[bucket] = buckets.get(bucket, 0.0) + ev.self_cpu_time_total / 1e3 / 3
    return {"kernels": {k: round(v, 2) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="nanoseek,hf", help="comma list of nanoseek, hf")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["bf16", "amp", "master"], default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each model before timing")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for nanoseek's blocks (e.g. "
                   "max-autotune-no-cudagraphs); default: torch's")
    p.add_argument("--cuda-graph", action="store_true", help="nanoseek: capture the whole step in one CUDA graph")
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
                compile_blocks(model, **({"mode": args.compile_mode} if args.compile_mode else {}))
            else:
                model = torch.compile(model)
        graph = args.cuda_graph and name == "nanoseek" and device.type == "cuda"
        adamw = dict(lr=1e-4, fused=device.type == "cuda", capturable=graph)
        opt = MasterWeights(model.parameters(), **adamw) if args.dtype == "master" else \
            torch.optim.AdamW(model.parameters(), **adamw)
        step = make_step(name, model, opt, device, args.dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if graph:                                                 # first step = warm-up steps + capture
            step = graphed(step, ids, device)
        step(ids)
        first_s = time.perf_counter() - t0
        ms = time_ms(lambda: step(ids), device, warmup=warmup, iters=steps)
        tps[name] = batch * seq / ms * 1e3
        fpt = account(flops_cfg, seq)["train_flops_per_token"]
        record = {**header(device), "bench": "train_step", "model": name, "preset": preset, "params": n_params,
                  "dtype": args.dtype, "compile": args.compile, "compile_mode": args.compile_mode,
                  "cuda_graph": graph, "batch": batch, "seq": seq, "step_ms": round(ms, 2),
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
