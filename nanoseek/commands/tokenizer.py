"""`nanoseek tokenizer`: train the byte-level BPE tokenizer on the generated pretraining corpus."""

from __future__ import annotations

import argparse

from nanoseek.data import CorpusConfig, build_corpus
from nanoseek.files import check_output_dir
from nanoseek.recipe import load_recipe
from nanoseek.tokenizer import Tokenizer, _check_vocab_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write tokenizer.json + tokenizer_config.json")
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="BPE vocabulary size including the 10 special tokens (default 1024: the tiny model)")
    parser.add_argument("--recipe", default=None, help="TOML file of corpus settings (nanoseek.data.CorpusConfig)")
    parser.add_argument("--set", action="append", default=[], help="corpus override, e.g. --set n_documents=5000")


def run(args: argparse.Namespace) -> int:
    """Train on the generated pretraining corpus, so the merges fit the text the model will see."""
    _check_vocab_size(args.vocab_size)   # before minutes of corpus building
    check_output_dir(args.out, "--out")  # never replaces a file or a folder of the user's
    texts = [doc.text for doc in build_corpus(load_recipe(CorpusConfig, args.recipe, args.set))]
    tok = Tokenizer.train(texts, args.vocab_size)
    tok.save(args.out)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    print(f"tokenizer with {len(tok)} tokens written to {args.out} ({len(texts)} documents, "
          f"{sum(map(len, texts)) / n_tokens:.2f} characters per token)")
    return 0
