// fastsft_assemble_cuda: torch binding of the packed-batch assembly kernel (csrc/assemble_cuda.cu).
//
// Built on demand by fastsft/packing_cuda.py with torch.utils.cpp_extension.load (never by setup.py:
// the CPU-only install must not need nvcc). That facade computes the per-item plan on the host and
// uploads it; this file only checks arguments, allocates the outputs and launches on the current
// stream. The assembly rules are documented in assemble_cuda.cu and fastsft/packing.py.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "assemble_cuda.h"

namespace {

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "assemble_bins: ", name, " must be a CUDA tensor (only CUDA is supported; use "
              "fastsft.packing.assemble_bins on the CPU), got device ", t.device());
  TORCH_CHECK(t.device() == device, "assemble_bins: ", name, " is on ", t.device(), " but ids is on ",
              device, "; all tensors must be on one GPU");
  TORCH_CHECK(t.scalar_type() == dtype, "assemble_bins: ", name, " must be ", c10::toString(dtype),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, "assemble_bins: ", name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), "assemble_bins: ", name, " must be contiguous");
}

// Returns (input_ids, targets, position_ids), each int64 [R, P] with R = row_lengths.numel() and
// P = width. The plan (items, item_starts, item_out, row_lengths) must be consistent with the store;
// fastsft/packing_cuda.py validates it on the host before calling.
std::vector<at::Tensor> assemble_bins(const at::Tensor& ids, const at::Tensor& labels,
                                      const at::Tensor& offsets, const at::Tensor& items,
                                      const at::Tensor& item_starts, const at::Tensor& item_out,
                                      const at::Tensor& row_lengths, int64_t width, int64_t pad_id) {
  const at::Device device = ids.device();
  check_tensor(ids, "ids", at::kInt, device);
  check_tensor(labels, "labels", at::kInt, device);
  check_tensor(offsets, "offsets", at::kLong, device);
  check_tensor(items, "items", at::kLong, device);
  check_tensor(item_starts, "item_starts", at::kLong, device);
  check_tensor(item_out, "item_out", at::kLong, device);
  check_tensor(row_lengths, "row_lengths", at::kLong, device);
  TORCH_CHECK(labels.numel() == ids.numel(), "assemble_bins: ids (", ids.numel(), ") and labels (",
              labels.numel(), ") must have the same length");
  TORCH_CHECK(offsets.numel() >= 1, "assemble_bins: offsets must have N+1 >= 1 entries");
  TORCH_CHECK(items.numel() == item_starts.numel() && items.numel() == item_out.numel(),
              "assemble_bins: items, item_starts and item_out must have the same length, got ",
              items.numel(), ", ", item_starts.numel(), ", ", item_out.numel());
  TORCH_CHECK(width >= 0, "assemble_bins: width must be >= 0, got ", width);

  const c10::cuda::CUDAGuard guard(device);
  const int64_t rows = row_lengths.numel();
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor input_ids = at::empty({rows, width}, opts);
  at::Tensor targets = at::empty({rows, width}, opts);
  at::Tensor position_ids = at::empty({rows, width}, opts);

  AssembleBinsParams p;
  p.ids = ids.data_ptr<int32_t>();
  p.labels = labels.data_ptr<int32_t>();
  p.offsets = offsets.data_ptr<int64_t>();
  p.items = items.data_ptr<int64_t>();
  p.item_starts = item_starts.data_ptr<int64_t>();
  p.item_out = item_out.data_ptr<int64_t>();
  p.row_lengths = row_lengths.data_ptr<int64_t>();
  p.input_ids = input_ids.data_ptr<int64_t>();
  p.targets = targets.data_ptr<int64_t>();
  p.position_ids = position_ids.data_ptr<int64_t>();
  p.num_items = items.numel();
  p.num_rows = rows;
  p.width = width;
  p.pad_id = pad_id;
  const cudaError_t err = assemble_bins_cuda_launch(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "assemble_bins: kernel launch failed: ", cudaGetErrorString(err));
  return {input_ids, targets, position_ids};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsft packed-batch assembly on the GPU (see fastsft/packing_cuda.py)";
  m.def("assemble_bins", &assemble_bins, "int64 [R, P] input_ids, targets, position_ids from a token "
        "store and a per-item plan", py::arg("ids"), py::arg("labels"), py::arg("offsets"),
        py::arg("items"), py::arg("item_starts"), py::arg("item_out"), py::arg("row_lengths"),
        py::arg("width"), py::arg("pad_id"));
}
