"""Tests of the models (vit.py) and of TL-Align (tl_align.py), on tiny CPU models.

Each test checks a value against an independent formulation, an invariant or a hand computation.
Random models get sharpened attention (`sharpen`): at initialisation attention is almost uniform,
and uniform attention would hide a transposed or misplaced attention matrix.
"""
import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F

import tl_align as tl
import truth
import vit


def tiny(name: str, **kw):
    """A small random model of either family; Swin has shifted windows in stages 0 and 1, merging twice."""
    if name == "vit":
        cfg = dict(embed_dim=32, depth=3, num_heads=4)
        m = vit.create_model("vit_mini", num_classes=7, **{**cfg, **kw})
    else:
        cfg = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4))
        m = vit.create_model("swin_mini", num_classes=7, **{**cfg, **kw})
    return sharpen(m)


def sharpen(model, scale: float = 6.0, seed: int = 0):
    """Scale query/key weights and randomise position tables so that attention maps are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                C = p.shape[1]
                p[: 2 * C].mul_(scale)
            elif name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def patch_size(model) -> int:
    return model.patch_embed.patch_size


def random_token_labels(B: int, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """(B, N, K) random rows on the simplex."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, K, generator=g).softmax(-1)


def capture_attention(model):
    """Forward hooks that record every attention layer's weights (B, h, N, N), in call order.

    The layers return no (N, N) map, so each hook recomputes it from the layer's input as the explicit
    path does: softmax(q k^T * scale + bias), Swin's bias its relative-position table plus the shift mask.
    """
    maps, handles = [], []

    def record(m, args, kwargs, out):
        x = args[0]
        B, N, C = x.shape
        q, k, _ = m.qkv(x).reshape(B, N, 3, m.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        logits = (q * m.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
        if isinstance(m, vit.WindowAttention):
            bias = m.relative_position_bias_table[m.relative_position_index].permute(2, 0, 1)  # (h, N, N)
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            if mask is not None:
                bias = bias + mask[:, None]  # (nW, h, N, N): window w of image b is batch entry nW * b + w
            logits = (logits.view(-1, *bias.shape) + bias).view(logits.shape)
        maps.append(logits.softmax(dim=-1, dtype=torch.float32).detach())

    for mod in model.modules():
        if isinstance(mod, vit.Attention):
            handles.append(mod.register_forward_hook(record, with_kwargs=True))
    return maps, handles


FAMILIES = ["vit", "swin"]


# 1. K = 2 source tracking equals full C-class label propagation ------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["grid", "pixel"])
def test_two_sources_equal_full_class_labels(family, mode):
    torch.manual_seed(1)
    model = tiny(family).eval()
    C = 7
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 3, 6, 3, 1])
    xm, w, lam = tl.cutmix(x, patch_size(model), mode=mode, lam=0.55)
    sources = torch.stack([y, y.flip(0)], dim=1)  # (B, 2)
    onehot = F.one_hot(sources, C).float()  # (B, 2, C)
    class_tokens = torch.einsum("bnk,bkc->bnc", w, onehot)  # (B, N, C): the official code's token labels
    with torch.no_grad():
        _, label_k2, _ = model(xm, w)
        _, label_kc, _ = model(xm, class_tokens)
    target_k2 = tl.class_target(label_k2, sources, C)
    assert label_kc.shape == (5, C)
    assert (target_k2 - label_kc).abs().max() < 1e-6
    # and the label is not trivially the area label: alignment moved it
    assert (label_k2[:, 0] - lam).abs().max() > 1e-3


# 2. An independent re-implementation of the official loop on the exposed attention maps -----------

def test_vit_label_equals_official_loop():
    torch.manual_seed(2)
    model = tiny("vit").eval()
    x = torch.randn(4, 3, 32, 32)
    w = random_token_labels(4, model.num_patches, 3)
    maps, handles = capture_attention(model)
    with torch.no_grad():
        _, label, _ = model(x, w)
    for h in handles:
        h.remove()
    assert len(maps) == len(model.blocks)
    # official loop: class token starts at the mean, then Y <- (Y + mean_h(A) Y) / 2 per block
    Y = torch.cat([w.mean(1, keepdim=True), w], 1).double()
    for attn in maps:
        A = attn.double().mean(1)
        assert torch.allclose(A.sum(-1), torch.ones_like(A.sum(-1)), atol=1e-5)
        Y = (Y + A @ Y) / 2
    assert (label.double() - Y[:, 0]).abs().max() < 1e-6


def window_token_index(R: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, ws*ws) flat token index in the unshifted R x R map of every window position.

    Written from the definition of a cyclic shift (shifted[r, c] = x[(r + s) % R, (c + s) % R]),
    independently of vit.window_partition and torch.roll.
    """
    idx = torch.empty(R // ws, R // ws, ws, ws, dtype=torch.long)
    for wi in range(R // ws):
        for wj in range(R // ws):
            for a in range(ws):
                for b in range(ws):
                    r, c = (wi * ws + a + shift) % R, (wj * ws + b + shift) % R
                    idx[wi, wj, a, b] = r * R + c
    return idx.view(-1, ws * ws)


def test_swin_label_equals_dense_block_diagonal_loop():
    """Scatter each window attention into a dense (R^2, R^2) matrix, then run the plain loop."""
    torch.manual_seed(3)
    model = tiny("swin").eval()
    B, K = 3, 2
    x = torch.randn(B, 3, 32, 32)
    w = random_token_labels(B, model.num_patches, K)
    maps, handles = capture_attention(model)
    with torch.no_grad():
        _, label, _ = model(x, w)
    for h in handles:
        h.remove()
    Y = w.double()  # (B, R*R, K)
    R = model.patch_embed.grid
    maps = iter(maps)
    shifted = 0
    for stage in model.layers:
        if stage.downsample is not None:  # patch merging: the mean of each 2x2 neighbourhood
            Y = Y.view(B, R // 2, 2, R // 2, 2, K).mean((2, 4)).reshape(B, -1, K)
            R //= 2
        for blk in stage.blocks:
            attn = next(maps).double().mean(1)  # (B*nW, n, n)
            idx = window_token_index(R, blk.ws, blk.shift)  # (nW, n)
            nW, n = idx.shape
            dense = torch.zeros(B, R * R, R * R, dtype=torch.double)
            rows = idx[:, :, None].expand(nW, n, n)
            cols = idx[:, None, :].expand(nW, n, n)
            for b in range(B):
                dense[b, rows, cols] = attn[b * nW:(b + 1) * nW]
            if blk.shift:  # pairs that the shift only made neighbours get no attention
                assert attn.view(B, nW, n, n)[:, blk.attn_mask < 0].max() < 1e-30
            assert torch.allclose(dense.sum(-1), torch.ones(B, R * R, dtype=torch.double), atol=1e-5)
            Y = (Y + dense @ Y) / 2
            shifted += blk.shift > 0
    assert shifted == 2  # the test really went through shifted windows
    assert (label.double() - Y.mean(1)).abs().max() < 1e-6


# 3. Invariants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_labels_stay_on_the_simplex(family):
    torch.manual_seed(4)
    model = tiny(family).eval()
    w = random_token_labels(3, model.num_patches, 5)
    with torch.no_grad():
        _, label, _ = model(torch.randn(3, 3, 32, 32), w)
    assert label.dtype == torch.float32 and label.min() >= 0
    assert (label.sum(-1) - 1).abs().max() < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_constant_label_map_is_unchanged(family):
    """Mixup: every token has the same label; rows of attention sum to 1, so alignment is the identity."""
    torch.manual_seed(5)
    model = tiny(family).eval()
    x, _ = tl.mixup(torch.randn(3, 3, 32, 32), lam=0.3)
    w = torch.tensor([0.3, 0.7]).expand(3, model.num_patches, 2)
    with torch.no_grad():
        _, label, _ = model(x, w)
    assert (label - torch.tensor([0.3, 0.7])).abs().max() < 1e-6


# 4. Hand-computed cases ---------------------------------------------------------------------------

def test_align_labels_by_hand():
    # two heads over three tokens; their mean is not symmetric, so a transposed A would be caught
    head1 = torch.eye(3)
    head2 = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])
    attn = torch.stack([head1, head2])[None]  # (1, 2, 3, 3)
    Y = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    # mean A = [[.5,.5,0],[0,.5,.5],[.5,0,.5]]; A Y = [[.5,.5],[.25,.75],[.75,.25]]; (Y + A Y) / 2:
    expected = torch.tensor([[[0.75, 0.25], [0.125, 0.875], [0.625, 0.375]]])
    assert torch.allclose(tl.align_labels(Y, tl.attend_labels(attn, Y)), expected)


def test_transmix_label_by_hand():
    cls_attn = torch.tensor([[0.1, 0.15, 0.25]])  # unnormalised: renormalised to .2 .3 .5
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    # lam_attn = .2*1 + .3*0 + .5*.5 = .45; TransMix uses (lam_area + lam_attn) / 2 = (.6 + .45) / 2
    out = tl.transmix_label(cls_attn, w, lam=0.6)
    assert torch.allclose(out, torch.tensor([[0.525, 0.475]]))


def test_class_target_and_loss_by_hand():
    t = tl.class_target(torch.tensor([[0.7, 0.3]]), torch.tensor([[2, 0]]), num_classes=4, smoothing=0.1)
    # smoothed one-hots: .9 * e + .025; .7 * (.025,.025,.925,.025) + .3 * (.925,.025,.025,.025)
    assert torch.allclose(t, torch.tensor([[0.295, 0.025, 0.655, 0.025]]))
    logits = torch.randn(3, 4)
    target = torch.rand(3, 4).softmax(-1)
    assert torch.allclose(tl.soft_cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_vit_transmix_attention_is_last_class_token_row():
    torch.manual_seed(6)
    model = tiny("vit").eval()
    maps, handles = capture_attention(model)
    with torch.no_grad():
        _, _, cls_attn = model(torch.randn(2, 3, 32, 32), random_token_labels(2, model.num_patches, 2))
    for h in handles:
        h.remove()
    assert cls_attn.shape == (2, model.num_patches) and cls_attn.dtype == torch.float32
    assert torch.equal(cls_attn, maps[-1][:, :, 0, 1:].mean(1))
    swin = tiny("swin")
    assert swin(torch.randn(1, 3, 32, 32), random_token_labels(1, swin.num_patches, 2))[2] is None  # no class token


# 5. Labels never change the network -----------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_labels_do_not_change_logits_or_gradients(family):
    model = tiny(family, drop_path_rate=0.2).train()  # drop path on: the label path must use no RNG
    x = torch.randn(4, 3, 32, 32)
    w = random_token_labels(4, model.num_patches, 2)

    def run(with_labels):
        model.zero_grad()
        torch.manual_seed(7)
        out = model(x, w)[:2] if with_labels else (model(x), None)
        out[0].square().sum().backward()
        return out[0].detach(), [p.grad.clone() for p in model.parameters()], out[1]

    logits_a, grads_a, _ = run(False)
    logits_b, grads_b, label = run(True)
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert not label.requires_grad  # attention is detached on the label path: no gradient through labels


# 6. Window partition and patch merging -----------------------------------------------------------

def test_window_partition_round_trip_and_layout():
    x = torch.arange(2 * 8 * 8 * 3).float().view(2, 8, 8, 3)
    windows = vit.window_partition(x, 4)  # (2*4, 16, 3)
    assert windows.shape == (8, 16, 3)
    assert torch.equal(vit.window_reverse(windows, 4, 8, 8), x)
    # window 1 of image 0 is rows 0-3, columns 4-7, row-major inside
    assert torch.equal(windows[1, :, 0], x[0, 0:4, 4:8, 0].flatten())
    # the shifted partition of a block covers each token once, at the position the shift says
    blk = tiny("swin").layers[0].blocks[1]
    R = 16
    ids = torch.arange(R * R).float().view(1, R, R, 1)
    assert torch.equal(blk.partition(ids)[:, :, 0].long(), window_token_index(R, blk.ws, blk.shift))
    assert torch.equal(blk.reverse(blk.partition(ids), R, R), ids)


def test_patch_merging_labels_and_channel_order():
    labels = torch.rand(2, 4, 6, 3)
    merged = vit.merge_labels(labels)
    assert torch.allclose(merged[1, 1, 2], labels[1, 2:4, 4:6].mean((0, 1)))
    assert torch.allclose(merged.sum(-1), labels.sum(-1).view(2, 2, 2, 3, 2).mean((2, 4)))
    # features: 2x2 block [[a, b], [c, d]] is concatenated as (a, c, b, d), the checkpoints' order
    pm = vit.PatchMerging(1)
    pm.norm = torch.nn.Identity()
    with torch.no_grad():
        pm.reduction.weight.copy_(torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]))  # picks slots 1, 2
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1)  # a=1 b=2 c=3 d=4
    out, _ = pm(x)
    assert out.flatten().tolist() == [3.0, 2.0]


# 7. CutMix ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["grid", "pixel"])
@pytest.mark.parametrize("B", [1, 4, 5])
def test_cutmix_pixels_and_token_labels(mode, B):
    torch.manual_seed(8)
    p, H = 4, 32
    x = torch.randn(B, 3, H, H) + 10 * torch.arange(B).view(B, 1, 1, 1)  # images far apart
    for trial in range(10):
        xm, w, lam = tl.cutmix(x, p, alpha=1.0, mode=mode)
        assert w.shape == (B, (H // p) ** 2, 2) and w.dtype == torch.float32
        from_x1 = (xm == x).all(dim=1)  # (B, H, W): pixels that came from x itself
        from_x2 = (xm == x.flip(0)).all(dim=1)
        assert (from_x1 | from_x2).all()  # every pixel comes from one of the pair
        for i in range(B):
            if i == B - 1 - i:  # the middle image of an odd batch is paired with itself
                assert torch.equal(xm[i], x[i])
                continue
            share = F.avg_pool2d(from_x1[i].float()[None, None], p).flatten()
            assert torch.allclose(w[i, :, 0], share, atol=1e-6)  # token weight = its pixel share
            assert abs(from_x1[i].float().mean().item() - lam) < 1e-6  # lam = share of x's pixels
            box = ~from_x1[i]  # the pasted region is one axis-aligned rectangle
            if box.any():
                rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
                assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert torch.allclose(w.sum(-1), torch.ones(B, (H // p) ** 2))
        assert abs(w[..., 0].mean().item() - lam) < 1e-6
        if mode == "grid":
            assert set(w.unique().tolist()) <= {0.0, 1.0}  # whole patches swapped
    with pytest.raises(ValueError):
        tl.cutmix(x, p, mode="box")
    with pytest.raises(ValueError):
        tl.cutmix(torch.randn(2, 3, 30, 30), p)


def test_cutmix_pixel_mode_gives_soft_tokens():
    torch.manual_seed(9)
    soft = 0
    for _ in range(20):
        _, w, _ = tl.cutmix(torch.randn(2, 3, 32, 32), 8, mode="pixel")
        soft += ((w > 0) & (w < 1)).any().item()
    assert soft > 10  # boxes on pixels cut through patches most of the time


def test_mixup_is_the_convex_combination():
    x = torch.randn(3, 2, 4, 4)
    xm, lam = tl.mixup(x, lam=0.25)
    assert lam == 0.25 and torch.allclose(xm, 0.25 * x + 0.75 * x.flip(0))


# 8. Autocast ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_targets_and_loss_are_float32_under_autocast(family, fused, dtype):
    """The whole target side of a training step stays float32 under autocast, on both attention paths:
    the aligned label (against a float64 model), the class target (rows sum to 1 to 1e-6, equal to
    the one computed outside autocast) and the loss. The fused path is no less precise than the
    explicit one: its label columns would otherwise come out of the kernel rounded to bf16 / fp16."""
    torch.manual_seed(10)
    model = tiny(family)
    xm, w, _ = tl.cutmix(torch.randn(6, 3, 32, 32), patch_size(model), mode="pixel")
    sources = torch.stack([torch.arange(6), torch.arange(6).flip(0)], 1) % 7
    with torch.no_grad():
        _, exact, _ = copy.deepcopy(model).double()(xm.double(), w.double())
    errors = {}
    for path in sorted({False, fused}):
        m = fused_twin(model) if path else model
        with torch.autocast("cpu", dtype=dtype):
            logits, label, _ = m(xm, w)
            target = tl.class_target(label, sources, 7, smoothing=0.1)
            loss = tl.soft_cross_entropy(logits, target)
        assert logits.dtype == dtype
        assert label.dtype == target.dtype == loss.dtype == torch.float32
        assert (label.sum(-1) - 1).abs().max() < 1e-6 and (target.sum(-1) - 1).abs().max() < 1e-6
        assert torch.equal(target, tl.class_target(label, sources, 7, smoothing=0.1))
        errors[path] = (label.double() - exact).abs().max().item()
    assert errors[False] < (5e-4 if dtype == torch.bfloat16 else 1e-4)  # from the low-precision logits alone
    assert errors[fused] <= 2 * errors[False]


def test_class_target_ignores_autocast():
    """A weighted sum of one-hot rows: under bf16 autocast an einsum would round it to ~2e-3."""
    w = torch.rand(64, 2).softmax(-1)
    sources = torch.randint(0, 1000, (64, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = tl.class_target(w, sources, 1000, smoothing=0.1)
    onehot = F.one_hot(sources, 1000).double() * 0.9 + 0.1 / 1000
    assert t.dtype == torch.float32
    assert (t.double() - (w.double()[:, :, None] * onehot).sum(1)).abs().max() < 1e-7


# Architecture facts --------------------------------------------------------------------------------

# sha256 of the sorted "name (shape)" lines of timm 1.0.31's state dicts (computed once, by hand)
TIMM = {
    "deit_t": (5_717_416, "e1821155d0eba217"), "deit_s": (22_050_664, "02ef580c167435d6"),
    "deit_b": (86_567_656, "6e116342a243f50b"), "swin_t": (28_288_354, "200e903bd6eb53ea"),
    "swin_s": (49_606_258, "394893058ebeb68b"), "swin_b": (87_768_224, "359e800918d43853"),
}


@pytest.mark.parametrize("name", list(TIMM))
def test_parameter_names_shapes_and_counts_match_timm(name):
    with torch.device("meta"):  # no memory, no init: names and shapes only
        model = vit.create_model(name)
    sd = model.state_dict()
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(sd.items()))
    count, digest = TIMM[name]
    assert sum(p.numel() for p in model.parameters()) == count
    assert hashlib.sha256(lines.encode()).hexdigest()[:16] == digest, (
        f"{name}'s state dict no longer matches timm's names and shapes (timm 1.0.31: {len(sd)} entries "
        f"hash to {digest}); ours:\n{lines}")


def test_image_size_changes_grid_and_bad_sizes_are_refused():
    m = vit.create_model("vit_mini", num_classes=10, img_size=48)
    assert m.num_patches == 144 and m(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="built for 48x48"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of the window"):
        vit.create_model("swin_t", img_size=200)
    with pytest.raises(ValueError, match="patch size"):
        vit.create_model("deit_t", img_size=100)
    with pytest.raises(ValueError, match="unknown model"):
        vit.create_model("resnet50")
    # maps no larger than the window are one window with no shift (8 -> ws 4 with shift, 4 -> ws 4, 2 -> ws 2)
    swin = vit.create_model("swin_mini", num_classes=3, img_size=16)
    assert [(b.ws, b.shift) for s in swin.layers for b in s.blocks] == [(4, 0), (4, 2), (4, 0), (4, 0), (2, 0), (2, 0)]
    assert swin(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_vit_forward_equals_functional_reference():
    """The whole ViT forward written again with torch.nn.functional and SDPA, on the model's parameters."""
    torch.manual_seed(11)
    model = tiny("vit").eval()
    P = dict(model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    t = F.conv2d(x, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=4)  # (B, D, 8, 8)
    t = t.flatten(2).transpose(1, 2)  # (B, 64, D)
    t = torch.cat([P["cls_token"].expand(2, -1, -1), t], 1) + P["pos_embed"]
    D, h = t.shape[-1], 4
    for i in range(len(model.blocks)):
        pre = f"blocks.{i}."
        u = F.layer_norm(t, (D,), P[pre + "norm1.weight"], P[pre + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(u, P[pre + "attn.qkv.weight"], P[pre + "attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (h, D // h)).transpose(1, 2) for z in (q, k, v))  # (B, h, N, d)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        t = t + F.linear(a, P[pre + "attn.proj.weight"], P[pre + "attn.proj.bias"])
        u = F.layer_norm(t, (D,), P[pre + "norm2.weight"], P[pre + "norm2.bias"], eps=1e-6)
        u = F.linear(F.gelu(F.linear(u, P[pre + "mlp.fc1.weight"], P[pre + "mlp.fc1.bias"])),
                     P[pre + "mlp.fc2.weight"], P[pre + "mlp.fc2.bias"])
        t = t + u
    t = F.layer_norm(t[:, 0], (D,), P["norm.weight"], P["norm.bias"], eps=1e-6)
    expected = F.linear(t, P["head.weight"], P["head.bias"])
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_window_attention_equals_sdpa_with_bias(fused):
    """Both paths keep one contract: the output, the attended labels and the first token's weights."""
    torch.manual_seed(12)
    attn = vit.Attention(32, 4, fused=fused)
    x, bias = torch.randn(6, 16, 32), torch.randn(3, 4, 16, 16)  # 2 images x 3 windows
    labels = random_token_labels(6, 16, 3)
    out, labels_attn, cls_attn = attn(x, bias, labels, cls_attn=True)
    q, k, v = attn.qkv(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
    full_bias = bias.repeat(2, 1, 1, 1)  # (6, 4, 16, 16): window w of image b is batch entry 3b + w
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full_bias).transpose(1, 2).flatten(2)
    weights = ((q @ k.transpose(-1, -2)) / 8 ** 0.5 + full_bias).softmax(-1)  # (6, 4, 16, 16)
    assert torch.allclose(out, attn.proj(ref), atol=1e-5)
    assert torch.allclose(labels_attn, weights.mean(1) @ labels, atol=1e-6)
    assert torch.allclose(cls_attn, weights[:, :, 0], atol=1e-6) and not cls_attn.requires_grad
    assert attn(x, bias)[1:] == (None, None)  # neither without being asked


def test_relative_position_index_by_hand():
    # 3x3 window; offsets query - key (dr, dc) in -2..2 index the table at (dr + 2) * 5 + (dc + 2)
    idx = vit.relative_position_index(3)
    assert idx[0, 0] == 12 and idx[0, 5] == (0 - 1 + 2) * 5 + (0 - 2 + 2) and idx[8, 0] == 24
    assert idx[4].tolist() == [18, 17, 16, 13, 12, 11, 8, 7, 6]  # the centre sees every offset 1..-1


@pytest.mark.parametrize("R, ws, shift", [(8, 4, 2), (14, 7, 3), (16, 4, 2)])
def test_shift_mask_allows_exactly_true_neighbours(R, ws, shift):
    """Inside a shifted window two tokens may attend iff they are also neighbours without the roll."""
    mask = vit.shift_mask(R, R, ws, shift)  # (nW, n, n)
    idx = window_token_index(R, ws, shift)  # (nW, n) token ids in the unshifted map
    r, c = idx // R, idx % R
    # a cyclic shift brings tokens from the far side: their true distance is >= R - ws
    near = ((r[:, :, None] - r[:, None, :]).abs() < ws) & ((c[:, :, None] - c[:, None, :]).abs() < ws)
    assert torch.equal(mask == 0, near)


def test_layer_norm_eps_as_the_checkpoints_expect():
    def eps(model):
        return {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps(tiny("vit")) == {1e-6} and eps(tiny("swin")) == {1e-5}


@pytest.mark.parametrize("mode", ["grid", "pixel"])
def test_cutmix_truth_counts_the_visible_foreground(mode):
    torch.manual_seed(3)
    B, H, W = 4, 12, 12  # even: no image is its own partner
    x = torch.arange(B, dtype=torch.float).view(B, 1, 1, 1).expand(B, 3, H, W)  # each image one value
    fg = torch.rand(B, H, W) < 0.3
    fg[1] = False  # an image without an object: its mixes show only their partner's, or nothing (NaN)
    xm, w, lam, visible = truth.cutmix_truth(x, fg, 4, mode=mode)
    # independently: a pixel of mixed image b comes from image b where it holds b's value
    own = xm[:, 0] == torch.arange(B, dtype=torch.float).view(B, 1, 1)  # (B, H, W)
    shown = torch.where(own, fg, fg.flip(0))
    assert torch.equal(visible, torch.stack([(shown & own).sum((1, 2)), (shown & ~own).sum((1, 2))], 1).float())
    expected = (shown & own).sum((1, 2)).float() / shown.sum((1, 2)).float()
    assert torch.allclose(truth.true_share(visible), expected, equal_nan=True)
    assert torch.allclose(own.float().mean((1, 2)), torch.full((B,), lam))  # lam is the pixel share
    all_fg = truth.cutmix_truth(x, torch.ones(B, H, W), 4, mode=mode)
    assert torch.allclose(truth.true_share(all_fg[3]), torch.full((B,), all_fg[2]))  # all foreground: truth = lam


def test_cutmix_box_has_the_cutmix_size():
    """An unclipped box has sides 2 * (int(H * sqrt(1 - lam)) // 2), CutMix's rule (Yun et al. 2019)."""
    torch.manual_seed(13)
    x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 32, 32)
    sizes = set()
    for _ in range(200):
        xm, _, _ = tl.cutmix(x, 4, mode="pixel", lam=0.75)  # sqrt(0.25) * 32 = 16
        box = xm[0, 0] == 1
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if len(rows) and rows.min() > 0 and rows.max() < 31 and cols.min() > 0 and cols.max() < 31:
            sizes.add((len(rows), len(cols)))
    assert sizes == {(16, 16)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("family", FAMILIES)
def test_models_run_in_other_dtypes(family, dtype):
    model = tiny(family).to(dtype)
    xm, w, _ = tl.cutmix(torch.randn(2, 3, 32, 32, dtype=dtype), patch_size(model))
    with torch.no_grad():
        logits, label, _ = model(xm, w)
    assert logits.dtype == dtype and label.dtype == torch.float32
    assert (label.sum(-1) - 1).abs().max() < 1e-5


def test_wrong_token_labels_and_alpha_are_refused():
    model = tiny("vit")
    with pytest.raises(ValueError, match=r"\(2, 64, K\)"):
        model(torch.randn(2, 3, 32, 32), torch.rand(2, 63, 2))
    with pytest.raises(ValueError, match="alpha > 0"):
        tl.cutmix(torch.randn(2, 3, 32, 32), 4, alpha=0.0)


# 9. Fused attention (scaled_dot_product_attention, labels riding with the values) --------------------

def fused_twin(model):
    """The same model with fused attention: same parameters, so outputs must agree."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, vit.Attention):
            m.fused = True
    return twin


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_explicit_in_float32(family):
    """Logits and labels to 1e-5, parameter gradients to 1e-4 relative, with and without labels."""
    torch.manual_seed(14)
    model = tiny(family, drop_path_rate=0.1).train()
    fused = fused_twin(model)
    xm, w, _ = tl.cutmix(torch.randn(4, 3, 32, 32), patch_size(model), mode="pixel")
    for labels in (None, w):
        outs, grads = [], []
        for m in (model, fused):
            m.zero_grad()
            torch.manual_seed(15)  # the same drop-path draws
            out = m(xm) if labels is None else m(xm, labels)
            logits = out if labels is None else out[0]
            (logits.square().sum() + (0 if labels is None else (logits * out[1][:, :1]).sum())).backward()
            outs.append(out)
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        if labels is None:
            assert torch.allclose(outs[0], outs[1], atol=1e-5)
        else:
            assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
            assert (outs[0][1] - outs[1][1]).abs().max() < 1e-5
            assert not outs[1][1].requires_grad
        assert (grads[0] - grads[1]).norm() <= 1e-4 * grads[0].norm()


def test_fused_transmix_attention_equals_explicit():
    torch.manual_seed(16)
    model = tiny("vit").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        w = random_token_labels(3, model.num_patches, 2)
        _, _, a = model(x, w)
        _, _, b = fused_twin(model)(x, w)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_explicit_under_bf16_autocast(family):
    """bf16 carries ~3 significant digits: logits agree to 0.05, labels to 5e-3 and stay on the simplex."""
    torch.manual_seed(17)
    model = tiny(family).eval()
    xm, w, _ = tl.cutmix(torch.randn(4, 3, 32, 32), patch_size(model), mode="pixel")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        la, ya, _ = model(xm, w)
        lb, yb, _ = fused_twin(model)(xm, w)
    assert yb.dtype == torch.float32
    assert (la.float() - lb.float()).abs().max() < 5e-2
    assert (ya - yb).abs().max() < 5e-3 and (yb.sum(-1) - 1).abs().max() < 5e-3


def test_fused_attention_pads_to_kernel_width():
    """Any K works: q, k, v are padded as the kernel needs and the result equals the explicit product."""
    torch.manual_seed(18)
    q, k, v = torch.randn(3, 2, 4, 5, 6).unbind(0)  # (B=2, h=4, N=5, d=6)
    for K in (1, 2, 3, 10):
        labels = torch.rand(2, 5, K).softmax(-1)
        out, labels_attn, cls_attn = vit.fused_attention(q, k, v, None, labels, scale=0.5, cls_attn=True)
        A = (q @ k.transpose(-1, -2) * 0.5).softmax(-1)
        assert torch.allclose(out, A @ v, atol=1e-5)
        assert torch.allclose(labels_attn, tl.attend_labels(A, labels), atol=1e-6)
        assert torch.allclose(cls_attn, A[:, :, 0], atol=1e-6)


def test_label_columns_are_padded_only_as_far_as_the_kernel_needs():
    """CPU's flash kernel: one width for q, k and v, no more; CUDA's memory-efficient kernel (float32): q/k and
    v each to 16 bytes, as torch's check_head_dim_size_mem_efficient asks (sm80+: 4 float32, 8 halves)."""
    f32 = torch.float32
    assert vit.head_widths(64, 64 + 2, "cpu", f32) == (66, 66)  # features + labels in one call
    assert vit.head_widths(64, 2, "cpu", f32) == (64, 64)  # the labels' own call beside a bf16 one
    assert vit.head_widths(64, 1000, "cpu", f32) == (1000, 1000)
    assert vit.head_widths(64, 64 + 2, "cuda", f32) == (64, 68)
    assert vit.head_widths(64, 2, "cuda", f32) == (64, 4)
    assert vit.head_widths(32, 1000, "cuda", f32) == (32, 1000)
    assert vit.head_widths(30, 3, "cuda", torch.bfloat16) == (32, 8)
    # and on this CPU torch picks flash, not its math path, for every label-carrying call of a ViT
    torch.manual_seed(19)
    model = tiny("vit", fused_attn=True)
    xm, w, _ = tl.cutmix(torch.randn(2, 3, 32, 32), patch_size(model))
    kernels = vit.attention_kernels(model, xm, w)
    assert kernels == {"features + labels: float32, q/k width 10, v width 10": "flash_attention"}  # d 8 + K 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels = vit.attention_kernels(model, xm, w)
    assert kernels == {"labels: float32, q/k width 8, v width 8": "flash_attention",
                       "features: bfloat16, q/k width 8, v width 8": "flash_attention"}


class MaskDtypes(torch.overrides.TorchFunctionMode):
    """(q dtype, mask dtype) of every scaled_dot_product_attention call made inside it."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is not None:
            self.seen.add((args[0].dtype, kwargs["attn_mask"].dtype))
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swin_bias_reaches_the_kernel_in_q_dtype_under_autocast_and_compile(dtype):
    """CUDA's memory-efficient kernel refuses a mask whose dtype differs from q's; the fused path casts the
    float32 bias (table + shift mask) to q's dtype itself instead of trusting autocast or compile to."""
    torch.manual_seed(20)
    model = tiny("swin", fused_attn=True)
    xm, w, _ = tl.cutmix(torch.randn(2, 3, 32, 32), patch_size(model))
    with MaskDtypes() as calls, torch.autocast("cpu", dtype=dtype):
        model(xm, w)
    assert calls.seen == {(dtype, dtype), (torch.float32, torch.float32)}  # features; the labels' own call
    seen = set()

    def backend(gm, example_inputs):  # dynamo's graph: each call's inputs as traced under autocast
        for node in gm.graph.nodes:
            if node.target is F.scaled_dot_product_attention and node.kwargs.get("attn_mask") is not None:
                seen.add((node.args[0].meta["example_value"].dtype,
                          node.kwargs["attn_mask"].meta["example_value"].dtype))
        return gm.forward
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=dtype):
        torch.compile(model, backend=backend)(xm, w)
    assert seen == {(dtype, dtype), (torch.float32, torch.float32)}


def test_oracle_target_is_the_visible_share_of_each_object():
    # pixels of each object a mixed image shows: both visible, image 2's hidden, image 1's hidden, none visible
    visible = torch.tensor([[30.0, 10.0], [12.0, 0.0], [0.0, 7.0], [0.0, 0.0]])
    oracle = truth.oracle_label(visible, lam=0.7)
    assert torch.allclose(oracle, torch.tensor([[0.75, 0.25], [1.0, 0.0], [0.0, 1.0], [0.7, 0.3]]))
    # and on a real CutMix draw: where some object shows, the oracle's share of image 1 is the true share
    torch.manual_seed(5)
    x, fg = torch.randn(8, 3, 16, 16), torch.rand(8, 16, 16) < 0.2
    _, _, lam, visible = truth.cutmix_truth(x, fg, 4)
    share, oracle = truth.true_share(visible), truth.oracle_label(visible, lam)
    assert torch.allclose(oracle[:, 0][share.isfinite()], share[share.isfinite()])
    assert torch.allclose(oracle.sum(1), torch.ones(8))


def test_target_errors_count_ghost_labels_on_a_constructed_batch():
    visible = torch.tensor([[30.0, 10.0],   # both objects show: truth 0.75
                            [12.0, 0.0],    # image 2's object is hidden: truth 1
                            [0.0, 7.0],     # image 1's object is hidden: truth 0
                            [0.0, 0.0]])    # no object shows: not counted at all
    area = tl.area_label(0.6, 4, torch.device("cpu"))  # lam 0.6 for every pair
    error_sum, shown, ghosts = truth.target_errors(area, visible).tolist()
    assert shown == 3 and ghosts == 2  # rows 2 and 3: 0.4 and 0.6 to an invisible object
    assert error_sum == pytest.approx(0.15 + 0.4 + 0.6)
    oracle = truth.oracle_label(visible, 0.6)
    assert truth.target_errors(oracle, visible).tolist() == [0.0, 3.0, 0.0]  # the truth: no error, no ghost
    almost = torch.tensor([[0.75, 0.25], [0.95, 0.05], [0.1, 0.9], [0.5, 0.5]])  # 0.05 is below 0.1; 0.1 is not
    assert truth.target_errors(almost, visible).tolist()[2] == 1
