"""The overnight loop: an LLM edits train.py, we train for a fixed budget, keep or revert.

This file is the door; the machinery is the package autoresearch/ (see its __init__).

Usage: python driver.py [--tag nov22] [--max-experiments N] [--deadline 07:30] [--max-cost 20]
       python driver.py report [--tsv results.tsv]
"""

import sys

from autoresearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
