"""`nanoseek generate | chat | grpo | ppo`: the RL engine from the command line.

generate  sample completions for one or more prompts from any checkpoint nanoseek loads
chat      interactive, streaming; the reasoning (<think>…</think>) is shown dim, apart from the answer
grpo/ppo  train with rule rewards from `--init MODEL_DIR` into `--out RUN_DIR` (resumable with --resume)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from nanoseek.commands import add_recipe_arguments, flag_sets
from nanoseek.errors import UserError
from nanoseek.hf import load_checkpoint
from nanoseek.parallel.mesh import destroy
from nanoseek.recipe import load_recipe
from nanoseek.rl.trainer import RLConfig, train_rl
from nanoseek.run import resolve_device, undo_failed_start
from nanoseek.sampling.rollout import SamplingConfig, encode_prompt, generate, stop_conditions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    if command in ("grpo", "ppo"):
        add_recipe_arguments(parser, "rl.beta=0.04")          # an RLConfig, e.g. recipes/r1_zero_tiny.toml
        parser.add_argument("--init", default=None, help="model directory to start from (sets train.init)")
        parser.add_argument("--out", required=True, help="run directory")
        parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
        parser.add_argument("--data", default=None, help="JSONL of training problems (sets tasks.data)")
        parser.add_argument("--eval-data", default=None, help="JSONL of test problems to evaluate on (sets eval.data)")
        return
    parser.add_argument("--checkpoint", required=True, help="model directory (HF format) with a tokenizer")
    parser.add_argument("--template", default="plain" if command == "generate" else "chat",
                        choices=["plain", "chat", "r1_zero"], help="prompt format")
    add_recipe_arguments(parser, "temperature=0.8")        # a SamplingConfig; the flags below override it
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128")
    parser.add_argument("--temperature", type=float, default=None, help="default 0.6")
    parser.add_argument("--top-p", type=float, default=None, help="default 0.95")
    parser.add_argument("--top-k", type=int, default=None, help="default 0 (off)")
    parser.add_argument("--greedy", action="store_const", const=True, default=None, help="argmax decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    if command == "generate":
        parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
        parser.add_argument("--samples", type=int, default=1, help="completions per prompt")
        parser.add_argument("--json", action="store_true", help="print one JSON object per completion")


def run(args: argparse.Namespace) -> int:
    if args.command in ("grpo", "ppo"):
        return _train(args)

    # interactive defaults: the R1 report's evaluation sampling, a longer budget, no stop token but eos
    base = SamplingConfig(max_new_tokens=128, temperature=0.6, top_p=0.95, stop=[])
    flags = {k: k for k in ("max_new_tokens", "temperature", "top_p", "top_k", "greedy")}
    sampling = load_recipe(SamplingConfig, args.recipe, args.sets + flag_sets(args, flags), base=base)
    model, tok = load_checkpoint(args.checkpoint, resolve_device(args.device), inference=True)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    return (_generate if args.command == "generate" else _chat)(args, model, tok, sampling, gen)


def _generate(args, model, tok, sampling, gen) -> int:
    if args.samples < 1:
        raise UserError(f"--samples {args.samples}: need at least 1")
    prompts = [p for p in args.prompt for _ in range(args.samples)]
    g = generate(model, [encode_prompt(tok, p, args.template) for p in prompts], sampling,
                 _stops(tok, sampling, args.template), tok.pad_id, gen)
    for i, (p, c) in enumerate(zip(prompts, g.completions())):
        text = tok.decode(c, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": p, "completion": text, "tokens": len(c), "finish": g.finish[i]}))
        else:
            print(f"--- [{i}] {p!r} ({len(c)} tokens, {g.finish[i]})\n{text}")
    return 0


def _stops(tok, sampling: SamplingConfig, template: str):
    """eos and `sampling.stop`; under the R1-Zero template also </answer>, where the template's answer ends."""
    return stop_conditions(tok, sampling.stop + (["</answer>"] if template == "r1_zero" else []))


class ThinkingPrinter:
    """Streams decoded text, dim inside <think>…</think>. Decodes the whole completion each time and prints
    only the new suffix, so multi-byte characters split across tokens come out whole."""

    def __init__(self, console, tokenizer, thinking: bool):
        self.console, self.tok, self.thinking = console, tokenizer, thinking
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):                       # an incomplete UTF-8 sequence: wait for the rest
            return
        new, self.shown = text[len(self.shown):], text
        for piece in _split_tags(new):
            if piece == "<think>":
                self.thinking = True
            self.console.print(piece, end="", style="dim italic" if self.thinking else "bold", markup=False,
                               highlight=False)
            if piece == "</think>":
                self.thinking = False
        self.console.file.flush()


def _split_tags(text: str) -> list[str]:
    out, rest = [], text
    while rest:
        cut = min((i for i in (rest.find("<think>"), rest.find("</think>")) if i >= 0), default=-1)
        if cut < 0:
            out.append(rest)
            break
        tag = "<think>" if rest.startswith("<think>", cut) else "</think>"
        out += [rest[:cut], tag] if cut else [tag]
        rest = rest[cut + len(tag):]
    return out


def _chat(args, model, tok, sampling, gen) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]nanoseek chat[/] — {args.checkpoint} ({args.template} template). "
                  "Type /reset to start over, /exit or Ctrl-D to quit. Reasoning is shown [dim italic]dim[/].")
    messages: list[dict] = []
    while True:
        try:
            user = console.input("[bold cyan]you> [/]")
        except EOFError:
            console.print()
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            messages = []
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        if args.template == "chat":
            prompt = tok.encode(tok.apply_chat_template(messages))
        else:   # single-turn formats: the last message only
            prompt = encode_prompt(tok, user, args.template)
        console.print("[bold green]model> [/]", end="")
        printer = ThinkingPrinter(console, tok, thinking=args.template == "r1_zero")
        if args.template == "r1_zero":
            printer.console.print("<think>", end="", style="dim italic", markup=False)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and len(prompt) + sampling.max_new_tokens > max_pos:
            console.print(f"\n[red]the conversation is too long for the model ({max_pos} positions); /reset[/]")
            messages.pop()
            continue
        g = generate(model, [prompt], sampling, _stops(tok, sampling, args.template), tok.pad_id, gen, on_token=printer)
        console.print()
        reply = tok.decode(g.completions()[0], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})


def _train(args) -> int:
    out = Path(args.out)
    sets = args.sets + flag_sets(args, {"data": "tasks.data", "eval_data": "eval.data"})
    if args.resume and args.recipe is None and (out / "config.toml").is_file():
        cfg = load_recipe(RLConfig, out / "config.toml", sets)        # --resume: the run's own config (+ --set)
    else:
        cfg = load_recipe(RLConfig, args.recipe, sets)
    if args.init:
        cfg.train.init = args.init
    try:
        with undo_failed_start(out):                          # bad input found late leaves no half-started run
            train_rl(cfg, out, algo=args.command, resume=args.resume, progress=not args.no_progress)
    finally:
        destroy()                                             # leave the process group (torchrun runs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.command} run written to {out} (metrics.jsonl, plots/, eval/, checkpoints/)")
    return 0
