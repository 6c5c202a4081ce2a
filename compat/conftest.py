"""Model selection for timm's own ``tests/test_models.py`` run against condensevit (``make compat``).

This file changes *which models* timm's registry-parametrised tests receive, and nothing else: no
fixture, assertion or tolerance of timm's file is touched. ``compat/run_timm_tests.py`` copies it
next to the ``test_models.py`` of the installed timm version.

Selection rules (each mirrors how timm sorts its own models):

* one variant per family (``FAMILIES``): the small ``test_*`` ones (``COMPAT_VARIANTS=tiny``: the
  ``*_tiny_*`` ones);
* timm's ``NON_STD_FILTERS`` (ViT, DeiT, ...: token-sequence outputs) select our ViT-based families
  and the Video Swin ones (a 5-D (B, T, H, W, C) map, which timm's "standard" tests, written for 4-D
  image maps, cannot read; they declare the channel axis as ``feature_dim``, as timm's non-standard
  tests ask); excluding them (the "standard" tests, whose ``forward_features`` is a spatial map)
  leaves our image Swin-based ones, as timm's Swin is standard;
* ``module=...`` (models with ``forward_intermediates``): every family (all have it);
* ``pretrained=True`` / ``list_pretrained``: the ``*_tiny_*`` variants with weights;
* any other ``filter`` names timm families (``efficientnet_[hx]_*`` ...): none of ours;
* tests that use fixed timm model names (not the registry) are deselected.

Tests that cannot apply are listed in ``NOT_APPLICABLE`` with the reason; they are skipped with that
reason, and the run script prints them in its table.
"""
from __future__ import annotations

import pytest
import timm

import condensevit  # noqa: F401  (registers the models)

import os

# one variant per family -> what its forward_features gives ('tokens' (B, N, C), 'spatial' (B, H, W, C),
# 'video' (B, T, H, W, C)). The test_* variants (small, untrained,
# timm's convention for fast generic tests) by default; COMPAT_VARIANTS=tiny selects the ViT-Ti /
# Swin-T sized *_tiny_* variants instead (minutes more on two cores: 16-frame video at 224).
_VARIANTS = {
    "test": {
        "test_stvit": "tokens",
        "test_lookupvit": "tokens",
        "test_vit_video": "tokens",
        "test_stvit_video": "tokens",
        "test_lookupvit_video": "tokens",
        "test_stvit_r": "spatial",
        "test_stvit_r_det": "spatial",
        "test_stvit_swin": "spatial",
        "test_video_swin": "video",
        "test_stvit_video_swin": "video",
    },
    "tiny": {
        "stvit_deit_tiny_patch16_224": "tokens",
        "lookupvit_tiny_patch16_224": "tokens",
        "vit_video_tiny_patch2x16_224": "tokens",
        "stvit_video_tiny_patch2x16_224": "tokens",
        "lookupvit_video_tiny_patch2x16_224": "tokens",
        "stvit_r_swin_tiny_patch4_window7_224": "spatial",
        "stvit_r_det_swin_tiny_patch4_window7": "spatial",
        "stvit_swin_tiny_patch4_window7_224": "spatial",
        "video_swin_tiny_patch2x4x4_window8x7x7": "video",
        "stvit_video_swin_tiny_patch2x4x4_window8x7x7": "video",
    },
}
_variant = os.environ.get("COMPAT_VARIANTS", "test")
if _variant not in _VARIANTS:
    raise ValueError(f"COMPAT_VARIANTS={_variant!r} must be one of {sorted(_VARIANTS)}")
FAMILIES = _VARIANTS[_variant]
NON_STD = {"tokens", "video"}   # the kinds timm's non-standard tests take

_HUB = ("downloads weights from the Hugging Face hub, which CI cannot reach; the same loading (pretrained=True "
        "with in_chans=1, num_classes=5 / 0, features_only) runs offline from a local state dict in "
        "tests/contract.py check_pretrained_loading")
NOT_APPLICABLE = {
    "test_model_inference": "compares against reference tensors that timm hosts on the Hugging Face hub for its "
                            "own test_* models; none exist for ours (our figures are asserted in tests/)",
    "test_model_load_pretrained": _HUB,
    "test_model_features_pretrained": _HUB,
}

_real_list_models = timm.list_models


def _as_list(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [v for v in value if v]


def _is_non_std_filter(filters: list[str]) -> bool:
    return "vit_*" in filters and "deit*" in filters   # timm's NON_STD_FILTERS


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    """timm.list_models over our tiny variants, sorted by the rules in the module docstring."""
    filters, excludes = _as_list(filter), _as_list(exclude_filters)
    if filters:
        if not _is_non_std_filter(filters):
            return []
        kinds = NON_STD
    elif _is_non_std_filter(excludes):
        kinds = {"spatial"}
    else:
        kinds = NON_STD | {"spatial"}
    # tests of pretrained weights take the variants that have weights (the test_* ones have none)
    names = [n for n, kind in (_VARIANTS["tiny"] if pretrained else FAMILIES).items() if kind in kinds]
    # timm's own filtering (tags, pretrained, name_matches_cfg, its size/memory exclusions) on top
    return _real_list_models(names, pretrained=pretrained, exclude_filters=excludes,
                             name_matches_cfg=name_matches_cfg, include_tags=include_tags)


def list_pretrained(filter="", exclude_filters=""):
    """timm.list_pretrained over our tiny variants (tests using it are in NOT_APPLICABLE)."""
    return _real_list_models(list(_VARIANTS["tiny"]), pretrained=True, include_tags=True)


# test_models.py does `from timm import list_models, list_pretrained` when pytest imports it,
# after this conftest
timm.list_models = list_models
timm.list_pretrained = list_pretrained


def pytest_configure(config):
    for marker in ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward",
                   "fxbackward", "timeout"):
        config.addinivalue_line("markers", f"{marker}: timm's marker")


def _model_name(item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = params.get("model_name")
    return name if isinstance(name, str) else None


def pytest_collection_modifyitems(config, items):
    ours = set(FAMILIES) | set(_VARIANTS["tiny"])
    keep, drop = [], []
    for item in items:
        name = _model_name(item)
        if name is None or name.split(".")[0] not in ours:
            drop.append(item)   # timm's tests of its own named models
            continue
        reason = NOT_APPLICABLE.get(item.originalname)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"not applicable: {reason}"))
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
