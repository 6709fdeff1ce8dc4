"""Herding exemplar selection (Rebuffi et al. 2017, iCaRL Algorithm 4).

Given the feature vectors of one class, herding ranks samples greedily: step k picks the not yet
chosen sample whose addition brings the mean of the chosen features closest (Euclidean) to the
mean of all the class's features,

    p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||,   mu = mean_x phi(x).

The result is a priority order: any prefix of it is the herding exemplar set of that size, so a
class-balanced memory shrinks a class's set by keeping a prefix. Each step is one vectorised
distance computation over all candidates; nothing leaves the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def herding_selection(features: Tensor, k: int, normalize: bool = True) -> Tensor:
    """Indices (min(k, n),) of the herding order of `features` (n, d), first choice first.

    normalize: L2-normalise each feature vector first, as iCaRL does (its phi is normalised).
    """
    n = features.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    feats = features.float()
    if normalize:
        feats = F.normalize(feats, dim=1)
    mu = feats.mean(0)
    running = torch.zeros_like(mu)  # sum of the chosen features
    taken = torch.zeros(n, dtype=torch.bool, device=feats.device)
    order = torch.empty(k, dtype=torch.long, device=feats.device)
    for step in range(k):
        # Mean of the chosen set if each candidate were added, all candidates at once.
        candidate_means = (running + feats) / (step + 1)
        dist = (candidate_means - mu).pow(2).sum(1).masked_fill(taken, float("inf"))
        best = dist.argmin().view(1)  # index ops below keep it on the device (no .item())
        order[step : step + 1] = best
        taken.index_fill_(0, best, True)
        running += feats.index_select(0, best)[0]
    return order
