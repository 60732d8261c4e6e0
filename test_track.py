"""Tests of track.py on real timm and transformers models built from local configs (nothing is downloaded).

Every label is checked against an independent formulation: vit.py's in-model label path on the same
weights, or the plain loop Y <- (Y + mean_h(A) Y) / 2 run in float64 on the attention maps that the
library itself returns (transformers' output_attentions, timm's softmax weights as its explicit path
hands them to attention dropout). Weights are perturbed so that attention is far from uniform.
"""
import re
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import Attention, HybridEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

import tl_align as tl
import vit
from test_alignment import random_token_labels
from track import track_labels


def perturb(model, seed: int = 0, qk: float = 4.0):
    """Noise on every parameter and larger query/key projections: peaked attention, different per head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            if name.endswith("qkv.weight"):
                p[: 2 * p.shape[1]].mul_(qk)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk)
    return model


def timm_vit(cls=VisionTransformer, **kw):
    """A small timm ViT: 32 px, patch 8 (16 patches), 3 blocks of 4 heads."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    return perturb(cls(**{**cfg, **kw})).eval()


def hf_model(family: str, attn_implementation: str = "sdpa", **kw):
    """A small Hugging Face ViT or DeiT (class + distillation token): 32 px, patch 8, 3 layers of 4 heads."""
    Config, Model = {"vit": (ViTConfig, ViTForImageClassification),
                     "deit": (DeiTConfig, DeiTForImageClassification)}[family]
    cfg = Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=64, num_labels=5, attn_implementation=attn_implementation, **kw)
    return perturb(Model(cfg)).eval()


def set_fused(model, fused: bool):
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused


def reference(maps, w, prefix: int) -> torch.Tensor:
    """The loop of paper Sec. 3 in float64 on given maps (B, h, T, T): each prefix token starts at the mean
    patch label, then Y <- (Y + mean_h(A) Y) / 2 per block. Returns the final labels (B, T, K)."""
    y = w.double()
    Y = torch.cat([y.mean(1, keepdim=True).expand(-1, prefix, -1), y], 1)
    for A in maps:
        Y = (Y + A.double().mean(1) @ Y) / 2
    return Y


def timm_attention_maps(model, x):
    """timm's own softmax weights per block, read where its explicit path hands them to attention dropout."""
    maps = []
    handles = [b.attn.attn_drop.register_forward_hook(lambda m, inp, out: maps.append(inp[0].detach()))
               for b in model.blocks]
    set_fused(model, False)
    with torch.no_grad():
        model(x)
    set_fused(model, True)
    for h in handles:
        h.remove()
    assert len(maps) == len(model.blocks)
    return maps


def tracked(model, x, w, **kw):
    """Logits and the tracked label of one no-grad forward."""
    with torch.no_grad(), track_labels(model, w) as t:
        out = model(x, **kw)
    return getattr(out, "logits", out), t.label


def forward_hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# 1. Exact: the same labels as independent formulations ---------------------------------------------

@pytest.fixture(scope="module")
def deit_pair():
    """timm's deit_tiny_patch16_224 at 64 px, perturbed, and vit.py's deit_t loaded with its weights."""
    model = perturb(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64)).eval()
    ours = vit.create_model("deit_t", img_size=64).eval()
    ours.load_state_dict(model.state_dict(), strict=True)
    return model, ours


@pytest.mark.parametrize("fused", [True, False])
def test_timm_deit_equals_vit_py_labels_on_the_same_weights(deit_pair, fused):
    model, ours = deit_pair
    set_fused(model, fused)
    torch.manual_seed(0)
    xm, w, lam = tl.cutmix(torch.randn(4, 3, 64, 64), 16, lam=0.6)
    with torch.no_grad():
        logits_ref, label_ref, _ = ours(xm, w)
    logits, label = tracked(model, xm, w)
    assert (logits - logits_ref).abs().max() <= 1e-3 * logits_ref.abs().max()  # SDPA or not: float32 rounding
    assert (label - label_ref).abs().max() < 1e-5 and label.dtype == torch.float32
    assert (label[:, 0] - lam).abs().max() > 1e-3  # attention moved the label off the area share: 100x the tolerance


@pytest.mark.parametrize("fused", [False, True])
def test_vit_py_tracked_equals_its_own_label_path(fused):
    model = perturb(vit.create_model("vit_mini", num_classes=5, depth=3, fused_attn=fused)).eval()
    x, w = torch.randn(3, 3, 32, 32), random_token_labels(3, model.num_patches, 3)
    with torch.no_grad():
        _, label_ref, _ = model(x, w)
    _, label = tracked(model, x, w)
    if fused:  # the model gets its labels from the SDPA kernel, the tracker from an explicit softmax
        assert (label - label_ref).abs().max() < 1e-6
    else:  # the same operations in the same order
        assert torch.equal(label, label_ref)


def distilled_training():
    """timm's distilled DeiT training with a teacher: the class head and the distillation head apart."""
    model = timm_vit(VisionTransformerDistilled).train()
    model.set_distilled_training(True)
    return model


# name: (timm model, readout of the final labels (B, T, K) written out here, prefix tokens)
TIMM_CASES = {
    "class_token": (lambda: timm_vit(), lambda Y: Y[:, 0], 1),
    "registers": (lambda: timm_vit(reg_tokens=3), lambda Y: Y[:, 0], 4),
    "qk_layernorm": (lambda: timm_vit(qk_norm=True), lambda Y: Y[:, 0], 1),
    "avg_pool": (lambda: timm_vit(class_token=False, global_pool="avg"), lambda Y: Y.mean(1), 0),
    "avg_pool_registers": (lambda: timm_vit(class_token=False, reg_tokens=2, global_pool="avg"),
                           lambda Y: Y[:, 2:].mean(1), 2),
    "avg_pool_with_class_token": (lambda: timm_vit(global_pool="avg"), lambda Y: Y[:, 1:].mean(1), 1),
    "distilled": (lambda: timm_vit(VisionTransformerDistilled), lambda Y: Y[:, :2].mean(1), 2),
    "distilled_training": (distilled_training, lambda Y: Y[:, 0], 2),  # its class head alone
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_prefix_tokens_and_pooling_equal_the_loop_on_timms_own_maps(case):
    build, readout, prefix = TIMM_CASES[case]
    model = build()
    assert model.num_prefix_tokens == prefix
    x, w = torch.randn(3, 3, 32, 32), random_token_labels(3, 16, 3)
    expected = readout(reference(timm_attention_maps(model, x), w, prefix))
    _, label = tracked(model, x, w)  # fused attention
    assert (label.double() - expected).abs().max() < 1e-5
    assert (expected - w.double().mean(1)).abs().max() > 1e-3  # not the trivial label: 100x the tolerance


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family, prefix", [("vit", 1), ("deit", 2)])
def test_hf_equals_the_loop_on_its_own_output_attentions(family, prefix, implementation):
    model = hf_model(family, "eager")
    x, w = torch.randn(3, 3, 32, 32), random_token_labels(3, 16, 3)
    with torch.no_grad():
        out = model(x, output_attentions=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (3, 4, 16 + prefix, 16 + prefix)
    expected = reference(out.attentions, w, prefix)[:, 0]  # both classifiers read the class token
    model.set_attn_implementation(implementation)
    logits, label = tracked(model, x, w)
    assert torch.allclose(logits, out.logits, atol=1e-5)
    assert (label.double() - expected).abs().max() < 1e-5
    assert (expected - w.double().mean(1)).abs().max() > 1e-2


# 2. The model is untouched -------------------------------------------------------------------------

def run_step(model, x, w, track: bool):
    """One training forward + backward under a fixed seed; returns logits, gradients, what autograd
    saved for the backward (shapes and dtypes in order), and the tracker."""
    model.zero_grad()
    saved = []
    torch.manual_seed(0)  # the same dropout / drop-path draws
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.shape, t.dtype)) or t, lambda t: t):
        with track_labels(model, w) if track else nullcontext() as t:
            out = model(x)
    logits = getattr(out, "logits", out)
    logits.square().sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()], saved, t


@pytest.mark.parametrize("build", [
    lambda: timm_vit(drop_path_rate=0.2, proj_drop_rate=0.1).train(),  # fused attention
    lambda: hf_model("deit", "sdpa", hidden_dropout_prob=0.1).train(),
], ids=["timm", "hf"])
def test_tracking_changes_no_logit_no_gradient_and_saves_nothing_for_backward(build):
    model = build()
    x, w = torch.randn(4, 3, 32, 32), random_token_labels(4, 16, 3)
    logits_a, grads_a, saved_a, _ = run_step(model, x, w, track=False)
    logits_b, grads_b, saved_b, t = run_step(model, x, w, track=True)
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert saved_a == saved_b
    assert not t.label.requires_grad and (t.label.sum(-1) - 1).abs().max() < 1e-6


def test_hooks_are_removed_on_exit_and_after_an_error():
    model = timm_vit()
    before = forward_hook_count(model)
    x, w = torch.randn(2, 3, 32, 32), random_token_labels(2, 16, 3)
    with pytest.raises(ValueError, match="15 patches"):  # raised inside a hook, mid-forward
        with track_labels(model, random_token_labels(2, 15, 3)):
            assert forward_hook_count(model) == before + 3 * len(model.blocks)
            model(x)
    assert forward_hook_count(model) == before
    with pytest.raises(KeyError):  # the caller's own error inside the block
        with track_labels(model, w):
            raise KeyError("user")
    assert forward_hook_count(model) == before
    with track_labels(model, w) as t:
        model(x)
    label = t.label.clone()
    model(torch.randn(2, 3, 32, 32))  # outside the block: not watched
    assert torch.equal(t.label, label) and forward_hook_count(model) == before


def test_label_is_float32_under_bf16_autocast():
    model = timm_vit()
    x, w = torch.randn(3, 3, 32, 32), random_token_labels(3, 16, 3)
    _, label32 = tracked(model, x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, label = tracked(model, x, w)
    assert logits.dtype == torch.bfloat16 and label.dtype == torch.float32
    assert (label.sum(-1) - 1).abs().max() < 1e-5
    assert (label - label32).abs().max() < 2e-2  # bf16 q and k, same labels to their precision


def test_gradient_checkpointing_backward_after_the_block():
    """Checkpointing re-runs each block's forward during backward: outside the block nobody watches."""
    model = timm_vit().train()
    x, w = torch.randn(2, 3, 32, 32), random_token_labels(2, 16, 3)
    with track_labels(model, w) as plain:
        model(x)
    model.set_grad_checkpointing(True)
    with track_labels(model, w) as t:
        logits = model(x)
    logits.sum().backward()
    assert torch.equal(t.label, plain.label)
    with pytest.raises(RuntimeError, match="call backward after the block"):
        with track_labels(model, w):
            model(x).sum().backward()


# 3. Everything else is refused, with a reason ----------------------------------------------------------

class ScaledAttention(Attention):
    """A user's timm Attention subclass whose forward the tracker cannot see into."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return 2 * super().forward(x, attn_mask, is_causal)


def without_q_proj(model):
    """transformers 4.x's attention has no q_proj (its projections are query / key, one level down)."""
    for layer in model.vit.layers:
        del layer.attention.q_proj
    return model


@pytest.mark.parametrize("build, message", [
    (lambda: timm.models.swin_transformer.SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16,
                                                          depths=(1, 1), num_heads=(1, 2)), "supports timm"),
    (lambda: vit.create_model("swin_mini"), "Swin carries labels itself"),
    (lambda: timm_vit(attn_layer="diff"), r"0 in 3 blocks: \['DiffAttention'\]"),
    (lambda: timm_vit(attn_layer=ScaledAttention), "ScaledAttention"),
    (lambda: timm.create_model("vit_small_patch16_18x2_224", img_size=32, depth=2, embed_dim=32, num_heads=2),
     "4 in 2 blocks"),  # parallel attention: two per block
    # a CNN backbone's feature map as tokens (one strided conv here, to stay small)
    (lambda: timm_vit(patch_size=1, embed_layer=partial(HybridEmbed, backbone=torch.nn.Conv2d(3, 16, 8, 8))),
     "PatchEmbed"),
    (lambda: timm_vit(class_token=False, global_pool="max"), "global_pool"),
    (lambda: timm_vit(global_pool="map"), "global_pool"),
    (lambda: without_q_proj(hf_model("vit")), "transformers >= 5"),
], ids=["timm_swin", "vit_py_swin", "diff_attention", "attention_subclass", "parallel_blocks", "hybrid_stem",
        "max_pool", "attention_pool", "transformers_4"])
def test_unsupported_models_are_refused_on_entry(build, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        with track_labels(model, random_token_labels(1, 16, 3)):
            pass
    assert forward_hook_count(model) == 0


def test_what_the_hooks_cannot_reproduce_is_refused_during_the_forward():
    x, w = torch.randn(2, 3, 32, 32), random_token_labels(2, 16, 3)
    model = timm_vit()
    with pytest.raises(ValueError, match="attn_mask"):
        with track_labels(model, w):
            model(x, attn_mask=torch.zeros(17, 17))
    hf = hf_model("vit")
    padding = torch.ones(2, 17, dtype=torch.long)
    padding[0, 9:] = 0  # image 0 hides its last tokens (an all-ones mask is no mask: it passes)
    with pytest.raises(ValueError, match="attention_mask"):
        with track_labels(hf, w):
            hf(x, attention_mask=padding)
    dropping = timm_vit(patch_drop_rate=0.5).train()  # keeps a random half of the patches
    with pytest.raises(ValueError, match="patch dropout"):
        with track_labels(dropping, w):
            dropping(x)
    with pytest.raises(RuntimeError, match="one forward pass"):
        with track_labels(model, w):
            model(x)
            model(x)
    with pytest.raises(RuntimeError, match="0 of the model's 3"):
        with track_labels(model, w) as t:
            pass
        t.label
    with pytest.raises(ValueError, match="batch, patches, K"):
        with track_labels(model, w[0]):
            pass


# 4. The README's examples run exactly as printed --------------------------------------------------------

def readme_examples() -> list[str]:
    text = (Path(__file__).parent / "README.md").read_text()
    section = text.split("## TL-Align in your own training loop")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index", [0, 1], ids=["timm", "hugging_face"])
def test_readme_example_runs_as_printed(index):
    examples = readme_examples()
    assert len(examples) == 2
    ns = {}
    exec(compile(examples[index], f"README.md example {index}", "exec"), ns)
    label, model = ns["t"].label, ns["model"]
    assert label.shape == (8, 2) and (label.sum(-1) - 1).abs().max() < 1e-6
    assert torch.isfinite(ns["loss"]) and all(p.grad is not None for p in model.parameters())
