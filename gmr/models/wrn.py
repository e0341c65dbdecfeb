"""WideResNet-28-10 (Zagoruyko & Komodakis), the paper's CIFAR-10 network: no input normalisation, as the
paper's code (val-iisc/SAT-Rx tools/utils.py:37-47 normalise with mean 0 and std 1, i.e. not at all)."""
from torch import nn
import torch.nn.functional as F

from . import MODELS, input_layer


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth, widen, in_channels, num_classes, mean, std):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = input_layer(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, stride in enumerate([1, 2, 2]):
            for j in range(n):
                blocks.append(WideBlock(cin, widths[i + 1], stride if j == 0 else 1))
                cin = widths[i + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.blocks(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.fc(out)


@MODELS.register("wrn_28_10", title="WideResNet-28-10", normalize=False,
                 description="WideResNet-28-10 (paper's CIFAR-10 net)")
def wrn_28_10(in_channels=3, num_classes=10, mean=None, std=None, **_):
    return WideResNet(28, 10, in_channels, num_classes, mean, std)
