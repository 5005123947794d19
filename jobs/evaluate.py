# python jobs/evaluate.py --checkpoint runs/student/final --input data/digits/test --output runs/eval.json
# ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://bucket/student/final --input s3://bucket/test
"""Evaluate a checkpoint: accuracy on labeled shards, agreement/KL on a soft-target run (see --help)."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the submitted pipeline/ must win over any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.student.evaluate import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
