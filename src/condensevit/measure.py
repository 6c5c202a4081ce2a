"""Measurements users and tests can trust: GMACs, parameters, throughput, latency, peak memory.

GMACs are multiply-accumulates per image at batch 1, as timm and fvcore report them. They are
counted with PyTorch's ``FlopCounterMode`` (which counts 2 FLOPs per multiply-add, so we halve it),
with fused attention counted through its math form: ``scaled_dot_product_attention`` is replaced,
while counting, by two matmuls and a softmax, so the count is the same on every device and
PyTorch version, and cross-attention with different query and key lengths is counted exactly.
"""
from __future__ import annotations

import os
import platform
import resource
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "gmacs", "count_params", "throughput", "Throughput", "environment", "as_input_shape",
]


def as_input_shape(input_size) -> tuple[int, ...]:
    """Normalise an input size: (C, H, W) for images, (C, T, H, W) for video; an int means (3, n, n)."""
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    shape = tuple(int(s) for s in input_size)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ValueError(
            f"input_size {input_size!r} must be (C, H, W) for images or (C, T, H, W) for video")
    return shape


def _sdpa_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The function ``scaled_dot_product_attention`` computes, as plain countable ops."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else logits + attn_mask
    return logits.softmax(-1) @ v


class _CountableAttention(TorchFunctionMode):
    """Routes fused attention through its math form so FlopCounterMode sees both matmuls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _sdpa_math(*args, **kwargs)
        return func(*args, **kwargs)


@torch.no_grad()
def gmacs(model: nn.Module, input_size=(3, 224, 224), **forward_kwargs) -> float:
    """Multiply-accumulates (in G) of one forward pass at batch 1.

    ``input_size`` is (C, H, W) or, for video, (C, T, H, W). Extra keyword arguments go to the
    model's forward (for example ``compressed_grid=(7, 7)`` for LookupViT).
    """
    shape = as_input_shape(input_size)
    was_training = model.training
    model.eval()
    try:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x = torch.randn(1, *shape, device=device, dtype=dtype)
        counter = FlopCounterMode(display=False)
        with counter, _CountableAttention():
            model(x, **forward_kwargs)
        return counter.get_total_flops() / 2 / 1e9
    finally:
        model.train(was_training)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (every parameter, or only those that require grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every few ms)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = _rss_bytes() or 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)
        if self.peak == 0:  # no /proc: fall back to the process's lifetime peak
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Throughput:
    images_per_s: float
    latency_ms: float          # batch-1 latency, median of the timed runs
    peak_memory_mb: float      # CUDA peak allocation, or peak process RSS on CPU
    batch_size: int
    device: str
    amp: bool
    channels_last: bool
    compiled: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def throughput(
        model: nn.Module,
        input_size=(3, 224, 224),
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        amp: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        warmup: int = 3,
        iters: int = 10,
        latency_iters: int | None = None,
        min_time: float = 0.0,
) -> Throughput:
    """Inference images per second after warm-up, as timm's benchmark measures it.

    Timing is synchronised on GPU. ``min_time`` (seconds) extends the timed loop on fast
    machines. Latency is the median batch-1 time (skipped, and NaN, when ``latency_iters == 0``).
    Peak memory covers the batched runs.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    shape = as_input_shape(input_size)
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last if len(shape) == 3 else torch.channels_last_3d)
    run_model = torch.compile(model) if compile else model
    amp_ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)) \
        if amp else nullcontext

    def make(bs):
        x = torch.randn(bs, *shape, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if len(shape) == 3 else torch.channels_last_3d)
        return x

    x = make(batch_size)

    def step():
        with amp_ctx():
            run_model(x)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _PeakRSS() as rss:
        times = _timed(step, device, iters)
        while min_time and sum(times) < min_time:
            times += _timed(step, device, iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak

    latency = float("nan")
    if latency_iters != 0:
        x1 = make(1)

        def step1():
            with amp_ctx():
                run_model(x1)

        for _ in range(max(warmup, 1)):
            step1()
        lat = sorted(_timed(step1, device, latency_iters or max(iters, 10)))
        latency = 1000 * lat[len(lat) // 2]
    return Throughput(
        images_per_s=batch_size * len(times) / sum(times),
        latency_ms=latency,
        peak_memory_mb=peak / 2**20,
        batch_size=batch_size,
        device=str(device),
        amp=amp,
        channels_last=channels_last,
        compiled=compile,
    )


def environment(device: str | torch.device = "cpu") -> dict:
    """The machine a measurement was taken on."""
    device = torch.device(device)
    env = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import timm
        env["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
