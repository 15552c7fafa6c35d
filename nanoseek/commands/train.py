"""`nanoseek pretrain | sft | extend`: one config tree from `--recipe` and `--set`, then the run
(nanoseek.train.runs, nanoseek.train.extend)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from nanoseek.commands import flag_sets
from nanoseek.parallel.mesh import destroy
from nanoseek.recipe import load_recipe
from nanoseek.run import undo_failed_start
from nanoseek.train.extend import ExtendConfig, extend
from nanoseek.train.runs import PretrainConfig, SFTConfig, pretrain, sft


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="TOML recipe, e.g. recipes/tiny.toml (defaults: the tiny CPU recipe)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--out", help="run directory (default runs/<command>)")
    parser.add_argument("--init", help="model directory to start from (required for sft and extend)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    if parser.prog.split()[-1] == "sft":
        parser.add_argument("--data", help="chat JSONL to fine-tune on (sets data.path)")
        parser.add_argument("--eval-data", help="JSONL of test problems for pass@1 during training (sets eval.data)")


def run(args: argparse.Namespace) -> int:
    stages = {"pretrain": (PretrainConfig, pretrain), "sft": (SFTConfig, sft), "extend": (ExtendConfig, extend)}
    cls, stage = stages[args.command]
    out = Path(args.out or f"runs/{args.command}")
    sets = list(args.sets) + ([f"init={json.dumps(args.init)}"] if args.init else [])
    sets += flag_sets(args, {"data": "data.path", "eval_data": "eval.data"}) if args.command == "sft" else []
    if args.resume and args.recipe is None and (out / "config.toml").is_file():
        cfg = load_recipe(cls, out / "config.toml", sets)     # --resume without a recipe: the run's own config
    else:
        cfg = load_recipe(cls, args.recipe, sets)
    try:
        with undo_failed_start(out):               # bad input found late leaves no half-started run
            final = stage(cfg, out, resume=args.resume, progress=not args.no_progress)
    finally:
        destroy()                                  # leave the process group (torchrun runs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {final}")
    return 0
