"""Token-Label Alignment (TL-Align): CutMix, token labels, their alignment, the targets.

Follows Xiao et al., "Token-Label Alignment for Vision Transformers", ICCV 2023 (arXiv:2210.06455).
The paper's method in four steps, each a function here:

1. `cutmix`: paper Eq. (1), X~ = M*X1 + (1-M)*X2, and the label of every patch token: which share of
   its pixels comes from which image (`mixup` beside it). `area_label`: Eq. (1)'s y~ = lam*y1 + (1-lam)*y2,
   the target TL-Align corrects.
2. `attend_labels` + `align_labels`: one attention layer moves the token labels with the same
   (head-averaged, detached) attention that moves the features, followed by the residual average:
   Y <- (Y + mean_h(A) Y) / 2 (paper Sec. 3, Fig. 2; the weight 1/2 is the official code's).
3. The model (vit.py) calls them in every block and reads the label of what its classifier
   reads: the class token (ViT/DeiT) or the mean over tokens (Swin).
4. `class_target` + `soft_cross_entropy`: the aligned label over images becomes a class distribution,
   and the loss is the soft-target cross-entropy.

Labels are tracked as shares of the K mixed *sources* (K = 2 for a CutMix pair), not over the C
classes as the official code does: the label path is linear, so the two are exactly equal (tested in
test_alignment.py), and (B, N, 2) costs nothing next to the (B, N, 1000) the official code carries.

Names: token_labels (B, N, K) are the tokens' labels over the sources; a label (B, K) is one image's.
Under `mixup` every token carries the same label, so alignment is the identity and the area label is
exact. Last, `transmix_label`: the target of TransMix (Chen et al., CVPR 2022), a baseline.
How right each target is, measured against the objects a mixed image shows, is truth.py.
Facts of the official code (github.com/Euphoria16/TL-Align) are noted where we match or fix them;
no code was copied. This file needs only torch.
"""
import math

import torch
import torch.nn.functional as F


def _sample_lambda(alpha: float) -> float:
    """lam ~ Beta(alpha, alpha), drawn from torch's global generator (seeded by the caller)."""
    if alpha <= 0:
        raise ValueError(f"the Beta(alpha, alpha) of CutMix / Mixup needs alpha > 0, got {alpha}")
    return float(torch.distributions.Beta(alpha, alpha).sample())


def _rand_box(H: int, W: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area ~(1-lam)*H*W with a uniform centre, clipped to the image (CutMix, Yun et al. 2019).

    Returns (y0, y1, x0, x1), half-open. Clipping shrinks the box, so callers recompute lam from it.
    """
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    return y0, y1, x0, x1


def cutmix(x: torch.Tensor, patch_size: int, alpha: float = 1.0, mode: str = "grid",
           lam: float | None = None):
    """CutMix a batch with its flipped self, and give every patch token its label over the two sources.

    Paper Eq. (1): X~ = M*X1 + (1-M)*X2 with X1 = x, X2 = x.flip(0); M is 1 outside the box.
    mode 'grid': the box is drawn on the patch grid, whole patches are swapped (the official code).
    mode 'pixel': the box is drawn on pixels (timm's CutMix); a patch that straddles the box edge
    gets its pixel shares as a soft token label.
    In both modes lam is recomputed from the clipped box, so it is exactly the pixel share of x
    and equals the mean of the token labels.

    x: (B, C, H, W), H and W multiples of patch_size; it is not modified (the box is pasted into a
    copy). `lam` given skips the Beta draw.
    Returns x_mixed (B, C, H, W), token_labels (B, N, 2) float32 with N = (H/p)*(W/p) in row-major
    order of the patch grid ([..., 0] = share of x, [..., 1] = share of x.flip(0)), and lam (float).
    """
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    lam = _sample_lambda(alpha) if lam is None else lam
    if mode == "grid":
        gy0, gy1, gx0, gx1 = _rand_box(H // p, W // p, lam)
        y0, y1, x0, x1 = gy0 * p, gy1 * p, gx0 * p, gx1 * p
    elif mode == "pixel":
        y0, y1, x0, x1 = _rand_box(H, W, lam)
    else:
        raise ValueError(f"unknown CutMix mode {mode!r}; use 'grid' or 'pixel'")

    mask = torch.ones(H, W, device=x.device)  # paper Eq. (1): M = 1 where pixels come from X1
    mask[y0:y1, x0:x1] = 0
    x_mixed = x.clone()
    x_mixed[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1].flip(0)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)

    share = F.avg_pool2d(mask[None, None], p).flatten()  # (N,) pixel share of x in each patch
    token_labels = torch.stack([share, 1 - share], dim=-1).expand(B, -1, -1)  # (B, N, 2)
    return x_mixed, token_labels, lam


def mixup(x: torch.Tensor, alpha: float = 0.8, lam: float | None = None):
    """Mixup (Zhang et al. 2018) with the flipped batch: x~ = lam*x + (1-lam)*x.flip(0).

    Every token of a Mixup image carries the same label (lam, 1-lam), and attention rows sum to 1,
    so alignment leaves it unchanged: the area target is exact and no token labels are needed.
    x: (B, C, H, W). Returns x_mixed (B, C, H, W) and lam (float).
    """
    lam = _sample_lambda(alpha) if lam is None else lam
    return x.mul(lam).add_(x.flip(0), alpha=1 - lam), lam


def area_label(lam: float, batch_size: int, device: torch.device) -> torch.Tensor:
    """The area label of a CutMix / Mixup pair, paper Eq. (1): y~ = lam*y1 + (1-lam)*y2, as (B, 2) float32
    shares of the two sources: the baseline TL-Align corrects.

    Built by fill kernels on the device: torch.tensor([lam, ...], device='cuda') would be a blocking
    host-to-device copy every step.
    """
    label = torch.full((batch_size, 2), 1.0 - lam, device=device)
    label[:, 0] = lam
    return label


def attend_labels(attn: torch.Tensor, token_labels: torch.Tensor) -> torch.Tensor:
    """Labels follow the values through one attention layer: Y_attn = mean_h(A) Y.

    Paper Sec. 3, Fig. 2: A is the attention averaged over heads (softmax weights, before dropout),
    detached, so that no gradient flows through labels; the product runs in float32 even under
    autocast (the official code runs it in fp16). The fused path (vit.fused_attention) gets the same
    Y_attn from the attention kernel itself, with the labels riding along as extra value columns.

    attn: (B, h, N, N) softmax weights, token_labels: (B, N, K) float32. Returns (B, N, K) float32.
    """
    with torch.autocast(device_type=token_labels.device.type, enabled=False):
        A = attn.detach().mean(dim=1, dtype=torch.float32)  # (B, N, N), no larger than one head's map
        return A @ token_labels


def align_labels(token_labels: torch.Tensor, labels_attn: torch.Tensor) -> torch.Tensor:
    """The residual connection around attention, on labels: Y <- (Y + Y_attn) / 2.

    The fixed weight 1/2 is the official code's (paper Sec. 3). LayerNorm, the MLP and the output
    projection act on each token alone and leave labels unchanged, so with `attend_labels` this is a
    whole transformer block. labels, labels_attn: (B, N, K). Returns (B, N, K).
    """
    return 0.5 * (token_labels + labels_attn)


def class_target(label: torch.Tensor, source_labels: torch.Tensor, num_classes: int,
                 smoothing: float = 0.0) -> torch.Tensor:
    """Soft class target t = sum_k label_k * smooth(onehot(y_k)): a label over sources made a class distribution.

    Label smoothing is applied once, to the one-hot source labels: smooth(e) = (1-eps) e + eps / C.
    label: (B, K) shares of the sources (rows sum to 1); source_labels: (B, K) class indices, e.g.
    torch.stack([y, y.flip(0)], 1) for a CutMix pair. Returns (B, num_classes) float32.
    """
    onehot = F.one_hot(source_labels, num_classes).float()  # (B, K, C)
    onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
    # a broadcast product and a sum, not einsum: autocast would run einsum as a bf16 / fp16 bmm, whose
    # rounding (~2e-3) is as large as TL-Align's whole correction |label - lam|
    return (label.float()[:, :, None] * onehot).sum(dim=1)  # (B, C) float32 under any autocast


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy, mean over the batch: -sum_c t_c log softmax(z)_c.

    logits, target: (B, C). Returns a scalar; the log-softmax is taken in float32.
    """
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def transmix_label(cls_attn: torch.Tensor, token_labels: torch.Tensor, lam: float) -> torch.Tensor:
    """TransMix's label (Chen et al., CVPR 2022), a baseline for class-token models.

    a = the class token's attention to the N patch tokens in the last block (mean over heads, before
    dropout, detached), renormalised over the patches; lam_attn = sum_i a_i * w_i1, the attention mass
    on image 1. TransMix's code trains with lam = (lam_area + lam_attn) / 2. With soft edge tokens
    (CutMix mode 'pixel') w_i1 is the pixel share; TransMix's own code rounds every token to 0 or 1.

    cls_attn: (B, N) or (B, h, N); token_labels: (B, N, 2). Returns the label (B, 2): shares of the sources.
    """
    a = cls_attn.detach().float()
    if a.dim() == 3:
        a = a.mean(dim=1)  # (B, N)
    a = a / a.sum(dim=-1, keepdim=True)
    lam_attn = (a * token_labels[..., 0]).sum(dim=-1)  # (B,)
    lam_mix = 0.5 * (lam + lam_attn)
    return torch.stack([lam_mix, 1 - lam_mix], dim=-1)
