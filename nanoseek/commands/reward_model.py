"""`nanoseek reward-model`: train a Bradley-Terry reward model on preference pairs (nanoseek.rl.reward_model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.files import check_output_location
from nanoseek.r1.general import preference_pairs
from nanoseek.recipe import load_recipe
from nanoseek.rl.reward_model import RewardModelConfig, train_reward_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", help="backbone model directory (sets init)")
    parser.add_argument("--data", help="JSONL of prompt/chosen/rejected pairs (default: generated pairs)")
    parser.add_argument("--recipe", help="TOML recipe for RewardModelConfig")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default="runs/reward-model", help="run directory")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    sets = list(args.sets) + ([f"init={json.dumps(args.init)}"] if args.init else []) + \
        ([f"data.path={json.dumps(args.data)}"] if args.data else [])
    cfg = load_recipe(RewardModelConfig, args.recipe, sets)
    check_output_location(args.out)
    generated = None if cfg.data.path else preference_pairs(cfg.data.pairs, seed=cfg.train.seed)
    m = train_reward_model(cfg, args.out, progress=not args.no_progress, generated=generated)
    kinds = ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["heldout"]["by_kind"].items())
    print(f"held-out pairwise accuracy {100 * m['heldout']['accuracy']:.1f}% on {m['heldout']['n']} pairs ({kinds}); "
          f"model in {Path(args.out) / 'final'}")
    return 0
