"""Training: one loop for pretraining, SFT and context extension, and the pieces RL reuses.

    trainer.py      the optimizer step (CE + λ·MTP + α·balance, accumulation, clipping, aux-loss-free bias
                    update), periodic evaluation, checkpoints; TrainConfig / EvalConfig / CheckpointConfig
    optim.py        AdamW (fused on CUDA) and the warmup-stable-decay schedule
    checkpoint.py   checkpoints/step-N = HF model + trainer_state/ (safetensors + JSON: optimizer, step, data position, RNGs)
    logger.py       metrics.jsonl + TensorBoard + progress bar (also used by GRPO/PPO)
    commands.py     `nanoseek pretrain` and `nanoseek sft`: configs, run directories, data
    extend.py       `nanoseek extend`: YaRN context extension and the pass-key retrieval check
    fp8.py          FP8 linears (V3 §3.3), switched on by train.precision = "fp8"

Python API: `pretrain(PretrainConfig(...), out)`, `sft(SFTConfig(...), out)` from nanoseek.train.commands,
`extend(ExtendConfig(...), out)` from nanoseek.train.extend; each returns the run's `final/` directory.
"""
