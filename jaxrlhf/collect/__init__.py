"""Collecting preferences: sample pairs from the policy, have a labeler choose.

``collect_preferences`` is InstructGPT's labelling step (Ouyang et al. 2022) with the demo's
simulated annotators; its output is the preference dataset the reward model is trained on.
``jaxrlhf collect`` (:mod:`jaxrlhf.cli.collect`) is the same step for people: candidate pairs
(:mod:`.candidates`) labelled in a local web page (:mod:`.server`) or by a rule or reward model
(:mod:`.labelers`), stored crash-safely (:mod:`.store`).
"""

from jaxrlhf.collect.candidates import CollectConfig, pair_up, sample_candidates
from jaxrlhf.collect.labelers import Labeler, demo_annotator, load_labeler
from jaxrlhf.collect.pairs import collect_preferences, sample_pairs
from jaxrlhf.collect.server import LabelServer
from jaxrlhf.collect.store import LabelStore

__all__ = [
    "CollectConfig",
    "LabelServer",
    "LabelStore",
    "Labeler",
    "collect_preferences",
    "demo_annotator",
    "load_labeler",
    "pair_up",
    "sample_candidates",
    "sample_pairs",
]
