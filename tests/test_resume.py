"""Kill a real `nanoseek pretrain` mid-way, resume it, and get the uninterrupted run's losses bit for bit."""

import os
import signal
import subprocess
import sys
import time

from conftest import MICRO_MODEL_TOML

from nanoseek.cli import main
from nanoseek.files import read_jsonl

RECIPE = f"""
{MICRO_MODEL_TOML}max_position_embeddings = 512

[data.corpus]
n_documents = 400
val_documents = 20

[train]
steps = 40
batch_size = 4
seq_len = 32
threads = 1

[optim]
warmup_steps = 5

[eval]
every = 10
val_batches = 2
problems = 3

[eval.sampling]
max_new_tokens = 8

[checkpoint]
every = 5
keep_last = 2
"""


def _pretrain(out, recipe, *extra):
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--recipe", str(recipe), "--out", str(out), "--no-progress",
           *extra]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def test_killed_run_resumes_bit_for_bit(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    full, killed = tmp_path / "full", tmp_path / "killed"

    victim = _pretrain(killed, recipe)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, victim.stderr.read().decode()
    logged = read_jsonl(killed / "metrics.jsonl")
    assert logged and logged[-1]["step"] < 40 and not (killed / "final").exists()

    for stale in (killed / "data" / ".train.abcd1234.tmp", killed / ".final.abcd1234.tmp"):   # as a kill leaves them
        stale.mkdir(parents=True, exist_ok=True)
        (stale / "half-written").write_bytes(b"\0" * 10)

    reference = _pretrain(full, recipe)
    assert reference.wait() == 0, reference.stderr.read().decode()
    resumed = _pretrain(killed, recipe, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read().decode()

    want, got = read_jsonl(full / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 41))
    for a, b in zip(want, got):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "maxvio", "val_loss", "pass@1"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
    assert (killed / "final" / "tokenizer.json").is_file() and (killed / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-35", "step-40"]   # keep_last
    steps = [r["step"] for r in got]
    assert len(steps) == len(set(steps))                                   # no metric row logged twice
    assert not [p for p in killed.rglob("*") if p.name.endswith((".tmp", ".old"))]   # no temporaries left
    assert not list(killed.rglob("*.pt"))                                  # no pickles: safetensors + JSON state

    # a resumed run must keep its configuration
    assert main(["pretrain", "--recipe", str(recipe), "--out", str(killed), "--resume", "--set", "optim.lr=0.1"]) == 2
