// The Python module object of the extension. Loading it registers the ops (static
// initialisers in the other translation units); build_info says what was built, and the
// no-grad calls (no_grad_call.h) reach the ops without torch.ops' Python layers.
#include <pybind11/pybind11.h>

#include "build_info.h"
#include "no_grad_call.h"

namespace py = pybind11;

namespace {

py::list split(const std::string& joined) {
  py::list out;
  size_t start = 0;
  while (start < joined.size()) {
    size_t end = joined.find_first_of(";,", start);
    if (end == std::string::npos) end = joined.size();
    if (end > start) out.append(joined.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict info;
  info["version"] = EASIER_EXT_VERSION;
  info["torch_version"] = EASIER_EXT_TORCH_VERSION;
#ifdef EASIER_EXT_WITH_CUDA
  info["cuda_kernels"] = true;
  info["cuda_version"] = EASIER_EXT_CUDA_VERSION;
  info["cuda_archs"] = split(EASIER_EXT_CUDA_ARCHS);
#else
  info["cuda_kernels"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
#endif
  info["cpu_capabilities"] = split(EASIER_EXT_CPU_CAPABILITIES);
  info["cpu_capability"] = easier_ext::cpu_kernel_capability();
#ifdef _OPENMP
  info["cpu_parallel"] = "OpenMP";
#else
  info["cpu_parallel"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "easier_ext compiled kernels (ops are registered under torch.ops.easier_ext)";
  m.def("build_info", &build_info,
        "Version, torch version built against, CUDA kernels and architectures, CPU kernel variants.");
  easier_ext::bind_no_grad_calls(m);
}
