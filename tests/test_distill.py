"""Distillation: the logit-KL term against a float64 reference, the training hook that adds it to the SFT
loss only on the student's training forwards, and the checks on what distill() is given."""

import dataclasses

import pytest
import torch

from nanoseek.config import DenseConfig
from nanoseek.distill import DistillConfig, KLConfig, distill, kl_to_teacher, logit_kl
from nanoseek.errors import UserError
from nanoseek.model import build_model


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _models(vocab=64):
    cfg = DenseConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return build_model(cfg), build_model(cfg)


def test_logit_kl_matches_float64_reference():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [2, -100, -100, 7, 7]])
    for T in (1.0, 2.0):
        want, n = 0.0, 0
        for b in range(2):
            for i in range(5):
                if labels[b, i] == -100:
                    continue
                p = torch.softmax(t[b, i].double() / T, -1)
                q = torch.softmax(s[b, i].double() / T, -1)
                want += float((p * (p.log() - q.log())).sum())
                n += 1
        assert logit_kl(s, t, labels, T).item() == pytest.approx(T * T * want / n, rel=1e-5)
    assert logit_kl(t, t, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_kl(s, t, torch.full_like(labels, -100)).item() == 0.0      # no labelled position: 0, not NaN


def test_hook_adds_weighted_kl_on_student_training_forwards_only():
    student, teacher = _models()
    x = torch.randint(0, 64, (2, 6))
    y = x.clone()
    y[:, :2] = -100
    student.train()
    plain = student(x, labels=y)
    with kl_to_teacher(teacher, weight=0.5, temperature=2.0):
        hooked = student(x, labels=y)
        with torch.no_grad():
            t_logits = teacher(x).logits
        student.eval()
        eval_out = student(x, labels=y)                                      # validation: no KL
        student.train()
        no_labels = student(x)                                               # generation-style call: untouched
    want = plain.loss + 0.5 * logit_kl(plain.logits, t_logits, y, 2.0)
    assert hooked.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert eval_out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert no_labels.loss is None
    hooked.loss.backward()                                                   # gradient reaches the student only
    assert student.lm_head.weight.grad is not None and teacher.lm_head.weight.grad is None
    assert student(x, labels=y).loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)   # hook removed


def test_distill_refuses_bad_setups(tmp_path):
    with pytest.raises(UserError, match="--init"):
        distill(DistillConfig(teacher="t"), tmp_path)
    with pytest.raises(UserError, match="needs traces"):
        distill(DistillConfig(init="s"), tmp_path)
    with pytest.raises(UserError, match="teacher's logits"):
        distill(DistillConfig(init="s", data="d.jsonl", kl=KLConfig(weight=1.0)), tmp_path)
    # KL across different tokenizers is refused before any work
    from nanoseek.tokenizer import Tokenizer
    a, b = tmp_path / "a", tmp_path / "b"
    Tokenizer.train(["hello world"] * 4, 300).save(a)
    Tokenizer.train(["other text 123"] * 4, 300).save(b)
    cfg = dataclasses.replace(DistillConfig(teacher=str(a), init=str(b)), kl=KLConfig(weight=1.0))
    with pytest.raises(UserError, match="share one tokenizer"):
        distill(cfg, tmp_path / "run")
