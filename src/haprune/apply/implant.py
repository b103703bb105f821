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

import copy

import torch
import torch.nn as nn

from .regression import RidgeRegression

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
    """Fits 1 x 1 rows to a k x k conv's implanted rows: the conv's input at each output position (its stride's
    grid) regressed on those rows' outputs, through the origin (the bias is the conv's own), by
    :class:`~haprune.apply.regression.RidgeRegression`."""

    def __init__(self, conv: nn.Conv2d, num_implanted: int):
        self.conv, self.m = conv, num_implanted
        self.regression = RidgeRegression(conv.in_channels, num_implanted, intercept=False)

    @property
    def count(self) -> int:
        return self.regression.count

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x``: the conv's input batch; ``y``: its full output batch (the implanted rows are the last m)."""
        s = self.conv.stride
        yi = y[:, -self.m:]
        if self.conv.bias is not None:
            yi = yi - self.conv.bias[-self.m:].view(1, -1, 1, 1)
        xs = x[:, :, ::s[0], ::s[1]][:, :, : yi.shape[2], : yi.shape[3]]
        self.regression.add(xs.permute(0, 2, 3, 1).reshape(-1, xs.shape[1]),
                            yi.permute(0, 2, 3, 1).reshape(-1, self.m))

    def solve(self, ridge: float = 1e-8) -> torch.Tensor:
        """The (m, in, 1, 1) weight minimising the squared error (a tiny ridge keeps it well posed)."""
        if self.count == 0:
            raise ValueError("no calibration data reached this layer; pass calibration batches for lstsq init")
        w, _ = self.regression.solve(ridge, min_rows=1)
        return w.reshape(self.m, self.conv.in_channels, 1, 1)


def set_implant_weight(module: ImplantConv2d, weight: torch.Tensor) -> None:
    point = module.implant[0] if isinstance(module.implant, nn.Sequential) else module.implant
    with torch.no_grad():
        point.weight.copy_(weight.to(point.weight.dtype))


def merge_implants(model: nn.Module) -> nn.Module:
    """The deployment form of an implanted model: a copy in which each :class:`ImplantConv2d` that can be written
    as one k x k convolution is replaced by that convolution; outputs equal the original's (float rounding aside).

    A 1 x 1 implant becomes its rows' weights at the k x k kernel's centre tap (the tap that reads the same input
    pixel as the 1 x 1 conv with the same stride), zeros elsewhere; a separable implant (1 x 1, then depthwise
    k x k) becomes the rank-one kernels ``P[o, i] * D[o]`` when its stride is 1. The merged conv does more
    multiply-accumulates than the pair (the implanted rows cost k x k again) but one kernel call and no
    concatenation, which measures faster on the CPU (``benchmarks/latency.py``, variants ``*-merged``). Layers that
    cannot be merged (every channel implanted, grouped or dilated convs, strided separable implants) stay as they
    are. Use it for inference and export; fine-tune the unmerged model, whose implants are cheaper to train.
    """
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ImplantConv2d):
                merged = _merged_conv(child)
                if merged is not None:
                    setattr(parent, name, merged)
    return out


def _centre_tap(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The kernel tap that reads input pixel ``stride * output index``, for "same"-padded odd kernels (else None)."""
    if not isinstance(conv.padding, tuple) or conv.dilation != (1, 1) or conv.groups != 1:
        return None
    if any(2 * p != k - 1 for p, k in zip(conv.padding, conv.kernel_size)):  # only "same"-padded odd kernels
        return None
    return conv.padding[0], conv.padding[1]


def _merged_conv(module: ImplantConv2d) -> nn.Conv2d | None:
    main, imp = module.main, module.implant
    if main is None or not isinstance(main, nn.Conv2d):
        return None
    tap = _centre_tap(main)
    if tap is None:
        return None
    point, dw = (imp[0], imp[1]) if isinstance(imp, nn.Sequential) else (imp, None)
    if point.kernel_size != (1, 1) or point.padding != (0, 0) or point.groups != 1:
        return None
    keep, m = main.out_channels, point.out_channels
    if dw is None:
        if point.stride != main.stride:
            return None
        implant_weight = main.weight.new_zeros(m, *main.weight.shape[1:])
        implant_weight[:, :, tap[0], tap[1]] = point.weight[:, :, 0, 0].detach()
        implant_bias = point.bias
    else:  # 1 x 1 then depthwise: a k x k conv only at stride 1 with the main conv's geometry and no inner bias
        if (point.stride != (1, 1) or main.stride != (1, 1) or point.bias is not None
                or dw.kernel_size != main.kernel_size or dw.padding != main.padding or dw.stride != (1, 1)
                or dw.dilation != (1, 1) or dw.groups != m):
            return None
        implant_weight = point.weight.detach()[:, :, 0, 0, None, None] * dw.weight.detach()  # (m,in,1,1)*(m,1,k,k)
        implant_bias = dw.bias
    weight = torch.cat([main.weight.detach(), implant_weight])
    bias = None
    if main.bias is not None or implant_bias is not None:
        zeros = main.weight.new_zeros
        bias = torch.cat([main.bias.detach() if main.bias is not None else zeros(keep),
                          implant_bias.detach() if implant_bias is not None else zeros(m)])
    conv = nn.Conv2d(main.in_channels, keep + m, main.kernel_size, main.stride, main.padding,
                     bias=bias is not None, padding_mode=main.padding_mode).to(main.weight.device, main.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    conv.train(module.training)
    return conv
