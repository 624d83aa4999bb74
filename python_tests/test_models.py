"""build_model: the small-input swin_t (Swin-T's shape for 16x16 / 32x32 images) and its path
through convert, feeding_layers, linearize and fold."""

import collections
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlock

import easier_ext as ee
from easier_ext.app.models import SMALL_INPUT_FAMILIES, build_model
from easier_ext.methods.pruning import feeding_layers


def small_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("swin_t", 10, small_input=True).eval()


def aten_calls(model: nn.Module, x: torch.Tensor) -> collections.Counter:
    """Independent count of the aten ops one forward makes (after torch's own decompositions)."""
    seen = collections.Counter()

    class Mode(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Mode():
        model(x)
    return seen


def linear_calls(model: nn.Module, x: torch.Tensor) -> int:
    """How many linear layers one forward applies: each one is an addmm (with bias) or an mm."""
    calls = aten_calls(model, x)
    return calls["addmm"] + calls["mm"]


def mlp_blocks(model: nn.Module) -> dict[str, SwinTransformerBlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SwinTransformerBlock)}


def test_small_swin_t_has_swin_t_shape_and_runs_on_small_images():
    model = small_swin()
    assert type(model) is SwinTransformer
    assert "swin_t" in SMALL_INPUT_FAMILIES
    # Swin-T's depths: 2, 2, 6, 2 blocks in the four stages (features 1, 3, 5, 7)
    depths = [sum(isinstance(m, SwinTransformerBlock) for m in model.features[i].modules()) for i in (1, 3, 5, 7)]
    assert depths == [2, 2, 6, 2]
    # as many GELU calls as the full-size swin_t (counted at the aten level on both), all in MLPs
    full = torchvision.models.swin_t(num_classes=10).eval()
    assert aten_calls(model, torch.randn(1, 3, 16, 16))["gelu"] == 12 == aten_calls(full, torch.randn(1, 3, 32, 32))["gelu"]
    assert all(isinstance(block.mlp[1], nn.GELU) for block in mlp_blocks(model).values())
    for size in (16, 32):
        with torch.no_grad():
            out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    converted = ee.convert(model)
    found = ee.sites(converted)
    assert sorted(found) == sorted(f"{name}.mlp.1" for name in mlp_blocks(model))
    assert {s.channel_dim for s in found.values()} == {-1}
    assert {s.activation for s in found.values()} == {"gelu"}


def test_feeding_layers_are_the_mlps_first_linears():
    model = small_swin()
    # reference from the torchvision module structure: block.mlp = Linear, GELU, Dropout, Linear, Dropout
    expected = {}
    for name, block in mlp_blocks(model).items():
        assert isinstance(block.mlp[0], nn.Linear) and block.mlp[0].out_features == 4 * block.mlp[0].in_features
        expected[f"{name}.mlp.1"] = [f"{name}.mlp.0"]
    assert feeding_layers(ee.convert(model)) == expected


def test_linearized_gelu_folds_its_mlp_into_one_linear():
    model = small_swin()
    with torch.no_grad():  # non-zero biases, so that the merged bias is checked too
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    block = "features.5.0"  # first block of the 6-deep stage
    converted = ee.convert(model)
    ee.linearize(converted, f"{block}.mlp.1")
    x = torch.randn(1, 3, 16, 16)
    folded = ee.fold(converted.eval(), x)

    # independent reference: the torchvision model with that GELU replaced by the identity
    reference = copy.deepcopy(model)
    reference.get_submodule(block).mlp[1] = nn.Identity()
    xs = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = reference(xs)
        torch.testing.assert_close(converted(xs), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded(xs), expected, rtol=1e-5, atol=1e-5)

    # one linear layer fewer, and it is the product of the MLP's two
    assert linear_calls(folded, x) == linear_calls(model, x) - 1
    first, second = (model.get_submodule(f"{block}.mlp.{i}") for i in (0, 3))
    merged = [m for m in folded.modules() if isinstance(m, nn.Linear) and m.in_features == m.out_features == first.in_features]
    assert len(merged) == 1
    w = (second.weight.double() @ first.weight.double()).float()
    b = (second.weight.double() @ first.bias.double() + second.bias.double()).float()
    torch.testing.assert_close(merged[0].weight, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged[0].bias, b, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, ee.EntropyActivation) for m in folded.modules())


def test_small_input_swin_t_refuses_pretrained_weights():
    with pytest.raises(ValueError, match="small_input"):
        build_model("swin_t", 10, small_input=True, weights="DEFAULT")
    with pytest.raises(ValueError, match="small_input is implemented for"):
        build_model("swin_s", 10, small_input=True)
