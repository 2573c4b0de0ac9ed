"""Write a tarball in the layout of the official cifar-10-python.tar.gz, for trying the pipeline
without the download: from the real CIFAR-10 sample (an .npz with train_x, train_y, test_x, test_y),
or generated images of the real sizes.

    python scripts/make_tarball.py ../shared/reference/cifar10-sample.npz sample.tar.gz
    python scripts/make_tarball.py generated:50000:10000 generated.tar.gz

Then point the pipeline at it (it prints these lines with the tarball's md5):
    python -m replicate.pipeline import-data $PWD/sample.tar.gz   # re-pins data.dvc
    and set data.md5 in params.yaml to the md5 printed.
How docs/quick/ was made: README, "See it in 15 minutes".
"""

import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from replicate import data as cifar


def load(source: str) -> cifar.Cifar10:
    if source.startswith("generated:"):
        _, n_train, n_test = source.split(":")
        return cifar.synthetic(int(n_train), int(n_test), seed=0)
    arrays = np.load(source)
    return cifar.Cifar10(arrays["train_x"], arrays["train_y"].astype(np.int64),
                         arrays["test_x"], arrays["test_y"].astype(np.int64))


def main(source: str, out: str) -> None:
    dataset = load(source)
    with tempfile.TemporaryDirectory() as tmp:
        folder = cifar.write_cifar10(tmp, dataset)  # five training batches, as the official layout
        with tarfile.open(out, "w:gz") as tar:
            tar.add(folder, arcname=cifar.FOLDER)
    print(f"{out}: {len(dataset.train_y):,} training and {len(dataset.test_y):,} test images, "
          f"md5 {cifar.md5sum(out)}")
    print(f"python -m replicate.pipeline import-data {Path(out).resolve()}")
    print(f"then set data.md5 in params.yaml to {cifar.md5sum(out)}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
