"""Bad input, tried as a careless or malicious user would: every case exits 2 with one line naming the problem,
no traceback, and leaves every file as it was. Also: no command deletes or replaces a user's files, exported
files get the user's umask, killed runs' temporary files are cleaned, and the verifier's cost is bounded.

Most cases run `nanoseek.cli.main` in-process (fast); a few run the real CLI in a subprocess to prove the
no-traceback path end to end.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nanoseek.cli import main
from nanoseek.errors import UserError

BIG = "9" * 5000                       # past Python's 4,300-digit int conversion limit
NOT_UTF8 = b'{"prompt": "caf\xe9", "response": "x"}\n'


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny DeepSeek model directory with its tokenizer (config.json, model.safetensors, tokenizer/)."""
    from nanoseek.config import ModelConfig
    from nanoseek.hf import save_pretrained
    from nanoseek.model import build_model
    from nanoseek.tasks import sample_problems
    from nanoseek.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train([p.prompt + " " + p.solution for p in sample_problems("arithmetic", 40)], 300)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                    kv_lora_rank=16, q_lora_rank=16, num_nextn_predict_layers=0))
    save_pretrained(model, root / "base")
    tok.save(root / "base" / "tokenizer")
    return root / "base"


def snapshot(*roots: Path) -> dict:
    """Every path under `roots` with its kind, mode and content hash: the tree before and after must match."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                st = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
                out[str(p)] = (st.st_mode, digest)
    return out


def copy_model(base: Path, dst: Path, **config_changes) -> Path:
    """A copy of the base model with config.json keys changed (None deletes nothing: it writes null)."""
    import shutil
    shutil.copytree(base, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def user_dir(ws: Path, name: str = "mine") -> Path:
    """A folder of the user's own files, none of them nanoseek's."""
    d = ws / name
    (d / "sub").mkdir(parents=True)
    (d / "final").mkdir()
    (d / "notes.txt").write_text("my notes\n")
    (d / "sub" / "results.csv").write_text("a,b\n1,2\n")
    (d / "final" / "important.txt").write_text("do not delete\n")
    return d


def write(ws: Path, name: str, data: str | bytes) -> Path:
    p = ws / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def a_run(ws: Path, metrics: bytes | None = None, config: str = "[train]\nsteps = 5\n") -> Path:
    """A run directory of ours (config.toml) with an optional metrics.jsonl."""
    run = ws / "run"
    write(ws, "run/config.toml", config)
    if metrics is not None:
        write(ws, "run/metrics.jsonl", metrics)
    return run


def sharded(base: Path, ws: Path, shard: str) -> Path:
    """A sharded checkpoint whose index names `shard`; a real weights file waits at ws/outside.safetensors."""
    import shutil
    d = copy_model(base, ws / "sharded")
    shutil.copy(d / "model.safetensors", ws / "outside.safetensors")
    (d / "model.safetensors").rename(d / "real.safetensors")
    write(d, "model.safetensors.index.json", json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}))
    return d


def no_config(model_dir: Path) -> Path:
    (model_dir / "config.json").unlink()
    return model_dir


def eval_args(ckpt) -> list[str]:
    return ["eval", "--checkpoint", str(ckpt), "--tasks", "arithmetic", "--n-problems", "1", "--samples", "1",
            "--max-new-tokens", "2", "--no-greedy"]


# (id, build(ws, base) -> argv, words the one line must contain)
CASES = [
    # ---- --set numbers and ranges (checked by the recipe coercion / the configs' CHECKS)
    ("set-steps-inf", lambda ws, b: ["pretrain", "--set", "train.steps=inf"], "train.steps"),
    ("set-steps-nan", lambda ws, b: ["pretrain", "--set", "train.steps=nan"], "train.steps"),
    ("set-steps-1e400", lambda ws, b: ["pretrain", "--set", "train.steps=1e400"], "train.steps"),
    ("set-steps-5000-digits", lambda ws, b: ["pretrain", "--set", f"train.steps={BIG}"], "4300"),
    ("set-steps-float", lambda ws, b: ["pretrain", "--set", "train.steps=2.5"], "train.steps"),
    ("set-steps-text", lambda ws, b: ["pretrain", "--set", "train.steps=many"], "train.steps"),
    ("set-steps-2**64", lambda ws, b: ["pretrain", "--set", f"train.steps={2 ** 64}"], "train.steps"),
    ("set-lr-negative", lambda ws, b: ["pretrain", "--set", "optim.lr=-1e-3"], "optim.lr"),
    ("set-lr-nan", lambda ws, b: ["pretrain", "--set", "optim.lr=nan"], "optim.lr"),
    ("set-lr-inf", lambda ws, b: ["pretrain", "--set", "optim.lr=inf"], "optim.lr"),
    ("set-lr-1e400", lambda ws, b: ["pretrain", "--set", "optim.lr=1e400"], "optim.lr"),
    ("set-lr-huge-int", lambda ws, b: ["pretrain", "--set", f"optim.lr={'9' * 400}"], "optim.lr"),
    ("set-beta1-above-1", lambda ws, b: ["pretrain", "--set", "optim.beta1=1.5"], "optim.beta1"),
    ("set-beta2-1", lambda ws, b: ["pretrain", "--set", "optim.beta2=1.0"], "optim.beta2"),
    ("set-beta1-negative", lambda ws, b: ["sft", "--set", "optim.beta1=-0.1"], "optim.beta1"),
    ("set-weight-decay-negative", lambda ws, b: ["pretrain", "--set", "optim.weight_decay=-0.1"], "weight_decay"),
    ("set-seed-negative", lambda ws, b: ["pretrain", "--set", "train.seed=-1"], "train.seed"),
    ("set-threads-negative", lambda ws, b: ["pretrain", "--set", "train.threads=-2"], "train.threads"),
    ("set-checkpoint-every-negative", lambda ws, b: ["pretrain", "--set", "checkpoint.every=-1"], "checkpoint.every"),
    ("set-keep-last-0", lambda ws, b: ["pretrain", "--set", "checkpoint.keep_last=0"], "keep_last"),
    ("set-eval-samples-0", lambda ws, b: ["pretrain", "--set", "eval.samples=0"], "eval.samples"),
    ("set-eval-top-p-2", lambda ws, b: ["pretrain", "--set", "eval.sampling.top_p=2"], "top_p"),
    ("set-compile-maybe", lambda ws, b: ["pretrain", "--set", "train.compile=maybe"], "train.compile"),
    ("set-unknown-section", lambda ws, b: ["pretrain", "--set", "nosuch.key=1"], "nosuch"),
    ("set-unknown-key", lambda ws, b: ["pretrain", "--set", "train.stepz=1"], "stepz"),
    ("set-no-equals", lambda ws, b: ["pretrain", "--set", "train.steps"], "train.steps"),
    ("set-value-is-section", lambda ws, b: ["pretrain", "--set", "train=3"], "train"),
    ("grpo-set-lr-negative", lambda ws, b: ["grpo", "--init", str(b), "--out", "g", "--set", "optim.lr=-1"], "optim.lr"),
    ("grpo-set-seed-negative", lambda ws, b: ["grpo", "--init", str(b), "--out", "g", "--set", "train.seed=-3"], "train.seed"),
    ("sft-set-threads-nan", lambda ws, b: ["sft", "--init", str(b), "--set", "train.threads=nan"], "train.threads"),
    ("tokenizer-set-negative", lambda ws, b: ["tokenizer", "--out", str(ws / "t"), "--set", "n_documents=-5"],
     "n_documents"),
    ("cli-unknown-flag", lambda ws, b: ["pretrain", "--stepz", "3"], "--stepz"),
    ("cli-missing-required", lambda ws, b: ["grpo", "--init", str(b)], "--out"),
    ("cli-not-an-int", lambda ws, b: ["eval", "--checkpoint", str(b), "--samples", "x"], "--samples"),
    # a comma inside a quoted value is part of the value: one --init, not `init=...` and `v=2`
    ("init-with-comma", lambda ws, b: ["pretrain", "--init", "models/base,v=2"], "models/base,v=2"),
    ("set-quoted-comma", lambda ws, b: ["sft", "--set", 'init="models/x,v=2"'], "models/x,v=2"),
    # ---- recipes
    ("recipe-missing", lambda ws, b: ["pretrain", "--recipe", str(ws / "none.toml")], "not found"),
    ("recipe-not-toml", lambda ws, b: ["pretrain", "--recipe", str(write(ws, "r.toml", "[train\nsteps=="))],
     "not valid TOML"),
    ("recipe-not-utf8", lambda ws, b: ["pretrain", "--recipe", str(write(ws, "r.toml", b"[train]\nx = '\xff'\n"))],
     "not valid TOML"),
    ("recipe-5000-digits", lambda ws, b: ["pretrain", "--recipe", str(write(ws, "r.toml", f"[train]\nsteps = {BIG}\n"))],
     "4300"),
    ("recipe-steps-inf", lambda ws, b: ["pretrain", "--recipe", str(write(ws, "r.toml", "[train]\nsteps = inf\n"))],
     "train.steps"),
    ("recipe-lr-nan", lambda ws, b: ["pretrain", "--recipe", str(write(ws, "r.toml", "[optim]\nlr = nan\n"))],
     "optim.lr"),
    ("recipe-unknown-section", lambda ws, b: ["pretrain", "--recipe", str(write(ws, "r.toml", "[trian]\nsteps = 1\n"))],
     "trian"),
    ("recipe-model-negative", lambda ws, b: ["pretrain", "--recipe",
                                             str(write(ws, "r.toml", "[model]\nhidden_size = -8\n"))], "hidden_size"),
    ("recipe-section-is-value", lambda ws, b: ["pretrain", "--recipe", str(write(ws, "r.toml", "optim = 3\n"))],
     "optim"),
    # ---- output paths: checked before any work
    ("tokenizer-out-file", lambda ws, b: ["tokenizer", "--out", str(write(ws, "afile", "user data"))], "is a file"),
    ("tokenizer-out-under-file", lambda ws, b: ["tokenizer", "--out", str(write(ws, "afile", "x")) + "/tok"],
     "which is a file"),
    ("tokenizer-out-user-dir", lambda ws, b: ["tokenizer", "--out", str(user_dir(ws))], "did not write"),
    ("pretrain-out-file", lambda ws, b: ["pretrain", "--out", str(write(ws, "afile", "x"))], "is a file"),
    ("pretrain-out-under-file", lambda ws, b: ["pretrain", "--out", str(write(ws, "afile", "x")) + "/run"],
     "which is a file"),
    ("pretrain-out-user-dir", lambda ws, b: ["pretrain", "--out", str(user_dir(ws))], "already holds"),
    ("pretrain-resume-user-dir", lambda ws, b: ["pretrain", "--resume", "--out", str(user_dir(ws))], "config.toml"),
    ("sft-resume-user-dir", lambda ws, b: ["sft", "--init", str(b), "--resume", "--out", str(user_dir(ws))],
     "config.toml"),
    ("grpo-resume-user-dir", lambda ws, b: ["grpo", "--init", str(b), "--resume", "--out", str(user_dir(ws))],
     "config.toml"),
    ("grpo-out-file", lambda ws, b: ["grpo", "--init", str(b), "--out", str(write(ws, "afile", "x"))], "is a file"),
    ("reward-model-out-file", lambda ws, b: ["reward-model", "--out", str(write(ws, "afile", "x"))], "is a file"),
    ("distill-out-file", lambda ws, b: ["distill", "--out", str(write(ws, "afile", "x"))], "is a file"),
    ("coldstart-out-file", lambda ws, b: ["coldstart", "--out", str(write(ws, "afile", "x"))], "is a file"),
    ("eval-json-is-dir", lambda ws, b: eval_args(b) + ["--json", str(user_dir(ws))], "is a directory"),
    ("eval-json-under-file", lambda ws, b: eval_args(b) + ["--json", str(write(ws, "afile", "x")) + "/r.json"],
     "which is a file"),
    ("eval-batch-size-0", lambda ws, b: eval_args(b) + ["--batch-size", "0"], "batch_size"),
    ("eval-samples-0", lambda ws, b: ["eval", "--checkpoint", str(b), "--samples", "0"], "samples"),
    ("eval-top-p-2", lambda ws, b: eval_args(b) + ["--top-p", "2"], "top_p"),
    ("eval-temperature-negative", lambda ws, b: eval_args(b) + ["--temperature", "-1"], "temperature"),
    ("eval-missing-checkpoint", lambda ws, b: eval_args(ws / "nothing"), "nothing"),
    # ---- data files
    ("sft-data-not-utf8", lambda ws, b: ["sft", "--init", str(b), "--set", f'data.path="{write(ws, "d.jsonl", NOT_UTF8)}"'],
     "UTF-8"),
    ("sft-data-not-json", lambda ws, b: ["sft", "--init", str(b), "--set", f'data.path="{write(ws, "d.jsonl", "{oops")}"'],
     "not valid JSON"),
    ("sft-data-5000-digits", lambda ws, b: ["sft", "--init", str(b), "--set",
                                            f'data.path="{write(ws, "d.jsonl", "{" + chr(34) + "n" + chr(34) + ": " + BIG + "}")}"'],
     "4300"),
    ("coldstart-data-not-utf8", lambda ws, b: ["coldstart", "--init", str(b), "--data", str(write(ws, "d.jsonl", NOT_UTF8)),
                                               "--out", str(ws / "cs")], "UTF-8"),
    ("reward-pairs-not-utf8", lambda ws, b: ["reward-model", "--init", str(b), "--data", str(write(ws, "p.jsonl", NOT_UTF8)),
                                             "--out", str(ws / "rm")], "UTF-8"),
    ("eval-data-not-utf8", lambda ws, b: ["eval", "--checkpoint", str(b), "--data", str(write(ws, "e.jsonl", NOT_UTF8))],
     "UTF-8"),
    ("eval-data-5000-digit-answer", lambda ws, b: ["eval", "--checkpoint", str(b), "--data", str(
        write(ws, "e.jsonl", '{"question": "q", "answer": ' + BIG + '}\n'))], "e.jsonl:1"),
    ("eval-data-not-json", lambda ws, b: ["eval", "--checkpoint", str(b), "--data", str(write(ws, "e.jsonl", "nope\n"))],
     "e.jsonl:1"),
    ("grpo-tasks-data-missing", lambda ws, b: ["grpo", "--init", str(b), "--out", str(ws / "g"), "--set",
                                               f'tasks.data="{ws / "missing.jsonl"}"'], "missing.jsonl"),
    ("grpo-tasks-data-not-utf8", lambda ws, b: ["grpo", "--init", str(b), "--out", str(ws / "g"), "--set",
                                                f'tasks.data="{write(ws, "t.jsonl", NOT_UTF8)}"'], "UTF-8"),
    # ---- resume: a run's own files damaged
    ("resume-corrupt-config", lambda ws, b: ["pretrain", "--resume", "--out", str(a_run(ws, config="[train\n"))],
     "config.toml"),
    ("resume-corrupt-config-with-recipe", lambda ws, b: [
        "pretrain", "--resume", "--recipe", str(write(ws, "r.toml", "")), "--out", str(a_run(ws, config="\xff=["))],
     "config.toml"),
    ("resume-garbage-metrics", lambda ws, b: ["pretrain", "--resume", "--out",
                                              str(a_run(ws, metrics=b"\x00\xff garbage\n{\"step\": 1}\n"))],
     "metrics.jsonl line 1"),
    ("resume-metrics-not-objects", lambda ws, b: ["pretrain", "--resume", "--out",
                                                  str(a_run(ws, metrics=b"[1, 2]\n{\"step\": 1}\n"))], "metrics.jsonl"),
    # ---- HF config.json with wrong types, and checkpoints
    ("hf-layers-float", lambda ws, b: eval_args(copy_model(b, ws / "m", num_hidden_layers=4.5)), "num_hidden_layers"),
    ("hf-rope-scaling-string", lambda ws, b: eval_args(copy_model(b, ws / "m", rope_scaling="yarn")), "rope_scaling"),
    ("hf-rope-factor-string", lambda ws, b: eval_args(copy_model(b, ws / "m", rope_scaling={"type": "yarn", "factor": "4"})),
     "factor"),
    ("hf-hidden-size-string", lambda ws, b: eval_args(copy_model(b, ws / "m", hidden_size="128")), "hidden_size"),
    ("hf-hidden-size-null", lambda ws, b: eval_args(copy_model(b, ws / "m", hidden_size=None)), "hidden_size"),
    ("hf-vocab-bool", lambda ws, b: eval_args(copy_model(b, ws / "m", vocab_size=True)), "vocab_size"),
    ("hf-rope-parameters-list", lambda ws, b: eval_args(copy_model(b, ws / "m", rope_parameters=[1])), "rope_parameters"),
    ("hf-model-type-unknown", lambda ws, b: eval_args(copy_model(b, ws / "m", model_type="gpt9")), "gpt9"),
    ("hf-config-not-json", lambda ws, b: eval_args(write(copy_model(b, ws / "m"), "config.json", "{nope").parent),
     "not valid JSON"),
    ("hf-config-5000-digits", lambda ws, b: eval_args(write(copy_model(b, ws / "m"), "config.json",
                                                            '{"model_type": "deepseek_v3", "hidden_size": ' + BIG + "}").parent),
     "4300"),
    ("hf-config-list", lambda ws, b: eval_args(write(copy_model(b, ws / "m"), "config.json", "[1]").parent),
     "JSON object"),
    ("hf-index-escapes-dir", lambda ws, b: eval_args(sharded(b, ws, "../outside.safetensors")), "shards must be files"),
    ("hf-index-absolute", lambda ws, b: eval_args(sharded(b, ws, str(ws / "outside.safetensors"))), "shards must be files"),
    ("hf-weights-truncated", lambda ws, b: eval_args(
        write(copy_model(b, ws / "m"), "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}").parent),
     "model.safetensors"),
    ("hf-no-config", lambda ws, b: eval_args(no_config(copy_model(b, ws / "m"))), "config.json"),
    # ---- tokenizers
    ("tokenizer-json-garbage", lambda ws, b: eval_args(write(copy_model(b, ws / "m"), "tokenizer/tokenizer.json",
                                                             "{not json").parent.parent), "tokenizer"),
    ("tokenizer-vocab-too-small", lambda ws, b: ["tokenizer", "--vocab-size", "10", "--out", str(ws / "t")], "vocab"),
    ("tokenizer-config-not-json", lambda ws, b: eval_args(write(
        copy_model(b, ws / "m"), "tokenizer/tokenizer_config.json", '{"chat_template": ').parent.parent),
     "tokenizer_config.json"),
]


@pytest.mark.parametrize("name,build,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, build, words, base, tmp_path, monkeypatch, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)                          # default outputs (runs/...) land here, inside the snapshot
    argv = build(ws, base)
    before = snapshot(ws, base)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[:2000]
    assert words in err, err
    assert snapshot(ws, base) == before            # nothing written, nothing removed


def test_battery_size():
    assert len(CASES) >= 60


@pytest.mark.parametrize("argv,words", [
    (["pretrain", "--set", "train.steps=inf"], "train.steps"),
    (["pretrain", "--set", f"train.steps={BIG}"], "4300"),
    (["eval", "--checkpoint", "nowhere", "--tasks", "arithmetic"], "nowhere"),
])
def test_real_cli_prints_one_line_and_no_traceback(argv, words, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "nanoseek", *argv], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr and not any(tmp_path.iterdir())


# ---------------------------------------------------------------- data loss

def test_atomic_dir_refuses_user_paths_and_replaces_its_own(tmp_path):
    from nanoseek.files import MARKER, atomic_dir

    mine = user_dir(tmp_path)
    before = snapshot(mine)
    for target in (mine, mine / "notes.txt", mine / "notes.txt" / "x"):
        with pytest.raises(UserError):
            with atomic_dir(target) as tmp:
                (tmp / "f").write_text("new")
    assert snapshot(mine) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with atomic_dir(tmp_path / "ours") as tmp:      # ours: created with the marker, then replaced
        (tmp / "a").write_text("1")
    assert (tmp_path / "ours" / MARKER).is_file()
    with atomic_dir(tmp_path / "ours") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted([MARKER, "b"])
    (tmp_path / "empty").mkdir()                    # an empty directory holds nothing to lose
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "c").write_text("3")
    assert (tmp_path / "empty" / "c").read_text() == "3"


def test_export_never_deletes_user_files_in_final(base, tmp_path):
    """`pretrain --resume --out proj` into a run whose final/ holds the user's file: the export is refused."""
    from nanoseek.hf import load_pretrained
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.run import export_final

    run = tmp_path / "proj"
    (run / "final").mkdir(parents=True)
    (run / "final" / "important.txt").write_text("do not delete\n")
    Tokenizer.load(base / "tokenizer").save(run / "tokenizer")
    with pytest.raises(UserError, match="did not write"):
        export_final(run, load_pretrained(base), Tokenizer.load(base / "tokenizer"))
    assert (run / "final" / "important.txt").read_text() == "do not delete\n"


def test_exports_get_the_umask_and_no_pickles(base, tmp_path):
    from nanoseek.files import atomic_write_text
    from nanoseek.hf import load_pretrained, save_pretrained

    old = os.umask(0o022)
    try:
        save_pretrained(load_pretrained(base), tmp_path / "exp")
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "exp").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    for p in (tmp_path / "exp").iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_state_files_are_safetensors_and_json_and_round_trip(tmp_path):
    import random

    from nanoseek.run.checkpoint import load_state, rng_state, save_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.random()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": rng_state(), "data": {"epoch": 1, "pos": 3}}
    save_state(state, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["state.json", "tensors.safetensors"]
    back = load_state(tmp_path / "s")
    assert back["step"] == 7 and back["data"] == state["data"] and back["rng"]["python"] == state["rng"]["python"]
    assert list(back["optimizer"]["state"]) == [0, 1]                       # int keys kept
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(back["optimizer"]["state"][0][k], state["optimizer"]["state"][0][k])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])                                 # torch accepts it as is


def test_stale_temporaries_are_cleaned(tmp_path):
    from nanoseek.files import clean_stale_tmp

    keep = [tmp_path / "data" / "train" / "shard_00000.bin", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    junk = [tmp_path / "data" / ".train.abcd1234.tmp" / "shard_00000.bin", tmp_path / ".final.x_y9ABCD.tmp" / "a",
            tmp_path / ".metrics.jsonl.zzzzzzzz.tmp", tmp_path / ".final.old" / "a"]
    for p in keep + junk:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    clean_stale_tmp(tmp_path)
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in junk) and not (tmp_path / "data" / ".train.abcd1234.tmp").exists()


def test_step_zero_is_logged_once_after_a_kill(tmp_path):
    """A GRPO run killed after its step-0 evaluation starts again from step 0: the old row must go."""
    from nanoseek.files import read_jsonl
    from nanoseek.train.logger import MetricsLogger

    with MetricsLogger(tmp_path, 3, 0, progress=False, tensorboard=False) as log:
        log.log(0, {"eval/pass@1": 0.5})                            # ... killed here
    with MetricsLogger(tmp_path, 3, 0, progress=False, tensorboard=False) as log:
        log.log(0, {"eval/pass@1": 0.5})
        log.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path, 3, 1, progress=False, tensorboard=False) as log:   # resumed from step 1
        log.log(2, {"loss": 0.5})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]


# ---------------------------------------------------------------- verifier cost

@pytest.mark.parametrize("pred", ["9^(9^9)", r"\binom{99999999}{49999999}", r"\exp(\exp(\exp(99)))", "9^{9^{9}}",
                                  "2^{99999999}", r"e^{e^{e^{99}}}", r"\dbinom{10000}{5000}"])
def test_verifier_cost_is_bounded_off_the_main_thread(pred):
    from nanoseek.tasks.jsonl import answers_match

    answers_match("1/2", r"\frac{1}{2}")                    # math-verify imported and warm
    out = []
    worker = threading.Thread(target=lambda: out.append(answers_match("42", pred)), daemon=True)
    t0 = time.perf_counter()
    worker.start()
    worker.join(5)
    assert out == [False] and time.perf_counter() - t0 < 1.0


def test_verifier_still_checks_small_expressions():
    from nanoseek.tasks.jsonl import answers_match

    assert answers_match("1024", "2^{10}") and answers_match("10", r"\binom{5}{2}")


def test_unicode_digits_count_as_their_number():
    """Decided: a number written in another script's decimal digits (Unicode category Nd, e.g. Arabic-Indic
    `٤٢`) is that number, as Python's int() reads it; the language reward, not accuracy, judges the script."""
    from nanoseek.tasks.jsonl import answers_match

    assert answers_match("42", "٤٢") and not answers_match("42", "٤٣")


def test_checkpoints_of_earlier_versions_still_resume(tmp_path):
    """A `trainer_state.pt` of an earlier version is found and read (torch's weights-only loader)."""
    from nanoseek.run.checkpoint import checkpoint_steps, load_trainer_state

    ckpt = tmp_path / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    torch.save({"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}}, ckpt / "trainer_state.pt")
    assert checkpoint_steps(tmp_path) == [3]
    state = load_trainer_state(ckpt)
    assert state["step"] == 3 and torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    (ckpt / "trainer_state.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="unreadable"):
        load_trainer_state(ckpt)


def test_link_tree_links_finished_files_and_survives_a_replaced_source(tmp_path, monkeypatch):
    """Exports and shard copies hard-link (no time, no disk); a later atomic rewrite of the source replaces its
    directory, so the linked copy keeps the old content; where links fail (another file system) it copies."""
    import os

    from nanoseek import files
    from nanoseek.files import atomic_dir, link_tree

    with atomic_dir(tmp_path / "src") as d:
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"weights")
    with atomic_dir(tmp_path / "dst") as d:
        link_tree(tmp_path / "src", d)
    assert (tmp_path / "dst" / "sub" / "w.bin").read_bytes() == b"weights"
    assert os.path.samefile(tmp_path / "src" / "sub" / "w.bin", tmp_path / "dst" / "sub" / "w.bin")
    with atomic_dir(tmp_path / "src") as d:                     # the source is rewritten
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"new")
    assert (tmp_path / "dst" / "sub" / "w.bin").read_bytes() == b"weights"

    def no_links(src, dst):
        raise OSError("cross-device link")
    monkeypatch.setattr(files.os, "link", no_links)
    link_tree(tmp_path / "src", tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "w.bin").read_bytes() == b"new"
    assert not os.path.samefile(tmp_path / "src" / "sub" / "w.bin", tmp_path / "copy" / "sub" / "w.bin")
