"""Bring your own model: a user's Hugging Face checkpoint (random-weight Qwen2 and Llama built in transformers,
each with its real chat template and none of nanoseek's special tokens) through the commands, with the recipes
for pretrained checkpoints (recipes/grpo_gsm8k.toml, recipes/sft_chat.toml), TRL's knob names and a user reward
function. Tiny sizes: seconds per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanoseek.cli import main
from nanoseek.files import read_jsonl
from nanoseek.recipe import load_recipe
from nanoseek.rl.trainer import RLConfig
from nanoseek.train.runs import SFTConfig
from user_checkpoints import (CHATML_INSTRUCT, LLAMA3_INSTRUCT, LLAMA3_SPECIALS, QWEN_SPECIALS, gsm8k_lines,
                              user_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {    # Qwen2/Qwen3-Instruct's ChatML (a default system turn) and Llama-3-Instruct's template, as on the hub
    "qwen3": dict(specials=QWEN_SPECIALS, template=CHATML_INSTRUCT, eos="<|im_end|>", pad="<|endoftext|>"),
    "qwen2": dict(specials=QWEN_SPECIALS, template=CHATML_INSTRUCT, eos="<|im_end|>", pad="<|endoftext|>"),
    "llama": dict(specials=LLAMA3_SPECIALS, template=LLAMA3_INSTRUCT, bos="<|begin_of_text|>", eos="<|eot_id|>",
                  pad="<|end_of_text|>"),
}


def own_checkpoint(root: Path, model_type: str) -> Path:
    return user_checkpoint(root / model_type, model_type, **FAMILIES[model_type])


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


def test_mask_truncated_completions(checkpoints, tmp_path, monkeypatch):
    """TRL's mask_truncated_completions: completions cut at max_completion_length get no loss. With every
    completion cut (4 tokens, no eos sampled), the update has nothing to learn from: loss and gradient 0; the
    same run without the mask moves the model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards_mask.py").write_text(REWARDS_PY)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(gsm8k_lines(8)))
    grad = {}
    for masked in (True, False):
        out = tmp_path / f"run-{masked}"
        assert main(["grpo", "--recipe", str(ROOT / "recipes" / "grpo_gsm8k.toml"), "--init",
                     str(checkpoints["qwen2"]), "--out", str(out), "--no-progress", "--set", f"tasks.data={data}",
                     "--set", "train.steps=1,train.prompts=2,train.device=cpu,train.threads=1,checkpoint.every=0",
                     "--set", f"num_generations=4,max_completion_length=4,mask_truncated_completions={str(masked).lower()}",
                     "--set", 'reward_funcs=["rewards_mask:long_answer"]']) == 0
        (rec,) = [r for r in read_jsonl(out / "metrics.jsonl") if "grad_norm" in r]
        assert rec["truncated_share"] == 1.0 and rec["zero_var_share"] < 1.0
        grad[masked] = (rec["grad_norm"], rec["loss"])
    assert grad[True] == (0.0, 0.0) and grad[False][0] > 0


def test_trl_names_are_aliases_of_one_knob(tmp_path):
    """Each TRL name sets its canonical key, in a recipe (top level) or with --set; the values TRL spells
    differently are translated; a name and its canonical key set together is an error, while --set overrides
    the recipe under either name."""
    from nanoseek.errors import UserError

    sets = ["num_generations=12", "beta=0.04", "epsilon=0.1", "epsilon_high=0.3", "num_iterations=2",
            "loss_type=dr_grpo", "scale_rewards=false", "importance_sampling_level=sequence",
            "mask_truncated_completions=true", "max_completion_length=256", "temperature=0.7", "top_p=0.9",
            "top_k=20", "learning_rate=5e-7", 'reward_funcs=["m:f"]', "reward_weights=[0.5]"]
    cfg = load_recipe(RLConfig, None, sets)
    assert (cfg.rl.group_size, cfg.rl.beta, cfg.rl.eps_low, cfg.rl.eps_high, cfg.rl.mu) == (12, 0.04, 0.1, 0.3, 2)
    assert (cfg.rl.aggregation, cfg.grpo.scaling, cfg.rl.importance_sampling_level) == ("drgrpo", "none", "sequence")
    assert cfg.rl.mask_truncated_completions and cfg.sampling.max_new_tokens == 256
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k, cfg.optim.lr) == (0.7, 0.9, 20, 5e-7)
    assert cfg.rewards.functions == ["m:f"] and cfg.rewards.weights == [0.5]
    for value, scaling in (("true", "group"), ('"batch"', "batch"), ('"none"', "none")):
        assert load_recipe(RLConfig, None, [f"scale_rewards={value}"]).grpo.scaling == scaling
    for value, aggregation in (("grpo", "grpo"), ("dapo", "dapo")):
        assert load_recipe(RLConfig, None, [f"loss_type={value}"]).rl.aggregation == aggregation

    recipe = tmp_path / "r.toml"
    recipe.write_text("num_generations = 4\nloss_type = \"grpo\"\n\n[rl]\nbeta = 0.1\n")
    cfg = load_recipe(RLConfig, recipe, ["rl.group_size=6", "beta=0.2"])     # --set wins, under either name
    assert (cfg.rl.group_size, cfg.rl.beta, cfg.rl.aggregation) == (6, 0.2, "grpo")
    recipe.write_text("num_generations = 4\n\n[rl]\ngroup_size = 8\n")
    with pytest.raises(UserError, match="num_generations and rl.group_size are the same knob"):
        load_recipe(RLConfig, recipe)
    with pytest.raises(UserError, match="same knob"):
        load_recipe(RLConfig, None, ["beta=0.1", "rl.beta=0.2"])
    with pytest.raises(UserError, match="choose one of 'grpo', 'dapo', 'dr_grpo'.*bnpo"):
        load_recipe(RLConfig, None, ["loss_type=bnpo"])
    with pytest.raises(UserError, match="importance_sampling_level='tok'"):
        load_recipe(RLConfig, None, ["importance_sampling_level=tok"])
    assert load_recipe(SFTConfig, None, ["learning_rate=2e-5"]).optim.lr == 2e-5


def test_docs_map_every_trl_name():
    """docs/trl.md's table names every alias with its canonical key."""
    from nanoseek.rl.algorithms import TRL_GRPO_ALIASES

    doc = (ROOT / "docs" / "trl.md").read_text()
    for name, alias in TRL_GRPO_ALIASES.items():
        assert f"`{name}`" in doc and f"`{alias.to}`" in doc, name


def test_user_reward_functions_beside_the_rules(tmp_path, monkeypatch):
    """compute_rewards adds each user function's score times its weight; None adds nothing (TRL's nansum) and
    is NaN in the components; the function gets the problem's data columns as lists of one."""
    from nanoseek.errors import UserError
    from nanoseek.sampling.rewards import RewardConfig, compute_rewards, load_reward_functions
    from nanoseek.tasks.jsonl import load_jsonl_problems

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards_unit.py").write_text(
        "seen = []\n"
        "def echo(prompts, completions, **kwargs):\n"
        "    seen.append(kwargs)\n"
        "    return [None if 'skip' in completions[0] else float(len(completions[0]))]\n"
        "def half(prompts, completions, **kwargs):\n"
        "    return [0.5 for _ in completions]\n"
        "def broken(prompts, completions, **kwargs):\n"
        "    return 'nope'\n")
    data = tmp_path / "g.jsonl"
    data.write_text(gsm8k_lines(1)[0])
    (problem,) = load_jsonl_problems(data)
    cfg = RewardConfig(answer_format="gsm8k", format=0.0, functions=["rewards_unit:echo", "rewards_unit:half"],
                       weights=[0.1, 2.0])
    functions = load_reward_functions(cfg)
    out = compute_rewards(cfg, problem, "#### 18", 7, functions=functions)
    assert out["accuracy"] == 1.0 and out["echo"] == 7.0 and out["half"] == 0.5
    assert abs(out["total"] - (1.0 + 0.1 * 7 + 2.0 * 0.5)) < 1e-12
    import rewards_unit
    record = json.loads(gsm8k_lines(1)[0])
    assert rewards_unit.seen[-1] == {k: [v] for k, v in record.items()}     # the columns as the file has them
    out = compute_rewards(cfg, problem, "skip", 4, functions=functions)
    assert out["echo"] != out["echo"] and abs(out["total"] - 1.0) < 1e-12  # NaN, and nothing added
    with pytest.raises(UserError, match="returned nope"):
        compute_rewards(cfg, problem, "x", 1, functions=load_reward_functions(
            RewardConfig(functions=["rewards_unit:broken"])))
    with pytest.raises(UserError, match="named 'accuracy'"):
        (tmp_path / "rewards_clash.py").write_text("def accuracy(prompts, completions, **kw):\n    return [0.0]\n")
        load_reward_functions(RewardConfig(functions=["rewards_clash:accuracy"]))
    with pytest.raises(UserError, match="2 values for 1 functions"):
        RewardConfig(functions=["a:b"], weights=[1.0, 2.0])


def test_system_prompt_in_the_chat_template(checkpoints):
    """tasks.system_prompt becomes the template's system turn (replacing Qwen2's default one); it needs the
    chat template in rollouts and in evaluation."""
    from nanoseek.errors import UserError
    from nanoseek.sampling.rollout import encode_prompt
    from nanoseek.tokenizer import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(checkpoints["qwen2"])
    tok = Tokenizer.load(checkpoints["qwen2"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(encode_prompt(tok, "What is 2 + 3?", "chat", "Be brief.")) == want
    assert "You are a helpful assistant" in tok.decode(encode_prompt(tok, "What is 2 + 3?", "chat"))
    with pytest.raises(UserError, match="chat template"):
        encode_prompt(tok, "What is 2 + 3?", "r1_zero", "Be brief.")
    with pytest.raises(UserError, match="tasks.system_prompt needs tasks.template"):
        load_recipe(RLConfig, None, ["tasks.system_prompt=hi"])
    with pytest.raises(UserError, match="eval.template"):       # evaluation in another template than the rollouts
        load_recipe(RLConfig, None, ["tasks.system_prompt=hi", "tasks.template=chat", "eval.template=r1_zero"])
    assert load_recipe(RLConfig, None, ["tasks.system_prompt=hi", "tasks.template=chat"]).eval.template == ""
    assert load_recipe(RLConfig, None, ["tasks.system_prompt=hi", "tasks.template=chat",
                                        "eval.problems=0"]).tasks.system_prompt == "hi"


def test_eval_with_a_system_prompt(checkpoints, tmp_path, capsys):
    """`eval --template chat --system-prompt TEXT` on a user checkpoint; a system prompt without the chat
    template is a one-line error with nothing written. (sampling.stop=[]: on this branch the default stop
    string "</answer>" must be one token of the tokenizer.)"""
    data = tmp_path / "test.jsonl"
    data.write_text("".join(gsm8k_lines(2)))
    argv = ["eval", "--checkpoint", str(checkpoints["llama"]), "--data", str(data), "--samples", "1",
            "--max-new-tokens", "4", "--no-greedy", "--answer-format", "boxed", "--device", "cpu",
            "--set", "sampling.stop=[]", "--system-prompt", "Put the answer in \\boxed{}."]
    out = tmp_path / "eval.json"
    assert main(argv + ["--template", "r1_zero", "--json", str(out)]) == 2
    assert "needs the chat template" in capsys.readouterr().err and not out.exists()
    assert main(argv + ["--template", "chat", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["system_prompt"] == "Put the answer in \\boxed{}." and result["n_problems"] == 2


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_sft_on_own_checkpoint(checkpoints, tmp_path, model_type):
    """`sft --recipe recipes/sft_chat.toml --init MY_MODEL --set data.path=...` on a user checkpoint (messages
    records rendered with its own template), cut to one step; TRL's learning_rate sets optim.lr."""
    records = [json.loads(line) for line in gsm8k_lines(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                                     {"role": "assistant", "content": r["answer"]}]}) + "\n"
                            for r in records))
    out = tmp_path / "run"
    assert main(["sft", "--recipe", str(ROOT / "recipes" / "sft_chat.toml"), "--init", str(checkpoints[model_type]),
                 "--out", str(out), "--no-progress", "--set", f"data.path={data}",
                 "--set", "train.steps=1,train.batch_size=2,train.grad_accum=1,train.seq_len=768,train.device=cpu",
                 "--set", "train.threads=1,data.val_examples=2,checkpoint.every=0,learning_rate=1e-5"]) == 0
    assert "lr = 1e-05" in (out / "config.toml").read_text()
    (rec,) = read_jsonl(out / "metrics.jsonl")
    assert rec["step"] == 1 and rec["loss"] > 0 and (out / "final" / "config.json").is_file()


SFT_FORMATS = {
    "messages": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    "prompt_response": lambda q, a: {"prompt": q, "response": a},
    "prompt_completion": lambda q, a: {"prompt": q, "completion": a},
}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_every_command_on_own_checkpoint(checkpoints, tmp_path, model_type):
    """Issue 20's user, with default settings and tiny sizes: `eval --data`, `grpo --data`, `sft` on each of the
    three record formats, `rejection`, `distill` and `coldstart` on a user's Qwen2 / Qwen3 / Llama (its own chat
    template, no R1 tokens: the default "</answer>" stop is matched as text) each exit 0, and the SFT export loads
    in transformers with nanoseek's logits."""
    from transformers import AutoModelForCausalLM

    from nanoseek.hf import load_pretrained

    ckpt = str(checkpoints[model_type])
    records = [json.loads(line) for line in gsm8k_lines(6)]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    small = ["--no-progress", "--set", "train.steps=1,train.device=cpu,train.threads=1"]
    assert main(["eval", "--checkpoint", ckpt, "--data", str(data), "--n-problems", "2", "--samples", "2",
                 "--max-new-tokens", "6", "--template", "chat"]) == 0
    assert main(["grpo", "--init", ckpt, "--data", str(data), "--out", str(tmp_path / "grpo"), *small,
                 "--set", "train.prompts=2,rl.group_size=2,sampling.max_new_tokens=6,tasks.template=chat"]) == 0
    for name, make in SFT_FORMATS.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(make(r["question"], r["answer"])) + "\n" for r in records))
        out = tmp_path / f"sft_{name}"
        assert main(["sft", "--init", ckpt, "--data", str(path), "--out", str(out), *small,
                     "--set", "train.batch_size=2,train.seq_len=512,data.val_examples=2,checkpoint.every=0"]) == 0, name
    sample = ["--set", "traces.prompts=2", "--set", "traces.samples=2", "--set", "traces.sampling.max_new_tokens=6",
              "--set", "traces.min_kept=2"]
    train = ["--set", "sft.train.seq_len=512", "--set", "sft.train.batch_size=2", "--set", "epochs=0",
             "--set", "sft.train.steps=1", "--no-progress"]
    chat = tmp_path / "prompt_response.jsonl"
    for command, args in {"rejection": ["--init", ckpt, "--base", ckpt, "--data", str(data), *sample],
                          "distill": ["--teacher", ckpt, "--init", ckpt, "--set", f'traces.data="{data}"', *sample],
                          "coldstart": ["--init", ckpt, "--data", str(chat)]}.items():
        assert main([command, "--out", str(tmp_path / command), *args, *train]) == 0, command
    final = tmp_path / "sft_messages" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == model_type
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_pretrained(final).eval()(ids).logits, atol=1e-4, rtol=1e-4)
