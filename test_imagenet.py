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
from imagenet import (IMAGENET_FILL, RAND_OPS, RandAugment, apply_op, class_balanced_subset, imagenet_transform,
                      load_imagenet)
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
    when RandAugment is on), with the same parameters."""
    ours, theirs = imagenet_transform(True).transforms, timm_deit_train().transforms
    assert [type(t).__name__ for t in ours] == [
        'RandomResizedCrop', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor', 'Normalize', 'RandomErasing']
    assert [type(t).__name__ for t in theirs] == [
        'RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'MaybeToTensor',
        'Normalize', 'RandomErasing']
    (crop, flip, augment, _, norm, erase), (tcrop, tflip, _, _, tnorm, terase) = ours, theirs
    assert isinstance(augment, RandAugment)  # ours (torchvision's has the same name); its draws tested above
    assert (crop.size, crop.scale, crop.ratio, crop.interpolation) == \
        (tcrop.size, tcrop.scale, tcrop.ratio, tcrop.interpolation)
    assert flip.p == tflip.p == 0.5
    assert np.allclose(norm.mean, tnorm.mean) and np.allclose(norm.std, tnorm.std)
    assert erase.p == terase.probability == 0.25 and erase.value == 'random' and terase.mode == 'pixel'
    assert erase.scale == (terase.min_area, terase.max_area)
    assert np.allclose(np.log(erase.ratio), terase.log_aspect_ratio)
    assert terase.min_count == terase.max_count == 1  # one box, as torchvision erases


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), grid, side='right') / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side='right') / len(b)
    return np.abs(cdf_a - cdf_b).max()


def test_random_erasing_draws_as_timms():
    """Boxes and noise of our erasing (torchvision's with timm's ranges) against timm's 'pixel' mode, always
    applied on a 24x32 image: same distribution of box area and aspect, N(0, 1) noise inside."""
    from timm.data.random_erasing import RandomErasing
    ours = imagenet_transform(True).transforms[-1]
    ours.p = 1.0
    theirs = RandomErasing(1.0, mode='pixel', max_count=1, device='cpu')
    torch.manual_seed(0)
    random.seed(0)

    def boxes(erase, n=3000):  # (area fraction, log(h / w)) of each box; noise values inside
        stats, noise = [], []
        for _ in range(n):
            x = erase(torch.zeros(3, 24, 32))
            box = x[0] != 0  # the noise is never exactly 0
            h, w = box.any(1).sum().item(), box.any(0).sum().item()
            # one rectangle, in all channels (here a box always fits within the 10 tries both make)
            assert h > 0 and box.sum() == h * w and (x != 0).sum() == 3 * h * w
            stats.append((h * w / (24 * 32), math.log(h / w)))
            noise.append(x[:, box].flatten())
        return np.array(stats), torch.cat(noise)

    (a, noise_a), (b, noise_b) = boxes(ours), boxes(theirs)
    for k in range(2):
        assert ks_distance(a[:, k], b[:, k]) < 1.95 * math.sqrt(2 / 3000)  # the two-sample test at 0.1%
    for noise in (noise_a, noise_b):
        assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01


def test_val_transform_is_deits():
    """Resize to 256 (224 / 0.875), bicubic, centre crop 224: DeiT's datasets.py and timm's eval transform."""
    from timm.data import create_transform
    ours = imagenet_transform(False).transforms
    theirs = create_transform(224, is_training=False, interpolation='bicubic', crop_pct=0.875).transforms
    assert [type(t).__name__ for t in ours] == ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']
    assert [type(t).__name__ for t in theirs] == ['Resize', 'CenterCrop', 'MaybeToTensor', 'Normalize']
    assert (ours[0].size, ours[0].interpolation.value, ours[1].size) == \
        (theirs[0].size, theirs[0].interpolation.value, theirs[1].size) == (256, 'bicubic', (224, 224))
    assert np.allclose(ours[3].mean, theirs[3].mean) and np.allclose(ours[3].std, theirs[3].std)


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
    assert val.classes == ['n01', 'n02']
    image, target = val[1]  # the flat-coloured n02 image: resize and crop keep the colour
    mean, std = torch.tensor(DATASETS['imagenet']['mean']), torch.tensor(DATASETS['imagenet']['std'])
    expected = (torch.tensor([200, 40, 90]) / 255 - mean) / std
    assert target == 1 and image.shape == (3, 32, 32)
    assert torch.allclose(image.mean((1, 2)), expected, atol=0.05) and image.std((1, 2)).max() < 0.05
    train = load_imagenet(str(tmp_path), train=True, img_size=32)
    torch.manual_seed(0)  # torchvision's transforms draw from the global generator
    (a, target_a), (b, _) = train[0], train[0]
    assert target_a == 0 and a.shape == (3, 32, 32) and not torch.equal(a, b)  # random crops of a noise image


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
