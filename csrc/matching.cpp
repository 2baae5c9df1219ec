#include "matching.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace fastcd {

namespace {

void check_vector(const py::buffer_info& info, const char* name, bool allow_empty) {
    if (info.ndim != 1) {
        throw std::invalid_argument(std::string(name) + " must be a 1-D array, got " +
                                    std::to_string(info.ndim) + " dimensions");
    }
    if (!allow_empty && info.shape[0] == 0) {
        throw std::invalid_argument(std::string(name) + " must not be empty");
    }
    const double* p = static_cast<const double*>(info.ptr);
    for (py::ssize_t i = 0; i < info.shape[0]; ++i) {
        if (!std::isfinite(p[i])) {
            throw std::invalid_argument(std::string(name) + " must be finite, found " +
                                        std::to_string(p[i]) + " at index " + std::to_string(i));
        }
    }
}

}  // namespace

py::array_t<int64_t> nearest_indices(
    py::array_t<double, py::array::c_style | py::array::forcecast> query,
    py::array_t<double, py::array::c_style | py::array::forcecast> keys) {
    const py::buffer_info q = query.request();
    const py::buffer_info k = keys.request();
    check_vector(q, "query", /*allow_empty=*/true);
    check_vector(k, "keys", /*allow_empty=*/false);
    const py::ssize_t n = q.shape[0];
    const py::ssize_t m = k.shape[0];
    const double* qp = static_cast<const double*>(q.ptr);
    const double* kp = static_cast<const double*>(k.ptr);

    py::array_t<int64_t> out(n);
    int64_t* op = static_cast<int64_t*>(out.request().ptr);
    {
        py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (n * m > 65536)
        for (py::ssize_t i = 0; i < n; ++i) {
            int64_t best = 0;
            double best_d = std::fabs(qp[i] - kp[0]);
            for (py::ssize_t j = 1; j < m; ++j) {
                const double d = std::fabs(qp[i] - kp[j]);
                if (d < best_d) {  // strict: ties keep the lowest index
                    best_d = d;
                    best = static_cast<int64_t>(j);
                }
            }
            op[i] = best;
        }
    }
    return out;
}

}  // namespace fastcd
