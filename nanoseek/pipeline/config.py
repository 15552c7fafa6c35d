"""The pipeline's configuration: one tree with a section per stage, whose defaults are the tiny CPU run
(`--preset small` reads recipes/pipeline_small.toml over them), and the run-wide settings (tasks, difficulty,
device, threads) that every stage puts into its own config through a `RunEnv`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.distill import DistillConfig
from nanoseek.errors import UserError
from nanoseek.r1.coldstart import ColdStartConfig, ColdStartDataConfig
from nanoseek.r1.rejection import RejectionConfig, TraceConfig
from nanoseek.recipe import load_recipe
from nanoseek.rl.reward_model import RMDataConfig, RMTrainConfig, RewardModelConfig
from nanoseek.rl.trainer import RLConfig, RLEvalConfig, RLTrainConfig, TaskConfig
from nanoseek.sampling.rewards import RewardConfig
from nanoseek.sampling.rollout import SamplingConfig
from nanoseek.train.optim import OptimConfig
from nanoseek.train.runs import PretrainConfig
from nanoseek.train.trainer import CheckpointConfig, TrainEvalConfig, TrainConfig


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
PRESETS = ("tiny", "small")


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
    """The teacher's pretraining: recipes/tiny.toml (3 layers, no MTP), shortened to 1000 steps so that the whole
    story fits in 15 minutes on 2 cores (evaluation is the pipeline's own, at the end)."""
    return load_recipe(PretrainConfig, RECIPES / "tiny.toml",
                       ["train.steps=1000", "eval.problems=0", "checkpoint.keep_last=1"])


def _pretrain(steps: int) -> PretrainConfig:
    # batch 8 x 256 tokens: at equal tokens, twice the updates of the trainer's default 16 reach a lower loss
    return PretrainConfig(train=TrainConfig(steps=steps, batch_size=8, seq_len=256),
                          eval=TrainEvalConfig(every=0, val_batches=2, problems=0),
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
class ComparisonConfig:
    """The evaluation behind the final table: every model of the story on the same held-out problems."""
    problems: int = 24                # held-out TEST problems per task family (the same for every model)
    samples: int = 4                  # K: pass@1 is the mean over K samples, cons@K their majority vote
    # the R1 report's evaluation sampling: temperature 0.6, top-p 0.95
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=160, temperature=0.6,
                                                                            top_p=0.95))
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
    stage3_init: str = "reasoning_rl"  # the model stage 3's SFT starts from: "base" as R1 §2.3.3 (with its 800K
                                      # samples), or stage 2's model: with hundreds of kept traces, an SFT from the
                                      # base forgets what stages 1-2 taught (docs/experiments.md, issue 19)
    rejection: RejectionConfig = field(default_factory=lambda: RejectionConfig(
        traces=TraceConfig(prompts=512, samples=2, min_kept=512, seed=2)))
    reward_model: RewardModelConfig = field(default_factory=lambda: RewardModelConfig(
        data=RMDataConfig(pairs=800), train=RMTrainConfig(steps=30)))   # right on ~all training pairs by step ~20
    all_rl: AllScenarioConfig = field(default_factory=AllScenarioConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # 2048 prompts x 1: ~480 correct teacher traces + worked solutions up to 1024 examples; 512 prompts x 2 (148
    # traces) left the student at 7.6 %, 2048 x 1 lift it to 17.5 % (docs/experiments.md, fourth session)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(traces=TraceConfig(
        prompts=2048, samples=1, min_kept=1024, batch_size=256, seed=3)))
    student_rl: RLConfig = field(default_factory=lambda: _rl(24, "r1_zero"))
    eval: ComparisonConfig = field(default_factory=ComparisonConfig)
    export: bool = True               # copy the final models to run_dir/export/<name>/ (HF format)

    def __post_init__(self):
        if self.stage3_init not in ("base", "reasoning_rl"):
            raise UserError(f"stage3_init={self.stage3_init!r}; choose \"base\" (R1's choice) or \"reasoning_rl\" "
                            "(stage 2's model)")


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


@dataclass(frozen=True)
class RunEnv:
    """What every stage of one run shares: the device, the torch CPU threads, the task families and their level,
    and whether finished stages keep their optimizer checkpoints. Built once from the PipelineConfig
    (`RunEnv.of`); a worker process gets a copy with its own share of threads. The stage bodies put it into the
    configs they hand their trainers, each with one visible `apply`, so the PipelineConfig itself is never
    rewritten. (No run-wide seed: every stage keeps the seed of its own section.)"""
    device: str
    threads: int
    tasks: tuple[str, ...]
    difficulty: int | dict | None
    keep_checkpoints: bool

    @classmethod
    def of(cls, cfg: PipelineConfig) -> RunEnv:
        return cls(device=cfg.device, threads=cfg.threads, tasks=tuple(cfg.tasks), difficulty=cfg.difficulty,
                   keep_checkpoints=cfg.keep_checkpoints)

    def apply(self, section):
        """One stage's section of the PipelineConfig as the stage runs it: trainers on the run's device and
        threads, no optimizer state after the last step unless kept (done.json says the stage is done), the run's
        task families and level in its problems, traces and corpus. The section itself is not changed."""
        setter = _SETTERS.get(type(section))
        if setter is None:
            raise TypeError(f"a {type(section).__name__} is not a stage section the run environment applies to")
        return setter(self, section)

    def resolve(self, cfg: PipelineConfig) -> PipelineConfig:
        """The PipelineConfig with `apply` done on every stage section: what the stages run. run_dir/config.toml
        records it and a rerun is checked against it, so a nested value the environment overrides anyway is no
        change, and a run directory written by earlier versions (which saved this view) still resumes."""
        sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        return dataclasses.replace(cfg, **{name: self.apply(section) for name, section in sections.items()
                                           if type(section) in _SETTERS})

    # -- per kind of section ------------------------------------------------------------------------------
    def _train(self, tc):
        return dataclasses.replace(tc, device=self.device, threads=self.threads)

    def _checkpoint(self, c: CheckpointConfig) -> CheckpointConfig:
        return c if self.keep_checkpoints else dataclasses.replace(c, final=False)

    def _corpus(self, cc):
        """The corpus practises the level everything else uses (one level → that level for every family; None →
        each family's default mix, as RL and evaluation then draw: a corpus left at its own recipe's level would
        train a base on problems the rest of the run never asks)."""
        d = self.difficulty
        level = d if d is None or isinstance(d, dict) else {f: d for f in self.tasks}
        return dataclasses.replace(cc, families=list(self.tasks), difficulty=level)

    def _traces(self, tc: TraceConfig) -> TraceConfig:
        return dataclasses.replace(tc, tasks=list(self.tasks), difficulty=self.difficulty)

    def _sft(self, sc):
        return dataclasses.replace(sc, train=self._train(sc.train), checkpoint=self._checkpoint(sc.checkpoint))

    def _pretrain(self, pc: PretrainConfig) -> PretrainConfig:
        return dataclasses.replace(pc, train=self._train(pc.train), checkpoint=self._checkpoint(pc.checkpoint),
                                   data=dataclasses.replace(pc.data, corpus=self._corpus(pc.data.corpus)))

    def _rl(self, rc: RLConfig, extra_tasks: tuple[str, ...] = ()) -> RLConfig:
        return dataclasses.replace(rc, train=self._train(rc.train), checkpoint=self._checkpoint(rc.checkpoint),
                                   tasks=dataclasses.replace(rc.tasks, names=[*self.tasks, *extra_tasks],
                                                             difficulty=self.difficulty))

    def _coldstart(self, cc: ColdStartConfig) -> ColdStartConfig:
        return dataclasses.replace(cc, sft=self._sft(cc.sft), data=dataclasses.replace(
            cc.data, tasks=list(self.tasks), difficulty=self.difficulty,
            r1_zero_traces=self._traces(cc.data.r1_zero_traces)))

    def _rejection(self, rc: RejectionConfig) -> RejectionConfig:
        return dataclasses.replace(rc, sft=self._sft(rc.sft), traces=self._traces(rc.traces))

    def _reward_model(self, rc: RewardModelConfig) -> RewardModelConfig:
        return dataclasses.replace(rc, train=self._train(rc.train))

    def _distill(self, dc: DistillConfig) -> DistillConfig:
        return dataclasses.replace(dc, sft=self._sft(dc.sft), traces=self._traces(dc.traces))

    def _all_scenario(self, ac: AllScenarioConfig) -> AllScenarioConfig:
        return dataclasses.replace(ac, rl=self._rl(ac.rl, ("general",)))   # + the general prompts stage 4 adds

    def _student(self, sc: StudentConfig) -> StudentConfig:
        return dataclasses.replace(sc, pretrain=self._pretrain(sc.pretrain))


# what RunEnv.apply does to each kind of stage section (RunEnv.resolve: to every section of these kinds)
_SETTERS = {PretrainConfig: RunEnv._pretrain, RLConfig: RunEnv._rl, ColdStartConfig: RunEnv._coldstart,
            RejectionConfig: RunEnv._rejection, RewardModelConfig: RunEnv._reward_model, DistillConfig: RunEnv._distill,
            AllScenarioConfig: RunEnv._all_scenario, StudentConfig: RunEnv._student}
