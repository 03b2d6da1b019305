// fastsft_assemble_cuda: packed-batch assembly on the GPU (kernel in assemble_cuda.cu, torch binding
// in assemble_torch.cpp, Python facade fastsft/packing_cuda.py). Plain CUDA runtime types only, so the
// .cu file compiles without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

// Device pointers and sizes for one launch. The per-item arrays describe the K selected items in row
// order (rows in the order of `bins`, items in placement order within a row); they are computed on the
// host from the pack plan in O(K), never O(tokens).
struct AssembleBinsParams {
  // Pointers: the flat token store
  const int32_t* ids;          // [T]
  const int32_t* labels;       // [T] unshifted
  const int64_t* offsets;      // [N+1] record r is tokens [offsets[r], offsets[r+1])
  // Pointers: the selected items
  const int64_t* items;        // [K] record index
  const int64_t* item_starts;  // [K] first token within the record
  const int64_t* item_out;     // [K] flat output slot of the item's first token: row * P + column;
                               //     non-decreasing (a zero-length item shares its successor's slot)
  const int64_t* row_lengths;  // [R] real tokens per row
  // Pointers: outputs, int64 [R, P] row-major
  int64_t* input_ids;
  int64_t* targets;
  int64_t* position_ids;
  // Sizes
  int64_t num_items;  // K
  int64_t num_rows;   // R
  int64_t width;      // P
  int64_t pad_id;
};

// Enqueues the kernel on `stream`; returns the launch status (cudaGetLastError). R * P == 0 launches
// nothing and returns cudaSuccess.
cudaError_t assemble_bins_cuda_launch(const AssembleBinsParams& params, cudaStream_t stream);
