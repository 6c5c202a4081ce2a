"""STViT-R's dense backbone trains inside torchvision's Mask R-CNN (examples/detection_maskrcnn.py)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "detection_maskrcnn.py")
SMALL = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("detection_maskrcnn", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(example, **kw):
    return example.stvit_r_maskrcnn(
        "stvit_r_det_swin_tiny_patch4_window7", num_classes=3, fpn_channels=64, backbone_kwargs=SMALL,
        min_size=128, max_size=160, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64, **kw)


def test_maskrcnn_training_step_reaches_the_backbone_and_inference_runs(example):
    torch.manual_seed(0)
    model = _model(example)
    images, targets = example.synthetic_batch(n=2, size=(128, 160))
    model.train()
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    body = model.backbone.body.model
    for name in ("patch_embed.proj.0.c.weight",                # stem
                 "layers.2.blocks.1.attn.kv.weight",           # first semantic block
                 "layers.2.blocks.5.attn.q.weight",            # recovery (windowed, dense form)
                 "norm0.weight", "norm3.weight"):              # per-stage output norms
        grad = body.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        assert {"boxes", "labels", "scores", "masks"} <= set(det)
        assert det["masks"].shape[1:] == (1, 128, 160)


def test_fpn_sees_four_stages_at_any_size(example):
    model = _model(example).eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 100, 150))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)]
    assert all(f.shape[1] == 64 for f in feats.values())
