"""Image decode="gpu" (issue 20): the decode tasks' staging, the device decode path, the
predictor's accounting and the flag's resolution. Without a GPU the device path runs on a
CPU device (torchvision decodes there with libjpeg-turbo; the code is the same); the CUDA
variants (pixels against a CPU decode, calls at once on streams) run on a GPU machine
(bench/gpu_suite.sh's correctness step)."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.fingerprint import fingerprint
from pipeline.modalities import DecodeError, prepare
from pipeline.modalities.errors import DecodeLimits
from pipeline.modalities.image import EncodedImage, ImagePreprocessing, prepare_image, stage_image
from pipeline.modalities.jpeg import read_jpeg_header
from pipeline.modalities.payload import payload_array
from tests.external_models import smooth_image
from tests.helpers import image_bytes, write_tar

GPU = ImagePreprocessing(resize=40, crop=32, decode="gpu")
CPU = ImagePreprocessing(resize=40, crop=32)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
# How far the device path's pixels may be from the CPU path's, (max, mean) in grey levels: on a
# CPU device both are libjpeg-turbo and differ only in the resize's rounding; nvJPEG's IDCT and
# chroma upsampling differ more, but a few levels, never the tens that corruption gives.
PIXEL_TOL = {"cpu": (1, 0.05), "cuda": (48, 2.0)}


def _jpeg(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _bad_huffman(data: bytes) -> bytes:
    """A whole JPEG whose Huffman table is nonsense: no decoder takes it."""
    v = bytearray(data)
    dht = v.find(b"\xff\xc4")
    v[dht + 5:dht + 21] = b"\xff" * 16
    return bytes(v)


@pytest.fixture(scope="module")
def files():
    rng = np.random.default_rng(5)
    img = smooth_image(rng, 45, 60)
    cmyk = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(cmyk, format="JPEG")
    grey = io.BytesIO()
    Image.fromarray(img).convert("L").save(grey, format="JPEG")
    baseline = _jpeg(img)
    return {"baseline": baseline, "progressive": _jpeg(smooth_image(rng, 60, 45), progressive=True),
            "tall": _jpeg(smooth_image(rng, 90, 40)), "same_size": _jpeg(smooth_image(rng, 45, 60)),
            "grey": grey.getvalue(), "cmyk": cmyk.getvalue(), "png": image_bytes(img, "PNG"),
            "truncated": baseline[:len(baseline) // 2], "bad_huffman": _bad_huffman(baseline),
            "text": b"this is not an image at all", "empty": b""}


def _words(e: DecodeError) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", str(e))  # PIL names the BytesIO it was given


def _outcome(fn, *args):
    try:
        return fn(*args)
    except DecodeError as e:
        return e


def test_jpeg_header(files):
    h = read_jpeg_header(files["baseline"])
    assert (h.width, h.height, h.components, h.precision, h.sof, h.complete) == (60, 45, 3, 8, 0xC0, True)
    assert h.gpu_decodable and not h.progressive
    p = read_jpeg_header(files["progressive"])
    assert (p.width, p.height, p.progressive, p.gpu_decodable) == (45, 60, True, True)
    assert read_jpeg_header(files["grey"]).components == 1 and read_jpeg_header(files["grey"]).gpu_decodable
    c = read_jpeg_header(files["cmyk"])
    assert c.components == 4 and not c.gpu_decodable  # CMYK: the CPU path's colours
    t = read_jpeg_header(files["truncated"])
    assert t is not None and not t.complete and not t.gpu_decodable
    for name in ("png", "text", "empty"):
        assert read_jpeg_header(files[name]) is None


def test_stage_ships_jpegs_and_decodes_the_rest_as_the_cpu_path_does(files):
    for name, data in files.items():
        staged, cpu = _outcome(stage_image, data, GPU), _outcome(prepare_image, data, CPU)
        if name in ("baseline", "progressive", "tall", "same_size", "grey", "bad_huffman"):
            assert isinstance(staged, EncodedImage) and staged.data == data, name
            assert staged.progressive == (name == "progressive")
        elif isinstance(cpu, DecodeError):  # the same reason and words as a CPU-decoded cache
            assert isinstance(staged, DecodeError) and staged.reason == cpu.reason, name
            assert _words(staged) == _words(cpu), name
        else:
            assert isinstance(staged, np.ndarray) and np.array_equal(staged, cpu), name
    # the decompression-bomb limit is checked on the header before anything is shipped
    small = DecodeLimits(max_image_pixels=59 * 45)
    staged, cpu = _outcome(stage_image, files["baseline"], GPU, small), _outcome(prepare_image, files["baseline"], CPU, small)
    assert staged.reason == cpu.reason == "image_too_large" and str(staged) == str(cpu)
    assert isinstance(prepare(files["baseline"], GPU)[0][1], EncodedImage)  # what decode tasks call


def test_decode_place_is_part_of_the_identity():
    assert "decode" not in CPU.to_dict()  # every CPU-decoded cache keeps its fingerprint
    assert GPU.to_dict()["decode"] == "gpu"
    assert fingerprint(["t"], CPU.to_dict(), 5, "utterance") != fingerprint(["t"], GPU.to_dict(), 5, "utterance")
    with pytest.raises(ValueError, match="no GPU implementation"):
        ImagePreprocessing(resample="lanczos", decode="gpu")


@pytest.mark.parametrize("device", DEVICES)
def test_device_decode_matches_the_cpu_path_and_keeps_every_row(files, device):
    from pipeline.modalities.device_decode import CPU_FALLBACK, decode_batch
    from pipeline.modalities.image import JPEG, JPEG_PROGRESSIVE, PIXELS

    names = ["baseline", "png", "progressive", "bad_huffman", "tall", "grey", "same_size", "cmyk"]
    col = payload_array([stage_image(files[n], GPU) for n in names], GPU)
    # a slice of a longer column, as a teacher batch is
    col = pa.chunked_array([pa.concat_arrays([payload_array([stage_image(files["tall"], GPU)], GPU), col]).slice(1)])
    dec = decode_batch(col, GPU, device)
    assert dec.ok.tolist() == [n != "bad_huffman" for n in names]
    assert list(dec.errors) == [3] and dec.errors[3].reason == _outcome(prepare_image, files["bad_huffman"], CPU).reason
    assert dec.paths.tolist() == [JPEG, PIXELS, JPEG_PROGRESSIVE, JPEG, JPEG, JPEG, JPEG, PIXELS]
    assert CPU_FALLBACK not in dec.paths.tolist()
    assert dec.x.shape == (7, 32, 32, 3) and dec.x.dtype == torch.uint8 and dec.x.device.type == device
    got = iter(dec.x.cpu().numpy())
    most, mean = PIXEL_TOL[device]
    for n in names:
        if n == "bad_huffman":
            continue
        diff = np.abs(next(got).astype(int) - prepare_image(files[n], CPU).astype(int))
        assert diff.max() <= most and diff.mean() < mean, (n, diff.max(), diff.mean())


@pytest.mark.parametrize("backend", ["pil", "torchvision-v2", "torchvision-v1"])
def test_every_gpu_filter_matches_the_cpu_path(files, backend):
    """On a CPU device: the torchvision backends resize with the CPU path's own code (the same
    pixels); PIL's filters are matched to a grey level (bilinear, bicubic), and its NEAREST,
    which samples pixel centres, by torchvision's nearest-exact (a neighbour now and then)."""
    from pipeline.modalities.device_decode import decode_batch
    from pipeline.modalities.image import GPU_RESAMPLE

    names = ["baseline", "progressive", "tall", "grey"]
    for resample in GPU_RESAMPLE:
        for mode in ("shorter", "shortest_edge", "exact"):
            kw = dict(resize=37, crop=32, resample=resample, backend=backend, resize_mode=mode)
            gpu, cpu = ImagePreprocessing(**kw, decode="gpu"), ImagePreprocessing(**kw)
            dec = decode_batch(pa.chunked_array([payload_array([stage_image(files[n], gpu) for n in names], gpu)]),
                               gpu, "cpu")
            for i, n in enumerate(names):
                diff = np.abs(dec.x[i].numpy().astype(int) - prepare_image(files[n], cpu).astype(int))
                if backend != "pil":
                    most, mean = 0, 0.0
                elif resample.startswith("nearest"):
                    most, mean = 255, 1.5
                else:
                    most, mean = 1, 0.3
                assert diff.max() <= most and diff.mean() <= mean, (resample, mode, n, diff.max(), diff.mean())


def test_refused_and_chunked_rows_keep_their_place(files, monkeypatch):
    """Rows the device decoder refuses are decoded on the host with the CPU path (the same
    pixels as a CPU-decoded cache, counted as CPU_FALLBACK); small chunks change nothing."""
    import pipeline.modalities.device_decode as dd

    names = ["baseline", "png", "progressive", "tall", "grey", "bad_huffman", "same_size"]
    col = pa.chunked_array([payload_array([stage_image(files[n], GPU) for n in names], GPU)])
    whole = dd.decode_batch(col, GPU, "cpu")
    chunked = dd.decode_batch(col, GPU, "cpu", chunk_pixels=1)  # every image a chunk of its own
    assert torch.equal(whole.x, chunked.x) and np.array_equal(whole.paths, chunked.paths)
    real = dd._decode

    def refusing(encoded, device):  # the device decoder refuses the tall and the grey image
        out = real(encoded, device)
        return [RuntimeError("nvjpeg refused it") if e.numel() in (len(files["tall"]), len(files["grey"])) else o
                for e, o in zip(encoded, out)]

    monkeypatch.setattr(dd, "_decode", refusing)
    dec = dd.decode_batch(col, GPU, "cpu")
    assert dec.paths.tolist() == [dd.JPEG, dd.PIXELS, dd.JPEG_PROGRESSIVE, dd.CPU_FALLBACK, dd.CPU_FALLBACK, dd.JPEG,
                                  dd.JPEG]
    assert list(dec.errors) == [5] and dec.ok.tolist() == [n != "bad_huffman" for n in names]
    rows = dict(zip([n for n in names if n != "bad_huffman"], dec.x.numpy()))
    for n in ("tall", "grey", "png"):  # the CPU path's own pixels
        assert np.array_equal(rows[n], prepare_image(files[n], CPU)), n
    for n in ("baseline", "progressive", "same_size"):
        assert np.array_equal(rows[n], whole.x.numpy()[names.index(n) - (names.index(n) > 5)]), n


@pytest.mark.parametrize("device", DEVICES)
def test_predictor_decodes_on_its_device_and_counts_paths(files, tmp_path, device):
    """Decode tasks -> predictor (decode="gpu", 3 calls at once) -> tracker: every key once,
    the soft targets those of the CPU path's pixels, and the decode paths in the summary."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.shards import RunWriter, SoftTargetRun
    from pipeline.teacher.commit import Progress, ShardTracker
    from pipeline.teacher.compact import compact_shard
    from pipeline.teacher.decode import DecodeShards
    from pipeline.teacher.job import build_parser
    from pipeline.teacher.plan import plan_teacher
    from pipeline.teacher.predictor import TeacherPredictor
    from tests.helpers import assert_topk_matches, direct_logprobs

    spec = "pipeline.models.zoo:image_cnn?width=8&num_classes=12"
    args = build_parser().parse_args(["--input", "x", "--output", "y", "--teacher", spec, "--top-k", "5",
                                      "--modality", "image", "--image-resize", "40", "--image-crop", "32",
                                      "--image-decode", "cpu"])
    cpu_plan = plan_teacher(args, "unused")
    from dataclasses import replace

    plan = replace(cpu_plan, preprocessing=GPU,
                   fingerprint=fingerprint(cpu_plan.teacher["identities"], GPU.to_dict(), cpu_plan.k, "utterance"))
    members = [(n, {"png" if n == "png" else "jpg": files[n]}) for n in
               ("baseline", "png", "progressive", "bad_huffman", "tall", "grey", "same_size", "cmyk", "text")]
    write_tar(tmp_path / "s.tar", members)
    run = str(tmp_path / "run")
    writer = RunWriter(run, plan.manifest("parquet"))
    facts = writer.manifest.facts()
    rows = pa.concat_tables(list(DecodeShards(GPU, bucket_rows=4).shard("s", str(tmp_path / "s.tar"))))
    predictor = TeacherPredictor(plan.specs, plan.trust, GPU, facts, run, precision="fp32", device=device,
                                 concurrency=3)
    with ThreadPoolExecutor(3) as pool:
        records = list(pool.map(predictor, [rows.slice(i, 3) for i in range(0, rows.num_rows, 3)]))
    results = {}

    def compact(name, input_uri, parts, expected, expected_hash):
        results[name] = compact_shard(run, facts, name, input_uri, parts, expected, expected_hash)
        return name

    tracker = ShardTracker(writer, {"s": (str(tmp_path / "s.tar"), 1)}, Progress(1, 1, 0, 3600), compact,
                           lambda handles, timeout: ([(h, results[h]) for h in handles], []))
    for r in records:
        tracker.add(r)
    tracker.finish()
    writer.close()
    # baseline, tall, grey, same_size: JPEG; progressive; png and cmyk by the decode task
    assert dict(tracker.image_decode) == {"gpu_decoded": 5, "gpu_progressive": 1, "cpu_decoded": 2, "cpu_fallback": 0}
    assert tracker.error_reasons == {"corrupt_image": 2}
    out = SoftTargetRun(run)
    assert out.manifest.preprocessing["decode"] == "gpu"
    cols = out.read_numpy("s")
    assert sorted(cols["key"]) == sorted(["baseline", "png", "progressive", "tall", "grey", "same_size", "cmyk"])
    assert sorted(e["key"] for e in out.errors().to_pylist()) == ["bad_huffman", "text"]
    refs = direct_logprobs(spec, CPU.to_dict(), [prepare_image(files[k], CPU) for k in cols["key"]])
    for i in range(len(refs)):  # pixels a few grey levels apart: the same top-k, nearly the same values
        assert_topk_matches(cols["ids"][i], cols["logprobs"][i], refs[i], tol=2e-2 if device == "cpu" else 0.1)


def test_image_decode_flag(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.shards import RunWriter
    from pipeline.teacher.job import build_parser
    from pipeline.teacher.plan import plan_teacher

    out = str(tmp_path / "out")
    base = ["--input", "x", "--output", out, "--teacher", "pipeline.models.zoo:image_cnn?width=8", "--modality", "image"]

    def plan(*flags):
        return plan_teacher(build_parser().parse_args(base + list(flags)), "unused")

    with pytest.raises(ConfigError, match=r"^--image-decode gpu: --device cpu gives the teacher no GPU$"):
        plan("--image-decode", "gpu", "--device", "cpu")
    with pytest.raises(ConfigError, match=r"^--image-decode gpu: the 'lanczos' resize filter has no GPU"):
        plan("--image-decode", "gpu", "--device", "cuda", "--image-resample", "lanczos")
    # auto without a GPU for the teacher: today's path, the same fingerprint as --image-decode cpu
    auto = plan("--device", "cpu")
    assert auto.preprocessing.decode == "cpu" and "decode" not in auto.preprocessing.to_dict()
    assert auto.fingerprint == plan("--image-decode", "cpu").fingerprint
    # auto with GPU actors: on the GPU, unless --output's run was decoded on the CPU: then as it was
    assert plan("--device", "cuda").preprocessing.decode == "gpu"
    RunWriter(out, auto.manifest("parquet")).close()
    resumed = plan("--device", "cuda")
    assert resumed.preprocessing.decode == "cpu" and resumed.fingerprint == auto.fingerprint
    gpu_run = str(tmp_path / "gpu")
    base[base.index(out)] = gpu_run
    RunWriter(gpu_run, plan("--device", "cuda").manifest("parquet")).close()
    assert plan("--device", "cuda").preprocessing.decode == "gpu"
    with pytest.raises(ConfigError, match=r"holds soft targets whose JPEGs were decoded on the GPU, and this run "
                                          r"cannot do that \(--device cpu gives the teacher no GPU\)"):
        plan("--device", "cpu")


def test_students_decode_a_gpu_decoded_cache_on_the_cpu():
    """A cache's preprocessing is what students and evaluation start from; where its images
    were decoded is not: they decode on the CPU (their payload is pixels)."""
    import argparse

    from pipeline.cli import add_preprocessing_flags, resolve_preprocessing

    p = argparse.ArgumentParser()
    add_preprocessing_flags(p)
    prep = resolve_preprocessing("image", GPU.to_dict(), p.parse_args([]))
    assert prep == CPU.to_dict() and "decode" not in prep
