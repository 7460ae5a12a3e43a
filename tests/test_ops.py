"""Torch reference ops against naive loops, and their gradients against finite differences."""
import pytest
import torch

from terarec.kernels.cross import cross_v1_reference, cross_v2_reference
from terarec.kernels.interaction import dot_interaction_reference, interaction_output_dim
from terarec.kernels.mlp import fused_mlp_reference
from terarec.core.metrics import roc_auc


@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("pad_to", [None, 8])
def test_dot_interaction_matches_loops(self_interaction, pad_to):
    batch, features, dim = 3, 4, 5
    dense, sparse = torch.randn(batch, dim), torch.randn(batch, features, dim)
    out = dot_interaction_reference(dense, sparse, self_interaction, pad_to)
    assert out.shape[1] == interaction_output_dim(dim, features, self_interaction, pad_to)
    for b in range(batch):
        vectors = [dense[b]] + [sparse[b, f] for f in range(features)]
        expected = list(dense[b])
        for i in range(len(vectors)):
            for j in range(i + 1 if self_interaction else i):
                expected.append(torch.dot(vectors[i], vectors[j]))
        expected = torch.stack(expected)
        torch.testing.assert_close(out[b, : expected.numel()], expected)
        assert (out[b, expected.numel():] == 0).all()


def test_dot_interaction_gradcheck():
    dense = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    sparse = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, s: dot_interaction_reference(d, s, False, 16), (dense, sparse))


def test_cross_layers_match_loops_and_gradcheck():
    x0, xl = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    w, b, W = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    for row in range(4):
        torch.testing.assert_close(cross_v1_reference(x0, xl, w, b)[row], x0[row] * torch.dot(xl[row], w) + b + xl[row])
        torch.testing.assert_close(cross_v2_reference(x0, xl, W, b)[row], x0[row] * (W @ xl[row] + b) + xl[row])
    for fn, weight in ((cross_v1_reference, w), (cross_v2_reference, W)):
        args = [t.clone().requires_grad_(True) for t in (x0, xl, weight, b)]
        assert torch.autograd.gradcheck(fn, args)


def test_mlp_reference_matches_manual_layers():
    x = torch.randn(5, 3)
    weights = [torch.randn(4, 3), torch.randn(2, 4)]
    biases = [torch.randn(4), torch.randn(2)]
    hidden = torch.relu(x @ weights[0].T + biases[0])
    torch.testing.assert_close(fused_mlp_reference(x, weights, biases), hidden @ weights[1].T + biases[1])
    torch.testing.assert_close(fused_mlp_reference(x, weights, biases, last_activation=True),
                               torch.relu(hidden @ weights[1].T + biases[1]))
    dropped = fused_mlp_reference(x, weights, biases, dropout=0.5, training=True)
    assert dropped.shape == (5, 2)


def test_mlp_gradcheck():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fused_mlp_reference(a[0], [a[1], a[3]], [a[2], a[4]]), (x, w1, b1, w2, b2))


def test_auc_matches_pairwise_count_with_ties():
    labels = torch.randint(0, 2, (500,)).float()
    scores = torch.randint(0, 7, (500,)).float()
    positives, negatives = scores[labels == 1], scores[labels == 0]
    pairwise = ((positives[:, None] > negatives[None]).double() + 0.5 * (positives[:, None] == negatives[None]).double()).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairwise.item())
    assert roc_auc(torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.1])) == 1.0
