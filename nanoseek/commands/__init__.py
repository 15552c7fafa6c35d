"""Command-line modules: each parses its arguments, builds a config (from `--recipe` and `--set`) and calls the
library. `nanoseek.cli` imports them by name; nothing else imports them."""

from __future__ import annotations

import argparse
import json


def add_recipe_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """`--recipe FILE` and repeatable `--set KEY=VALUE`, as every command takes them."""
    parser.add_argument("--recipe", default=None, help="TOML recipe (overrides the defaults)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override one setting, e.g. --set {example} (repeatable)")


def flag_sets(args: argparse.Namespace, keys: dict[str, str]) -> list[str]:
    """`--set` overrides for the config keys that shortcut flags name ({flag attribute: config key}), for the
    flags given on the command line (None = not given), applied after the recipe and the explicit --set."""
    return [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in keys.items() if getattr(args, flag) is not None]
