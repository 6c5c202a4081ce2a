"""Helpers that keep forward code one program for eager PyTorch and for the graph builders
(``torch.fx.symbolic_trace``, TorchDynamo behind ``torch.compile`` / ``torch.export`` / the ONNX
exporter, and TorchScript).

The rule they serve: code in ``forward`` never branches in Python on a size it does not know to be a
constant. In eager mode sizes are ints and a branch that skips a no-op (padding by zero rows, resizing
to the same size) saves a copy; while a graph is built with *symbolic* sizes (a dynamic batch, height
or width) the same branch would either fail (fx) or pin the graph to the traced size (dynamo adds a
guard). :func:`known_zero` and :func:`known_equal` answer "is this certainly so?" — exactly in eager
mode and under static shapes, ``False`` for a symbolic size — so the no-op is skipped where that is
safe and kept in the graph otherwise, where it costs nothing that changes the result.

Size-keyed caches (masks and index tensors built once per map size) are eager-only:
:func:`building_graph` tells a module to build those tensors inside the graph instead, from the
(possibly symbolic) sizes, with tensor arithmetic only.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true
__all__ = ["known_zero", "known_equal", "building_graph", "is_fx_proxy", "shape_str", "check_image_layout",
           "check_float_pixels", "check_clip_layout"]


def is_fx_proxy(value) -> bool:
    """Whether ``value`` is a ``torch.fx.Proxy``, i.e. an argument being traced by ``torch.fx``."""
    return isinstance(value, torch.fx.Proxy)


def known_zero(n: int) -> bool:
    """``n == 0`` when that is known without tracing a condition: exact for ints (eager, static
    shapes, TorchScript), ``False`` for a symbolic size (torch.fx proxies, dynamo's SymInts) unless
    its value is provably zero."""
    if torch.jit.is_scripting():
        return n == 0
    if isinstance(n, torch.fx.Proxy):
        return False
    return statically_known_true(n == 0)


def known_equal(a: int, b: int) -> bool:
    """``a == b`` when known without tracing a condition (see :func:`known_zero`)."""
    if torch.jit.is_scripting():
        return a == b
    if isinstance(a, torch.fx.Proxy) or isinstance(b, torch.fx.Proxy):
        return False
    return statically_known_true(a == b)


def building_graph(value) -> bool:
    """True while ``value`` (a tensor or a size taken from one) flows through a graph builder rather
    than eager PyTorch: torch.fx (it is a proxy) or TorchDynamo (``torch.compile``, ``torch.export``,
    the dynamo ONNX exporter). Size-keyed caches are then bypassed and their tensors built in the graph.

    TorchScript compiles only code it reaches: callers test ``torch.jit.is_scripting()`` first, in its
    own ``if`` that returns (TorchScript drops what follows), and keep the cache in a method marked
    ``@torch.jit.unused``."""
    return isinstance(value, torch.fx.Proxy) or torch.compiler.is_compiling()


def shape_str(x: Tensor) -> str:
    """``str(tuple(x.shape))`` in a form TorchScript compiles too (for error messages)."""
    dims = [str(d) for d in x.shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def check_image_layout(x: Tensor, in_chans: int) -> None:
    """The input mistakes every image family names alike, before its own shape checks: channels-last
    images (B, H, W, C), as numpy and PIL give them, and integer pixels (uint8) not yet converted
    and normalised. Called from each family's input check (a module-level function marked
    ``@register_notrace_function`` and ``@torch.fx.wrap``); it reads only static facts (rank,
    sizes, dtype), so TorchScript compiles it and torch.export keeps no data-dependent branch."""
    if x.dim() == 4 and x.shape[1] != in_chans and x.shape[3] == in_chans:
        raise ValueError(f"input of shape {shape_str(x)} looks channels-last (B, H, W, C); images are (B, C, H, W): "
                         f"pass x.permute(0, 3, 1, 2)")
    check_float_pixels(x)


def check_clip_layout(x: Tensor, in_chans: int) -> None:
    """:func:`check_image_layout` for (B, C, T, H, W) clips: channels-last clips (B, T, H, W, C) and
    integer pixels."""
    if x.dim() == 5 and x.shape[1] != in_chans and x.shape[4] == in_chans:
        raise ValueError(f"input of shape {shape_str(x)} looks channels-last (B, T, H, W, C); clips are "
                         f"(B, C, T, H, W): pass x.permute(0, 4, 1, 2, 3)")
    check_float_pixels(x)


def check_float_pixels(x: Tensor) -> None:
    """ValueError for integer (uint8) or bool input: the models take normalised floating-point
    pixels. The dtype is static, so traced graphs keep no branch on it."""
    if not x.is_floating_point():
        raise ValueError(f"input of dtype {x.dtype} holds integer pixels; the model takes floating-point pixels, "
                         "normalised: x.float() / 255, then the model's mean and std "
                         "(timm.data.resolve_data_config(model=model)), as timm's transforms do")
