"""`nanoseek pipeline`: the DeepSeek-R1 story end to end, stage by stage, resumable — the project's main job.

    00-tokenizer      byte-level BPE on the task corpus, and the corpus's packed shards
    01-pretrain       the DeepSeek-V3 base (MLA + MoE + MTP, aux-free balancing; expert loads recorded)
    02-r1-zero        GRPO from the base, accuracy + format rewards, R1-Zero template        (R1 §2.2)
    03-coldstart      stage 1: readable long-CoT data (worked solutions + clean R1-Zero outputs), SFT from base
    04-reasoning-rl   stage 2: GRPO with accuracy + format + language consistency             (R1 §2.3.2)
    05-rejection      stage 3: K samples/prompt from stage 2, filter, dedupe, + general data, SFT (from stage 2's
                      model; R1 fine-tunes the base, `stage3_init = "base"`)
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
in 13-15 minutes on 2 cores; `--preset small` reads recipes/pipeline_small.toml (one GPU, ~9 minutes).

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

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

from nanoseek.config import DenseConfig
from nanoseek.data.corpus import prepare_corpus
from nanoseek.distill import distill
from nanoseek.errors import UserError
from nanoseek.eval import PassAtKConfig, evaluate
from nanoseek.files import atomic_dir, atomic_write_json, atomic_write_text, link_tree, mark_ours
from nanoseek.hf import load_checkpoint, save_pretrained
from nanoseek.model import build_model
from nanoseek.pipeline.config import PipelineConfig, RunEnv
from nanoseek.pipeline.scheduler import Job, JobFailed, Stage, last_step, needed, run_jobs
from nanoseek.r1.coldstart import coldstart
from nanoseek.r1.general import GeneralFamily, preference_pairs
from nanoseek.r1.rejection import rejection
from nanoseek.recipe import from_dict, to_toml
from nanoseek.report import record_expert_loads, write_report
from nanoseek.rl.reward_model import load_reward_model, reward_scorer, train_reward_model
from nanoseek.rl.trainer import RLConfig, train_rl
from nanoseek.run import check_run_dir, resolve_device
from nanoseek.tasks import sample_problems
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.runs import PretrainConfig, corpus_tokenizer, pretrain, resolve_model


# ---------------------------------------------------------------- the stage graph

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
            env = dataclasses.replace(RunEnv.of(cfg), threads=threads)       # this job's share of the threads
            Pipeline(cfg, run_dir, progress=False, console=Console(file=f, width=120), env=env).run_job(job)
        except UserError as e:
            print(f"error: {e}", flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)
        except BaseException:
            traceback.print_exc()
            sys.exit(1)


class Pipeline:
    """The R1 stage graph over one run directory. `cfg` is the user's config as loaded, never rewritten; `env`
    (by default `RunEnv.of(cfg)`) holds the run-wide settings, which each stage body applies to its own section."""

    def __init__(self, cfg: PipelineConfig, run_dir: str | Path, progress: bool = True, console=None,
                 env: RunEnv | None = None):
        from rich.console import Console

        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.env = env or RunEnv.of(cfg)
        self.console = console or Console(stderr=True)
        self.outputs: dict[str, dict] = {}
        self.walls: dict[str, float] = {}     # stage -> wall seconds (all attempts)
        self.cpus: dict[str, float] = {}      # stage -> process CPU seconds (all threads, all attempts)

    def out(self, stage: str, key: str = "final") -> str:
        return self.outputs[stage][key]

    # -- running --------------------------------------------------------------------------------------
    def run(self, stop_after: str | None = None) -> dict:
        """Every stage (or, with stop_after, that stage and the ones it needs), then the report."""
        resolved = self.env.resolve(self.cfg)                    # what the stages run: the config the run keeps
        try:
            check_run_dir(self.run_dir, resolved, resume=True)    # a rerun must be the same run
        except UserError as e:
            raise UserError(str(e).replace("--resume: ", "this run directory was started with another config: ")) from None
        if self.cfg.workers < 1:
            raise UserError(f"workers={self.cfg.workers}: set workers >= 1 (1 runs the stages one after another)")
        if self.env.threads:
            import torch
            torch.set_num_threads(self.env.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.toml", to_toml(resolved))
        graph = self.graph()
        stages = needed(graph, stop_after) if stop_after else graph
        elapsed_file = self.run_dir / "elapsed.json"          # wall time of all attempts (stages overlap)
        spent = json.loads(elapsed_file.read_text())["wall_s"] if elapsed_file.is_file() else 0.0
        t0 = time.perf_counter()
        try:
            if self.cfg.workers == 1:                          # in STAGES order, in this process
                run_jobs({st.name: Job(st.needs, run=functools.partial(self.run_stage, st)) for st in stages}, 1)
            else:
                self._run_concurrently(stages)
        finally:
            atomic_write_json(elapsed_file, {"wall_s": spent + time.perf_counter() - t0})
        if stop_after:
            return self.outputs
        return write_report(self, console=self.console)

    def graph(self) -> list[Stage]:
        """STAGES as this config runs them: cold start needs R1-Zero only when it takes R1-Zero's outputs (else
        the two run side by side)."""
        if self.cfg.use_r1_zero_outputs:
            return STAGES
        return [dataclasses.replace(st, needs=tuple(n for n in st.needs if n != "02-r1-zero"))
                if st.name == "03-coldstart" else st for st in STAGES]

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
        if not self.env.keep_checkpoints:
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
        by_name = {st.name: st for st in stages}
        needs = {st.name: st.needs for st in stages}
        if EVAL_DIR in by_name:
            needs.update({f"eval:{m}": (m,) for m in MODEL_STAGES})
            needs[EVAL_DIR] = (*by_name[EVAL_DIR].needs, *(f"eval:{m}" for m in MODEL_STAGES))
        # an evaluation is light: a stage with no other stage beside it (running or ready) takes every worker's
        # threads; the short evaluations that may join it later overlap for seconds
        jobs = {job: Job(needs[job], spawn=functools.partial(self._spawn, job), light=job not in by_name,
                         exclusive=job in by_name and by_name[job].exclusive) for job in needs}
        done = {j for j in jobs if (self.finished(by_name[j]) if j in by_name else self._evaluated(j[5:]))}
        for j in sorted(done & set(by_name)):
            self.console.print(f"[dim]{j}: done earlier ({self.walls[j]:.0f} s), skipped[/]")

        def started(job: str, share: int) -> None:
            threads = self._threads(share)
            self.console.print(f"[bold]{job}[/] started ({by_name[job].title if job in by_name else 'evaluation'}, "
                               f"{threads} thread{'s' if threads > 1 else ''})")

        def finished(job: str, seconds: float) -> None:
            if job in by_name:
                self.finished(by_name[job])
            self.console.print(f"[green]{job}[/] done in {seconds:.0f} s")

        try:
            with self._live() as show:
                run_jobs(jobs, self.cfg.workers, done, on_start=started, on_done=finished, show=show,
                         preload=(__name__,))
        except JobFailed as e:
            log = self._log(e.job)
            if e.exitcode == 2:                        # bad input: the job's one-line error
                tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
                why = tail[0].removeprefix("error: ") if tail else "failed"
                raise UserError(f"{e.job}: {why} (log: {log})") from None
            raise RuntimeError(f"{e.job} stopped with exit code {e.exitcode}; its log: {log}") from None

    def _threads(self, share: int) -> int:
        """Torch threads of a job using `share` workers' worth (0 stays torch's default)."""
        return self.env.threads * share

    def _spawn(self, job: str, share: int) -> tuple:
        """The worker process of one job: `_job_process` with the job's log and threads."""
        mark_ours(self._log(job).parent)
        return _job_process, (self.cfg, str(self.run_dir), job, str(self._log(job)), self._threads(share))

    def _log(self, job: str) -> Path:
        return (self.run_dir / EVAL_DIR / f"{job[5:]}.log" if job.startswith("eval:")
                else self.run_dir / job / "stage.log")

    def _live(self):
        """show({job: start time}) refreshes one line per running job (its newest training step) while progress is
        on."""
        import contextlib

        from rich.live import Live
        from rich.table import Table

        def table(running: dict) -> Table:       # job -> start time
            t = Table.grid(padding=(0, 2))
            for job, t0 in running.items():
                t.add_row(f"[cyan]{job}[/]", f"{time.time() - t0:5.0f} s", "" if ":" in job else last_step(self.run_dir / job))
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
    # Each body starts from its own section of self.cfg with the run environment applied (self.env.apply: device,
    # threads, task families and level, checkpoint policy), then adds what earlier stages produced.
    def tokenizer(self, d: Path) -> dict:
        """The BPE tokenizer and the packed shards of the teacher's corpus, which the pretraining stages copy."""
        pc = self.env.apply(self.cfg.pretrain)
        if (d / "tokenizer" / "tokenizer.json").is_file():            # an interrupted attempt got this far
            tok = Tokenizer.load(d / "tokenizer")
        else:
            tok = corpus_tokenizer(pc, resolve_model(pc.model).vocab_size, None)
            tok.save(d / "tokenizer")
        prepare_corpus(d / "data", pc.data.corpus, tok, progress=self.progress)
        return {"tokenizer": str(d / "tokenizer"), "vocab_size": len(tok), "data": str(d / "data")}

    def _with_tokenizer(self, pc: PretrainConfig) -> PretrainConfig:
        return dataclasses.replace(pc, data=dataclasses.replace(pc.data, tokenizer=self.out("00-tokenizer", "tokenizer")))

    def _shards(self, pc: PretrainConfig, run: Path) -> None:
        """Start a pretraining run with stage 0's shards when it reads the same corpus (prepare_corpus reuses them)."""
        src = self.outputs["00-tokenizer"].get("data")
        if src and pc.data.corpus == self.env.apply(self.cfg.pretrain).data.corpus and not (run / "data").exists():
            with atomic_dir(run / "data") as tmp:
                link_tree(src, tmp)

    def pretrain(self, d: Path) -> dict:
        pc = self.env.apply(self.cfg.pretrain)
        self._shards(pc, d)
        final = pretrain(self._with_tokenizer(pc), d, resume=True, progress=self.progress)
        record_expert_loads(final, d, pc, device=resolve_device(self.env.device))
        return {"final": str(final)}

    def _grpo(self, rc: RLConfig, init: str, d: Path, families: tuple = ()) -> dict:
        rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, init=str(init)))
        train_rl(rc, d, algo="grpo", resume=True, progress=self.progress, families=families)
        return {"final": str(d / "final")}

    def r1_zero(self, d: Path) -> dict:
        return self._grpo(self.env.apply(self.cfg.r1_zero), self.out("01-pretrain"), d)

    def coldstart(self, d: Path) -> dict:
        cc = self.env.apply(self.cfg.coldstart)
        r1z = self.out("02-r1-zero") if self.cfg.use_r1_zero_outputs else None
        cc = dataclasses.replace(cc, init=self.out("01-pretrain"), data=dataclasses.replace(cc.data, r1_zero=r1z))
        return coldstart(cc, d, progress=self.progress)

    def reasoning_rl(self, d: Path) -> dict:
        return self._grpo(self.env.apply(self.cfg.reasoning_rl), self.out("03-coldstart"), d)

    def rejection(self, d: Path) -> dict:
        start = "01-pretrain" if self.cfg.stage3_init == "base" else "04-reasoning-rl"
        rc = dataclasses.replace(self.env.apply(self.cfg.rejection), init=self.out("04-reasoning-rl"),
                                 base=self.out(start))
        return rejection(rc, d, progress=self.progress)

    def reward_model(self, d: Path) -> dict:
        # from the cold-start SFT model (V3 builds its reward models from SFT checkpoints, §5.2.1): it knows the chat
        # format, and the reward model then trains beside stages 2-3 instead of after them
        rc = dataclasses.replace(self.env.apply(self.cfg.reward_model), init=self.out("03-coldstart"))
        generated = None if rc.data.path else preference_pairs(rc.data.pairs, seed=rc.train.seed)
        metrics = train_reward_model(rc, d, progress=self.progress, generated=generated)
        return {"final": str(d / "final"), "heldout": metrics["heldout"]}

    def all_rl(self, d: Path) -> dict:
        ac = self.env.apply(self.cfg.all_rl)           # its tasks: the run's families + "general"
        rm, tok = load_reward_model(self.out("06-reward-model"), resolve_device(self.env.device))
        general = GeneralFamily(reward_scorer(rm, tok), ac.harmful_share)
        return self._grpo(ac.rl, self.out("05-rejection"), d, families=(general,))

    def student_base(self, d: Path) -> dict:
        """A random-init dense student (vocab and positions = the base's), pretrained on the same corpus."""
        import torch

        sc = self.env.apply(self.cfg.student)
        tok_dir = self.out("00-tokenizer", "tokenizer")
        base_cfg = resolve_model(self.cfg.pretrain.model)
        init = d / "init"
        if not (init / "config.json").is_file():
            fields = {"vocab_size": base_cfg.vocab_size, "max_position_embeddings": base_cfg.max_position_embeddings,
                      **sc.model}
            torch.manual_seed(sc.pretrain.train.seed)
            model = build_model(from_dict(DenseConfig, fields, "student.model"))
            save_pretrained(model, init)
            Tokenizer.load(tok_dir).save(init / "tokenizer")
        pc = dataclasses.replace(self._with_tokenizer(sc.pretrain), init=str(init))
        self._shards(pc, d / "run")
        return {"final": str(pretrain(pc, d / "run", resume=True, progress=self.progress))}

    def distill(self, d: Path) -> dict:
        dc = dataclasses.replace(self.env.apply(self.cfg.distill), teacher=self.out("07-all-rl"),
                                 init=self.out("08-student-base"))
        return distill(dc, d, progress=self.progress)

    def student_rl(self, d: Path) -> dict:
        return self._grpo(self.env.apply(self.cfg.student_rl), self.out("08-student-base"), d)

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
        file = self._eval_file(stage)
        if self._evaluated(stage):
            return file
        ec = self.cfg.eval
        name, _, template = next(row for row in EVALUATED if row[1] == stage)
        problems = [p for f in self.env.tasks
                    for p in sample_problems([f], ec.problems, split="test", seed=ec.seed, difficulty=self.env.difficulty)]
        t0 = time.perf_counter()
        model, tok = load_checkpoint(self.out(stage), resolve_device(self.env.device), inference=True)
        sc = PassAtKConfig(samples=ec.samples, sampling=ec.sampling, greedy=False, template=template,
                           batch_size=ec.batch_size, seed=ec.seed)
        with self.console.status(f"evaluating {name}"):
            per_family = evaluate(model, tok, problems, sc, by_family=True)
        atomic_write_json(file, {"name": name, "stage": stage, "path": self.out(stage), "template": template,
                                 "eval": dataclasses.asdict(ec), "families": per_family,
                                 "wall_s": time.perf_counter() - t0})
        self.console.print(f"  evaluated {name}")
        return file
