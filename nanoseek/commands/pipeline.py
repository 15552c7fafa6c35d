"""`nanoseek pipeline | coldstart | rejection`: the R1 story end to end, or one of its data stages on its own."""

from __future__ import annotations

import argparse
import json

from nanoseek.files import check_output_location
from nanoseek.pipeline.config import PRESETS, load_pipeline_config
from nanoseek.pipeline.stages import STAGES, Pipeline
from nanoseek.r1 import coldstart as coldstart_stage, rejection as rejection_stage
from nanoseek.r1.coldstart import ColdStartConfig
from nanoseek.r1.rejection import RejectionConfig
from nanoseek.recipe import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    if command == "pipeline":
        parser.add_argument("--preset", default="tiny", choices=PRESETS,
                            help="tiny = the embedded CPU default; small = recipes/pipeline_small.toml (one GPU)")
        parser.add_argument("--stop-after", default=None, choices=[st.name.split("-", 1)[1] for st in STAGES],
                            metavar="STAGE", help="run this stage and the stages it needs, then stop (e.g. pretrain, r1-zero)")
    elif command == "coldstart":
        parser.add_argument("--init", help="model to fine-tune (R1: the base)")
        parser.add_argument("--r1-zero", help="an R1-Zero model: add its correct, readable outputs to the data")
        parser.add_argument("--data", help="chat JSONL of long-CoT examples to use as is")
    else:
        parser.add_argument("--init", help="model to sample, e.g. a reasoning-RL run's final/")
        parser.add_argument("--base", help="also SFT this model on the result (R1: the base model)")
        parser.add_argument("--data", help="JSONL of problems to sample (default: generated TRAIN-split tasks)")
    parser.add_argument("--recipe", help="TOML recipe (overrides the defaults)")
    example = {"pipeline": "pretrain.train.steps=100", "coldstart": "data.examples=500"}.get(command, "traces.samples=8")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override one setting, e.g. --set {example} (repeatable)")
    parser.add_argument("--out", default=f"runs/{command}", help="run directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "pipeline":
        cfg = load_pipeline_config(args.preset, args.recipe, args.sets)
        Pipeline(cfg, args.out, progress=progress).run(stop_after=args.stop_after)
        return 0
    flags = {"coldstart": (("init", "init"), ("r1_zero", "data.r1_zero"), ("data", "data.path")),
             "rejection": (("init", "init"), ("base", "base"), ("data", "traces.data"))}[args.command]
    sets = args.sets + [f"{key}={json.dumps(getattr(args, arg))}" for arg, key in flags if getattr(args, arg)]
    check_output_location(args.out)
    if args.command == "coldstart":
        result = coldstart_stage.coldstart(load_recipe(ColdStartConfig, args.recipe, sets), args.out, progress)
        print(f"cold start: {coldstart_stage.describe(result['stats'])}\ndata: {result['data']}\nmodel: {result['final']}")
        return 0
    result = rejection_stage.rejection(load_recipe(RejectionConfig, args.recipe, sets), args.out, progress)
    print(f"rejection sampling: {rejection_stage.describe(result['stats'])}\ndata: {result['data']}"
          + (f"\nmodel: {result['final']}" if "final" in result else ""))
    return 0
