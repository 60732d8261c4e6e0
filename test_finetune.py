"""Tests of checkpoint.py, --finetune and --resume's weights: the file formats, the resizes, the channel and head
rules, wrapped models' keys, the errors.

Checkpoints are written here in each format's exact layout, from real timm models built from their local
configs (never downloaded); the resizes are checked against cubic convolution written out below.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv as timm_adapt_input_conv
from timm.models.swin_transformer import SwinTransformer as TimmSwin

import checkpoint
import train
import vit
from test_train import run_main

SMALL = ["--subset", "256", "--batch-size", "64", "--log-every", "1000"]
ONE_STEP = ["--subset", "32", "--batch-size", "32", "--log-every", "1000"]  # an epoch of one step


def timm_swin_mini():
    """timm's Swin in swin_mini's configuration (patch 2, window 4, dims 48/96/192), 10 classes."""
    return TimmSwin(img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2), num_heads=(2, 4, 8),
                    num_classes=10)


def cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> torch.Tensor:
    """(n_out, n_in) weights of 1-d cubic convolution (Keys, a = -0.75) on half-pixel centres, edges clamped:
    the rule of bicubic resizing with align_corners=False and no antialiasing, written out."""
    def kernel(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0

    M = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5  # output pixel centre in input coordinates
        for j in range(math.floor(src) - 1, math.floor(src) + 3):
            M[i, min(max(j, 0), n_in - 1)] += kernel(src - j)
    return M


def resize_grid(grid: torch.Tensor, n: int) -> torch.Tensor:
    """(g, g, C) -> (n, n, C): the separable 2-d resize of every channel, M G M^T."""
    M = cubic_matrix(grid.shape[0], n)
    return torch.einsum("ij,jkc,lk->ilc", M, grid.double(), M).float()


# ----------------------------------------------------------------------------- formats

def test_every_format_loads_timms_weights_and_gives_timms_logits(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    sd = reference.state_dict()
    deit_args = argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4, input_size=224, resume="", mixup=0.8)
    files = {  # each format as its own code writes it
        "ours.pt": dict(model=sd, optimizer={"state": {}, "param_groups": []}, scheduler={}, scaler={}, epoch=0,
                        best_top1=1.0, args={"model": "deit_t"}),
        "deit_release.pth": {"model": sd},  # DeiT's and TL-Align's published files
        "deit_training.pth": dict(model=sd, optimizer={"state": {}, "param_groups": []}, lr_scheduler={"a": 1},
                                  epoch=299, model_ema=sd, scaler={"scale": 1.0}, args=deit_args),
        "timm.pth": sd,
        "pytorch_model.bin": sd,
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
    for name in [*files, "model.safetensors"]:
        ckpt = checkpoint.load_checkpoint(str(tmp_path / name))
        assert ckpt["model"].keys() == sd.keys() and all(torch.equal(ckpt["model"][k], sd[k]) for k in sd), name
        model = vit.create_model("deit_t").eval()
        state, notes = checkpoint.adapt_state_dict(ckpt["model"], model)
        assert notes == ["classifier kept: the checkpoint has the same class count"], name
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-4), name
    assert checkpoint.load_checkpoint(str(tmp_path / "deit_training.pth"))["args"]["model"] == "deit_tiny_patch16_224"


def test_loading_never_runs_code_from_the_file(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w")
            return open, (str(marker), "w")

    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pth")
    code, _, err = run_main(capsys, "--finetune", str(tmp_path / "evil.pth"), *SMALL, "--output-dir", str(tmp_path))
    assert code == 2 and "cannot be read" in err and not marker.exists()


def test_safetensors_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    model = vit.create_model("vit_mini", num_classes=10)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed: the import fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    code, _, err = run_main(capsys, "--finetune", str(tmp_path / "model.safetensors"), *SMALL, "--epochs", "1",
                            "--output-dir", str(tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "needs the safetensors package" in err


# ----------------------------------------------------------------------------- resizes

def test_pos_embed_resize_is_bicubic_over_the_patch_grid():
    torch.manual_seed(1)
    pos = torch.randn(1, 1 + 8 * 8, 5)
    assert checkpoint.resample_pos_embed(pos, 8) is pos  # same grid: untouched
    for n in (12, 5):  # enlarge and shrink
        out = checkpoint.resample_pos_embed(pos, n)
        assert out.shape == (1, 1 + n * n, 5) and torch.equal(out[:, 0], pos[:, 0])  # the class token kept
        expected = resize_grid(pos[0, 1:].reshape(8, 8, 5), n).reshape(1, n * n, 5)  # row-major tokens
        assert torch.allclose(out[:, 1:], expected, atol=1e-5)
        # timm's function agrees once its default antialiasing is off (DeiT's code never antialiases)
        assert torch.allclose(out, resample_abs_pos_embed(pos, [n, n], antialias=False), atol=1e-6)


def test_bias_table_resize_is_bicubic_over_the_offsets():
    torch.manual_seed(2)
    w, heads = 4, 3
    table = torch.randn((2 * w - 1) ** 2, heads)
    assert checkpoint.resample_bias_table(table, w) is table
    for window in (7, 2):
        out = checkpoint.resample_bias_table(table, window)
        side = 2 * window - 1
        expected = resize_grid(table.reshape(2 * w - 1, 2 * w - 1, heads), side).reshape(side * side, heads)
        assert out.shape == (side * side, heads) and torch.allclose(out, expected, atol=1e-5)
        # the centre is offset (0, 0) in both tables, and bicubic at a source sample is that sample
        assert torch.allclose(out[side * side // 2], table[(2 * w - 1) ** 2 // 2], atol=1e-6)


def test_swin_in_timms_layout_loads_for_another_window():
    torch.manual_seed(3)
    reference = timm_swin_mini().eval()
    sd = dict(reference.state_dict())
    model = vit.create_model("swin_mini", num_classes=10).eval()
    # buffers in the file (as in Microsoft's checkpoints) are ignored, even wrong ones
    sd["layers.0.blocks.1.attn_mask"] = torch.ones(16, 16, 16)
    sd["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state, notes = checkpoint.adapt_state_dict(sd, model)
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    smaller = vit.create_model("swin_mini", num_classes=10, window_size=2)
    state, notes = checkpoint.adapt_state_dict(reference.state_dict(), smaller)
    smaller.load_state_dict(state, strict=True)
    assert "relative-position bias tables resized for windows 4 -> 2 (bicubic)" in notes
    key = "layers.1.blocks.0.attn.relative_position_bias_table"
    assert torch.equal(state[key], checkpoint.resample_bias_table(reference.state_dict()[key], 2))


# ----------------------------------------------------------------------------- channels and classes

def test_grey_images_through_summed_kernels_match_their_rgb_copies():
    torch.manual_seed(4)
    rgb = vit.create_model("vit_mini", num_classes=10).eval()
    grey = vit.create_model("vit_mini", num_classes=10, in_chans=1).eval()
    state, notes = checkpoint.adapt_state_dict(rgb.state_dict(), grey)
    grey.load_state_dict(state, strict=True)
    assert "patch_embed.proj.weight adapted from 3 to 1 input channels (summed)" in notes
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5)
        # six channels: the kernels repeated and halved, so an image given twice gets the RGB embedding
        six = vit.create_model("vit_mini", num_classes=10, in_chans=6).eval()
        six.load_state_dict(checkpoint.adapt_state_dict(rgb.state_dict(), six)[0], strict=True)
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(six(torch.cat([x, x], dim=1)), rgb(x), atol=1e-5)
    w = rgb.patch_embed.proj.weight.detach()
    for c in (1, 2, 4, 6):  # timm's rule, including the counts that are not a multiple of 3
        assert torch.equal(checkpoint.adapt_input_conv(w, c), timm_adapt_input_conv(c, w))


@pytest.mark.parametrize("name", ["vit_mini", "swin_mini"])
def test_head_is_reset_for_another_class_count_and_kept_for_the_same(name):
    torch.manual_seed(5)
    source = vit.create_model(name, num_classes=10).state_dict()
    head = [k for k in source if k.startswith("head.")]
    assert head == (["head.weight", "head.bias"] if name == "vit_mini" else ["head.fc.weight", "head.fc.bias"])
    for classes in (5, 10):
        model = vit.create_model(name, num_classes=classes)
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        state, notes = checkpoint.adapt_state_dict(source, model)
        model.load_state_dict(state, strict=True)
        loaded = model.state_dict()
        for k in source:
            expected = fresh[k] if k in head and classes != 10 else source[k]
            assert torch.equal(loaded[k], expected), (classes, k)
        if classes == 5:
            assert notes == ["classifier re-initialised: 10 classes in the checkpoint, 5 here"]
            with pytest.raises(ValueError, match=rf"{head[0]} is \(10, \d+\) in the checkpoint, \(5, \d+\)"):
                checkpoint.adapt_state_dict(source, model, reset_head=False)  # --eval keeps the head or stops


def test_distilled_deit_loses_its_distillation_token():
    torch.manual_seed(6)
    sd = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).state_dict()
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= sd.keys() and sd["pos_embed"].shape[1] == 198
    model = vit.create_model("deit_t", img_size=112)
    state, notes = checkpoint.adapt_state_dict(sd, model)
    model.load_state_dict(state, strict=True)
    assert notes[0].startswith("distilled DeiT: dropped dist_token, head_dist.weight, head_dist.bias")
    # the class token's position survives, the patch positions are those after the distillation token
    assert torch.equal(state["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    assert torch.allclose(state["pos_embed"], checkpoint.resample_pos_embed(sd["pos_embed"][:, [0, *range(2, 198)]], 7))
    assert torch.equal(state["head.weight"], sd["head.weight"])


# ----------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A folder of checkpoints that do not fit vit_mini on the synthetic set, written once for all cases:
    other models' weights in train.py's layout (some with the args of the run that saved them), weights
    under an unknown prefix, a pickled model."""
    tmp_path = tmp_path_factory.mktemp("checkpoints")

    def save(name, model, **extra):
        torch.save({"model": {**model.state_dict(), **extra}}, tmp_path / name)

    save("swin.pt", vit.create_model("swin_mini", num_classes=10))
    save("shallow.pt", vit.create_model("vit_mini", num_classes=10, depth=4))
    save("narrow.pt", vit.create_model("vit_mini", num_classes=10, embed_dim=48))
    save("extra.pt", vit.create_model("vit_mini", num_classes=10), **{"extra.weight": torch.zeros(3)})
    save("five.pt", vit.create_model("vit_mini", num_classes=5))
    torch.save({"model": "weights"}, tmp_path / "empty.pt")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    torch.save(vit.create_model("vit_mini", num_classes=10), tmp_path / "whole.pt")  # the model, not its weights
    sd = vit.create_model("vit_mini", num_classes=10).state_dict()
    torch.save({"model": {"backbone." + k: v for k, v in sd.items()}}, tmp_path / "backbone.pt")

    def save_run(name, model, data, img_size=None, window_size=None, **build):  # with the args train.py saves
        torch.save({"model": vit.create_model(model, img_size=img_size, **build).state_dict(),
                    "args": dict(model=model, data=data, img_size=img_size, window_size=window_size)}, tmp_path / name)

    save_run("folders.pt", "vit_mini", "imagenet", img_size=48, num_classes=2)
    save_run("garments.pt", "vit_mini", "fashion_mnist", num_classes=10, in_chans=1)
    save_run("swin_run.pt", "swin_mini", "synthetic", num_classes=10)
    return tmp_path


ERRORS = {  # arguments -> what the one line must say
    "another_family": (["--finetune", "{tmp}/swin.pt"], "cls_token (1, 1, 96) is missing from the checkpoint"),
    "another_depth": (["--finetune", "{tmp}/shallow.pt"], "blocks.4.norm1.weight (96,) is missing"),
    "another_width": (["--finetune", "{tmp}/narrow.pt"], "cls_token is (1, 1, 48) in the checkpoint, (1, 1, 96)"),
    "unexpected_key": (["--finetune", "{tmp}/extra.pt"], "extra.weight (3,) in the checkpoint has no place"),
    "eval_other_classes": (["--eval", "--finetune", "{tmp}/five.pt"], "head.weight is (5, 96) in the checkpoint"),
    "no_weights": (["--finetune", "{tmp}/empty.pt"], "holds no model weights"),
    "corrupt": (["--finetune", "{tmp}/corrupt.pth"], "cannot be read"),
    "missing": (["--finetune", "{tmp}/nowhere.pth"], "not found"),
    "with_resume": (["--finetune", "{tmp}/five.pt", "--resume", "{tmp}/five.pt"], "give one"),
    "pickled_model": (["--finetune", "{tmp}/whole.pt"], "checkpoint {tmp}/whole.pt is a whole pickled model "
                      "(vit.VisionTransformer, as torch.save(model) writes it), which cannot be loaded without running "
                      "code from the file: save model.state_dict() instead"),
    "pickled_model_eval": (["--eval", "--resume", "{tmp}/whole.pt"], "save model.state_dict() instead"),
    "unknown_prefix": (["--finetune", "{tmp}/backbone.pt"], "all keys start with 'backbone.', a prefix of no known "
                       "wrapper (DDP's 'module.', torch.compile's '_orig_mod.'); cls_token is there as "
                       "'backbone.cls_token'"),
    "unknown_prefix_resume": (["--resume", "{tmp}/backbone.pt"], "all keys start with 'backbone.'"),
    "unknown_prefix_eval": (["--eval", "--resume", "{tmp}/backbone.pt"], "all keys start with 'backbone.'"),
    "resume_other_classes_and_size": (["--resume", "{tmp}/folders.pt"], "does not fit --model vit_mini on --data "
                                      "synthetic: saved with 2 classes (--data imagenet), this run has 10 (--data "
                                      "synthetic); saved with 48 px images (--img-size 48), this run has 32 (--data "
                                      "synthetic); to start a new run from these weights, adapted, use --finetune"),
    "resume_other_channels": (["--resume", "{tmp}/garments.pt"], "saved with 1-channel images (--data fashion_mnist), "
                              "this run has 3 (--data synthetic); to start"),
    "resume_other_window": (["--model", "swin_mini", "--window-size", "2", "--resume", "{tmp}/swin_run.pt"],
                            "saved with window 4 (--model swin_mini), this run has 2 (--window-size 2); to start"),
    "resume_other_model": (["--resume", "{tmp}/swin_run.pt"], "saved with --model swin_mini, this run has --model "
                           "vit_mini"),
    "resume_other_depth": (["--resume", "{tmp}/shallow.pt"], "blocks.4.norm1.weight (96,) is missing"),
    "img_size_small_data": (["--img-size", "48"], "--img-size: --data synthetic is held in memory at 32 px"),
    "window_on_vit": (["--window-size", "2"], "--window-size is for Swin models"),
}


def test_unusable_files_raise_checkpoint_error_and_checkpoint_py_stands_alone(tmp_path):
    """checkpoint.py raises its own error (train.main prints it as one line, below) and imports no file
    of this repository, so that train.py's error type cannot tie the two into a cycle."""
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    torch.save({"model": "weights"}, tmp_path / "empty.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "linear.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6
    for name, message in [("nowhere.pth", "not found"), ("corrupt.pth", "cannot be read"),
                          ("empty.pt", "holds no model weights"), (".", "is a directory"),
                          ("linear.pt", r"is a whole pickled model \(torch.nn.modules.linear.Linear, "),
                          ("legacy.pt", "cannot be read")]:
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load_checkpoint(str(tmp_path / name))
    code = "import sys, checkpoint; print(sorted({'data', 'tl_align', 'train', 'vit'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(checkpoint.__file__)))
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_exit_2_with_one_line(tmp_path, capsys, checkpoints, case):
    args, message = ERRORS[case]
    args, message = [a.replace("{tmp}", str(checkpoints)) for a in args], message.replace("{tmp}", str(checkpoints))
    code, _, err = run_main(capsys, *SMALL, "--epochs", "1", "--output-dir", str(tmp_path / "run"), *args)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


# ----------------------------------------------------------------------------- wrapped models

WRAPPERS = {  # the prefix on every key: the wrapping that puts it there, and the wrappers the run names
    "module.": (nn.DataParallel, "DDP / DataParallel"),
    "_orig_mod.": (torch.compile, "torch.compile"),
    "_orig_mod.module.": (lambda m: torch.compile(nn.DataParallel(m)), "torch.compile around DDP / DataParallel"),
    "module._orig_mod.": (lambda m: nn.DataParallel(torch.compile(m)), "DDP / DataParallel around torch.compile"),
}


@pytest.mark.parametrize("prefix", list(WRAPPERS))
def test_wrapped_models_weights_are_unwrapped_for_eval_finetune_and_resume(tmp_path, capsys, monkeypatch, prefix):
    """The state dict of a model inside the real wrappers (DataParallel runs on a CPU; torch.compile compiles
    nothing until called): --finetune and --resume evaluate exactly the inner model's weights, and say so."""
    torch.manual_seed(8)
    inner = vit.create_model("vit_mini", num_classes=10)
    wrap, wrappers = WRAPPERS[prefix]
    state = wrap(inner).state_dict()
    assert all(k.startswith(prefix) for k in state)
    torch.save({"model": state}, tmp_path / "wrapped.pt")
    evaluated = []

    def evaluate(model, *rest):  # the weights --eval evaluates, without spending the time
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return 50.0, 90.0

    monkeypatch.setattr(train, "evaluate", evaluate)
    for flag in ("--finetune", "--resume"):
        code, out, err = run_main(capsys, "--eval", flag, str(tmp_path / "wrapped.pt"), *ONE_STEP,
                                  "--output-dir", str(tmp_path / "run"))
        assert code == 0, err
        assert f"{flag[2:]}: stripped {prefix!r} from every key (a model wrapped by {wrappers})" in out
    expected = inner.state_dict()
    assert len(evaluated) == 2
    for loaded in evaluated:
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_only_a_prefix_that_every_key_has_is_stripped():
    t = torch.zeros(1)
    assert checkpoint.unwrap_state_dict({"module.a": t, "b": t}) == ({"module.a": t, "b": t}, None)
    state, note = checkpoint.unwrap_state_dict({"module.module.a": t})  # DataParallel inside DataParallel
    assert list(state) == ["a"]
    assert note == "stripped 'module.module.' from every key (a model wrapped by DDP / DataParallel around DDP / " \
                   "DataParallel)"


def test_a_run_resumes_exactly_from_a_compiled_ddp_models_checkpoint(tmp_path, capsys, monkeypatch):
    """A run's checkpoint.pt with its keys as a compiled DDP model's state dict has them (`_orig_mod.module.`,
    train.py's own wrapping): --resume continues exactly as from the file itself."""
    load = train.data.load_small

    def small_val(name, path, **kw):  # validation on 64 images: the weights are the point here
        return load(name, path, **{**kw, "subset": kw.get("subset") if kw["train"] else 64})

    monkeypatch.setattr(train.data, "load_small", small_val)
    first = tmp_path / "first"
    assert run_main(capsys, "--epochs", "1", *ONE_STEP, "--output-dir", str(first))[0] == 0
    ckpt = torch.load(first / "checkpoint.pt", weights_only=True)
    ckpt["model"] = {"_orig_mod.module." + k: v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "wrapped.pt")
    for name, path in (("plain", first / "checkpoint.pt"), ("wrapped", tmp_path / "wrapped.pt")):
        code, out, err = run_main(capsys, "--epochs", "2", *ONE_STEP, "--resume", str(path),
                                  "--output-dir", str(tmp_path / name))
        assert code == 0, err
    assert "resume: stripped '_orig_mod.module.' from every key (a model wrapped by torch.compile around DDP / " \
           "DataParallel)" in out
    plain, resumed = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("plain", "wrapped"))
    assert plain["epoch"] == resumed["epoch"] == 1
    assert all(torch.equal(plain["model"][k], resumed["model"][k]) for k in plain["model"])


# ----------------------------------------------------------------------------- end to end

def test_finetune_run_starts_from_the_adapted_weights(tmp_path, capsys, monkeypatch):
    """Synthetic RGB pretraining -> Fashion-MNIST (grey, other classes); with a ~zero lr the fine-tuned
    weights are the adapted pretrained ones, so the run must have loaded them."""
    load = train.data.load_small

    def small_val(name, path, **kw):  # validation on the first 500 images: seconds instead of a minute
        return load(name, path, **{**kw, "subset": kw.get("subset") if kw["train"] else 500})

    monkeypatch.setattr(train.data, "load_small", small_val)
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert run_main(capsys, "--epochs", "1", *SMALL, "--output-dir", str(pre))[0] == 0
    code, out, err = run_main(capsys, "--data", "fashion_mnist", "--finetune", str(pre / "best.pt"), "--epochs", "1",
                              *SMALL, "--lr", "1e-12", "--output-dir", str(ft))
    assert code == 0, err
    assert "finetune: patch_embed.proj.weight adapted from 3 to 1 input channels (summed)" in out
    assert "finetune: classifier kept" in out  # 10 shapes -> 10 garments: the same count
    before = torch.load(pre / "best.pt", weights_only=True)["model"]
    after = torch.load(ft / "checkpoint.pt", weights_only=True)["model"]
    assert torch.allclose(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"].sum(1, keepdim=True),
                          atol=1e-6)
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before if k != "patch_embed.proj.weight")
    # --eval takes the same file and gives the run's own number
    top1 = json.loads((ft / "log.jsonl").read_text())["val_top1"]
    code, out, err = run_main(capsys, "--data", "fashion_mnist", "--eval", "--finetune", str(ft / "best.pt"))
    assert code == 0 and f"top-1 {top1:.2f}%" in out, err


def test_finetune_on_image_folders_at_another_size(tmp_path, capsys):
    """--img-size on folders of two classes: the position grid grows from 8x8 to 12x12, the head shrinks to 2."""
    torch.manual_seed(7)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "folders" / split / c).mkdir(parents=True)
            for i in range(2):
                pixels = (torch.rand(40, 40, 3) * 255).byte().numpy()
                Image.fromarray(pixels).save(tmp_path / "folders" / split / c / f"{i}.png")
    pre = tmp_path / "pre"
    torch.save({"model": vit.create_model("vit_mini", num_classes=10).state_dict()}, tmp_path / "pre.pth")
    code, out, err = run_main(capsys, "--data", "imagenet", "--data-path", str(tmp_path / "folders"), "--model",
                              "vit_mini", "--img-size", "48", "--finetune", str(tmp_path / "pre.pth"), "--epochs", "1",
                              "--batch-size", "2", "--workers", "0", "--output-dir", str(pre))
    assert code == 0, err
    assert "finetune: pos_embed resized from 8x8 to 12x12 patch positions (bicubic)" in out
    assert "finetune: classifier re-initialised: 10 classes in the checkpoint, 2 here" in out
    state = torch.load(pre / "checkpoint.pt", weights_only=True)["model"]
    assert state["pos_embed"].shape == (1, 1 + 12 * 12, 96) and state["head.weight"].shape == (2, 96)
