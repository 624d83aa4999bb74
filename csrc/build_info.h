#pragma once
// What this build of the extension contains, for easier_ext.build_info().
#include <string>

namespace easier_ext {

// The CPU kernel variant the dispatcher uses on this machine ("DEFAULT", "AVX2" or "AVX512"),
// following ATen's own choice (which honours ATEN_CPU_CAPABILITY).
std::string cpu_kernel_capability();

}  // namespace easier_ext
