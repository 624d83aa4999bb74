"""Measure every site's entropy over a dataset, in one pass, also across DDP ranks."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from easier_ext.core.checks import is_int
from easier_ext.core.sites import sites as list_sites
from easier_ext.core.entropy import AGGREGATES, binary_entropy, layer_entropy
from easier_ext.core.modules import EntropyActivation
from easier_ext.core.runtime import autocast, batch_count, model_device, progress as progress_bar, unwrap_ddp, world_size

__all__ = ["SiteEntropy", "measure_entropy", "ESTIMATORS"]

#: ``"counts"``: ON counts (z > 0) accumulated over the whole pass, then entropy (this package).
#: ``"easier_reference"``: what the EASIER reference code computes: z >= 0, a layer entropy per
#: batch, averaged over batches (biased low); for comparison only.
ESTIMATORS = ("counts", "easier_reference")


@dataclass
class SiteEntropy:
    """One site's entropy over a measurement pass.

    Attributes:
        name: the site's name (see :func:`easier_ext.sites`).
        entropy: the layer entropy with the requested aggregate, in bits.
        neurons: float64 ``(C,)`` per-neuron entropy (CPU); for ``"easier_reference"``, the
            entropies of the pooled counts.
        on_counts: int64 ``(C,)`` ON counts (CPU).
        observations: how many values each neuron saw.
        aggregate: the aggregate ``entropy`` was computed with.
    """

    name: str
    entropy: float
    neurons: Tensor
    on_counts: Tensor
    observations: int
    aggregate: str

    @property
    def constant(self) -> bool:
        """Every neuron was always ON or always OFF (the site is exactly linear on this data)."""
        return self.observations > 0 and bool(((self.on_counts == 0) | (self.on_counts == self.observations)).all())


def measure_entropy(
    model: nn.Module,
    loader: Iterable,
    *,
    max_batches: Optional[int] = None,
    train: bool = False,
    amp: Union[bool, torch.dtype] = False,
    device: Union[str, torch.device, None] = None,
    aggregate: str = "easier",
    estimator: str = "counts",
    progress: bool = True,
) -> dict[str, SiteEntropy]:
    """Runs the model over ``loader`` once and returns every site's entropy.

    Counts are accumulated on the device over the whole pass (no host synchronisation per batch)
    and turned into entropies at the end. Under ``torch.distributed`` the counts are all-reduced,
    so every rank returns what one process would on the union of the ranks' data. The model's
    state is left as it was: the sites' counts are reset before the pass and hold the pass's
    counts after it; tracking flags, the training flag and (in ``train`` mode) BatchNorm running
    statistics are restored.

    A site that no batch reached (a branch the model does not take in this mode, such as an
    auxiliary head that runs only in training, or a module its forward never calls) has no
    observation, so its entropy is unknown, not 0: it is left out of the result, with a warning
    naming it, and so a schedule never linearizes it.

    Args:
        model: a converted model (see :func:`easier_ext.convert`), or a DDP wrapper of one.
        loader: iterable of batches: a tensor, or a tuple/list whose first item is the input,
            or a dict with an ``"input"`` key.
        max_batches: stop after this many batches (per rank).
        train: run in train mode (as the EASIER reference does, during training) instead of eval.
        amp: autocast: ``True`` for float16 on CUDA / bfloat16 on CPU, or a dtype.
        device: where to run; default: the model's parameters' device.
        aggregate: ``"easier"`` or ``"nepenthe"`` (see :func:`easier_ext.layer_entropy`).
        estimator: one of :data:`ESTIMATORS`.
        progress: show a progress bar (rank 0 only).

    Returns:
        ``{site name: SiteEntropy}`` in execution order, for the sites that saw data.

    Raises:
        ValueError: no sites, an empty loader, no site reached by any batch, an unknown
            aggregate or estimator, ``max_batches`` below 1.
    """
    if max_batches is not None and (not is_int(max_batches) or max_batches < 1):
        raise ValueError(f"max_batches must be an int >= 1 (or None for the whole loader), got {max_batches!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown entropy aggregate {aggregate!r}; expected one of {AGGREGATES}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if estimator == "easier_reference" and aggregate != "easier":
        raise ValueError("the easier_reference estimator averages the 'easier' aggregate; use aggregate='easier'")
    net = unwrap_ddp(model)
    found = {n: s for n, s in list_sites(net).items() if not s.linearized}
    if not found:
        raise ValueError(f"{type(net).__name__} has no sites left to measure (none, or all linearized); call easier_ext.convert(model) first")
    device = torch.device(device) if device is not None else model_device(net)

    reference = _ReferenceEstimator(found) if estimator == "easier_reference" else None
    batches = 0
    with _measuring(net, found, train, counting=reference is None), torch.no_grad(), autocast(device, amp):
        for batch in progress_bar(loader, total=batch_count(loader, max_batches), desc="measuring entropy", enabled=progress):
            net(_to_device(_input_of(batch), device))
            batches += 1
            if batches == max_batches:
                break
        if reference is not None:
            reference.close()
    if batches == 0:
        raise ValueError("the loader gave no batches; nothing was measured")

    if reference is not None:
        return _measured(reference.results(batches), found, train)
    _all_reduce_counts(found)
    return _measured({name: _site_entropy(name, s, aggregate) for name, s in found.items() if int(s.observations) > 0}, found, train)


def _measured(result: dict[str, SiteEntropy], found: dict[str, EntropyActivation], train: bool) -> dict[str, SiteEntropy]:
    """``result`` once every site is known to have run; warns about (or refuses) the others."""
    never = [n for n in found if n not in result]
    mode = "train" if train else "eval"
    if not result:
        raise ValueError(f"no site saw any data in this measurement ({mode} mode): the model's forward never reached {', '.join(never)}")
    if never:
        warnings.warn(
            f"{len(never)} of {len(found)} sites never ran in this measurement ({mode} mode), so their entropy is unknown; "
            f"they are left out of the result: {', '.join(never)}", stacklevel=3,
        )
    return result


def _site_entropy(name: str, s: EntropyActivation, aggregate: str) -> SiteEntropy:
    counts, obs = s.on_counts.cpu(), s.observations.cpu()
    return SiteEntropy(name, float(layer_entropy(counts, obs, aggregate)), binary_entropy(counts, obs), counts, int(obs), aggregate)


@contextlib.contextmanager
def _measuring(net: nn.Module, found: dict[str, EntropyActivation], train: bool, counting: bool):
    was_training = net.training
    tracks = {n: s.track for n, s in found.items()}
    saved_bn = _batchnorm_state(net) if train else None
    for s in found.values():
        s.reset_stats()
        s.track = counting
    net.train(train)
    try:
        yield
    finally:
        net.train(was_training)
        for n, s in found.items():
            s.track = tracks[n]
        if saved_bn is not None:
            with torch.no_grad():
                for t, saved in saved_bn:
                    t.copy_(saved)


def _batchnorm_state(net: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Copies of the BatchNorm running statistics that a train-mode pass would update."""
    out = []
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for t in (m.running_mean, m.running_var, m.num_batches_tracked):
                if t is not None:
                    out.append((t, t.detach().clone()))
    return out


def _all_reduce_counts(found: dict[str, EntropyActivation]) -> None:
    """Sums every site's counts over the ranks in two collectives.

    A rank that saw no data for a site has an empty counts buffer; sizes are agreed first.
    """
    if world_size() == 1:
        return
    sites = list(found.values())
    device = sites[0].observations.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = torch.tensor([s.on_counts.numel() for s in sites], dtype=torch.int64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    flat = []
    for s, n in zip(sites, sizes.tolist()):
        counts = s.on_counts.to(device)
        flat.append(torch.cat([counts, counts.new_zeros(n - counts.numel())]) if counts.numel() < n else counts)
        flat.append(s.observations.to(device).reshape(1))
    total = torch.cat(flat)
    dist.all_reduce(total)
    offset = 0
    for s, n in zip(sites, sizes.tolist()):
        s.on_counts = total[offset : offset + n].to(s.observations.device).clone()
        s.observations.copy_(total[offset + n])
        offset += n + 1


class _ReferenceEstimator:
    """The EASIER reference code's estimator: hooks keep each site's input, count z >= 0 per
    batch, and average per-batch layer entropies. Slow by design; for comparison."""

    def __init__(self, found: dict[str, EntropyActivation]) -> None:
        self.found = found
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.obs: dict[str, int] = {n: 0 for n in found}
        self.handles = [s.register_forward_pre_hook(self._hook(n)) for n, s in found.items()]

    def _hook(self, name: str):
        def hook(module: EntropyActivation, args: tuple) -> None:
            z = args[0].detach()
            d = module.channel_dim % z.dim()
            per_channel = (z >= 0).movedim(d, 0).reshape(z.shape[d], -1)
            counts, n = per_channel.sum(1), per_channel.shape[1]
            h = layer_entropy(counts, n, "easier")
            self.sums[name] = self.sums.get(name, 0) + h
            self.counts[name] = self.counts.get(name, 0) + counts
            self.obs[name] += n

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def results(self, batches: int) -> dict[str, SiteEntropy]:
        out = {}
        for name in self.found:
            if not self.obs[name]:
                continue  # never ran: see _measured
            counts = self.counts[name].cpu()
            h = float(self.sums[name]) / batches
            out[name] = SiteEntropy(name, h, binary_entropy(counts, self.obs[name]), counts, self.obs[name], "easier")
        return out


def _input_of(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        if "input" not in batch:
            raise ValueError(f"a dict batch needs an 'input' key, got keys {sorted(batch)}")
        return batch["input"]
    return batch


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    raise TypeError(f"expected each batch's input to be a tensor, got {type(x).__name__}")

