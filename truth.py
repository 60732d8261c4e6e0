"""How right a CutMix target is: the share of each object a mixed image really shows, from object masks.

Not part of the method (tl_align.py is): the measuring beside it. CutMix's lam counts pixels; what a mixed
image shows of an image is its visible object (paper Sec. 1, Fig. 1; Sec. 3, "token fluctuation"). Where
masks exist that share is known exactly, and every target can be held against it:

  cutmix_truth      tl_align.cutmix, and the object pixels of each source the mixed image shows
  true_share        the visible share of image 1 (NaN where no object shows)
  oracle_label      the oracle target: the visible shares themselves, an upper reference for any target
  target_errors     a batch's mean error and ghost labels, as sums kept on the device (train.py logs them)
  target_shares     a model's area, TL-Align and TransMix shares on CutMix pairs of images, and the truth
  share_errors      each target's mean absolute error against the truth

A "ghost label" (after OA-CutMix, Nauen et al. 2026) is weight that a target gives to an image none of whose
object the mixed image shows. Needs only torch and tl_align.py.
"""
import torch

from tl_align import area_label, cutmix, transmix_label


def cutmix_truth(x: torch.Tensor, foreground: torch.Tensor, patch_size: int, alpha: float = 1.0,
                 mode: str = "grid", lam: float | None = None):
    """`cutmix`, and how much of each source's object the mixed image really shows, from object masks.

    The paper's premise (Sec. 1, Fig. 1): lam counts pixels, but what a mixed image shows of an image
    is its visible object. With masks that is measurable: the visible foreground pixels of image 1 and
    of image 2. The masks and the image index ride through cutmix as extra channels, so the truth
    follows the very pixels the model sees.

    x: (B, C, H, W); foreground: (B, H, W), 1 on the object; alpha, mode, lam as for `cutmix`. Returns
    x_mixed, token_labels, lam as `cutmix` does, and visible (B, 2) float: the object pixels of image 1
    (x) and of image 2 (x.flip(0)) in each mixed image. The true share of image 1 is
    visible[:, 0] / visible.sum(1) (`true_share`).
    """
    B = x.shape[0]
    fg = foreground[:, None].to(x.dtype)  # (B, 1, H, W)
    source = torch.arange(B, dtype=x.dtype, device=x.device).view(B, 1, 1, 1).expand_as(fg)
    mixed, token_labels, lam = cutmix(torch.cat([x, fg, source], 1), patch_size, alpha, mode, lam)
    fg_mixed, from_1 = mixed[:, -2], mixed[:, -1] == source[:, 0]  # (B, H, W) each
    visible = torch.stack([(fg_mixed * from_1).sum((1, 2)), (fg_mixed * ~from_1).sum((1, 2))], dim=1)  # (B, 2)
    return mixed[:, :-2], token_labels, lam, visible


def true_share(visible: torch.Tensor) -> torch.Tensor:
    """The share of image 1 in the visible object pixels, visible (B, 2) -> (B,): NaN where none is visible."""
    return visible[:, 0] / visible.sum(dim=1)  # 0 / 0 = NaN


def oracle_label(visible: torch.Tensor, lam: float) -> torch.Tensor:
    """The oracle target, an upper reference and not a method: each source's share of the object pixels
    the mixed image shows, lam where it shows none. It needs the object masks, which training data lack;
    with them it is the best any target (area, TransMix, TL-Align) can do. visible: (B, 2). Returns (B, 2)."""
    total = visible.sum(dim=1, keepdim=True)  # (B, 1)
    return torch.where(total > 0, visible / total.clamp_min(1), area_label(lam, len(visible), visible.device))


GHOST_WEIGHT = 0.1  # a target that gives at least this to an image none of whose object is visible: a ghost label


def target_errors(label: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """How wrong a batch's targets are, as sums to accumulate on the device (no host read).

    label: (B, 2) the target's share of each source; visible: (B, 2) from `cutmix_truth`. Counted over
    the pairs that show some object (where none shows, no target can be right or wrong). Returns (3,)
    float32: the summed |label[:, 0] - true share|, the number of those pairs, and the number with a
    ghost label: a source none of whose object is visible gets at least GHOST_WEIGHT of the target.
    """
    shown = visible.sum(dim=1) > 0  # (B,)
    error = torch.where(shown, (label[:, 0].float() - true_share(visible)).abs(), 0.0)  # 0 / 0 dropped
    ghost = shown & ((visible == 0) & (label.float() >= GHOST_WEIGHT)).any(dim=1)  # (B,)
    return torch.stack([error.sum(), shown.sum().float(), ghost.sum().float()])


@torch.no_grad()
def target_shares(model, images: torch.Tensor, foreground: torch.Tensor, patch_size: int, alpha: float = 1.0,
                  mode: str = "grid", pairs_per_box: int = 8, seed: int = 0):
    """How right each target is: over CutMix pairs of `images`, the true share of image 1 (see
    `cutmix_truth`) and the share each target gives it.

    Consecutive groups of pairs_per_box images are mixed with one box each (drawn from `seed`, the
    caller's RNG untouched). model(x, token_labels) must return (logits, label, cls_attn) as vit.py's
    models do; TransMix is measured where cls_attn is not None (class-token models).
    images: (n, C, H, W) normalized, foreground: (n, H, W). Returns {'truth', 'area', 'tl', 'transmix'
    (None without a class token)}: (m,) float32 tensors on the CPU, the pairs with no visible object
    dropped.
    """
    device = next(model.parameters()).device
    out = {"truth": [], "area": [], "tl": [], "transmix": []}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(images) - pairs_per_box + 1, pairs_per_box):
            x, fg = images[start:start + pairs_per_box], foreground[start:start + pairs_per_box]
            xm, token_labels, lam, visible = cutmix_truth(x, fg, patch_size, alpha, mode)
            share = true_share(visible)
            keep = share.isfinite()
            _, label, cls_attn = model(xm.to(device), token_labels.to(device))
            out["truth"].append(share[keep])
            out["area"].append(torch.full((int(keep.sum()),), lam))
            out["tl"].append(label[:, 0].float().cpu()[keep])
            if cls_attn is not None:
                out["transmix"].append(transmix_label(cls_attn.float().cpu(), token_labels, lam)[:, 0][keep])
    return {k: (torch.cat(v) if v else None) for k, v in out.items()}


def share_errors(shares: dict) -> dict:
    """Mean absolute error of each target's share against the truth, from `target_shares`' output:
    {'area', 'tl', 'transmix'} floats, None for a target that was not measured."""
    return {k: (None if shares.get(k) is None else (shares[k] - shares["truth"]).abs().mean().item())
            for k in ("area", "tl", "transmix")}
