"""easier_ext: entropy-guided depth reduction for PyTorch models.

Fused C++/CUDA kernels apply a rectifier and count each neuron's ON states in the same pass
(:func:`easier_ext.ops.rectify_count`); drop-in modules (:class:`EntropyReLU` and relatives) keep
the counts; :func:`binary_entropy` and :func:`layer_entropy` turn counts into entropies.
:func:`convert`, :func:`measure_entropy`, :func:`linearize` and :func:`fold` do the model
surgery; :func:`export_onnx` and :func:`export_program` write the result for deployment;
:class:`EASIER` and :class:`NEPENTHE` run the whole schedules; ``easier-ext`` is its command line.
"""

from easier_ext._extension import build_info
from easier_ext import ops
from easier_ext.entropy import AGGREGATES, binary_entropy, layer_entropy
from easier_ext.measure import ESTIMATORS, SiteEntropy, measure_entropy
from easier_ext.convert import UntraceableSiteError, convert, site, sites
from easier_ext.linearize import LINEARIZE_MODES, linearize, move_padding
from easier_ext.fold import FOLD_COSTS, fold
from easier_ext.costs import Cost, LatencyComparison, compare, compare_latency, cost
from easier_ext.export import export_onnx, export_program
from easier_ext.models import build_model
from easier_ext.train import NonFiniteLossError, Recipe, evaluate, finetune
from easier_ext.schedule import ScheduleResult
from easier_ext.easier import EASIER, EasierResult
from easier_ext.nepenthe import NEPENTHE, NepentheResult
from easier_ext import pruning
from easier_ext.modules import (
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
    "NepentheResult",
    "NonFiniteLossError",
    "ops",
    "pruning",
    "Recipe",
    "ScheduleResult",
    "site",
    "SiteEntropy",
    "sites",
    "UntraceableSiteError",
]
