"""ImageNet-1k for train.py: DeiT's train and val transforms, and the image folders they read.

What is here, top to bottom:
  RAND_OPS, apply_op             the 15 ops of timm's RandAugment with their magnitude formulas, on PIL images
  RandAugment                    DeiT's RandAugment: timm's rand-m9-mstd0.5-inc1 written out
  imagenet_transform             DeiT's ImageNet train / val transforms up to uint8 tensors (loader workers)
  erasing_box, finish            DeiT's random erasing drawn in the workers, applied with Normalize on the device
  load_imagenet, Folder          ImageNet-1k folders; training samples augmented from (seed, epoch, index, copy)
  DeviceBatches                  a DataLoader of those, its batches finished on the device
  class_balanced_subset          a seeded subset of a folder data set, even across its classes

What the small data sets share with these folders stays in data.py: DataError, the data set's facts
(data.DATASETS['imagenet']: mean, std, size) and repeated augmentation (data.RepeatedAugSampler, which
train.py samples these folders with). torchvision and Pillow are imported inside the functions that use
them, so importing this file needs neither.

Followed (facts, no code borrowed): torchvision's ImageFolder layout; the DeiT train / val transforms
(Touvron et al. 2021: timm's create_transform as DeiT's datasets.py calls it; RandAugment
rand-m9-mstd0.5-inc1 with the op list, magnitude formulas, sampling, fill and interpolation of timm 1.0.31's
auto_augment.py and transforms_factory.py; random erasing 0.25 in 'pixel' mode).
"""
import os

import numpy as np
import torch

from data import DATASETS, DataError, derive_seed, normalize


# ----------------------------------------------------------------------------------------------------
# ImageNet augmentation: DeiT's train and val transforms, on PIL images. RandAugment is timm's
# rand-m9-mstd0.5-inc1 written out; facts (no code) from timm 1.0.31: timm/data/auto_augment.py (the op list
# _RAND_INCREASING_TRANSFORMS, the *_level_to_arg functions named below, AugmentOp, RandAugment,
# rand_augment_transform) and timm/data/transforms_factory.py (transforms_imagenet_train: the fill and
# interpolation it hands to the ops, and the rest of the pipeline).

def _enhance_factor(m, s):
    """PIL ImageEnhance factor, 1 = unchanged (1 +- 0.81 at m = 9); _enhance_increasing_level_to_arg. Its
    floor 0.1 acts only at m = 10, where 1 - 0.9 rounds to just below 0.1."""
    return max(0.1, 1 + s * (m / 10 * 0.9))


# The 15 ops of timm's "increasing" set, in its order: name -> the op's argument as a function of the
# magnitude m in [0, 10] and a random sign s (+1 or -1), or None for the three ops without an argument.
# s is used where timm's level function negates at random (_randomly_negate). Values at m = 9 in brackets.
RAND_OPS = {
    'AutoContrast': None,  # each channel stretched to 0..255
    'Equalize': None,  # histogram equalisation per channel
    'Invert': None,
    'Rotate': lambda m, s: s * (m / 10 * 30),  # degrees (27); _rotate_level_to_arg
    # bits kept, 4 down to 0 (1; 0 at m = 10: a black image); _posterize_increasing_level_to_arg
    'PosterizeIncreasing': lambda m, s: 4 - int(m / 10 * 4),
    # pixels >= this threshold are inverted (26; 256: none); _solarize_increasing_level_to_arg
    'SolarizeIncreasing': lambda m, s: 256 - int(m / 10 * 256),
    # added to pixels < 128, capped at 255 (99); _solarize_add_level_to_arg
    'SolarizeAdd': lambda m, s: int(m / 10 * 110),
    'ColorIncreasing': _enhance_factor,  # blends with the grey image
    'ContrastIncreasing': _enhance_factor,  # with the image's mean grey
    'BrightnessIncreasing': _enhance_factor,  # with black
    'SharpnessIncreasing': _enhance_factor,  # with a smoothed copy
    'ShearX': lambda m, s: s * (m / 10 * 0.3),  # x shifted by shear * y (0.27); _shear_level_to_arg
    'ShearY': lambda m, s: s * (m / 10 * 0.3),
    # fraction of the width / height (0.405); _translate_rel_level_to_arg with its default translate_pct
    # 0.45 (the translate_const = 0.45 * img_size that transforms_imagenet_train sets is for the absolute
    # TranslateX / TranslateY, which this set does not use)
    'TranslateXRel': lambda m, s: s * (m / 10 * 0.45),
    'TranslateYRel': lambda m, s: s * (m / 10 * 0.45),
}
IMAGENET_FILL = (124, 116, 104)  # timm's img_mean: round(255 * IMAGENET_DEFAULT_MEAN), the mean pixel


def apply_op(img, name, arg, fill=IMAGENET_FILL):
    """One op of RAND_OPS on a PIL RGB image, arg its argument (None for the three without one). Geometric
    ops resample bicubic (timm's, given DeiT's interpolation='bicubic'); uncovered pixels get fill."""
    from PIL import Image, ImageEnhance, ImageOps
    op = name.removesuffix('Increasing').removesuffix('Rel')
    if op in ('AutoContrast', 'Equalize', 'Invert'):
        return {'AutoContrast': ImageOps.autocontrast, 'Equalize': ImageOps.equalize,
                'Invert': ImageOps.invert}[op](img)
    if op == 'Posterize':
        # keep the top arg bits. 0 bits (m = 10) is a black image, as older Pillow made it for timm: Pillow 13
        # refuses 0 in ImageOps.posterize, so timm 1.0.31 raises there
        table = [v & (256 - 2 ** (8 - arg)) for v in range(256)]
        return img.point(table * len(img.getbands()))
    if op == 'Solarize':
        return ImageOps.solarize(img, arg)
    if op == 'SolarizeAdd':
        table = [min(255, v + arg) if v < 128 else v for v in range(256)]
        return img.point(table * len(img.getbands()))  # one 256-entry table per channel
    if op in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        return getattr(ImageEnhance, op)(img).enhance(arg)
    geometric = dict(resample=Image.Resampling.BICUBIC, fillcolor=fill)
    if op == 'Rotate':
        return img.rotate(arg, **geometric)  # about the image centre, counter-clockwise
    # PIL's affine (a, b, c, d, e, f) reads output pixel (x, y) from input (a x + b y + c, d x + e y + f),
    # origin at the top-left corner (so shears also shift the image: timm's convention, kept)
    W, H = img.size
    matrix = {'ShearX': (1, arg, 0, 0, 1, 0), 'ShearY': (1, 0, 0, arg, 1, 0),
              'TranslateX': (1, 0, arg * W, 0, 1, 0), 'TranslateY': (1, 0, 0, 0, 1, arg * H)}[op]
    return img.transform(img.size, Image.Transform.AFFINE, matrix, **geometric)


class RandAugment:
    """timm's RandAugment with DeiT's rand-m9-mstd0.5-inc1 on PIL images, random numbers from torch's
    global generator (seeded per DataLoader worker, and per epoch by train.py when there are none)."""

    def __init__(self, num_ops=2, magnitude=9, magnitude_std=0.5, prob=0.5, fill=IMAGENET_FILL):
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.prob, self.fill = prob, fill

    def draw(self):
        """The ops for one image, in order: a list of (name, magnitude, sign), 0 to num_ops long."""
        names, ops = list(RAND_OPS), []
        # num_ops picks, uniform and with replacement (timm: np.random.choice(replace=True) when the
        # set has no weights), each kept with probability prob (timm's AugmentOp)
        for k in torch.randint(len(names), (self.num_ops,)).tolist():
            if torch.rand(()) >= self.prob:
                continue
            # magnitude drawn per op and image from N(magnitude, magnitude_std), clipped to [0, 10]
            m = min(max(self.magnitude + self.magnitude_std * torch.randn(()).item(), 0.0), 10.0)
            ops.append((names[k], m, -1 if torch.rand(()) < 0.5 else 1))
        return ops

    def __call__(self, img):
        for name, m, s in self.draw():
            img = apply_op(img, name, None if RAND_OPS[name] is None else RAND_OPS[name](m, s), self.fill)
        return img

    def __repr__(self):
        return (f'RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, '
                f'magnitude_std={self.magnitude_std}, prob={self.prob}, fill={self.fill})')


def imagenet_transform(train, img_size=224):
    """The part of DeiT's train or val transform that needs the image, in a loader worker: PIL image ->
    (3, img_size, img_size) uint8. The rest of DeiT's transform, ToTensor's / 255, Normalize and random
    erasing, runs on the device on whole batches (`finish`): a batch crosses shared memory and the bus as
    uint8, a quarter of the float32 bytes. The train one is timm's create_transform(img_size,
    is_training=True, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25,
    re_mode='pixel', re_count=1) as DeiT calls it (its datasets.py), step for step; its color_jitter
    argument is ignored by timm when RandAugment is on."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    if not train:  # resize to img_size / 0.875 (256 for 224), bicubic, then the central img_size square
        return transforms.Compose([
            transforms.Resize(int(img_size / 0.875), interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size),
            transforms.PILToTensor(),
        ])
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                     interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(0.5),
        RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5, prob=0.5, fill=IMAGENET_FILL),
        transforms.PILToTensor(),
    ])


# timm's RandomErasing as DeiT sets it ('pixel' mode, count 1): with probability 0.25 one box of 0.02-1/3
# of the area, log-uniform aspect 0.3-1/0.3, 10 tries to fit, per-pixel N(0, 1) noise in the normalised
# space. torchvision's RandomErasing.get_params draws the box as timm does (its default ranges differ).
ERASE_P, ERASE_SCALE, ERASE_RATIO = 0.25, (0.02, 1 / 3), (0.3, 1 / 0.3)


def erasing_box(image):
    """The erasing box of one training image, drawn on the host from torch's global generator: (4,) int16
    (y0, y1, x0, x1), half-open; y0 == y1 when the image is not erased. image: (C, H, W), for its size."""
    from torchvision import transforms
    H, W = image.shape[-2:]
    if torch.rand(1) < ERASE_P:
        # value [0]: only the box is drawn here; the noise is drawn on the device (finish)
        i, j, h, w, _ = transforms.RandomErasing.get_params(image, ERASE_SCALE, ERASE_RATIO, value=[0.0])
        if (h, w) != (H, W):  # the whole image: no box fitted in 10 tries, and torchvision erases nothing
            return torch.tensor([i, i + h, j, j + w], dtype=torch.int16)
    return torch.zeros(4, dtype=torch.int16)


def finish(images, boxes, mean, std, generator=None):
    """The device's part of DeiT's transform, on a batch: uint8 (B, C, H, W) -> float32 (x / 255 - mean) /
    std, as ToTensor and Normalize compute it, then each image's erasing box (B, 4) filled with N(0, 1)
    noise (boxes None: no erasing, as for validation), drawn from generator (a torch.Generator on the
    device, or the global one). mean, std: float32 tensors of C elements on the device (numbers would be
    copied to it every batch). Fill kernels and comparisons only: nothing waits for the host."""
    x = normalize(images, mean, std)
    if boxes is None:
        return x
    H, W = x.shape[-2:]
    y0, y1, x0, x1 = (b.view(-1, 1, 1) for b in boxes.long().unbind(1))  # (B, 1, 1) each
    rows, cols = torch.arange(H, device=x.device).view(1, H, 1), torch.arange(W, device=x.device).view(1, 1, W)
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (B, H, W)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    return torch.where(inside[:, None], noise, x)


# ----------------------------------------------------------------------------------------------------
# ImageNet-1k: ImageFolder datasets with the DeiT transforms, for a torch DataLoader

def _check_imagenet(path):
    """Raise a DataError unless path/train and path/val hold the same class folders, each with images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    def has_images(folder):  # stops at the first image: cheap on 1,300 files a class
        with os.scandir(folder) as entries:
            return any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries)

    expected = (f'expected the ImageFolder layout {path}/train/<class>/*.JPEG and {path}/val/<class>/*.JPEG '
                f'with the same class folders in both')
    if not os.path.isdir(path):
        raise DataError(f'ImageNet not found: {path} does not exist; {expected}')
    classes = {}
    for split in ('train', 'val'):
        root = os.path.join(path, split)
        if not os.path.isdir(root):
            raise DataError(f'ImageNet not found: {root} is missing; {expected}')
        classes[split] = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes[split]:
            # the val images as distributed are 50,000 loose files; ImageFolder needs them sorted by class
            hint = ' (it holds loose images: sort them into one folder per class, as in train/)' \
                if has_images(root) else ''
            raise DataError(f'ImageNet layout wrong: {root} has no class folders{hint}; {expected}')
        for c in classes[split]:
            if not has_images(os.path.join(root, c)):
                raise DataError(f'ImageNet layout wrong: {os.path.join(root, c)} holds no images; {expected}')
    if classes['train'] != classes['val']:
        only = sorted(set(classes['train']) ^ set(classes['val']))
        raise DataError(f'ImageNet layout wrong: {path}/train has {len(classes["train"])} class folders, '
                        f'{path}/val {len(classes["val"])}, differing in {" ".join(only[:5])}'
                        f'{" ..." if len(only) > 5 else ""}; {expected}')


def load_imagenet(path, train, img_size=224, seed=0):
    """The train or val split under path (ImageFolder's layout) as Folder samples through imagenet_transform.
    Class indices follow the sorted folder names; an image that cannot be read raises a DataError naming
    it (read_image)."""
    from torchvision import datasets
    _check_imagenet(path)
    root = os.path.join(path, 'train' if train else 'val')
    folder = datasets.ImageFolder(root, loader=read_image)  # the scan: samples (path, class), classes
    return Folder(folder.samples, folder.classes, imagenet_transform(train, img_size), train, seed)


class Folder(torch.utils.data.Dataset):
    """An image folder's samples, read and transformed in a loader worker: uint8 (3, S, S) images.

    Validation items are (image, class) by index. A training item is keyed (index, epoch, copy), as
    data.RepeatedAugSampler yields them, and is (image, class, erasing box): its augmentation is drawn from
    a seed that is a function of (seed, epoch, index, copy) alone, not of the worker that draws it or of
    how long that worker has lived, so workers persist across epochs and a resumed run, with any number of
    workers, repeats every image. The draws use a forked generator: the caller's is left as it was.
    """

    def __init__(self, samples, classes, transform, train, seed=0):
        self.samples, self.classes, self.transform, self.train, self.seed = samples, classes, transform, train, seed
        self.targets = [c for _, c in samples]

    def subset(self, indices):
        """These samples only, in this order (class_balanced_subset's)."""
        return Folder([self.samples[i] for i in indices], self.classes, self.transform, self.train, self.seed)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        if not self.train:
            path, target = self.samples[key]
            return self.transform(read_image(path)), target
        index, epoch, copy = key
        path, target = self.samples[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index, copy))
            image = self.transform(read_image(path))
            return image, target, erasing_box(image)


class DeviceBatches:
    """A DataLoader over a Folder, its uint8 batches finished on the device (`finish`): batches of (images
    (B, 3, S, S) float32 normalised and erased where drawn, classes (B,)) on `device`. The erasing noise
    comes from a generator of its own, seeded by (seed, epoch, rank) in set_epoch: like the images, a
    function of the epoch, whatever else drew random numbers before."""

    def __init__(self, loader, device, seed=0, rank=0):
        self.loader, self.sampler, self.device, self.seed, self.rank = loader, loader.sampler, device, seed, rank
        mean, std = DATASETS['imagenet']['mean'], DATASETS['imagenet']['std']
        # built once: a tensor made from a list on a GPU every batch would be a blocking copy
        self.mean, self.std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))
        self.noise = torch.Generator(device=device)
        self.set_epoch(0)

    def set_epoch(self, epoch):
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)
        self.noise.manual_seed(derive_seed(self.seed, epoch, self.rank))

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, target, *boxes in self.loader:  # boxes: training batches only
            images, target = images.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            boxes = boxes[0].to(self.device, non_blocking=True) if boxes else None
            yield finish(images, boxes, self.mean, self.std, self.noise), target


def read_image(path):
    """An image file as an RGB PIL image, or a DataError naming the file: an unreadable image stops the run
    with one line, not a PIL traceback (a truncated JPEG's own error does not name the file)."""
    from PIL import Image
    try:
        with open(path, 'rb') as f:
            image = Image.open(f)
            return image.convert('RGB')  # decodes the whole file, here, inside the try
    except Exception as e:  # truncated, empty, not an image, unreadable: all mean "replace this file"
        raise DataError(f'image {path} cannot be read ({type(e).__name__}: {e}); replace or remove it, then '
                        f'continue the run with --resume (its last checkpoint is kept)') from None


def class_balanced_subset(targets, n, seed):
    """min(n, len(targets)) indices into targets (a class index per sample), sorted, as even across the
    classes as their sizes allow: every class gets `level` or level + 1 samples, or all it has if that is
    fewer, the classes with the extra one and the samples within a class drawn at random from seed alone
    (the same subset on every rank). n >= the number of classes puts every class in."""
    targets = np.asarray(targets)
    counts = np.bincount(targets)  # (C,)
    level = 0  # the largest even share that fits in n
    while np.minimum(counts, level + 1).sum() <= n and level < counts.max():
        level += 1
    take = np.minimum(counts, level)
    rng = np.random.default_rng(seed)
    # what is left is fewer than the classes holding more than `level` (else level would be higher): one more
    # to that many of them, at random
    rest = min(n, len(targets)) - take.sum()
    take[rng.choice(np.flatnonzero(counts > level), rest, replace=False)] += 1
    by_class = np.split(np.argsort(targets, kind='stable'), np.cumsum(counts)[:-1])  # C arrays of indices
    chosen = [rng.choice(members, k, replace=False) for members, k in zip(by_class, take)]
    return sorted(np.concatenate(chosen).tolist())
