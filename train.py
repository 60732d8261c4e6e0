"""Train a ViT or Swin with CutMix and TL-Align (or a baseline target), on a laptop CPU or a GPU node.

    python train.py                                            # vit_mini on the built-in synthetic set
    python train.py --data fashion_mnist --epochs 10
    python train.py --data imagenet --data-path /my/folders --finetune deit_small_patch16_224-cd65a155.pth
    torchrun --nproc_per_node=8 train.py --data imagenet --data-path /imagenet --model deit_s

One loop for every device: CUDA with bf16 autocast when present, the CPU otherwise; DDP when launched
by torchrun (NCCL on GPUs, gloo on CPUs). Recipes: DeiT (Touvron et al. 2021) with TL-Align's CutMix-only
mixing and Swin (Liu et al. 2021) with its Mixup/CutMix switch, each value as in their code (RECIPES);
small recipes for 32 px data. The step never waits for the device: the host reads the loss (and checks it
is finite) only every --log-every steps.

The target of a CutMix batch is chosen by --target (paper Sec. 3): `tl_align`, the class token's aligned
label; `area`, CutMix's lam (paper Eq. (1)); `transmix`, TransMix's attention lam. Mixup batches always
use the area target, which is exact for them (tl_align.mixup).

--finetune starts a new run from weights in any of the usual files, adapted to the model's image size,
windows, channels and classes (checkpoint.py, which also writes and reads the run's own checkpoints).
"""
import argparse
import inspect
import json
import math
import os
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import data
import imagenet
import tl_align as tl
import truth
import vit

# Per data set: the model, schedule and regularisation that make `python train.py --data X` right.
# lr is the rate for a global batch of lr_batch and scales linearly with the batch actually used; the
# schedule (see `schedule`) warms up from warmup_lr and decays to min_lr, stepped per "step" or "epoch"
# with the cosine over the whole run or, with warmup_prefix, after the warm-up; scale_ends: the two ends
# scale with the batch like lr.
TO_ZERO = dict(sched="step", warmup_lr=0.0, min_lr=0.0, scale_ends=False, warmup_prefix=True)  # ours
RECIPES = {
    # 4 epochs of 20k images: 87% top-1 in 3.2 minutes on a 2-core CPU with bf16 (README)
    "synthetic":     dict(model="vit_mini", epochs=4, batch_size=128, lr=1e-3, lr_batch=128, warmup_epochs=0.4,
                          weight_decay=0.05, smoothing=0.1, drop_path=0.0, clip_grad=None, mix="cutmix",
                          augment=True, repeats=1, **TO_ZERO),
    # Chosen on a held-out 10k of the training set (--holdout 10000), one epoch on the other 50k: this recipe
    # 74.2% top-1; batch 128: 68.7%; batch 128 at lr 2e-3: 70.4%; batch 128 with crop + flip and drop path 0.1: 54.9%
    "fashion_mnist": dict(model="vit_mini", epochs=10, batch_size=64, lr=1e-3, lr_batch=64, warmup_epochs=1,
                          weight_decay=0.05, smoothing=0.1, drop_path=0.0, clip_grad=None, mix="cutmix",
                          augment=False, repeats=1, **TO_ZERO),
    "cifar10":       dict(model="vit_mini", epochs=100, batch_size=128, lr=1e-3, lr_batch=128, warmup_epochs=5,
                          weight_decay=0.05, smoothing=0.1, drop_path=0.1, clip_grad=None, mix="cutmix",
                          augment=True, repeats=1, **TO_ZERO),
    # DeiT (facebookresearch/deit main.py defaults): AdamW 5e-4 x batch/512, wd 0.05, 300 epochs, 5 warm-up
    # epochs from 1e-6, cosine to 1e-5 (both not scaled), timm's scheduler stepped per epoch; smoothing 0.1,
    # drop path 0.1, no clipping; repeated augmentation, 3 repeats (DeiT's RASampler, also in TL-Align's
    # script). Mixing: TL-Align's script, CutMix only (DeiT's own: --mix both).
    "imagenet":      dict(model="deit_s", epochs=300, batch_size=128, lr=5e-4, lr_batch=512, warmup_epochs=5,
                          weight_decay=0.05, smoothing=0.1, drop_path=0.1, clip_grad=None, mix="cutmix",
                          augment=True, sched="epoch", warmup_lr=1e-6, min_lr=1e-5, scale_ends=False,
                          warmup_prefix=False, repeats=3),  # DeiT's transforms (imagenet.load_imagenet)
}
RECIPES["mnist"] = RECIPES["fashion_mnist_small"] = RECIPES["fashion_mnist"]
RECIPES["cifar100"] = RECIPES["cifar10"]
# Swin on ImageNet (microsoft/Swin-Transformer config.py, lr_scheduler.py, main.py): AdamW 5e-4 x batch/512,
# 20 warm-up epochs from 5e-7, cosine to 5e-6, all three x batch/512, stepped per step; clipping 5; Mixup 0.8 /
# CutMix 1.0 switched per batch (its timm Mixup); drop path by size; no repeated augmentation. The cosine
# spans the whole run, as in the code behind Swin's published results (lr_scheduler.py of 2021-04,
# t_initial = all steps); the repository's WARMUP_PREFIX, starting it after the warm-up, came in 2022-10.
SWIN_IMAGENET = dict(lr=5e-4, lr_batch=512, warmup_epochs=20, clip_grad=5.0, mix="both", sched="step",
                     warmup_lr=5e-7, min_lr=5e-6, scale_ends=True, warmup_prefix=False, repeats=1)
SWIN_DROP_PATH = {"swin_t": 0.2, "swin_s": 0.3, "swin_b": 0.5}


class UserError(Exception):
    """A problem the user can fix; main() prints its one-line message and exits with code 2."""


def get_args(argv=None, world=None):
    """The run's whole configuration, resolved once: the flags, the data set's recipe where a flag is not
    given, the device, the world size (torchrun's WORLD_SIZE unless given) and the rates scaled to the
    global batch. Nothing changes it afterwards."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="synthetic", choices=list(data.DATASETS))
    p.add_argument("--data-path", default=None, help="data directory (default: the data set's own)")
    p.add_argument("--model", default=None, choices=list(vit.PRESETS), help="default: the data set's recipe")
    p.add_argument("--img-size", type=int, default=None, help="input size, image folders only (default: 224)")
    p.add_argument("--window-size", type=int, default=None, help="Swin's window (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's, scaled to the global batch")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: the recipe's)")
    p.add_argument("--mix", default=None, choices=["cutmix", "mixup", "both", "none"],
                   help="both: CutMix or Mixup with probability 1/2 per batch (DeiT's switch)")
    p.add_argument("--target", default="tl_align", choices=["tl_align", "area", "transmix", "oracle"],
                   help="the label of a CutMix image; oracle: the shares of its visible objects (needs masks; "
                        "an upper reference, not a method)")
    p.add_argument("--cutmix-mode", default="grid", choices=["grid", "pixel"])
    p.add_argument("--cutmix-alpha", type=float, default=1.0)
    p.add_argument("--mixup-alpha", type=float, default=0.8)
    p.add_argument("--smoothing", type=float, default=None)
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--subset", type=int, default=None,
                   help="train on N training samples: the first N of a small set; of an image folder N drawn "
                        "with --seed, as even across the classes as their sizes allow (at least one per class)")
    p.add_argument("--holdout", type=int, default=None,
                   help="validate on the last N training samples instead of the test split (to choose a recipe)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop and flip of small images (default: the recipe's; --no-augment: mixing only)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeated augmentation: each image this many times an epoch, the copies on different "
                        "processes, an epoch as many steps as without (default: the recipe's: 3 for DeiT on "
                        "ImageNet, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast; auto = bf16 where native (GPUs from Ampere on, CPUs with bf16 instructions), "
                        "fp16 on older GPUs, else off")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (on a 2-core CPU: ~45 s to compile, then 3-13%% faster steps)")
    p.add_argument("--fused-attn", action="store_true",
                   help="scaled_dot_product_attention with the labels riding along (same results, less memory)")
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="keep scaled_dot_product_attention off cuDNN's kernel (whose backward has returned NaN "
                        "gradients on some torch versions and GPUs; bench.py --gpu-check tells)")
    p.add_argument("--workers", type=int, default=None,
                   help="ImageNet loader processes per GPU (default: the CPUs this process may use divided by "
                        "torchrun's LOCAL_WORLD_SIZE, less one for training, at least 1)")
    p.add_argument("--output-dir", default=None,
                   help="where the log and checkpoints go (default: a new runs/<time>-<data>-<model>, linked as "
                        "runs/latest; with --resume, the checkpoint's folder); a folder holding a run is refused")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (or to evaluate with --eval)")
    p.add_argument("--finetune", default=None,
                   help="start a new run from these weights: train.py's, DeiT's, timm's (.pth, .bin, .safetensors)")
    p.add_argument("--eval", action="store_true", help="only evaluate the --resume or --finetune weights")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (the last always is)")
    args = p.parse_args(argv)
    recipe = dict(RECIPES[args.data])
    args.model = args.model or recipe["model"]
    if args.data == "imagenet" and args.model.startswith("swin"):
        recipe.update(SWIN_IMAGENET, drop_path=SWIN_DROP_PATH.get(args.model, 0.2))
    for key in ("epochs", "batch_size", "weight_decay", "clip_grad", "mix", "smoothing", "drop_path", "augment",
                "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.warmup_epochs is None:  # the recipe's warm-up, but at most a tenth of a shorter run
        args.warmup_epochs = min(recipe["warmup_epochs"], args.epochs / 10)
    args.lr_recipe = (recipe["lr"], recipe["lr_batch"])
    args.lr_ends = (recipe["warmup_lr"], recipe["min_lr"], recipe["scale_ends"])
    args.sched, args.warmup_prefix = recipe["sched"], recipe["warmup_prefix"]
    if args.workers is None:
        args.workers = default_workers()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.new_folder = args.output_dir is None and args.resume is None  # runs/<time>-..., and runs/latest to it
    if args.output_dir is None:  # a new folder per run, so that running twice loses nothing
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.output_dir = os.path.dirname(args.resume) if args.resume else \
            os.path.join("runs", f"{stamp}-{args.data}-{args.model}")
        while args.new_folder and os.path.exists(args.output_dir):  # two runs started within one second
            args.output_dir += "+"
    args.world = torchrun_fact("WORLD_SIZE") if world is None else world
    args.lr, args.warmup_lr, args.min_lr = rates(args)
    return args


def torchrun_fact(name, env=os.environ):
    """One of the facts torchrun gives each process it starts (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE),
    or its value for plain python, one process: ranks 0, sizes 1."""
    default = torchrun_fact("WORLD_SIZE", env) if name == "LOCAL_WORLD_SIZE" else int(name.endswith("SIZE"))
    return int(env.get(name, default))


def default_workers():
    """--workers' default: the CPUs a GPU has, those this process may run on shared by the processes
    torchrun started on this node (LOCAL_WORLD_SIZE), less one for the training process itself; at least 1.
    A GPU needs every core it can get (REFERENCE.md: ~6 per RTX 3090 for DeiT-S), so no fixed cap."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no CPU affinity on macOS and Windows
        cpus = os.cpu_count() or 1
    return max(1, cpus // torchrun_fact("LOCAL_WORLD_SIZE") - 1)


def check_shared_memory(args, img_size, free=None):
    """Refuse a loader whose batches in flight do not fit in /dev/shm, where worker processes hand their
    batches over: every process on this node keeps --workers x 2 (the prefetch) uint8 batches there.
    Docker's default /dev/shm is 64 MB; without this check the first batch dies of a bus error."""
    if args.workers == 0 or (free is None and not os.path.isdir("/dev/shm")):
        return
    free = shutil.disk_usage("/dev/shm").free if free is None else free
    batch = args.batch_size * 3 * img_size ** 2  # bytes of one uint8 batch
    need = torchrun_fact("LOCAL_WORLD_SIZE") * args.workers * 2 * batch
    if need > free:
        raise UserError(f"/dev/shm has {free / 2**20:.0f} MB free, the loaders need ~{need / 2**20:.0f} MB ("
                        f"{args.workers} workers x 2 batches of {batch / 2**20:.1f} MB per process): run the "
                        f"container with --ipc=host or --shm-size={-(-2 * need // 2**30)}g, or lower --workers")


def check_args(args):
    """Refuse settings that cannot train, with the one line that says what to change."""
    for flag in ("epochs", "batch_size", "subset", "holdout", "eval_every", "img_size", "window_size", "repeats",
                 "log_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    for flag in ("lr", "cutmix_alpha", "mixup_alpha"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be positive")
    for flag, value, low, high in (("smoothing", args.smoothing, 0, 1), ("drop-path", args.drop_path, 0, 1)):
        if not low <= value < high:  # smoothing 1 trains on a flat target; drop path 1 drops every block
            raise UserError(f"--{flag} {value}: must be in [{low}, {high})")
    for flag in ("weight_decay", "warmup_epochs", "clip_grad", "workers", "seed"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be 0 or more")
    if args.data == "imagenet" and args.augment is False:
        raise UserError("--no-augment is for the small data sets; ImageNet trains with DeiT's transforms")
    if args.holdout is not None and args.data == "imagenet":
        raise UserError("--holdout is for the small data sets; for ImageNet make a folder of held-out images")
    if args.target == "transmix" and vit.PRESETS[args.model]["family"] != "vit":
        raise UserError(f"--target transmix needs a class-token model (deit_*, vit_mini), not {args.model}: "
                        f"TransMix is defined on the class token's attention")
    if args.target == "oracle" and not data.DATASETS[args.data]["has_masks"]:
        masked = ", ".join(n for n, d in data.DATASETS.items() if d["has_masks"])
        raise UserError(f"--target oracle reads object masks, which --data {args.data} does not have; use it on "
                        f"{masked}")
    if args.finetune and args.resume:
        raise UserError("--finetune starts a new run from weights, --resume continues a run: give one "
                        "(a fine-tuning run continues with --resume alone)")
    if args.img_size is not None and args.data != "imagenet":
        raise UserError(f"--img-size: --data {args.data} is held in memory at {data.DATASETS[args.data]['img_size']} "
                        f"px; only image folders (--data imagenet) are resized")
    if args.window_size is not None and vit.PRESETS[args.model]["family"] != "swin":
        raise UserError(f"--window-size is for Swin models; {args.model} has no windows")


# ----------------------------------------------------------------------------- set-up

def setup_distributed(args):
    """(rank, device): torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is one process."""
    rank, local = torchrun_fact("RANK"), torchrun_fact("LOCAL_RANK")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {args.device}: not supported; use cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {args.device}: MPS (Apple GPUs) is not available here; use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        device = torch.device("cuda", local if device.index is None else device.index)  # one GPU per process
        torch.cuda.set_device(device)
    if args.world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, device


def build_data(args, rank, device):
    """Train and val loaders, the val set itself (for the label errors) and the data set's facts."""
    world = args.world
    info = data.DATASETS[args.data]
    if args.data == "imagenet":
        if args.data_path is None:
            raise UserError("--data imagenet needs --data-path DIR (DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG)")
        # any folders in ImageNet's layout: the size is free, the classes are the folders
        info = dict(info, img_size=args.img_size or info["img_size"])
        train_set = imagenet.load_imagenet(args.data_path, train=True, img_size=info["img_size"], seed=args.seed)
        val_set = imagenet.load_imagenet(args.data_path, train=False, img_size=info["img_size"])
        info["num_classes"] = len(train_set.classes)
        if info["num_classes"] < 2:  # one class trains to a meaningless 100%
            raise UserError(f"{args.data_path}/train holds {info['num_classes']} class folder; a classifier needs "
                            f"at least 2")
        if args.subset is not None:
            # validation covers every class: so must training, or those classes can only be got wrong
            if args.subset < info["num_classes"]:
                raise UserError(f"--subset {args.subset} is fewer than the {info['num_classes']} classes of "
                                f"{args.data_path}/train: every class needs a training image; give at least "
                                f"{info['num_classes']}")
            train_set = train_set.subset(imagenet.class_balanced_subset(train_set.targets, args.subset, args.seed))
        check_shared_memory(args, info["img_size"])
        # repeats 1: DistributedSampler(drop_last=False)'s indices
        sampler = data.RepeatedAugSampler(train_set, world, rank, args.repeats, args.seed)
        # workers live as long as the run: an image's augmentation is a function of (seed, epoch, index, copy)
        # (and the loaders draw their workers' base seeds from a generator of their own: an iterator made
        # anew, as on resuming, or reused leaves the global one, which draws lam and boxes, where it was)
        kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda",
                  persistent_workers=args.workers > 0, generator=torch.Generator())
        train = torch.utils.data.DataLoader(train_set, sampler=sampler, drop_last=True, **kw)
        # validation: each rank a disjoint stride of the set, no padding, so that gathered counts are exact
        val = torch.utils.data.DataLoader(val_set, sampler=range(rank, len(val_set), world), **kw)
        train, val = imagenet.DeviceBatches(train, device, args.seed, rank), imagenet.DeviceBatches(val, device)
        return train, val, None, info
    # the synthetic set is the same for every --seed: seeds vary the training, not the data
    if args.holdout:  # the first samples train, the last --holdout validate: the test split stays unseen
        size = None if args.data != "synthetic" else (args.subset or data.SYNTHETIC_SIZE[True]) + args.holdout
        full = data.load_small(args.data, args.data_path, True, size)
        rest = len(full) - args.holdout
        if rest < (args.subset or 1):
            raise UserError(f"--holdout {args.holdout} leaves {max(rest, 0)} of the {len(full)} {args.data} "
                            f"training samples, fewer than {args.subset or 1}: lower --holdout or --subset")
        train_set, val_set = data.select(full, slice(args.subset or rest)), data.select(full, slice(rest, None))
    else:
        train_set = data.load_small(args.data, args.data_path, train=True, subset=args.subset, seed=0)
        val_set = data.load_small(args.data, args.data_path, train=False, seed=0)
    # with masks the loader also yields each image's object mask: the training targets are measured against it
    train = data.Loader(train_set, args.batch_size, shuffle=True, augment=args.augment, drop_last=True,
                        rank=rank, world_size=world, seed=args.seed, repeats=args.repeats,
                        pin_memory=device.type == "cuda", masks=train_set.masks is not None)
    shard = data.select(replace(val_set, masks=None), slice(rank, None, world))
    val = data.Loader(shard, 256, pin_memory=device.type == "cuda")
    return train, val, val_set, info


def cpu_has_bf16(cpuinfo_path="/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16), by its feature flags.

    Without it bf16 is emulated and slower than float32; machines without /proc/cpuinfo count as no.
    """
    try:
        with open(cpuinfo_path) as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def auto_amp(device) -> str:
    """--amp auto: bf16 where it is native (CUDA compute capability >= 8.0, CPUs with bf16 instructions),
    fp16 with loss scaling on older GPUs (V100, T4: bf16 would be emulated), else float32 ('off')."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "off"


def param_groups(model, weight_decay):
    """No weight decay on norms, biases, the class token and the position tables (DeiT/Swin practice)."""
    no_decay = ("cls_token", "pos_embed", "relative_position_bias_table")
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.ndim <= 1 or name.endswith(no_decay) else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def cosine_lr(t, lr, warmup_t, total_t, warmup_lr, min_lr, prefix):
    """The rate at t (epochs or steps) of timm's CosineLRScheduler with one cycle, DeiT's and Swin's schedule.

    A linear warm-up from warmup_lr to lr over warmup_t, then a cosine from lr down to min_lr at total_t:
    over [0, total_t) (DeiT, Swin: the cosine has begun when the warm-up ends) or, with prefix, over
    [warmup_t, total_t) (timm's warmup_prefix; our small recipes).
    """
    if t < warmup_t:
        return warmup_lr + t * (lr - warmup_lr) / warmup_t
    if t >= total_t:
        return min_lr
    start = warmup_t if prefix else 0
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t - start) / (total_t - start)))


def rates(args):
    """(lr, warmup_lr, min_lr): --lr or the recipe's, and the schedule's ends, scaled to the global batch."""
    scale = args.batch_size * args.world / args.lr_recipe[1]  # linear scaling
    lr = args.lr_recipe[0] * scale if args.lr is None else args.lr
    warmup_lr, min_lr, scaled = args.lr_ends
    # the ends never above the peak: a --lr below DeiT's floor of 1e-5 decays to itself, not upwards
    return lr, *(min(end * (scale if scaled else 1), lr) for end in (warmup_lr, min_lr))


def schedule(args, steps_per_epoch):
    """The lr factor of each optimizer step (for LambdaLR): the recipe's cosine, per step or per epoch.

    DeiT and Swin step their timm scheduler after each epoch (DeiT) or update (Swin) with its index, so
    update t runs at cosine_lr(t - 1) and the first two at warmup_lr; so do we. Swin counts its warm-up
    in whole steps, int(warmup_epochs * steps_per_epoch).
    """
    unit = steps_per_epoch if args.sched == "epoch" else 1
    warmup = args.warmup_epochs if args.sched == "epoch" else int(args.warmup_epochs * steps_per_epoch)
    total = args.epochs * steps_per_epoch // unit

    def factor(step):
        t = max(step // unit - 1, 0)
        return cosine_lr(t, args.lr, warmup, total, args.warmup_lr, args.min_lr, args.warmup_prefix) / args.lr
    return factor


# ----------------------------------------------------------------------------- checkpoints

def finetune_from(model, args, log):
    """Load the --finetune weights into a new model, adapted to it (checkpoint.load_adapted), strictly.

    The classifier is re-initialised if the class count differs, except with --eval, where it must fit.
    """
    try:
        notes = checkpoint.load_adapted(model, args.finetune, reset_head=not args.eval)
    except ValueError as e:
        raise UserError(f"--finetune {args.finetune} does not fit --model {args.model} on --data {args.data}: "
                        f"{e}") from None
    for note in notes:
        log(f"finetune: {note}")


def drop_later_epochs(log_path, start_epoch):
    """Keep only the log lines of epochs before start_epoch: a run killed between writing its log line
    and its checkpoint repeats that epoch on resume, and must not log it twice."""
    if not os.path.isfile(log_path):
        return
    def before_start(line):
        try:
            return json.loads(line)["epoch"] < start_epoch
        except (ValueError, KeyError, TypeError):  # a line torn by a kill
            return False

    with open(log_path) as f:
        lines = [line for line in f if before_start(line)]
    with open(log_path, "w") as f:
        f.writelines(lines)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, loader, device, autocast):
    """Top-1 and top-5 accuracy (percent) over the whole validation set, summed across ranks."""
    model.eval()
    hits, seen = torch.zeros(2, dtype=torch.long, device=device), 0  # correct@1, correct@5: on the device
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum()])
        seen += len(y)
    counts = torch.cat([hits, hits.new_full((1,), seen)])  # a fill, not a copy from the host
    if dist.is_initialized():
        dist.all_reduce(counts)
    correct1, correct5, total = counts.tolist()  # the one host read of an evaluation
    return 100 * correct1 / total, 100 * correct5 / total


@torch.no_grad()
def label_errors(model, val_set, args, device, autocast, num_images=512, pairs_per_box=64):
    """Mean absolute error of each target's share of image 1 against the visible-foreground truth.

    The paper's analysis of how right a target is (truth.target_shares), on the same CutMix pairs
    of validation images every epoch. Returns {'area': mae, 'tl': mae, 'transmix': mae or None}, or
    None if the data set has no masks.
    """
    if val_set is None or val_set.masks is None:
        return None
    model.eval()
    info = val_set.info
    x = data.normalize(val_set.images[:num_images], info["mean"], info["std"])
    with autocast:
        shares = truth.target_shares(model, x, val_set.masks[:num_images], model.patch_embed.patch_size,
                                     args.cutmix_alpha, args.cutmix_mode, pairs_per_box, seed=12345)
    return truth.share_errors(shares)


# ----------------------------------------------------------------------------- training

def batch_mix(mix):
    """The mixing of one batch. --mix both is DeiT's switch (timm's Mixup with switch_prob 0.5): CutMix or
    Mixup with probability 1/2 each, drawn on the host from torch's generator, like lam and the box."""
    if mix != "both":
        return mix
    return "cutmix" if torch.rand(()).item() < 0.5 else "mixup"


def train_step(model, x, y, masks, patch_size, args):
    """One batch's loss (paper Sec. 3): mix it, carry the token labels through the model, train on the label.

    x: (B, C, H, W), y: (B,), masks: (B, H, W) object masks or None. Returns the loss, the label that the
    target gave each image over its two sources (B, 2), and the object pixels of each source that the
    mixed image shows (B, 2) (None without masks or CutMix).
    """
    mix, visible = batch_mix(args.mix), None
    if mix == "cutmix":
        if masks is None:  # paper Eq. (1), and each token's label over the two images
            x, token_labels, lam = tl.cutmix(x, patch_size, args.cutmix_alpha, args.cutmix_mode)
        else:  # the same draws and pixels, and what each mixed image shows of each object
            x, token_labels, lam, visible = truth.cutmix_truth(x, masks, patch_size, args.cutmix_alpha,
                                                               args.cutmix_mode)
        logits, label, cls_attn = model(x, token_labels)  # label: aligned through every block (B, 2)
        if args.target == "area":
            label = tl.area_label(lam, len(x), x.device)
        elif args.target == "transmix":
            label = tl.transmix_label(cls_attn, token_labels, lam)
        elif args.target == "oracle":  # an upper reference: the truth, known only where masks exist
            label = truth.oracle_label(visible, lam)
    else:  # Mixup or none: every token carries the same label, so the area label is exact
        x, lam = tl.mixup(x, args.mixup_alpha) if mix == "mixup" else (x, 1.0)
        label = tl.area_label(lam, len(x), x.device)
        if args.mix == "both":  # uniform token labels: CutMix's call, so a compiled model keeps one graph
            N = x.shape[-2] * x.shape[-1] // patch_size ** 2
            logits = model(x, tl.area_label(lam, N, x.device).expand(len(x), N, 2))[0]
        else:
            logits = model(x)
    target = tl.class_target(label, torch.stack([y, y.flip(0)], dim=1), logits.shape[-1], args.smoothing)
    return tl.soft_cross_entropy(logits, target), label, visible


def train_one_epoch(model, loader, optimizer, scheduler, scaler, args, device, autocast, patch_size, epoch,
                    log):
    """One pass over the training data; returns (mean loss, images per second, last lr, target errors).

    Target errors, on data with object masks: the summed truth.target_errors of the CutMix batches' labels
    against the shares of the objects they show, a list of 3; None without masks.
    """
    model.train()
    # summed loss, non-finite losses, then truth.target_errors' three sums: on the device, read when logging
    sums = torch.zeros(5, device=device)
    seen, last_log, t0 = 0, 0, time.time()
    steps = len(loader)
    for step, (x, y, *masks) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        masks = masks[0].to(device, non_blocking=True) if masks else None  # (B, H, W), if the data has them
        with autocast:
            loss, label, visible = train_step(model, x, y, masks, patch_size, args)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        sums[:2] += torch.stack([loss.detach() * len(x), (~torch.isfinite(loss.detach())).float()])
        if visible is not None:
            sums[2:] += truth.target_errors(label, visible)
        seen += len(x)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            # the loop's only host read, every --log-every steps: a step never waits for the device.
            # A non-finite loss is caught here, up to --log-every steps late; the model is then spoilt,
            # but it is only saved at the end of an epoch, so the checkpoint on disk is not.
            totals = sums.clone()
            if dist.is_initialized():
                dist.all_reduce(totals)  # every rank reads the same sums: all stop together
            loss_sum, bad, *errors = totals.tolist()
            if bad:
                saved = os.path.join(args.output_dir, "checkpoint.pt")
                kept = f"the last checkpoint, {saved}, is intact" if os.path.isfile(saved) else "nothing was saved yet"
                raise UserError(f"non-finite loss in epoch {epoch}, steps {last_log + 1}-{step + 1}; training "
                                f"stopped, {kept}: lower --lr, set --clip-grad or --amp off")
            last_log, rate = step + 1, seen * args.world / (time.time() - t0)
            log(f"epoch {epoch} [{step + 1}/{steps}] loss {loss_sum / (seen * args.world):.4f} "
                f"lr {lr:.2e} {rate:.0f} img/s eta {(steps - step - 1) * len(x) * args.world / rate:.0f}s")
    return loss_sum / (seen * args.world), rate, lr, (errors if masks is not None else None)


# ----------------------------------------------------------------------------- the run, phase by phase

def build_model(args, info, log):
    """The model of --model for the data, with the --finetune weights if given."""
    window = {"window_size": args.window_size} if args.window_size else {}
    try:
        model = vit.create_model(args.model, num_classes=info["num_classes"], img_size=info["img_size"],
                                 in_chans=info["in_chans"], drop_path_rate=args.drop_path,
                                 fused_attn=args.fused_attn, **window)
    except ValueError as e:  # an image size the architecture cannot take
        raise UserError(f"--model {args.model} on --data {args.data}: {e}") from None
    if args.finetune:
        finetune_from(model, args, log)
    return model


def build_optimizer(args, model, device, steps_per_epoch):
    """AdamW with the recipe's schedule, the autocast context and the fp16 loss scaler: (optimizer,
    scheduler, scaler, autocast, amp)."""
    # fused: one kernel for all parameters, and under fp16 the GradScaler's inf check stays on the device
    # (the unfused step reads it on the host every step)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args, steps_per_epoch))
    amp = auto_amp(device) if args.amp == "auto" else args.amp
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    return optimizer, scheduler, scaler, autocast, amp


def what_differs(args, saved, state, model):
    """Why the weights of another run do not fit this one, in the flags that decided it: "saved with 10
    classes (--data fashion_mnist), this run has 100 (--data cifar100)", for every fact --finetune adapts;
    saved: the other run's args, as far as its checkpoint holds them. Else another --model, or the first
    parameter that differs (checkpoint.first_mismatch)."""
    if saved.get("model") in vit.PRESETS and saved["model"] != args.model:
        return f"saved with --model {saved['model']}, this run has --model {args.model}"

    def given(run, *flags):  # the first of flags that run set: " (--data cifar100)"
        flag = next((f for f in flags if run.get(f) is not None), None)
        return f" (--{flag.replace('_', '-')} {run[flag]})" if flag else ""

    theirs, mine = checkpoint.model_facts(state), checkpoint.model_facts(model.state_dict())
    words = {"classes": ("{} classes", "data"), "in_chans": ("{}-channel images", "data"),
             "img_size": ("{} px images", "img_size", "data"), "window": ("window {}", "window_size", "model")}
    differences = []
    for fact, (word, *flags) in words.items():
        if fact in theirs and fact in mine and theirs[fact] != mine[fact]:
            differences.append(f"saved with {word.format(theirs[fact])}{given(saved, *flags)}, "
                               f"this run has {mine[fact]}{given(vars(args), *flags)}")
    if differences:
        return "; ".join(differences) + "; to start a new run from these weights, adapted, use --finetune"
    return checkpoint.first_mismatch(state, model)


def resume_from(args, model, optimizer, scheduler, scaler, log):
    """Load --resume into the model and, unless --eval, the optimizer state; returns (start epoch, best,
    pending): pending, the training figures of the checkpoint's epoch if it was saved before its evaluation
    and log line (then the run starts by evaluating it), else None. The weights of a wrapped model (DDP's
    `module.`, torch.compile's `_orig_mod.`) are unwrapped first."""
    ckpt = checkpoint.load_checkpoint(args.resume)
    state, unwrapped = checkpoint.unwrap_state_dict(ckpt["model"])
    if unwrapped:
        log(f"resume: {unwrapped}")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"checkpoint {args.resume} does not fit --model {args.model} on --data {args.data}: "
                        f"{what_differs(args, ckpt.get('args') or {}, state, model)}") from None
    if args.eval:
        return 0, 0.0, None
    if not {"optimizer", "scheduler", "scaler", "epoch", "best_top1"} <= ckpt.keys():
        raise UserError(f"{args.resume} holds weights only (best.pt?): resume from checkpoint.pt, "
                        f"evaluate it with --eval or start a new run from it with --finetune")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:  # empty when the run had no fp16 loss scaling
        scaler.load_state_dict(ckpt["scaler"])
    pending = ckpt.get("pending")
    start_epoch = ckpt["epoch"] + (0 if pending else 1)
    if start_epoch >= args.epochs:
        raise UserError(f"{args.resume} has finished epoch {ckpt['epoch']} of --epochs {args.epochs}: "
                        f"nothing left to train; raise --epochs to continue")
    return start_epoch, ckpt["best_top1"], pending


def distribute(args, model, device):
    """The model as the step runs it: wrapped in DDP across processes, compiled with --compile."""
    if args.world > 1:
        # buffers are constants (position indices, shift masks): nothing to broadcast
        keep_buffers = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                        else "broadcast_buffers": False}  # renamed in torch 2.14
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None, **keep_buffers)
    if args.compile:  # after DDP, so that compiled graphs overlap the gradient all-reduce
        model = torch.compile(model)
    return model


def kernels_line(model, info, device, autocast):
    """The scaled_dot_product_attention kernel of each fused call, as torch picks it for this model, device
    and autocast (vit.attention_kernels on two blank images), in one line for the start of a run."""
    x = torch.zeros(2, info["in_chans"], info["img_size"], info["img_size"], device=device)
    _, token_labels, _ = tl.cutmix(x, model.patch_embed.patch_size, lam=0.5)
    was_training = model.training
    model.eval()  # no DropPath draws
    with autocast:
        kernels = vit.attention_kernels(model, x, token_labels)
    model.train(was_training)
    hint = " (--no-cudnn-attention turns cuDNN's off)" if "cudnn_attention" in kernels.values() else ""
    return "attention kernels: " + "; ".join(f"{what} -> {kernel}" for what, kernel in kernels.items()) + hint


def weights_fingerprint(model):
    """(P,) int64 on the model's device, one entry per parameter tensor: the sum of its elements' bit
    patterns read as integers. Equal weights give equal fingerprints on any device, and a change of one
    element changes its entry: integer sums are exact in any order, where a float sum's rounding depends
    on the reduction kernel."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return torch.stack([p.detach().view(ints[p.element_size()]).sum(dtype=torch.int64)
                        for p in model.parameters()])


def check_replicas_agree(model, world, log):
    """Compare the weights of every rank by their weights_fingerprint; log one line if they agree, else
    raise UserError on every rank alike.

    DDP makes the replicas equal once, when it wraps the model, and then only gives each the same
    gradients: a rank whose optimizer state differs (resumed from another copy of the checkpoint) or
    whose optimizer computes otherwise (another torch) drifts without any error.
    """
    mine = weights_fingerprint(model)
    high, low = mine.clone(), mine.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise UserError(f"the weights differ across the {world} ranks at the end of the run (rank 0's are saved): "
                        f"run the same code and torch on every node, and resume every node from the same "
                        f"checkpoint")
    log(f"weights agree on all {world} ranks")


def log_epoch(args, epoch, trained, top1, top5, mae, log):
    """Append the epoch's record to log.jsonl and print its line; trained: the figures of its training
    (train_loss, rate, lr, errors as train_one_epoch returns them, seconds).

    train_target_*: how right the labels this run trained on were (CutMix batches, data with masks): the
    mean |share of image 1 - true share| over pairs showing some object, and the share of those pairs
    with a ghost label (truth.target_errors).
    """
    train_loss, rate, seconds = trained["train_loss"], trained["rate"], trained["seconds"]
    error_sum, shown, ghosts = trained["errors"] or (0, 0, 0)
    record = dict(epoch=epoch, train_loss=train_loss, val_top1=top1, val_top5=top5,
                  lr=trained["lr"], epoch_time_s=seconds, img_per_s=rate,
                  label_mae_area=mae and mae["area"], label_mae_tl=mae and mae["tl"],
                  label_mae_transmix=mae and mae["transmix"],
                  train_target_mae=error_sum / shown if shown else None,
                  train_ghost_rate=ghosts / shown if shown else None)
    with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    val = "" if top1 is None else f" val top-1 {top1:.2f}% top-5 {top5:.2f}%"
    maes = "" if mae is None else " label MAE " + " ".join(f"{k} {v:.4f}" for k, v in mae.items() if v is not None)
    log(f"epoch {epoch}: train loss {train_loss:.4f}{val}{maes} ({seconds:.0f}s, {rate:.0f} img/s)")


RUN_FILES = ("checkpoint.pt", "log.jsonl")  # a folder holding either holds a run


def prepare_output_dir(args):
    """Make --output-dir, refusing one that holds another run or cannot be written, before any training.

    A run is never replaced unless told: the folder may hold a run only if --resume continues it, or with
    --overwrite (whose old files then go). A new default folder is linked as runs/latest.
    """
    out = args.output_dir
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    continues = args.resume and os.path.realpath(os.path.dirname(args.resume)) == os.path.realpath(out)
    if held and not continues:
        if not args.overwrite:
            raise UserError(f"--output-dir {out} holds a run ({', '.join(held)}): continue it with --resume "
                            f"{os.path.join(out, 'checkpoint.pt')}, replace it with --overwrite, or choose another "
                            f"--output-dir")
        for name in (*RUN_FILES, "best.pt"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as f:  # permissions, a read-only mount or a full disk show here, not an epoch later
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--output-dir {out} cannot be written ({e.strerror}); choose a writable directory") from None
    if args.new_folder:  # runs/latest: the newest run, for visualize.py and for readers of runs/
        latest = os.path.join(os.path.dirname(out), "latest")
        try:
            os.symlink(os.path.basename(out), latest + ".tmp")
            os.replace(latest + ".tmp", latest)
        except OSError:  # no symlinks here (some Windows setups): the run itself is unaffected
            pass


def run(args):
    check_args(args)
    rank, device = setup_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0 and not args.eval:
        prepare_output_dir(args)
    torch.manual_seed(args.seed)
    train_loader, val_loader, val_set, info = build_data(args, rank, device)
    if len(train_loader) == 0:
        per_rank = train_loader.num_samples if isinstance(train_loader, data.Loader) else len(train_loader.sampler)
        raise UserError(f"no training step: {per_rank} training samples per process are fewer than "
                        f"--batch-size {args.batch_size}; lower --batch-size or raise --subset")
    raw = build_model(args, info, log).to(device)
    optimizer, scheduler, scaler, autocast, amp = build_optimizer(args, raw, device, len(train_loader))
    if amp == "fp16" and device.type == "cpu":  # kept working: the tests use it as a stand-in for CUDA's fp16
        log("warning: --amp fp16 on a CPU runs ~8x slower than float32 (no fp16 matrix kernels); use --amp bf16 "
            "or --amp off")
    start_epoch, best, pending = resume_from(args, raw, optimizer, scheduler, scaler, log) if args.resume else \
        (0, 0.0, None)
    if args.eval:
        top1, top5 = evaluate(raw, val_loader, device, autocast)
        log(f"eval {args.resume or args.finetune or 'untrained model'}: top-1 {top1:.2f}% top-5 {top5:.2f}%")
        return
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if device.type == "cuda" and args.fused_attn:  # which kernels train this run, said once
        log(kernels_line(raw, info, device, autocast))
    model = distribute(args, raw, device)
    log(f"{args.model} ({sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params) on {args.data}: "
        f"{len(train_loader)} steps of {args.batch_size} x {args.world} per epoch, {args.epochs} epochs, "
        f"lr {args.lr:.2e}, mix {args.mix}, target {args.target}, {device}, amp {amp}"
        f"{', compiled' if args.compile else ''}{f', {args.repeats} repeats' if args.repeats > 1 else ''}")
    if rank == 0:
        drop_later_epochs(os.path.join(args.output_dir, "log.jsonl"), start_epoch)
    saved_args = {k: v for k, v in vars(args).items() if not isinstance(v, tuple)}

    def save(name, epoch, best, pending=None, **extra):
        state = dict(model=raw.state_dict(), epoch=epoch, args=saved_args, **extra)
        if name == "checkpoint.pt":
            state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(), best_top1=best, pending=pending)
        checkpoint.save_atomic(state, os.path.join(args.output_dir, name))

    for epoch in range(start_epoch, args.epochs):
        if pending:  # the checkpoint's epoch, trained and saved, still to evaluate and log
            trained, pending = pending, None
        else:
            # the RNG is a function of (seed, epoch, rank): a resumed run repeats the same draws, so the
            # checkpoint needs no RNG state
            torch.manual_seed(data.derive_seed(args.seed, epoch, rank))
            train_loader.set_epoch(epoch)  # the order, and on image folders the augmentation
            t0 = time.time()
            trained = dict(zip(("train_loss", "rate", "lr", "errors"), train_one_epoch(
                model, train_loader, optimizer, scheduler, scaler, args, device, autocast,
                raw.patch_embed.patch_size, epoch, log)), seconds=time.time() - t0)
        top1 = top5 = mae = None
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            if rank == 0:  # the epoch's training is kept before its evaluation, which a bad image can stop
                save("checkpoint.pt", epoch, best, pending=trained)
            top1, top5 = evaluate(raw, val_loader, device, autocast)
            mae = label_errors(raw, val_set, args, device, autocast) if rank == 0 else None
            best = max(best, top1)
        if rank == 0:
            log_epoch(args, epoch, trained, top1, top5, mae, log)
            if top1 == best:  # before checkpoint.pt, whose best_top1 must describe a best.pt on disk
                save("best.pt", epoch, best, val_top1=top1)
            save("checkpoint.pt", epoch, best)
    if dist.is_initialized():
        check_replicas_agree(raw, args.world, log)
    log(f"done: best val top-1 {best:.2f}%, last {top1:.2f}%; checkpoints in {args.output_dir}")
    if dist.is_initialized():
        dist.barrier()  # no rank tears the process group down while rank 0 still saves and logs


def resume_command(argv, saved, env=os.environ):
    """The command that continues this run from its checkpoint: the same launcher (python, or torchrun with
    the processes per node; on several nodes the rest of its flags are not known here) and the same flags,
    --resume in place."""
    launcher = ["python"]
    world = torchrun_fact("WORLD_SIZE", env)
    if world > 1:
        per_node = torchrun_fact("LOCAL_WORLD_SIZE", env)
        launcher = ["torchrun", f"--nproc_per_node={per_node}"]
        launcher += [f"--nnodes={world // per_node}", "<this run's rendezvous flags>"] if world > per_node else []
    kept, skip = [], False
    for a in argv:
        if skip or a == "--overwrite" or a.startswith("--resume="):
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        kept.append(a)
    return " ".join(launcher) + " " + shlex.join(["train.py", *kept, "--resume", saved])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    try:
        run(args)
    except (UserError, data.DataError, checkpoint.CheckpointError) as e:
        where = f" (rank {torchrun_fact('RANK')})" if args.world > 1 else ""
        print(f"error{where}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: the checkpoint on disk is whole (written atomically), say where it is
        if torchrun_fact("RANK") == 0:
            saved = os.path.join(args.output_dir, "checkpoint.pt")
            print("interrupted: " + (f"the last checkpoint is {saved}; continue exactly with: "
                                     f"{resume_command(argv, saved)}" if os.path.isfile(saved) and not args.eval
                                     else "nothing was saved"), file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
