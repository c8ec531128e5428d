"""masked_sum, masked_mean, masked_var, masked_whiten, clip_fraction, approx_kl, explained_variance."""

import math

import numpy as np
import pytest
from rl_utils import close, f32, jit_and_not, random_mask, with_garbage

from jaxrlhf.rl import (
    approx_kl,
    clip_fraction,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
XMASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize("fn", jit_and_not(masked_mean, "axis"))
def test_masked_mean_hand(fn):
    # All axes: (1 + 2 + 4)/3 = 7/3. Along time: [(1 + 2)/2, 4/1] = [1.5, 4].
    close(fn(f32(X), f32(XMASK)), 7.0 / 3.0)
    close(fn(f32(X), f32(XMASK), axis=-1), [1.5, 4.0])
    close(fn(f32(X), f32(XMASK), axis=1), [1.5, 4.0])
    # Along the batch axis: [(1+4)/2, 2/1, (no valid entry)]; only check the defined ones.
    close(np.asarray(fn(f32(X), f32(XMASK), axis=0))[:2], [2.5, 2.0])


@pytest.mark.parametrize("fn", jit_and_not(masked_sum, "axis"))
def test_masked_sum_hand(fn):
    # 1 + 2 + 4 = 7; along time [3, 4].
    close(fn(f32(X), f32(XMASK)), 7.0)
    close(fn(f32(X), f32(XMASK), axis=-1), [3.0, 4.0])


@pytest.mark.parametrize("fn", jit_and_not(masked_mean, "axis"))
def test_masked_mean_ignores_huge_garbage(fn):
    x = f32([[1.0, 2.0, 3e38], [4.0, -3e38, 1e30]])
    close(fn(x, f32(XMASK)), 7.0 / 3.0)
    close(fn(x, np.asarray(XMASK) > 0), 7.0 / 3.0)  # bool mask


@pytest.mark.parametrize("fn", jit_and_not(masked_var, "unbiased"))
def test_masked_var_hand(fn):
    # Valid entries [1, 2, 4], mean 7/3; deviations [−4/3, −1/3, 5/3]; squares [16, 1, 25]/9,
    # sum 42/9 = 14/3. With Bessel's correction (the default, as trl): (14/3)/(3 − 1) = 7/3;
    # population variance: (14/3)/3 = 14/9.
    close(fn(f32(X), f32(XMASK)), 7.0 / 3.0)
    close(fn(f32(X), f32(XMASK), unbiased=True), 7.0 / 3.0)
    close(fn(f32(X), f32(XMASK), unbiased=False), 14.0 / 9.0)


@pytest.mark.parametrize("fn", jit_and_not(masked_whiten, "shift_mean"))
def test_masked_whiten_hand(fn):
    # Valid [1, 2, 4]: μ = 7/3, σ² = 7/3 (unbiased, as above) → (x − μ)/σ = [−4/3, −1/3, 5/3]/σ.
    sigma = math.sqrt(7.0 / 3.0)
    out = np.asarray(fn(f32(X), f32(XMASK)))
    assert out.shape == (2, 3)
    close(out[np.asarray(XMASK) > 0], np.array([-4.0, -1.0, 5.0]) / 3.0 / sigma, atol=1e-5)
    # shift_mean=False rescales but keeps the mean: (x − μ)/σ + μ.
    out = np.asarray(fn(f32(X), f32(XMASK), shift_mean=False))
    close(
        out[np.asarray(XMASK) > 0], np.array([-4.0, -1.0, 5.0]) / 3.0 / sigma + 7.0 / 3.0, atol=1e-5
    )


@pytest.mark.parametrize("fn", jit_and_not(masked_whiten, "shift_mean"))
def test_masked_whiten_moments(fn):
    # After whitening: masked mean 0 and masked variance 1 (in the library's own convention),
    # whatever garbage sits at padded positions.
    rng = np.random.default_rng(0)
    mask = random_mask(rng, (4,), 7, min_len=2)
    x = (rng.standard_normal((4, 7)) * 3 + 5).astype(np.float32)
    out = fn(f32(with_garbage(x, mask, rng)), f32(mask))
    close(masked_mean(out, f32(mask)), 0.0, atol=1e-5)
    close(masked_var(out, f32(mask)), 1.0, atol=1e-4)
    # an increasing affine map of x on the valid entries
    valid = mask > 0
    slope = (np.asarray(out)[valid] - float(np.asarray(out)[valid][0])) / (
        x[valid] - x[valid][0] + 1e-30
    )
    close(slope[1:], np.full(valid.sum() - 1, slope[1]), rtol=1e-4)
    assert slope[1] > 0


@pytest.mark.parametrize("fn", jit_and_not(clip_fraction, "clip_eps"))
def test_clip_fraction_hand(fn):
    # ρ = [1.5, 0.5, 1.1, 0.9 | pad 5.0], ε = 0.2: |ρ − 1| > ε for 1.5 and 0.5 → 2/4 = 0.5.
    logprobs = f32(np.log([[1.5, 0.5, 1.1, 0.9, 5.0]]))
    old = f32(np.zeros((1, 5)))
    mask = f32([[1, 1, 1, 1, 0]])
    close(fn(logprobs, old, mask, clip_eps=0.2), 0.5)
    close(fn(logprobs, old, mask, clip_eps=0.6), 0.0)  # every valid ρ within [0.4, 1.6]
    close(fn(logprobs, old, mask, clip_eps=0.05), 1.0)


@pytest.mark.parametrize("fn", jit_and_not(approx_kl))
def test_approx_kl_hand(fn):
    # Δ = logprobs − old = [1, −2 | pad 5] → ½·mean(Δ²) = ½·(1 + 4)/2 = 1.25.
    close(fn(f32([[1.0, -2.0, 5.0]]), f32([[0.0, 0.0, 0.0]]), f32([[1, 1, 0]])), 1.25)


@pytest.mark.parametrize("fn", jit_and_not(explained_variance))
def test_explained_variance_hand(fn):
    # R = [1, 2, 3, 4], V = [1, 2, 3, 5] (+ a padded step). R − V = [0, 0, 0, −1]:
    # Var = 1/4 − 1/16 = 3/16; Var[R] = 5/4 → 1 − (3/16)/(5/4) = 1 − 0.15 = 0.85. (The ratio is the
    # same with or without Bessel's correction.)
    values = f32([[1.0, 2.0], [3.0, 5.0], [7.0, -7.0]])
    returns = f32([[1.0, 2.0], [3.0, 4.0], [0.0, 100.0]])
    mask = f32([[1, 1], [1, 1], [0, 0]])
    close(fn(values, returns, mask), 0.85)
    close(fn(returns, returns, mask), 1.0)  # a perfect critic
    # a constant critic at the mean return explains nothing: Var[R − 2.5] = Var[R]
    close(fn(f32(np.full((3, 2), 2.5)), returns, mask), 0.0, atol=1e-6)
