"""Measurements users and tests can trust: GMACs, parameters, throughput, latency, peak memory.

Throughput is measured for inference (:func:`throughput`) and for training steps
(:func:`train_throughput`: forward, loss, backward and an AdamW step). Peak memory is either CUDA's
peak allocation or, on CPU, resident memory; :class:`OwnPeakMemory` gives the part of a process's
peak that one model adds (used by ``condensevit bench``, which runs each model in its own process).

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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "gmacs", "count_params", "throughput", "train_throughput", "make_inference_step", "make_train_step",
    "time_steps", "median_latency_ms", "Throughput", "OwnPeakMemory", "environment", "as_input_shape",
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


def _statm() -> list[int] | None:
    try:
        with open("/proc/self/statm") as f:
            return [int(v) * os.sysconf("SC_PAGE_SIZE") for v in f.read().split()]
    except (OSError, ValueError):
        return None


def _rss_bytes() -> int | None:
    """Resident memory of this process (anonymous and file-backed pages)."""
    m = _statm()
    return m[1] if m else None


def _anon_bytes() -> int | None:
    """Resident memory of this process that is not file-backed (heap: tensors): RSS minus shared.
    File-backed pages (the mapped libraries) come and go with the machine's memory pressure, so a
    model's memory is read from this."""
    m = _statm()
    return m[1] - m[2] if m else None


class _PeakRSS:
    """Peak of ``read()`` (default: the process's RSS) while the block runs, sampled every few ms."""

    def __init__(self, interval: float = 0.002, read=_rss_bytes):
        self.interval = interval
        self.read = read
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read() or 0)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.read() or 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read() or 0)
        if self.peak == 0 and self.read is _rss_bytes:  # no /proc: the process's lifetime peak
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class OwnPeakMemory:
    """The peak memory one model adds to its own process, in bytes.

    Create it before the model is built (``base``: the process's memory then); call :meth:`start`
    once the model is built; wrap the timed runs in :meth:`track`; read :meth:`peak_bytes`.

    * CUDA: ``torch.cuda.max_memory_allocated`` since :meth:`start` (weights, gradients, optimizer
      state and activations: everything this process allocated, which is this model's when the
      process holds one model). The CUDA context and the caching allocator's slack are not counted.
    * CPU: the peak, during :meth:`track`, of the process's anonymous resident memory (RSS minus
      file-backed pages: tensors, not the mapped libraries, whose pages come and go with the
      machine's memory pressure) minus the same before the model was built: what the model's
      weights and its runs add. Sampled every 2 ms (and at the start and end of each block), so a
      spike shorter than that can be missed; a training or inference step holds its activations
      far longer.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.base = 0 if self.device.type == "cuda" else (_anon_bytes() or 0)
        self._sampled = 0

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "CUDA peak allocated (torch.cuda.max_memory_allocated) in the model's own process"
        return ("peak anonymous resident memory (RSS less file-backed pages, sampled every 2 ms) of the model's "
                "own process above the same before the model was built")

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def track(self):
        if self.device.type == "cuda":
            yield
            return
        with _PeakRSS(read=_anon_bytes) as sampler:
            yield
        self._sampled = max(self._sampled, sampler.peak)

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return max(0, self._sampled - self.base)


@dataclass
class Throughput:
    images_per_s: float
    latency_ms: float          # batch-1 latency, median of the timed runs (NaN when not measured)
    peak_memory_mb: float      # MiB: CUDA peak allocation, or peak RSS of the whole process on CPU
    batch_size: int
    device: str
    amp: bool
    channels_last: bool
    compiled: bool
    mode: str = "inference"    # or "train": forward + loss + backward + optimizer step

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


def _check_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def _amp_dtype(device: torch.device, amp_dtype: str | torch.dtype | None) -> torch.dtype:
    """autocast's dtype: the one asked for, else float16 on CUDA and bfloat16 on CPU."""
    if amp_dtype is None:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if isinstance(amp_dtype, torch.dtype):
        return amp_dtype
    dtypes = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if amp_dtype not in dtypes:
        raise ValueError(f"amp dtype {amp_dtype!r} must be float16 or bfloat16")
    return dtypes[amp_dtype]


def _amp_context(device: torch.device, amp: bool, amp_dtype=None):
    if not amp:
        return nullcontext
    dtype = _amp_dtype(device, amp_dtype)
    return lambda: torch.autocast(device.type, dtype=dtype)


def _memory_format(shape) -> torch.memory_format:
    return torch.channels_last if len(shape) == 3 else torch.channels_last_3d


def _prepare(model, shape, device, channels_last, compile):
    """The model on ``device``, and the callable to time: itself, or ``torch.compile`` of it (``compile``
    True: the default backend, inductor; a string: that backend, e.g. 'eager' to check tracing only)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=_memory_format(shape))
    if not compile:
        return model, model
    return model, (torch.compile(model, backend=compile) if isinstance(compile, str) else torch.compile(model))


def _input(shape, batch_size, device, channels_last) -> torch.Tensor:
    x = torch.randn(batch_size, *shape, device=device)
    return x.contiguous(memory_format=_memory_format(shape)) if channels_last else x


def make_inference_step(model: nn.Module, input_size=(3, 224, 224), batch_size: int = 32,
                        device: str | torch.device = "cpu", amp: bool = False, amp_dtype=None,
                        channels_last: bool = False, compile: bool = False):
    """A function running one inference batch (eval mode, no grad) on a fixed random input."""
    device = _check_device(device)
    shape = as_input_shape(input_size)
    model, run_model = _prepare(model.eval(), shape, device, channels_last, compile)
    amp_ctx = _amp_context(device, amp, amp_dtype)
    x = _input(shape, batch_size, device, channels_last)

    @torch.no_grad()
    def step():
        with amp_ctx():
            run_model(x)
    return step


def make_train_step(model: nn.Module, input_size=(3, 224, 224), batch_size: int = 32,
                    device: str | torch.device = "cpu", amp: bool = False, amp_dtype=None,
                    channels_last: bool = False, compile: bool = False, lr: float = 1e-4,
                    weight_decay: float = 0.05):
    """A function running one training step on a fixed random batch: forward, cross-entropy
    against random labels (mean of squares for a model without classifier), backward, and a step
    of timm's AdamW (``create_optimizer_v2``, the trainer's; no weight decay on norms and biases),
    gradients set to None between steps as the trainer does. float16 autocast on CUDA uses a
    ``GradScaler``. The model is put in train mode (dropout and drop path as configured)."""
    from timm.optim import create_optimizer_v2

    device = _check_device(device)
    shape = as_input_shape(input_size)
    model, run_model = _prepare(model.train(), shape, device, channels_last, compile)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    amp_ctx = _amp_context(device, amp, amp_dtype)
    scaler = torch.amp.GradScaler(device.type) \
        if amp and device.type == "cuda" and _amp_dtype(device, amp_dtype) == torch.float16 else None
    x = _input(shape, batch_size, device, channels_last)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    y = torch.randint(0, max(num_classes, 1), (batch_size,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with amp_ctx():
            out = run_model(x)
        out = out.float()
        loss = F.cross_entropy(out, y) if num_classes and out.ndim == 2 else out.square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    return step


def time_steps(step, batch_size: int, device: str | torch.device = "cpu", warmup: int = 2, iters: int = 5,
               min_time: float = 0.0) -> float:
    """Images per second of ``step`` (one batch of ``batch_size``) after ``warmup`` untimed calls;
    synchronised on GPU; ``min_time`` (seconds) extends the timed loop on fast machines."""
    device = torch.device(device)
    for _ in range(warmup):
        step()
    times = _timed(step, device, iters)
    while min_time and sum(times) < min_time:
        times += _timed(step, device, iters)
    return batch_size * len(times) / sum(times)


def median_latency_ms(step, device: str | torch.device = "cpu", warmup: int = 1, iters: int = 10) -> float:
    """Median wall time of ``step`` in milliseconds after ``warmup`` untimed calls."""
    device = torch.device(device)
    for _ in range(warmup):
        step()
    lat = sorted(_timed(step, device, iters))
    return 1000 * lat[len(lat) // 2]


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
        amp_dtype=None,
) -> Throughput:
    """Inference images per second after warm-up, as timm's benchmark measures it.

    Timing is synchronised on GPU. ``min_time`` (seconds) extends the timed loop on fast
    machines. Latency is the median batch-1 time (skipped, and NaN, when ``latency_iters == 0``).
    Peak memory covers the batched runs and is the whole process's (MiB): CUDA peak allocation, or
    peak RSS on CPU; for one model's own peak see :class:`OwnPeakMemory`.
    """
    device = _check_device(device)
    step = make_inference_step(model, input_size, batch_size, device, amp, amp_dtype, channels_last, compile)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _PeakRSS() as rss:
        ips = time_steps(step, batch_size, device, warmup=0, iters=iters, min_time=min_time)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
    latency = float("nan")
    if latency_iters != 0:
        step1 = make_inference_step(model, input_size, 1, device, amp, amp_dtype, channels_last, compile)
        latency = median_latency_ms(step1, device, warmup=max(warmup, 1), iters=latency_iters or max(iters, 10))
    return Throughput(images_per_s=ips, latency_ms=latency, peak_memory_mb=peak / 2**20, batch_size=batch_size,
                      device=str(device), amp=amp, channels_last=channels_last, compiled=bool(compile))


def train_throughput(
        model: nn.Module,
        input_size=(3, 224, 224),
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        amp: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        warmup: int = 2,
        iters: int = 5,
        min_time: float = 0.0,
        amp_dtype=None,
) -> Throughput:
    """Training images per second (see :func:`make_train_step`: forward, loss, backward, AdamW
    step) after warm-up. Peak memory (MiB) as in :func:`throughput`. Leaves the model in train mode
    with updated weights: measure a copy if the weights matter."""
    device = _check_device(device)
    step = make_train_step(model, input_size, batch_size, device, amp, amp_dtype, channels_last, compile)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _PeakRSS() as rss:
        ips = time_steps(step, batch_size, device, warmup=0, iters=iters, min_time=min_time)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
    return Throughput(images_per_s=ips, latency_ms=float("nan"), peak_memory_mb=peak / 2**20,
                      batch_size=batch_size, device=str(device), amp=amp, channels_last=channels_last,
                      compiled=bool(compile), mode="train")


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
