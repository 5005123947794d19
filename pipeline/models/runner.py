"""The one model runner: payload column -> device batch -> frontend -> model(s) -> logits and
valid output frames. Teacher actors, evaluation, online distillation and the train loop all
call models through it, so padding, lengths and precision are handled one way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.base import output_lengths
from pipeline.models.spec import build_model, parse_spec
from pipeline.modalities import preprocessing_from_dict
from pipeline.modalities.frontends import make_frontend
from pipeline.modalities.payload import encoded
from pipeline.modalities.staging import payload_batch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Fixed audio lengths (seconds) of a compiled runner's inputs: from 1 s on, each at most 25 %
# longer than the one before, so padding wastes at most a fifth of the work and a run over
# clips of up to 30 s compiles at most 21 graphs (longer inputs: multiples of 10 s).
LENGTH_BUCKETS_S = (0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 18.0,
                    20.0, 25.0, 30.0)


def bucket_length(n: int, sample_rate: int) -> int:
    """The fixed input length (samples) a compiled runner pads n samples to: the smallest
    LENGTH_BUCKETS_S entry that holds n, beyond them the next multiple of 10 s."""
    for s in LENGTH_BUCKETS_S:
        if n <= round(s * sample_rate):
            return round(s * sample_rate)
    step = 10 * sample_rate
    return -(-n // step) * step


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, else CUDA when this process sees a GPU, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (its attributes: output_lengths, ...)."""
    return model.module if hasattr(model, "module") else model


@dataclass
class Output:
    """logits: one (B, C) or (B, T', C) tensor per model (float32); frames: (B,) valid output
    frames of each row at frame level (of the first model; all_frames: of each), else None;
    feat_len: (B,) valid frontend frames (audio) or None."""

    logits: list[torch.Tensor]
    frames: torch.Tensor | None
    feat_len: torch.Tensor | None
    all_frames: list | None = None  # frames of every model (models may differ in their lengths)


class ModelRunner:
    """Models + their frontend on one device.

    precision: the autocast dtype on CUDA ("bf16", "fp16", "fp32"); CPU always runs fp32.
    """

    def __init__(self, models: list[nn.Module], preprocessing, device=None, precision: str = "fp32"):
        self.device = pick_device(device)
        self.prep = preprocessing if not isinstance(preprocessing, dict) else preprocessing_from_dict(preprocessing)
        self.frontend = make_frontend(self.prep).to(self.device)
        self.models = models
        self.dtype = PRECISIONS[precision] if self.device.type == "cuda" else torch.float32
        self.pin = self.device.type == "cuda"
        self.static_rows: int | None = None  # set by compile(): predict's fixed batch size

    @classmethod
    def from_specs(cls, specs, trust, preprocessing, device=None, precision: str = "fp32") -> ModelRunner:
        """The models of ``specs`` (parsed under ``trust``, built, on the device, eval mode)
        with the frontend of ``preprocessing``: a teacher, an ensemble, models to evaluate."""
        device = pick_device(device)
        models = [build_model(parse_spec(s, trust)).to(device).eval() for s in specs]
        return cls(models, preprocessing, device, precision)

    def compile(self, batch_size: int, backend: str = "inductor") -> None:
        """``torch.compile`` every model for fixed input shapes: from now on ``predict`` pads a
        batch to ``batch_size`` rows (padding rows are dropped from the outputs) and audio to a
        length bucket (``bucket_length``), so each shape compiles once and is then reused.

        Frame-level outputs keep their valid frames (lengths are unchanged); a model whose
        outputs depend on padding (wav2vec 2.0's group-norm extractor) sees more of it.
        backend: torch.compile's ("eager" traces without generating code: quick, for checks)."""
        import torch._dynamo

        if getattr(self.prep, "features", None) == "fbank":
            # Kaldi fbank is computed row by row and padded to the longest *valid* row, so the
            # model's input shape would change with every batch, bucket or not.
            raise ValueError("compile: fbank features have no fixed shape (use logmel or none)")
        # Process-wide, but only raised: one graph per length bucket must not hit dynamo's default
        # limit (8) and fall back to eager in silence. (This process runs one teacher.)
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, len(LENGTH_BUCKETS_S) + 8)
        self.models = [torch.compile(m, dynamic=False, backend=backend) for m in self.models]
        self.static_rows = batch_size

    def _static(self, x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, ...) -> (static_rows, ...) zero-padded, audio (B, N) also to its length bucket;
        padding rows get full lengths (they are computed, then dropped)."""
        b = x.shape[0]
        rows = max(self.static_rows or b, b)
        shape = (rows, bucket_length(x.shape[1], self.prep.sample_rate)) if lengths is not None else (rows, *x.shape[1:])
        if tuple(x.shape) == shape:
            return x, lengths
        out = x.new_zeros(shape)
        out[:b, : x.shape[1]] = x
        if lengths is None:
            return out, None
        full = torch.full((rows,), shape[1], dtype=lengths.dtype, device=lengths.device)
        full[:b] = lengths
        return out, full

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to_device(self, payload) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A payload column (pipeline.modalities.payload) -> (x, lengths) on the device.

        audio: x (B, N_max) float32 zero-padded, lengths (B,); image: x (B, H, W, 3) uint8, None.
        One host copy (pinned on CUDA), then an asynchronous copy to the device; image
        decode="gpu": the JPEGs decoded there (device_decode; raises the DecodeError of a row
        that does not decode: here every row must, the teacher's actor keeps them apart)."""
        if encoded(self.prep):
            from pipeline.modalities.device_decode import decode_batch

            dec = decode_batch(payload, self.prep, self.device)
            if dec.errors:
                raise next(iter(dec.errors.values()))
            return dec.x, None
        x, lengths = payload_batch(payload, self.prep, pin=self.pin)
        x = x.to(self.device, non_blocking=self.pin)
        return x, (lengths.to(self.device, non_blocking=self.pin) if lengths is not None else None)

    @staticmethod
    def call(model: nn.Module, feats: torch.Tensor, feat_len: torch.Tensor | None) -> torch.Tensor:
        """model(feats, lengths) for audio, model(feats) for images (kdpipe's convention)."""
        return model(feats, feat_len) if feat_len is not None else model(feats)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> Output:
        """Frontend + every model under the precision policy (gradients as the caller's mode)."""
        feats, feat_len = self.frontend(x, lengths)
        with self.autocast():
            outs = [self.call(m, feats, feat_len).float() for m in self.models]
        frames = [None] * len(outs)
        in_frames = feats.shape[1]
        for i, (m, o) in enumerate(zip(self.models, outs)):
            if o.dim() == 3:
                fl = feat_len if feat_len is not None else torch.full((feats.shape[0],), in_frames, device=feats.device)
                frames[i] = output_lengths(unwrap(m), fl, in_frames, o.shape[1])
        return Output(outs, frames[0], feat_len, frames)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, lengths: torch.Tensor | None) -> Output:
        """``forward`` without autograd (teachers, evaluation); after ``compile``, on the input
        padded to its fixed shape, with the padding rows dropped from every output."""
        if self.static_rows is None:
            return self.forward(x, lengths)
        b = x.shape[0]
        out = self.forward(*self._static(x, lengths))
        cut = (lambda t: t[:b] if t is not None else None)  # noqa: E731
        return Output([o[:b] for o in out.logits], cut(out.frames), cut(out.feat_len),
                      [cut(f) for f in out.all_frames] if out.all_frames else None)
