"""STViT, global form, on DeiT (src/condensevit/models/stvit.py, layers/pooling.py).

Most behaviour is tested on a reduced model (width 64, 6 layers: 2 image layers, the module at
layers 3-4, 2 semantic layers, 2x2 semantic tokens, 112x112 input = a 7x7 token map padded to 8x8).
Full-size models are built only for parameter counts, GMACs and loading a real-layout DeiT-S."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import condensevit  # noqa: F401  (registers the models)
from condensevit.layers.pooling import WindowPool, window_grid, window_index
from condensevit.measure import count_params, gmacs
from condensevit.models._builder import CheckpointError
from condensevit.models.stvit import STViT, SemanticTokenBlock, checkpoint_filter_fn

from contract import (
    check_all_parameters_trained, check_classifier_contract, check_features_only, check_grad_checkpointing,
    check_optim_helpers,
)

NAME = "stvit_deit_small_patch16_224"
SMALL = dict(embed_dim=64, depth=6, num_heads=2, img_size=112, num_semantic_tokens=4, stgm_start=2, stgm_depth=2)
START, END, N_SEM, GRID = 2, 4, 4, (7, 7)


def small(**kw) -> STViT:
    return timm.create_model(NAME, **dict(SMALL, **kw))


def randomise_scorer(model: STViT) -> STViT:
    """The scorer starts at zero (= average pooling); give it weights so 'weighted' is really weighted."""
    with torch.no_grad():
        model.center_pool.score.proj.weight.normal_(0, 1.0)
    return model


@pytest.fixture
def x():
    return torch.randn(2, 3, 112, 112)


@pytest.fixture
def model():
    return randomise_scorer(small(num_classes=10)).eval()


# ------------------------------------------------------------------------------- registration
def test_three_variants_are_registered_with_the_paper_defaults():
    assert set(timm.list_models("stvit_deit_*")) >= {
        "stvit_deit_tiny_patch16_224", "stvit_deit_small_patch16_224", "stvit_deit_base_patch16_224"}
    with torch.device("meta"):
        m = timm.create_model(NAME)
    assert (m.num_semantic_tokens, m.stgm_start, m.stgm_depth, m.center_pool.mode) == (16, 4, 2, "weighted")
    assert m.global_centers is not None and m.global_centers.shape == (1, 16, 384)
    assert m.center_pool.geometry.padded_size == (16, 16) and m.center_pool.window_size == (4, 4)
    kinds = [type(b).__name__ for b in m.blocks]
    assert kinds == ["Block"] * 4 + ["SemanticTokenBlock"] * 2 + ["Block"] * 6
    assert not m.blocks[4].attend_to_semantic and m.blocks[5].attend_to_semantic


def test_pretrained_cfg_is_deits_preprocessing_and_weights():
    cfg = timm.get_pretrained_cfg(NAME).to_dict()
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["hf_hub_id"] == "timm/deit_small_patch16_224.fb_in1k"
    assert timm.get_pretrained_cfg("stvit_deit_tiny_patch16_224").hf_hub_id == "timm/deit_tiny_patch16_224.fb_in1k"
    assert timm.get_pretrained_cfg("stvit_deit_base_patch16_224").hf_hub_id == "timm/deit_base_patch16_224.fb_in1k"


def test_parameter_counts_are_deits_minus_class_token_plus_scorer_and_global_centres():
    with torch.device("meta"):
        counts = {v: count_params(timm.create_model(f"stvit_deit_{v}_patch16_224")) for v in ("tiny", "small", "base")}
        deit = {v: count_params(timm.create_model(f"deit_{v}_patch16_224")) for v in ("tiny", "small", "base")}
    assert counts == {"tiny": 5_722_600, "small": 22_061_032, "base": 86_588_392}
    for v, C in (("tiny", 192), ("small", 384), ("base", 768)):
        # - cls_token - its pos_embed slot + depthwise conv (9C + C) + LayerNorm (2C) + score (C) + G (16C)
        assert counts[v] == deit[v] - 2 * C + 10 * C + 2 * C + C + 16 * C


def test_gmacs_small_match_the_paper():
    m = timm.create_model(NAME)
    g = gmacs(m)
    assert abs(g - 1.91) / 1.91 < 0.02          # paper: 1.91G; our count of the layout: 1.906
    assert g == pytest.approx(1.908996, abs=2e-6)  # our exact count, pinned


def test_gmacs_tiny_are_about_042_of_deit():
    ratio = gmacs(timm.create_model("stvit_deit_tiny_patch16_224")) / gmacs(timm.create_model("deit_tiny_patch16_224"))
    assert 0.40 < ratio < 0.44


# ------------------------------------------------------------------------------ timm contract
def test_timm_classifier_contract(model, x):
    check_classifier_contract(model, x, num_classes=10)
    assert model.forward_features(x).shape == (2, N_SEM, 64)


def test_grad_checkpointing_gives_the_same_outputs_and_gradients(x, monkeypatch):
    m = randomise_scorer(small(num_classes=10))
    check_grad_checkpointing(m, x)
    import condensevit.models.stvit as stvit
    calls = []
    monkeypatch.setattr(stvit, "checkpoint", lambda fn, *a: calls.append(type(fn).__name__) or fn(*a))
    m.set_grad_checkpointing(True)
    m.train()(x)
    assert calls == ["Block"] * 2 + ["SemanticTokenBlock"] * 2 + ["Block"] * 2, "every layer is checkpointed"


def test_every_parameter_is_trained(x):
    check_all_parameters_trained(randomise_scorer(small(num_classes=10)), x)


def test_optimiser_helpers_group_the_module_with_its_layers(model):
    check_optim_helpers(model)
    assert model.no_weight_decay() == {"pos_embed", "global_centers"}
    lid = timm.models.group_parameters(model, model.group_matcher(), reverse=True)
    assert lid["center_pool.score.proj.weight"] == lid[f"blocks.{START}.attn.q.weight"]
    assert lid["global_centers"] == lid[f"blocks.{START + 1}.attn.q.weight"]
    assert lid["pos_embed"] < lid["blocks.0.norm1.weight"] < lid[f"blocks.{START}.norm1.weight"] < lid["norm.weight"]


def test_features_only_gives_the_image_map_then_the_semantic_grid(x):
    feats = check_features_only(NAME, x, expected_reductions=[16, 64, 64], **SMALL)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 7, 7), (2, 64, 2, 2), (2, 64, 2, 2)]
    fm = timm.create_model(NAME, features_only=True, **SMALL)
    assert fm.feature_info.get("tokens") == ["image", "semantic", "semantic"]
    assert fm.feature_info.module_name() == [f"blocks.{START - 1}", f"blocks.{END - 1}", "blocks.5"]
    # an early-only feature net is pruned before the module and drops its parameters
    fm = timm.create_model(NAME, features_only=True, out_indices=(0, 1), **SMALL)
    assert fm.model.center_pool is None and fm.model.global_centers is None and len(fm.model.blocks) == 2
    assert [tuple(f.shape) for f in fm(x)] == [(2, 64, 7, 7)] * 2


def test_forward_intermediates_agree_with_forward(model, x):
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [49, 49, 4, 4, 4, 4]
        torch.testing.assert_close(model.norm(inter[-1]), final)
        nchw = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        torch.testing.assert_close(nchw[0], inter[1].transpose(1, 2).reshape(2, 64, 7, 7))
        torch.testing.assert_close(nchw[1], inter[3].transpose(1, 2).reshape(2, 64, 2, 2))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True, norm=True)
        torch.testing.assert_close(early[0], model.norm(inter[1]).transpose(1, 2).reshape(2, 64, 7, 7))
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NHWC")


def test_key_names_are_timms_vit_with_qkv_split_on_the_module_layers(model):
    keys = set(model.state_dict())
    for i in (0, 1, 4, 5):
        assert {f"blocks.{i}.{k}" for k in ("norm1.weight", "attn.qkv.weight", "attn.proj.weight", "norm2.weight",
                                             "mlp.fc1.weight", "mlp.fc2.weight")} <= keys
    for i in (START, START + 1):
        assert {f"blocks.{i}.attn.q.weight", f"blocks.{i}.attn.kv.bias"} <= keys
        assert f"blocks.{i}.attn.qkv.weight" not in keys
    assert "cls_token" not in keys and model.pos_embed.shape == (1, 49, 64)
    assert not any("window" in k for k in keys), "geometry buffers are derived, not checkpointed"


def test_a_model_built_on_the_meta_device_recovers_its_geometry_buffers(model, x):
    from timm.models._manipulate import reinit_non_persistent_buffers
    with torch.device("meta"):
        m = small(num_classes=10)
    assert m.center_pool.window_bias.is_meta
    m = m.to_empty(device="cpu")
    reinit_non_persistent_buffers(m)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), model(x))


# ----------------------------------------------------------------------------- window pooling
def test_window_grid_pads_evenly_to_a_multiple_of_the_grid():
    g = window_grid((14, 14), (4, 4))
    assert (g.padded_size, g.window_size, g.pad_before) == ((16, 16), (4, 4), (1, 1))
    index, valid = window_index(g)
    rows = valid.view(4, 4, 4, 4).any(-1).sum(-1)   # real rows in each window
    assert rows[:, 0].tolist() == [3, 4, 4, 3]
    assert sorted(index[valid].tolist()) == list(range(196)), "every token in exactly one window"
    g = window_grid((24, 24), (4, 4))                 # 384 input: no padding
    assert (g.padded_size, g.window_size, g.pad_before) == ((24, 24), (6, 6), (0, 0))
    g = window_grid((14, 20), (4, 4))                 # non-square
    assert (g.padded_size, g.window_size, g.pad_before) == ((16, 20), (4, 5), (1, 0))


def _reference_pool(x, feat, grid, scores=None, mode="weighted"):
    """Window pooling written out window by window, padding never materialised."""
    g = window_grid(feat, grid)
    (H, W), (wh, ww), (ph, pw) = g.feat_size, g.window_size, g.pad_before
    out = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            r0, c0 = max(i * wh - ph, 0), max(j * ww - pw, 0)
            r1, c1 = min((i + 1) * wh - ph, H), min((j + 1) * ww - pw, W)
            idx = torch.tensor([r * W + c for r in range(r0, r1) for c in range(c0, c1)])
            tokens = x[:, idx]
            if mode == "avg":
                out.append(tokens.mean(1))
            elif mode == "max":
                out.append(tokens.amax(1))
            else:
                w = scores[:, idx].softmax(-1)
                out.append((w.unsqueeze(-1) * tokens).sum(1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("feat", [(14, 14), (7, 10)])
def test_weighted_pooling_is_a_softmax_over_the_real_tokens_of_each_window(feat):
    pool = WindowPool(32, feat, (4, 4) if feat == (14, 14) else (2, 3), "weighted")
    torch.nn.init.normal_(pool.score.proj.weight)
    x = torch.randn(2, feat[0] * feat[1], 32)
    out, w = pool(x, return_weights=True)
    torch.testing.assert_close(out, _reference_pool(x, feat, pool.geometry.grid, pool.score(x)))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, pool.num_windows))
    assert ((w > 0).sum(1) == 1).all(), "each token weighs in exactly one window"


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_avg_and_max_pooling_ignore_the_padding(mode):
    pool = WindowPool(32, (14, 14), (4, 4), mode)
    assert pool.score is None
    x = torch.randn(2, 196, 32) - 5.0       # all negative: zero padding would win a max
    out, w = pool(x, return_weights=True)
    torch.testing.assert_close(out, _reference_pool(x, (14, 14), (4, 4), mode=mode))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 16))


def test_a_fresh_scorer_pools_window_averages_and_padding_is_symmetric():
    pool = WindowPool(32, (14, 14), (4, 4), "weighted")
    x = torch.randn(2, 196, 32)
    torch.testing.assert_close(pool(x), WindowPool(32, (14, 14), (4, 4), "avg")(x))
    # even padding on both sides: a mirrored map gives mirrored centres
    flip = x.view(2, 14, 14, 32).flip(2).reshape(2, 196, 32)
    torch.testing.assert_close(pool(flip).view(2, 4, 4, 32), pool(x).view(2, 4, 4, 32).flip(2))


# ------------------------------------------------------------------------------ the module
def test_module_layers_compute_the_designed_cross_attention(model, x):
    """Layer 3 (first kind): P attends to X; layer 4: S1 + G attends to [S1, X]; residual on the query."""
    with torch.no_grad():
        image = model.forward_intermediates(x, indices=[START - 1], output_fmt="NLC", intermediates_only=True)[0]
        p = model.center_pool(image)

        def reference(blk, query, context):
            C, h = query.shape[-1], blk.attn.num_heads
            q, kv = blk.attn.q(blk.norm1(query)), blk.attn.kv(blk.norm1(context))
            k, v = kv[..., :C], kv[..., C:]
            sh = lambda t: t.view(t.shape[0], t.shape[1], h, C // h).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(sh(q), sh(k), sh(v)).transpose(1, 2).reshape(query.shape)
            y = query + blk.attn.proj(a)
            return y + blk.mlp(blk.norm2(y))

        s1 = reference(model.blocks[START], p, image)
        s2 = reference(model.blocks[START + 1], s1 + model.global_centers, torch.cat([s1, image], 1))
        inter = model.forward_intermediates(x, indices=[START, START + 1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(inter[0], s1)
    torch.testing.assert_close(inter[1], s2)


def test_plain_and_fused_attention_paths_agree():
    blk = SemanticTokenBlock(64, 2, attend_to_semantic=True).eval()
    s, img, g = torch.randn(2, 4, 64), torch.randn(2, 49, 64), torch.randn(1, 4, 64)
    with torch.no_grad():
        fused = blk(s, img, g)
        plain, attn = blk(s, img, g, return_attn=True)
    torch.testing.assert_close(fused, plain)
    assert attn.shape == (2, 2, 4, 53)


def test_global_centres_enter_the_query_only_in_the_first_second_kind_layer(x):
    m = small(stgm_depth=3, num_classes=10).eval()
    assert [m.blocks[i].attend_to_semantic for i in range(START, START + 3)] == [False, True, True]
    seen = {}
    for i in range(START, START + 3):
        m.blocks[i].register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[2] is not None))
    with torch.no_grad():
        before = m(x)
        m.global_centers.add_(1.0)
        assert not torch.allclose(before, m(x)), "the global centres change the output"
    assert seen == {START: False, START + 1: True, START + 2: False}


def test_module_options_depth_one_and_no_global_centres(x):
    one = small(stgm_depth=1)
    assert one.global_centers is None and "global_centers" not in one.no_weight_decay()
    assert not one.blocks[START].attend_to_semantic and type(one.blocks[START + 1]).__name__ == "Block"
    assert one(x).shape == (2, 1000)
    off = small(global_centers=False)
    assert off.global_centers is None and off(x).shape == (2, 1000)
    nine = timm.create_model(NAME, **dict(SMALL, img_size=224, num_semantic_tokens=9))
    assert nine.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 9, 64)
    assert nine.center_pool.geometry.padded_size == (15, 15) and nine.center_pool.window_size == (5, 5)


@pytest.mark.parametrize("mode", ["weighted", "avg", "max"])
def test_each_centre_pooling_runs_and_differs(mode, x):
    torch.manual_seed(0)
    m = randomise_scorer(small(center_pool=mode)) if mode == "weighted" else small(center_pool=mode)
    torch.manual_seed(0)
    ref = randomise_scorer(small(center_pool="weighted"))
    with torch.no_grad():
        out, out_ref = m(x), ref(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, out_ref) == (mode == "weighted")


@pytest.mark.parametrize("img_size", [(384, 384), (112, 160)])
def test_other_image_sizes_adapt_grid_and_windows(img_size):
    m = small(img_size=img_size).eval()
    H, W = img_size[0] // 16, img_size[1] // 16
    assert m.pos_embed.shape == (1, H * W, 64)
    img = torch.randn(1, 3, *img_size)
    with torch.no_grad():
        assert m.forward_features(img).shape == (1, N_SEM, 64)
        maps = m.token_maps(img)
        nchw = m.forward_intermediates(img, indices=[1, 5], intermediates_only=True)
        nlc = m.forward_intermediates(img, indices=[1, 5], intermediates_only=True, output_fmt="NLC")
    assert all(v.shape == (1, N_SEM, H, W) for v in maps.values())
    torch.testing.assert_close(nchw[0], nlc[0].transpose(1, 2).reshape(1, 64, H, W))
    torch.testing.assert_close(nchw[1], nlc[1].transpose(1, 2).reshape(1, 64, 2, 2))


# -------------------------------------------------------------------------------- token maps
def test_token_maps_are_pooling_weights_and_head_averaged_attention(model, x):
    with torch.no_grad():
        before = model(x)
        maps = model.token_maps(x)
        assert set(maps) == {"center_pool", f"blocks.{START}", f"blocks.{START + 1}"}
        for k, v in maps.items():
            assert v.shape == (2, N_SEM, *GRID), k
            assert (v >= 0).all()
            torch.testing.assert_close(v.sum((-2, -1)), torch.ones(2, N_SEM), msg=k)
        image = model.forward_intermediates(x, indices=[START - 1], output_fmt="NLC", intermediates_only=True)[0]
        p, w = model.center_pool(image, return_weights=True)
        torch.testing.assert_close(maps["center_pool"].flatten(2), w)
        # layer of the first kind: attention over the image tokens, mean over heads
        _, a = model.blocks[START](p, image, return_attn=True)
        torch.testing.assert_close(maps[f"blocks.{START}"].flatten(2), a.mean(1))
        # second kind: keys [S1, X]; the image part, renormalised
        s1 = model.blocks[START](p, image)
        _, a = model.blocks[START + 1](s1, image, model.global_centers, return_attn=True)
        img_part = a.mean(1)[..., N_SEM:]
        torch.testing.assert_close(maps[f"blocks.{START + 1}"].flatten(2), img_part / img_part.sum(-1, keepdim=True))
        assert not torch.allclose(maps["center_pool"], maps[f"blocks.{START}"])
        torch.testing.assert_close(model(x), before, msg="token_maps leaves no state behind")


def test_forward_uses_fused_attention_and_makes_no_host_syncs(model, x):
    from torch.overrides import TorchFunctionMode
    forbidden = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.cpu,
                 torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.__int__}

    class NoSync(TorchFunctionMode):
        fused = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            assert func not in forbidden, f"host sync in forward: {func}"
            self.fused += func is F.scaled_dot_product_attention
            return func(*args, **(kwargs or {}))

    for mode in ("weighted", "max"):
        m = small(center_pool=mode).eval()
        with torch.no_grad(), NoSync() as mode_:
            m(x)
        assert mode_.fused == 6, "one fused attention per layer"
    with pytest.raises(AssertionError, match="host sync"), NoSync():
        x.sum().item()


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    (dict(num_semantic_tokens=15), "not a square number.*9 or 16"),
    (dict(stgm_start=5), "does not fit in depth=6"),
    (dict(stgm_depth=0), "at least 1"),
    (dict(img_size=120), "not divisible by patch_size 16.*img_size=\\(128, 128\\)"),
    (dict(img_size=16), "1x1 is too small for a 2x2 grid"),
    (dict(center_pool="median"), "center_pool='median' is not one of"),
])
def test_bad_arguments_raise_a_clear_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_bad_forward_input_raises_a_clear_value_error(model):
    with pytest.raises(ValueError, match=r"\(2, 3, 96, 96\) does not fit.*112, 112.*img_size"):
        model(torch.randn(2, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\(2, 1, 112, 112\) does not fit.*in_chans"):
        model(torch.randn(2, 1, 112, 112))


def test_unrelated_checkpoint_raises_naming_the_missing_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing: .*patch_embed.proj.weight.*unexpected: .*conv1"):
        small(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # a DeiT of another width: named as mismatched shapes
    torch.save(timm.create_model("deit_tiny_patch16_224", embed_dim=32, depth=6, num_heads=2).state_dict(), path)
    with pytest.raises(CheckpointError, match="mismatched: .*checkpoint \\(96, 32\\) vs model \\(192, 64\\)"):
        small(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


# ---------------------------------------------------------------------------- pretrained DeiT
def _check_mapped(src: dict, model: STViT, num_prefix: int):
    """Every DeiT tensor arrived unchanged: the same key, or q/kv slices of qkv, or pos_embed sans prefix."""
    sd, C = model.state_dict(), model.embed_dim
    for k, v in src.items():
        if k in ("cls_token", "dist_token") or k.startswith("head_dist."):
            assert k not in sd
        elif k == "pos_embed":
            torch.testing.assert_close(sd[k], v[:, num_prefix:], rtol=0, atol=0)
        elif ".attn.qkv." in k and model.stgm_start <= int(k.split(".")[1]) < model.stgm_end:
            torch.testing.assert_close(sd[k.replace("qkv", "q")], v[:C], rtol=0, atol=0)
            torch.testing.assert_close(sd[k.replace("qkv", "kv")], v[C:], rtol=0, atol=0)
        else:
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(1)
    return timm.create_model("deit_small_patch16_224").eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_deit_small_checkpoint_initialises_every_mapped_layer(deit_small, suffix, tmp_path):
    path = str(tmp_path / f"deit_small{suffix}")
    src = {k: v.clone() for k, v in deit_small.state_dict().items()}
    if suffix == ".pth":
        torch.save({"model": src}, path)     # facebookresearch/deit's wrapper
    else:
        from safetensors.torch import save_file
        save_file(src, path)
    m = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    _check_mapped(src, m, num_prefix=1)
    # the parameters DeiT cannot have keep the model's own init
    assert (m.center_pool.score.proj.weight == 0).all() and 0.01 < m.global_centers.std() < 0.03
    # layers 1-4 reproduce DeiT's blocks 0-3 run on the 196 patch tokens alone (no class token):
    # same patch embedding, pos_embed without its class slot, same Block weights
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = deit_small.patch_embed(img) + deit_small.pos_embed[:, 1:]
        ours = m.forward_intermediates(img, indices=[0, 1, 2, 3], output_fmt="NLC", intermediates_only=True)
        for i in range(4):
            ref = deit_small.blocks[i](ref)
            torch.testing.assert_close(ours[i], ref, rtol=1e-5, atol=1e-5, msg=f"layer {i + 1}")
        # layer 5's projections are DeiT block 4's: its query = qkv's first third, key/value = the rest
        t = torch.randn(3, 384)
        qkv = deit_small.blocks[4].attn.qkv(t)
        torch.testing.assert_close(m.blocks[4].attn.q(t), qkv[:, :384])
        torch.testing.assert_close(m.blocks[4].attn.kv(t), qkv[:, 384:])


def test_distilled_deit_checkpoint_loads_without_its_tokens(tmp_path):
    torch.manual_seed(2)
    src = timm.create_model("deit_small_distilled_patch16_224", embed_dim=64, depth=6, num_heads=2, img_size=112)
    src = src.state_dict()
    assert {"cls_token", "dist_token", "head_dist.weight"} <= set(src) and src["pos_embed"].shape[1] == 51
    path = tmp_path / "deit_distilled.pth"
    torch.save(src, path)
    m = small(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _check_mapped(src, m, num_prefix=2)


def test_checkpoint_of_another_resolution_has_its_position_embedding_resampled():
    src = timm.create_model("deit_small_patch16_224", embed_dim=64, depth=6, num_heads=2).state_dict()  # 14x14
    m = small(img_size=(112, 160))                                                                         # 7x10
    out = checkpoint_filter_fn(src, m)
    expected = resample_abs_pos_embed(src["pos_embed"][:, 1:], new_size=[7, 10], old_size=[14, 14],
                                      num_prefix_tokens=0)
    torch.testing.assert_close(out["pos_embed"], expected)
    m.load_state_dict(out)


def test_own_checkpoint_round_trips_through_the_filter(model):
    other = small(num_classes=10)
    other.load_state_dict(checkpoint_filter_fn(copy.deepcopy(model.state_dict()), other))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_an_average_pooled_vit_checkpoint_maps_its_fc_norm_onto_the_final_norm():
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    vit = timm.create_model("deit_tiny_patch16_224", global_pool="avg", class_token=False, **kw)
    sd = vit.state_dict()
    assert "fc_norm.weight" in sd and "norm.weight" not in sd  # timm keeps an avg-pooled ViT's norm there
    model = timm.create_model("stvit_deit_tiny_patch16_224", stgm_start=1, num_semantic_tokens=4, **kw)
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    assert torch.equal(model.norm.weight, sd["fc_norm.weight"]) and torch.equal(model.head.weight, sd["head.weight"])
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
