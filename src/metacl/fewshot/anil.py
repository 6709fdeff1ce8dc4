"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals 2020).

MAML in which the inner loop adapts only the final linear layer (the head); the body is shared
by all tasks and learned by the outer loop alone. The body's features are computed once per
support/query set, so each inner step is a single linear layer's forward and backward. With
second order (the default) the meta-gradient reaches the body through the head's inner updates.
"""

from __future__ import annotations

from metacl.fewshot.maml import MAML


class ANIL(MAML):
    population_class = None  # not yet checked against separate runs: one run at a time
    head_only = True
