"""CIFAR ResNet-18 (He et al., 3x3 stem, no max-pool) and PreActResNet-18 (Wong et al. 2020's fast-AT net)."""
from torch import nn
import torch.nn.functional as F

from . import MODELS, input_layer


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _ResNet18(nn.Module):
    def __init__(self, block, preact, in_channels, num_classes, mean, std):
        super().__init__()
        self.normalize = input_layer(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = None if preact else nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [block(cin, cout, stride), block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn_final = nn.BatchNorm2d(512) if preact else None
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.bn_final is not None:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@MODELS.register("resnet18", title="ResNet-18", description="ResNet-18, CIFAR variant (3x3 stem)")
def resnet18(in_channels=3, num_classes=10, mean=(0.0,), std=(1.0,), **_):
    return _ResNet18(BasicBlock, False, in_channels, num_classes, mean, std)


@MODELS.register("preact_resnet18", title="PreActResNet-18", description="PreActResNet-18 (Wong et al. 2020)")
def preact_resnet18(in_channels=3, num_classes=10, mean=(0.0,), std=(1.0,), **_):
    return _ResNet18(PreActBlock, True, in_channels, num_classes, mean, std)
