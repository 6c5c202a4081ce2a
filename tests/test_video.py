"""Video forms (issue 8): the joint space-time ViT, STViT and LookupViT on tubelets, the space-time
primitives, the inflation of image checkpoints, cost and token maps.

Reduced models everywhere (width 64, 4 layers, 8 frames of 48x48: a (4, 3, 3) tubelet grid of 36
tokens) except the GMACs figures, which build the full-size models on the meta device (no memory,
no compute: FlopCounterMode counts shapes)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc

import condensevit.models  # noqa: F401  (registers the models)
from condensevit.layers.pooling import WindowPool, window_grid, window_index
from condensevit.layers.spacetime import (
    TubeletEmbed, inflate_patch_embed, resample_pos_embed_3d, resize_volume, tile_pos_embed,
)
from condensevit.measure import count_params, gmacs
from condensevit.models import CheckpointError
from condensevit.models.lookupvit import LookupViTBlock
from condensevit.models.stvit import SemanticTokenBlock
from condensevit.models.video import LookupViTVideo, STViTVideo, VideoViT

from contract import check_all_parameters_trained, check_classifier_contract, check_grad_checkpointing, \
    check_optim_helpers

BASE = {f: f"{f}_base_patch2x16_224" for f in ("vit_video", "stvit_video", "lookupvit_video")}
TINY = {f: f"{f}_tiny_patch2x16_224" for f in ("vit_video", "stvit_video", "lookupvit_video")}
SMALL = dict(embed_dim=64, depth=4, num_heads=2, num_frames=8, img_size=48, num_classes=10)
GRID = (4, 3, 3)                                       # (T', H', W') of SMALL
EXTRA = {"vit_video": {}, "stvit_video": dict(semantic_grid=(2, 2, 2), stgm_start=1),
         "lookupvit_video": dict(compressed_grid=(2, 2, 2))}
FAMILIES = list(EXTRA)


def small(family: str, **kw):
    return timm.create_model(TINY[family], **{**SMALL, **EXTRA[family], **kw})


def clips(b=2, t=8, s=48, c=3):
    return torch.randn(b, c, t, s, s)


def randomise_scorer(model):
    """The scorer starts at zero (= average pooling); give it weights so 'weighted' is really weighted."""
    with torch.no_grad():
        model.center_pool.score.proj.weight.normal_(0, 1.0)
    return model


# ------------------------------------------------------------------------------ registration
def test_variants_are_registered_with_video_cfgs():
    names = set(timm.list_models("*video*_patch2x16_224"))   # (Video Swin: tests/test_video_swin.py)
    assert names == {f"{f}_{s}_patch2x16_224" for f in FAMILIES for s in ("tiny", "small", "base")}
    # the small untrained test_* variants (fast generic tests) say their clip size too
    assert set(timm.list_models("test_*video")) == {f"test_{f}" for f in FAMILIES}
    assert timm.get_pretrained_cfg("test_stvit_video").input_size == (3, 4, 64, 64)
    for name in names:
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 16, 224, 224) and cfg.num_classes == 400
        assert cfg.first_conv == "patch_embed.proj" and cfg.classifier == "head"
    assert timm.get_pretrained_cfg(BASE["stvit_video"]).hf_hub_id == "timm/deit_base_patch16_224.fb_in1k"
    assert timm.get_pretrained_cfg(BASE["vit_video"]).hf_hub_id == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"


def test_full_size_defaults_are_the_documented_geometry():
    with torch.device("meta"):
        vit, st, lk = (timm.create_model(BASE[f]) for f in FAMILIES)
    for m in (vit, st, lk):
        assert m.grid_size == (8, 14, 14) and m.pos_embed.shape == (1, 8, 14, 14, 768)
        assert m.patch_embed.proj.weight.shape == (768, 3, 2, 16, 16)
        assert m.input_size == (3, 16, 224, 224) and m.pretrained_cfg["input_size"] == (3, 16, 224, 224)
        assert m.num_classes == 400 and m.patch_inflation == "central"
        assert not any(k.startswith("cls_token") for k, _ in m.named_parameters())
    assert (type(vit), type(st), type(lk)) == (VideoViT, STViTVideo, LookupViTVideo)
    assert [type(b).__name__ for b in vit.blocks] == ["Block"] * 12
    assert (st.semantic_grid, st.num_semantic_tokens, st.stgm_start, st.stgm_depth) == ((2, 4, 4), 32, 4, 2)
    assert st.center_pool.geometry.padded_size == (8, 16, 16) and st.center_pool.window_size == (4, 4, 4)
    assert st.center_pool.score.conv.weight.shape == (768, 1, 3, 3, 3)
    assert [type(b).__name__ for b in st.blocks] == ["Block"] * 4 + ["SemanticTokenBlock"] * 2 + ["Block"] * 6
    assert st.global_centers.shape == (1, 32, 768)
    assert lk.compressed_grid == (4, 5, 5) and all(isinstance(b, LookupViTBlock) for b in lk.blocks)
    # parameters: the stem replaces ViT-B's 2-D patch kernel and 197-entry pos_embed
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", num_classes=400)
    stem_diff = 768 * 3 * 16 * 16 + 1568 * 768 - 197 * 768 - 768   # second kernel frame, longer pos, no cls
    assert count_params(vit) == count_params(vit_b) + stem_diff


# ----------------------------------------------------------------------------------- figures
def _vit_video_macs(N=1568, D=768, depth=12, tubelet=2 * 16 * 16 * 3, classes=400):
    return (depth * (12 * N * D * D + 2 * N * N * D) + N * D * tubelet + D * classes) / 1e9


def test_gmacs_condensed_forms_are_at_most_040_of_the_baseline():
    with torch.device("meta"):
        g = {f: gmacs(timm.create_model(BASE[f]), (3, 16, 224, 224)) for f in FAMILIES}
    assert g["vit_video"] == pytest.approx(_vit_video_macs(), rel=1e-9)     # 180.34: the analytic count
    assert g["stvit_video"] / g["vit_video"] <= 0.40
    assert g["lookupvit_video"] / g["vit_video"] <= 0.40
    assert g["stvit_video"] == pytest.approx(67.059266, abs=1e-5)            # pinned: 0.372x
    assert g["lookupvit_video"] == pytest.approx(59.349774, abs=1e-5)        # pinned: 0.329x


def test_lookupvit_grid_changes_gmacs_not_parameters():
    m = small("lookupvit_video")
    n = count_params(m)
    macs = [gmacs(m, (3, 8, 48, 48), compressed_grid=g) for g in ((1, 1, 1), (2, 2, 2), (4, 3, 3))]
    assert macs[0] < macs[1] < macs[2] and count_params(m) == n


# ------------------------------------------------------------------------------ timm contract
@pytest.mark.parametrize("family", FAMILIES)
def test_timm_classifier_contract(family):
    m = small(family).eval()
    if family == "stvit_video":
        randomise_scorer(m)
    x = clips()
    check_classifier_contract(m, x, num_classes=10)
    tokens = {"vit_video": 36, "stvit_video": 8, "lookupvit_video": 8}[family]
    assert m.forward_features(x).shape == (2, tokens, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(family, monkeypatch):
    m = small(family)
    check_grad_checkpointing(m, clips())
    import condensevit.models.stvit as stvit
    import condensevit.models.video as video
    calls = []
    for module in (video, stvit):   # STViT's layer schedule (shared with the image form) lives in stvit
        monkeypatch.setattr(module, "checkpoint", lambda fn, *a: calls.append(type(fn).__name__) or fn(*a))
    m.set_grad_checkpointing(True)
    m.train()(clips())
    assert len(calls) == 4, "every layer is checkpointed"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_is_trained_and_optimiser_helpers_hold(family):
    m = small(family)
    if family == "stvit_video":
        randomise_scorer(m)
    # the last LookupViT block's scatter and lookup MLP cannot reach a head on the compressed tokens
    # LookupViT: the last block's lookup update, which a 'compressed' head cannot read, is not built
    check_all_parameters_trained(m, clips())
    check_optim_helpers(m)
    expect = {"pos_embed", "global_centers"} if family == "stvit_video" else {"pos_embed"}
    assert m.no_weight_decay() == expect


def check_video_features_only(name: str, x: torch.Tensor, **kwargs):
    """The video form of contract.check_features_only: channels-first 5-D maps that agree with feature_info."""
    fm = timm.create_model(name, features_only=True, **kwargs).eval()
    with torch.no_grad():
        feats = fm(x)
    assert isinstance(feats, list) and len(feats) == len(fm.feature_info.channels())
    for f, c in zip(feats, fm.feature_info.channels()):
        assert f.dim() == 5 and f.shape[:2] == (x.shape[0], c), f.shape
    return fm, feats


def test_features_only_gives_5d_maps():
    x = clips()
    fm, feats = check_video_features_only(TINY["vit_video"], x, **SMALL)
    assert [tuple(f.shape) for f in feats] == [(2, 64, *GRID)] * 3
    assert fm.feature_info.reduction() == [16] * 3
    fm, feats = check_video_features_only(TINY["stvit_video"], x, **SMALL, **EXTRA["stvit_video"])
    assert [tuple(f.shape) for f in feats] == [(2, 64, *GRID), (2, 64, 2, 2, 2), (2, 64, 2, 2, 2)]
    assert fm.feature_info.get("tokens") == ["image", "semantic", "semantic"]
    assert fm.feature_info.get("temporal_reduction") == [2, 4, 4]
    fm, feats = check_video_features_only(TINY["lookupvit_video"], x, **SMALL, **EXTRA["lookupvit_video"])
    assert [tuple(f.shape) for f in feats] == [(2, 64, *GRID)] * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_intermediates_agree_with_forward(family):
    m = small(family).eval()
    x = clips()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(final, m.forward_features(x))
        maps = m.forward_intermediates(x, indices=[0, 3], intermediates_only=True)
        torch.testing.assert_close(maps[0], inter[0].transpose(1, 2).reshape(2, 64, *GRID))
        assert maps[1].dim() == 5
        early = m.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True, norm=True)
        torch.testing.assert_close(early[0], m.norm(inter[0]).transpose(1, 2).reshape(2, 64, *GRID))
        with pytest.raises(ValueError, match="output_fmt"):
            m.forward_intermediates(x, output_fmt="NHWC")


def test_a_meta_built_stvit_video_recovers_its_3d_window_buffers():
    from timm.models._manipulate import reinit_non_persistent_buffers
    ref = randomise_scorer(small("stvit_video")).eval()
    with torch.device("meta"):
        m = small("stvit_video")
    m = m.to_empty(device="cpu")
    reinit_non_persistent_buffers(m)
    m.load_state_dict(ref.state_dict())
    x = clips()
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref(x))


# ------------------------------------------------------------------------------------- input
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape, match", [
    ((2, 3, 48, 48), "batch of images"),
    ((2, 1, 8, 48, 48), "1 channels but the model takes 3"),
    ((2, 3, 6, 48, 48), "6 frames, fewer than the 8 frames"),
    ((2, 3, 9, 48, 48), "9 frames, not a multiple of the tubelet's 2 frames"),
    ((2, 3, 10, 48, 48), "10 frames, more than the 8"),
    ((2, 3, 8, 64, 64), "frames are 64x64 but the model was built for 48x48"),
    ((3, 8, 48, 48, 2, 1), "not a batch of clips"),
])
def test_bad_input_is_a_value_error_naming_the_fix(family, shape, match):
    m = small(family)
    with pytest.raises(ValueError, match=match) as e:
        m(torch.randn(*shape))
    assert "num_frames=" in str(e.value) or "img_size" in str(e.value) or "in_chans" in str(e.value) \
        or "stack" in str(e.value) or "(B, C, T, H, W)" in str(e.value)


@pytest.mark.parametrize("kw, match", [
    (dict(num_frames=7), "not divisible by tubelet_frames"),
    (dict(img_size=50), "not divisible by patch_size"),
    (dict(num_heads=3), "not divisible by num_heads"),
    (dict(patch_inflation="tile"), "patch_inflation"),
    (dict(num_frames=0), "num_frames"),
])
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_constructor_arguments_are_value_errors(family, kw, match):
    with pytest.raises(ValueError, match=match):
        small(family, **kw)


def test_family_specific_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="too small for a 8x2x2 grid"):
        small("stvit_video", semantic_grid=(8, 2, 2))
    with pytest.raises(ValueError, match="semantic_grid"):
        small("stvit_video", semantic_grid=4)
    with pytest.raises(ValueError, match="does not fit in depth=4"):
        small("stvit_video", stgm_start=3)
    with pytest.raises(ValueError, match="center_pool"):
        small("stvit_video", center_pool="median")
    for grid in [(5, 3, 3), (1, 4, 1), (0, 1, 1), (2, 2), 2, (2.0, 2, 2), (True, 1, 1)]:
        with pytest.raises(ValueError, match="compressed_grid"):
            small("lookupvit_video", compressed_grid=grid)
        with pytest.raises(ValueError, match="compressed_grid"):
            small("lookupvit_video")(clips(1), compressed_grid=grid)
    with pytest.raises(ValueError, match="train_grids"):
        small("lookupvit_video", train_grids=[(2, 2, 2), (4, 4, 4)])
    with pytest.raises(ValueError, match="pool"):
        small("lookupvit_video", pool="avg")


# ------------------------------------------------------------------------------------ stem
def test_tubelet_embedding_is_one_linear_map_per_tubelet_in_time_major_order():
    emb = TubeletEmbed(img_size=(32, 48), num_frames=4, patch_size=16, tubelet_frames=2, in_chans=3, embed_dim=8)
    x = torch.randn(2, 3, 4, 32, 48)
    y = emb(x)
    assert y.shape == (2, 2, 2, 3, 8) and emb.grid_size == (2, 2, 3) and emb.num_patches == 12
    W, b = emb.proj.weight.reshape(8, -1), emb.proj.bias
    for t, h, w in [(0, 0, 0), (1, 0, 2), (1, 1, 1)]:
        tube = x[:, :, 2 * t:2 * t + 2, 16 * h:16 * h + 16, 16 * w:16 * w + 16].reshape(2, -1)
        torch.testing.assert_close(y[:, t, h, w], tube @ W.T + b)


def test_position_embedding_is_joint_and_added_per_tubelet():
    m = small("vit_video")
    x = clips()
    assert m.pos_embed.shape == (1, *GRID, 64)
    torch.testing.assert_close(m._embed(x), m.patch_embed(x) + m.pos_embed)


# ----------------------------------------------------------------------- 3-D window pooling
def test_window_index_over_a_volume_puts_each_token_in_one_window_row_major():
    g = window_grid((8, 14, 14), (2, 4, 4))
    assert (g.padded_size, g.window_size, g.pad_before) == ((8, 16, 16), (4, 4, 4), (0, 1, 1))
    index, valid = window_index(g)
    assert index.shape == (32, 64)
    assert sorted(index[valid].tolist()) == list(range(8 * 14 * 14)), "every token in exactly one window"
    # window (a, b, c), position (i, j, k) -> token ((4a + i) * 14 + 4b + j - 1) * 14 + 4c + k - 1
    for (a, b, c), (i, j, k) in [((0, 0, 0), (0, 1, 1)), ((1, 2, 3), (3, 0, 2)), ((1, 3, 1), (2, 2, 0))]:
        w, p = (a * 4 + b) * 4 + c, (i * 4 + j) * 4 + k
        r, col = 4 * b + j - 1, 4 * c + k - 1
        assert bool(valid[w, p]) == (0 <= r < 14 and 0 <= col < 14)
        if valid[w, p]:
            assert index[w, p] == ((4 * a + i) * 14 + r) * 14 + col


@pytest.mark.parametrize("mode", ["weighted", "avg", "max"])
def test_semantic_centres_pool_each_space_time_window_of_real_tokens(mode):
    feat, grid = (4, 3, 3), (2, 2, 2)
    pool = WindowPool(16, feat, grid, mode)
    if pool.score is not None:
        torch.nn.init.normal_(pool.score.proj.weight)
    x = torch.randn(2, 36, 16) - (5.0 if mode == "max" else 0.0)   # all negative: padding must not win a max
    out, w = pool(x, return_weights=True)
    vol = x.view(2, 4, 3, 3, 16)
    scores = pool.score(x).view(2, 4, 3, 3) if mode == "weighted" else None
    # padded evenly: 3 -> 4 with the pad after (pad_before 0), so windows hold rows/cols {0,1} and {2}
    spans = {0: (0, 2), 1: (2, 3)}
    for a in range(2):
        for b in range(2):
            for c in range(2):
                (h0, h1), (w0, w1) = spans[b], spans[c]
                tokens = vol[:, 2 * a:2 * a + 2, h0:h1, w0:w1].reshape(2, -1, 16)
                if mode == "avg":
                    ref = tokens.mean(1)
                elif mode == "max":
                    ref = tokens.amax(1)
                else:
                    s = scores[:, 2 * a:2 * a + 2, h0:h1, w0:w1].reshape(2, -1).softmax(-1)
                    ref = (s.unsqueeze(-1) * tokens).sum(1)
                torch.testing.assert_close(out[:, (a * 2 + b) * 2 + c], ref)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 8))


def test_stvit_video_module_layers_are_the_image_forms_on_tubelet_tokens():
    m = randomise_scorer(small("stvit_video")).eval()
    assert [type(b) for b in m.blocks][1:3] == [SemanticTokenBlock] * 2
    assert not m.blocks[1].attend_to_semantic and m.blocks[2].attend_to_semantic
    x = clips()
    with torch.no_grad():
        image = m.blocks[0](m._embed(x).flatten(1, 3))
        p = m.center_pool(image)
        s1 = m.blocks[1](p, image)
        s2 = m.blocks[2](s1, image, m.global_centers)
        s = m.blocks[3](s2)
        torch.testing.assert_close(m.forward_features(x), m.norm(s))


# ------------------------------------------------------------------------- LookupViT stream
def test_resize_volume_is_trilinear_and_antialiased_separably():
    x = torch.randn(2, 5, 8, 14, 14)
    torch.testing.assert_close(resize_volume(x, (4, 5, 5), antialias=False),
                               F.interpolate(x, size=(4, 5, 5), mode="trilinear", align_corners=False))
    torch.testing.assert_close(resize_volume(x, (8, 14, 14)), x)                 # same size: the identity
    y = resize_volume(x, (8, 5, 5))                                               # space only: the image form
    ref = F.interpolate(x.transpose(1, 2).reshape(16, 5, 14, 14), size=(5, 5), mode="bilinear",
                        antialias=True, align_corners=False)
    torch.testing.assert_close(y, ref.reshape(2, 8, 5, 5, 5).transpose(1, 2))
    z = resize_volume(x, (4, 14, 14))                                             # time only: halving averages
    w = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8                                     # the triangle filter at scale 2
    torch.testing.assert_close(z[:, :, 1], torch.einsum("bcthw,t->bchw", x[:, :, 1:5], w))
    assert not torch.allclose(resize_volume(x, (4, 5, 5)), resize_volume(x, (4, 5, 5), antialias=False))


def test_compressed_tokens_are_the_resized_lookup_volume():
    m = small("lookupvit_video")
    x = clips()
    c, l = m._streams(x, (2, 2, 2))
    vol = m._embed(x)
    torch.testing.assert_close(l, vol.flatten(1, 3))
    torch.testing.assert_close(c, resize_volume(vol.permute(0, 4, 1, 2, 3), (2, 2, 2)).flatten(2).transpose(1, 2))
    c, l = m._streams(x, GRID)
    torch.testing.assert_close(c, l)                                              # the full grid: the lookup tokens
    with torch.no_grad():
        assert m.forward_features(x, compressed_grid=(1, 2, 3)).shape == (2, 6, 64)
        assert m.eval()(x, compressed_grid=(4, 3, 3)).shape == (2, 10)


def test_train_grids_are_sampled_per_step_and_seeded():
    grids = [(1, 1, 1), (2, 2, 2), (4, 3, 3)]
    seen = []
    for _ in range(2):
        m = small("lookupvit_video", train_grids=grids, train_grid_seed=3).train()
        seen.append([m.forward_features(clips(1)).shape[1] for _ in range(12)])
    assert seen[0] == seen[1] and set(seen[0]) == {1, 8, 36}
    assert m.eval().forward_features(clips(1)).shape[1] == 8                      # eval: the default grid


# ------------------------------------------------------------------------------ token maps
def test_stvit_video_token_maps_are_distributions_over_all_space_time_tokens():
    m = randomise_scorer(small("stvit_video")).eval()
    with torch.no_grad():
        maps = m.token_maps(clips())
    assert set(maps) == {"center_pool", "blocks.1", "blocks.2", "owner", "owner_title"}
    for key in ("center_pool", "blocks.1", "blocks.2"):
        assert maps[key].shape == (2, 8, *GRID) and (maps[key] >= 0).all()
        torch.testing.assert_close(maps[key].sum((-3, -2, -1)), torch.ones(2, 8), msg=key)
    # the centres pool inside their 3-D windows: token 0's window is frames 0-1, rows/cols 0-1
    assert (maps["center_pool"][:, 0, 2:] == 0).all() and (maps["center_pool"][:, 0, :, 2] == 0).all()
    assert maps["owner"].shape == (2, *GRID) and maps["owner"].dtype == torch.long
    torch.testing.assert_close(maps["owner"], maps["blocks.2"].argmax(1))


def test_lookupvit_video_token_maps_gather_sums_to_one_over_tubelets_scatter_over_tokens():
    m = small("lookupvit_video").eval()
    with torch.no_grad():
        maps = m.token_maps(clips(), compressed_grid=(1, 2, 3))
    assert maps["gather"].shape == (2, 6, *GRID) and maps["gather_per_layer"].shape == (2, 4, 6, *GRID)
    torch.testing.assert_close(maps["gather"].sum((-3, -2, -1)), torch.ones(2, 6))
    torch.testing.assert_close(maps["scatter"].sum(1), torch.ones(2, *GRID))
    torch.testing.assert_close(maps["owner"], maps["scatter"].argmax(1))
    torch.testing.assert_close(maps["gather"], maps["gather_per_layer"][:, -1])
    with pytest.raises(ValueError, match="layer"):
        m.token_maps(clips(1), layer=4)


# ------------------------------------------------------------------------- image weights
def _timm_vit(name="vit_base_patch16_224", **kw):
    """timm's own (randomly initialised) image model at the reduced width."""
    torch.manual_seed(1)
    m = timm.create_model(name, **dict(dict(embed_dim=64, depth=4, num_heads=2, img_size=48), **kw))
    with torch.no_grad():
        for p in m.parameters():     # non-trivial values everywhere (norms, biases, pos_embed)
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _load(family, sd, **kw):
    """Build through timm with ``sd`` as the pretrained weights (the overlay's num_classes says the
    checkpoint's label space is the model's, so timm leaves a matching classifier to the filter)."""
    overlay = dict(state_dict=sd, num_classes=kw.get("num_classes", SMALL["num_classes"]))
    return small(family, pretrained=True, pretrained_cfg_overlay=overlay, **kw)


def test_central_inflation_puts_the_image_kernel_in_the_middle_frame():
    vit = _timm_vit()
    sd = vit.state_dict()
    m = _load("vit_video", sd, num_classes=1000)
    w = m.patch_embed.proj.weight
    torch.testing.assert_close(w[:, :, 1], sd["patch_embed.proj.weight"])
    assert (w[:, :, 0] == 0).all()
    torch.testing.assert_close(m.patch_embed.proj.bias, sd["patch_embed.proj.bias"])
    # class token and its position dropped; the 3x3 spatial embedding repeated over the 4 steps
    spatial = sd["pos_embed"][:, 1:].reshape(1, 3, 3, 64)
    for t in range(4):
        torch.testing.assert_close(m.pos_embed[:, t], spatial)
    for k in ("blocks.2.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "norm.weight", "head.weight"):
        torch.testing.assert_close(m.state_dict()[k], sd[k])


def test_average_inflation_classifies_a_static_clip_exactly_as_the_image_model():
    # timm's ViT without class token, norm-then-average pooling: the image twin of our baseline
    vit = _timm_vit(class_token=False, global_pool="avg", fc_norm=False, num_classes=10).eval()
    sd = vit.state_dict()
    m = _load("vit_video", sd, patch_inflation="average").eval()
    w = m.patch_embed.proj.weight
    torch.testing.assert_close(w.sum(2), sd["patch_embed.proj.weight"])
    torch.testing.assert_close(w[:, :, 0], w[:, :, 1])
    image = torch.randn(2, 3, 48, 48)
    static = image.unsqueeze(2).expand(-1, -1, 8, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(m(static), vit(image), rtol=1e-4, atol=1e-5)
        # central inflation of the same weights embeds only one frame of each tubelet
        central = _load("vit_video", sd).eval()
        moving = static.clone()
        moving[:, :, 0::2] = 0
        torch.testing.assert_close(central(moving), vit(image), rtol=1e-4, atol=1e-5)


def test_image_position_embedding_of_another_grid_is_resampled_then_tiled():
    vit = _timm_vit(img_size=224)                                  # 14x14 grid + class token
    m = _load("vit_video", vit.state_dict())
    spatial = resample_abs_pos_embed_nhwc(vit.pos_embed[:, 1:].reshape(1, 14, 14, 64), [3, 3])
    torch.testing.assert_close(m.pos_embed.data, spatial.unsqueeze(1).expand(-1, 4, -1, -1, -1))
    torch.testing.assert_close(tile_pos_embed(vit.pos_embed[:, 1:].reshape(1, 14, 14, 64), (4, 3, 3)),
                               m.pos_embed.data)


def test_inflation_helpers_check_their_arguments():
    w = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(inflate_patch_embed(w, 3, "central")[:, :, 1], w)
    torch.testing.assert_close(inflate_patch_embed(w, 3, "average").sum(2), w)
    with pytest.raises(ValueError, match="patch inflation"):
        inflate_patch_embed(w, 2, "repeat")
    with pytest.raises(ValueError, match="2-D patch kernel"):
        inflate_patch_embed(w[None], 2)


def test_deit_weights_initialise_stvit_video_with_the_module_projections_split():
    deit = _timm_vit("deit_small_distilled_patch16_224")           # class and distillation tokens, head_dist
    sd = deit.state_dict()
    torch.manual_seed(0)
    ref = small("stvit_video")
    torch.manual_seed(0)
    m = _load("stvit_video", sd)                                   # the same initial values as ref
    got = m.state_dict()
    for i in (1, 2):                                               # the module layers: q | kv of the fused qkv
        torch.testing.assert_close(got[f"blocks.{i}.attn.q.weight"], sd[f"blocks.{i}.attn.qkv.weight"][:64])
        torch.testing.assert_close(got[f"blocks.{i}.attn.kv.bias"], sd[f"blocks.{i}.attn.qkv.bias"][64:])
    torch.testing.assert_close(got["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(got["pos_embed"][:, 2], sd["pos_embed"][:, 2:].reshape(1, 3, 3, 64))
    # what DeiT cannot have keeps the model's own initial values; the 1000-way head is dropped
    for k in ("center_pool.score.conv.weight", "global_centers", "head.weight"):
        torch.testing.assert_close(got[k], ref.state_dict()[k])


def test_vit_weights_initialise_lookupvit_video_through_the_image_filter():
    sd = _timm_vit().state_dict()
    m = _load("lookupvit_video", sd)
    got = m.state_dict()
    torch.testing.assert_close(got["blocks.1.compressed.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(got["blocks.1.mhbc.q.weight"], sd["blocks.1.attn.qkv.weight"][:64])
    torch.testing.assert_close(got["blocks.1.mhbc.kv.weight"], sd["blocks.1.attn.qkv.weight"][64:])
    torch.testing.assert_close(got["blocks.1.gather_norm_kv.bias"], sd["blocks.1.norm1.bias"])
    torch.testing.assert_close(got["patch_embed.proj.weight"][:, :, 1], sd["patch_embed.proj.weight"])


def test_image_stvit_and_lookupvit_checkpoints_inflate_to_their_video_forms():
    st = timm.create_model("stvit_deit_tiny_patch16_224", embed_dim=64, depth=4, num_heads=2, img_size=64,
                           num_semantic_tokens=4, stgm_start=1)
    sd = st.state_dict()
    m = _load("stvit_video", sd)                                   # (2, 2, 2): the image's 2x2 per time window
    got = m.state_dict()
    conv = got["center_pool.score.conv.weight"]
    torch.testing.assert_close(conv[:, :, 1], sd["center_pool.score.conv.weight"])   # a per-frame scorer
    assert (conv[:, :, 0] == 0).all() and (conv[:, :, 2] == 0).all()
    torch.testing.assert_close(got["global_centers"], sd["global_centers"].repeat(1, 2, 1))
    lk = timm.create_model("lookupvit_tiny_patch16_224", embed_dim=64, depth=4, num_heads=2, img_size=64,
                           compressed_grid=(2, 2))
    sd = lk.state_dict()
    got = _load("lookupvit_video", sd).state_dict()
    torch.testing.assert_close(got["blocks.2.mhbc.scatter_v.weight"], sd["blocks.2.mhbc.scatter_v.weight"])
    torch.testing.assert_close(got["pos_embed"][:, 3], resample_abs_pos_embed_nhwc(sd["pos_embed"], [3, 3]))


def test_video_checkpoints_round_trip_and_resample_to_another_clip_length(tmp_path):
    from safetensors.torch import save_file
    for family in FAMILIES:
        src = small(family).eval()
        path = tmp_path / f"{family}.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
        m = small(family, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
        for k, v in src.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, msg=k)
        longer = small(family, num_frames=16, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        torch.testing.assert_close(longer.pos_embed.data, resample_pos_embed_3d(src.pos_embed.data, (8, 3, 3)))
        assert longer.pretrained_cfg["input_size"] == (3, 16, 224, 224) and longer.input_size == (3, 16, 48, 48)


def test_a_baseline_video_checkpoint_initialises_both_condensed_forms():
    sd = small("vit_video").state_dict()
    st = _load("stvit_video", sd).state_dict()
    torch.testing.assert_close(st["blocks.1.attn.q.weight"], sd["blocks.1.attn.qkv.weight"][:64])
    torch.testing.assert_close(st["pos_embed"], sd["pos_embed"])
    lk = _load("lookupvit_video", sd).state_dict()
    torch.testing.assert_close(lk["blocks.0.compressed.mlp.fc1.weight"], sd["blocks.0.mlp.fc1.weight"])


def test_a_checkpoint_of_another_model_fails_clearly():
    with pytest.raises(CheckpointError, match="does not fit VideoViT.*unexpected: blocks.0.gather_norm_q"):
        _load("vit_video", small("lookupvit_video").state_dict())
    with pytest.raises(CheckpointError, match="mismatched.*blocks.0.attn.qkv.weight"):
        _load("vit_video", _timm_vit(embed_dim=32, num_heads=2).state_dict())
    with pytest.raises(CheckpointError, match="does not fit STViTVideo"):
        _load("stvit_video", small("lookupvit_video").state_dict())
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=32, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1)).state_dict()
    with pytest.raises(CheckpointError):
        _load("lookupvit_video", swin)


def test_a_grey_model_adapts_the_image_kernel_before_inflating():
    sd = _timm_vit().state_dict()
    m = _load("vit_video", sd, in_chans=1)
    torch.testing.assert_close(m.patch_embed.proj.weight[:, 0, 1], sd["patch_embed.proj.weight"].sum(1))
    assert m(clips(1, c=1)).shape == (1, 10)
