"""The R1 story as one resumable run: pretrain → R1-Zero → cold start → reasoning RL → rejection sampling →
reward model → all-scenario RL → distillation into a dense student → evaluation and report.

    config.py    PipelineConfig (a section per stage; defaults = the tiny CPU run), presets, run-wide settings
    scheduler.py Stage (a job and the stages it needs), the closure of a stage's needs, progress lines
    stages.py    the R1 stage graph, the scheduler loop that runs it (one process, or `workers` processes), and the
                 body of every stage (`Pipeline`)
"""
