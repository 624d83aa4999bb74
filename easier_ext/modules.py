"""Drop-in rectifier modules that measure the entropy of their neurons' ON/OFF states.

``nn.ReLU()`` becomes ``easier_ext.EntropyReLU()``: same arguments, same outputs, plus per-neuron
ON counts kept as buffers while ``track`` is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easier_ext import ops
from easier_ext.entropy import binary_entropy, layer_entropy

__all__ = [
    "EntropyActivation",
    "EntropyReLU",
    "EntropyReLU6",
    "EntropyLeakyReLU",
    "EntropyPReLU",
    "EntropyGELU",
    "EntropySiLU",
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

    #: the op's name for this activation (see :data:`easier_ext.ops.ACTIVATIONS`)
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
        #: when True the module is the identity (the site has been linearized)
        self.linearized = False
        self.register_buffer("on_counts", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("observations", torch.zeros((), dtype=torch.int64))

    # -- what subclasses define ------------------------------------------------------------
    def _op_args(self) -> dict:
        """Keyword arguments of :func:`easier_ext.ops.rectify_count` for this activation."""
        return {}

    def _torch_forward(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def _from_torch(cls, module: nn.Module, **kwargs) -> "EntropyActivation":
        raise NotImplementedError

    def to_torch(self) -> nn.Module:
        """The plain torch module with the same forward (``nn.Identity`` once linearized)."""
        raise NotImplementedError

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        if self.linearized:
            return input
        if not self.track:
            return self._torch_forward(input)
        out, counts = ops.rectify_count(
            input, self.activation, channel_dim=self.channel_dim, **self._op_args()
        )
        self._accumulate(input, counts)
        return out

    def _accumulate(self, input: Tensor, counts: Tensor) -> None:
        # Every check comes before the first write, so a refused call leaves the counts as they were.
        channels = counts.shape[0]
        if self.observations.device != counts.device:
            raise RuntimeError(
                f"{type(self).__name__}'s counts are on {self.observations.device} but its input is on "
                f"{counts.device}; move the module with .to({str(counts.device)!r})"
            )
        if self.on_counts.shape[0] != channels:
            if self.on_counts.numel() != 0:
                raise ValueError(
                    f"{type(self).__name__} has counted {self.on_counts.shape[0]} neurons along dim "
                    f"{self.channel_dim}, but got an input of shape {tuple(input.shape)} with {channels}; "
                    "call reset_stats() before measuring differently shaped inputs"
                )
            self.on_counts = torch.zeros_like(counts)  # sized on first use
        self.on_counts.add_(counts)
        self.observations.add_(input.numel() // channels if channels else 0)

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
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, *, channel_dim: int = 1, track: bool = True) -> "EntropyActivation":
        """Builds the tracked equivalent of a torch activation module.

        Called on :class:`EntropyActivation`, the class is chosen from the module's type; called
        on a subclass, the module must be the type that subclass replaces. Parameters (PReLU's
        weight), slopes and the GELU approximation are carried over.

        Args:
            module: an ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``, ``nn.PReLU``, ``nn.GELU`` or
                ``nn.SiLU``.
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

    ``inplace`` is honoured when not tracking. While tracking, the output is a new tensor and the
    input is left as it was (the fused kernel writes its output elsewhere).
    """

    def __init__(self, inplace: bool = False, *, channel_dim: int = 1, track: bool = True) -> None:
        super().__init__(channel_dim=channel_dim, track=track)
        self.inplace = inplace

    @classmethod
    def _from_torch(cls, module: nn.Module, **kwargs) -> "_InplaceActivation":
        return cls(module.inplace, **kwargs)

    def to_torch(self) -> nn.Module:
        return nn.Identity() if self.linearized else self.torch_module(self.inplace)

    def _torch_extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class EntropyReLU(_InplaceActivation):
    """``nn.ReLU`` that counts its neurons' ON states. See :class:`EntropyActivation`.

    Args:
        inplace: accepted for ``nn.ReLU`` compatibility; honoured when not tracking. While tracking,
            the output is a new tensor and the input is left as it was.
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

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)

    @classmethod
    def _from_torch(cls, module: nn.LeakyReLU, **kwargs) -> "EntropyLeakyReLU":
        return cls(module.negative_slope, module.inplace, **kwargs)

    def to_torch(self) -> nn.Module:
        return nn.Identity() if self.linearized else nn.LeakyReLU(self.negative_slope, self.inplace)

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

    def to_torch(self) -> nn.Module:
        if self.linearized:
            return nn.Identity()
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

    def to_torch(self) -> nn.Module:
        return nn.Identity() if self.linearized else nn.GELU(self.approximate)

    def _torch_extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class EntropySiLU(_InplaceActivation):
    """``nn.SiLU`` that counts its neurons' ON states (ON is > 0). See :class:`EntropyActivation`
    and :class:`EntropyReLU` for ``inplace``."""

    activation = "silu"
    torch_module = nn.SiLU

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.silu(input, inplace=self.inplace)


_SUBCLASS_FOR: dict = {
    cls.torch_module: cls
    for cls in (EntropyReLU, EntropyReLU6, EntropyLeakyReLU, EntropyPReLU, EntropyGELU, EntropySiLU)
}
