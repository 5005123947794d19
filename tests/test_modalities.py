"""Decoding and preprocessing with real encoders: soundfile (FLAC/WAV/OGG/MP3), PIL (PNG/JPEG/WebP)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from pipeline.modalities import DecodeError, prepare
from pipeline.modalities.frontends import make_frontend
from pipeline.modalities.audio import AudioPreprocessing, chunk_bounds, crop_or_pad, decode_audio
from pipeline.modalities.image import ImagePreprocessing, prepare_image


def _encode(wave: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,subtype,tol", [("FLAC", "PCM_16", 1e-4), ("WAV", "FLOAT", 1e-7),
                                              ("OGG", "VORBIS", None), ("MP3", "MPEG_LAYER_III", None)])
def test_decode_mono_mixdown_and_resample(fmt, subtype, tol):
    sr = 48000
    t = np.arange(sr) / sr
    left, right = 0.4 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 440 * t)
    data = _encode(np.stack([left, right], 1).astype(np.float32), sr, fmt, subtype)
    wave, got_sr = decode_audio(data)
    assert got_sr == sr and wave.dtype == np.float32 and wave.ndim == 1
    if tol is not None:  # lossless: exactly the channel mean
        assert np.abs(wave - (left + right) / 2).max() < tol
    else:  # lossy codecs: same level and pitch
        n = min(len(wave), sr)
        assert abs(np.sqrt(np.mean(wave[:n] ** 2)) - 0.3 / np.sqrt(2)) < 0.03
        spectrum = np.abs(np.fft.rfft(wave[:n]))
        assert abs(np.argmax(spectrum) * sr / n - 440) < 5
    [(bounds, out)] = prepare(data, AudioPreprocessing(sample_rate=16000))
    assert bounds is None and abs(len(out) - len(wave) / 3) <= 2  # 48 kHz -> 16 kHz


def test_bad_audio_is_a_decode_error_with_a_reason():
    with pytest.raises(DecodeError) as e:
        decode_audio(b"not audio at all")
    assert e.value.reason == "corrupt_audio" and "BytesIO" not in e.value.detail
    with pytest.raises(DecodeError) as e:
        decode_audio(_encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"))
    assert e.value.reason == "empty_audio"
    nan = _encode(np.array([0.1, np.nan, 0.2], np.float32), 16000, "WAV", "FLOAT")
    with pytest.raises(DecodeError) as e:
        decode_audio(nan)
    assert e.value.reason == "corrupt_audio" and "non-finite" in e.value.detail


def test_chunking_and_cropping():
    assert chunk_bounds(16000 * 25 // 10, 16000, 1.0) == [(0, 16000), (16000, 32000), (32000, 40000)]
    # a tail under a quarter window joins the previous chunk
    assert chunk_bounds(16000 * 21 // 10, 16000, 1.0) == [(0, 16000), (16000, 33600)]
    assert chunk_bounds(100, 16000, None) == [(0, 100)]
    w = np.arange(10, dtype=np.float32)
    assert crop_or_pad(w, 4).tolist() == [3, 4, 5, 6]
    assert crop_or_pad(w, 14).tolist() == [0, 0] + list(range(10)) + [0, 0]
    data = _encode(np.random.default_rng(0).standard_normal(40000).astype(np.float32) * 0.1, 16000, "FLAC", "PCM_16")
    pieces = prepare(data, AudioPreprocessing(chunk_seconds=1.0))
    assert [b for b, _ in pieces] == [(0, 16000), (16000, 32000), (32000, 40000)]
    assert sum(len(p) for _, p in pieces) == 40000


def test_logmel_rows_do_not_depend_on_batch_padding():
    rng = np.random.default_rng(1)
    prep = AudioPreprocessing()
    fe = make_frontend(prep)
    a, b = rng.standard_normal(7000).astype(np.float32), rng.standard_normal(16000).astype(np.float32)
    batch = torch.zeros(2, 16000)
    batch[0, :7000], batch[1] = torch.from_numpy(a), torch.from_numpy(b)
    feats, lengths = fe(batch, torch.tensor([7000, 16000]))
    alone, alone_len = fe(torch.from_numpy(a)[None], torch.tensor([7000]))
    assert lengths.tolist() == [7000 // 160 + 1, 16000 // 160 + 1] and alone_len.tolist() == [44]
    assert torch.allclose(feats[0, :44], alone[0], atol=1e-4)
    assert (feats[0, 44:] == 0).all()  # padding frames are zeroed


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_decode_resize_crop(fmt):
    img = np.zeros((60, 90, 3), np.uint8)
    img[:, 45:] = 255  # right half white
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    out = prepare_image(buf.getvalue(), ImagePreprocessing(resize=40, crop=32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, :12].mean() < 30 and out[:, -12:].mean() > 225  # resized to 40x60, centre 32 kept
    gray = io.BytesIO()
    Image.fromarray(img[:, :, 0]).save(gray, format="PNG")
    assert prepare_image(gray.getvalue(), ImagePreprocessing()).shape == (32, 32, 3)  # L -> RGB
    with pytest.raises(DecodeError) as e:
        prepare_image(buf.getvalue()[: len(buf.getvalue()) // 2], ImagePreprocessing())
    assert e.value.reason == "corrupt_image"


def test_image_frontend_normalises():
    x = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)
    fe = make_frontend(ImagePreprocessing(resize=4, crop=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))
    y, _ = fe(x)
    assert y.shape == (1, 3, 4, 4) and y[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]


def test_payload_into_a_reused_staging_buffer():
    """Batches of any chunking land padded in one buffer that is reallocated only to grow."""
    import pyarrow as pa

    from pipeline.modalities.payload import payload_array
    from pipeline.modalities.staging import StagingBuffer, payload_batch

    prep = AudioPreprocessing()
    waves = [np.arange(n, dtype=np.float32) + 1 for n in (3, 5, 2, 7)]
    col = payload_array(waves, prep)
    buf = StagingBuffer()
    batches = [(pa.chunked_array([col.slice(0, 1), col.slice(1, 2)]), waves[:3]), (col.slice(1, 2), waves[1:3]),
               (col, waves), (col.slice(2, 2), waves[2:])]
    for batch, rows in batches:
        x, lengths = payload_batch(batch, prep, multiple=4, staging=buf)
        assert x.shape == (len(rows), -(-max(len(w) for w in rows) // 4) * 4)
        assert lengths.tolist() == [len(w) for w in rows]
        for r, w in zip(x.numpy(), rows):
            assert np.array_equal(r[: len(w)], w) and not r[len(w):].any()  # padding zeroed, even in a reused buffer
    assert buf.allocations == 2  # the first batch, then once when a batch needed more room
    x, lengths = payload_batch(col.slice(0, 0), prep, staging=buf)
    assert x.shape == (0, 0) and lengths.tolist() == []
