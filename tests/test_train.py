"""Trainer: LR schedule, gradient accumulation, loss composition, bias update, metrics, bad input."""

import json
from types import SimpleNamespace

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.files import read_jsonl
from nanoseek.model import build_model, moe_layers
from nanoseek.train.optim import OptimConfig, build_optimizer, wsd_lr
from nanoseek.train.trainer import CheckpointConfig, TrainEvalConfig, TrainConfig, forward_backward, train

MICRO = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                    max_position_embeddings=64, num_nextn_predict_layers=1)


def micro_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return build_model(MICRO).to(dtype)


class FixedBatches:
    """A checkpointable stream over fixed rows: batch i = rows[i·B : (i+1)·B] (cyclic)."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.b, self.pos = x, y, batch_size, 0

    def __iter__(self):
        while True:
            i = (self.pos * self.b) % len(self.x)
            self.pos += 1
            yield self.x[i:i + self.b], self.y[i:i + self.b]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def rows(n=8, t=12, seed=0, mask=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MICRO.vocab_size, (n, t), generator=g)
    y = torch.randint(0, MICRO.vocab_size, (n, t), generator=g)
    if mask:  # SFT-like: a different number of targets per row
        y[torch.rand(n, t, generator=g) < torch.linspace(0.1, 0.8, n)[:, None]] = -100
    return x, y


# ---------------------------------------------------------------- schedule

def test_wsd_schedule_follows_its_formula():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, decay_frac=0.2)
    lrs = [wsd_lr(s, 100, cfg) for s in range(100)]
    for s in range(10):                                     # linear warmup, reaching the peak at step 9
        assert lrs[s] == pytest.approx((s + 1) / 10)
    assert all(v == 1.0 for v in lrs[10:80])                 # stable
    for s in range(80, 100):                                 # linear decay over the last 20 steps to 0.1
        assert lrs[s] == pytest.approx(1.0 - (s - 79) / 20 * 0.9)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert wsd_lr(50, 100, OptimConfig(lr=2.0, warmup_steps=0, decay_frac=0.0)) == 2.0


def test_weight_decay_only_on_matrices():
    model = micro_model(torch.float32)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name


# ---------------------------------------------------------------- one step

@pytest.mark.parametrize("mask", [False, True])
def test_grad_accumulation_equals_one_big_batch(mask):
    x, y = rows(mask=mask)
    tc = TrainConfig(mtp_lambda=0.0 if mask else 0.3, balance_alpha=0.01)   # MTP averages per micro-batch
    grads, losses = [], []
    for accum in (1, 4):
        model = micro_model()
        b = len(x) // accum
        micro = [(x[i:i + b], y[i:i + b]) for i in range(0, len(x), b)]
        losses.append(forward_backward(model, micro, tc, torch.device("cpu")))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for n in grads[0]:  # float64, but the router runs in fp32 (V3 §3.3): agreement to ~1e-7 of the scale
        scale = float(grads[0][n].abs().max())
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6 * scale, msg=n)
    (ce1, _, bal1), (ce4, _, bal4) = losses
    assert (ce4, bal4) == pytest.approx((ce1, bal1), rel=1e-6)
    # the reported CE is the token-weighted mean over all targets, computed independently here
    model = micro_model()
    with torch.no_grad():
        logits = model(x).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert losses[1][0] == pytest.approx(float(ref), rel=1e-6)


def test_loss_is_ce_plus_lambda_mtp_plus_alpha_balance():
    x, y = rows()
    lam, alpha = 0.3, 0.05
    model = micro_model()
    forward_backward(model, [(x, y)], TrainConfig(mtp_lambda=lam, balance_alpha=alpha), torch.device("cpu"))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref_model = micro_model()
    out = ref_model(x, labels=y)
    assert float(out.mtp_loss.detach()) > 0 and float(out.balance_loss.detach()) > 0
    (out.loss + lam * out.mtp_loss + alpha * out.balance_loss).backward()
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)
    # without λ and α the MTP module and the router receive no gradient from their losses
    model = micro_model()
    forward_backward(model, [(x, y)], TrainConfig(mtp_lambda=0.0, balance_alpha=0.0), torch.device("cpu"))
    assert all(p.grad is None or p.grad.abs().max() == 0 for n, p in model.named_parameters() if n.startswith("mtp."))


# ---------------------------------------------------------------- the loop

def _cfg(steps=3, accum=1, gamma=0.01, every=2):
    return SimpleNamespace(train=TrainConfig(steps=steps, batch_size=2, grad_accum=accum, seq_len=12, bias_gamma=gamma),
                           optim=OptimConfig(warmup_steps=1), eval=TrainEvalConfig(every=every),
                           checkpoint=CheckpointConfig(every=0, keep_last=1))


def test_bias_update_uses_the_whole_step_loads(tmp_path):
    x, y = rows()
    model = micro_model(torch.float32)
    seen = []

    def reduce_loads(loads):          # the data-parallel hook: sees the [L_moe, E] loads of each step
        seen.append(loads.clone())
        return loads

    before = [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]
    train(model, _cfg(steps=1, accum=2, gamma=0.01), tmp_path, FixedBatches(x, y, 2), reduce_loads=reduce_loads,
          progress=False)
    (loads,) = seen
    layers = moe_layers(model)
    assert loads.shape == (len(layers), MICRO.n_routed_experts) == (2, 8)   # the MoE layer + the MTP module's
    # every token of both micro-batches was routed to K experts in every MoE layer
    assert torch.all(loads.sum(-1) == 2 * 2 * 12 * MICRO.num_experts_per_tok)
    for m, b0, c in zip(layers, before, loads):
        expected = b0 + 0.01 * torch.sign(c.mean() - c)      # V3 §2.1.2
        torch.testing.assert_close(m.gate.e_score_correction_bias, expected)
        assert m.gate.expert_load.sum() == 0                 # counts reset for the next step
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    ref = ((loads.max(-1).values - loads.mean(-1)) / loads.mean(-1)).tolist()
    assert record["maxvio"] == pytest.approx(ref, abs=1e-5)


def test_gamma_zero_leaves_biases(tmp_path):
    x, y = rows()
    model = micro_model(torch.float32)
    train(model, _cfg(steps=2, gamma=0.0), tmp_path, FixedBatches(x, y, 2), progress=False)
    assert all(m.gate.e_score_correction_bias.abs().max() == 0 for m in moe_layers(model))


def test_metrics_checkpoints_and_tensorboard(tmp_path):
    x, y = rows()
    val = [rows(2, 12, seed=5)]
    model = micro_model(torch.float32)
    train(model, _cfg(steps=3), tmp_path, FixedBatches(x, y, 2), val_batches=val,
          evaluate=lambda m: {"pass@1": 0.25}, progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "maxvio", "maxvio_mean"):
            assert key in r, key
        assert len(r["maxvio"]) == 2 and r["maxvio_mean"] == pytest.approx(sum(r["maxvio"]) / 2, abs=1e-5)
        assert "mfu" not in r                                   # CPU: no MFU
    assert "val_loss" in records[1] and "val_loss" in records[2] and "val_loss" not in records[0]
    assert records[2]["pass@1"] == 0.25
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-3"]                                   # the last step; keep_last=1
    assert (tmp_path / "checkpoints" / "step-3" / "config.json").is_file()


# ---------------------------------------------------------------- bad input, through the CLI

def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        ["pretrain", "--out", str(out), "--set", "train.seq_len=100000"],          # beyond max positions
        ["pretrain", "--out", str(out), "--set", "train.bogus=1"],                  # unknown key
        ["pretrain", "--out", str(out), "--set", "model.hidden_sise=8"],            # unknown model field
        ["pretrain", "--out", str(out), "--set", "train.precision=\"fp16\""],
        ["pretrain", "--out", str(out), "--recipe", str(tmp_path / "missing.toml")],
        ["sft", "--out", str(out)],                                                  # no --init
        ["sft", "--out", str(out), "--init", str(tmp_path / "nowhere")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("nanoseek") and "\n" not in err and "Traceback" not in err, err
        assert not out.exists(), argv


def test_bad_sft_data_and_tokenizer_exit_2(tmp_path, capsys):
    from nanoseek.hf import save_pretrained
    from nanoseek.tokenizer import Tokenizer

    init = tmp_path / "init"
    save_pretrained(micro_model(torch.float32), init)           # vocab 64: smaller than any BPE tokenizer
    tok = Tokenizer.train(["1 + 2 = 3", "hello world"] * 50, vocab_size=300)
    tok.save(init / "tokenizer")
    empty, broken = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl"
    empty.write_text("")
    broken.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    out = tmp_path / "run"
    for data in (empty, broken):
        assert main(["sft", "--init", str(init), "--out", str(out), "--set", f'data.path="{data}"']) == 2
        assert str(data) in capsys.readouterr().err
    assert main(["pretrain", "--out", str(out), "--set", f'data.tokenizer="{init / "tokenizer"}"', "--set",
                 "model.vocab_size=100"]) == 2           # a BPE has >= 266 tokens
    assert "vocab" in capsys.readouterr().err
    assert not out.exists()
    # an existing run is never overwritten without --resume
    out.mkdir()
    (out / "config.toml").write_text("")
    assert main(["pretrain", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_set_overrides_take_inline_tables_and_per_family_levels():
    """`--set` splits comma-joined assignments but not the commas inside a table or list, and a field typed
    `int | dict | None` takes a level, a {family: level} table or none."""
    from nanoseek.errors import UserError
    from nanoseek.recipe import load_recipe
    from nanoseek.rl.trainer import RLConfig

    cfg = load_recipe(RLConfig, None, ["tasks.difficulty={arithmetic = 2, linear = 1},train.steps=3",
                                       "tasks.names=[\"arithmetic\", \"linear\"]"])
    assert cfg.tasks.difficulty == {"arithmetic": 2, "linear": 1} and cfg.train.steps == 3
    assert cfg.tasks.names == ["arithmetic", "linear"]
    assert load_recipe(RLConfig, None, ["tasks.difficulty=3"]).tasks.difficulty == 3
    assert load_recipe(RLConfig, None, ["tasks.difficulty=none"]).tasks.difficulty is None
    with pytest.raises(UserError, match="tasks.difficulty"):
        load_recipe(RLConfig, None, ["tasks.difficulty=\"hard\""])


# ---------------------------------------------------------------- compile by default (train.compile)

def test_compile_auto_means_cuda_only_and_bad_values_fail_early():
    from nanoseek.errors import UserError
    from nanoseek.rl.reward_model import RMTrainConfig
    from nanoseek.rl.trainer import RLTrainConfig
    from nanoseek.train.trainer import compile_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (compile_enabled("auto", cuda), compile_enabled(True, cuda), compile_enabled(False, cuda)) == (True, True, False)
    assert not any(compile_enabled(setting, cpu) for setting in ("auto", True, False))    # the CPU keeps its speed
    for cls in (TrainConfig, RLTrainConfig, RMTrainConfig):
        assert cls().compile == "auto"
        with pytest.raises(UserError, match="compile"):
            cls(compile="fast")


class _Reached(Exception):
    """Raised by the stand-in compile step: the trainer got as far as compiling, with args[0] = its setting."""


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """A saved micro model with a tokenizer that fits it, and a chat JSONL of traces."""
    import dataclasses

    from nanoseek.hf import save_pretrained
    from nanoseek.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("init")
    tok = Tokenizer.train([f"{a} + {b} = {a + b}" for a in range(40) for b in range(40)], vocab_size=300)
    torch.manual_seed(0)
    save_pretrained(build_model(dataclasses.replace(MICRO, vocab_size=320, max_position_embeddings=256)),
                    path / "model")
    tok.save(path / "model" / "tokenizer")
    traces = path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": f"{a} + 1?", "response": f"{a + 1}"}) + "\n" for a in range(40)))
    return path


@pytest.mark.parametrize("argv, key", [
    (["pretrain", "--set", "data.corpus.n_documents=200", "--set", "data.corpus.val_documents=20",
      "--set", "model.vocab_size=320", "--set", "eval.problems=0"], "train.compile"),
    (["sft", "--init", "{model}", "--set", "data.path=\"{traces}\"", "--set", "eval.problems=0"], "train.compile"),
    (["extend", "--init", "{model}", "--set", "data.corpus.n_documents=200", "--set", "retrieval.train_documents=4",
      "--set", "retrieval.val_documents=2", "--set", "retrieval.lengths=[256]", "--set", "retrieval.per_cell=1",
      "--set", "retrieval.loss_documents=1", "--set", "retrieval.needles=1", "--set", "train.seq_len=256",
      "--set", "train.batch_size=1"],
     "train.compile"),
    (["grpo", "--init", "{model}"], "train.compile"),
    (["ppo", "--init", "{model}"], "train.compile"),
    (["reward-model", "--init", "{model}", "--set", "data.pairs=100"], "train.compile"),
    (["distill", "--init", "{model}", "--data", "{traces}", "--set", "sft.eval.problems=0"], "sft.train.compile"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_compile_key_reaches_every_trainer(tmp_path, tiny_init, monkeypatch, argv, key):
    """Every command that trains a model goes through compile_for_training with its section's compile key:
    "auto" by default, and `--set <section>.compile=false` arrives as False."""
    import nanoseek.rl.reward_model as reward_model
    import nanoseek.rl.trainer as rl_trainer
    import nanoseek.train.trainer as trainer

    def stand_in(model, setting, device, dynamic=False):
        raise _Reached(setting)
    monkeypatch.setattr(trainer, "compile_for_training", stand_in)
    monkeypatch.setattr(rl_trainer, "compile_for_training", stand_in)
    monkeypatch.setattr(reward_model, "compile_for_training", stand_in)
    argv = [a.format(model=tiny_init / "model", traces=tiny_init / "traces.jsonl") for a in argv]
    for i, (sets, expected) in enumerate([([], "auto"), (["--set", f"{key}=false"], False)]):
        with pytest.raises(_Reached) as reached:
            main(argv + ["--out", str(tmp_path / f"run{i}"), "--no-progress"] + sets)
        assert reached.value.args[0] is expected or reached.value.args[0] == expected, (argv[0], sets)
        assert reached.value.args[0] is not True


def test_compiled_training_keeps_checkpoint_keys_and_losses(tmp_path, monkeypatch):
    """compile_blocks (what train.compile switches on) compiles functions, not modules: after compiled training
    steps the state dict and the saved model's keys are the eager model's (no `_orig_mod.` prefixes), the
    losses agree, and the saved weights load back into an eager model."""
    from safetensors import safe_open

    from nanoseek.hf import load_pretrained, save_pretrained
    from nanoseek.model import moe as moe_mod
    from nanoseek.model.compile import compile_blocks
    from test_model_speed import _masked_grouped_mm

    monkeypatch.setattr(moe_mod, "grouped_mm", _masked_grouped_mm)     # CPU-traceable expert GEMM
    x, y = rows(n=2, t=8)
    tc = TrainConfig(device="cpu")
    graphs = []

    def backend(gm, example_inputs):                  # dynamo's graphs, run as traced (no Inductor: seconds on a CPU)
        graphs.append(gm)
        return gm.forward
    eager, compiled = micro_model(torch.float32), compile_blocks(micro_model(torch.float32), backend=backend)
    losses = [forward_backward(m, [(x, y)], tc, torch.device("cpu")) for m in (eager, compiled)]
    assert graphs and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for name, model in (("c", compiled), ("e", eager)):
        save_pretrained(model, tmp_path / name)
    keys = [sorted(safe_open(str(f), "pt").keys()) for name in "ce" for f in sorted((tmp_path / name).glob("*.safetensors"))]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[0])
    reloaded = load_pretrained(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), compiled.state_dict().values()))


def test_a_dense_model_compiles_by_blocks_with_the_eager_loss_and_gradients():
    """compile_blocks on a dense Llama/Qwen model (a distillation student): the blocks and the loss run through
    dynamo, the loss and every gradient equal the eager model's, the state dict keeps its keys, and decoding
    with a KV cache stays eager (no new graph)."""
    from nanoseek.config import DenseConfig
    from nanoseek.model.compile import compile_blocks

    cfg = DenseConfig(vocab_size=MICRO.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = build_model(cfg).double()
        models.append(compile_blocks(m, backend=backend) if compiled else m)
    x, y = rows(n=2, t=8)
    tc = TrainConfig(device="cpu")
    losses = [forward_backward(m, [(x, y)], tc, torch.device("cpu")) for m in models]
    assert graphs and losses[1] == pytest.approx(losses[0], rel=1e-12)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert list(models[1].state_dict()) == list(models[0].state_dict())
    traced = len(graphs)
    with torch.no_grad():
        cache = models[1].new_cache(1, 8)
        models[1](x[:1, :4], cache=cache)
        models[1](x[:1, 4:5], cache=cache)
    assert len(graphs) == traced
    torch._dynamo.reset()        # the shared `cross_entropy` code object must not carry this test's graphs onward


def test_validation_of_a_compiled_model_runs_eager(monkeypatch):
    """The validation loss in eval mode without gradients would be a new compiled graph per block kind (~25 s
    of compilation on the `small` model for a ~1 s forward): it runs eager, with the compiled model's loss."""
    from nanoseek.model import moe as moe_mod
    from nanoseek.model.compile import compile_blocks
    from nanoseek.train.trainer import validation_loss
    from test_model_speed import _masked_grouped_mm

    monkeypatch.setattr(moe_mod, "grouped_mm", _masked_grouped_mm)
    batches = [rows(n=2, t=8)]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    eager, compiled = micro_model(torch.float32), compile_blocks(micro_model(torch.float32), backend=backend)
    forward_backward(compiled, batches, TrainConfig(device="cpu"), torch.device("cpu"))     # a training step
    trained = len(graphs)
    cpu = torch.device("cpu")
    assert validation_loss(compiled, batches, cpu, "fp32") == pytest.approx(validation_loss(eager, batches, cpu, "fp32"), rel=1e-6)
    assert trained and len(graphs) == trained and compiled.training


def test_steps_with_gc_collects_between_steps_and_restores_the_collector():
    """Automatic collection is off inside a training loop; a reference cycle made in a step is gone once the next
    step starts (the young-generation collection between steps), also after the first step's freeze; the
    collector is back on, with nothing frozen, when the loop ends or fails."""
    import gc
    import weakref

    from nanoseek.run import steps_with_gc

    class Node:
        pass

    assert gc.isenabled()
    refs = []
    for step in steps_with_gc(range(3)):
        assert not gc.isenabled()
        if refs:
            assert refs[-1]() is None, f"the cycle made in step {step - 1} survived"
        a, b = Node(), Node()
        a.b, b.a = b, a                                  # a cycle: only the collector frees it
        refs.append(weakref.ref(a))
        del a, b
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        for _ in steps_with_gc(range(3)):
            raise RuntimeError("a failing step")
    assert gc.isenabled() and gc.get_freeze_count() == 0
