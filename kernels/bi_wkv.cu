// Bi-WKV of Vision-RWKV, forward and backward, for (B, T, C) float32/float16/bfloat16
// tensors with float32 arithmetic.  bi_wkv.cpp checks the tensors and calls the two
// entry points at the end of this file; this file stays free of ATen so that it is
// plain CUDA.
//
//   y_t = (sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t)
//       / (sum_{i!=t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t})
//
// Numerics.  With positions p = i - T/2, give token i the left key k_i + p_i w and the right
// key k_i - p_i w.  Then token i < t reaches t with weight e^{left key} e^{-(p_t-1) w} and token
// i > t with e^{right key} e^{(p_t+1) w}: each side is a plain sum of e^{key} x times one factor
// per output.  A run of tokens is therefore summarized by its largest key and its sums scaled
// by that key (online softmax), and summaries merge associatively, for any w and any k: no
// decay is raised to a power, no exponent is positive.  Keys are kept as exact pairs
// (kb, at) meaning kb + at w, with kb a float from the inputs and at an integer, so that a
// difference of keys is fmaf(at - at', w, kb - kb'): rounded once, relative to the difference
// itself and not to |k| + |w| T.  The carries that run through a whole segment take one merge
// per tile, in double, so that their rounding does not grow with T.  Together these keep the
// gradients exact to a few 1e-6 for |w| T ~ 30 and |k| ~ 50 (float32 rounding in every key
// would cost ~1e-5, a float carry through 256 tiles as much).  exp2f(x log2 e) is used for
// e^x: one hardware instruction, and x is always a difference.
//
// Backward.  With den_t = e^{r_t} D_t and g_t = gy_t / D_t, the gradients of v and k are the
// same bidirectional sums with keys -r_t and values g_t and g_t y_t, multiplied by e^{k_i};
// the gradient of w also needs the sums weighted by (|t-i|-1), carried as a second pair of
// fields that shifts by the plain sums whenever tokens move apart.  r_t is itself a key pair,
// so the backward keys are exact pairs too.  The backward recomputes y and den per tile from
// carries the forward saved per tile: it reads k, v and gy, never a saved y.
//
// Parallelism.  A block owns kChannels adjacent channels (a warp load is one 128-byte
// row in float32) of one sequence and one segment of T, and walks the segment in tiles
// of kRows x kPerThread tokens, kPerThread consecutive tokens per thread.  Pass 1 walks
// the tiles right to left and stores, per tile, the summary of the rest of the segment to
// its right.  Pass 2 walks left to right with the running left summary, merges the row
// summaries of the tile, and sweeps each thread's tokens.  T is split into as many segments
// as keep the grid within one wave of resident blocks (bi_wkv_segments).  With one segment
// both passes are one launch; otherwise pass 1 is one launch that also stores each
// segment's totals, and pass 2 a second launch that starts by merging the totals of the
// other segments.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kChannels = 32;
constexpr int kRows = 8;
constexpr int kPerThread = 8;
constexpr int kTile = kRows * kPerThread;
constexpr int kThreads = kChannels * kRows;
constexpr int kMaxSegments = 64;          // pass 2 merges the other segments' totals one by one
constexpr int kMinTilesPerSegment = 4;    // shorter segments cost a second launch for little
constexpr float kEmpty = -1e30f;          // key of "no tokens": e^{key - anything} is 0, and
                                          // kEmpty - kEmpty is 0, not NaN
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kLeft = 0;
constexpr int kRight = 1;

enum Mode { kFused, kSummarize, kEmit };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float exp_of(float x) { return exp2f(x * kLog2e); }

// (kb + at w) - (kb2 + at2 w), rounded once.
__device__ __forceinline__ float key_gap(float kb, float at, float kb2, float at2, float w) {
  return fmaf(at - at2, w, kb - kb2);
}

// Tokens as seen from one side.  f[0] + f[1] w is the largest key; f[2], f[3] = sum e^{key - largest} x
// for the two value streams; with kDist, f[4], f[5] = the same sums weighted by the number of
// tokens between each token and the viewer.  V = double only for the carries that run through
// a whole segment (one merge per tile): in float their rounding would grow with T.
template <bool kDist, typename V = float>
struct State {
  static constexpr int kFields = kDist ? 6 : 4;
  V f[kFields];
};

template <bool D, typename To, typename From>
__device__ __forceinline__ State<D, To> convert(const State<D, From>& s) {
  State<D, To> r;
#pragma unroll
  for (int i = 0; i < State<D>::kFields; ++i) r.f[i] = To(s.f[i]);
  return r;
}

template <bool D>
__device__ __forceinline__ State<D> token(float kb, float at, float x0, float x1) {
  State<D> s;
  s.f[0] = kb;
  s.f[1] = at;
  s.f[2] = x0;
  s.f[3] = x1;
  if constexpr (D) {
    s.f[4] = 0.f;
    s.f[5] = 0.f;
  }
  return s;
}

template <bool D, typename V = float>
__device__ __forceinline__ State<D, V> empty_state() { return convert<D, V>(token<D>(kEmpty, 0.f, 0.f, 0.f)); }

// near and far together, as seen by near's viewer; far's tokens are `gap` tokens further away
// than they were from far's own viewer.  One exponential: the larger key keeps scale 1.
// (Keys are floats in either V, so the float key difference is exact to one rounding.)
template <bool D, typename V>
__device__ __forceinline__ State<D, V> merge(const State<D, V>& near, const State<D, V>& far, float gap, float w) {
  const float diff = key_gap(float(near.f[0]), float(near.f[1]), float(far.f[0]), float(far.f[1]), w);
  const bool near_top = diff >= 0.f;
  const V e = exp_of(-fabsf(diff));
  const V a = near_top ? V(1) : e;
  const V b = near_top ? e : V(1);
  State<D, V> s;
  s.f[0] = near_top ? near.f[0] : far.f[0];
  s.f[1] = near_top ? near.f[1] : far.f[1];
  s.f[2] = near.f[2] * a + far.f[2] * b;
  s.f[3] = near.f[3] * a + far.f[3] * b;
  if constexpr (D) {
    s.f[4] = near.f[4] * a + (gap * far.f[2] + far.f[4]) * b;
    s.f[5] = near.f[5] * a + (gap * far.f[3] + far.f[5]) * b;
  }
  return s;
}

// A thread's tokens of one tile in one stream.  Token j's left key is kb + (p_j + n) w and
// its right key kb + (n - p_j) w; padding has kb = kEmpty and values 0.
struct Tokens {
  float kb[kPerThread];
  float n[kPerThread];
  float x0[kPerThread];
  float x1[kPerThread];
};

// The `at` of each token's key on one side.
__device__ __forceinline__ void key_ats(const Tokens& tk, float p0, int side, float (&at)[kPerThread]) {
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) at[j] = side == kLeft ? tk.n[j] + (p0 + j) : tk.n[j] - (p0 + j);
}

// The thread's tokens as one State, seen from just past its last token (left side) or just
// before its first (right side).
template <bool D>
__device__ __forceinline__ State<D> summarize(const Tokens& tk, float p0, int side, float w) {
  float at[kPerThread];
  key_ats(tk, p0, side, at);
  // Reference: the largest key, up to rounding (a slightly smaller one only scales by 1 + eps).
  float kb = tk.kb[0], at_ref = at[0], best = fmaf(at[0], w, tk.kb[0]);
#pragma unroll
  for (int j = 1; j < kPerThread; ++j) {
    const float key = fmaf(at[j], w, tk.kb[j]);
    const bool larger = key > best;
    best = larger ? key : best;
    kb = larger ? tk.kb[j] : kb;
    at_ref = larger ? at[j] : at_ref;
  }
  State<D> s = token<D>(kb, at_ref, 0.f, 0.f);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const float e = exp_of(key_gap(tk.kb[j], at[j], kb, at_ref, w));
    const float a = e * tk.x0[j];
    const float b = e * tk.x1[j];
    s.f[2] += a;
    s.f[3] += b;
    if constexpr (D) {
      const float distance = float(side == kLeft ? kPerThread - 1 - j : j);
      s.f[4] = fmaf(distance, a, s.f[4]);
      s.f[5] = fmaf(distance, b, s.f[5]);
    }
  }
  return s;
}

// Row summaries of one tile in shared memory, [side][field][row][lane]; row kRows of the
// left side holds the carry into the tile, handed over by the last row of the previous tile.
template <bool D>
struct Board {
  float f[2][State<D>::kFields][kRows + 1][kChannels];
};

template <bool D>
__device__ __forceinline__ void put(Board<D>& board, int side, int row, int lane, const State<D>& s) {
#pragma unroll
  for (int i = 0; i < State<D>::kFields; ++i) board.f[side][i][row][lane] = s.f[i];
}

template <bool D>
__device__ __forceinline__ State<D> get(const Board<D>& board, int side, int row, int lane) {
  State<D> s;
#pragma unroll
  for (int i = 0; i < State<D>::kFields; ++i) s.f[i] = board.f[side][i][row][lane];
  return s;
}

// States in global memory are [..][field][C]: p points at field 0 of the thread's channel.
template <bool D>
__device__ __forceinline__ void put_global(float* p, int C, const State<D>& s) {
#pragma unroll
  for (int i = 0; i < State<D>::kFields; ++i) p[int64_t(i) * C] = s.f[i];
}

template <bool D>
__device__ __forceinline__ State<D> get_global(const float* p, int C) {
  State<D> s;
#pragma unroll
  for (int i = 0; i < State<D>::kFields; ++i) s.f[i] = p[int64_t(i) * C];
  return s;
}

struct Shape {
  int B, T, C;
  int channel_tiles, tiles, segments, tiles_per_segment;
};

// Where this thread works.
struct Place {
  int b, segment, c, lane, row;
  bool channel_ok;
  int tile_begin, tile_end;
  float w, u;
};

__device__ __forceinline__ Place locate(const Shape& s, const float* __restrict__ w, const float* __restrict__ u) {
  Place p;
  int block = blockIdx.x;
  const int channel_tile = block % s.channel_tiles;
  block /= s.channel_tiles;
  p.segment = block % s.segments;
  p.b = block / s.segments;
  p.lane = threadIdx.x % kChannels;
  p.row = threadIdx.x / kChannels;
  p.c = channel_tile * kChannels + p.lane;
  p.channel_ok = p.c < s.C;
  p.tile_begin = p.segment * s.tiles_per_segment;
  p.tile_end = p.tile_begin + s.tiles_per_segment < s.tiles ? p.tile_begin + s.tiles_per_segment : s.tiles;
  p.w = p.channel_ok ? w[p.c] : 0.f;
  p.u = p.channel_ok ? u[p.c] : 0.f;
  return p;
}

// Field 0 of the thread's channel in entry `index` of a [B][count][fields][C] array.
__device__ __forceinline__ int64_t entry(const Shape& s, const Place& p, int count, int index, int fields) {
  return ((int64_t(p.b) * count + index) * fields) * s.C + p.c;
}

__device__ __forceinline__ int first_token(const Place& p, int tile) { return tile * kTile + p.row * kPerThread; }

__device__ __forceinline__ bool is_token(const Shape& s, const Place& p, int t) { return p.channel_ok && t < s.T; }

// Position relative to T/2, which halves the largest |at w|; exact in float32 (T < 2^22).
__device__ __forceinline__ float position(const Shape& s, int t) { return float(t - s.T / 2); }

template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ x, const Shape& s, const Place& p, int t0, float fill,
                                         float (&out)[kPerThread]) {
  const T* row = x + (int64_t(p.b) * s.T + t0) * s.C + p.c;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    out[j] = fill;
    if (is_token(s, p, t0 + j)) out[j] = to_float(row[int64_t(j) * s.C]);
  }
}

template <typename T>
__device__ __forceinline__ void store_row(T* __restrict__ x, const Shape& s, const Place& p, int t0,
                                          const float (&in)[kPerThread]) {
  T* row = x + (int64_t(p.b) * s.T + t0) * s.C + p.c;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j)
    if (is_token(s, p, t0 + j)) row[int64_t(j) * s.C] = from_float<T>(in[j]);
}

// Carries into this thread's tokens.  On entry `left` holds the tokens before the tile (seen
// from the tile's start) and `right` those after it (seen from its last token); the rows in
// between are merged among themselves first and into the carry once, so that a carry takes
// one rounding per tile and not one per row.  Returns this row's left summary merged with the
// rows before it: the whole tile, seen from its end, for the last row.
template <bool D>
__device__ __forceinline__ State<D> row_carries(const Board<D>& board, const Place& p, State<D>& left,
                                                State<D>& right) {
  State<D> before = empty_state<D>();
  for (int q = 0; q < p.row; ++q) before = merge(get(board, kLeft, q, p.lane), before, float(kPerThread), p.w);
  State<D> after = empty_state<D>();
  for (int q = kRows - 1; q > p.row; --q) after = merge(get(board, kRight, q, p.lane), after, float(kPerThread), p.w);
  left = merge(before, left, float(p.row * kPerThread), p.w);
  right = merge(after, right, float((kRows - 1 - p.row) * kPerThread), p.w);
  return merge(get(board, kLeft, p.row, p.lane), before, float(kPerThread), p.w);
}

// Extends the left carry past this tile and hands it to the next one.  The last row, which
// knows the whole tile, owns the carry in double; the others see its float copy.
template <bool D>
__device__ __forceinline__ void hand_over(Board<D>& next, const Place& p, const State<D>& tile,
                                          State<D, double>& carry) {
  if (p.row != kRows - 1) return;
  carry = merge(convert<D, double>(tile), carry, float(kTile), p.w);
  put(next, kLeft, kRows, p.lane, convert<D, float>(carry));
}

// Pass 1: walk the segment's tiles right to left.  Stores per tile the right summary of the
// segment's tokens after it; with `totals`, stores the whole segment's left and right summaries.
// Row 0 merges while the other rows move on to the next tile (the boards alternate).
template <bool D, typename TokensOf>
__device__ void summarize_segment(const Shape& s, const Place& p, Board<D> (&boards)[2], int& step,
                                  TokensOf tokens_of, float* __restrict__ suffix, float* __restrict__ totals) {
  constexpr int F = State<D>::kFields;
  State<D, double> right = empty_state<D, double>();
  State<D, double> left = empty_state<D, double>();
  for (int tile = p.tile_end - 1; tile >= p.tile_begin; --tile, ++step) {
    Board<D>& board = boards[step & 1];
    const Tokens tk = tokens_of(tile);
    const float p0 = position(s, first_token(p, tile));
    put(board, kRight, p.row, p.lane, summarize<D>(tk, p0, kRight, p.w));
    if (totals) put(board, kLeft, p.row, p.lane, summarize<D>(tk, p0, kLeft, p.w));
    __syncthreads();
    if (p.row != 0) continue;
    if (p.channel_ok) put_global(suffix + entry(s, p, s.tiles, tile, F), s.C, convert<D, float>(right));
    State<D> tile_right = empty_state<D>();
    for (int q = kRows - 1; q >= 0; --q)
      tile_right = merge(get(board, kRight, q, p.lane), tile_right, float(kPerThread), p.w);
    right = merge(convert<D, double>(tile_right), right, float(kTile), p.w);
    if (totals) {
      State<D> tile_left = empty_state<D>();
      for (int q = 0; q < kRows; ++q)
        tile_left = merge(get(board, kLeft, q, p.lane), tile_left, float(kPerThread), p.w);
      left = merge(left, convert<D, double>(tile_left), float((p.tile_end - 1 - tile) * kTile), p.w);
    }
  }
  if (totals && p.row == 0 && p.channel_ok) {
    put_global(totals + entry(s, p, 2 * s.segments, 2 * p.segment + kLeft, F), s.C, convert<D, float>(left));
    put_global(totals + entry(s, p, 2 * s.segments, 2 * p.segment + kRight, F), s.C, convert<D, float>(right));
  }
}

// Start of pass 2: the carry into the first tile goes to its board slot, and the summary of
// everything right of the segment to `segment_right` (both empty for a single segment).
// The last row merges the segments before, row 0 those after, in parallel.  Returns the left
// carry, which the last row keeps extending tile by tile (see hand_over).
template <bool D>
__device__ State<D, double> segment_carries(const Shape& s, const Place& p, const float* __restrict__ totals,
                                            Board<D>& first, float (&segment_right)[State<D>::kFields][kChannels]) {
  constexpr int F = State<D>::kFields;
  const float length = float(s.tiles_per_segment * kTile);
  State<D, double> acc = empty_state<D, double>();
  const int side = p.row == 0 ? kRight : kLeft;
  if (totals && p.channel_ok && (p.row == 0 || p.row == kRows - 1)) {
    const int from = side == kLeft ? 0 : s.segments - 1;
    const int step = side == kLeft ? 1 : -1;
    for (int q = from; q != p.segment; q += step)
      acc = merge(convert<D, double>(get_global<D>(totals + entry(s, p, 2 * s.segments, 2 * q + side, F), s.C)), acc,
                  length, p.w);
  }
  if (p.row == kRows - 1) put(first, kLeft, kRows, p.lane, convert<D, float>(acc));
  if (p.row == 0) {
#pragma unroll
    for (int i = 0; i < F; ++i) segment_right[i][p.lane] = float(acc.f[i]);
  }
  __syncthreads();
  return acc;
}

// The right carry into a tile: the rest of the segment (from pass 1), then the segments after.
template <bool D>
__device__ __forceinline__ State<D> tile_right_carry(const Shape& s, const Place& p, int tile,
                                                     const float* __restrict__ suffix,
                                                     const float (&segment_right)[State<D>::kFields][kChannels]) {
  constexpr int F = State<D>::kFields;
  if (!p.channel_ok) return empty_state<D>();
  State<D> after;
#pragma unroll
  for (int i = 0; i < F; ++i) after.f[i] = segment_right[i][p.lane];
  const State<D> rest = get_global<D>(suffix + entry(s, p, s.tiles, tile, F), s.C);
  return merge(rest, after, float((p.tile_end - 1 - tile) * kTile), p.w);
}

// Token t's numerator and denominator, both in units of e^{kb + n w}: the largest of its
// three terms (left sum, right sum, bonus), so that neither over- nor underflows.  `bonus` is
// e^{u + k_t} in those units.
struct Output {
  float num, den, kb, n, bonus;
};

__device__ __forceinline__ Output output_at(const Place& p, float pos, float k, float v, const State<false>& left,
                                            const State<false>& right) {
  const float nl = left.f[1] - pos + 1.f;   // the left sum's scale at t is e^{left.kb + nl w}
  const float nr = right.f[1] + pos + 1.f;  // and the right sum's e^{right.kb + nr w}
  float kb = k + p.u;                       // the bonus term's own scale, should it be the largest
  float n = 0.f;
  const float el = fmaf(nl, p.w, left.f[0]);
  const float er = fmaf(nr, p.w, right.f[0]);
  if (el > kb || er > kb) {
    const bool l = el >= er;
    kb = l ? left.f[0] : right.f[0];
    n = l ? nl : nr;
  }
  const float sl = exp_of(key_gap(left.f[0], nl, kb, n, p.w));
  const float sr = exp_of(key_gap(right.f[0], nr, kb, n, p.w));
  Output o;
  o.bonus = exp_of(key_gap(k, 0.f, kb, n, p.w) + p.u);
  o.num = fmaf(sl, left.f[2], fmaf(sr, right.f[2], o.bonus * v));
  o.den = fmaf(sl, left.f[3], fmaf(sr, right.f[3], o.bonus));
  o.kb = kb;
  o.n = n;
  return o;
}

// Both sweeps over a thread's forward tokens; out(j, output) sees each token's output.
template <typename Out>
__device__ __forceinline__ void forward_sweeps(const Place& p, float p0, const Tokens& tk, const float (&v)[kPerThread],
                                               State<false> left, State<false> right, Out out) {
  State<false> after[kPerThread];
#pragma unroll
  for (int j = kPerThread - 1; j >= 0; --j) {
    after[j] = right;
    right = merge(token<false>(tk.kb[j], tk.n[j] - (p0 + j), tk.x0[j], tk.x1[j]), right, 1.f, p.w);
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    out(j, output_at(p, p0 + j, tk.kb[j], v[j], left, after[j]));
    left = merge(token<false>(tk.kb[j], tk.n[j] + (p0 + j), tk.x0[j], tk.x1[j]), left, 1.f, p.w);
  }
}

// The forward stream of a thread's tokens: keys k, values v and 1.
template <typename T>
__device__ __forceinline__ Tokens forward_tokens(const T* __restrict__ k, const T* __restrict__ v, const Shape& s,
                                                 const Place& p, int t0) {
  Tokens tk;
  load_row(k, s, p, t0, kEmpty, tk.kb);
  load_row(v, s, p, t0, 0.f, tk.x0);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    tk.n[j] = 0.f;
    tk.x1[j] = is_token(s, p, t0 + j) ? 1.f : 0.f;
  }
  return tk;
}

template <typename T>
struct ForwardArgs {
  const float* w;
  const float* u;
  const T* k;
  const T* v;
  T* y;
  float* suffix;  // [B][tiles][4][C]
  float* totals;  // [B][segments][2][4][C], segments > 1 only
  float* saved;   // [B][tiles][2][4][C]: carries into each tile, for the backward; may be null
  Shape s;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 3) forward_kernel(ForwardArgs<T> a, int mode) {
  __shared__ Board<false> boards[2];
  __shared__ float segment_right[State<false>::kFields][kChannels];
  const Shape& s = a.s;
  const Place p = locate(s, a.w, a.u);
  int step = 0;
  auto tokens_of = [&](int tile) { return forward_tokens(a.k, a.v, s, p, first_token(p, tile)); };
  if (mode != kEmit)
    summarize_segment<false>(s, p, boards, step, tokens_of, a.suffix, mode == kSummarize ? a.totals : nullptr);
  if (mode == kSummarize) return;

  State<false, double> carry =
      segment_carries<false>(s, p, mode == kEmit ? a.totals : nullptr, boards[step & 1], segment_right);
  for (int tile = p.tile_begin; tile < p.tile_end; ++tile, ++step) {
    Board<false>& board = boards[step & 1];
    const int t0 = first_token(p, tile);
    const float p0 = position(s, t0);
    const Tokens tk = tokens_of(tile);
    put(board, kLeft, p.row, p.lane, summarize<false>(tk, p0, kLeft, p.w));
    put(board, kRight, p.row, p.lane, summarize<false>(tk, p0, kRight, p.w));
    __syncthreads();
    State<false> left = get(board, kLeft, kRows, p.lane);
    State<false> right = tile_right_carry<false>(s, p, tile, a.suffix, segment_right);
    if (a.saved && p.row == 0 && p.channel_ok) {
      put_global(a.saved + entry(s, p, 2 * s.tiles, 2 * tile + kLeft, 4), s.C, left);
      put_global(a.saved + entry(s, p, 2 * s.tiles, 2 * tile + kRight, 4), s.C, right);
    }
    hand_over(boards[(step + 1) & 1], p, row_carries(board, p, left, right), carry);
    float y[kPerThread];
    forward_sweeps(p, p0, tk, tk.x0, left, right, [&](int j, const Output& o) { y[j] = o.num / o.den; });
    store_row(a.y, s, p, t0, y);
  }
}

template <typename T>
struct BackwardArgs {
  const float* w;
  const float* u;
  const T* k;
  const T* v;
  const T* gy;
  const float* saved;  // from the forward
  float* suffix;       // [B][tiles][6][C]
  float* totals;       // [B][segments][2][6][C], segments > 1 only
  double* partial;     // [B][segments][2][C]: this block's share of gw and gu
  T* gk;
  T* gv;
  Shape s;
};

// Forward quantities of a thread's tokens, recomputed for the backward.
struct Recomputed {
  float k[kPerThread];
  float v[kPerThread];
  float y[kPerThread];
  float bonus[kPerThread];  // e^{u + k_t - r_t}
};

// Recomputes the forward of one tile from the saved carries, and returns the backward
// stream: keys -r_t (as pairs), values g_t and g_t y_t.
template <typename T>
__device__ Tokens recompute(const BackwardArgs<T>& a, const Place& p, int tile, Board<false>& board, Recomputed& f) {
  const Shape& s = a.s;
  const int t0 = first_token(p, tile);
  const float p0 = position(s, t0);
  const Tokens fw = forward_tokens(a.k, a.v, s, p, t0);
  float gy[kPerThread];
  load_row(a.gy, s, p, t0, 0.f, gy);
  put(board, kLeft, p.row, p.lane, summarize<false>(fw, p0, kLeft, p.w));
  put(board, kRight, p.row, p.lane, summarize<false>(fw, p0, kRight, p.w));
  __syncthreads();
  State<false> left = empty_state<false>();
  State<false> right = empty_state<false>();
  if (p.channel_ok) {
    left = get_global<false>(a.saved + entry(s, p, 2 * s.tiles, 2 * tile + kLeft, 4), s.C);
    right = get_global<false>(a.saved + entry(s, p, 2 * s.tiles, 2 * tile + kRight, 4), s.C);
  }
  row_carries(board, p, left, right);
  Tokens bw;
  forward_sweeps(p, p0, fw, fw.x0, left, right, [&](int j, const Output& o) {
    const bool real = is_token(s, p, t0 + j);
    f.k[j] = fw.kb[j];
    f.v[j] = fw.x0[j];
    f.y[j] = real ? o.num / o.den : 0.f;
    f.bonus[j] = real ? o.bonus : 0.f;
    bw.kb[j] = real ? -o.kb : kEmpty;
    bw.n[j] = real ? -o.n : 0.f;
    bw.x0[j] = real ? gy[j] / o.den : 0.f;
    bw.x1[j] = bw.x0[j] * f.y[j];
  });
  return bw;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) backward_kernel(BackwardArgs<T> a, int mode) {
  // One forward board suffices: the backward board's barrier separates its uses.
  __shared__ Board<false> forward_board;
  __shared__ Board<true> boards[2];
  __shared__ float segment_right[State<true>::kFields][kChannels];
  __shared__ double sums[2][kRows][kChannels];
  const Shape& s = a.s;
  const Place p = locate(s, a.w, a.u);
  Recomputed f;
  int step = 0;
  auto tokens_of = [&](int tile) { return recompute(a, p, tile, forward_board, f); };
  if (mode != kEmit)
    summarize_segment<true>(s, p, boards, step, tokens_of, a.suffix, mode == kSummarize ? a.totals : nullptr);
  if (mode == kSummarize) return;

  State<true, double> carry =
      segment_carries<true>(s, p, mode == kEmit ? a.totals : nullptr, boards[step & 1], segment_right);
  double dw = 0.0, du = 0.0;  // gw = -(sum of the dw terms), gu = sum of the du terms
  for (int tile = p.tile_begin; tile < p.tile_end; ++tile, ++step) {
    Board<true>& board = boards[step & 1];
    const int t0 = first_token(p, tile);
    const float p0 = position(s, t0);
    const Tokens tk = tokens_of(tile);
    put(board, kLeft, p.row, p.lane, summarize<true>(tk, p0, kLeft, p.w));
    put(board, kRight, p.row, p.lane, summarize<true>(tk, p0, kRight, p.w));
    __syncthreads();
    State<true> left = get(board, kLeft, kRows, p.lane);
    State<true> right = tile_right_carry<true>(s, p, tile, a.suffix, segment_right);
    hand_over(boards[(step + 1) & 1], p, row_carries(board, p, left, right), carry);
    float from_right[kPerThread], from_right_y[kPerThread];
    float tile_dw = 0.f, tile_du = 0.f;
#pragma unroll
    for (int j = kPerThread - 1; j >= 0; --j) {
      // e^{k_j} times the right sums at token j: finite, each term is a share of some den_t / e^{r_t}.
      const float scale = exp_of(fmaf(right.f[1] + (p0 + j) + 1.f, p.w, f.k[j] + right.f[0]));
      from_right[j] = scale * right.f[2];
      from_right_y[j] = scale * right.f[3];
      tile_dw = fmaf(scale, fmaf(f.v[j], right.f[4], -right.f[5]), tile_dw);
      right = merge(token<true>(tk.kb[j], tk.n[j] - (p0 + j), tk.x0[j], tk.x1[j]), right, 1.f, p.w);
    }
    float gk[kPerThread], gv[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const float scale = exp_of(fmaf(left.f[1] - (p0 + j) + 1.f, p.w, f.k[j] + left.f[0]));
      const float bonus = f.bonus[j] * tk.x0[j];
      gv[j] = fmaf(scale, left.f[2], from_right[j] + bonus);
      gk[j] = f.v[j] * gv[j] - fmaf(scale, left.f[3], fmaf(bonus, f.y[j], from_right_y[j]));
      tile_dw = fmaf(scale, fmaf(f.v[j], left.f[4], -left.f[5]), tile_dw);
      tile_du = fmaf(bonus, f.v[j] - f.y[j], tile_du);
      left = merge(token<true>(tk.kb[j], tk.n[j] + (p0 + j), tk.x0[j], tk.x1[j]), left, 1.f, p.w);
    }
    store_row(a.gk, s, p, t0, gk);
    store_row(a.gv, s, p, t0, gv);
    dw += tile_dw;
    du += tile_du;
  }
  // gw and gu sum B*T terms of both signs: double across tiles, rows and (in the caller) blocks.
  sums[0][p.row][p.lane] = -dw;
  sums[1][p.row][p.lane] = du;
  __syncthreads();
  if (p.row >= 2 || !p.channel_ok) return;
  double total = 0.0;
  for (int q = 0; q < kRows; ++q) total += sums[p.row][q][p.lane];
  a.partial[((int64_t(p.b) * s.segments + p.segment) * 2 + p.row) * s.C + p.c] = total;
}

Shape make_shape(int64_t B, int64_t T, int64_t C, int segments) {
  Shape s;
  s.B = int(B);
  s.T = int(T);
  s.C = int(C);
  s.channel_tiles = int((C + kChannels - 1) / kChannels);
  s.tiles = int((T + kTile - 1) / kTile);
  s.segments = segments;
  s.tiles_per_segment = (s.tiles + segments - 1) / segments;
  return s;
}

dim3 grid_of(const Shape& s) { return dim3(unsigned(s.B) * unsigned(s.channel_tiles) * unsigned(s.segments)); }

template <typename T>
void launch_forward(const ForwardArgs<T>& a, cudaStream_t stream) {
  if (a.s.segments == 1) {
    forward_kernel<T><<<grid_of(a.s), kThreads, 0, stream>>>(a, kFused);
  } else {
    forward_kernel<T><<<grid_of(a.s), kThreads, 0, stream>>>(a, kSummarize);
    forward_kernel<T><<<grid_of(a.s), kThreads, 0, stream>>>(a, kEmit);
  }
}

template <typename T>
void launch_backward(const BackwardArgs<T>& a, cudaStream_t stream) {
  if (a.s.segments == 1) {
    backward_kernel<T><<<grid_of(a.s), kThreads, 0, stream>>>(a, kFused);
  } else {
    backward_kernel<T><<<grid_of(a.s), kThreads, 0, stream>>>(a, kSummarize);
    backward_kernel<T><<<grid_of(a.s), kThreads, 0, stream>>>(a, kEmit);
  }
}

template <typename T>
void forward_typed(const float* w, const float* u, const void* k, const void* v, void* y, float* suffix, float* totals,
                   float* saved, const Shape& s, cudaStream_t stream) {
  launch_forward(ForwardArgs<T>{w, u, static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(y), suffix,
                                totals, saved, s},
                 stream);
}

template <typename T>
void backward_typed(const float* w, const float* u, const void* k, const void* v, const void* gy, const float* saved,
                    float* suffix, float* totals, double* partial, void* gk, void* gv, const Shape& s,
                    cudaStream_t stream) {
  launch_backward(BackwardArgs<T>{w, u, static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(gy),
                                  saved, suffix, totals, partial, static_cast<T*>(gk), static_cast<T*>(gv), s},
                  stream);
}

// Blocks of `kernel` that the current device runs at once.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  int device = 0, sms = 1, per_sm = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  return int64_t(sms) * (per_sm > 0 ? per_sm : 1);
}

}  // namespace

int bi_wkv_tile_length() { return kTile; }

// Segments per sequence for the forward or the backward kernel on the current device: as
// many as keep the grid within one wave of resident blocks (all blocks do equal work, so a
// second, partial wave would run nearly alone), each at least kMinTilesPerSegment tiles
// long; 1 means a single launch.  `requested` > 0 overrides the choice (tests use it to
// cover both schedules).  The count returned gives every segment at least one tile.
int bi_wkv_segments(int64_t B, int64_t T, int64_t C, bool backward, int requested) {
  const int64_t tiles = (T + kTile - 1) / kTile;
  int64_t want = requested;
  if (want <= 0) {
    const int64_t resident = backward ? resident_blocks(backward_kernel<float>) : resident_blocks(forward_kernel<float>);
    want = resident / (B * ((C + kChannels - 1) / kChannels));
    const int64_t longest = tiles / kMinTilesPerSegment;
    if (want > longest) want = longest;
  }
  if (want > kMaxSegments) want = kMaxSegments;
  if (want > tiles) want = tiles;
  if (want < 1) want = 1;
  const int64_t per_segment = (tiles + want - 1) / want;
  return int((tiles + per_segment - 1) / per_segment);
}

// dtype: 0 float32, 1 float16, 2 bfloat16.  All pointers are device pointers; `totals` may
// be null when segments == 1, `saved` when no backward follows.
cudaError_t bi_wkv_forward(int dtype, const float* w, const float* u, const void* k, const void* v, void* y,
                           float* suffix, float* totals, float* saved, int64_t B, int64_t T, int64_t C, int segments,
                           cudaStream_t stream) {
  const Shape s = make_shape(B, T, C, segments);
  switch (dtype) {
    case 0: forward_typed<float>(w, u, k, v, y, suffix, totals, saved, s, stream); break;
    case 1: forward_typed<__half>(w, u, k, v, y, suffix, totals, saved, s, stream); break;
    case 2: forward_typed<__nv_bfloat16>(w, u, k, v, y, suffix, totals, saved, s, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t bi_wkv_backward(int dtype, const float* w, const float* u, const void* k, const void* v, const void* gy,
                            const float* saved, float* suffix, float* totals, double* partial, void* gk, void* gv,
                            int64_t B, int64_t T, int64_t C, int segments, cudaStream_t stream) {
  const Shape s = make_shape(B, T, C, segments);
  switch (dtype) {
    case 0: backward_typed<float>(w, u, k, v, gy, saved, suffix, totals, partial, gk, gv, s, stream); break;
    case 1: backward_typed<__half>(w, u, k, v, gy, saved, suffix, totals, partial, gk, gv, s, stream); break;
    case 2: backward_typed<__nv_bfloat16>(w, u, k, v, gy, saved, suffix, totals, partial, gk, gv, s, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
