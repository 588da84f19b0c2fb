"""The PeBR recipe above the trainers: the stages chained in one work directory (pipeline.py), the embedded
demo that builds its own model and data and runs them (demo.py), and what a run would do without running
it (dry_run.py, `--dry-run`)."""
