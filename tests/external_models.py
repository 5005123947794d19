"""Tiny random-initialised teachers of every external kind, saved the way users save them.

Built from the libraries' config classes (a layer or two, hidden sizes 16-32: no download).
Heads are initialised with a larger std than the libraries' default so that the classes are
well separated and a top-k comparison is meaningful.
"""

from __future__ import annotations

import os

import numpy as np
import torch

LABELS = ["yes", "no", "up", "down", "left", "right"]


def _spread_head(module: torch.nn.Module, std: float = 1.0) -> None:
    torch.manual_seed(1)
    for name, p in module.named_parameters():
        if any(h in name for h in ("classifier", "lm_head", "head", "fc")) and p.dim() >= 1:
            torch.nn.init.normal_(p, std=std)


def _w2v2_config(**extra):
    import transformers

    base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                feat_extract_norm="layer", do_stable_layer_norm=True, classifier_proj_size=16,
                hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                layerdrop=0.0, mask_time_prob=0.0)
    base.update(extra)
    return transformers.Wav2Vec2Config(**base)


def save_wav2vec2_classifier(path, norm: str = "layer", labels=LABELS) -> str:
    """Wav2Vec2ForSequenceClassification (utterance level) + Wav2Vec2FeatureExtractor."""
    import transformers

    cfg = _w2v2_config(feat_extract_norm=norm, do_stable_layer_norm=norm == "layer", num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForSequenceClassification(cfg).eval()
    _spread_head(model)
    fe = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True,
                                               return_attention_mask=norm == "layer")
    model.save_pretrained(path)
    fe.save_pretrained(path)
    return str(path)


def save_hubert_classifier(path, labels=LABELS) -> str:
    """HubertForSequenceClassification (group-norm feature encoder, like hubert-base) + extractor."""
    import transformers

    cfg = transformers.HubertConfig(**{**_w2v2_config().to_dict(), "feat_extract_norm": "group",
                                       "do_stable_layer_norm": False, "num_labels": len(labels),
                                       "id2label": dict(enumerate(labels)),
                                       "label2id": {n: i for i, n in enumerate(labels)}, "model_type": "hubert"})
    torch.manual_seed(0)
    model = transformers.HubertForSequenceClassification(cfg).eval()
    _spread_head(model)
    fe = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False, return_attention_mask=False)
    model.save_pretrained(path)
    fe.save_pretrained(path)
    return str(path)


def save_wav2vec2_ctc(path, vocab: int = 12) -> str:
    """Wav2Vec2ForCTC (frame level, 20 ms) + its feature extractor + a vocab.json."""
    import json

    import transformers

    cfg = _w2v2_config(vocab_size=vocab)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(cfg).eval()
    _spread_head(model, std=0.5)
    fe = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True)
    model.save_pretrained(path)
    fe.save_pretrained(path)
    tokens = ["<pad>", "|"] + [chr(ord("a") + i) for i in range(vocab - 2)]
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    return str(path)


def save_wav2vec2_frame_classifier(path, labels=LABELS) -> str:
    """Wav2Vec2ForAudioFrameClassification (frame level, 20 ms: e.g. VAD / diarisation heads)."""
    import transformers

    cfg = _w2v2_config(num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForAudioFrameClassification(cfg).eval()
    _spread_head(model)
    fe = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True)
    model.save_pretrained(path)
    fe.save_pretrained(path)
    return str(path)


def save_ast(path, labels=LABELS) -> str:
    """ASTForAudioClassification + ASTFeatureExtractor (Kaldi fbank, 128 frames)."""
    import transformers

    cfg = transformers.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 num_mel_bins=32, max_length=128, patch_size=16, frequency_stride=16, time_stride=16,
                                 num_labels=len(labels), id2label=dict(enumerate(labels)),
                                 label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = transformers.ASTForAudioClassification(cfg).eval()
    _spread_head(model)
    fe = transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=128)
    model.save_pretrained(path)
    fe.save_pretrained(path)
    return str(path)


def save_whisper(path, labels=LABELS) -> str:
    """WhisperForAudioClassification (encoder) + WhisperFeatureExtractor padded to 2 s."""
    import transformers

    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16,
                                     max_source_positions=100, classifier_proj_size=16, num_labels=len(labels),
                                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = transformers.WhisperForAudioClassification(cfg).eval()
    _spread_head(model, std=3.0)
    fe = transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=2)
    model.save_pretrained(path)
    fe.save_pretrained(path)
    return str(path)


def save_vit(path, labels=LABELS, size: int = 32) -> str:
    """ViTForImageClassification + ViTImageProcessor (exact resize to size x size, bilinear)."""
    import transformers

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=size, patch_size=8, num_labels=len(labels),
                                 id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    _spread_head(model)
    ip = transformers.ViTImageProcessor(size={"height": size, "width": size})
    model.save_pretrained(path)
    ip.save_pretrained(path)
    return str(path)


def save_convnext(path, labels=LABELS, size: int = 32) -> str:
    """ConvNextForImageClassification + ConvNextImageProcessor (shortest edge / crop_pct, bicubic)."""
    import transformers

    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                      image_size=size, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                      label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    _spread_head(model)
    ip = transformers.ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=0.875)
    model.save_pretrained(path)
    ip.save_pretrained(path)
    return str(path)


def save_state_dict(model: torch.nn.Module, path, fmt: str = "safetensors") -> str:
    """A state_dict as users save one: safetensors, or torch.save (loaded with weights_only=True)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


def timm_model(name: str = "test_vit", num_classes: int = 6):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    _spread_head(model)
    return model


def torchvision_model(name: str = "mobilenet_v3_small", num_classes: int = 6):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()
    _spread_head(model, std=0.3)
    return model


class TinyImageNet(torch.nn.Module):
    """A small CNN to export to ONNX: (B, 3, H, W) -> (B, C)."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class TinyFrameNet(torch.nn.Module):
    """Raw waveform -> frames: (B, N) float, lengths (B,) int64 -> (B, T', C), 10 ms frames at 16 kHz."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 16, 400, stride=160)
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, wave, lengths):
        h = torch.relu(self.conv(wave.unsqueeze(1))).transpose(1, 2)  # (B, T', 16)
        frames = torch.div(lengths - 400, 160, rounding_mode="floor") + 1
        mask = (torch.arange(h.shape[1]).unsqueeze(0) < frames.unsqueeze(1)).unsqueeze(-1)
        return self.fc(h * mask)


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random but photo-like (smooth) uint8 RGB image (H, W, 3)."""
    from PIL import Image

    base = rng.integers(0, 256, size=(h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC))
