"""TL-Align beside a ViT you did not write: token labels carried by watching each block's attention.

TL-Align's label path never feeds back into the network (paper Sec. 3, Fig. 2): after L blocks the
token labels are Y_L = prod_l (I + A_l) / 2 . Y_0, with A_l block l's attention averaged over heads.
So they can ride beside any ViT: forward hooks read each block's queries and keys as the model
runs, and tl_align.attend_labels / align_labels move the labels, in float32 and without gradient.

    with track_labels(model, token_labels) as t:
        logits = model(images)
    t.label  # (B, K): the aligned label of what the classifier reads

Supported, each tested in test_track.py (timm 1.0.31, transformers 5.24.0):
- timm's VisionTransformer and VisionTransformerDistilled (vit_*, deit_*) whose blocks
  hold timm.layers.Attention: fused attention on or off, qk_norm, class / distillation / register
  tokens, global_pool 'token' or 'avg'. The hooks sit on attn.q_norm and attn.k_norm (Identity
  unless qk_norm): their outputs are exactly the q and k the attention multiplies, SDPA or not.
- Hugging Face transformers 5: ViTForImageClassification, DeiTForImageClassification (class
  and distillation token), any attention implementation (sdpa, eager, ...). The hooks sit on each
  attention's q_proj and k_proj; transformers 4.x (query / key inside ViTSelfAttention) is refused.
- vit.py's VisionTransformer, which carries the labels itself (model(x, token_labels)): a cross-check.
Anything else raises ValueError rather than give a wrong label: Swin and other window attention
(vit.py's Swin carries labels itself), rope or relative-position attention, attention masks, patch
dropout, a label grid that does not match the tokens, a pooling whose label is not a token mean.
As in vit.py, the labels follow the attention before its dropout, and DropPath is ignored on the label
path (the official code's choices: github.com/Euphoria16/TL-Align).

Facts read off the timm and transformers sources (module names, token order, SDPA's default scale);
no code was copied.
"""
import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

import tl_align as tl

SUPPORTED = ("timm VisionTransformer / VisionTransformerDistilled whose blocks use timm.layers.Attention "
             "(global_pool 'token' or 'avg'), transformers >= 5 ViTForImageClassification and "
             "DeiTForImageClassification, and vit.py's VisionTransformer")

# Hugging Face: module -> (classifier class, its attention class, prefix tokens before the patches)
HF_MODELS = {
    "transformers.models.vit.modeling_vit": ("ViTForImageClassification", "ViTAttention", 1),  # [CLS]
    "transformers.models.deit.modeling_deit": ("DeiTForImageClassification", "DeiTAttention", 2),  # [CLS], [DIST]
}

# arguments that would change the attention weights; the hooks cannot see them, so they are refused
MASK_ARGS = ("attn_mask", "attention_mask", "is_causal", "bias")


@dataclass
class Watch:
    """One attention layer: the submodules whose outputs give q and k, each with the function that
    turns that output into (B, h, T, d), and the scale of q k^T as the layer applies it."""
    attn: nn.Module
    q: tuple[nn.Module, Callable]
    k: tuple[nn.Module, Callable]
    scale: float


@dataclass
class Plan:
    """Where a model's attention is watched, and how its classifier reads the final tokens."""
    layers: list[Watch]
    prefix: int  # tokens before the patches: class, distillation, registers
    readout: Callable  # final token labels (B, T, K) -> (B, K)


class LabelTracker:
    """The token labels of one forward pass, moved block by block as the hooks see q and k."""

    def __init__(self, token_labels: torch.Tensor, plan: Plan):
        if token_labels.dim() != 3:
            raise ValueError(f"token_labels must be (batch, patches, K), got {tuple(token_labels.shape)}")
        y = token_labels.detach().float()  # (B, N, K)
        B, N, K = y.shape
        # every prefix token (class, distillation, register) starts at y~ = the mean patch label, paper Eq. (1)
        self.tokens = torch.cat([y.mean(dim=1, keepdim=True).expand(B, plan.prefix, K), y], dim=1)  # (B, P+N, K)
        self.plan, self.blocks_seen = plan, 0

    def update(self, q: torch.Tensor, k: torch.Tensor, scale: float):
        """One attention layer (paper Sec. 3): A = mean_h softmax(q k^T * scale), Y <- (Y + A Y) / 2.

        q, k: (B, h, T, d) as the layer multiplies them, T = prefix + patch tokens.
        """
        if self.blocks_seen == len(self.plan.layers):
            raise RuntimeError("track_labels saw more attention layers than the model has: one forward pass per "
                               "`with track_labels(...)` (with gradient checkpointing, call backward after the block)")
        B, h, T, d = q.shape
        if (B, T) != self.tokens.shape[:2]:
            P = self.plan.prefix
            raise ValueError(f"token_labels hold {self.tokens.shape[0]} images x {self.tokens.shape[1] - P} patches, "
                             f"but the model's attention sees {B} x {T - P} patches (+{P} prefix tokens): check the "
                             f"image and patch size; patch dropout is not supported")
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            attn = ((q.float() * scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (B, h, T, T)
            y = self.tokens.to(q.device)
            self.tokens = tl.align_labels(y, tl.attend_labels(attn, y))  # (B, T, K)
        self.blocks_seen += 1

    @property
    def label(self) -> torch.Tensor:
        """(B, K) float32: the aligned label of what the classifier reads."""
        if self.blocks_seen != len(self.plan.layers):
            raise RuntimeError(f"track_labels saw {self.blocks_seen} of the model's {len(self.plan.layers)} "
                               f"attention layers: read the label after one full forward pass")
        return self.plan.readout(self.tokens)


@contextmanager
def track_labels(model: nn.Module, token_labels: torch.Tensor):
    """Carry TL-Align's token labels beside one forward pass of `model`; yields a LabelTracker.

    token_labels: (B, N, K) source weights of the N patch tokens in row-major order of the patch grid,
    as tl_align.cutmix returns them. After the forward, `.label` is the (B, K) float32 aligned label of
    what the classifier reads: the class token, the mean of the class and distillation tokens for a
    timm distilled DeiT that averages its two heads, the mean patch token for 'avg' pooling.
    The model is untouched: same logits and gradients, nothing kept for the backward (the hooks read
    detached q and k under no_grad). The hooks are removed on exit, also after an exception.
    Raises ValueError for a model or configuration it cannot reproduce exactly (see the module docstring).
    """
    plan = plan_for(model)
    tracker = LabelTracker(token_labels, plan)
    handles = []
    try:
        for layer in plan.layers:
            handles += watch(layer, tracker)
        yield tracker
    finally:
        for handle in handles:
            handle.remove()


def watch(layer: Watch, tracker: LabelTracker) -> list:
    """Forward hooks on one attention layer: its q and k taps keep their (detached) outputs, and the
    layer's own hook, which runs when the layer is done, hands them to the tracker. Returns the handles."""
    seen = {}
    signature = inspect.signature(layer.attn.forward)

    def tap(role, to_heads):
        def hook(module, args, out):
            seen[role] = to_heads(out.detach())
        return hook

    def done(module, args, kwargs, out):
        bound = signature.bind(*args, **kwargs).arguments
        masks = [name for name in MASK_ARGS if bound.get(name) is not None and bound.get(name) is not False]
        if masks:
            raise ValueError(f"track_labels cannot follow attention under {', '.join(masks)}: "
                             f"the label path assumes plain softmax attention over all tokens")
        q, k = seen.pop("q"), seen.pop("k")
        tracker.update(q, k, layer.scale)

    return [layer.q[0].register_forward_hook(tap("q", layer.q[1])),
            layer.k[0].register_forward_hook(tap("k", layer.k[1])),
            layer.attn.register_forward_hook(done, with_kwargs=True)]


def plan_for(model: nn.Module) -> Plan:
    """The Plan of a supported model; ValueError naming what is supported for any other.

    timm, transformers and this repository's vit.py are looked up among the modules the program has
    already imported: a model of one implies its module is loaded, so this file needs none of them and
    can be copied beside tl_align.py alone.
    """
    own_vit = sys.modules.get("vit")
    if own_vit is not None and isinstance(model, getattr(own_vit, "VisionTransformer", ())):
        return vit_plan(model)
    timm_vit = sys.modules.get("timm.models.vision_transformer")
    if timm_vit is not None and isinstance(model, timm_vit.VisionTransformer):
        return timm_plan(model)
    for module_name, (model_cls, attn_cls, prefix) in HF_MODELS.items():
        lib = sys.modules.get(module_name)
        if lib is not None and isinstance(model, getattr(lib, model_cls)):
            return hf_plan(model, getattr(lib, attn_cls), prefix)
    raise ValueError(f"track_labels supports {SUPPORTED}; got {type(model).__module__}.{type(model).__qualname__}"
                     f" (vit.py's Swin carries labels itself: model(x, token_labels))")


def vit_plan(model) -> Plan:
    """vit.py's ViT: q and k are parts of the fused projection attn.qkv."""
    layers = [Watch(b.attn, (b.attn.qkv, partial(qkv_part, b.attn.num_heads, 0)),
                    (b.attn.qkv, partial(qkv_part, b.attn.num_heads, 1)), b.attn.scale) for b in model.blocks]
    return Plan(layers, prefix=1, readout=class_token)


def timm_plan(model) -> Plan:
    """timm's ViT family: q and k are the outputs of attn.q_norm / attn.k_norm, already (B, h, T, d)."""
    from timm.layers import Attention, PatchEmbed  # timm is loaded: the model is one of its classes
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    found = sorted({type(getattr(b, "attn", b)).__name__ for b in model.blocks})
    if attns != [getattr(b, "attn", None) for b in model.blocks] or any(
            type(a).forward is not Attention.forward for a in attns):
        raise ValueError(f"track_labels supports timm ViTs whose every block holds one timm.layers.Attention (not "
                         f"rope, relative-position, differential or parallel attention, nor a subclass); this "
                         f"{type(model).__name__} has {len(attns)} in {len(model.blocks)} blocks: {found}")
    if not isinstance(model.patch_embed, PatchEmbed):
        raise ValueError("track_labels supports timm ViTs with a timm.layers.PatchEmbed stem, whose tokens are "
                         f"patches of the image; got {type(model.patch_embed).__name__}")
    P = model.num_prefix_tokens
    deit = sys.modules.get("timm.models.deit")
    if deit is not None and isinstance(model, deit.VisionTransformerDistilled):
        # the mean of its class and distillation heads, except in distilled training (the class head alone)
        two_heads = not (model.distilled_training and model.training)
        readout = (lambda y: y[:, :2].mean(dim=1)) if two_heads else class_token
    elif model.global_pool == "token":
        readout = class_token
    elif model.global_pool == "avg" and model.attn_pool is None:
        start = 0 if model.pool_include_prefix else P  # the classifier reads the mean of these tokens

        def readout(y):
            return y[:, start:].mean(dim=1)
    else:
        raise ValueError(f"track_labels supports timm global_pool 'token' and 'avg'; got {model.global_pool!r}")
    # SDPA applies its default 1/sqrt(d) (timm passes no scale), the explicit path attn.scale
    layers = [Watch(a, (a.q_norm, same), (a.k_norm, same), a.head_dim ** -0.5 if a.fused_attn else a.scale)
              for a in attns]
    return Plan(layers, prefix=P, readout=readout)


def hf_plan(model, attn_cls, prefix: int) -> Plan:
    """transformers' ViT / DeiT: q and k are the outputs of q_proj / k_proj, (B, T, h*d)."""
    attns = [m for m in model.modules() if isinstance(m, attn_cls)]
    n = model.config.num_hidden_layers
    if len(attns) != n or not all(hasattr(a, "q_proj") and hasattr(a, "k_proj") for a in attns):
        raise ValueError(f"track_labels supports transformers >= 5, whose {attn_cls.__name__} has q_proj and k_proj, "
                         f"one per layer; found {len(attns)} for {n} layers")
    layers = [Watch(a, (a.q_proj, partial(split_heads, a.head_dim)), (a.k_proj, partial(split_heads, a.head_dim)),
                    a.scaling) for a in attns]
    return Plan(layers, prefix=prefix, readout=class_token)


def class_token(y: torch.Tensor) -> torch.Tensor:
    """(B, T, K) -> (B, K): the label of token 0, the class token."""
    return y[:, 0]


def same(out: torch.Tensor) -> torch.Tensor:
    """timm's q_norm / k_norm outputs are q and k as they are multiplied."""
    return out


def qkv_part(num_heads: int, i: int, out: torch.Tensor) -> torch.Tensor:
    """vit.py's projection (B, T, 3*h*d) -> part i (0: q, 1: k) as (B, h, T, d), split as vit.Attention does."""
    return out.unflatten(-1, (3, num_heads, -1))[:, :, i].transpose(1, 2)


def split_heads(head_dim: int, out: torch.Tensor) -> torch.Tensor:
    """transformers' projection (B, T, h*d) -> (B, h, T, d), split as its attention does."""
    return out.unflatten(-1, (-1, head_dim)).transpose(1, 2)
