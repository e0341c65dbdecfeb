"""The fixed case the hand-computation tests of the training methods share (tests/test_methods.py,
tests/test_methods_fast.py): a float64 linear model z = W x + b on 4 tiny 1x2x3 inputs, whose input
gradients the tests write in closed form, so a method and the hand computation agree to 1e-9."""
from __future__ import annotations

import torch
from torch import nn

W = torch.tensor([[0.9, -0.7, 0.4, 1.3, -0.2, 0.6],
                  [-0.5, 1.1, -1.2, 0.3, 0.8, -0.9],
                  [0.2, 0.35, 0.95, -1.05, -0.6, 0.45]], dtype=torch.float64)
B = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
X = torch.tensor([[0.0, 0.5, 1.0, 0.02, 0.98, 0.3],
                  [0.45, 0.55, 0.6, 0.4, 0.5, 0.5],
                  [1.0, 0.0, 0.25, 0.75, 0.1, 0.9],
                  [0.33, 0.66, 0.5, 0.5, 0.2, 0.8]], dtype=torch.float64).view(4, 1, 2, 3)
Y = torch.tensor([0, 1, 2, 1])
SEED = 1234


class Linear(nn.Module):
    """z = weight x + bias on flattened inputs, in float64 (default: the shared W and B)."""

    def __init__(self, weight: torch.Tensor = W, bias: torch.Tensor = B):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0]).double()
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x):
        return self.fc(x.flatten(1))
