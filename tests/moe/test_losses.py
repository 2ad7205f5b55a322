import math

import torch

from moekit.moe import losses


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    experts = torch.tensor([[0], [1]])
    # f = [1/2, 1/2, 0], P = [0.4, 0.4, 0.2] -> 3 * (0.2 + 0.2) = 1.2
    torch.testing.assert_close(losses.load_balancing_loss(probs, experts), torch.tensor(1.2))


def test_load_balancing_loss_ignores_empty_slots_and_is_one_when_uniform():
    probs = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0, -1], [1, -1], [2, -1], [3, -1]])
    torch.testing.assert_close(losses.load_balancing_loss(probs, experts), torch.tensor(1.0))


def test_load_balancing_gradient_flows_through_probabilities_only():
    probs = torch.rand(6, 4).softmax(-1).requires_grad_(True)
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1], [0, 2], [1, 0]])
    losses.load_balancing_loss(probs, experts).backward()
    # d/dP[t, e] of E * sum_e f_e * mean_t P[t, e] is E * f_e / T, f held constant.
    f = torch.bincount(experts.reshape(-1), minlength=4).float() / 12
    torch.testing.assert_close(probs.grad, (4 * f / 6).expand(6, 4))


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    torch.testing.assert_close(losses.z_loss(logits), torch.tensor(expected))


def test_entropy():
    uniform = torch.full((3, 8), 1 / 8)
    torch.testing.assert_close(losses.router_entropy(uniform), torch.tensor(math.log(8)))
    onehot = torch.eye(8)[:3]
    assert float(losses.router_entropy(onehot)) < 1e-6


def test_bias_update_moves_against_load():
    bias = torch.zeros(4)
    losses.update_selection_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
