"""Streaming ridge least squares in float64: the one solver behind compensation and least-squares implants.

A layer's refit is a linear regression ``Y ~ X W^T + b`` of the dense layer's outputs ``Y`` (rows: samples, or
samples x spatial positions for a conv) on the pruned layer's inputs ``X`` (a conv's input unfolded into its
k x k patches, a linear layer's input as is). :class:`RidgeRegression` accumulates the centred normal equations
(Gram matrix, cross products, means) chunk by chunk, so only one layer's ``d x d`` Gram matrix is ever held, and
solves them in float64. With an intercept the bias absorbs the mean of what the regressors cannot explain (the
removed channels' mean contribution, as FLAP's bias compensation does).
"""
from __future__ import annotations

import torch

__all__ = ["RidgeRegression", "UndeterminedFitError"]


class UndeterminedFitError(ValueError):
    """The calibration data cannot determine the fit (too few rows, or no data reached the layer)."""


class RidgeRegression:
    """Accumulate ``X^T X``, ``X^T Y`` (centred, float64) over chunks of rows and solve the ridge problem.

    Args:
        in_features: columns of ``X`` (``d``).
        out_features: columns of ``Y`` (``m``).
        intercept: fit a bias (centre ``X`` and ``Y``); otherwise the fit goes through the origin.
        chunk_rows: rows converted to float64 at a time (bounds the temporary memory for huge batches).
    """

    def __init__(self, in_features: int, out_features: int, *, intercept: bool = True, chunk_rows: int = 65536):
        self.d, self.m, self.intercept, self.chunk_rows = in_features, out_features, intercept, chunk_rows
        self.count = 0
        self.x_mean = torch.zeros(in_features, dtype=torch.float64)
        self.y_mean = torch.zeros(out_features, dtype=torch.float64)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)  # centred when intercept
        self.xty = torch.zeros(in_features, out_features, dtype=torch.float64)
        self.yty = torch.zeros(out_features, dtype=torch.float64)  # per-output centred sum of squares

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows: ``x`` of shape (n, d), ``y`` of shape (n, m) (any float dtype or device)."""
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.d or y.shape[1] != self.m:
            raise ValueError(f"expected x (n, {self.d}) and y (n, {self.m}), got {tuple(x.shape)} and {tuple(y.shape)}")
        for start in range(0, x.shape[0], self.chunk_rows):
            xc = x[start:start + self.chunk_rows].detach().to("cpu", torch.float64)
            yc = y[start:start + self.chunk_rows].detach().to("cpu", torch.float64)
            self._add_chunk(xc, yc)

    def _add_chunk(self, x: torch.Tensor, y: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        if not self.intercept:
            self.xtx += x.T @ x
            self.xty += x.T @ y
            self.yty += (y * y).sum(0)
            self.count += n
            return
        # Chan et al.'s pairwise update of centred co-moments, each chunk's centred products taken as raw
        # products minus n * mean mean^T (float64: no centred copy of a large chunk; exact to ~1e-12 for
        # activations whose mean is not many orders of magnitude above their spread)
        xm, ym = x.mean(0), y.mean(0)
        total = self.count + n
        dx, dy = xm - self.x_mean, ym - self.y_mean
        w = self.count * n / total
        self.xtx += (x.T @ x - n * torch.outer(xm, xm)) + w * torch.outer(dx, dx)
        self.xty += (x.T @ y - n * torch.outer(xm, ym)) + w * torch.outer(dx, dy)
        self.yty += ((y * y).sum(0) - n * ym * ym) + w * dy * dy
        self.x_mean += dx * (n / total)
        self.y_mean += dy * (n / total)
        self.count = total

    def merge(self, other: "RidgeRegression") -> None:
        """Add another accumulator's rows (e.g. from another process or another pass)."""
        if (other.d, other.m, other.intercept) != (self.d, self.m, self.intercept):
            raise ValueError("cannot merge regressions of different shapes")
        if other.count == 0:
            return
        if self.count == 0 or not self.intercept:
            if not self.intercept:
                self.xtx += other.xtx
                self.xty += other.xty
                self.yty += other.yty
                self.count += other.count
                return
            for k in ("x_mean", "y_mean", "xtx", "xty", "yty"):
                setattr(self, k, getattr(other, k).clone())
            self.count = other.count
            return
        total = self.count + other.count
        dx, dy = other.x_mean - self.x_mean, other.y_mean - self.y_mean
        w = self.count * other.count / total
        self.xtx += other.xtx + w * torch.outer(dx, dx)
        self.xty += other.xty + w * torch.outer(dx, dy)
        self.yty += other.yty + w * dy * dy
        self.x_mean += dx * (other.count / total)
        self.y_mean += dy * (other.count / total)
        self.count = total

    def all_reduce(self, group=None) -> "RidgeRegression":
        """Sum the rows of every rank of ``group`` into this accumulator, in place, on every rank (so that every rank
        solves the same system: the one of all ranks' rows together). The centred sums are turned into raw sums
        (``X^T X = centred + n mean mean^T``), all-reduced in one collective, and centred again, in float64. A
        no-op without a group (:mod:`haprune.distributed`)."""
        from .. import distributed

        if distributed.world(group) == 1:
            return self
        n = float(self.count)
        raw = {"count": torch.tensor([n], dtype=torch.float64), "sx": self.x_mean * n, "sy": self.y_mean * n,
               "xtx": self.xtx.clone(), "xty": self.xty.clone(), "yty": self.yty.clone()}
        if self.intercept:
            raw["xtx"] += n * torch.outer(self.x_mean, self.x_mean)
            raw["xty"] += n * torch.outer(self.x_mean, self.y_mean)
            raw["yty"] += n * self.y_mean * self.y_mean
        distributed.all_reduce_dict(raw, group)
        total = int(round(float(raw["count"])))
        self.count = total
        if total == 0:
            return self
        self.x_mean, self.y_mean = raw["sx"] / total, raw["sy"] / total
        self.xtx, self.xty, self.yty = raw["xtx"], raw["xty"], raw["yty"]
        if self.intercept:
            self.xtx -= total * torch.outer(self.x_mean, self.x_mean)
            self.xty -= total * torch.outer(self.x_mean, self.y_mean)
            self.yty -= total * self.y_mean * self.y_mean
        return self

    def gram(self) -> torch.Tensor:
        """The (centred, with an intercept) input Gram matrix ``X^T X`` (d x d, float64): the layer-local Hessian of
        the squared reconstruction error up to a factor 2."""
        return self.xtx

    def _lambda(self, ridge: float) -> float:
        return ridge * float(self.xtx.diagonal().mean().clamp_min(1e-30)) if self.d else 0.0

    def solve(self, ridge: float = 1e-6, columns: torch.Tensor | list[int] | None = None,
              min_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (m, k) weight and (m,) bias (None without intercept) minimising
        ``||Y - X_c W^T - b||^2 + lam ||W||^2`` where ``X_c`` are the chosen ``columns`` of ``X`` (all by default)
        and ``lam = ridge * mean(diag(X^T X))`` (relative, so it is scale free).

        Raises :class:`UndeterminedFitError` when fewer than ``min_rows`` rows were seen (default: the number of
        regressors, plus one with an intercept), or when the (ridged) system is singular.
        """
        cols = torch.arange(self.d) if columns is None else torch.as_tensor(columns, dtype=torch.long)
        k = int(cols.numel())
        need = (k + (1 if self.intercept else 0)) if min_rows is None else min_rows
        if self.count == 0:
            raise UndeterminedFitError("no calibration rows reached this layer: pass calibration batches the model "
                                       "accepts (and that run through it)")
        if self.count < need:
            raise UndeterminedFitError(
                f"{self.count} calibration rows cannot determine {k} regressors (need at least {need}): pass more "
                f"calibration samples")
        g = self.xtx[cols][:, cols]
        c = self.xty[cols]
        lam = self._lambda(ridge)
        a = g + lam * torch.eye(k, dtype=torch.float64)
        try:
            chol = torch.linalg.cholesky(a)
            w = torch.cholesky_solve(c, chol)
        except RuntimeError:
            w, *_ = torch.linalg.lstsq(a, c, driver="gelsd")
        if not bool(torch.isfinite(w).all()):
            raise UndeterminedFitError("the least-squares fit is not finite: the calibration inputs of this layer "
                                       "are degenerate (constant or non-finite); pass more varied calibration data")
        weight = w.T.contiguous()
        bias = (self.y_mean - self.x_mean[cols] @ w) if self.intercept else None
        return weight, bias

    def residual(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 columns: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Per-output sum of squared errors of ``weight`` (m, k) (and ``bias``) on the accumulated rows."""
        cols = torch.arange(self.d) if columns is None else torch.as_tensor(columns, dtype=torch.long)
        w = weight.to(torch.float64).T  # (k, m)
        g = self.xtx[cols][:, cols]
        c = self.xty[cols]
        sse = self.yty - 2 * (w * c).sum(0) + (w * (g @ w)).sum(0)
        if self.intercept:
            b = torch.zeros(self.m, dtype=torch.float64) if bias is None else bias.to(torch.float64)
            off = self.x_mean[cols] @ w + b - self.y_mean  # error of the mean prediction
            sse = sse + self.count * off * off
        return sse.clamp_min(0)
