"""The R1 pipeline: rejection-sampling filters, cold-start data, configs, and a MINIATURE pipeline run end to
end — interrupted inside a stage, then resumed: finished stages are skipped, the interrupted one continues
from its checkpoint, and the run ends in a report, plots and loadable exported models."""

import json
import tomllib
from pathlib import Path

import pytest
import torch

from nanoseek.errors import UserError
from nanoseek.r1.coldstart import worked_examples
from nanoseek.r1.rejection import TraceConfig, sample_traces
from nanoseek.sampling.rewards import format_reward, language_consistency
from nanoseek.tasks import get_family, sample_problems
from nanoseek.tasks.language import render


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    from nanoseek.tokenizer import Tokenizer

    problems = sample_problems(["arithmetic"], 50, seed=0)
    return Tokenizer.train([p.completion() + p.completion("alt") for p in problems], 400)


def test_sample_traces_keeps_correct_wellformed_one_language_distinct(tok, monkeypatch):
    import nanoseek.sampling.rollout as rollout

    p0, p1, p2 = sample_problems(["arithmetic"], 3, split="train", seed=5)
    wrong = lambda p: p.completion().replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")  # noqa: E731
    texts = [p0.completion(), p0.completion(), wrong(p0), render(p0.completion(), "alt"),       # keep, dup, wrong, alt
             p1.completion().replace("<think>", "").replace("</think>", ""), wrong(p1), wrong(p1), wrong(p1),
             wrong(p2), wrong(p2), wrong(p2), wrong(p2)]
    queue = iter(texts)

    def fake_generate(model, prompts, cfg, stop_ids, pad_id=0, generator=None, on_token=None):
        ids = [tok.encode(next(queue)) for _ in prompts]
        tokens = torch.full((len(ids), max(map(len, ids))), pad_id)
        for i, r in enumerate(ids):
            tokens[i, :len(r)] = torch.tensor(r)
        return rollout.Generation(tokens, torch.zeros(tokens.shape), torch.tensor([len(r) for r in ids]),
                                  ["stop"] * len(ids))

    monkeypatch.setattr(rollout, "generate", fake_generate)
    tc = TraceConfig(samples=4, batch_size=5, min_kept=2, template="chat")
    records, stats = sample_traces(torch.nn.Linear(1, 1), tok, [p0, p1, p2], tc, progress=False)
    assert stats == {"prompts": 3, "sampled": 12, "correct": 3 + 1, "formatted": 3, "one_language": 2,
                     "duplicates": 1, "kept": 1, "prompts_with_kept": 1, "worked_fallback": 1}
    assert records[0]["response"] == p0.completion() and records[0]["prompt"] == p0.prompt
    assert records[1]["source"] == "worked" and records[1]["prompt"] == p1.prompt      # top-up: first unsolved


def test_coldstart_examples_are_readable_r1_format():
    examples = worked_examples(["arithmetic", "countdown", "linear"], 12, seed=0)
    families = {e["family"] for e in examples}
    assert families == {"arithmetic", "countdown", "linear"}
    problems = sample_problems(["arithmetic", "countdown", "linear"], 12, split="train", seed=0)
    for e, p in zip(examples, problems):
        assert format_reward(e["response"]) == 1.0 and language_consistency(e["response"]) == 1.0
        assert get_family(p.family).score(p, e["response"]) == 1.0


def test_general_family_is_scored_by_the_reward_model_only_where_passed(tok):
    """Stage 4's general prompts: a family passed to the run (problem source and rewards), scored by the reward
    model, never registered globally; a failing reward model raises instead of scoring 0."""
    from nanoseek.config import DenseConfig
    from nanoseek.model import build_model
    from nanoseek.r1.general import GeneralFamily
    from nanoseek.rl.reward_model import RewardModel, reward_scorer, score
    from nanoseek.rl.trainer import task_families
    from nanoseek.sampling.rewards import RewardConfig, compute_rewards, compute_rewards_batch

    torch.manual_seed(0)
    rm = RewardModel(build_model(DenseConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))).eval()
    torch.nn.init.normal_(rm.head.weight)
    families = task_families([GeneralFamily(reward_scorer(rm, tok))])
    problems = sample_problems(["arithmetic", "general"], 8, split="train", seed=0, families=families)
    general = [p for p in problems if p.family == "general"]
    assert len(general) == 4 and all(p.split == "train" for p in general)
    completion = "<think>\nI answer.\n</think>\n<answer>Yes.</answer>"
    r = compute_rewards(RewardConfig(), general[0], completion, 10, families=families)
    want = torch.sigmoid(score(rm, tok, [general[0].prompt], [completion]))[0].item()
    assert r["accuracy"] == pytest.approx(want, abs=1e-6) and r["format"] == 1.0
    with pytest.raises(UserError, match="unknown task family"):
        sample_problems(["general"], 1)
    with pytest.raises(UserError, match="unknown task family"):                  # nothing leaked into the registry
        compute_rewards(RewardConfig(), general[0], completion, 10)

    def broken(prompts, responses):
        raise RuntimeError("reward model on a lost device")

    with pytest.raises(RuntimeError, match="lost device"):                        # surfaces, no silent 0.0
        compute_rewards(RewardConfig(), general[0], completion, 10, families=task_families([GeneralFamily(broken)]))

    # a batch (what the RL trainer scores): the reward model sees every general completion in ONE call, and the
    # rewards equal the one-at-a-time ones; the rule families' verdicts are unchanged
    calls = []
    scorer = reward_scorer(rm, tok)
    counting = task_families([GeneralFamily(lambda ps, rs: calls.append(len(ps)) or scorer(ps, rs))])
    completions = [f"<think>\nStep {i}.\n</think>\n<answer>{i}</answer>" for i in range(len(problems))]
    batch = compute_rewards_batch(RewardConfig(), problems, completions, [10] * len(problems), families=counting)
    one = [compute_rewards(RewardConfig(), p, c, 10, families=families) for p, c in zip(problems, completions)]
    assert calls == [4] and len(batch) == len(one) and all(b == pytest.approx(o) for b, o in zip(batch, one))


def test_configs_presets_and_bad_input(tmp_path):
    from nanoseek.pipeline.config import load_pipeline_config

    tiny = load_pipeline_config("tiny")
    small = load_pipeline_config("small")
    assert small.preset == "small" and small.pretrain.model["preset"] == "small"
    assert small.pretrain.train.steps != tiny.pretrain.train.steps
    # a model table that names its preset starts from it: tiny's 3-layer override does not leak into another preset
    from nanoseek.train.runs import resolve_model
    assert resolve_model(tiny.pretrain.model).num_hidden_layers == 3
    assert resolve_model(load_pipeline_config("tiny", sets=['pretrain.model.preset="small"']).pretrain.model) == \
        resolve_model({"preset": "small"})
    assert resolve_model(load_pipeline_config("tiny", sets=["pretrain.model.hidden_size=64"]).pretrain.model) \
        .num_hidden_layers == 3                          # without a preset, a model table still merges key by key
    cfg = load_pipeline_config("tiny", sets=["r1_zero.train.steps=7"])
    assert cfg.r1_zero.train.steps == 7
    with pytest.raises(UserError, match="unknown key"):
        load_pipeline_config("tiny", sets=["r1_zero.train.stepz=7"])
    with pytest.raises(UserError, match="stage3_init='sft'; choose"):
        load_pipeline_config("tiny", sets=['stage3_init="sft"'])


def test_stages_skip_the_last_optimizer_checkpoint_unless_kept():
    from nanoseek.pipeline.config import RunEnv, load_pipeline_config
    from nanoseek.train.trainer import CheckpointConfig

    # due(): every N steps, and after the last step only when `final`
    assert [d for d in range(1, 11) if CheckpointConfig(every=4).due(d, 10)] == [4, 8, 10]
    assert [d for d in range(1, 11) if CheckpointConfig(every=4, final=False).due(d, 10)] == [4, 8]
    assert not any(CheckpointConfig(every=0, final=False).due(d, 10) for d in range(1, 11))
    for keep in (False, True):
        loaded = load_pipeline_config("tiny", sets=[f"keep_checkpoints={str(keep).lower()}"])
        cfg = RunEnv.of(loaded).resolve(loaded)      # each section as its stage receives it (RunEnv.apply)
        finals = {c.final for c in (cfg.pretrain.checkpoint, cfg.r1_zero.checkpoint, cfg.coldstart.sft.checkpoint,
                                    cfg.rejection.sft.checkpoint, cfg.all_rl.rl.checkpoint, cfg.distill.sft.checkpoint,
                                    cfg.student.pretrain.checkpoint, cfg.student_rl.checkpoint)}
        assert finals == {keep}


def test_each_stage_applies_the_run_environment_to_its_own_section(tmp_path, monkeypatch):
    """Device, threads, task families, level and the checkpoint policy reach each trainer's config through its
    stage body (RunEnv.apply), exactly as RunEnv.resolve shows them (the view run_dir/config.toml records); the
    pipeline's own config object stays as loaded."""
    import dataclasses

    import nanoseek.pipeline.stages as stages
    from nanoseek.pipeline.config import RunEnv, load_pipeline_config
    from nanoseek.recipe import to_toml

    cfg = load_pipeline_config("tiny", sets=['device="cpu"', "threads=3", 'tasks=["countdown"]', "difficulty=1"])
    loaded = to_toml(cfg)
    received = {}

    def trainer(c, d, **kw):
        received[Path(d).name] = c
        return {"final": str(d)}

    for fn in ("train_rl", "coldstart", "rejection", "distill"):
        monkeypatch.setattr(stages, fn, trainer)
    monkeypatch.setattr(stages, "load_reward_model", lambda path, device: (received.setdefault("rm", device), None))
    monkeypatch.setattr(stages, "reward_scorer", lambda rm, tok: None)
    pipe = stages.Pipeline(cfg, tmp_path, progress=False)
    pipe.outputs = {st.name: {"final": f"/models/{st.name}"} for st in stages.STAGES}

    def out(stage):
        return pipe.outputs[stage]["final"]

    def rl(rc, init):
        return dataclasses.replace(rc, train=dataclasses.replace(rc.train, init=init))

    r = RunEnv.of(cfg).resolve(cfg)       # + what each body adds from earlier stages: the models it starts from
    want = {"02-r1-zero": rl(r.r1_zero, out("01-pretrain")),
            "03-coldstart": dataclasses.replace(r.coldstart, init=out("01-pretrain"),
                                                data=dataclasses.replace(r.coldstart.data, r1_zero=out("02-r1-zero"))),
            "04-reasoning-rl": rl(r.reasoning_rl, out("03-coldstart")),
            "05-rejection": dataclasses.replace(r.rejection, init=out("04-reasoning-rl"), base=out("04-reasoning-rl")),
            "07-all-rl": rl(r.all_rl.rl, out("05-rejection")),
            "09-distill": dataclasses.replace(r.distill, teacher=out("07-all-rl"), init=out("08-student-base")),
            "10-student-rl": rl(r.student_rl, out("08-student-base"))}
    for st in stages.STAGES:
        if st.name in want:
            getattr(pipe, st.fn)(tmp_path / st.name)
    assert pipe.cfg is cfg and to_toml(cfg) == loaded                              # not rewritten
    assert received.pop("rm") == stages.resolve_device("cpu") and received == want
    rrl = received["04-reasoning-rl"]
    assert (rrl.train.device, rrl.train.threads, rrl.tasks.names, rrl.tasks.difficulty, rrl.checkpoint.final) == \
        ("cpu", 3, ["countdown"], 1, False)
    assert received["07-all-rl"].tasks.names == ["countdown", "general"]
    cs = received["03-coldstart"]
    assert (cs.data.tasks, cs.data.difficulty, cs.data.r1_zero_traces.tasks, cs.sft.train.threads) == \
        (["countdown"], 1, ["countdown"], 3)
    assert received["05-rejection"].traces.tasks == received["09-distill"].traces.tasks == ["countdown"]
    assert r.student.pretrain.data.corpus.difficulty == {"countdown": 1}
    # difficulty None (the small preset): the families' default mixes everywhere, the corpus too — not the
    # level 2 of recipes/tiny.toml that the pretraining section starts from
    mixed = load_pipeline_config("tiny", sets=["difficulty=\"none\""])
    resolved = RunEnv.of(mixed).resolve(mixed)
    assert mixed.pretrain.data.corpus.difficulty == {"arithmetic": 2, "countdown": 2, "linear": 2}
    assert resolved.pretrain.data.corpus.difficulty is None is resolved.r1_zero.tasks.difficulty
    small = load_pipeline_config("small")
    assert RunEnv.of(small).apply(small.pretrain).data.corpus.difficulty is None
    with pytest.raises(TypeError, match="ComparisonConfig"):
        RunEnv.of(cfg).apply(cfg.eval)
    r1 = stages.Pipeline(load_pipeline_config("tiny", sets=['stage3_init="base"']), tmp_path, progress=False)
    r1.outputs = pipe.outputs
    r1.rejection(tmp_path / "r1")                                     # R1's stage 3: SFT from the base
    assert received["r1"].base == out("01-pretrain") and received["r1"].init == out("04-reasoning-rl")


# A miniature of the whole pipeline through the same --set overrides a user has: few steps, tiny sizes.
MINI = ["pretrain.train.steps=6", "pretrain.train.batch_size=4", "pretrain.train.seq_len=128",
        "pretrain.data.corpus.n_documents=400", "pretrain.data.corpus.val_documents=40", "pretrain.model.vocab_size=512",
        "reasoning_rl.train.steps=3", "reasoning_rl.checkpoint.every=1",
        "coldstart.data.examples=24", "coldstart.data.r1_zero_traces.prompts=4",
        "coldstart.data.r1_zero_traces.sampling.max_new_tokens=16", "coldstart.epochs=0", "rejection.epochs=0", "distill.epochs=0",
        "rejection.traces.prompts=4", "rejection.traces.samples=2", "rejection.traces.sampling.max_new_tokens=16",
        "rejection.traces.min_kept=8", "distill.traces.prompts=4", "distill.traces.samples=2",
        "distill.traces.sampling.max_new_tokens=16", "distill.traces.min_kept=8",
        "reward_model.data.pairs=16", "reward_model.train.steps=2", "reward_model.train.batch_size=4",
        "student.pretrain.train.steps=4", "student.pretrain.train.batch_size=4", "student.pretrain.train.seq_len=128",
        "student.pretrain.data.corpus.n_documents=400", "student.pretrain.data.corpus.val_documents=40",
        "eval.problems=2", "eval.samples=2", "eval.sampling.max_new_tokens=16"]
MINI += [f"{s}.train.{k}" for s in ("r1_zero", "reasoning_rl", "all_rl.rl", "student_rl")
         for k in ("prompts=2", "steps=2") if not (s == "reasoning_rl" and k == "steps=2")]
MINI += [f"{s}.{k}" for s in ("r1_zero", "reasoning_rl", "all_rl.rl", "student_rl")
         for k in ("rl.group_size=2", "sampling.max_new_tokens=16")]
MINI += [f"{s}.{k}" for s in ("coldstart.sft", "rejection.sft", "distill.sft")
         for k in ("train.batch_size=4", "train.steps=2", "data.val_examples=0")]


def test_miniature_pipeline_end_to_end_with_resume(tmp_path, monkeypatch):
    import nanoseek.rl.trainer as trainer
    from nanoseek.cli import main
    from nanoseek.hf import load_pretrained

    out = tmp_path / "run"
    args = ["pipeline", "--out", str(out), "--no-progress", "--set", "workers=1"] + [x for s in MINI for x in ("--set", s)]

    # run 1: killed inside stage 2 (reasoning RL), right after its step-2 checkpoint
    real_save = trainer.save_checkpoint

    def save_then_die(run_dir, step, *a, **k):
        path = real_save(run_dir, step, *a, **k)
        if "04-reasoning-rl" in str(run_dir) and step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    assert main(args) == 130
    assert sorted(p.parent.name for p in out.glob("*/done.json")) == \
        ["00-tokenizer", "01-pretrain", "02-r1-zero", "03-coldstart"]
    base_marker = (out / "01-pretrain" / "done.json").read_text()

    # run 2: the same command. Finished stages are skipped; stage 2 continues at its third step.
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    collected = []
    real_collect = trainer.collect

    def spy(model, tokenizer, cfg, step, *args):
        collected.append((cfg.train.init, step))
        return real_collect(model, tokenizer, cfg, step, *args)

    monkeypatch.setattr(trainer, "collect", spy)
    assert main(args) == 0
    assert (out / "01-pretrain" / "done.json").read_text() == base_marker
    assert [s for init, s in collected if "03-coldstart" in init] == [2]                # resumed, not restarted
    assert not [s for init, s in collected if init.endswith("01-pretrain/final")]       # R1-Zero not re-run
    steps = [json.loads(line)["step"] for line in (out / "04-reasoning-rl" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    report = (out / "report.md").read_text()
    for row in ("base", "R1-Zero", "R1 s1 cold start", "R1 s2 reasoning RL", "R1 s3 rejection SFT",
                "R1 (s4 all-scenario RL)", "student distilled", "student RL only"):
        assert f"| {row} |" in report
    assert "held-out pairwise accuracy" in report and "Distillation vs RL" in report
    assert "SFT from stage 2's model for" in report        # stage3_init's default, not R1's "from the base"
    for plot in ("rl_reward", "rl_accuracy", "rl_response_length", "expert_load"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    for name in ("base", "r1-zero", "r1", "student-distilled", "student-rl"):
        model = load_pretrained(out / "export" / name)
        assert (out / "export" / name / "tokenizer.json").is_file()
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    assert type(load_pretrained(out / "export" / "student-distilled")).__name__ == "DenseForCausalLM"

    # a different config in the same run directory is refused, naming the key
    assert main(args + ["--set", "r1_zero.train.steps=5"]) == 2

    # each stage is also its own command on user data / checkpoints (reusing the miniature run's models)
    quick = ["--no-progress", "--set", "sft.train.batch_size=4", "--set", "sft.data.val_examples=0",
             "--set", "sft.train.steps=1", "--set", "epochs=0"]
    assert main(["coldstart", "--init", str(out / "export" / "base"), "--out", str(tmp_path / "cs"),
                 "--set", "data.examples=8", *quick]) == 0
    assert (tmp_path / "cs" / "sft" / "final" / "config.json").is_file()
    assert main(["rejection", "--init", str(out / "export" / "r1"), "--out", str(tmp_path / "rej"),
                 "--set", "traces.prompts=2", "--set", "traces.samples=2", "--set", "traces.sampling.max_new_tokens=8",
                 "--set", "traces.min_kept=3", "--no-progress"]) == 0
    mixed = [json.loads(line) for line in (tmp_path / "rej" / "data.jsonl").read_text().splitlines()]
    assert len([r for r in mixed if r["family"] != "general"]) >= 2 and any(r["family"] == "general" for r in mixed)
    assert main(["distill", "--teacher", str(out / "export" / "r1"), "--init", str(out / "08-student-base" / "run" / "final"),
                 "--data", str(out / "09-distill" / "traces.jsonl"), "--out", str(tmp_path / "kd"),
                 "--set", "kl.weight=0.5", *quick]) == 0
    assert load_pretrained(tmp_path / "kd" / "sft" / "final").config.model_type == "qwen2"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no",
                                         "rejected": "no" if n % 2 == 0 else "yes"}) + "\n" for n in range(12)))
    assert main(["reward-model", "--init", str(out / "export" / "base"), "--data", str(pairs), "--out",
                 str(tmp_path / "rm"), "--set", "train.steps=2", "--set", "train.batch_size=4", "--no-progress"]) == 0
    assert json.loads((tmp_path / "rm" / "final" / "reward_model.json").read_text())["heldout"]["n"] >= 2


def test_miniature_pipeline_runs_stages_concurrently(tmp_path):
    """workers=2: each stage and each model's evaluation in its own process as soon as its inputs exist. The
    teacher's pretraining runs alone (on both workers' threads), the student lane overlaps the teacher's RL
    chain, every model is evaluated by its own job, a rerun of the finished run only rebuilds the report, and
    finished stages drop their checkpoints; a failing stage stops the run with exit 2 and names its log."""
    from nanoseek.cli import main

    out = tmp_path / "run"
    args = ["pipeline", "--out", str(out), "--no-progress"] + [x for s in MINI for x in ("--set", s)]
    assert main(args) == 0
    done = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/done.json")}
    assert len(done) == 12
    assert done["08-student-base"]["started"] >= done["01-pretrain"]["ended"]          # pretraining runs alone
    assert done["08-student-base"]["started"] < done["02-r1-zero"]["ended"]            # then two lanes at once
    threads = {st: tomllib.loads((out / st / path / "config.toml").read_text())["train"]["threads"]
               for st, path in (("01-pretrain", "."), ("08-student-base", "run"))}
    assert threads == {"01-pretrain": 2, "08-student-base": 1}                           # all threads when alone
    assert not list(out.glob("**/checkpoints")) and (out / "01-pretrain" / "final" / "config.json").is_file()
    assert done["09-distill"]["started"] >= max(done["07-all-rl"]["ended"], done["08-student-base"]["ended"])
    evals = sorted(p.name for p in (out / "11-eval").glob("*.json") if p.name != "done.json")
    assert evals == sorted(f"{stage}.json" for stage in ("01-pretrain", "02-r1-zero", "03-coldstart", "04-reasoning-rl",
                                                         "05-rejection", "07-all-rl", "09-distill", "10-student-rl"))
    assert (out / "01-pretrain" / "stage.log").is_file() and "| student RL only |" in (out / "report.md").read_text()
    markers = {p: p.read_text() for p in out.glob("*/done.json")}
    assert main(args) == 0 and {p: p.read_text() for p in out.glob("*/done.json")} == markers   # nothing reruns

    bad = tmp_path / "bad"                                                                  # a stage fails on bad data
    assert main(["pipeline", "--out", str(bad), "--no-progress", "--stop-after", "coldstart",
                 "--set", "coldstart.data.path=\"/nonexistent.jsonl\""] + [x for s in MINI for x in ("--set", s)]) == 2
    assert not (bad / "03-coldstart" / "done.json").exists() and (bad / "03-coldstart" / "stage.log").is_file()


def test_cold_start_waits_for_r1_zero_only_when_it_takes_its_outputs(tmp_path):
    """With use_r1_zero_outputs = false (the small preset) cold start runs beside R1-Zero: its stage needs only the
    base, and running up to it does not train R1-Zero."""
    from nanoseek.pipeline.config import load_pipeline_config
    from nanoseek.pipeline.scheduler import needed
    from nanoseek.pipeline.stages import Pipeline

    def coldstart_needs(sets):
        graph = Pipeline(load_pipeline_config("tiny", sets=sets), tmp_path, progress=False).graph()
        return (next(st for st in graph if st.name == "03-coldstart").needs,
                [st.name for st in needed(graph, "coldstart")])
    assert coldstart_needs([]) == (("01-pretrain", "02-r1-zero"),
                                   ["00-tokenizer", "01-pretrain", "02-r1-zero", "03-coldstart"])
    assert coldstart_needs(["use_r1_zero_outputs=false"]) == (("01-pretrain",),
                                                              ["00-tokenizer", "01-pretrain", "03-coldstart"])
