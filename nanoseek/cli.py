"""`nanoseek <command>`: one entry point; each command is a thin module of nanoseek.commands.

A command module exposes `add_arguments(parser)` and `run(args) -> int | None`. Modules are imported
lazily so `nanoseek info` does not pay for importing the trainer. A `UserError` anywhere becomes one line
on stderr and exit code 2 (bad config, data, checkpoint or argument); other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nanoseek.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("nanoseek.commands.info", "parameter, KV-cache, FLOP and cost accounting of a model config"),
    "tokenizer": ("nanoseek.commands.tokenizer", "train a byte-level BPE tokenizer on the task corpus"),
    "pretrain": ("nanoseek.commands.train", "pretrain a model (next-token + MTP + balancing)"),
    "sft": ("nanoseek.commands.train", "supervised fine-tuning on chat data, loss on responses"),
    "extend": ("nanoseek.commands.train", "context extension with YaRN (V3 §4.3)"),
    "generate": ("nanoseek.commands.rl", "sample completions from a checkpoint"),
    "chat": ("nanoseek.commands.rl", "interactive chat with a checkpoint"),
    "grpo": ("nanoseek.commands.rl", "GRPO reinforcement learning with rule-based rewards"),
    "ppo": ("nanoseek.commands.rl", "PPO baseline with a value model and GAE"),
    "eval": ("nanoseek.commands.eval", "pass@1 over k samples, cons@k, format rate, with 95%% intervals"),
    "coldstart": ("nanoseek.commands.pipeline", "R1 stage 1: build cold-start long-CoT data and SFT from the base"),
    "rejection": ("nanoseek.commands.pipeline", "R1 stage 3: rejection sampling into an SFT data set"),
    "reward-model": ("nanoseek.commands.reward_model", "train a Bradley-Terry reward model on preference pairs"),
    "distill": ("nanoseek.commands.distill", "distil a teacher's traces into a dense student"),
    "pipeline": ("nanoseek.commands.pipeline", "the whole R1 story on an embedded default, ending in a report"),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`nanoseek grpo: error: ... --out`), like every other bad input;
    `--help` still prints the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="nanoseek", description="DeepSeek-V3 / R1 training, end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only import the module of the command being run
            _module(name).add_arguments(p)
    return parser


def _module(name: str):
    module, _ = COMMANDS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("nanoseek"):
            raise UserError(f"command {name!r} is not available in this build ({e.name} missing)") from None
        raise



def process_defaults() -> None:
    """Process settings every command runs with (benchmarks that call the trainers directly call this too).
    CUDA memory in segments that grow in place: RL batches change shape every step (prompt lengths, kept
    groups), and with fixed-size segments the allocator fragments (a 0.5B GRPO run on an H200 reserved 102.6 GB
    for 80 GB allocated; 85.4 GB with this). Read when CUDA first allocates; a user's own setting wins."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    process_defaults()
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse already printed its one-line error
            return int(e.code or 0)
        if args.command is None:
            parser.print_help()
            return 2
        handler = getattr(_module(args.command), "run")
        rc = handler(args)
        return int(rc or 0)
    except UserError as e:
        print(f"nanoseek {command or ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
