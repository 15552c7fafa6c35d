"""Training: one loop for pretraining, SFT and context extension, and the pieces RL reuses.

    trainer.py      the optimizer step (CE + λ·MTP + α·balance, accumulation, clipping, aux-loss-free bias
                    update), periodic evaluation, checkpoints; TrainConfig / TrainEvalConfig / CheckpointConfig
                    (checkpoint files and the run directory: nanoseek.run)
    optim.py        AdamW (fused on CUDA) and the warmup-stable-decay schedule
    logger.py       metrics.jsonl + TensorBoard + progress bar (also used by GRPO/PPO)
    runs.py         pretrain and SFT runs: their configs, data, tokenizer and in-training evaluation
    extend.py       YaRN context extension and the pass-key retrieval check
    fp8.py          FP8 linears (V3 §3.3), switched on by train.precision = "fp8"
    lora.py         LoRA adapters for dense models (`[lora]` of sft and grpo), saved in PEFT's format, mergeable

Python API: `pretrain(PretrainConfig(...), out)`, `sft(SFTConfig(...), out)` from nanoseek.train.runs,
`extend(ExtendConfig(...), out)` from nanoseek.train.extend; each returns the run's `final/` directory.
"""
