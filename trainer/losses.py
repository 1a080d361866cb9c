"""Contrastive losses as pure functions of embeddings (docs/design.md §1).

Every function takes raw (unnormalised) embeddings, normalises them itself and
computes in float32, so callers may pass autocast outputs. Under DDP the
method classes pass the *gathered* batch (gathered with gradients for the local
part), so these functions never know about ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over the 2N views: each view's positive is the other
    view of its image, its negatives the remaining 2N - 2 views."""
    if z1.shape != z2.shape:
        raise ValueError(f"nt_xent needs two views of equal shape, got {z1.shape} and {z2.shape}")
    labels = torch.arange(z1.shape[0], device=z1.device)
    return multi_positive_nt_xent([z1, z2], [labels, labels], temperature)


def multi_positive_nt_xent(
    views: Sequence[Tensor],
    labels: Sequence[Tensor],
    temperature: float,
    view_weights: Sequence[float] | None = None,
) -> Tensor:
    """SupCon-style InfoNCE where every other row with the same label is a positive.

    ``views[v]`` is ``[N_v, D]`` and ``labels[v]`` the anchor index of each of
    its rows, so a synthetic positive that arrived for only some anchors is
    passed as its masked rows with their anchor indices. A positive pair (a, p)
    contributes ``-log(exp(s_ap) / sum_{k != a} exp(s_ak))`` with weight
    ``view_weights[view(a)] * view_weights[view(p)]``; the loss is the weighted
    mean over all positive pairs. With two full views and unit weights this is
    exactly ``nt_xent``; weighting the synthetic view by lambda is the CLSP
    contrastive mode.
    """
    if len(views) != len(labels):
        raise ValueError("one label tensor per view")
    weights = list(view_weights) if view_weights is not None else [1.0] * len(views)
    z = _unit(torch.cat(list(views), dim=0))
    y = torch.cat(list(labels), dim=0)
    row_w = torch.cat(
        [
            torch.full((v.shape[0],), float(w), device=z.device)
            for v, w in zip(views, weights, strict=True)
        ]
    )
    logits = z @ z.T / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~self_mask
    pair_w = (row_w[:, None] * row_w[None, :]).masked_fill(~positive, 0.0)
    total = -(log_prob.masked_fill(~positive, 0.0) * pair_w).sum()
    return total / pair_w.sum().clamp(min=1e-12)


def infonce(q: Tensor, k: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: query ``q[i]`` against its key ``k[i]`` and a bank of
    negatives ``[M, D]`` (the queue). ``k`` and ``negatives`` carry no gradient
    in MoCo; this function does not detach them, the method does."""
    return multi_positive_infonce(q, k[:, None, :], negatives, temperature)


def multi_positive_infonce(
    q: Tensor,
    positives: Tensor,
    negatives: Tensor,
    temperature: float,
    weights: Tensor | None = None,
) -> Tensor:
    """InfoNCE with several positives per query (the MoCo form of the CLSP
    contrastive mode).

    ``positives`` is ``[N, P, D]``; ``weights`` ``[N, P]`` weighs each
    positive, 0 meaning absent (not even in the normaliser); None: all 1.
    Positive p of query i gives
    ``-log(exp(q.p) / (sum_present exp(q.p') + sum_neg exp(q.n)))``; the loss
    is the weighted mean over all present positives.
    """
    qn = _unit(q)
    pos = torch.einsum("nd,npd->np", qn, _unit(positives)) / temperature
    neg = qn @ _unit(negatives).T / temperature
    w = torch.ones_like(pos) if weights is None else weights.to(pos.device, torch.float32)
    present = w > 0
    if not bool(present.any(dim=1).all()):
        raise ValueError("every query needs at least one present positive")
    pos_for_norm = pos.masked_fill(~present, float("-inf"))
    log_norm = torch.logsumexp(torch.cat([pos_for_norm, neg], dim=1), dim=1, keepdim=True)
    nll = -(pos - log_norm).masked_fill(~present, 0.0)
    return (nll * w).sum() / w.sum()


def multi_positive_cross_entropy(
    queries: Tensor,
    keys: Tensor,
    query_labels: Tensor,
    key_labels: Tensor,
    temperature: float,
    key_weights: Tensor | None = None,
) -> Tensor:
    """Each query against all keys; keys with the query's label are its
    positives (weighted by ``key_weights``), the rest negatives. The loss is
    the weighted mean over positive pairs of ``-log softmax``. NNCLR's loss is
    the one-positive case; its CLSP contrastive mode adds the synthetic
    positives' predictions as extra keys."""
    logits = _unit(queries) @ _unit(keys).T / temperature
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = query_labels[:, None] == key_labels[None, :]
    w = torch.ones(keys.shape[0], device=logits.device) if key_weights is None else key_weights
    pair_w = (
        w.to(logits.device, torch.float32)[None, :].expand_as(logits).masked_fill(~positive, 0.0)
    )
    return -(log_prob.masked_fill(~positive, 0.0) * pair_w).sum() / pair_w.sum().clamp(min=1e-12)


def nnclr_loss(nn: Tensor, p: Tensor, temperature: float) -> Tensor:
    """NNCLR: the support-set neighbour ``nn[i]`` of one view must pick out the
    prediction ``p[i]`` of the other view among all predictions of the batch."""
    logits = _unit(nn) @ _unit(p).T / temperature
    labels = torch.arange(nn.shape[0], device=nn.device)
    return F.cross_entropy(logits, labels)


def clsp_similarity_term(z1: Tensor, z3: Tensor, mask: Tensor | None = None) -> Tensor:
    """The CLSP term ``mean_i (2 - 2 cos(z1_i, z3_i))`` over anchors whose
    synthetic positive arrived (``mask``; None: all).

    With no positive at all it is a zero that still depends on the inputs, so
    a step without positives has the same graph as one with them (DDP needs
    every rank to touch the same parameters).
    """
    per_sample = 2.0 - 2.0 * (_unit(z1) * _unit(z3)).sum(dim=1)
    if mask is None:
        return per_sample.mean()
    mask = mask.to(device=per_sample.device, dtype=torch.bool)
    count = mask.sum()
    total = per_sample.masked_fill(~mask, 0.0).sum()
    return total / count.clamp(min=1)


def nearest_neighbour(z: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
    """The support-set row with the highest cosine similarity to each row of
    ``z``: ``(neighbours [N, D], their indices [N])``."""
    idx = (_unit(z) @ _unit(support).T).argmax(dim=1)
    return support[idx], idx


def z_std(z: Tensor, mask: Tensor | None = None) -> Tensor:
    """The spread of the L2-normalised projections, solo-learn's ``z_std``,
    scaled by ``sqrt(D)``: about 1 for features spread over the sphere, 0 when
    every row is the same vector (a collapsed projection; docs/design.md §5).

    ``z`` is ``[B, D]``; ``mask`` picks the rows that count (the anchors whose
    positive arrived; None: all). The std over the counted rows of each
    dimension, averaged over dimensions, as a detached float32 scalar that is
    NaN when fewer than 2 rows count: the mask stays on the device, so the
    training step never waits on it to decide.
    """
    if z.ndim != 2:
        raise ValueError(f"z_std needs a [B, D] batch, got {tuple(z.shape)}")
    unit = _unit(z.detach())
    if mask is None:
        weight = torch.ones(unit.shape[0], 1, device=unit.device)
    else:
        weight = mask.to(device=unit.device, dtype=torch.float32)[:, None]
    count = weight.sum()
    mean = (unit * weight).sum(dim=0) / count
    var = ((unit - mean) ** 2 * weight).sum(dim=0) / (count - 1)
    return var.clamp(min=0).sqrt().mean() * unit.shape[1] ** 0.5
