"""easier_ext: entropy-guided depth reduction for PyTorch models.

Fused C++/CUDA kernels apply a rectifier and count each neuron's ON states in the same pass
(:func:`easier_ext.core.ops.rectify_count`); drop-in modules (:class:`EntropyReLU` and relatives) keep
the counts; :func:`binary_entropy` and :func:`layer_entropy` turn counts into entropies.
:func:`convert`, :func:`measure_entropy`, :func:`linearize` and :func:`fold` do the model
surgery; :func:`export_onnx` and :func:`export_program` write the result for deployment;
:class:`EASIER` and :class:`NEPENTHE` run the whole schedules; ``easier-ext`` is its command line.
"""

import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
import sys as _sys

from easier_ext._extension import build_info
from easier_ext.core import ops
from easier_ext.core.entropy import AGGREGATES, binary_entropy, layer_entropy
from easier_ext.surgery.measure import ESTIMATORS, SiteEntropy, measure_entropy
from easier_ext.core.sites import site, sites
from easier_ext.surgery.convert import UntraceableSiteError, convert
from easier_ext.surgery.linearize import LINEARIZE_MODES, linearize, move_padding
from easier_ext.surgery.fold import FOLD_COSTS, fold
from easier_ext.surgery.costs import Cost, LatencyComparison, compare, compare_latency, cost
from easier_ext.surgery.export import export_onnx, export_program
from easier_ext.app.models import build_model
from easier_ext.methods.train import NonFiniteLossError, Recipe, evaluate, finetune, recalibrate_batchnorm
from easier_ext.methods.options import ScheduleOptions
from easier_ext.methods.schedule import ScheduleResult
from easier_ext.methods.easier import EASIER, EasierOptions, EasierResult
from easier_ext.methods.nepenthe import NEPENTHE, NepentheOptions, NepentheResult
from easier_ext.methods import pruning
from easier_ext.core.modules import (
    EntropyActivation,
    EntropyELU,
    EntropyGELU,
    EntropyHardswish,
    EntropyLeakyReLU,
    EntropyMish,
    EntropyPReLU,
    EntropyReLU,
    EntropyReLU6,
    EntropySiLU,
)

__version__ = build_info()["version"]

__all__ = [
    "AGGREGATES",
    "binary_entropy",
    "build_info",
    "build_model",
    "compare",
    "compare_latency",
    "convert",
    "cost",
    "Cost",
    "LatencyComparison",
    "EASIER",
    "EasierOptions",
    "EasierResult",
    "EntropyActivation",
    "EntropyELU",
    "EntropyGELU",
    "EntropyHardswish",
    "EntropyLeakyReLU",
    "EntropyMish",
    "EntropyPReLU",
    "EntropyReLU",
    "EntropyReLU6",
    "EntropySiLU",
    "ESTIMATORS",
    "evaluate",
    "export_onnx",
    "export_program",
    "finetune",
    "fold",
    "FOLD_COSTS",
    "layer_entropy",
    "linearize",
    "LINEARIZE_MODES",
    "measure_entropy",
    "move_padding",
    "NEPENTHE",
    "NepentheOptions",
    "NepentheResult",
    "NonFiniteLossError",
    "ops",
    "pruning",
    "recalibrate_batchnorm",
    "Recipe",
    "ScheduleOptions",
    "ScheduleResult",
    "site",
    "SiteEntropy",
    "sites",
    "UntraceableSiteError",
]

# Where each module lived before the subpackages (0.1.0): pickled models and run checkpoints name
# their classes and functions by these paths, and user code may import them. Importing an old path
# gives the module that now holds it (the same module object, loaded on first use).
_MOVED = {
    "ops": "core.ops", "entropy": "core.entropy", "modules": "core.modules",
    "_tracing": "surgery.tracing", "_faithful": "surgery.faithful", "convert": "surgery.convert",
    "measure": "surgery.measure", "linearize": "surgery.linearize", "chains": "surgery.chains",
    "merge": "surgery.merge", "fold": "surgery.fold", "costs": "surgery.costs", "export": "surgery.export",
    "schedule": "methods.schedule", "easier": "methods.easier", "nepenthe": "methods.nepenthe",
    "pruning": "methods.pruning", "train": "methods.train", "rundir": "methods.rundir",
    "cli": "app.cli", "data": "app.data", "models": "app.models", "report": "app.report",
}


class _MovedModuleFinder(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix == __name__ and rest in _MOVED:
            return _importlib_util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return _importlib.import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module):
        pass  # already executed under its new name


if not any(isinstance(f, _MovedModuleFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModuleFinder())
