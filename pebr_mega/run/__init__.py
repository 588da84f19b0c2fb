"""A run's bookkeeping, apart from its training: the run directory and what a start-up finds there (run_dir.py),
the settings that define a result (fingerprint.py), a stage's checkpoints on disk (stage_checkpoints.py; the
Megatron checkpoint format itself is `pebr_mega.checkpoint`) and stop requests (interrupt.py).

It sits between the trainers and the config: it reads the config, and knows no model, engine or loop."""
