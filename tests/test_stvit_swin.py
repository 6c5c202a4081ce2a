"""STViT on Swin without recovery: layout figures, Swin / STViT-R checkpoints, the timm contract, token maps."""
from __future__ import annotations

import copy
import json
import os
import re

import pytest
import timm
import torch

import condensevit  # noqa: F401  (registers the models)
from condensevit.layers.windows import neighbourhood_index, window_neighbourhood_index
from condensevit.measure import count_params, gmacs
from condensevit.models import CheckpointError
from condensevit.models.stvit_r import SemanticBlock, SemanticTokenBlock, SwinBlock
from condensevit.models.stvit_swin import checkpoint_filter_fn, semantic_index

from contract import (
    check_all_parameters_trained, check_classifier_contract, check_features_only, check_grad_checkpointing,
    check_optim_helpers,
)

TINY = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))
T, S, B = (f"stvit_swin_{s}_patch4_window7_224" for s in ("tiny", "small", "base"))


def _meta(name, **kw):
    return timm.create_model(name, device="meta", **kw)


def _tiny(**kw):
    return timm.create_model(T, num_classes=kw.pop("num_classes", 10), **dict(TINY, **kw))


# ---------------------------------------------------------------------------------------------
# full-size figures (meta tensors: counted, not computed)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, swin, macs, swin_macs, params", [
    (T, "swin_tiny_patch4_window7_224", 3_414_073_344, 4_490_566_656, 28_292_746),
    (S, "swin_small_patch4_window7_224", 6_504_904_704, 8_740_875_264, 49_605_610),
    (B, "swin_base_patch4_window7_224", 11_473_428_480, 15_430_946_816, 87_767_360),
])
def test_default_layouts_cost_the_papers_share_of_swin(name, swin, macs, swin_macs, params):
    """The layout is our reading of the paper; its check is the paper's -24 / -25 / -25 % (+-3 points)."""
    ours, base = gmacs(_meta(name)), gmacs(_meta(swin))
    assert round(ours * 1e9) == macs and round(base * 1e9) == swin_macs
    paper = {T: -0.24, S: -0.25, B: -0.25}[name]
    assert abs((ours / base - 1) - paper) <= 0.03
    assert count_params(_meta(name)) == params


def test_four_tokens_per_window_cost_less():
    assert gmacs(_meta(T, semantic_tokens_per_window=4)) < gmacs(_meta(T))


# ---------------------------------------------------------------------------------------------
# the pieces are STViT-R's
# ---------------------------------------------------------------------------------------------

def test_the_module_is_built_from_stvit_r_blocks_after_two_thirds_of_stage_3():
    m = _meta(S)
    kinds = [type(b) for b in m.layers[2].blocks]
    assert kinds == [SwinBlock] * 12 + [SemanticTokenBlock] + [SemanticBlock] * 5
    assert [b.local_window for b in m.layers[2].blocks[14:]] == [3, None, 3, None]
    assert m.layers[2].grid == (6, 6) and m.layers[3].window_size == 3   # stage 4: 3x3 tokens, one window
    assert [type(b) for b in _meta(T).layers[2].blocks] == [SwinBlock] * 4 + [SemanticTokenBlock, SemanticBlock]


def test_neighbourhoods_at_224_are_the_released_classifiers():
    """10x10 neighbourhoods kept inside the 14x14 map = STViT-R's 10x10 at stride 4; the pooled
    tokens of each window come first (after the image tokens and the pad slot of the table)."""
    index, _ = neighbourhood_index(14, 14, (2, 2), 10, 4, 0)
    assert torch.equal(window_neighbourhood_index((14, 14), (7, 7), (10, 10)), index)
    idx = semantic_index(14, 14, 7, 3, 10)
    assert torch.equal(idx[:, 9:], index)
    assert idx[1, :9].tolist() == [14 * 14 + 1 + r * 6 + c for r in range(3) for c in range(3, 6)]


def test_window_neighbourhoods_stay_inside_any_map():
    idx = window_neighbourhood_index((16, 21, 9), (8, 7, 7), (8, 10, 10))
    assert idx.shape == (2 * 3 * 2, 8 * 10 * 9) and idx.min() >= 0 and idx.max() < 16 * 21 * 9
    # every window's own tokens are in its neighbourhood
    t, r, c = torch.meshgrid(torch.arange(8, 16), torch.arange(7, 14), torch.arange(7, 9), indexing="ij")
    own = (t * 21 * 9 + r * 9 + c).flatten()
    assert torch.isin(own, idx[1 * 6 + 1 * 2 + 1]).all()


# ---------------------------------------------------------------------------------------------
# timm contract
# ---------------------------------------------------------------------------------------------

def test_classifier_contract_channels_last_like_timms_swin():
    """The shared contract at 224 (four stage-3 windows; tests/test_contract.py runs every other kind
    on test_stvit_swin), the (B, 3, 3, C) grid channels-last as timm's Swin."""
    m = _tiny().eval()
    x = torch.randn(2, 3, 224, 224)
    check_classifier_contract(m, x, 10)
    assert m.output_fmt == "NHWC" and m.pretrained_cfg["pool_size"] == (3, 3)
    with torch.no_grad():
        assert m.forward_features(x).shape == (2, 3, 3, 256)
    c = copy.deepcopy(m)
    c.reset_classifier(3, "")
    with torch.no_grad():
        assert c(x).shape == (2, 3, 3, 3)
    check_optim_helpers(m)
    assert {"layers.2.global_centers", "layers.0.blocks.0.attn.relative_position_bias_table"} <= m.no_weight_decay()


def test_grad_checkpointing_and_every_parameter_trained():
    m = _tiny(img_size=112)
    x = torch.randn(2, 3, 112, 112)
    check_grad_checkpointing(m, x)
    check_all_parameters_trained(m, x)


def test_features_only_and_intermediates():
    x = torch.randn(1, 3, 224, 224)
    feats = check_features_only(T, x, expected_reductions=[4, 8, 37, 75], **TINY)
    assert [tuple(f.shape[-2:]) for f in feats] == [(56, 56), (28, 28), (6, 6), (3, 3)]
    m = _tiny().eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, norm=True)
        torch.testing.assert_close(final, m.forward_features(x))
        torch.testing.assert_close(inter[-1].permute(0, 2, 3, 1), final)
        assert len(m.forward_intermediates(x, indices=[1], intermediates_only=True)) == 1


def test_a_meta_built_model_recovers_its_geometry_buffers():
    """At 224 (shifted stage-3 windows): the semantic index, the shift mask and the Swin blocks'
    relative position index are rebuilt after ``to_empty`` (the shared check runs test_stvit_swin)."""
    from timm.models._manipulate import reinit_non_persistent_buffers
    ref = _tiny()
    m = _meta(T, num_classes=10, **TINY).to_empty(device="cpu")
    reinit_non_persistent_buffers(m)
    for name in ("semantic_index", "attn_mask"):
        assert torch.equal(getattr(m.layers[2], name), getattr(ref.layers[2], name)), name
    for i in (0, 2, 3):
        a, b = m.layers[i].blocks[0].attn, ref.layers[i].blocks[0].attn
        assert torch.equal(a.relative_position_index, b.relative_position_index), i
    assert ref.layers[2].semantic_index.shape == (4, 9 + 100) and ref.layers[2].attn_mask.shape == (4, 1, 49, 49)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def _swin_sd(**kw):
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **dict(TINY, **kw)).state_dict()


def _to_original_layout(sd):
    """timm's Swin layout -> the original Microsoft one (merging at the end of a stage, plain ``head``)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_swin_weights_load_and_the_first_stages_compute_swins_features(layout):
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **TINY).eval()
    sd = swin.state_dict() if layout == "timm" else _to_original_layout(swin.state_dict())
    m = timm.create_model(T, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(state_dict=sd), **TINY).eval()
    own = m.state_dict()
    ref = swin.state_dict()
    # a semantic block: q / kv split from qkv, the rest as it is
    torch.testing.assert_close(own["layers.2.blocks.4.attn.q.weight"], ref["layers.2.blocks.4.attn.qkv.weight"][:128])
    torch.testing.assert_close(own["layers.2.blocks.5.attn.kv.bias"], ref["layers.2.blocks.5.attn.qkv.bias"][128:])
    torch.testing.assert_close(own["layers.2.blocks.5.mlp.fc2.weight"], ref["layers.2.blocks.5.mlp.fc2.weight"])
    # merging moves to the end of the stage before; the last stage's 13x13 tables shrink to 5x5
    torch.testing.assert_close(own["layers.2.downsample.reduction.weight"], ref["layers.3.downsample.reduction.weight"])
    assert own["layers.3.blocks.0.attn.relative_position_bias_table"].shape == (25, 8)
    torch.testing.assert_close(own["head.fc.weight"], ref["head.fc.weight"])
    # the new parameters keep their initial values
    assert torch.equal(own["layers.2.blocks.4.layer_scale_1"], torch.full((128,), 1e-5))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = swin.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        b = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_swin_weights_load_with_the_usual_factory_keywords():
    sd = _swin_sd()
    for kw in (dict(num_classes=0), dict(num_classes=5), dict(in_chans=1, num_classes=10)):
        m = timm.create_model(T, pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(sd)), **TINY, **kw)
        torch.testing.assert_close(m.state_dict()["layers.1.blocks.1.attn.qkv.weight"],
                                   sd["layers.1.blocks.1.attn.qkv.weight"])


def test_own_checkpoint_round_trips_through_a_file(tmp_path):
    m = _tiny().eval()
    path = tmp_path / "stvit_swin.pth"
    torch.save({"model": m.state_dict()}, path)
    m2 = timm.create_model(T, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)),
                           **TINY).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))


def test_checkpoints_that_do_not_fit_fail_clearly():
    with pytest.raises(CheckpointError, match="mismatched"):          # another width
        timm.create_model(T, pretrained=True, pretrained_cfg_overlay=dict(state_dict=_swin_sd(embed_dim=48)), **TINY)
    with pytest.raises(CheckpointError, match="mismatched"):          # another token count
        checkpoint_filter_fn(_tiny().state_dict(), _tiny(semantic_tokens_per_window=4))
    with pytest.raises(CheckpointError, match="stem='patch'"):
        checkpoint_filter_fn(_swin_sd(), _tiny(stem="conv"))
    with pytest.raises(CheckpointError, match="missing"):             # a Swin-S into a Swin-T
        checkpoint_filter_fn(_swin_sd(), _tiny(depths=(2, 2, 18, 2)))


def test_stvit_r_checkpoint_loads_where_its_layers_correspond():
    r = timm.create_model("stvit_r_swin_small_patch4_window7_224", num_classes=10, use_global_centers=True,
                          **dict(TINY, depths=(2, 2, 18, 2)))
    sd = r.state_dict()
    with pytest.raises(CheckpointError, match="stem='conv'"):
        checkpoint_filter_fn(sd, _tiny(depths=(2, 2, 18, 2)))
    m = _tiny(depths=(2, 2, 18, 2), stem="conv")
    with pytest.warns(UserWarning, match=r"blocks \[3, 4, 5, 6, 7, 8, 9, 10, 11\]"):
        out = checkpoint_filter_fn(sd, m)
    m.load_state_dict(out)
    own = m.state_dict()
    for ours, theirs in (("patch_embed.proj.0.c.weight", "patch_embed.proj.0.c.weight"),
                         ("layers.1.blocks.1.attn.qkv.weight", "layers.1.blocks.1.attn.qkv.weight"),
                         ("layers.2.blocks.1.attn.qkv.weight", "layers.2.blocks.6.attn.qkv.weight"),   # Swin, unit 1
                         ("layers.2.blocks.12.attn.kv.weight", "layers.2.blocks.1.attn.kv.weight"),    # make
                         ("layers.2.blocks.13.attn.q.weight", "layers.2.blocks.2.attn.q.weight"),      # refine
                         ("layers.2.blocks.16.norm1.weight", "layers.2.blocks.9.norm1.weight"),       # local, unit 1
                         ("layers.2.blocks.17.mlp.fc1.weight", "layers.2.blocks.10.mlp.fc1.weight"),  # global, unit 1
                         ("layers.2.global_centers", "layers.2.global_centers"),
                         ("head.fc.weight", "head.weight")):
        torch.testing.assert_close(own[ours], sd[theirs], msg=ours)


def test_full_size_stvit_r_small_maps_onto_stvit_swin_small(fixtures_dir):
    with open(os.path.join(fixtures_dir, "stvit_r", "stvit_r_swin_s_cls_keys.json")) as f:
        spec = json.load(f)
    sd = {k: torch.zeros(()).expand(shape) for k, shape in spec["state_dict_shapes"].items()}
    model = _meta(S, stem="conv", use_global_centers=False)
    with pytest.warns(UserWarning, match="no counterpart"):
        out = checkpoint_filter_fn(sd, model)
    target = model.state_dict()
    assert sorted(out) == sorted(target)
    assert all(tuple(out[k].shape) == tuple(target[k].shape) for k in target)


# ---------------------------------------------------------------------------------------------
# bad input, token maps
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(semantic_tokens_per_window=5), "must be a square"),
    (dict(stgm_stage=4), "stgm_stage"),
    (dict(stgm_start=5), r"use 0\.\.4"),
    (dict(img_size=202), "multiple of the 4x4 patches"),
    (dict(img_size=32, stgm_stage=3), "do not fit"),
    (dict(stem="levit"), "stem must be one of"),
    (dict(global_pool="max"), "global_pool"),
])
def test_bad_configurations_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _meta(T, **kw)


def test_wrong_input_is_named():
    m = _tiny(img_size=112)
    with pytest.raises(ValueError, match=r"takes 112x112 images.*img_size=\(224, 224\)"):
        m(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="in_chans=1"):
        m(torch.randn(1, 1, 112, 112))


def test_other_stages_and_sizes_work():
    for kw, x in ((dict(stgm_stage=1, stgm_start=0), torch.randn(1, 3, 224, 224)),
                  (dict(stgm_stage=3), torch.randn(1, 3, 224, 224)),
                  (dict(img_size=(200, 260), semantic_tokens_per_window=4), torch.randn(1, 3, 200, 260))):
        m = _tiny(**kw).eval()
        with torch.no_grad():
            assert m(x).shape == (1, 10)


def test_token_maps_are_distributions_over_the_condensed_stages_image_tokens():
    m = _tiny()
    maps = m.token_maps(torch.randn(2, 3, 224, 224))
    for k in ("semantic", "refine"):
        assert maps[k].shape == (2, 36, 14, 14)
        torch.testing.assert_close(maps[k].sum((-2, -1)), torch.ones(2, 36))
    # the first block looks only inside each window's 10x10 neighbourhood: token 0 (window 0) never
    # sees the last 4 rows or columns
    assert maps["semantic"][:, 0, 10:].abs().max() == 0 and maps["semantic"][:, 0, :, 10:].abs().max() == 0
    assert maps["owner"].shape == (2, 14, 14) and maps["owner"].max() < 36
    from condensevit.viz import token_maps
    tm = token_maps(m, torch.randn(1, 3, 224, 224))
    assert set(tm.maps) == {"semantic", "refine"}
