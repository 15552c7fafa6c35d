"""`nanoseek distill`: distil a teacher's traces into a dense student (nanoseek.distill)."""

from __future__ import annotations

import argparse
import json

from nanoseek.distill import DistillConfig, distill
from nanoseek.files import check_output_location
from nanoseek.recipe import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", help="teacher model directory (samples the traces)")
    parser.add_argument("--init", help="student model directory to fine-tune")
    parser.add_argument("--data", help="chat JSONL of traces (instead of sampling the teacher)")
    parser.add_argument("--recipe", help="TOML recipe for DistillConfig")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override, e.g. --set kl.weight=0.5 (repeatable)")
    parser.add_argument("--out", default="runs/distill", help="run directory")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    sets = list(args.sets) + [f"{k}={json.dumps(v)}" for k, v in
                              (("teacher", args.teacher), ("init", args.init), ("data", args.data)) if v]
    cfg = load_recipe(DistillConfig, args.recipe, sets)
    check_output_location(args.out)
    result = distill(cfg, args.out, progress=not args.no_progress)
    s = result["stats"]
    fallback = f", {s['worked_fallback']} of them worked solutions" if s.get("worked_fallback") else ""
    print(f"{s['examples']} traces{fallback} ({result['traces']}); student in {result['final']}")
    return 0
