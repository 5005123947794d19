"""Audio: decode (soundfile), mono mix-down, resampling, chunking.

This runs in the decode tasks, which import only what decoding needs: numpy and soundfile,
and torch/torchaudio only when a clip has to be resampled (their import costs a worker ~1 s
of CPU and ~300 MB). The feature frontend that runs next to the model is in
``pipeline.modalities.frontends``.
"""

from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass, fields

import numpy as np
import soundfile as sf

from pipeline.modalities.errors import DEFAULT_LIMITS, DecodeError, DecodeLimits

AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3", "opus")
FEATURES = ("logmel", "fbank", "none")


@dataclass(frozen=True)
class AudioPreprocessing:
    """How audio is turned into model input; recorded in the manifest and checkpoints.

    sample_rate: the teacher's rate; inputs are resampled to it.
    features: "logmel" (torchaudio MelSpectrogram + log), "fbank" (Kaldi fbank) or "none" (raw wave).
    n_mels, win_ms, hop_ms: feature settings (hop is the feature frame shift).
    chunk_seconds: split longer recordings into windows of this length (keys get "@start-end").
    crop_seconds: utterance level only: centre-crop or zero-pad every clip to this length.
    """

    sample_rate: int = 16000
    features: str = "logmel"
    n_mels: int = 40
    win_ms: float = 25.0
    hop_ms: float = 10.0
    chunk_seconds: float | None = None
    crop_seconds: float | None = None

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ValueError(f"audio features must be one of {FEATURES}, got {self.features!r}")
        if self.sample_rate <= 0 or self.n_mels <= 0 or self.win_ms <= 0 or self.hop_ms <= 0:
            raise ValueError(f"audio preprocessing values must be positive: {self}")

    def to_dict(self) -> dict:
        return {"modality": "audio", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "AudioPreprocessing":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"modality"}
        if unknown:
            raise ValueError(f"unknown audio preprocessing field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def hop_samples(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def frame_shift_ms(self) -> float:
        """Time between model input frames (the hop; one sample for raw waveform input)."""
        return self.hop_ms if self.features != "none" else 1000.0 / self.sample_rate


def decode_audio(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, int]:
    """Encoded audio bytes (flac/wav/ogg/mp3) -> (wave (N,) float32 mono in [-1, 1], sample rate).

    Raises DecodeError("corrupt_audio" | "empty_audio" | "audio_too_long" | "out_of_memory").
    At most ``limits.max_audio_seconds`` are ever decoded, whatever the header declares.
    """
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = int(f.samplerate)
            cap = int(limits.max_audio_seconds * sr)
            if f.frames > cap:
                raise DecodeError("audio_too_long", f"{f.frames / sr:,.1f} s, above the limit of "
                                                    f"{limits.max_audio_seconds:g} s (--max-audio-seconds)")
            wave = f.read(frames=cap + 1, dtype="float32", always_2d=True)  # (N, channels)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("out_of_memory", "decoding the audio ran out of memory") from None
    except Exception as e:  # libsndfile reports every failure as a generic error
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "audio bytes", str(e))
        raise DecodeError("corrupt_audio", f"{type(e).__name__}: {detail}") from None
    if wave.shape[0] > cap:  # the header under-declared its length
        raise DecodeError("audio_too_long", f"more than the limit of {limits.max_audio_seconds:g} s "
                                            "(--max-audio-seconds)")
    if wave.shape[0] == 0:
        raise DecodeError("empty_audio", "no samples")
    wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if not np.isfinite(wave).all():
        raise DecodeError("corrupt_audio", "non-finite samples")
    return np.ascontiguousarray(wave, dtype=np.float32), int(sr)


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """(N,) at sr_in -> (N * sr_out / sr_in,) at sr_out, with torchaudio's sinc resampler."""
    if sr_in == sr_out:
        return wave
    import torch  # only here: a decode worker whose clips are at the model's rate never loads torch
    import torchaudio

    out = torchaudio.functional.resample(torch.from_numpy(wave), sr_in, sr_out)
    return out.numpy()


def chunk_bounds(num_samples: int, sample_rate: int, chunk_seconds: float | None) -> list[tuple[int, int]]:
    """[(start, end)] sample windows covering a recording; one window if no chunking.

    The last window may be shorter; a tail shorter than a quarter window is merged into the
    previous one, so no chunk is too short to classify.
    """
    if not chunk_seconds:
        return [(0, num_samples)]
    size = int(round(chunk_seconds * sample_rate))
    bounds = [(s, min(s + size, num_samples)) for s in range(0, num_samples, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < size // 4:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def crop_or_pad(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Centre-crop or symmetrically zero-pad (N,) to (num_samples,)."""
    n = wave.shape[0]
    if n == num_samples:
        return wave
    if n > num_samples:
        start = (n - num_samples) // 2
        return wave[start : start + num_samples]
    left = (num_samples - n) // 2
    return np.pad(wave, (left, num_samples - n - left))


def prepare_waveform(data: bytes, prep: AudioPreprocessing, limits: DecodeLimits = DEFAULT_LIMITS
                     ) -> list[tuple[tuple[int, int] | None, np.ndarray]]:
    """Decode + mono + resample + crop/chunk: bytes -> [(chunk bounds or None, wave (N,) float32)].

    Bounds are in samples at prep.sample_rate; None when the recording is not chunked.
    """
    wave, sr = decode_audio(data, limits)
    wave = resample(wave, sr, prep.sample_rate)
    if wave.shape[0] == 0:
        raise DecodeError("empty_audio", "no samples after resampling")
    if prep.crop_seconds:
        return [(None, crop_or_pad(wave, int(round(prep.crop_seconds * prep.sample_rate))))]
    bounds = chunk_bounds(wave.shape[0], prep.sample_rate, prep.chunk_seconds)
    if len(bounds) == 1:
        return [(None, wave)]
    return [((s, e), wave[s:e]) for s, e in bounds]
