# python jobs/pseudo_label.py --input data/digits/unlabeled --output runs/st --teacher runs/teacher/final
# ray job submit --working-dir . -- python jobs/pseudo_label.py --input s3://bucket/corpus --output s3://bucket/st --teacher ...
"""Pseudo-label a sharded corpus with teacher model(s) into the soft-target cache (see --help)."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the submitted pipeline/ must win over any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.teacher.job import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
