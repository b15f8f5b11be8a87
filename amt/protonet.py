"""The ProtoNet cosine head (as PMF): class-mean prototypes, scaled cosine logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prototypes(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means [..., n_way, D] of support embeddings [..., n, D] with labels [..., n] in
    0..n_way-1; leading dimensions batch episodes of one shape."""
    if labels.ndim < 1 or labels.shape != embeddings.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} for embeddings of shape "
                         f"{tuple(embeddings.shape)}: expected one label per embedding")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_way):
        raise ValueError(f"support labels span [{int(labels.min())}, {int(labels.max())}]: "
                         f"expected 0..{n_way - 1}")
    one_hot = F.one_hot(labels, n_way).to(embeddings.dtype)
    counts = one_hot.sum(-2)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).squeeze(-1).tolist()
        raise ValueError(f"classes {empty} have no support example")
    return (one_hot.mT @ embeddings) / counts[..., None]


class ProtoHead(nn.Module):
    """logits = scale * (cos(query, prototype) + bias); scale starts at 10, bias at 0 (PMF).

    The bias shifts every logit of a query equally, so softmax losses give it zero gradient;
    it is kept for PMF's parameterisation and checkpoint layout.
    """

    def __init__(self, scale: float = 10.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, query_embeddings: Tensor, protos: Tensor) -> Tensor:
        """[..., q, D] queries against [..., N, D] prototypes -> [..., q, N] logits."""
        # float32 even under autocast: bfloat16 cosines would be off by ~0.04 in the logits
        with torch.autocast(query_embeddings.device.type, enabled=False):
            cosine = F.normalize(query_embeddings.float(), dim=-1) @ \
                F.normalize(protos.float(), dim=-1).mT
            return self.scale * (cosine + self.bias)
