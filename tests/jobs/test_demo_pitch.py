"""The pitch recipe at reduced size, through the real jobs: CREPE full pseudo-labels the pool,
one student per variant trains, every model is evaluated with the pitch metrics, and the
report is written. The evaluation equals a direct computation with pipeline.pitch."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from recipes.pitch_demo import run
from pipeline.shards import SoftTargetRun


def test_demo_pitch_small(tmp_path, ray_local, capsys):
    out = tmp_path / "pitch"
    assert run(["--size", "small", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    cache = SoftTargetRun(str(out / "softtargets"))
    m = cache.manifest
    assert (m.level, m.num_classes, m.frame_shift_ms, m.k) == ("frame", 360, 80.0, 10)
    assert m.teacher["specs"][0].startswith("pipeline.models.zoo:crepe_full")
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    assert set(rows) == {"crepe_full", "crepe_tiny", "student_labeled_only", "student_hard_pseudo",
                         "student_soft_k10", "student_soft_k3"}
    assert rows["crepe_full"]["params"] == 22_239_976 and rows["crepe_tiny"]["params"] == 486_552
    assert all(r["params"] < rows["crepe_tiny"]["params"] / 4 for n, r in rows.items() if n.startswith("student"))
    for r in rows.values():
        assert 0 <= r["rpa"]["mean"] <= r["rca"]["mean"] <= 1 and r["frames_per_s"] > 0
    # CREPE is a real pitch tracker: it finds most voiced frames of the held-out test split
    assert rows["crepe_full"]["rpa"]["mean"] > 0.8 and rows["crepe_tiny"]["rpa"]["mean"] > 0.8
    for f in ("results.md", "rpa.png", "contour.png"):
        assert (out / f).stat().st_size > 800, f
    assert "| student_soft_k10 |" in (out / "results.md").read_text() and "crepe_tiny" in text

    # evaluate.py's RPA for CREPE tiny equals a direct computation over the test split
    import torch

    from pipeline import pitch
    from pipeline.models.runner import ModelRunner
    from pipeline.models.spec import build_model, parse_spec
    from pipeline.modalities.audio import decode_audio

    spec = results["per_checkpoint"]["crepe_tiny"]["checkpoint"]
    model = build_model(parse_spec(spec)).eval()
    runner = ModelRunner([model], model.kdpipe_preprocessing, "cpu")
    counts = pitch.PitchCounts()
    for shard in sorted((out / "data" / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {mm.name: tar.extractfile(mm).read() for mm in tar}
        for key in sorted({n.split(".")[0] for n in members}):
            wave = decode_audio(members[f"{key}.flac"])[0]
            f0 = np.load(io.BytesIO(members[f"{key}.f0.npy"]))
            o = runner.predict(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
            T = int(o.frames[0])
            logits = o.logits[0][0, :T]
            counts = counts + pitch.pitch_counts(pitch.decode(logits).numpy(), pitch.align_reference(f0, 40.0, T),
                                                 pitch.confidence(logits, "sigmoid").numpy())
    got = results["per_checkpoint"]["crepe_tiny"]["pitch"]
    assert got["voiced_frames"] == counts.voiced and got["rpa"] == pytest.approx(counts.metrics()["rpa"], abs=1e-9)
    assert got["voicing_recall"] == pytest.approx(counts.metrics()["voicing_recall"], abs=1e-9)
