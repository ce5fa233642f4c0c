"""``python -m miniyaie serve|generate|chat|bench`` (see miniyaie/cli.py)."""
import sys

from miniyaie.cli import main

if __name__ == "__main__":
    sys.exit(main())
