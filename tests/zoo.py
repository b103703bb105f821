"""A small model zoo for the tests: one model per graph pattern haprune must handle, random weights, CPU, seconds.

No torchvision (it does not import here): the torchvision-style blocks are rebuilt by hand, and the Hugging Face
ones come from tiny configs of the installed transformers (random weights, eager attention). Every model comes
in eval mode with realistic BatchNorm statistics (:func:`calibrate_bn`: running statistics measured on random
inputs, then random affine parameters, as after training), so activations neither vanish nor explode.

    from zoo import ZOO, make
    model, example = make("densenet")          # model (eval mode), example input (1, 3, 32, 32)
    entry = ZOO["shufflenet"]; entry.refusal   # a substring of the error build_structures raises, or None

Patterns: residual (``resnet_basic``, ``resnet_bottleneck``), concatenation (``densenet``), depthwise
(``mobilenetv2``), grouped conv groups=4 (``resnext``, ``regnet_y`` with squeeze-excitation),
squeeze-excitation with hardsigmoid / hardswish (``mobilenetv3``) and SiLU / sigmoid (``efficientnet``),
layer scale with a bare ``nn.Parameter`` (``convnext``), window attention with windows folded into the batch
dimension (``swin``), a plain ViT block with class token and position embedding (``vit``), channel shuffle
(``shufflenet``, refused: Torch-Pruning's index mapping cannot follow it), and Hugging Face image classifiers
(``hf_*``, wrapped by :class:`Logits` so they return a tensor of logits).

The builders take widths and depths, so ``benchmarks/zoo.py`` builds larger stand-ins for the torchvision models
from the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ZooModel", "ZOO", "make", "calibrate_bn", "Logits", "names", "HAND_BUILT", "HF_MODELS"]


# ---------------------------------------------------------------- BatchNorm statistics

def calibrate_bn(model: nn.Module, input_shape: tuple[int, ...], seed: int, batches: int = 2, batch: int = 8) -> nn.Module:
    """Give every BatchNorm layer random affine parameters (weight in [0.5, 1.5), bias ~ 0.1 N(0, 1)) and then
    running statistics measured on random inputs (cumulative average over a few batches in train mode), then put
    the model in eval mode. Realistic as after training: each BN normalises what it actually sees."""
    gen = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:  # affine first: the statistics downstream depend on it
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        if m.affine:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, *input_shape[1:], generator=gen))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
        m.num_batches_tracked.zero_()
    return model.eval()


# ---------------------------------------------------------------- residual (ResNet)

def _conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck (``groups=1``) or ResNeXt block (``groups>1``: the 3 x 3 conv is grouped)."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet at CIFAR scale: 3 x 3 stem, one stage per width, global pool, linear."""

    def __init__(self, widths=(8, 16), depths=(1, 1), bottleneck: bool = False, groups: int = 1,
                 expansion: int = 2, classes: int = 10, in_ch: int = 3):
        super().__init__()
        stem = widths[0]
        self.conv1 = nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        layers, c = [], stem
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(d):
                stride = 2 if i > 0 and j == 0 else 1
                if bottleneck:
                    blocks.append(Bottleneck(c, w, w * expansion, stride, groups))
                    c = w * expansion
                else:
                    blocks.append(BasicBlock(c, w, stride))
                    c = w
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- concatenation (DenseNet)

class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, c_in: int, growth: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(c_in + i * growth, growth, bn_size) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.Conv2d(c_in, c_out, 1, bias=False),
                         nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    """torchvision-style DenseNet (dense blocks of BN-ReLU-1x1-BN-ReLU-3x3 joined by concatenation, transitions
    halving the channels), 3 x 3 stem for small inputs."""

    def __init__(self, growth: int = 4, blocks=(2, 2), stem: int = 8, bn_size: int = 2, classes: int = 10,
                 in_ch: int = 3):
        super().__init__()
        feats = [nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
        c = stem
        for i, n in enumerate(blocks):
            feats.append(DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i < len(blocks) - 1:
                feats.append(Transition(c, c // 2))
                c //= 2
        feats.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- depthwise, squeeze-excitation (MobileNet, EfficientNet, RegNet)

class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, act: type[nn.Module] = nn.ReLU, gate: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 / V3 / EfficientNet MBConv: 1x1 expand, k x k depthwise, optional SE, 1x1 project, residual
    when the shape allows."""

    def __init__(self, c_in: int, c_out: int, expand: float, stride: int, k: int = 3, act: type[nn.Module] = nn.ReLU6,
                 se: float = 0.0, se_act: type[nn.Module] = nn.ReLU, se_gate: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        hidden = int(round(c_in * expand))
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False), nn.BatchNorm2d(hidden), act()]
        if se:
            layers.append(SqueezeExcite(hidden, max(2, int(hidden * se)), se_act, se_gate))
        layers += [nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.block(x)
        return x + out if self.residual else out


class MobileNet(nn.Module):
    """A MobileNetV2 / V3 / EfficientNet-style net: stem conv, MBConv blocks ``(expand, c_out, stride, k, se)``,
    1x1 head conv, pool, classifier."""

    def __init__(self, blocks, stem: int = 8, head: int = 32, act: type[nn.Module] = nn.ReLU6,
                 se_act: type[nn.Module] = nn.ReLU, se_gate: type[nn.Module] = nn.Sigmoid, classes: int = 10,
                 in_ch: int = 3, hidden_fc: int = 0):
        super().__init__()
        feats: list[nn.Module] = [nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), act()]
        c = stem
        for expand, c_out, stride, k, se in blocks:
            feats.append(InvertedResidual(c, c_out, expand, stride, k, act, se, se_act, se_gate))
            c = c_out
        feats += [nn.Conv2d(c, head, 1, bias=False), nn.BatchNorm2d(head), act()]
        self.features = nn.Sequential(*feats)
        if hidden_fc:  # MobileNetV3: Linear -> hardswish -> Linear
            self.classifier = nn.Sequential(nn.Linear(head, hidden_fc), act(), nn.Linear(hidden_fc, classes))
        else:
            self.classifier = nn.Linear(head, classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class RegNetYBlock(nn.Module):
    """RegNetY X-block with SE: 1x1, 3x3 grouped (groups = width / group_width), SE, 1x1, residual."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int, se: float = 0.25):
        super().__init__()
        self.a = nn.Sequential(*_conv_bn(c_in, c_out, 1), nn.ReLU(inplace=True))
        self.b = nn.Sequential(*_conv_bn(c_out, c_out, 3, stride, groups=c_out // group_width), nn.ReLU(inplace=True))
        self.se = SqueezeExcite(c_out, max(2, int(c_in * se)))
        self.c = _conv_bn(c_out, c_out, 1)
        self.proj = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.proj is None else self.proj(x)
        return self.relu(self.c(self.se(self.b(self.a(x)))) + identity)


class RegNetY(nn.Module):
    def __init__(self, widths=(16, 32), depths=(1, 1), group_width: int = 4, stem: int = 8, classes: int = 10,
                 in_ch: int = 3):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_ch, stem, 3, 1), nn.ReLU(inplace=True))
        blocks, c = [], stem
        for w, d in zip(widths, depths):
            for j in range(d):
                blocks.append(RegNetYBlock(c, w, 2 if j == 0 else 1, group_width))
                c = w
        self.trunk = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.trunk(self.stem(x)), 1)
        return self.fc(torch.flatten(x, 1))


# ---------------------------------------------------------------- layer scale (ConvNeXt)

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (torchvision's ConvNeXt)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """dw 7x7 -> permute -> LayerNorm -> Linear 4C -> GELU -> Linear C -> layer scale (a bare nn.Parameter used
    in forward code) -> permute -> residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims=(8, 16), depths=(1, 1), classes: int = 10, in_ch: int = 3, patch: int = 2,
                 layer_scale: float = 0.5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, dims[0], patch, patch), LayerNorm2d(dims[0], eps=1e-6))
        stages: list[nn.Module] = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i > 0:
                stages.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)))
            stages += [ConvNeXtBlock(d, layer_scale) for _ in range(n)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        x = self.stages(self.stem(x)).mean((2, 3))
        return self.head(self.norm(x))


# ---------------------------------------------------------------- attention (Swin, ViT)

class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over (batch, tokens, dim); an optional additive bias of shape (heads, N, N)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class WindowBlock(nn.Module):
    """Swin block: LayerNorm, attention inside ws x ws windows folded into the batch dimension (with a learned
    relative position bias table indexed in forward code), optional cyclic shift, residual; LayerNorm, MLP,
    residual. Input and output (B, H, W, C)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int = 0, mlp_ratio: int = 4):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.rel_bias = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x):
        b, h, w, c = x.shape
        ws = self.window
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        bias = self.rel_bias[self.rel_index.reshape(-1)].reshape(ws * ws, ws * ws, -1).permute(2, 0, 1)
        y = self.attn(y, bias)
        y = y.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class Swin(nn.Module):
    def __init__(self, dim: int = 16, depths=(2, 2), heads=(2, 4), window: int = 4, patch: int = 2,
                 classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(in_ch, dim, patch, patch)
        self.patch_norm = nn.LayerNorm(dim)
        layers: list[nn.Module] = []
        for i, (d, h) in enumerate(zip(depths, heads)):
            if i > 0:
                layers.append(PatchMerging(dim))
                dim *= 2
            layers += [WindowBlock(dim, h, window, shift=(window // 2) * (j % 2)) for j in range(d)]
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_norm(self.patch(x).permute(0, 2, 3, 1))
        x = self.norm(self.layers(x)).mean((1, 2))
        return self.head(x)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding conv, class token and position embedding (bare nn.Parameters), pre-norm blocks, head on
    the class token."""

    def __init__(self, dim: int = 16, depth: int = 2, heads: int = 2, patch: int = 8, image: int = 32,
                 classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(in_ch, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# ---------------------------------------------------------------- channel shuffle (ShuffleNetV2)

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape  # torchvision's code
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual: split (stride 1) or two branches (stride 2), concatenate,
    channel shuffle."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        b_in = c_in if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(b_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths=(16, 32), repeats=(2, 2), stem: int = 8, head: int = 64, classes: int = 10,
                 in_ch: int = 3):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU(inplace=True))
        stages, c = [], stem
        for w, r in zip(widths, repeats):
            stages += [ShuffleUnit(c, w, 2)] + [ShuffleUnit(w, w, 1) for _ in range(r - 1)]
            c = w
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(nn.Conv2d(c, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU(inplace=True))
        self.fc = nn.Linear(head, classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.conv1(x))).mean((2, 3))
        return self.fc(x)


# ---------------------------------------------------------------- Hugging Face image classifiers

class Logits(nn.Module):
    """Wrap a Hugging Face image classifier so that it takes a tensor and returns the logits tensor."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(pixel_values=x).logits


def _hf(kind: str, image: int, small: bool = True) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as T

        common = dict(num_labels=10, num_channels=3)
        if kind == "resnet":
            cfg = T.ResNetConfig(embedding_size=8 if small else 32, hidden_sizes=[8, 16] if small else [32, 64, 128, 256],
                                 depths=[1, 1] if small else [2, 2, 2, 2], layer_type="basic", **common)
            net = T.ResNetForImageClassification(cfg)
        elif kind == "convnext":
            cfg = T.ConvNextConfig(hidden_sizes=[8, 16] if small else [24, 48, 96, 192],
                                   depths=[1, 1] if small else [2, 2, 4, 2], patch_size=2 if small else 4,
                                   num_stages=2 if small else 4, layer_scale_init_value=0.5, **common)
            net = T.ConvNextForImageClassification(cfg)
        elif kind == "mobilenet_v2":
            cfg = T.MobileNetV2Config(depth_multiplier=0.1 if small else 0.35, image_size=image, min_depth=4,
                                      finegrained_output=not small, **common)
            net = T.MobileNetV2ForImageClassification(cfg)
        elif kind == "regnet":
            cfg = T.RegNetConfig(embedding_size=8 if small else 32, hidden_sizes=[16, 32] if small else [48, 104, 208, 440],
                                 depths=[1, 1] if small else [1, 3, 6, 6], groups_width=4 if small else 8,
                                 layer_type="y", **common)
            net = T.RegNetForImageClassification(cfg)
        elif kind == "efficientnet":
            cfg = T.EfficientNetConfig(image_size=image, width_coefficient=0.1 if small else 0.5,
                                       depth_coefficient=0.1 if small else 0.5, hidden_dim=128 if small else 640,
                                       **common)
            net = T.EfficientNetForImageClassification(cfg)
        elif kind in ("vit", "deit"):
            vit = dict(image_size=image, patch_size=8 if small else 4, hidden_size=16 if small else 96,
                       num_hidden_layers=2 if small else 6, num_attention_heads=2 if small else 3,
                       intermediate_size=32 if small else 384, attn_implementation="eager", **common)
            net = (T.ViTForImageClassification(T.ViTConfig(**vit)) if kind == "vit"
                   else T.DeiTForImageClassification(T.DeiTConfig(**vit)))
        elif kind == "swin":
            cfg = T.SwinConfig(image_size=image, patch_size=2 if small else 2, embed_dim=16 if small else 48,
                               depths=[1, 1] if small else [2, 2, 4, 2], num_heads=[2, 4] if small else [3, 6, 12, 24],
                               window_size=4, attn_implementation="eager", **common)
            net = T.SwinForImageClassification(cfg)
        else:
            raise KeyError(kind)
        return Logits(net)

    return build


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class ZooModel:
    """One zoo entry. ``build(seed)`` gives the model (eval mode, calibrated BatchNorm) and an example input."""

    name: str
    pattern: str  # the graph pattern it stands for
    factory: Callable[[], nn.Module]  # the architecture with default initialisation (called under a seed)
    input_shape: tuple[int, ...] = (1, 3, 32, 32)
    refusal: str | None = None  # build_structures must raise an error containing this, or None: it must work
    tags: tuple[str, ...] = field(default_factory=tuple)

    def build(self, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(seed)
        model = self.factory()
        calibrate_bn(model, self.input_shape, seed)
        example = torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(seed + 7))
        return model.eval(), example


_ENTRIES = [
    ZooModel("resnet_basic", "residual (basic blocks)", lambda: ResNet((8, 16), (1, 1))),
    ZooModel("resnet_bottleneck", "residual (bottleneck blocks)", lambda: ResNet((4, 8), (1, 1), bottleneck=True)),
    ZooModel("densenet", "concatenation (dense blocks + transition)", lambda: DenseNet(4, (2, 2), 8)),
    ZooModel("mobilenetv2", "depthwise (inverted residual)",
             lambda: MobileNet([(1, 8, 1, 3, 0), (4, 12, 2, 3, 0), (4, 12, 1, 3, 0)], stem=8, head=32)),
    ZooModel("resnext", "grouped conv groups=4 (ResNeXt bottleneck)",
             lambda: ResNet((8, 16), (1, 1), bottleneck=True, groups=4)),
    ZooModel("regnet_y", "grouped conv groups=4 + squeeze-excitation (RegNetY)",
             lambda: RegNetY((16, 32), (1, 1), group_width=4)),
    ZooModel("mobilenetv3", "squeeze-excitation with hardsigmoid / hardswish (MobileNetV3)",
             lambda: MobileNet([(1, 8, 2, 3, 0.25), (4, 12, 2, 3, 0.25), (3, 12, 1, 5, 0.25)], stem=8, head=32,
                               act=nn.Hardswish, se_gate=nn.Hardsigmoid, hidden_fc=24)),
    ZooModel("efficientnet", "squeeze-excitation with SiLU / sigmoid (EfficientNet MBConv)",
             lambda: MobileNet([(1, 8, 1, 3, 0.25), (4, 12, 2, 3, 0.25), (4, 12, 1, 5, 0.25)], stem=8, head=32,
                               act=nn.SiLU, se_act=nn.SiLU)),
    ZooModel("convnext", "layer scale: a bare nn.Parameter in forward code (ConvNeXt)", lambda: ConvNeXt((8, 16), (1, 1))),
    ZooModel("swin", "window attention, windows folded into the batch dimension (Swin)",
             lambda: Swin(16, (2, 2), (2, 4), window=4, patch=4)),
    ZooModel("vit", "plain ViT blocks, class token and position embedding", lambda: ViT(16, 2, 2, patch=8)),
    ZooModel("shufflenet", "channel shuffle (ShuffleNetV2)", lambda: ShuffleNetV2((16, 32), (3, 2)),
             refusal="channel shuffle"),
]
HAND_BUILT = [e.name for e in _ENTRIES]
_HF_KINDS = ["resnet", "convnext", "mobilenet_v2", "regnet", "efficientnet", "vit", "deit", "swin"]
_ENTRIES += [ZooModel(f"hf_{k}", f"Hugging Face {k} (tiny config)", _hf(k, 32), tags=("hf",)) for k in _HF_KINDS]
HF_MODELS = [f"hf_{k}" for k in _HF_KINDS]

ZOO: dict[str, ZooModel] = {e.name: e for e in _ENTRIES}


def names(hf: bool = True) -> list[str]:
    """Zoo entries, hand-built first (``hf=False``: only those)."""
    return [n for n in ZOO if hf or "hf" not in ZOO[n].tags]


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(model, example_input)`` of zoo entry ``name``."""
    return ZOO[name].build(seed)
