"""Check architecture fidelity against published weights of a popular PyTorch port.

    python scripts/check_reference.py ../shared/reference

Writes the folder's real 1017-image CIFAR-10 sample (cifar10-sample.npz) in the official pickle
layout to a temporary folder and evaluates each resnet{20,32,44,56}-*.th on it with
`python -m replicate.evaluate`, which loads them into our nets tensor by tensor in order. Those
checkpoints were trained on [0, 1] inputs normalised per channel with ImageNet's mean and std, so
they are evaluated with `--normalize imagenet` (our own runs subtract the per-pixel mean, as the
paper does). The folder's README gives the errors to expect. Not part of the test suite: a fresh
clone has no reference folder.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from replicate import data, evaluate


def main(folder: str) -> None:
    folder = Path(folder)
    sample = np.load(folder / "cifar10-sample.npz")
    checkpoints = sorted(str(p) for p in folder.glob("resnet*.th"))
    if not checkpoints:
        sys.exit(f"error: no resnet*.th in {folder}: pass the reference folder")
    with tempfile.TemporaryDirectory() as tmp:
        data.write_cifar10(tmp, data.CifarData(sample["train_x"], sample["train_y"].astype(np.int64),
                                             sample["test_x"], sample["test_y"].astype(np.int64)))
        evaluate.main([*checkpoints, "--data", tmp, "--normalize", "imagenet"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/reference")
