"""Evaluate a run's checkpoint: `python eval.py run=<run folder> [key=value ...]` (see
metacl/evaluate.py). Writes <run folder>/eval-<overrides>.json; never touches results.json."""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: before torch is imported

from metacl.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
