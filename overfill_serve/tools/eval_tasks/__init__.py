"""Tiny lm-eval tasks shipped with overfill-serve (`overfill-serve eval --include_path` this directory).

`overfill_tiny_mc` (multiple choice: loglikelihood requests) and `overfill_tiny_gen` (generate_until) on one
20-row JSONL; the tag `overfill_tiny` runs both. `TASKS_DIR` is this directory.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
