"""Single-process parts of nanoseek.parallel: layout checks, stage cut, bubble formulas, the F&B baton."""

import itertools

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import UserError
from nanoseek.parallel import ParallelConfig
from nanoseek.parallel import overlap
from nanoseek.parallel.expert import check_layout, max_ranks_per_token
from nanoseek.parallel.pipeline import bubble_time, simulate_bubble, split_layers
from nanoseek.recipe import load_recipe


def test_config_resolves_from_world_size_and_set_overrides():
    cfg = load_recipe(ParallelConfig, None, ["ep=2", "pp=2", "schedule=dualpipev"]).resolve(8)
    assert (cfg.dp, cfg.ep, cfg.pp, cfg.microbatches, cfg.stages_per_rank) == (4, 2, 2, 4, 2)
    assert ParallelConfig(pp=2).resolve(2).microbatches == 2


@pytest.mark.parametrize("kw, world, needle", [
    (dict(dp=3), 4, "launch"),
    (dict(pp=3), 4, "pp=3"),
    (dict(ep=3), 4, "divide"),
    (dict(schedule="interleaved"), 1, "schedule"),
    (dict(dp_mode="zero1"), 1, "dp_mode"),
    (dict(pp=2, schedule="zbv", microbatches=3), 2, "microbatches >= 4"),
])
def test_bad_layouts_are_user_errors(kw, world, needle):
    with pytest.raises(UserError, match=needle):
        ParallelConfig(**kw).resolve(world)


def test_expert_layout_must_align_groups_with_ranks():
    check_layout(ModelConfig(n_routed_experts=16, n_group=4), 2)     # 2 groups per rank
    check_layout(ModelConfig(n_routed_experts=16, n_group=4), 8)     # 2 ranks per group
    with pytest.raises(UserError, match="n_group"):
        check_layout(ModelConfig(n_routed_experts=24, n_group=4), 6)
    with pytest.raises(UserError, match="divide"):
        check_layout(ModelConfig(), 3)


@pytest.mark.parametrize("E, G, topk_group, K, ep", [(16, 4, 2, 4, 2), (16, 4, 2, 4, 4), (16, 4, 1, 4, 8),
                                                      (16, 4, 4, 4, 4), (32, 8, 2, 6, 8)])
def test_rank_bound_holds_for_every_group_choice(E, G, topk_group, K, ep):
    """Brute force over all kept-group sets and expert picks: distinct ranks never exceed the bound."""
    cfg = ModelConfig(n_routed_experts=E, n_group=G, topk_group=topk_group, num_experts_per_tok=K)
    per_group, per_rank = E // G, E // ep
    worst = 0
    for groups in itertools.combinations(range(G), topk_group):
        experts = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        # the K picks that spread over the most ranks: one expert from each rank first
        ranks = sorted({e // per_rank for e in experts})
        worst = max(worst, min(K, len(ranks)))
    assert max_ranks_per_token(cfg, ep) == worst


def test_split_layers_covers_the_model_once():
    for L, D, S in [(4, 1, 2), (4, 1, 4), (12, 1, 8), (61, 1, 16), (3, 3, 4), (6, 0, 3)]:
        ranges = split_layers(L, D, S)
        assert len(ranges) == S and [i for r in ranges for i in r] == list(range(L))
        units = [len(r) for r in ranges[:-1]] + [len(ranges[-1]) + D]
        assert max(units) - min(units) <= 1 or L < S
    with pytest.raises(UserError):
        split_layers(2, 0, 4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zbv", "dualpipev"])
@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 12), (8, 16)])
def test_bubble_formula_matches_schedule_table(schedule, pp, m):
    """docs/DESIGN.md §5 formulas vs a timing simulation of the very action tables torch runs (V shapes) or the
    textbook orders (GPipe/1F1B), in the DualPipe paper's setting F = B − W = W."""
    F, W = 1.0, 1.0
    B = F + W
    for FB in (None, 2.0, 2.5):      # F&B = F + B (no overlap gain) or shorter
        if FB is not None and schedule != "dualpipev":
            continue
        idle = simulate_bubble(schedule, pp, m, F, B, W, FB)
        assert max(idle) == pytest.approx(bubble_time(schedule, pp, F, B, W, FB))
    if schedule in ("gpipe", "1f1b"):   # any durations
        assert max(simulate_bubble(schedule, pp, m, 0.7, 1.9, 0.0)) == pytest.approx(bubble_time(schedule, pp, 0.7, 1.9, 0.0))


class _FakeWork:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait(self):
        self.log.append(f"wait {self.name}")


def test_overlap_baton_interleaves_forward_and_backward():
    """Each pass launches a 'collective', hands over, and waits for it only after the other pass ran."""
    log = []

    def forward():
        for i in range(3):
            log.append(f"F compute {i}")
            overlap.wait(_FakeWork(log, f"F{i}"), "F")

    def backward():
        for i in range(2):
            log.append(f"B compute {i}")
            overlap.wait(_FakeWork(log, f"B{i}"), "B")

    handoffs = overlap.run_overlapped(forward, backward)
    assert log == ["F compute 0", "B compute 0", "wait F0", "F compute 1", "wait B0", "B compute 1",
                   "wait F1", "F compute 2", "wait B1", "wait F2"]
    assert handoffs == 5          # F0 B0 F1 B1 F2 (the last returns to F after B finished)
    assert overlap._ACTIVE is None


def test_overlap_propagates_errors():
    def backward():
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        overlap.run_overlapped(lambda: overlap.wait(_FakeWork([], "x"), "F"), backward)


def test_torch_has_the_pipelining_pieces_we_use():
    from torch.distributed.pipelining import schedules as S
    for name in ("Schedule1F1B", "ScheduleGPipe", "ScheduleZBVZeroBubble", "ScheduleDualPipeV"):
        assert hasattr(S, name)
    assert hasattr(S._PipelineScheduleRuntime, "register_custom_function") and hasattr(S, "OVERLAP_F_B")
    assert torch.__version__ >= "2.10"
