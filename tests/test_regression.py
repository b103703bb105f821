"""RidgeRegression: streaming normal equations against closed-form float64 least squares."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from haprune.apply.regression import RidgeRegression, UndeterminedFitError


def _closed_form(x, y, intercept):
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if intercept else x
    sol = torch.linalg.lstsq(a, y, driver="gelsd").solution
    return (sol[:-1].T, sol[-1]) if intercept else (sol.T, None)


@settings(deadline=None, max_examples=40)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 4), st.booleans(), st.integers(1, 7))
def test_streamed_fit_equals_closed_form(seed, d, m, intercept, chunks):
    g = torch.Generator().manual_seed(seed)
    n = 40 + d * 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 5  # large offset: centring must be exact
    y = x @ torch.randn(d, m, generator=g, dtype=torch.float64) + torch.randn(n, m, generator=g, dtype=torch.float64)
    reg = RidgeRegression(d, m, intercept=intercept, chunk_rows=7)
    for part in torch.tensor_split(torch.arange(n), chunks):
        reg.add(x[part], y[part])
    w, b = reg.solve(ridge=0.0)
    w_ref, b_ref = _closed_form(x, y, intercept)
    torch.testing.assert_close(w, w_ref, rtol=1e-7, atol=1e-7)
    if intercept:
        torch.testing.assert_close(b, b_ref, rtol=1e-7, atol=1e-7)
    pred = x @ w.T + (b if intercept else 0)
    torch.testing.assert_close(reg.residual(w, b), ((y - pred) ** 2).sum(0), rtol=1e-6, atol=1e-6)


def test_merge_equals_one_accumulator():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, generator=g) + 2, torch.randn(50, 2, generator=g)
    one, a, b = RidgeRegression(3, 2), RidgeRegression(3, 2), RidgeRegression(3, 2)
    one.add(x, y)
    a.add(x[:20], y[:20])
    b.add(x[20:], y[20:])
    a.merge(b)
    for k in ("xtx", "xty", "yty", "x_mean", "y_mean"):
        torch.testing.assert_close(getattr(a, k), getattr(one, k))


def test_column_subset_and_undetermined():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = x[:, [0, 2]] @ torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    reg = RidgeRegression(4, 2, intercept=False)
    reg.add(x, y)
    w, _ = reg.solve(ridge=0.0, columns=[0, 2])
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5], [-2.0, 3.0]], dtype=torch.float64))
    with pytest.raises(UndeterminedFitError, match="no calibration rows"):
        RidgeRegression(4, 2).solve()
    few = RidgeRegression(4, 2)
    few.add(x[:3], y[:3])
    with pytest.raises(UndeterminedFitError, match="cannot determine 4 regressors"):
        few.solve()
