"""Reference image models: a small CNN and ResNet (teachers/students), ViT and ResNet-50 (benchmarks).

Every model follows pipeline/models/base.py: ``forward(x, lengths=None) -> logits (B, C)`` for
x (B, 3, H, W) normalised images (lengths is ignored), with attributes ``num_classes``,
``level`` ("utterance": one row per image, as the cache format calls it), ``modality``
("image") and ``frame_shift_ms`` (None). The CNNs take any input size (adaptive pooling); the
ViT interpolates its position embeddings when the patch grid differs from ``image_size``.

Factories take JSON-serialisable keyword arguments only (``blocks`` may be a list).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _ImageModel(nn.Module):
    def _set_info(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.level = "utterance"
        self.modality = "image"
        self.frame_shift_ms: Optional[float] = None


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


# ---------------------------------------------------------------------------------------------
# image_cnn


class ImageCNN(_ImageModel):
    """``depth`` stages of [conv3x3-BN-ReLU x2, maxpool 2x2], stage i with width * 2**i channels,
    then global average pooling and a linear head.

    forward: x (B, 3, H, W) -> logits (B, num_classes). Any H, W >= 1.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        self._set_info(num_classes)
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth} width={width}")
        layers: List[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2 ** i
            layers += [_conv_bn_relu(c_in, c_out), _conv_bn_relu(c_out, c_out), nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        h = self.features(x)  # (B, C, H / 2**depth, W / 2**depth)
        h = self.pool(h).flatten(1)  # (B, C)
        return self.head(self.dropout(h))  # (B, num_classes)


def image_cnn(num_classes: int = 10, width: int = 16, depth: int = 2, dropout: float = 0.0) -> ImageCNN:
    """Small VGG-style CNN: x (B, 3, H, W) normalised -> logits (B, num_classes), any H, W.

    Sizes (10 classes): width 8 depth 2 ~4k params, width 16 depth 2 ~16k (default),
    width 32 depth 3 ~0.29M.
    """
    return ImageCNN(num_classes, width, depth, dropout)


# ---------------------------------------------------------------------------------------------
# image_resnet (CIFAR-style, basic blocks)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ImageResNet(_ImageModel):
    """CIFAR-style ResNet: conv3x3 stem, stages of basic blocks with width * 2**i channels
    (stride 2 from the second stage on), global average pooling, linear head.

    forward: x (B, 3, H, W) -> logits (B, num_classes). Any H, W >= 1.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: Sequence[int] = (1, 1, 1), dropout: float = 0.0):
        super().__init__()
        self._set_info(num_classes)
        blocks = tuple(int(b) for b in blocks)
        if not blocks or min(blocks) < 1 or width < 1:
            raise ValueError(f"blocks must be a non-empty list of positive ints and width >= 1, got {blocks}, {width}")
        self.stem = _conv_bn_relu(3, width)
        stages: List[nn.Module] = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n):
                stages.append(_BasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        h = self.stages(self.stem(x))  # (B, C, H / 2**(stages-1), W / 2**(stages-1))
        return self.head(self.dropout(self.pool(h).flatten(1)))  # (B, num_classes)


def image_resnet(num_classes: int = 10, width: int = 16, blocks: Sequence[int] = (1, 1, 1),
                 dropout: float = 0.0) -> ImageResNet:
    """Small ResNet: x (B, 3, H, W) normalised -> logits (B, num_classes), any H, W.

    blocks: basic blocks per stage (list or tuple). Sizes (10 classes): width 8 (1,1,1) ~20k
    params, width 16 (1,1,1) ~78k (default), width 16 (3,3,3) (ResNet-20) ~0.27M.
    """
    return ImageResNet(num_classes, width, blocks, dropout)


# ---------------------------------------------------------------------------------------------
# vit


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p)  # (B, H, N, Dh): flash/mem-efficient on GPU
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)). x (B, N, D)."""

    def __init__(self, dim: int, heads: int, mlp: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class ViT(_ImageModel):
    """Vision Transformer (Dosovitskiy et al.): patch embedding, class token, learned positions,
    pre-norm blocks with scaled_dot_product_attention, final LayerNorm, linear head on the class token.

    forward: x (B, 3, H, W) -> logits (B, num_classes). H, W multiples of ``patch``; a grid other
    than image_size / patch gets bicubic-interpolated position embeddings.
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 224, patch: int = 16, dim: int = 768,
                 depth: int = 12, heads: int = 12, mlp: int = 3072, dropout: float = 0.0):
        super().__init__()
        self._set_info(num_classes)
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if image_size % patch != 0:
            raise ValueError(f"image_size={image_size} must be a multiple of patch={patch}")
        self.patch = patch
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _pos(self, gh: int, gw: int) -> Tensor:
        if gh == self.grid and gw == self.grid:
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        D = grid_pos.shape[-1]
        g = grid_pos.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        g = F.interpolate(g, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, g.permute(0, 2, 3, 1).reshape(1, gh * gw, D)], dim=1)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        h = self.patch_embed(x)  # (B, D, H / p, W / p)
        gh, gw = h.shape[2], h.shape[3]
        h = h.flatten(2).transpose(1, 2)  # (B, N, D)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)  # (B, 1 + N, D)
        h = h + self._pos(gh, gw).to(h.dtype)
        h = self.norm(self.blocks(h))
        return self.head(h[:, 0])  # (B, num_classes)


def vit(num_classes: int = 1000, image_size: int = 224, patch: int = 16, dim: int = 768, depth: int = 12,
        heads: int = 12, mlp: int = 3072, dropout: float = 0.0) -> ViT:
    """ViT: x (B, 3, H, W) normalised -> logits (B, num_classes).

    Defaults are ViT-B/16 at 224 (86,567,656 params); random init, for throughput benchmarks.
    Attention is F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
    """
    return ViT(num_classes, image_size, patch, dim, depth, heads, mlp, dropout)


# ---------------------------------------------------------------------------------------------
# resnet50 (torchvision layout and parameter names)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # stride here: ResNet v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu(h + identity)


class ResNetBottleneck(_ImageModel):
    """ImageNet ResNet with bottleneck blocks (He et al. 2016, v1.5 as in torchvision; same
    parameter names, so torchvision state_dicts load). layers (3, 4, 6, 3) is ResNet-50.

    forward: x (B, 3, H, W) -> logits (B, num_classes). Any H, W >= 1 (adaptive pooling).
    """

    def __init__(self, num_classes: int = 1000, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64):
        super().__init__()
        self._set_info(num_classes)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = []
            for j in range(int(n)):
                blocks.append(_Bottleneck(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * _Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H / 4, W / 4)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))  # (B, 32 w, H / 32, W / 32)
        return self.fc(self.avgpool(h).flatten(1))  # (B, num_classes)


def resnet50(num_classes: int = 1000, width: int = 64) -> ResNetBottleneck:
    """ResNet-50: x (B, 3, H, W) normalised -> logits (B, num_classes).

    width=64 is the standard model (25,557,032 params at 1000 classes); a smaller width gives the
    same graph with fewer channels (for CPU tests). Random init, for throughput benchmarks.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return ResNetBottleneck(num_classes, (3, 4, 6, 3), width)
