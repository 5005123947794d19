"""Spoken digits "zero".."nine" synthesised with eSpeak NG, in noise, as WebDataset shards.

    corpus = generate(SpokenDigitsConfig(labeled=300, unlabeled=6000, test=1000), "data/digits")

Each utterance: a random speaker (language voice + variant, from the split's speaker pool),
speaking rate, pitch, pitch range and volume; the word(s) synthesised at 22,050 Hz and
resampled to 16 kHz; random leading/trailing silence (and, at frame level, random gaps
between 2-5 digits); coloured noise (white, pink, brown, blue, violet) over the whole
utterance at a random SNR; peak-limited to 0.99 and stored as 16-bit FLAC.

Speakers: the voices and the variants are each partitioned once (from the seed) into a
train part and a test part; ``labeled`` and ``unlabeled`` draw from train x train, ``test``
from test x test, so no test voice and no test variant is ever heard in training.

Members of sample KEY (KEY = ``SPLIT-NNNNNN``):
    KEY.flac         16 kHz mono, FLAC PCM_16                                     all splits
    KEY.cls          ASCII class id "0".."9"                      utterance level, labeled/test
    KEY.frames.npy   (T,) int16, T = ceil(num_samples / 160): 0..9 while that digit is
                     spoken, 10 = silence                           frame level, labeled/test
    KEY.json         generation metadata: voice, variant, rate_wpm, pitch, pitch_range,
                     volume, noise, snr_db, num_samples; plus text, label(s) and word spans
                     (in 10 ms frames) for labeled/test only, so the unlabeled pool carries
                     no labels.

Spoken region of a word: the clean TTS word is cut into 10 ms frames; the first through
the last frame whose RMS is within ``vad_threshold_db`` of the word's loudest frame is the
digit (stop closures inside a word stay part of it). eSpeak pads each word with a low hum
at about -35 dB, hence the -30 dB default. Every silence and every word is a whole number of
10 ms frames, so the frame labels are exact, not rounded.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline import storage
from recipes.corpus import common, tts

DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SILENCE = "silence"
SILENCE_CLASS = 10
SPLITS: tuple[str, ...] = ("labeled", "unlabeled", "test")
LABELED_SPLITS = frozenset({"labeled", "test"})
# spectral slope beta: power spectral density ~ 1 / f^beta
NOISE_COLOURS: dict[str, float] = {"white": 0.0, "pink": 1.0, "brown": 2.0, "blue": -1.0, "violet": -2.0}
FRAME_SHIFT_MS = 10.0


@dataclass(frozen=True)
class SpokenDigitsConfig:
    """Everything that determines the corpus bytes (recorded in corpus.json as ``generator``).

    Ranges are (low, high), drawn uniformly per utterance; ints inclusive.
    voices / variants: empty = all shipped English voices / ``tts.default_variants()``.
    test_voice_fraction, test_variant_fraction: share of voices / variants held out for the
    test split (at least one of each side when > 0; 0 = shared by all splits).
    """

    labeled: int = 300
    unlabeled: int = 6000
    test: int = 1000
    seed: int = 0
    frame_level: bool = False
    shard_size: int = 500
    sample_rate: int = 16000
    voices: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    test_voice_fraction: float = 0.25
    test_variant_fraction: float = 0.25
    rate_wpm: tuple[int, int] = (120, 220)
    pitch: tuple[int, int] = (20, 80)
    pitch_range: tuple[int, int] = (20, 80)
    volume: tuple[int, int] = (50, 140)
    snr_db: tuple[float, float] = (0.0, 20.0)
    noise_colours: tuple[str, ...] = tuple(NOISE_COLOURS)
    lead_silence_s: tuple[float, float] = (0.05, 0.3)
    trail_silence_s: tuple[float, float] = (0.05, 0.3)
    gap_s: tuple[float, float] = (0.05, 0.3)
    digits_per_utterance: tuple[int, int] = (2, 5)
    vad_threshold_db: float = -30.0

    def __post_init__(self):
        for name in ("labeled", "unlabeled", "test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.shard_size <= 0:
            raise ValueError("shard_size must be positive")
        if self.sample_rate % 100 != 0:
            raise ValueError("sample_rate must be a multiple of 100 Hz (whole samples per 10 ms frame)")
        for name in ("rate_wpm", "pitch", "pitch_range", "volume", "snr_db", "lead_silence_s",
                     "trail_silence_s", "gap_s", "digits_per_utterance"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} > high {hi}")
        if not (80 <= self.rate_wpm[0] and self.rate_wpm[1] <= 450):
            raise ValueError("rate_wpm must lie in eSpeak's 80..450")
        if self.digits_per_utterance[0] < 1:
            raise ValueError("digits_per_utterance must be >= 1")
        for c in self.noise_colours:
            if c not in NOISE_COLOURS:
                raise ValueError(f"unknown noise colour {c!r}; choose from {', '.join(NOISE_COLOURS)}")
        if not self.noise_colours:
            raise ValueError("noise_colours must not be empty")
        for f in (self.test_voice_fraction, self.test_variant_fraction):
            if not 0.0 <= f < 1.0:
                raise ValueError("test_*_fraction must be in [0, 1)")
        if self.test_voice_fraction == 0 and self.test_variant_fraction == 0:
            raise ValueError("hold out voices or variants (or both) for the test split")

    @property
    def frame_samples(self) -> int:
        return self.sample_rate // 100  # 160 at 16 kHz

    @property
    def classes(self) -> list[str]:
        return list(DIGITS) + ([SILENCE] if self.frame_level else [])

    def split_counts(self) -> dict[str, int]:
        return {"labeled": self.labeled, "unlabeled": self.unlabeled, "test": self.test}

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class Utterance:
    """One generated utterance (before encoding)."""

    audio: np.ndarray  # (N,) float32 at sample_rate, N a multiple of frame_samples
    label: int | None  # utterance level: digit id; frame level: None
    frames: np.ndarray | None  # frame level: (N / frame_samples,) int16, else None
    meta: dict = field(default_factory=dict)


def partition_speakers(cfg: SpokenDigitsConfig) -> dict[str, dict[str, list[str]]]:
    """{"train": {"voices", "variants"}, "test": {...}}: disjoint (where a fraction > 0), from the seed."""
    voices = sorted(cfg.voices) if cfg.voices else tts.available_voices()
    variants = sorted(cfg.variants) if cfg.variants else tts.default_variants()
    out = {"train": {}, "test": {}}
    for what, items, frac in (("voices", voices, cfg.test_voice_fraction), ("variants", variants, cfg.test_variant_fraction)):
        if len(set(items)) != len(items):
            raise ValueError(f"duplicate {what}: {items}")
        if frac == 0:
            out["train"][what], out["test"][what] = list(items), list(items)
            continue
        if len(items) < 2:
            raise ValueError(f"need at least 2 {what} to hold some out for test, got {items}")
        order = common.partition_rng(cfg.seed, f"spoken_digits/{what}").permutation(len(items))
        n_test = min(max(1, int(round(frac * len(items)))), len(items) - 1)
        test = sorted(items[i] for i in order[:n_test])
        out["test"][what] = test
        out["train"][what] = [x for x in items if x not in set(test)]
    return out


def coloured_noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    """(n,) float32 noise with power spectral density ~ 1/f^beta (see NOISE_COLOURS), unit RMS."""
    beta = NOISE_COLOURS[colour]
    white = rng.standard_normal(n)
    if beta == 0.0:
        x = white
    else:
        spec = np.fft.rfft(white)  # (n//2 + 1,)
        f = np.fft.rfftfreq(n)
        f[0] = f[1] if n > 1 else 1.0  # no infinite DC gain for pink/brown
        spec *= f ** (-beta / 2.0)  # amplitude ~ f^(-beta/2) so power ~ f^(-beta)
        x = np.fft.irfft(spec, n)
    x = x - x.mean()
    return (x / (np.sqrt(np.mean(x**2)) + 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _resampler(orig: int, new: int):
    import torchaudio

    # the same windowed-sinc kernel as torchaudio.functional.resample, built once per process
    return torchaudio.transforms.Resample(orig, new)


def resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    """(N,) float32 at ``orig`` Hz -> (M,) float32 at ``new`` Hz (torchaudio sinc resampling)."""
    import torch

    if orig == new:
        return wave.astype(np.float32)
    with torch.no_grad():
        return _resampler(orig, new)(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))).numpy()


def spoken_region(word: np.ndarray, frame: int, threshold_db: float) -> tuple[int, int]:
    """[first, last + 1) frame of ``word`` (length a multiple of ``frame``) whose RMS is
    within ``threshold_db`` of the loudest frame; (0, 0) for a silent word."""
    frames = word.reshape(-1, frame)  # (F, frame)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))  # (F,)
    if rms.size == 0 or rms.max() <= 0:
        return 0, 0
    active = np.nonzero(rms >= rms.max() * 10 ** (threshold_db / 20))[0]
    return int(active[0]), int(active[-1]) + 1


def _uniform(rng, lo_hi):
    lo, hi = lo_hi
    return float(lo + (hi - lo) * rng.random())


def _int(rng, lo_hi):
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def _digit_for(seed: int, split: str, index: int) -> int:
    """Utterance-level class: balanced (each block of 10 indices holds each digit once) in a
    random order, so a key's number says nothing about its label."""
    block = common.item_rng(seed, split, index // 10, "digit-block").permutation(10)
    return int(block[index % 10])


def make_utterance(settings: dict, split: str, index: int) -> Utterance:
    """Synthesise utterance ``index`` of ``split``; depends only on (settings, split, index).

    settings: ``SpokenDigitsConfig.to_dict()`` plus ``speakers`` (``partition_speakers``).
    """
    cfg = settings
    seed, sr, fs = int(cfg["seed"]), int(cfg["sample_rate"]), int(cfg["sample_rate"]) // 100
    pool = cfg["speakers"]["test" if split == "test" else "train"]
    rng = common.item_rng(seed, split, index)

    voice = str(rng.choice(pool["voices"]))
    variant = str(rng.choice(pool["variants"]))
    rate, pitch = _int(rng, cfg["rate_wpm"]), _int(rng, cfg["pitch"])
    prange, volume = _int(rng, cfg["pitch_range"]), _int(rng, cfg["volume"])
    if cfg["frame_level"]:
        n_digits = _int(rng, cfg["digits_per_utterance"])
        digits = [int(d) for d in rng.integers(0, 10, size=n_digits)]
    else:
        digits = [_digit_for(seed, split, index)]

    def frames_of(seconds: float) -> int:
        return int(round(seconds * 100))

    lead = frames_of(_uniform(rng, cfg["lead_silence_s"]))
    trail = frames_of(_uniform(rng, cfg["trail_silence_s"]))
    gaps = [frames_of(_uniform(rng, cfg["gap_s"])) for _ in digits[1:]]
    colour = str(rng.choice(cfg["noise_colours"]))
    snr_db = _uniform(rng, cfg["snr_db"])

    # Assemble the clean signal from whole 10 ms frames so the labels are exact.
    pieces, labels, spans = [np.zeros(lead * fs, np.float32)], [np.full(lead, SILENCE_CLASS, np.int16)], []
    pos = lead
    for i, d in enumerate(digits):
        # fresh eSpeak state per utterance: the audio depends only on (settings, split, index)
        w22, tts_sr = tts.synthesize(
            DIGITS[d], voice, variant, rate_wpm=rate, pitch=pitch, volume=volume, pitch_range=prange, fresh=(i == 0)
        )
        w = resample(w22, tts_sr, sr)  # (n,)
        w = np.pad(w, (0, (-len(w)) % fs))  # whole frames
        a, b = spoken_region(w, fs, cfg["vad_threshold_db"])
        lab = np.full(len(w) // fs, SILENCE_CLASS, np.int16)
        lab[a:b] = d
        pieces.append(w)
        labels.append(lab)
        spans.append([pos + a, pos + b])
        pos += len(lab)
        if i < len(gaps):
            pieces.append(np.zeros(gaps[i] * fs, np.float32))
            labels.append(np.full(gaps[i], SILENCE_CLASS, np.int16))
            pos += gaps[i]
    pieces.append(np.zeros(trail * fs, np.float32))
    labels.append(np.full(trail, SILENCE_CLASS, np.int16))
    clean = np.concatenate(pieces)  # (N,)
    frame_labels = np.concatenate(labels)  # (N / fs,)

    # SNR against the power of the spoken frames only (not diluted by the silences).
    spoken = np.repeat(frame_labels != SILENCE_CLASS, fs)
    p_speech = float(np.mean(clean[spoken].astype(np.float64) ** 2)) if spoken.any() else 1e-8
    noise = coloured_noise(rng, len(clean), colour) * np.float32(math.sqrt(p_speech / 10 ** (snr_db / 10)))
    audio = clean + noise
    peak = float(np.max(np.abs(audio)))
    gain = 0.99 / peak if peak > 0.99 else 1.0
    audio = (audio * gain).astype(np.float32)

    meta = {
        "voice": voice, "variant": variant, "rate_wpm": rate, "pitch": pitch, "pitch_range": prange,
        "volume": volume, "noise": colour, "snr_db": round(snr_db, 3), "gain": round(gain, 4),
        "num_samples": int(len(audio)), "sample_rate": sr,
    }
    labeled = split in LABELED_SPLITS
    if labeled:
        meta["text"] = " ".join(DIGITS[d] for d in digits)
        meta["digits"] = digits
        meta["spans_frames"] = spans  # [start, end) in 10 ms frames, one per digit
    if cfg["frame_level"]:
        return Utterance(audio, None, frame_labels if labeled else None, meta)
    return Utterance(audio, digits[0] if labeled else None, None, meta)


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_shard(spec: common.ShardSpec, settings: dict, output: str) -> dict:
    """Generate and atomically write one shard; returns its corpus.json entry (+ audio_seconds)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same float results in any process, and no oversubscription
    try:
        members, audio_samples = [], 0
        for index in range(spec.start, spec.start + spec.count):
            key = common.key_for(spec.split, index, spec.split_count)
            utt = make_utterance(settings, spec.split, index)
            audio_samples += len(utt.audio)
            members.append((f"{key}.flac", encode_flac(utt.audio, settings["sample_rate"])))
            if utt.label is not None:
                members.append((f"{key}.cls", str(utt.label).encode("ascii")))
            if utt.frames is not None:
                members.append((f"{key}.frames.npy", common.npy_bytes(utt.frames)))
            members.append((f"{key}.json", common.json_bytes(utt.meta)))
    finally:
        torch.set_num_threads(threads)
    entry = common.write_shard(output, spec, members)
    entry["audio_seconds"] = audio_samples / settings["sample_rate"]
    return entry


def validate_speakers(speakers: dict) -> None:
    """Fail fast, on the driver, for a voice or variant name eSpeak does not know."""
    known = set(tts.available_variants())
    for pool in speakers.values():
        for v in pool["variants"]:
            if v not in known:
                raise ValueError(f"unknown eSpeak variant {v!r}; shipped: {', '.join(sorted(known))}")
        for voice in pool["voices"]:
            tts.synthesize("one", voice)


def resolve_settings(cfg: SpokenDigitsConfig) -> dict:
    """The config plus the speaker partition: everything a worker needs (plain JSON types)."""
    return {**cfg.to_dict(), "speakers": partition_speakers(cfg)}


def generate(cfg: SpokenDigitsConfig, output: str, progress=print, stats: dict | None = None) -> dict:
    """Generate the corpus under ``output`` (local path or s3:// URI) as one Ray Data job.

    Ray must be initialised. Writes the shards, removes stale shards of an earlier run in the
    split directories, then writes ``corpus.json`` (last) and returns its content.
    stats: if given, filled with ``common.run_stats`` (task and CPU seconds) of this run.
    """
    settings = resolve_settings(cfg)
    validate_speakers(settings["speakers"])
    specs = common.plan_shards(cfg.split_counts(), cfg.shard_size)
    storage.makedirs(output)
    entries = common.run_generation(specs, make_shard, settings, output, progress=progress)
    if stats is not None:
        stats.update(common.run_stats(entries))
    for split in SPLITS:
        removed = common.remove_stale_shards(output, split, {e["path"] for e in entries})
        if removed and progress:
            progress(f"removed {len(removed)} stale shard(s) of an earlier run in {split}/")
    corpus = corpus_description(cfg, settings, entries)
    common.write_corpus_json(output, corpus)
    return corpus


def corpus_description(cfg: SpokenDigitsConfig, settings: dict, entries: list[dict]) -> dict:
    splits = common.splits_summary(entries, list(SPLITS))
    for split, s in splits.items():
        pool = settings["speakers"]["test" if split == "test" else "train"]
        s["labeled"] = split in LABELED_SPLITS
        s["voices"], s["variants"] = pool["voices"], pool["variants"]
        s["audio_seconds"] = round(sum(e.get("audio_seconds", 0.0) for e in entries if e["split"] == split), 2)
    return {
        "format": common.CORPUS_FORMAT,
        "version": common.CORPUS_VERSION,
        "name": "spoken_digits",
        "modality": "audio",
        "level": "frame" if cfg.frame_level else "utterance",
        "classes": cfg.classes,
        "num_classes": len(cfg.classes),
        "silence_class": SILENCE_CLASS if cfg.frame_level else None,
        "sample_rate": cfg.sample_rate,
        "frame_shift_ms": FRAME_SHIFT_MS if cfg.frame_level else None,
        "frame_shift_samples": cfg.frame_samples if cfg.frame_level else None,
        "members": {
            "audio": "flac",
            "label": "frames.npy" if cfg.frame_level else "cls",
            "meta": "json",
        },
        "labeled_splits": [s for s in SPLITS if s in LABELED_SPLITS],
        "seed": cfg.seed,
        "splits": splits,
        "generator": {
            "module": __name__,
            "settings": cfg.to_dict(),
            "tts": {"engine": "eSpeak NG via espeakng-loader", "sample_rate": tts.sample_rate()},
        },
        "software": common.software_versions("espeakng-loader", "torchaudio", "soundfile", "numpy"),
    }
