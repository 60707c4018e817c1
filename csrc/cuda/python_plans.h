// Python's view of the CUDA dispatch: _C.plan_forward and _C.plan_backward say which kernels the
// ops would run for given inputs (defined in register_cuda.cpp, beside the ops, from the same
// plans). CUDA builds only.
#pragma once

#include <pybind11/pybind11.h>

namespace block_attn {

void define_plan_functions(pybind11::module_& module);

}  // namespace block_attn
