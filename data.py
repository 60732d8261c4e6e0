"""Datasets and augmentation for the TL-Align experiments: the small data sets, and what ImageNet shares.

What is here, top to bottom:
  DataError, DATASETS            the error every fixable data problem raises; per-dataset facts
  make_synthetic                 the project's default data set: ten shapes on clutter, with object masks
  read_idx, small_garments       MNIST / Fashion-MNIST (IDX files); fashion_mnist_small: its garments pasted
                                 small on clutter, the regime where CutMix's lam is far from the truth
  load_small                     those, CIFAR-10/100 (python pickles) and synthetic, all as uint8 tensors of
                                 32x32 images held in memory (TensorData)
  CifarUnpickler                 reads CIFAR's pickles without running code from them
  random_crop_flip, normalize    the small-image train augmentation, on whole batches of tensors
  epoch_order                    one epoch's sample indices of every rank, optionally each repeated
  RepeatedAugSampler             repeated augmentation for a torch DataLoader (DeiT's RASampler, sized anew)
  Loader                         shuffled, sharded, augmented batches (and their masks); set_epoch like
                                 DistributedSampler

The ImageNet pipeline (DeiT's transforms, the image folders) is imagenet.py. It takes DataError and
ImageNet's facts (DATASETS) from here, and train.py samples its folders with RepeatedAugSampler; nothing
here imports it: this file needs torch and numpy only.

Foreground masks (synthetic and fashion_mnist_small: exact; MNIST-like: thresholded ink) let the training
code measure how much of each object a CutMix box removed (paper Sec. 3, "token fluctuation") and train on
the oracle target; CIFAR and ImageNet have none.

Formats followed (facts, no code borrowed): the IDX format of LeCun et al.'s MNIST page (big-endian
int32 magic 2051 for images / 2049 for labels, then one int32 per dimension, then uint8 data; the
Fashion-MNIST files of Xiao et al. use the same format and names); the "python version" of CIFAR-10/100
on Krizhevsky's page (Python 2 pickles of dicts with bytes keys, b'data' a (N, 3072) uint8 array whose
rows are 1024 R, then 1024 G, then 1024 B values of a row-major 32x32 image). Recipes: pad-4 random crop
+ flip for 32 px images (He et al. 2016); per-epoch seeding and wrap-around padding of shards as in
torch.utils.data.DistributedSampler; repeated augmentation dealt out as DeiT's samplers.py RASampler does
(each index repeated in a row, the list strided over the ranks). CIFAR mean / std are the usual
training-set statistics; the MNIST-like ones are for the 32x32 zero-padded images (derivation at
DATASETS).
"""
import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """A data set is missing or malformed; the one-line message names the path and the expected layout."""

    def __init__(self, message):
        # raised in a DataLoader worker, it comes back as "Caught DataError in DataLoader worker process N.
        # Original Traceback ...": keep its last line, the message itself, so that workers or not it reads
        # the same
        if message.startswith("Caught DataError"):
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


# Facts per dataset. img_size is what the model sees: the small sets are all delivered at 32x32, one
# input size for the small ViT / Swin presets. 28x28 MNIST-like images are zero-padded to 32 because
# Swin needs a token grid that its windows divide and that halves at every patch merging: 32 px with
# patch 4 gives 8x8 tokens (then 4x4, 2x2), 28 px gives 7x7. hflip: whether a horizontal flip keeps the
# class (not for digits). has_masks: foreground masks exist. default_path: where the data is if not given.
# mean / std: synthetic: of make_synthetic(20000, seed 0). MNIST-like: of the padded images; with a share
# p = 784/1024 of the pixels from the 28x28 image, m' = p*m and s'^2 = p*(s^2 + m^2) - m'^2 (MNIST's
# m, s = 0.1307, 0.3081; for Fashion-MNIST the result is checked on the files in test_data.py).
# fashion_mnist_small: of its 60k training images (seed 0), checked in test_data.py.
DATASETS = {
    'synthetic':     dict(num_classes=10, img_size=32, in_chans=3, mean=(0.5647, 0.5679, 0.5660),
                          std=(0.2387, 0.2387, 0.2386), hflip=True, has_masks=True, default_path=None),
    'fashion_mnist': dict(num_classes=10, img_size=32, in_chans=1, mean=(0.2190,), std=(0.3318,),
                          hflip=True, has_masks=True, default_path='/usr/share/datasets/fashion-mnist'),
    'fashion_mnist_small': dict(num_classes=10, img_size=32, in_chans=1, mean=(0.2850,), std=(0.1772,),
                                hflip=True, has_masks=True, default_path='/usr/share/datasets/fashion-mnist'),
    'mnist':         dict(num_classes=10, img_size=32, in_chans=1, mean=(0.1001,), std=(0.2752,),
                          hflip=False, has_masks=True, default_path=None),
    'cifar10':       dict(num_classes=10, img_size=32, in_chans=3, mean=(0.4914, 0.4822, 0.4465),
                          std=(0.2470, 0.2435, 0.2616), hflip=True, has_masks=False, default_path=None),
    'cifar100':      dict(num_classes=100, img_size=32, in_chans=3, mean=(0.5071, 0.4865, 0.4409),
                          std=(0.2673, 0.2564, 0.2762), hflip=True, has_masks=False, default_path=None),
    'imagenet':      dict(num_classes=1000, img_size=224, in_chans=3, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), hflip=True, has_masks=False, default_path=None),
}


# ----------------------------------------------------------------------------------------------------
# Synthetic shapes: the default data set, made in ~1.5 s for 20k images, with an exact mask per object.

SYNTHETIC_SIZE = {True: 20_000, False: 2_000}  # train, val
_CHUNK = 1000  # samples per random stream: the first n samples are the same whatever the total size


def _box(u, v):
    return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)


# The ten classes: object masks as functions of object-centred coordinates u, v (any shape, same for
# both) measured in half object sizes, v pointing down. Every shape fits in |u|, |v| <= 1, none is
# another one rotated or flipped (no rotation is drawn), and all stay apart at ~10 px across.
SHAPES = {
    'disc':            lambda u, v: u * u + v * v <= 1,
    'square':          lambda u, v: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),
    'triangle':        lambda u, v: (v <= 0.85) & (np.abs(u) <= 0.55 * (v + 0.85)),  # apex up
    'plus':            lambda u, v: _box(u, v) & ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)),
    'ring':            lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.55 ** 2),
    'diamond':         lambda u, v: np.abs(u) + np.abs(v) <= 1,
    'horizontal bars': lambda u, v: _box(u, v) & ((v + 0.9) % 0.72 < 0.36),  # three bars, two gaps
    'vertical bars':   lambda u, v: _box(u, v) & ((u + 0.9) % 0.72 < 0.36),
    'checker':         lambda u, v: _box(u, v) & ((np.floor((u + 0.9) / 0.6) + np.floor((v + 0.9) / 0.6)) % 2
                                                  == 0),  # 3x3 cells, corners and centre set
    'L':               lambda u, v: _box(u, v) & ((u <= -0.3) | (v >= 0.3)),  # left bar and bottom bar
}


def _uniform(rng, low, high, shape):
    return low + (high - low) * rng.random(shape, dtype=np.float32)  # float32 throughout: half the time


def _clutter(rng, n, channels, size, base_range, contrast=0.1):
    """Backgrounds (n, channels, size, size) float32 in [0, 1]-ish and their flat colour (n, channels).

    A flat colour drawn from base_range, plus soft colour blobs and thin lines of +-contrast, so that an
    object is not found by "anything not flat" and bars / edges also appear outside the object."""
    y, x = np.mgrid[:size, :size].astype(np.float32) + 0.5  # pixel centres, (size, size) each
    base = _uniform(rng, *base_range, (n, channels))
    img = np.broadcast_to(base[:, :, None, None], (n, channels, size, size)).copy()  # (n, channels, size, size)
    for _ in range(4):
        cy, cx = _uniform(rng, 0, size, (2, n, 1, 1))
        sigma = _uniform(rng, 2, 6, (n, 1, 1))
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))  # (n, size, size)
        img += _uniform(rng, -contrast, contrast, (n, channels, 1, 1)) * blob[:, None]
    for _ in range(2):
        py, px = _uniform(rng, 0, size, (2, n, 1, 1))
        angle = _uniform(rng, 0, np.pi, (n, 1, 1))
        line = np.abs((x - px) * np.sin(angle) - (y - py) * np.cos(angle)) < 0.6  # (n, size, size)
        img += _uniform(rng, -contrast, contrast, (n, channels, 1, 1)) * line[:, None]
    return img, base


def _synthetic_chunk(rng, n, size=32):
    """n balanced samples: images (n, 3, size, size) uint8, labels (n,) int64, masks (n, size, size) bool."""
    labels = rng.permutation(np.arange(n) % len(SHAPES))
    y, x = np.mgrid[:size, :size].astype(np.float32) + 0.5  # pixel centres, (size, size) each

    img, base = _clutter(rng, n, 3, size, (0.45, 0.9))
    # object: side 45-90% of the image, so that most CutMix boxes cut it, anywhere inside the image, 0.3-0.6
    # darker than the background in every channel (any hue). One polarity: with objects lighter or darker
    # at random a ViT sat at chance for the first 10k images; with one, it leaves chance within them.
    half = _uniform(rng, 0.45, 0.9, (n, 1, 1)) * size / 2
    cy, cx = half + (size - 2 * half) * rng.random((2, n, 1, 1), dtype=np.float32)
    u, v = (x - cx) / half, (y - cy) / half  # (n, size, size) each
    masks = np.zeros((n, size, size), dtype=bool)
    for k, shape in enumerate(SHAPES.values()):
        masks[labels == k] = shape(u[labels == k], v[labels == k])
    colour = base - _uniform(rng, 0.3, 0.6, (n, 3))  # (n, 3)
    img = np.where(masks[:, None], colour[:, :, None, None], img)

    img += 0.04 * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise on object and background
    images = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64), masks


def make_synthetic(n, seed=0, train=True):
    """The first n samples of the synthetic stream (seed, train): images (n, 3, 32, 32) uint8, labels (n,)
    int64, masks (n, 32, 32) bool. Same arguments, same bytes; train and val are different streams."""
    chunks = []
    for k in range(math.ceil(n / _CHUNK)):
        rng = np.random.default_rng([seed, int(not train), k])  # independent stream per (seed, split, chunk)
        chunks.append(_synthetic_chunk(rng, _CHUNK))
    images, labels, masks = (np.concatenate(a)[:n] for a in zip(*chunks))
    return images, labels, masks


# ----------------------------------------------------------------------------------------------------
# MNIST-like IDX files and CIFAR pickles

IDX_FILES = {True: ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
             False: ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
MASK_THRESHOLD = 25  # ink: pixel > 25 of 255, i.e. above ~0.1 of full intensity (drops faint fringe pixels)


def read_idx(file, magic, expected):
    """The array in a gzipped IDX file, checked to start with magic (2051 images: (N, rows, cols) uint8,
    2049 labels: (N,) uint8). expected: the layout to name in a DataError."""
    try:
        with gzip.open(file, 'rb') as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f'{file} is missing; {expected}') from None
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or a gzip stream cut short
        raise DataError(f'{file} is not a complete gzip file ({e}); {expected}') from None
    ndim = magic & 0xFF  # the magic's last byte is the number of dimensions, the byte before it 0x08 = uint8
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], 'big')
    if len(raw) < header or found != magic:
        raise DataError(f'{file} has magic number {found}, not {magic}; {expected}')
    dims = [int(d) for d in np.frombuffer(raw, '>i4', count=ndim, offset=4)]
    if len(raw) - header != math.prod(dims):
        raise DataError(f'{file} holds {len(raw) - header} bytes of data, its header says {dims}; {expected}')
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx(title, path, train):
    """MNIST-like split in path: images (N, 1, 32, 32) uint8 (28x28 zero-padded by 2), labels (N,) int64."""
    files = ', '.join(IDX_FILES[True] + IDX_FILES[False])
    expected = f'expected the four {title} IDX files {files} in {path}'
    if not os.path.isdir(path):
        raise DataError(f'{title} not found: {path} does not exist; {expected}')
    image_file, label_file = (os.path.join(path, f) for f in IDX_FILES[train])
    images = read_idx(image_file, 2051, expected)
    labels = read_idx(label_file, 2049, expected)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f'{image_file} holds images {images.shape}, {label_file} {len(labels)} labels; '
                        f'{expected} with 28x28 images and one label per image')
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]  # (N, 1, 32, 32)
    return images, labels.astype(np.int64)


# Small garments on clutter: Fashion-MNIST's garments scaled down to a side of SMALL_SIDE px and pasted at a
# random place of a 32 px textured background, their ink mask (MASK_THRESHOLD) kept exact. CutMix's lam counts
# pixels; here most pixels are background, so a box often takes all or none of an object and lam is far from
# the share of each object the mixed image shows (mean error ~0.2; 0.1 on the full-frame garments).
SMALL_SIDE = (12, 18)  # the 28 px garment frame scaled to 12-18 px (38-56% of the side); the ink fills ~half of it


def _small_garments_chunk(rng, garments, size=32):
    """garments (n, 28, 28) uint8 -> images (n, 1, size, size) uint8 and masks (n, size, size) bool.

    The draws (background, side, place, noise) do not depend on the garments' pixels, so the pixels
    outside the mask are the same whatever garment is pasted there."""
    n = len(garments)
    img, _ = _clutter(rng, n, 1, size, (0.05, 0.45), contrast=0.2)  # (n, 1, size, size), darker than most ink
    side = rng.integers(SMALL_SIDE[0], SMALL_SIDE[1] + 1, n)
    top, left = (rng.random((2, n)) * (size - side + 1)).astype(np.int64)  # anywhere inside the image
    canvas = np.zeros((n, size, size), dtype=np.float32)  # each garment at its place, 0 elsewhere
    for s in np.unique(side):
        rows = np.flatnonzero(side == s)
        # antialiased bilinear: a garment scaled down keeps its mean ink instead of aliasing its stripes
        small = F.interpolate(torch.from_numpy(garments[rows]).float()[:, None], size=(int(s), int(s)),
                              mode='bilinear', antialias=True, align_corners=False)[:, 0].numpy()  # (m, s, s)
        ys, xs = top[rows, None] + np.arange(s), left[rows, None] + np.arange(s)  # (m, s) each
        canvas[rows[:, None, None], ys[:, :, None], xs[:, None, :]] = small
    masks = canvas > MASK_THRESHOLD  # the object is its ink; below the threshold the background shows
    img[:, 0] = np.where(masks, canvas / 255, img[:, 0])
    img += 0.04 * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise on object and background
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), masks


def small_garments(garments, seed=0, train=True):
    """Fashion-MNIST garments (n, 28, 28) uint8 pasted small on clutter: images (n, 1, 32, 32) uint8, masks
    (n, 32, 32) bool. Sample i is a function of (garment i, seed, split, i) alone, as make_synthetic's."""
    n, chunks = len(garments), []
    garments = np.pad(garments, ((0, -n % _CHUNK), (0, 0), (0, 0)))  # whole chunks: the same draws for any n
    for k in range(len(garments) // _CHUNK):
        rng = np.random.default_rng([seed, int(not train), k, 1])  # streams apart from make_synthetic's
        chunks.append(_small_garments_chunk(rng, garments[k * _CHUNK:(k + 1) * _CHUNK]))
    images, masks = (np.concatenate(a)[:n] for a in zip(*chunks))
    return images, masks


CIFAR_FILES = {  # name: (title, folder, train files, test files, label key, the files in words)
    'cifar10': ('CIFAR-10', 'cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'],
                b'labels', 'data_batch_1..5 and test_batch'),
    'cifar100': ('CIFAR-100', 'cifar-100-python', ['train'], ['test'], b'fine_labels', 'train and test'),
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that CifarUnpickler does not resolve; the message is its dotted name."""


class CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler for CIFAR's files that never runs code from them.

    A pickle calls whatever its globals name (os.system as readily as numpy's functions); the only
    globals resolved here are those numpy arrays pickle with, which is all a CIFAR file names (the
    dicts, lists, bytes and ints around them need none). numpy 1 wrote numpy.core.multiarray, numpy 2
    writes numpy._core.multiarray. Any other global raises RefusedGlobal before anything is called.
    """
    _reconstruct = np.empty(0).__reduce__()[0]  # numpy's array reconstruction, wherever this numpy keeps it
    GLOBALS = {('numpy.core.multiarray', '_reconstruct'): _reconstruct,
               ('numpy._core.multiarray', '_reconstruct'): _reconstruct,
               ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}

    def find_class(self, module, name):
        if (module, name) not in self.GLOBALS:
            raise RefusedGlobal(f'{module}.{name}')
        return self.GLOBALS[module, name]


def _load_cifar(name, path, train):
    """CIFAR split under path (the folder holding cifar-10-batches-py/, or that folder itself):
    images (N, 3, 32, 32) uint8, labels (N,) int64."""
    title, folder, train_files, test_files, label_key, listing = CIFAR_FILES[name]
    expected = f'expected the python version of {title} ({folder}/ with {listing}) under {path}'
    if not os.path.isdir(path):
        raise DataError(f'{title} not found: {path} does not exist; {expected}')
    files = train_files if train else test_files
    # path may name the folder itself (whatever it is called) or its parent
    inside = os.path.basename(os.path.normpath(path)) == folder \
        or os.path.isfile(os.path.join(path, files[0]))
    root = path if inside else os.path.join(path, folder)
    images, labels = [], []
    for file in (os.path.join(root, f) for f in files):
        if not os.path.isfile(file):
            raise DataError(f'{title} not found: {file} is missing; {expected}')
        try:
            with open(file, 'rb') as f:
                batch = CifarUnpickler(f, encoding='bytes').load()  # Python 2 pickles: strings load as bytes
        except Exception as e:  # a damaged pickle can fail in many ways; all mean "replace the file"
            why = f'it names {e}, which no CIFAR file holds' if isinstance(e, RefusedGlobal) else type(e).__name__
            raise DataError(f'{title} file unreadable: {file} is not a valid pickle ({why}); {expected}') from None
        data = np.asarray(batch.get(b'data', [])) if isinstance(batch, dict) else np.zeros(0)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or label_key not in batch \
                or len(batch[label_key]) != len(data):
            raise DataError(f'{title} file malformed: {file} lacks b"data", a (N, 3072) uint8 array, with N '
                            f'{label_key!r}; {expected}')
        images.append(data.reshape(-1, 3, 32, 32))  # each row: 1024 R, 1024 G, 1024 B, row-major
        labels.append(np.asarray(batch[label_key], np.int64))
    return np.concatenate(images), np.concatenate(labels)


@dataclass
class TensorData:
    """A small data set in memory: images (N, C, 32, 32) uint8, labels (N,) int64, masks (N, 32, 32) bool
    or None. Masks of chosen samples, for evaluation: data.masks[idx]."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None

    def __len__(self):
        return len(self.labels)

    @property
    def info(self):
        return DATASETS[self.name]


def load_small(name, path, train, subset=None, seed=0):
    """One split (train=True: train, else val / test) of a small data set as a TensorData with the first
    `subset` samples (all if None). path: the data directory (None: DATASETS' default_path); seed: the
    drawn sets only (synthetic, which has no files and any size, and fashion_mnist_small's placements)."""
    small = [n for n in DATASETS if n != 'imagenet']
    if name not in small:
        raise ValueError(f'unknown small data set {name!r}; choose from {small}')
    path = path or DATASETS[name]['default_path']
    if name == 'synthetic':
        images, labels, masks = make_synthetic(subset or SYNTHETIC_SIZE[train], seed, train)
    elif path is None:
        raise DataError(f'{name} has no default location: give the directory that holds it (--data-path)')
    elif name in ('mnist', 'fashion_mnist'):
        images, labels = _load_idx('MNIST' if name == 'mnist' else 'Fashion-MNIST', path, train)
        masks = images[:, 0] > MASK_THRESHOLD
    elif name == 'fashion_mnist_small':
        images, labels = _load_idx('Fashion-MNIST', path, train)
        labels = labels[:subset]  # only the samples asked for are made: sample i does not depend on the rest
        images, masks = small_garments(images[:subset, 0, 2:30, 2:30], seed, train)  # the unpadded 28x28
    else:
        images, labels = _load_cifar(name, path, train)
        masks = None  # CIFAR has no segmentation
    num_classes = DATASETS[name]['num_classes']
    if len(labels) == 0:
        raise DataError(f'{name} under {path} holds no samples')
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f'{name} under {path} has labels {labels.min()}..{labels.max()}, '
                        f'expected 0..{num_classes - 1}')
    if subset is not None:
        if subset > len(labels):
            raise DataError(f'{name} under {path} has {len(labels)} samples, fewer than the subset {subset}')
        images, labels = images[:subset], labels[:subset]
        masks = None if masks is None else masks[:subset]
    return TensorData(name, torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels),
                      None if masks is None else torch.from_numpy(np.ascontiguousarray(masks)))


def select(data, rows):
    """The samples `rows` (a slice or an index tensor) of a TensorData, their masks with them."""
    return replace(data, images=data.images[rows], labels=data.labels[rows],
                   masks=None if data.masks is None else data.masks[rows])


# ----------------------------------------------------------------------------------------------------
# Augmentation on batches of tensors, and the loader

def random_crop_flip(images, generator, padding=4, flip=True):
    """Per-sample random crop of the zero-padded image and random horizontal flip (p=1/2), as one gather:
    (B, C, H, W) -> (B, C, H, W), any dtype. The same as torchvision's RandomCrop(H, padding) followed by
    RandomHorizontalFlip on every image. Masks move with their images when stacked as an extra channel."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4).flatten(2)  # (B, C, (H + 2p) * (W + 2p))
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    flipped = torch.rand(B, generator=generator) < 0.5 if flip else torch.zeros(B, dtype=torch.bool)
    rows = dy[:, None] + torch.arange(H)  # (B, H) source rows in the padded image
    cols = torch.where(flipped[:, None], torch.arange(W).flip(0), torch.arange(W)) + dx[:, None]  # (B, W)
    source = rows[:, :, None] * (W + 2 * padding) + cols[:, None, :]  # (B, H, W) flat index into padded
    # gather on the flat index: ~3x faster on CPU than indexing padded[b, c, rows, cols]
    return padded.gather(2, source.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)


def normalize(images, mean, std):
    """uint8 images (B, C, H, W) -> float32 (B, C, H, W), (x / 255 - mean) / std per channel, on the images'
    device (mean, std: C numbers, or tensors of C elements). Zero padding of the crop becomes -mean / std
    here, as in the usual pad-crop-ToTensor-Normalize pipeline."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def derive_seed(*keys: int) -> int:
    """A seed that is a function of all keys (e.g. seed, epoch, rank) with no collisions between them."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def epoch_order(n, world_size, seed, epoch, repeats=1, shuffle=True):
    """Every rank's sample indices for one epoch: (world_size, ceil(repeats * n / world_size)) int64.

    One permutation of range(n) for all ranks (torch.randperm seeded with seed + epoch, as
    DistributedSampler), each index repeated `repeats` times in a row, padded by wrapping around to a
    multiple of world_size, dealt out to the ranks by striding. Read column by column it is that list, so
    every index appears exactly `repeats` times before the padding, and the copies of one index, being
    adjacent, go to `repeats` different ranks when world_size >= repeats (DeiT's RASampler).
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    order = order.repeat_interleave(repeats)  # (repeats * n,)
    total = math.ceil(len(order) / world_size) * world_size
    order = order.repeat(math.ceil(total / len(order)))[:total]  # (total,)
    return order.view(-1, world_size).T  # row r: positions r, r + world_size, ... of the list


class RepeatedAugSampler(torch.utils.data.Sampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's RASampler): each image `repeats` times an epoch.

    Rank `rank` gets the first ceil(N / world_size) indices of its row of epoch_order: an epoch has as
    many steps as without repetition (DistributedSampler(drop_last=False)'s length), so with repeats 3 it
    sees about a third of the distinct images, three augmentations of each, one per rank where
    world_size >= 3 (in the same batch on one rank). DeiT also cuts every rank to floor(N / 256) * 256 /
    world_size samples, which leaves a small folder no step at all; not here. repeats=1 gives
    DistributedSampler(shuffle=True, drop_last=False)'s indices exactly. Call set_epoch before every epoch:
    the order is a function of (seed, epoch), so a resumed run repeats it.
    """

    def __init__(self, dataset, world_size=1, rank=0, repeats=3, seed=0):
        self.n, self.world_size, self.rank, self.repeats, self.seed = len(dataset), world_size, rank, repeats, seed
        self.num_samples = math.ceil(self.n / world_size)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        """Keys (index, epoch, copy): which sample, and which of its `repeats` copies this epoch, so that a
        data set can augment each copy from a seed of its own (imagenet.Folder)."""
        order = epoch_order(self.n, self.world_size, self.seed, self.epoch, self.repeats)
        positions = range(self.rank, self.rank + self.num_samples * self.world_size, self.world_size)
        # in epoch_order's list an index's copies are adjacent, so a position's copy is its remainder; the
        # padding, which wraps around, counts on: no two keys of an epoch are the same
        length = self.repeats * self.n
        return iter((i, self.epoch, p % self.repeats + self.repeats * (p // length))
                    for i, p in zip(order[self.rank, :self.num_samples].tolist(), positions))


class Loader:
    """Batches (images (B, C, 32, 32) float32 normalised, labels (B,) int64) of one rank's share of data;
    with masks=True also the object masks (B, 32, 32) bool, cropped and flipped with their images."""

    def __init__(self, data, batch_size, shuffle=False, augment=False, drop_last=False, rank=0, world_size=1,
                 seed=0, repeats=1, pin_memory=False, masks=False):
        if masks and data.masks is None:
            raise ValueError(f'{data.name} has no object masks to load')
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.masks = masks
        self.pin_memory = pin_memory  # for CUDA: a copy from pinned memory does not make the host wait
        self.drop_last, self.rank, self.world_size, self.seed = drop_last, rank, world_size, seed
        self.repeats = repeats  # repeated augmentation, as RepeatedAugSampler
        self.epoch = 0
        # as DistributedSampler: every rank gets ceil(N / world_size) samples, so all ranks run the same
        # number of steps (epoch_order pads by wrapping around to the start)
        self.num_samples = math.ceil(len(data) / world_size)

    def set_epoch(self, epoch):
        """Order and augmentation are functions of (seed, epoch, rank): call it before every epoch."""
        self.epoch = epoch

    def __len__(self):
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        info = self.data.info
        idx = epoch_order(len(self.data), self.world_size, self.seed, self.epoch, self.repeats,
                          self.shuffle)[self.rank, :self.num_samples]  # (num_samples,)
        # augmentation draws differ between ranks and epochs, and are the same when the run is repeated
        aug = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank))
        for i in range(len(self)):
            batch = idx[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.data.images[batch]  # (B, C, H, W) uint8
            if self.masks:  # an extra channel, so that the crop and flip move them with their images
                images = torch.cat([images, self.data.masks[batch, None].to(torch.uint8)], dim=1)
            if self.augment:
                images = random_crop_flip(images, aug, flip=info['hflip'])
            out = [normalize(images[:, :info['in_chans']], info['mean'], info['std']), self.data.labels[batch]]
            if self.masks:
                out.append(images[:, -1].bool())  # (B, H, W)
            yield tuple(t.pin_memory() for t in out) if self.pin_memory else tuple(out)
