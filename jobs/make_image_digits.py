# python jobs/make_image_digits.py --output data/image_digits --labeled 100 --unlabeled 10000
"""Build the handwritten-digits image corpus (scikit-learn's bundled 8x8 digits, upscaled,
augmented into an unlabeled pool; RGB PNG in WebDataset shards) as a Ray Data job. The logic
lives in recipes/corpus/image_digits.py.

    ray job submit --working-dir . -- python jobs/make_image_digits.py --output s3://bucket/image_digits
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline/, also under `ray job submit`

from recipes.corpus import image_digits as im  # noqa: E402

D = im.ImageDigitsConfig()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="data/image_digits",
        help="corpus root: local directory or s3:// URI (default %(default)s)")
    p.add_argument("--labeled", type=int, default=D.labeled,
        help="labeled images: class-balanced original train images (default %(default)s)")
    p.add_argument("--unlabeled", type=int, default=D.unlabeled,
        help="unlabeled pool: augmented copies of train images, no labels (default %(default)s)")
    p.add_argument("--test", type=int, default=None,
        help="test images, all from held-out source images (default: every held-out image)")
    p.add_argument("--test-fraction", type=float, default=D.test_fraction,
        help="share of the 1,797 source images held out for test, per class (default %(default)s)")
    p.add_argument("--seed", type=int, default=D.seed,
        help="seed; the same seed and settings give byte-identical shards (default %(default)s)")
    p.add_argument("--shard-size", type=int, default=D.shard_size,
        help="images per tar shard; one Ray task per shard (default %(default)s)")
    p.add_argument("--size", type=int, default=D.size, help="output width and height in pixels (default %(default)s)")
    p.add_argument("--rotation-deg", type=float, nargs=2, default=D.rotation_deg, metavar=("LO", "HI"),
        help="augmentation: rotation range in degrees (default %(default)s)")
    p.add_argument("--scale", type=float, nargs=2, default=D.scale, metavar=("LO", "HI"),
        help="augmentation: scale range (default %(default)s)")
    p.add_argument("--shift", type=float, nargs=2, default=D.shift_frac, metavar=("LO", "HI"),
        help="augmentation: shift range per axis, as a fraction of the size (default %(default)s)")
    p.add_argument("--contrast", type=float, nargs=2, default=D.contrast, metavar=("LO", "HI"),
        help="augmentation: contrast factor range (default %(default)s)")
    p.add_argument("--brightness", type=float, nargs=2, default=D.brightness, metavar=("LO", "HI"),
        help="augmentation: brightness offset range, in [0, 1] units (default %(default)s)")
    p.add_argument("--noise-std", type=float, nargs=2, default=D.noise_std, metavar=("LO", "HI"),
        help="augmentation: Gaussian pixel noise std range, in [0, 1] units (default %(default)s)")
    p.add_argument("--address", default=None,
        help="Ray cluster address; default: $RAY_ADDRESS if set, else start an embedded local Ray")
    p.add_argument("--num-cpus", type=int, default=None,
        help="CPUs for an embedded local Ray (default: all); ignored when connecting to a cluster")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> im.ImageDigitsConfig:
    return im.ImageDigitsConfig(
        labeled=a.labeled, unlabeled=a.unlabeled, test=a.test, seed=a.seed, shard_size=a.shard_size, size=a.size,
        test_fraction=a.test_fraction, rotation_deg=tuple(a.rotation_deg), scale=tuple(a.scale),
        shift_frac=tuple(a.shift), contrast=tuple(a.contrast), brightness=tuple(a.brightness), noise_std=tuple(a.noise_std),
    )


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = config_from_args(a)  # validated before Ray starts

    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        local = a.address is None and not os.environ.get("RAY_ADDRESS")
        ray.init(address=a.address, num_cpus=a.num_cpus if local else None)
    t_ray = time.perf_counter() - t0
    print(f"image digits -> {a.output}: labeled={cfg.labeled} unlabeled={cfg.unlabeled} "
          f"test={'all held-out' if cfg.test is None else cfg.test} seed={cfg.seed}")
    t1 = time.perf_counter()
    stats: dict = {}
    corpus = im.generate(cfg, a.output, stats=stats)
    secs = time.perf_counter() - t1
    n = sum(s["count"] for s in corpus["splits"].values())
    print("\nsplit          images  shards  sources      MB")
    for name, s in corpus["splits"].items():
        print(f"{name:<10} {s['count']:>10} {len(s['shards']):>7} {len(s['source_indices']):>8} {s['bytes'] / 1e6:>7.1f}")
    print(f"\n{n} images in {secs:.1f}s = {n / max(secs, 1e-9):.0f} images/s (Ray start {t_ray:.1f}s not included); "
          f"corpus.json at {a.output}")
    print(f"tasks used {stats['cpu_seconds']:.1f} CPU-s = {1000 * stats['cpu_seconds'] / max(n, 1):.2f} ms per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
