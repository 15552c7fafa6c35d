"""Every command takes `--recipe` and `--set`: eval, generate and chat too, with their flags as shortcuts on top."""

from __future__ import annotations

import json
import os

from nanoseek.cli import main


def test_generate_reads_sampling_from_recipe_and_set(tmp_path, base_checkpoint, capsys):
    recipe = tmp_path / "sampling.toml"
    recipe.write_text("max_new_tokens = 3\ngreedy = true\n", encoding="utf-8")
    args = ["generate", "--checkpoint", str(base_checkpoint), "--prompt", "1 + 2", "--json", "--device", "cpu"]
    assert main(args + ["--recipe", str(recipe)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["tokens"] <= 3
    assert main(args + ["--recipe", str(recipe), "--set", "max_new_tokens=5", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] <= 2          # the flag is applied after --set
    assert main(args + ["--set", "temperature=0"]) == 2                # bad value: one-line error, exit 2
    assert "temperature" in capsys.readouterr().err


def test_eval_reads_pass_at_k_config_from_recipe_and_set(tmp_path, base_checkpoint):
    recipe = tmp_path / "eval.toml"
    recipe.write_text("samples = 2\ngreedy = false\n[sampling]\nmax_new_tokens = 4\ntemperature = 0.9\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(base_checkpoint), "--tasks", "arithmetic", "--n-problems", "2",
                 "--device", "cpu", "--recipe", str(recipe), "--set", "sampling.top_p=0.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["samples"] == 2 and result["config"]["greedy"] is False
    assert result["config"]["sampling"] == {**result["config"]["sampling"], "max_new_tokens": 4, "temperature": 0.9,
                                            "top_p": 0.5}
    assert result["samples"] == 2 and "greedy" not in result["per_problem"][0]
    assert result["length"]["mean"] <= 4


def test_every_command_runs_with_expandable_cuda_segments_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    main(["info", "--help"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    main(["info", "--help"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
