# python jobs/train_student.py --soft-targets runs/st --student 'pipeline.models.zoo:audio_cnn?width=8' --output runs/student
# ray job submit --working-dir . -- python jobs/train_student.py --soft-targets s3://bucket/st --student ... --output s3://bucket/student
"""Train a student with Ray Train from cached soft targets and/or labeled data (see --help)."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the submitted pipeline/ must win over any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.student.job import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
