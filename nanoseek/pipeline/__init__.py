"""The R1 story as one resumable run: pretrain → R1-Zero → cold start → reasoning RL → rejection sampling →
reward model → all-scenario RL → distillation into a dense student → evaluation and report.

    config.py    PipelineConfig (a section per stage; defaults = the tiny CPU run), presets, and RunEnv: the
                 run-wide settings (device, threads, tasks, difficulty) each stage applies to its own section
    scheduler.py run_jobs: a generic scheduler over a job graph (in this process or in `workers` spawned
                 processes); Stage (a job and the stages it needs), the closure of a stage's needs, progress lines
    stages.py    the R1 stage graph, run through run_jobs, and the body of every stage (`Pipeline`)
"""
