# python jobs/make_spoken_digits.py --output data/digits --labeled 300 --unlabeled 6000 --test 1000
"""Synthesise the spoken-digits corpus (eSpeak NG, noise, 16 kHz FLAC in WebDataset shards)
as a Ray Data job. The logic lives in recipes/corpus/spoken_digits.py.

    python jobs/make_spoken_digits.py --output data/digits_frames --frame-level
    ray job submit --working-dir . -- python jobs/make_spoken_digits.py --output s3://bucket/digits --unlabeled 1000000
    python jobs/make_spoken_digits.py --list-voices
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline/, also under `ray job submit`

from recipes.corpus import spoken_digits as sd  # noqa: E402
from recipes.corpus import tts  # noqa: E402

D = sd.SpokenDigitsConfig()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="data/digits",
        help="corpus root: local directory or s3:// URI (default %(default)s)")
    p.add_argument("--labeled", type=int, default=D.labeled,
        help="utterances in the labeled split (default %(default)s)")
    p.add_argument("--unlabeled", type=int, default=D.unlabeled,
        help="utterances in the unlabeled pool, written without labels (default %(default)s)")
    p.add_argument("--test", type=int, default=D.test,
        help="utterances in the test split, from held-out voices and variants (default %(default)s)")
    p.add_argument("--seed", type=int, default=D.seed,
        help="seed; the same seed and settings give byte-identical shards (default %(default)s)")
    p.add_argument("--frame-level", action="store_true",
        help="sequences of 2-5 digits with a label per 10 ms frame (KEY.frames.npy, class 10 = silence) "
             "instead of one digit per utterance with KEY.cls")
    p.add_argument("--shard-size", type=int, default=D.shard_size,
        help="utterances per tar shard; one Ray task per shard (default %(default)s)")
    p.add_argument("--sample-rate", type=int, default=D.sample_rate,
        help="output sample rate in Hz (default %(default)s)")
    p.add_argument("--voices", nargs="+", default=None, metavar="VOICE",
        help=f"eSpeak language voices to draw from (default: all English ones: {' '.join(tts.ENGLISH_VOICES)})")
    p.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
        help="eSpeak voice variants to draw from "
             "(default: all shipped ones except whispers, robots and effects; see --list-voices)")
    p.add_argument("--test-voice-fraction", type=float, default=D.test_voice_fraction,
        help="share of voices held out for the test split; 0 = all splits share voices (default %(default)s)")
    p.add_argument("--test-variant-fraction", type=float, default=D.test_variant_fraction,
        help="share of variants held out for the test split; 0 = all splits share variants (default %(default)s)")
    p.add_argument("--rate-wpm", type=int, nargs=2, default=D.rate_wpm, metavar=("LO", "HI"),
        help="speaking rate range, words per minute, 80..450 (default %(default)s)")
    p.add_argument("--pitch", type=int, nargs=2, default=D.pitch, metavar=("LO", "HI"),
        help="eSpeak pitch range 0..100, 50 = the voice's own (default %(default)s)")
    p.add_argument("--pitch-range", type=int, nargs=2, default=D.pitch_range, metavar=("LO", "HI"),
        help="eSpeak intonation range 0..100 (default %(default)s)")
    p.add_argument("--volume", type=int, nargs=2, default=D.volume, metavar=("LO", "HI"),
        help="eSpeak volume range 0..200, 100 = normal (default %(default)s)")
    p.add_argument("--snr-db", type=float, nargs=2, default=D.snr_db, metavar=("LO", "HI"),
        help="signal-to-noise ratio range in dB, against the spoken frames' power (default %(default)s)")
    p.add_argument("--noise-colours", nargs="+", default=list(D.noise_colours), choices=list(sd.NOISE_COLOURS),
        help="noise colours drawn from (default: all)")
    p.add_argument("--lead-silence", type=float, nargs=2, default=D.lead_silence_s, metavar=("LO", "HI"),
        help="leading silence range in seconds (default %(default)s)")
    p.add_argument("--trail-silence", type=float, nargs=2, default=D.trail_silence_s, metavar=("LO", "HI"),
        help="trailing silence range in seconds (default %(default)s)")
    p.add_argument("--gap", type=float, nargs=2, default=D.gap_s, metavar=("LO", "HI"),
        help="frame level: silence between digits, seconds (default %(default)s)")
    p.add_argument("--digits-per-utterance", type=int, nargs=2, default=D.digits_per_utterance, metavar=("LO", "HI"),
        help="frame level: digits per utterance (default %(default)s)")
    p.add_argument("--vad-threshold-db", type=float, default=D.vad_threshold_db,
        help="frame labels: a word is spoken from its first to its last 10 ms frame within this many dB "
             "of its loudest frame (default %(default)s)")
    p.add_argument("--address", default=None,
        help="Ray cluster address; default: $RAY_ADDRESS if set, else start an embedded local Ray")
    p.add_argument("--num-cpus", type=int, default=None,
        help="CPUs for an embedded local Ray (default: all); ignored when connecting to a cluster")
    p.add_argument("--list-voices", action="store_true", help="print the shipped voices and variants and exit")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> sd.SpokenDigitsConfig:
    return sd.SpokenDigitsConfig(
        labeled=a.labeled, unlabeled=a.unlabeled, test=a.test, seed=a.seed, frame_level=a.frame_level,
        shard_size=a.shard_size, sample_rate=a.sample_rate, voices=tuple(a.voices or ()), variants=tuple(a.variants or ()),
        test_voice_fraction=a.test_voice_fraction, test_variant_fraction=a.test_variant_fraction,
        rate_wpm=tuple(a.rate_wpm), pitch=tuple(a.pitch), pitch_range=tuple(a.pitch_range), volume=tuple(a.volume),
        snr_db=tuple(a.snr_db), noise_colours=tuple(a.noise_colours), lead_silence_s=tuple(a.lead_silence),
        trail_silence_s=tuple(a.trail_silence), gap_s=tuple(a.gap), digits_per_utterance=tuple(a.digits_per_utterance),
        vad_threshold_db=a.vad_threshold_db,
    )


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.list_voices:
        print("voices:  ", " ".join(tts.available_voices()))
        print("variants:", " ".join(repr(v) if " " in v else v for v in tts.available_variants()))
        print("default variants exclude:", " ".join(sorted(repr(v) if " " in v else v for v in tts.UNUSUAL_VARIANTS)))
        return 0
    cfg = config_from_args(a)  # validated before Ray starts

    import os

    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        local = a.address is None and not os.environ.get("RAY_ADDRESS")
        ray.init(address=a.address, num_cpus=a.num_cpus if local else None)
    t_ray = time.perf_counter() - t0
    speakers = sd.partition_speakers(cfg)
    print(f"spoken digits -> {a.output}: labeled={cfg.labeled} unlabeled={cfg.unlabeled} test={cfg.test} "
          f"level={'frame' if cfg.frame_level else 'utterance'} seed={cfg.seed}")
    print(f"train speakers: {len(speakers['train']['voices'])} voices x {len(speakers['train']['variants'])} variants; "
          f"test speakers: {speakers['test']['voices']} x {len(speakers['test']['variants'])} variants")
    t1 = time.perf_counter()
    stats: dict = {}
    corpus = sd.generate(cfg, a.output, stats=stats)
    secs = time.perf_counter() - t1
    n = sum(s["count"] for s in corpus["splits"].values())
    audio_s = sum(s["audio_seconds"] for s in corpus["splits"].values())
    print("\nsplit       utterances  shards  audio_h      MB")
    for name, s in corpus["splits"].items():
        print(f"{name:<10} {s['count']:>11} {len(s['shards']):>7} {s['audio_seconds'] / 3600:>8.2f} {s['bytes'] / 1e6:>7.1f}")
    print(f"\n{n} utterances ({audio_s / 3600:.2f} h of audio) in {secs:.1f}s = {n / max(secs, 1e-9):.0f} utterances/s "
          f"(Ray start {t_ray:.1f}s not included); corpus.json at {a.output}")
    print(f"tasks used {stats['cpu_seconds']:.1f} CPU-s = {1000 * stats['cpu_seconds'] / max(n, 1):.1f} ms per utterance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
