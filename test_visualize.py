"""Tests of visualize.py: the traced token labels, the figures, the errors a user can cause (CPU)."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import data
import tl_align as tl
import visualize
import vit


def checkpoint(tmp_path, model_name, dataset="synthetic"):
    """A train.py-shaped checkpoint of a model with perturbed weights (attention far from uniform)."""
    info = data.DATASETS[dataset]
    torch.manual_seed(0)
    model = vit.create_model(model_name, num_classes=info["num_classes"], img_size=info["img_size"],
                             in_chans=info["in_chans"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path / f"{model_name}.pt"
    torch.save(dict(model=model.state_dict(), epoch=0, val_top1=0.0,
                    args=dict(data=dataset, model=model_name, cutmix_alpha=1.0, cutmix_mode="grid",
                              data_path=None)), path)
    return path, model.eval()


@pytest.mark.parametrize("name", ["vit_mini", "swin_mini"])
def test_trace_ends_at_the_models_label(tmp_path, name):
    _, model = checkpoint(tmp_path, name)
    torch.manual_seed(1)
    B, p = 4, model.patch_embed.patch_size
    source = torch.arange(B, dtype=torch.float).view(B, 1, 1, 1).expand(B, 1, 32, 32)
    mixed, w, lam = tl.cutmix(torch.cat([torch.randn(B, 3, 32, 32), source], 1), p, lam=0.4)
    x = mixed[:, :3]
    grids, head = visualize.trace_labels(model, x, w)
    depth = len(model.blocks) if name == "vit_mini" else sum(len(s.blocks) for s in model.layers)
    assert len(grids) == depth + 1 and head.shape == (B, depth + 1)
    # the input grid is where image 1's pixels are, patch by patch (from the mixed index channel)
    own = (mixed[:, 3:] == source).float()
    assert torch.allclose(grids[0], F.avg_pool2d(own, p)[:, 0])
    assert torch.allclose(head[:, 0], torch.full((B,), lam))  # the mean input token label is lam
    with torch.no_grad():
        label = model(x, w)[1][:, 0]
    assert torch.allclose(head[:, -1], label, atol=1e-6)  # the last entry is what the target uses
    assert (head[:, -1] - lam).abs().max() > 1e-3  # and alignment moved it
    if name == "swin_mini":  # the grids follow the stages: 16, 8, 4 tokens a side
        assert [g.shape[-1] for g in grids] == [16, 16, 16, 8, 8, 4, 4]


def uniform_attention(model):
    """q = k = 0 and no position bias: attention is uniform over all tokens (Swin: within each window)."""
    with torch.no_grad():
        for key, t in model.named_parameters():
            if "attn.qkv" in key:
                t[: 2 * t.shape[0] // 3] = 0  # the q and k rows
            if "relative_position_bias_table" in key:
                t.zero_()
    return model


@pytest.mark.parametrize("name", ["vit_mini", "swin_mini"])
def test_trace_after_uniform_attention_is_laid_out_on_the_grid(tmp_path, name):
    """The first block's labels are then (Y + mean Y) / 2: a map a misplaced grid cannot match."""
    model = uniform_attention(checkpoint(tmp_path, name)[1])
    torch.manual_seed(2)
    x, w, lam = tl.cutmix(torch.randn(2, 3, 32, 32), model.patch_embed.patch_size, lam=0.55)
    grids, head = visualize.trace_labels(model, x, w)
    if name == "vit_mini":
        expected = (grids[0] + lam) / 2  # the class token starts at lam, so the mean over all tokens is lam
        assert torch.allclose(head[:, 1:], torch.full_like(head[:, 1:], lam), atol=1e-6)
    else:
        ws = model.layers[0].blocks[0].ws
        window_mean = F.avg_pool2d(grids[0][:, None], ws)[:, 0].repeat_interleave(ws, 1).repeat_interleave(ws, 2)
        expected = (grids[0] + window_mean) / 2
    assert torch.allclose(grids[1], expected, atol=1e-6)


def test_shares_read_image_1(tmp_path):
    _, model = checkpoint(tmp_path, "vit_mini")
    val = data.load_small("synthetic", None, train=False, subset=64)
    s = visualize.shares(model, val, 64)
    assert set(s) == {"truth", "area", "tl", "transmix"}
    n = len(s["truth"])
    assert 50 <= n <= 64 and all(len(v) == n for v in s.values())
    assert all(((v >= -1e-6) & (v <= 1 + 1e-6)).all() for v in s.values())  # shares, to float32 rounding
    assert len(set(s["area"].tolist())) > 1  # one box per group of 8: many lams
    everything = replace(val, masks=torch.ones_like(val.masks))  # all foreground: the truth is lam
    s = visualize.shares(model, everything, 64)
    assert torch.allclose(s["truth"], s["area"])
    s = visualize.shares(uniform_attention(model), val, 64)  # the class token stays at lam: a swap would show
    assert torch.allclose(s["tl"], s["area"], atol=1e-6) and (s["area"] - 0.5).abs().max() > 0.05


@pytest.mark.parametrize("name", ["vit_mini", "swin_mini"])
def test_figures_are_written(tmp_path, capsys, name):
    path, _ = checkpoint(tmp_path, name)
    visualize.main([str(path), "--pairs", "2", "--images", "64", "--out-dir", str(tmp_path / "fig")])
    for png in ("tokens.png", "shares.png"):
        assert (tmp_path / "fig" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "area" in out and "tl" in out and ("transmix" in out) == (name == "vit_mini")


def test_a_compiled_ddp_models_checkpoint_loads(tmp_path):
    path, model = checkpoint(tmp_path, "vit_mini")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {"_orig_mod.module." + k: v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "wrapped.pt")
    loaded, _ = visualize.load(str(tmp_path / "wrapped.pt"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_user_errors_end_in_one_line(tmp_path, capsys):
    bad = tmp_path / "torn.pt"
    bad.write_bytes(b"not a checkpoint")
    cifar, _ = checkpoint(tmp_path, "vit_mini", dataset="cifar10")
    cases = [([str(tmp_path / "missing.pt")], "not found"), ([str(bad)], "cannot be read"),
             ([str(cifar)], "has no object masks")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            visualize.main(argv + ["--out-dir", str(tmp_path / "fig")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
