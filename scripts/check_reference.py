"""Check architecture fidelity against published weights of a popular PyTorch port.

    python scripts/check_reference.py ../shared/reference

Loads each resnet{20,32,44,56}-*.th into `build("resnet", depth)` tensor by tensor in order and
prints the top-1 error on the real 1017-image test sample. Those checkpoints were trained on
inputs in [0, 1] normalised per channel with ImageNet mean/std, so that is how they are evaluated
here (our own training subtracts the per-pixel mean instead, as the paper does).
Not part of the test suite: a fresh clone has no reference folder.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from replicate.models import build, load_by_order

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main(folder: str) -> None:
    folder = Path(folder)
    sample = np.load(folder / "cifar10-sample.npz")
    x = torch.from_numpy(sample["test_x"]).float() / 255.0
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    y = torch.from_numpy(sample["test_y"]).long()
    print(f"{'checkpoint':<24} {'params':>9} {'error %':>8}")
    for path in sorted(folder.glob("resnet*.th")):
        depth = int(path.name[len("resnet"):].split("-")[0])
        model = build("resnet", depth)
        load_by_order(model, torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        model.eval()
        with torch.no_grad():
            error = 100.0 * (model(x).argmax(1) != y).float().mean().item()
        print(f"{path.name:<24} {sum(p.numel() for p in model.parameters()):>9,} {error:>8.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/reference")
