"""The timm model contract, checked the same way for every family (called from each family's tests).

Each check fails when the corresponding feature breaks."""
from __future__ import annotations

import copy

import timm
import torch
import torch.nn as nn
from timm.models import group_parameters

# forward_features layouts that are channels-last maps: timm's Swin's (B, H, W, C), Video Swin's (B, T, H, W, C)
CHANNELS_LAST = ("NHWC", "NTHWC")


def check_classifier_contract(model: nn.Module, x: torch.Tensor, num_classes: int, **fwd):
    """forward / forward_features / forward_head / reset_classifier / get_classifier."""
    model.eval()
    with torch.no_grad():
        out = model(x, **fwd)
        assert out.shape == (x.shape[0], num_classes)
        assert torch.isfinite(out).all()
        feats = model.forward_features(x, **fwd)
        if getattr(model, "output_fmt", None) in CHANNELS_LAST:   # Swin-based: a channels-last map, as timm's Swin
            assert feats.dim() == x.dim() and feats.shape[0] == x.shape[0] and feats.shape[-1] == model.num_features, \
                f"forward_features gives (B, {model.output_fmt[1:]}), not {tuple(feats.shape)}"
        else:
            assert feats.dim() == 3 and feats.shape[0] == x.shape[0], "forward_features gives (B, tokens, C)"
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (x.shape[0], model.num_features)
        torch.testing.assert_close(model.forward_head(feats), out)
    assert isinstance(model.get_classifier(), nn.Module)
    m = copy.deepcopy(model)
    m.reset_classifier(7)
    with torch.no_grad():
        assert m(x, **fwd).shape == (x.shape[0], 7)
    m.reset_classifier(0)
    with torch.no_grad():
        assert m(x, **fwd).shape == (x.shape[0], model.num_features)


def check_grad_checkpointing(model: nn.Module, x: torch.Tensor, **fwd):
    """Same outputs and gradients with and without gradient checkpointing (train mode)."""
    a = copy.deepcopy(model).train()
    b = copy.deepcopy(model).train()
    b.set_grad_checkpointing(True)
    ya, yb = a(x, **fwd), b(x, **fwd)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
            continue
        torch.testing.assert_close(pa.grad, pb.grad, msg=lambda m: f"{n}: {m}")


def check_all_parameters_trained(model: nn.Module, x: torch.Tensor, allow_unused=(), **fwd):
    """Every parameter receives a gradient (an unused parameter usually means a wiring bug)."""
    m = copy.deepcopy(model).train()
    m(x, **fwd).sum().backward()
    unused = [n for n, p in m.named_parameters()
              if p.requires_grad and (p.grad is None) and not any(n.startswith(u) for u in allow_unused)]
    assert not unused, f"parameters without gradient: {unused}"


def check_optim_helpers(model: nn.Module):
    """no_weight_decay names real parameters; group_matcher assigns every parameter."""
    names = {n for n, _ in model.named_parameters()}
    nwd = model.no_weight_decay()
    assert nwd and all(any(n == k or n.startswith(k + ".") for n in names) for k in nwd), nwd
    groups = group_parameters(model, model.group_matcher(coarse=False))
    grouped = [n for g in groups.values() for n in g]
    assert sorted(grouped) == sorted(names), "group_matcher leaves parameters out or repeats them"
    assert len(groups) > 2


def check_features_only(name: str, x: torch.Tensor, expected_reductions=None, **kwargs):
    """timm.create_model(features_only=True) gives NCHW maps that agree with feature_info."""
    fm = timm.create_model(name, features_only=True, **kwargs).eval()
    with torch.no_grad():
        feats = fm(x)
    assert isinstance(feats, (list, tuple)) and len(feats) == len(fm.feature_info.channels())
    for f, c, r in zip(feats, fm.feature_info.channels(), fm.feature_info.reduction()):
        assert f.dim() == 4 and f.shape[1] == c, (f.shape, c)
        assert f.shape[0] == x.shape[0]
    if expected_reductions is not None:
        assert list(fm.feature_info.reduction()) == list(expected_reductions)
    return feats


# ------------------------------------------------------------------------- timm citizenship (issue 11)
def _poison(model: nn.Module) -> None:
    """NaN in every floating tensor: a value nobody re-initialises cannot pass by chance."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))


def check_factory_device_dtype(name: str, x: torch.Tensor, **kwargs):
    """timm's factory keywords: ``device`` and ``dtype`` create every parameter and buffer there (no
    device context needed); a meta-device model materialises with ``to_empty`` and then either
    ``init_weights()`` (finite everywhere) or a state dict plus ``reinit_non_persistent_buffers``
    (then it computes exactly what a CPU-built model does)."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    meta = timm.create_model(name, device="meta", dtype=torch.bfloat16, **kwargs)
    for n, t in [*meta.named_parameters(), *meta.named_buffers()]:
        assert t.device.type == "meta", f"{n} not created on the meta device"
        assert not t.is_floating_point() or t.dtype == torch.bfloat16, f"{n} is {t.dtype}, not bfloat16"
    m64 = timm.create_model(name, dtype=torch.float64, **kwargs).eval()
    assert {p.dtype for p in m64.parameters()} == {torch.float64}
    with torch.no_grad():
        assert m64(x.double()).dtype == torch.float64

    ref = timm.create_model(name, **kwargs).eval()
    fresh = timm.create_model(name, device="meta", **kwargs).to_empty(device="cpu").eval()
    _poison(fresh)
    fresh.init_weights()
    for n, t in [*fresh.named_parameters(), *fresh.named_buffers()]:
        assert not t.is_floating_point() or not t.isnan().any(), f"{n} not re-initialised by init_weights()"
    loaded = timm.create_model(name, device="meta", **kwargs).to_empty(device="cpu").eval()
    _poison(loaded)
    loaded.load_state_dict(ref.state_dict())
    reinit_non_persistent_buffers(loaded)
    with torch.no_grad():
        assert torch.isfinite(fresh(x)).all()
        torch.testing.assert_close(loaded(x), ref(x))


def check_reset_classifier_follows_model(model: nn.Module, x: torch.Tensor, **fwd):
    """``reset_classifier`` builds the new head on the model's device and dtype, in its mode (also
    after ``reset_classifier(0)``, when the head has no parameters left to tell them)."""
    m = copy.deepcopy(model).to(torch.float64).eval()
    m.reset_classifier(0)
    m.reset_classifier(3)
    assert all(p.dtype == torch.float64 for p in m.get_classifier().parameters())
    assert not any(mod.training for mod in m.modules()), "reset_classifier left a module in train mode"
    with torch.no_grad():
        assert m(x.double(), **fwd).shape == (x.shape[0], 3)
    m.train()
    m.reset_classifier(4)
    assert all(mod.training for mod in m.modules()), "reset_classifier left a module in eval mode"
    m.to(device="meta")
    m.reset_classifier(5)
    assert {p.device.type for p in m.get_classifier().parameters()} == {"meta"}


def check_pretrained_loading(name: str, source: dict, x: torch.Tensor, first_conv: str, *,
                             img_size=None, global_pools=(), new_keys=(), **kwargs):
    """``pretrained=True`` from a state dict with timm's usual keywords: ``num_classes`` 0 or another
    count, ``in_chans`` 1 and 4 (timm's ``adapt_input_conv`` on the first conv), another
    ``img_size``, ``global_pool``. Every tensor from the source (all but ``new_keys``, fnmatch
    patterns of what the source cannot have) arrives as in the default load."""
    import fnmatch

    def load(**kw):
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(source)),
                                 **{**kwargs, **kw}).eval()

    ref = load()
    ref_sd = ref.state_dict()

    def same_weights(m, skip=()):
        for k, v in m.state_dict().items():
            if k.startswith("head.") or k in skip or k not in ref_sd or any(fnmatch.fnmatch(k, p) for p in new_keys):
                continue
            assert torch.equal(v, ref_sd[k]), f"{k} differs from the default load"

    for n in (0, 5):
        m = load(num_classes=n)
        same_weights(m)
        with torch.no_grad():
            out = m(x)
        assert m.num_classes == n and out.shape[-1] == (n or m.num_features)
    w3 = ref_sd[first_conv]
    for c in (1, 4):
        m = load(in_chans=c)
        w = m.state_dict()[first_conv]
        assert w.shape[1] == c and w.shape[2:] == w3.shape[2:], (first_conv, tuple(w.shape))
        # timm's adaptation: summed for one channel, repeated and scaled by 3/c for more
        torch.testing.assert_close(w, w3.sum(1, keepdim=True) if c == 1 else w3.repeat(1, 2, *[1] * (w3.dim() - 2))
                                   [:, :c] * (3 / c))
        same_weights(m, skip={first_conv})
        with torch.no_grad():
            m(torch.cat([x] * 2, dim=1)[:, :c])
    if img_size is not None:
        m = load(img_size=img_size)
        own = m.state_dict()   # sized for the image (pos_embed, Swin tables of other windows): resized, not equal
        same_weights(m, skip={"pos_embed"} | {k for k, v in own.items() if k in ref_sd and v.shape != ref_sd[k].shape})
        with torch.no_grad():
            m(torch.randn(*x.shape[:-2], *((img_size,) * 2 if isinstance(img_size, int) else img_size)))
    for pool in global_pools:
        m = load(global_pool=pool, num_classes=0)
        same_weights(m)
        with torch.no_grad():
            feats = m.forward_features(x)
            out = m(x)
        if pool == "":   # no pooling: the head sees the unpooled features
            assert out.shape == feats.shape, (out.shape, feats.shape)
        else:
            assert out.shape == (x.shape[0], m.num_features)


def check_head_round_trip(name: str, x: torch.Tensor, tmp_path, num_classes: int = 7, **kwargs):
    """A K-class checkpoint loaded for K classes keeps its classifier on every loading path (timm's
    pretrained path with ``file=`` (.safetensors, .pth) or ``state_dict=``, timm's
    ``checkpoint_path``, condensevit's ``load_model_for_inference``): the logits round-trip."""
    from safetensors.torch import save_file

    from condensevit.train.checkpoint import load_model_for_inference

    src = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():
        for p in src.get_classifier().parameters():
            p.add_(torch.randn_like(p))   # a head unlike any fresh one, bias included
        expected = src(x)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    st, pth = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.pth"
    save_file(sd, str(st))
    torch.save({"model": sd, "epoch": 3}, pth)
    loaded = {
        "file=.safetensors": dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(st))),
        "file=.pth": dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(pth))),
        "state_dict=": dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(sd))),
        "checkpoint_path=": dict(checkpoint_path=str(st)),
    }
    models = {how: timm.create_model(name, num_classes=num_classes, **kw, **kwargs) for how, kw in loaded.items()}
    models["load_model_for_inference"] = load_model_for_inference(name, str(st), **kwargs)
    for how, m in models.items():
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(x), expected, msg=lambda msg: f"{how}: {msg}")


def check_low_precision(model: nn.Module, x: torch.Tensor, **fwd):
    """The model cast to bfloat16 and to float16 runs on the CPU, in that dtype, close to float32."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = model(x, **fwd)
        scale = ref.abs().max().item() + 1e-3
        for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
            out = copy.deepcopy(model).to(dtype)(x.to(dtype), **fwd)
            assert out.dtype == dtype and torch.isfinite(out).all(), dtype
            err = (out.float() - ref).abs().max().item()
            assert err <= tol * scale, f"{dtype}: max abs error {err:.3g} against float32 (scale {scale:.3g})"


def check_prune_intermediate_layers(model: nn.Module, x: torch.Tensor):
    """Pruned to any one feature index (``prune_norm=True``, as features_only does), the model gives
    that index's map from ``forward_intermediates``, ``forward_features`` runs (and equals the map
    when it is one), and every remaining parameter gets a gradient."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    for i in range(len(taps)):
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers([i], prune_norm=True)
        with torch.no_grad():
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0],
                                       taps[i])
            feats = pruned.forward_features(x)
        if getattr(pruned, "output_fmt", None) in CHANNELS_LAST and feats.dim() == taps[i].dim():
            torch.testing.assert_close(feats.movedim(-1, 1), taps[i])
        pruned.train()
        out = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        (out[0].sum() + pruned.forward_features(x).sum()).backward()
        unused = [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"pruned to {i}: parameters without gradient: {unused}"
