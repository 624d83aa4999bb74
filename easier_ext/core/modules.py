"""Drop-in rectifier modules that measure the entropy of their neurons' ON/OFF states.

``nn.ReLU()`` becomes ``easier_ext.EntropyReLU()``: same arguments, same outputs, plus per-neuron
ON counts kept as buffers while ``track`` is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easier_ext.core.entropy_activation import TRACKED_MODULES, EntropyActivation

__all__ = [
    "TRACKED_MODULES",
    "EntropyActivation",
    "EntropyReLU",
    "EntropyReLU6",
    "EntropyLeakyReLU",
    "EntropyPReLU",
    "EntropyGELU",
    "EntropySiLU",
    "EntropyHardswish",
    "EntropyELU",
    "EntropyMish",
]


class _InplaceActivation(EntropyActivation):
    """An activation whose torch module takes ``inplace``.

    ``inplace`` is honoured as torch does, also while tracking, except where autograd needs the
    input (grad enabled and the input requires grad): there the output is a new tensor.
    """

    _torch_args = ("inplace",)

    def __init__(self, inplace: bool = False, *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        self.inplace = inplace


class EntropyReLU(_InplaceActivation):
    """``nn.ReLU`` that counts its neurons' ON states. See :class:`EntropyActivation`.

    Args:
        inplace: as in ``nn.ReLU``: overwrite the input, unless autograd needs it while
            tracking (see :class:`_InplaceActivation`).
    """

    activation = "relu"
    replaces = nn.ReLU

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class EntropyReLU6(_InplaceActivation):
    """``nn.ReLU6`` that counts its neurons' ON states (ON is > 0; the upper saturation is not
    counted). See :class:`EntropyActivation` and :class:`EntropyReLU` for ``inplace``."""

    activation = "relu6"
    replaces = nn.ReLU6

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.relu6(input, inplace=self.inplace)


class EntropyLeakyReLU(EntropyActivation):
    """``nn.LeakyReLU`` that counts its neurons' ON states. See :class:`EntropyActivation`.

    Args:
        negative_slope: slope for inputs <= 0.
        inplace: see :class:`EntropyReLU`.
    """

    activation = "leaky_relu"
    replaces = nn.LeakyReLU
    _torch_args = ("negative_slope", "inplace")

    def __init__(self, negative_slope: float = 1e-2, inplace: bool = False, *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        self.negative_slope = negative_slope
        self.inplace = inplace

    def _op_args(self) -> dict:
        return {"negative_slope": self.negative_slope}

    def _off_slope(self) -> Tensor:
        return torch.tensor(float(self.negative_slope), device=self.on_counts.device)

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class EntropyPReLU(EntropyActivation):
    """``nn.PReLU`` that counts its neurons' ON states. See :class:`EntropyActivation`.

    Args:
        num_parameters: 1 (one shared slope) or the number of channels.
        init: initial slope.

    As in ``nn.PReLU``, one slope per channel applies along dim 1; ``channel_dim`` must name that
    dim when ``num_parameters > 1``.
    """

    activation = "prelu"
    replaces = nn.PReLU
    _torch_args = ("num_parameters",)  # and init and the weight, copied by _build_from/_build_torch

    def __init__(self, num_parameters: int = 1, init: float = 0.25, device=None, dtype=None, *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        self.num_parameters = num_parameters
        self.init = init
        self.weight = nn.Parameter(torch.empty(num_parameters, device=device, dtype=dtype).fill_(init))

    def _op_args(self) -> dict:
        return {"weight": self.weight}

    def _off_slope(self) -> Tensor:
        w = self.weight.detach().to(self.on_counts.device)
        return w[0] if w.numel() == 1 else w

    def forward(self, input: Tensor) -> Tensor:
        if self.track and not self.linearized and self.num_parameters > 1 and input.dim() >= 2:
            if self.channel_dim % input.dim() != 1:
                raise ValueError(
                    f"EntropyPReLU has {self.num_parameters} slopes, which nn.PReLU applies along dim 1, "
                    f"but channel_dim={self.channel_dim} names dim {self.channel_dim % input.dim()} of a "
                    f"{input.dim()}-d input; use channel_dim=1"
                )
        return super().forward(input)

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.prelu(input, self.weight)

    @classmethod
    def _build_from(cls, module: nn.PReLU, **kwargs) -> "EntropyPReLU":
        w = module.weight
        new = cls(module.num_parameters, module.init, device=w.device, dtype=w.dtype, **kwargs)
        with torch.no_grad():
            new.weight.copy_(w)
        new.weight.requires_grad_(w.requires_grad)
        return new

    def _build_torch(self) -> nn.Module:
        m = nn.PReLU(self.num_parameters, self.init, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(self.weight)
        return m


class EntropyGELU(EntropyActivation):
    """``nn.GELU`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`.

    Args:
        approximate: ``"none"`` (exact, erf) or ``"tanh"``.
    """

    activation = "gelu"
    replaces = nn.GELU
    _torch_args = ("approximate",)

    def __init__(self, approximate: str = "none", *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate argument must be either none or tanh, got {approximate!r}")
        self.approximate = approximate
        self.activation = "gelu" if approximate == "none" else "gelu_tanh"

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, approximate=self.approximate)


class EntropySiLU(_InplaceActivation):
    """``nn.SiLU`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`
    and :class:`EntropyReLU` for ``inplace``."""

    activation = "silu"
    replaces = nn.SiLU

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.silu(input, inplace=self.inplace)


class EntropyHardswish(_InplaceActivation):
    """``nn.Hardswish`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`
    and :class:`EntropyReLU` for ``inplace``."""

    activation = "hardswish"
    replaces = nn.Hardswish

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.hardswish(input, inplace=self.inplace)


class EntropyELU(EntropyActivation):
    """``nn.ELU`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`.

    Args:
        alpha: the scale of the negative side, ``alpha * (exp(x) - 1)`` (which tends to ``-alpha``).
        inplace: see :class:`EntropyReLU`.
    """

    activation = "elu"
    replaces = nn.ELU
    _torch_args = ("alpha", "inplace")

    def __init__(self, alpha: float = 1.0, inplace: bool = False, *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        self.alpha = alpha
        self.inplace = inplace

    def _op_args(self) -> dict:
        return {"alpha": self.alpha}

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.elu(input, self.alpha, self.inplace)


class EntropyMish(_InplaceActivation):
    """``nn.Mish`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`
    and :class:`EntropyReLU` for ``inplace``."""

    activation = "mish"
    replaces = nn.Mish

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.mish(input, inplace=self.inplace)
