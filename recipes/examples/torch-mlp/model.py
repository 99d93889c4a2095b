"""The reference model: 24 Linear(2048, 2048) layers with GELU, about 400 MB of float32."""

import torch

WIDTH = 2048
DEPTH = 24


def build(device: str = "cpu") -> torch.nn.Sequential:
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH, device=device), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)
