"""STViT-R on Swin: parity with the authors' released code, checkpoints, the timm contract, figures."""
from __future__ import annotations

import argparse
import json
import os
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import condensevit  # noqa: F401  (registers the models)
from condensevit.layers.attention import split_heads
from condensevit.layers.windows import (
    gather_neighbourhoods, neighbourhood_index, pad_to_multiple, window_partition, window_reverse,
)
from condensevit.measure import count_params, gmacs
from condensevit.models import CheckpointError
from condensevit.models.stvit_r import RecoveryBlock, SemanticTokenBlock, checkpoint_filter_fn

from contract import (
    check_all_parameters_trained, check_classifier_contract, check_features_only, check_grad_checkpointing,
    check_optim_helpers,
)

TINY = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))
CLS_S = "stvit_r_swin_small_patch4_window7_224"
CLS_B = "stvit_r_swin_base_patch4_window7_224"
DET_S = "stvit_r_det_swin_small_patch4_window7"
DET_B = "stvit_r_det_swin_base_patch4_window7"
DET_T = "stvit_r_det_swin_tiny_patch4_window7"
ATOL = 1e-4


def _fx(fixtures_dir, name):
    return os.path.join(fixtures_dir, "stvit_r", name)


def _released_classifier(fixtures_dir, tag="released", file=None, **kw):
    file = file or _fx(fixtures_dir, f"stvit_r_swin_cls_{tag}.state_dict.safetensors")
    return timm.create_model(CLS_S, pretrained=True, pretrained_cfg_overlay=dict(file=file, num_classes=10),
                             num_classes=10, use_global_centers=tag == "global", **TINY, **kw).eval()


def _released_backbone(fixtures_dir, file=None, **kw):
    file = file or _fx(fixtures_dir, "stvit_r_swin_det_backbone.state_dict.safetensors")
    return timm.create_model(DET_S, pretrained=True, features_only=True,
                             pretrained_cfg_overlay=dict(file=file), **TINY, **kw).eval()


# ---------------------------------------------------------------------------------------------
# parity with the released code (fixtures made with the authors' classes)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["released", "global"])
def test_classifier_matches_released_code(fixtures_dir, tag):
    io = load_file(_fx(fixtures_dir, f"stvit_r_swin_cls_{tag}.io.safetensors"))
    m = _released_classifier(fixtures_dir, tag)
    with torch.no_grad():
        out = m(io["input"])
    torch.testing.assert_close(out, io["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", ["224x224", "256x352"])
def test_dense_backbone_matches_released_code(fixtures_dir, size):
    io = load_file(_fx(fixtures_dir, "stvit_r_swin_det_backbone.io.safetensors"))
    d = _released_backbone(fixtures_dir)
    with torch.no_grad():
        outs = d(io[f"input_{size}"])
    assert len(outs) == 4
    for i, o in enumerate(outs):
        torch.testing.assert_close(o, io[f"out{i}_{size}"], atol=ATOL, rtol=0)


def test_released_pth_checkpoint_loads_like_safetensors(fixtures_dir, tmp_path):
    """The authors' classifier files are .pth holding {'model': ...} beside pickled training state."""
    sd = load_file(_fx(fixtures_dir, "stvit_r_swin_cls_released.state_dict.safetensors"))
    path = tmp_path / "STViT-R-Swin-S.pth"
    torch.save({"model": sd, "epoch": 299, "config": argparse.Namespace(MULTI_SCALE="multi_scale_semantic_token1")},
               path)
    io = load_file(_fx(fixtures_dir, "stvit_r_swin_cls_released.io.safetensors"))
    with torch.no_grad():
        out = _released_classifier(fixtures_dir, file=str(path))(io["input"])
    torch.testing.assert_close(out, io["logits"], atol=ATOL, rtol=0)


def test_mmdetection_checkpoint_gives_its_backbone(fixtures_dir, tmp_path):
    sd = load_file(_fx(fixtures_dir, "stvit_r_swin_det_backbone.state_dict.safetensors"))
    detector = {f"backbone.{k}": v for k, v in sd.items()}
    detector.update({"neck.lateral_convs.0.conv.weight": torch.zeros(8, 32, 1, 1), "roi_head.x": torch.zeros(2)})
    path = tmp_path / "cascade_mask_rcnn.pth"
    torch.save({"meta": {"epoch": 36}, "state_dict": detector}, path)
    io = load_file(_fx(fixtures_dir, "stvit_r_swin_det_backbone.io.safetensors"))
    with torch.no_grad():
        outs = _released_backbone(fixtures_dir, file=str(path))(io["input_256x352"])
    for i, o in enumerate(outs):
        torch.testing.assert_close(o, io[f"out{i}_256x352"], atol=ATOL, rtol=0)


def test_imagenet_classifier_initialises_the_dense_backbone(fixtures_dir):
    """As the authors started their detectors: everything but norm/head carries over, the
    per-stage output norms start fresh."""
    sd = load_file(_fx(fixtures_dir, "stvit_r_swin_cls_released.state_dict.safetensors"))
    d = _released_backbone(fixtures_dir, file=_fx(fixtures_dir, "stvit_r_swin_cls_released.state_dict.safetensors"))
    own = d.model.state_dict()   # timm's feature wrapper holds the model
    torch.testing.assert_close(own["layers.2.blocks.2.attn.kv.weight"], sd["layers.2.blocks.2.attn.kv.weight"])
    torch.testing.assert_close(own["patch_embed.proj.0.bn.running_var"], sd["patch_embed.proj.0.bn.running_var"])
    assert torch.equal(own["norm3.weight"], torch.ones(256)) and torch.equal(own["norm0.bias"], torch.zeros(32))


# ---------------------------------------------------------------------------------------------
# projecting keys/values once = the released per-window projection (a throwaway reference)
# ---------------------------------------------------------------------------------------------

def _per_window_attention(block, queries, raw_table, index, mask):
    """Gather raw tokens per window first, then LayerNorm + kv on every copy (the released order)."""
    B, nW = raw_table.shape[0], index.shape[0]
    kv = block.attn.kv(block.norm1(raw_table[:, index])).view(B * nW, index.shape[1], -1)
    k, v = (split_heads(t, block.attn.num_heads) for t in kv.chunk(2, dim=-1))
    m = None if mask is None else mask[None, :, None, None, :].expand(B, -1, -1, -1, -1).reshape(B * nW, 1, 1, -1)
    return block.attn.attend_projected(queries, k, v, attn_mask=m)[0]


def _per_window_semantic(self, x, s, index, mask, return_attn=False):
    B, H, W, C = x.shape
    n, ws = self.semantic_size, self.window_size
    if s is None:
        xp, pb, pr = pad_to_multiple(x, ws)
        s = F.adaptive_max_pool2d(xp.permute(0, 3, 1, 2), ((H + pb) // ws * n, (W + pr) // ws * n)).permute(0, 2, 3, 1)
    raw = [x.flatten(1, 2), x.new_zeros(B, 1, C)] + ([s.flatten(1, 2)] if self.pooled_keys else [])
    out = _per_window_attention(self, window_partition(self.norm1(s), n), torch.cat(raw, 1), index, mask)
    out = self.layer_scale_1 * window_reverse(out, n, s.shape[1], s.shape[2])
    s = s + out if self.shortcut else out
    return self.mlp_residual(s), None


def _per_window_recovery(self, x, s, index, mask, return_attn=False):
    B, H, W, C = x.shape
    ws = self.window_size
    q, pb, pr = pad_to_multiple(self.norm1(x), ws)
    raw = torch.cat([s.flatten(1, 2), s.new_zeros(B, 1, C)], 1)
    out = window_reverse(_per_window_attention(self, window_partition(q, ws), raw, index, mask), ws, H + pb, W + pr)
    return self.mlp_residual(x + self.layer_scale_1 * out[:, :H, :W]), None


def _released_style(model):
    """The same model with keys/values projected per window, as the released code does."""
    for m in model.modules():
        if isinstance(m, SemanticTokenBlock):
            m.forward = types.MethodType(_per_window_semantic, m)
        elif isinstance(m, RecoveryBlock):
            m.forward = types.MethodType(_per_window_recovery, m)
    return model


def test_projecting_once_is_the_per_window_function(fixtures_dir):
    io = load_file(_fx(fixtures_dir, "stvit_r_swin_cls_released.io.safetensors"))
    m = _released_classifier(fixtures_dir)
    with torch.no_grad():
        ours = m(io["input"])
        ref = _released_style(m)(io["input"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    d = _released_backbone(fixtures_dir)
    x = torch.randn(1, 3, 97, 131)   # padded at every level, semantic grid and image
    with torch.no_grad():
        ours = d(x)
        ref = _released_style(d)(x)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# full-size figures: parameters, GMACs, key manifests (meta tensors: shapes only, fast)
# ---------------------------------------------------------------------------------------------

def _meta(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, **kw)


def test_parameter_counts_match_released_classifiers():
    assert count_params(_meta(CLS_S)) == 49_625_518
    assert count_params(_meta(CLS_B)) == 87_812_336


@pytest.mark.parametrize("name, ours, released, published", [
    (CLS_S, 5.618, 5.799, 5.83),
    (CLS_B, 9.907, 10.227, 10.26),
])
def test_gmacs_at_224_are_below_the_released_count(name, ours, released, published):
    m = _meta(name)
    g = gmacs(m)
    assert round(g, 3) == ours and g <= published
    # the same network projecting each window's keys/values separately, as released
    assert round(gmacs(_released_style(m)), 3) == released


def test_dense_backbone_costs_at_most_072_of_swin_small_at_896x1344():
    size = (3, 896, 1344)
    ours = gmacs(_meta(DET_S, features_only=True), size)
    swin = gmacs(_meta("swin_small_patch4_window7_224", img_size=size[1:], features_only=True), size)
    assert round(ours, 3) == 143.042
    assert ours <= 0.72 * swin, (ours, swin)
    # per-window projection (the released dense code) costs more than Swin itself
    assert gmacs(_released_style(_meta(DET_S, features_only=True)), size) > swin


@pytest.mark.parametrize("manifest, name, kw", [
    ("stvit_r_swin_s_cls_keys.json", CLS_S, {}),
    ("stvit_r_swin_b_cls_keys.json", CLS_B, {}),
    ("stvit_r_swin_s_det_backbone_keys.json", DET_S, {}),
    ("stvit_r_swin_b_det_backbone_keys.json", DET_B, {}),
])
def test_full_size_key_manifests_map_completely(fixtures_dir, manifest, name, kw):
    with open(_fx(fixtures_dir, manifest)) as f:
        spec = json.load(f)
    sd = {k: torch.zeros(()).expand(shape) for k, shape in spec["state_dict_shapes"].items()}
    model = _meta(name, **kw)
    out = checkpoint_filter_fn(sd, model)
    target = model.state_dict()
    assert sorted(out) == sorted(target)
    assert all(tuple(out[k].shape) == tuple(target[k].shape) for k in target)
    assert count_params(model) == spec["params"]


# ---------------------------------------------------------------------------------------------
# timm contract
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def cls_model():
    return timm.create_model(CLS_S, num_classes=5, **TINY)


@pytest.fixture
def dense_model():
    return timm.create_model(DET_T, num_classes=5, **TINY)


def test_classifier_contract(cls_model):
    x = torch.randn(2, 3, 224, 224)
    check_classifier_contract(cls_model, x, 5)
    check_optim_helpers(cls_model)
    assert cls_model.no_weight_decay() >= {"layers.0.blocks.0.attn.relative_position_bias_table"}


def test_dense_contract_at_an_odd_size(dense_model):
    x = torch.randn(2, 3, 90, 123)
    check_classifier_contract(dense_model, x, 5)
    check_optim_helpers(dense_model)
    assert dense_model.forward_features(x).shape == (2, 3, 4, 256)   # 90x123 -> a 3x4 NHWC map at stride 32 (padded)


@pytest.mark.parametrize("form", ["cls", "dense"])
def test_grad_checkpointing_gives_identical_outputs(form, cls_model, dense_model):
    model, x = (cls_model, torch.randn(1, 3, 224, 224)) if form == "cls" else (dense_model, torch.randn(1, 3, 75, 100))
    check_grad_checkpointing(model, x)


def test_all_parameters_trained(dense_model):
    check_all_parameters_trained(timm.create_model(CLS_S, num_classes=5, use_global_centers=True, **TINY),
                                 torch.randn(1, 3, 224, 224))
    # with a classifier the dense form leaves out the per-stage output norms 0-2 (only feature maps use them)
    assert not dense_model.stage_norms
    check_all_parameters_trained(dense_model, torch.randn(1, 3, 64, 80))


def test_features_only_both_forms():
    feats = check_features_only(CLS_S, torch.randn(1, 3, 224, 224), (4, 8, 16, 32), **TINY)
    assert [tuple(f.shape[-2:]) for f in feats] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    feats = check_features_only(DET_S, torch.randn(1, 3, 97, 131), (4, 8, 16, 32), **TINY)
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 33), (13, 17), (7, 9), (4, 5)]


def test_forward_intermediates_agree_with_forward_features(cls_model, dense_model):
    for model, x in ((cls_model.eval(), torch.randn(1, 3, 224, 224)), (dense_model.eval(), torch.randn(1, 3, 64, 96))):
        with torch.no_grad():
            final, inter = model.forward_intermediates(x)
            torch.testing.assert_close(final, model.forward_features(x))
            assert len(inter) == 4 and inter[2].shape[1] == 128
            last = model.forward_intermediates(x, indices=[3], output_fmt="NHWC", intermediates_only=True)[0]
            if model.dense:   # the dense form's maps carry the released per-stage norms (norm3 = final norm)
                torch.testing.assert_close(last, final)
            else:
                torch.testing.assert_close(model.norm(last), final)
            early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(early[0], inter[1])


def test_default_cfgs():
    for name in (CLS_S, CLS_B, "stvit_r_swin_tiny_patch4_window7_224"):
        cfg = timm.create_model(name, pretrained=False, **TINY).pretrained_cfg
        assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"]
        assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == timm.data.IMAGENET_DEFAULT_STD
        assert cfg["classifier"] == "head" and cfg["first_conv"] == "patch_embed.proj.0.c"
    cfg = timm.create_model(DET_S, **TINY).pretrained_cfg
    assert not cfg["fixed_input_size"] and cfg["num_classes"] == 0
    assert timm.create_model(DET_S, **TINY).num_classes == 0
    assert set(condensevit.models.list_models("stvit_r_*")) >= {CLS_S, CLS_B, DET_S, DET_B, DET_T}


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the problem and the fix
# ---------------------------------------------------------------------------------------------

def test_classifier_rejects_other_sizes_and_points_to_the_dense_form(cls_model):
    with pytest.raises(ValueError, match="stvit_r_det_swin"):
        cls_model(torch.randn(1, 3, 256, 256))
    with pytest.raises(ValueError, match="stvit_r_det_swin"):
        timm.create_model(CLS_S, img_size=256, **TINY)


def test_wrong_channel_count_is_named(cls_model, dense_model):
    for m in (cls_model, dense_model):
        with pytest.raises(ValueError, match="in_chans=1"):
            m(torch.randn(1, 1, 224, 224))


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="multiple of 6"):
        timm.create_model(CLS_S, embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8))
    with pytest.raises(ValueError, match="classification form only"):
        timm.create_model(DET_S, use_global_centers=True, **TINY)
    with pytest.raises(ValueError, match="padding_mask"):
        timm.create_model(DET_S, padding_mask="some", **TINY)


def _load_into(fixtures_dir, fixture, **kw):
    file = _fx(fixtures_dir, f"{fixture}.state_dict.safetensors")
    return timm.create_model(CLS_S, pretrained=True, num_classes=10,
                             pretrained_cfg_overlay=dict(file=file, num_classes=10), **kw)


def test_checkpoint_of_another_variant_names_keys_and_shapes(fixtures_dir):
    wider = dict(TINY, embed_dim=48)
    with pytest.raises(CheckpointError, match=r"mismatched: .*\(32,\) vs model \(48,\)"):
        _load_into(fixtures_dir, "stvit_r_swin_cls_released", **wider)
    deeper = dict(TINY, depths=(2, 2, 18, 2))
    with pytest.raises(CheckpointError, match="missing: layers.2.blocks.6"):
        _load_into(fixtures_dir, "stvit_r_swin_cls_released", **deeper)


def test_global_centres_mismatch_says_which_option(fixtures_dir):
    with pytest.raises(CheckpointError, match="use_global_centers=True"):
        _load_into(fixtures_dir, "stvit_r_swin_cls_global", **TINY)
    with pytest.raises(CheckpointError, match="use_global_centers=False"):
        _load_into(fixtures_dir, "stvit_r_swin_cls_released", use_global_centers=True, **TINY)


def test_truncated_checkpoint_file(fixtures_dir, tmp_path):
    src = _fx(fixtures_dir, "stvit_r_swin_det_backbone.state_dict.safetensors")
    path = tmp_path / "cut.safetensors"
    with open(src, "rb") as f:
        path.write_bytes(f.read()[: os.path.getsize(src) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        _released_backbone(fixtures_dir, file=str(path))


# ---------------------------------------------------------------------------------------------
# token maps, geometry primitives
# ---------------------------------------------------------------------------------------------

def test_token_maps_classifier(fixtures_dir):
    m = _released_classifier(fixtures_dir)
    x = load_file(_fx(fixtures_dir, "stvit_r_swin_cls_released.io.safetensors"))["input"]
    maps = m.token_maps(x, unit=0)
    for key in ("semantic", "recovery"):
        assert maps[key].shape == (2, 36, 14, 14)
        torch.testing.assert_close(maps[key].sum((-2, -1)), torch.ones(2, 36))
    sem = maps["semantic"].view(2, 6, 6, 14, 14)
    # token (0, 0) belongs to window (0, 0): its 10x10 neighbourhood is rows/cols 0..9
    assert sem[:, 0, 0, 10:].abs().sum() == 0 and sem[:, 0, 0, :, 10:].abs().sum() == 0
    assert sem[:, 5, 5, :4].abs().sum() == 0 and sem[:, 5, 5, 4:, 4:].sum() > 0.99
    assert maps["owner"].shape == (2, 14, 14) and maps["owner"].max() < 36
    with pytest.raises(ValueError, match="unit must be in 0..0"):
        m.token_maps(x, unit=1)


def test_token_maps_dense_at_an_odd_size(fixtures_dir):
    model = _released_backbone(fixtures_dir).model
    x = torch.randn(1, 3, 97, 131)   # stage 3: 7x9, padded to 7x14: 1x2 windows, a 3x6 semantic grid
    maps = model.token_maps(x, unit=0)
    for key in ("semantic", "recovery"):
        assert maps[key].shape == (1, 3 * 6, 7, 9)
    torch.testing.assert_close(maps["semantic"].sum((-2, -1)), torch.ones(1, 18))
    # the released padding mask (no padded rows, 5 padded columns) hides grid columns 1..5 from
    # recovery: those tokens get empty maps; masking only true padding keeps every token
    rec = maps["recovery"].sum((-2, -1)).view(3, 6)
    torch.testing.assert_close(rec[:, 0], torch.ones(3))
    assert rec[:, 1:].abs().max() == 0
    full = _released_backbone(fixtures_dir, padding_mask="full").model.token_maps(x, unit=0)["recovery"]
    full = full.sum((-2, -1))
    torch.testing.assert_close(full, torch.ones(1, 18))


def test_neighbourhood_gather_equals_unfold_of_the_padded_map():
    x = torch.randn(2, 9, 12, 5)                      # (B, H, W, C)
    xp, pb, pr = pad_to_multiple(x, 7)                 # 14 x 14
    k, ws, off = 14, 7, 3
    index, coords = neighbourhood_index(9, 12, (2, 2), k, ws, off)
    got = gather_neighbourhoods(x.flatten(1, 2), index, torch.zeros(5))
    ref = F.unfold(F.pad(xp.permute(0, 3, 1, 2), (off, k - ws - off) * 2), k, stride=ws)
    ref = ref.view(2, 5, k * k, 4).permute(0, 3, 2, 1)
    torch.testing.assert_close(got, ref)
    assert coords.shape == (2, 4, k * k)
    assert torch.equal(window_reverse(window_partition(xp, 7), 7, 14, 14), xp)


def test_geometry_is_built_once_per_size(dense_model):
    stage = dense_model.layers[2]
    assert stage.geometry(5, 6, torch.device("cpu")) is stage.geometry(5, 6, torch.device("cpu"))
