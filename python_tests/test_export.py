"""Export to ONNX and torch.export's .pt2 (checked against PyTorch), the ``easier-ext export``
command, and costs timed in ONNX Runtime. Tests that need onnx / onnxscript / onnxruntime (the
``onnx`` extra) skip, with the reason shown by ``-ra``, where they are not installed."""

import sys

import pytest
import torch
from torch import nn

import easier_ext as ee
from easier_ext.app.cli import main
from easier_ext.surgery.costs import compare_latency, cost
from easier_ext.surgery.export import ExportError, ExportMismatchError, MissingDependencyError, export_onnx, export_program


@pytest.fixture
def ort():
    """onnxruntime, after checking that the whole onnx extra is installed (else a visible skip)."""
    pytest.importorskip("onnx", reason="onnx not installed (pip install easier_ext[onnx])")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install easier_ext[onnx])")
    return pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install easier_ext[onnx])")


def tiny_net():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    for m in model.modules():  # BatchNorms that do something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def folded():
    """A converted model with one site linearized, folded: torch layers only, 2 convs merged."""
    model = ee.convert(tiny_net())
    ee.linearize(model, "5", mode="identity")
    result = ee.fold(model, torch.randn(2, 3, 8, 8))
    assert not any(isinstance(m, ee.EntropyActivation) for m in result.modules())
    return result


def run_session(ort, path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_onnx_export_matches_pytorch_at_any_batch_size(ort, folded, tmp_path):
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "sub" / "model.onnx"
    exported = export_onnx(folded, x, path)
    assert exported.path == path and path.is_file() and exported.format == "onnx" and exported.dynamic_batch
    assert 0 <= exported.max_difference < 1e-5 and "any batch size" in str(exported)
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary file left
    # checked here independently: an ONNX Runtime session on the file against the PyTorch model
    for batch in (2, 3, 1):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(run_session(ort, path, x), folded(x), rtol=1e-4, atol=1e-5)
    # static: the example's shape is the only one
    static = export_onnx(folded, torch.randn(2, 3, 8, 8), tmp_path / "static.onnx", dynamic_batch=False)
    session = ort.InferenceSession(str(static.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 8, 8] and not static.dynamic_batch


def test_pt2_export_matches_pytorch_at_any_batch_size(folded, tmp_path):
    # batch 1: torch.export would fix a size of 1, so the export traces at batch 2 and stays dynamic
    exported = export_program(folded, torch.randn(1, 3, 8, 8), tmp_path / "model.pt2")
    assert exported.format == "pt2" and exported.max_difference < 1e-6
    program = torch.export.load(exported.path).module()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(program(x), folded(x), rtol=1e-5, atol=1e-6)


def test_models_with_sites_export_as_torch_layers_and_stay_unchanged(ort, tmp_path):
    model = ee.convert(tiny_net())
    ee.linearize(model, "5", mode="identity")
    ee.sites(model)["8"].linearize(torch.linspace(0.5, 1.5, 8))  # a per-neuron multiplier: no torch module has it
    model.train()
    x = torch.randn(2, 3, 8, 8)
    onnx_file = export_onnx(model, x, tmp_path / "m.onnx").path
    pt2_file = export_program(model, x, tmp_path / "m.pt2").path
    # the model given is as it was: sites still there and counting, training mode kept
    assert model.training and len(ee.sites(model)) == 3 and all(s.track for s in ee.sites(model).values())
    import onnx

    ops = {(n.domain, n.op_type) for n in onnx.load(str(onnx_file)).graph.node}
    assert ("", "Relu") in ops and not any("easier" in domain for domain, _ in ops)
    program = torch.export.load(pt2_file)
    assert not any("easier_ext" in str(n.target) for n in program.graph.nodes)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(run_session(ort, onnx_file, x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-6)
    # a model that is one site
    relu = export_program(ee.EntropyReLU(), torch.randn(2, 4), tmp_path / "relu.pt2").path
    assert not any("easier_ext" in str(n.target) for n in torch.export.load(relu).graph.nodes)


def test_a_mismatch_is_refused_and_nothing_is_written(ort, folded, tmp_path, monkeypatch):
    import easier_ext.surgery.export as export_module

    reference = export_module._reference
    monkeypatch.setattr(export_module, "_reference", lambda model, args: [t + 0.25 for t in reference(model, args)])
    x = torch.randn(2, 3, 8, 8)
    for export, name in ((export_onnx, "m.onnx"), (export_program, "m.pt2")):
        with pytest.raises(ExportMismatchError, match=r"output 0 differs from PyTorch's by up to 0\.25"):
            export(folded, x, tmp_path / name)
        assert not (tmp_path / name).exists()
    assert not list(tmp_path.iterdir())
    # check=False writes without comparing
    assert export_program(folded, x, tmp_path / "m.pt2", check=False).max_difference is None


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1).sum(1)


def test_export_errors(tmp_path):
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        export_program(lambda x: x, x, tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="tensor or a non-empty tuple of tensors"):
        export_program(FixedBatch(), [x], tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="atol must be a number >= 0"):
        export_program(FixedBatch(), x, tmp_path / "m.pt2", atol=-1)
    with pytest.raises(ExportError, match="fixes its batch size: export with dynamic_batch=False"):
        export_program(FixedBatch(), x, tmp_path / "m.pt2")
    assert export_program(FixedBatch(), x, tmp_path / "m.pt2", dynamic_batch=False).max_difference == 0


def test_missing_onnx_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(MissingDependencyError, match=r"onnxruntime (is|are) not installed; pip install easier_ext\[onnx\]"):
        export_onnx(tiny_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(MissingDependencyError):
        cost(tiny_net(), torch.randn(1, 3, 8, 8), backend="onnxruntime")
    model_file = tmp_path / "m.pt"
    torch.save(tiny_net(), model_file)
    assert main(["export", str(model_file), "--onnx", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install easier_ext[onnx]" in err and "onnxruntime" in err
    assert not (tmp_path / "m.onnx").exists()


def test_cost_in_onnxruntime(ort, folded):
    x = torch.randn(2, 3, 8, 8)
    eager = cost(folded, x, latency=False)
    timed = cost(folded, x, backend="onnxruntime", min_run_time=0.05, threads=1)
    assert timed.latency_s > 0
    assert (timed.params, timed.macs, timed.depth) == (eager.params, eager.macs, eager.depth)
    dense = ee.convert(tiny_net())
    paired = compare_latency(dense, folded, x, rounds=4, backend="onnxruntime")
    assert paired.rounds == 4 and paired.before_s > 0 and paired.after_s > 0


def test_unknown_backend_lists_the_choices(folded):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="backend must be one of 'eager', 'onnxruntime', got 'tensorrt'"):
        cost(folded, x, backend="tensorrt")
    with pytest.raises(ValueError, match="backend must be one of 'eager', 'onnxruntime'"):
        compare_latency(folded, folded, x, backend="ort")


TINY_MODEL = '''
from torch import nn

def tiny(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
'''


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run of a tiny model on 8x8 digits (one iteration, a few seconds)."""
    folder = tmp_path_factory.mktemp("export_run")
    (folder / "tiny_export_model.py").write_text(TINY_MODEL)
    args = ["run", "--model", f"{folder / 'tiny_export_model.py'}:tiny", "--image-size", "8", "--pretrain-epochs", "1",
            "--epochs", "1", "--max-iterations", "1", "--budget", "50", "--no-latency", "--quiet", "--run-dir", str(folder / "run")]
    assert main(args) == 0
    return folder / "run"


def test_cli_exports_a_run_directory(ort, run_dir, tmp_path, capsys):
    capsys.readouterr()
    onnx_file, pt2_file = tmp_path / "model.onnx", tmp_path / "model.pt2"
    assert main(["export", str(run_dir), "--onnx", str(onnx_file), "--pt2", str(pt2_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"ONNX: {onnx_file} (onnx, any batch size, outputs within")
    assert out[1].startswith(f"torch.export: {pt2_file} (pt2, any batch size, outputs within")
    model = torch.load(run_dir / "final_folded.pt", weights_only=False).eval()
    x = torch.randn(3, 3, 8, 8)  # the run's image size, another batch size
    with torch.no_grad():
        torch.testing.assert_close(run_session(ort, onnx_file, x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.export.load(pt2_file).module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_cli_exports_a_checkpoint(run_dir, tmp_path, capsys):
    # a checkpoint still holds its sites (one linearized): exported as torch layers, at --input-shape
    pt2_file = tmp_path / "ckpt.pt2"
    assert main(["export", str(run_dir / "checkpoints" / "001.pt"), "--pt2", str(pt2_file), "--input-shape", "2", "3", "8", "8",
                 "--static-batch"]) == 0
    assert "the example's batch size only" in capsys.readouterr().out
    model = torch.load(run_dir / "checkpoints" / "001.pt", weights_only=False)["model"].eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(pt2_file).module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_cli_export_errors_are_one_line(run_dir, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text('{"image_size": 8}')
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    out = str(tmp_path / "m.pt2")
    cases = [
        (["export", str(run_dir)], "say what to write: --onnx FILE, --pt2 FILE, or both"),
        (["export", str(tmp_path / "nothing"), "--pt2", out], "does not exist"),
        (["export", str(tmp_path), "--pt2", out], "is not a run directory: it has no config.json"),
        (["export", str(unfinished), "--pt2", out], "has no final_folded.pt: the run has not finished"),
        (["export", str(junk), "--pt2", out], "is not a file torch.load can read"),
        (["export", str(run_dir), "--pt2", out, "--input-shape", "1", "5", "8", "8"], "the model cannot run on --input-shape 1 5 8 8"),
        (["export", str(run_dir), "--pt2", out, "--input-shape", "0", "3", "8", "8"], "--input-shape must be positive sizes"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("easier-ext export: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.pt2").exists()
