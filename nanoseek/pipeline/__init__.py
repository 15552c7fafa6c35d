"""The R1 story as one resumable run: pretrain → R1-Zero → cold start → reasoning RL → rejection sampling →
reward model → all-scenario RL → distillation into a dense student → evaluation and report.

    config.py    PipelineConfig (a section per stage; defaults = the tiny CPU run), presets, run-wide settings
    stages.py    the stage graph, the scheduler that runs it (one process, or `workers` processes), and the
                 body of every stage (`Pipeline`)
"""
