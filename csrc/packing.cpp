// fastsft._packing: sequence packing and batch assembly on the CPU.
//
// Bound with pybind11 on numpy buffers only (no torch at build time). fastsft/packing.py is the
// facade: it validates arguments, and its pure-Python path gives the same results bit for bit, so
// every rule below (tie-breaking, RNG, ordering) is mirrored there. Change both or neither.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using i64 = int64_t;
using u64 = uint64_t;
using Int64Array = py::array_t<i64, py::array::c_style | py::array::forcecast>;
using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

namespace {

constexpr i64 kIgnoreIndex = -100;
constexpr int kBestFitDecreasing = 0, kFirstFit = 1;            // strategy
constexpr int kTruncate = 0, kSplit = 1, kDrop = 2;              // overflow
// Buckets and the bit tree take O(capacity) memory; 2**26 tokens is far beyond any context length.
constexpr i64 kMaxCapacity = i64(1) << 26;

// ------------------------------------------------------------------------------------------------
// 64-ary bit tree over 0..n-1: set, clear and "smallest member >= i" in O(log64 n) word operations.
// levels[0] holds one bit per value; a bit of levels[h+1] says whether a word of levels[h] is nonzero.
// For capacity 2048 that is two levels: 32 words and one.
class BitTree {
 public:
  explicit BitTree(i64 n) {
    do {
      n = (n + 63) / 64;
      levels_.emplace_back(size_t(n), 0);
    } while (n > 1);
  }

  void set(i64 i) {
    for (auto& level : levels_) {
      u64& w = level[size_t(i >> 6)];
      const bool had_any = w != 0;
      w |= u64(1) << (i & 63);
      if (had_any) return;  // the parent bit is already set
      i >>= 6;
    }
  }

  void clear(i64 i) {
    for (auto& level : levels_) {
      u64& w = level[size_t(i >> 6)];
      w &= ~(u64(1) << (i & 63));
      if (w != 0) return;  // the word still has members: the parent bit stays
      i >>= 6;
    }
  }

  // Smallest member >= i, or -1.
  i64 next(i64 i) const {
    size_t h = 0;
    for (;; ++h) {  // up: find a level whose word at or right of i has a member
      if (h == levels_.size()) return -1;
      const i64 wi = i >> 6;
      if (wi >= i64(levels_[h].size())) return -1;
      const u64 w = levels_[h][size_t(wi)] & (~u64(0) << (i & 63));
      if (w != 0) {
        i = (wi << 6) | __builtin_ctzll(w);
        break;
      }
      i = wi + 1;  // the next word, as a bit index one level up
    }
    while (h > 0) {  // down: lowest member inside the found subtree
      --h;
      i = (i << 6) | __builtin_ctzll(levels_[h][size_t(i)]);
    }
    return i;
  }

 private:
  std::vector<std::vector<u64>> levels_;
};

// ------------------------------------------------------------------------------------------------
// splitmix64 (Steele, Lea, Flood 2014; the constants of Vigna's reference code). Portable and
// trivially mirrored in numpy, which is why it drives the bin shuffle rather than std::mt19937.
struct SplitMix64 {
  u64 state;
  u64 next() {
    u64 z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
};

struct Stream {  // items after the overflow policy, in input order
  std::vector<i64> items, starts, lens;
  i64 truncated = 0, split = 0, dropped = 0;
};

// Overflow policy: truncate clips to capacity, split cuts into pieces of capacity plus a remainder
// (a zero-length sequence stays one empty item), drop leaves the sequence out.
Stream make_stream(const i64* lengths, i64 n, i64 capacity, int overflow) {
  Stream s;
  i64 total = 0;
  for (i64 i = 0; i < n; ++i) {
    const i64 len = lengths[i];
    if (len > capacity) {
      if (overflow == kTruncate) ++s.truncated;
      else if (overflow == kSplit) ++s.split;
      else ++s.dropped;
    }
    total += (overflow == kSplit && len > capacity) ? (len + capacity - 1) / capacity : 1;
  }
  s.items.reserve(size_t(total));
  s.starts.reserve(size_t(total));
  s.lens.reserve(size_t(total));
  for (i64 i = 0; i < n; ++i) {
    const i64 len = lengths[i];
    if (len <= capacity || overflow == kTruncate) {
      s.items.push_back(i);
      s.starts.push_back(0);
      s.lens.push_back(len < capacity ? len : capacity);
    } else if (overflow == kSplit) {
      for (i64 start = 0; start < len; start += capacity) {
        s.items.push_back(i);
        s.starts.push_back(start);
        s.lens.push_back(len - start < capacity ? len - start : capacity);
      }
    }
  }
  return s;
}

// Stable sort of item positions by length, decreasing: a counting sort over 0..capacity, O(K + L).
std::vector<i64> order_decreasing(const std::vector<i64>& lens, i64 capacity) {
  std::vector<i64> start(size_t(capacity) + 2, 0);
  for (i64 x : lens) ++start[size_t(capacity - x) + 1];  // key capacity - x: increasing = decreasing x
  for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
  std::vector<i64> order(lens.size());
  for (size_t k = 0; k < lens.size(); ++k) order[size_t(start[size_t(capacity - lens[k])]++)] = i64(k);
  return order;
}

// Best fit: each item (in the given order) goes into the open bin with the smallest remaining
// capacity >= its length, else a new bin. Open bins sit in buckets keyed by remaining capacity,
// each an intrusive LIFO stack (head[c], below[b]); the bit tree holds the non-empty buckets.
// Returns the bin of each item; O(K log64 L).
std::vector<i64> place_best_fit(const std::vector<i64>& lens, const std::vector<i64>& order, i64 capacity,
                                i64* num_bins) {
  BitTree nonempty(capacity + 1);
  std::vector<i64> head(size_t(capacity) + 1, -1), below;
  below.reserve(order.size());
  std::vector<i64> bin_of(order.size());
  i64 nbins = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const i64 x = lens[size_t(order[k])];
    i64 c = nonempty.next(x), b;
    if (c >= 0) {
      b = head[size_t(c)];
      head[size_t(c)] = below[size_t(b)];
      if (head[size_t(c)] < 0) nonempty.clear(c);
    } else {
      b = nbins++;
      c = capacity;
      below.push_back(-1);
    }
    const i64 r = c - x;
    if (head[size_t(r)] < 0) nonempty.set(r);
    below[size_t(b)] = head[size_t(r)];
    head[size_t(r)] = b;
    bin_of[k] = b;
  }
  *num_bins = nbins;
  return bin_of;
}

// First fit, order preserving: each item goes into the lowest-numbered bin with room, else a new
// bin. A segment tree of max remaining capacity over bin slots (unopened slots hold -1) finds the
// leftmost bin with room in O(log K).
std::vector<i64> place_first_fit(const std::vector<i64>& lens, i64 capacity, i64* num_bins) {
  size_t size = 1;
  while (size < lens.size()) size *= 2;
  std::vector<i64> tree(2 * size, -1);
  std::vector<i64> bin_of(lens.size());
  i64 nbins = 0;
  for (size_t k = 0; k < lens.size(); ++k) {
    const i64 x = lens[k];
    size_t i;
    if (tree[1] >= x) {
      i = 1;
      while (i < size) i = tree[2 * i] >= x ? 2 * i : 2 * i + 1;
    } else {
      i = size + size_t(nbins++);
      tree[i] = capacity;
    }
    tree[i] -= x;
    bin_of[k] = i64(i - size);
    for (i /= 2; i > 0; i /= 2) tree[i] = tree[2 * i] >= tree[2 * i + 1] ? tree[2 * i] : tree[2 * i + 1];
  }
  *num_bins = nbins;
  return bin_of;
}

// Output order of bins: identity, or Fisher-Yates with j = next() % (i + 1) for i = n-1 .. 1.
std::vector<i64> shuffle_bins(i64 n, bool shuffle, u64 seed) {
  std::vector<i64> perm(size_t(n > 0 ? n : 0));
  for (i64 b = 0; b < n; ++b) perm[size_t(b)] = b;
  if (shuffle) {
    SplitMix64 rng{seed};
    for (i64 i = n - 1; i > 0; --i) {
      const i64 j = i64(rng.next() % u64(i + 1));
      std::swap(perm[size_t(i)], perm[size_t(j)]);
    }
  }
  return perm;
}

template <typename T>
py::array_t<T> new_array(i64 n) {
  return py::array_t<T>(py::ssize_t(n));
}

// ------------------------------------------------------------------------------------------------
// pack(lengths, capacity, strategy, overflow, shuffle, seed)
//   -> (bin_offsets [B+1], items [K], item_starts [K], item_lengths [K], (truncated, split, dropped))
py::tuple pack(const Int64Array& lengths_in, i64 capacity, int strategy, int overflow, bool shuffle, u64 seed) {
  if (lengths_in.ndim() != 1) throw std::invalid_argument("lengths must be 1-D");
  if (capacity < 1 || capacity > kMaxCapacity)
    throw std::invalid_argument("capacity must be between 1 and " + std::to_string(kMaxCapacity));
  if (strategy != kBestFitDecreasing && strategy != kFirstFit)
    throw std::invalid_argument("strategy: only 0 (bfd) and 1 (first_fit) are supported");
  if (overflow != kTruncate && overflow != kSplit && overflow != kDrop)
    throw std::invalid_argument("overflow: only 0 (truncate), 1 (split) and 2 (drop) are supported");
  const i64 n = i64(lengths_in.shape(0));
  const i64* lengths = lengths_in.data();
  for (i64 i = 0; i < n; ++i)
    if (lengths[i] < 0) throw std::invalid_argument("lengths must be >= 0");

  Stream s;
  std::vector<i64> order, bin_of, rank;
  i64 nbins = 0;
  {
    py::gil_scoped_release nogil;
    s = make_stream(lengths, n, capacity, overflow);
    if (strategy == kBestFitDecreasing) {
      order = order_decreasing(s.lens, capacity);
      bin_of = place_best_fit(s.lens, order, capacity, &nbins);
    } else {
      order.resize(s.lens.size());
      for (size_t k = 0; k < order.size(); ++k) order[k] = i64(k);
      bin_of = place_first_fit(s.lens, capacity, &nbins);
    }
    const std::vector<i64> perm = shuffle_bins(nbins, shuffle, seed);
    rank.resize(size_t(nbins));
    for (i64 r = 0; r < nbins; ++r) rank[size_t(perm[size_t(r)])] = r;
  }

  const i64 k_items = i64(order.size());
  auto bin_offsets = new_array<i64>(nbins + 1);
  auto items = new_array<i64>(k_items), starts = new_array<i64>(k_items), lens = new_array<i64>(k_items);
  {
    i64* off = bin_offsets.mutable_data();
    i64 *it = items.mutable_data(), *st = starts.mutable_data(), *ln = lens.mutable_data();
    py::gil_scoped_release nogil;
    // Group by output bin, placement order within a bin: a counting sort on rank[bin].
    std::vector<i64> fill(size_t(nbins) + 1, 0);
    for (i64 b : bin_of) ++fill[size_t(rank[size_t(b)]) + 1];
    for (i64 r = 0; r < nbins; ++r) fill[size_t(r) + 1] += fill[size_t(r)];
    for (i64 r = 0; r <= nbins; ++r) off[r] = fill[size_t(r)];
    for (size_t k = 0; k < order.size(); ++k) {
      const size_t src = size_t(order[k]);
      const i64 dst = fill[size_t(rank[size_t(bin_of[k])])]++;
      it[dst] = s.items[src];
      st[dst] = s.starts[src];
      ln[dst] = s.lens[src];
    }
  }
  return py::make_tuple(bin_offsets, items, starts, lens, py::make_tuple(s.truncated, s.split, s.dropped));
}

// ------------------------------------------------------------------------------------------------
// Assembly. Item k is tokens [starts[k], starts[k] + lens[k]) of record items[k] of the store.
// targets[t] = labels[p + 1] for store position p of token t when p + 1 is still inside the same
// record, else -100: next-token targets that never cross a record boundary.

struct Store {
  const int32_t* ids;
  const int32_t* labels;
  const i64* offsets;
  i64 num_records;
};

Store check_store(const Int32Array& ids, const Int32Array& labels, const Int64Array& offsets) {
  if (ids.ndim() != 1 || labels.ndim() != 1 || offsets.ndim() != 1 || ids.shape(0) != labels.shape(0) ||
      offsets.shape(0) < 1)
    throw std::invalid_argument("ids and labels must be 1-D and equal; offsets 1-D [N+1]");
  const i64 n = i64(offsets.shape(0)) - 1;
  if (offsets.data()[0] != 0 || offsets.data()[n] != i64(ids.shape(0)))
    throw std::invalid_argument("offsets must start at 0 and end at len(ids)");
  return {ids.data(), labels.data(), offsets.data(), n};
}

void check_item(const Store& st, i64 item, i64 start, i64 len) {
  if (item < 0 || item >= st.num_records) throw std::invalid_argument("item index out of range");
  if (start < 0 || len < 0 || start + len > st.offsets[item + 1] - st.offsets[item])
    throw std::invalid_argument("item_starts/item_lengths reach outside their record");
}

// Writes one item's tokens at out_* (positions restart at 0); returns the item length.
inline i64 write_item(const Store& st, i64 item, i64 start, i64 len, i64* out_ids, i64* out_targets,
                      i64* out_pos) {
  const i64 base = st.offsets[item] + start, end = st.offsets[item + 1];
  for (i64 t = 0; t < len; ++t) {
    const i64 p = base + t;
    out_ids[t] = st.ids[p];
    out_targets[t] = p + 1 < end ? i64(st.labels[p + 1]) : kIgnoreIndex;
    out_pos[t] = t;
  }
  return len;
}

py::dict assemble(const Int32Array& ids, const Int32Array& labels, const Int64Array& offsets,
                  const Int64Array& items, const Int64Array& starts, const Int64Array& lens) {
  const Store st = check_store(ids, labels, offsets);
  const i64 s = i64(items.shape(0));
  if (i64(starts.shape(0)) != s || i64(lens.shape(0)) != s)
    throw std::invalid_argument("items, item_starts and item_lengths must have the same length");
  const i64 *it = items.data(), *sp = starts.data(), *ln = lens.data();
  i64 total = 0, max_len = 0;
  for (i64 k = 0; k < s; ++k) {
    check_item(st, it[k], sp[k], ln[k]);
    total += ln[k];
    if (ln[k] > max_len) max_len = ln[k];
  }
  if (total > INT32_MAX) throw std::invalid_argument("a bin of more than 2**31 - 1 tokens does not fit int32 cu_seqlens");
  auto input_ids = new_array<i64>(total), targets = new_array<i64>(total), pos = new_array<i64>(total);
  auto cu = new_array<int32_t>(s + 1);
  {
    i64 *oi = input_ids.mutable_data(), *ot = targets.mutable_data(), *op = pos.mutable_data();
    int32_t* oc = cu.mutable_data();
    py::gil_scoped_release nogil;
    i64 t = 0;
    oc[0] = 0;
    for (i64 k = 0; k < s; ++k) {
      t += write_item(st, it[k], sp[k], ln[k], oi + t, ot + t, op + t);
      oc[k + 1] = int32_t(t);
    }
  }
  py::dict out;
  out["input_ids"] = input_ids;
  out["targets"] = targets;
  out["position_ids"] = pos;
  out["cu_seqlens"] = cu;
  out["max_seqlen"] = max_len;
  return out;
}

// Selected bins -> one row of `width` tokens each (pad_id / -100 / 0 after the real tokens), plus
// row_lengths and cu_seqlens over the rows' real tokens concatenated in row order.
py::dict assemble_bins(const Int32Array& ids, const Int32Array& labels, const Int64Array& offsets,
                       const Int64Array& items, const Int64Array& starts, const Int64Array& lens,
                       const Int64Array& bin_offsets, const Int64Array& bins, i64 width, i64 pad_id) {
  const Store st = check_store(ids, labels, offsets);
  const i64 k_items = i64(items.shape(0)), nb = i64(bin_offsets.shape(0)) - 1, rows = i64(bins.shape(0));
  if (i64(starts.shape(0)) != k_items || i64(lens.shape(0)) != k_items)
    throw std::invalid_argument("items, item_starts and item_lengths must have the same length");
  if (nb < 0 || bin_offsets.data()[0] != 0 || bin_offsets.data()[nb] != k_items)
    throw std::invalid_argument("bin_offsets must run from 0 to len(items)");
  const i64 *it = items.data(), *sp = starts.data(), *ln = lens.data(), *bo = bin_offsets.data(),
            *bs = bins.data();
  i64 segments = 0, max_len = 0;
  auto row_lengths = new_array<i64>(rows);
  i64* rl = row_lengths.mutable_data();
  for (i64 r = 0; r < rows; ++r) {
    const i64 b = bs[r];
    if (b < 0 || b >= nb) throw std::invalid_argument("bin index out of range");
    if (bo[b] > bo[b + 1]) throw std::invalid_argument("bin_offsets must be non-decreasing");
    i64 row = 0;
    for (i64 k = bo[b]; k < bo[b + 1]; ++k) {
      check_item(st, it[k], sp[k], ln[k]);
      row += ln[k];
      if (ln[k] > max_len) max_len = ln[k];
    }
    if (row > width) throw std::invalid_argument("pad_to is shorter than a selected bin");
    rl[r] = row;
    segments += bo[b + 1] - bo[b];
  }
  if (rows * width > INT32_MAX) throw std::invalid_argument("more than 2**31 - 1 tokens do not fit int32 cu_seqlens");
  auto input_ids = py::array_t<i64>({py::ssize_t(rows), py::ssize_t(width)});
  auto targets = py::array_t<i64>({py::ssize_t(rows), py::ssize_t(width)});
  auto pos = py::array_t<i64>({py::ssize_t(rows), py::ssize_t(width)});
  auto cu = new_array<int32_t>(segments + 1);
  {
    i64 *oi = input_ids.mutable_data(), *ot = targets.mutable_data(), *op = pos.mutable_data();
    int32_t* oc = cu.mutable_data();
    py::gil_scoped_release nogil;
    i64 flat = 0, seg = 0;
    oc[0] = 0;
    for (i64 r = 0; r < rows; ++r) {
      const i64 b = bs[r];
      i64 t = r * width;
      for (i64 k = bo[b]; k < bo[b + 1]; ++k) {
        t += write_item(st, it[k], sp[k], ln[k], oi + t, ot + t, op + t);
        flat += ln[k];
        oc[++seg] = int32_t(flat);
      }
      for (const i64 end = (r + 1) * width; t < end; ++t) {
        oi[t] = pad_id;
        ot[t] = kIgnoreIndex;
        op[t] = 0;
      }
    }
  }
  py::dict out;
  out["input_ids"] = input_ids;
  out["targets"] = targets;
  out["position_ids"] = pos;
  out["row_lengths"] = row_lengths;
  out["cu_seqlens"] = cu;
  out["max_seqlen"] = max_len;
  return out;
}

}  // namespace

PYBIND11_MODULE(_packing, m) {
  m.doc() = "fastsft sequence packing (C++ core); use fastsft.packing, which validates arguments";
  m.def("pack", &pack, py::arg("lengths"), py::arg("capacity"), py::arg("strategy"), py::arg("overflow"),
        py::arg("shuffle"), py::arg("seed"));
  m.def("assemble", &assemble, py::arg("ids"), py::arg("labels"), py::arg("offsets"), py::arg("items"),
        py::arg("item_starts"), py::arg("item_lengths"));
  m.def("assemble_bins", &assemble_bins, py::arg("ids"), py::arg("labels"), py::arg("offsets"),
        py::arg("items"), py::arg("item_starts"), py::arg("item_lengths"), py::arg("bin_offsets"),
        py::arg("bins"), py::arg("width"), py::arg("pad_id"));
}
