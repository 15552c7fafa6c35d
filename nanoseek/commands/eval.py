"""`nanoseek eval`: pass@1 over K samples, cons@K, format rate with 95% intervals, for one checkpoint."""

from __future__ import annotations

import argparse
import dataclasses

from rich.console import Console
from rich.markdown import Markdown

from nanoseek.commands import add_recipe_arguments, flag_sets
from nanoseek.errors import UserError
from nanoseek.eval import PassAtKConfig, evaluate, markdown_table
from nanoseek.files import atomic_write_json, check_output_file
from nanoseek.hf import load_checkpoint
from nanoseek.recipe import load_recipe
from nanoseek.run import resolve_device
from nanoseek.sampling.rewards import RewardConfig
from nanoseek.tasks.base import ANSWER_FORMATS
from nanoseek.tasks.problems import load_problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model directory (HF format) with a tokenizer")
    parser.add_argument("--tasks", default=None, help="comma-separated task families, e.g. arithmetic,countdown")
    parser.add_argument("--data", default=None, help="JSONL file with question/prompt and answer (GSM8K, MATH)")
    add_recipe_arguments(parser, "sampling.temperature=0.7")   # a PassAtKConfig; the flags below override it
    parser.add_argument("--samples", type=int, default=None, help="samples per problem K (default 8)")
    parser.add_argument("--n-problems", type=int, default=100, help="problems to evaluate (0 = all of --data)")
    parser.add_argument("--json", default=None, help="write the full result (per-problem records too) here")
    parser.add_argument("--template", default=None, choices=["r1_zero", "chat", "plain"], help="default r1_zero")
    parser.add_argument("--system-prompt", default="", help="a system turn before each question (--template chat)")
    parser.add_argument("--answer-format", default="answer_tag", choices=list(ANSWER_FORMATS),
                        help="where the final answer must be: <answer> tags, \\boxed{}, or GSM8K's '####' line")
    parser.add_argument("--temperature", type=float, default=None, help="default 0.6")
    parser.add_argument("--top-p", type=float, default=None, help="default 0.95")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 96")
    parser.add_argument("--difficulty", type=int, default=None, help="task difficulty (default: the family's mix)")
    parser.add_argument("--no-greedy", dest="greedy", action="store_const", const=False, default=None,
                        help="skip the greedy decode")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


# flag -> PassAtKConfig key
FLAGS = {"samples": "samples", "template": "template", "temperature": "sampling.temperature", "top_p": "sampling.top_p",
         "max_new_tokens": "sampling.max_new_tokens", "greedy": "greedy", "batch_size": "batch_size", "seed": "seed"}


def run(args: argparse.Namespace) -> int:
    cfg = load_recipe(PassAtKConfig, args.recipe, args.sets + flag_sets(args, FLAGS))
    if cfg.samples < 1 or args.n_problems < 0:
        raise UserError("--samples must be >= 1 and --n-problems >= 0")
    if args.json:
        check_output_file(args.json, "--json")      # before the evaluation, so its result cannot be lost
    tasks = [t for t in (args.tasks or "").replace(" ", ",").split(",") if t]
    if bool(tasks) == bool(args.data):
        raise UserError("pass exactly one of --tasks NAMES or --data FILE.jsonl")
    problems = load_problems(tasks, args.data, args.n_problems, "test", cfg.seed, args.difficulty)
    model, tokenizer = load_checkpoint(args.checkpoint, resolve_device(args.device), inference=True)
    console = Console()
    rewards = RewardConfig(answer_format=args.answer_format)
    result = evaluate(model, tokenizer, problems, cfg, progress=True, rewards=rewards, system_prompt=args.system_prompt)
    result["checkpoint"] = str(args.checkpoint)
    result["config"] = {**dataclasses.asdict(cfg), "answer_format": rewards.answer_format,
                        "system_prompt": args.system_prompt}
    console.print(f"{args.checkpoint}: {len(problems)} problems, {cfg.samples} samples each")
    console.print(Markdown(markdown_table(result)))
    if args.json:
        atomic_write_json(args.json, result)
        console.print(f"written {args.json}")
    return 0
