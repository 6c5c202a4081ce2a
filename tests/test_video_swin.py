"""Video Swin (torchvision's, as timm models) and STViT on Video Swin: figures, torchvision weights,
the timm contract, token maps, bad input.

Reduced models (width 16, 8 frames of 64x64, 2x4x4 windows: a 4x4x4 stage-3 map cut into two
windows) except the figures, which count full-size models built on the meta device."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torchvision.models.video import swin3d_s, swin3d_t
from torchvision.models.video.swin_transformer import SwinTransformer3d

import condensevit.models  # noqa: F401  (registers the models)
from condensevit.measure import count_params, gmacs
from condensevit.models import CheckpointError
from condensevit.models.stvit_r import SemanticBlock
from condensevit.models.video_swin import (
    SpaceTimeSemanticTokenBlock, STViTVideoSwin, VideoSwin, space_time_semantic_index, stvit_checkpoint_filter_fn,
)

from contract import (
    check_all_parameters_trained, check_classifier_contract, check_grad_checkpointing, check_optim_helpers,
)

NAMES = {(f, s): f"{f}_{s}_patch2x4x4_window8x7x7" for f in ("video_swin", "stvit_video_swin") for s in ("tiny", "small")}
ARCH = dict(embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 2, 4), window_size=(2, 4, 4))
SMALL = dict(ARCH, num_frames=8, img_size=64, num_classes=10)
CLIP = (3, 32, 224, 224)


def small(family: str, **kw):
    return timm.create_model(NAMES[(family, "tiny")], **{**SMALL, **kw})


def clips(b=2, t=8, s=64):
    return torch.randn(b, 3, t, s, s)


def torchvision_small() -> SwinTransformer3d:
    a = ARCH
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=a["embed_dim"], depths=list(a["depths"]),
                             num_heads=list(a["num_heads"]), window_size=list(a["window_size"]), num_classes=10)


def _meta(name, **kw):
    return timm.create_model(name, device="meta", **kw)


# ------------------------------------------------------------------------------ registration, figures
def test_variants_are_registered_with_video_cfgs():
    assert set(timm.list_models("*video_swin_*_window8x7x7")) == set(NAMES.values())
    assert set(timm.list_models("test_*video_swin")) == {"test_video_swin", "test_stvit_video_swin"}
    for name in NAMES.values():
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.input_size == CLIP and cfg.num_classes == 400 and cfg.url.startswith("https://download.pytorch.org")
        m = _meta(name)
        assert m.input_size == CLIP and m.pretrained_cfg["input_size"] == CLIP


@pytest.mark.parametrize("size, tv, macs, tv_macs, params, ratio", [
    ("tiny", swin3d_t, 65_179_275_264, 87_764_152_320, 28_154_062, 0.743),
    ("small", swin3d_s, 118_179_729_408, 165_682_262_016, 49_694_062, 0.713),
])
def test_gmacs_at_32x224x224_against_torchvisions_video_swin(size, tv, macs, tv_macs, params, ratio):
    with torch.device("meta"):
        reference = tv()
    base, ours = _meta(NAMES[("video_swin", size)]), _meta(NAMES[("stvit_video_swin", size)])
    assert round(gmacs(reference, CLIP) * 1e9) == round(gmacs(base, CLIP) * 1e9) == tv_macs   # it *is* torchvision's
    assert count_params(base) == count_params(reference)
    g = gmacs(ours, CLIP)
    assert round(g * 1e9) == macs and count_params(ours) == params
    assert round(g / gmacs(base, CLIP), 3) == ratio   # the paper: -27 % (T and S together)


def test_the_condensed_stage_is_torchvisions_blocks_then_stvit_rs():
    m = _meta(NAMES[("stvit_video_swin", "small")])
    stage = m.features[4]
    kinds = [type(b).__name__ for b in stage]
    assert kinds == ["SwinTransformerBlock"] * 12 + ["SpaceTimeSemanticTokenBlock"] + ["SemanticBlock"] * 5
    assert isinstance(stage[12], SpaceTimeSemanticTokenBlock) and isinstance(stage[13], SemanticBlock)
    assert stage.size == (16, 14, 14) and stage.window == (8, 7, 7) and stage.grid == (4, 6, 6)
    assert stage.global_centers.shape == (1, 144, 384) and stage.semantic_index.shape == (8, 18 + 800)
    assert type(m.features[6][0]).__module__ == "torchvision.models.swin_transformer"   # stage 4: torchvision's


def test_space_time_keys_are_the_window_own_tokens_then_its_neighbourhood():
    idx = space_time_semantic_index((4, 4, 4), (2, 4, 4), (2, 3, 3), (2, 10, 10))
    assert idx.shape == (2, 18 + 2 * 4 * 4)
    assert idx[1, :18].tolist() == [64 + 18 + i for i in range(18)]     # window 1's pooled tokens
    assert idx[1, 18:].tolist() == list(range(32, 64))                   # its frames, the whole 4x4 plane


# ------------------------------------------------------------------------------ torchvision weights
def test_the_baseline_is_torchvisions_model():
    tv = torchvision_small().eval()
    m = timm.create_model(NAMES[("video_swin", "tiny")], pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict=tv.state_dict()), **SMALL).eval()
    assert isinstance(m, SwinTransformer3d)
    x = clips()
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x))
        x = torch.randn(1, 3, 7, 60, 52)    # other lengths and sizes are padded, as in Video Swin
        torch.testing.assert_close(m(x), tv(x))


def test_torchvision_weights_initialise_the_condensed_model():
    tv = torchvision_small().eval()
    sd = tv.state_dict()
    m = timm.create_model(NAMES[("stvit_video_swin", "tiny")], pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict=sd), **SMALL).eval()
    own = m.state_dict()
    torch.testing.assert_close(own["features.4.3.attn.qkv.weight"], sd["features.4.3.attn.qkv.weight"])
    torch.testing.assert_close(own["features.4.4.attn.q.weight"], sd["features.4.4.attn.qkv.weight"][:64])
    torch.testing.assert_close(own["features.4.5.attn.kv.bias"], sd["features.4.5.attn.qkv.bias"][64:])
    torch.testing.assert_close(own["features.4.5.mlp.fc2.weight"], sd["features.4.5.mlp.3.weight"])
    torch.testing.assert_close(own["features.6.1.attn.relative_position_bias_table"],
                               sd["features.6.1.attn.relative_position_bias_table"])
    torch.testing.assert_close(own["head.weight"], sd["head.weight"])
    assert torch.equal(own["features.4.4.layer_scale_1"], torch.full((64,), 1e-5))
    x = clips(1)
    base = VideoSwin.forward_intermediates   # the first stages are torchvision's, computing the same
    with torch.no_grad():
        ref = [y.permute(0, 4, 1, 2, 3) for y in _torchvision_stages(tv, x)]
        ours = base(m, x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b)


def _torchvision_stages(tv, x):
    x = tv.patch_embed(x)
    out = []
    for i, f in enumerate(tv.features[:3]):
        x = f(x)
        if i % 2 == 0:
            out.append(x)
    return out


def test_a_full_size_torchvision_state_dict_maps_completely_and_another_size_fails_in_one_line():
    sd = swin3d_t().state_dict()   # randomly initialised, torchvision's key layout
    m = _meta(NAMES[("stvit_video_swin", "tiny")])
    out = stvit_checkpoint_filter_fn(sd, m)
    target = m.state_dict()
    assert sorted(out) == sorted(target)
    assert all(tuple(out[k].shape) == tuple(target[k].shape) for k in target)
    with torch.device("meta"):
        other = swin3d_s().state_dict()
    for name in (NAMES[("stvit_video_swin", "tiny")], NAMES[("video_swin", "tiny")]):
        with pytest.raises(CheckpointError) as e:
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=other), device="meta")
        msg = str(e.value)
        assert "\n" not in msg and "Video Swin-S (swin3d_s)" in msg and "Video Swin-T (swin3d_t)" in msg


def test_checkpoints_round_trip_with_the_usual_keywords(tmp_path):
    m = small("stvit_video_swin").eval()
    path = tmp_path / "m.pth"
    torch.save({"model": m.state_dict()}, path)
    again = small("stvit_video_swin", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = clips(1)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), m(x))
    headless = small("stvit_video_swin", num_classes=0, pretrained=True,
                     pretrained_cfg_overlay=dict(state_dict=torchvision_small().state_dict()))
    assert headless(x).shape == (1, 128)


# ------------------------------------------------------------------------------ timm contract
@pytest.mark.parametrize("family", ["video_swin", "stvit_video_swin"])
def test_classifier_contract_channels_last(family):
    """The shared contract on these windows (two stage-3 windows; tests/test_contract.py runs every
    other kind on the test_* variants), and a (B, T', H', W', C) map without pooling."""
    m = small(family).eval()
    x = clips()
    check_classifier_contract(m, x, 10)
    with torch.no_grad():
        assert m.forward_features(x).shape == (2, 4, 2, 2, 128)
    c = copy.deepcopy(m)
    c.reset_classifier(3, "")
    with torch.no_grad():
        assert c(x).shape == (2, 4, 2, 2, 3)
    check_optim_helpers(m)
    assert "features.0.0.attn.relative_position_bias_table" in m.no_weight_decay()


@pytest.mark.parametrize("family", ["video_swin", "stvit_video_swin"])
def test_grad_checkpointing_and_every_parameter_trained(family):
    m = small(family, drop_path_rate=0.0)
    check_grad_checkpointing(m, clips(1))
    check_all_parameters_trained(m, clips(1))


@pytest.mark.parametrize("family", ["video_swin", "stvit_video_swin"])
def test_features_only_and_intermediates(family):
    x = clips(1)
    fm = timm.create_model(NAMES[(family, "tiny")], features_only=True, **SMALL).eval()
    with torch.no_grad():
        feats = fm(x)
    assert [f.shape[1] for f in feats] == fm.feature_info.channels() == [16, 32, 64, 128]
    last = (4, 3, 3) if family == "stvit_video_swin" else (4, 4, 4)
    assert [tuple(f.shape[2:]) for f in feats] == [(4, 16, 16), (4, 8, 8), last, (4, 2, 2)]
    m = small(family).eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, norm=True)
        torch.testing.assert_close(final, m.forward_features(x))
        torch.testing.assert_close(inter[-1].permute(0, 2, 3, 4, 1), final)
        assert m.forward_intermediates(x, indices=[0], output_fmt="NTHWC", intermediates_only=True)[0].shape[-1] == 16
        with pytest.raises(ValueError, match="output_fmt"):
            m.forward_intermediates(x, output_fmt="NLC")


def test_token_maps_are_distributions_over_the_tubelets_entering_the_module():
    m = small("stvit_video_swin", semantic_kernel=(2, 10, 10))   # neighbourhoods: the window's own 2 time steps
    maps = m.token_maps(clips())
    for k in ("semantic", "refine"):
        assert maps[k].shape == (2, 36, 4, 4, 4)
        torch.testing.assert_close(maps[k].sum((2, 3, 4)), torch.ones(2, 36))
    # the first block sees only its own window's frames: tokens of window 0 (time steps 0-1) never look at 2-3
    assert maps["semantic"][:, 0, 2:].abs().max() == 0
    assert maps["owner"].shape == (2, 4, 4, 4)
    from condensevit.viz import token_maps
    tm = token_maps(m, clips(1))
    assert tm.is_video and set(tm.maps) == {"semantic", "refine"}


# ------------------------------------------------------------------------------ bad input
def test_a_clip_too_short_for_the_semantic_tokens_is_named_with_the_fix():
    with pytest.raises(ValueError, match=r"fewer than the 2 semantic tokens asked for there; use at least 4 frames"):
        small("stvit_video_swin", num_frames=2)
    small("stvit_video_swin", num_frames=4)                       # windows shrink to a short map, as in Video Swin
    with pytest.raises(ValueError, match="larger frames"):
        small("stvit_video_swin", img_size=16)


@pytest.mark.parametrize("shape, match", [
    ((2, 3, 64, 64), "batch of images"),
    ((2, 1, 8, 64, 64), "in_chans=1"),
    ((2, 3, 6, 64, 64), r"takes clips of 8 frames of 64x64.*num_frames=6"),
    ((2, 3, 8, 72, 72), r"img_size=\(72, 72\)"),
])
def test_bad_input_is_a_value_error_naming_the_fix(shape, match):
    with pytest.raises(ValueError, match=match):
        small("stvit_video_swin")(torch.randn(*shape))


def test_frame_sizes_the_windows_do_not_tile_are_padded():
    m = small("stvit_video_swin", img_size=88, num_frames=6).eval()   # stage-3 map 3x6x6: windows 2x4x4, padded
    assert m.features[4].grid == (4, 6, 6)
    with torch.no_grad():
        assert m(clips(1, 6, 88)).shape == (1, 10)


@pytest.mark.parametrize("kw, match", [
    (dict(semantic_tokens_per_window=(2, 3)), "3 positive ints"),
    (dict(stgm_stage=5), "stgm_stage"),
    (dict(stgm_start=5), r"use 0\.\.4"),
    (dict(global_pool="max"), "global_pool"),
])
def test_bad_configurations_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        small("stvit_video_swin", **kw)


def test_the_condensed_class_is_the_baselines_subclass():
    assert issubclass(STViTVideoSwin, VideoSwin) and issubclass(VideoSwin, SwinTransformer3d)


@pytest.mark.parametrize("family", ["video_swin", "stvit_video_swin"])
def test_dropout_keywords_mean_what_they_mean_in_timm(family):
    """``drop_rate`` drops before the classifier only (timm's meaning); ``proj_drop_rate`` is
    torchvision's ``dropout`` (embedding, projections, MLPs, which torchvision ties together)."""
    m = small(family, drop_rate=0.5, drop_path_rate=0.0).train()
    x = clips(1)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(x), m.forward_features(x))   # the trunk drops nothing
        feats = m.forward_features(x)
        assert not torch.equal(m.forward_head(feats, pre_logits=True), m.forward_head(feats, pre_logits=True))
    m = small(family, proj_drop_rate=0.2)
    assert m.pos_drop.p == 0.2 and m.features[0][0].attn.dropout == 0.2 and m.head_drop.p == 0.0
