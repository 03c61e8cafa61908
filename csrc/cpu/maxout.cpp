// CPU kernels of the Maxout pyramid: nearest resize + concat + channel Maxout in one pass, with
// no resized or concatenated temporary. Parallel over output planes (n, group); a task reads
// its group's member planes at their own resolution, a row at a time through per-input column
// tables, and writes its output plane once. The backward recomputes the winners row by row and
// scatters into the member planes of its own group only: no two tasks write one gradient
// element, and every sum runs in a fixed order (output rows, then columns, ascending) — the
// same order as the CUDA gather, so both devices give the same bits in float32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "maxout_index.h"
#include "maxout_pyramid.h"

namespace csp_kernels {
namespace {

// Enough elements per task that at::parallel_for's overhead stays small.
constexpr int64_t kGrainElements = 32768;

// For one input: the source row of every output row and the source column of every output column.
struct SourceTables {
  std::vector<int64_t> rows, cols;
};

std::vector<SourceTables> source_tables(const PyramidShape& s) {
  std::vector<SourceTables> tables;
  for (const PyramidInput& in : s.inputs) {
    SourceTables t{std::vector<int64_t>(s.out_h), std::vector<int64_t>(s.out_w)};
    for (int64_t oy = 0; oy < s.out_h; ++oy) t.rows[oy] = nearest_source(in.rows, oy);
    for (int64_t ox = 0; ox < s.out_w; ++ox) t.cols[ox] = nearest_source(in.cols, ox);
    tables.push_back(std::move(t));
  }
  return tables;
}

// Member j of the group a task works on: its input and the start of its plane in that input.
struct Member {
  int input;
  int64_t plane_offset;
};

void group_members(const PyramidShape& s, int64_t n, int64_t group, std::vector<Member>& members) {
  int input = 0;
  for (int64_t j = 0; j < s.groups.group_size; ++j) {
    const int64_t channel = s.groups.channel(group, j);
    input = advance_to_channel(s.inputs.data(), input, channel);
    members[j] = {input, s.inputs[input].plane_offset(n, channel)};
  }
}

// Member `member`'s values along output row oy, contiguous: its source row itself when the
// input has the output's width, else that row gathered through the column table into `scratch`
// (so the max / argmax loops below are plain contiguous loops that vectorize).
template <typename scalar_t>
const scalar_t* member_row(const std::vector<const scalar_t*>& data, const PyramidShape& s,
                           const std::vector<SourceTables>& tables, const Member& member, int64_t oy,
                           scalar_t* scratch) {
  const PyramidInput& in = s.inputs[member.input];
  const SourceTables& t = tables[member.input];
  const scalar_t* row = data[member.input] + member.plane_offset + t.rows[oy] * in.cols.in;
  if (in.cols.in == s.out_w) return row;
  for (int64_t x = 0; x < s.out_w; ++x) scratch[x] = row[t.cols[x]];
  return scratch;
}

// A later member replaces the best so far only when strictly greater: ties keep the lowest
// channel, and a NaN wins only as a group's first member (the reference's torch.where chain).
template <typename scalar_t>
void max_row(const scalar_t* values, int64_t width, scalar_t* best) {
#pragma omp simd
  for (int64_t x = 0; x < width; ++x) best[x] = values[x] > best[x] ? values[x] : best[x];
}

template <typename scalar_t>
void argmax_row(const scalar_t* values, int64_t width, int32_t member, scalar_t* best, int32_t* winner) {
#pragma omp simd
  for (int64_t x = 0; x < width; ++x) {
    const bool wins = values[x] > best[x];
    best[x] = wins ? values[x] : best[x];
    winner[x] = wins ? member : winner[x];
  }
}

// Best value (and, when winner is given, the winning member) of each output pixel of row oy.
template <typename scalar_t>
void group_row(const std::vector<const scalar_t*>& data, const PyramidShape& s,
               const std::vector<SourceTables>& tables, const std::vector<Member>& members, int64_t oy,
               scalar_t* scratch, scalar_t* best, int32_t* winner) {
  std::copy_n(member_row(data, s, tables, members[0], oy, scratch), s.out_w, best);
  if (winner != nullptr) std::fill_n(winner, s.out_w, 0);
  for (size_t j = 1; j < members.size(); ++j) {
    const scalar_t* values = member_row(data, s, tables, members[j], oy, scratch);
    if (winner == nullptr) {
      max_row(values, s.out_w, best);
    } else {
      argmax_row(values, s.out_w, static_cast<int32_t>(j), best, winner);
    }
  }
}

int64_t plane_grain(const PyramidShape& s) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, s.groups.group_size * s.out_h * s.out_w));
}

template <typename scalar_t>
void maxout_pyramid_forward_kernel(const std::vector<const scalar_t*>& data, const PyramidShape& s, scalar_t* out) {
  const std::vector<SourceTables> tables = source_tables(s);
  const int64_t K = s.groups.out_channels;
  at::parallel_for(0, s.batch * K, plane_grain(s), [&](int64_t p0, int64_t p1) {
    std::vector<Member> members(s.groups.group_size);
    std::vector<scalar_t> scratch(s.out_w);
    for (int64_t p = p0; p < p1; ++p) {
      group_members(s, p / K, p % K, members);
      scalar_t* out_plane = out + p * s.out_h * s.out_w;
      for (int64_t oy = 0; oy < s.out_h; ++oy) {
        group_row(data, s, tables, members, oy, scratch.data(), out_plane + oy * s.out_w,
                  static_cast<int32_t*>(nullptr));
      }
    }
  });
}

// grads[i]: contiguous (N, C_i, H_i, W_i). A member at the output size is read by one output
// pixel per element, so its gradient rows are written directly; the others (resized) sum into
// an accumulator plane (opmath type), zero where no output reads them.
template <typename scalar_t>
void maxout_pyramid_backward_kernel(const std::vector<const scalar_t*>& data, const PyramidShape& s,
                                    const scalar_t* grad_out, const PlaneLayout& G,
                                    const std::vector<scalar_t*>& grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<SourceTables> tables = source_tables(s);
  const int64_t K = s.groups.out_channels, group_size = s.groups.group_size;
  at::parallel_for(0, s.batch * K, plane_grain(s), [&](int64_t p0, int64_t p1) {
    std::vector<Member> members(group_size);
    std::vector<scalar_t> scratch(s.out_w), best(s.out_w);
    std::vector<int32_t> winner(s.out_w);
    std::vector<acc_t> contribution(s.out_w);
    std::vector<scalar_t*> grad_planes(group_size);
    std::vector<int64_t> acc_offsets(group_size);
    std::vector<acc_t> acc;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / K, group = p % K;
      group_members(s, n, group, members);
      int64_t acc_size = 0;
      for (int64_t j = 0; j < group_size; ++j) {
        const PyramidInput& in = s.inputs[members[j].input];
        const int64_t channel = s.groups.channel(group, j) - in.channel_offset;
        grad_planes[j] = grads[members[j].input] + (n * in.channels + channel) * in.plane_size();
        acc_offsets[j] = acc_size;
        if (!in.same_size()) acc_size += in.plane_size();
      }
      acc.assign(acc_size, acc_t(0));
      const scalar_t* grad_plane = grad_out + n * G.batch_stride + group * G.channel_stride;
      for (int64_t oy = 0; oy < s.out_h; ++oy) {
        group_row(data, s, tables, members, oy, scratch.data(), best.data(), winner.data());
        const scalar_t* g = grad_plane + oy * s.out_w;
        for (int64_t j = 0; j < group_size; ++j) {
          const PyramidInput& in = s.inputs[members[j].input];
          const int32_t member = static_cast<int32_t>(j);
          if (in.same_size()) {
            scalar_t* dst = grad_planes[j] + oy * s.out_w;
#pragma omp simd
            for (int64_t x = 0; x < s.out_w; ++x) dst[x] = winner[x] == member ? g[x] : scalar_t(0);
          } else {
            // Branch-free: adding +0 leaves a sum unchanged (it is never -0), so losers add 0.
#pragma omp simd
            for (int64_t x = 0; x < s.out_w; ++x) {
              contribution[x] = winner[x] == member ? static_cast<acc_t>(g[x]) : acc_t(0);
            }
            const SourceTables& t = tables[members[j].input];
            acc_t* dst = acc.data() + acc_offsets[j] + t.rows[oy] * in.cols.in;
            for (int64_t x = 0; x < s.out_w; ++x) dst[t.cols[x]] += contribution[x];
          }
        }
      }
      for (int64_t j = 0; j < group_size; ++j) {
        const PyramidInput& in = s.inputs[members[j].input];
        if (in.same_size()) continue;
        const acc_t* src = acc.data() + acc_offsets[j];
#pragma omp simd
        for (int64_t i = 0; i < in.plane_size(); ++i) grad_planes[j][i] = static_cast<scalar_t>(src[i]);
      }
    }
  });
}

template <typename scalar_t>
std::vector<const scalar_t*> data_pointers(at::TensorList tensors) {
  std::vector<const scalar_t*> pointers;
  for (const at::Tensor& t : tensors) pointers.push_back(t.const_data_ptr<scalar_t>());
  return pointers;
}

at::Tensor maxout_pyramid_forward_cpu(at::TensorList features, int64_t out_h, int64_t out_w, int64_t out_channels,
                                      bool interleaved) {
  const PyramidShape s = pyramid_shape(features, out_h, out_w, out_channels, interleaved);
  at::Tensor out = at::empty({s.batch, out_channels, out_h, out_w}, features[0].options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "maxout_pyramid_forward_cpu",
                                  [&] {
                                    maxout_pyramid_forward_kernel<scalar_t>(data_pointers<scalar_t>(features), s,
                                                                            out.mutable_data_ptr<scalar_t>());
                                  });
  return out;
}

std::vector<at::Tensor> maxout_pyramid_backward_cpu(const at::Tensor& grad_out, at::TensorList features,
                                                    int64_t out_channels, bool interleaved) {
  const std::pair<PyramidShape, PlaneLayout> shape = pyramid_backward_shape(grad_out, features, out_channels, interleaved);
  const PyramidShape& s = shape.first;
  const PlaneLayout& G = shape.second;
  std::vector<at::Tensor> grads;
  for (const at::Tensor& x : features) grads.push_back(at::empty(x.sizes(), x.options()));
  if (grad_out.numel() == 0) return grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "maxout_pyramid_backward_cpu",
                                  [&] {
                                    std::vector<scalar_t*> grad_pointers;
                                    for (at::Tensor& g : grads) grad_pointers.push_back(g.mutable_data_ptr<scalar_t>());
                                    maxout_pyramid_backward_kernel<scalar_t>(data_pointers<scalar_t>(features), s,
                                                                             grad_out.const_data_ptr<scalar_t>(), G,
                                                                             grad_pointers);
                                  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(csp_kernels, CPU, m) {
  m.impl("maxout_pyramid_forward", &maxout_pyramid_forward_cpu);
  m.impl("maxout_pyramid_backward", &maxout_pyramid_backward_cpu);
}

}  // namespace csp_kernels
