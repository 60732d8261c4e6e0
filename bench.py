"""What TL-Align costs: training-step time and peak memory of each target, explicit and fused attention.

    python bench.py                                  # deit_t, deit_s, swin_t at 224 px, and the 32 px presets
    python bench.py --model deit_s --batch-size 64 --device cuda --amp bf16
    python bench.py --model deit_s --profile         # torch.profiler's top operators of one step
    python bench.py --model vit_mini --settings      # TL-Align's step in fp32, bf16, bf16 compiled (CPU)
    python bench.py --gpu-check                      # the first run on a GPU machine: does every path train, and how
    python bench.py --gpu-check --device cpu         # its dry run (deit_s, swin_t, batch 2: ~6 min on 2 cores)
    python bench.py --timm deit_small_patch16_224 --fused on   # timm's DeiT-S, with and without track.py
    OMP_NUM_THREADS=1 python bench.py --clock cpu ...          # CPU time per step: a shared machine's waits left out
    python bench.py --make-jpegs /tmp/jpegs --images 200       # an ImageFolder of photo-like JPEGs, ImageNet's sizes
    python bench.py --loader /tmp/jpegs --workers 1 2          # images a second the ImageNet train pipeline delivers

Modes, each a full training step (CutMix, forward, soft-target loss, backward, AdamW step):
  plain     CutMix with the area target: no labels in the model (the reference, ratio 1.00)
  tl_k2     TL-Align tracking K = 2 source weights per token (this repository)
  tl_kC     TL-Align pushing full C-class token labels, (B, N, C) per layer (the official formulation)
  transmix  TransMix's target from the last class-token attention, read from model(x, token_labels)
            as train.py does (the label path runs too; class-token models only)
  track     TL-Align's K = 2 labels carried beside the model by track.track_labels' hooks (ViTs; the
            only TL-Align mode of a timm model, --timm, which runs plain and track)
Modes are interleaved (plain, tl_k2, ... then again) so that drifts of the machine hit them alike.
Times are medians over the repetitions; a mode's time ratio is the median of its step against the plain
step of the same repetition, with the 95% interval of that median. Peak memory: CUDA's
max_memory_allocated, or on the CPU the growth of the peak resident set (VmHWM) of a fresh process
running that mode alone. Saved memory: the bytes autograd keeps for the backward (the activations),
exact and free of allocator noise.

--gpu-check is what to run first on a GPU: TL-Align training steps (train.py's: CutMix, model(x, token_labels),
soft-target loss, fused AdamW) of deit_s and swin_t on random 224 px batches, explicit and fused attention, eager
and compiled, under bf16 autocast. Per configuration: img/s, peak memory, the SDPA kernels, the host's waits for
the device per step (CUDA's sync debug mode; on a CPU the reads of a tensor's value, as test_train.py counts them)
and the agreement of its label and gradients with the explicit eager model's. Then every SDPA backend forced
through a bf16 backward of each fused model (Swin's passes a mask), checked for NaN gradients. On a CPU
(--device cpu) a dry run: batch 2, 2 steps, one configuration compiled, train.py's --amp auto.

--loader times train.py's ImageNet input pipeline instead (imagenet.load_imagenet's train transforms through a
DataLoader), per number of worker processes: wall-clock images a second, and images per CPU-second of the
workers, the cost of feeding a GPU in cores. --make-jpegs writes images to time it on when there is no
ImageNet: what makes them cost what photos cost is at photo_like.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import imagenet
import tl_align as tl
import train
import vit
from track import track_labels

MODES = ["plain", "tl_k2", "tl_kC", "transmix"]  # the default; "track" on request
DEFAULT_MODELS = {"deit_t": 32, "deit_s": 16, "swin_t": 16, "vit_mini": 128, "swin_mini": 128}  # CPU batch sizes


def build(name, fused, device, num_classes):
    """A vit.py preset, or else a timm model by its name (random weights), attention fused or not."""
    torch.manual_seed(0)
    if name in vit.PRESETS:
        model = vit.create_model(name, num_classes=num_classes, fused_attn=fused)
    else:
        import timm  # only for --timm
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        for m in model.modules():
            if isinstance(m, timm.layers.Attention):
                m.fused_attn = fused
    model = model.to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def geometry(model):
    """Patch size and image side of a vit.py or timm ViT (timm keeps (height, width) pairs)."""
    p, size = model.patch_embed.patch_size, model.patch_embed.img_size
    return (p[0], size[0]) if isinstance(p, tuple) else (p, size)


def make_step(model, optimizer, mode, batch_size, device, autocast, num_classes, smoothing=0.1):
    """A closure running one training step of `mode` on a fixed random batch."""
    p, size = geometry(model)
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(num_classes, (batch_size,), device=device)
    sources = torch.stack([y, y.flip(0)], dim=1)

    def step(record=None):
        """One step; record(t), if given, sees every tensor autograd saves for the backward."""
        xm, w, lam = tl.cutmix(x, p)
        saving = torch.autograd.graph.saved_tensors_hooks(record, lambda t: t) if record else nullcontext()
        with autocast, saving:
            if mode == "plain":
                logits, weights = model(xm), tl.area_label(lam, batch_size, device)
            elif mode == "tl_k2":
                logits, weights, _ = model(xm, w)
            elif mode == "track":
                with track_labels(model, w) as t:
                    logits = model(xm)
                weights = t.label
            elif mode == "tl_kC":  # token labels over the C classes, as the official code carries them
                tokens = torch.einsum("bnk,bkc->bnc", w, F.one_hot(sources, num_classes).float())
                logits, label, _ = model(xm, tokens)
            else:
                logits, _, cls_attn = model(xm, w)
                weights = tl.transmix_label(cls_attn, w, lam)
            if mode == "tl_kC":
                target = label * (1 - smoothing) + smoothing / num_classes
            else:
                target = tl.class_target(weights, sources, num_classes, smoothing)
            loss = tl.soft_cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def saved_mb(step, model):
    """MB of the tensors autograd keeps for the backward of one step, parameters excluded: the
    activation memory, exact and alike on every device (peak memory adds transients and allocators)."""
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}
    storages = {}

    def record(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t
    step(record)
    return sum(storages.values()) / 2 ** 20


def timed(fn, device, clock=time.perf_counter):
    """Seconds one call of fn takes (CUDA events on a GPU; on the CPU by `clock`)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = clock()
    fn()
    return clock() - t0


def cpu_peak_mb(args, name, mode, fused, batch_size):
    """Peak resident-set growth (MB) of a fresh process running 3 steps of one mode."""
    cmd = [sys.executable, __file__, "--probe-memory", name, mode, str(int(fused)),
           "--batch-size", str(batch_size), "--amp", args.amp,
           "--num-classes", str(args.num_classes)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def probe_memory(args, name, mode, fused):
    device = torch.device("cpu")
    model, opt = build(name, fused, device, args.num_classes)
    step = make_step(model, opt, mode, args.batch_size, device, autocast_for(args, device), args.num_classes)
    before_kb = status_kb("VmRSS")
    for _ in range(3):
        step()
    print(f"{(status_kb('VmHWM') - before_kb) / 1024:.1f}")


def status_kb(field):
    """A field of /proc/self/status in kB. VmHWM, the peak resident set, starts afresh at exec, unlike
    ru_maxrss, which a child started by fork inherits from its parent."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def autocast_for(args, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def bench_model(args, name, batch_size, device):
    """Rows {model, attn, mode, ms, img_s, mem_mb} for every mode, explicit and/or fused."""
    autocast = autocast_for(args, device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    for fused in {"off": [False], "on": [True], "both": [False, True]}[args.fused]:
        model, opt = build(name, fused, device, args.num_classes)
        if name not in vit.PRESETS:  # a timm model takes no labels itself
            modes = ["plain", "track"]
        else:  # transmix and track need a class-token ViT
            vit_only = ("transmix", "track")
            modes = [m for m in args.modes if m not in vit_only or isinstance(model, vit.VisionTransformer)]
        steps = {m: make_step(model, opt, m, batch_size, device, autocast, args.num_classes) for m in modes}
        times = {m: [] for m in modes}
        peaks = {m: 0.0 for m in modes}
        for rep in range(args.warmup + args.reps):
            for m in modes:  # interleaved
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t = timed(steps[m], device, clock)
                if rep >= args.warmup:
                    times[m].append(t)
                if device.type == "cuda":
                    peaks[m] = max(peaks[m], torch.cuda.max_memory_allocated(device) / 2 ** 20)
        saved = {m: saved_mb(steps[m], model) for m in modes}
        for m in modes:
            if device.type == "cpu" and not args.no_memory:
                peaks[m] = cpu_peak_mb(args, name, m, fused, batch_size)
            ms = 1e3 * statistics.median(times[m])
            # each repetition's step against the plain step next to it: drifts of the machine cancel
            ratio, lo, hi = median_with_ci([t / p for t, p in zip(times[m], times["plain"])])
            rows.append(dict(model=name, attn="fused" if fused else "explicit", mode=m, ms=ms, ratio=ratio, lo=lo,
                             hi=hi, img_s=batch_size / ms * 1e3, mem_mb=peaks[m], saved_mb=saved[m]))
        rows.append(dict(model=name, attn="fused" if fused else "explicit", mode="inference",
                         img_s=inference_rate(model, batch_size, device, autocast, args.reps, clock)))
    return rows


def median_with_ci(values):
    """The median and its distribution-free 95% confidence interval: the order statistics
    n/2 -+ 0.98 sqrt(n) (the binomial sign-test interval; about the range for fewer than 6 values)."""
    v, n = sorted(values), len(values)
    half = 0.98 * math.sqrt(n)
    return statistics.median(v), v[max(0, math.floor(n / 2 - half))], v[min(n - 1, math.ceil(n / 2 + half) - 1)]


@torch.no_grad()
def inference_rate(model, batch_size, device, autocast, reps, clock):
    """Images per second of model(x) in eval mode, no labels (median of reps)."""
    model.eval()
    size = geometry(model)[1]
    x = torch.randn(batch_size, 3, size, size, device=device)
    with autocast:
        model(x)
        rate = batch_size / statistics.median(timed(lambda: model(x), device, clock) for _ in range(reps))
    model.train()
    return rate


HEADER = (f"{'model':10s} {'attn':8s} {'mode':9s} {'ms/step':>9s} {'img/s':>8s} {'x plain':>8s} {'95% CI':>15s} "
          f"{'peak MB':>8s} {'x plain':>8s} {'saved MB':>8s} {'x plain':>8s}")


def print_rows(rows):
    """Table rows. Time ratios are the median over repetitions of each step against the plain step of
    the same repetition, with its 95% interval; memory ratios are to plain of the same model and path."""
    ref = {(r["model"], r["attn"]): r for r in rows if r["mode"] == "plain"}
    for r in rows:
        if r["mode"] == "inference":
            print(f"{r['model']:10s} {r['attn']:8s} {'inference':9s} {'':>9s} {r['img_s']:8.1f}")
            continue
        base = ref[(r["model"], r["attn"])]
        ci = f"[{r['lo']:.3f}, {r['hi']:.3f}]"
        print(f"{r['model']:10s} {r['attn']:8s} {r['mode']:9s} {r['ms']:9.1f} {r['img_s']:8.1f} {r['ratio']:8.3f} "
              f"{ci:>15s} {r['mem_mb']:8.0f} {r['mem_mb'] / max(base['mem_mb'], 1e-9):8.3f} "
              f"{r['saved_mb']:8.1f} {r['saved_mb'] / base['saved_mb']:8.3f}")


def summary(rows):
    """One line: what TL-Align (K=2) and the official K=C cost per model, and what fusing gains."""
    parts = []
    for name in dict.fromkeys(r["model"] for r in rows):
        get = {(r["attn"], r["mode"]): r for r in rows if r["model"] == name}
        for attn in ("explicit", "fused"):
            if (attn, "plain") in get:
                costs = [f"{label} {100 * (get[(attn, mode)]['ratio'] - 1):+.1f}%"
                         for mode, label in (("tl_k2", "K=2"), ("tl_kC", "K=C"), ("track", "track"))
                         if (attn, mode) in get]
                parts.append(f"{name} {attn}: " + ", ".join(costs))
        if ("fused", "plain") in get and ("explicit", "plain") in get:
            speed = get[("fused", "plain")]["ms"] / get[("explicit", "plain")]["ms"]
            parts.append(f"{name} fused/explicit step {speed:.2f}x")
    print("summary: " + "; ".join(parts))


def profile(args, name, device):
    model, opt = build(name, args.fused == "on", device, args.num_classes)
    batch_size = args.batch_size or DEFAULT_MODELS.get(name, 16)
    mode = "tl_k2" if name in vit.PRESETS else "track"  # a timm model carries labels only through track.py
    step = make_step(model, opt, mode, batch_size, device, autocast_for(args, device), args.num_classes)
    step()
    with torch.profiler.profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total" if device.type == "cpu" else "self_cuda_time_total",
                                    row_limit=15))


# --settings: what train.py's CPU defaults buy (--amp auto, --compile auto), each in a fresh process
SETTINGS = {"fp32": ("off", False), "bf16": ("bf16", False), "bf16 + compile": ("bf16", True),
            "fp32 + compile": ("off", True)}


def probe_setting(args, name):
    """Steps of TL-Align (K = 2, explicit attention) at one setting, in this process; prints the seconds
    of the first step (compilation included) and the median of the next --reps steps, as JSON."""
    device = torch.device("cpu")
    model, opt = build(name, False, device, args.num_classes)
    compiled = torch.compile(model) if args.compile else model  # forwards attributes to the model
    step = make_step(compiled, opt, "tl_k2", args.batch_size, device, autocast_for(args, device), args.num_classes)
    first = timed(step, device)
    print(json.dumps(dict(first=first, step=statistics.median(timed(step, device) for _ in range(args.reps)))))


def settings(args, name, batch_size):
    """The table of SETTINGS for one model: compiled settings run twice, with an empty inductor cache
    (what a first run pays) and then with the one it left (what later runs pay)."""
    print(f"{name}, batch {batch_size}, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"TL-Align K = 2 training steps, median of {args.reps}")
    print("| setting | first step (s): new cache / warm cache | ms/step | img/s | x fp32 |\n|---|---|---|---|---|")
    base = None
    for label, (amp, compile_) in SETTINGS.items():
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
        cmd = [sys.executable, __file__, "--probe-setting", name, "--amp", amp, "--batch-size", str(batch_size),
               "--reps", str(args.reps), "--num-classes", str(args.num_classes)] + (["--compile"] if compile_ else [])
        runs = [json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                           .strip().splitlines()[-1]) for _ in range(2 if compile_ else 1)]
        ms = runs[-1]["step"] * 1e3
        base = base or ms
        first = " / ".join(f"{r['first']:.1f}" for r in runs)
        print(f"| {label} | {first} | {ms:.0f} | {batch_size / ms * 1e3:.0f} | {base / ms:.2f} |", flush=True)


# --loader, --make-jpegs: how many images a second one CPU core feeds a GPU through the ImageNet pipeline

def smooth_field(rng, w, h, cells, std):
    """(h, w) float32: normal noise of `std` on a grid `cells` wide, upsampled bicubically to the image."""
    from PIL import Image
    coarse = rng.normal(0, std, (cells * h // w + 2, cells + 2)).astype("float32")
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def photo_like(rng, w, h, objects=20):
    """A (h, w) RGB PIL image that costs what a photo costs to store and decode: brightness varying at
    five scales from the whole image to 3 px, slow colour casts, overlapping ellipses of other colours
    (sharp edges) and sensor-like grain. Neither flat (too cheap) nor white noise (too dear)."""
    from PIL import Image, ImageDraw
    brightness = sum(smooth_field(rng, w, h, c, s) for c, s in ((2, 40), (6, 25), (20, 15), (60, 15), (w // 3, 30)))
    img = 110 + brightness[..., None] + np.stack([smooth_field(rng, w, h, 4, 20) for _ in range(3)], -1)
    regions = Image.new("L", (w, h))  # 0: background, k: the k-th ellipse (later ones in front)
    for k in range(1, objects + 1):
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, 120)
        ImageDraw.Draw(regions).ellipse([x - r, y - r // 2, x + r, y + r], fill=k)
    img += rng.normal(0, 40, (objects + 1, 3))[np.asarray(regions)]  # a colour shift per region
    img += rng.normal(0, 24, (h, w, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_jpegs(root, images, classes=4, seed=0):
    """An ImageFolder of `images` JPEGs (quality 90) in root/train/<class>/ and one per class in root/val/,
    at ImageNet-like sizes: the long side 500 px for 4 in 5 images (else 250-500), 4:3, 3:2 or square,
    landscape 3 times in 4. Returns the mean file size in KB and the mean width and height."""
    rng = np.random.default_rng(seed)
    sizes, dims = [], []
    for i in range(images + classes):
        split, name = ("train", i % classes) if i < images else ("val", i - images)
        side = 500 if rng.random() < 0.8 else int(rng.integers(250, 500))
        short = round(side * rng.choice([3 / 4, 2 / 3, 1.0], p=[0.6, 0.3, 0.1]))
        w, h = (side, short) if rng.random() < 0.75 else (short, side)
        folder = os.path.join(root, split, f"n{name:08d}")
        os.makedirs(folder, exist_ok=True)
        file = os.path.join(folder, f"{i:06d}.JPEG")
        photo_like(rng, w, h).save(file, "JPEG", quality=90)
        sizes.append(os.path.getsize(file) / 1e3)
        dims.append((w, h))
    return statistics.mean(sizes), *(statistics.mean(d) for d in zip(*dims))


def loader_rate(dataset, workers, batch_size, warmup, batches):
    """(images per second, images per CPU second of the workers, bytes of a batch) of a DataLoader over
    dataset with `workers` processes, as train.py builds it (persistent workers, keys (index, epoch, copy)).
    The first is timed over `batches` batches after `warmup` (worker start-up and their first prefetched
    batches); the second counts every image and the workers' CPU time (user + system, read when they have
    exited), which a shared machine's waits do not inflate. The bytes are what a worker hands over through
    shared memory per batch. Images are drawn with replacement: a small folder serves any count."""
    n = (warmup + batches) * batch_size
    keys = [(i, 0, 0) for i in torch.randint(len(dataset), (n,)).tolist()]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=True)
    before = os.times()
    for i, batch in enumerate(loader):
        if i + 1 == warmup:
            t0 = time.perf_counter()
    rate = batches * batch_size / (time.perf_counter() - t0)
    del loader  # persistent workers exit with their loader: then their CPU time is the children's
    after = os.times()
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return rate, n / cpu, sum(t.nbytes for t in batch)


def bench_loader(args):
    """img/s of train.py's ImageNet train pipeline (imagenet.load_imagenet, 224 px) per --workers count."""
    dataset = imagenet.load_imagenet(args.loader, train=True)
    batch_size = args.batch_size or 32
    print(f"loader {args.loader}: {len(dataset)} images, imagenet.load_imagenet train transforms to uint8, 224 px, "
          f"batch {batch_size}, {len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__}")
    print(f"{'workers':>7s} {'img/s':>8s} {'img/s per worker':>16s} {'img per CPU-s':>13s} {'MB per batch':>12s}")
    for workers in args.workers:
        warmup = max(args.warmup * workers, 1)  # every worker's first batch, and the start-up
        rate, per_cpu, size = loader_rate(dataset, workers, batch_size, warmup, args.reps * workers)
        print(f"{workers:7d} {rate:8.1f} {rate / workers:16.1f} {per_cpu:13.1f} {size / 2**20:12.2f}", flush=True)


# --gpu-check: the first run on a GPU (a dry run on a CPU): does every path train, how fast, does a step
# wait for the device, do fused and explicit attention agree, does any SDPA kernel return NaN gradients

# every way the host can read a tensor's value; on a GPU each one waits for the device to catch up
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
CUTMIX_DRAWS = {"_sample_lambda", "_rand_box"}  # lam and the box, drawn from CPU tensors in any run
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
# per device: models, batch, timed steps, which configurations are compiled too (--compiled)
GPU_CHECK = {"cuda": dict(models=["deit_s", "swin_t"], batch_size=64, steps=50, compiled="all"),
             "cpu": dict(models=["deit_s", "swin_t"], batch_size=2, steps=2, compiled="one")}


@contextmanager
def host_reads(loop_of):
    """A list that collects, while inside, every host read of a tensor's value (HOST_READS: .item(), .tolist(),
    .cpu(), .numpy(), bool/int/float/index of a tensor), by our code or torch's Python code, that
    loop_of(frame of the reading function) names: as (loop_of's name, read, function, line); loop_of returns
    None for reads not to count. On a CPU every tensor is a host tensor, so the reads are counted where they
    are made, which is where a GPU run would wait."""
    reads, originals = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1)
            loop = loop_of(caller)
            if loop:
                reads.append((loop, name, caller.f_code.co_name, caller.f_lineno))
            return original(self, *args, **kwargs)
        return counted
    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def in_step(frame):
    """'step' for a frame of make_step's step or of anything it calls, except CutMix's host draws; else None."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in CUTMIX_DRAWS:
            return None
        if code.co_name == "step" and code.co_filename == __file__:
            return "step"
        frame = frame.f_back
    return None


@contextmanager
def device_syncs(device):
    """A list that holds, after the block, each wait of the host for the device during it: on CUDA the
    synchronizing operations torch's sync debug mode reports (warnings, caught); on a CPU the host reads made
    in make_step's steps (host_reads), the calls a GPU run would wait at."""
    if device.type != "cuda":
        with host_reads(in_step) as reads:
            yield reads
        return
    syncs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs += [w for w in caught if "synchronizing" in str(w.message)]


def timed_steps(step, steps, device):
    """(seconds, host waits) of `steps` calls of step; the waits (device_syncs) are counted inside the timing,
    where a GPU run's waits cost their time."""
    found = []

    def run():
        with device_syncs(device) as syncs:
            for _ in range(steps):
                step()
        found.extend(syncs)
    return timed(run, device), len(found)


def tl_align_gradients(model, x, token_labels, y, autocast, num_classes):
    """One TL-Align forward and backward (train.py's step, no optimizer): the aligned label (B, K) and the
    parameters' gradients, in the order of model.parameters()."""
    model.zero_grad(set_to_none=True)
    with autocast:
        logits, label, _ = model(x, token_labels)
        loss = tl.soft_cross_entropy(logits, tl.class_target(label, torch.stack([y, y.flip(0)], 1), num_classes, 0.1))
    loss.backward()
    return label.detach(), [p.grad for p in model.parameters()]


def agreement(name, model, runner, batch, autocast, num_classes):
    """(max |label difference|, max relative gradient difference) of runner (model, maybe compiled) against the
    explicit eager model with the same weights on one fixed CutMix batch, under `autocast`. The gradient
    difference of a parameter is max |g - g_ref| / max |g_ref|; the figure is the largest over parameters."""
    device = next(model.parameters()).device
    reference, _ = build(name, False, device, num_classes)
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    p, size = geometry(model)
    x, w, _ = tl.cutmix(torch.randn(batch, 3, size, size, device=device), p)
    y = torch.randint(num_classes, (batch,), device=device)
    label, grads = tl_align_gradients(runner, x, w, y, autocast, num_classes)
    ref_label, ref_grads = tl_align_gradients(reference, x, w, y, autocast, num_classes)
    grad_diff = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(grads, ref_grads))
    return (label - ref_label).abs().max().item(), grad_diff


def check_configs(models, compiled):
    """(model, fused, compiled) in the order they run: each model explicit, then fused, eager and, by
    --compiled, compiled too: all, one (the first model's fused path: the most code under compile) or none."""
    return [(name, fused, comp) for name in models for fused in (False, True) for comp in (False, True)
            if not comp or compiled == "all" or (compiled == "one" and name == models[0] and fused)]


def check_config(args, name, fused, compiled, device, autocast):
    """One row of the table: args.steps TL-Align training steps of a fresh model on a random batch, after one
    warm-up step (which compiles), with fused AdamW as train.py's; the figures of GPU_CHECK_HEADER."""
    model, _ = build(name, fused, device, args.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    runner = torch.compile(model) if compiled else model  # forwards attributes to the model
    step = make_step(runner, optimizer, "tl_k2", args.batch_size, device, autocast, args.num_classes)
    first = timed(step, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, syncs = timed_steps(step, args.steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    label_diff, grad_diff = (agreement(name, model, runner, args.batch_size, autocast, args.num_classes)
                             if fused or compiled else (None, None))
    p, size = geometry(model)
    x, w, _ = tl.cutmix(torch.randn(args.batch_size, 3, size, size, device=device), p)
    with autocast:
        kernels = vit.attention_kernels(model, x, w)  # the eager calls' (a compiled model's cannot be seen so)
    return dict(model=name, attn="fused" if fused else "explicit", compiled=compiled, first=first,
                img_s=args.steps * args.batch_size / seconds, peak_mb=peak, syncs=syncs / args.steps,
                kernels=kernels, label_diff=label_diff, grad_diff=grad_diff)


GPU_CHECK_HEADER = (f"{'model':9s} {'attn':8s} {'compile':7s} {'first s':>7s} {'img/s':>8s} {'peak MB':>7s} "
                    f"{'syncs/step':>10s} {'kernels':16s} {'label diff':>10s} {'grad diff':>9s}")


def print_check_row(r):
    """A row under GPU_CHECK_HEADER; n/a: no peak memory on a CPU; ref: the reference of the agreement."""
    kernels = ",".join(dict.fromkeys(k.split("_")[0] for k in r["kernels"].values())) or "-"  # as short_name
    peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
    diffs = ("ref", "ref") if r["label_diff"] is None else (f"{r['label_diff']:.1e}", f"{r['grad_diff']:.1e}")
    print(f"{r['model']:9s} {r['attn']:8s} {'yes' if r['compiled'] else 'no':7s} {r['first']:7.3f} {r['img_s']:8.1f} "
          f"{peak:>7s} {r['syncs']:10.2f} {kernels:16s} {diffs[0]:>10s} {diffs[1]:>9s}", flush=True)


def print_kernels(rows, amp):
    """Each kind of SDPA call of each fused model, and the kernel torch picks for it."""
    print(f"\nSDPA kernels, one forward with token labels, amp {amp} (vit.attention_kernels; explicit attention "
          "makes no SDPA call):")
    calls = {(r["model"], call): kernel for r in rows for call, kernel in r["kernels"].items()}
    width = max((len(call) for _, call in calls), default=0)
    for (name, call), kernel in calls.items():
        print(f"{name:9s} {call:{width}s}  {kernel}")


def forced_backend(model, backend, x, y):
    """'ok', 'NaN/Inf' (in a parameter's gradient) or 'n/a' of one bf16 forward and backward of model(x) with
    SDPA forced to `backend`, and why n/a (the first line of torch's reason). Without token labels: their
    calls have no backward, and in bf16 they run in float32, which flash and cuDNN kernels do not take."""
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                with torch.autocast(x.device.type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
        except RuntimeError as e:
            # the error is generic; torch's checks (sdp_utils) warn why, under a "... not used because:" line
            reasons = [str(w.message).split(" (Triggered internally")[0].strip() for w in caught
                       if "sdp_utils" in str(w.message)]
            reasons = [r for r in reasons if r and not r.endswith("because:")]
            return "n/a", (reasons or [str(e)])[0].splitlines()[0]
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return ("ok" if finite else "NaN/Inf"), None


def nan_check(models, batch, device, num_classes):
    """The table of forced SDPA backends (rows) against the fused models (columns; Swin passes a mask)."""
    results, columns = {}, {}
    for name in models:
        model, _ = build(name, True, device, num_classes)
        columns[name] = f"{name} ({'mask' if isinstance(model, vit.SwinTransformer) else 'no mask'})"
        size = geometry(model)[1]
        x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(num_classes, (batch,), device=device)
        results[name] = {b: forced_backend(model, b, x, y) for b in BACKENDS}
    print(f"\nSDPA backends forced (torch.nn.attention.sdpa_kernel), fused attention, bf16 forward + backward, batch "
          f"{batch}: ok / NaN/Inf in gradients / n/a (not available here)")
    print(f"{'backend':10s} " + " ".join(f"{c:18s}" for c in columns.values()))
    for b in BACKENDS:
        print(f"{short_name(b):10s} " + " ".join(f"{results[n][b][0]:18s}" for n in models))
    for b in BACKENDS:
        reasons = {}  # reason -> models, so that a reason common to all is printed once
        for name in models:
            status, reason = results[name][b]
            if reason:
                reasons.setdefault(reason, []).append(name)
            if status == "NaN/Inf":
                advice = (": train with --no-cudnn-attention (train.py; torch.backends.cuda.enable_cudnn_sdp(False))"
                          if b == SDPBackend.CUDNN_ATTENTION else "")
                print(f"  warning: {short_name(b)} attention gave NaN/Inf gradients ({name}){advice}")
        for reason, names in reasons.items():
            print(f"  n/a {short_name(b)} ({', '.join(names)}): {reason}")


def short_name(backend):
    """flash, efficient, cudnn or math."""
    return backend.name.split("_")[0].lower()


def device_name(device):
    """The GPU with its capability, memory, CUDA and cuDNN versions; or the CPU's model name and threads."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} (capability {props.major}.{props.minor}, {props.total_memory / 2 ** 30:.0f} GB, "
                f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        name = "CPU"
    threads = torch.get_num_threads()
    return f"{name} ({threads} thread{'s' if threads > 1 else ''})"


def gpu_check(args, device):
    """--gpu-check: a header, the table of configurations, the kernel table and the forced-backend table. A
    configuration that raises gets an error row, the others run on, and the exit status is 1."""
    start = time.perf_counter()
    autocast = autocast_for(args, device)
    print(f"gpu-check: {device.type}, {device_name(device)}, torch {torch.__version__}")
    print(f"TL-Align training steps (CutMix, model(x, token_labels), soft-target loss, backward, fused AdamW), "
          f"batch {args.batch_size} of random images at each model's size, amp {args.amp}, 1 warm-up + {args.steps} "
          f"timed steps")
    print(GPU_CHECK_HEADER, flush=True)
    rows, configs = [], check_configs(args.model, args.compiled)
    for name, fused, compiled in configs:
        try:
            rows.append(check_config(args, name, fused, compiled, device, autocast))
        except Exception as e:  # a path that fails (compile, a kernel, memory) must not hide the others' figures
            print(f"{name:9s} {'fused' if fused else 'explicit':8s} {'yes' if compiled else 'no':7s} error: "
                  f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", flush=True)
            continue
        print_check_row(rows[-1])
    print_kernels(rows, args.amp)
    nan_check(args.model, args.batch_size, device, args.num_classes)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if len(rows) < len(configs):
        sys.exit(f"error: {len(configs) - len(rows)} of {len(configs)} configurations failed (their rows above)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", choices=list(vit.PRESETS), help=f"default: {' '.join(DEFAULT_MODELS)}, "
                   "or none if --timm is given")
    p.add_argument("--timm", nargs="+", default=[], metavar="NAME", help="timm models (pretrained=False), timed "
                   "plain and with track.track_labels")
    p.add_argument("--batch-size", type=int, default=None, help="default: per model, sized for a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], help="default: off; --gpu-check: bf16 on CUDA, "
                   "train.py's --amp auto on a CPU (bf16 where the CPU has bf16 instructions)")
    p.add_argument("--fused", default="both", choices=["off", "on", "both"], help="fused attention")
    p.add_argument("--num-classes", type=int, default=1000, help="C of the K = C mode (ImageNet's 1000)")
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES + ["track"],
                   help="plain is the reference of the ratios")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="CPU timing: wall clock, or the process's "
                   "CPU time, which counts a step's work and not its waiting on a shared machine (use one thread, "
                   "OMP_NUM_THREADS=1, so that idle threads spinning is not counted)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory probes (one process each)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--probe-memory", nargs=3, metavar=("MODEL", "MODE", "FUSED"), help=argparse.SUPPRESS)
    p.add_argument("--settings", action="store_true",
                   help="TL-Align's step in fp32, bf16 and compiled, fresh processes (CPU: train.py's defaults)")
    p.add_argument("--probe-setting", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loader", metavar="DIR", help="images a second of the ImageNet train pipeline from DIR "
                   "(DIR/train/<class>/*.JPEG, DIR/val/...) with --workers processes; --batch-size default 32, "
                   "--warmup and --reps in batches per worker")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="loader processes to time (--loader)")
    p.add_argument("--make-jpegs", metavar="DIR", help="write --images photo-like JPEGs of ImageNet's sizes to DIR")
    p.add_argument("--images", type=int, default=200, help="training images of --make-jpegs")
    p.add_argument("--gpu-check", action="store_true", help="the first run on a GPU (--device cpu: a dry run): "
                   "TL-Align steps of each --model, explicit and fused attention, eager and compiled; img/s, "
                   "peak memory, SDPA kernels, host syncs per step, fused-vs-explicit agreement, NaN check of "
                   "every SDPA backend. Defaults per device: " + "; ".join(
                       f"{d}: {' '.join(c['models'])}, --batch-size {c['batch_size']}, --steps {c['steps']}, "
                       f"--compiled {c['compiled']}" for d, c in GPU_CHECK.items()))
    p.add_argument("--steps", type=int, help="timed training steps of each --gpu-check configuration")
    p.add_argument("--compiled", choices=["all", "one", "none"], help="--gpu-check configurations also run "
                   "compiled: all, one (the first model's fused attention) or none")
    args = p.parse_args(argv)
    if "plain" not in args.modes:
        p.error("--modes must include plain, the reference of every ratio")
    if args.probe_memory:
        name, mode, fused = args.probe_memory
        return probe_memory(args, name, mode, fused == "1")
    if args.probe_setting:
        return probe_setting(args, args.probe_setting)
    if args.make_jpegs:
        kb, w, h = make_jpegs(args.make_jpegs, args.images)
        return print(f"{args.make_jpegs}: {args.images} training images, mean {w:.0f} x {h:.0f} px, {kb:.0f} KB")
    if args.loader:
        if min(args.workers) < 1:
            p.error("--workers: at least 1 (0 would time the main process, not a worker)")
        try:
            return bench_loader(args)
        except data.DataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    if args.gpu_check:
        device = torch.device(args.device)
        if device.type not in GPU_CHECK:
            p.error(f"--gpu-check runs on {' or '.join(GPU_CHECK)}, not {device.type}")
        defaults = GPU_CHECK[device.type]
        args.amp = args.amp or ("bf16" if device.type == "cuda" else train.auto_amp(device))
        args.model, args.batch_size = args.model or defaults["models"], args.batch_size or defaults["batch_size"]
        args.steps, args.compiled = args.steps or defaults["steps"], args.compiled or defaults["compiled"]
        return gpu_check(args, device)
    args.amp = args.amp or "off"
    models = args.model or ([] if args.timm else list(DEFAULT_MODELS))
    if args.settings:
        for name in args.model or ["vit_mini"]:
            settings(args, name, args.batch_size or DEFAULT_MODELS.get(name, 16))
        return
    device = torch.device(args.device)
    if args.profile:
        return profile(args, (models + args.timm)[0], device)
    rows = []
    print(f"device {device}, amp {args.amp}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock")
    print(HEADER, flush=True)
    for name in models + args.timm:  # each model's rows as soon as they are measured
        rows += bench_model(args, name, args.batch_size or DEFAULT_MODELS.get(name, 16), device)
        print_rows([r for r in rows if r["model"] == name])
        sys.stdout.flush()
    summary(rows)


if __name__ == "__main__":
    main()
