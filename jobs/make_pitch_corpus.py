# python jobs/make_pitch_corpus.py --output data/pitch --pool 600 --labeled 40 --test 100
"""Generate the pitch corpus (synthesised voiced signals with exact f0, and eSpeak NG speech
for the unlabeled pool; 16 kHz FLAC in WebDataset shards) as a Ray Data job. The logic lives
in recipes/corpus/pitch.py.

    python jobs/make_pitch_corpus.py --output data/pitch --label-hop-ms 40
    ray job submit --working-dir . -- python jobs/make_pitch_corpus.py --output s3://bucket/pitch --pool 100000
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline/, also under `ray job submit`

from recipes.corpus import pitch as pc  # noqa: E402

D = pc.PitchCorpusConfig()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output", default="data/pitch", help="corpus root: local directory or s3:// URI (default %(default)s)")
    p.add_argument("--pool", type=int, default=D.pool, help="clips in the unlabeled pool (default %(default)s)")
    p.add_argument("--labeled", type=int, default=D.labeled, help="clips in the labeled split (default %(default)s)")
    p.add_argument("--test", type=int, default=D.test,
                   help="clips in the test split, from held-out timbres and f0 bands (default %(default)s)")
    p.add_argument("--seed", type=int, default=D.seed,
                   help="seed; the same seed and settings give byte-identical shards (default %(default)s)")
    p.add_argument("--shard-size", type=int, default=D.shard_size, help="clips per tar shard (default %(default)s)")
    p.add_argument("--clip-seconds", type=float, nargs=2, default=D.clip_seconds, metavar=("LO", "HI"),
                   help="clip length range in seconds (default %(default)s)")
    p.add_argument("--label-hop-ms", type=float, default=D.label_hop_ms,
                   help="frame shift of KEY.frames.npy, a multiple of 10 ms; KEY.f0.npy is always at 10 ms "
                        "(default %(default)s)")
    p.add_argument("--pool-speech-fraction", type=float, default=D.pool_speech_fraction,
                   help="share of pool clips that are eSpeak speech (default %(default)s)")
    p.add_argument("--band-cents", type=float, default=D.band_cents,
                   help="width of the f0 bands that alternate between train and test (default %(default)s)")
    p.add_argument("--snr-db", type=float, nargs="+", default=list(D.snr_db_choices),
                   help="SNRs (dB) drawn from for synthesised clips (default %(default)s)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address; default: $RAY_ADDRESS if set, else start an embedded local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for an embedded local Ray (default: all)")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> pc.PitchCorpusConfig:
    return pc.PitchCorpusConfig(
        pool=a.pool, labeled=a.labeled, test=a.test, seed=a.seed, shard_size=a.shard_size,
        clip_seconds=tuple(a.clip_seconds), label_hop_ms=a.label_hop_ms, pool_speech_fraction=a.pool_speech_fraction,
        band_cents=a.band_cents, snr_db_choices=tuple(a.snr_db),
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
    part = pc.partition(cfg)
    print(f"pitch corpus -> {a.output}: pool={cfg.pool} labeled={cfg.labeled} test={cfg.test} seed={cfg.seed} "
          f"label hop {cfg.label_hop_ms:g} ms")
    print(f"f0 bands (cents above 10 Hz): train {[(round(x), round(y)) for x, y in part['train']['bands']]}, "
          f"test {[(round(x), round(y)) for x, y in part['test']['bands']]}; test vowels {part['test']['vowels']}")
    t1 = time.perf_counter()
    stats: dict = {}
    corpus = pc.generate(cfg, a.output, stats=stats)
    secs = time.perf_counter() - t1
    n = sum(s["count"] for s in corpus["splits"].values())
    print("\nsplit     clips  shards  audio_s      MB")
    for name, s in corpus["splits"].items():
        print(f"{name:<8} {s['count']:>6} {len(s['shards']):>7} {s['audio_seconds']:>8.1f} {s['bytes'] / 1e6:>7.1f}")
    print(f"\n{n} clips in {secs:.1f}s (Ray start {t_ray:.1f}s not included); "
          f"tasks used {stats['cpu_seconds']:.1f} CPU-s; corpus.json at {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
