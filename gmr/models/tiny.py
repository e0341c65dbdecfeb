"""A tiny CNN for tests and quick CPU smoke runs on any input shape."""
from torch import nn

from . import MODELS, input_layer


@MODELS.register("tiny_cnn", title="tiny CNN", description="tiny CNN for tests (any input size)")
class TinyCNN(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, mean=None, std=None, width=8, **_):
        super().__init__()
        self.net = nn.Sequential(
            input_layer(mean, std) if in_channels == 3 else nn.Identity(),
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(8 * width, num_classes),
        )

    def forward(self, x):
        return self.net(x)
