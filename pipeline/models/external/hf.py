"""``hf:PATH``: a Hugging Face ``transformers`` model directory, as a kdpipe teacher.

PATH (local or ``s3://``) holds what ``model.save_pretrained(PATH)`` and
``processor.save_pretrained(PATH)`` write: ``config.json``, ``model.safetensors`` (or sharded
safetensors), ``preprocessor_config.json``. Supported tasks (from ``config.architectures``, or
``?task=``):

| task | Auto class | kdpipe level | output |
|---|---|---|---|
| ``audio-classification`` | AutoModelForAudioClassification | utterance | (B, C) |
| ``audio-frame-classification`` | AutoModelForAudioFrameClassification | frame | (B, T', C) |
| ``ctc`` | AutoModelForCTC | frame | (B, T', V) |
| ``image-classification`` | AutoModelForImageClassification | utterance (image) | (B, C) |

Preprocessing, so that kdpipe's soft targets equal what the model gives through its own
processor:

- audio: kdpipe resamples to the processor's ``sampling_rate`` and ships the raw waveform
  (``features: "none"``); the extractor's math runs inside this module, per row over its valid
  samples: ``Wav2Vec2FeatureExtractor`` (wav2vec2, HuBERT, WavLM, data2vec-audio, SEW, ...):
  zero-mean/unit-variance per utterance when ``do_normalize``; ``ASTFeatureExtractor``: Kaldi
  fbank, padded/truncated to ``max_length`` frames, ``(x - mean) / (2 std)``;
  ``WhisperFeatureExtractor``: pad/truncate to ``chunk_length`` s, log10-mel, clamp to max - 8,
  ``(x + 4) / 4``. Any other extractor is called itself, row by row, on the actor's CPU.
- image: the processor's resize (size, shortest edge, ConvNeXt's crop_pct), resample filter,
  centre crop and backend map onto ``ImagePreprocessing``; its rescale/mean/std onto the
  frontend's mean/std. Built adapters check this mapping against the processor on two probe
  images and refuse a processor they cannot reproduce.

Padding: wav2vec2-style models with a layer-norm feature encoder run as padded batches with an
attention mask (exact: a row's output does not depend on its padding). Group-norm feature
encoders (``feat_extract_norm: "group"``, e.g. wav2vec2-base) normalise over the padded length,
so they run on groups of equal-length rows (``?batch=padded`` trades that exactness for speed).

Security: weights come from safetensors; ``pytorch_model.bin`` is read only with
``weights_only=True``; ``trust_remote_code`` is never set and a config with ``auto_map``
(remote code) is refused; loading uses local files only.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.fingerprint import canonical_json
from pipeline.models.external import digest_files, local_copy, require
from pipeline.models.spec_types import SpecError

TASKS = {
    # task: (transformers mapping, modality, level)
    "audio-classification": ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio", "utterance"),
    "audio-frame-classification": ("MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES", "audio", "frame"),
    "ctc": ("MODEL_FOR_CTC_MAPPING_NAMES", "audio", "frame"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image", "utterance"),
}
OPTIONS = {"task", "image_backend", "batch"}
PROCESSOR_CONFIG = "preprocessor_config.json"
_VOLATILE = ("transformers_version", "_name_or_path")  # not part of what the model computes
_PIL_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# --------------------------------------------------------------------------------------------
# files


def local_dir(uri: str) -> str:
    """A local directory with the model's files (an ``s3://`` model is copied once per node)."""
    try:
        return local_copy(uri)
    except FileNotFoundError as e:
        raise SpecError(f"hf:{e}") from None


def _weights_files(uri: str) -> tuple[list[str], bool]:
    """(weights file URIs, is safetensors). Refuses directories without weights kdpipe may read."""
    names = [u.rsplit("/", 1)[-1] for u in storage.listdir(uri)]
    st = sorted(n for n in names if n.startswith("model") and n.endswith(".safetensors"))
    if st:
        return [storage.join(uri, n) for n in st], True
    pt = sorted(n for n in names if n.startswith("pytorch_model") and n.endswith(".bin"))
    if pt:
        return [storage.join(uri, n) for n in pt], False
    raise SpecError(f"hf:{uri}: no model.safetensors (nor pytorch_model.bin) in the directory; save the model with "
                    "model.save_pretrained(PATH)")


def _read_json(uri: str, name: str, required: bool = True) -> dict | None:
    target = storage.join(uri, name)
    if not storage.exists(target):
        if required:
            raise SpecError(f"hf:{uri}: no {name}; save the model and its processor with save_pretrained(PATH)")
        return None
    try:
        return json.loads(storage.read_bytes(target))
    except ValueError as e:
        raise SpecError(f"{target}: not valid JSON ({e})") from None


def _digest_json(d: dict | None) -> str | None:
    if d is None:
        return None
    return hashlib.sha256(canonical_json({k: v for k, v in d.items() if k not in _VOLATILE}).encode()).hexdigest()


def resolve_task(cfg: dict, task: str | None, uri: str) -> tuple[str, str]:
    """(task, transformers class name) from config.json's ``architectures`` (or ``?task=``)."""
    from transformers.models.auto import modeling_auto

    def names(t):
        out = []
        for v in getattr(modeling_auto, TASKS[t][0]).values():
            out += [v] if isinstance(v, str) else list(v)
        return out

    if task is not None and task not in TASKS:
        raise SpecError(f"hf:{uri}: unknown task {task!r}; one of {', '.join(TASKS)}")
    archs = cfg.get("architectures") or []
    for t in [task] if task else list(TASKS):
        for a in archs:
            if a in names(t):
                return t, a
    if task:  # architectures names a base model: take the task's class for this model_type
        cls = getattr(modeling_auto, TASKS[task][0]).get(cfg.get("model_type"))
        if cls:
            return task, cls if isinstance(cls, str) else cls[0]
    raise SpecError(f"hf:{uri}: {archs or cfg.get('model_type')!r} is not a model for "
                    f"{task or ' / '.join(TASKS)}; kdpipe takes AutoModelForAudioClassification, "
                    "AutoModelForAudioFrameClassification, AutoModelForCTC and AutoModelForImageClassification models")


# --------------------------------------------------------------------------------------------
# audio


def _wave_normalize(wave: torch.Tensor, lengths: torch.Tensor, padding_value: float) -> torch.Tensor:
    """Wav2Vec2FeatureExtractor's zero-mean/unit-variance norm per row over its valid samples:
    (x - mean) / sqrt(var + 1e-7), padding set to padding_value. wave (B, N) -> (B, N)."""
    mask = torch.arange(wave.shape[1], device=wave.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, N)
    x = wave.double() * mask
    n = lengths.clamp(min=1).double().unsqueeze(1)
    mean = x.sum(1, keepdim=True) / n
    var = (((x - mean) * mask) ** 2).sum(1, keepdim=True) / n
    out = ((wave.double() - mean) / torch.sqrt(var + 1e-7)).float()
    return torch.where(mask, out, torch.full_like(out, padding_value))


class HFAudioTeacher(nn.Module):
    """A transformers audio model behind kdpipe's conventions.

    forward(wave (B, N) float32 at ``sample_rate``, zero-padded; lengths (B,) valid samples)
      -> logits (B, C) at utterance level, (B, T', C) at frame level.
    """

    modality = "audio"

    def __init__(self, model: nn.Module, extractor, task: str, level: str, class_names: list[str] | None,
                 padded: bool | None = None):
        super().__init__()
        import transformers

        self.model = model
        self.extractor = extractor
        self.task, self.level = task, level
        cfg = model.config
        self.num_classes = int(cfg.vocab_size if task == "ctc" else cfg.num_labels)
        self.sample_rate = int(extractor.sampling_rate)
        name = type(extractor).__name__
        if type(extractor) is transformers.Wav2Vec2FeatureExtractor:
            self.features = "wave"
        elif name == "ASTFeatureExtractor":
            self.features = "ast"
        elif name == "WhisperFeatureExtractor":
            self.features = "whisper"
            self.register_buffer("mel_filters", torch.from_numpy(np.asarray(extractor.mel_filters, np.float32)),
                                 persistent=False)  # (n_fft // 2 + 1, n_mels)
        else:
            self.features = "extractor"  # called itself, row by row, on the CPU
        # Rows of a padded batch come out as they would alone only where the model masks the
        # padding all the way through: layer-norm feature encoders with an attention mask.
        safe = getattr(cfg, "feat_extract_norm", "layer") != "group"
        self.padded = safe if padded is None else padded
        self.frame_shift_ms = None
        if level == "frame":
            ratio = getattr(cfg, "inputs_to_logits_ratio", None)
            if ratio is None and hasattr(cfg, "conv_stride"):
                ratio = int(np.prod(cfg.conv_stride))
            if ratio is None or not hasattr(model, "_get_feat_extract_output_lengths"):
                raise SpecError(f"{type(model).__name__}: cannot tell its frame shift / output lengths")
            self.frame_shift_ms = 1000.0 * float(ratio) / self.sample_rate
        self.kdpipe_class_names = class_names
        from pipeline.modalities import AudioPreprocessing

        # The raw waveform at the extractor's rate; its math runs in forward().
        self.kdpipe_preprocessing = AudioPreprocessing(sample_rate=self.sample_rate, features="none").to_dict()

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid samples (B,) -> valid output frames (B,), by the model's own length rule."""
        return self.model._get_feat_extract_output_lengths(lengths.long()).long()

    def _whisper(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, n_mels, frames): WhisperFeatureExtractor._torch_extract_fbank_features on
        every row padded (zeros) or truncated to chunk_length seconds."""
        fe = self.extractor
        n = int(fe.n_samples)
        mask = torch.arange(wave.shape[1], device=wave.device).unsqueeze(0) < lengths.unsqueeze(1)
        x = (wave * mask)[:, :n]
        if x.shape[1] < n:
            x = nn.functional.pad(x, (0, n - x.shape[1]))
        window = torch.hann_window(fe.n_fft, device=x.device)
        stft = torch.stft(x, fe.n_fft, fe.hop_length, window=window, return_complex=True)
        mags = stft[..., :-1].abs() ** 2  # (B, F, frames)
        mel = self.mel_filters.T @ mags
        log_spec = torch.clamp(mel, min=1e-10).log10()
        top = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, top - 8.0)
        return (log_spec + 4.0) / 4.0

    def _ast(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, max_length, num_mel_bins): ASTFeatureExtractor per row."""
        import torchaudio

        fe = self.extractor
        rows = []
        for b in range(wave.shape[0]):
            fb = torchaudio.compliance.kaldi.fbank(wave[b, : int(lengths[b])].unsqueeze(0),
                                                   sample_frequency=fe.sampling_rate, window_type="hanning",
                                                   num_mel_bins=fe.num_mel_bins)  # (T, F)
            fb = fb[: fe.max_length]
            if fb.shape[0] < fe.max_length:
                fb = nn.functional.pad(fb, (0, 0, 0, fe.max_length - fb.shape[0]))
            rows.append(fb)
        feats = torch.stack(rows)
        if fe.do_normalize:
            feats = (feats - fe.mean) / (fe.std * 2)
        return feats

    def _run(self, **inputs) -> torch.Tensor:
        return self.model(**inputs).logits.float()

    def _extractor_rows(self, wave: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for b in range(wave.shape[0]):
            x = wave[b, : int(lengths[b])].float().cpu().numpy()
            inputs = self.extractor(x, sampling_rate=self.sample_rate, return_tensors="pt")
            outs.append(self._run(**{k: v.to(wave.device) for k, v in inputs.items()})[0])
        return outs

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            lengths = torch.full((wave.shape[0],), wave.shape[1], device=wave.device)
        lengths = lengths.to(wave.device).long()
        with torch.autocast(wave.device.type, enabled=False):  # the extractor's math in fp32
            if self.features == "whisper":
                feats = self._whisper(wave.float(), lengths)
            elif self.features == "ast":
                feats = self._ast(wave.float(), lengths)
            elif self.features == "wave" and self.extractor.do_normalize:
                feats = _wave_normalize(wave.float(), lengths, float(self.extractor.padding_value))
            else:
                feats = wave.float()
        if self.features == "whisper":
            return self._run(input_features=feats)
        if self.features == "ast":
            return self._run(input_values=feats)
        if self.features == "extractor":
            rows = self._extractor_rows(wave, lengths)
        elif self.padded:
            mask = (torch.arange(feats.shape[1], device=feats.device).unsqueeze(0) < lengths.unsqueeze(1)).long()
            return self._run(input_values=feats, attention_mask=mask)
        else:  # equal-length groups, unpadded: each row's output is its output alone
            rows = [None] * feats.shape[0]
            for n in torch.unique(lengths).tolist():
                idx = torch.nonzero(lengths == n).flatten()
                out = self._run(input_values=feats.index_select(0, idx)[:, :n])
                for j, i in enumerate(idx.tolist()):
                    rows[i] = out[j]
        if self.level == "utterance":
            return torch.stack(rows)
        return nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T'max, C)


# --------------------------------------------------------------------------------------------
# images


def image_preprocessing(ip, uri: str) -> dict:
    """A transformers image processor -> kdpipe's image preprocessing dict (square crops)."""
    from pipeline.modalities.image import ImagePreprocessing

    backend = "torchvision-v2" if getattr(ip, "backend", "pil") == "torchvision" else "pil"
    size, crop_size = ip.size, getattr(ip, "crop_size", None)
    name = type(ip).__name__

    def side(s, what) -> int:
        if s is None:
            raise SpecError(f"hf:{uri}: {name} has no {what}")
        if s.get("height") and s.get("width"):
            if s["height"] != s["width"]:
                raise SpecError(f"hf:{uri}: {name} {what} {s['height']}x{s['width']} is not square; "
                                "kdpipe's image inputs are square crops")
            return int(s["height"])
        raise SpecError(f"hf:{uri}: {name} {what} {dict(s)} is not supported")

    if not getattr(ip, "do_resize", True):
        raise SpecError(f"hf:{uri}: {name} does not resize (do_resize=False): images would not share a size")
    if name.startswith("ConvNextImageProcessor"):
        shortest = int(size["shortest_edge"])
        if shortest < 384:
            resize, mode, crop = int(shortest / ip.crop_pct), "shortest_edge", shortest
        else:
            resize, mode, crop = shortest, "exact", shortest
    elif size.get("shortest_edge") and not size.get("longest_edge"):
        resize, mode = int(size["shortest_edge"]), "shortest_edge"
        if not getattr(ip, "do_center_crop", False):
            raise SpecError(f"hf:{uri}: {name} resizes the shortest edge without a centre crop: "
                            "images would not share a size")
        crop = side(crop_size, "crop_size")
    else:
        resize, mode = side(size, "size"), "exact"
        crop = side(crop_size, "crop_size") if getattr(ip, "do_center_crop", False) else resize
    resample = _PIL_NAMES[int(getattr(ip, "resample", 2))]
    if resample == "nearest" and backend != "pil":
        resample = "nearest-exact"  # transformers maps PIL NEAREST to torchvision NEAREST_EXACT
    rf = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
    if getattr(ip, "do_normalize", True):
        mean, std = list(ip.image_mean), list(ip.image_std)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    # HF: (x * rf - mean) / std == kdpipe: (x / 255 - mean') / std' with mean', std' = mean, std / (255 rf)
    scale = 255.0 * rf
    mean, std = [m / scale for m in mean], [s / scale for s in std]
    try:
        return ImagePreprocessing(resize=resize, crop=crop, mean=tuple(mean), std=tuple(std), resize_mode=mode,
                                  resample=resample, crop_offset="floor", backend=backend).to_dict()
    except ValueError as e:
        raise SpecError(f"hf:{uri}: {name}: {e}") from None


def check_image_preprocessing(ip, prep: dict, uri: str, tol: float = 1e-4) -> None:
    """Feed two probe images (odd sizes, portrait and landscape) through the processor and
    through kdpipe's decode + frontend; refuse the processor if they differ."""
    import io

    from PIL import Image

    from pipeline.modalities import preprocessing_from_dict
    from pipeline.modalities.frontends import make_frontend
    from pipeline.modalities.image import prepare_image

    p = preprocessing_from_dict(prep)
    frontend = make_frontend(p)
    rng = np.random.default_rng(0)
    for h, w in ((37, 61), (83, 45)):
        base = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth, like a photo
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        ours, _ = frontend(torch.from_numpy(prepare_image(buf.getvalue(), p))[None])
        theirs = ip(images=Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), return_tensors="pt")["pixel_values"]
        if tuple(theirs.shape) != tuple(ours.shape) or float((theirs.float() - ours).abs().max()) > tol:
            diff = float((theirs.float() - ours).abs().max()) if theirs.shape == ours.shape else None
            raise SpecError(f"hf:{uri}: kdpipe cannot reproduce {type(ip).__name__} (shapes {tuple(theirs.shape)} vs "
                            f"{tuple(ours.shape)}, max difference {diff}); choose the preprocessing with --image-* flags "
                            "and a wrapper model")


class HFImageTeacher(nn.Module):
    """forward(pixel_values (B, 3, H, W) normalised, lengths None) -> logits (B, C)."""

    modality = "image"
    level = "utterance"
    frame_shift_ms = None

    def __init__(self, model: nn.Module, preprocessing: dict, class_names: list[str] | None):
        super().__init__()
        self.model = model
        self.num_classes = int(model.config.num_labels)
        self.kdpipe_preprocessing = preprocessing
        self.kdpipe_class_names = class_names

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(pixel_values=x).logits.float()


# --------------------------------------------------------------------------------------------
# spec entry points


def _class_names(cfg: dict, num: int, local: str, task: str) -> list[str] | None:
    id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
    names = [id2label.get(i) for i in range(num)]
    if all(n is not None for n in names) and any(n != f"LABEL_{i}" for i, n in enumerate(names)):
        return names
    vocab = os.path.join(local, "vocab.json")
    if task == "ctc" and os.path.exists(vocab):  # a CTC head's classes are its tokenizer's tokens
        with open(vocab) as f:
            tok = {int(i): t for t, i in json.load(f).items()}
        if len(tok) == num and set(tok) == set(range(num)):
            return [tok[i] for i in range(num)]
    return None


def build(spec) -> nn.Module:
    transformers = require("transformers", "hf")
    uri = spec.weights
    unknown = set(spec.kwargs) - OPTIONS
    if unknown:
        raise SpecError(f"{spec.source}: unknown option(s) {', '.join(sorted(unknown))} (hf: takes {sorted(OPTIONS)})")
    cfg = _read_json(uri, "config.json")
    if cfg.get("auto_map"):
        raise SpecError(f"hf:{uri}: config.json names custom code (auto_map); kdpipe never runs code shipped with "
                        "a model (trust_remote_code stays off)")
    task, cls_name = resolve_task(cfg, spec.kwargs.get("task"), uri)
    files, safetensors = _weights_files(uri)
    _read_json(uri, PROCESSOR_CONFIG)
    local = local_dir(uri)
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, cls_name)
    try:
        model = cls.from_pretrained(local, local_files_only=True, use_safetensors=safetensors, weights_only=True,
                                    dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, a refused pickle (UnpicklingError), ...
        raise SpecError(f"hf:{uri}: cannot load {cls_name} ({type(e).__name__}: {e})") from None
    model.eval()
    modality, level = TASKS[task][1], TASKS[task][2]
    num = int(model.config.vocab_size if task == "ctc" else model.config.num_labels)
    names = _class_names(cfg, num, local, task)
    if modality == "audio":
        fe = transformers.AutoFeatureExtractor.from_pretrained(local, local_files_only=True, trust_remote_code=False)
        batch = spec.kwargs.get("batch")
        if batch not in (None, "padded", "exact"):
            raise SpecError(f"{spec.source}: batch must be 'padded' or 'exact', got {batch!r}")
        return HFAudioTeacher(model, fe, task, level, names, padded=True if batch == "padded" else None)
    backend = spec.kwargs.get("image_backend", "torchvision")
    if backend not in ("torchvision", "pil"):
        raise SpecError(f"{spec.source}: image_backend must be 'torchvision' or 'pil', got {backend!r}")
    ip = transformers.AutoImageProcessor.from_pretrained(local, local_files_only=True, trust_remote_code=False,
                                                         backend=backend)
    prep = image_preprocessing(ip, uri)
    check_image_preprocessing(ip, prep, uri)
    return HFImageTeacher(model, prep, names)


def identity(spec) -> dict[str, Any]:
    uri = spec.weights
    cfg = _read_json(uri, "config.json")
    task, cls_name = resolve_task(cfg, spec.kwargs.get("task"), uri)
    files, _ = _weights_files(uri)
    return {
        "kind": "hf", "architecture": cls_name, "task": task, "model_type": cfg.get("model_type"),
        "options": dict(spec.kwargs), "config_sha256": _digest_json(cfg),
        "processor_sha256": _digest_json(_read_json(uri, PROCESSOR_CONFIG, required=False)),
        "weights_sha256": digest_files(files),
    }
