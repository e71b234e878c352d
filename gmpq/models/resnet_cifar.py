"""The CIFAR ResNets of He et al. (2016, section 4.2): 6n+2 layers, widths 16/32/64, option-A shortcuts.

A stage of ``n`` BasicBlocks per width; the first block of the second and third stage halves the resolution. Where
a block changes shape, its shortcut is option A: ``x[:, :, ::2, ::2]`` zero-padded with ``planes // 4`` channels on
each side — no parameters, so no quantizer and no BOPs (:class:`OptionAShortcut` is neither a convolution nor a
linear layer, and nothing in gmpq treats it as one). Module names follow the classic implementation
(``conv1``/``bn1``/``layer{1,2,3}.{i}``/``linear``), so its published weights load as they are.

The timm interface: ``forward_features`` (the last feature map), ``forward_head(x, pre_logits=False)``,
``get_classifier`` / ``reset_classifier``, ``global_pool``, ``num_features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from torch import nn

WIDTHS = (16, 32, 64)


class OptionAShortcut(nn.Module):
    """``x[:, :, ::s, ::s]`` with ``pad`` zero channels on each side: the parameter-free option-A shortcut."""

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class CifarBasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions without bias."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        reshape = stride != 1 or in_planes != planes
        self.shortcut = OptionAShortcut(stride, (planes - in_planes) // 2) if reshape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3x3 stem conv (16 channels), three stages of ``n`` blocks, average pooling,
    ``linear``."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 global_pool: str = "avg") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers, not {depth}")
        blocks = (depth - 2) // 6
        self.depth, self.drop_rate = depth, drop_rate
        self.conv1 = nn.Conv2d(in_chans, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.act1 = nn.ReLU(inplace=True)
        in_planes = WIDTHS[0]
        for index, planes in enumerate(WIDTHS):
            stage = []
            for i in range(blocks):
                stage.append(CifarBasicBlock(in_planes, planes, stride=2 if index and not i else 1))
                in_planes = planes
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_features = self.head_hidden_size = in_planes
        self.feature_info = [dict(num_chs=c, reduction=2 ** i, module=f"layer{i + 1}") for i, c in enumerate(WIDTHS)]
        self.reset_classifier(num_classes, global_pool)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convolutions and linear layer (fan in), BatchNorm at (1, 0): the classic initialisation."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
