"""The DeepSeek-R1 recipe's data stages (R1 report §2.3), each usable on its own data and checkpoints:

    coldstart.py   stage 1: readable long-CoT examples in the R1 format, SFT from the base
    rejection.py   stage 3: K samples per prompt, keep the correct / well-formed / one-language ones,
                   de-duplicate, mix with general data, SFT from the base; also the teacher traces of
                   distillation (nanoseek.distill)
    general.py     non-reasoning ("general") prompts: SFT examples, preference pairs for the reward
                   model, and the stage-4 "general" task family scored by that reward model

The RL stages (R1-Zero, stage 2, stage 4) are GRPO runs of nanoseek.rl.trainer; nanoseek.pipeline
chains everything into the R1 story.
"""
