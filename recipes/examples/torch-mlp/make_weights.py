"""Write the MLP's weights (a fixed seed, so the same bytes every time) to weights.pt."""

import sys

import torch

sys.path.insert(0, sys.argv[1])
from model import build  # noqa: E402

torch.manual_seed(0)
model = build(device="cpu")
torch.save(model.state_dict(), "weights.pt")
print(f"{sum(p.numel() for p in model.parameters()) * 4 / 2**20:.0f} MiB of float32 weights")
