"""The timm model contract, checked the same way for every family (called from each family's tests).

Each check fails when the corresponding feature breaks."""
from __future__ import annotations

import copy

import timm
import torch
import torch.nn as nn
from timm.models import group_parameters


def check_classifier_contract(model: nn.Module, x: torch.Tensor, num_classes: int, **fwd):
    """forward / forward_features / forward_head / reset_classifier / get_classifier."""
    model.eval()
    with torch.no_grad():
        out = model(x, **fwd)
        assert out.shape == (x.shape[0], num_classes)
        assert torch.isfinite(out).all()
        feats = model.forward_features(x, **fwd)
        if getattr(model, "output_fmt", None) == "NHWC":   # Swin-based: a channels-last map, as timm's Swin
            assert feats.dim() == 4 and feats.shape[0] == x.shape[0], "forward_features gives (B, H, W, C)"
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
