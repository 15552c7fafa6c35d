"""Pretraining ablations at tiny scale: the V3 report's balancing and MTP experiments, and the tiny recipe's
own choices. Every variant trains from the same data and seed; the table compares validation loss, expert-load
balance (MaxVio: (max load − mean load) / mean load per MoE layer, averaged over layers and over the last
quarter of training), held-out task pass@1 and pass@K (K samples per problem), and wall time.

Variant sets (`--set-name`):

    balancing  (V3 §2.1.2 Table 5, §2.2 Table 4)
        aux-loss-free (V3)   bias update with γ, plus V3's tiny sequence-wise loss (α = 1e-4) — V3's choice
        aux loss only        no bias update, a conventional auxiliary loss (α = 0.01)
        no balancing         neither
        aux-loss-free, with MTP  plus the multi-token-prediction module (D = 1, λ = 0.3), which the recipe leaves out
    recipe     what recipes/tiny.toml settles: learning rate, model shape, batch, corpus noise

    python benchmarks/pretrain_ablations.py --set-name balancing [--jobs 2] [--steps N] [--out runs/ablations]

Variants run `--jobs` at a time, each in its own process with `--threads` torch threads (two 1-thread jobs
beat one 2-thread job on the tiny model, so `--jobs 2 --threads 1` suits 2 cores). Prints one JSON line per
variant and writes the table into docs/experiments.md between markers of the set's name (other sections of
that file are kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from nanoseek.files import atomic_write_text, read_jsonl

CLEAN = ["data.corpus.wrong=0.1", "data.corpus.short=0.1", "data.corpus.register=0.05", "data.corpus.mixed=0.05",
         "data.corpus.bare=0.1", "data.corpus.general=0.05"]
SETS = {
    "balancing": {
        "aux-loss-free (V3)": ["train.bias_gamma=1e-3", "train.balance_alpha=1e-4"],
        "aux loss only": ["train.bias_gamma=0.0", "train.balance_alpha=1e-2"],
        "no balancing": ["train.bias_gamma=0.0", "train.balance_alpha=0.0"],
        "aux-loss-free, with MTP": ["train.bias_gamma=1e-3", "train.balance_alpha=1e-4",
                                    "model.num_nextn_predict_layers=1"],
    },
    "recipe": {
        "recipe as is": [],
        "lr 6e-3": ["optim.lr=6e-3"],
        "lr 1.5e-3": ["optim.lr=1.5e-3"],
        "cleaner corpus (half the noise)": CLEAN,
        "wider (hidden 192)": ["model.hidden_size=192"],
        "4 layers (the preset's)": ["model.num_hidden_layers=4"],
        "deeper (6 layers)": ["model.num_hidden_layers=6"],
        "batch 16, lr 6e-3": ["train.batch_size=16", "optim.lr=6e-3"],
        "with MTP (D = 1)": ["model.num_nextn_predict_layers=1"],
        "4 layers + MTP (the preset)": ["model.num_hidden_layers=4", "model.num_nextn_predict_layers=1"],
    },
}


def summarize(run: Path) -> dict:
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    tail = records[-max(1, len(records) // 4):]
    last = evals[-1] if evals else {}
    k = next((key for key in last if key.startswith("pass@") and key != "pass@1"), None)
    return {
        "val_loss": last.get("val_loss"),
        "maxvio_last_quarter": sum(r["maxvio_mean"] for r in tail) / len(tail),
        "maxvio_final_per_layer": records[-1]["maxvio"],
        "pass@1": last.get("pass@1"),
        "pass@K": last.get(k) if k else None, "K": k,
        "train_loss_last_quarter": sum(r["loss"] for r in tail) / len(tail),
        "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / len(tail),
    }


def run_variant(job: tuple[str, Path, str, list[str]]) -> dict:
    """Train one variant in this (worker) process; its summary with the wall time."""
    from nanoseek.recipe import load_recipe
    from nanoseek.train.runs import PretrainConfig, pretrain

    name, run, recipe, sets = job
    cfg = load_recipe(PretrainConfig, recipe, sets)
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    pretrain(cfg, run, progress=False)
    result = {"variant": name, **summarize(run), "seconds": time.perf_counter() - t0}
    print(json.dumps(result), flush=True)
    return result


def table(set_name: str, rows: list[dict], command: str, settings: str) -> str:
    def f(v, fmt, scale=1.0):
        return "–" if v is None else format(v * scale, fmt)

    k = next((r["K"] for r in rows if r["K"]), "pass@K")
    lines = [f"<!-- {set_name}:begin -->", f"## Pretraining ablations: {set_name}", "",
             f"`{command}` — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}. {settings}", "",
             f"| variant | val loss | MaxVio (last quarter, layer mean) | MaxVio final (per layer) | pass@1 | {k} | "
             "tokens/s | time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_layer = ", ".join(f"{v:.2f}" for v in r["maxvio_final_per_layer"])
        lines.append(f"| {r['variant']} | {f(r['val_loss'], '.4f')} | {r['maxvio_last_quarter']:.3f} | {per_layer} | "
                     f"{f(r['pass@1'], '.1f', 100)}% | {f(r['pass@K'], '.1f', 100)}% | {r['tokens_per_s']:.0f} | "
                     f"{r['seconds']:.0f} s |")
    lines.append(f"<!-- {set_name}:end -->")
    return "\n".join(lines) + "\n"


def write_section(path: Path, set_name: str, section: str) -> None:
    begin, end = f"<!-- {set_name}:begin -->", f"<!-- {set_name}:end -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Experiments\n\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set-name", choices=sorted(SETS), default="balancing")
    p.add_argument("--recipe", default="recipes/tiny.toml")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: the recipe's)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra overrides for every variant")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--doc", default="docs/experiments.md")
    p.add_argument("--only", action="append", help="run only these variants (by name)")
    args = p.parse_args(argv)

    common = [f"train.threads={args.threads}", *([f"train.steps={args.steps}"] if args.steps else []), *args.sets]
    jobs = [(name, Path(args.out) / args.set_name / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
             args.recipe, [*common, *sets])
            for name, sets in SETS[args.set_name].items() if not args.only or name in args.only]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.map(run_variant, jobs, chunksize=1)
    else:
        rows = [run_variant(job) for job in jobs]
    command = "python benchmarks/pretrain_ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = (f"Recipe {args.recipe}{f', {args.steps} steps' if args.steps else ''}, same data and seed, "
                f"{args.jobs} variant(s) at a time with {args.threads} thread(s) each; pass@1 on the recipe's "
                "held-out TEST-split problems.")
    write_section(Path(args.doc), args.set_name, table(args.set_name, rows, command.strip(), settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
