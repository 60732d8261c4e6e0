"""Tests of visualize.py: the traced token labels, the figures, the errors a user can cause (CPU)."""
import pytest
import torch

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
    x, w, lam = tl.cutmix(torch.randn(4, 3, 32, 32), model.patch_embed.patch_size, lam=0.4)
    grids, head = visualize.trace_labels(model, x, w)
    depth = len(model.blocks) if name == "vit_mini" else sum(len(s.blocks) for s in model.layers)
    assert len(grids) == depth + 1 and head.shape == (4, depth + 1)
    side = model.patch_embed.grid
    assert torch.equal(grids[0], w[..., 0].reshape(4, side, side))  # the input: CutMix's token labels
    assert torch.allclose(head[:, 0], torch.full((4,), lam))  # the mean input token label is lam
    with torch.no_grad():
        label = model(x, w)[1][:, 0]
    assert torch.allclose(head[:, -1], label, atol=1e-6)  # the last entry is what the target uses
    assert (head[:, -1] - lam).abs().max() > 1e-3  # and alignment moved it
    if name == "swin_mini":  # the grids follow the stages: 16, 8, 4 tokens a side
        assert [g.shape[-1] for g in grids] == [16, 16, 16, 8, 8, 4, 4]


def test_shares_are_the_label_accuracy_inputs(tmp_path):
    _, model = checkpoint(tmp_path, "vit_mini")
    val = data.load_small("synthetic", None, train=False, subset=64)
    s = visualize.shares(model, val, 4, 64)
    assert set(s) == {"truth", "area", "tl", "transmix"}
    n = len(s["truth"])
    assert 50 <= n <= 64 and all(len(v) == n for v in s.values())
    assert all(((v >= 0) & (v <= 1)).all() for v in s.values())
    assert len(set(s["area"].tolist())) > 1  # one box per group of 8: many lams


@pytest.mark.parametrize("name", ["vit_mini", "swin_mini"])
def test_figures_are_written(tmp_path, capsys, name):
    path, _ = checkpoint(tmp_path, name)
    visualize.main([str(path), "--pairs", "2", "--images", "64", "--out-dir", str(tmp_path / "fig")])
    for png in ("tokens.png", "shares.png"):
        assert (tmp_path / "fig" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "area" in out and "tl" in out and ("transmix" in out) == (name == "vit_mini")


def test_user_errors_end_in_one_line(tmp_path, capsys):
    bad = tmp_path / "torn.pt"
    bad.write_bytes(b"not a checkpoint")
    cifar, _ = checkpoint(tmp_path, "vit_mini", dataset="cifar10")
    cases = [([str(tmp_path / "missing.pt")], "does not exist"), ([str(bad)], "is not a train.py checkpoint"),
             ([str(cifar)], "has no object masks")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            visualize.main(argv + ["--out-dir", str(tmp_path / "fig")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
