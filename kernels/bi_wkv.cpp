// Python binding of the Bi-WKV kernels in bi_wkv.cu: checks the tensors, allocates outputs
// and scratch, and launches on the current CUDA stream of the tensors' device.
// Only c10's CUDA headers and the CUDA runtime are needed (not ATen/cuda/CUDAContext.h,
// which wants the cuBLAS/cuSPARSE headers), so a minimal toolkit (nvcc + cudart) builds it.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <vector>

// Defined in bi_wkv.cu, which is kept free of ATen.
int bi_wkv_tile_length();
int bi_wkv_segments(int64_t B, int64_t T, int64_t C, bool backward, int requested);
cudaError_t bi_wkv_forward(int dtype, const float* w, const float* u, const void* k, const void* v, void* y,
                           float* suffix, float* totals, float* saved, int64_t B, int64_t T, int64_t C, int segments,
                           cudaStream_t stream);
cudaError_t bi_wkv_backward(int dtype, const float* w, const float* u, const void* k, const void* v, const void* gy,
                            const float* saved, float* suffix, float* totals, double* partial, void* gk, void* gv,
                            int64_t B, int64_t T, int64_t C, int segments, cudaStream_t stream);

namespace {

constexpr int64_t kForwardFields = 4;
constexpr int64_t kBackwardFields = 6;
constexpr int64_t kMaxT = int64_t(1) << 22;  // positions and their differences stay exact in float32

// The dtype code of bi_wkv.cu's entry points; raises for dtypes the kernel does not compute.
int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "bi_wkv: k and v must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_same(const at::Tensor& t, const at::Tensor& k, const char* name) {
  TORCH_CHECK(t.device() == k.device(), "bi_wkv: ", name, " is on ", t.device(), " but k is on ", k.device());
  TORCH_CHECK(t.sizes() == k.sizes(), "bi_wkv: ", name, " must have the shape of k ", k.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == k.scalar_type(), "bi_wkv: ", name, " must have the dtype of k (", k.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "bi_wkv: ", name, " must be contiguous");
}

void check_parameter(const at::Tensor& t, const at::Tensor& k, const char* name) {
  TORCH_CHECK(t.device() == k.device(), "bi_wkv: ", name, " is on ", t.device(), " but k is on ", k.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == k.size(2), "bi_wkv: ", name, " must be (", k.size(2), ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "bi_wkv: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "bi_wkv: ", name, " must be contiguous");
}

void check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.is_cuda(), "bi_wkv: k must be a CUDA tensor, got one on ", k.device());
  TORCH_CHECK(k.dim() == 3, "bi_wkv: k must be (B, T, C), got ", k.sizes());
  TORCH_CHECK(k.is_contiguous(), "bi_wkv: k must be contiguous");
  dtype_code(k);
  check_same(v, k, "v");
  const int64_t T = k.size(1);
  TORCH_CHECK(T >= 1 && T <= kMaxT, "bi_wkv: T must be in [1, ", kMaxT, "], got ", T);
  TORCH_CHECK(k.size(0) <= INT32_MAX && k.size(2) <= INT32_MAX, "bi_wkv: B and C must fit in int32, got ", k.sizes());
  check_parameter(w, k, "w");
  check_parameter(u, k, "u");
}

int64_t tiles_of(const at::Tensor& k) { return (k.size(1) + bi_wkv_tile_length() - 1) / bi_wkv_tile_length(); }

// Called under the tensors' device guard: bi_wkv_segments asks the current device.
int segments_for(const at::Tensor& k, bool backward, int64_t requested) {
  return bi_wkv_segments(k.size(0), k.size(1), k.size(2), backward, int(std::min<int64_t>(requested, INT32_MAX)));
}

void check_launch(cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "bi_wkv: kernel launch failed: ", cudaGetErrorString(error));
}

float* data_or_null(const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

// Returns y (dtype of k) and, with save, the per-tile carries the backward needs (else None).
// segments: 0 chooses; > 0 forces a split of T (tests cover both schedules with it).
std::vector<c10::optional<at::Tensor>> forward(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k,
                                               const at::Tensor& v, bool save, int64_t segments) {
  check_inputs(w, u, k, v);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2), tiles = tiles_of(k);
  const auto f32 = k.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(k);
  c10::optional<at::Tensor> saved;
  if (save) saved = at::empty({B, tiles, 2, kForwardFields, C}, f32);
  if (k.numel() == 0) return {y, saved};
  const int split = segments_for(k, false, segments);
  at::Tensor suffix = at::empty({B, tiles, kForwardFields, C}, f32);
  c10::optional<at::Tensor> totals;
  if (split > 1) totals = at::empty({B, split, 2, kForwardFields, C}, f32);
  check_launch(bi_wkv_forward(dtype_code(k), w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                              y.data_ptr(), suffix.data_ptr<float>(), data_or_null(totals), data_or_null(saved), B, T,
                              C, split, c10::cuda::getCurrentCUDAStream()));
  return {y, saved};
}

// Returns gw, gu (float32, summed over B and T in float64) and gk, gv (dtype of k).
std::vector<at::Tensor> backward(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& gy, const at::Tensor& saved, int64_t segments) {
  check_inputs(w, u, k, v);
  check_same(gy, k, "gy");
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2), tiles = tiles_of(k);
  TORCH_CHECK(saved.device() == k.device() && saved.scalar_type() == at::kFloat && saved.is_contiguous() &&
                  saved.sizes() == at::IntArrayRef({B, tiles, 2, kForwardFields, C}),
              "bi_wkv: saved must be the carries returned by forward(..., save=True) for these inputs");
  at::Tensor gk = at::empty_like(k), gv = at::empty_like(k);
  if (k.numel() == 0) return {at::zeros_like(w), at::zeros_like(u), gk, gv};
  const int split = segments_for(k, true, segments);
  const auto f32 = k.options().dtype(at::kFloat);
  at::Tensor suffix = at::empty({B, tiles, kBackwardFields, C}, f32);
  c10::optional<at::Tensor> totals;
  if (split > 1) totals = at::empty({B, split, 2, kBackwardFields, C}, f32);
  at::Tensor partial = at::empty({B, split, 2, C}, k.options().dtype(at::kDouble));
  check_launch(bi_wkv_backward(dtype_code(k), w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                               gy.data_ptr(), saved.data_ptr<float>(), suffix.data_ptr<float>(), data_or_null(totals),
                               partial.data_ptr<double>(), gk.data_ptr(), gv.data_ptr(), B, T, C, split,
                               c10::cuda::getCurrentCUDAStream()));
  // A deterministic reduction over (B, segments): no float atomics.
  const at::Tensor sums = partial.sum(at::IntArrayRef{0, 1}).to(at::kFloat);
  return {sums[0], sums[1], gk, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Bi-WKV forward: (y, saved carries or None)", py::arg("w"), py::arg("u"), py::arg("k"),
        py::arg("v"), py::arg("save"), py::arg("segments") = 0);
  m.def("backward", &backward, "Bi-WKV backward: (gw, gu, gk, gv)", py::arg("w"), py::arg("u"), py::arg("k"),
        py::arg("v"), py::arg("gy"), py::arg("saved"), py::arg("segments") = 0);
}
