"""The base class of the entropy-tracking modules: a rectifier that counts, per neuron, how often
its pre-activation is ON, and can be linearized. The drop-in classes are in
:mod:`easier_ext.core.modules`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from easier_ext.core import ops
from easier_ext.core.checks import is_real
from easier_ext.core.entropy import binary_entropy, layer_entropy
from easier_ext.core.shapes import channel_view

__all__ = ["EntropyActivation", "TRACKED_MODULES"]

#: torch.nn activation class -> the :class:`EntropyActivation` subclass that replaces it (filled as
#: the subclasses are defined, in :mod:`easier_ext.core.modules`)
TRACKED_MODULES: dict[type, type] = {}


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
    #: the torch.nn module this class replaces (a subclass that sets it is found by
    #: :meth:`from_module` and :func:`easier_ext.convert`)
    replaces: type = nn.Module
    #: the attributes shared with that module: copied by :meth:`from_module` and :meth:`to_torch`,
    #: and shown by ``repr``
    _torch_args: tuple = ()

    on_counts: Tensor
    observations: Tensor
    #: the entropy proxy's temperature while regularized (see :meth:`regularize`), else None;
    #: class-level defaults, so that modules pickled before these existed load with them
    entropy_tau: Optional[float] = None
    #: the last regularized forward's mean entropy proxy, in bits per element (with its graph)
    entropy_proxy: Optional[Tensor] = None

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

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "replaces" in cls.__dict__:
            TRACKED_MODULES[cls.replaces] = cls

    # -- what subclasses define ------------------------------------------------------------
    def _op_args(self) -> dict:
        """Keyword arguments of :func:`easier_ext.ops.rectify_count` for this activation."""
        return {}

    def _torch_forward(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def _build_from(cls, module: nn.Module, **kwargs) -> "EntropyActivation":
        """This class's module equal to the torch ``module`` (see :meth:`from_module`)."""
        return cls(**{name: getattr(module, name) for name in cls._torch_args}, **kwargs)

    def _build_torch(self) -> nn.Module:
        """The torch module equal to this one, not linearized (see :meth:`to_torch`)."""
        return self.replaces(**{name: getattr(self, name) for name in self._torch_args})

    def to_torch(self) -> nn.Module:
        """The plain torch module with the same forward (``nn.Identity`` once linearized).

        Raises:
            ValueError: for a site linearized with a per-neuron multiplier, which no single torch
                module expresses; :func:`easier_ext.fold` folds it into the neighbouring layers.
        """
        if not self.linearized:
            return self._build_torch()
        if self.linear_scale is not None:
            raise ValueError(
                f"{type(self).__name__} was linearized with a per-neuron multiplier, which has no torch.nn module; "
                "use easier_ext.fold(model, example_input) to fold it into the neighbouring layers"
            )
        return nn.Identity()

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        if self.linearized:
            return input if self.linear_scale is None else input * channel_view(self.linear_scale.to(input.dtype), input.dim(), self.channel_dim)
        if self.entropy_tau is not None and torch.is_grad_enabled():
            return self._regularized_forward(input)
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

    def _regularized_forward(self, input: Tensor) -> Tensor:
        if self.track:
            self._check_counts_fit(input)
        out, counts, sums = ops.rectify_count_entropy(
            input, self.activation, tau=self.entropy_tau, channel_dim=self.channel_dim, **self._op_args()
        )
        if self.track:
            self._accumulate(input, counts)
        # the mean over neurons of each neuron's mean entropy (every neuron sees numel / C values)
        self.entropy_proxy = sums.sum() / max(input.numel(), 1)
        return out

    # -- the entropy regularizer -----------------------------------------------------------
    def regularize(self, tau: Optional[float]) -> None:
        """Makes each forward that records gradients also compute a differentiable proxy of the
        site's entropy (:func:`easier_ext.ops.rectify_count_entropy`, in the same pass), left in
        :attr:`entropy_proxy` for a loss term; ``None`` stops it and drops the last proxy.

        Args:
            tau: the proxy's temperature (> 0), or ``None``.
        """
        if tau is not None and not (is_real(tau) and tau > 0):
            raise ValueError(f"tau must be a positive, finite temperature, got {tau!r}")
        self.entropy_tau = None if tau is None else float(tau)
        self.entropy_proxy = None

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
        target = TRACKED_MODULES.get(type(module))
        if target is None:
            names = ", ".join(f"nn.{t.__name__}" for t in TRACKED_MODULES)
            raise TypeError(f"cannot make an entropy-tracking module from {type(module).__name__}; expected one of {names}")
        if cls is not EntropyActivation and target is not cls:
            raise TypeError(f"{cls.__name__}.from_module expects nn.{cls.replaces.__name__}, got {type(module).__name__}")
        return target._build_from(module, channel_dim=channel_dim, track=track)

    def extra_repr(self) -> str:
        # as torch shows them: inplace only when set
        parts = [f"{name}={getattr(self, name)!r}" for name in self._torch_args if name != "inplace"]
        if getattr(self, "inplace", False):
            parts.append("inplace=True")
        parts.append(f"channel_dim={self.channel_dim}")
        if not self.track:
            parts.append("track=False")
        if self.linearized:
            parts.append("linearized=True")
        return ", ".join(parts)
