"""The pitch demo's report: results.json, results.md, rpa.png and contour.png, and the CPU
speed of each model (recipes/pitch_demo.py)."""

from __future__ import annotations

import io
import json
import tarfile
import time

import numpy as np

from pipeline import storage

SPEED_SECONDS = 4.0  # audio per timed forward


def measure_speed(specs: dict[str, str], seconds: float = SPEED_SECONDS, min_wall: float = 2.0) -> dict[str, dict]:
    """{name: {"params", "frames_per_s"}}: each model's forward on ``seconds`` of noise at its
    own hop, in this process (fp32, the threads torch has), after one warm-up call."""
    import torch

    from pipeline.models.runner import ModelRunner
    from pipeline.models.spec import build_model, parse_spec
    from pipeline.models.zoo import count_parameters

    out = {}
    x = torch.randn(1, int(16000 * seconds)) * 0.1
    lengths = torch.tensor([x.shape[1]])
    for name, spec in specs.items():
        model = build_model(parse_spec(spec)).eval()
        runner = ModelRunner([model], model.kdpipe_preprocessing, "cpu")
        frames = int(runner.predict(x, lengths).frames[0])
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_wall or n < 2:
            runner.predict(x, lengths)
            n += 1
        out[name] = {"params": count_parameters(model), "frames_per_s": round(n * frames / (time.perf_counter() - t0), 1)}
    return out


def _first_test_clip(test_dir: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(key, 16 kHz waveform, f0 per 10 ms) of the first clip of the test split."""
    import soundfile as sf

    first = sorted(u for u in storage.listdir(test_dir) if u.endswith(".tar"))[0]
    members: dict[str, bytes] = {}
    with storage.open_read(first) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        key = None
        for m in tar:
            k, ext = m.name.split(".", 1)
            if key is None:
                key = k
            if k != key:
                break
            members[ext] = tar.extractfile(m).read()
    wave, _ = sf.read(io.BytesIO(members["flac"]), dtype="float32")
    f0 = np.load(io.BytesIO(members["f0.npy"]), allow_pickle=False)
    return key, wave, f0


def contours(specs: dict[str, str], wave: np.ndarray) -> dict[str, np.ndarray]:
    """{name: pitch in Hz per frame} of each model on one clip (CREPE's local-average decoding)."""
    import torch

    from pipeline import pitch
    from pipeline.models.runner import ModelRunner
    from pipeline.models.spec import build_model, parse_spec

    out = {}
    x = torch.from_numpy(wave)[None]
    for name, spec in specs.items():
        model = build_model(parse_spec(spec)).eval()
        o = ModelRunner([model], model.kdpipe_preprocessing, "cpu").predict(x, torch.tensor([x.shape[1]]))
        out[name] = pitch.cents_to_hz(pitch.decode(o.logits[0][0, : int(o.frames[0])]).numpy())
    return out


def _stats(values: list[float]) -> dict:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(a):
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()),
            "max": float(a.max()), "n": int(len(a))}


def write_report(out: str, specs: dict[str, str], evals: dict[str, dict], runs: list[dict], speed: dict,
                 corpus: dict, test_dir: str, timings: dict[str, float], hop_ms: float) -> str:
    """results.json, results.md, rpa.png, contour.png in ``out``; returns the markdown table.

    hop_ms: the frame shift every model in ``specs`` runs at (the evaluation's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline import pitch

    per_model = {name: evals[spec] for name, spec in specs.items()}
    rows = []
    for name in ("crepe_full", "crepe_tiny"):
        p = per_model[name]["pitch"]
        rows.append({"model": name, "what": "CREPE full (the teacher)" if name == "crepe_full" else "CREPE tiny",
                     "params": speed[name]["params"], "frames_per_s": speed[name]["frames_per_s"],
                     "rpa": _stats([p["rpa"]]), "rca": _stats([p["rca"]]),
                     "voicing_recall": p["voicing_recall"], "voicing_false_alarm": p["voicing_false_alarm"]})
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r)
    for variant, rs in by_variant.items():
        ps = [per_model[r["name"]]["pitch"] for r in rs]
        rows.append({"model": f"student_{variant}", "what": rs[0]["what"], "params": speed["student"]["params"],
                     "frames_per_s": speed["student"]["frames_per_s"], "seeds": [r["seed"] for r in rs],
                     "rpa": _stats([p["rpa"] for p in ps]), "rca": _stats([p["rca"] for p in ps]),
                     "rpa_each": [p["rpa"] for p in ps], "train_seconds": [r["train_seconds"] for r in rs]})
    counts = {n: s["count"] for n, s in corpus["splits"].items()}
    summary = {"models": rows, "per_checkpoint": per_model, "corpus": {"counts": counts},
               "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    storage.atomic_write_bytes(storage.join(out, "results.json"), (json.dumps(summary, indent=1) + "\n").encode())

    def pct(s):
        return "-" if s["mean"] is None else (f"{100 * s['mean']:.1f}" + (f" ± {100 * s['sd']:.1f}" if s["n"] > 1 else ""))

    lines = ["| model | trained on | params | CPU frames/s | test RPA % | test RCA % |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['what']} | {r['params']:,} | {r['frames_per_s']:,.0f} | {pct(r['rpa'])} | "
                     f"{pct(r['rca'])} |")
    table = "\n".join(lines)
    md = (f"# demo-pitch results\n\nTest set: {counts.get('test')} clips (held-out f0 bands and timbres), every "
          f"model at {hop_ms:g} ms frames; RPA = voiced frames within 50 cents, RCA = the same modulo octaves; students: mean ± sd "
          f"over seeds.\n\n{table}\n\nTimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n")
    storage.atomic_write_bytes(storage.join(out, "results.md"), md.encode())

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["model"] for r in rows][::-1]
    means = [100 * (r["rpa"]["mean"] or 0) for r in rows][::-1]
    errs = [100 * (r["rpa"]["sd"] or 0) for r in rows][::-1]
    bars = ax.barh(names, means, xerr=errs, color=["#888" if n.startswith("crepe") else "#3a7" for n in names])
    ax.bar_label(bars, fmt="%.1f", padding=3)
    ax.set_xlabel("test raw pitch accuracy (%)")
    ax.set_xlim(min(means) - 10, 100)
    storage.atomic_write_bytes(storage.join(out, "rpa.png"), _png(fig))
    plt.close(fig)

    key, wave, f0 = _first_test_clip(test_dir)
    shown = {"crepe_full": specs["crepe_full"], "crepe_tiny": specs["crepe_tiny"]}
    for variant, rs in by_variant.items():
        shown[f"student_{variant}"] = specs[rs[0]["name"]]
    est = contours(shown, wave)
    fig, ax = plt.subplots(figsize=(9, 4))
    t10 = np.arange(len(f0)) * 0.01
    ax.plot(t10, np.where(f0 > 0, f0, np.nan), color="k", lw=3, alpha=0.35, label="truth")
    for name, hz in est.items():
        t = np.arange(len(hz)) * hop_ms / 1000
        voiced = pitch.align_reference(f0, float(hop_ms), len(hz)) > 0
        ax.plot(t, np.where(voiced, hz, np.nan), marker=".", lw=1, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("f0 (Hz)")
    ax.set_title(f"test clip {key}: pitch where the truth is voiced")
    ax.legend(fontsize=7, ncol=2)
    storage.atomic_write_bytes(storage.join(out, "contour.png"), _png(fig))
    plt.close(fig)
    return table


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()
