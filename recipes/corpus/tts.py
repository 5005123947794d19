"""eSpeak NG text-to-speech through ctypes, using the library and voice data that the
``espeakng-loader`` wheel ships (no system package, no network).

    wave, sr = synthesize("seven", voice="en-us", variant="m3", rate_wpm=160, pitch=50, volume=100)
    # wave: (N,) float32 mono in [-1, 1]; sr: 22050 (eSpeak's native rate)

The library keeps global state, so it is initialised once per process (lazily, on the first
call) and every synthesis runs under a process-wide lock: safe to call repeatedly and from
several threads. Ray workers are separate processes, each with its own instance.

Reproducibility: eSpeak's output depends on what it synthesised before in the same process
(static wave-generator state: pitch flutter position, phase, filter memories, its noise
generator), so the same call can return a few samples more or less and different values.
``synthesize(..., fresh=True)`` (or ``reset()``) terminates, dlcloses and reloads the library
first, which puts every static back to its initial value; the output then depends only on the
arguments (checked: 2,000 reloads interleaved with other voices, 0 mismatches). A reload costs
about 1.5-2 ms here, thanks to a lower-cased mirror of the voice files (``_fast_data_path``)
that spares eSpeak a 3.8 ms scan of every voice file, and leaks about 2 KB inside eSpeak.
So callers reset once per unit that must be reproducible (an utterance), not once per word.
Nothing else in the process may use libespeak-ng meanwhile: the handle is shared.

A voice is a language voice (``en``, ``en-us``, ``en-gb-scotland``, ...; files under
``espeak-ng-data/lang/``) plus an optional variant (``m3``, ``f2``, ``klatt``, ...; files under
``espeak-ng-data/voices/!v/``), joined as ``"en-us+m3"`` for ``espeak_SetVoiceByName``.
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import hashlib
import os
import shutil
import tempfile
import threading

import numpy as np

# espeak_AUDIO_OUTPUT: synchronous mode delivers all audio through the callback before
# espeak_Synth returns, which is what a batch generator wants.
AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeak_PARAMETER
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1

# English language voices shipped in espeak-ng-data/lang/gmw/ (en-Shaw is Shavian script, left out).
ENGLISH_VOICES: tuple[str, ...] = (
    "en",  # British English (default)
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",  # Caribbean
    "en-us-nyc",
)

# Variants that are not speech a listener would call a normal speaker (whispers, robots,
# effects), or whose file names contain spaces. They are valid eSpeak variants; a caller may
# still pass them explicitly.
UNUSUAL_VARIANTS: frozenset[str] = frozenset(
    {
        "whisper", "whisperf", "Demonic", "UniRobot", "anikaRobot", "croak", "Mr serious",
        "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6",
        "robosoft7", "robosoft8", "Tweaky", "kaukovalta", "AnxiousAndy",
    }
)

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_RAND_SEED = 1  # eSpeak's own noise generator (fricatives, breath)

_lock = threading.Lock()
_state: dict = {}  # lib, sample_rate, callback, chunks, pid


def library_path() -> str:
    import espeakng_loader

    return espeakng_loader.get_library_path()


def data_path() -> str:
    """The ``espeak-ng-data`` directory inside the espeakng-loader package."""
    import espeakng_loader

    return espeakng_loader.get_data_path()


def available_variants() -> list[str]:
    """All variant names in the shipped data (files in ``espeak-ng-data/voices/!v``), sorted."""
    d = os.path.join(data_path(), "voices", "!v")
    return sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)))


def default_variants() -> list[str]:
    """Shipped variants that sound like ordinary speakers: all but ``UNUSUAL_VARIANTS``."""
    return [v for v in available_variants() if v not in UNUSUAL_VARIANTS and " " not in v]


def available_voices() -> list[str]:
    """English language voices present in the shipped data (a subset of ``ENGLISH_VOICES``)."""
    d = os.path.join(data_path(), "lang", "gmw")
    present = {n.lower() for n in os.listdir(d)}
    return [v for v in ENGLISH_VOICES if v in present]


@functools.lru_cache(maxsize=1)
def _fast_data_path() -> str:
    """A mirror of the data directory (symlinks) whose ``lang/`` file names are lower-cased.

    espeak_SetVoiceByName lower-cases the name and first tries it as a file under ``lang/``;
    the shipped files are ``gmw/en-US`` etc., so that misses and eSpeak falls back to reading
    every voice file (espeak_ListVoices, ~3.8 ms). With lower-case names, ``gmw/en-us`` loads
    directly (~0.3 ms), which is what makes a reload per utterance affordable. Built once per
    machine under the temp dir, atomically; falls back to the shipped directory if it cannot.
    """
    src = data_path()
    key = hashlib.sha1(f"{src}:{os.stat(src).st_mtime_ns}".encode()).hexdigest()[:12]
    dst = os.path.join(tempfile.gettempdir(), f"kdpipe-espeak-ng-data-{os.getuid()}-{key}")
    if os.path.isfile(os.path.join(dst, ".complete")):
        return dst
    try:
        tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=os.path.dirname(dst))
        for name in os.listdir(src):
            if name != "lang":
                os.symlink(os.path.join(src, name), os.path.join(tmp, name))
        for root, _dirs, files in os.walk(os.path.join(src, "lang")):
            out = os.path.join(tmp, os.path.relpath(root, src).lower())
            os.makedirs(out, exist_ok=True)
            for f in files:
                link = os.path.join(out, f.lower())
                if os.path.lexists(link):
                    raise RuntimeError(f"two voice files differ only in case: {link}")
                os.symlink(os.path.join(root, f), link)
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, dst)
        except OSError:  # another process finished first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return dst if os.path.isfile(os.path.join(dst, ".complete")) else src
    except (OSError, RuntimeError):
        return src


@functools.lru_cache(maxsize=1)
def _voice_files() -> dict[str, str]:
    """Lower-case voice name -> its file under lang/, lower-cased: {"en-us": "gmw/en-us", ...}."""
    root = os.path.join(data_path(), "lang")
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            out.setdefault(f.lower(), os.path.relpath(os.path.join(dirpath, f), root).lower())
    return out


def _init() -> dict:
    """Load and initialise libespeak-ng once per process (re-initialise after a fork)."""
    if _state.get("pid") == os.getpid():
        return _state
    lib = ctypes.CDLL(library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Terminate.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None

    path = _fast_data_path()
    sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, path.encode(), 0)
    if sample_rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({sample_rate}) with data at {path}")
    chunks: list[bytes] = []

    def on_audio(wav, numsamples, events):
        if numsamples > 0 and wav:
            chunks.append(ctypes.string_at(wav, numsamples * 2))  # int16 samples
        return 0  # 0 = continue synthesis

    callback = _SYNTH_CALLBACK(on_audio)  # kept referenced in _state so it is never collected
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_ng_SetRandSeed(_RAND_SEED)
    _state.clear()
    _state.update(lib=lib, sample_rate=int(sample_rate), callback=callback, chunks=chunks, pid=os.getpid(), voice=None)
    return _state


def _unload() -> None:
    """Terminate and dlclose the library so the next _init() maps fresh static data."""
    lib = _state.get("lib")
    if lib is not None and _state.get("pid") == os.getpid():
        lib.espeak_Terminate()
        handle = lib._handle
        _state.clear()
        del lib
        _ctypes.dlclose(handle)
    _state.clear()


def reset() -> None:
    """Reload eSpeak so that the next synthesis starts from its initial state (see module doc)."""
    with _lock:
        _unload()
        _init()


def sample_rate() -> int:
    """eSpeak's output rate in Hz (22050)."""
    with _lock:
        return _init()["sample_rate"]


def synthesize(
    text: str,
    voice: str = "en",
    variant: str | None = None,
    rate_wpm: int = 175,
    pitch: int = 50,
    volume: int = 100,
    pitch_range: int = 50,
    fresh: bool = False,
) -> tuple[np.ndarray, int]:
    """Speak ``text`` -> (wave (N,) float32 mono in [-1, 1], sample rate in Hz).

    voice: language voice, e.g. "en-us"; variant: e.g. "m3", "f2", "klatt" or None.
    rate_wpm: words per minute (eSpeak accepts 80..450; 175 is its default).
    pitch, pitch_range: 0..100, 50 is the voice's own base pitch / intonation range.
    volume: amplitude 0..200 (100 is normal; above ~150 eSpeak may clip).
    fresh: reload the library first, so the result depends only on these arguments.
    Raises ValueError for an unknown voice/variant name, RuntimeError when synthesis fails.
    """
    name = f"{voice}+{variant}" if variant else voice
    # the voice's file name lets eSpeak load it without listing all voices (see _fast_data_path)
    by_file = _voice_files().get(voice.lower(), voice)
    by_file = f"{by_file}+{variant}" if variant else by_file
    with _lock:
        if fresh:
            _unload()
        st = _init()
        lib = st["lib"]
        if st["voice"] != name:
            if variant is not None and not os.path.isfile(os.path.join(data_path(), "voices", "!v", variant)):
                raise ValueError(f"unknown eSpeak variant {variant!r}; see available_variants()")
            err = lib.espeak_SetVoiceByName(by_file.encode())
            if err != 0:
                st["voice"] = None
                raise ValueError(f"espeak_SetVoiceByName({name!r}) failed with code {err}")
            st["voice"] = name
        # Parameters persist in the library, so set every one on every call.
        for param, value in (
            (_RATE, int(rate_wpm)), (_PITCH, int(pitch)), (_VOLUME, int(volume)), (_RANGE, int(pitch_range)),
        ):
            lib.espeak_SetParameter(param, value, 0)
        st["chunks"].clear()
        data = text.encode("utf-8") + b"\0"
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with code {err} for {text!r} ({name})")
        raw = b"".join(st["chunks"])
        st["chunks"].clear()
        sr = st["sample_rate"]
    wave = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0  # (N,)
    return wave, sr
