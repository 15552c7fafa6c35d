"""`nanoseek pipeline`: the DeepSeek-R1 story end to end, stage by stage, resumable — the project's main job.

    00-tokenizer      byte-level BPE on the task corpus
    01-pretrain       the DeepSeek-V3 base (MLA + MoE + MTP, aux-free balancing; expert loads recorded)
    02-r1-zero        GRPO from the base, accuracy + format rewards, R1-Zero template        (R1 §2.2)
    03-coldstart      stage 1: readable long-CoT data (worked solutions + clean R1-Zero outputs), SFT from base
    04-reasoning-rl   stage 2: GRPO with accuracy + format + language consistency             (R1 §2.3.2)
    05-rejection      stage 3: K samples/prompt from stage 2, filter, dedupe, + general data, SFT from BASE
    06-reward-model   Bradley-Terry reward model on generated preference pairs (held-out accuracy)
    07-all-rl         stage 4: GRPO, rule rewards on reasoning prompts, the reward model on general ones
    08-student-base   a Llama/Qwen2-style dense student pretrained (cheaply) on the same corpus
    09-distill        the student fine-tuned on the final teacher's correct traces              (R1 §2.4)
    10-student-rl     control: the same student trained by GRPO directly, as R1-Zero was
    11-eval           every model on the SAME held-out TEST problems: pass@1 / cons@K with 95% intervals
    report            report.md + the table on screen, plots/, export/<name>/ (HF format)

Every stage writes into run_dir/<stage>/ and, when complete, an atomic `done.json` with its outputs and wall
time. Re-running the same command skips finished stages and continues an unfinished one from its newest
checkpoint (the trainers resume; data files are reused); the resolved config must be the one the run
started with. The embedded default (the dataclass defaults below) is the tiny CPU recipe, sized to finish
in about 20 minutes on 2 cores; `--preset small` reads recipes/pipeline_small.toml (one H100).

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
from nanoseek.files import atomic_write_json, atomic_write_text
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
    """The teacher's pretraining: recipes/tiny.toml (evaluation is the pipeline's own, at the end)."""
    return load_recipe(PretrainConfig, RECIPES / "tiny.toml", ["eval.problems=0", "checkpoint.keep_last=1"])


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
    pretrain: PretrainConfig = field(default_factory=lambda: _pretrain(600))


@dataclass
class AllScenarioConfig:
    rl: RLConfig = field(default_factory=lambda: _rl(20, "chat", language=0.3))
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
                                      # nothing from intra-op threads, and lose a lot when the cores are shared
    pretrain: PretrainConfig = field(default_factory=_base)
    r1_zero: RLConfig = field(default_factory=lambda: _rl(30, "r1_zero"))
    coldstart: ColdStartConfig = field(default_factory=lambda: ColdStartConfig(
        data=ColdStartDataConfig(examples=1500, r1_zero_traces=TraceConfig(prompts=128, samples=2, template="r1_zero",
                                                                             per_prompt=1, seed=1))))
    use_r1_zero_outputs: bool = True  # cold start also takes R1-Zero's correct, readable outputs
    reasoning_rl: RLConfig = field(default_factory=lambda: _rl(25, "chat", language=0.3))
    rejection: RejectionConfig = field(default_factory=lambda: RejectionConfig(
        traces=TraceConfig(prompts=768, samples=2, min_kept=768, seed=2)))
    reward_model: RewardModelConfig = field(default_factory=lambda: RewardModelConfig(
        data=RMDataConfig(pairs=800), train=RMTrainConfig(steps=60)))
    all_rl: AllScenarioConfig = field(default_factory=AllScenarioConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(traces=TraceConfig(prompts=768, samples=2, min_kept=768, seed=3)))
    student_rl: RLConfig = field(default_factory=lambda: _rl(30, "r1_zero"))
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

    def rl(rc: RLConfig, extra_tasks: tuple = ()) -> RLConfig:
        return dataclasses.replace(rc, train=train(rc.train), tasks=dataclasses.replace(
            rc.tasks, names=cfg.tasks + list(extra_tasks), difficulty=cfg.difficulty))

    def traces(tc: TraceConfig) -> TraceConfig:
        return dataclasses.replace(tc, tasks=list(cfg.tasks), difficulty=cfg.difficulty)

    def sft(sc):
        return dataclasses.replace(sc, train=train(sc.train))

    def corpus(cc):   # the corpus practises the level everything else uses
        level = cfg.difficulty if cfg.difficulty is None or isinstance(cfg.difficulty, dict) else \
            {f: cfg.difficulty for f in cfg.tasks}
        level = level if level is not None else cc.difficulty
        return dataclasses.replace(cc, families=list(cfg.tasks), difficulty=level)

    pre = cfg.pretrain
    return dataclasses.replace(
        cfg,
        pretrain=dataclasses.replace(pre, train=train(pre.train), data=dataclasses.replace(pre.data, corpus=corpus(pre.data.corpus))),
        r1_zero=rl(cfg.r1_zero),
        coldstart=dataclasses.replace(cfg.coldstart, sft=sft(cfg.coldstart.sft), data=dataclasses.replace(
            cfg.coldstart.data, tasks=list(cfg.tasks), difficulty=cfg.difficulty,
            r1_zero_traces=traces(cfg.coldstart.data.r1_zero_traces))),
        reasoning_rl=rl(cfg.reasoning_rl),
        rejection=dataclasses.replace(cfg.rejection, sft=sft(cfg.rejection.sft), traces=traces(cfg.rejection.traces)),
        reward_model=dataclasses.replace(cfg.reward_model, train=train(cfg.reward_model.train)),
        all_rl=dataclasses.replace(cfg.all_rl, rl=rl(cfg.all_rl.rl, ("general",))),
        student=dataclasses.replace(cfg.student, pretrain=dataclasses.replace(
            cfg.student.pretrain, train=train(cfg.student.pretrain.train),
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
    rerun_on: str | None = None       # config section whose change makes a finished stage run again


STAGES = [
    Stage("00-tokenizer", "tokenizer", "tokenizer"),
    Stage("01-pretrain", "pretrain (base)", "pretrain"),
    Stage("02-r1-zero", "R1-Zero", "r1_zero"),
    Stage("03-coldstart", "R1 stage 1: cold start", "coldstart"),
    Stage("04-reasoning-rl", "R1 stage 2: reasoning RL", "reasoning_rl"),
    Stage("05-rejection", "R1 stage 3: rejection sampling + SFT", "rejection"),
    Stage("06-reward-model", "reward model", "reward_model"),
    Stage("07-all-rl", "R1 stage 4: RL, all scenarios", "all_rl"),
    Stage("08-student-base", "student pretrain", "student_base"),
    Stage("09-distill", "distilled student", "distill"),
    Stage("10-student-rl", "RL-only student", "student_rl"),
    Stage("11-eval", "evaluation", "evaluate", rerun_on="eval"),
]


class Pipeline:
    def __init__(self, cfg: PipelineConfig, run_dir: str | Path, progress: bool = True, console=None):
        from rich.console import Console

        self.cfg, self.run_dir, self.progress = _stage_globals(cfg), Path(run_dir), progress
        self.console = console or Console(stderr=True)
        self.outputs: dict[str, dict] = {}
        self.walls: dict[str, float] = {}     # stage -> wall seconds (all attempts)
        self.cpus: dict[str, float] = {}      # stage -> process CPU seconds (all threads, all attempts)

    def out(self, stage: str, key: str = "final") -> str:
        return self.outputs[stage][key]

    # -- running --------------------------------------------------------------------------------------
    def run(self, stop_after: str | None = None) -> dict:
        from nanoseek.train.commands import check_run_dir

        try:
            check_run_dir(self.run_dir, self.cfg, resume=True)    # a rerun must be the same run
        except UserError as e:
            raise UserError(str(e).replace("--resume: ", "this run directory was started with another config: ")) from None
        if self.cfg.threads:
            import torch
            torch.set_num_threads(self.cfg.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
        for stage in STAGES:
            self.run_stage(stage)
            if stop_after and stage.name.split("-", 1)[1] == stop_after:
                return self.outputs
        from nanoseek.report import write_report
        return write_report(self, console=self.console)

    def run_stage(self, stage: Stage) -> dict:
        d = self.run_dir / stage.name
        marker = d / "done.json"
        section = dataclasses.asdict(getattr(self.cfg, stage.rerun_on)) if stage.rerun_on else None
        if marker.is_file() and json.loads(marker.read_text()).get("config") == section:
            done = json.loads(marker.read_text())
            self.outputs[stage.name], self.walls[stage.name] = done["outputs"], done["wall_s"]
            self.cpus[stage.name] = done.get("cpu_s", 0.0)
            self.console.print(f"[dim]{stage.name}: done earlier ({done['wall_s']:.0f} s), skipped[/]")
            return done["outputs"]
        self.console.rule(f"[bold]{stage.name}[/] {stage.title}")
        d.mkdir(parents=True, exist_ok=True)
        spent_file = d / "spent.json"          # time spent by earlier, interrupted attempts
        spent = json.loads(spent_file.read_text()) if spent_file.is_file() else {"wall_s": 0.0, "cpu_s": 0.0}
        t0, c0 = time.perf_counter(), time.process_time()

        def total() -> dict:   # this attempt plus earlier, interrupted ones; CPU time sums all threads
            return {"wall_s": spent["wall_s"] + time.perf_counter() - t0, "cpu_s": spent["cpu_s"] + time.process_time() - c0}
        try:
            outputs = getattr(self, stage.fn)(d)
        finally:
            atomic_write_json(spent_file, total())
        times = total()
        wall = times["wall_s"]
        atomic_write_json(marker, {"stage": stage.name, "outputs": outputs, **times, "config": section,
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        spent_file.unlink()                    # the marker holds the total now
        self.outputs[stage.name], self.walls[stage.name], self.cpus[stage.name] = outputs, wall, times["cpu_s"]
        self.console.print(f"[green]{stage.name}[/] done in {wall:.0f} s (CPU {times['cpu_s']:.0f} s)")
        return outputs

    # -- stages -----------------------------------------------------------------------------------------
    def tokenizer(self, d: Path) -> dict:
        from nanoseek.train.commands import corpus_tokenizer, resolve_model

        vocab = resolve_model(self.cfg.pretrain.model).vocab_size
        tok = corpus_tokenizer(self.cfg.pretrain, vocab, None)
        tok.save(d / "tokenizer")
        return {"tokenizer": str(d / "tokenizer"), "vocab_size": len(tok)}

    def _with_tokenizer(self, pc: PretrainConfig) -> PretrainConfig:
        return dataclasses.replace(pc, data=dataclasses.replace(pc.data, tokenizer=self.out("00-tokenizer", "tokenizer")))

    def pretrain(self, d: Path) -> dict:
        from nanoseek.report import record_expert_loads
        from nanoseek.train.commands import pretrain
        from nanoseek.train.trainer import resolve_device

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

        rc = dataclasses.replace(self.cfg.reward_model, init=self.out("05-rejection"))
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
        """A random-init dense student (vocab = the base tokenizer's), pretrained on the same corpus."""
        import torch

        from nanoseek.hf import save_pretrained
        from nanoseek.model import build_model
        from nanoseek.tokenizer import Tokenizer
        from nanoseek.train.commands import pretrain

        tok_dir = self.out("00-tokenizer", "tokenizer")
        base_cfg = json.loads((Path(self.out("01-pretrain")) / "config.json").read_text())
        init = d / "init"
        if not (init / "config.json").is_file():
            fields = {"vocab_size": base_cfg["vocab_size"], "max_position_embeddings": base_cfg["max_position_embeddings"],
                      **self.cfg.student.model}
            torch.manual_seed(self.cfg.student.pretrain.train.seed)
            model = build_model(from_dict(DenseConfig, fields, "student.model"))
            save_pretrained(model, init)
            Tokenizer.load(tok_dir).save(init / "tokenizer")
        pc = dataclasses.replace(self._with_tokenizer(self.cfg.student.pretrain), init=str(init))
        base_data = Path(self.out("01-pretrain")).parent / "data"
        if pc.data.corpus == self.cfg.pretrain.data.corpus and base_data.is_dir() and not (d / "run" / "data").exists():
            shutil.copytree(base_data, d / "run" / "data")     # same corpus and tokenizer: reuse the shards
        return {"final": str(pretrain(pc, d / "run", resume=True, progress=self.progress))}

    def distill(self, d: Path) -> dict:
        from nanoseek.distill import distill

        dc = dataclasses.replace(self.cfg.distill, teacher=self.out("07-all-rl"), init=self.out("08-student-base"))
        return distill(dc, d, progress=self.progress)

    def student_rl(self, d: Path) -> dict:
        return self._grpo(self.cfg.student_rl, self.out("08-student-base"), d)

    def models(self) -> list[tuple[str, str, str, str]]:
        """(row name, producing stage, model dir, prompt template) of every evaluated model."""
        return [("base", "01-pretrain", self.out("01-pretrain"), "r1_zero"),
                ("R1-Zero", "02-r1-zero", self.out("02-r1-zero"), "r1_zero"),
                ("R1 s1 cold start", "03-coldstart", self.out("03-coldstart"), "chat"),
                ("R1 s2 reasoning RL", "04-reasoning-rl", self.out("04-reasoning-rl"), "chat"),
                ("R1 s3 rejection SFT", "05-rejection", self.out("05-rejection"), "chat"),
                ("R1 (s4 all-scenario RL)", "07-all-rl", self.out("07-all-rl"), "chat"),
                ("student distilled", "09-distill", self.out("09-distill"), "chat"),
                ("student RL only", "10-student-rl", self.out("10-student-rl"), "r1_zero")]

    def evaluate(self, d: Path) -> dict:
        """Each model on the same TEST problems, family by family; one JSON per model (resumable)."""
        from nanoseek.eval import EvalConfig as SamplingEval, evaluate, load_checkpoint
        from nanoseek.tasks import sample_problems
        from nanoseek.train.trainer import resolve_device

        ec = self.cfg.eval
        device = resolve_device(self.cfg.device)
        problems = {f: sample_problems([f], ec.problems, split="test", seed=ec.seed, difficulty=self.cfg.difficulty)
                    for f in self.cfg.tasks}
        results = {}
        for name, stage, path, template in self.models():
            file = d / f"{stage}.json"
            if not file.is_file() or json.loads(file.read_text()).get("eval") != dataclasses.asdict(ec):
                model, tok = load_checkpoint(path, device)
                sc = SamplingEval(samples=ec.samples, temperature=ec.temperature, top_p=ec.top_p, greedy=False,
                                  max_new_tokens=ec.max_new_tokens, template=template, batch_size=ec.batch_size,
                                  seed=ec.seed)
                per_family = {}
                with self.console.status(f"evaluating {name}"):
                    for fam, probs in problems.items():
                        per_family[fam] = evaluate(model, tok, probs, sc)
                atomic_write_json(file, {"name": name, "stage": stage, "path": path, "template": template,
                                         "eval": dataclasses.asdict(ec), "families": per_family})
                self.console.print(f"  evaluated {name}")
            results[stage] = str(file)
        return results


# ---------------------------------------------------------------- CLI: pipeline | coldstart | rejection

def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    if command == "pipeline":
        parser.add_argument("--preset", default="tiny", choices=PRESETS,
                            help="tiny = the embedded CPU default; small = recipes/pipeline_small.toml (one H100)")
        parser.add_argument("--stop-after", default=None, choices=[st.name.split("-", 1)[1] for st in STAGES],
                            metavar="STAGE", help="stop after this stage, e.g. pretrain or r1-zero")
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
