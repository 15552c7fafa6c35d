"""Parallel layouts on torch.distributed (issue 7): throughput, pipeline bubbles, all-to-all overlap, HFReduce.

    torchrun --nproc-per-node 4 benchmarks/parallel.py            # every layout that fits 4 GPUs
    torchrun --nproc-per-node 2 benchmarks/parallel.py --only throughput,allreduce
    python benchmarks/parallel.py --quick                          # CPU, gloo, 2 local processes: checks the script
    python benchmarks/parallel.py --quick --nproc 4 --param-dtype bfloat16    # ... with the GPU's FSDP dtype

Prints one JSON object per measurement (rank 0):
- throughput: tokens/s of a full training step (forward_backward + clip + AdamW) per layout and schedule.
- bubble: per pipeline schedule, the measured idle fraction of a step (1 − compute time / step time, compute
  timed around every stage forward / backward / weight-backward with device syncs), next to the docs/DESIGN.md §5
  formula and a timing simulation of the schedule's action table, both fed the measured F, B, W (and F&B).
- overlap: F&B pairs (one micro-batch's forward with another's backward) run interleaved (ours) vs one after
  the other; the fraction of the all-to-all time inside the pairs that the interleaving hides =
  (t_sequential − t_interleaved) / t_a2a. On 4+ ranks inside DualPipeV with EP (pp=2 × ep); on 2 ranks,
  where a pipeline leaves no room for EP, the same pairs are driven directly on an ep=2 model.
- allreduce: averaging the gradients of the model through host memory over gloo (HFReduce) vs NCCL, alone
  and overlapped with a data-parallel backward.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.distributed as dist

from common import emit, header
from nanoseek.config import ModelConfig
from nanoseek.model import build_model
from nanoseek.parallel import ParallelConfig, parallelize
from nanoseek.parallel import expert, overlap
from nanoseek.parallel.pipeline import bubble_fraction, simulate_bubble

QUICK_MODEL = dict(hidden_size=64, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, intermediate_size=96,
                   vocab_size=256, num_hidden_layers=8)


def layouts(world: int) -> dict[str, dict]:
    """Layouts for `world` ranks: pure DP variants, DP+EP, and every schedule with and without EP."""
    out = {f"dp{world}-fsdp": dict(dp=world), f"dp{world}-ddp": dict(dp=world, dp_mode="ddp"),
           f"dp{world}-hfreduce": dict(dp=world, dp_mode="hfreduce"), f"dp{world}-ep{world}": dict(dp=world, ep=world)}
    pp = 2
    dp = world // pp
    for s in ("gpipe", "1f1b", "zbv", "dualpipev"):
        out[f"pp{pp}-dp{dp}-{s}"] = dict(pp=pp, dp=dp, schedule=s, microbatches=8)
        if dp > 1:
            out[f"pp{pp}-dp{dp}-ep{dp}-{s}"] = dict(pp=pp, dp=dp, ep=dp, schedule=s, microbatches=8)
    return out


class Timer:
    """Sums wall time of wrapped calls (device-synchronised) unless an F&B pair is running."""

    def __init__(self, device):
        self.device, self.total, self.count = device, {}, {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, obj, name: str, key: str, skip_in_overlap: bool = True):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            if skip_in_overlap and overlap._ACTIVE is not None:
                return fn(*a, **kw)
            self.sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.sync()
            self.total[key] = self.total.get(key, 0.0) + time.perf_counter() - t0
            self.count[key] = self.count.get(key, 0) + 1
            return out
        setattr(obj, name, timed)
        return fn

    def mean(self, key: str) -> float:
        return self.total.get(key, 0.0) / max(1, self.count.get(key, 0))


def make_batch(args, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:].clone()


def build(args, layout: dict, device):
    torch.manual_seed(0)
    cfg = ModelConfig(**QUICK_MODEL) if args.quick else ModelConfig.preset(args.preset)
    model = build_model(cfg)
    if layout.get("dp_mode", "fsdp") == "fsdp" and layout.get("dp", 1) > 1:    # FSDP all-gathers in param_dtype
        layout = dict(layout, param_dtype=args.param_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    par = parallelize(model, ParallelConfig(**layout))
    from nanoseek.train.optim import OptimConfig, build_optimizer
    return cfg, par, build_optimizer(par.module(), OptimConfig())


def autocast(device):
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext


def step(par, opt, batch, device):
    par.forward_backward([batch], 0.3, 1e-4, autocast(device))
    par.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn, device, n: int) -> float:
    """Median wall time of fn() over n calls, the ranks lined up by a barrier before each."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_steps(par, opt, batch, device, n: int) -> float:
    return timed(lambda: step(par, opt, batch, device), device, n)


def bench_throughput_and_bubbles(args, device, world, rank):
    for name, layout in layouts(world).items():
        if args.layouts and name not in args.layouts:
            continue
        cfg, par, opt = build(args, layout, device)
        batch = make_batch(args, cfg.vocab_size, 0)
        step(par, opt, batch, device)                                   # warm-up (and pipeline stage build)
        t = timed_steps(par, opt, batch, device, args.steps)
        tokens = args.batch * args.seq
        rec = dict(bench="throughput", layout=name, **layout, param_dtype=par.ctx.cfg.param_dtype, world=world,
                   tokens_per_step=tokens, step_ms=round(t * 1e3, 2), tokens_per_s=round(tokens / t, 1))
        if par.schedule is not None:
            rec.update(bubble_record(par, opt, batch, device, layout))
        if rank == 0:
            emit({**header(device), **rec})
        del par, opt


def bubble_record(par, opt, batch, device, layout) -> dict:
    """Instrument one step: F, B (full), I (input-only), W per stage chunk; idle = step − compute."""
    timer = Timer(device)
    originals = []
    for st in par.stages:
        for name, key in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"), ("backward_weight_one_chunk", "W")):
            originals.append((st, name, timer.wrap(st, name, key)))
    run = overlap.run_overlapped

    def timed_pair(f, b):
        timer.sync()
        t0 = time.perf_counter()
        n = run(f, b)
        timer.sync()
        timer.total["FB"] = timer.total.get("FB", 0.0) + time.perf_counter() - t0
        timer.count["FB"] = timer.count.get("FB", 0) + 1
        return n
    overlap.run_overlapped = timed_pair
    try:
        t = timed_steps(par, opt, batch, device, 1)
    finally:
        overlap.run_overlapped = run
        for st, name, fn in originals:
            setattr(st, name, fn)
    busy = sum(timer.total.values())
    cfg = par.ctx.cfg
    F, B, W = timer.mean("F"), timer.mean("B"), timer.mean("W")
    if timer.count.get("W"):            # zero-bubble: "B" calls were input-only; full backward = I + W
        B = B + W
    FB = timer.mean("FB") if timer.count.get("FB") else None
    measured = torch.tensor([1 - busy / t], dtype=torch.float64)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, measured)      # every rank's idle fraction (gloo / nccl via CPU tensors)
    m = cfg.microbatches
    sim = simulate_bubble(cfg.schedule, cfg.pp, m, F, B, W, FB)
    per_rank_work = (2 if cfg.stages_per_rank == 2 else 1) * m * (F + B)
    return dict(F_ms=round(F * 1e3, 3), B_ms=round(B * 1e3, 3), W_ms=round(W * 1e3, 3),
                FB_ms=round(FB * 1e3, 3) if FB else None,
                bubble_measured_mean=round(float(torch.cat(gathered).mean()), 4),
                bubble_measured_max=round(float(torch.cat(gathered).max()), 4),
                bubble_formula=round(bubble_fraction(cfg.schedule, cfg.pp, m, F, B, W, FB), 4),
                bubble_simulated=round(max(sim) / (max(sim) + per_rank_work), 4))


def pairs_without_pipeline(args, par, device) -> callable:
    """A step of F&B pairs on an EP model with no pipeline: micro-batch i's forward runs with micro-batch
    i−1's backward through `overlap.run_overlapped`, as DualPipeV's steady state does (2-rank overlap bench)."""
    from nanoseek.parallel.mesh import _same_ranks_group
    par.ep_comm.group_bwd = _same_ranks_group(par.ctx.ep_group)    # backward a2a on its own communicator
    for r in par.reducers:
        r.armed = False                                            # gradients stay local: time the a2a only
    x, y = make_batch(args, par.model.config.vocab_size, 0)
    micro = list(zip(par.ctx.shard_batch(x).to(device).chunk(8), par.ctx.shard_batch(y).to(device).chunk(8)))

    def forward(i, into):
        with autocast(device)():
            into.append(par.model(micro[i][0], labels=micro[i][1]).loss)

    def run_step():
        losses = []
        forward(0, losses)
        for i in range(1, len(micro)):
            prev = losses[-1]
            overlap.run_overlapped(lambda i=i: forward(i, losses), prev.backward)
        losses[-1].backward()
        for p in par.model.parameters():
            p.grad = None
    return run_step


def bench_overlap(args, device, world, rank):
    """EP all-to-all under F&B pairs: interleaved (ours) vs sequential, and the all-to-all time inside them."""
    if world >= 4:                                  # inside DualPipeV
        layout = dict(pp=2, dp=world // 2, ep=world // 2, schedule="dualpipev", microbatches=8)
        cfg, par, opt = build(args, layout, device)
        batch = make_batch(args, cfg.vocab_size, 0)
        run_step = lambda: step(par, opt, batch, device)           # noqa: E731
    else:                                           # 2 ranks: the pairs driven directly on an ep=2 model
        layout = dict(dp=world, ep=world, dp_mode="ddp", pairs="no pipeline, 8 micro-batches")
        cfg, par, opt = build(args, {k: v for k, v in layout.items() if k != "pairs"}, device)
        run_step = pairs_without_pipeline(args, par, device)
    run_step()
    run, orig_a2a = overlap.run_overlapped, expert._all_to_all
    fb, a2a, state = {}, {"ms": 0.0}, {"in_pair": False}

    def timed_a2a(*a, **kw):
        if not state["in_pair"]:
            return orig_a2a(*a, **kw)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        out = orig_a2a(*a, **kw)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        a2a["ms"] += (time.perf_counter() - t0) * 1e3
        return out

    for mode in ("sequential", "interleaved", "a2a-timing"):
        timer, times = Timer(device), []

        def pair(f, b, mode=mode):
            timer.sync()
            t0 = time.perf_counter()
            if mode == "interleaved":
                n = run(f, b)
            else:                                   # one after the other (the a2a-timing run times each a2a)
                state["in_pair"] = mode == "a2a-timing"
                f(), b()
                state["in_pair"], n = False, 0
            timer.sync()
            times.append(time.perf_counter() - t0)
            return n
        overlap.run_overlapped = pair
        expert._all_to_all = timed_a2a
        try:
            step_t = timed(run_step, device, args.steps)
        finally:
            overlap.run_overlapped, expert._all_to_all = run, orig_a2a
        fb[mode] = (step_t * 1e3, sum(times) * 1e3 / args.steps)
    a2a["ms"] /= args.steps
    a2a_ms = a2a["ms"]
    seq_step, seq_fb = fb["sequential"]
    int_step, int_fb = fb["interleaved"]
    hidden = (seq_fb - int_fb) / a2a_ms if a2a_ms > 0 else 0.0
    if rank == 0:
        emit({**header(device), "bench": "overlap", **layout, "step_ms_sequential": round(seq_step, 2),
              "step_ms_interleaved": round(int_step, 2), "fb_pairs_ms_sequential": round(seq_fb, 2),
              "fb_pairs_ms_interleaved": round(int_fb, 2), "a2a_ms_in_fb_pairs": round(a2a_ms, 2),
              "a2a_hidden_fraction": round(hidden, 3)})


def bench_allreduce(args, device, world, rank):
    """HFReduce (pinned host buffers, gloo on the CPU) vs NCCL on the model's gradients."""
    from nanoseek.parallel.hfreduce import GradReducer
    torch.manual_seed(0)
    cfg = ModelConfig(**QUICK_MODEL) if args.quick else ModelConfig.preset(args.preset)
    model = build_model(cfg).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    mb = sum(p.numel() * 4 for p in params) / 2**20
    gloo = dist.new_group(backend="gloo")
    for host in (False, True):
        if host is False and device.type != "cuda":
            continue                                               # gloo on CPU is the host path already
        red = GradReducer(params, gloo if host else None, args.bucket_mb, host=host)
        times = []
        for i in range(args.steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            red.finish()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
        red.close()
        t = statistics.median(times)
        if rank == 0:
            emit({**header(device), "bench": "allreduce", "path": "hfreduce (host, gloo)" if host else "nccl",
                  "grad_mb": round(mb, 1), "world": world, "ms": round(t * 1e3, 2),
                  "algbw_gb_s": round(mb / 1024 / t, 2)})
    # overlapped with backward: a data-parallel training step per gradient path
    for mode in ("ddp", "hfreduce"):
        layout = dict(dp=world, dp_mode=mode)
        cfg, par, opt = build(args, layout, device)
        batch = make_batch(args, cfg.vocab_size, 0)
        step(par, opt, batch, device)
        t = timed_steps(par, opt, batch, device, args.steps)
        if rank == 0:
            emit({**header(device), "bench": "allreduce-in-step", "path": mode, "world": world,
                  "step_ms": round(t * 1e3, 2), "tokens_per_s": round(args.batch * args.seq / t, 1)})


def main(args) -> None:
    from nanoseek.parallel.mesh import init_distributed
    ctx = init_distributed(ParallelConfig())
    device, world, rank = ctx.device, ctx.world, ctx.rank
    only = set(args.only.split(",")) if args.only else {"throughput", "overlap", "allreduce"}
    if "throughput" in only:
        bench_throughput_and_bubbles(args, device, world, rank)
    if "overlap" in only:
        bench_overlap(args, device, world, rank)
    if "allreduce" in only:
        bench_allreduce(args, device, world, rank)


def _spawned(args) -> None:
    main(args)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU with gloo (local processes)")
    p.add_argument("--nproc", type=int, default=2, help="--quick: local processes to spawn")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16, help="global sequences per step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--param-dtype", default="", choices=["", "float32", "bfloat16"],
                   help="FSDP layouts' compute dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--only", default="", help="comma list of throughput, overlap, allreduce")
    p.add_argument("--layouts", default="", help="comma list of layout names (default: all that fit)")
    args = p.parse_args(argv)
    args.layouts = [s for s in args.layouts.split(",") if s]
    if args.quick:
        args.batch, args.seq, args.steps = min(args.batch, 16), min(args.seq, 32), min(args.steps, 2)
    return args


if __name__ == "__main__":
    args = parse()
    if args.quick and "WORLD_SIZE" not in os.environ:
        from nanoseek.parallel.launch import spawn
        spawn(_spawned, args.nproc, args)
    else:
        main(args)
