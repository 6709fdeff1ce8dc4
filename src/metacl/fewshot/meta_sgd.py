"""Meta-SGD (Li, Zhou, Chen & Li 2017): MAML that also learns the inner learning rates.

Every weight has its own learnable rate alpha (a tensor shaped like the weight, initialised to
``inner_lr``); the inner step is theta' = theta - alpha * grad L_s, elementwise, and the outer
Adam learns theta and alpha together. The rates are a ``PerParameterLR``, the helper La-MAML's
learned learning rates follow as well. The paper takes one inner step. With
``first_order=True`` the inner gradients are constants but alpha still gets its gradient
(-grad L_s * dL_q/dtheta').
"""

from __future__ import annotations

from metacl.fewshot.learned_lr import PerParameterLR
from metacl.fewshot.maml import MAML


class MetaSGD(MAML):
    population_class = None  # not yet checked against separate runs: one run at a time
    def __init__(self, backbone, episode_info=None, inner_lr: float = 0.4,
                 lr_per: str = "element", **kwargs):
        super().__init__(backbone, episode_info, inner_lr=inner_lr, **kwargs)
        self.learned_lr = PerParameterLR(backbone.parameters(), init=inner_lr, per=lr_per)

    def functional_state(self):
        return (list(self.backbone.parameters()), list(self.learned_lr.alphas))

    def rates(self, state) -> list:
        return self.learned_lr.rates(state[1])
