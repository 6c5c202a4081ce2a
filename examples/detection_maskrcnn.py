"""STViT-R's dense backbone in torchvision's Mask R-CNN.

The backbone (``stvit_r_det_swin_*``, any input size) gives four NCHW maps at strides 4-32; a
torchvision FeaturePyramidNetwork turns them into the five 256-channel maps Mask R-CNN expects.

    python examples/detection_maskrcnn.py                      # one training step + inference, synthetic data
    python examples/detection_maskrcnn.py --weights coco.pth   # start from the authors' COCO detector's backbone

``--weights`` takes the authors' COCO file (cascade_mask_rcnn_swin_*.pth, whose ``backbone.*`` keys are
used), their ImageNet classifier (STViT-R-Swin-*.pth) or a bare backbone state dict.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import condensevit  # noqa: F401  (registers the STViT-R models with timm)


class TimmBackboneWithFPN(nn.Module):
    """A timm ``features_only`` model followed by an FPN; ``out_channels`` as torchvision's detectors need."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def stvit_r_maskrcnn(
        backbone: str = "stvit_r_det_swin_small_patch4_window7",
        num_classes: int = 91,
        weights: str | None = None,
        fpn_channels: int = 256,
        backbone_kwargs: dict | None = None,
        **maskrcnn_kwargs,
) -> MaskRCNN:
    """Mask R-CNN with an STViT-R dense backbone. ``weights``: a checkpoint file for the backbone."""
    overlay = dict(file=weights) if weights else None
    body = timm.create_model(backbone, pretrained=bool(weights), pretrained_cfg_overlay=overlay,
                             features_only=True, **(backbone_kwargs or {}))
    cfg = body.pretrained_cfg
    return MaskRCNN(TimmBackboneWithFPN(body, fpn_channels), num_classes=num_classes,
                    image_mean=list(cfg["mean"]), image_std=list(cfg["std"]), **maskrcnn_kwargs)


def synthetic_batch(n: int = 2, size=(128, 160), num_classes: int = 3, seed: int = 0):
    """Images in [0, 1] with one or two boxes each and their rectangular masks."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, H, W, generator=g))
        k = int(torch.randint(1, 3, (), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([W * 0.5, H * 0.5])
        wh = 16 + torch.rand(k, 2, generator=g) * torch.tensor([W * 0.4, H * 0.4])
        boxes = torch.cat([xy, xy + wh], dim=1).round()
        masks = torch.zeros(k, H, W, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        labels = torch.randint(1, num_classes, (k,), generator=g)
        targets.append(dict(boxes=boxes, labels=labels, masks=masks))
    return images, targets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="stvit_r_det_swin_tiny_patch4_window7")
    p.add_argument("--weights", default=None, help="backbone checkpoint (.pth / .safetensors)")
    p.add_argument("--small", action="store_true", help="a narrow backbone (embed_dim 32) for a quick CPU run")
    args = p.parse_args(argv)
    kw = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8)) if args.small else {}
    model = stvit_r_maskrcnn(args.backbone, num_classes=3, weights=args.weights, backbone_kwargs=kw,
                             min_size=128, max_size=160)
    images, targets = synthetic_batch()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.05)
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    print("losses:", {k: round(v.item(), 4) for k, v in losses.items()})
    model.eval()
    with torch.no_grad():
        det = model(images)
    print("detections per image:", [len(d["boxes"]) for d in det], "mask shape:", tuple(det[0]["masks"].shape))


if __name__ == "__main__":
    main()
