"""Collecting human (here: simulated) feedback: sample pairs from the policy, have a labeler choose.

``collect_preferences`` is the seed's labelling step; its output is the preference dataset the reward
model is trained on.
"""

from jaxrlhf.collect.pairs import collect_preferences, sample_pairs

__all__ = ["collect_preferences", "sample_pairs"]
