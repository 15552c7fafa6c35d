"""Sampling from a model, shared by evaluation and RL (so neither imports the other):

    rollout.py   SamplingConfig (the one definition of max_new_tokens / temperature / top-p / top-k / stop),
                 the batched KV-cached generation engine, prompt templates (r1_zero | chat | plain)
    rewards.py   the rule rewards of R1 §2.2.2: accuracy, format, language consistency, overlong penalty
    reflection.py  whether a completion's reasoning checks or redoes a step (the reflection rate RL logs)
"""
