"""The pipeline's report: one table of every model on the same held-out problems, plots, exported models.

Rows are models (base, R1-Zero, each R1 stage, the distilled and the RL-only student); columns are pass@1
and cons@K per task family with 95% intervals (nanoseek.eval: Wilson on the design's effective sample size
for pass@1, format and language rates, Wilson over problems for cons@K; accuracy counts only the answer in
<answer> tags), then pass@1 pooled over families (and its lenient last-number figure), format rate, language
consistency, reflection rate (samples whose reasoning checks or redoes a step) and mean response length pooled
over all families, and the wall time of the stage that produced the model. The same table goes to the screen
(rich) and to run_dir/report.md, followed by plain-language verdicts on the two questions the R1 report asks
of this pipeline: is R1 at least as accurate as R1-Zero and more readable, and does distillation beat RL on
the small model; then each RL stage's rollouts, first 10 steps vs last 10.

Plots (run_dir/plots/): reward, accuracy, response length, reflection rate and language consistency over RL
steps for R1-Zero, R1 (stage 2, then stage 4 after the rejection-sampling SFT) and the RL-only student; and the
expert load per MoE layer over pretraining (MaxVio per layer per step, from metrics.jsonl) next to the
final per-expert load share (measured on held-out batches after pretraining).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from nanoseek.data import PackedDataset
from nanoseek.eval import mean_ci, rate_ci
from nanoseek.files import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, link_tree, read_jsonl
from nanoseek.hf import load_pretrained
from nanoseek.model import expert_loads, moe_layers
from nanoseek.r1.coldstart import describe as coldstart_describe
from nanoseek.r1.rejection import describe as rejection_describe

EXPORTS = {"base": "01-pretrain", "r1-zero": "02-r1-zero", "r1": "07-all-rl",
           "student-distilled": "09-distill", "student-rl": "10-student-rl"}


# ---------------------------------------------------------------- expert loads after pretraining

@torch.no_grad()
def record_expert_loads(final: str | Path, run_dir: str | Path, pretrain_cfg, batches: int = 4, device="cpu") -> None:
    """Per-expert token counts [L_moe, E] of the base on held-out corpus batches -> run_dir/expert_loads.json
    (rows: the MoE decoder layers, then the MTP modules' MoE layers, as in metrics.jsonl's "maxvio")."""
    model = load_pretrained(final, device=str(device))
    layers = moe_layers(model)
    val_dir = Path(run_dir) / "data" / "val"
    if not layers or not val_dir.is_dir():
        return
    for m in layers:
        m.gate.expert_load.zero_()
    model.train()                         # MoE layers count expert loads in training-mode forwards only
    val = PackedDataset(val_dir, pretrain_cfg.train.seq_len, 8, shuffle=False)
    for _ in range(batches):
        x, y = val.next_batch()
        model(x.to(device), labels=y.to(device))      # with labels, so the MTP module routes its tokens too
    atomic_write_json(Path(run_dir) / "expert_loads.json",
                      {"layers": moe_layer_names(model.config, len(layers)), "loads": expert_loads(model).cpu().tolist()})


def moe_layer_names(cfg, n: int) -> list[str]:
    """Names of the n rows of expert_loads / maxvio: decoder layer indices, then "MTP k"."""
    first, L = cfg.first_k_dense_replace, cfg.num_hidden_layers
    return [str(i) for i in range(first, L)] + [f"MTP {k}" for k in range(n - (L - first))]


# ---------------------------------------------------------------- table

def _pool(results: dict, key: str):
    """The 95% interval of a per-problem quantity over all families (None when the eval did not record it):
    `rate_ci` for rates of the K samples (format, language, reflection), Student-t `mean_ci` for lengths."""
    values = [q[key] for r in results.values() for q in r["per_problem"] if key in q]
    if not values:
        return None
    return mean_ci(values) if key == "length" else rate_ci(values, next(iter(results.values()))["samples"])


def _pass1_pooled(results: dict, key: str = "correct"):
    """pass@1 over all families with `rate_ci`; key "correct_lenient": the lenient (last-number) figure."""
    values = [q[key] / r["samples"] for r in results.values() for q in r["per_problem"] if key in q]
    return rate_ci(values, next(iter(results.values()))["samples"]) if values else None


def _cell(stat, percent: bool = True) -> tuple[str, str]:
    """(mean, "[lo, hi]") of a statistic, in % or as is; ("n/a", "") when it was not measured."""
    if stat is None:
        return "n/a", ""
    f = 100 if percent else 1
    ci = f"[{f * stat['lo']:.0f}, {f * stat['hi']:.0f}]" if stat["n"] >= 2 else ""
    return f"{f * stat['mean']:.1f}" if percent else f"{stat['mean']:.0f}", ci


def table_rows(evals: list[dict], walls: dict[str, float]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """(header, rows of (mean, interval) cells) of the main table, from the eval JSONs (one per model)."""
    families = list(evals[0]["families"])
    K = next(iter(evals[0]["families"].values()))["samples"]
    header = (["model"] + [f"pass@1 {f}" for f in families] + [f"cons@{K} {f}" for f in families]
              + ["pass@1 all", "lenient all", "format %", "language %", "reflection %", "length", "wall s"])
    rows = []
    for e in evals:
        res = e["families"]
        rows.append([(e["name"], "")] + [_cell(res[f]["pass@1"]) for f in families]
                    + [_cell(res[f][f"cons@{K}"]) for f in families]
                    + [_cell(_pass1_pooled(res)), _cell(_pass1_pooled(res, "correct_lenient")),
                       _cell(_pool(res, "format")), _cell(_pool(res, "language")), _cell(_pool(res, "reflection")),
                       (_cell(_pool(res, "length"), percent=False)[0], ""), (f"{walls.get(e['stage'], 0):.0f}", "")])
    return header, rows


def markdown(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{m} {ci}".strip() for m, ci in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _verdicts(evals: dict[str, dict], outputs: dict) -> list[str]:
    """Plain sentences on R1 vs R1-Zero and on distillation vs RL on the student."""
    out = []

    def summary(stage):
        res = evals[stage]["families"]
        return _pass1_pooled(res), _pool(res, "format"), _pool(res, "language")

    def pct(stat) -> str:
        return f"{100 * stat['mean']:.1f}%"

    def compare(a, b) -> str:
        if a["lo"] > b["hi"]:
            return "higher, 95% intervals apart"
        if a["hi"] < b["lo"]:
            return "lower, 95% intervals apart"
        word = "higher" if a["mean"] > b["mean"] else "lower" if a["mean"] < b["mean"] else "equal"
        return f"{word}; the 95% intervals overlap"

    if "07-all-rl" in evals and "02-r1-zero" in evals:
        (a, fa, la), (b, fb, lb) = summary("07-all-rl"), summary("02-r1-zero")
        accurate = ("more accurate than R1-Zero" if a["lo"] > b["hi"] else "LESS accurate than R1-Zero"
                    if a["hi"] < b["lo"] else "as accurate as R1-Zero within the 95% intervals")
        readable = fa["mean"] >= fb["mean"] and (la is None or lb is None or la["mean"] >= lb["mean"])
        out.append(f"- **R1 vs R1-Zero**: pass@1 {pct(a)} vs {pct(b)} ({compare(a, b)}); format {pct(fa)} vs {pct(fb)}"
                   + (f"; language consistency {pct(la)} vs {pct(lb)}" if la and lb else "")
                   + f". R1 is {accurate}, and {'at least as' if readable else 'NOT more'} readable.")
    if "09-distill" in evals and "10-student-rl" in evals:
        (a, _, _), (b, _, _), (t, _, _) = summary("09-distill"), summary("10-student-rl"), summary("07-all-rl")
        stats = outputs.get("09-distill", {}).get("stats", {})
        if a["lo"] > b["hi"]:
            verdict = "Distillation beat RL on the same student, as the R1 report (§4.1) found."
        elif a["mean"] > b["mean"]:
            verdict = ("Distillation scored higher, as in the R1 report (§4.1), but the 95% intervals overlap: "
                       "at this sample size the win is not significant.")
        else:
            verdict = (f"Distillation did NOT beat RL on the student here. The teacher (R1) itself scores {pct(t)} and "
                       f"gave {stats.get('kept', 0)} correct traces"
                       + (f" (topped up with {stats['worked_fallback']} worked solutions)" if stats.get("worked_fallback") else "")
                       + "; with a teacher this weak and this few traces there is little to imitate, while RL "
                       "rewards the student on the evaluated tasks directly.")
        out.append(f"- **Distillation vs RL on the student**: pass@1 {pct(a)} vs {pct(b)} ({compare(a, b)}). {verdict}")
    return out


RL_STAGES = {"02-r1-zero": "R1-Zero", "04-reasoning-rl": "R1 s2 reasoning RL", "07-all-rl": "R1 s4 all-scenario RL",
             "10-student-rl": "student RL only"}


def rollout_summary(run_dir: Path, window: int = 10) -> str:
    """Markdown: each RL stage's rollout accuracy, response length, reflection rate, format and language as the
    mean of its first vs its last `window` steps and the difference (last - first), the at-a-glance test of
    whether RL learned (the R1-Zero target: accuracy's last 10 steps at least 15 points above its first 10).
    A stage shorter than two windows compares its first and last halves ("window" column)."""
    keys = [("accuracy", "accuracy %", 100), ("response_length", "length", 1), ("reflection", "reflection %", 100),
            ("reward/format", "format %", 100), ("reward/language", "language %", 100)]
    lines = ["| RL stage | steps | window | " + " | ".join(f"{label} first → last (Δ)" for _, label, _ in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for stage, name in RL_STAGES.items():
        path = run_dir / stage / "metrics.jsonl"
        recs = [r for r in read_jsonl(path) if "accuracy" in r] if path.is_file() else []
        if not recs:
            continue
        w = min(window, max(len(recs) // 2, 1))

        def cell(key: str, scale: float) -> str:
            head, tail = ([scale * r[key] for r in rs if isinstance(r.get(key), (int, float))]
                          for rs in (recs[:w], recs[-w:]))
            if not head or not tail:
                return "n/a"
            a, b = sum(head) / len(head), sum(tail) / len(tail)
            return f"{a:.1f} → {b:.1f} ({b - a:+.1f})"
        lines.append(f"| {name} | {len(recs)} | {w} | " + " | ".join(cell(k, f) for k, _, f in keys) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _smooth(y, window: int = 5):
    """Trailing mean over up to `window` steps (the first points average what exists)."""
    import numpy as np

    c = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    return (c[idx] - c[np.maximum(idx - window, 0)]) / np.minimum(idx, window)


def rl_plots(run_dir: Path, plots: Path) -> list[str]:
    """reward / accuracy / response length / reflection / language over RL steps, one figure per quantity with a
    line per RL stage: R1-Zero, R1 (stage 2 → 4), RL-only student."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def series(stage: str, key: str, offset: int = 0):
        path = run_dir / stage / "metrics.jsonl"
        if not path.is_file():
            return []
        return [(r["step"] + offset, r[key]) for r in read_jsonl(path) if isinstance(r.get(key), (int, float))]

    stage2_steps = max((s for s, _ in series("04-reasoning-rl", "reward/total")), default=0)
    written = []
    for key, title, name in (("reward/total", "reward", "rl_reward.png"),
                             ("accuracy", "accuracy (rollouts)", "rl_accuracy.png"),
                             ("response_length", "response length (tokens)", "rl_response_length.png"),
             ("reflection", "reflection rate (rollouts that check or redo a step)", "rl_reflection.png"),
                             ("reward/language", "language consistency", "rl_language.png")):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for label, stage, offset in (("R1-Zero", "02-r1-zero", 0), ("R1 stage 2", "04-reasoning-rl", 0),
                                     ("R1 stage 4", "07-all-rl", stage2_steps),
                                     ("student, RL only", "10-student-rl", 0)):
            pts = series(stage, key, offset)
            if pts:
                x, y = map(np.asarray, zip(*pts))
                line, = ax.plot(x, _smooth(y), label=label, linestyle="--" if "student" in label else "-")
                ax.plot(x, y, color=line.get_color(), alpha=0.2, linewidth=0.8)
        if stage2_steps:
            ax.axvline(stage2_steps, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("RL step (R1 stage 4 follows stage 2, after the rejection SFT)")
        ax.set_title(f"{title} (faint: per step, bold: 5-step mean)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        _save(fig, plots / name)
        written.append(name)
    return written


def expert_load_plot(run_dir: Path, plots: Path) -> list[str]:
    """Heatmaps: MaxVio per MoE layer over pretraining steps, and the final load share per expert."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pre = run_dir / "01-pretrain"
    records = [r for r in read_jsonl(pre / "metrics.jsonl") if isinstance(r.get("maxvio"), list)] \
        if (pre / "metrics.jsonl").is_file() else []
    loads = json.loads((pre / "expert_loads.json").read_text()) if (pre / "expert_loads.json").is_file() else None
    if not records and not loads:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    names = loads["layers"] if loads else None
    if records:
        mv = np.array([r["maxvio"] for r in records]).T                      # [L_moe, steps]
        im = axes[0].imshow(mv, aspect="auto", cmap="magma", interpolation="nearest",
                            extent=[records[0]["step"] - 0.5, records[-1]["step"] + 0.5, mv.shape[0] - 0.5, -0.5])
        fig.colorbar(im, ax=axes[0], label="MaxVio = (max - mean) / mean load")
        axes[0].set_yticks(range(mv.shape[0]), names if names and len(names) == mv.shape[0] else range(mv.shape[0]))
        axes[0].set_xlabel("pretraining step")
        axes[0].set_ylabel("MoE layer")
        axes[0].set_title("load imbalance per layer over pretraining")
    if loads:
        share = np.array(loads["loads"])
        share = share / share.sum(1, keepdims=True).clip(min=1)
        im = axes[1].imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=axes[1], label="token share")
        axes[1].set_yticks(range(len(names)), names)
        axes[1].set_xlabel("expert")
        axes[1].set_ylabel("MoE layer")
        axes[1].set_title("expert load after pretraining (held-out)")
    _save(fig, plots / "expert_load.png")
    return ["expert_load.png"]


# ---------------------------------------------------------------- report + export

def export_models(pipeline) -> dict[str, str]:
    """Copy the final models (HF format + tokenizer) to run_dir/export/<name>/."""
    out = {}
    for name, stage in EXPORTS.items():
        src = Path(pipeline.outputs[stage]["final"])
        dst = pipeline.run_dir / "export" / name
        if not dst.is_dir():
            with atomic_dir(dst) as tmp:
                link_tree(src, tmp)
        out[name] = str(dst)
    return out


def write_report(pipeline, console=None) -> dict:
    """Table (screen + report.md), verdicts, plots, exports. Returns {"table": rows, "report": path, ...}."""
    from rich.table import Table

    run_dir = pipeline.run_dir
    evals = {stage: json.loads(Path(p).read_text()) for stage, p in pipeline.outputs["11-eval"].items()}
    header, rows = table_rows(list(evals.values()), pipeline.walls)
    verdicts = _verdicts(evals, pipeline.outputs)
    plots = run_dir / "plots"
    plot_files = rl_plots(run_dir, plots) + expert_load_plot(run_dir, plots)
    exports = export_models(pipeline) if pipeline.cfg.export else {}

    any_eval = next(iter(evals.values()))["families"]
    fam = next(iter(any_eval.values()))
    elapsed = run_dir / "elapsed.json"          # stages overlap when workers > 1: the run's own clock
    total = json.loads(elapsed.read_text())["wall_s"] if elapsed.is_file() else sum(pipeline.walls.values())
    eval_wall = sum(e.get("wall_s", 0.0) for e in evals.values())
    o = pipeline.outputs
    rej = o["05-rejection"]["stats"]
    rm = o["06-reward-model"]["heldout"]
    lines = [f"# nanoseek pipeline report ({pipeline.cfg.preset})", "",
             f"Every model on the same {fam['n_problems']} held-out TEST problems per family, "
             f"{fam['samples']} samples each (temperature {pipeline.cfg.eval.sampling.temperature}, top-p {pipeline.cfg.eval.sampling.top_p}); "
             "pass@1 = mean correctness over the samples, cons@K = majority vote over verifier-equivalent answers; "
             "a sample is correct only with its final answer in <answer> tags (lenient: else its last number). "
             "Cells are mean [95% interval] in %: Wilson on the effective sample size n_eff = nK / design effect "
             "for rates of the K samples, Wilson over problems for cons@K (nanoseek.eval).", "",
             markdown(header, rows), "## Verdicts", "", *verdicts, "",
             "## RL rollouts (mean of the first vs the last 10 steps, Δ = last - first; %, length in tokens)", "",
             rollout_summary(run_dir),
             "Rising accuracy (R1-Zero's target: Δ ≥ +15 points) with growing length and reflection is RL teaching "
             "the model to reason; a flat curve is explained per step in each stage's plots/ (README: RL metrics).", "",
             "Stage-4 rollouts include the general prompts, scored by the reward model and never counted as accurate.", "",
             "## Stages", "", "| stage | wall s | CPU s |", "|---|---|---|",
             *[f"| {name} | {w:.0f} | {pipeline.cpus.get(name, 0):.0f} |" for name, w in sorted(pipeline.walls.items())],
             f"| evaluations (one per model) | {eval_wall:.0f} | |",
             f"| **pipeline (wall clock)** | **{total:.0f}** | **{sum(pipeline.cpus.values()):.0f}** |", "",
             (f"{pipeline.cfg.workers} workers: stages whose inputs are ready run at once, so the wall clock is below "
              "the sum of the stages. " if pipeline.cfg.workers > 1 else "")
             + "CPU s is the process CPU time over all threads.", "",
             "## Data at our scale", "",
             f"- Cold start: {coldstart_describe(o['03-coldstart']['stats'])} (R1: thousands of curated long-CoT examples).",
             f"- Rejection sampling: {rejection_describe(rej)}; SFT from "
             + ("the base" if pipeline.cfg.stage3_init == "base" else "stage 2's model")
             + f" for {pipeline.cfg.rejection.epochs:g} epochs (R1: ~600K reasoning + ~200K general samples, 2 epochs, "
             "from the base).",
             f"- Reward model: held-out pairwise accuracy {100 * rm['accuracy']:.1f}% on {rm['n']} pairs ("
             + ", ".join(f"{k} {100 * v:.0f}%" for k, v in rm["by_kind"].items()) + ").",
             f"- Distillation: {_distill_line(o['09-distill']['stats'])} (R1: the 800K samples above).", "",
             "## Plots", "", *[f"![{p}](plots/{p})" for p in plot_files], ""]
    if exports:
        lines += ["## Exported models (HF format, with tokenizer)", "",
                  *[f"- `{name}`: export/{name}/" for name in exports], ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))

    table = Table(title=f"nanoseek pipeline: {fam['n_problems']} test problems per family, K={fam['samples']}")
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*(f"{m}\n{ci}" if ci else m for m, ci in r))
    if console is not None:
        console.print(table)
        for v in verdicts:
            console.print(v.replace("**", ""))
        console.print(f"total wall time {total:.0f} s; report: {run_dir / 'report.md'}")
    return {"header": header, "rows": [[f"{m} {ci}".strip() for m, ci in r] for r in rows], "report": str(run_dir / "report.md"), "plots": plot_files,
            "exports": exports, "wall_s": total}


def _distill_line(stats: dict) -> str:
    fallback = stats.get("worked_fallback", 0)
    return (f"{stats['kept']} correct teacher traces"
            + (f" + {fallback} worked solutions (the teacher solved too few prompts)" if fallback else ""))
