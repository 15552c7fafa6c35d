"""GRPO vs PPO on the same model, prompts, rewards and budget: memory, step time, final accuracy.

DeepSeekMath §4.1 motivates GRPO by dropping PPO's critic, "typically another model of comparable size as
the policy". This measures what that saves here: each algorithm runs in its own process (so peak memory
is its own) from the same `--init` checkpoint with the same recipe, and the table goes to
docs/grpo_vs_ppo.md.

Memory: on CUDA, torch.cuda.max_memory_allocated; on CPU, the process's peak RSS (ru_maxrss, which also
counts the Python runtime and libraries both runs share) and the exact bytes of trainable state
(parameters + gradients + AdamW's two moments, plus the critic's) computed from the models.

    python benchmarks/grpo_vs_ppo.py --init runs/base/final --recipe recipes/r1_zero_tiny.toml --steps 30
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from nanoseek.files import atomic_write_json, atomic_write_text, read_jsonl


def state_bytes(model: torch.nn.Module) -> int:
    """Parameters + (for trainable ones) gradient + AdamW exp_avg + exp_avg_sq, in bytes."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size() * (4 if p.requires_grad else 1)
    return total


def child(args) -> None:
    """Train one algorithm and write its measurements to OUT/<algo>/bench.json."""
    from nanoseek.recipe import load_recipe
    from nanoseek.rl.ppo import ValueModel
    from nanoseek.rl.trainer import RLConfig, train_rl

    cfg = load_recipe(RLConfig, args.recipe, args.set + [f"train.steps={args.steps}", "eval.every=0",
                                                        "checkpoint.every=0"])
    cfg.train.init = args.init
    run = Path(args.out) / args.child
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = train_rl(cfg, run, algo=args.child, progress=False)
    out = {"algo": args.child, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads(), "init": args.init}
    trainable = state_bytes(model) + (state_bytes(ValueModel(model)) if args.child == "ppo" else 0)
    if cfg.rl.beta > 0:
        trainable += sum(p.numel() * p.element_size() for p in model.parameters())   # the frozen reference
    out["state_mib"] = trainable / 2**20
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    atomic_write_json(run / "bench.json", out)


def summarize(run: Path) -> dict:
    recs = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in recs if "step_time" in r]
    timed = steps[1:] or steps                                   # the first step pays one-time warm-up
    evals = sorted((run / "eval").glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    first, last = (json.loads(evals[0].read_text()), json.loads(evals[-1].read_text())) if evals else (None, None)
    return {**json.loads((run / "bench.json").read_text()),
            "step_time_s": sum(r["step_time"] for r in timed) / len(timed),
            "gen_tokens_per_s": sum(r["gen_tokens_per_s"] for r in timed) / len(timed),
            "train_tokens_per_s": sum(r["train_tokens_per_s"] for r in timed) / len(timed),
            "pass1_start": first["pass@1"] if first else None, "pass1_end": last["pass@1"] if last else None,
            "format_end": last["format"]["mean"] if last else None, "n_problems": last["n_problems"] if last else 0}


def ci(stat: dict | None) -> str:
    if not stat:
        return "n/a"
    return f"{100 * stat['mean']:.1f} [{100 * stat['lo']:.1f}, {100 * stat['hi']:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="the base model both algorithms start from")
    ap.add_argument("--recipe", default="recipes/r1_zero_tiny.toml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="runs/grpo_vs_ppo")
    ap.add_argument("--doc", default="docs/grpo_vs_ppo.md")
    ap.add_argument("--note", default="", help="a sentence about the base model for the document")
    ap.add_argument("--summarize", action="store_true", help="only rewrite the document from an earlier --out")
    ap.add_argument("--child", choices=["grpo", "ppo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    for algo in ("grpo", "ppo") if not args.summarize else ():
        cmd = [sys.executable, __file__, "--child", algo, "--init", args.init, "--recipe", args.recipe,
               "--steps", str(args.steps), "--out", args.out] + [x for s in args.set for x in ("--set", s)]
        subprocess.run(cmd, check=True)
    rows = {algo: summarize(Path(args.out) / algo) for algo in ("grpo", "ppo")}
    for r in rows.values():
        print(json.dumps(r))
    threads = rows["grpo"]["threads"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({threads} torch thread(s))"
    mem_col = "peak CUDA memory, MiB" if torch.cuda.is_available() else "peak RSS, MiB"
    lines = [
        "# GRPO vs PPO: what dropping the critic saves",
        "",
        f"Same base model (`{args.init}`), recipe (`{args.recipe}`), prompts, rewards and {args.steps} steps; "
        f"each algorithm in its own process. {device}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. {args.note}",
        "",
        f"| | {mem_col} | trainable state, MiB | step time, s | rollout tok/s | train tok/s | pass@1 start, % | pass@1 end, % | format end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, r in rows.items():
        mem = r.get("peak_cuda_mib", r["peak_rss_mib"])
        fmt = "n/a" if r["format_end"] is None else f"{r['format_end']:.2f}"
        lines.append(f"| {algo.upper()} | {mem:.0f} | {r['state_mib']:.1f} | {r['step_time_s']:.2f} | "
                     f"{r['gen_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} | {ci(r['pass1_start'])} | "
                     f"{ci(r['pass1_end'])} | {fmt} |")
    lines += [
        "",
        "Trainable state = parameters + gradients + AdamW moments (4 × parameter bytes per trained tensor), plus "
        "PPO's critic (a copy of the policy with a scalar head) and, if β > 0, the frozen reference. "
        + ("Peak memory is torch.cuda.max_memory_allocated. " if torch.cuda.is_available() else
           "Peak RSS (ru_maxrss) includes the Python runtime and libraries both processes share. ")
        + f"pass@1: mean of the eval samples on {rows['grpo']['n_problems']} held-out problems, 95% t-interval.",
        "",
        f"Command: `python benchmarks/grpo_vs_ppo.py --init {args.init} --recipe {args.recipe} --steps {args.steps}"
        + "".join(f" --set {s}" for s in args.set) + "`",
        "",
    ]
    atomic_write_text(args.doc, "\n".join(lines))
    print(f"written {args.doc}")


if __name__ == "__main__":
    main()
