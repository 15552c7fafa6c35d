"""LoRA adapters (nanoseek.train.lora) against PEFT: the adapter file PEFT loads onto the transformers model gives
our logits, the merged export gives the adapter model's logits, and a LoRA SFT run changes only the adapters."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from nanoseek.cli import main
from nanoseek.errors import UserError
from nanoseek.hf import load_pretrained, save_pretrained
from nanoseek.model import build_model
from nanoseek.config import ModelConfig
from nanoseek.train.lora import BaseModel, LoRAConfig, adapter_state, apply_lora, merge_lora, save_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A random Qwen3 checkpoint saved by transformers (head_dim 12 != hidden 32 / 4 heads)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3") / "hf"
    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                      max_position_embeddings=128)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    return path


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_state(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "down_proj"]])
def test_adapter_loads_in_peft_with_equal_logits_and_merges(tmp_path, qwen3, targets):
    cfg = LoRAConfig(r=4, alpha=8.0, **({"target_modules": targets} if targets else {}))
    ours = apply_lora(load_pretrained(qwen3).eval(), cfg)
    base = logits(ours)
    assert torch.equal(base, logits(load_pretrained(qwen3).eval()))          # B = 0: starts at the base model
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    n_targets = 2 * len(cfg.target_modules)                                  # per layer
    assert trainable == set(adapter_state(ours)) and len(trainable) == 2 * n_targets
    randomise_adapters(ours)
    adapted = logits(ours)
    assert (adapted - base).abs().max() > 1e-2

    assert torch.equal(logits(BaseModel(ours)), base)                      # GRPO's reference: adapters off
    assert torch.equal(logits(ours), adapted)                                # ... for that call only

    save_adapter(ours, tmp_path / "adapter", base_model=str(qwen3))
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in stored
    assert stored["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert stored["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (48, 4)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0

    hf = AutoModelForCausalLM.from_pretrained(qwen3).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    loaded = {k for k in peft_model.state_dict() if "lora_" in k}
    assert len(loaded) == len(stored)                                        # every adapter attached
    ref = logits(peft_model)
    assert (ref - adapted).abs().max() <= 1e-5

    merged = merge_lora(ours)
    assert not adapter_state(merged) and type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert (logits(merged) - ref).abs().max() <= 1e-5
    save_pretrained(merged, tmp_path / "merged")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(back) - ref).abs().max() <= 1e-5
    assert (logits(peft_model.merge_and_unload()) - logits(back)).abs().max() <= 1e-5


def test_bad_lora_settings_are_user_errors():
    with pytest.raises(UserError, match="'qkv_proj' is not a projection"):
        LoRAConfig(r=4, target_modules=["qkv_proj"])
    with pytest.raises(UserError, match="lora supports dense models"):
        apply_lora(build_model(ModelConfig()), LoRAConfig(r=4))
    model = build_model(ModelConfig())
    assert apply_lora(model, LoRAConfig()) is model and not adapter_state(model)     # r = 0: off


@pytest.fixture(scope="module")
def qwen3_init(tmp_path_factory):
    """A random Qwen3 checkpoint with a tokenizer that fits it, and chat JSONL to fine-tune on."""
    from nanoseek.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("qwen3_init")
    tok = Tokenizer.train([f"{a} + {b} = {a + b}" for a in range(40) for b in range(40)], vocab_size=300)
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                 max_position_embeddings=256)).save_pretrained(path / "model")
    tok.save(path / "model" / "tokenizer")
    (path / "traces.jsonl").write_text("".join(json.dumps({"prompt": f"{a} + 1?", "response": f"{a + 1}"}) + "\n"
                                               for a in range(40)))
    return path


def lora_sft(init, out, steps, *extra):
    assert main(["sft", "--init", str(init / "model"), "--out", str(out), "--no-progress",
          "--set", f"data.path=\"{init / 'traces.jsonl'}\"", "--set", "eval.problems=0", "--set", "lora.r=4",
          "--set", f"train.steps={steps}", "--set", "train.batch_size=4", "--set", "train.seq_len=64",
          "--set", "checkpoint.every=2", "--set", "optim.warmup_steps=1", "--set", "optim.lr=1e-2", *extra]) == 0


def test_lora_sft_run_trains_only_the_adapter_and_exports_it(tmp_path, qwen3_init):
    from nanoseek.train.lora import resume_adapter

    lora_sft(qwen3_init, tmp_path / "run", 4)
    run, init = tmp_path / "run", qwen3_init / "model"
    # the checkpoint's base is --init, bit for bit; the adapters moved
    base = load_file(init / "model.safetensors")
    ckpt = load_file(run / "checkpoints" / "step-4" / "model.safetensors")
    assert set(ckpt) == set(base) | {k for k in ckpt if ".lora_" in k} and len(ckpt) > len(base)
    assert all(torch.equal(ckpt[k], base[k]) for k in base)
    assert all(ckpt[k].abs().max() > 0 for k in ckpt if ".lora_B." in k)
    with pytest.raises(UserError, match="checkpoint of a LoRA run"):
        load_pretrained(run / "checkpoints" / "step-4")

    # nanoseek's model with the adapter == PEFT's == the merged final/
    ours = resume_adapter(apply_lora(load_pretrained(init), LoRAConfig(r=4)), run / "checkpoints" / "step-4").eval()
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(init), run / "adapter").eval()
    ids = IDS % 300
    ref = logits(peft_model, ids)
    assert (logits(ours, ids) - ref).abs().max() <= 1e-5
    assert (logits(ours, ids) - logits(load_pretrained(init), ids)).abs().max() > 1e-3      # it learned something
    assert (logits(load_pretrained(run / "final"), ids) - ref).abs().max() <= 1e-5
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    assert (logits(final, ids) - ref).abs().max() <= 1e-5
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(init)


def test_lora_sft_in_bf16_with_activation_checkpointing(tmp_path, qwen3_init):
    """The three switches together: bf16 autocast, checkpointed layers, adapters (fp32 master copies)."""
    lora_sft(qwen3_init, tmp_path / "run", 2, "--set", "train.precision=\"bf16\"",
             "--set", "train.activation_checkpointing=true")
    stored = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in stored.values())
    assert all(t.abs().max() > 0 for k, t in stored.items() if ".lora_B." in k)


def test_lora_distill_writes_the_students_adapter(tmp_path, qwen3_init):
    """distill's SFT section takes the same [lora] (as `sft.lora`): the student's adapter lands in sft/adapter."""
    assert main(["distill", "--init", str(qwen3_init / "model"), "--data", str(qwen3_init / "traces.jsonl"),
                 "--out", str(tmp_path / "run"), "--no-progress", "--set", "epochs=0", "--set", "sft.lora.r=4",
                 "--set", "sft.eval.problems=0", "--set", "sft.train.steps=2", "--set", "sft.train.batch_size=4",
                 "--set", "sft.train.seq_len=64"]) == 0
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen3_init / "model"),
                                                tmp_path / "run" / "sft" / "adapter").eval()
    ids = IDS % 300
    assert (logits(load_pretrained(tmp_path / "run" / "sft" / "final"), ids) - logits(peft_model, ids)).abs().max() <= 1e-5


def test_lora_sft_resume_replays_the_uninterrupted_run(tmp_path, qwen3_init):
    """Killed after step 2 (step-4, final/ and adapter/ gone): --resume rebuilds the model from --init plus
    step-2's adapter tensors and ends with the uninterrupted run's adapter, bit for bit."""
    import shutil

    lora_sft(qwen3_init, tmp_path / "full", 4)
    lora_sft(qwen3_init, tmp_path / "half", 4)
    for d in ("checkpoints/step-4", "final", "adapter"):
        shutil.rmtree(tmp_path / "half" / d)
    lora_sft(qwen3_init, tmp_path / "half", 4, "--resume")
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "half" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dense_base(tmp_path_factory):
    """A random Qwen3 model with a tokenizer trained on task solutions (conftest.make_base, dense)."""
    from nanoseek.config import DenseConfig
    from nanoseek.tasks import sample_problems
    from nanoseek.tokenizer import Tokenizer, r1_zero_prompt

    root = tmp_path_factory.mktemp("dense_base")
    tok = Tokenizer.train([r1_zero_prompt(p.prompt) + p.completion()[len("<think>"):]
                           for p in sample_problems("arithmetic", 50)], 300)
    torch.manual_seed(0)
    save_pretrained(build_model(DenseConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=12, model_type="qwen3")), root / "base")
    tok.save(root / "base" / "tokenizer")
    return root / "base"


def test_lora_grpo_trains_only_the_adapter_and_resumes(tmp_path, dense_base):
    from dataclasses import replace

    from nanoseek.files import read_jsonl
    from nanoseek.rl.trainer import train_rl
    from test_grpo import tiny_rl_config

    def cfg(steps):
        c = tiny_rl_config(dense_base, steps)
        return replace(c, lora=LoRAConfig(r=4, alpha=8.0), checkpoint=replace(c.checkpoint, every=1),
                       eval=replace(c.eval, problems=0))
    train_rl(cfg(2), tmp_path / "full", progress=False)
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert full[-1]["step"] == 2 and full[-1]["kl"] > 0           # the adapter moved the policy off the reference
    base = load_file(dense_base / "model.safetensors")
    ckpt = load_file(tmp_path / "full" / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.equal(ckpt[k], base[k]) for k in base) and any(".lora_B." in k for k in ckpt)

    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense_base),
                                                tmp_path / "full" / "adapter").eval()
    ids = IDS % 200
    ref = logits(peft_model, ids)
    assert (logits(load_pretrained(tmp_path / "full" / "final"), ids) - ref).abs().max() <= 1e-5
    assert (logits(load_pretrained(dense_base), ids) - ref).abs().max() > 1e-4

    train_rl(cfg(1), tmp_path / "part", progress=False)       # stop after step 1 and resume from its adapter
    train_rl(cfg(2), tmp_path / "part", resume=True, progress=False)
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_lora_refuses_ppo(tmp_path, dense_base):
    from dataclasses import replace

    from nanoseek.rl.trainer import train_rl
    from test_grpo import tiny_rl_config

    with pytest.raises(UserError, match="not ppo"):
        train_rl(replace(tiny_rl_config(dense_base, 1), lora=LoRAConfig(r=4)), tmp_path / "ppo", algo="ppo")
    assert not (tmp_path / "ppo").exists()


def test_lora_on_a_deepseek_model_exits_2_and_writes_nothing(tmp_path, base_checkpoint, capsys):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"prompt": f"{a} + 1?", "response": f"{a + 1}"}) + "\n"
                                                 for a in range(40)))
    out = tmp_path / "run"
    sft = ["sft", "--set", f"data.path=\"{tmp_path / 'chat.jsonl'}\"", "--set", "train.batch_size=2",
           "--set", "eval.problems=0"]
    for argv, error in [(sft + ["--set", "lora.r=4"], "lora supports dense models"),
                        (["grpo", "--set", "lora.r=4"], "lora supports dense models"),
                        (sft + ["--set", "lora.r=-1"], "lora.r"),
                        (sft + ["--set", "lora.r=4", "--set", "train.precision=fp8"], "not fp8"),
                        (["grpo", "--set", "lora.target_modules=[\"qkv\"]"], "'qkv' is not a projection")]:
        assert main(argv + ["--init", str(base_checkpoint), "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert error in err and "\n" not in err, err
        assert not out.exists(), argv
