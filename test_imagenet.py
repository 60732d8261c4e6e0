"""Tests of imagenet.py: DeiT's ImageNet augmentation against timm's own (RandAugment op by op and pixel by
pixel, its sampling, the whole pipeline), the image folders written into tmp_path with every DataError path,
and class-balanced subsets."""
import math
import os
import random

import numpy as np
import pytest
import torch

from data import DATASETS, DataError
from imagenet import (ERASE_P, ERASE_RATIO, ERASE_SCALE, IMAGENET_FILL, RAND_OPS, RandAugment, apply_op,
                      class_balanced_subset, erasing_box, finish, imagenet_transform, load_imagenet)
from test_data import assert_data_error


# ----------------------------------------------------------------------------------------------------
# DeiT's ImageNet augmentation against timm's, built as DeiT builds it

# facebookresearch/deit datasets.py build_transform with main.py's defaults (color jitter: 0.3 or 0.4 by
# version, unused with RandAugment on)
DEIT_TIMM_ARGS = dict(input_size=224, is_training=True, color_jitter=0.3, auto_augment='rand-m9-mstd0.5-inc1',
                      interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1)


def timm_deit_train():
    from timm.data import create_transform
    return create_transform(**DEIT_TIMM_ARGS)


def timm_hparams():
    """The hparams timm's create_transform hands DeiT's RandAugment ops, with the magnitude noise off."""
    return dict(timm_deit_train().transforms[2].ops[0].hparams, magnitude_std=0)


def timm_sign(seed):
    """The sign timm's _randomly_negate picks as its first draw from Python's random after seed(seed)."""
    random.seed(seed)
    return -1 if random.random() > 0.5 else 1


def noise_image(seed=0):
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(30, 220, (48, 64, 3), dtype=np.uint8)  # W 64, H 48
    return Image.fromarray(pixels)


@pytest.mark.parametrize('magnitude', [0, 5, 9, 10])
@pytest.mark.parametrize('name', list(RAND_OPS))
def test_rand_op_equals_timms(name, magnitude):
    """Argument and pixels equal timm's AugmentOp (always applied, fixed magnitude) for both signs."""
    from timm.data.auto_augment import LEVEL_TO_ARG, AugmentOp
    hparams, img = timm_hparams(), noise_image()
    assert {timm_sign(0), timm_sign(1)} == {-1, 1}  # seed 0 negates, seed 1 does not
    for seed in (0, 1):
        sign = timm_sign(seed)
        arg = None if RAND_OPS[name] is None else RAND_OPS[name](magnitude, sign)
        random.seed(seed)
        assert arg == (None if LEVEL_TO_ARG[name] is None else LEVEL_TO_ARG[name](magnitude, hparams)[0])
        out = np.asarray(apply_op(img, name, arg, IMAGENET_FILL))
        if name == 'PosterizeIncreasing' and magnitude == 10:  # 0 bits kept: Pillow 13 refuses, timm raises
            assert arg == 0 and not out.any()
            continue
        random.seed(seed)
        expected = np.asarray(AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(img))
        assert np.array_equal(out, expected)
        assert magnitude == 0 or not np.array_equal(out, np.asarray(img))  # the comparison is not vacuous


def test_rand_op_arguments_at_magnitude_9():
    """The policy's strength at m 9 by hand (torchvision's RandAugment(2, 9) rotates 9 degrees, not 27)."""
    expected = {'Rotate': 27, 'PosterizeIncreasing': 1, 'SolarizeIncreasing': 26, 'SolarizeAdd': 99,
                'ColorIncreasing': 1.81, 'ContrastIncreasing': 1.81, 'BrightnessIncreasing': 1.81,
                'SharpnessIncreasing': 1.81, 'ShearX': 0.27, 'ShearY': 0.27, 'TranslateXRel': 0.405,
                'TranslateYRel': 0.405}
    assert {name: RAND_OPS[name](9, 1) for name in expected} == pytest.approx(expected, abs=1e-9)
    assert (RAND_OPS['Rotate'](9, -1), RAND_OPS['ColorIncreasing'](9, -1)) == pytest.approx((-27, 0.19))
    # the translations are fractions of the image: 0.405 * 64 = 25.92 px of a 64 px wide image
    out = np.asarray(apply_op(noise_image(), 'TranslateXRel', RAND_OPS['TranslateXRel'](9, 1), IMAGENET_FILL))
    assert (out[:, -25:] == IMAGENET_FILL).all() and not (out[:, -27] == IMAGENET_FILL).all()


def within(count, trials, p, z=4.5):
    """count is a plausible Binomial(trials, p) draw: within z standard deviations of its mean."""
    return abs(count - trials * p) <= z * math.sqrt(trials * p * (1 - p))


def test_rand_augment_samples_as_timm():
    """timm's RandAugment for DeiT is configured as ours, and ours draws accordingly over 20,000 images: 2
    uniform picks with replacement, each kept with p 0.5, magnitudes N(9, 0.5) clipped to [0, 10]."""
    from PIL import Image
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS
    theirs, ours = timm_deit_train().transforms[2], imagenet_transform(True).transforms[2]
    assert isinstance(ours, RandAugment)
    assert list(RAND_OPS) == _RAND_INCREASING_TRANSFORMS == [op.name for op in theirs.ops]
    assert theirs.num_layers == ours.num_ops == 2 and theirs.choice_weights is None  # None: with replacement
    for op in theirs.ops:
        assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == \
            (ours.prob, ours.magnitude, ours.magnitude_std, None) == (0.5, 9, 0.5, None)
        assert op.kwargs == dict(fillcolor=ours.fill, resample=Image.Resampling.BICUBIC)

    torch.manual_seed(0)
    n = 20_000
    draws = [ours.draw() for _ in range(n)]
    lengths = np.bincount([len(d) for d in draws], minlength=3)
    assert all(within(lengths[k], n, p) for k, p in enumerate((0.25, 0.5, 0.25)))  # Binomial(2, 0.5) ops kept
    ops = [op for d in draws for op in d]
    names = [name for name, _, _ in ops]
    assert all(within(names.count(name), 2 * n, 0.5 / 15) for name in RAND_OPS)
    pairs = [d for d in draws if len(d) == 2]
    assert within(sum(a[0] == b[0] for a, b in pairs), len(pairs), 1 / 15)  # the same op twice: replacement
    m = np.array([magnitude for _, magnitude, _ in ops])
    assert m.min() >= 0 and m.max() == 10
    for x in (8, 8.5, 9, 9.5, 9.99):  # the CDF of N(9, 0.5)
        assert within((m <= x).sum(), len(m), 0.5 * (1 + math.erf((x - 9) / 0.5 / math.sqrt(2))))
    assert within((m == 10).sum(), len(m), 0.5 * (1 - math.erf(2 / math.sqrt(2))))  # clipped: 2.3%
    assert within(sum(s == -1 for _, _, s in ops), len(ops), 0.5)

    img = noise_image()
    for seed in range(20):  # a call applies its draws in order, each with RAND_OPS' argument
        torch.manual_seed(seed)
        expected = img
        for name, magnitude, sign in ours.draw():
            arg = None if RAND_OPS[name] is None else RAND_OPS[name](magnitude, sign)
            expected = apply_op(expected, name, arg, IMAGENET_FILL)
        torch.manual_seed(seed)
        assert np.array_equal(np.asarray(ours(img)), np.asarray(expected))


def test_train_transform_is_timms_for_deit():
    """Step by step the transform timm's create_transform builds for DeiT (no colour jitter: timm drops it
    when RandAugment is on), with the same parameters: ours up to uint8 in the workers, the rest on the device."""
    ours, theirs = imagenet_transform(True).transforms, timm_deit_train().transforms
    assert [type(t).__name__ for t in ours] == [
        'RandomResizedCrop', 'RandomHorizontalFlip', 'RandAugment', 'PILToTensor']
    assert [type(t).__name__ for t in theirs] == [
        'RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'MaybeToTensor',
        'Normalize', 'RandomErasing']
    (crop, flip, augment, _), (tcrop, tflip, _, _, tnorm, terase) = ours, theirs
    assert isinstance(augment, RandAugment)  # ours (torchvision's has the same name); its draws tested above
    assert (crop.size, crop.scale, crop.ratio, crop.interpolation) == \
        (tcrop.size, tcrop.scale, tcrop.ratio, tcrop.interpolation)
    assert flip.p == tflip.p == 0.5
    mean, std = DATASETS['imagenet']['mean'], DATASETS['imagenet']['std']  # finish's Normalize
    assert np.allclose(mean, tnorm.mean) and np.allclose(std, tnorm.std)
    assert ERASE_P == terase.probability == 0.25 and terase.mode == 'pixel'
    assert ERASE_SCALE == (terase.min_area, terase.max_area)
    assert np.allclose(np.log(ERASE_RATIO), terase.log_aspect_ratio)
    assert terase.min_count == terase.max_count == 1  # one box, as torchvision draws it


def test_uint8_batches_finished_on_the_device_are_toTensor_and_normalize_exactly():
    """The workers' uint8 image, finished on the device, equals the float pipeline (ToTensor, Normalize) it
    replaces bit for bit, from the same draws; a batch in shared memory is a quarter of the bytes."""
    from torchvision import transforms
    mean, std = DATASETS['imagenet']['mean'], DATASETS['imagenet']['std']
    ours = imagenet_transform(True, img_size=32)
    old = transforms.Compose([*ours.transforms[:-1], transforms.ToTensor(), transforms.Normalize(mean, std)])
    img = noise_image()
    stats = [torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std)]
    for seed in range(10):
        torch.manual_seed(seed)
        u8 = ours(img)
        torch.manual_seed(seed)
        expected = old(img)
        assert u8.dtype == torch.uint8 and torch.equal(finish(u8[None], None, *stats)[0], expected)
        assert u8.element_size() * 4 == expected.element_size()


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), grid, side='right') / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side='right') / len(b)
    return np.abs(cdf_a - cdf_b).max()


def box_stats(draw, n=3000, size=(24, 32)):
    """(erased share, area fraction, log(h / w)) of n boxes from draw(image) -> (4,) y0 y1 x0 x1."""
    H, W = size
    boxes = torch.stack([draw(torch.zeros(3, H, W)) for _ in range(n)]).long()
    h, w = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    erased = h > 0
    h, w = h[erased].numpy(), w[erased].numpy()
    return erased.float().mean().item(), h * w / (H * W), np.log(h / w)


def test_random_erasing_draws_as_timms():
    """Our erasing (the box drawn in the worker as torchvision does, the noise on the device) against timm's
    RandomErasing in DeiT's 'pixel' mode on a 24x32 image: the same erasing rate, box area and aspect
    distributions, N(0, 1) noise inside the box and nothing changed outside."""
    from timm.data.random_erasing import RandomErasing
    theirs = RandomErasing(ERASE_P, mode='pixel', max_count=1, device='cpu')

    def timm_box(image):  # the box timm erased, read off a zero image (its noise is never exactly 0)
        box = theirs(image.clone())[0] != 0
        if not box.any():
            return torch.zeros(4, dtype=torch.int16)
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        assert box.sum() == len(rows) * len(cols)  # one rectangle
        return torch.tensor([rows[0], rows[-1] + 1, cols[0], cols[-1] + 1], dtype=torch.int16)

    torch.manual_seed(0)
    random.seed(0)
    (rate_a, *a), (rate_b, *b) = box_stats(erasing_box), box_stats(timm_box)
    assert within(rate_a * 3000, 3000, 0.25) and within(rate_b * 3000, 3000, 0.25)
    for k in range(2):  # the two-sample test at 0.1%, on the boxes drawn
        assert ks_distance(a[k], b[k]) < 1.95 * math.sqrt(1 / len(a[k]) + 1 / len(b[k]))
    # on the device: N(0, 1) inside each box, the normalised image untouched outside
    images = torch.randint(0, 256, (64, 3, 24, 32), dtype=torch.uint8)
    boxes = torch.stack([erasing_box(img) for img in images])
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    x, plain = finish(images, boxes, zero, one), finish(images, None, zero, one)
    inside = torch.zeros(64, 24, 32, dtype=torch.bool)
    for k, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        inside[k, y0:y1, x0:x1] = True
    assert torch.equal(x.permute(1, 0, 2, 3)[:, ~inside], plain.permute(1, 0, 2, 3)[:, ~inside])
    noise = x.permute(1, 0, 2, 3)[:, inside].flatten()
    assert inside.any() and abs(noise.mean()) < 5 / math.sqrt(len(noise)) and abs(noise.std() - 1) < 0.05


def test_val_transform_is_deits():
    """Resize to 256 (224 / 0.875), bicubic, centre crop 224: DeiT's datasets.py and timm's eval transform."""
    from timm.data import create_transform
    ours = imagenet_transform(False).transforms
    theirs = create_transform(224, is_training=False, interpolation='bicubic', crop_pct=0.875).transforms
    assert [type(t).__name__ for t in ours] == ['Resize', 'CenterCrop', 'PILToTensor']
    assert [type(t).__name__ for t in theirs] == ['Resize', 'CenterCrop', 'MaybeToTensor', 'Normalize']
    assert (ours[0].size, ours[0].interpolation.value, ours[1].size) == \
        (theirs[0].size, theirs[0].interpolation.value, theirs[1].size) == (256, 'bicubic', (224, 224))


# ----------------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)

def write_jpeg(file, pixels):
    from PIL import Image
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(file, 'JPEG', quality=95)


def write_tiny_imagenet(root):
    rng = np.random.default_rng(0)
    for split, n in (('train', 2), ('val', 1)):
        for i in range(n):
            write_jpeg(root / split / 'n01' / f'a{i}.JPEG', rng.integers(0, 256, (40, 48, 3)))
            write_jpeg(root / split / 'n02' / f'b{i}.JPEG', np.full((40, 48, 3), (200, 40, 90)))


def test_imagenet_transforms_and_classes(tmp_path):
    write_tiny_imagenet(tmp_path)
    val = load_imagenet(str(tmp_path), train=False, img_size=32)
    assert val.classes == ['n01', 'n02'] and val.targets == [0, 1]
    image, target = val[1]  # the flat-coloured n02 image: resize and crop keep the colour
    assert target == 1 and image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert (image.float().mean((1, 2)) - torch.tensor([200., 40., 90.])).abs().max() < 3
    train = load_imagenet(str(tmp_path), train=True, img_size=32, seed=0)
    state = torch.get_rng_state()
    (a, target_a, box_a), (b, _, box_b) = train[(0, 3, 0)], train[(0, 3, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was
    assert target_a == 0 and a.shape == (3, 32, 32) and torch.equal(a, b) and torch.equal(box_a, box_b)
    others = [train[key][0] for key in ((0, 3, 1), (0, 4, 0))]  # another copy, another epoch: other crops
    assert not any(torch.equal(a, other) for other in others)
    assert not torch.equal(a, load_imagenet(str(tmp_path), True, 32, seed=1)[(0, 3, 0)][0])  # another seed


def test_persistent_workers_resume_exactly(tmp_path):
    """Workers live across epochs, and an image's augmentation is a function of (seed, epoch, index, copy):
    a fresh loader set to epoch 1, with another number of workers, gives what the first gave in epoch 1."""
    import train
    write_tiny_imagenet(tmp_path)
    argv = ['--data', 'imagenet', '--data-path', str(tmp_path), '--img-size', '32', '--batch-size', '2',
            '--repeats', '2']

    def epochs(workers, wanted):
        args = train.get_args(argv + ['--workers', str(workers)])
        loader = train.build_data(args, 0, torch.device('cpu'))[0]
        out = []
        for epoch in wanted:
            loader.set_epoch(epoch)
            torch.manual_seed(epoch)  # as train.py seeds every epoch, for lam and the boxes
            out.append([b for batch in loader for b in batch] + [torch.rand(3)])  # the global stream after
        return out

    first = epochs(2, [0, 1])
    assert len(first[1]) == 5 and not all(torch.equal(a, b) for a, b in zip(*first))
    resumed = epochs(0, [1])[0]
    assert all(torch.equal(a, b) for a, b in zip(first[1], resumed))


def test_imagenet_layout_errors(tmp_path):
    assert_data_error(lambda: load_imagenet(str(tmp_path / 'nope'), True), tmp_path / 'nope')
    write_tiny_imagenet(tmp_path)
    os.rename(tmp_path / 'val', tmp_path / 'v')
    assert_data_error(lambda: load_imagenet(str(tmp_path), True), tmp_path / 'val')
    os.rename(tmp_path / 'v', tmp_path / 'val')
    os.rename(tmp_path / 'train', tmp_path / 't')
    assert_data_error(lambda: load_imagenet(str(tmp_path), False), tmp_path / 'train')
    os.rename(tmp_path / 't', tmp_path / 'train')
    (tmp_path / 'val' / 'n03').mkdir()  # an empty class folder
    assert_data_error(lambda: load_imagenet(str(tmp_path), False), tmp_path / 'val' / 'n03')
    write_jpeg(tmp_path / 'val' / 'n03' / 'c.JPEG', np.zeros((8, 8, 3)))  # val has a class train lacks
    with pytest.raises(DataError, match='differing in n03'):
        load_imagenet(str(tmp_path), False)
    for folder in ('n01', 'n02', 'n03'):  # val as distributed: loose images, no class folders
        for file in (tmp_path / 'val' / folder).iterdir():
            os.rename(file, tmp_path / 'val' / f'{folder}_{file.name}')
        (tmp_path / 'val' / folder).rmdir()
    with pytest.raises(DataError, match='loose images'):
        load_imagenet(str(tmp_path), True)
    assert_data_error(lambda: load_imagenet(str(tmp_path), True), tmp_path / 'val')


# ----------------------------------------------------------------------------------------------------
# Class-balanced subsets of image folders

def test_class_balanced_subset_is_even_seeded_and_takes_all_of_a_small_class():
    targets = np.repeat(np.arange(5), 20)  # 5 classes of 20
    for n in (5, 13, 50, 99):
        subset = class_balanced_subset(targets, n, seed=0)
        counts = np.bincount(targets[subset], minlength=5)
        assert len(set(subset)) == len(subset) == n and counts.max() - counts.min() <= 1 and counts.min() >= 1
    assert class_balanced_subset(targets, 13, seed=0) == class_balanced_subset(targets, 13, seed=0)
    assert class_balanced_subset(targets, 13, seed=0) != class_balanced_subset(targets, 13, seed=1)
    assert class_balanced_subset(targets, 500, seed=0) == list(range(100))  # more than there is: everything
    assert sorted(np.bincount(targets[class_balanced_subset(targets, 3, seed=0)], minlength=5)) == [0, 0, 1, 1, 1]
    # class 0 has 2 images, fewer than its share of 13: it gives both, the others share the rest evenly
    targets = np.array([1] * 10 + [0] * 2 + [2] * 10 + [3] * 10)
    counts = np.bincount(targets[class_balanced_subset(targets, 13, seed=0)])
    assert counts[0] == 2 and sorted(counts[1:]) == [3, 4, 4]
