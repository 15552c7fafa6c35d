"""The run layer: what every training or sampling run does before and after its own work.

    setup.py        resolve_device, autocast, seed_everything, setup_torch (threads + train-section checks),
                    steps_with_gc (the garbage collector between a loop's steps),
                    join_ranks / rank0_first (torchrun process groups)
    directory.py    check_run_dir / start_run / undo_failed_start / finished / export_final / checkpoint_dtype /
                    load_init: the run directory
    checkpoint.py   checkpoints/step-N = HF model + trainer_state.pt (optimizer, step, data position, RNGs)
"""

from nanoseek.run.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from nanoseek.run.directory import (check_run_dir, checkpoint_dtype, export_final, finished, load_init, start_run,
                                    undo_failed_start)
from nanoseek.run.setup import (autocast, join_ranks, rank0_first, resolve_device, seed_everything, setup_torch,
                                steps_with_gc)

__all__ = ["autocast", "check_run_dir", "checkpoint_dtype", "export_final", "finished", "join_ranks", "latest_checkpoint", "load_init",
           "load_trainer_state", "rank0_first", "resolve_device", "save_checkpoint", "seed_everything",
           "setup_torch", "start_run", "steps_with_gc", "undo_failed_start"]
