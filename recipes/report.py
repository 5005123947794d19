"""The demo's report: results.json, results.md and PNG plots in the run directory."""

from __future__ import annotations

import io
import json

import numpy as np

from pipeline import storage
from pipeline.shards import SoftTargetRun
from pipeline.student.train import read_metrics


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def teacher_confidence(cache: str) -> np.ndarray:
    """The teacher's max probability for every sample (every frame) of the cache, (N,) float32."""
    run = SoftTargetRun(cache)
    return np.concatenate([run.read_numpy(n)["confidence"].astype(np.float32) for n in run.shard_names])


def markdown_table(results: list[dict]) -> str:
    lines = ["| model | trained on | test accuracy | train s | checkpoint |", "|---|---|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['description']} | {100 * r['test_accuracy']:.1f}% | {r['train_seconds']} | "
                     f"`{r['checkpoint']}` |")
    return "\n".join(lines)


def write_report(out: str, results: list[dict], cache: str, checkpoints: dict[str, str], corpus: dict,
                 timings: dict[str, float]) -> str:
    """Writes results.json, results.md, accuracy.png, learning_curves.png, teacher_confidence.png
    into ``out``; returns the markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = teacher_confidence(cache)
    counts = {name: s["count"] for name, s in corpus["splits"].items()}
    summary = {
        "models": results,
        "corpus": {"name": corpus.get("name"), "modality": corpus.get("modality"), "counts": counts},
        "teacher_confidence": {"mean": float(conf.mean()), "median": float(np.median(conf)),
                               "share_above_0.9": float((conf > 0.9).mean())},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    storage.atomic_write_bytes(storage.join(out, "results.json"), (json.dumps(summary, indent=1) + "\n").encode())

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["name"] for r in results]
    accs = [100 * r["test_accuracy"] for r in results]
    bars = ax.barh(names[::-1], accs[::-1], color=["#888" if n == "teacher" else "#3a7" for n in names[::-1]])
    ax.bar_label(bars, fmt="%.1f%%", padding=3)
    ax.set_xlabel("test accuracy (%)")
    ax.set_xlim(0, 105)
    ax.set_title("Test accuracy per model")
    storage.atomic_write_bytes(storage.join(out, "accuracy.png"), _png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, path in checkpoints.items():
        hist = read_metrics(path)
        if not hist:  # every trained model has its history: an empty plot would hide a lost file
            raise FileNotFoundError(f"{storage.join(path, 'metrics.jsonl')}: no training metrics for {name}")
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], marker="o", ms=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Learning curves (loss per epoch)")
    ax.legend(fontsize=8)
    storage.atomic_write_bytes(storage.join(out, "learning_curves.png"), _png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(conf, bins=40, range=(0, 1), color="#37a")
    ax.set_xlabel("teacher confidence (max probability)")
    ax.set_ylabel("pool samples")
    ax.set_title(f"Teacher confidence on the unlabeled pool (n={len(conf):,})")
    storage.atomic_write_bytes(storage.join(out, "teacher_confidence.png"), _png(fig))
    plt.close(fig)

    table = markdown_table(results)
    md = [f"# kdpipe demo: {corpus.get('name')}", "",
          f"Corpus: {counts.get('labeled')} labeled, {counts.get('unlabeled')} unlabeled, {counts.get('test')} test "
          f"(test speakers/images held out from every training split).", "", table, "",
          f"Teacher confidence on the pool: mean {conf.mean():.3f}, {100 * (conf > 0.9).mean():.0f}% above 0.9.", "",
          "![accuracy](accuracy.png) ![learning curves](learning_curves.png) "
          "![teacher confidence](teacher_confidence.png)", "",
          "Time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    storage.atomic_write_bytes(storage.join(out, "results.md"), "\n".join(md).encode())
    return table
