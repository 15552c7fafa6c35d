"""`nanoseek pipeline`: the DeepSeek-R1 story end to end, stage by stage, resumable — the project's main job.

    00-tokenizer      byte-level BPE on the task corpus, and the corpus's packed shards
    01-pretrain       the DeepSeek-V3 base (MLA + MoE + MTP, aux-free balancing; expert loads recorded)
    02-r1-zero        GRPO from the base, accuracy + format rewards, R1-Zero template        (R1 §2.2)
    03-coldstart      stage 1: readable long-CoT data (worked solutions + clean R1-Zero outputs), SFT from base
    04-reasoning-rl   stage 2: GRPO with accuracy + format + language consistency             (R1 §2.3.2)
    05-rejection      stage 3: K samples/prompt from stage 2, filter, dedupe, + general data, SFT from BASE
    06-reward-model   Bradley-Terry reward model on generated preference pairs, from the cold-start SFT model
    07-all-rl         stage 4: GRPO, rule rewards on reasoning prompts, the reward model on general ones
    08-student-base   a Llama/Qwen2-style dense student pretrained (cheaply) on the same corpus
    09-distill        the student fine-tuned on the final teacher's correct traces              (R1 §2.4)
    10-student-rl     control: the same student trained by GRPO directly, as R1-Zero was
    11-eval           every model on the SAME held-out TEST problems (all families in one sampling pass):
                      pass@1 / cons@K per family with 95% intervals
    report            report.md + the table on screen, plots/, export/<name>/ (HF format)

Every stage writes into run_dir/<stage>/ and, when complete, an atomic `done.json` with its outputs and wall
time. Re-running the same command skips finished stages and continues an unfinished one from its newest
checkpoint (the trainers resume; data files are reused); the resolved config must be the one the run
started with. The embedded default (the dataclass defaults below) is the tiny CPU recipe, sized to finish
in 15-20 minutes on 2 cores; `--preset small` reads recipes/pipeline_small.toml (one H100).

Stages form a graph, not a line: the student lane (08, 10) needs only the tokenizer, and each model can be
evaluated as soon as it exists. With `workers = 2` (the default) a scheduler runs every job whose inputs are
ready, two at a time, each in its own process with `threads` torch threads. The teacher's pretraining, which
scales over cores, runs alone on all of them, as does any stage with no other stage beside it; meanwhile the
student lane and most evaluations hide behind the teacher's chain. `workers = 1` runs the stages one after
another in this process. On a GPU the stages barely need CPU threads: recipes/pipeline_small.toml gives each 4,
because torch's default (one per core in each of 2-3 processes) oversubscribes the host and the GPU stages then
wait on their own Python (benchmarks/RESULTS.md: stage start-up 30-55 s → 8-16 s on an H200).

`nanoseek coldstart` and `nanoseek rejection` run stages 1 and 3 alone, on user data and checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.config import DenseConfig
from nanoseek.distill import DistillConfig
from nanoseek.errors import UserError
from nanoseek.files import atomic_write_json, atomic_write_text, check_output_location, mark_ours
from nanoseek.r1.coldstart import ColdStartConfig, ColdStartDataConfig
from nanoseek.r1.rejection import RejectionConfig, TraceConfig
from nanoseek.recipe import from_dict, load_recipe, to_toml
from nanoseek.rl.reward_model import RewardModelConfig, RMDataConfig, RMTrainConfig
from nanoseek.rl.rewards import RewardConfig
from nanoseek.rl.rollout import SamplingConfig
from nanoseek.rl.trainer import RLConfig, RLEvalConfig, RLTrainConfig, TaskConfig
from nanoseek.train.commands import PretrainConfig
from nanoseek.train.optim import OptimConfig
from nanoseek.train.trainer import CheckpointConfig, EvalConfig, TrainConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PRESETS = ("tiny", "small")


# ---------------------------------------------------------------- configuration (defaults = the tiny CPU run)

def _rl(steps: int, template: str, language: float = 0.0, **train) -> RLConfig:
    # recipes/r1_zero_tiny.toml's settings: lr 1e-4 (3e-4 lost accuracy on the tiny base), the second half decaying
    return RLConfig(train=RLTrainConfig(steps=steps, prompts=8, **train),
                    optim=OptimConfig(lr=1e-4, warmup_steps=5, decay_frac=0.5, min_lr_ratio=0.1, weight_decay=0.0),
                    tasks=TaskConfig(template=template),
                    sampling=SamplingConfig(max_new_tokens=128, temperature=1.0),
                    rewards=RewardConfig(language=language),
                    eval=RLEvalConfig(every=0, problems=0, at_start=False),
                    checkpoint=CheckpointConfig(every=10, keep_last=1))


def _base() -> PretrainConfig:
    """The teacher's pretraining: recipes/tiny.toml, shortened to 800 steps so that the whole story fits in
    20 minutes on 2 cores at the slow end of their speed (evaluation is the pipeline's own, at the end)."""
    return load_recipe(PretrainConfig, RECIPES / "tiny.toml",
                       ["train.steps=800", "eval.problems=0", "checkpoint.keep_last=1"])


def _pretrain(steps: int) -> PretrainConfig:
    # batch 8 x 256 tokens: at equal tokens, twice the updates of the trainer's default 16 reach a lower loss
    return PretrainConfig(train=TrainConfig(steps=steps, batch_size=8, seq_len=256),
                          eval=EvalConfig(every=0, val_batches=2, problems=0),
                          checkpoint=CheckpointConfig(every=100, keep_last=1))


@dataclass
class StudentConfig:
    model: dict = field(default_factory=lambda: {"model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 4,
                                                 "num_attention_heads": 4, "num_key_value_heads": 2,
                                                 "intermediate_size": 384})  # DenseConfig fields; vocab = the base's
    pretrain: PretrainConfig = field(default_factory=lambda: _pretrain(400))


@dataclass
class AllScenarioConfig:
    rl: RLConfig = field(default_factory=lambda: _rl(16, "chat", language=0.3))
    harmful_share: float = 0.25       # share of general prompts that are harmful requests


@dataclass
class PipelineEvalConfig:
    problems: int = 24                # held-out TEST problems per task family (the same for every model)
    samples: int = 4                  # K: pass@1 is the mean over K samples, cons@K their majority vote
    max_new_tokens: int = 160
    temperature: float = 0.6          # R1 report's evaluation sampling
    top_p: float = 0.95
    batch_size: int = 128
    seed: int = 1234


@dataclass
class PipelineConfig:
    preset: str = "tiny"              # informational: which recipe this is
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "countdown", "linear"])  # set in every stage
    difficulty: int | dict | None = 2  # task level of the corpus, RL, sampling and evaluation in every stage (None =
                                      # each family's default mix); 2: a few-minute CPU base is sometimes right
    device: str = "auto"              # set in every stage
    threads: int = 1                  # torch CPU threads in every stage (0 = torch's default): these tiny models gain
                                      # little from intra-op threads; two 1-thread stages at once do twice the work
    workers: int = 2                  # stages (and per-model evaluations) run at once, each in its own process, as
                                      # their inputs are ready; 1 = one after another in this process
    keep_checkpoints: bool = False    # keep a finished stage's checkpoints/ (only an interrupted stage resumes from
                                      # them; its final/ model stays): the small teacher's are ~11 GB each
    pretrain: PretrainConfig = field(default_factory=_base)
    r1_zero: RLConfig = field(default_factory=lambda: _rl(24, "r1_zero"))
    coldstart: ColdStartConfig = field(default_factory=lambda: ColdStartConfig(
        data=ColdStartDataConfig(examples=1500, r1_zero_traces=TraceConfig(prompts=128, samples=2, template="r1_zero",
                                                                             per_prompt=1, seed=1))))
    use_r1_zero_outputs: bool = True  # cold start also takes R1-Zero's correct, readable outputs
    reasoning_rl: RLConfig = field(default_factory=lambda: _rl(20, "chat", language=0.3))
    rejection: RejectionConfig = field(default_factory=lambda: RejectionConfig(
        traces=TraceConfig(prompts=512, samples=2, min_kept=512, seed=2)))
    reward_model: RewardModelConfig = field(default_factory=lambda: RewardModelConfig(
        data=RMDataConfig(pairs=800), train=RMTrainConfig(steps=60)))
    all_rl: AllScenarioConfig = field(default_factory=AllScenarioConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(traces=TraceConfig(prompts=512, samples=2, min_kept=512, seed=3)))
    student_rl: RLConfig = field(default_factory=lambda: _rl(24, "r1_zero"))
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    export: bool = True               # copy the final models to run_dir/export/<name>/ (HF format)


def load_pipeline_config(preset: str = "tiny", recipe: str | None = None, sets: list[str] | None = None) -> PipelineConfig:
    """Defaults (tiny) ← recipes/pipeline_<preset>.toml when it exists ← --recipe ← --set."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    base = PipelineConfig()
    preset_file = RECIPES / f"pipeline_{preset}.toml"
    if preset_file.is_file():
        base = load_recipe(PipelineConfig, preset_file)
    elif preset != "tiny":
        raise UserError(f"preset {preset!r} needs {preset_file}, which this checkout lacks")
    return load_recipe(PipelineConfig, recipe, sets, base=base)


def _stage_globals(cfg: PipelineConfig) -> PipelineConfig:
    """Push the top-level tasks / difficulty / device / threads into every stage's own config."""
    def train(tc, **extra):
        return dataclasses.replace(tc, device=cfg.device, threads=cfg.threads, **extra)

    def ck(c: CheckpointConfig) -> CheckpointConfig:   # no optimizer state after the last step: done.json says done
        return c if cfg.keep_checkpoints else dataclasses.replace(c, final=False)

    def rl(rc: RLConfig, extra_tasks: tuple = ()) -> RLConfig:
        return dataclasses.replace(rc, train=train(rc.train), checkpoint=ck(rc.checkpoint), tasks=dataclasses.replace(
            rc.tasks, names=cfg.tasks + list(extra_tasks), difficulty=cfg.difficulty))

    def traces(tc: TraceConfig) -> TraceConfig:
        return dataclasses.replace(tc, tasks=list(cfg.tasks), difficulty=cfg.difficulty)

    def sft(sc):
        return dataclasses.replace(sc, train=train(sc.train), checkpoint=ck(sc.checkpoint))

    def corpus(cc):   # the corpus practises the level everything else uses
        level = cfg.difficulty if cfg.difficulty is None or isinstance(cfg.difficulty, dict) else \
            {f: cfg.difficulty for f in cfg.tasks}
        level = level if level is not None else cc.difficulty
        return dataclasses.replace(cc, families=list(cfg.tasks), difficulty=level)

    pre = cfg.pretrain
    return dataclasses.replace(
        cfg,
        pretrain=dataclasses.replace(pre, train=train(pre.train), checkpoint=ck(pre.checkpoint),
                                     data=dataclasses.replace(pre.data, corpus=corpus(pre.data.corpus))),
        r1_zero=rl(cfg.r1_zero),
        coldstart=dataclasses.replace(cfg.coldstart, sft=sft(cfg.coldstart.sft), data=dataclasses.replace(
            cfg.coldstart.data, tasks=list(cfg.tasks), difficulty=cfg.difficulty,
            r1_zero_traces=traces(cfg.coldstart.data.r1_zero_traces))),
        reasoning_rl=rl(cfg.reasoning_rl),
        rejection=dataclasses.replace(cfg.rejection, sft=sft(cfg.rejection.sft), traces=traces(cfg.rejection.traces)),
        reward_model=dataclasses.replace(cfg.reward_model, train=train(cfg.reward_model.train)),
        all_rl=dataclasses.replace(cfg.all_rl, rl=rl(cfg.all_rl.rl, ("general",))),
        student=dataclasses.replace(cfg.student, pretrain=dataclasses.replace(
            cfg.student.pretrain, train=train(cfg.student.pretrain.train), checkpoint=ck(cfg.student.pretrain.checkpoint),
            data=dataclasses.replace(cfg.student.pretrain.data, corpus=corpus(cfg.student.pretrain.data.corpus)))),
        distill=dataclasses.replace(cfg.distill, sft=sft(cfg.distill.sft), traces=traces(cfg.distill.traces)),
        student_rl=rl(cfg.student_rl),
    )


# ---------------------------------------------------------------- stage runner

@dataclass
class Stage:
    name: str                         # directory under the run: "01-pretrain"
    title: str                        # row label / progress text
    fn: str                           # Pipeline method running it: fn(stage_dir) -> outputs dict
    needs: tuple[str, ...] = ()       # stages whose outputs it reads (the scheduler runs it after them)
    rerun_on: str | None = None       # config section whose change makes a finished stage run again
    exclusive: bool = False           # runs alone on all the workers' threads (scales over cores; the rest do not)


# (row name, producing stage, prompt template) of every evaluated model, in table order
EVALUATED = [("base", "01-pretrain", "r1_zero"), ("R1-Zero", "02-r1-zero", "r1_zero"),
             ("R1 s1 cold start", "03-coldstart", "chat"), ("R1 s2 reasoning RL", "04-reasoning-rl", "chat"),
             ("R1 s3 rejection SFT", "05-rejection", "chat"), ("R1 (s4 all-scenario RL)", "07-all-rl", "chat"),
             ("student distilled", "09-distill", "chat"), ("student RL only", "10-student-rl", "r1_zero")]
MODEL_STAGES = tuple(stage for _, stage, _ in EVALUATED)
# In the order a free worker prefers them: the teacher's chain is the critical path, the student lane and the
# per-model evaluations fill the other worker meanwhile.
STAGES = [
    Stage("00-tokenizer", "tokenizer + shards", "tokenizer"),
    Stage("01-pretrain", "pretrain (base)", "pretrain", ("00-tokenizer",), exclusive=True),
    Stage("02-r1-zero", "R1-Zero", "r1_zero", ("01-pretrain",)),
    Stage("03-coldstart", "R1 stage 1: cold start", "coldstart", ("01-pretrain", "02-r1-zero")),
    Stage("04-reasoning-rl", "R1 stage 2: reasoning RL", "reasoning_rl", ("03-coldstart",)),
    Stage("05-rejection", "R1 stage 3: rejection sampling + SFT", "rejection", ("01-pretrain", "04-reasoning-rl")),
    Stage("06-reward-model", "reward model", "reward_model", ("03-coldstart",)),
    Stage("07-all-rl", "R1 stage 4: RL, all scenarios", "all_rl", ("05-rejection", "06-reward-model")),
    Stage("08-student-base", "student pretrain", "student_base", ("00-tokenizer",)),
    Stage("09-distill", "distilled student", "distill", ("07-all-rl", "08-student-base")),
    Stage("10-student-rl", "RL-only student", "student_rl", ("08-student-base",)),
    Stage("11-eval", "evaluation", "evaluate", MODEL_STAGES, rerun_on="eval"),
]
EVAL_DIR = "11-eval"


def _needed(stop_after: str) -> list[Stage]:
    """The stage named (without its number) and every stage it needs, in STAGES order."""
    by_name = {st.name: st for st in STAGES}
    want, todo = set(), [next(st.name for st in STAGES if st.name.split("-", 1)[1] == stop_after)]
    while todo:
        name = todo.pop()
        if name not in want:
            want.add(name)
            todo.extend(by_name[name].needs)
    return [st for st in STAGES if st.name in want]


def _last_step(stage_dir: Path) -> str:
    """'step N' of the newest metrics.jsonl under a stage directory ('' before the first step)."""
    files = sorted(stage_dir.glob("**/metrics.jsonl"), key=lambda f: f.stat().st_mtime)
    if not files:
        return ""
    with open(files[-1], "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 4096))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return f"{files[-1].parent.name}: step {json.loads(line)['step']}"
        except (ValueError, KeyError):
            continue
    return ""


def _job_process(cfg: PipelineConfig, run_dir: str, job: str, log: str, threads: int) -> None:
    """A worker process: run one job on `threads` torch threads with stdout and stderr in its log; exit 2 on bad
    input, 1 on a crash."""
    import os
    import sys
    import traceback

    from rich.console import Console

    with open(log, "a", buffering=1, encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        try:
            if threads:
                import torch
                torch.set_num_threads(threads)
            cfg = dataclasses.replace(cfg, threads=threads)                   # into the stage's own configs
            Pipeline(cfg, run_dir, progress=False, console=Console(file=f, width=120)).run_job(job)
        except UserError as e:
            print(f"error: {e}", flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)
        except BaseException:
            traceback.print_exc()
            sys.exit(1)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, run_dir: str | Path, progress: bool = True, console=None):
        from rich.console import Console

        self.raw_cfg = cfg                    # what worker processes rebuild the pipeline from
        self.cfg, self.run_dir, self.progress = _stage_globals(cfg), Path(run_dir), progress
        self.console = console or Console(stderr=True)
        self.outputs: dict[str, dict] = {}
        self.walls: dict[str, float] = {}     # stage -> wall seconds (all attempts)
        self.cpus: dict[str, float] = {}      # stage -> process CPU seconds (all threads, all attempts)

    def out(self, stage: str, key: str = "final") -> str:
        return self.outputs[stage][key]

    # -- running --------------------------------------------------------------------------------------
    def run(self, stop_after: str | None = None) -> dict:
        """Every stage (or, with stop_after, that stage and the ones it needs), then the report."""
        from nanoseek.train.commands import check_run_dir

        try:
            check_run_dir(self.run_dir, self.cfg, resume=True)    # a rerun must be the same run
        except UserError as e:
            raise UserError(str(e).replace("--resume: ", "this run directory was started with another config: ")) from None
        if self.cfg.workers < 1:
            raise UserError(f"workers={self.cfg.workers}: set workers >= 1 (1 runs the stages one after another)")
        if self.cfg.threads:
            import torch
            torch.set_num_threads(self.cfg.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
        stages = _needed(stop_after) if stop_after else STAGES
        elapsed_file = self.run_dir / "elapsed.json"          # wall time of all attempts (stages overlap)
        spent = json.loads(elapsed_file.read_text())["wall_s"] if elapsed_file.is_file() else 0.0
        t0 = time.perf_counter()
        try:
            if self.cfg.workers == 1:
                for stage in stages:
                    self.run_stage(stage)
            else:
                self._run_concurrently(stages)
        finally:
            atomic_write_json(elapsed_file, {"wall_s": spent + time.perf_counter() - t0})
        if stop_after:
            return self.outputs
        from nanoseek.report import write_report
        return write_report(self, console=self.console)

    def finished(self, stage: Stage) -> bool:
        """Load a stage's outputs from its done.json when it finished (with the current config of `rerun_on`)."""
        marker = self.run_dir / stage.name / "done.json"
        if not marker.is_file():
            return False
        done = json.loads(marker.read_text())
        if stage.rerun_on and done.get("config") != dataclasses.asdict(getattr(self.cfg, stage.rerun_on)):
            return False
        self.outputs[stage.name], self.walls[stage.name] = done["outputs"], done["wall_s"]
        self.cpus[stage.name] = done.get("cpu_s", 0.0)
        return True

    def run_stage(self, stage: Stage) -> dict:
        if self.finished(stage):
            self.console.print(f"[dim]{stage.name}: done earlier ({self.walls[stage.name]:.0f} s), skipped[/]")
            return self.outputs[stage.name]
        self.console.rule(f"[bold]{stage.name}[/] {stage.title}")
        d = mark_ours(self.run_dir / stage.name)     # ours: the stage's trainer may resume into it
        spent_file = d / "spent.json"          # time spent by earlier, interrupted attempts
        spent = json.loads(spent_file.read_text()) if spent_file.is_file() else {"wall_s": 0.0, "cpu_s": 0.0}
        t0, c0, started = time.perf_counter(), time.process_time(), time.time()

        def total() -> dict:   # this attempt plus earlier, interrupted ones; CPU time sums all threads
            return {"wall_s": spent["wall_s"] + time.perf_counter() - t0, "cpu_s": spent["cpu_s"] + time.process_time() - c0}
        try:
            outputs = getattr(self, stage.fn)(d)
        finally:
            atomic_write_json(spent_file, total())
        times = total()
        section = dataclasses.asdict(getattr(self.cfg, stage.rerun_on)) if stage.rerun_on else None
        atomic_write_json(d / "done.json", {"stage": stage.name, "outputs": outputs, **times, "config": section,
                                            "started": started, "ended": time.time(),
                                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        spent_file.unlink()                    # the marker holds the total now
        if not self.cfg.keep_checkpoints:
            for checkpoints in d.glob("**/checkpoints"):
                shutil.rmtree(checkpoints, ignore_errors=True)
        self.outputs[stage.name], self.walls[stage.name], self.cpus[stage.name] = outputs, times["wall_s"], times["cpu_s"]
        self.console.print(f"[green]{stage.name}[/] done in {times['wall_s']:.0f} s (CPU {times['cpu_s']:.0f} s)")
        return outputs

    def _run_concurrently(self, stages: list[Stage]) -> None:
        """Run up to `workers` jobs at once, each in a spawned process writing run_dir/<stage>/stage.log: the stages
        in STAGES order as their needs finish, and (when the evaluation is wanted) each model's evaluation as soon
        as the model exists, so the 11-eval stage at the end only collects. A job that fails stops the run (its
        log says why); an interrupt stops the workers. Every stage resumes as in the one-process mode."""
        import multiprocessing

        by_name = {st.name: st for st in stages}
        jobs = {st.name: st.needs for st in stages}
        if EVAL_DIR in by_name:
            jobs.update({f"eval:{m}": (m,) for m in MODEL_STAGES})
            jobs[EVAL_DIR] = (*by_name[EVAL_DIR].needs, *(f"eval:{m}" for m in MODEL_STAGES))
        done = {j for j in jobs if (self.finished(by_name[j]) if j in by_name else self._evaluated(j[5:]))}
        for j in sorted(done & set(by_name)):
            self.console.print(f"[dim]{j}: done earlier ({self.walls[j]:.0f} s), skipped[/]")
        spawn = multiprocessing.get_context("spawn")
        running: dict[str, tuple] = {}         # job -> (process, start time)

        def exclusive(job: str) -> bool:
            return job in by_name and by_name[job].exclusive

        try:
            with self._live() as show:
                while len(done) < len(jobs):
                    for job, (proc, t0) in list(running.items()):
                        if proc.is_alive():
                            continue
                        proc.join()
                        del running[job]
                        log = self._log(job)
                        if proc.exitcode == 2:                 # bad input: the job's one-line error
                            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
                            raise UserError(f"{job}: {tail[0].removeprefix('error: ') if tail else 'failed'} (log: {log})")
                        if proc.exitcode != 0:
                            raise RuntimeError(f"{job} stopped with exit code {proc.exitcode}; its log: {log}")
                        if job in by_name:
                            self.finished(by_name[job])
                        done.add(job)
                        self.console.print(f"[green]{job}[/] done in {time.time() - t0:.0f} s")
                    ready = [j for j in jobs if j not in done and j not in running and set(jobs[j]) <= done]
                    for job in ready:
                        alone = exclusive(job)
                        if len(running) >= self.cfg.workers or any(map(exclusive, running)) or (alone and running):
                            break                        # an exclusive job waits for the others, none start ahead
                        # a stage with no other stage beside it (running or ready) takes every worker's threads;
                        # the short evaluations that may join it later overlap for seconds
                        single = job in by_name and not any(j in by_name for j in [*running, *ready] if j != job)
                        threads = self.cfg.threads * (self.cfg.workers if alone or single else 1)
                        mark_ours(self._log(job).parent)
                        proc = spawn.Process(target=_job_process, args=(self.raw_cfg, str(self.run_dir), job,
                                                                         str(self._log(job)), threads), name=job)
                        proc.start()
                        running[job] = (proc, time.time())
                        self.console.print(f"[bold]{job}[/] started "
                                           f"({by_name[job].title if job in by_name else 'evaluation'}, "
                                           f"{threads} thread{'s' if threads > 1 else ''})")
                        if alone:
                            break
                    show(running)
                    time.sleep(0.2)
        finally:
            for proc, _ in running.values():   # interrupted or failed: stop the others (their files are atomic)
                proc.terminate()
            for proc, _ in running.values():
                proc.join(30)

    def _log(self, job: str) -> Path:
        return (self.run_dir / EVAL_DIR / f"{job[5:]}.log" if job.startswith("eval:")
                else self.run_dir / job / "stage.log")

    def _live(self):
        """show(running) refreshes one line per running job (its newest training step) while progress is on."""
        import contextlib

        from rich.live import Live
        from rich.table import Table

        def table(running: dict) -> Table:
            t = Table.grid(padding=(0, 2))
            for job, (_, t0) in running.items():
                t.add_row(f"[cyan]{job}[/]", f"{time.time() - t0:5.0f} s", "" if ":" in job else _last_step(self.run_dir / job))
            return t

        if not self.progress:
            return contextlib.nullcontext(lambda running: None)

        @contextlib.contextmanager
        def live():
            with Live(table({}), console=self.console, refresh_per_second=2, transient=True) as lv:
                yield lambda running: lv.update(table(running))
        return live()

    def run_job(self, job: str) -> None:
        """One scheduled job in this process: a stage, or "eval:<stage>" (that model's evaluation)."""
        for st in STAGES:
            if st.name != job:
                self.finished(st)              # the outputs of what finished before
        if job.startswith("eval:"):
            self.evaluate_model(job[5:])
        else:
            self.run_stage(next(st for st in STAGES if st.name == job))

    # -- stages -----------------------------------------------------------------------------------------
    def tokenizer(self, d: Path) -> dict:
        """The BPE tokenizer and the packed shards of the teacher's corpus, which the pretraining stages copy."""
        from nanoseek.data.corpus import prepare_corpus
        from nanoseek.tokenizer import Tokenizer
        from nanoseek.train.commands import corpus_tokenizer, resolve_model

        if (d / "tokenizer" / "tokenizer.json").is_file():            # an interrupted attempt got this far
            tok = Tokenizer.load(d / "tokenizer")
        else:
            tok = corpus_tokenizer(self.cfg.pretrain, resolve_model(self.cfg.pretrain.model).vocab_size, None)
            tok.save(d / "tokenizer")
        prepare_corpus(d / "data", self.cfg.pretrain.data.corpus, tok, progress=self.progress)
        return {"tokenizer": str(d / "tokenizer"), "vocab_size": len(tok), "data": str(d / "data")}

    def _with_tokenizer(self, pc: PretrainConfig) -> PretrainConfig:
        return dataclasses.replace(pc, data=dataclasses.replace(pc.data, tokenizer=self.out("00-tokenizer", "tokenizer")))

    def _shards(self, pc: PretrainConfig, run: Path) -> None:
        """Start a pretraining run with stage 0's shards when it reads the same corpus (prepare_corpus reuses them)."""
        from nanoseek.files import atomic_dir

        src = self.outputs["00-tokenizer"].get("data")
        if src and pc.data.corpus == self.cfg.pretrain.data.corpus and not (run / "data").exists():
            with atomic_dir(run / "data") as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)

    def pretrain(self, d: Path) -> dict:
        from nanoseek.report import record_expert_loads
        from nanoseek.train.commands import pretrain
        from nanoseek.train.trainer import resolve_device

        self._shards(self.cfg.pretrain, d)
        final = pretrain(self._with_tokenizer(self.cfg.pretrain), d, resume=True, progress=self.progress)
        record_expert_loads(final, d, self.cfg.pretrain, device=resolve_device(self.cfg.device))
        return {"final": str(final)}

    def _grpo(self, rc: RLConfig, init: str, d: Path) -> dict:
        from nanoseek.rl.trainer import train_rl

        rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, init=str(init)))
        train_rl(rc, d, algo="grpo", resume=True, progress=self.progress)
        return {"final": str(d / "final")}

    def r1_zero(self, d: Path) -> dict:
        return self._grpo(self.cfg.r1_zero, self.out("01-pretrain"), d)

    def coldstart(self, d: Path) -> dict:
        from nanoseek.r1.coldstart import coldstart

        cc = self.cfg.coldstart
        r1z = self.out("02-r1-zero") if self.cfg.use_r1_zero_outputs else None
        cc = dataclasses.replace(cc, init=self.out("01-pretrain"), data=dataclasses.replace(cc.data, r1_zero=r1z))
        return coldstart(cc, d, progress=self.progress)

    def reasoning_rl(self, d: Path) -> dict:
        return self._grpo(self.cfg.reasoning_rl, self.out("03-coldstart"), d)

    def rejection(self, d: Path) -> dict:
        from nanoseek.r1.rejection import rejection

        rc = dataclasses.replace(self.cfg.rejection, init=self.out("04-reasoning-rl"), base=self.out("01-pretrain"))
        return rejection(rc, d, progress=self.progress)

    def reward_model(self, d: Path) -> dict:
        from nanoseek.rl.reward_model import train_reward_model

        # from the cold-start SFT model (V3 builds its reward models from SFT checkpoints, §5.2.1): it knows the chat
        # format, and the reward model then trains beside stages 2-3 instead of after them
        rc = dataclasses.replace(self.cfg.reward_model, init=self.out("03-coldstart"))
        metrics = train_reward_model(rc, d, progress=self.progress)
        return {"final": str(d / "final"), "heldout": metrics["heldout"]}

    def all_rl(self, d: Path) -> dict:
        from nanoseek.r1.general import GeneralFamily, registered
        from nanoseek.rl.reward_model import load_reward_model
        from nanoseek.train.trainer import resolve_device

        rm, tok = load_reward_model(self.out("06-reward-model"), resolve_device(self.cfg.device))
        with registered(GeneralFamily(rm, tok, self.cfg.all_rl.harmful_share)):
            return self._grpo(self.cfg.all_rl.rl, self.out("05-rejection"), d)

    def student_base(self, d: Path) -> dict:
        """A random-init dense student (vocab and positions = the base's), pretrained on the same corpus."""
        import torch

        from nanoseek.hf import save_pretrained
        from nanoseek.model import build_model
        from nanoseek.tokenizer import Tokenizer
        from nanoseek.train.commands import pretrain, resolve_model

        tok_dir = self.out("00-tokenizer", "tokenizer")
        base_cfg = resolve_model(self.cfg.pretrain.model)
        init = d / "init"
        if not (init / "config.json").is_file():
            fields = {"vocab_size": base_cfg.vocab_size, "max_position_embeddings": base_cfg.max_position_embeddings,
                      **self.cfg.student.model}
            torch.manual_seed(self.cfg.student.pretrain.train.seed)
            model = build_model(from_dict(DenseConfig, fields, "student.model"))
            save_pretrained(model, init)
            Tokenizer.load(tok_dir).save(init / "tokenizer")
        pc = dataclasses.replace(self._with_tokenizer(self.cfg.student.pretrain), init=str(init))
        self._shards(pc, d / "run")
        return {"final": str(pretrain(pc, d / "run", resume=True, progress=self.progress))}

    def distill(self, d: Path) -> dict:
        from nanoseek.distill import distill

        dc = dataclasses.replace(self.cfg.distill, teacher=self.out("07-all-rl"), init=self.out("08-student-base"))
        return distill(dc, d, progress=self.progress)

    def student_rl(self, d: Path) -> dict:
        return self._grpo(self.cfg.student_rl, self.out("08-student-base"), d)

    def evaluate(self, d: Path) -> dict:
        """Each model on the same TEST problems, family by family; one JSON per model (resumable, and already
        written by the per-model jobs when stages run concurrently)."""
        return {stage: str(self.evaluate_model(stage)) for _, stage, _ in EVALUATED}

    def _eval_file(self, stage: str) -> Path:
        return self.run_dir / EVAL_DIR / f"{stage}.json"

    def _evaluated(self, stage: str) -> bool:
        """Whether `stage`'s model has an evaluation under the current eval config."""
        f = self._eval_file(stage)
        return f.is_file() and json.loads(f.read_text()).get("eval") == dataclasses.asdict(self.cfg.eval)

    def evaluate_model(self, stage: str) -> Path:
        from nanoseek.eval import EvalConfig as SamplingEval, evaluate, load_checkpoint
        from nanoseek.tasks import sample_problems
        from nanoseek.train.trainer import resolve_device

        file = self._eval_file(stage)
        if self._evaluated(stage):
            return file
        ec = self.cfg.eval
        name, _, template = next(row for row in EVALUATED if row[1] == stage)
        problems = [p for f in self.cfg.tasks
                    for p in sample_problems([f], ec.problems, split="test", seed=ec.seed, difficulty=self.cfg.difficulty)]
        t0 = time.perf_counter()
        model, tok = load_checkpoint(self.out(stage), resolve_device(self.cfg.device), inference=True)
        sc = SamplingEval(samples=ec.samples, temperature=ec.temperature, top_p=ec.top_p, greedy=False,
                          max_new_tokens=ec.max_new_tokens, template=template, batch_size=ec.batch_size, seed=ec.seed)
        with self.console.status(f"evaluating {name}"):
            per_family = evaluate(model, tok, problems, sc, by_family=True)
        atomic_write_json(file, {"name": name, "stage": stage, "path": self.out(stage), "template": template,
                                 "eval": dataclasses.asdict(ec), "families": per_family,
                                 "wall_s": time.perf_counter() - t0})
        self.console.print(f"  evaluated {name}")
        return file


# ---------------------------------------------------------------- CLI: pipeline | coldstart | rejection

def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    if command == "pipeline":
        parser.add_argument("--preset", default="tiny", choices=PRESETS,
                            help="tiny = the embedded CPU default; small = recipes/pipeline_small.toml (one H100)")
        parser.add_argument("--stop-after", default=None, choices=[st.name.split("-", 1)[1] for st in STAGES],
                            metavar="STAGE", help="run this stage and the stages it needs, then stop (e.g. pretrain, r1-zero)")
    elif command == "coldstart":
        parser.add_argument("--init", help="model to fine-tune (R1: the base)")
        parser.add_argument("--r1-zero", help="an R1-Zero model: add its correct, readable outputs to the data")
        parser.add_argument("--data", help="chat JSONL of long-CoT examples to use as is")
    else:
        parser.add_argument("--init", help="model to sample, e.g. a reasoning-RL run's final/")
        parser.add_argument("--base", help="also SFT this model on the result (R1: the base model)")
        parser.add_argument("--data", help="JSONL of problems to sample (default: generated TRAIN-split tasks)")
    parser.add_argument("--recipe", help="TOML recipe (overrides the defaults)")
    example = {"pipeline": "pretrain.train.steps=100", "coldstart": "data.examples=500"}.get(command, "traces.samples=8")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override one setting, e.g. --set {example} (repeatable)")
    parser.add_argument("--out", default=f"runs/{command}", help="run directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "pipeline":
        cfg = load_pipeline_config(args.preset, args.recipe, args.sets)
        Pipeline(cfg, args.out, progress=progress).run(stop_after=args.stop_after)
        return 0
    flags = {"coldstart": (("init", "init"), ("r1_zero", "data.r1_zero"), ("data", "data.path")),
             "rejection": (("init", "init"), ("base", "base"), ("data", "traces.data"))}[args.command]
    sets = args.sets + [f"{key}={json.dumps(getattr(args, arg))}" for arg, key in flags if getattr(args, arg)]
    check_output_location(args.out)
    if args.command == "coldstart":
        from nanoseek.r1.coldstart import coldstart, describe

        result = coldstart(load_recipe(ColdStartConfig, args.recipe, sets), args.out, progress)
        print(f"cold start: {describe(result['stats'])}\ndata: {result['data']}\nmodel: {result['final']}")
        return 0
    from nanoseek.r1.rejection import describe, rejection

    result = rejection(load_recipe(RejectionConfig, args.recipe, sets), args.out, progress)
    print(f"rejection sampling: {describe(result['stats'])}\ndata: {result['data']}"
          + (f"\nmodel: {result['final']}" if "final" in result else ""))
    return 0
