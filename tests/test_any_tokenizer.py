"""Any Hugging Face checkpoint and tokenizer (issue 20): a random-weight Qwen2 with a ChatML tokenizer that has
no R1 tags (so "</answer>" is several tokens) runs the commands with their default stops, a failed start
leaves its run directory empty, and the exports serve in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanoseek.cli import main
from user_checkpoints import CHATML, LLAMA3, LLAMA3_SPECIALS, QWEN_SPECIALS, gsm8k_lines, user_checkpoint

def gsm8k_file(root: Path, n: int = 6) -> Path:
    path = root / "gsm8k.jsonl"
    path.write_text("".join(gsm8k_lines(n)), encoding="utf-8")
    return path


def chatml_qwen2(root: Path, dtype: torch.dtype = torch.float32, llama: bool = False) -> Path:
    """A random-weight Qwen2 saved by transformers, with a byte-level BPE tokenizer whose only added tokens are
    ChatML's (eos "<|endoftext|>", as Qwen2.5 base; the template ends a turn with "<|im_end|>"). llama: a Llama
    with Llama 3's template and special tokens instead (bos <|begin_of_text|>, eos <|end_of_text|>, turns
    ending in <|eot_id|>)."""
    questions = [json.loads(line)["question"] for line in gsm8k_lines(64)]
    if llama:
        return user_checkpoint(root / "llama", "llama", template=LLAMA3, specials=LLAMA3_SPECIALS,
                               bos="<|begin_of_text|>", eos="<|end_of_text|>", texts=questions, dtype=dtype, tie=False)
    return user_checkpoint(root / "qwen2", "qwen2", template=CHATML, specials=QWEN_SPECIALS, eos="<|endoftext|>",
                           texts=questions, dtype=dtype, tie=False)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return chatml_qwen2(tmp_path_factory.mktemp("qwen2"))


def test_eval_runs_on_a_tokenizer_without_answer_tags(qwen2, tmp_path):
    """The default sampling.stop ["</answer>"] is three-plus tokens here: matched on the text, no error."""
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.load(qwen2)
    assert tok.token_id("</answer>") is None and tok.eos_ids == [tok.token_id("<|endoftext|>"),
                                                                tok.token_id("<|im_end|>")]
    data = gsm8k_file(tmp_path)
    assert main(["eval", "--checkpoint", str(qwen2), "--data", str(data), "--n-problems", "3", "--samples", "2",
                 "--max-new-tokens", "8", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n_problems"] == 3


def test_eval_and_grpo_run_on_a_llama_with_llama3_template(tmp_path):
    """Llama 3's template: the turn ends in <|eot_id|>, which joins eos as a stop; eval and a default grpo
    (R1-Zero template, arithmetic, "</answer>" as text) exit 0."""
    from nanoseek.tokenizer import Tokenizer

    llama = chatml_qwen2(tmp_path, llama=True)
    tok = Tokenizer.load(llama)
    assert tok.eos_ids == [tok.token_id("<|end_of_text|>"), tok.token_id("<|eot_id|>")]
    assert main(["eval", "--checkpoint", str(llama), "--data", str(gsm8k_file(tmp_path)), "--n-problems", "2",
                 "--samples", "1", "--max-new-tokens", "6", "--template", "chat"]) == 0
    assert main(["grpo", "--init", str(llama), "--out", str(tmp_path / "run"), "--no-progress", "--set", "train.steps=1",
                 "--set", "train.prompts=2", "--set", "rl.group_size=2", "--set", "sampling.max_new_tokens=6",
                 "--set", "eval.problems=2", "--set", "eval.samples=1", "--set", "eval.sampling.max_new_tokens=6"]) == 0


def _served_export(final: Path, tmp_path: Path) -> None:
    """final/ as transformers serves it: bf16 weights (the init's dtype) with logits equal to nanoseek's,
    special-token ids in config.json, generation_config.json whose eos ids stop `generate()` at <|im_end|>,
    and the chat template in the tokenizer."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from nanoseek.hf import load_pretrained
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.load(final)
    end, eot = tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")
    config = json.loads((final / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert (config["eos_token_id"], config["pad_token_id"]) == (eot, eot) and "bos_token_id" not in config
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert GenerationConfig.from_pretrained(final).eos_token_id == [eot, end]

    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 6 times 7?"}]))])
    ours = load_pretrained(final).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(final)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(msgs)
    # a model that says <|im_end|> first: generate() stops there instead of running to max_new_tokens
    hf.lm_head.register_forward_hook(lambda m, args, out: out.index_fill(-1, torch.tensor([end]), 1e4))
    out = hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == [end]


def test_failed_grpo_start_leaves_nothing_and_the_fixed_rerun_exports_a_servable_model(tmp_path, capsys):
    """Bad input found by a grpo start (a bad stop string, a missing eval file) leaves the run directory as it
    was (absent, or empty when the user made it), so the rerun with the fix needs no cleanup; the run on a
    bf16 Qwen2 with a ChatML tokenizer, GSM8K data and GSM8K evaluation then exports a model transformers
    serves."""
    qwen2 = chatml_qwen2(tmp_path, torch.bfloat16)
    data, out = gsm8k_file(tmp_path), tmp_path / "run"
    args = ["grpo", "--init", str(qwen2), "--out", str(out), "--data", str(data), "--no-progress",
            "--set", "train.steps=1", "--set", "train.prompts=2", "--set", "rl.group_size=2",
            "--set", "sampling.max_new_tokens=6", "--set", 'tasks.template="chat"', "--set", "eval.problems=2",
            "--set", "eval.samples=1", "--set", "eval.sampling.max_new_tokens=6"]
    assert main(args + ["--eval-data", str(data), "--set", 'sampling.stop=["</answer>", ""]']) == 2
    assert "empty string" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    assert main(args + ["--eval-data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err and out.is_dir() and not any(out.iterdir())
    assert main(args + ["--eval-data", str(data)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "eval/pass@1" in metrics[0]          # the step-0 evaluation on GSM8K
    evaluated = json.loads((out / "eval" / "step-0.json").read_text())["per_problem"]
    assert [q["prompt"] for q in evaluated] == [json.loads(x)["question"] for x in data.read_text().splitlines()[:2]]
    _served_export(out / "final", tmp_path)


def test_failed_sft_start_leaves_nothing_and_the_fixed_rerun_exports_a_servable_model(tmp_path, capsys):
    qwen2 = chatml_qwen2(tmp_path, torch.bfloat16)
    data, out = gsm8k_file(tmp_path, 24), tmp_path / "sft"
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n"
                            for r in map(json.loads, data.read_text().splitlines())))
    args = ["sft", "--init", str(qwen2), "--out", str(out), "--data", str(chat), "--eval-data", str(data),
            "--no-progress", "--set", "train.steps=1", "--set", "train.batch_size=2", "--set", "train.seq_len=512",
            "--set", "eval.problems=2", "--set", "eval.sampling.max_new_tokens=6"]
    assert main(args + ["--set", 'eval.sampling.stop=[""]']) == 2
    assert "empty string" in capsys.readouterr().err and not out.exists()
    assert main(args) == 0
    _served_export(out / "final", tmp_path)


def test_rejection_mixes_general_examples_into_user_data_only_when_asked(tmp_path, monkeypatch):
    """R1's 1 : 3 general : reasoning mix applies to nanoseek's task problems; on the user's traces.data the
    canned general examples come in only with an explicit general_ratio."""
    from nanoseek.r1 import rejection
    from nanoseek.r1.rejection import RejectionConfig, TraceConfig, build_rejection_data

    kept = [{"prompt": f"q{i}", "response": "<think>r</think> <answer>1</answer>", "family": "x", "answer": "1"}
            for i in range(6)]
    monkeypatch.setattr(rejection, "teacher_traces", lambda *a, **k: (list(kept), {"sampled": 6, "correct": 6}))

    def general(name, **cfg):
        _, stats = build_rejection_data(RejectionConfig(init="m", **cfg), tmp_path / name, progress=False)
        return stats["general"]

    assert general("tasks") == 2                                                # R1's ratio on our tasks
    assert general("user", traces=TraceConfig(data="mine.jsonl")) == 0
    assert general("asked", traces=TraceConfig(data="mine.jsonl"), general_ratio=0.5) == 3


def test_a_start_that_fails_late_is_undone_but_a_run_with_a_checkpoint_is_kept(tmp_path):
    """undo_failed_start deletes what the failed attempt created (out itself when it made it) and keeps what was
    there before; once the attempt wrote a checkpoint nothing is deleted (it can be resumed)."""
    from nanoseek.errors import UserError
    from nanoseek.run import undo_failed_start

    out = tmp_path / "run"
    with pytest.raises(UserError), undo_failed_start(out):
        (out / "tb").mkdir(parents=True)
        (out / "config.toml").write_text("x")
        raise UserError("late")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(UserError), undo_failed_start(out):
        (out / "metrics.jsonl").write_text("{}")
        raise UserError("late")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(UserError), undo_failed_start(out):
        (out / "checkpoints" / "step-5" / "trainer_state").mkdir(parents=True)
        (out / "checkpoints" / "step-5" / "trainer_state" / "state.json").write_text("{}")
        raise UserError("late")
    assert (out / "checkpoints").is_dir()
    with pytest.raises(ValueError), undo_failed_start(tmp_path / "other"):   # not bad input: a bug, kept to debug
        (tmp_path / "other").mkdir()
        raise ValueError("bug")
    assert (tmp_path / "other").is_dir()


def test_data_stages_sample_and_fine_tune_on_any_tokenizer(qwen2, tmp_path):
    """rejection, distill and coldstart sample (default stops: "</answer>" as text) and fine-tune the Qwen2;
    their SFT's exports keep the init's eos ids. A random model solves nothing, so traces.min_kept tops the
    data up with GSM8K's worked solutions."""
    data = gsm8k_file(tmp_path)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n"
                            for r in map(json.loads, data.read_text().splitlines())))
    sample = ["--set", "traces.prompts=3", "--set", "traces.samples=2", "--set", "traces.sampling.max_new_tokens=8",
              "--set", "traces.min_kept=3"]
    train = ["--set", "sft.train.seq_len=512", "--set", "sft.train.batch_size=2", "--set", "epochs=0",
             "--set", "sft.train.steps=1", "--no-progress"]
    runs = {"rejection": ["--init", str(qwen2), "--base", str(qwen2), "--data", str(data), *sample],
            "distill": ["--teacher", str(qwen2), "--init", str(qwen2), "--set", f'traces.data="{data}"', *sample],
            "coldstart": ["--init", str(qwen2), "--data", str(chat)]}
    for command, args in runs.items():
        assert main([command, "--out", str(tmp_path / command), *args, *train]) == 0, command
        final = tmp_path / command / "sft" / "final"
        assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == [0, 2], command
    stats = json.loads((tmp_path / "rejection" / "stats.json").read_text())
    assert stats["general"] == 0 and stats["worked_fallback"] == 3


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_stop_string_spelled_by_several_bpe_tokens_cuts_the_greedy_decode(qwen2, decode):
    """With the real byte-level BPE: a stop string taken from the middle of the uncut greedy text (spanning
    token boundaries) ends each row at the first token whose prefix text holds it, tokens equal to the uncut
    decode up to there."""
    from nanoseek.hf import load_checkpoint
    from nanoseek.sampling.rollout import SamplingConfig, encode_prompt, generate, stop_conditions

    model, tok = load_checkpoint(qwen2)
    prompts = [encode_prompt(tok, q, "chat") for q in ("How many eggs?", "What is 3 + 4?", "Add 12 and 30.")]
    cfg = SamplingConfig(max_new_tokens=24, greedy=True, stop=[], decode=decode)
    uncut = generate(model, prompts, cfg, [], tok.pad_id).completions()
    text = tok.decode(uncut[0])
    string = text[len(tok.decode(uncut[0][:6])):len(tok.decode(uncut[0][:9]))]     # tokens 6..8 of row 0
    stops = stop_conditions(tok, [string])
    assert stops.strings == (string,)
    g = generate(model, prompts, cfg, stops, tok.pad_id)
    for row, got, finish in zip(uncut, g.completions(), g.finish):
        k = next((k for k in range(1, len(row) + 1) if string in tok.decode(row[:k])), len(row))
        assert got == row[:k] and finish == ("stop" if string in tok.decode(row) else "length")
    assert g.finish[0] == "stop" and len(g.completions()[0]) == 9


def test_rl_evaluation_decodes_and_judges_as_the_rollouts(tmp_path):
    """Evaluation during RL reads the run's sampling.stop and tasks.template (eval.template overrides it), its
    problems come from eval.data, and a run on tasks.data without eval.data evaluates nothing rather than
    nanoseek's arithmetic."""
    from nanoseek.errors import UserError
    from nanoseek.rl.trainer import RLConfig, RLEvalConfig, TaskConfig, eval_problems, eval_settings
    from nanoseek.sampling.rollout import SamplingConfig

    data = gsm8k_file(tmp_path)
    cfg = RLConfig(tasks=TaskConfig(data=str(data), template="chat"), sampling=SamplingConfig(stop=["####"]),
                   eval=RLEvalConfig(problems=2))
    ec = eval_settings(cfg)
    assert ec.sampling.stop == ["####"] and ec.template == "chat" and ec.sampling.temperature == 0.6
    assert eval_problems(cfg) == []
    cfg.eval.data, cfg.eval.template = str(data), "plain"
    assert [p.answer for p in eval_problems(cfg)] == ["18", "3"] and eval_settings(cfg).template == "plain"
    assert {p.family for p in eval_problems(RLConfig(eval=RLEvalConfig(problems=3)))} == {"arithmetic"}
    with pytest.raises(UserError, match="set sampling.stop"):          # not silently ignored
        RLConfig(eval=RLEvalConfig(sampling=SamplingConfig(stop=["\n\n"])))
