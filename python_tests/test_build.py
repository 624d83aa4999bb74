"""What was built, and every compiled CPU kernel variant (not only the one this CPU picks)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import easier_ext

INFO = easier_ext.build_info()
ORDER = ["DEFAULT", "AVX2", "AVX512"]


def test_build_info():
    assert INFO["version"] == easier_ext.__version__
    assert INFO["torch_version"] == torch.__version__, "built against another torch than the one running"
    assert INFO["cpu_capability"] in INFO["cpu_capabilities"]
    assert INFO["cpu_parallel"] == "OpenMP"
    if INFO["cuda_kernels"]:
        assert INFO["cuda_archs"] and INFO["cuda_version"] == torch.version.cuda


def test_cuda_kernels_built_where_they_can_be():
    """nvcc present + a CUDA build of torch => the CUDA kernels must have been compiled."""
    if os.environ.get("EASIER_EXT_FORCE_CPU"):
        pytest.skip("EASIER_EXT_FORCE_CPU is set")
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("no CUDA compiler on this machine")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build")
    assert INFO["cuda_kernels"], "nvcc and a CUDA torch are here, but the CUDA kernels were not built"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("easier_ext::rectify_count", "CUDA")


def _machine_supports(cap: str) -> bool:
    best = torch.backends.cpu.get_cpu_capability()
    best = next((c for c in reversed(ORDER) if best.startswith(c)), "DEFAULT")
    return ORDER.index(cap) <= ORDER.index(best)


@pytest.mark.parametrize("capability", ORDER)
def test_each_cpu_kernel_variant_matches_torch(capability):
    if capability not in INFO["cpu_capabilities"]:
        pytest.skip(f"the {capability} kernel is not built for this processor")
    if not _machine_supports(capability):
        pytest.skip(f"this CPU cannot run {capability} code")
    here = os.path.dirname(__file__)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    check = f"import easier_ext; assert easier_ext.build_info()['cpu_capability'] == '{capability}'"
    subprocess.run([sys.executable, "-c", check], env=env, cwd=here, check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(here, "test_rectify_count.py"),
         os.path.join(here, "test_entropy_proxy.py"),
         "-k", "(matches_torch_and_numpy or matches_rectify_count_and_the_reference or entropy_proxy_grad_matches or entropy_proxy_grad_at_extreme) and cpu"],
        env=env, cwd=here, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_import_writes_nothing_to_stderr(tmp_path):
    """torch.utils.benchmark (and the cpp_extension it imports) print "No CUDA runtime is found" where
    there is no GPU: they must not be imported with the package, only when something is timed."""
    check = (
        "import sys, easier_ext; print(easier_ext.__file__); "
        "print(sorted(m for m in sys.modules if m.startswith(('torch.utils.benchmark', 'torch.utils.cpp_extension'))))"
    )
    # From an empty directory, so that a source checkout in the cwd is not imported instead.
    result = subprocess.run(
        [sys.executable, "-c", check], env=dict(os.environ), cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    file, modules = result.stdout.splitlines()
    assert file == easier_ext.__file__, "the subprocess imported another easier_ext"
    assert modules == "[]"
