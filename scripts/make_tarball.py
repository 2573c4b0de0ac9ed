"""Write a tarball in the layout of the official cifar-10-python.tar.gz, for trying the pipeline
without the download: from the real CIFAR-10 sample (an .npz with train_x, train_y, test_x, test_y),
or generated images of the real sizes; with `cifar100`, in the layout of cifar-100-python.tar.gz
(generated images of 100 classes).

    python scripts/make_tarball.py ../shared/reference/cifar10-sample.npz sample.tar.gz
    python scripts/make_tarball.py generated:50000:10000 generated.tar.gz
    python scripts/make_tarball.py generated:50000:10000 generated100.tar.gz cifar100

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


def load(source: str, dataset: str = "cifar10") -> cifar.CifarData:
    if source.startswith("generated:"):
        _, n_train, n_test = source.split(":")
        return cifar.synthetic(int(n_train), int(n_test), seed=0, classes=cifar.source(dataset).classes)
    arrays = np.load(source)
    return cifar.CifarData(arrays["train_x"], arrays["train_y"].astype(np.int64),
                         arrays["test_x"], arrays["test_y"].astype(np.int64))


def main(source: str, out: str, name: str = "cifar10") -> None:
    dataset, src = load(source, name), cifar.source(name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = cifar.write(tmp, dataset, name)  # the official layout's batch files
        with tarfile.open(out, "w:gz") as tar:
            tar.add(folder, arcname=src.folder)
    flag, key = ("", "data.md5") if name == "cifar10" else (f" --dataset {name}", f"data.{name}.md5")
    print(f"{out}: {len(dataset.train_y):,} training and {len(dataset.test_y):,} test images, "
          f"md5 {cifar.md5sum(out)}")
    print(f"python -m replicate.pipeline import-data {Path(out).resolve()}{flag}")
    print(f"then set {key} in params.yaml to {cifar.md5sum(out)}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])
