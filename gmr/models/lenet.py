"""LeNet+: the MNIST network of the paper's code (SAT-Rx), no normalisation (inputs in [0, 1])."""
from torch import nn

from . import MODELS


@MODELS.register("lenet_plus", title="LeNet+", normalize=False, description="paper's MNIST net: 2 conv5x5 + FC-1024", input_sizes=[(28, 28)])
class LeNetPlus(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, image_size=28, **_):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 1024), nn.ReLU(),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
