"""Drop-in rectifier modules that measure the entropy of their neurons' ON/OFF states.

``nn.ReLU()`` becomes ``easier_ext.EntropyReLU()``: same arguments, same outputs, plus per-neuron
ON counts kept as buffers while ``track`` is on.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easier_ext.core import ops
from easier_ext.core.entropy import binary_entropy, layer_entropy

__all__ = [
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


class EntropyActivation(nn.Module):
    """Base class: a rectifier that counts, per neuron, how often its pre-activation is ON (> 0).

    A neuron is one index along ``channel_dim``. Counts accumulate over calls until
    :meth:`reset_stats`; ``on_counts`` (int64, ``(C,)``, sized on first use) and ``observations``
    (int64 scalar: how many values each neuron has seen) are buffers, so ``state_dict`` carries
    them.

    Args:
        channel_dim: the neurons' dim: 1 for ``(N, C, ...)`` conv outputs and ``(N, F)``, -1 for
            ``(..., C)`` Linear outputs (transformer MLPs).
        track: count while running (the fused kernel); when off, torch's own functional runs.
    """

    #: the op's name for this activation (see :data:`easier_ext.core.ops.ACTIVATIONS`)
    activation: str = ""
    #: the torch.nn module this class replaces
    torch_module: type = nn.Module

    on_counts: Tensor
    observations: Tensor

    def __init__(self, *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__()
        if not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
        self.channel_dim = channel_dim
        self.track = track
        #: when True the site has been linearized: the module is the identity, or, with
        #: ``linear_scale`` set, a fixed per-neuron multiplier (see :meth:`linearize`)
        self.linearized = False
        self.register_buffer("on_counts", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("observations", torch.zeros((), dtype=torch.int64))
        self.register_buffer("linear_scale", None)

    # -- what subclasses define ------------------------------------------------------------
    def _op_args(self) -> dict:
        """Keyword arguments of :func:`easier_ext.core.ops.rectify_count` for this activation."""
        return {}

    def _torch_forward(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def _from_torch(cls, module: nn.Module, **kwargs) -> "EntropyActivation":
        raise NotImplementedError

    def _torch_module(self) -> nn.Module:
        raise NotImplementedError

    def to_torch(self) -> nn.Module:
        """The plain torch module with the same forward (``nn.Identity`` once linearized).

        Raises:
            ValueError: for a site linearized with a per-neuron multiplier, which no single torch
                module expresses; :func:`easier_ext.surgery.fold` folds it into the neighbouring layers.
        """
        if not self.linearized:
            return self._torch_module()
        if self.linear_scale is not None:
            raise ValueError(
                f"{type(self).__name__} was linearized with a per-neuron multiplier, which has no torch.nn module; "
                "use easier_ext.surgery.fold(model, example_input) to fold it into the neighbouring layers"
            )
        return nn.Identity()

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        if self.linearized:
            return input if self.linear_scale is None else input * self._scale_view(input)
        if not self.track:
            return self._torch_forward(input)
        # Every check comes before the op, so a refused call changes neither the counts nor an
        # input the in-place op would write.
        self._check_counts_fit(input)
        if getattr(self, "inplace", False) and not (torch.is_grad_enabled() and input.requires_grad):
            counts = ops.rectify_count_(input, self.activation, channel_dim=self.channel_dim, **self._op_args())
            self._accumulate(input, counts)
            return input
        out, counts = ops.rectify_count(input, self.activation, channel_dim=self.channel_dim, **self._op_args())
        self._accumulate(input, counts)
        return out

    def _check_counts_fit(self, input: Tensor) -> None:
        if self.observations.device != input.device:
            raise RuntimeError(
                f"{type(self).__name__}'s counts are on {self.observations.device} but its input is on "
                f"{input.device}; move the module with .to({str(input.device)!r})"
            )
        if input.dim() == 0 or self.on_counts.numel() == 0:
            return  # the op refuses a 0-d input; empty counts are sized on first use
        channels = input.shape[self.channel_dim % input.dim()]
        if self.on_counts.shape[0] != channels:
            raise ValueError(
                f"{type(self).__name__} has counted {self.on_counts.shape[0]} neurons along dim "
                f"{self.channel_dim}, but got an input of shape {tuple(input.shape)} with {channels}; "
                "call reset_stats() before measuring differently shaped inputs"
            )

    def _accumulate(self, input: Tensor, counts: Tensor) -> None:
        channels = counts.shape[0]
        if self.on_counts.shape[0] != channels:
            if self.on_counts.numel() != 0:  # _check_counts_fit and the op disagree on the neurons
                raise ValueError(f"{type(self).__name__} has counted {self.on_counts.shape[0]} neurons but the op counted {channels}")
            self.on_counts = torch.zeros_like(counts)  # sized on first use
        self.on_counts.add_(counts)
        self.observations.add_(input.numel() // channels if channels else 0)

    def _scale_view(self, input: Tensor) -> Tensor:
        shape = [1] * input.dim()
        shape[self.channel_dim % input.dim()] = -1
        return self.linear_scale.to(input.dtype).reshape(shape)

    # -- linearization ---------------------------------------------------------------------
    def linearize(self, scale: Optional[Tensor] = None) -> None:
        """Makes the site linear: the identity, or a fixed per-neuron multiplier.

        Args:
            scale: ``None`` for the identity (EASIER); or a ``(C,)`` tensor multiplying each
                neuron, e.g. :meth:`constant_scale` (NEPENTHE's exact replacement of a layer whose
                neurons are all constant).
        """
        if scale is not None:
            if not isinstance(scale, Tensor) or scale.dim() != 1 or not scale.is_floating_point():
                raise TypeError(f"scale must be a 1-d floating-point tensor (one value per neuron) or None, got {scale!r}")
            scale = scale.detach().clone()
        self.linear_scale = scale
        self.linearized = True

    def constant_scale(self) -> Tensor:
        """The per-neuron multiplier this activation equals on the data it has counted, when every
        neuron was constant: 1 for an always-ON neuron, the OFF-side slope (0 for ReLU) for an
        always-OFF one.

        Exact for relu, leaky_relu and prelu. For relu6 the upper clamp, and for the smooth ones
        (gelu, silu, hardswish, elu, mish) the curvature, are dropped: there the multiplier is the
        function's slope far from 0 on each side (1 when ON, 0 when OFF).

        Returns:
            float tensor of shape ``(C,)``.

        Raises:
            ValueError: when nothing was counted, or when some neuron was neither always ON nor
                always OFF (its entropy is > 0, so no fixed multiplier reproduces it).
        """
        obs = int(self.observations)
        if obs == 0 or self.on_counts.numel() == 0:
            raise ValueError(f"{type(self).__name__} has not counted anything yet; measure its entropy first")
        on = self.on_counts == obs
        off = self.on_counts == 0
        mixed = int((~(on | off)).sum())
        if mixed:
            raise ValueError(
                f"{type(self).__name__} has {mixed} of {self.on_counts.numel()} neurons that are neither always ON nor "
                "always OFF (entropy > 0): no fixed per-neuron multiplier reproduces it; linearize it as the identity instead"
            )
        return torch.where(on, 1.0, self._off_slope().to(torch.float32).expand(on.shape))

    def _off_slope(self) -> Tensor:
        """The slope of the OFF side (a scalar or one value per neuron)."""
        return torch.zeros((), device=self.on_counts.device)

    def get_extra_state(self) -> dict:
        return {"linearized": self.linearized}

    def set_extra_state(self, state: dict) -> None:
        self.linearized = bool(state.get("linearized", False))

    # -- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forgets every count (the counts buffer is sized again on the next tracked call)."""
        self.on_counts = torch.zeros(0, dtype=torch.int64, device=self.on_counts.device)
        self.observations.zero_()

    def entropy(self) -> Tensor:
        """Per-neuron binary entropy of the ON/OFF state, in bits.

        Returns:
            float64 tensor of shape ``(C,)`` (empty before the first tracked call).
        """
        return binary_entropy(self.on_counts, self.observations)

    def layer_entropy(self, aggregate: str = "easier") -> Tensor:
        """The layer's entropy: see :func:`easier_ext.layer_entropy`.

        Args:
            aggregate: ``"easier"`` (mean over all neurons) or ``"nepenthe"`` (mean over neurons
                neither always ON nor always OFF).

        Returns:
            0-d float64 tensor in ``[0, 1]``.
        """
        return layer_entropy(self.on_counts, self.observations, aggregate)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The counts buffer is sized on first use: take the saved size before loading into it.
        saved = state_dict.get(prefix + "on_counts")
        if isinstance(saved, Tensor) and saved.shape != self.on_counts.shape:
            self.on_counts = torch.zeros(saved.shape, dtype=torch.int64, device=self.on_counts.device)
        scale = state_dict.get(prefix + "linear_scale")
        if isinstance(scale, Tensor) and (self.linear_scale is None or scale.shape != self.linear_scale.shape):
            self.linear_scale = torch.zeros(scale.shape, dtype=scale.dtype, device=self.on_counts.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, *, channel_dim: int = 1, track: bool = True) -> "EntropyActivation":
        """Builds the tracked equivalent of a torch activation module.

        Called on :class:`EntropyActivation`, the class is chosen from the module's type; called
        on a subclass, the module must be the type that subclass replaces. Parameters (PReLU's
        weight), slopes, ELU's alpha and the GELU approximation are carried over.

        Args:
            module: an ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``, ``nn.PReLU``, ``nn.GELU``,
                ``nn.SiLU``, ``nn.Hardswish``, ``nn.ELU`` or ``nn.Mish``.
            channel_dim: the neurons' dim (see the class docstring).
            track: count while running.

        Returns:
            the new module, on the same device as ``module``'s parameters.
        """
        target = _SUBCLASS_FOR.get(type(module))
        if target is None:
            names = ", ".join(f"nn.{t.__name__}" for t in _SUBCLASS_FOR)
            raise TypeError(f"cannot make an entropy-tracking module from {type(module).__name__}; expected one of {names}")
        if cls is not EntropyActivation and target is not cls:
            raise TypeError(f"{cls.__name__}.from_module expects nn.{cls.torch_module.__name__}, got {type(module).__name__}")
        return target._from_torch(module, channel_dim=channel_dim, track=track)

    def extra_repr(self) -> str:
        parts = [self._torch_extra_repr(), f"channel_dim={self.channel_dim}"]
        if not self.track:
            parts.append("track=False")
        if self.linearized:
            parts.append("linearized=True")
        return ", ".join(p for p in parts if p)

    def _torch_extra_repr(self) -> str:
        return ""


class _InplaceActivation(EntropyActivation):
    """An activation whose torch module takes ``inplace``.

    ``inplace`` is honoured as torch does, also while tracking, except where autograd needs the
    input (grad enabled and the input requires grad): there the output is a new tensor.
    """

    def __init__(self, inplace: bool = False, *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        self.inplace = inplace

    @classmethod
    def _from_torch(cls, module: nn.Module, **kwargs) -> "_InplaceActivation":
        return cls(module.inplace, **kwargs)

    def _torch_module(self) -> nn.Module:
        return self.torch_module(self.inplace)

    def _torch_extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class EntropyReLU(_InplaceActivation):
    """``nn.ReLU`` that counts its neurons' ON states. See :class:`EntropyActivation`.

    Args:
        inplace: as in ``nn.ReLU``: overwrite the input, unless autograd needs it while
            tracking (see :class:`_InplaceActivation`).
    """

    activation = "relu"
    torch_module = nn.ReLU

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class EntropyReLU6(_InplaceActivation):
    """``nn.ReLU6`` that counts its neurons' ON states (ON is > 0; the upper saturation is not
    counted). See :class:`EntropyActivation` and :class:`EntropyReLU` for ``inplace``."""

    activation = "relu6"
    torch_module = nn.ReLU6

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.relu6(input, inplace=self.inplace)


class EntropyLeakyReLU(EntropyActivation):
    """``nn.LeakyReLU`` that counts its neurons' ON states. See :class:`EntropyActivation`.

    Args:
        negative_slope: slope for inputs <= 0.
        inplace: see :class:`EntropyReLU`.
    """

    activation = "leaky_relu"
    torch_module = nn.LeakyReLU

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

    @classmethod
    def _from_torch(cls, module: nn.LeakyReLU, **kwargs) -> "EntropyLeakyReLU":
        return cls(module.negative_slope, module.inplace, **kwargs)

    def _torch_module(self) -> nn.Module:
        return nn.LeakyReLU(self.negative_slope, self.inplace)

    def _torch_extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace else "")


class EntropyPReLU(EntropyActivation):
    """``nn.PReLU`` that counts its neurons' ON states. See :class:`EntropyActivation`.

    Args:
        num_parameters: 1 (one shared slope) or the number of channels.
        init: initial slope.

    As in ``nn.PReLU``, one slope per channel applies along dim 1; ``channel_dim`` must name that
    dim when ``num_parameters > 1``.
    """

    activation = "prelu"
    torch_module = nn.PReLU

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
    def _from_torch(cls, module: nn.PReLU, **kwargs) -> "EntropyPReLU":
        w = module.weight
        new = cls(module.num_parameters, module.init, device=w.device, dtype=w.dtype, **kwargs)
        with torch.no_grad():
            new.weight.copy_(w)
        new.weight.requires_grad_(w.requires_grad)
        return new

    def _torch_module(self) -> nn.Module:
        m = nn.PReLU(self.num_parameters, self.init, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(self.weight)
        return m

    def _torch_extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters}"


class EntropyGELU(EntropyActivation):
    """``nn.GELU`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`.

    Args:
        approximate: ``"none"`` (exact, erf) or ``"tanh"``.
    """

    activation = "gelu"
    torch_module = nn.GELU

    def __init__(self, approximate: str = "none", *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate argument must be either none or tanh, got {approximate!r}")
        self.approximate = approximate
        self.activation = "gelu" if approximate == "none" else "gelu_tanh"

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, approximate=self.approximate)

    @classmethod
    def _from_torch(cls, module: nn.GELU, **kwargs) -> "EntropyGELU":
        return cls(module.approximate, **kwargs)

    def _torch_module(self) -> nn.Module:
        return nn.GELU(self.approximate)

    def _torch_extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class EntropySiLU(_InplaceActivation):
    """``nn.SiLU`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`
    and :class:`EntropyReLU` for ``inplace``."""

    activation = "silu"
    torch_module = nn.SiLU

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.silu(input, inplace=self.inplace)


class EntropyHardswish(_InplaceActivation):
    """``nn.Hardswish`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`
    and :class:`EntropyReLU` for ``inplace``."""

    activation = "hardswish"
    torch_module = nn.Hardswish

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.hardswish(input, inplace=self.inplace)


class EntropyELU(EntropyActivation):
    """``nn.ELU`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`.

    Args:
        alpha: the scale of the negative side, ``alpha * (exp(x) - 1)`` (which tends to ``-alpha``).
        inplace: see :class:`EntropyReLU`.
    """

    activation = "elu"
    torch_module = nn.ELU

    def __init__(self, alpha: float = 1.0, inplace: bool = False, *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        self.alpha = alpha
        self.inplace = inplace

    def _op_args(self) -> dict:
        return {"alpha": self.alpha}

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.elu(input, self.alpha, self.inplace)

    @classmethod
    def _from_torch(cls, module: nn.ELU, **kwargs) -> "EntropyELU":
        return cls(module.alpha, module.inplace, **kwargs)

    def _torch_module(self) -> nn.Module:
        return nn.ELU(self.alpha, self.inplace)

    def _torch_extra_repr(self) -> str:
        return f"alpha={self.alpha}" + (", inplace=True" if self.inplace else "")


class EntropyMish(_InplaceActivation):
    """``nn.Mish`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`
    and :class:`EntropyReLU` for ``inplace``."""

    activation = "mish"
    torch_module = nn.Mish

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.mish(input, inplace=self.inplace)


_SUBCLASS_FOR: dict = {
    cls.torch_module: cls
    for cls in (
        EntropyReLU, EntropyReLU6, EntropyLeakyReLU, EntropyPReLU, EntropyGELU, EntropySiLU,
        EntropyHardswish, EntropyELU, EntropyMish,
    )
}
