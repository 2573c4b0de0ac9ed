"""CIFAR-10 and CIFAR-100 on the training device: reading the official pickle layouts, the papers'
preprocessing (per-pixel mean subtracted, no std) and their augmentation done on whole batches."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .device import generator_device

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TARBALL = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"  # class names, in the official tarball
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PAD = 4  # the paper pads 4 pixels on each side, then crops 32x32



@dataclass(frozen=True)
class Source:
    """An official CIFAR tarball and the pickle layout inside it."""

    name: str              # what reports call it
    url: str
    tarball: str
    md5: str
    folder: str            # what the tarball extracts to, under the data root
    train: tuple[str, ...]  # the training batch files, in order
    test: str
    meta: str              # class names; our loader does not need it
    labels: bytes          # the batch dicts' label key: CIFAR-100 has 100 "fine" and 20 "coarse" labels
    classes: int
    pin: str               # the .dvc file beside dvc.yaml that pins the tarball
    make: str              # the command that fetches it: the first paper that runs on it

    @property
    def how_to_get(self) -> str:
        flag = "" if self is DATASETS["cifar10"] else f" --dataset {key_of(self)}"
        return (f"Run `{self.make}` (it downloads and checks the tarball with DVC), or put the official "
                f"{self.tarball} (md5 {self.md5}) in data/ and run `python -m replicate.data prepare "
                f"data/{self.tarball} data{flag}`.")


# A run's data set is part of its identity (train.Config.dataset, the run name's suffix): "cifar10"
# is the default and is never written; the sequel's Table 3 also runs on "cifar100".
DATASETS = {
    "cifar10": Source("CIFAR-10", URL, TARBALL, MD5, FOLDER, tuple(TRAIN_BATCHES), TEST_BATCH, META, b"labels", 10,
                      "data.dvc", "make repro"),
    "cifar100": Source("CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", ("train",),
                       "test", "meta", b"fine_labels", 100, "data-cifar100.dvc", "make repro PAPER=2016"),
}
DEFAULT = "cifar10"
HOW_TO_GET = DATASETS[DEFAULT].how_to_get


def source(dataset: str) -> Source:
    """The Source of a data set's key ("cifar10", "cifar100"); an unknown key is named with the known ones."""
    if dataset not in DATASETS:
        import difflib

        close = difflib.get_close_matches(str(dataset), list(DATASETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown data set {dataset!r}: {hint}the data sets are {', '.join(DATASETS)}")
    return DATASETS[dataset]


def suffix(dataset: str) -> str:
    """What a run name says of its data set: nothing for CIFAR-10 (every name before CIFAR-100),
    '-cifar100' otherwise (preactbottleneck-164-0-cifar100)."""
    return "" if dataset == DEFAULT else f"-{dataset}"


def key_of(src: Source) -> str:
    return next(k for k, v in DATASETS.items() if v is src)


@dataclass
class CifarData:
    """CIFAR-10 or CIFAR-100 as uint8 images (N, 3, 32, 32), RGB, and int64 labels (N,)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def read_batch(path: Path, src: Source = DATASETS[DEFAULT]) -> tuple[np.ndarray, np.ndarray]:
    """One batch file of the official pickle layout: a dict with `data` (N, 3072) and the labels
    (`labels`; CIFAR-100's `fine_labels`)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {src.name} batch file {path}. {src.how_to_get}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[src.labels], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, KeyError, ...
        raise ValueError(
            f"{path} is not a readable {src.name} batch ({type(e).__name__}: {e}); the file is "
            f"corrupt or truncated. Delete {path.parent} and prepare the data again. {src.how_to_get}"
        ) from None
    if len(images) != len(labels):
        raise ValueError(f"{path} holds {len(images)} images but {len(labels)} labels: the file is corrupt")
    if len(labels) and not 0 <= labels.min() <= labels.max() < src.classes:
        raise ValueError(f"{path} has labels {labels.min()}..{labels.max()}, but {src.name} has {src.classes} "
                         f"classes: it is not a {src.name} batch")
    return images, labels


def load(root: str | Path, dataset: str = DEFAULT) -> CifarData:
    """Read a torchvision-style root that holds the data set's folder (`cifar-10-batches-py/`,
    `cifar-100-python/`) in the official layout, of any size.

    Integrity is checked once, when the tarball is prepared (`prepare`), not here, so small
    generated folders in the same layout load too.
    """
    src = source(dataset)
    folder = Path(root) / src.folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no {src.name} at {folder}: expected {', '.join(f'{folder}/{n}' for n in (*src.train, src.test))} "
            f"in the official pickle layout. {src.how_to_get}"
        )
    train = [read_batch(folder / name, src) for name in src.train]
    test_x, test_y = read_batch(folder / src.test, src)
    return CifarData(
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y
    )


def load_cifar10(root: str | Path) -> CifarData:
    return load(root, "cifar10")


def write(root: str | Path, data: CifarData, dataset: str = DEFAULT) -> Path:
    """Write `data` in the data set's official pickle layout under `root/<its folder>/` (CIFAR-100's
    coarse labels, which no run reads, are the fine ones // 5)."""
    src = source(dataset)
    folder = Path(root) / src.folder
    folder.mkdir(parents=True, exist_ok=True)
    n = len(src.train)
    parts = zip(np.array_split(data.train_x, n), np.array_split(data.train_y, n))
    for name, (x, y) in zip([*src.train, src.test], [*parts, (data.test_x, data.test_y)]):
        batch = {
            b"batch_label": name.encode(),
            src.labels: [int(v) for v in y],
            b"data": np.ascontiguousarray(x.reshape(len(x), 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(x))],
        }
        if src.labels == b"fine_labels":
            batch[b"coarse_labels"] = [int(v) // 5 for v in y]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def write_cifar10(root: str | Path, data: CifarData) -> Path:
    return write(root, data, "cifar10")


def synthetic(n_train: int = 500, n_test: int = 100, seed: int = 0, classes: int = 10) -> CifarData:
    """Random CIFAR-shaped data that a net can learn: each class has its own mean colour and
    stripe pattern under noise. For tests and benchmarks where real CIFAR is absent."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    colours = rng.uniform(60, 200, size=(classes, 3, 1, 1))
    patterns = np.stack([np.sin((ii * (k % 5 + 1) + jj * (k // 5 % 5 + 1)) / 3.0 + k // 25)
                         for k in range(classes)])

    def draw(n):
        y = rng.integers(0, classes, size=n)
        x = colours[y] + 40 * patterns[y][:, None] + rng.normal(0, 40, size=(n, 3, 32, 32))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    return CifarData(*draw(n_train), *draw(n_test))


def fingerprint(data: CifarData) -> str:
    """sha256 (16 hex digits) of the images and labels: the data's identity, whatever its source
    (the official tarball, another one, generated). 0.25-0.35 s for all 60,000 images on our 2-core CPU."""
    digest = hashlib.sha256()
    for array in (data.train_x, data.train_y, data.test_x, data.test_y):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:16]


def md5sum(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download(root: str | Path, url: str | None = None, md5: str | None = None, dataset: str = DEFAULT) -> Path:
    """Fetch the tarball into `root` with a progress bar and check its md5 (torchvision's helper).
    The pipeline downloads through `dvc update data.dvc`; this is for use without DVC."""
    from torchvision.datasets.utils import download_url

    src = source(dataset)
    url, md5 = url or src.url, md5 or src.md5
    path = Path(root) / src.tarball
    try:
        download_url(url, str(root), filename=src.tarball, md5=md5)
    except RuntimeError:  # torchvision's "File not found or corrupted." after an md5 mismatch
        got = md5sum(path) if path.exists() else "nothing"
        path.unlink(missing_ok=True)
        raise ValueError(f"download from {url} has md5 {got}, expected {md5}; deleted it, retry") from None
    except OSError as e:
        raise ConnectionError(f"could not download {url} ({e}). Offline? {src.how_to_get}") from None
    return path


def md5_key(src: Source) -> str:
    """Where params.yaml keeps the md5 a data set's tarball must have: data.md5, data.cifar100.md5
    (replicate.pipeline.data_section)."""
    return "data.md5" if src is DATASETS[DEFAULT] else f"data.{key_of(src)}.md5"


def md5_mismatch(tarball: str | Path, got: str, expected: str, pinned: str | None = None,
                 src: Source = DATASETS[DEFAULT]) -> str:
    """Why a tarball with md5 `got` fails data.md5 (`expected`). A mistyped data.md5 is as likely
    as a bad tarball, and deleting a good one offline loses the only copy: a tarball that is the
    pinned (data.dvc) or the official one is never called corrupt."""
    key = md5_key(src)
    const = "replicate.data.MD5" if src is DATASETS[DEFAULT] else f"replicate.data.DATASETS['{key_of(src)}'].md5"
    official = f"the official {src.name} tarball's is {const}, {src.md5}"
    head = f"{tarball} has md5 {got}, expected {expected} ({key} in params.yaml)."
    if got == pinned:
        also = "" if got == src.md5 else f" ({official})"
        return (f"{head} The tarball is the one {src.pin} pins, so {key} is wrong: set it back to {got} in "
                f"params.yaml{also}; keep the tarball.")
    if got == src.md5:
        return (f"{head} The tarball is the official {src.name} one ({const}), not a corrupt file: keep it. If you "
                f"edited {key}, set it back to {src.md5}; if not, put the tarball with md5 {expected} in its place.")
    pin = f"{pinned}, the md5 {src.pin} pins; " if pinned and pinned != expected else ""
    return (f"{head} Either {key} was edited: put back the right one ({pin}{official}). Or {key} is right and "
            f"the tarball is corrupt, truncated or another file: only then delete it and run `{src.make}` to fetch "
            f"it again.")


def pinned_md5(tarball: str | Path) -> str | None:
    """The md5 that a .dvc file beside data/ (where DVC's stages run: data.dvc, data-cifar100.dvc)
    pins for `tarball`, if one pins it."""
    tarball = Path(tarball)
    for pin in sorted(tarball.parent.parent.glob("*.dvc")):
        try:
            out = yaml.safe_load(pin.read_text())["outs"][0]
            if (pin.parent / out["path"]).resolve() == tarball.resolve():
                return out["md5"]
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
            continue
    return None


def prepare(tarball: str | Path, root: str | Path, md5: str | None = None, pinned: str | None = None,
            dataset: str = DEFAULT) -> Path:
    """Check the tarball's md5, then extract the data set's folder (`cifar-10-batches-py/`,
    `cifar-100-python/`) into `root`.

    A tarball is untrusted input, and tarfile's `filter="data"` exists only from Python 3.11.4
    (Debian 12 has 3.11.2), so nothing is extracted by tarfile itself: every member is checked
    first (`safe_members`), then only the batch files are copied out of it. They go to a temporary
    folder beside the target, renamed into place at the end, so a failure never leaves a
    half-extracted folder behind. `pinned`: the md5 data.dvc pins, named if the md5 differs.
    """
    src = source(dataset)
    md5, tarball, root = md5 or src.md5, Path(tarball), Path(root)
    if not tarball.is_file():
        raise FileNotFoundError(f"no tarball at {tarball}. {src.how_to_get}")
    got = md5sum(tarball)
    if got != md5:
        raise ValueError(md5_mismatch(tarball, got, md5, pinned, src))
    root.mkdir(parents=True, exist_ok=True)
    target = root / src.folder
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        extracted = Path(tmp) / src.folder
        extracted.mkdir()
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                members = {m.name: m for m in safe_members(tar, tarball, src)}
                for name in [*src.train, src.test, src.meta]:
                    member = members.get(f"{src.folder}/{name}")
                    if member is None and name == src.meta:
                        continue  # torchvision's CIFAR10 reads it; our loader does not need it
                    if member is None or not member.isfile():
                        raise ValueError(f"{tarball} has no file {src.folder}/{name}: it is not the {src.name} "
                                         "python tarball")
                    with tar.extractfile(member) as f, open(extracted / name, "wb") as dst:
                        shutil.copyfileobj(f, dst)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{tarball} is not a readable tar.gz ({e}). {src.how_to_get}") from None
        for name in [*src.train, src.test]:
            read_batch(extracted / name, src)  # fail now, not in the middle of training
        if target.exists():
            shutil.rmtree(target)
        extracted.rename(target)
    return target


def safe_members(tar: tarfile.TarFile, tarball: Path, src: Source = DATASETS[DEFAULT]) -> list[tarfile.TarInfo]:
    """Every member, if all are plain files or folders at relative paths without `..`; otherwise a
    ValueError naming the first bad one (links, devices and paths leaving the folder are refused)."""
    members = tar.getmembers()
    for m in members:
        path = PurePosixPath(m.name)
        kind = "file" if m.isfile() else "folder" if m.isdir() else "link" if m.issym() or m.islnk() else "special file"
        if path.is_absolute() or ".." in path.parts or kind not in ("file", "folder"):
            raise ValueError(
                f"{tarball} holds an unsafe member {m.name!r} ({kind}): only plain files and folders at "
                f"relative paths inside the archive are accepted, so nothing was extracted. It is not "
                f"the official {src.name} tarball; delete it. {src.how_to_get}"
            )
    return members


@dataclass
class Split:
    """The arrays one run trains and evaluates on, and the per-pixel mean of its training images."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    val_x: np.ndarray | None
    val_y: np.ndarray | None
    mean: np.ndarray  # (3, 32, 32) float32, in [0, 1] units


def split(data: CifarData, val_size: int = 0, seed: int = 0) -> Split:
    """Hold out `val_size` training images (the paper's 45k/5k split uses 5000), chosen by `seed`."""
    if not 0 <= val_size < len(data.train_x):
        raise ValueError(f"val_size must be in [0, {len(data.train_x)}), got {val_size}")
    order = np.random.default_rng(seed).permutation(len(data.train_x))
    train, val = np.sort(order[val_size:]), np.sort(order[:val_size])
    train_x = data.train_x[train]
    mean = (train_x.astype(np.float64).mean(axis=0) / 255.0).astype(np.float32)
    val_x, val_y = (data.train_x[val], data.train_y[val]) if val_size else (None, None)
    return Split(train_x, data.train_y[train], data.test_x, data.test_y, val_x, val_y, mean)


def normalize(images: np.ndarray | torch.Tensor, mean: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> float32 in [0, 1] minus the per-pixel mean (no std, as in the paper).

    The uint8 array goes to the device first (4x fewer bytes to move) and is converted there.
    """
    x = torch.as_tensor(images, device=device)
    return x.float().div_(255.0).sub_(torch.as_tensor(mean, device=x.device))


def crop_flip(padded: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              flip: torch.Tensor) -> torch.Tensor:
    """Random-crop-and-flip a whole batch with one gather.

    padded: (N, C, 32+2*PAD, 32+2*PAD) images; index, dy, dx, flip: (B,) per-image choices.
    Returns (B, C, 32, 32): image index[b] cropped at rows dy[b].., cols dx[b].., mirrored
    left-right where flip[b]. No per-image Python work and no host-device sync.
    """
    c = padded.shape[1]
    ar = torch.arange(32, device=padded.device)
    rows = dy[:, None] + ar                                        # (B, 32)
    cols = dx[:, None] + torch.where(flip[:, None], 31 - ar, ar)   # (B, 32), reversed if flipped
    return padded[
        index[:, None, None, None],
        torch.arange(c, device=padded.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed per (run seed, epoch), so any batch can be rebuilt from those two numbers."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class CifarLoader:
    """Training batches that live on the device, in the style of airbench's CifarLoader.

    The images stay uint8 on the device (a quarter of float32's memory, 0.24 GB for CIFAR-10 padded)
    and each batch is normalised as it is drawn, with the same per-element ops as normalising the
    whole set first, so the floats are bitwise the same (tests/test_data.py). Its cost: 5.2 against
    2.4 ms a batch of 128 on one core of our CPU (the mean's crop is gathered too): about 2% of a
    ResNet-20 step there and under 1% of a ResNet-56 one (docs/speed.md); on a GPU, unmeasured.

    Each epoch draws one permutation and every image's crop offset and flip with a generator seeded
    from (seed, epoch), so the batch of any iteration is a pure function of (seed, iteration):
    resuming needs no loader state. The last incomplete batch of each epoch is dropped, so every
    iteration sees `batch_size` images.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: np.ndarray, batch_size: int,
                 seed: int = 0, device: str | torch.device = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format):
        if batch_size > len(images):
            raise ValueError(f"batch_size {batch_size} is larger than the {len(images)} training images")
        self.device = torch.device(device)
        # Zero padding after mean subtraction, as fb.resnet.torch does: the border is the mean image.
        # Images and mean are both padded with zeros, so a border pixel normalises to 0/255 - 0 = +0.0.
        self.padded = F.pad(torch.as_tensor(images, device=self.device), (PAD,) * 4)
        self.mean = F.pad(torch.as_tensor(mean, device=self.device), (PAD,) * 4)[None]
        self.labels = torch.as_tensor(labels, device=self.device)
        self.batch_size, self.seed, self.memory_format = batch_size, seed, memory_format
        self.per_epoch = len(images) // batch_size
        self.draws_on = generator_device(self.device)
        self.generator = torch.Generator(device=self.draws_on)
        self._epoch = None

    def __len__(self) -> int:
        return self.per_epoch

    def _draw(self, epoch: int) -> None:
        n, g, on = len(self.labels), self.generator, self.draws_on
        g.manual_seed(epoch_seed(self.seed, epoch))
        self.order = torch.randperm(n, generator=g, device=on).to(self.device)
        self.offsets = torch.randint(0, 2 * PAD + 1, (2, n), generator=g, device=on).to(self.device)
        self.flips = (torch.rand(n, generator=g, device=on) < 0.5).to(self.device)
        self._epoch = epoch

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented batch of a given iteration (0-based)."""
        epoch, k = divmod(iteration, self.per_epoch)
        if epoch != self._epoch:
            self._draw(epoch)
        sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
        index = self.order[sl]
        dy, dx = self.offsets[0, sl], self.offsets[1, sl]
        crop = dy, dx, self.flips[sl]
        x = crop_flip(self.padded, index, *crop).float().div_(255.0)
        x = x.sub_(crop_flip(self.mean, torch.zeros_like(index), *crop))  # each pixel's own mean
        return x.contiguous(memory_format=self.memory_format), self.labels[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch starting from the first (useful on its own, as airbench's loader is)."""
        return (self.batch(i) for i in range(self.per_epoch))


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
                 memory_format: torch.memory_format = torch.contiguous_format, mean: torch.Tensor | None = None):
    """Unaugmented evaluation batches in order: the single 32x32 view the paper tests on. With
    `mean`, `images` are uint8 on the device and each batch is normalised as it is drawn."""
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        if mean is not None:
            x = normalize(x, mean)
        yield x.contiguous(memory_format=memory_format), labels[i:i + batch_size]


def main(argv: list[str] | None = None) -> None:
    """`python -m replicate.data prepare TARBALL ROOT [--md5 MD5] [--dataset cifar100]`, or `download ROOT`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m replicate.data", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="check the tarball's md5 and extract it")
    pp.add_argument("tarball")
    pp.add_argument("root")
    pp.add_argument("--md5", default=None, help="default: the official tarball's")
    pd = sub.add_parser("download", help="download the official tarball (without DVC)")
    pd.add_argument("root")
    pd.add_argument("--url", default=None)
    pd.add_argument("--md5", default=None)
    for q in (pp, pd):
        q.add_argument("--dataset", default=DEFAULT, choices=sorted(DATASETS))
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            made = prepare(args.tarball, args.root, args.md5, pinned_md5(args.tarball), args.dataset)
            print(f"prepared {made}")
        else:
            print(f"downloaded {download(args.root, args.url, args.md5, args.dataset)}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
