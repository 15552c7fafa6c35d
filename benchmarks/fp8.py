"""FP8 vs bf16, measured in one run (issue 6): per-GEMM throughput, end-to-end training throughput, loss curves.

    python benchmarks/fp8.py                       # all three on the GPU (real sizes)
    python benchmarks/fp8.py --mode gemm|train|loss
    python benchmarks/fp8.py --quick               # tiny sizes: checks the script on a CPU in seconds

gemm:  TFLOP/s of each GEMM of the `small` preset and of V3's 7168-wide layers, bf16 (cuBLAS) vs FP8 blockwise
       (1x128 activations x 128x128 weights): the GEMM alone, with its quantisation, and a Linear's whole
       forward + backward (3 GEMMs + every cast). MoE experts as grouped GEMMs.
train: tokens/s of the `small` preset training step (fwd + bwd + AdamW, fp32 masters, bf16 autocast) with and
       without `convert_to_fp8`, batch 8 x 2048. Target >= 1.3x. `--width/--layers/--moe-width/--experts/--batch`
       make a wider model (e.g. a V3-width one that fits one GPU: --width 7168 --layers 4 --moe-width 2048
       --experts 16 --batch 4), where the GEMMs are large enough for FP8 to pay.
loss:  the same seed and data (a learnable synthetic language: a Zipfian Markov chain with copied spans) in bf16
       and FP8 for >= 1000 steps on a shrunken `small` model; relative loss error at the end (target < 0.25%,
       V3 §3.3) and a PNG of both curves.
Prints one JSON object per measurement; see benchmarks/RESULTS.md for recorded figures.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import bf16_peak_tflops, emit, header, time_ms
from nanoseek.config import ModelConfig
from nanoseek.info import account
from nanoseek.model import build_model, expert_loads, update_router_biases
from nanoseek.train import fp8
from nanoseek.train.trainer import TrainConfig

# (name, M, K, N): y[M, N] = x[M, K] · W[N, K]ᵀ. `small`: 8 x 2048 tokens; V3: a 4096-token micro-batch.
SMALL = [("q_a_proj", 16384, 1024, 384), ("q_b_proj", 16384, 384, 1536), ("kv_a_proj", 16384, 1024, 288),
         ("kv_b_proj", 16384, 256, 2048), ("o_proj", 16384, 1024, 1024), ("dense_up", 16384, 1024, 2816),
         ("dense_down", 16384, 2816, 1024), ("shared_gate_up", 16384, 1024, 704), ("shared_down", 16384, 704, 1024)]
V3 = [("v3_q_a", 4096, 7168, 1536), ("v3_q_b", 4096, 1536, 24576), ("v3_o_proj", 4096, 16384, 7168),
      ("v3_expert_up", 4096, 7168, 2048), ("v3_expert_down", 4096, 2048, 7168), ("v3_dense_up", 4096, 7168, 18432),
      ("v3_dense_down", 4096, 18432, 7168)]
# (name, routed rows, experts, K, N): `small` routes 16384 tokens x top-6 over 64 experts; V3's expert shapes
# with 32 experts on one GPU (expert parallel) and 4096 tokens x top-8 = 32768 rows, ~1024 per expert.
GROUPED = [("experts_gate_up", 98304, 64, 1024, 704), ("experts_down", 98304, 64, 352, 1024),
           ("v3_experts_gate_up", 32768, 32, 7168, 4096), ("v3_experts_down", 32768, 32, 2048, 7168)]
# --sweep: square Linears of growing width on 8192 tokens, to place train.fp8_min_features where FP8's whole
# Linear (GEMMs + every cast) starts to beat bf16's
SWEEP = [(f"sweep_{w}", 8192, w, w) for w in (1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192)]
QUICK = [("quick", 256, 320, 200)]
QUICK_GROUPED = [("quick_grouped", 512, 4, 256, 192)]


def gemm_bench(device: torch.device, quick: bool, sweep: bool = False) -> None:
    iters = 3 if quick else 20
    hopper = device.type == "cuda" and fp8.fp8_backend(device) == "hopper"
    path = ("cublas" if fp8._cublas_blockwise_ok() else "triton") if hopper else "emulate"
    if device.type == "cuda" and not quick and not sweep:
        n = 8192
        a = torch.randn(n, n, device=device)
        aq, as_ = fp8.quant_rows(a)
        wq, _, ws, _ = fp8.quant_blocks(a[None])
        offs, plan = fp8._dense_plan(n, device)
        ms = time_ms(lambda: fp8.block_gemm(aq, as_, wq, ws, plan, offs, n, torch.bfloat16), device, iters=iters)
        emit({**header(device), "bench": "fp8_gemm_peak", "shape": "8192^3", "path": path,
              "bf16_tflops": round(bf16_peak_tflops(device), 1),
              "fp8_blockwise_tflops": round(2 * n ** 3 / ms / 1e9, 1)})
    for name, M, K, N in (QUICK if quick else SWEEP if sweep else SMALL + V3):
        x = torch.randn(M, K, device=device)
        w = torch.randn(N, K, device=device) * K ** -0.5
        dy = torch.randn(M, N, device=device)
        xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
        xq, xs = fp8.quant_rows(x)
        wq, _, ws, _ = fp8.quant_blocks(w[None])
        offs, plan = fp8._dense_plan(M, device)
        t_bf16 = time_ms(lambda: F.linear(xb, wb), device, iters=iters)
        t_fp8 = time_ms(lambda: fp8.block_gemm(xq, xs, wq, ws, plan, offs, N, torch.bfloat16), device, iters=iters)

        def fp8_with_quant():
            aq, as_ = fp8.quant_rows(xb)
            bq, _, bs, _ = fp8.quant_blocks(w[None])
            return fp8.block_gemm(aq, as_, bq, bs, plan, offs, N, torch.bfloat16)

        t_fp8q = time_ms(fp8_with_quant, device, iters=iters)
        xg, wg = xb.clone().requires_grad_(), w.clone().requires_grad_()   # fp32 master weight, bf16 activations
        t_fb_bf16 = time_ms(lambda: F.linear(xg, wg.bfloat16()).backward(dyb), device, iters=iters)
        t_fb_fp8 = time_ms(lambda: fp8.fp8_linear(xg, wg).backward(dyb), device, iters=iters)
        flops = 2 * M * K * N
        emit({**header(device), "bench": "fp8_gemm", "shape": name, "M": M, "K": K, "N": N, "path": path,
              "bf16_tflops": round(flops / t_bf16 / 1e9, 1), "fp8_gemm_tflops": round(flops / t_fp8 / 1e9, 1),
              "fp8_with_quant_tflops": round(flops / t_fp8q / 1e9, 1),
              "speedup_gemm": round(t_bf16 / t_fp8, 3), "speedup_with_quant": round(t_bf16 / t_fp8q, 3),
              "fwd_bwd_bf16_tflops": round(3 * flops / t_fb_bf16 / 1e9, 1),
              "fwd_bwd_fp8_tflops": round(3 * flops / t_fb_fp8 / 1e9, 1),
              "speedup_fwd_bwd": round(t_fb_bf16 / t_fb_fp8, 3)})
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, T, E, K, N in (QUICK_GROUPED if quick else [] if sweep else GROUPED):
        counts = torch.multinomial(torch.ones(E), T, replacement=True, generator=g).bincount(minlength=E)
        offs = counts.cumsum(0).to(torch.int32).to(device)
        x = torch.randn(T, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=device) * K ** -0.5
        dy = torch.randn(T, N, device=device, dtype=torch.bfloat16)
        wb = w.bfloat16()
        if device.type == "cuda":
            bf16_mm = lambda xx, ww: torch._grouped_mm(xx, ww.transpose(-2, -1), offs=offs)   # noqa: E731
        else:
            from nanoseek.model.moe import grouped_mm
            bf16_mm = lambda xx, ww: grouped_mm(xx, ww, offs)   # noqa: E731
        t_bf16 = time_ms(lambda: bf16_mm(x, wb), device, iters=iters)
        t_fp8q = time_ms(lambda: fp8.fp8_grouped_mm(x, w, offs), device, iters=iters)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        t_fb_bf16 = time_ms(lambda: bf16_mm(xg, wg.bfloat16()).backward(dy), device, iters=iters)
        t_fb_fp8 = time_ms(lambda: fp8.fp8_grouped_mm(xg, wg, offs).backward(dy), device, iters=iters)
        flops = 2 * T * K * N
        emit({**header(device), "bench": "fp8_grouped_gemm", "shape": name, "tokens": T, "experts": E, "K": K,
              "N": N, "path": "triton" if hopper else "emulate",
              "bf16_tflops": round(flops / t_bf16 / 1e9, 1), "fp8_with_quant_tflops": round(flops / t_fp8q / 1e9, 1),
              "speedup_with_quant": round(t_bf16 / t_fp8q, 3),
              "fwd_bwd_bf16_tflops": round(3 * flops / t_fb_bf16 / 1e9, 1),
              "fwd_bwd_fp8_tflops": round(3 * flops / t_fb_fp8 / 1e9, 1),
              "speedup_fwd_bwd": round(t_fb_bf16 / t_fb_fp8, 3)})


def make_step(model, opt, device):
    """One training step as the trainer takes it: bf16 autocast, CE + 0.3·MTP + 1e-4·balance, AdamW, bias update."""
    def step(ids, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(ids, labels=labels)
            loss = out.loss + 0.3 * out.mtp_loss + 1e-4 * out.balance_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_router_biases(model, expert_loads(model), 1e-3)
        return out.loss.detach()
    return step


MIN_FEATURES = TrainConfig().fp8_min_features     # --fp8-min-features: which layers the FP8 model converts


def build(cfg: ModelConfig, precision: str, device: torch.device, lr: float = 3e-4, compile: bool = False):
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg)
    if precision == "fp8":
        fp8.convert_to_fp8(model, min_features=MIN_FEATURES)
    if compile:                                   # nanoseek's regional compile, as the trainer may use it
        from nanoseek.model.compile import compile_blocks
        compile_blocks(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    return model, opt


def widened_small(width: int, layers: int) -> ModelConfig:
    """The `small` preset with every width scaled by width/1024 (heads too, head dims fixed) and `layers` layers."""
    f = width / 1024
    cfg = ModelConfig.preset("small")
    return cfg.replace(hidden_size=width, num_hidden_layers=layers, num_attention_heads=round(16 * f),
                       intermediate_size=round(2816 * f / 64) * 64, moe_intermediate_size=round(352 * f / 32) * 32,
                       q_lora_rank=round(384 * f / 64) * 64, kv_lora_rank=min(512, round(256 * f / 64) * 64))


def with_experts(cfg: ModelConfig, moe_width: int | None, experts: int | None) -> ModelConfig:
    """Override the routed experts' width and count. Why: at V3 widths (7168) `small`'s 64 experts would need
    ~54 GiB of weights and optimizer state per layer, so a V3-width model that fits one GPU has fewer experts;
    the groups shrink with them (>= 2 experts per group, as group scores are top-2 sums)."""
    if moe_width:
        cfg = cfg.replace(moe_intermediate_size=moe_width)
    if experts:
        groups = min(cfg.n_group, experts // 2)
        cfg = cfg.replace(n_routed_experts=experts, num_experts_per_tok=min(cfg.num_experts_per_tok, experts),
                          n_group=groups, topk_group=min(cfg.topk_group, groups))
    return cfg


def train_bench(device: torch.device, quick: bool, compile: bool, width: int, layers: int,
                profile_dir: Path | None, dense: str, quant: str, moe_width: int | None = None,
                experts: int | None = None, batch: int = 8) -> None:
    cfg = with_experts(ModelConfig.preset("tiny") if quick else widened_small(width, layers), moe_width, experts)
    batch, seq = (2, 64) if quick else (batch, 2048)
    peak = bf16_peak_tflops(device, 512 if quick else 8192)
    flops_per_token = account(cfg, seq)["train_flops_per_token"]
    result = {}
    quants = (("traced", "opaque") if quant == "both" else (quant,)) if compile else ("",)   # only compile differs
    runs = ["bf16"] + [f"fp8-{d}" + (f"-{q}" if q else "")
                       for d in (("cublas", "triton") if dense == "both" else (dense,)) for q in quants]
    for run in runs:
        precision = run.split("-")[0]
        if precision == "fp8":
            fp8.DENSE_GEMM = run.split("-")[1]
            fp8.COMPILED_QUANT = run.split("-")[2] if compile else fp8.COMPILED_QUANT
        torch._dynamo.reset()                                         # no graph reuse across runs
        model, opt = build(cfg, precision, device, compile=compile)
        step = make_step(model, opt, device)
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step(ids[:, :-1], ids[:, 1:])                                 # first step: kernel compiles, autotuning
        first_s = time.perf_counter() - t0
        ms = time_ms(lambda: step(ids[:, :-1], ids[:, 1:]), device, warmup=2 if quick else 3, iters=3 if quick else 10)
        tps = batch * seq / ms * 1e3
        result[run] = tps
        emit({**header(device), "bench": "fp8_train_step", "preset": "tiny" if quick else "small",
              "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "moe_width": cfg.moe_intermediate_size,
              "experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok, "precision": run, "compile": compile,
              "batch": batch, "seq": seq, "step_ms": round(ms, 2), "tokens_per_s": round(tps),
              "mfu": round(tps * flops_per_token / (peak * 1e12), 4), "peak_bf16_tflops": round(peak, 1),
              "first_step_s": round(first_s, 1),
              "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
              if device.type == "cuda" else None})
        if profile_dir:
            from train_step import profile
            emit({**header(device), "bench": "fp8_train_profile", "precision": run, "ms_per_step_by_kernel":
                  profile(lambda t: step(t[:, :-1], t[:, 1:]), ids, device, profile_dir, f"fp8_train_{run}")})
        del model, opt, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for run in runs[1:]:
        emit({**header(device), "bench": "fp8_train_speedup", "compile": compile, "hidden": cfg.hidden_size,
              "fp8": run, "fp8_over_bf16": round(result[run] / result["bf16"], 3), "target": 1.3})


def synthetic_language(vocab: int, n_seq: int, seq: int, seed: int, device: torch.device) -> torch.Tensor:
    """[n_seq, seq+1] tokens: a Markov chain where each token has 8 Zipf-weighted successors, and half the rows
    repeat an early span later on (so attention, not just bigrams, lowers the loss). Deterministic in `seed`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    succ = torch.randint(vocab, (vocab, 8), generator=g).to(device)
    zipf = 1.0 / torch.arange(1, 9, dtype=torch.float)
    choice = torch.multinomial(zipf, n_seq * seq, replacement=True, generator=g).view(n_seq, seq).to(device)
    x = torch.empty(n_seq, seq + 1, dtype=torch.long, device=device)
    x[:, 0] = torch.randint(vocab, (n_seq,), generator=g).to(device)
    for t in range(seq):
        x[:, t + 1] = succ[x[:, t], choice[:, t]]
    span = seq // 4
    rows = torch.arange(0, n_seq, 2, device=device)
    x[rows, seq // 2 + 1: seq // 2 + 1 + span] = x[rows, 1: 1 + span]
    return x


def loss_bench(device: torch.device, quick: bool, steps: int, out: Path) -> None:
    if quick:
        cfg, batch, seq = ModelConfig.preset("tiny"), 4, 64
    else:   # the `small` shape shrunk to run 2 x 1000 steps in a few minutes
        cfg = ModelConfig.preset("small").replace(
            vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1408,
            n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
            moe_intermediate_size=256, q_lora_rank=192, kv_lora_rank=128)
        batch, seq = 16, 512
    data = synthetic_language(cfg.vocab_size, steps * batch, seq, seed=0, device=device)
    warmup = max(1, steps // 20)
    curves = {}
    for precision in ("bf16", "fp8"):
        model, opt = build(cfg, precision, device, lr=1e-3)
        step = make_step(model, opt, device)
        losses = []
        t0 = time.perf_counter()
        for i in range(steps):
            lr = 1e-3 * min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps)))
            for group in opt.param_groups:
                group["lr"] = lr
            rows = data[i * batch:(i + 1) * batch]
            losses.append(step(rows[:, :-1], rows[:, 1:]))
        curves[precision] = torch.stack(losses).float().cpu()
        emit({**header(device), "bench": "fp8_loss_run", "precision": precision, "steps": steps,
              "dense_gemm": fp8.DENSE_GEMM if precision == "fp8" else None,
              "seconds": round(time.perf_counter() - t0, 1), "final_loss": round(float(curves[precision][-1]), 4)})
        out.parent.mkdir(parents=True, exist_ok=True)                 # the raw curves, kept even if a later run dies
        out.with_suffix(".json").write_text(json.dumps({p: c.tolist() for p, c in curves.items()}))
        del model, opt, step
    tail = max(1, steps // 10)
    bf16_end, fp8_end = float(curves["bf16"][-tail:].mean()), float(curves["fp8"][-tail:].mean())
    emit({**header(device), "bench": "fp8_loss_curve", "steps": steps, "tokens_per_step": batch * seq,
          "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "experts": cfg.n_routed_experts,
          "bf16_loss_end": round(bf16_end, 4), "fp8_loss_end": round(fp8_end, 4),
          "rel_loss_error": round(abs(fp8_end - bf16_end) / bf16_end, 5), "target": 0.0025,
          "end": f"mean of the last {tail} steps", "plot": str(out)})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    k = max(1, steps // 50)
    smooth = {p: F.avg_pool1d(c[None, None], k, 1).flatten() for p, c in curves.items()}
    for p, c in smooth.items():
        ax.plot(range(k - 1, steps), c, label=p)
    ax.set_ylabel("training loss (CE)")
    ax.set_title(f"bf16 vs FP8 (1x128 / 128x128 blockwise), same seed and data; {k}-step mean", fontsize=9)
    ax.legend()
    ax2.plot(range(k - 1, steps), (smooth["fp8"] - smooth["bf16"]) / smooth["bf16"] * 100)
    ax2.axhline(0, color="gray", lw=0.5)
    ax2.set_ylabel("fp8 - bf16 (%)")
    ax2.set_xlabel("step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    global MIN_FEATURES
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["all", "gemm", "train", "loss"], default="all")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU-friendly), for checking the script")
    p.add_argument("--compile", action="store_true", help="train mode: compile_blocks both models first")
    p.add_argument("--width", type=int, default=1024, help="train mode: hidden size (other widths scale with it)")
    p.add_argument("--layers", type=int, default=12, help="train mode: decoder layers")
    p.add_argument("--moe-width", type=int, default=None, help="train mode: routed experts' intermediate size")
    p.add_argument("--experts", type=int, default=None, help="train mode: routed experts (fewer fit at V3 widths)")
    p.add_argument("--batch", type=int, default=8, help="train mode: sequences of 2048 tokens per step")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR", help="train mode: profiler tables into DIR")
    p.add_argument("--quant", choices=["traced", "opaque", "both"], default="traced",
                   help="train --compile: FP8 quantisers traced into Inductor's fused kernels, or opaque Triton ops")
    p.add_argument("--dense", choices=["cublas", "triton", "both"], default="cublas",
                   help="train mode: FP8 dense GEMM path (fp8.DENSE_GEMM); both = one FP8 run each")
    p.add_argument("--fp8-min-features", type=int, default=MIN_FEATURES,
                   help="train/loss modes: only layers at least this wide in and out run FP8, as train.fp8_min_features "
                        "(default, the trainer's); 0 = every eligible layer, as before that setting existed")
    p.add_argument("--sweep", action="store_true", help="gemm mode: only square Linears of growing width (where FP8 "
                   "starts to pay: train.fp8_min_features)")
    p.add_argument("--steps", type=int, default=None, help="loss-curve steps (default 1000, quick 20)")
    p.add_argument("--plot", type=Path, default=None, help="loss-curve PNG (default benchmarks/fp8_loss.png)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    MIN_FEATURES = args.fp8_min_features
    if args.mode in ("all", "gemm"):
        gemm_bench(device, quick, args.sweep)
    if args.mode in ("all", "train"):
        train_bench(device, quick, args.compile, args.width, args.layers, args.profile, args.dense, args.quant,
                    args.moe_width, args.experts, args.batch)
    if args.mode in ("all", "loss"):
        if args.dense != "both":
            fp8.DENSE_GEMM = args.dense
        default = Path(tempfile.gettempdir()) / "fp8_loss_quick.png" if quick else Path("benchmarks/fp8_loss.png")
        plot = args.plot or default
        loss_bench(device, quick, args.steps or (20 if quick else 1000), plot)


if __name__ == "__main__":
    main()
