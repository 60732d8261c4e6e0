"""Checkpoints: saving a run's files, reading the usual checkpoint formats, fitting weights to a model.

- `save_atomic`, `load_checkpoint`: train.py's checkpoint.pt / best.pt, written so that a kill leaves
  the old file or the new one; read back with DeiT's and the official TL-Align's .pth, timm's .pth /
  .bin and .safetensors, without running code from the file (a whole pickled model is recognised and
  refused with the advice to save its state dict).
- `unwrap_state_dict`: the weights of a model wrapped by DDP / DataParallel (`module.`) or torch.compile
  (`_orig_mod.`) under the inner model's keys. `first_mismatch`, `model_facts`: where weights and a
  model differ, and what weights say of their model (classes, channels, image size, window), for errors.
- `adapt_state_dict` (`load_adapted` with the file read and the weights loaded): weights of another
  image size, window, class count or channel count made to fit a model of vit.py, a distilled DeiT's
  extra token dropped. Position embeddings are resized as DeiT's fine-tuning code does (bicubic,
  align_corners=False, no antialiasing), Swin's bias tables as Swin's own code does (bicubic), input
  channels by the rule of timm's adapt_input_conv (timm/models/_manipulate.py); facts, not code.

Models are recognised by their state dicts' names (timm's), so this file needs only torch. A file
that cannot be read raises CheckpointError with a one-line message saying what to do; weights that
do not fit raise ValueError naming the first parameter and both shapes.
"""
import argparse
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; its one-line message says what to give instead."""


# ----------------------------------------------------------------------------- files

def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill at any moment leaves the old or the new file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """{'model': state dict, ...} from a file, loaded without running code from it.

    Reads train.py's checkpoint.pt / best.pt, DeiT's and the official TL-Align's .pth ({'model': state
    dict}; their training checkpoints add 'optimizer', 'epoch' and 'args', an argparse.Namespace made a
    dict here), a bare state dict (timm's .pth / .bin) and .safetensors (needs the safetensors package).
    """
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "not found"
        raise CheckpointError(f"checkpoint {path} {what}; give the path of a checkpoint file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors files needs the safetensors package "
                                  f"(pip install safetensors)") from None
    try:
        if path.endswith(".safetensors"):
            ckpt = load_file(path)
        else:  # weights_only: tensors and plain containers, plus the Namespace of DeiT's checkpoints
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding objects weights_only refuses
        model = pickled_model(path, e)
        if model:
            raise CheckpointError(f"checkpoint {path} is a whole pickled model ({model}, as torch.save(model) writes "
                                  f"it), which cannot be loaded without running code from the file: save "
                                  f"model.state_dict() instead") from None
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt or not a "
                              f"checkpoint: use another file") from None
    if isinstance(ckpt, dict) and "model" not in ckpt:
        ckpt = {"model": ckpt}  # a bare state dict
    weights = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint {path} holds no model weights: neither a state dict nor a dict with one "
                              f"under 'model'")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def pickled_model(path, error) -> str | None:
    """The class of the model in a file that torch.save(model) wrote (e.g. 'vit.VisionTransformer'), or None.

    weights_only's error names the first global it refused: the model's class. That it is a model is
    read from all the globals the pickle names, listed without running them: a model's include torch.nn's
    layers (Linear, LayerNorm, ...).
    """
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if refused is None:  # truncated, not a checkpoint: no global was refused
        return None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # torch's format before 1.6, which it does not list: called unreadable
        return None
    return refused.group(1) if any(name.startswith("torch.nn.modules.") for name in names) else None


# ----------------------------------------------------------------------------- keys and facts of weights

WRAPPERS = {"module.": "DDP / DataParallel", "_orig_mod.": "torch.compile"}  # the prefix each puts on every key


def unwrap_state_dict(state_dict: dict) -> tuple[dict, str | None]:
    """The weights of a wrapped model under the inner model's keys: (state dict, note or None).

    DistributedDataParallel and DataParallel save their model's keys under `module.`, torch.compile under
    `_orig_mod.`, nested in either order (train.py compiles its DDP model: `_orig_mod.module.`). A prefix
    is stripped only when every key has it; the note says which, None if none was.
    """
    wrappers = []
    while prefix := next((p for p in WRAPPERS if state_dict and all(k.startswith(p) for k in state_dict)), None):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        wrappers.append(prefix)
    if not wrappers:
        return state_dict, None
    return state_dict, (f"stripped {''.join(wrappers)!r} from every key (a model wrapped by "
                        f"{' around '.join(WRAPPERS[p] for p in wrappers)})")


def first_mismatch(state_dict: dict, model: nn.Module) -> str | None:
    """The first parameter in which state_dict does not fit model, in words; None if it fits strictly.

    A parameter missing from state_dict while every key has a prefix that no wrapper of WRAPPERS adds
    ('backbone.', 'model.', ...) and under which the parameter is there: the prefix is named instead, as
    stripping an unknown prefix silently could load weights that are not the model's.
    """
    own = model.state_dict()
    for k, mine in own.items():
        theirs = state_dict.get(k)
        if theirs is None:
            first = next(iter(state_dict), "")
            for prefix in (first[:i + 1] for i, c in enumerate(first) if c == "."):
                if prefix + k in state_dict and all(key.startswith(prefix) for key in state_dict):
                    return (f"all keys start with {prefix!r}, a prefix of no known wrapper (DDP's 'module.', "
                            f"torch.compile's '_orig_mod.'); {k} is there as {prefix + k!r}: if these are the "
                            f"model's weights, save them with {prefix!r} removed from the keys")
            return f"{k} {tuple(mine.shape)} is missing from the checkpoint"
        if theirs.shape != mine.shape:
            return f"{k} is {tuple(theirs.shape)} in the checkpoint, {tuple(mine.shape)} in the model"
    extra = next((k for k in state_dict if k not in own), None)
    return extra and f"{extra} {tuple(state_dict[extra].shape)} in the checkpoint has no place in the model"


def model_facts(state_dict: dict) -> dict:
    """What weights in timm's names say of their model, each fact only if they hold it: classes (the
    classifier's rows), in_chans (the patch embedding's), img_size (ViT: the position grid times the
    patch) and window (Swin: the first relative-position bias table's)."""
    facts = {}
    head = state_dict.get("head.weight", state_dict.get("head.fc.weight"))
    if head is not None and head.dim() == 2:
        facts["classes"] = head.shape[0]
    proj, pos = state_dict.get("patch_embed.proj.weight"), state_dict.get("pos_embed")
    if proj is not None and proj.dim() == 4:
        facts["in_chans"] = proj.shape[1]
        if pos is not None and pos.dim() == 3:  # the class token's position, then the patches' grid
            facts["img_size"] = math.isqrt(pos.shape[1] - 1) * proj.shape[-1]
    table = next((v for k, v in state_dict.items() if k.endswith("relative_position_bias_table")), None)
    if table is not None:
        facts["window"] = (math.isqrt(table.shape[0]) + 1) // 2
    return facts


# ----------------------------------------------------------------------------- weights of another shape

def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the patch positions resized as a g x g image, class token kept.

    Bicubic, align_corners=False, no antialiasing, as DeiT's fine-tuning code (timm's checkpoint filter
    antialiases by default, which changes the kernel even when enlarging). The same tensor when g == grid.
    """
    g, D = math.isqrt(pos_embed.shape[1] - 1), pos_embed.shape[2]
    if g == grid:
        return pos_embed
    patches = pos_embed[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g), row-major tokens
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False,
                            antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D)  # (1, grid*grid, D)
    return torch.cat([pos_embed[:, :1], patches.to(pos_embed.dtype)], dim=1)


def resample_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2w-1)^2, h) -> ((2*window-1)^2, h): a Swin relative-position bias table for another window size.

    Each head's table is a (2w-1) x (2w-1) image over the offsets (dy, dx), resized bicubic
    (align_corners=False) as Swin's own fine-tuning to larger windows does. The same tensor if w == window.
    """
    side, h = math.isqrt(table.shape[0]), table.shape[1]
    new = 2 * window - 1
    if side == new:
        return table
    grid = table.T.reshape(1, h, side, side)  # (1, h, 2w-1, 2w-1), row = dy, column = dx
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False, antialias=False)
    return grid.reshape(h, new * new).T.to(table.dtype)  # ((2*window-1)^2, h)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(D, c, p, p) patch-embedding kernels for c-channel images -> (D, in_chans, p, p), by timm's rule.

    To one channel: the kernels summed over the c channels, so that a grey image gets the embedding its
    c-channel copy got. To any other count: the c kernels repeated cyclically and scaled by c / in_chans,
    so that an image whose channels repeat its c channels gets their embedding (timm's adapt_input_conv,
    which only takes c = 3 there). The same tensor if c == in_chans.
    """
    c = weight.shape[1]
    if c == in_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / c), 1, 1)[:, :in_chans] * (c / in_chans)
    return w.to(weight.dtype)


def adapt_state_dict(state_dict: dict, model: nn.Module, reset_head: bool = True) -> tuple[dict, list[str]]:
    """A checkpoint's state dict made to fit model: (state dict, notes), a line per kind of change.

    The result loads with model.load_state_dict(strict=True). Adapted: the keys of a wrapped model
    (unwrap_state_dict), the position embedding to the model's token grid, Swin's bias tables to its
    windows, the patch-embedding kernels to its input channels and, if reset_head, the classifier
    (`head` / Swin's `head.fc`) to its class count, by taking the model's own fresh one. A distilled
    DeiT's distillation token, its position and its head are dropped; Swin's position indices and shift
    masks are never read (the model computes them). Anything else raises ValueError naming the first
    parameter that does not fit and both shapes (first_mismatch).
    """
    own = model.state_dict()
    sd, unwrapped = unwrap_state_dict(state_dict)
    sd = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    notes = [unwrapped] if unwrapped else []
    if "dist_token" in sd and "dist_token" not in own:
        dropped = ["dist_token"] + [k for k in sd if k.startswith("head_dist.")]
        for k in dropped:
            del sd[k]
        if "pos_embed" in sd:  # DeiT orders the tokens [class, distillation, patches]
            sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], dim=1)
        notes.append(f"distilled DeiT: dropped {', '.join(dropped)} and the distillation token's position; "
                     f"the class token's head is kept")
    tables, head = set(), None
    for k, mine in own.items():
        theirs = sd.get(k)
        # the dimensions in which the shapes differ; None for a missing key or different ranks
        diff = [i for i in range(mine.dim()) if theirs.shape[i] != mine.shape[i]] \
            if theirs is not None and theirs.dim() == mine.dim() else None
        if diff == []:
            continue
        if k == "pos_embed" and diff == [1]:
            g, grid = math.isqrt(theirs.shape[1] - 1), math.isqrt(mine.shape[1] - 1)
            if g * g == theirs.shape[1] - 1:  # else not a square grid, reported below
                sd[k] = resample_pos_embed(theirs, grid)
                notes.append(f"pos_embed resized from {g}x{g} to {grid}x{grid} patch positions (bicubic)")
        elif k.endswith("relative_position_bias_table") and diff == [0]:
            side, window = math.isqrt(theirs.shape[0]), (math.isqrt(mine.shape[0]) + 1) // 2
            if side * side == theirs.shape[0]:
                sd[k] = resample_bias_table(theirs, window)
                tables.add(f"{(side + 1) // 2} -> {window}")
        elif k == "patch_embed.proj.weight" and diff == [1]:
            sd[k] = adapt_input_conv(theirs, mine.shape[1])
            rule = "summed" if mine.shape[1] == 1 else "repeated and scaled"
            notes.append(f"{k} adapted from {theirs.shape[1]} to {mine.shape[1]} input channels ({rule})")
        elif reset_head and k.startswith("head.") and diff == [0]:
            sd[k] = mine  # the model's own fresh initialisation
            head = (theirs.shape[0], mine.shape[0])
    mismatch = first_mismatch(sd, model)  # what no rule above adapts
    if mismatch:
        raise ValueError(mismatch)
    if tables:
        notes.append(f"relative-position bias tables resized for windows {', '.join(sorted(tables))} (bicubic)")
    if head:
        notes.append(f"classifier re-initialised: {head[0]} classes in the checkpoint, {head[1]} here")
    elif reset_head:
        notes.append("classifier kept: the checkpoint has the same class count")
    return sd, notes


def load_adapted(model: nn.Module, path: str, reset_head: bool = True) -> list[str]:
    """Load the weights of a checkpoint file into model, adapted to it (adapt_state_dict), strictly.

    Returns the notes of adapt_state_dict, a line per kind of change. Raises CheckpointError for a file
    that cannot be read, ValueError for weights that do not fit.
    """
    state, notes = adapt_state_dict(load_checkpoint(path)["model"], model, reset_head)
    model.load_state_dict(state, strict=True)  # nothing is skipped: every parameter fits, or we stopped above
    return notes
