"""Small image classifiers for collecting forgetting trajectories, in plain PyTorch.

Like the paper's collection zoo: a plain CNN and ResNet-, DenseNet-, ShuffleNetV2- and
MobileNetV2-style networks, an MLP and a small vision transformer (the paper shows KNOWN
carrying over to transformers), each well under 3M parameters at the default widths for
28x28x1 and 32x32x3 inputs.  ``width`` scales every channel count (the base width of the first stage);
the defaults are small so a trajectory can be collected in about a minute on two CPU cores.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

ARCHITECTURES = ("cnn", "resnet", "densenet", "shufflenet", "mobilenetv2", "mlp", "vit")
DEFAULT_WIDTH = {"cnn": 16, "resnet": 16, "densenet": 8, "shufflenet": 16,
                 "mobilenetv2": 16, "mlp": 64, "vit": 32}


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Classifier(nn.Module):
    """features -> global average pool -> linear."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.features = features
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ------------------------------------------------------------------------------ plain CNN

class PlainCNN(nn.Module):
    """LeNet-like: two conv-maxpool stages (w, 2w channels), then a hidden fully connected
    layer of 16w units (most of the parameters, little of the compute)."""

    def __init__(self, in_shape, num_classes: int, width: int):
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            _conv_bn(c, width), nn.MaxPool2d(2), _conv_bn(width, 2 * width), nn.MaxPool2d(2))
        flat = 2 * width * (h // 4) * (w // 4)
        self.hidden = nn.Linear(flat, 16 * width)
        self.fc = nn.Linear(16 * width, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.hidden(torch.flatten(self.features(x), 1))))


# -------------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride=stride),
                                  _conv_bn(cout, cout, act=False))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else _conv_bn(cin, cout, k=1, stride=stride, act=False))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def resnet(in_shape, num_classes: int, width: int, blocks: Sequence[int] = (1, 1, 1)):
    """ResNet with basic blocks; a stride-2 stem (as ImageNet ResNets, without the max-pool)
    then stages of width w, 2w, 4w, the last two at stride 2."""
    layers, cin = [_conv_bn(in_shape[0], width, stride=2)], width
    for stage, n in enumerate(blocks):
        cout = width * 2 ** stage
        for i in range(n):
            layers.append(BasicBlock(cin, cout, 2 if stage and i == 0 else 1))
            cin = cout
    return _Classifier(nn.Sequential(*layers), cin, num_classes)


# ------------------------------------------------------------------------------ DenseNet

class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet(in_shape, num_classes: int, width: int, layers: Sequence[int] = (4, 4, 4)):
    """DenseNet-BC-like: ``width`` is the growth rate; a stride-2 stem, dense blocks joined by
    1x1 transitions that halve the channels and average-pool by 2."""
    cin = 2 * width
    mods = [nn.Conv2d(in_shape[0], cin, 3, stride=2, padding=1, bias=False)]
    for b, n in enumerate(layers):
        for _ in range(n):
            mods.append(DenseLayer(cin, width))
            cin += width
        if b < len(layers) - 1:
            mods += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                     nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2, ceil_mode=True)]
            cin //= 2
    mods += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
    return _Classifier(nn.Sequential(*mods), cin, num_classes)


# ---------------------------------------------------------------------------- ShuffleNet

def _channel_shuffle(x, groups: int = 2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits the channels in half and transforms one half;
    stride 2 transforms both copies of the input and doubles the channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride == 1:
            if cin != cout:
                raise ValueError("a stride-1 shuffle unit keeps its channel count")
            cin = branch
        else:
            self.left = nn.Sequential(_conv_bn(cin, cin, stride=2, groups=cin, act=False),
                                      _conv_bn(cin, branch, k=1))
        self.right = nn.Sequential(_conv_bn(cin, branch, k=1),
                                   _conv_bn(branch, branch, stride=stride, groups=branch,
                                            act=False),
                                   _conv_bn(branch, branch, k=1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return _channel_shuffle(out)


def shufflenet(in_shape, num_classes: int, width: int, units: Sequence[int] = (2, 2)):
    """ShuffleNetV2-style: stem at width w (w even) + max-pool, stages of 2w, 4w channels, a
    final 1x1 conv to 8w."""
    width += width % 2
    mods, cin = [_conv_bn(in_shape[0], width), nn.MaxPool2d(2)], width
    for stage, n in enumerate(units):
        cout = 2 * width * 2 ** stage
        mods.append(ShuffleUnit(cin, cout, 2))
        mods += [ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]
        cin = cout
    mods.append(_conv_bn(cin, 8 * width, k=1))
    return _Classifier(nn.Sequential(*mods), 8 * width, num_classes)


# --------------------------------------------------------------------------- MobileNetV2

class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, k=1)]
        layers += [_conv_bn(hidden, hidden, stride=stride, groups=hidden),
                   _conv_bn(hidden, cout, k=1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def mobilenetv2(in_shape, num_classes: int, width: int):
    """MobileNetV2-style inverted residuals (ReLU instead of ReLU6) after a stride-2 stem,
    base width w."""
    # (expansion, channels as a multiple of w / 2, repeats, stride)
    config = ((1, 2, 1, 1), (4, 3, 2, 2), (4, 4, 2, 2), (4, 8, 1, 1))
    mods, cin = [_conv_bn(in_shape[0], width, stride=2)], width
    for expand, mult, n, stride in config:
        cout = max(1, mult * width // 2)
        for i in range(n):
            mods.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    mods.append(_conv_bn(cin, 8 * width, k=1))
    return _Classifier(nn.Sequential(*mods), 8 * width, num_classes)


# ----------------------------------------------------------------------------------- MLP

def mlp(in_shape, num_classes: int, width: int):
    """Flatten -> 8w -> 4w -> classes, ReLU between."""
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 8 * width), nn.ReLU(inplace=True),
                         nn.Linear(8 * width, 4 * width), nn.ReLU(inplace=True),
                         nn.Linear(4 * width, num_classes))


# ----------------------------------------------------------------------- vision transformer

class Attention(nn.Module):
    """Multi-head self-attention from plain linear layers, so that its weights route like any
    other layer's (``qkv``/``proj`` 2-D weights to the fc head, their biases to the bias
    head); ``nn.MultiheadAttention`` would hide them in one packed parameter."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)) with a 2x hidden layer."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer: non-overlapping patches embedded by a strided conv (a
    4x4 grid of patches: 7x7 pixels at 28x28, 2x2 at 8x8), a learned 2-D position table,
    two pre-norm transformer blocks of ``width`` channels (a multiple of 4, 4 heads), a
    final LayerNorm, mean pooling over tokens and a linear classifier."""

    def __init__(self, in_shape, num_classes: int, width: int, depth: int = 2):
        super().__init__()
        c, h, w = in_shape
        width += -width % 4
        patch = (max(1, h // 4), max(1, w // 4))
        self.patch_embed = nn.Conv2d(c, width, patch, stride=patch)
        tokens = (h // patch[0]) * (w // patch[1])
        self.pos_embed = nn.Parameter(0.02 * torch.randn(tokens, width))
        self.blocks = nn.Sequential(*(TransformerBlock(width, 4) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.fc(self.norm(self.blocks(x)).mean(1))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": PlainCNN, "resnet": resnet, "densenet": densenet, "shufflenet": shufflenet,
    "mobilenetv2": mobilenetv2, "mlp": mlp, "vit": ViT,
}


def build_model(name: str, in_shape: Sequence[int], num_classes: int,
                width: int | None = None) -> nn.Module:
    """A freshly initialised ``name`` (one of :data:`ARCHITECTURES`) for images of shape
    ``in_shape`` = (channels, height, width) and ``num_classes`` classes.  Initialisation
    draws from torch's global generator: seed it for a reproducible model."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown architecture {name!r}; choose from {ARCHITECTURES}")
    in_shape = tuple(int(v) for v in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape}")
    if in_shape[1] < 8 or in_shape[2] < 8:
        raise ValueError(f"in_shape {in_shape}: images must be at least 8x8")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    width = DEFAULT_WIDTH[name] if width is None else int(width)
    if width < 2:
        raise ValueError(f"width must be >= 2, got {width}")
    return _BUILDERS[name](in_shape, int(num_classes), width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
