"""Speed of nanoseek's DeepSeek-V3 training step on one GPU, variant by variant, against transformers (issue 2).

    python benchmarks/model_speed.py                          # hf, eager and compiled nanoseek, checks, profiles
    python benchmarks/model_speed.py --base DIR               # also an older copy of nanoseek/model (a package
                                                              #   named `basemodel` inside DIR): before vs after
    python benchmarks/model_speed.py --quick                  # tiny preset on the CPU: checks the script

benchmarks/train_step.py is the headline figure (one step per model, as in RESULTS.md); this script is the
workbench behind it. In one run it checks the pieces the fast path relies on (torch._grouped_mm forward and
backward against a per-expert loop on uneven, partly empty groups; the attention backends against fp32 math),
times each SDPA backend on the MLA shape, times whole steps (forward + backward + fused AdamW, bf16 weights,
batch 8 x 2048 on the `small` preset) for transformers and each nanoseek variant, checks compiled against
eager losses and gradients on the same weights, and profiles kernels into buckets: where the time goes
(`--trace`: one step's trace, searched for GPU idle gaps and host syncs). Every figure is one JSON line (common.emit); a summary table closes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import bf16_peak_tflops, emit, header, time_ms
from train_step import build, make_step
from nanoseek.config import ModelConfig
from nanoseek.info import account
from nanoseek.model import build_model
from nanoseek.model import moe as moe_mod
from nanoseek.model.compile import compile_blocks

# kernel name fragments -> bucket (first match wins); CUTLASS grouped GEMMs carry "GroupProblemShape"
KERNEL_BUCKETS = [
    ("attention bwd", ("flash_bwd", "fmha_bwd", "attention_bwd", "dq_dk_dv", "bprop", "cudnn_bwd", "dot_do_o")),
    ("attention fwd", ("flash_fwd", "fmha", "attention", "fprop", "cudnn")),
    ("grouped GEMM (experts)", ("groupproblemshape", "grouped", "ptrarray")),
    ("dense GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "matmul", "splitk")),
    ("optimizer", ("adam", "multi_tensor")),
    ("compiled (triton) fused", ("triton_",)),
    ("sort/index/scatter", ("sort", "radix", "index", "scatter", "gather", "embedding", "topk", "cumsum")),
    ("norm/softmax/CE", ("norm", "softmax", "cross_entropy", "nll", "log_")),
    ("elementwise/copy", ("elementwise", "copy", "cast", "cat", "fill", "memcpy", "memset", "reduce", "vectorized")),
]


def kernel_profile(step, ids, out_dir: Path | None, name: str, n: int = 3) -> dict:
    """Self device time per step (ms) by kernel bucket, and the 12 costliest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(ids)
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / 1e3 / n, e.count // n) for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
               and "#" not in e.key and not e.key.startswith("ProfilerStep")]   # skip range annotations
    buckets: dict[str, float] = {}
    for key, ms, _ in kernels:
        low = key.lower()
        bucket = next((b for b, frags in KERNEL_BUCKETS if any(f in low for f in frags)), "other")
        buckets[bucket] = buckets.get(bucket, 0.0) + ms
    if out_dir is not None:
        (out_dir / f"kernels_{name}.txt").write_text(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=120))
    top = sorted(kernels, key=lambda k: -k[1])[:12]
    return {"device_ms_per_step": round(sum(buckets.values()), 2),
            "buckets_ms": {k: round(v, 2) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
            "top_kernels": [(k[:90], round(ms, 2), c) for k, ms, c in top]}


def idle_report(step, ids, out_dir: Path, name: str, top: int = 6) -> dict:
    """Trace one step; where is the GPU idle? Gaps between kernels, each named by the op that launched the next
    kernel, and host syncs (a sync drains the queue, then the GPU waits for the CPU to refill it)."""
    import gzip
    import json

    from torch.profiler import ProfilerActivity, profile

    step(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(ids)
        torch.cuda.synchronize()
    path = out_dir / f"trace_{name}.json"
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    with gzip.open(f"{path}.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    path.unlink()
    return summarize_idle(events, top)


def summarize_idle(events: list[dict], top: int = 6) -> dict:
    """Idle time between GPU work in a Kineto trace, the largest gaps (with the ops that launched the kernel
    after each) and host-side synchronisations (by enclosing op)."""
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in events
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]

    def launched_by(t: float) -> str:
        inside = [e for e in ops if e["ts"] <= t <= e["ts"] + e["dur"]]
        return " > ".join(e["name"][:40] for e in sorted(inside, key=lambda e: -e["dur"])[-2:])

    gaps, end = [], gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        if e["ts"] - end > 5:
            src = launch.get(e.get("args", {}).get("correlation"))
            gaps.append((e["ts"] - end, e["name"][:50], launched_by(src["ts"]) if src else "?"))
        end = max(end, e["ts"] + e["dur"])
    syncs: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and "ynchronize" in e["name"] and e["dur"] > 20:
            key = f"{e['name']} in {launched_by(e['ts'])}"
            syncs[key] = syncs.get(key, 0.0) + e["dur"] / 1e3
    return {"gpu_busy_window_ms": round((end - gpu[0]["ts"]) / 1e3, 2),
            "idle_ms_in_window": round(sum(g for g, *_ in gaps) / 1e3, 2), "gaps_over_5us": len(gaps),
            "largest_gaps": [(round(g / 1e3, 3), k, op) for g, k, op in sorted(gaps, key=lambda x: -x[0])[:top]],
            "host_syncs_ms": {k: round(v, 2) for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])[:top]}}


# ---------------------------------------------------------------------------------------- kernel checks

def check_grouped_mm(device: torch.device, quick: bool) -> None:
    """moe.grouped_mm (torch._grouped_mm on CUDA bf16) against a per-expert loop in fp32, forward and backward,
    on uneven groups with empty experts and sizes that are not multiples of 8; then its speed."""
    E, H, I, M = (8, 64, 32, 300) if quick else (64, 1024, 352, 98304)
    g = torch.Generator().manual_seed(1)
    cuts = torch.randint(0, M + 1, (E - 1,), generator=g).sort().values
    cuts[: E // 8] = cuts[0]                                      # some empty groups
    offs = torch.cat([cuts, torch.tensor([M])]).to(device, torch.int32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(M, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    dy = torch.randn(M, 2 * I, generator=g).to(device, dtype)
    y = moe_mod.grouped_mm(x, w, offs)
    y.backward(dy)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ends = offs.tolist()
    yr = torch.cat([xr[s:e] @ wr[i].t() for i, (s, e) in enumerate(zip([0] + ends[:-1], ends))])
    yr.backward(dy.float())

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    errs = {"y": rel(y, yr), "dx": rel(x.grad, xr.grad), "dw": rel(w.grad, wr.grad)}
    ok = all(e < 1e-2 for e in errs.values()) and all(torch.isfinite(t).all() for t in (y, x.grad, w.grad))
    rec = {"bench": "check_grouped_mm", "rel_err": {k: f"{v:.1e}" for k, v in errs.items()}, "ok": ok,
           "groups": E, "rows": M, "empty_groups": int((torch.diff(offs, prepend=offs.new_zeros(1)) == 0).sum())}
    if device.type == "cuda" and not quick:
        flops = 3 * 2 * M * H * 2 * I                            # forward + dgrad + wgrad

        def fwd_bwd(fn):
            def run():
                x.grad = w.grad = None
                fn().backward(dy)
            return run
        ms_g = time_ms(fwd_bwd(lambda: moe_mod.grouped_mm(x, w, offs)), device, warmup=3, iters=10)
        w2 = w.detach()[0].clone().requires_grad_()
        ms_d = time_ms(fwd_bwd(lambda: x @ w2.t()), device, warmup=3, iters=10)
        rec.update(grouped_ms=round(ms_g, 3), grouped_tflops=round(flops / ms_g / 1e9),
                   dense_same_flops_ms=round(ms_d, 3), dense_tflops=round(flops / ms_d / 1e9))
    emit({**header(device), **rec})
    if not ok:
        raise SystemExit("grouped_mm disagrees with the per-expert loop")


def sdpa_variants(device: torch.device, quick: bool) -> None:
    """Each SDPA backend on MLA's training shape (q/k head 96, v head 64): correct? how fast (fwd + bwd)?"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, nh, T, dqk, dv = (1, 2, 64, 24, 16) if quick else (8, 16, 2048, 96, 64)
    scale = dqk ** -0.5
    variants = [("flash, v padded", SDPBackend.FLASH_ATTENTION, True),
                ("cudnn, v padded", SDPBackend.CUDNN_ATTENTION, True),
                ("cudnn, v unpadded", SDPBackend.CUDNN_ATTENTION, False),
                ("efficient, v unpadded", SDPBackend.EFFICIENT_ATTENTION, False),
                ("default dispatch, v unpadded", None, False)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(2)

    def inputs(b, t):
        q, k = (torch.randn(b, nh, t, dqk, generator=g).to(device, dtype) for _ in range(2))
        v = torch.randn(b, nh, t, dv, generator=g).to(device, dtype)
        return [a.requires_grad_() for a in (q, k, v)]

    def attend(backend, pad, q, k, v):
        vv = F.pad(v, (0, dqk - dv)) if pad else v
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)[..., :dv]

    small = inputs(2, 256)
    ref = F.scaled_dot_product_attention(*(a.detach().double() for a in small), is_causal=True, scale=scale)
    big = inputs(B, T)
    dout = torch.randn(B, nh, T, dv, generator=g).to(device, dtype)
    flops = 3.5 * 2 * B * nh * T * T / 2 * (dqk + dv)          # causal QK^T and PV; backward = 2.5x forward
    for name, backend, pad in variants:
        rec = {"bench": "sdpa", "variant": name}
        try:
            out = attend(backend, pad, *small)
            rec["rel_err"] = f"{((out.double() - ref).norm() / ref.norm()).item():.1e}"

            def run():
                for a in big:
                    a.grad = None
                attend(backend, pad, *big).backward(dout)
            ms = time_ms(run, device, warmup=2, iters=5 if quick else 10)
            rec.update(fwd_bwd_ms=round(ms, 3), useful_tflops=round(flops / ms / 1e9))
        except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is a result
            rec["error"] = str(e).splitlines()[0][:160]
        emit({**header(device), **rec})


def routing_variants(device: torch.device, quick: bool) -> None:
    """Group-limited top-k selection (V3: 8 groups, 4 kept, top-6 of 64) with torch.topk, as first written,
    and with the max-reductions + sort the Router uses now; eager and compiled. Same experts chosen?"""
    N, G, E, keep, K = (256, 4, 16, 2, 4) if quick else (16384, 8, 64, 4, 6)

    def with_topk(choice):
        groups = choice.view(N, G, E // G)
        kept = groups.topk(2, dim=-1).values.sum(-1).topk(keep, dim=-1, sorted=False).indices
        mask = torch.zeros(N, G, dtype=torch.bool, device=choice.device).scatter_(1, kept, True)
        return groups.masked_fill(~mask[..., None], float("-inf")).view(N, E).topk(K, dim=-1, sorted=False).indices

    def with_sort(choice):
        groups = choice.view(N, G, E // G)
        kept = moe_mod._top_indices(moe_mod._top2_sum(groups), keep)
        mask = torch.zeros(N, G, dtype=torch.bool, device=choice.device).scatter_(1, kept, True)
        return moe_mod._top_indices(groups.masked_fill(~mask[..., None], float("-inf")).view(N, E), K)

    choice = torch.rand(N, E, generator=torch.Generator().manual_seed(3)).to(device)
    same = torch.equal(with_topk(choice).sort(-1).values, with_sort(choice).sort(-1).values)
    rec = {"bench": "routing", "same_experts": same}
    for name, fn in (("topk", with_topk), ("sort", with_sort)):
        rec[f"{name}_eager_ms"] = round(time_ms(lambda: fn(choice), device, warmup=3, iters=20), 3)
        if not quick:
            cfn = torch.compile(fn, dynamic=False)
            rec[f"{name}_compiled_ms"] = round(time_ms(lambda: cfn(choice), device, warmup=3, iters=20), 3)
    emit({**header(device), **rec})


# ---------------------------------------------------------------------------------------- whole steps

def grads_of(model, ids, dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every gradient (fp32 copies) of one training forward/backward, without an optimizer step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=dtype == "amp"):
        out = model(ids[:, :-1], labels=ids[:, 1:])
    loss = out.loss + 0.3 * out.mtp_loss + 1e-4 * out.balance_loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def grad_error(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all gradients together."""
    num = sum((a[n] - b[n]).pow(2).sum() for n in b)
    return (num / sum(g.pow(2).sum() for g in b.values())).sqrt().item()


def worst_params(a: dict, b: dict, n: int = 4) -> list:
    rel = {k: ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in b}
    return [(k, f"{v:.1e}") for k, v in sorted(rel.items(), key=lambda kv: -kv[1])[:n]]


def pin_routing(model, on: bool) -> None:
    """A steep selection bias makes every token pick the same experts, far from any tie, so a compiled and an
    eager model route identically and their gradients can be compared to rounding; off restores b = 0."""
    from nanoseek.model import moe_layers
    for m in moe_layers(model):
        b = m.gate.e_score_correction_bias
        b.copy_(torch.arange(b.numel(), device=b.device, dtype=b.dtype) if on else torch.zeros_like(b))


def check_compiled(model, ids, dtype: str, args, device) -> dict:
    """Compile in place; compare with eager on the same weights: natural routing (with the eager-vs-eager
    floor: bf16 score ties flip between runs) and pinned routing (no flips: must agree to rounding)."""
    from torch._dynamo.utils import counters

    rec = {}
    loss0, g0 = grads_of(model, ids, dtype)
    _, g1 = grads_of(model, ids, dtype)
    rec["eager_vs_eager_grad_err"] = f"{grad_error(g1, g0):.1e}"
    del g1
    with torch.no_grad():
        pin_routing(model, True)
    loss_p, gp = grads_of(model, ids, dtype)
    backend = {"backend": "aot_eager"} if args.quick else {}
    t0 = time.perf_counter()
    try:                                       # the CUDA path must compile without graph breaks
        compile_blocks(model, fullgraph=device.type == "cuda", **backend)
        loss_pc, gpc = grads_of(model, ids, dtype)
    except Exception as e:  # noqa: BLE001 - report it, then measure what compiles with breaks
        rec["fullgraph_error"] = str(e).splitlines()[0][:300]
        torch._dynamo.reset()
        compile_blocks(model, **backend)
        loss_pc, gpc = grads_of(model, ids, dtype)
    rec["compile_s"] = round(time.perf_counter() - t0, 1)
    rec["dynamo"] = {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}
    rec["pinned_routing"] = {"loss_diff": f"{abs(loss_pc - loss_p).item():.1e}",
                             "grad_err": f"{grad_error(gpc, gp):.1e}", "worst": worst_params(gpc, gp)}
    del gp, gpc
    with torch.no_grad():
        pin_routing(model, False)
    loss_c, gc = grads_of(model, ids, dtype)
    rec["natural_routing"] = {"loss_diff": f"{abs(loss_c - loss0).item():.1e}", "grad_err": f"{grad_error(gc, g0):.1e}",
                              "worst": worst_params(gc, g0)}
    return rec


def run_variant(name: str, args, cfg: ModelConfig, ids, device, peak: float, results: dict) -> None:
    """Build, (compile), time; for 'compiled' also check against eager on the same weights and profile."""
    batch, seq = ids.shape[0], ids.shape[1] - 1
    compiled, is_hf = name.startswith("compiled"), name.startswith("hf")
    dtype = "amp" if name.endswith("-amp") else "bf16"      # amp: fp32 masters under bf16 autocast (the trainer)
    if is_hf:
        model, flops_cfg = build("hf", cfg, device, dtype)
    else:
        vcfg = cfg.replace(num_nextn_predict_layers=0) if "no-mtp" in name else cfg
        torch.manual_seed(0)
        if name.startswith("base"):
            sys.path.insert(0, str(args.base))
            from basemodel import build_model as build_base
            with torch.device(device):
                model = build_base(vcfg)
        else:
            with torch.device(device):
                model = build_model(vcfg)
        model, flops_cfg = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32), vcfg
    model.train()
    rec = {**header(device), "bench": "step", "variant": name, "preset": args.preset, "dtype": dtype,
           "batch": batch, "seq": seq}
    if compiled:
        rec.update(check_compiled(model, ids, dtype, args, device))
    elif name.startswith("whole"):            # torch.compile(model), as train_step.py --compile does
        model = torch.compile(model)
        t0 = time.perf_counter()
        grads_of(model, ids, dtype)
        rec["compile_s"] = round(time.perf_counter() - t0, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = make_step("hf" if is_hf else "nanoseek", model, opt, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(functools.partial(step, ids), device, warmup=args.warmup, iters=args.steps)
    tps = batch * seq / ms * 1e3
    fpt = account(flops_cfg, seq)["train_flops_per_token"]
    rec.update(step_ms=round(ms, 2), tokens_per_s=round(tps), mfu=round(tps * fpt / (peak * 1e12), 4),
               flops_per_token=fpt, peak_bf16_tflops=round(peak, 1))
    if device.type == "cuda":
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    if is_hf:
        rec["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    emit(rec)
    results[name] = rec
    if device.type == "cuda" and name in args.profile.split(","):
        prof = kernel_profile(step, ids, args.out, name)
        emit({**header(device), "bench": "profile", "variant": name, "step_ms": rec["step_ms"],
              "gpu_idle_ms": round(rec["step_ms"] - prof["device_ms_per_step"], 2), **prof})
    if device.type == "cuda" and args.out and name in args.trace.split(","):
        emit({**header(device), "bench": "idle", "variant": name, **idle_report(step, ids, args.out, name)})
    del model, opt, step
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="hf,eager,compiled,compiled-no-mtp",
                   help="comma list of hf, base (needs --base), eager, compiled (compile_blocks), whole "
                        "(torch.compile(model)); suffixes -no-mtp (D = 0, the FLOPs"
                        " of transformers' model) and -amp (fp32 weights under bf16 autocast, as the trainer)")
    p.add_argument("--base", type=Path, default=None, help="directory holding an older `basemodel` package")
    p.add_argument("--profile", default="hf,eager,compiled", help="variants to profile")
    p.add_argument("--trace", default="", help="variants whose one-step trace is written and searched for idle")
    p.add_argument("--out", type=Path, default=None, help="write the profiler tables (and traces) here")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-kernels", action="store_true", help="skip the grouped_mm and SDPA checks")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no variant after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 2 x 64, CPU-friendly")
    args = p.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.quick = args.quick or device.type == "cpu"
    if args.quick:
        args.preset, args.batch, args.seq, args.steps, args.warmup = "tiny", 2, 64, 2, 1
        args.variants = ",".join(v for v in args.variants.split(",") if v != "hf")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.preset(args.preset)
    peak = bf16_peak_tflops(device, 512 if args.quick else 8192)
    emit({**header(device), "bench": "peak", "bf16_tflops": round(peak, 1)})
    if not args.skip_kernels:
        check_grouped_mm(device, args.quick)
        routing_variants(device, args.quick)
        sdpa_variants(device, args.quick)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    results: dict[str, dict] = {}
    for name in args.variants.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            emit({"bench": "skipped", "variant": name, "reason": f"past --budget-s {args.budget_s}"})
            continue
        run_variant(name, args, cfg, ids, device, peak, results)
    print(f"\n{'variant':18} {'step ms':>8} {'tokens/s':>10} {'MFU':>6} {'x hf':>6}")
    for name, r in results.items():
        ratio = r["tokens_per_s"] / results["hf"]["tokens_per_s"] if "hf" in results else float("nan")
        print(f"{name:18} {r['step_ms']:8.1f} {r['tokens_per_s']:10,d} {r['mfu']:6.1%} {ratio:6.2f}")


if __name__ == "__main__":
    main()
