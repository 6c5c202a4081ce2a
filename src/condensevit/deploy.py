"""Deployment: ``torch.export`` programs, ONNX models verified in ONNX Runtime, and the
``condensevit export`` command.

Condensed models have static shapes (a fixed number of semantic / compressed tokens, no
data-dependent token selection), so they export whole, with a dynamic batch dimension; where eager
mode takes any image size (the dense STViT-R backbone; LookupViT and timm ViTs built with
``dynamic_img_size=True``) the exported program takes any size too.

* :func:`export_program` — ``torch.export.export`` with the right dynamic dimensions;
  :func:`save_program` / :func:`load_program` keep how the program must be run.
* :func:`export_onnx` — PyTorch's dynamo ONNX exporter (``torch.onnx.export(..., dynamo=True)``,
  needs ``onnxscript``); :func:`verify_onnx` runs the file in ONNX Runtime (CPU execution
  provider) against eager PyTorch.
* :class:`OrtModule` — an ONNX Runtime session behind an ``nn.Module`` interface, for measuring
  (``condensevit bench --runtime onnxruntime``).

ONNX export and ONNX Runtime need the optional extra: ``pip install 'condensevit[deploy]'``
(``onnx``, ``onnxscript``, ``onnxruntime``); without it a :class:`MissingDependencyError` names it.

Dynamic image sizes and torch.export: PyTorch's shape reasoning pins some memory-layout decisions
(is this view contiguous, does this window axis have length 1) to the example input and records
them as input guards, although the graph computes the same function at every size (the tests check
this at sizes of every kind). A program exported with a dynamic height and width is therefore run
with ``module(check_guards=False)``, which :func:`load_program` does; the ONNX model has no such guards.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

__all__ = [
    "MissingDependencyError", "VerificationError", "ExportSpec", "export_spec", "export_program",
    "save_program", "load_program", "export_onnx", "verify_onnx", "verify_program", "ort_session",
    "OrtModule", "add_parser", "DEPLOY_EXTRA", "RUNTIMES", "parse_runtimes", "run_runtime_bench",
    "format_runtime_table",
]

DEPLOY_EXTRA = "pip install 'condensevit[deploy]'"
DEFAULT_ATOL = 1e-4   # fp32: exported model vs eager PyTorch, max absolute difference
_PROGRAM_META = "condensevit.json"


class MissingDependencyError(ImportError):
    """An optional dependency of ONNX export / ONNX Runtime is not installed."""


class VerificationError(ValueError):
    """The exported model does not reproduce the eager model within the tolerance."""


def require_onnx(runtime_only: bool = False):
    """Import the ONNX packages (``onnxruntime``, and ``onnx`` + ``onnxscript`` for export) or raise
    :class:`MissingDependencyError` naming the ``deploy`` extra."""
    names = ("onnxruntime",) if runtime_only else ("onnx", "onnxscript", "onnxruntime")
    modules = []
    for name in names:
        try:
            modules.append(__import__(name))
        except ImportError as e:
            raise MissingDependencyError(
                f"{name} is not installed; ONNX export and ONNX Runtime need the optional extra: {DEPLOY_EXTRA}"
            ) from e
    return modules


# ------------------------------------------------------------------------------------------ what to export
@dataclass
class ExportSpec:
    """What an export fixes: the example input shape and which of its dimensions stay dynamic.

    ``dynamic`` maps a dimension index to its name ('batch', 'height', 'width'); ``size_multiple``
    is the step of a dynamic height/width (the patch size for a ViT-style stem, 1 for any size);
    ``check_guards`` says whether the exported program's input guards must be checked (False for
    a dynamic height/width: see the module docstring)."""
    input_shape: tuple[int, ...]
    dynamic: dict[int, str] = field(default_factory=dict)
    size_multiple: int = 1
    min_size: tuple[int, int] = (1, 1)
    check_guards: bool = True

    def describe(self) -> str:
        """'(batch, 3, 224, 224)' with the dynamic dims named."""
        dims = [self.dynamic.get(i, str(s)) for i, s in enumerate(self.input_shape)]
        return "(" + ", ".join(dims) + ")"

    def dynamic_shapes(self):
        """The ``dynamic_shapes`` argument of ``torch.export.export`` / ``torch.onnx.export``."""
        from torch.export import Dim
        if not self.dynamic:
            return None
        dims = {}
        for i, name in self.dynamic.items():
            if name == "batch":
                dims[i] = Dim.DYNAMIC if not self.check_guards else Dim("batch", min=1, max=4096)
            elif self.size_multiple > 1:   # height / width: multiples of the patch
                low = self.min_size[0 if i == len(self.input_shape) - 2 else 1]
                dims[i] = self.size_multiple * Dim(f"{name}_patches", min=max(low, 1), max=512)
            else:
                dims[i] = Dim.DYNAMIC
        return {"x": dims}


def _size_policy(model: nn.Module) -> tuple[str, int, tuple[int, int]]:
    """('fixed' | 'any' | 'patches', size step, minimum size in steps) of a model's input height/width."""
    if getattr(model, "dense", False):                      # STViT-R dense backbone: pads any size
        return "any", 1, (1, 1)
    if getattr(model, "dynamic_img_size", False):
        patch = getattr(model, "patch_size", None) or getattr(getattr(model, "patch_embed", None), "patch_size", 16)
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        grid = tuple(getattr(model, "compressed_grid", (1, 1)))[:2]   # LookupViT: the grid must fit
        return "patches", patch, (int(grid[0]), int(grid[1])) if len(grid) == 2 else (1, 1)
    return "fixed", 1, (1, 1)


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) (or (C, T, H, W) for video) the model was built for."""
    shape = getattr(model, "input_size", None)
    if shape is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        shape = cfg.get("input_size") or (3, 224, 224)
        img = getattr(model, "img_size", None)
        if img is not None and len(shape) == 3:
            img = (img, img) if isinstance(img, int) else tuple(img)
            shape = (getattr(model, "in_chans", shape[0]), *img)
    return tuple(int(s) for s in shape)


def export_spec(model: nn.Module, batch_size: int = 1, input_shape: Sequence[int] | None = None,
                dynamic_batch: bool = True, dynamic_size: bool | None = None) -> ExportSpec:
    """The export of ``model`` for (``batch_size``, *``input_shape``) inputs.

    ``dynamic_size=None`` makes height and width dynamic where the eager model takes other sizes
    (dense STViT-R, ``dynamic_img_size=True``); ``True`` asks for it (a ValueError when the model
    is built for one size); ``False`` fixes them.
    """
    shape = tuple(int(s) for s in (input_shape or default_input_shape(model)))
    policy, step, min_steps = _size_policy(model)
    if dynamic_size and policy == "fixed":
        raise ValueError(f"{type(model).__name__} takes {shape[-2]}x{shape[-1]} images only, so its export cannot "
                         "have a dynamic height/width; use the dense backbone (stvit_r_det_*) or build the model with "
                         "dynamic_img_size=True where it has that option")
    dynamic = {0: "batch"} if dynamic_batch else {}
    size = policy != "fixed" if dynamic_size is None else bool(dynamic_size)
    if size:
        n = len(shape) + 1
        dynamic.update({n - 2: "height", n - 1: "width"})
    return ExportSpec(input_shape=(int(batch_size), *shape), dynamic=dynamic, size_multiple=step,
                      min_size=min_steps, check_guards=not (size and policy == "any"))


@contextlib.contextmanager
def _shape_reasoning(spec: ExportSpec):
    """Size-oblivious shape reasoning while exporting any-size programs: without it PyTorch pins
    the example's regime (a stage with one window, batch 1 vs more) into the program's ranges."""
    if spec.check_guards:
        yield
        return
    import torch.fx.experimental._config as fx_config
    with fx_config.patch(backed_size_oblivious=True):
        yield


def _example(spec: ExportSpec, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = list(spec.input_shape)
    if 0 in spec.dynamic and shape[0] == 1:
        shape[0] = 2   # a batch of 1 would be specialised: trace with 2, run with any
    return torch.randn(*shape, generator=g, dtype=dtype)


def _check_eval(model: nn.Module) -> nn.Module:
    if model.training:
        raise ValueError("export the model in eval mode (model.eval()): training mode draws grids / drops paths")
    return model


# ----------------------------------------------------------------------------------------- torch.export
def export_program(model: nn.Module, spec: ExportSpec):
    """``torch.export.export`` of an eval-mode ``model`` for ``spec``: an ``ExportedProgram``."""
    _check_eval(model)
    x = _example(spec)
    with torch.no_grad(), _shape_reasoning(spec):
        return torch.export.export(model, (x,), dynamic_shapes=spec.dynamic_shapes())


def save_program(program, spec: ExportSpec, path: str) -> None:
    """``torch.export.save`` with the spec alongside (so :func:`load_program` runs it right)."""
    torch.export.save(program, path, extra_files={_PROGRAM_META: json.dumps(asdict(spec))})


def load_program(path: str) -> nn.Module:
    """A saved program as a callable module (input guards checked unless the spec says otherwise)."""
    extra = {_PROGRAM_META: ""}
    program = torch.export.load(path, extra_files=extra)
    meta = json.loads(extra[_PROGRAM_META] or "{}")
    return program.module(check_guards=meta.get("check_guards", True))


def _test_shapes(spec: ExportSpec) -> list[tuple[int, ...]]:
    """Inputs to verify an export on: the example, and other batch sizes / image sizes it claims."""
    shapes = [tuple(spec.input_shape)]
    if 0 in spec.dynamic:
        for b in (1, 3):
            if b != spec.input_shape[0]:
                shapes.append((b, *spec.input_shape[1:]))
    if len(spec.dynamic) > 1:
        h, w = spec.input_shape[-2:]
        step = spec.size_multiple
        shapes.append((1, *spec.input_shape[1:-2], h + 2 * step if step > 1 else h + 37, w + step if step > 1 else w - 19))
    return shapes


def _max_diff(a, b) -> float:
    a = a if torch.is_tensor(a) else torch.as_tensor(a)
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def verify_program(program_module, model: nn.Module, spec: ExportSpec, atol: float = DEFAULT_ATOL):
    """[(input shape, max |program - eager|)] on :func:`_test_shapes`; VerificationError above ``atol``."""
    results = []
    for i, shape in enumerate(_test_shapes(spec)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(i))
        results.append((shape, _max_diff(program_module(x), model(x))))
    _raise_if_off(results, atol, "the exported program")
    return results


def _raise_if_off(results, atol: float, what: str) -> None:
    worst = max(results, key=lambda r: r[1])
    if not worst[1] <= atol:
        raise VerificationError(f"{what} differs from eager PyTorch by {worst[1]:.3g} at input {worst[0]} (tolerance "
                                f"{atol:g}); the export is not faithful, do not deploy it")


# ------------------------------------------------------------------------------------------------- ONNX
def export_onnx(model: nn.Module, spec: ExportSpec, path: str, opset: int | None = None, program=None) -> dict:
    """Export an eval-mode ``model`` to ``path`` with PyTorch's dynamo ONNX exporter (from ``program``,
    its :func:`export_program` for ``spec``, when given: the trace is then not done twice).

    Returns ``dict(opset, input_name, input_shape, output_name, output_shape, path, bytes)``, shapes
    as written in the file (dynamic dimensions by name). Raises :class:`MissingDependencyError`
    without the ``deploy`` extra."""
    require_onnx()
    import onnx
    _check_eval(model)
    x = _example(spec)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    input_name = "clips" if len(spec.input_shape) == 5 else "images"
    with torch.no_grad(), _shape_reasoning(spec), _quiet_exporter():
        onnx_program = torch.onnx.export(
            program if program is not None else model, (x,), dynamo=True, opset_version=opset, verbose=False,
            dynamic_shapes=None if program is not None else spec.dynamic_shapes(), input_names=[input_name],
            output_names=["output"])
        if spec.dynamic:
            # any-size dims are Dim.DYNAMIC (no names) and a program's dims keep theirs: name them as the spec does
            try:
                onnx_program._rename_dynamic_axes({"x": dict(spec.dynamic)})
            except Exception:  # noqa: BLE001  (a private helper of the exporter; the names are cosmetic)
                pass
    onnx_program.save(path)
    proto = onnx.load(path, load_external_data=False)

    def shape_of(value_info):
        return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)

    inp, out = proto.graph.input[0], proto.graph.output[0]
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    size = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))
    return dict(opset=opset_used, input_name=inp.name, input_shape=shape_of(inp), output_name=out.name,
                output_shape=shape_of(out), path=path, bytes=size)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress; keep the command's output to what it reports."""
    import io
    import logging
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger("torch.onnx").setLevel(level)


def ort_session(path: str, threads: int | None = None):
    """An ONNX Runtime inference session on the CPU execution provider (``threads`` intra-op
    threads; default: as many as torch uses, so comparisons with eager PyTorch are like for like)."""
    ort, = require_onnx(runtime_only=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX Runtime session with a module's call signature: (B, ...) float tensor -> tensor."""

    def __init__(self, path: str, threads: int | None = None):
        super().__init__()
        self.path = path
        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


@torch.no_grad()
def verify_onnx(path: str, model: nn.Module, spec: ExportSpec, atol: float = DEFAULT_ATOL, threads=None):
    """Run the ONNX file in ONNX Runtime (CPU) against eager ``model`` on :func:`_test_shapes`:
    [(input shape, max |ONNX Runtime - eager|)]; :class:`VerificationError` above ``atol``."""
    runner = OrtModule(path, threads)
    results = []
    for i, shape in enumerate(_test_shapes(spec)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(i))
        results.append((shape, _max_diff(runner(x), model(x))))
    _raise_if_off(results, atol, "the ONNX model in ONNX Runtime")
    return results


# ------------------------------------------------------------------------------------- runtimes benchmark
RUNTIMES = ("eager", "compile", "onnxruntime")


def parse_runtimes(text: str) -> list[str]:
    """'eager,onnxruntime' -> ['eager', 'onnxruntime'] (ValueError naming the choices otherwise)."""
    aliases = {"ort": "onnxruntime", "torch.compile": "compile", "pytorch": "eager"}
    names = [aliases.get(t.strip().lower(), t.strip().lower()) for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in RUNTIMES]
    if not names or bad:
        raise ValueError(f"--runtime {text!r}: pick from {', '.join(RUNTIMES)} (comma-separated, e.g. eager,onnxruntime)")
    return list(dict.fromkeys(names))


def run_runtime_bench(specs, runtimes=("eager", "onnxruntime"), input_size=None, batch_size=32, warmup=2,
                      iters=5, rounds=2, workdir=None, progress=True) -> dict:
    """The bench's alternating measurement over models x runtimes, on CPU.

    For each model (the first is the baseline) and runtime ('eager' PyTorch, 'compile' =
    ``torch.compile``, 'onnxruntime' = the model exported to ONNX with a dynamic batch, verified
    against eager, run by ONNX Runtime's CPU execution provider with as many threads as torch uses):
    batch-``batch_size`` images/s and batch-1 latency, each the median over ``rounds`` alternating rounds.
    Rows carry the ratio to the baseline model in the same runtime and to the same model in eager.
    """
    import tempfile
    from tqdm.auto import tqdm
    from .bench import create_for_input, parse_model_spec
    from .measure import as_input_shape, count_params, environment, gmacs, throughput
    if "onnxruntime" in runtimes:
        require_onnx()
    shape = as_input_shape(input_size) if input_size is not None else None
    workdir = workdir or tempfile.mkdtemp(prefix="condensevit-bench-")
    entries = []
    for spec in specs:
        name, kwargs, label = parse_model_spec(spec)
        model, in_shape = create_for_input(name, shape, **kwargs)
        entries.append(dict(label=label, model=model.eval(), shape=in_shape, runs={rt: [] for rt in runtimes}))
    bar = tqdm(total=len(entries) * (1 + rounds * len(runtimes)), desc="bench", disable=not progress, leave=False,
               file=sys.stderr)
    for i, e in enumerate(entries):
        bar.set_postfix_str(f"prepare {e['label']}")
        e["gmacs"], e["params"] = gmacs(e["model"], e["shape"]), count_params(e["model"])
        e["runners"] = {rt: e["model"] for rt in runtimes}
        if "compile" in runtimes:
            # compiled once, for both measured batch sizes (one graph each), before any timing
            compiled = torch.compile(e["model"], dynamic=False)
            with torch.no_grad():
                for b in (batch_size, 1):
                    compiled(torch.randn(b, *e["shape"]))
            e["runners"]["compile"] = compiled
        if "onnxruntime" in runtimes:
            spec = export_spec(e["model"], batch_size=1, input_shape=e["shape"], dynamic_batch=True, dynamic_size=False)
            path = os.path.join(workdir, f"model{i}.onnx")
            e["onnx"] = export_onnx(e["model"], spec, path)
            e["onnx_max_diff"] = max(d for _, d in verify_onnx(path, e["model"], spec))
            e["runners"]["onnxruntime"] = OrtModule(path)
        bar.update(1)
    for r in range(rounds):
        order = entries if r % 2 == 0 else entries[::-1]       # alternate so drift favours no one
        for e in order:
            for rt in (runtimes if r % 2 == 0 else runtimes[::-1]):
                bar.set_postfix_str(f"round {r + 1}/{rounds} {e['label']} {rt}")
                # batch-1 latency in every round too (median over rounds): one round's is at the
                # mercy of whatever else the machine runs at that moment
                e["runs"][rt].append(throughput(
                    e["runners"][rt], e["shape"], batch_size=batch_size, device="cpu",
                    warmup=warmup if r == 0 else 1, iters=iters, latency_iters=max(iters, 10)))
                bar.update(1)
    bar.close()
    def median(values):
        v = sorted(values)
        return v[len(v) // 2] if len(v) % 2 else sum(v[len(v) // 2 - 1:len(v) // 2 + 1]) / 2

    rows = []
    for e in entries:
        for rt in runtimes:
            runs = e["runs"][rt]
            rows.append(dict(model=e["label"], runtime=rt, gmacs=e["gmacs"], params=e["params"],
                             images_per_s=median([x.images_per_s for x in runs]),
                             latency_ms=median([x.latency_ms for x in runs]), rounds=[x.images_per_s for x in runs],
                             latency_rounds=[x.latency_ms for x in runs],
                             peak_memory_mb=max(x.peak_memory_mb for x in e["runs"][rt]),
                             onnx_max_diff=e.get("onnx_max_diff") if rt == "onnxruntime" else None,
                             onnx_opset=(e.get("onnx") or {}).get("opset") if rt == "onnxruntime" else None,
                             input_size=list(e["shape"])))
    by = {(r["model"], r["runtime"]): r for r in rows}
    base = entries[0]["label"]
    for r in rows:
        b, eager = by[(base, r["runtime"])], by.get((r["model"], "eager"))
        r["speedup"] = r["images_per_s"] / b["images_per_s"]
        r["latency_speedup"] = b["latency_ms"] / r["latency_ms"]
        r["vs_eager"] = r["images_per_s"] / eager["images_per_s"] if eager else None
        r["latency_vs_eager"] = eager["latency_ms"] / r["latency_ms"] if eager else None
    env = environment("cpu")
    try:
        import onnxruntime
        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    env.update(batch_size=batch_size, runtimes=list(runtimes), warmup=warmup, iters=iters, rounds=rounds)
    return dict(environment=env, rows=rows)


def format_runtime_table(result: dict) -> str:
    env = result["environment"]
    head = (f"machine: {env['processor']} ({env['cpu_count']} cpus, {env['torch_threads']} threads) | torch {env['torch']}"
            f"{' | onnxruntime ' + env['onnxruntime'] if 'onnxruntime' in env else ''} | batch {env['batch_size']}")
    cols = ["model", "runtime", "GMACs", f"img/s (b{env['batch_size']})", "speed-up", "latency b1 (ms)",
            "latency speed-up", "vs eager (img/s, b1)"]
    lines = []
    for r in result["rows"]:
        vs = "-" if r["vs_eager"] is None or r["runtime"] == "eager" else \
            f"{r['vs_eager']:.2f}x, {r['latency_vs_eager']:.2f}x"
        lines.append([r["model"], r["runtime"], f"{r['gmacs']:.3f}", f"{r['images_per_s']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['latency_ms']:.1f}", f"{r['latency_speedup']:.2f}x", vs])
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    out = [head, fmt(cols), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    out.append("speed-up / latency speed-up: against the first model in the same runtime; vs eager: the same model "
               "in eager PyTorch, measured in the same run.")
    diffs = [r for r in result["rows"] if r.get("onnx_max_diff") is not None]
    if diffs:
        out.append("ONNX models verified against eager: max |difference| " + ", ".join(
            f"{r['model']} {r['onnx_max_diff']:.1e} (opset {r['onnx_opset']})" for r in diffs))
    return "\n".join(out)


# -------------------------------------------------------------------------------------- the command line
def _usage(msg: str):
    from .cli import UsageError
    return UsageError(msg)


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    import re
    try:
        vals = tuple(int(v) for v in re.split(r"[,x ]+", text.strip()) if v)
    except ValueError:
        raise _usage(f"--input-size {text!r} is not a list of integers such as 3,224,224") from None
    if len(vals) == 1:
        vals = (3, vals[0], vals[0])
    if len(vals) not in (3, 4) or min(vals) < 1:
        raise _usage(f"--input-size {text!r} must be C,H,W (or C,T,H,W for video)")
    return vals


def build_for_export(name: str | None, checkpoint: str | None, model_kwargs: dict) -> tuple[nn.Module, str]:
    """The eval-mode model to export and its name: from a checkpoint (a condensevit training output
    records its model) or freshly built."""
    import timm
    from . import models as _  # noqa: F401  (registers our models)
    if checkpoint:
        from .models._builder import resolve_checkpoint_path
        from .train.checkpoint import load_model_for_inference
        checkpoint = resolve_checkpoint_path(checkpoint)  # a run folder: its last.safetensors
        if not os.path.isfile(checkpoint):
            raise _usage(f"checkpoint file not found: {checkpoint!r}; check the path")
        model = load_model_for_inference(name, checkpoint, **model_kwargs)
        label = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        return model.eval(), label
    if not name:
        raise _usage("no model given; pass --model NAME (or --checkpoint of a training run, which records its model)")
    from .bench import _check_model_name
    _check_model_name(name)
    try:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    except (TypeError, ValueError) as e:
        raise _usage(f"cannot build {name} with {model_kwargs}: {e}") from e
    return model.eval(), name


def _cmd_export(args) -> int:
    from .train.cli import parse_model_kwargs
    kwargs = parse_model_kwargs(args.model_kwargs)
    model, label = build_for_export(args.model, args.checkpoint, kwargs)
    if args.format == "onnx":
        try:
            require_onnx()
        except MissingDependencyError as e:
            raise _usage(str(e)) from e
    dynamic_size = {"auto": None, "dynamic": True, "fixed": False}[args.image_size]
    spec = export_spec(model, batch_size=args.batch_size, input_shape=_parse_shape(args.input_size),
                       dynamic_batch=not args.static_batch, dynamic_size=dynamic_size)
    with torch.no_grad():
        try:
            model(torch.zeros(*spec.input_shape))
        except ValueError as e:
            raise _usage(f"{label} does not take input {spec.input_shape}: {str(e).splitlines()[0]}") from e
    out = args.out
    if args.format == "onnx":
        info = export_onnx(model, spec, out, opset=args.opset)
        print(f"exported {label} to {out} (ONNX opset {info['opset']}, {info['bytes'] / 2**20:.1f} MiB)")
        shape_in = "(" + ", ".join(str(d) for d in info["input_shape"]) + ")"
        shape_out = "(" + ", ".join(str(d) for d in info["output_shape"]) + ")"
        print(f"input  {info['input_name']!r}: {shape_in} float32; {_dims_sentence(spec)}")
        print(f"output {info['output_name']!r}: {shape_out}")
        if args.no_verify:
            print("not verified (--no-verify)")
            return 0
        import onnxruntime
        results = verify_onnx(out, model, spec, atol=args.atol)
        what = f"ONNX Runtime {onnxruntime.__version__} (CPU execution provider)"
    else:
        program = export_program(model, spec)
        save_program(program, spec, out)
        print(f"exported {label} to {out} (torch.export program, torch {torch.__version__}, "
              f"{os.path.getsize(out) / 2**20:.1f} MiB); load with condensevit.deploy.load_program({out!r})")
        print(f"input  'x': {spec.describe()} float32; {_dims_sentence(spec)}")
        if args.no_verify:
            print("not verified (--no-verify)")
            return 0
        results = verify_program(load_program(out), model, spec, atol=args.atol)
        what = "the reloaded program"
    diffs = ", ".join(f"{d:.2e} at {tuple(s)}" for s, d in results)
    print(f"verified in {what} against eager PyTorch (fp32): max |difference| = {diffs} (tolerance {args.atol:g})")
    return 0


def _dims_sentence(spec: ExportSpec) -> str:
    fixed = [f"{n} {spec.input_shape[i]}" for i, n in
             zip(range(len(spec.input_shape)), ("batch", "channels", *(("frames",) if len(spec.input_shape) == 5 else ()),
                                                 "height", "width")) if i not in spec.dynamic]
    dyn = [f"{n} (dim {i}{', multiples of %d' % spec.size_multiple if n != 'batch' and spec.size_multiple > 1 else ''})"
           for i, n in sorted(spec.dynamic.items())]
    return f"dynamic: {', '.join(dyn) or 'none'}; fixed: {', '.join(fixed) or 'none'}"


def add_parser(sub: argparse._SubParsersAction):
    p = sub.add_parser(
        "export", help="export a model to ONNX (verified in ONNX Runtime) or a torch.export program",
        description="Export a model for deployment and check the export against eager PyTorch. ONNX uses "
                    "PyTorch's dynamo exporter and needs the deploy extra (" + DEPLOY_EXTRA + "). The batch "
                    "dimension is dynamic unless --static-batch; height and width are dynamic where the eager "
                    "model takes any size (dense STViT-R backbone, dynamic_img_size=True).")
    p.add_argument("--model", default=None, help="registered model name (optional with --checkpoint of a training run)")
    p.add_argument("--checkpoint", default=None, help="weights to export (.safetensors or .pth)")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", default=None,
                   help="model arguments as key=value items (compressed_grid=3x3 img_size=256) or one JSON object")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx",
                   help="onnx (default) or pt2 (a torch.export program, torch.export.save)")
    p.add_argument("--out", required=True, help="file to write (e.g. model.onnx or model.pt2)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the example input (default 1)")
    p.add_argument("--input-size", default=None, help="C,H,W of the example input (default: the model's own)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of leaving it dynamic")
    p.add_argument("--image-size", choices=("auto", "dynamic", "fixed"), default="auto",
                   help="height/width: dynamic where the model allows (auto, default), required dynamic, or fixed")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="largest accepted |export - eager| (default 1e-4)")
    p.add_argument("--no-verify", action="store_true", help="skip the check against eager PyTorch")
    p.set_defaults(func=_cmd_export)
