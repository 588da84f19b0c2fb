"""Trainers: the one stage loop (stage.py) run by a GRPO stage (grpo.py) and the SFT warm-up (sft.py), the run
context (context.py), the engine's lifecycle owner (lifecycle.py), evaluation, checkpoints, difficulty
sampling and the whole recipe (pipeline.py)."""
