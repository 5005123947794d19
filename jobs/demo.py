# python jobs/demo.py            (make demo: spoken digits, ~10 min on 2 cores)
# python jobs/demo.py --modality image   (make demo-images)
"""The main job: corpus -> teacher -> soft-target cache -> students -> evaluation -> report (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.demo import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
