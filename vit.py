"""Vision Transformers written out: ViT/DeiT and Swin, with attention that moves token labels.

- ViT/DeiT: Dosovitskiy et al. 2021, Touvron et al. 2021 (class token, learned position embedding).
- Swin: Liu et al. 2021 (window attention with relative position bias, shifted windows with an
  attention mask, patch merging, global average pooling).

Every attention layer is an explicit softmax and hands its weights to the label path of TL-Align
(tl_align.attend_labels / align_labels, paper Sec. 3). The contract of both families:
`model(x)` returns the logits (B, num_classes); `model(x, token_labels)` returns (logits, label,
cls_attn), label the (B, K) float32 aligned label of what the classifier reads (ViT: the class
token; Swin: the mean of the final tokens) and cls_attn the last block's class-token attention over
the N patches, mean over heads, detached, (B, N) float32 (TransMix's input; None for Swin, which has
no class token). `fused_attn=True` swaps in torch's scaled_dot_product_attention, with the labels
riding along as extra value columns (fused_attention, after the models), tested equal to the
explicit path.

Parameter names and shapes are those of timm's deit_{tiny,small,base}_patch16_224 and
swin_{tiny,small,base}_patch4_window7_224 (timm >= 0.9 layout: Swin's patch merging opens the
stage it feeds), so their checkpoints load with strict=True. Facts taken from timm and from
microsoft/Swin-Transformer: the layer layout, LayerNorm eps (1e-6 ViT, 1e-5 Swin), the -100 shift
mask, the order of the 2x2 concatenation in patch merging, the window/shift clamp for small maps.
No code was copied. Weights of another image size, window, class or channel count are fitted to
these models by checkpoint.adapt_state_dict.
"""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from tl_align import align_labels, attend_labels

# name: architecture; img_size is the default input size (create_model may change it)
PRESETS = {
    # ViT/DeiT, patch 16, 224 px, class token
    "deit_t": dict(family="vit", img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),  # 5.72M
    "deit_s": dict(family="vit", img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),  # 22.05M
    "deit_b": dict(family="vit", img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),  # 86.6M
    # Swin, patch 4, window 7, 224 px
    "swin_t": dict(family="swin", img_size=224, patch_size=4, window_size=7, embed_dim=96,
                   depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),    # 28.29M
    "swin_s": dict(family="swin", img_size=224, patch_size=4, window_size=7, embed_dim=96,
                   depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),   # 49.61M
    "swin_b": dict(family="swin", img_size=224, patch_size=4, window_size=7, embed_dim=128,
                   depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),   # 87.77M
    # 32 px images (CIFAR, padded Fashion-MNIST, synthetic): 8x8 / 16x16 token grids; sized so that a
    # 60k-image epoch trains in about 3 minutes on a 2-core CPU (~320 images/s)
    "vit_mini": dict(family="vit", img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3),   # 0.68M
    "swin_mini": dict(family="swin", img_size=32, patch_size=2, window_size=4, embed_dim=48,
                      depths=(2, 2, 2), num_heads=(2, 4, 8)),         # 1.27M
}


def create_model(name: str, num_classes: int = 1000, img_size: int | None = None, in_chans: int = 3,
                 drop_path_rate: float = 0.0, fused_attn: bool = False, **overrides) -> nn.Module:
    """Build a preset by name; img_size=None keeps the preset's size, overrides replace its fields.

    fused_attn: attention through torch's scaled_dot_product_attention, labels riding with the values
    (same logits, labels and gradients as the explicit path, without the (N, N) weights in memory).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = {**PRESETS[name], **overrides}
    family = cfg.pop("family")
    if img_size is not None:
        cfg["img_size"] = img_size
    cls = VisionTransformer if family == "vit" else SwinTransformer
    return cls(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate, fused_attn=fused_attn,
               **cfg)


# ----------------------------------------------------------------------------- shared parts

class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    """Two-layer MLP with GELU, applied to each token alone (so token labels pass unchanged)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, channels last: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, norm: bool):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.img_size, self.patch_size, self.grid = img_size, patch_size, img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"the model was built for {self.img_size}x{self.img_size} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]}; pass img_size to create_model")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, D)


class Attention(nn.Module):
    """Multi-head softmax attention: explicit (the readable default) or fused (SDPA, labels riding along)."""

    def __init__(self, dim: int, num_heads: int, fused: bool = False):
        super().__init__()
        self.num_heads, self.scale, self.fused = num_heads, (dim // num_heads) ** -0.5, fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None, token_labels=None, cls_attn=False):
        """x: (B, N, C); bias: additive logits (..., h, N, N), B a multiple of their count;
        token_labels: (B, N, K).

        Returns (out, labels_attn, cls_attn) on both paths: out (B, N, C); labels_attn = mean_h(A) Y
        (B, N, K) float32, None without labels; cls_attn = A[:, :, 0], the first token's weights over
        all N tokens (B, h, N), at least float32, detached, computed only if cls_attn=True (else None).
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        if not self.fused:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            if bias is not None:  # broadcast over leading groups of the batch, e.g. the images of a window batch
                logits = (logits.view(-1, *bias.shape) + bias).view(logits.shape)
            # at least fp32 under autocast (as CUDA autocast does): the label path reads these weights
            attn = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
            out = attn.to(v.dtype) @ v
            labels_attn = None if token_labels is None else attend_labels(attn, token_labels)
            cls_attn = attn[:, :, 0].detach() if cls_attn else None  # (B, h, N)
        else:  # the same from torch's kernel, without the (N, N) weights in memory (fused_attention, below)
            out, labels_attn, cls_attn = fused_attention(q, k, v, bias, token_labels, self.scale, cls_attn)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), labels_attn, cls_attn


def check_token_labels(token_labels, B: int, N: int):
    """Token labels must be (B, N, K): one weight vector per patch token, row-major on the grid."""
    if token_labels is not None and (token_labels.dim() != 3 or token_labels.shape[:2] != (B, N)):
        raise ValueError(f"token_labels must be (batch, tokens, K) = ({B}, {N}, K) for this model and input, "
                         f"got {tuple(token_labels.shape)}")


def init_weights(module: nn.Module):
    """timm's defaults: truncated-normal(0.02) linear weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- ViT / DeiT

class Block(nn.Module):
    """Pre-norm transformer block; labels move with the attention (paper Sec. 3)."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, fused_attn: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, token_labels=None, cls_attn=False):
        """x: (B, N, C), token_labels: (B, N, K) or None. Returns x, token_labels, cls_attn (Attention.forward)."""
        a, labels_attn, cls_attn = self.attn(self.norm1(x), token_labels=token_labels, cls_attn=cls_attn)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if token_labels is not None:
            # the whole block's label update; DropPath is ignored here, as in the official code
            token_labels = align_labels(token_labels, labels_attn)
        return x, token_labels, cls_attn


class VisionTransformer(nn.Module):
    """ViT/DeiT with a class token: logits from the class token after the final norm."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, drop_path_rate=0.0, fused_attn=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm=False)
        self.num_patches = self.patch_embed.grid ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # deeper blocks drop more often
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, dpr[i], fused_attn) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # timm 0.3.2's, which DeiT and TL-Align ran (later: 1e-6)

    def forward(self, x, token_labels=None):
        """x: (B, C, H, W); token_labels: (B, N, K) source weights of the N patch tokens (row-major).

        Returns logits (B, num_classes); with token_labels (logits, label, cls_attn): label (B, K)
        float32, the class token's aligned label, and cls_attn (B, N) float32, the last block's
        class-token attention over the N patches, mean over heads, detached (TransMix's input).
        """
        x = self.patch_embed(x).flatten(1, 2)  # (B, N, D)
        B = x.shape[0]
        check_token_labels(token_labels, B, self.num_patches)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        if token_labels is not None:
            y = token_labels.float()
            # the class token starts at y~ = the mean of the patch labels (paper Eq. (1))
            token_labels = torch.cat([y.mean(dim=1, keepdim=True), y], dim=1)  # (B, 1+N, K)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x, token_labels, cls_attn = blk(x, token_labels, cls_attn=token_labels is not None and i == last)
        logits = self.head(self.norm(x[:, 0]))
        if token_labels is None:
            return logits
        # TransMix weighs the patches by the class token's attention to them (not to itself)
        return logits, token_labels[:, 0], cls_attn[:, :, 1:].mean(dim=1).float()


# ----------------------------------------------------------------------------- Swin

def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C): non-overlapping windows, row-major inside."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3)  # (B, H/ws, W/ws, ws, ws, C)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition: (B * nW, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).transpose(2, 3)  # (B, H/ws, ws, W/ws, ws, C)
    return x.reshape(-1, H, W, C)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into the ((2ws-1)^2, h) bias table for every query/key pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (ws - 1)  # (2, N, N), offsets shifted to >= 0
    return rel[0] * (2 * ws - 1) + rel[1]


def shift_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask: -100 between tokens that the cyclic shift made neighbours."""
    region = torch.zeros(1, H, W, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, (rows, cols) in enumerate(itertools.product(cuts, cuts)):
        region[:, rows, cols] = i
    region = window_partition(region, ws).squeeze(-1)  # (nW, ws*ws)
    same = region[:, :, None] == region[:, None, :]
    return torch.zeros(same.shape).masked_fill_(~same, -100.0)


class WindowAttention(Attention):
    """Attention inside a window, with a learned bias per relative position and head."""

    def __init__(self, dim: int, num_heads: int, ws: int, fused: bool = False):
        super().__init__(dim, num_heads, fused)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=False)

    def forward(self, x, mask=None, token_labels=None):
        """x: (B*nW, ws*ws, C); mask: (nW, ws*ws, ws*ws) or None; token_labels: (B*nW, ws*ws, K) or None."""
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (h, n, n)
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, h, n, n), broadcast over the images of the batch
        return super().forward(x, bias, token_labels)


class SwinBlock(nn.Module):
    """Swin block: (shifted) window attention + MLP; labels are windowed exactly like the features."""

    def __init__(self, dim: int, num_heads: int, resolution: int, window_size: int, shift: bool,
                 drop_path: float, fused_attn: bool = False):
        super().__init__()
        # a map no larger than the window is one window, and shifting it would do nothing
        self.ws = min(window_size, resolution)
        self.shift = self.ws // 2 if shift and resolution > window_size else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.ws, fused_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)
        mask = shift_mask(resolution, resolution, self.ws, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def partition(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B*nW, ws*ws, C): cyclic shift, then windows."""
        if self.shift:
            t = torch.roll(t, shifts=(-self.shift, -self.shift), dims=(1, 2))
        return window_partition(t, self.ws)

    def reverse(self, windows: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B*nW, ws*ws, C) -> (B, H, W, C): windows back in place, shift undone."""
        t = window_reverse(windows, self.ws, H, W)
        if self.shift:
            t = torch.roll(t, shifts=(self.shift, self.shift), dims=(1, 2))
        return t

    def forward(self, x, token_labels=None):
        """x: (B, H, W, C), token_labels: (B, H, W, K) or None. Returns x, token_labels."""
        B, H, W, C = x.shape
        # window attention is block-diagonal: each window's labels move with its own attention
        windowed_labels = None if token_labels is None else self.partition(token_labels)
        a, labels_attn, _ = self.attn(self.partition(self.norm1(x)), self.attn_mask, windowed_labels)
        x = x + self.drop_path(self.reverse(a, H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if token_labels is not None:
            token_labels = align_labels(token_labels, self.reverse(labels_attn, H, W))
        return x, token_labels


def merge_labels(token_labels: torch.Tensor) -> torch.Tensor:
    """Patch merging joins a 2x2 neighbourhood into one token: its label is their mean.

    (B, H, W, K) -> (B, H/2, W/2, K).
    """
    B, H, W, K = token_labels.shape
    return token_labels.view(B, H // 2, 2, W // 2, 2, K).mean(dim=(2, 4))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token with twice the channels: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, token_labels=None):
        """x: (B, H, W, C), token_labels: (B, H, W, K) or None. Returns x (B, H/2, W/2, 2C), token_labels."""
        B, H, W, C = x.shape
        # channel order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], as the checkpoints expect
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        x = self.reduction(self.norm(x))
        return x, (merge_labels(token_labels) if token_labels is not None else None)


class SwinStage(nn.Module):
    """Optional patch merging, then blocks alternating regular and shifted windows."""

    def __init__(self, dim: int, depth: int, num_heads: int, resolution: int, window_size: int,
                 downsample: bool, drop_path: list[float], fused_attn: bool = False):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else None
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, resolution, window_size, shift=i % 2 == 1, drop_path=drop_path[i],
                      fused_attn=fused_attn)
            for i in range(depth))

    def forward(self, x, token_labels=None):
        if self.downsample is not None:
            x, token_labels = self.downsample(x, token_labels)
        for blk in self.blocks:
            x, token_labels = blk(x, token_labels)
        return x, token_labels


class PoolHead(nn.Module):
    """Global average pool over the token map, then a linear classifier (timm's `head.fc`)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(1, 2)))  # (B, H, W, C) -> (B, num_classes)


class SwinTransformer(nn.Module):
    """Swin Transformer; the classifier reads the mean token, so the target is the mean token label."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.0,
                 fused_attn=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm=True)
        res = self.patch_embed.grid
        self.num_patches = res ** 2
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        stages = []
        for i, depth in enumerate(depths):
            if i > 0 and res % 2:
                raise ValueError(f"image size {img_size}: stage {i} would merge an odd {res}x{res} token "
                                 f"map; use an image size whose token grid halves evenly")
            res = res // 2 if i > 0 else res
            ws = min(window_size, res)
            if res % ws:
                raise ValueError(f"image size {img_size}: stage {i}'s {res}x{res} token map is not a "
                                 f"multiple of the window {ws}; use a multiple of "
                                 f"{patch_size * window_size * 2 ** (len(depths) - 1)} px")
            stages.append(SwinStage(embed_dim * 2 ** i, depth, num_heads[i], res, window_size,
                                    downsample=i > 0, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                                    fused_attn=fused_attn))
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))
        self.head = PoolHead(embed_dim * 2 ** (len(depths) - 1), num_classes)
        init_weights(self)

    def forward(self, x, token_labels=None):
        """x: (B, C, H, W); token_labels: (B, N, K) source weights of the N patch tokens (row-major).

        Returns logits (B, num_classes); with token_labels (logits, label, None): label (B, K) float32,
        the mean of the final tokens' labels, since the classifier reads the mean of their features;
        None in the place of ViT's class-token attention, as Swin has no class token.
        """
        x = self.patch_embed(x)  # (B, H, W, C)
        B, H, W, _ = x.shape
        check_token_labels(token_labels, B, self.num_patches)
        token_labels = None if token_labels is None else token_labels.float().view(B, H, W, -1)
        for stage in self.layers:
            x, token_labels = stage(x, token_labels)
        logits = self.head(self.norm(x))
        return logits if token_labels is None else (logits, token_labels.mean(dim=(1, 2)), None)


# ----------------------------------------------------------------------------- fused attention (--fused-attn)

def fused_attention(q, k, v, bias, token_labels, scale: float, cls_attn: bool = False):
    """softmax(q k^T * scale + bias) [v | Y] = [A v | A Y] in one scaled_dot_product_attention call.

    The labels ride with the values, so TL-Align needs no (N, N) matrix: each head returns its A_h Y
    next to A_h v. Where the kernel wants wider or equal head widths (head_widths), q, k and the
    values are padded with zero columns (q k^T is unchanged; the scale is passed explicitly). The label
    columns are detached, so no gradient flows through them and the gradients of q, k, v are those of
    plain attention.
    In bf16 / fp16 (autocast or a half model) the kernel would return the label columns rounded (~1e-3,
    as large as TL-Align's whole correction): there a second call, without gradient, computes them from
    the same q and k in float32. The first token's row of A, which the kernel does not return, is
    computed on its own if cls_attn.

    q, k, v: (B, h, N, d); bias: (..., h, N, N) broadcast over leading groups of B, or None;
    token_labels: (B, N, K) or None. Returns what Attention.forward's explicit path computes: out (B, h, N, d),
    mean_h(A_h Y) (B, N, K) float32 or None, and A[:, :, 0] (B, h, N) if cls_attn, else None.
    """
    B, h, N, d = q.shape
    row = first_row(q, k, bias, scale) if cls_attn else None
    if token_labels is None:
        return _sdpa(q, k, v, bias, scale), None, row
    K = token_labels.shape[-1]
    y = token_labels.detach()[:, None].expand(B, h, N, K)  # (B, h, N, K), the same for all heads
    if v.dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            qk, vw = head_widths(d, K, q.device.type, torch.float32)
            y_attn = _sdpa(_pad(q.float(), qk), _pad(k.float(), qk), _pad(y.float(), vw),
                           None if bias is None else bias.detach(), scale)  # a mask needing grad: math
        return _sdpa(q, k, v, bias, scale), y_attn[..., :K].mean(dim=1), row
    qk, vw = head_widths(d, d + K, q.device.type, q.dtype)
    out = _sdpa(_pad(q, qk), _pad(k, qk), _pad(torch.cat([v, y], -1), vw), bias, scale)
    return out[..., :d], out[..., d:d + K].detach().float().mean(dim=1), row


def head_widths(d: int, value_width: int, device_type: str, dtype: torch.dtype) -> tuple[int, int]:
    """(width of q and k, width of the values) that the kernel running a label call takes: zero columns
    are work thrown away, so no more than it needs. The label calls are float32, which CUDA runs on the
    memory-efficient kernel: q/k and the values each at their own width, a multiple of 16 bytes (4
    float32 columns; 8 for halves). CPU's flash kernel, and any other, wants one width for q, k and v.
    Without them, scaled_dot_product_attention falls back to its math path, ~3x slower.
    d: the head width of q and k; value_width: the columns the values need.
    """
    if device_type == "cuda":
        align = 4 if dtype == torch.float32 else 8
        return -(-d // align) * align, -(-value_width // align) * align
    width = max(d, value_width)
    return width, width


@torch.no_grad()
def first_row(q, k, bias, scale: float):
    """The first token's attention weights alone, as the explicit path computes them (at least float32).

    q, k: (B, h, N, d); bias: (..., h, N, N) or None. Returns (B, h, N), detached.
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, h, 1, N)
    if bias is not None:  # the bias's first rows, broadcast over leading groups of the batch
        row_bias = bias[..., :1, :]  # (..., h, 1, N)
        logits = (logits.view(-1, *row_bias.shape) + row_bias).view(logits.shape)
    return logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))[:, :, 0]


def _pad(t, width: int):
    """Zero columns on the right of the head dimension: (..., d) -> (..., width)."""
    return F.pad(t, (0, width - t.shape[-1]))


def _sdpa(q, k, v, bias, scale: float):
    """scaled_dot_product_attention with a bias that broadcasts over leading groups of the batch.

    Kernels take a 4-d mask broadcast over the batch: the bias's own batch (Swin's nW windows, the inner
    factor of B) is folded into the heads, (B, h) -> (B / nW, nW * h); a copy unless already contiguous.
    q, k: (B, h, N, d'), v: (B, h, N, e), bias: (..., h, N, N) or None. Returns (B, h, N, e).
    """
    B, h, N, _ = q.shape
    if bias is not None:
        # the bias in q's dtype, here and only here: kernels refuse a mask of another dtype (CUDA's
        # memory-efficient one), and autocast, or compile under it, does not always cast it
        bias = bias.to(q.dtype)
        G = bias[..., 0, 0, 0].numel()
        q, k, v = (t.reshape(-1, G * h, N, t.shape[-1]) for t in (q, k, v))
        bias = bias.reshape(1, G * h, N, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).reshape(B, h, N, -1)


# ----------------------------------------------------------------------------- which kernels run

class _SdpaCalls(torch.overrides.TorchFunctionMode):
    """Records, for every scaled_dot_product_attention call made inside it, the kernel torch chooses."""

    def __init__(self, head_dims: set):
        super().__init__()
        self.head_dims, self.calls = head_dims, {}  # the models' head dims; description -> kernel, in order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask")
            choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=kwargs.get("scale"))
            # fused_attention's calls: the features alone, the features with the labels riding along
            # (float32), or the labels alone (float32, without gradient, beside a half-precision call)
            role = ("labels" if not q.requires_grad else
                    "features" if v.shape[-1] in self.head_dims else "features + labels")
            what = (f"{role}: {str(q.dtype).split('.')[-1]}, q/k width {q.shape[-1]}, v width {v.shape[-1]}"
                    f"{', mask' if mask is not None else ''}")
            self.calls[what] = torch.nn.attention.SDPBackend(choice).name.lower()
        return func(*args, **kwargs)


def attention_kernels(model: nn.Module, x: torch.Tensor, token_labels: torch.Tensor | None = None) -> dict:
    """The kernel scaled_dot_product_attention picks for each kind of call that one forward of the model on
    (x, token_labels) makes, under the caller's autocast, e.g. {'features: bfloat16, q/k width 64, v width
    64': 'flash_attention', 'labels: float32, q/k width 64, v width 4': 'efficient_attention'}; empty on the
    explicit path. The choice is torch's own (torch._fused_sdp_choice on the call's inputs)."""
    head_dims = {m.qkv.out_features // 3 // m.num_heads for m in model.modules() if isinstance(m, Attention)}
    recorder = _SdpaCalls(head_dims)
    with recorder:  # with gradient, as in training: the label-only calls are the ones without
        model(x, token_labels) if token_labels is not None else model(x)
    return recorder.calls
