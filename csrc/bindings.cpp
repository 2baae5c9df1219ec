// The pybind11 boundary of fastcd._C: m.def lines only; the algorithms live in the other files.
#include <pybind11/pybind11.h>

#include "matching.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastcd C++ extension (pybind11, no libtorch)";
    m.def("nearest_indices", &fastcd::nearest_indices, pybind11::arg("query"), pybind11::arg("keys"),
          "For each query value, the index of the nearest key by absolute difference (ties: lowest index).");
}
