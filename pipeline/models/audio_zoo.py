"""Reference speech models: a CNN and a conformer over log-mel, and wav2vec2 over raw waveform.

Every model follows pipeline/models/base.py: ``forward(x, lengths) -> logits`` with logits
(B, C) at utterance level or (B, T', C) at frame level, attributes ``num_classes``, ``level``,
``modality`` ("audio"), ``frame_shift_ms`` (None at utterance level) and an
``output_lengths(lengths) -> (B,)`` method (exported to TorchScript).

Padding never changes a row's result in eval mode: every layer that mixes time steps (3x3
convolutions, depthwise convolutions, attention) sees zeros (or masked keys) past a row's
length, exactly as the same row would alone with no padding. So a row's utterance logits, and
its first ``output_lengths`` frame logits, do not depend on what it was batched with.
(BatchNorm in train mode does see the zeroed padding in its batch statistics; that only moves
training-time statistics, never eval outputs.)

Factories take JSON-serialisable keyword arguments only, so a spec such as
``pipeline.models.zoo:audio_cnn?width=64&level=frame`` round-trips through config files.
"""

from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = ("utterance", "frame")


# ---------------------------------------------------------------------------------------------
# helpers (TorchScript-compatible)


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """lengths (B,) -> mask (B, max_len) bool, True on valid steps."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(h: Tensor, lengths: Tensor) -> Tensor:
    """Mean over valid time steps: h (B, T, D), lengths (B,) -> (B, D).

    Sums in float32 (bf16 sums over thousands of frames lose digits), returns h's dtype.
    A row with length 0 gives zeros, not NaN.
    """
    mask = lengths_to_mask(lengths, h.shape[1]).to(torch.float32)  # (B, T)
    total = torch.einsum("btd,bt->bd", h.to(torch.float32), mask)  # (B, D)
    return (total / lengths.clamp(min=1).to(torch.float32)[:, None]).to(h.dtype)


def conv_out_lengths(lengths: Tensor, stride: int) -> Tensor:
    """Valid output steps of a kernel-3, padding-1 convolution: floor((L - 1) / s) + 1 = ceil(L / s)."""
    if stride == 1:
        return lengths
    return torch.div(lengths + stride - 1, stride, rounding_mode="floor")


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def _check_stride(name: str, value: int, allowed: Tuple[int, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# audio_cnn


class _ConvBlock(nn.Module):
    """3x3 conv over (time, mel) + BatchNorm + ReLU, then zero the frames past each row's length.

    x (B, C_in, T, F), lengths (B,) -> (B, C_out, ceil(T / time_stride), ceil(F / freq_stride)), lengths'
    """

    def __init__(self, c_in: int, c_out: int, time_stride: int, freq_stride: int):
        super().__init__()
        self.time_stride = time_stride
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=(time_stride, freq_stride), padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        x = F.relu(self.bn(self.conv(x)))  # (B, C_out, T', F')
        lengths = conv_out_lengths(lengths, self.time_stride)
        mask = lengths_to_mask(lengths, x.shape[2])  # (B, T')
        return x * mask[:, None, :, None].to(x.dtype), lengths


class AudioCNN(nn.Module):
    """2-D CNN over log-mel (time x mel), utterance or frame level.

    Layout: stem conv 1->width, then ``depth`` blocks; block i has width * 2**(i // 2) channels,
    halves the mel axis, and the first log2(time_stride) blocks also halve time. Then the mel
    axis is averaged away and either masked-mean-pooled over time (utterance) or classified per
    frame (frame). Parameters ~ 72 * width**2 for depth 4 (width 8: ~5k, 32: ~75k, 64: ~300k).

    forward: x (B, T, F) log-mel, lengths (B,) valid frames or None (all valid)
             -> (B, C) utterance logits, or (B, ceil(T / time_stride), C) frame logits.
    """

    def __init__(self, num_classes: int = 10, n_mels: int = 40, width: int = 32, depth: int = 4,
                 level: str = "utterance", time_stride: int = 1, dropout: float = 0.1, hop_ms: float = 10.0):
        super().__init__()
        _check_level(level)
        _check_stride("time_stride", time_stride, (1, 2, 4))
        n_time_down = int(math.log2(time_stride))
        if depth < max(n_time_down, 1):
            raise ValueError(f"depth={depth} must be >= 1 and >= log2(time_stride)={n_time_down}")
        if width < 1 or n_mels < 1 or num_classes < 1:
            raise ValueError("width, n_mels and num_classes must be positive")
        self.num_classes = int(num_classes)
        self.level = level
        self.modality = "audio"
        self.n_mels = int(n_mels)
        self.time_stride = int(time_stride)
        self.frame_shift_ms: Optional[float] = float(hop_ms) * time_stride if level == "frame" else None

        self.stem = _ConvBlock(1, width, 1, 1)
        blocks = []
        c_in = width
        for i in range(depth):
            c_out = width * 2 ** (i // 2)
            blocks.append(_ConvBlock(c_in, c_out, 2 if i < n_time_down else 1, 2))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        B, T = x.shape[0], x.shape[1]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        lengths = lengths.to(device=x.device, dtype=torch.long)
        # Padding may hold anything (the frontend's log of zero, say): zero it first.
        x = x * lengths_to_mask(lengths, T)[:, :, None].to(x.dtype)
        h = x.unsqueeze(1)  # (B, 1, T, F)
        h, lengths = self.stem(h, lengths)
        for block in self.blocks:
            h, lengths = block(h, lengths)  # (B, C, T', F')
        h = h.mean(dim=3).transpose(1, 2)  # (B, T', C)
        if self.level == "utterance":
            h = masked_mean(h, lengths)  # (B, C)
        return self.head(self.dropout(h))  # (B, C_out) or (B, T', C_out)

    @torch.jit.export
    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Input frames (B,) -> valid output frames (B,): ceil(L / time_stride) (per stride-2 block)."""
        out = lengths.to(torch.long)
        s = self.time_stride
        while s > 1:
            out = conv_out_lengths(out, 2)
            s = s // 2
        return out


def audio_cnn(num_classes: int = 10, n_mels: int = 40, width: int = 32, depth: int = 4,
              level: str = "utterance", time_stride: int = 1, dropout: float = 0.1,
              hop_ms: float = 10.0) -> AudioCNN:
    """2-D CNN over log-mel features.

    x (B, T, n_mels) log-mel at ``hop_ms`` per frame; lengths (B,) valid frames.
    level="utterance": logits (B, num_classes) from a masked mean over valid frames.
    level="frame": logits (B, ceil(T / time_stride), num_classes), frame_shift_ms = hop_ms * time_stride.
    time_stride in {1, 2, 4}. Sizes (depth 4, 10 classes): width 8 ~5k params (tiny student),
    32 ~75k (default), 64 ~300k (teacher).
    """
    return AudioCNN(num_classes, n_mels, width, depth, level, time_stride, dropout, hop_ms)


# ---------------------------------------------------------------------------------------------
# audio_conformer


class AudioConformer(nn.Module):
    """Conv2d subsampling + torchaudio.models.Conformer, utterance or frame level.

    Subsampling: two 3x3 convs (stride 2 on mel in both; stride 2 on time in the first log2(subsample)),
    ReLU, masked after each; then (B, T', C * F') -> Linear -> (B, T', d_model).

    The conformer layers are torchaudio's (same parameters and state_dict names), but run by
    ``forward`` so that the depthwise convolution sees zeros past each row's length: torchaudio's
    own forward convolves over the padding, so a row's output would depend on its batch, and it
    builds its attention mask only up to max(lengths), which fails on batches padded further.
    """

    def __init__(self, num_classes: int = 10, n_mels: int = 40, d_model: int = 96, layers: int = 2,
                 heads: int = 4, ffn: int = 192, kernel: int = 15, subsample: int = 4,
                 level: str = "utterance", dropout: float = 0.1, hop_ms: float = 10.0):
        super().__init__()
        import torchaudio

        _check_level(level)
        _check_stride("subsample", subsample, (1, 2, 4))
        if d_model % heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        if kernel % 2 != 1:
            raise ValueError(f"kernel={kernel} must be odd")
        self.num_classes = int(num_classes)
        self.level = level
        self.modality = "audio"
        self.n_mels = int(n_mels)
        self.subsample = int(subsample)
        self.frame_shift_ms: Optional[float] = float(hop_ms) * subsample if level == "frame" else None

        t1 = 2 if subsample >= 2 else 1
        t2 = 2 if subsample >= 4 else 1
        self.stride1 = t1
        self.stride2 = t2
        self.conv1 = nn.Conv2d(1, d_model, 3, stride=(t1, 2), padding=1)
        self.conv2 = nn.Conv2d(d_model, d_model, 3, stride=(t2, 2), padding=1)
        f_out = ((n_mels + 1) // 2 + 1) // 2
        self.proj = nn.Linear(d_model * f_out, d_model)
        self.in_dropout = nn.Dropout(dropout)
        self.conformer = torchaudio.models.Conformer(
            input_dim=d_model, num_heads=heads, ffn_dim=ffn, num_layers=layers,
            depthwise_conv_kernel_size=kernel, dropout=dropout,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)
        # forward re-runs torchaudio's layer step by step: fail here, not silently, if it changes
        for layer in self.conformer.conformer_layers:
            seq = layer.conv_module.sequential
            if layer.convolution_first or len(seq) != 7 or not isinstance(seq[2], nn.Conv1d) or seq[2].groups != d_model:
                raise RuntimeError("torchaudio.models.Conformer's layer layout changed; update AudioConformer.forward")

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        B, T = x.shape[0], x.shape[1]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        lengths = lengths.to(device=x.device, dtype=torch.long)
        x = x * lengths_to_mask(lengths, T)[:, :, None].to(x.dtype)
        h = F.relu(self.conv1(x.unsqueeze(1)))  # (B, C, T1, F1)
        lengths = conv_out_lengths(lengths, self.stride1)
        h = h * lengths_to_mask(lengths, h.shape[2])[:, None, :, None].to(h.dtype)
        h = F.relu(self.conv2(h))  # (B, C, T', F')
        lengths = conv_out_lengths(lengths, self.stride2)
        h = h.permute(0, 2, 1, 3).flatten(2)  # (B, T', C * F')
        h = self.in_dropout(self.proj(h))  # (B, T', D)

        T2 = h.shape[1]
        valid = lengths_to_mask(lengths, T2)  # (B, T')
        # At least one key per row: a zero-length row would make attention NaN.
        key_padding = ~lengths_to_mask(lengths.clamp(min=1), T2)  # (B, T') True = ignore
        conv_mask = valid[:, None, :].to(h.dtype)  # (B, 1, T')
        h = h.transpose(0, 1)  # (T', B, D): torchaudio's layers are time-major
        for layer in self.conformer.conformer_layers:
            # == torchaudio ConformerLayer.forward (convolution_first=False), with the conv masked
            residual = h
            h = layer.ffn1(h) * 0.5 + residual
            residual = h
            a = layer.self_attn_layer_norm(h)
            a, _ = layer.self_attn(query=a, key=a, value=a, key_padding_mask=key_padding, need_weights=False)
            h = layer.self_attn_dropout(a) + residual
            residual = h
            cm = layer.conv_module
            c = cm.layer_norm(h.transpose(0, 1)).transpose(1, 2)  # (B, D, T')
            c = cm.sequential[1](cm.sequential[0](c))  # pointwise conv + GLU
            c = c * conv_mask  # zeros past the end, as an unpadded row sees
            c = cm.sequential[4](cm.sequential[3](cm.sequential[2](c)))  # depthwise conv, norm, SiLU
            c = cm.sequential[6](cm.sequential[5](c))  # pointwise conv, dropout
            h = residual + c.permute(2, 0, 1)
            residual = h
            h = layer.ffn2(h) * 0.5 + residual
            h = layer.final_layer_norm(h)
        h = h.transpose(0, 1)  # (B, T', D)
        if self.level == "utterance":
            h = masked_mean(h, lengths)  # (B, D)
        return self.head(self.dropout(h))

    @torch.jit.export
    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Input frames (B,) -> output frames (B,): ceil(L / subsample) (per stride-2 conv)."""
        out = conv_out_lengths(lengths.to(torch.long), self.stride1)
        return conv_out_lengths(out, self.stride2)


def audio_conformer(num_classes: int = 10, n_mels: int = 40, d_model: int = 96, layers: int = 2,
                    heads: int = 4, ffn: int = 192, kernel: int = 15, subsample: int = 4,
                    level: str = "utterance", dropout: float = 0.1, hop_ms: float = 10.0) -> AudioConformer:
    """Small conformer over log-mel: conv subsampling + torchaudio.models.Conformer.

    x (B, T, n_mels) log-mel at ``hop_ms``; lengths (B,) valid frames (attention key padding).
    level="utterance": logits (B, num_classes) from a masked mean over valid output frames.
    level="frame": logits (B, ceil(T / subsample), num_classes), frame_shift_ms = hop_ms * subsample.
    subsample in {1, 2, 4}. Defaults: ~0.46M params.
    """
    return AudioConformer(num_classes, n_mels, d_model, layers, heads, ffn, kernel, subsample, level,
                          dropout, hop_ms)


# ---------------------------------------------------------------------------------------------
# wav2vec2 (raw waveform, frame level)

DEFAULT_W2V2_CONV: List[Tuple[int, int]] = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2  # (kernel, stride): 320x


class Wav2Vec2Frames(nn.Module):
    """torchaudio Wav2Vec2Model with an ``aux`` linear head, as a kdpipe frame-level model.

    forward: x (B, N) waveform at ``sample_rate``, lengths (B,) valid samples or None
             -> logits (B, T', C), T' = the conv feature extractor's output frames
             (floor((L - k) / s) + 1 per layer; 320x and 20 ms per frame at 16 kHz).
    """

    def __init__(self, model: nn.Module, conv: List[Tuple[int, int]], num_classes: int, sample_rate: int = 16000):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.level = "frame"
        self.modality = "audio"
        self.sample_rate = int(sample_rate)
        self.kernels: List[int] = [int(k) for k, _ in conv]
        self.strides: List[int] = [int(s) for _, s in conv]
        self.frame_shift_ms: Optional[float] = 1000.0 * math.prod(self.strides) / sample_rate

    def __prepare_scriptable__(self) -> "Wav2Vec2Frames":
        # torchaudio strips weight_norm from the positional conv in place when scripted, which
        # would rename this (eager) model's state_dict keys; script a copy instead.
        return copy.deepcopy(self)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        if lengths is not None:
            lengths = lengths.to(device=x.device, dtype=torch.long)
        logits, _ = self.model(x, lengths)
        return logits  # (B, T', C)

    @torch.jit.export
    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Valid samples (B,) -> valid frames (B,): floor((L - k) / s) + 1 per conv layer, >= 0."""
        out = lengths.to(torch.long)
        for k, s in zip(self.kernels, self.strides):
            out = torch.clamp(torch.div(out - k, s, rounding_mode="floor") + 1, min=0)
        return out


def wav2vec2_large_frames(num_classes: int = 32, dropout: float = 0.1, layer_drop: float = 0.0) -> Wav2Vec2Frames:
    """wav2vec 2.0 large (torchaudio.models.wav2vec2_large, random init, ~315M params) with a frame head.

    x (B, N) waveform at 16 kHz, lengths (B,) samples -> logits (B, T', num_classes), 20 ms frames.
    For throughput benchmarks. Its group-norm feature extractor normalises over the whole
    (padded) clip, as the original does, so padding does change its outputs slightly.
    layer_drop defaults to 0 (torchaudio's 0.1 skips layers at random: DDP would see unused parameters).
    """
    import torchaudio

    model = torchaudio.models.wav2vec2_large(
        encoder_projection_dropout=dropout, encoder_attention_dropout=dropout,
        encoder_ff_interm_dropout=dropout, encoder_dropout=dropout,
        encoder_layer_drop=layer_drop, aux_num_out=num_classes,
    )
    return Wav2Vec2Frames(model, DEFAULT_W2V2_CONV, num_classes)


def wav2vec2_frames(num_classes: int = 32, conv_dim: int = 64, embed_dim: int = 64, encoder_layers: int = 2,
                    heads: int = 4, ffn: int = 128, pos_conv_kernel: int = 32, pos_conv_groups: int = 4,
                    extractor_mode: str = "layer_norm", dropout: float = 0.1, layer_drop: float = 0.0) -> Wav2Vec2Frames:
    """A small wav2vec2 (torchaudio.models.wav2vec2_model) with a frame head, for CPU tests.

    Same conv strides as wav2vec2 (320x: 20 ms frames at 16 kHz), narrower everywhere.
    x (B, N) waveform at 16 kHz, lengths (B,) samples -> logits (B, T', num_classes).
    extractor_mode="layer_norm" (per-frame norms) keeps rows independent of their padding.
    Defaults: ~0.2M params.
    """
    import torchaudio

    if embed_dim % heads != 0 or embed_dim % pos_conv_groups != 0:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by heads={heads} and pos_conv_groups={pos_conv_groups}")
    conv_cfg = [(conv_dim, k, s) for k, s in DEFAULT_W2V2_CONV]
    model = torchaudio.models.wav2vec2_model(
        extractor_mode=extractor_mode, extractor_conv_layer_config=conv_cfg, extractor_conv_bias=True,
        encoder_embed_dim=embed_dim, encoder_projection_dropout=dropout,
        encoder_pos_conv_kernel=pos_conv_kernel, encoder_pos_conv_groups=pos_conv_groups,
        encoder_num_layers=encoder_layers, encoder_num_heads=heads, encoder_attention_dropout=dropout,
        encoder_ff_interm_features=ffn, encoder_ff_interm_dropout=dropout, encoder_dropout=dropout,
        encoder_layer_norm_first=True, encoder_layer_drop=layer_drop, aux_num_out=num_classes,
    )
    return Wav2Vec2Frames(model, DEFAULT_W2V2_CONV, num_classes)
