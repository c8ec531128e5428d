"""dpo_loss and dpo_terms: hand values, the gradient's closed form, identities, a NumPy oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_utils import close, f32, jit_and_not

from jaxrlhf.rl import bradley_terry_loss, dpo_loss, dpo_terms

LN2 = math.log(2.0)
STATIC = ("beta", "loss_type", "label_smoothing")
loss_fns = jit_and_not(dpo_loss, *STATIC)
terms_fns = jit_and_not(dpo_terms, *STATIC)


def np_dpo(pc, pr, rc, rr, beta, loss_type="sigmoid", eps=0.0):
    """Per-pair losses, a plain loop in float64 (log σ(x) = −log(1 + e^{−x}))."""
    out = []
    for a, b, c, d in zip(*(np.asarray(x, np.float64) for x in (pc, pr, rc, rr))):
        h = (a - b) - (c - d)
        if loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            out.append(
                (1 - eps) * math.log1p(math.exp(-beta * h)) + eps * math.log1p(math.exp(beta * h))
            )
    return np.array(out)


# Two pairs, β = 0.5:
#   pair 0: log π = (c −1, r −3), log π_ref = (−2, −2): h = (−1 + 3) − 0 = 2, βh = 1;
#           rewards β(log π − log π_ref): chosen 0.5·1 = 0.5, rejected 0.5·(−1) = −0.5.
#   pair 1: log π = (−4, −2), log π_ref = (−3, −1):    h = −2 − (−2) = 0;
#           rewards: chosen 0.5·(−1) = −0.5, rejected 0.5·(−1) = −0.5 (a tie: not "accurate").
PC, PR, RC, RR = f32([-1.0, -4.0]), f32([-3.0, -2.0]), f32([-2.0, -3.0]), f32([-2.0, -1.0])


@pytest.mark.parametrize("fn", terms_fns)
def test_dpo_terms_hand(fn):
    # sigmoid: −log σ(βh) = log(1 + e^{−βh}): pair 0 log(1 + e^{−1}) ≈ 0.3133, pair 1 log 2.
    out = fn(PC, PR, RC, RR, beta=0.5)
    assert out.shape == (2,)
    close(out, [math.log1p(math.exp(-1.0)), LN2])
    # label smoothing ε = 0.1: 0.9·log(1 + e^{−1}) + 0.1·log(1 + e^{1}); at h = 0 still log 2.
    out = fn(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    close(out, [0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.e), LN2])
    # ipo: (h − 1/(2β))² with 1/(2β) = 1: pair 0 (2 − 1)² = 1, pair 1 (0 − 1)² = 1.
    close(fn(PC, PR, RC, RR, beta=0.5, loss_type="ipo"), [1.0, 1.0])
    # β = 0.25 → 1/(2β) = 2: pair 0 (2 − 2)² = 0, pair 1 (0 − 2)² = 4.
    close(fn(PC, PR, RC, RR, beta=0.25, loss_type="ipo"), [0.0, 4.0])


@pytest.mark.parametrize("fn", loss_fns)
def test_dpo_loss_hand_and_metrics(fn):
    loss, metrics = fn(PC, PR, RC, RR, beta=0.5)
    assert loss.shape == ()
    close(loss, (math.log1p(math.exp(-1.0)) + LN2) / 2)
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    }
    close(metrics["rewards/chosen"], (0.5 - 0.5) / 2)  # [0.5, −0.5]
    close(metrics["rewards/rejected"], (-0.5 - 0.5) / 2)  # [−0.5, −0.5]
    close(metrics["rewards/margins"], (1.0 + 0.0) / 2)
    close(metrics["rewards/accuracies"], 0.5)  # pair 0 right, pair 1 a tie
    # IPO has the same metrics and the mean of its terms
    loss, ipo_metrics = fn(PC, PR, RC, RR, beta=0.5, loss_type="ipo")
    close(loss, 1.0)
    for k in metrics:
        close(ipo_metrics[k], metrics[k])


@pytest.mark.parametrize("fn", terms_fns)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_at_h_zero_is_log2_and_its_gradient_is_minus_beta_sigmoid(fn, beta):
    # ℓ(h) = −log σ(βh): ℓ(0) = log 2 and ∂ℓ/∂h = −β σ(−βh) (so −β/2 at h = 0).
    zeros = f32(np.zeros(5))
    close(fn(zeros, zeros, zeros, zeros, beta=beta), [LN2] * 5)
    close(fn(zeros, zeros, zeros, zeros, beta=beta, label_smoothing=0.2), [LN2] * 5)
    h = f32([-3.0, -0.5, 0.0, 0.7, 4.0])  # put h in log π_c (the other three 0)

    def total(pc, pr, rc, rr):
        return jnp.sum(fn(pc, pr, rc, rr, beta=beta))

    g = jax.grad(total, argnums=(0, 1, 2, 3))(h, zeros, zeros, zeros)
    expected = -beta * np.asarray(jax.nn.sigmoid(-beta * np.asarray(h, np.float64)))
    close(g[0], expected, atol=1e-6)  # ∂h/∂log π_c = 1
    close(g[1], -expected, atol=1e-6)  # ∂h/∂log π_r = −1
    close(g[2], np.zeros(5))  # the reference is a constant
    close(g[3], np.zeros(5))
    # label smoothing ε: ∂ℓ/∂h = −β[(1−ε)σ(−βh) − ε σ(βh)]; IPO: 2(h − 1/(2β)).
    eps = 0.2
    g = jax.grad(lambda x: jnp.sum(fn(x, zeros, zeros, zeros, beta=beta, label_smoothing=eps)))(h)
    hh = np.asarray(h, np.float64)

    def sig(x):
        return 1 / (1 + np.exp(-x))

    close(g, -beta * ((1 - eps) * sig(-beta * hh) - eps * sig(beta * hh)), atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(fn(x, zeros, zeros, zeros, beta=beta, loss_type="ipo")))(h)
    close(g, 2 * (hh - 1 / (2 * beta)), rtol=1e-5, atol=1e-5)


def test_label_smoothing_zero_is_sigmoid_and_sigmoid_is_bradley_terry_on_implicit_rewards():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (f32(rng.standard_normal(6) * 3 - 10) for _ in range(4))
    plain = dpo_terms(pc, pr, rc, rr, beta=0.3)
    np.testing.assert_array_equal(
        np.asarray(dpo_terms(pc, pr, rc, rr, beta=0.3, label_smoothing=0.0)), np.asarray(plain)
    )
    # −log σ(βh) = −log σ(r_c − r_r) with the implicit rewards r = β(log π − log π_ref).
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    close(loss, bradley_terry_loss(0.3 * (pc - rc), 0.3 * (pr - rr)), atol=1e-6)
    close(loss, jnp.mean(plain), atol=1e-7)


@pytest.mark.parametrize("fn", terms_fns)
@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("ipo", 0.0)]
)
def test_dpo_terms_numpy_oracle(fn, loss_type, eps):
    rng = np.random.default_rng(1)
    # sequence log-probs of ~20 tokens: sums around −30, policy and reference close
    ref = rng.normal(-30.0, 5.0, (2, 16)).astype(np.float32)
    pol = (ref + rng.normal(0.0, 2.0, (2, 16))).astype(np.float32)
    args = f32(pol[0]), f32(pol[1]), f32(ref[0]), f32(ref[1])
    out = fn(*args, beta=0.2, loss_type=loss_type, label_smoothing=eps)
    close(out, np_dpo(pol[0], pol[1], ref[0], ref[1], 0.2, loss_type, eps), atol=1e-5, rtol=1e-5)


def test_dpo_is_stable_for_huge_margins():
    # −log σ(−1000) = 1000 and −log σ(1000) = 0 in the softplus form: no inf, finite gradients.
    big, zero = f32([1000.0, -1000.0]), f32([0.0, 0.0])
    out = dpo_terms(big, zero, zero, zero, beta=1.0)
    close(out, [0.0, 1000.0], atol=1e-6, rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(dpo_terms(x, zero, zero, zero, beta=1.0)))(big)
    close(g, [0.0, -1.0], atol=1e-6)


def test_dpo_terms_add_across_a_split_batch_and_metrics_carry_no_gradient():
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (f32(rng.standard_normal(8) - 5) for _ in range(4))
    terms = dpo_terms(pc, pr, rc, rr, beta=0.1)
    halves = [dpo_terms(pc[i : i + 4], pr[i : i + 4], rc[i : i + 4], rr[i : i + 4], beta=0.1)
              for i in (0, 4)]  # fmt: skip
    close(jnp.sum(halves[0]) + jnp.sum(halves[1]), jnp.sum(terms), atol=1e-6)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    close(loss, jnp.sum(terms) / 8, atol=1e-7)

    def metric_sum(pc, pr):
        return sum(dpo_loss(pc, pr, rc, rr, beta=0.1)[1].values())

    for g in jax.grad(metric_sum, argnums=(0, 1))(pc, pr):
        close(g, np.zeros(8))


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"beta": 0.1, "loss_type": "hinge"}, "'hinge'"),
        ({"beta": 0.0}, "beta=0.0"),
        ({"beta": -1.0}, "beta=-1.0"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing=0.5"),
        ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing=-0.1"),
        ({"beta": 0.1, "loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing=0.1"),
    ],
)
def test_dpo_option_errors(kwargs, needle):
    x = f32(np.zeros(3))
    for fn in (dpo_terms, dpo_loss):
        with pytest.raises(ValueError, match=needle):
            fn(x, x, x, x, **kwargs)


def test_dpo_shape_mismatch_raises():
    with pytest.raises(AssertionError):  # [3] vs [1] would broadcast
        dpo_terms(f32(np.zeros(3)), f32(np.zeros(1)), f32(np.zeros(3)), f32(np.zeros(3)), beta=0.1)
    with pytest.raises(AssertionError):
        dpo_loss(f32(np.zeros(3)), f32(np.zeros(3)), f32(np.zeros(3)), f32(np.zeros(4)), beta=0.1)
