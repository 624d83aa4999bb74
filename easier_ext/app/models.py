"""torchvision models by name, with CIFAR-style stems (and a small Swin-T) for small (16x16, 32x32) images."""

from __future__ import annotations

import copy

import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer

__all__ = ["build_model", "SMALL_INPUT_FAMILIES", "SMALL_SWIN_T"]

#: Families that ``build_model(..., small_input=True)`` adapts to small (16x16, 32x32) images.
SMALL_INPUT_FAMILIES = ("resnet", "vgg", "mobilenet_v2", "swin_t")

#: ``swin_t`` with ``small_input``: Swin-T's shape (depths 2-2-6-2, so 12 MLP GELUs; heads doubling
#: per stage; MLP ratio 4) at a size for 16x16 and 32x32 images: 2x2 patches (a 16x16 image is 8x8
#: tokens, then 4x4, 2x2, 1x1 after the three patch mergings), 4x4 windows, a quarter of the width.
SMALL_SWIN_T = dict(patch_size=[2, 2], embed_dim=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8],
                    window_size=[4, 4], stochastic_depth_prob=0.05)


def build_model(name: str, num_classes: int = 10, *, small_input: bool = False, weights=None) -> nn.Module:
    """A torchvision classification model by name.

    Args:
        name: any name of ``torchvision.models.list_models(torchvision.models)``, e.g.
            ``"resnet18"``, ``"vgg16_bn"``, ``"mobilenet_v2"``, ``"swin_t"``.
        num_classes: size of the classifier's output (ignored when ``weights`` are given, which fix
            it; the classifier is then replaced).
        small_input: a CIFAR-style stem for 32x32 images, from the same definitions: ResNets get a
            3x3 stride-1 first conv and no max-pool (as in the EASIER paper); VGGs pool to 1x1 and
            use a 512-wide classifier (same number of ReLUs); MobileNetV2 keeps the resolution in
            its first conv and first stride-2 block; ``swin_t`` is built smaller
            (:data:`SMALL_SWIN_T`: Swin-T's depths 2-2-6-2 and 12 GELUs, with 2x2 patches, 4x4
            windows, embed_dim 32), which takes 16x16 and 32x32 images (not with ``weights``).
        weights: torchvision weights name or enum (e.g. ``"DEFAULT"``), or None for random init.

    Returns:
        the model (train mode).

    Raises:
        ValueError: unknown name, ``small_input`` for a family it is not implemented for, or
            ``small_input`` swin_t with ``weights``.
    """
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(f"unknown model {name!r}; expected a torchvision classification model, e.g. {', '.join(sorted(known)[:8])}, ...")
    if small_input and name == "swin_t":
        if weights is not None:
            raise ValueError("small_input swin_t is a smaller Swin-T (2x2 patches, 4x4 windows, embed_dim "
                             f"{SMALL_SWIN_T['embed_dim']}) that pretrained swin_t weights do not fit; "
                             "pass small_input=False to use them")
        return SwinTransformer(num_classes=num_classes, **copy.deepcopy(SMALL_SWIN_T))  # the blocks keep its lists
    if weights is None:
        model = torchvision.models.get_model(name, num_classes=num_classes)
    else:
        model = torchvision.models.get_model(name, weights=weights)
        _replace_classifier(model, num_classes)
    if small_input:
        _small_input_stem(name, model, num_classes)
    return model


def _small_input_stem(name: str, model: nn.Module, num_classes: int) -> None:
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif name.startswith("vgg"):
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, num_classes),
        )
    elif name == "mobilenet_v2":
        model.features[0][0].stride = (1, 1)
        model.features[2].conv[1][0].stride = (1, 1)  # the first stride-2 depthwise conv
    else:
        raise ValueError(f"small_input is implemented for {', '.join(SMALL_INPUT_FAMILIES)} models, not {name!r}")


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Pretrained weights fix the output size: put a new last Linear of ``num_classes`` outputs."""
    parent, attr, last = None, None, None
    for module in model.modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, attr, last = module, child_name, child
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to resize")
    if last.out_features != num_classes:
        setattr(parent, attr, nn.Linear(last.in_features, num_classes))
