"""The fast engine follows the paper's protocol exactly as a straightforward implementation does
(issue #5): the same augmentation distribution, the same lr schedule, the same loss and update.

Every "reference" here is the obvious way to write it: per-image slicing and torch.flip,
torchvision's RandomCrop(32, padding=4) and RandomHorizontalFlip, torch's MultiStepLR, and a
hand-written SGD update. The negative controls show that each check fails on a wrong engine.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from replicate import data as cifar
from replicate import train
from replicate.bench import PILCifar
from replicate.models import build

N, BATCH = 1800, 100  # 18 batches per epoch; two epochs give 3600 augmented samples


# --- augmentation ----------------------------------------------------------------------------------

def coordinate_images(n: int) -> np.ndarray:
    """uint8 (n, 3, 32, 32) images that say where each pixel came from: channel 0 holds row + 1,
    channel 1 column + 1 (so padding, 0, is told apart), channel 2 the image number mod 251."""
    rows, cols = np.meshgrid(np.arange(1, 33), np.arange(1, 33), indexing="ij")
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0], images[:, 1] = rows, cols
    images[:, 2] = (np.arange(n) % 251)[:, None, None]
    return images


def decode(crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, 3, 32, 32) crops of coordinate images, values in [0, 1] units -> each crop's offsets
    (dy, dx) in the 40x40 padded image, 0..8, and whether it was mirrored.

    The centre pixel (16, 16) is always inside the original image. It comes from padded row
    dy + 16 (original row dy + 12), and from padded column dx + 16 unmirrored or dx + 15 mirrored.
    """
    v = torch.round(crops.double() * 255).long().numpy() - 1   # original row / column, 0-based
    flip = v[:, 1, 16, 17] < v[:, 1, 16, 16]                    # columns run backwards
    dy = v[:, 0, 16, 16] - 12
    dx = v[:, 1, 16, 16] - np.where(flip, 11, 12)
    return dy, dx, flip


def engine_samples(epochs: int = 2):
    """Augmented batches from the engine's CifarLoader (zero mean: values stay decodable)."""
    images = coordinate_images(N)
    loader = cifar.CifarLoader(images, np.arange(N), np.zeros((3, 32, 32), np.float32), BATCH, seed=1)
    batches = [loader.batch(i) for i in range(epochs * len(loader))]
    x = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches]).numpy()
    return x, labels


def torchvision_samples(kind: str, epochs: int = 2) -> torch.Tensor:
    """The same images through torchvision's transforms, one image at a time: on float tensors
    (padding with 0, as the engine does in the normalised space), or the PIL path of the
    reference-style trainer in replicate.bench (padding with black pixels)."""
    torch.manual_seed(1)
    images = coordinate_images(N)
    crop_flip = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if kind == "tensor":
        transform = T.Compose(crop_flip)
        x = torch.from_numpy(images).float() / 255
        out = [transform(x[i]) for _ in range(epochs) for i in range(N)]
    else:
        dataset = PILCifar(images, np.arange(N), T.Compose([*crop_flip, T.ToTensor()]))
        out = [dataset[i][0] for _ in range(epochs) for i in range(N)]
    return torch.stack(out)


def check_augmentation_statistics(dy: np.ndarray, dx: np.ndarray, flip: np.ndarray) -> None:
    """Offsets cover exactly 0..8 and are uniform (chi-square, 8 degrees of freedom, p = 0.001);
    the flip rate is 0.5 within 4 standard deviations; offsets and flips are independent."""
    n = len(dy)
    for name, offsets in (("dy", dy), ("dx", dx)):
        assert set(np.unique(offsets)) == set(range(9)), f"{name} takes values {np.unique(offsets)}, not 0..8"
        counts = np.bincount(offsets, minlength=9)
        chi2 = ((counts - n / 9) ** 2 / (n / 9)).sum()
        assert chi2 < 26.12, f"{name} histogram {counts} is not uniform (chi2 = {chi2:.1f})"
    assert abs(flip.mean() - 0.5) < 4 * (0.25 / n) ** 0.5, f"flip rate {flip.mean():.3f}"
    for offsets in (dy, dx):
        assert abs(offsets[flip].mean() - offsets[~flip].mean()) < 0.25


@pytest.mark.parametrize("path", ["engine", "torchvision-tensor", "torchvision-PIL"])
def test_augmentation_statistics(path):
    if path == "engine":
        x, _ = engine_samples()
    else:
        x = torchvision_samples(path.split("-")[1])
    dy, dx, flip = decode(x)
    check_augmentation_statistics(dy, dx, flip)


def test_engine_and_torchvision_offsets_have_the_same_distribution():
    """Two-sample chi-square on the 81 (dy, dx) cells plus the flip: the engine vs torchvision."""
    cells = []
    for x in (engine_samples()[0], torchvision_samples("tensor")):
        dy, dx, flip = decode(x)
        cells.append(np.bincount(dy * 9 + dx + 81 * flip, minlength=162))
    a, b = cells
    chi2 = (((a - b) ** 2) / np.maximum(a + b, 1)).sum()
    assert chi2 < 215.0, f"chi2 = {chi2:.1f} on 161 degrees of freedom (p = 0.003 bound 215)"


@pytest.mark.parametrize("wrong", ["offsets 0..7", "centre-biased offsets", "flip rate 0.6"])
def test_augmentation_check_catches_a_wrong_engine(wrong):
    """Negative control: the checks above reject augmentations that differ from the paper's."""
    rng = np.random.default_rng(0)
    n = 2 * N
    dy, dx, flip = rng.integers(0, 9, n), rng.integers(0, 9, n), rng.random(n) < 0.5
    if wrong == "offsets 0..7":
        dy = rng.integers(0, 8, n)
    elif wrong == "centre-biased offsets":
        dx = rng.binomial(8, 0.5, n)
    else:
        flip = rng.random(n) < 0.6
    check_augmentation_statistics(rng.integers(0, 9, n), rng.integers(0, 9, n), rng.random(n) < 0.5)  # sane
    with pytest.raises(AssertionError):
        check_augmentation_statistics(dy, dx, flip)


def test_each_epoch_visits_every_image_once_with_its_own_label():
    x, labels = engine_samples()
    for epoch in np.split(labels, 2):
        assert sorted(epoch) == list(range(N))
    seen = torch.round(x[:, 2, 16, 16].double() * 255).long().numpy()
    assert (seen == labels % 251).all(), "a crop came back with another image's label"


def straightforward_crop(padded_image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    crop = padded_image[:, dy:dy + 32, dx:dx + 32]
    return torch.flip(crop, dims=[-1]) if flip else crop


def test_crop_flip_is_the_same_crop_as_per_image_code():
    """For the same (image, dy, dx, flip) choices, one gather == slicing and flipping image by
    image == torchvision's pad, crop and hflip, exactly."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 32, 32, generator=g)
    padded = F.pad(images, (4, 4, 4, 4))
    index = torch.randint(0, 20, (64,), generator=g)
    dy, dx = torch.randint(0, 9, (2, 64), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    fast = cifar.crop_flip(padded, index, dy, dx, flip)
    for b in range(64):
        i, y0, x0, f = int(index[b]), int(dy[b]), int(dx[b]), bool(flip[b])
        assert torch.equal(fast[b], straightforward_crop(padded[i], y0, x0, f))
        tv = TF.crop(TF.pad(images[i], [4]), y0, x0, 32, 32)
        assert torch.equal(fast[b], TF.hflip(tv) if f else tv)


def test_loader_batches_are_normalised_then_zero_padded(small_dataset):
    """Each CifarLoader batch equals the straightforward recipe applied image by image with the
    loader's own draws: subtract the per-pixel mean, pad with zeros, crop, maybe flip. The mean
    is far from zero, so padding before normalising (the border would be -mean) would fail."""
    ds = cifar.split(small_dataset, 0, seed=0)
    loader = cifar.CifarLoader(ds.train_x, ds.train_y, ds.mean, 50, seed=3)
    assert np.abs(ds.mean).min() > 0.1
    normalised = torch.from_numpy(ds.train_x).float() / 255 - torch.from_numpy(ds.mean)
    padded = F.pad(normalised, (4, 4, 4, 4))
    border = 0
    for it in (0, 1, len(loader) + 2):  # two batches of the first epoch, one of the second
        x, y = loader.batch(it)
        k = it % len(loader)
        sl = slice(k * 50, (k + 1) * 50)
        index, dy, dx, flip = loader.order[sl], loader.offsets[0, sl], loader.offsets[1, sl], loader.flips[sl]
        for b in range(50):
            i = int(index[b])
            assert torch.equal(x[b], straightforward_crop(padded[i], int(dy[b]), int(dx[b]), bool(flip[b])))
            assert y[b] == ds.train_y[i]
            inside = torch.zeros(40, 40, dtype=torch.bool)
            inside[4:36, 4:36] = True
            pad = ~straightforward_crop(inside[None], int(dy[b]), int(dx[b]), bool(flip[b]))[0]
            assert (x[b][:, pad] == 0).all()
            border += int(pad.sum())
    assert border > 0


# --- the learning-rate schedule --------------------------------------------------------------------

def lr_sequence(scheduler, optimizer, iterations: int, end_warmup_at: int | None = None, schedule=None) -> np.ndarray:
    """The lr each iteration trains with, stepping the scheduler once per iteration as train()
    does; the warm-up ends (schedule.warming = False) after iteration `end_warmup_at`."""
    lrs = np.empty(iterations)
    for it in range(iterations):
        lrs[it] = optimizer.param_groups[0]["lr"]
        if end_warmup_at is not None and it + 1 == end_warmup_at:
            schedule.warming = False
        optimizer.step()  # no gradients: changes nothing, but keeps the order torch expects
        scheduler.step()
    return lrs


def sgd(lr: float = 0.1) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def test_paper_schedule_equals_multisteplr_at_every_iteration():
    cfg = train.Config()
    opt_a, opt_b = sgd(cfg.lr), sgd(cfg.lr)
    ours = lr_sequence(torch.optim.lr_scheduler.LambdaLR(opt_a, train.PaperSchedule(cfg.milestones, 0.1, False)),
                       opt_a, cfg.iterations)
    theirs = lr_sequence(torch.optim.lr_scheduler.MultiStepLR(opt_b, cfg.milestones, gamma=0.1), opt_b, cfg.iterations)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    it = np.arange(cfg.iterations)
    np.testing.assert_allclose(ours, np.select([it < 32_000, it < 48_000], [0.1, 0.01], 0.001), rtol=1e-12)


def test_warmup_uses_warmup_lr_then_returns_to_the_paper_schedule():
    """ResNet-110: lr 0.01 until the warm-up ends (here after 400 iterations), then 0.1, with the
    milestones still counted from iteration 0."""
    cfg = train.Config(depth=110)
    assert cfg.warmup
    schedule = train.PaperSchedule(cfg.milestones, cfg.warmup_lr / cfg.lr, warming=True)
    opt = sgd(cfg.lr)
    ours = lr_sequence(torch.optim.lr_scheduler.LambdaLR(opt, schedule), opt, cfg.iterations, 400, schedule)
    it = np.arange(cfg.iterations)
    expected = np.select([it < 400, it < 32_000, it < 48_000], [0.01, 0.1, 0.01], 0.001)
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_train_steps_with_the_multisteplr_sequence(small_dataset):
    """The engine loop itself: the lr that train() records for each iteration is MultiStepLR's."""
    cfg = train.Config(arch="resnet", depth=8, iterations=7, milestones=[2, 5], batch_size=32, log_every=1,
                       eval_every=100, checkpoint_every=100, device="cpu")
    result = train.train(cfg, dataset=small_dataset, progress=False)
    opt = sgd(cfg.lr)
    expected = lr_sequence(torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, gamma=0.1), opt, 7)
    np.testing.assert_allclose(result.history["lr"].to_numpy(), expected, rtol=1e-12)


# --- the same loss and the same update ---------------------------------------------------------------

def batch_and_twins(small_dataset, depth: int = 8, plain_format=torch.contiguous_format):
    """A training batch from the engine's loader, and two nets with identical weights: the
    engine's (channels_last) and a plain one (default memory format unless told otherwise)."""
    ds = cifar.split(small_dataset, 0, seed=0)
    loader = cifar.CifarLoader(ds.train_x, ds.train_y, ds.mean, 128, seed=0, memory_format=torch.channels_last)
    torch.manual_seed(0)
    plain = build("resnet", depth)
    engine = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    return loader, engine, plain.to(memory_format=plain_format)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_channels_last_gives_the_same_loss_and_gradients(small_dataset):
    """channels_last vs the default memory format, both against a float64 copy of the net.

    Measured here (torch 2.15, CPU): the losses agree to 1e-6 relative, but the gradients differ by
    up to 0.3% (norm-relative) because CPU BatchNorm in channels_last accumulates its batch
    statistics less precisely (max error 1e-4 against float64 vs 6e-7 for the default format).
    That is numerical noise far below bf16's, not a change of protocol; the bounds below allow
    it and still catch a wrong net, input layout or loss.
    """
    loader, engine, plain = batch_and_twins(small_dataset)
    exact = copy.deepcopy(plain).double()
    x, y = loader.batch(0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    losses = []
    for model, inputs in ((engine, x), (plain, x.contiguous()), (exact, x.contiguous().double())):
        loss = F.cross_entropy(model(inputs), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[2], rel=1e-5)
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)
    for (name, a), b, c in zip(engine.named_parameters(), plain.parameters(), exact.parameters()):
        assert relative_error(a.grad, c.grad) < 1e-2, f"channels_last gradient of {name}"
        assert relative_error(b.grad, c.grad) < 1e-4, f"default-format gradient of {name}"
        assert relative_error(a.grad, b.grad) < 1e-2, f"gradient of {name}"


def plain_sgd_step(model, x, y, velocity: dict, lr=0.1, momentum=0.9, weight_decay=1e-4, decay_bn=True) -> float:
    """The textbook step: loss, gradients, v = momentum * v + (g + weight_decay * w), w -= lr * v.
    Weight decay on every parameter, BN's included, as fb.resnet.torch and the engine do."""
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for (name, p), g in zip(model.named_parameters(), grads):
            decays = decay_bn or p.ndim > 1
            d = g.add(p, alpha=weight_decay) if decays else g
            velocity[name] = d.clone() if name not in velocity else velocity[name].mul_(momentum).add_(d)
            p.add_(velocity[name], alpha=-lr)
    return loss.item()


def engine_and_plain_steps(small_dataset, plain_format, steps: int = 3, decay_bn: bool = True):
    """`steps` engine steps (train.train_step, train.make_optimizer) and as many textbook steps
    on a twin net, on the same batches. Returns both nets, the initial state and the losses."""
    loader, engine, plain = batch_and_twins(small_dataset, plain_format=plain_format)
    cfg = train.Config(depth=8, device="cpu")
    optimizer = train.make_optimizer(engine, cfg, torch.device("cpu"))
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    no_autocast = lambda: torch.autocast("cuda", enabled=False)  # noqa: E731  (the engine on CPU)
    losses = []
    velocity: dict = {}
    for it in range(steps):
        x, y = loader.batch(it)
        loss, wrong = train.train_step(engine, optimizer, x, y, no_autocast)
        losses.append((loss.item(), plain_sgd_step(plain, x.contiguous(memory_format=plain_format), y, velocity,
                                                    cfg.lr, cfg.momentum, cfg.weight_decay, decay_bn)))
    return engine, plain, start, losses


def update_errors(engine, plain, start) -> dict[str, float]:
    """Norm-relative difference of the change of every weight and BN statistic."""
    errors = {}
    for (name, a), b in zip(engine.state_dict().items(), plain.state_dict().values()):
        if a.is_floating_point():
            errors[name] = relative_error(a - start[name], b - start[name])
        else:
            assert torch.equal(a, b), name  # num_batches_tracked
    return errors


def test_engine_step_is_the_textbook_sgd_step(small_dataset):
    """On the same net (both channels_last, so the same kernels), three engine steps and three
    textbook steps give the same losses and the same change of every weight and BN statistic:
    the paper's momentum and weight decay (on all parameters), nothing more. Measured: equal to
    the last bit; the bound leaves room for another SIMD width only."""
    engine, plain, start, losses = engine_and_plain_steps(small_dataset, torch.channels_last)
    for ours, theirs in losses:
        assert ours == pytest.approx(theirs, rel=1e-6)
    worst = max(update_errors(engine, plain, start).items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-6, f"update of {worst[0]} differs by {worst[1]:.1e}"


def test_engine_step_matches_a_plain_fp32_step(small_dataset):
    """The whole fast path (channels_last, foreach SGD) against a plain net in the default memory
    format: the same losses to float tolerance and nearly the same updates (the BN precision
    noise above, measured at most 0.5% here, compounds over the steps)."""
    engine, plain, start, losses = engine_and_plain_steps(small_dataset, torch.contiguous_format)
    (first, first_plain), *later = losses
    assert first == pytest.approx(first_plain, rel=1e-5)  # same weights, same batch
    for ours, theirs in later:  # after updates that carry the BN noise: measured 1.6e-5 on 2 threads
        assert ours == pytest.approx(theirs, rel=1e-4)
    worst = max(update_errors(engine, plain, start).items(), key=lambda kv: kv[1])
    assert worst[1] < 2e-2, f"update of {worst[0]} differs by {worst[1]:.1e}"


def test_update_check_catches_a_missing_weight_decay(small_dataset):
    """Negative control: a textbook step without weight decay on BN parameters (a common variant)
    changes the BN updates by far more than the check above allows."""
    engine, plain, start, _ = engine_and_plain_steps(small_dataset, torch.channels_last, decay_bn=False)
    errors = update_errors(engine, plain, start)
    assert errors["bn1.weight"] > 1e-3 and max(errors.values()) > 1e-2  # measured 3e-2
