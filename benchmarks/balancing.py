"""The V3 report's balancing and MTP ablations, at our scale (V3 §2.1.2 Table 5, §2.2 Table 4).

Trains the tiny preset from the same data and seed several ways and compares validation loss, expert-load
balance (MaxVio: (max load − mean load) / mean load per MoE layer, averaged over layers and over the last
quarter of training) and held-out task pass@1:

    aux-loss-free    bias update with γ, plus V3's tiny sequence-wise loss (α = 1e-4)   — V3's choice
    aux loss only    no bias update, a conventional auxiliary loss (α = 0.01)
    no balancing     neither
    no MTP           aux-loss-free, but without the multi-token-prediction module (λ = 0, D = 0)

    python benchmarks/balancing.py [--recipe recipes/tiny.toml] [--steps 150] [--out runs/balancing]

Prints one JSON line per variant and writes the table into docs/experiments.md (between markers, so other
sections of that file are kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from nanoseek.files import atomic_write_text, read_jsonl
from nanoseek.recipe import load_recipe
from nanoseek.train.commands import PretrainConfig, pretrain

VARIANTS = {
    "aux-loss-free (V3)": ["train.bias_gamma=1e-3", "train.balance_alpha=1e-4"],
    "aux loss only": ["train.bias_gamma=0.0", "train.balance_alpha=1e-2"],
    "no balancing": ["train.bias_gamma=0.0", "train.balance_alpha=0.0"],
    "aux-loss-free, no MTP": ["train.bias_gamma=1e-3", "train.balance_alpha=1e-4", "train.mtp_lambda=0.0",
                              "model.num_nextn_predict_layers=0"],
}
BEGIN, END = "<!-- balancing:begin -->", "<!-- balancing:end -->"


def summarize(run: Path) -> dict:
    records = read_jsonl(run / "metrics.jsonl")
    tail = records[-max(1, len(records) // 4):]
    evals = [r for r in records if "val_loss" in r]
    return {
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "maxvio_last_quarter": sum(r["maxvio_mean"] for r in tail) / len(tail),
        "maxvio_final_per_layer": records[-1]["maxvio"],
        "pass@1": evals[-1].get("pass@1") if evals else None,
        "train_loss_last_quarter": sum(r["loss"] for r in tail) / len(tail),
    }


def table(rows: dict, command: str, settings: str) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = [BEGIN, "## Load balancing and multi-token prediction (V3 §2.1.2, §2.2) at tiny scale", "",
             f"`{command}` — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. {settings}", "",
             "| variant | val loss | MaxVio (last quarter, layer mean) | MaxVio final (per layer) | pass@1 | time |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        per_layer = ", ".join(f"{v:.2f}" for v in r["maxvio_final_per_layer"])
        lines.append(f"| {name} | {f(r['val_loss'], '.4f')} | {r['maxvio_last_quarter']:.3f} | {per_layer} | "
                     f"{f(r['pass@1'] and 100 * r['pass@1'], '.1f')}% | {r['seconds']:.0f} s |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Experiments\n\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/tiny.toml")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per variant")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra overrides for every variant")
    p.add_argument("--out", default="runs/balancing")
    p.add_argument("--doc", default="docs/experiments.md")
    p.add_argument("--only", action="append", help="run only these variants (by name)")
    args = p.parse_args(argv)

    rows = {}
    for name, sets in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        run = Path(args.out) / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        cfg = load_recipe(PretrainConfig, args.recipe, [f"train.steps={args.steps}", *args.sets, *sets])
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        pretrain(cfg, run, progress=sys.stderr.isatty())
        rows[name] = {**summarize(run), "seconds": time.perf_counter() - t0}
        print(json.dumps({"variant": name, **rows[name]}), flush=True)
    command = "python benchmarks/balancing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = (f"Recipe {args.recipe}, {args.steps} steps each, same data and seed; pass@1 on the recipe's "
                "held-out TEST-split problems.")
    write_section(Path(args.doc), table(rows, command.strip(), settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
