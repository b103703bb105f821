"""Small generated networks for the tests (plain nn.Modules)."""
from __future__ import annotations

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, act: type[nn.Module], k: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, k, 1, k // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = act()
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + self.short(x))


class ResCNN(nn.Module):
    """stem conv -> residual blocks (one stage per width) -> pool -> linear."""

    def __init__(self, in_ch=1, widths=(4, 6), blocks=1, classes=3, act=nn.ReLU, k=3, stem_bias=False):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, widths[0], k, 1, k // 2, bias=stem_bias)
        self.bn = nn.BatchNorm2d(widths[0])
        self.act = act()
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(Block(c, w, 2 if (i > 0 and j == 0) else 1, act, k))
                c = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layers(self.act(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorm layers non-trivial affine parameters and running statistics (as after training)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def make_net(seed: int = 0, dtype=torch.float32, **kw) -> ResCNN:
    torch.manual_seed(seed)
    net = ResCNN(**kw)
    randomise_bn(net, torch.Generator().manual_seed(seed))
    return net.to(dtype).eval()
