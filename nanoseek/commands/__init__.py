"""Command-line modules: each parses its arguments, builds a config (from `--recipe` and `--set`) and calls the
library. `nanoseek.cli` imports them by name; nothing else imports them."""
