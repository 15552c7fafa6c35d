"""`nanoseek info`: parameter, KV-cache, FLOP and cost accounting of a model config (nanoseek.info)."""

from __future__ import annotations

import argparse
import json

from nanoseek.errors import UserError
from nanoseek.info import _print_table, account, cost, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="tiny (default), small, deepseek-v2-lite, deepseek-v3")
    src.add_argument("--config", help="an HF config.json, or a model directory holding one")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length for attention FLOPs")
    p.add_argument("--tokens", type=float, help="training tokens for the cost estimate, e.g. 14.8e12")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H800/H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for the estimate")
    p.add_argument("--usd-per-hour", type=float, default=2.0, help="price of one GPU-hour")


def run(args: argparse.Namespace) -> int:
    for name in ("seq_len", "peak_tflops", "usd_per_hour"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu is a fraction in (0, 1], got {args.mfu}")
    cfg = load_config(args)
    acc = account(cfg, args.seq_len)
    acc["source"] = args.config or f"preset {args.preset or 'tiny'}"
    if args.tokens is not None:
        if args.tokens <= 0:
            raise UserError(f"--tokens must be positive, got {args.tokens}")
        acc["cost"] = cost(acc, args.tokens, args.peak_tflops, args.mfu, args.usd_per_hour)
    if args.json:
        print(json.dumps(acc, indent=2))
    else:
        _print_table(acc)
    return 0
