"""A user's Hugging Face checkpoint, built in transformers for the tests of issue 20: random weights of a Qwen2,
Qwen3 or Llama and a byte-level BPE tokenizer trained on GSM8K text, with the family's real special tokens and
chat template and none of nanoseek's (so "</answer>" is several tokens). GSM8K comes from the workspace's shared
copy; the tests that need it skip without it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# ChatML as Qwen2.5 base models ship it, and as Qwen2-Instruct does (a default system turn)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_INSTRUCT = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                   "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3's: bos before the first turn, each turn closed by <|eot_id|> (two spellings of it, as on the hub)
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_INSTRUCT = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def gsm8k_lines(n: int) -> list[str]:
    """The first n lines of GSM8K's test file (the test skips when the shared copy is absent)."""
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} is not here")
    with open(GSM8K, encoding="utf-8") as f:
        return list(itertools.islice(f, n))


def user_checkpoint(path: Path, model_type: str, *, template: str, specials: list[str], eos: str,
                    bos: str | None = None, pad: str | None = None, texts: list[str] | None = None,
                    dtype: torch.dtype = torch.float32, tie: bool | None = None) -> Path:
    """`path` as a user downloads it: config.json + model.safetensors written by transformers (2 layers, hidden 32,
    seed 0; Qwen3 with head_dim 16 != hidden / heads), tokenizer.json + tokenizer_config.json with the chat
    template, bos / eos / pad (pad defaults to eos) and a 400-token BPE trained on `texts` (default: the
    questions and answers of 200 GSM8K records). tie: tie_word_embeddings (None = the family's default)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    if texts is None:
        texts = [r for line in gsm8k_lines(200) for r in json.loads(line).values()]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad or eos,
                                  chat_template=template)
    tok.save_pretrained(path)
    cfg_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                          "llama": (LlamaConfig, LlamaForCausalLM)}[model_type]
    torch.manual_seed(0)
    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    if tie is not None:
        extra["tie_word_embeddings"] = tie
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, **extra)
    model_cls(cfg).to(dtype).save_pretrained(path)
    return path
