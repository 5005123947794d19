"""Handwritten digits from scikit-learn's bundled set (``load_digits``: 1,797 8x8 images,
no download) as a WebDataset image corpus.

    corpus = generate(ImageDigitsConfig(labeled=100, unlabeled=10000), "data/image_digits")

Source images are partitioned once, from the seed and per class, into train sources and
held-out test sources (``test_fraction``), so no source image appears in both:
    labeled    a small class-balanced set of train source images, rendered as they are;
    unlabeled  augmented copies of random train source images (affine: rotation, scale,
               shift; then contrast, brightness, Gaussian noise), no labels;
    test       the held-out source images, rendered as they are.
Rendering: 0..16 ink -> white on black, a 1-pixel black margin, bicubic upscale to ``size`` x ``size``, RGB PNG.

Members of sample KEY (KEY = ``SPLIT-NNNNNN``):
    KEY.png   size x size RGB (the three channels are equal)                   all splits
    KEY.cls   ASCII class id "0".."9"                                        labeled/test
    KEY.json  {"source_index": i into load_digits(), "augment": {...} or null}  all splits
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np

from pipeline import storage
from recipes.corpus import common

CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
SPLITS: tuple[str, ...] = ("labeled", "unlabeled", "test")
LABELED_SPLITS = frozenset({"labeled", "test"})


@dataclass(frozen=True)
class ImageDigitsConfig:
    """Everything that determines the corpus bytes (recorded in corpus.json as ``generator``).

    test: number of held-out images (None = all held-out source images, ~25% of 1,797).
    labeled: at most the number of train source images; class-balanced.
    Ranges are (low, high), drawn uniformly per unlabeled image.
    """

    labeled: int = 100
    unlabeled: int = 10000
    test: int | None = None
    seed: int = 0
    shard_size: int = 1000
    size: int = 32
    test_fraction: float = 0.25
    rotation_deg: tuple[float, float] = (-15.0, 15.0)
    scale: tuple[float, float] = (0.85, 1.15)
    shift_frac: tuple[float, float] = (-0.1, 0.1)  # of the image size, per axis
    contrast: tuple[float, float] = (0.6, 1.2)
    brightness: tuple[float, float] = (-0.1, 0.2)
    noise_std: tuple[float, float] = (0.0, 0.15)

    def __post_init__(self):
        if self.labeled < 0 or self.unlabeled < 0 or (self.test is not None and self.test < 0):
            raise ValueError("split counts must be >= 0")
        if self.shard_size <= 0 or self.size < 8:
            raise ValueError("shard_size must be positive and size >= 8")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must be in (0, 1)")
        for name in ("rotation_deg", "scale", "shift_frac", "contrast", "brightness", "noise_std"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} > high {hi}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def load_sources() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float32 in [0, 1], targets (1797,) int64) from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def partition_sources(cfg: ImageDigitsConfig, targets: np.ndarray) -> dict[str, list[int]]:
    """{"train", "test", "labeled"} source indices: test held out per class (stratified),
    labeled a class-balanced subset of train, all chosen from the seed."""
    rng = common.partition_rng(cfg.seed, "image_digits/sources")
    train, test, per_class = [], [], []
    for c in range(len(CLASSES)):
        idx = np.nonzero(targets == c)[0]
        idx = idx[rng.permutation(len(idx))]
        n_test = max(1, int(round(cfg.test_fraction * len(idx))))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
        per_class.append(idx[n_test:].tolist())
    if cfg.labeled > len(train):
        raise ValueError(f"labeled={cfg.labeled} exceeds the {len(train)} train source images")
    # round-robin over classes (each in its own shuffled order) -> balanced labeled set
    labeled, depth = [], 0
    while len(labeled) < cfg.labeled:
        for c in range(len(CLASSES)):
            if depth < len(per_class[c]) and len(labeled) < cfg.labeled:
                labeled.append(int(per_class[c][depth]))
        depth += 1
    test = [int(test[i]) for i in rng.permutation(len(test))]  # mix classes across shards
    n_test = len(test) if cfg.test is None else cfg.test
    if n_test > len(test):
        raise ValueError(f"test={cfg.test} exceeds the {len(test)} held-out source images")
    labeled = [labeled[i] for i in rng.permutation(len(labeled))]
    return {"train": sorted(int(i) for i in train), "test": test[:n_test], "labeled": labeled}


def render(image: np.ndarray, size: int, augment: dict | None = None) -> np.ndarray:
    """(8, 8) float in [0, 1] -> (size, size) uint8, optionally augmented (see ``draw_augment``)."""
    from PIL import Image

    # a 1-pixel black margin (8x8 -> 10x10) so rotations and shifts do not cut strokes that touch the edge
    padded = np.pad(np.round(image * 255).astype(np.uint8), 1)
    img = Image.fromarray(padded).resize((size, size), Image.BICUBIC)
    if augment is None:
        return np.asarray(img)
    # Affine about the centre: p' = s R (p - c) + c + t. PIL wants the inverse map output -> input.
    th, s = math.radians(augment["rotation_deg"]), augment["scale"]
    tx, ty = augment["shift_x"] * size, augment["shift_y"] * size
    cx = cy = (size - 1) / 2.0
    a, b = math.cos(th) / s, math.sin(th) / s
    d, e = -math.sin(th) / s, math.cos(th) / s
    c0 = cx - a * (cx + tx) - b * (cy + ty)
    f0 = cy - d * (cx + tx) - e * (cy + ty)
    img = img.transform((size, size), Image.AFFINE, (a, b, c0, d, e, f0), resample=Image.BILINEAR, fillcolor=0)
    x = np.asarray(img, dtype=np.float32) / 255.0  # (size, size)
    x = (x - 0.5) * augment["contrast"] + 0.5 + augment["brightness"]
    noise_rng = np.random.default_rng(augment["noise_seed"])
    x = x + noise_rng.standard_normal(x.shape).astype(np.float32) * augment["noise_std"]
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def draw_augment(rng: np.random.Generator, settings: dict) -> dict:
    def u(name):
        lo, hi = settings[name]
        return float(lo + (hi - lo) * rng.random())

    return {
        "rotation_deg": round(u("rotation_deg"), 3), "scale": round(u("scale"), 4),
        "shift_x": round(u("shift_frac"), 4), "shift_y": round(u("shift_frac"), 4),
        "contrast": round(u("contrast"), 4), "brightness": round(u("brightness"), 4),
        "noise_std": round(u("noise_std"), 4), "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def encode_png(gray: np.ndarray) -> bytes:
    """(H, W) uint8 -> RGB PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_item(settings: dict, images: np.ndarray, targets: np.ndarray, split: str, index: int) -> tuple[np.ndarray, int | None, dict]:
    """(image (size, size) uint8, label or None, meta) for item ``index`` of ``split``."""
    src = settings["sources"]
    if split == "labeled":
        source, augment = src["labeled"][index], None
    elif split == "test":
        source, augment = src["test"][index], None
    else:
        rng = common.item_rng(settings["seed"], split, index)
        source = int(src["train"][int(rng.integers(0, len(src["train"])))])
        augment = draw_augment(rng, settings)
    image = render(images[source], settings["size"], augment)
    label = int(targets[source]) if split in LABELED_SPLITS else None
    return image, label, {"source_index": int(source), "augment": augment}


_SOURCES: dict = {}


def _sources() -> tuple[np.ndarray, np.ndarray]:
    if not _SOURCES:
        _SOURCES["v"] = load_sources()
    return _SOURCES["v"]


def make_shard(spec: common.ShardSpec, settings: dict, output: str) -> dict:
    """Render and atomically write one shard; returns its corpus.json entry."""
    images, targets = _sources()
    members = []
    for index in range(spec.start, spec.start + spec.count):
        key = common.key_for(spec.split, index, spec.split_count)
        image, label, meta = make_item(settings, images, targets, spec.split, index)
        members.append((f"{key}.png", encode_png(image)))
        if label is not None:
            members.append((f"{key}.cls", str(label).encode("ascii")))
        members.append((f"{key}.json", common.json_bytes(meta)))
    return common.write_shard(output, spec, members)


def resolve_settings(cfg: ImageDigitsConfig) -> dict:
    """The config plus the source partition (plain JSON types), as the workers get it."""
    _, targets = _sources()
    return {**cfg.to_dict(), "sources": partition_sources(cfg, targets)}


def generate(cfg: ImageDigitsConfig, output: str, progress=print, stats: dict | None = None) -> dict:
    """Generate the corpus under ``output`` (local path or s3://) as one Ray Data job; Ray
    must be initialised. Writes shards, removes stale ones, then ``corpus.json``; returns it.
    stats: if given, filled with ``common.run_stats`` (task and CPU seconds) of this run."""
    settings = resolve_settings(cfg)
    counts = {"labeled": cfg.labeled, "unlabeled": cfg.unlabeled, "test": len(settings["sources"]["test"])}
    specs = common.plan_shards(counts, cfg.shard_size)
    storage.makedirs(output)
    entries = common.run_generation(specs, make_shard, settings, output, progress=progress)
    if stats is not None:
        stats.update(common.run_stats(entries))
    for split in SPLITS:
        removed = common.remove_stale_shards(output, split, {e["path"] for e in entries})
        if removed and progress:
            progress(f"removed {len(removed)} stale shard(s) of an earlier run in {split}/")
    splits = common.splits_summary(entries, list(SPLITS))
    src = settings["sources"]
    for split, s in splits.items():
        s["labeled"] = split in LABELED_SPLITS
        s["augmented"] = split == "unlabeled"
        s["source_indices"] = {"labeled": src["labeled"], "unlabeled": src["train"], "test": src["test"]}[split]
    corpus = {
        "format": common.CORPUS_FORMAT,
        "version": common.CORPUS_VERSION,
        "name": "image_digits",
        "modality": "image",
        "level": "utterance",  # one label per item (the soft-target format's name for it)
        "classes": list(CLASSES),
        "num_classes": len(CLASSES),
        "image_size": [cfg.size, cfg.size],
        "channels": 3,
        "sample_rate": None,
        "frame_shift_ms": None,
        "members": {"image": "png", "label": "cls", "meta": "json"},
        "labeled_splits": [s for s in SPLITS if s in LABELED_SPLITS],
        "seed": cfg.seed,
        "splits": splits,
        "generator": {
            "module": __name__,
            "settings": cfg.to_dict(),
            "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 8x8)",
        },
        "software": common.software_versions("scikit-learn", "pillow", "numpy"),
    }
    common.write_corpus_json(output, corpus)
    return corpus
