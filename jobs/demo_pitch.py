# python jobs/demo_pitch.py                 (make demo-pitch: CREPE -> a small pitch tracker, ~15 min on 2 cores)
# python jobs/demo_pitch.py --size small    (the reduced size the test suite runs)
"""Distil CREPE full into a small pitch tracker on unlabeled audio; compare with CREPE tiny (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.pitch_demo import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
