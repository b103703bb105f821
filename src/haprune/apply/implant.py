"""Neural Implants: a cheaper replacement for the output rows of a k x k convolution.

A conv whose last ``m`` output channels are implanted becomes :class:`ImplantConv2d`: the kept rows stay a
k x k conv (``main``) and the implanted rows are computed by ``implant``, a 1 x 1 conv with the same stride (the
paper's implant) or a separable one (1 x 1 with the same stride, then a depthwise k x k). The two outputs are
concatenated; because surgery orders the channels [kept | implanted] and permutes every consumer once, there is
no scatter into a full-width tensor on each forward (the official code's extra copy).

Initialisation: ``zeros`` (the official code: the channel starts as if removed and learns during fine-tuning)
or ``lstsq`` (ours): the 1 x 1 weights that reproduce the original k x k channel's output on calibration data
in the least-squares sense (:class:`LstsqAccumulator`); ``haprune.apply`` then keeps each layer's fit only where it
brings the network's output closer to the original than a zero implant does.
"""
from __future__ import annotations

import torch
import torch.nn as nn

IMPLANT_INITS = ("zeros", "lstsq")


class ImplantConv2d(nn.Module):
    """``cat([main(x), implant(x)], dim=1)``: kept k x k channels first, implanted channels last."""

    def __init__(self, main: nn.Conv2d | None, implant: nn.Module):
        super().__init__()
        self.main = main  # None when every remaining channel of the layer is implanted
        self.implant = implant

    @property
    def out_channels(self) -> int:
        return (self.main.out_channels if self.main is not None else 0) + self.num_implanted

    @property
    def num_implanted(self) -> int:
        first = self.implant[0] if isinstance(self.implant, nn.Sequential) else self.implant
        return first.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.main is None:
            return self.implant(x)
        return torch.cat([self.main(x), self.implant(x)], dim=1)


def make_implant(conv: nn.Conv2d, num_implanted: int, kind: str) -> ImplantConv2d:
    """Split ``conv`` (a k x k Conv2d) so its last ``num_implanted`` output rows become a zero-initialised implant.

    The implant starts at zero output (plus the original bias, if any): exactly as if those rows were removed.
    """
    if not 0 < num_implanted < conv.out_channels + 1:
        raise ValueError(f"cannot implant {num_implanted} of {conv.out_channels} channels")
    keep = conv.out_channels - num_implanted
    dev, dt = conv.weight.device, conv.weight.dtype
    main = None
    if keep:
        main = nn.Conv2d(conv.in_channels, keep, conv.kernel_size, conv.stride, conv.padding,
                         bias=conv.bias is not None).to(dev, dt)
        with torch.no_grad():
            main.weight.copy_(conv.weight[:keep])
            if conv.bias is not None:
                main.bias.copy_(conv.bias[:keep])
    bias = conv.bias is not None
    point = nn.Conv2d(conv.in_channels, num_implanted, 1, conv.stride, 0, bias=bias and kind == "1x1").to(dev, dt)
    nn.init.zeros_(point.weight)
    if kind == "1x1":
        implant: nn.Module = point
        last = point
    elif kind == "separable":
        k = conv.kernel_size[0]
        dw = nn.Conv2d(num_implanted, num_implanted, k, 1, k // 2, groups=num_implanted, bias=bias).to(dev, dt)
        with torch.no_grad():
            dw.weight.zero_()
            dw.weight[:, 0, k // 2, k // 2] = 1.0  # identity: the implant's output is the 1 x 1 output
        implant, last = nn.Sequential(point, dw), dw
    else:
        raise ValueError(f"implant kind must be '1x1' or 'separable', got {kind!r}")
    if bias:
        with torch.no_grad():
            last.bias.copy_(conv.bias[keep:])
    return ImplantConv2d(main, implant)


class LstsqAccumulator:
    """Normal equations X^T X, X^T Y for fitting 1 x 1 rows to a k x k conv's implanted rows."""

    def __init__(self, conv: nn.Conv2d, num_implanted: int):
        self.conv, self.m = conv, num_implanted
        c = conv.in_channels
        self.xtx = torch.zeros(c, c, dtype=torch.float64)
        self.xty = torch.zeros(c, num_implanted, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x``: the conv's input batch; ``y``: its full output batch (the implanted rows are the last m)."""
        s = self.conv.stride
        yi = y[:, -self.m:]
        if self.conv.bias is not None:
            yi = yi - self.conv.bias[-self.m:].view(1, -1, 1, 1)
        xs = x[:, :, ::s[0], ::s[1]][:, :, : yi.shape[2], : yi.shape[3]]
        xf = xs.permute(0, 2, 3, 1).reshape(-1, xs.shape[1]).double().cpu()
        yf = yi.permute(0, 2, 3, 1).reshape(-1, self.m).double().cpu()
        self.xtx += xf.T @ xf
        self.xty += xf.T @ yf
        self.count += xf.shape[0]

    def solve(self, ridge: float = 1e-8) -> torch.Tensor:
        """The (m, in, 1, 1) weight minimising the squared error (a tiny ridge keeps it well posed)."""
        if self.count == 0:
            raise ValueError("no calibration data reached this layer; pass calibration batches for lstsq init")
        c = self.xtx.shape[0]
        lam = ridge * float(self.xtx.diagonal().mean().clamp_min(1e-30))
        w = torch.linalg.solve(self.xtx + lam * torch.eye(c, dtype=torch.float64), self.xty)
        return w.T.reshape(self.m, c, 1, 1)


def set_implant_weight(module: ImplantConv2d, weight: torch.Tensor) -> None:
    point = module.implant[0] if isinstance(module.implant, nn.Sequential) else module.implant
    with torch.no_grad():
        point.weight.copy_(weight.to(point.weight.dtype))
