"""Bring your own model: a user's Hugging Face checkpoint (random-weight Qwen2 and Llama built in transformers,
each with its real chat template and none of nanoseek's special tokens) through the commands, with the recipes
for pretrained checkpoints (recipes/grpo_gsm8k.toml, recipes/sft_chat.toml), TRL's knob names and a user reward
function. Tiny sizes: seconds per run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from nanoseek.cli import main
from nanoseek.files import read_jsonl
from nanoseek.recipe import load_recipe
from nanoseek.rl.trainer import RLConfig
from nanoseek.train.runs import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"

# Qwen2-Instruct's chat template (ChatML, a default system turn) and Llama-3-Instruct's, as on the hub.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")
FAMILIES = {
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template=CHATML, bos=None,
                  eos="<|im_end|>", pad="<|endoftext|>"),
    "llama": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], template=LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>",
                  pad="<|end_of_text|>"),
}


def gsm8k_lines(n: int) -> list[str]:
    with open(GSM8K, encoding="utf-8") as f:
        return list(itertools.islice(f, n))


def own_checkpoint(root: Path, model_type: str) -> Path:
    """A directory as a user downloads it: config.json + model.safetensors written by transformers, and a
    byte-level BPE tokenizer (trained on GSM8K text) with the family's special tokens and chat template."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)

    fam = FAMILIES[model_type]
    texts = [r for line in gsm8k_lines(200) for r in json.loads(line).values()]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=fam["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=fam["bos"], eos_token=fam["eos"],
                                  pad_token=fam["pad"], chat_template=fam["template"])
    path = root / model_type
    tok.save_pretrained(path)
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if model_type == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model_cls(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    return {m: own_checkpoint(root, m) for m in FAMILIES}


REWARDS_PY = '''
def long_answer(prompts, completions, answer, **kwargs):
    """TRL's reward_funcs signature: one float per completion, or None where it has no opinion."""
    assert len(prompts) == len(completions) == len(answer) and "####" in answer[0]
    return [None if c.startswith(" ") else len(c) / 100 for c in completions]
'''


def test_recipes_for_pretrained_checkpoints_parse():
    rl = load_recipe(RLConfig, ROOT / "recipes" / "grpo_gsm8k.toml")
    assert rl.optim.lr == 1e-6 and 8 <= rl.rl.group_size <= 16 and rl.sampling.max_new_tokens == 512
    assert rl.tasks.template == "chat" and rl.rewards.answer_format == "boxed" and rl.train.precision == "bf16"
    assert "\\boxed{}" in rl.tasks.system_prompt and rl.rewards.format == 0.0
    sft = load_recipe(SFTConfig, ROOT / "recipes" / "sft_chat.toml")
    assert sft.optim.lr == 2e-5 and sft.eval.template == "chat" and sft.train.precision == "bf16"


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_grpo_on_own_checkpoint(checkpoints, tmp_path, monkeypatch, model_type):
    """`grpo --recipe recipes/grpo_gsm8k.toml --init MY_MODEL --set tasks.data=...` on a user checkpoint, with a
    user reward function named module:function (found in the current directory), TRL's names for the knobs
    (GSPO's sequence ratio, Dr. GRPO's loss) and sizes cut for a CPU test. sampling.stop is [] in the recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"rewards_{model_type}.py").write_text(REWARDS_PY)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(gsm8k_lines(8)))
    out = tmp_path / "run"
    rc = main(["grpo", "--recipe", str(ROOT / "recipes" / "grpo_gsm8k.toml"), "--init", str(checkpoints[model_type]),
               "--out", str(out), "--no-progress", "--set", f"tasks.data={data}",
               "--set", "train.steps=2,train.prompts=2,train.device=cpu,train.threads=1,checkpoint.every=0",
               "--set", "num_generations=2,max_completion_length=6,loss_type=dr_grpo,importance_sampling_level=sequence",
               "--set", f'reward_funcs=["rewards_{model_type}:long_answer"],reward_weights=[0.5]'])
    assert rc == 0
    cfg = (out / "config.toml").read_text()        # the canonical keys, never the aliases
    assert 'aggregation = "drgrpo"' in cfg and 'importance_sampling_level = "sequence"' in cfg
    assert "loss_type" not in cfg and f'functions = ["rewards_{model_type}:long_answer"]' in cfg
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/total" in r]
    assert len(records) == 2 and all(r["response_length"] <= 6 for r in records)
    assert all("reward/long_answer" in r for r in records)
    assert (out / "final" / "config.json").is_file()


def test_bad_reward_function_fails_before_the_run_dir(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards_ok.py").write_text(REWARDS_PY)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(gsm8k_lines(4)))
    for spec, message in [("no_such_module:f", "cannot import 'no_such_module'"),
                          ("rewards_ok:missing", "has no function 'missing'"),
                          ("rewards_ok", "is not module:function")]:
        out = tmp_path / "run"
        rc = main(["grpo", "--recipe", str(ROOT / "recipes" / "grpo_gsm8k.toml"), "--init",
                   str(checkpoints["qwen2"]), "--out", str(out), "--no-progress", "--set", f"tasks.data={data}",
                   "--set", f'rewards.functions=["{spec}"]'])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
