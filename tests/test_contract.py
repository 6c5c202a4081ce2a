"""Every family a full timm citizen (issue 11): each kind of the timm contract checked on every family,
on the small test_* variants (tests/contract.py holds the checks; timm's own generic tests run in
``make compat``)."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import condensevit  # noqa: F401  (registers the models)
from condensevit.models.lookupvit import LOOKUP_ONLY_KEYS

from contract import (
    check_all_parameters_trained, check_classifier_contract, check_factory_device_dtype, check_head_round_trip,
    check_low_precision, check_pretrained_loading, check_prune_intermediate_layers,
    check_reset_classifier_follows_model,
)

FAMILIES = ("stvit", "stvit_r", "stvit_r_det", "stvit_swin", "lookupvit", "vit_video", "stvit_video", "lookupvit_video",
            "video_swin", "stvit_video_swin")
_SWIN_WIDTHS = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))   # the Swin-based test_* variants


def _input(family: str, b: int = 2) -> torch.Tensor:
    size = timm.get_pretrained_cfg(f"test_{family}").input_size
    return torch.randn(b, *size)


def _image_source(family: str) -> dict:
    """The checkpoint each family initialises from, at the test variant's widths: a timm ViT / DeiT
    (class token, 1000 classes), a timm Swin (STViT on Swin), a torchvision Video Swin (400 classes;
    both Video Swin families), or an STViT-R of its own."""
    if family.startswith("stvit_r"):
        return timm.create_model(f"test_{family}", num_classes=1000 if family == "stvit_r" else 0).state_dict()
    if family == "stvit_swin":
        src = timm.create_model("swin_tiny_patch4_window7_224", **_SWIN_WIDTHS)
    elif family.endswith("video_swin"):
        from torchvision.models.video.swin_transformer import SwinTransformer3d
        w = _SWIN_WIDTHS
        src = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=w["embed_dim"], depths=list(w["depths"]),
                                num_heads=list(w["num_heads"]), window_size=[8, 7, 7], num_classes=400)
    else:
        deit = family.startswith("stvit")   # STViT initialises from DeiT, the others from ViT
        img, depth = {"stvit": (96, 6), "lookupvit": (96, 4)}.get(family, (64, 4))
        src = timm.create_model("deit_tiny_patch16_224" if deit else "vit_tiny_patch16_224", img_size=img,
                                embed_dim=64, depth=depth, num_heads=2)
    with torch.no_grad():
        for p in src.parameters():   # norms and biases away from their defaults, as in trained weights
            p.add_(torch.randn_like(p) * 0.01)
    return src.state_dict()


# ---- 1. factory keywords ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_factory_device_and_dtype(family):
    check_factory_device_dtype(f"test_{family}", _input(family, 1))


def test_factory_keywords_on_full_size_variants():
    """The issue's calls, at full size (meta device: no memory)."""
    for name in ("stvit_deit_tiny_patch16_224", "stvit_r_swin_tiny_patch4_window7_224",
                 "stvit_r_det_swin_tiny_patch4_window7", "stvit_swin_tiny_patch4_window7_224",
                 "lookupvit_tiny_patch16_224", "vit_video_tiny_patch2x16_224", "stvit_video_tiny_patch2x16_224",
                 "lookupvit_video_tiny_patch2x16_224", "video_swin_tiny_patch2x4x4_window8x7x7",
                 "stvit_video_swin_tiny_patch2x4x4_window8x7x7"):
        m = timm.create_model(name, device="meta", dtype=torch.bfloat16)
        assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {"meta"}, name
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}, name


# ---- 2. pretrained loading with the usual keywords -------------------------------------------------
_STGM_NEW, _LOOKUP_NEW = ("center_pool.*", "global_centers"), LOOKUP_ONLY_KEYS   # what a ViT cannot have
_SEMANTIC_NEW = ("*.layer_scale_1", "*.layer_scale_2", "*.global_centers")          # what a (Video) Swin cannot have
_LOADING = {
    "stvit": dict(img_size=128, global_pools=("", "avg"), new_keys=_STGM_NEW),
    "stvit_r": dict(global_pools=("", "avg")),           # 224x224 only (a ValueError names the dense form)
    "stvit_r_det": dict(global_pools=("", "avg")),       # any input size: no img_size to ask for
    "stvit_swin": dict(img_size=128, global_pools=("", "avg"), new_keys=_SEMANTIC_NEW),
    "lookupvit": dict(img_size=128, global_pools=("", "avg", "both"), new_keys=_LOOKUP_NEW),
    "vit_video": dict(img_size=96, global_pools=("", "avg")),
    "stvit_video": dict(img_size=96, global_pools=("", "avg"), new_keys=_STGM_NEW),
    "lookupvit_video": dict(img_size=96, global_pools=("", "avg", "both"), new_keys=_LOOKUP_NEW),
    "video_swin": dict(img_size=96, global_pools=("", "avg")),
    "stvit_video_swin": dict(img_size=96, global_pools=("", "avg"), new_keys=_SEMANTIC_NEW),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_loading_with_the_usual_keywords(family):
    first_conv = timm.get_pretrained_cfg(f"test_{family}").first_conv
    check_pretrained_loading(f"test_{family}", _image_source(family), _input(family), first_conv + ".weight",
                             **_LOADING[family])


def test_the_standard_feature_extractor_call_from_deit():
    """The issue's call: a DeiT checkpoint, num_classes=0 (and in_chans=1), at full size."""
    sd = timm.create_model("deit_tiny_patch16_224").state_dict()
    for kw in (dict(), dict(in_chans=1)):
        m = timm.create_model("stvit_deit_tiny_patch16_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(state_dict=sd), **kw)
        assert isinstance(m.head, torch.nn.Identity)
        torch.testing.assert_close(m.blocks[6].attn.qkv.weight, sd["blocks.6.attn.qkv.weight"])


# ---- 3. reset_classifier follows the model --------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_reset_classifier_follows_device_dtype_and_mode(family):
    check_reset_classifier_follows_model(timm.create_model(f"test_{family}"), _input(family, 1))


# ---- 4. every parameter gets a gradient ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_gets_a_gradient(family):
    x = _input(family)
    check_all_parameters_trained(timm.create_model(f"test_{family}", num_classes=5), x)
    if family.startswith("lookupvit"):   # the head reading both streams needs the last lookup update
        m = timm.create_model(f"test_{family}", num_classes=5, pool="both")
        assert m.blocks[-1].lookup_update
        check_all_parameters_trained(m, x)


def test_dense_backbone_norms_exist_only_where_they_reach_the_output():
    """The dense STViT-R: a backbone (num_classes=0, features_only) has the released per-stage norms,
    all used by its feature maps; a dense model with a classifier has only the final one."""
    x = _input("stvit_r_det")
    backbone = timm.create_model("test_stvit_r_det")
    assert backbone.num_classes == 0 and backbone.stage_norms
    backbone.train()
    sum(f.sum() for f in backbone.forward_intermediates(x, intermediates_only=True)).backward()
    assert not [n for n, p in backbone.named_parameters() if p.grad is None]
    classifier = timm.create_model("test_stvit_r_det", num_classes=5)
    assert not classifier.stage_norms and "norm0.weight" not in classifier.state_dict()
    fm = timm.create_model("test_stvit_r_det", num_classes=5, features_only=True)
    assert all(f"norm{i}.weight" in fm.model.state_dict() for i in range(4))
    # a backbone checkpoint loads into both
    loaded = timm.create_model("test_stvit_r_det", num_classes=5, pretrained=True,
                               pretrained_cfg_overlay=dict(state_dict=backbone.state_dict()))
    torch.testing.assert_close(loaded.norm3.weight, backbone.norm3.weight)


def test_lookupvit_checkpoints_move_between_pools():
    """A 'both' checkpoint loads into a 'compressed' model (the unused lookup update is dropped) and
    back (it starts from the init); reset_classifier(n, 'both') builds it on the model's dtype."""
    both = timm.create_model("test_lookupvit", pool="both")
    compressed = timm.create_model("test_lookupvit", pretrained=True,
                                   pretrained_cfg_overlay=dict(state_dict=both.state_dict()))
    assert not compressed.blocks[-1].lookup_update
    torch.testing.assert_close(compressed.blocks[-1].mhbc.q.weight, both.blocks[-1].mhbc.q.weight)
    again = timm.create_model("test_lookupvit", pool="both", pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=compressed.state_dict()))
    assert again.blocks[-1].lookup_update
    m = timm.create_model("test_lookupvit", dtype=torch.float64).eval()
    m.reset_classifier(3, global_pool="both")
    last = m.blocks[-1]
    assert last.lookup_update and last.lookup_mlp.fc1.weight.dtype == torch.float64 and not last.training
    with torch.no_grad():
        assert m(_input("lookupvit", 1).double()).shape == (1, 3)


# ---- 5. prune_intermediate_layers -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_intermediate_layers_to_each_index(family):
    check_prune_intermediate_layers(timm.create_model(f"test_{family}"), _input(family))


def test_dense_backbone_pruned_to_the_first_stage():
    """The issue's call: the features end at stage 0, through its own norm (no final norm of stage 3)."""
    m = timm.create_model("stvit_r_det_swin_tiny_patch4_window7").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tap = m.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        m.prune_intermediate_layers([0], prune_norm=True)
        feats = m.forward_features(x)
    assert feats.shape == (1, 16, 16, 96)
    torch.testing.assert_close(feats.permute(0, 3, 1, 2), tap)


# ---- 6. output layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_contract_and_output_layout(family):
    m = timm.create_model(f"test_{family}", num_classes=5)
    check_classifier_contract(m, _input(family), 5)
    if "swin" in family or family.startswith("stvit_r"):   # Swin-based: channels-last maps, as timm's Swin
        with torch.no_grad():
            feats = m.forward_features(_input(family, 1))
        if "video" in family:   # (B, T', H', W', C): 4 frames of 64x64 end as a 2x2x2 map
            assert m.output_fmt == "NTHWC" and m.feature_dim == -1 and feats.shape == (1, 2, 2, 2, m.num_features)
        else:                   # (B, H', W', C), the cfg's pool size
            assert m.output_fmt == "NHWC" and feats.shape == (1, *m.pretrained_cfg["pool_size"], m.num_features)


def test_stvit_r_forward_features_matches_swin_layout():
    ours = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", device="meta")
    swin = timm.create_model("swin_tiny_patch4_window7_224", device="meta")
    x = torch.randn(2, 3, 224, 224, device="meta")
    assert ours.forward_features(x).shape == swin.forward_features(x).shape == (2, 7, 7, 768)
    ours.reset_classifier(0, "")
    swin.reset_classifier(0, "")
    assert ours(x).shape == swin(x).shape


# ---- 9. no silent head loss -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_a_fitting_classifier_survives_every_loading_path(family, tmp_path):
    check_head_round_trip(f"test_{family}", _input(family), tmp_path)


def test_a_classifier_of_another_size_is_still_replaced():
    src = timm.create_model("test_stvit", num_classes=7).state_dict()
    m = timm.create_model("test_stvit", num_classes=4, pretrained=True, pretrained_cfg_overlay=dict(state_dict=src))
    assert m.head.weight.shape == (4, 64)
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight, src["blocks.0.attn.qkv.weight"])


# ---- 10. low precision -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_and_float16_on_cpu(family):
    check_low_precision(timm.create_model(f"test_{family}"), _input(family))


@pytest.mark.parametrize("name, kwargs, fwd", [
    ("test_lookupvit", dict(dynamic_img_size=True), dict(compressed_grid=(2, 3))),
    ("test_lookupvit", dict(resize_antialias=False, pool="both"), {}),
    ("test_lookupvit_video", dict(resize_antialias=False), dict(compressed_grid=(2, 3, 3))),
    ("test_stvit", dict(center_pool="max"), {}),
    ("test_stvit_video", dict(center_pool="avg"), {}),
])
def test_low_precision_options(name, kwargs, fwd):
    check_low_precision(timm.create_model(name, **kwargs), torch.randn(2, *timm.get_pretrained_cfg(name).input_size),
                        **fwd)


def test_lookupvit_cast_to_bfloat16_at_full_size_runs():
    """The issue's report: LookupViT cast with .to(bfloat16) failed inside the antialiased resize."""
    m = timm.create_model("lookupvit_tiny_patch16_224", depth=1).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- 11. video input config ------------------------------------------------------------------------
_JOINT = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)
VIDEO = {   # a tiny variant of each video family, small but with its full-size clip length (16 or 32 frames)
    "vit_video": ("vit_video_tiny_patch2x16_224", _JOINT),
    "stvit_video": ("stvit_video_tiny_patch2x16_224", dict(_JOINT, semantic_grid=(2, 1, 1), stgm_start=0)),
    "lookupvit_video": ("lookupvit_video_tiny_patch2x16_224", dict(_JOINT, compressed_grid=(2, 1, 1))),
    "video_swin": ("video_swin_tiny_patch2x4x4_window8x7x7", dict(_SWIN_WIDTHS, img_size=32)),
    "stvit_video_swin": ("stvit_video_swin_tiny_patch2x4x4_window8x7x7", dict(_SWIN_WIDTHS, img_size=64)),
}


@pytest.mark.parametrize("family", VIDEO)
def test_video_frame_count_survives_timm_config_round_trips(family, tmp_path):
    from timm.data import resolve_data_config, resolve_input_data_config
    from timm.models import save_for_hf

    name, kw = VIDEO[family]
    T = timm.get_pretrained_cfg(name).input_size[1]
    S = kw["img_size"]
    m = timm.create_model(name, num_classes=5, **kw).eval()
    assert T in (16, 32) and m.num_frames == T and m.input_size == (3, T, S, S)
    # timm's legacy resolver reads the (source) pretrained cfg: clips of T frames; the current one
    # gives the per-frame (C, H, W) transform of this model (timm's data configs are images)
    assert resolve_data_config(model=m)["input_size"] == (3, T, 224, 224)
    assert resolve_input_data_config(m)["input_size"] == (3, S, S)
    # timm's export writes (C, H, W) sizes; the frame count travels as a model argument
    save_for_hf(m, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_args"]["num_frames"] == T
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert reloaded.num_frames == T and reloaded.pretrained_cfg["input_size"] == (3, T, S, S)
    x = torch.randn(1, 3, T, S, S)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), m(x))


def test_video_cfg_frame_count_builds_the_model():
    """As a fixed-size image model takes its (H, W) from the cfg, a video model takes T from it."""
    kw = dict(embed_dim=32, depth=1, num_heads=2)
    m = timm.create_model("vit_video_tiny_patch2x16_224", pretrained_cfg_overlay=dict(input_size=(3, 8, 32, 32)), **kw)
    assert m.num_frames == 8 and m.img_size == (32, 32) and m.pretrained_cfg["input_size"] == (3, 8, 32, 32)
    m = timm.create_model("vit_video_tiny_patch2x16_224", num_frames=4, img_size=32, **kw)   # a keyword wins
    assert m.input_size == (3, 4, 32, 32) and m.pretrained_cfg["input_size"] == (3, 16, 224, 224)
    m = timm.create_model("stvit_video_swin_tiny_patch2x4x4_window8x7x7", device="meta",
                          pretrained_cfg_overlay=dict(input_size=(3, 8, 64, 64)))
    assert m.num_frames == 8 and m.img_size == (64, 64) and m.features[4].size == (4, 4, 4)
