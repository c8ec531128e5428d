"""Mismatched shapes or ranks fail at entry with a clear error, never by silent broadcasting.

Every case below would broadcast (or partly work) in jnp; the functions must refuse them.
"""

import re

import jax.numpy as jnp
import pytest

from jaxrlhf import rl

BT = jnp.zeros((2, 3), jnp.float32)  # a good [B, T] array
MASK = jnp.ones((2, 3), jnp.float32)
ROW = jnp.zeros((3,), jnp.float32)  # [T]: broadcasts against [B, T]
COL = jnp.zeros((2, 1), jnp.float32)  # [B, 1]: broadcasts against [B, T]
LOGITS = jnp.zeros((2, 3, 5), jnp.float32)
TOKENS = jnp.zeros((2, 3), jnp.int32)

CASES = {
    "token_logprobs tokens [B, T+1]": lambda: rl.token_logprobs(
        LOGITS, jnp.zeros((2, 4), jnp.int32)
    ),
    "token_logprobs tokens [T]": lambda: rl.token_logprobs(LOGITS, jnp.zeros((3,), jnp.int32)),
    "token_logprobs logits without vocab axis": lambda: rl.token_logprobs(BT, TOKENS),
    "token_entropy rank 1": lambda: rl.token_entropy(jnp.zeros((5,))),
    "trajectory_logprob mask [T]": lambda: rl.trajectory_logprob(BT, ROW),
    "trajectory_logprob mask [B, 1]": lambda: rl.trajectory_logprob(BT, COL),
    "trajectory_logprob scalars": lambda: rl.trajectory_logprob(jnp.zeros(()), jnp.ones(())),
    "discounted_return mask [B, T, 1]": lambda: rl.discounted_return(
        BT, jnp.ones((2, 3, 1)), gamma=0.9
    ),
    "reward_to_go mask [T]": lambda: rl.reward_to_go(BT, ROW, gamma=0.9),
    "gae values [B, T+1] (bootstrap value appended, rlax-style)": lambda: rl.gae(
        BT, jnp.zeros((2, 4)), MASK, gamma=0.9, lam=0.95
    ),
    "gae values [B, 1]": lambda: rl.gae(BT, COL, MASK, gamma=0.9, lam=0.95),
    "td_error values [T]": lambda: rl.td_error(BT, ROW, MASK, gamma=0.9),
    "masked_mean mask [T]": lambda: rl.masked_mean(BT, ROW),
    "masked_var mask [B, 1]": lambda: rl.masked_var(BT, COL),
    "masked_whiten mask [T]": lambda: rl.masked_whiten(BT, ROW),
    "ppo_policy_loss advantages [B, 1]": lambda: rl.ppo_policy_loss(
        BT, BT, COL, MASK, clip_eps=0.2
    ),
    "ppo_policy_loss old_logprobs [T]": lambda: rl.ppo_policy_loss(BT, ROW, BT, MASK, clip_eps=0.2),
    "value_loss returns [B]": lambda: rl.value_loss(BT, BT, jnp.zeros((2,)), MASK),
    "ppo_loss entropy [B, T, V]": lambda: rl.ppo_loss(
        BT, BT, BT, BT, BT, BT, MASK, LOGITS, clip_eps=0.2, vf_coef=0.1, ent_coef=0.0
    ),
    "ppo_loss values [B, 1]": lambda: rl.ppo_loss(
        BT, BT, BT, COL, BT, BT, MASK, BT, clip_eps=0.2, vf_coef=0.1, ent_coef=0.0
    ),
    "kl_estimate ref [T]": lambda: rl.kl_estimate(BT, ROW),
    "kl_penalized_rewards scores [B, T]": lambda: rl.kl_penalized_rewards(
        BT, BT, BT, MASK, kl_coef=0.1
    ),
    "kl_penalized_rewards scores [1]": lambda: rl.kl_penalized_rewards(
        jnp.zeros((1,)), BT, BT, MASK, kl_coef=0.1
    ),
    "bradley_terry_loss [3] vs [1]": lambda: rl.bradley_terry_loss(jnp.zeros(3), jnp.zeros(1)),
    "bradley_terry_loss [3] vs [4]": lambda: rl.bradley_terry_loss(jnp.zeros(3), jnp.zeros(4)),
    "clip_fraction mask [T]": lambda: rl.clip_fraction(BT, BT, ROW, clip_eps=0.2),
    "approx_kl old [B, 1]": lambda: rl.approx_kl(BT, COL, MASK),
    "explained_variance returns [T]": lambda: rl.explained_variance(BT, ROW, MASK),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mismatched_shapes_raise(name):
    with pytest.raises((AssertionError, ValueError)) as excinfo:
        CASES[name]()
    message = str(excinfo.value)
    # The message shows the shapes involved (e.g. "(2, 3)"), so the caller can see what is wrong.
    assert re.search(r"\(\d+(, \d+)*,?\)|\[\d+(, \d+)*\]|rank", message), message


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda: rl.kl_estimate(BT, BT, kind="k4"), "k4"),
        (lambda: rl.kl_penalized_rewards(jnp.zeros(2), BT, BT, MASK, kl_coef=0.1, kind="kl"), "kl"),
        (lambda: rl.ppo_policy_loss(BT, BT, BT, MASK, clip_eps=0.2, aggregation="sum"), "sum"),
        (
            lambda: rl.ppo_loss(
                BT,
                BT,
                BT,
                BT,
                BT,
                BT,
                MASK,
                BT,
                clip_eps=0.2,
                vf_coef=0.1,
                ent_coef=0.0,
                aggregation="seq_mean",
            ),
            "seq_mean",
        ),
    ],
    ids=["kl_estimate", "kl_penalized_rewards", "ppo_policy_loss", "ppo_loss"],
)
def test_unknown_option_names_itself(call, needle):
    # A misspelt string option fails with a ValueError that quotes it and lists the valid ones.
    with pytest.raises(ValueError, match=re.escape(repr(needle))) as excinfo:
        call()
    assert "k1" in str(excinfo.value) or "token_mean" in str(excinfo.value)
