"""Deployment of every image family (tiny widths, small images): torch.fx (symbolic_trace and timm's fx
feature extraction), TorchScript, torch.export (static batch 1, dynamic batch, dynamic height/width where
eager takes any size), ONNX through PyTorch's dynamo exporter checked in ONNX Runtime, torch.compile
(fullgraph, dynamic), and the `condensevit export` / `bench --runtime` commands. Every video family: torch.fx,
TorchScript, torch.export with a dynamic batch, torch.compile(fullgraph=True).

Exports are the slow part (seconds each on 2 cores): each family is exported once per kind, in
module-scoped fixtures, and every check of that export reuses it.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.export import Dim

import condensevit  # noqa: F401  (registers the models)
from condensevit import deploy
from condensevit.cli import main as cli_main

pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'condensevit[deploy]'")

ATOL = 1e-4
# name, kwargs, example input shape
FAMILIES = {
    "stvit": ("stvit_deit_tiny_patch16_224",
              dict(embed_dim=32, depth=3, num_heads=2, img_size=64, num_semantic_tokens=4, stgm_start=1), (2, 3, 64, 64)),
    "stvit_r": ("stvit_r_swin_tiny_patch4_window7_224",
                dict(embed_dim=16, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2)), (2, 3, 224, 224)),
    "stvit_r_det": ("stvit_r_det_swin_tiny_patch4_window7",
                    dict(embed_dim=16, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2)), (2, 3, 64, 80)),
    "lookupvit": ("lookupvit_tiny_patch16_224",
                  dict(embed_dim=32, depth=2, num_heads=2, img_size=(64, 96), compressed_grid=(2, 3)), (2, 3, 64, 96)),
    # 224: a 14x14 third-stage map, so the condensed stage's second Swin block shifts (the mask buffer is
    # used); then the module's two blocks, a local and a global semantic block
    "stvit_swin": ("stvit_swin_tiny_patch4_window7_224",
                   dict(embed_dim=16, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2), stgm_start=2), (2, 3, 224, 224)),
}
NAMES = list(FAMILIES)


def build(family: str, **kw) -> torch.nn.Module:
    name, kwargs, _ = FAMILIES[family]
    return timm.create_model(name, **{**kwargs, **kw}).eval()


def images(family: str, batch: int | None = None, size: tuple[int, int] | None = None, seed: int = 0):
    shape = list(FAMILIES[family][2])
    if batch is not None:
        shape[0] = batch
    if size is not None:
        shape[-2:] = size
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(a, b, atol=ATOL):
    return float((a - b).abs().max()) <= atol


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {f: build(f) for f in NAMES}


# ------------------------------------------------------------------------------------------------ torch.fx
@pytest.mark.parametrize("family", NAMES)
def test_symbolic_trace_reproduces_eager(family, models):
    model = models[family]
    gm = torch.fx.symbolic_trace(model)
    x = images(family)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("family", NAMES)
def test_input_checks_keep_their_errors_inside_fx_graphs(family, models):
    model = models[family]
    gm = torch.fx.symbolic_trace(model)
    bad = images(family)[:, :2]   # two channels
    with pytest.raises(ValueError) as eager:
        model(bad)
    with pytest.raises(ValueError) as traced:
        gm(bad)
    assert str(traced.value) == str(eager.value)
    assert any(n.op == "call_function" and n.target.__name__.startswith("_check") for n in gm.graph.nodes), \
        "the input check is one leaf node of the graph"


def _timm_fx_model(model, train: bool = False):
    """timm's tests/test_models.py::_create_fx_model: the graph's output node through timm's tracer."""
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**kw).trace(model)
        nodes = list(reversed(graph.nodes))
        out_names = [n.name for n in nodes[0]._input_nodes.keys()]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n)] for n in out_names]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kw)


@pytest.mark.parametrize("family", NAMES)
def test_timm_fx_forward(family, models):
    """timm's test_model_forward_fx on our models."""
    model = models[family]
    x = images(family)
    with torch.no_grad():
        out = model(x)
        fx_out = tuple(_timm_fx_model(model)(x).values())
    assert torch.equal(torch.cat(fx_out), out)


@pytest.mark.parametrize("family", NAMES)
def test_timm_fx_backward(family):
    """timm's test_model_backward_fx: the traced training graph gives a gradient to the parameters the
    eager model gives one to (every parameter, once issue 11.4's unused ones are gone)."""
    torch.manual_seed(0)
    model = build(family, num_classes=7).train()
    eager = copy.deepcopy(model)
    x = images(family)
    fx_model = _timm_fx_model(model, train=True)
    out = torch.cat(tuple(fx_model(x).values()))
    assert out.shape[-1] == 7
    out.mean().backward()
    eager(x).mean().backward()
    with_grad = {n for n, p in fx_model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad == {n for n, p in eager.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", NAMES)
def test_timm_fx_feature_extraction_by_module(family, models):
    """create_feature_extractor on the modules feature_info names (timm's FeatureGraphNet route)."""
    from timm.models._features_fx import create_feature_extractor
    model = models[family]
    module = model.feature_info[-1]["module"]
    fe = create_feature_extractor(model, return_nodes={module: "feat"})
    with torch.no_grad():
        feat = fe(images(family))["feat"]
    feat = feat[-1] if isinstance(feat, (tuple, list)) else feat
    assert feat.shape[0] == 2 and torch.isfinite(feat).all()


def test_lookupvit_compressed_grid_argument_in_fx_graphs(models):
    model = models["lookupvit"]
    x = images("lookupvit")
    gm = torch.fx.symbolic_trace(model)   # the argument becomes a graph input: traced at the default grid
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        assert torch.equal(gm(x, compressed_grid=(2, 3)), model(x))
    with pytest.raises(ValueError, match="traced at compressed_grid=.2, 3."):
        gm(x, compressed_grid=(1, 1))
    other = copy.deepcopy(model)
    other.compressed_grid = (1, 1)        # another grid: trace the model with it as its default
    gm11 = torch.fx.symbolic_trace(other)
    with torch.no_grad():
        assert torch.equal(gm11(x), model(x, compressed_grid=(1, 1)))


# ---------------------------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("family", NAMES)
def test_torchscript(family, tmp_path):
    name, kwargs, _ = FAMILIES[family]
    model = timm.create_model(name, scriptable=True, **kwargs).eval()
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, tmp_path / "m.pt")   # nothing Python-only left in it
    loaded = torch.jit.load(tmp_path / "m.pt")
    x = images(family)
    with torch.no_grad():
        assert close(loaded(x), model(x), 1e-5)
    with pytest.raises(torch.jit.Error, match="ValueError"):   # the input checks are compiled too
        loaded(x[:, :2])


# ------------------------------------------------------------------------------ torch.export, ONNX Runtime
@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_export_static_dynamic_and_onnx_runtime(family, models, tmp_path):
    """One test per family (each export is seconds; one worker does all of a family's): torch.export at
    batch 1, torch.export with a dynamic batch (saved and reloaded), and ONNX with a dynamic batch run in
    ONNX Runtime; the dense backbone's programs take any height and width too. Every output is within
    1e-4 of eager (fp32)."""
    model = models[family]
    shape = FAMILIES[family][2][1:]
    with torch.no_grad():
        # batch 1, nothing dynamic
        spec1 = deploy.export_spec(model, batch_size=1, input_shape=shape, dynamic_batch=False, dynamic_size=False)
        program = deploy.export_program(model, spec1).module()
        x = images(family, batch=1)
        assert close(program(x), model(x)), "static batch-1 program"

        # dynamic batch (and size, where eager takes any), through a saved file
        spec = deploy.export_spec(model, input_shape=shape)
        assert spec.dynamic[0] == "batch"
        exported = deploy.export_program(model, spec)
        deploy.save_program(exported, spec, str(tmp_path / "m.pt2"))
        program = deploy.load_program(str(tmp_path / "m.pt2"))
        cases = [(1, None), (3, None)]
        if family == "stvit_r_det":
            assert spec.dynamic == {0: "batch", 2: "height", 3: "width"} and not spec.check_guards
            # padded and unpadded maps, stages of one window and of several, batch 1 and more
            cases += [(1, (224, 224)), (3, (178, 243)), (1, (33, 47)), (2, (57, 300))]
        for b, size in cases:
            x = images(family, batch=b, size=size, seed=b)
            assert close(program(x), model(x)), f"dynamic program at batch {b}, size {size}"

    # ONNX, verified in ONNX Runtime at batch 1 and 3 (and another size for the dense backbone)
    info = deploy.export_onnx(model, spec, str(tmp_path / "m.onnx"), program=exported)
    assert info["input_name"] == "images" and info["input_shape"][0] == "batch" and info["opset"] >= 18
    results = deploy.verify_onnx(str(tmp_path / "m.onnx"), model, spec)   # raises above 1e-4
    shapes = [s for s, _ in results]
    assert (1, *shape) in shapes and (3, *shape) in shapes
    if family == "stvit_r_det":
        assert info["input_shape"][2:] == ("height", "width")
        assert any(s[2:] != tuple(shape[1:]) for s in shapes), "verified at another size too"
        runner = deploy.OrtModule(str(tmp_path / "m.onnx"))
        x = images(family, batch=1, size=(33, 47))
        with torch.no_grad():
            assert close(runner(x), model(x)), "a stage with one window"


def test_lookupvit_dynamic_img_size_export_takes_other_sizes():
    model = build("lookupvit", dynamic_img_size=True)
    spec = deploy.export_spec(model, input_shape=(3, 64, 96))
    assert spec.dynamic == {0: "batch", 2: "height", 3: "width"} and spec.size_multiple == 16
    program = deploy.export_program(model, spec).module()
    with torch.no_grad():
        for b, size in ((1, (64, 96)), (3, (80, 128)), (1, (112, 48))):
            x = images("lookupvit", batch=b, size=size)
            assert close(program(x), model(x)), (b, size)


def test_export_spec_refuses_a_dynamic_size_the_model_cannot_take(models):
    with pytest.raises(ValueError, match="cannot have a dynamic height/width"):
        deploy.export_spec(models["stvit"], dynamic_size=True)


def test_onnx_lookupvit_at_a_chosen_grid_and_verification(tmp_path):
    model = build("lookupvit", compressed_grid=(1, 2))
    spec = deploy.export_spec(model, input_shape=(3, 64, 96))
    path = str(tmp_path / "m.onnx")
    deploy.export_onnx(model, spec, path)
    runner = deploy.OrtModule(path)
    x = images("lookupvit")
    with torch.no_grad():
        assert close(runner(x), model(x))
        assert not close(runner(x), model(x, compressed_grid=(2, 3)))   # the grid is the chosen one
    other = copy.deepcopy(model)
    torch.nn.init.normal_(other.head.weight)
    with pytest.raises(deploy.VerificationError, match="differs from eager"):
        deploy.verify_onnx(path, other, spec)


def test_missing_extra_is_named(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(deploy.MissingDependencyError, match=r"condensevit\[deploy\]"):
        deploy.require_onnx()


# --------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("family", NAMES)
def test_compile_fullgraph_and_dynamic(family, models):
    """No graph break (fullgraph=True) with static and with dynamic shapes, one graph for every batch
    size (and image size, for the dense backbone). The dynamo front end (what decides graph breaks and
    traces the shapes) with the eager backend keeps the test fast; test_compile_inductor runs Inductor."""
    import torch.fx.experimental._config as fx_config
    model = models[family]
    torch._dynamo.reset()
    x = images(family)
    with torch.no_grad():
        assert close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))
        torch._dynamo.reset()
        # as deploy.export_program does for any-size models: size-oblivious shape reasoning, so that the
        # example's layout regime does not become a recompilation condition
        with fx_config.patch(backed_size_oblivious=True), torch._dynamo.config.patch(error_on_recompile=True):
            compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
            others = [images(family, batch=3, seed=3)]
            if family == "stvit_r_det":   # another size with the example's layout (one window in stages 3-4)
                others.append(images(family, batch=3, size=(80, 72), seed=4))
            for xi in [x] + others:   # error_on_recompile: one graph serves them all
                assert close(compiled(xi), model(xi))


def test_compile_inductor(models):
    torch._dynamo.reset()
    model = models["stvit"]
    x = images("stvit")
    with torch.no_grad():
        assert close(torch.compile(model, fullgraph=True)(x), model(x))


# --------------------------------------------------------------------------------------------- video
_VIDEO_SWIN = dict(embed_dim=16, depths=(2, 1, 4, 1), num_heads=(1, 1, 2, 2), num_frames=4, img_size=64,
                   num_classes=5)
# name, kwargs, example clip shape
VIDEO = {
    "stvit_video": ("stvit_video_tiny_patch2x16_224",
                    dict(embed_dim=32, depth=3, num_heads=2, num_frames=4, img_size=32, semantic_grid=(1, 2, 2),
                         stgm_start=1, num_classes=5), (2, 3, 4, 32, 32)),
    "lookupvit_video": ("lookupvit_video_tiny_patch2x16_224",
                        dict(embed_dim=32, depth=2, num_heads=2, num_frames=4, img_size=32, compressed_grid=(1, 2, 2),
                             num_classes=5), (2, 3, 4, 32, 32)),
    # 4 frames of 64x64: the first stage's 2x16x16 map has shifted 2x7x7 windows (padded), the third
    # stage's 2x4x4 map one window (the semantic tokens' 2x3x3 per window)
    "video_swin": ("video_swin_tiny_patch2x4x4_window8x7x7", _VIDEO_SWIN, (2, 3, 4, 64, 64)),
    "stvit_video_swin": ("stvit_video_swin_tiny_patch2x4x4_window8x7x7", _VIDEO_SWIN, (2, 3, 4, 64, 64)),
}


@pytest.mark.parametrize("family", list(VIDEO))
def test_video_fx_torchscript_export_compile(family):
    """torch.fx, TorchScript (input checks compiled in), torch.export with a dynamic batch and
    torch.compile(fullgraph=True) of every video family."""
    name, kwargs, shape = VIDEO[family]
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), ref)
        scripted = torch.jit.script(model)
        assert close(scripted(x), ref, 1e-5)
        with pytest.raises(torch.jit.Error, match="ValueError"):
            scripted(x[:, :2])
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}}).module()
        assert close(program(x[:1]), ref[:1])
        torch._dynamo.reset()
        assert close(torch.compile(model, fullgraph=True, backend="eager")(x), ref)


# --------------------------------------------------------------------------------------------- commands
def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, kw, shape, fixed", [
    (FAMILIES["stvit"][0], ["embed_dim=32", "depth=3", "num_heads=2", "img_size=64", "num_semantic_tokens=4",
                            "stgm_start=1"], "(batch, 3, 64, 64)", "fixed: channels 3, height 64, width 64"),
    # a video family: clips (B, C, T, H, W), the frame count fixed with the size
    (VIDEO["stvit_video"][0], ["embed_dim=32", "depth=3", "num_heads=2", "num_frames=4", "img_size=32",
                               "semantic_grid=(1,2,2)", "stgm_start=1"],
     "(batch, 3, 4, 32, 32)", "fixed: channels 3, frames 4, height 32, width 32"),
])
def test_export_command_onnx(name, kw, shape, fixed, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, text, err = _run_cli(capsys, "export", "--model", name, "--model-kwargs", *kw, "--out", str(out))
    assert code == 0, err
    assert out.is_file()
    assert "ONNX opset" in text and shape in text and "dynamic: batch (dim 0)" in text
    assert fixed in text
    assert "verified in ONNX Runtime" in text and "(tolerance 0.0001)" in text


def test_export_command_pt2(tmp_path, capsys):
    name, _, _ = FAMILIES["lookupvit"]
    kw = ["embed_dim=32", "depth=2", "num_heads=2", "img_size=(64,96)", "compressed_grid=2x3", "dynamic_img_size=True"]
    out = tmp_path / "m.pt2"
    code, text, err = _run_cli(capsys, "export", "--model", name, "--model-kwargs", *kw, "--format", "pt2",
                               "--out", str(out))
    assert code == 0, err
    assert "(batch, 3, height, width)" in text and "height (dim 2, multiples of 16)" in text
    assert "verified in the reloaded program" in text
    program = deploy.load_program(str(out))
    assert program(torch.randn(1, 3, 48, 112)).shape == (1, 1000)   # another batch and size


def test_export_spec_of_the_dense_backbone_names_its_dynamic_dims(models):
    spec = deploy.export_spec(models["stvit_r_det"], input_shape=(3, 96, 128))
    assert spec.describe() == "(batch, 3, height, width)" and not spec.check_guards
    assert deploy._dims_sentence(spec) == "dynamic: batch (dim 0), height (dim 2), width (dim 3); fixed: channels 3"


@pytest.mark.parametrize("argv, message", [
    (["--model", "stvit_deit_smal_patch16_224"], "unknown model"),
    (["--model", "stvit_deit_tiny_patch16_224", "--input-size", "3,100,100"], "does not take input"),
    (["--model", "stvit_deit_tiny_patch16_224", "--image-size", "dynamic"], "cannot have a dynamic height/width"),
    (["--checkpoint", "/nonexistent/w.safetensors"], "checkpoint file not found"),
])
def test_export_command_errors_are_one_line(argv, message, tmp_path, capsys):
    code, _, err = _run_cli(capsys, "export", *argv, "--out", str(tmp_path / "m.onnx"))
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_export_command_names_the_missing_extra(tmp_path, capsys, monkeypatch):
    def missing(runtime_only=False):
        raise deploy.MissingDependencyError("onnxscript is not installed; ONNX export and ONNX Runtime need the "
                                            f"optional extra: {deploy.DEPLOY_EXTRA}")
    monkeypatch.setattr(deploy, "require_onnx", missing)
    code, _, err = _run_cli(capsys, "export", "--model", "stvit_deit_tiny_patch16_224", "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "condensevit[deploy]" in err


def test_bench_runtime_onnxruntime(capsys):
    models = "deit_tiny_patch16_224[depth=2,embed_dim=32,num_heads=2],stvit_deit_tiny_patch16_224[depth=3,embed_dim=32,num_heads=2,stgm_start=1,num_semantic_tokens=4]"
    code, text, err = _run_cli(capsys, "bench", "--models", models, "--input-size", "3,64,64", "--runtime",
                               "eager,onnxruntime", "--batch-size", "2", "--iters", "1", "--rounds", "1",
                               "--warmup", "1", "--quiet")
    assert code == 0, err
    runtimes = [line.split()[1] for line in text.splitlines() if line.startswith(("deit_", "stvit_"))]
    assert sorted(runtimes) == ["eager", "eager", "onnxruntime", "onnxruntime"]
    assert "vs eager" in text and "ONNX models verified against eager" in text


def test_bench_runtime_is_checked(capsys):
    code, _, err = _run_cli(capsys, "bench", "--models", "deit_tiny_patch16_224", "--runtime", "tensorrt")
    assert code == 2 and "pick from eager, compile, onnxruntime" in err
