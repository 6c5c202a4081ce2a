"""LookupViT (issue 5): the shared-logit bidirectional attention, the block, grids, the timm contract,
ViT weights, cost and token maps. Small widths everywhere except parameter counts, GMACs and the
ViT-B loading test."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import condensevit.models  # noqa: F401  (registers the models)
from condensevit.layers import BidirectionalCrossAttention
from condensevit.measure import count_params, gmacs
from condensevit.models import CheckpointError
from condensevit.models import lookupvit as lv
from condensevit.models.lookupvit import LookupViT, checkpoint_filter_fn

from contract import (check_all_parameters_trained, check_classifier_contract, check_features_only,
                      check_grad_checkpointing, check_optim_helpers)

SMALL = dict(embed_dim=64, depth=4, num_heads=2, num_classes=10)


def small(**kw) -> LookupViT:
    """4x6 lookup grid (N = 24), 2x3 compressed grid (M = 6) unless told otherwise."""
    args = dict(SMALL, img_size=(64, 96), compressed_grid=(2, 3))
    args.update(kw)
    return LookupViT(**args).eval()


def images(b=2, h=64, w=96):
    return torch.randn(b, 3, h, w)


# ---- the shared-logit bidirectional cross-attention -------------------------------------------
def _reference_mhbc(mod, compressed, lookup, refined):
    """From the definition, one head at a time: S = q kᵀ/sqrt(d) once; gather = softmax of S over
    the lookup tokens; scatter = softmax of Sᵀ over the compressed tokens, with values projected
    from the refined compressed tokens."""
    H, C = mod.num_heads, compressed.shape[-1]
    d = C // H
    q = F.linear(compressed, mod.q.weight, mod.q.bias)
    kv = F.linear(lookup, mod.kv.weight, mod.kv.bias)
    k, v = kv[..., :C], kv[..., C:]
    vs = F.linear(refined, mod.scatter_v.weight, mod.scatter_v.bias)
    gathered, scattered = [], []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        S = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)          # (B, M, N)
        gathered.append(torch.softmax(S, dim=2) @ v[..., sl])               # over N
        scattered.append(torch.softmax(S.transpose(1, 2), dim=2) @ vs[..., sl])  # over M
    g = F.linear(torch.cat(gathered, -1), mod.gather_proj.weight, mod.gather_proj.bias)
    s = F.linear(torch.cat(scattered, -1), mod.scatter_proj.weight, mod.scatter_proj.bias)
    return g, s


def test_shared_logit_attention_matches_reference_forward_and_backward():
    torch.manual_seed(1)
    mod = BidirectionalCrossAttention(24, num_heads=3).double()
    for p in mod.parameters():  # non-trivial biases too
        torch.nn.init.normal_(p, std=0.3)
    B, M, N = 2, 5, 11
    compressed = torch.randn(B, M, 24, dtype=torch.double, requires_grad=True)
    lookup = torch.randn(B, N, 24, dtype=torch.double, requires_grad=True)
    refined = torch.randn(B, M, 24, dtype=torch.double, requires_grad=True)
    wg, ws = torch.randn(B, M, 24, dtype=torch.double), torch.randn(B, N, 24, dtype=torch.double)

    gathered, logits = mod.gather(compressed, lookup)
    scattered = mod.scatter(logits, refined)
    assert logits.shape == (B, 3, M, N)
    ref_g, ref_s = _reference_mhbc(mod, compressed, lookup, refined)
    torch.testing.assert_close(gathered, ref_g)
    torch.testing.assert_close(scattered, ref_s)

    inputs = [compressed, lookup, refined, *mod.parameters()]
    grads = torch.autograd.grad((gathered * wg).sum() + (scattered * ws).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_g * wg).sum() + (ref_s * ws).sum(), inputs)
    names = ["compressed", "lookup", "refined"] + [n for n, _ in mod.named_parameters()]
    assert len(names) == 3 + 10
    for n, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, msg=lambda m: f"gradient of {n}: {m}")

    # the scatter normalises the logits over M: transposing the gather probabilities is different
    _, _, p_gather = mod.gather(compressed, lookup, return_attn=True)
    _, p_scatter = mod.scatter(logits, refined, return_attn=True)
    assert p_scatter.shape == (B, 3, N, M)
    torch.testing.assert_close(p_scatter.sum(-1), torch.ones(B, 3, N, dtype=torch.double))
    assert not torch.allclose(p_scatter, p_gather.transpose(-2, -1))


def test_block_runs_gather_compressed_block_scatter_lookup_mlp_in_order():
    torch.manual_seed(2)
    blk = lv.LookupViTBlock(32, 2, lookup_mlp_ratio=0.5).double()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    c, l = torch.randn(2, 4, 32, dtype=torch.double), torch.randn(2, 9, 32, dtype=torch.double)
    out_c, out_l = blk(c, l)

    m = blk.mhbc
    g, s = _reference_mhbc(m, blk.gather_norm_q(c), blk.gather_norm_kv(l), torch.zeros_like(c))
    c1 = blk.compressed(c + g)                         # gather, then the ViT block on M tokens
    torch.testing.assert_close(out_c, c1)
    # scatter with the logits of the *gather* (pre-refinement tokens), values from the refined ones
    _, s = _reference_mhbc(m, blk.gather_norm_q(c), blk.gather_norm_kv(l), blk.scatter_norm(c1))
    l1 = l + s
    l2 = l1 + blk.lookup_mlp(blk.lookup_norm(l1))
    torch.testing.assert_close(out_l, l2)
    assert blk.lookup_mlp.fc1.out_features == 16       # lookup_mlp_ratio * dim
    assert blk.compressed.mlp.fc1.out_features == 128  # ratio 4 on the compressed tokens
    assert blk.compressed.attn.fused_attn              # SDPA on the compressed self-attention

    c_skip, l_skip = blk(c, l, update_lookup=False)
    torch.testing.assert_close(c_skip, out_c)
    assert l_skip is l


# ---- grids ----------------------------------------------------------------------------------------
def test_switching_grids_changes_token_count_and_gmacs_not_parameters():
    model = small()
    x = images(1)
    n_params = count_params(model)
    counts, macs = {}, {}
    for grid in [(1, 1), (2, 3), (3, 3), (4, 6)]:
        with torch.no_grad():
            counts[grid] = model.forward_features(x, compressed_grid=grid).shape[1]
        macs[grid] = gmacs(model, (3, 64, 96), compressed_grid=grid)
        assert count_params(model) == n_params
    assert counts == {(1, 1): 1, (2, 3): 6, (3, 3): 9, (4, 6): 24}
    assert macs[(1, 1)] < macs[(2, 3)] < macs[(3, 3)] < macs[(4, 6)]
    # the default grid is the constructor's; an int means a square grid
    with torch.no_grad():
        assert model.forward_features(x).shape[1] == 6
        assert model.forward_features(x, compressed_grid=3).shape[1] == 9
        assert model(x, compressed_grid=(1, 1)).shape == (1, 10)


def test_full_grid_compressed_tokens_equal_lookup_tokens_and_resize_is_bilinear():
    model = small()
    x = images(1)
    c, l, grid = model._embed(x, (4, 6))
    assert grid == (4, 6)
    torch.testing.assert_close(c, l)  # resizing to the same grid is the identity
    c, l, _ = model._embed(x, (2, 3))
    lmap = l.reshape(1, 4, 6, -1).permute(0, 3, 1, 2)
    # antialiased bilinear resize of the lookup grid (after the position embedding)
    ref = F.interpolate(lmap, size=(2, 3), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(c, ref.flatten(2).transpose(1, 2))
    model_sparse = small(resize_antialias=False)
    model_sparse.load_state_dict(model.state_dict())
    c2, _, _ = model_sparse._embed(x, (2, 3))
    assert not torch.allclose(c, c2)


@pytest.mark.parametrize("grid", [0, (0, 3), (2, 0), (5, 1), (1, 7), (2.0, 3), (2.5, 3), "5x5", (True, 2), (2, 3, 4)])
def test_bad_grid_is_a_value_error(grid):
    model = small()
    with pytest.raises(ValueError, match="compressed_grid"):
        model(images(1), compressed_grid=grid)
    with pytest.raises(ValueError, match="compressed_grid"):
        small(compressed_grid=grid)


def test_bad_constructor_arguments_are_value_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        LookupViT(**SMALL, img_size=(64, 90), compressed_grid=(2, 2))
    with pytest.raises(ValueError, match="train_grids"):
        small(train_grids=[(2, 2), (5, 5)])
    with pytest.raises(ValueError, match="train_grids"):
        small(train_grids=[(0, 2)])
    with pytest.raises(ValueError, match="pool"):
        small(pool="cls")
    with pytest.raises(ValueError, match="global_pool"):
        small().reset_classifier(3, global_pool="max")


def test_wrong_input_is_a_value_error():
    model = small()
    with pytest.raises(ValueError, match="differs from the size the model was built for"):
        model(images(1, 64, 64))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 1, 64, 96))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(3, 64, 96))
    dyn = small(dynamic_img_size=True)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        dyn(images(1, 64, 100))
    with pytest.raises(ValueError, match="larger than the lookup-token grid"):
        dyn(images(1, 16, 96))  # a 1x6 lookup grid cannot hold the default 2x3 grid
    # the limit follows the image actually given
    with torch.no_grad():
        assert dyn.forward_features(images(1, 32, 96), compressed_grid=(2, 6)).shape[1] == 12


def test_train_grids_are_sampled_per_step_and_seeded():
    grids = [(1, 1), (2, 2), (2, 3), (4, 6)]
    model = small(train_grids=grids, train_grid_seed=3).train()
    x = images(1)
    seen = []
    with torch.no_grad():
        for _ in range(24):
            seen.append(model.forward_features(x).shape[1])
        assert set(seen) == {1, 4, 6, 24}
        # same seed, same sequence (DDP ranks agree); another seed, another sequence
        twin = small(train_grids=grids, train_grid_seed=3).train()
        assert [twin.forward_features(x).shape[1] for _ in range(24)] == seen
        other = small(train_grids=grids, train_grid_seed=4).train()
        assert [other.forward_features(x).shape[1] for _ in range(24)] != seen
        # an explicit grid wins; eval mode uses the default grid
        assert model.forward_features(x, compressed_grid=(3, 3)).shape[1] == 9
        model.eval()
        assert {model.forward_features(x).shape[1] for _ in range(5)} == {6}


# ---- position embedding, image sizes ---------------------------------------------------------
def test_position_embedding_is_resampled_only_for_another_image_size(monkeypatch):
    calls = []
    real = lv.F.interpolate   # the position embedding is the only bicubic resize

    def counting(*a, **k):
        calls.extend([1] if k.get("mode") == "bicubic" else [])
        return real(*a, **k)
    monkeypatch.setattr(lv.F, "interpolate", counting)
    model = small(dynamic_img_size=True)
    assert model.pos_embed.shape == (1, 4, 6, 64)  # non-square grid of the built size
    with torch.no_grad():
        assert model(images(2)).shape == (2, 10)
        assert calls == []
        assert model(images(2, 96, 128), compressed_grid=(3, 3)).shape == (2, 10)
        assert len(calls) == 1
        feats = model.forward_intermediates(images(1, 96, 128), indices=1, intermediates_only=True)
        assert feats[0].shape == (1, 64, 6, 8)


# ---- the timm contract ----------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["compressed", "both"])
def test_timm_contract(pool):
    model = small(pool=pool)
    x = images(2)
    check_classifier_contract(model, x, 10)
    check_classifier_contract(model, x, 10, compressed_grid=(3, 3))
    check_grad_checkpointing(model, x)
    check_optim_helpers(model)
    # with 'compressed' the last block's lookup update, which could not reach the head, is not built
    check_all_parameters_trained(model, x)
    assert model.blocks[-1].lookup_update == (pool == "both") and model.blocks[-2].lookup_update
    with torch.no_grad():
        feats = model.forward_features(x)
    assert feats.shape == (2, 6 if pool == "compressed" else 6 + 24, 64)


def test_pool_both_averages_every_token_of_both_streams():
    model = small(pool="both")
    x = images(1)
    with torch.no_grad():
        feats = model.forward_features(x)
        _, inter = model.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC")
        torch.testing.assert_close(feats[:, 6:], inter[0])  # the lookup tokens, normalised
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(1))
        model.reset_classifier(10, global_pool="compressed")
        assert model.forward_features(x).shape[1] == 6


def test_grad_checkpointing_with_train_grids_and_drop_path():
    check_grad_checkpointing(small(train_grids=[(1, 1), (2, 3)]), images(2))
    # stochastic depth: the recomputed blocks draw the same masks
    model = small(drop_path_rate=0.5).train()
    x = images(4)
    torch.manual_seed(5)
    ya = model(x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)
    yb = model(x)
    torch.testing.assert_close(ya, yb)
    ga = torch.autograd.grad(ya.square().sum(), list(model.parameters()), allow_unused=True)
    gb = torch.autograd.grad(yb.square().sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_features_only_gives_lookup_maps():
    x = images(2)
    kw = dict(SMALL, img_size=(64, 96), compressed_grid=(2, 2))
    feats = check_features_only("lookupvit_tiny_patch16_224", x, expected_reductions=[16] * 4, **kw)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 4, 6)] * 4
    feats = check_features_only("lookupvit_tiny_patch16_224", x, out_indices=(1, 2), **kw)
    assert len(feats) == 2


def test_forward_intermediates_are_the_lookup_stream():
    model = small()
    x = images(2)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [tuple(t.shape) for t in inter] == [(2, 64, 4, 6)] * 4
        # block i's map is its lookup tokens, laid out on the patch grid
        c, l, _ = model._embed(x, None)
        for blk in model.blocks[:2]:
            c, l = blk(c, l)
        torch.testing.assert_close(inter[1], l.reshape(2, 4, 6, 64).permute(0, 3, 1, 2))
        only = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(only[0], inter[1])
        nlc = model.forward_intermediates(x, indices=2, norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(nlc[1], model.norm(inter[3].flatten(2).transpose(1, 2)))
        # the lookup maps depend on the compressed grid they exchanged with
        other = model.forward_intermediates(x, indices=1, compressed_grid=(4, 6), intermediates_only=True)
        assert not torch.allclose(other[0], inter[3])


# ---- token maps -----------------------------------------------------------------------------------
def test_token_maps_are_attention_distributions():
    model = small()
    x = images(2)
    with torch.no_grad():
        maps = model.token_maps(x, compressed_grid=(2, 2), layer=0)
        again = model.token_maps(x, compressed_grid=(2, 2), layer=0)
    assert maps["gather"].shape == (2, 4, 4, 6)
    assert maps["scatter"].shape == (2, 4, 4, 6)
    assert maps["scatter_argmax"].shape == (2, 4, 6) and maps["scatter_argmax"].dtype == torch.int64
    assert maps["gather_per_layer"].shape == (2, 4, 4, 4, 6)
    torch.testing.assert_close(maps["gather"].sum((-2, -1)), torch.ones(2, 4))   # over image tokens
    torch.testing.assert_close(maps["scatter"].sum(1), torch.ones(2, 4, 6))      # over compressed tokens
    torch.testing.assert_close(maps["scatter_argmax"], maps["scatter"].argmax(1))
    for k in maps:
        torch.testing.assert_close(maps[k], again[k])  # nothing kept between calls
    torch.testing.assert_close(maps["gather"], maps["gather_per_layer"][:, 0])

    # layer 0's gather map from the definition: softmax over the lookup tokens, mean over heads
    c, l, _ = model._embed(x, (2, 2))
    blk = model.blocks[0]
    with torch.no_grad():
        q = blk.mhbc.q(blk.gather_norm_q(c)).reshape(2, 4, 2, 32).transpose(1, 2)
        k = blk.mhbc.kv(blk.gather_norm_kv(l))[..., :64].reshape(2, 24, 2, 32).transpose(1, 2)
        S = q @ k.transpose(-2, -1) / math.sqrt(32)
        gather = S.softmax(-1).mean(1).reshape(2, 4, 4, 6)
        scatter = S.transpose(-2, -1).softmax(-1).mean(1).transpose(1, 2).reshape(2, 4, 4, 6)
    torch.testing.assert_close(maps["gather"], gather)
    torch.testing.assert_close(maps["scatter"], scatter)
    with pytest.raises(ValueError, match="layer"):
        model.token_maps(x, layer=4)


# ---- weights from a ViT ---------------------------------------------------------------------------
def _mapped_pairs(depth):
    """(ViT key, LookupViT key) of every tensor that must arrive unchanged."""
    pairs = [("patch_embed.proj.weight",) * 2, ("patch_embed.proj.bias",) * 2, ("norm.weight",) * 2,
             ("norm.bias",) * 2, ("head.weight",) * 2, ("head.bias",) * 2]
    for i in range(depth):
        b = f"blocks.{i}."
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for t in ("weight", "bias"):
                pairs.append((f"{b}{part}.{t}", f"{b}compressed.{part}.{t}"))
        for t in ("weight", "bias"):
            pairs.append((f"{b}attn.proj.{t}", f"{b}mhbc.gather_proj.{t}"))
            pairs.append((f"{b}norm1.{t}", f"{b}gather_norm_q.{t}"))
            pairs.append((f"{b}norm1.{t}", f"{b}gather_norm_kv.{t}"))
    return pairs


def _check_arrived(vit_sd, model):
    sd = model.state_dict()
    D = model.embed_dim
    for src, dst in _mapped_pairs(len(model.blocks)):
        assert torch.equal(sd[dst], vit_sd[src]), f"{src} -> {dst}"
    for i in range(len(model.blocks)):
        qkv_w, qkv_b = vit_sd[f"blocks.{i}.attn.qkv.weight"], vit_sd[f"blocks.{i}.attn.qkv.bias"]
        assert torch.equal(sd[f"blocks.{i}.mhbc.q.weight"], qkv_w[:D])
        assert torch.equal(sd[f"blocks.{i}.mhbc.kv.weight"], qkv_w[D:])
        assert torch.equal(sd[f"blocks.{i}.mhbc.q.bias"], qkv_b[:D])
        assert torch.equal(sd[f"blocks.{i}.mhbc.kv.bias"], qkv_b[D:])
    g = model.lookup_grid
    pos = vit_sd["pos_embed"][:, 1:].reshape(1, int(math.isqrt(vit_sd["pos_embed"].shape[1] - 1)), -1, D)
    if tuple(pos.shape[1:3]) == g:
        assert torch.equal(sd["pos_embed"], pos)
    else:
        assert sd["pos_embed"].shape == (1, *g, D)


def test_vit_base_checkpoint_loads_from_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    vit = timm.create_model("vit_base_patch16_224")
    for p in vit.parameters():  # LayerNorms and biases are not at their defaults in real weights
        p.data.add_(torch.randn_like(p) * 0.01)
    vit_sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    del vit
    torch.save({"model": vit_sd}, tmp_path / "vit.pth")
    save_file(vit_sd, str(tmp_path / "vit.safetensors"))
    for name in ("vit.pth", "vit.safetensors"):
        model = timm.create_model("lookupvit_base_patch16_224", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / name)))
        _check_arrived(vit_sd, model)
        assert model.default_cfg["hf_hub_id"] == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
        assert model.default_cfg["mean"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()


def test_small_vit_converts_with_position_embedding_resampled():
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    vit_sd = vit.state_dict()
    model = small(img_size=(64, 96))
    model.load_state_dict(checkpoint_filter_fn(vit_sd, model))
    _check_arrived(vit_sd, model)
    model = small(img_size=64, compressed_grid=(2, 2))
    model.load_state_dict(checkpoint_filter_fn(vit_sd, model))
    _check_arrived(vit_sd, model)
    # the scatter and lookup MLP keep the model's own values
    fresh = model.state_dict()
    out = checkpoint_filter_fn(vit_sd, model)
    assert torch.equal(out["blocks.0.lookup_mlp.fc1.weight"], fresh["blocks.0.lookup_mlp.fc1.weight"])
    # a LookupViT checkpoint loads into a LookupViT as it is
    assert all(torch.equal(v, fresh[k]) for k, v in checkpoint_filter_fn(fresh, model).items())
    # grey images: the RGB patch embedding is summed over its channels (timm's loader adapts it)
    grey = timm.create_model("lookupvit_tiny_patch16_224", pretrained=True, in_chans=1,
                             pretrained_cfg_overlay=dict(state_dict=vit_sd),
                             **dict(SMALL, img_size=64, compressed_grid=(2, 2)))
    torch.testing.assert_close(grey.patch_embed.proj.weight.detach(),
                               vit_sd["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_unrelated_checkpoints_fail_clearly():
    from timm.models.vision_transformer import VisionTransformer
    model = small(img_size=64, compressed_grid=(2, 2))
    wider = VisionTransformer(img_size=64, patch_size=16, embed_dim=96, depth=4, num_heads=2).state_dict()
    with pytest.raises(CheckpointError, match=r"mismatched: pos_embed: checkpoint \(1, 4, 4, 96\) vs model \(1, 4, 4, 64\)"):
        checkpoint_filter_fn(wider, model)
    deeper = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=6, num_heads=2).state_dict()
    with pytest.raises(CheckpointError, match="unexpected.*blocks.4"):
        checkpoint_filter_fn(deeper, model)
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint_filter_fn({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, model)


# ---- parameters and cost at full size ------------------------------------------------------------
def _params_formula(D, depth, r=0.5, N=196, classes=1000, patch_in=3 * 16 * 16, pool="compressed"):
    per_block = (18 + 2 * r) * D * D + (28 + r) * D  # mhbc 6D²+6D, 4 norms 8D, ViT block 12D²+13D, MLP
    # with pool='compressed' the last block has no lookup update: scatter_v, scatter_proj 2D²+2D,
    # scatter_norm and lookup_norm 4D, lookup MLP 2rD²+(r+1)D
    last = (2 + 2 * r) * D * D + (7 + r) * D if pool == "compressed" else 0
    return patch_in * D + D + N * D + depth * per_block - last + 2 * D + D * classes + classes


@pytest.mark.parametrize("name,D", [("tiny", 192), ("small", 384), ("base", 768)])
def test_parameter_counts(name, D):
    with torch.device("meta"):
        model = timm.create_model(f"lookupvit_{name}_patch16_224")
    n = count_params(model)
    assert n == _params_formula(D, 12)
    with torch.device("meta"):
        assert count_params(timm.create_model(f"lookupvit_{name}_patch16_224", pool="both")) \
            == _params_formula(D, 12, pool="both")
    # the compressed stream is a ViT's: its blocks carry exactly a ViT's block parameters
    assert sum(count_params(b.compressed) for b in model.blocks) == 12 * (12 * D * D + 13 * D)


def _cost_formula(N, M, D, r, depth, pool, patch_in=3 * 16 * 16, classes=1000):
    """MACs of LookupViT at batch 1, every projection included (softmax, norms, resize: 0):
    per layer  gather   2ND² (k, v) + MD² (q) + 2NMD (logits, probs @ v) + MD² (out proj)
               block    12MD² + 2M²D                       (qkv 3, proj 1, MLP 8)
               scatter  MD² (values) + NMD (probs @ v) + ND² (out proj)     (logits shared: 0)
               lookup   2rND²                              (MLP)
             = (3 + 2r)·N·D² + 15·M·D² + 3·N·M·D + 2·M²·D   (docs/models.md's formula, exactly)
    plus the patch embedding N·D·(3·16·16) and the classifier D·classes; with pool='compressed'
    the last layer skips scatter + lookup MLP: minus (1 + 2r)·N·D² + M·D² + N·M·D."""
    layer = (3 + 2 * r) * N * D * D + 15 * M * D * D + 3 * N * M * D + 2 * M * M * D
    total = depth * layer + N * D * patch_in + D * classes
    if pool == "compressed":
        total -= (1 + 2 * r) * N * D * D + M * D * D + N * M * D
    return total / 1e9


@pytest.mark.parametrize("pool", ["compressed", "both"])
def test_gmacs_equal_the_cost_formula(pool):
    with torch.device("meta"):
        base = timm.create_model("lookupvit_base_patch16_224", pool=pool)
    got = gmacs(base)
    assert got == pytest.approx(_cost_formula(196, 25, 768, 0.5, 12, pool), rel=1e-9)
    # a small non-square configuration with another MLP ratio
    model = small(pool=pool, lookup_mlp_ratio=0.25, num_classes=10)
    got = gmacs(model, (3, 64, 96), compressed_grid=(3, 2))
    assert got == pytest.approx(_cost_formula(24, 6, 64, 0.25, 4, pool, classes=10), rel=1e-9)


def test_base_at_5x5_costs_at_most_half_a_vit_base():
    with torch.device("meta"):
        base = timm.create_model("lookupvit_base_patch16_224")
    vit_b = 17.58  # timm's published figure for vit_base_patch16_224
    assert gmacs(base) <= 0.5 * vit_b
    macs = [gmacs(base, compressed_grid=(g, g)) for g in (3, 5, 7, 10)]
    assert macs == sorted(macs)
