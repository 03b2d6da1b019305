// Packed-batch assembly on the GPU: the CUDA twin of fastsft.packing.assemble_bins.
//
// For output slot s = r * P + c of the padded [R, P] batch (one thread per slot, grid-stride):
//   c >= row_lengths[r]  (padding)   input_ids = pad_id, targets = -100, position_ids = 0
//   otherwise, with k the item holding the slot (the last k with item_out[k] <= s),
//     t   = s - item_out[k]                                  position within the item (segment)
//     src = offsets[items[k]] + item_starts[k] + t           store position of the token
//     input_ids    = ids[src]
//     targets      = labels[src + 1] if src + 1 < offsets[items[k] + 1] else -100
//                    (targets never cross into another record; a split piece or a truncated item
//                    predicts the record's real next token)
//     position_ids = t
// Zero-length items share item_out with their successor, so "the last k with item_out[k] <= s" always
// lands on the item that really holds the slot.
//
// Memory traffic for T real tokens in an [R, P] batch: read 8T bytes (ids + labels, coalesced within an
// item) + K * log2(K) cached 8-byte probes; write 24 * R * P bytes (three int64 outputs, coalesced).
// A 32 x 2048 batch is ~2 MB: under a microsecond of HBM time, so one launch (~5 us) is the floor and
// the host-side plan (O(K) numpy + one small upload) is what the benchmark actually measures.
//
// References: fastsft/packing.py (_assemble_py, the oracle) and csrc/packing.cpp (the CPU path).

#include "assemble_cuda.h"

namespace {

constexpr int64_t kIgnoreIndex = -100;
// 256 threads: a multiple of the warp size that keeps several blocks resident per SM; the kernel uses
// a handful of registers and no shared memory, so occupancy is not the limit.
constexpr int kThreads = 256;
// Grid-stride cap: 2^16 blocks x 256 threads = 16M slots per sweep, far more than the ~132 SMs can
// hold at once (a 32 x 2048 batch needs 256 blocks); larger batches loop instead of growing the grid.
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

__device__ __forceinline__ int64_t last_item_at_or_before(const int64_t* __restrict__ item_out,
                                                          int64_t num_items, int64_t slot) {
  // upper_bound(item_out, slot) - 1
  int64_t lo = 0, hi = num_items;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (__ldg(item_out + mid) <= slot) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

__global__ void _assemble_bins_kernel(
    // Pointers
    const int32_t* __restrict__ ids, const int32_t* __restrict__ labels,
    const int64_t* __restrict__ offsets, const int64_t* __restrict__ items,
    const int64_t* __restrict__ item_starts, const int64_t* __restrict__ item_out,
    const int64_t* __restrict__ row_lengths, int64_t* __restrict__ input_ids,
    int64_t* __restrict__ targets, int64_t* __restrict__ position_ids,
    // Sizes
    int64_t num_items, int64_t num_rows, int64_t width, int64_t pad_id) {
  const int64_t total = num_rows * width;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s < total; s += stride) {
    const int64_t r = s / width;
    const int64_t c = s - r * width;
    if (c >= __ldg(row_lengths + r)) {
      input_ids[s] = pad_id;
      targets[s] = kIgnoreIndex;
      position_ids[s] = 0;
      continue;
    }
    // ---- locate the item and the store position
    const int64_t k = last_item_at_or_before(item_out, num_items, s);
    const int64_t t = s - __ldg(item_out + k);
    const int64_t rec = __ldg(items + k);
    const int64_t src = __ldg(offsets + rec) + __ldg(item_starts + k) + t;
    const int64_t rec_end = __ldg(offsets + rec + 1);
    // ---- write
    input_ids[s] = int64_t(__ldg(ids + src));
    targets[s] = src + 1 < rec_end ? int64_t(__ldg(labels + src + 1)) : kIgnoreIndex;
    position_ids[s] = t;
  }
}

}  // namespace

cudaError_t assemble_bins_cuda_launch(const AssembleBinsParams& p, cudaStream_t stream) {
  const int64_t total = p.num_rows * p.width;
  if (total <= 0) return cudaSuccess;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  _assemble_bins_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      p.ids, p.labels, p.offsets, p.items, p.item_starts, p.item_out, p.row_lengths, p.input_ids,
      p.targets, p.position_ids, p.num_items, p.num_rows, p.width, p.pad_id);
  return cudaGetLastError();
}
