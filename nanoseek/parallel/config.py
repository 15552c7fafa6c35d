"""The `[parallel]` recipe section: how many ranks do what (docs/DESIGN.md §5, V3 §3.2).

DeepSeek-V3 trained with 16-way pipeline, 64-way expert and ZeRO-1 data parallelism. We keep the same
three dials. Expert parallelism is carved OUT of data parallelism, as in V3: the `ep` ranks of an expert
group each read their own data and swap tokens with all-to-all, so the world is `dp × pp` ranks and `ep`
divides `dp`. Set on the command line as `--set parallel.dp=2 --set parallel.ep=2 --set parallel.pp=2`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nanoseek.errors import UserError
from nanoseek.parallel.expert import check_layout
from nanoseek.parallel.pipeline import split_layers

SCHEDULES = ("gpipe", "1f1b", "zbv", "dualpipev")   # zbv and dualpipev hold 2 stages per rank ("V" shape)
DP_MODES = ("fsdp", "ddp", "hfreduce")


@dataclass
class ParallelConfig:
    dp: int = 0                  # data-parallel ranks; 0 = every rank the pipeline leaves (world // pp)
    ep: int = 1                  # expert-parallel ranks inside each data-parallel group (divides dp)
    pp: int = 1                  # pipeline ranks
    schedule: str = "1f1b"       # gpipe | 1f1b | zbv (ZB-V zero bubble) | dualpipev
    microbatches: int = 0        # per step; 0 = the fewest the schedule accepts (pp, or 2·pp for V shapes)
    dp_mode: str = "fsdp"        # fsdp (FSDP2 fully_shard) | ddp (replicated, all-reduce) | hfreduce (host all-reduce)
    param_dtype: str = "float32"   # FSDP2 MixedPrecisionPolicy compute dtype ("bfloat16" on GPUs)
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype
    overlap: bool = True         # DualPipeV: overlap one micro-batch's compute with the other's all-to-all
    ep_dedup: bool = True        # send a token once per destination rank, not once per expert (V3 §3.2.2)
    bucket_mb: float = 25.0      # hfreduce: gradient bucket size

    def resolve(self, world_size: int) -> "ParallelConfig":
        """Fill `dp = 0` from the world size and check that the layout fits it; UserError otherwise."""
        def bad(msg: str) -> None:
            raise UserError(f"parallel: {msg}")
        for name in ("ep", "pp"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule {self.schedule!r} unknown; pick one of {', '.join(SCHEDULES)}")
        if self.dp_mode not in DP_MODES:
            bad(f"dp_mode {self.dp_mode!r} unknown; pick one of {', '.join(DP_MODES)}")
        if world_size % self.pp:
            bad(f"pp={self.pp} does not divide the {world_size} launched ranks; launch a multiple of pp")
        dp = self.dp or world_size // self.pp
        if dp * self.pp != world_size:
            bad(f"dp={dp} × pp={self.pp} = {dp * self.pp} ranks but {world_size} were launched; "
                f"set parallel.dp={world_size // self.pp} or launch {dp * self.pp} (torchrun --nproc-per-node)")
        if dp % self.ep:
            bad(f"ep={self.ep} must divide dp={dp}: expert parallelism is carved out of data parallelism")
        if self.microbatches < 0:
            bad(f"microbatches must be >= 0, got {self.microbatches}")
        v_shape = self.schedule in ("zbv", "dualpipev")
        least = 2 * self.pp if v_shape else self.pp
        mb = self.microbatches or least
        if self.pp > 1 and mb < least:
            bad(f"schedule {self.schedule} with pp={self.pp} needs microbatches >= {least}, got {mb}")
        return dataclasses.replace(self, dp=dp, microbatches=mb if self.pp > 1 else max(1, self.microbatches))

    def check_model(self, model_config) -> None:
        """UserError, before anything is written, when the model cannot take this layout: experts or router
        groups that do not split over `ep`, too few layers for the pipeline stages, tied embeddings under pp."""
        if self.ep > 1:
            check_layout(model_config, self.ep)
        if self.pp > 1:
            if model_config.tie_word_embeddings:
                raise UserError("parallel: pipeline parallel needs untied embeddings (the head is on the last "
                                "stage); set parallel.pp=1 for a model with tie_word_embeddings")
            split_layers(model_config.num_hidden_layers, model_config.num_nextn_predict_layers,
                         self.pp * self.stages_per_rank)

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.schedule in ("zbv", "dualpipev") else 1
