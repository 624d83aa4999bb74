"""The model zoo: real timm and torchvision models of a dozen families, randomly initialised,
small inputs, eval mode. For each: ``convert`` finds one site per rectifier call the model makes
(counted independently, from the aten ops one forward runs) and warns about the activations it
has no site for; the converted model computes what the original does; after linearizing the
lowest-entropy half of the sites, ``fold`` is exact and leaves no BatchNorm but those its warning
names; the folded model exports with ``torch.export`` (and, for a few, to ONNX) and the exported
program computes what it does.

timm is a test dependency (requirements-test.txt pins it); without it the timm models skip."""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

import easier_ext as ee

# aten ops (overload packets) of the activations easier_ext has sites for: nn.ReLU / F.relu (relu,
# relu_), ReLU6 (hardtanh), LeakyReLU, PReLU, GELU, SiLU, Hardswish, ELU, Mish.
RECTIFIER_OPS = {"relu", "relu_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "prelu", "_prelu_kernel",
                 "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "elu", "elu_", "mish", "mish_"}
# aten ops of activations without a site, and the module class convert's warning names for them
UNTRACKED_OPS = {"hardsigmoid": "Hardsigmoid", "hardsigmoid_": "Hardsigmoid"}


def _tv_vit(num_classes):
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=num_classes)


# id -> (source, constructor, kwargs, input size, what else to check)
ZOO = {
    "resnet18": ("torchvision", "resnet18", {}, 32, {"onnx"}),
    "densenet121": ("torchvision", "densenet121", {}, 32, set()),  # BatchNorms after cat stay
    "tv_vit": ("torchvision", _tv_vit, {}, 32, set()),  # fused _native_multi_head_attention in eval
    "efficientnet_b0": ("timm", "efficientnet_b0", {}, 32, {"batchnormact"}),
    "mobilenetv3_small_100": ("timm", "mobilenetv3_small_100", {}, 32, {"batchnormact", "onnx"}),  # Hardswish
    "regnety_002": ("timm", "regnety_002", {}, 32, {"batchnormact"}),
    "convnext_atto": ("timm", "convnext_atto", {}, 32, {"layerscale"}),  # gamma of ConvNeXt blocks
    "fastvit_t8": ("timm", "fastvit_t8", {}, 64, {"layerscale"}),  # nested LayerScale2d
    "vit_tiny": ("timm", "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32, {"onnx"}),
    "deit3_small": ("timm", "deit3_small_patch16_224", {"img_size": 32, "patch_size": 8}, 32, {"layerscale"}),
    "swin_tiny": ("timm", "swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "window_size": 2}, 32, set()),
    "mixer_s16": ("timm", "mixer_s16_224", {"img_size": 64}, 64, set()),
}


def build(name):
    source, ctor, kwargs, size, _ = ZOO[name]
    torch.manual_seed(0)
    if callable(ctor):
        model = ctor(num_classes=10)
    elif source == "torchvision":
        import torchvision
        model = getattr(torchvision.models, ctor)(weights=None, num_classes=10, **kwargs)
    else:
        timm = pytest.importorskip("timm", reason="timm not installed (pip install -r requirements-test.txt)")
        model = timm.create_model(ctor, pretrained=False, num_classes=10, **kwargs)
    return model.eval(), size


class _CountOps(TorchDispatchMode):
    """Counts every aten op that runs, by overload packet name."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _batchnorms_left(model):
    """BatchNorm modules and functional batch_norm calls in a folded GraphModule."""
    modules = sum(isinstance(m, _BatchNorm) for m in model.modules())
    functional = sum(n.op == "call_function" and "batch_norm" in str(n.target) for n in model.graph.nodes)
    return modules + functional


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name, tmp_path):
    model, size = build(name)
    extra = ZOO[name][4]
    x = torch.randn(2, 3, size, size)

    # the independent count: rectifier calls the original model makes in one forward
    with torch.no_grad(), _CountOps() as ops:
        expected = model(x)
    rectifier_calls = sum(n for op, n in ops.counts.items() if op in RECTIFIER_OPS)
    untracked = {}
    for op, n in ops.counts.items():
        if op in UNTRACKED_OPS:
            untracked[UNTRACKED_OPS[op]] = untracked.get(UNTRACKED_OPS[op], 0) + n
    assert rectifier_calls > 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = ee.convert(model)
    passed_over = [str(w.message) for w in caught if "passed over" in str(w.message)]
    assert len(ee.sites(converted)) == rectifier_calls, sorted(ops.counts.items())
    if untracked:  # each passed-over activation named in the warning with its count of modules
        assert len(passed_over) == 1, [str(w.message) for w in caught]
        for kind, n in untracked.items():
            assert f"{n} {kind} module" in passed_over[0], (kind, n, passed_over[0])
    else:
        assert not passed_over, passed_over
    if "batchnormact" in extra:
        from timm.layers import BatchNormAct2d
        assert any(isinstance(m, BatchNormAct2d) for m in model.modules())

    # outputs unchanged
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected)

    # linearize the lowest-entropy half, then fold: exact, BatchNorms gone but the named ones
    h = ee.measure_entropy(converted, [torch.randn(4, 3, size, size) for _ in range(2)], progress=False)
    assert set(h) == set(ee.sites(converted))
    lowest = sorted(h, key=lambda s: h[s].entropy)[: len(h) // 2]
    ee.linearize(converted, lowest)
    converted.eval()
    with torch.no_grad():
        linearized = converted(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = ee.fold(converted, x)
    with torch.no_grad():
        out = folded(x)
    scale = linearized.abs().max().item()
    torch.testing.assert_close(out, linearized, rtol=1e-4, atol=1e-5 * max(1.0, scale))
    assert not any(isinstance(m, ee.EntropyActivation) for m in folded.modules())

    left_warnings = [str(w.message) for w in caught if "BatchNorm layer(s) unfolded" in str(w.message)]
    named = 0
    if left_warnings:
        assert len(left_warnings) == 1
        named = int(re.search(r"fold left (\d+) BatchNorm", left_warnings[0]).group(1))
        assert named == sum("left unfolded" in line for line in folded.fold_log)
    assert _batchnorms_left(folded) == named
    if any(isinstance(m, _BatchNorm) for m in model.modules()) and name != "densenet121":
        assert named < sum(isinstance(m, _BatchNorm) for m in model.modules())
    if name in ("resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "convnext_atto"):
        assert named == 0  # every BatchNorm follows a conv
    if "layerscale" in extra:  # LayerScale gammas folded into the conv or linear before them; the
        # ones left scale something else (fastvit's RepMixer: gamma * (mixer(x) - norm(x)))
        gammas = sum(isinstance(p, nn.Parameter) and name_.endswith("gamma") for name_, p in model.named_parameters())
        left = [n for n in folded.graph.nodes if n.op == "get_attr" and n.target.endswith("gamma")]
        assert len(left) < gammas
        for node in left:
            for user in node.users:
                for arg in user.all_input_nodes:
                    layer = folded.get_submodule(arg.target) if arg.op == "call_module" else None
                    assert not isinstance(layer, (nn.Conv2d, nn.Linear)), (node.target, user.format_node())

    # torch.export round trip, at another batch size too (the batch dim is dynamic)
    exported = ee.export_program(folded, x, tmp_path / "model.pt2")
    program = torch.export.load(str(exported.path)).module()
    x3 = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(program(x), out, rtol=1e-4, atol=1e-5 * max(1.0, scale))
        torch.testing.assert_close(program(x3), folded(x3), rtol=1e-4, atol=1e-5 * max(1.0, scale))

    if "onnx" in extra:
        pytest.importorskip("onnx", reason="onnx not installed (pip install easier_ext[onnx])")
        pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install easier_ext[onnx])")
        ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install easier_ext[onnx])")
        written = ee.export_onnx(folded, x, tmp_path / "model.onnx")
        session = ort.InferenceSession(str(written.path), providers=["CPUExecutionProvider"])
        (result,) = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(result), folded(x3), rtol=1e-4, atol=1e-5 * max(1.0, scale))
