"""The contrastive losses against values worked out by hand on tiny inputs,
and against a plain loop implementation of their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clsp_positives.trainer import losses

E = math.e


def _loop_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """NT-Xent written as the SimCLR paper states it, one pair at a time."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        denom = sum(math.exp(float(z[a] @ z[k]) / t) for k in range(2 * n) if k != a)
        total += -math.log(math.exp(float(z[a] @ z[p]) / t) / denom)
    return total / (2 * n)


def test_nt_xent_orthogonal_pairs_by_hand() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([e1, e2])
    # Each row sees its positive at similarity 1 and two negatives at 0.
    assert losses.nt_xent(z, z, 1.0).item() == pytest.approx(math.log(2 + E) - 1, abs=1e-6)


def test_nt_xent_single_pair_is_zero_and_scale_invariant() -> None:
    z1, z2 = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert losses.nt_xent(z1, z2, 0.5).item() == pytest.approx(0.0, abs=1e-7)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert losses.nt_xent(a, b, 0.3).item() == pytest.approx(
        losses.nt_xent(7 * a, 0.1 * b, 0.3).item(), rel=1e-5
    )


def test_nt_xent_matches_the_loop_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert losses.nt_xent(z1, z2, 0.2).item() == pytest.approx(_loop_nt_xent(z1, z2, 0.2), rel=1e-5)


def test_nt_xent_rejects_mismatched_views() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        losses.nt_xent(torch.randn(3, 4), torch.randn(2, 4), 0.5)


def test_multi_positive_three_identical_views_by_hand() -> None:
    e1 = torch.tensor([[1.0, 0.0]])
    lab = torch.tensor([0])
    # Each row: two positives, both at similarity 1, nothing else: -log(1/2).
    val = losses.multi_positive_nt_xent([e1, e1, e1], [lab, lab, lab], 1.0, [1.0, 1.0, 0.3])
    assert val.item() == pytest.approx(math.log(2), abs=1e-6)


def test_multi_positive_weighted_pairs_by_hand() -> None:
    # One anchor: views a=[1,0], b=[0,1], c=[1,0]; t = 1; weight of view c = w.
    a, b, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    lab = torch.tensor([0])
    w = 0.5
    # Row a: others b (s=0), c (s=1); row b: a (0), c (0); row c: a (1), b (0).
    la = math.log(1 + E)
    lb = math.log(2)
    nll = {
        ("a", "b"): la - 0,
        ("a", "c"): la - 1,
        ("b", "a"): lb,
        ("b", "c"): lb,
        ("c", "a"): la - 1,
        ("c", "b"): la,
    }
    weight = {"a": 1.0, "b": 1.0, "c": w}
    num = sum(weight[x] * weight[y] * v for (x, y), v in nll.items())
    den = sum(weight[x] * weight[y] for (x, y) in nll)
    val = losses.multi_positive_nt_xent([a, b, c], [lab, lab, lab], 1.0, [1.0, 1.0, w])
    assert val.item() == pytest.approx(num / den, abs=1e-6)


def test_multi_positive_with_two_views_equals_nt_xent() -> None:
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    lab = torch.arange(4)
    assert losses.multi_positive_nt_xent([z1, z2], [lab, lab], 0.4).item() == pytest.approx(
        losses.nt_xent(z1, z2, 0.4).item(), rel=1e-6
    )


def test_infonce_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[2.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # t = 0.5: logits 2 (positive), 0 and -2 (negatives).
    expected = -math.log(E**2 / (E**2 + 1 + E**-2))
    assert losses.infonce(q, k, negatives, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_multi_positive_infonce_weights_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    neg = torch.tensor([[-1.0, 0.0]])
    norm = math.log(E + 1 + 1 / E)
    expected = (1.0 * (norm - 1) + 0.5 * norm) / 1.5
    val = losses.multi_positive_infonce(q, pos, neg, 1.0, torch.tensor([[1.0, 0.5]]))
    assert val.item() == pytest.approx(expected, abs=1e-6)
    # Weight 0 means absent: not even in the normaliser.
    val0 = losses.multi_positive_infonce(q, pos, neg, 1.0, torch.tensor([[1.0, 0.0]]))
    assert val0.item() == pytest.approx(math.log(E + 1 / E) - 1, abs=1e-6)
    with pytest.raises(ValueError, match="at least one present positive"):
        losses.multi_positive_infonce(q, pos, neg, 1.0, torch.tensor([[0.0, 0.0]]))


def test_nnclr_loss_by_hand() -> None:
    nn = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -math.log(E**2 / (E**2 + 1))  # t = 0.5: logits [2, 0] per row
    assert losses.nnclr_loss(nn, p, 0.5).item() == pytest.approx(expected, abs=1e-6)
    p_same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert losses.nnclr_loss(nn, p_same, 1.0).item() == pytest.approx(math.log(2), abs=1e-6)


def test_multi_positive_cross_entropy_reduces_to_nnclr_loss() -> None:
    nn, p = torch.randn(5, 4), torch.randn(5, 4)
    lab = torch.arange(5)
    assert losses.multi_positive_cross_entropy(nn, p, lab, lab, 0.2).item() == pytest.approx(
        losses.nnclr_loss(nn, p, 0.2).item(), rel=1e-6
    )


def test_clsp_similarity_term_by_hand() -> None:
    z1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    z3 = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [6.0, 8.0]])
    # 2 - 2cos: orthogonal 2, opposite 4, parallel 0.
    assert losses.clsp_similarity_term(z1, z3).item() == pytest.approx(2.0, abs=1e-6)
    mask = torch.tensor([True, False, True])
    assert losses.clsp_similarity_term(z1, z3, mask).item() == pytest.approx(1.0, abs=1e-6)
    # It equals the squared distance of the normalised vectors.
    d = (F.normalize(z1, dim=1) - F.normalize(z3, dim=1)).pow(2).sum(1)
    assert losses.clsp_similarity_term(z1, z3, mask).item() == pytest.approx(
        d[mask].mean().item(), abs=1e-6
    )


def test_clsp_similarity_term_without_positives_is_a_connected_zero() -> None:
    z1 = torch.randn(3, 4, requires_grad=True)
    z3 = torch.randn(3, 4, requires_grad=True)
    val = losses.clsp_similarity_term(z1, z3, torch.zeros(3, dtype=torch.bool))
    assert val.item() == 0.0
    val.backward()
    assert z1.grad is not None and torch.count_nonzero(z1.grad) == 0


def test_nearest_neighbour_is_the_cosine_argmax() -> None:
    g = torch.Generator().manual_seed(1)
    support = torch.randn(50, 8, generator=g)
    z = torch.randn(7, 8, generator=g)
    nn, idx = losses.nearest_neighbour(z, support)
    for i in range(7):
        sims = [F.cosine_similarity(z[i], s, dim=0).item() for s in support]
        best = max(range(50), key=lambda j: sims[j])
        assert idx[i].item() == best
        assert torch.equal(nn[i], support[best])


def test_z_std_is_near_one_for_random_rows_and_zero_for_identical_rows() -> None:
    g = torch.Generator().manual_seed(0)
    spread = losses.z_std(torch.randn(512, 32, generator=g))
    assert spread.item() == pytest.approx(1.0, abs=0.05)
    same = torch.randn(1, 32, generator=g).expand(16, 32)
    assert losses.z_std(same).item() == pytest.approx(0.0, abs=1e-6)
    # Scaling a row does not spread it: only directions count.
    scaled = same * torch.arange(1, 17, dtype=torch.float32)[:, None]
    assert losses.z_std(scaled).item() == pytest.approx(0.0, abs=1e-6)


def test_z_std_is_the_solo_learn_formula_times_sqrt_d() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 9, generator=g)
    expected = F.normalize(z, dim=1).std(dim=0).mean() * 3.0
    assert losses.z_std(z).item() == pytest.approx(expected.item(), rel=1e-5)


def test_z_std_counts_only_the_masked_rows() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 5, generator=g)
    mask = torch.tensor([True, False, True, True, False, False])
    assert losses.z_std(z, mask).item() == pytest.approx(losses.z_std(z[mask]).item(), rel=1e-5)
    # One row or none has no spread to measure.
    assert torch.isnan(losses.z_std(z, torch.eye(6, dtype=torch.bool)[0]))
    assert torch.isnan(losses.z_std(z, torch.zeros(6, dtype=torch.bool)))
