"""Loads the compiled extension (which registers the ``torch.ops.easier_ext`` ops)."""

import torch  # noqa: F401  (must come first: the extension links against torch's libraries)

try:
    from easier_ext import _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "easier_ext's compiled extension (easier_ext._C) could not be loaded: "
        f"{e}. Install the package with `pip install --no-build-isolation .` against the torch "
        "you run (see README.md); running from a source checkout without installing does not "
        "build the kernels."
    ) from e


def build_info() -> dict:
    """Describes this build of the extension.

    Returns:
        dict: ``version``; ``torch_version`` it was compiled against; ``cuda_kernels`` (bool),
        ``cuda_version`` and ``cuda_archs`` (the CUDA architectures compiled); ``cpu_capabilities``
        (the vectorized CPU kernel variants compiled), ``cpu_capability`` (the one used on this
        machine) and ``cpu_parallel`` (the threading backend of the CPU kernels).
    """
    return dict(_C.build_info())
