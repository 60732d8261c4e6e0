"""Figures of TL-Align at work: token labels layer by layer, and how right each CutMix target is.

    python visualize.py runs/latest/best.pt              # figures/tokens.png and figures/shares.png
    python visualize.py CKPT --pairs 6 --images 2048 --out-dir figures

tokens.png (paper Fig. 2, on a trained model): one row per CutMix pair of validation images, chosen at
random (seeded), with a box of area 1 - lam (--lam) at a random place. Columns: the mixed image; the
truth (image 1's visible object red, image 2's blue); the token labels as the share of image 1 per
token, at the input (the CutMix labels of paper Eq. (1)) and after a few blocks of alignment; and,
block by block, the share of image 1 in the label the classifier reads (the class token for ViT, the
mean token for Swin) against the area lam and the truth.

shares.png (the analysis behind paper Sec. 3's claim that aligned targets are more accurate): over many
validation pairs, each target's share of image 1 against the true share (visible foreground of image 1
over all visible foreground): the area lam, TL-Align, and TransMix for class-token models.

Needs a data set with object masks (synthetic, mnist, fashion_mnist). matplotlib is imported only here.
"""
import argparse
import os
import sys

import torch

import checkpoint
import data
import truth
import vit


class VisualizeError(Exception):
    """A problem the user can fix: main() prints its one line and exits with code 2."""


def load(path):
    """The model of a train.py checkpoint, in eval mode, and its args."""
    try:
        ckpt = checkpoint.load_checkpoint(path)
    except checkpoint.CheckpointError as e:
        hint = "" if os.path.exists(path) else (" (train one with python train.py: it writes "
                                                "runs/<time>-<data>-<model>/best.pt, linked as runs/latest)")
        raise VisualizeError(f"{e}{hint}") from None
    try:
        args = ckpt["args"]
        info = data.DATASETS[args["data"]]
        model = vit.create_model(args["model"], num_classes=info["num_classes"], img_size=info["img_size"],
                                 in_chans=info["in_chans"])
        model.load_state_dict(checkpoint.unwrap_state_dict(ckpt["model"])[0])
    except Exception as e:  # not train.py's, another model: both mean "use another file"
        raise VisualizeError(f"{path} is not a train.py checkpoint ({type(e).__name__}); "
                             f"pass the best.pt or checkpoint.pt of a run") from None
    return model.eval(), args


def blocks_of(model):
    """The transformer blocks in the order they run (Swin: over all stages)."""
    if isinstance(model, vit.VisionTransformer):
        return list(model.blocks)
    return [b for s in model.layers for b in s.blocks]


def trace_labels(model, x, token_labels):
    """The token labels after every block: a list over blocks of the share of image 1 per token on the
    token grid (B, h, w), and the classifier's share of image 1 per block (B, L + 1), input included."""
    grids, heads = [], []

    def keep(module, inputs, output):
        labels = output[1][..., 0]  # share of image 1: ViT (B, 1 + N), Swin (B, H, W)
        if labels.dim() == 2:  # class token first, then the patch tokens in row-major order
            side = int((labels.shape[1] - 1) ** 0.5)
            grids.append(labels[:, 1:].reshape(-1, side, side))
            heads.append(labels[:, 0])
        else:
            grids.append(labels)
            heads.append(labels.mean(dim=(1, 2)))

    hooks = [b.register_forward_hook(keep) for b in blocks_of(model)]
    try:
        with torch.no_grad():
            model(x, token_labels)
    finally:
        for h in hooks:
            h.remove()
    first = token_labels[..., 0]
    side = int(first.shape[1] ** 0.5)
    return [first.reshape(-1, side, side)] + grids, torch.stack([first.mean(1)] + heads, dim=1)


def shares(model, val_set, num_images, alpha=1.0, mode="grid", seed=0):
    """truth.target_shares on the first num_images validation images (one box per 8 pairs)."""
    info = val_set.info
    x = data.normalize(val_set.images[:num_images], info["mean"], info["std"])
    s = truth.target_shares(model, x, val_set.masks[:num_images], model.patch_embed.patch_size, alpha, mode, seed=seed)
    return {k: v for k, v in s.items() if v is not None}


def show_image(ax, image, mean, std):
    """A normalized (C, H, W) image as RGB (or grey)."""
    image = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    image = image.clamp(0, 1).permute(1, 2, 0)
    ax.imshow(image.squeeze(-1).numpy(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=1)


def tokens_figure(plt, model, args, val_set, num_pairs, box_lam, seed, path):
    info, p = val_set.info, model.patch_embed.patch_size
    torch.manual_seed(seed)
    picks = torch.randperm(len(val_set))[:2 * num_pairs].view(num_pairs, 2)
    depth = len(blocks_of(model))
    shown = sorted({1, depth // 2, depth})  # the input plus these layers as heat maps
    columns = 3 + len(shown) + 1  # mixed image, truth, input tokens, the shown layers, the curve
    fig, axes = plt.subplots(num_pairs, columns, figsize=(2.3 * columns, 2.3 * num_pairs), squeeze=False)
    for row, pair in enumerate(picks):
        x = data.normalize(val_set.images[pair], info["mean"], info["std"])
        masks = val_set.masks[pair].bool()  # (2, H, W)
        source = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, *masks.shape[1:])
        # the image index rides along as a channel: it tells which image each mixed pixel shows
        xs, w, lam, visible = truth.cutmix_truth(torch.cat([x, source], 1), masks, p, mode=args["cutmix_mode"],
                                              lam=box_lam)
        share = truth.true_share(visible)  # (2,) the visible share of image 1
        xm, from_1 = xs[:, :-1], xs[0, -1] == 0  # (2, C, H, W), (H, W)
        grids, head = trace_labels(model, xm, w)
        ax = axes[row]
        show_image(ax[0], xm[0], info["mean"], info["std"])
        truth_map = torch.zeros(*masks.shape[1:], 3)  # image 1's visible object red, image 2's blue
        truth_map[..., 0] = (masks[0] & from_1).float()
        truth_map[..., 2] = (masks[1] & ~from_1).float()
        ax[1].imshow(truth_map.numpy())
        ax[1].set_title(f"truth {share[0]:.2f}", fontsize=9)
        ax[0].set_title(f"mixed, area lam {lam:.2f}", fontsize=9)
        for j, layer in enumerate([0] + shown):
            ax[2 + j].imshow(grids[layer][0].numpy(), cmap="coolwarm", vmin=0, vmax=1)
            ax[2 + j].set_title("input tokens" if layer == 0 else f"after block {layer}", fontsize=9)
        curve = ax[-1]
        curve.plot(range(depth + 1), head[0].numpy(), "o-", ms=3, label="TL-Align")
        curve.axhline(lam, color="gray", ls="--", label="area lam")
        curve.axhline(share[0].item(), color="green", ls=":", label="truth")
        curve.set_ylim(0, 1)
        curve.set_xlabel("block", fontsize=8)
        curve.set_title("share of image 1", fontsize=9)
        if row == 0:
            curve.legend(fontsize=7)
        for a in ax[:-1]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"{args['model']} on {args['data']}: token labels (share of image 1, red = 1, blue = 0)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shares_figure(plt, model, args, val_set, num_images, seed, path):
    s = shares(model, val_set, num_images, args["cutmix_alpha"], args["cutmix_mode"], seed)
    names = [("area", "area lam (CutMix)"), ("tl", "TL-Align"), ("transmix", "TransMix")]
    names = [(k, t) for k, t in names if k in s]
    errors = truth.share_errors(s)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], names):
        r = torch.corrcoef(torch.stack([s[key], s["truth"]]))[0, 1].item()
        ax.scatter(s["truth"].numpy(), s[key].numpy(), s=4, alpha=0.4)
        ax.plot([0, 1], [0, 1], color="gray", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("true share of image 1 (visible foreground)", fontsize=8)
        ax.set_ylabel(f"{title} share of image 1", fontsize=8)
        ax.set_title(f"{title}: MAE {errors[key]:.3f}, r {r:.2f}", fontsize=9)
    fig.suptitle(f"{args['model']} on {args['data']}: {len(s['truth'])} CutMix pairs of validation images",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {k: errors[k] for k, _ in names}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default=os.path.join("runs", "latest", "best.pt"),
                   help="best.pt or checkpoint.pt of a train.py run (default: the newest run's best.pt)")
    p.add_argument("--pairs", type=int, default=4, help="rows of tokens.png")
    p.add_argument("--lam", type=float, default=0.5,
                   help="lam the boxes of tokens.png are drawn for, at random places (clipping and CutMix's even "
                        "sides make the actual lam, in each title, larger)")
    p.add_argument("--images", type=int, default=2000, help="validation images of shares.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="figures")
    p.add_argument("--data-path", default=None, help="the data set's directory (default: its own)")
    args = p.parse_args(argv)
    try:
        model, run_args = load(args.checkpoint)
        if not data.DATASETS[run_args["data"]]["has_masks"]:
            raise VisualizeError(f"{args.checkpoint} was trained on {run_args['data']}, which has no object masks; "
                                 f"visualize.py needs a synthetic, mnist or fashion_mnist run")
        val_set = data.load_small(run_args["data"], args.data_path or run_args.get("data_path"), train=False)
        if args.pairs < 1 or args.images < 8 or not 0 <= args.lam <= 1:
            raise VisualizeError(f"--pairs {args.pairs} --images {args.images} --lam {args.lam}: need at least "
                                 f"1 pair, 8 images and 0 <= lam <= 1")
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        print(f"error: --out-dir {args.out_dir} cannot be created ({e.strerror}); choose a writable directory",
              file=sys.stderr)
        sys.exit(2)
    except (VisualizeError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tokens_figure(plt, model, run_args, val_set, args.pairs, args.lam, args.seed,
                  os.path.join(args.out_dir, "tokens.png"))
    maes = shares_figure(plt, model, run_args, val_set, args.images, args.seed,
                         os.path.join(args.out_dir, "shares.png"))
    print(f"wrote {args.out_dir}/tokens.png and {args.out_dir}/shares.png; label MAE over the pairs: "
          + ", ".join(f"{k} {v:.4f}" for k, v in maes.items()))


if __name__ == "__main__":
    main()
