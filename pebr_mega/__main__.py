"""`python -m pebr_mega` is the `pebr` command."""
from pebr_mega.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
