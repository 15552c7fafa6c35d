"""The pipeline report's RL diagnostics from synthetic stage metrics: the first-10 / last-10 rollout table,
the per-quantity curves with a line per stage, and the eval reflection column."""

import json

from nanoseek.eval import _summary
from nanoseek.report import rl_plots, rollout_summary, table_rows


def _write_metrics(path, records):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _stages(run_dir):
    """R1-Zero: 30 steps, accuracy 1% per step, length 10 + 2·step, reflection 0 → 0.5 after step 15 (and an
    eval-only step-0 record); R1 stage 2: 6 steps, flat; the student: 4 steps logged before reflection was."""
    _write_metrics(run_dir / "02-r1-zero", [{"step": 0, "eval/pass@1": 0.1}] + [
        {"step": i, "accuracy": 0.01 * i, "response_length": 10 + 2 * i, "reflection": 0.5 * (i > 15),
         "reward/format": 1.0, "reward/language": 1.0, "reward/total": 0.01 * i} for i in range(1, 31)])
    _write_metrics(run_dir / "04-reasoning-rl", [
        {"step": i, "accuracy": 0.2, "response_length": 40, "reflection": 0.1, "reward/format": 0.5 + 0.1 * i,
         "reward/language": 0.9, "reward/total": 0.3} for i in range(1, 7)])
    _write_metrics(run_dir / "10-student-rl", [
        {"step": i, "accuracy": 0.05 * i, "response_length": 20, "reward/format": 1.0, "reward/language": 1.0,
         "reward/total": 0.1} for i in range(1, 5)])


def test_rollout_table_compares_the_first_and_last_ten_steps(tmp_path):
    _stages(tmp_path)
    table = rollout_summary(tmp_path)
    lines = table.splitlines()
    assert lines[0].startswith("| RL stage | steps | window | accuracy % first → last (Δ) | length first → last (Δ) "
                               "| reflection % first → last (Δ) |")
    # R1-Zero: accuracy means 5.5 (steps 1-10) and 25.5 (21-30), lengths 21 and 61, reflection 0 and 50
    assert ("| R1-Zero | 30 | 10 | 5.5 → 25.5 (+20.0) | 21.0 → 61.0 (+40.0) | 0.0 → 50.0 (+50.0) "
            "| 100.0 → 100.0 (+0.0) |") in table
    # a stage shorter than two windows compares its halves: format 0.6-0.8 vs 0.9-1.1
    assert "| R1 s2 reasoning RL | 6 | 3 | 20.0 → 20.0 (+0.0) | 40.0 → 40.0 (+0.0) | 10.0 → 10.0 (+0.0) | " \
           "70.0 → 100.0 (+30.0) |" in table
    # metrics logged before reflection was measured: n/a, the rest still compared
    assert "| student RL only | 4 | 2 | 7.5 → 17.5 (+10.0) | 20.0 → 20.0 (+0.0) | n/a |" in table
    assert "R1 s4" not in table                                    # a stage without metrics has no row


def test_rl_curves_one_figure_per_quantity(tmp_path):
    _stages(tmp_path)
    written = rl_plots(tmp_path, tmp_path / "plots")
    assert {"rl_accuracy.png", "rl_response_length.png", "rl_reflection.png"} <= set(written)
    for name in written:
        assert (tmp_path / "plots" / name).stat().st_size > 1000, name


def test_main_table_has_the_eval_reflection_rate_per_model():
    K = 4
    records = [{"correct": c, "correct_lenient": c, "format": 1.0, "language": 1.0, "reflection": r, "length": 30,
                "cons": c > 2} for c, r in ((4, 1.0), (2, 0.5), (0, 0.0), (2, 0.5))]
    with_refl = {"arithmetic": _summary(records, K, False, 0.0)}
    without = {"arithmetic": _summary([{k: v for k, v in q.items() if k != "reflection"} for q in records],
                                      K, False, 0.0)}
    header, rows = table_rows([{"name": "R1-Zero", "stage": "02-r1-zero", "families": with_refl},
                               {"name": "base", "stage": "01-pretrain", "families": without}], {"02-r1-zero": 12.0})
    col = header.index("reflection %")
    assert header[col - 1] == "language %"
    assert rows[0][col][0] == "50.0" and rows[0][col][1].startswith("[")      # mean [95% interval]
    assert rows[1][col] == ("n/a", "")                                      # an eval without it
