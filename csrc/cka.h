// All-pairs linear CKA between two stacks of head activations (plain C++, no libtorch).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace fastcd {

namespace py = pybind11;

// a: [heads_a, m, d_a], b: [heads_b, m, d_b] (float32 or float64, C-contiguous).
// Returns [heads_a, heads_b] float64: biased linear CKA (PAPER.md §4) of every pair, accumulated in float64.
// form: "auto" (the cheaper of the two), "gram" or "feature". max_bytes bounds the working memory.
// precision (Gram form): "float64" products, or "float32" products summed in float64 per 512-term tile (about
// twice the speed; agrees with float64 to ~1e-7).
// A head with constant activations (zero centred norm) has CKA 0 with every head.
py::array_t<double> cka_matrix(py::array a, py::array b, const std::string& form, int64_t max_bytes,
                               const std::string& precision);

}  // namespace fastcd
