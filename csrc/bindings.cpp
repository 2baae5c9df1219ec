// The pybind11 boundary of fastcd._C: m.def lines only; the algorithms live in the other files.
#include <pybind11/pybind11.h>

#include "cka.h"
#include "matching.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastcd C++ extension (pybind11, no libtorch)";
    m.def("nearest_indices", &fastcd::nearest_indices, pybind11::arg("query"), pybind11::arg("keys"),
          "For each query value, the index of the nearest key by absolute difference (ties: lowest index).");
    m.def("cka_matrix", &fastcd::cka_matrix, pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("form") = "auto",
          pybind11::arg("max_bytes") = int64_t(256) << 20, pybind11::arg("precision") = "float64",
          "All-pairs biased linear CKA of [heads_a, m, d_a] x [heads_b, m, d_b] -> [heads_a, heads_b] float64.");
}
