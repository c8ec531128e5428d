"""Preference collection: InstructGPT's labelling step (Ouyang et al. 2022).

    prompts x ──sample(policy) twice──▶ completions (y_a, y_b) ──labeler──▶ (x, y_chosen, y_rejected)

Two completions of each prompt are sampled from the policy (the SFT base policy, as in InstructGPT) and a
labeler picks the one it prefers; the reward model is then fitted to these choices with the
Bradley-Terry loss (``jaxrlhf.train.reward``). Here the labeler is the task's simulated annotators
(``DemoTask.annotate``: P(a ≻ b) = σ((gold_a − gold_b) / τ)); a real pipeline would show the pairs
to people instead.
"""

from __future__ import annotations

import numpy as np

from jaxrlhf.rollout import SamplingConfig, sample


def sample_pairs(
    task,
    policy,
    rng,
    *,
    num_pairs: int,
    sampling: SamplingConfig,
    batch_size: int,
    max_batches: int,
) -> tuple[list[str], list[str], list[str]]:
    """``num_pairs`` (prompt, completion a, completion b) texts, two samples per prompt.

    Prompts cycle through ``task.prompts``; a pair is dropped when its two completions are the same
    text (no preference), or one is empty or was cut off before EOS. Raises RuntimeError after
    ``max_batches`` batches of ``batch_size`` prompts without enough pairs.
    """
    import jax

    prompts, a_texts, b_texts = [], [], []
    for step in range(max_batches):
        if len(prompts) >= num_pairs:
            break
        chunk = [
            task.prompts[(step * batch_size + i) % len(task.prompts)] for i in range(batch_size)
        ]
        batch = task.prompt_batch(chunk)
        ids = np.concatenate([batch.input_ids, batch.input_ids])  # [2b, P]: each prompt twice
        mask = np.concatenate([batch.attention_mask, batch.attention_mask])  # [2b, P]
        rng, key = jax.random.split(rng)
        rollout = sample(
            policy,
            ids,
            mask,
            sampling,
            key,
            eos_token_id=task.eos_token_id,
            pad_token_id=task.pad_token_id,
        )
        tokens, response_mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)  # [2b, N]
        texts = task.decode(tokens, response_mask)
        finished = task.finished(tokens, response_mask)  # [2b]
        for i, prompt in enumerate(chunk):
            a, b = texts[i], texts[i + batch_size]
            keep = a and b and a != b and finished[i] and finished[i + batch_size]
            if keep and len(prompts) < num_pairs:
                prompts.append(prompt)
                a_texts.append(a)
                b_texts.append(b)
    if len(prompts) < num_pairs:
        raise RuntimeError(
            f"collect_preferences: only {len(prompts)} of {num_pairs} usable pairs after "
            f"{max_batches} batches of {batch_size} prompts; does the policy end its completions "
            f"with EOS within max_new_tokens={sampling.max_new_tokens}?"
        )
    return prompts, a_texts, b_texts


def collect_preferences(
    task,
    policy,
    rng,
    *,
    num_pairs: int,
    sampling: SamplingConfig | None = None,
    batch_size: int = 128,
    seed: int = 0,
    max_batches: int = 100,
):
    """Sample two completions per prompt from ``policy`` and let the task's labeler pick one.

    Returns ``(dataset, info)``: a ``datasets.Dataset`` with ``prompt``/``chosen``/``rejected`` text
    columns, and a dict with the gold rewards of the kept pairs (``gold_chosen``, ``gold_rejected``,
    ``[M]`` arrays), for measuring how often the noisy labels agree with the hidden reward.

    Args:
      task: a DemoTask (prompts, prompt_batch, decode, finished, gold_reward, annotate,
        preference_dataset, eos/pad token ids, data_config).
      policy: a CausalLM (the SFT base policy).
      rng: a ``jax.random`` key for sampling.
      num_pairs: pairs to return.
      sampling: how to sample (default: ``SamplingConfig(max_new_tokens=R)``, R the task's
        response length, temperature 1).
      batch_size: prompts per sampling call (each sampled twice).
      seed: numpy seed of the annotators' coin flips.
      max_batches: give up (RuntimeError) after this many sampling calls without enough pairs.
    """
    if sampling is None:
        sampling = SamplingConfig(max_new_tokens=task.data_config.max_response_length)
    prompts, a_texts, b_texts = sample_pairs(
        task,
        policy,
        rng,
        num_pairs=num_pairs,
        sampling=sampling,
        batch_size=batch_size,
        max_batches=max_batches,
    )
    labels = task.annotate(prompts, a_texts, b_texts, np.random.default_rng(seed))  # [M] a ≻ b
    gold_a = task.gold_reward(prompts, a_texts)  # [M]
    gold_b = task.gold_reward(prompts, b_texts)  # [M]
    dataset = task.preference_dataset(prompts, a_texts, b_texts, labels)
    info = {
        "gold_chosen": np.where(labels, gold_a, gold_b),
        "gold_rejected": np.where(labels, gold_b, gold_a),
    }
    return dataset, info
