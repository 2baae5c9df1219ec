// Plain C++ algorithms for fastcd._C. No libtorch; the pybind11 boundary lives in bindings.cpp.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace fastcd {

namespace py = pybind11;

// For each query value q_i, the index j of the key minimising |q_i - k_j|; ties go to the lowest j.
// This is the nearest-neighbour step of the paper's ablation matching (Eq. 5).
py::array_t<int64_t> nearest_indices(
    py::array_t<double, py::array::c_style | py::array::forcecast> query,
    py::array_t<double, py::array::c_style | py::array::forcecast> keys);

}  // namespace fastcd
