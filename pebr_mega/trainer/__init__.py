"""Trainers: the one stage loop (stage.py) run by a GRPO stage (grpo.py) and the SFT warm-up (sft.py), and the
steps they are made of: the run context (context.py), the engine's lifecycle owner (lifecycle.py), the stage's
data and schedule (stage_data.py, data_order.py), evaluation, the divergence guard and difficulty sampling.
A run's bookkeeping (run directory, fingerprints, checkpoints of a stage, interrupts) is `pebr_mega.run`; the
recipe that chains the stages (pipeline, demo, dry run) is `pebr_mega.recipe`."""
