// SASA local attention on the CPU: an XLA FFI kernel, forward and backward, float32.
//
// Layout trick: each (image, head) is copied into planar buffers [d][rows][cols] (keys and
// values zero-padded by r = kernel_size / 2 on every side), so that one SIMD vector holds
// 8 neighbouring queries of a row and the key of a window offset (i, j) for those 8 queries
// is the same vector read j columns further on. Every logit is then d fused multiply-adds
// across 8 queries at once, with no masked work, no horizontal sums and no transposes in
// the inner loops; the window's logits of 8 queries (k^2 vectors) stay in registers / L1.
// Keys outside the image get probability exactly 0 (rows outside are skipped, columns
// outside get a -1e30 logit whose exp underflows to 0). Work items are (image, head)
// pairs, run on XLA's intra-op thread pool.
//
// Built by sasa_jax/ops/local_attention_cpu.py with the host's C++ compiler.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
constexpr float kMasked = -1e30f;

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hsum(vf v) {
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// exp(x) for x <= 0 (softmax arguments), relative error ~1e-7; exactly 0 below -87.
inline vf vexp(vf x) {
  const vf xc = vmax(x, splat(-87.0f));
  // fn: x log2(e) rounded to an integer (truncating a non-positive value less 0.5), so that
  // exp(x) = 2^fn exp(r) with |r| <= ln(2) / 2; ln(2) split in two for an exact r; exp(r) by
  // Cephes' single-precision minimax polynomial.
  const vf fn = __builtin_convertvector(
      __builtin_convertvector(xc * 1.44269504088896341f + splat(-0.5f), vi), vf);
  vf r = xc - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(fn, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vi keep = x >= splat(-87.0f);
  vi out;
  vf res = p * scale;
  std::memcpy(&out, &res, sizeof(out));
  out &= keep;
  std::memcpy(&res, &out, sizeof(res));
  return res;
}

inline vf vlog(vf x) {
  vf out;
  for (int l = 0; l < kLanes; ++l) out[l] = std::log(x[l]);
  return out;
}

struct Shape {
  int64_t b, h, w, c, n, d, k, r, dh;
  int64_t wq, hp, wp;  // padded query row (lanes), padded key rows and row length
  bool rel;
};

Shape make_shape(const ffi::Buffer<ffi::F32>& q, int64_t num_heads, int64_t kernel_size,
                 bool rel) {
  auto dims = q.dimensions();
  Shape s;
  s.b = dims[0], s.h = dims[1], s.w = dims[2], s.c = dims[3];
  s.n = num_heads, s.d = s.c / num_heads, s.k = kernel_size, s.r = kernel_size / 2;
  s.dh = s.d / 2;
  s.wq = (s.w + kLanes - 1) / kLanes * kLanes;
  s.hp = s.h + 2 * s.r;
  s.wp = s.wq + 2 * s.r + kLanes;
  s.rel = rel;
  return s;
}

// Runs fn(item) for item in [0, items) on the pool and the calling thread; returns when all
// items are done. Late-starting pool tasks find no item left and touch nothing else.
void parallel_for(ffi::ThreadPool& pool, int64_t items, std::function<void(int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
    std::function<void(int64_t)> fn;
    int64_t items;
  };
  auto st = std::make_shared<State>();
  st->fn = std::move(fn);
  st->items = items;
  auto worker = [st] {
    for (int64_t i; (i = st->next.fetch_add(1)) < st->items;) {
      st->fn(i);
      if (st->done.fetch_add(1) + 1 == st->items) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([worker] { worker(); });
  worker();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == st->items; });
}

// Copies head n of image b of x [B, H, W, C] into planar [d][rows][cols] at (row0, col0).
void to_planar(const float* x, const Shape& s, int64_t b, int64_t n, float* out, int64_t rows,
               int64_t cols, int64_t row0, int64_t col0) {
  for (int64_t y = 0; y < s.h; ++y) {
    const float* src = x + ((b * s.h + y) * s.w) * s.c + n * s.d;
    for (int64_t x0 = 0; x0 < s.w; ++x0)
      for (int64_t dd = 0; dd < s.d; ++dd)
        out[(dd * rows + y + row0) * cols + x0 + col0] = src[x0 * s.c + dd];
  }
}

// The inverse of to_planar: the image part of planar [d][rows][cols] at (row0, col0) into
// head n of image b of x [B, H, W, C].
void from_planar(const float* in, const Shape& s, int64_t b, int64_t n, float* x,
                 int64_t rows, int64_t cols, int64_t row0, int64_t col0) {
  for (int64_t y = 0; y < s.h; ++y) {
    float* dst = x + ((b * s.h + y) * s.w) * s.c + n * s.d;
    for (int64_t x0 = 0; x0 < s.w; ++x0)
      for (int64_t dd = 0; dd < s.d; ++dd)
        dst[x0 * s.c + dd] = in[(dd * rows + y + row0) * cols + x0 + col0];
  }
}

// Column masks [k][wq]: 0 where query column x sees an in-image key at offset j, else -1e30.
std::vector<float> column_mask(const Shape& s) {
  std::vector<float> m(s.k * s.wq);
  for (int64_t j = 0; j < s.k; ++j)
    for (int64_t x = 0; x < s.wq; ++x) {
      const int64_t col = x + j - s.r;
      m[j * s.wq + x] = (col >= 0 && col < s.w) ? 0.0f : kMasked;
    }
  return m;
}

// Per (image, head) buffers.
struct Planes {
  std::vector<float> q, k, v;  // q: [d][H][wq]; k, v: [d][hp][wp], image at (r, r)
  Planes(const Shape& s, const float* q_, const float* k_, const float* v_, int64_t b,
         int64_t n)
      : q(s.d * s.h * s.wq), k(s.d * s.hp * s.wp), v(s.d * s.hp * s.wp) {
    to_planar(q_, s, b, n, q.data(), s.h, s.wq, 0, 0);
    to_planar(k_, s, b, n, k.data(), s.hp, s.wp, s.r, s.r);
    to_planar(v_, s, b, n, v.data(), s.hp, s.wp, s.r, s.r);
  }
};

// Positional logit terms of row y for lanes x..x+8: th[i] = q[:dh].rel_h[i], and
// tw[j] = q[dh:].rel_w[j] plus the column mask. D: the head dimension when fixed at compile
// time (0: s.d), so that the loops over it unroll.
template <int D>
inline void positional(const Shape& s, const Planes& p, const float* rel_h, const float* rel_w,
                       const float* cmask, int64_t y, int64_t x, vf* th, vf* tw) {
  const int64_t dh = (D ? D : s.d) / 2;
  for (int64_t i = 0; i < s.k; ++i) th[i] = splat(0.0f);
  for (int64_t j = 0; j < s.k; ++j) tw[j] = load(cmask + j * s.wq + x);
  if (!s.rel) return;
  for (int64_t dd = 0; dd < dh; ++dd) {
    const vf qd = load(&p.q[(dd * s.h + y) * s.wq + x]);
    const vf qw = load(&p.q[((dd + dh) * s.h + y) * s.wq + x]);
    for (int64_t i = 0; i < s.k; ++i) th[i] += qd * rel_h[i * dh + dd];
    for (int64_t j = 0; j < s.k; ++j) tw[j] += qw * rel_w[j * dh + dd];
  }
}

// Logits of row y, lanes x.., for window rows [i0, i1): logit[i * k + j]; qv: q's d vectors.
template <int D>
inline void logits(const Shape& s, const Planes& p, int64_t y, int64_t x, int64_t i0, int64_t i1,
                   const vf* qv, const vf* th, const vf* tw, vf* out) {
  const int64_t d = D ? D : s.d, plane = s.hp * s.wp;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = 0; j < s.k; ++j) {
      const float* key = &p.k[(y + i) * s.wp + x + j];
      vf acc = th[i] + tw[j];
      for (int64_t dd = 0; dd < d; ++dd) acc += qv[dd] * load(key + dd * plane);
      out[i * s.k + j] = acc;
    }
}

// d vectors of a planar [d][rows][wq] buffer at row y, lanes x...
template <int D>
inline void gather(const Shape& s, const float* planar, int64_t y, int64_t x, vf* out) {
  const int64_t d = D ? D : s.d;
  for (int64_t dd = 0; dd < d; ++dd) out[dd] = load(&planar[(dd * s.h + y) * s.wq + x]);
}

struct ForwardArgs {
  const float *q, *k, *v, *rel_h, *rel_w;
  float *out, *lse;
};

template <int D>
void forward_item(const Shape& s, const std::vector<float>& cmask, const ForwardArgs& a,
                  int64_t item) {
  const int64_t d = D ? D : s.d, plane = s.hp * s.wp;
  const int64_t b = item / s.n, n = item % s.n;
  const Planes p(s, a.q, a.k, a.v, b, n);
  std::vector<float> o(d * s.h * s.wq);
  std::vector<vf> th(s.k), tw(s.k), lg(s.k * s.k), qv(d);
  for (int64_t y = 0; y < s.h; ++y) {
    const int64_t i0 = std::max<int64_t>(0, s.r - y), i1 = std::min(s.k, s.h + s.r - y);
    for (int64_t x = 0; x < s.wq; x += kLanes) {
      gather<D>(s, p.q.data(), y, x, qv.data());
      positional<D>(s, p, a.rel_h, a.rel_w, cmask.data(), y, x, th.data(), tw.data());
      logits<D>(s, p, y, x, i0, i1, qv.data(), th.data(), tw.data(), lg.data());
      vf m = splat(kMasked);
      for (int64_t o_ = i0 * s.k; o_ < i1 * s.k; ++o_) m = vmax(m, lg[o_]);
      vf sum = splat(0.0f);
      for (int64_t o_ = i0 * s.k; o_ < i1 * s.k; ++o_) {
        lg[o_] = vexp(lg[o_] - m);
        sum += lg[o_];
      }
      const vf inv = 1.0f / sum;
      for (int64_t dd = 0; dd < d; ++dd) {
        vf acc = splat(0.0f);
        for (int64_t i = i0; i < i1; ++i) {
          const float* row = &p.v[dd * plane + (y + i) * s.wp + x];
          for (int64_t j = 0; j < s.k; ++j) acc += lg[i * s.k + j] * load(row + j);
        }
        store(&o[(dd * s.h + y) * s.wq + x], acc * inv);
      }
      const vf l = m + vlog(sum);
      for (int64_t lane = 0; lane < kLanes && x + lane < s.w; ++lane)
        a.lse[((b * s.n + n) * s.h + y) * s.w + x + lane] = l[lane];
    }
  }
  from_planar(o.data(), s, b, n, a.out, s.h, s.wq, 0, 0);
}

struct BackwardArgs {
  const float *q, *k, *v, *rel_h, *rel_w, *out, *lse, *g;
  float *dq, *dk, *dv, *drel_h, *drel_w;
};

template <int D>
void backward_item(const Shape& s, const std::vector<float>& cmask, const BackwardArgs& a,
                   int64_t item) {
  const int64_t d = D ? D : s.d, dh = d / 2, plane = s.hp * s.wp;
  const int64_t b = item / s.n, n = item % s.n;
  const Planes p(s, a.q, a.k, a.v, b, n);
  std::vector<float> go(2 * d * s.h * s.wq);  // g and out, [2][d][H][wq]
  to_planar(a.g, s, b, n, go.data(), s.h, s.wq, 0, 0);
  to_planar(a.out, s, b, n, go.data() + d * s.h * s.wq, s.h, s.wq, 0, 0);
  const float* gpl = go.data();
  const float* opl = go.data() + d * s.h * s.wq;
  std::vector<float> dqpl(d * s.h * s.wq), dkpl(d * plane), dvpl(d * plane);
  std::vector<vf> th(s.k), tw(s.k), lg(s.k * s.k), rows(s.k), cols(s.k);
  std::vector<vf> qv(d), gv(d), ov(d), dqa(d);
  std::vector<vf> drh(s.k * dh, splat(0.0f)), drw(s.k * dh, splat(0.0f));
  std::vector<float> lrow(s.wq, 0.0f);
  for (int64_t y = 0; y < s.h; ++y) {
    const int64_t i0 = std::max<int64_t>(0, s.r - y), i1 = std::min(s.k, s.h + s.r - y);
    for (int64_t x = 0; x < s.w; ++x) lrow[x] = a.lse[((b * s.n + n) * s.h + y) * s.w + x];
    for (int64_t x = 0; x < s.wq; x += kLanes) {
      gather<D>(s, p.q.data(), y, x, qv.data());
      gather<D>(s, gpl, y, x, gv.data());
      gather<D>(s, opl, y, x, ov.data());
      positional<D>(s, p, a.rel_h, a.rel_w, cmask.data(), y, x, th.data(), tw.data());
      logits<D>(s, p, y, x, i0, i1, qv.data(), th.data(), tw.data(), lg.data());
      const vf l = load(&lrow[x]);
      vf delta = splat(0.0f);
      for (int64_t dd = 0; dd < d; ++dd) delta += gv[dd] * ov[dd];
      for (int64_t dd = 0; dd < d; ++dd) dqa[dd] = splat(0.0f);
      for (int64_t i = 0; i < s.k; ++i) rows[i] = cols[i] = splat(0.0f);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < s.k; ++j) {
          const vf pr = vexp(lg[i * s.k + j] - l);
          const int64_t at = (y + i) * s.wp + x + j;
          vf dp = splat(0.0f);
          for (int64_t dd = 0; dd < d; ++dd) dp += gv[dd] * load(&p.v[dd * plane + at]);
          const vf dl = pr * (dp - delta);
          rows[i] += dl;
          cols[j] += dl;
          for (int64_t dd = 0; dd < d; ++dd) {
            const int64_t kv = dd * plane + at;
            store(&dvpl[kv], load(&dvpl[kv]) + pr * gv[dd]);
            store(&dkpl[kv], load(&dkpl[kv]) + dl * qv[dd]);
            dqa[dd] += dl * load(&p.k[kv]);
          }
        }
      if (s.rel)
        for (int64_t dd = 0; dd < dh; ++dd) {
          for (int64_t i = 0; i < s.k; ++i) {
            dqa[dd] += rows[i] * a.rel_h[i * dh + dd];
            drh[i * dh + dd] += rows[i] * qv[dd];
          }
          for (int64_t j = 0; j < s.k; ++j) {
            dqa[dd + dh] += cols[j] * a.rel_w[j * dh + dd];
            drw[j * dh + dd] += cols[j] * qv[dd + dh];
          }
        }
      for (int64_t dd = 0; dd < d; ++dd) store(&dqpl[(dd * s.h + y) * s.wq + x], dqa[dd]);
    }
  }
  from_planar(dqpl.data(), s, b, n, a.dq, s.h, s.wq, 0, 0);
  from_planar(dkpl.data(), s, b, n, a.dk, s.hp, s.wp, s.r, s.r);
  from_planar(dvpl.data(), s, b, n, a.dv, s.hp, s.wp, s.r, s.r);
  for (int64_t t = 0; t < s.k * dh; ++t) {
    a.drel_h[item * s.k * dh + t] = hsum(drh[t]);
    a.drel_w[item * s.k * dh + t] = hsum(drw[t]);
  }
}

// fn<D>(item) with D fixed at compile time for the usual head dimensions.
template <template <int> class Fn, typename... Args>
void with_head_dim(int64_t d, Args&&... args) {
  switch (d) {
    case 8: return Fn<8>::run(std::forward<Args>(args)...);
    case 16: return Fn<16>::run(std::forward<Args>(args)...);
    case 32: return Fn<32>::run(std::forward<Args>(args)...);
    case 64: return Fn<64>::run(std::forward<Args>(args)...);
    default: return Fn<0>::run(std::forward<Args>(args)...);
  }
}

template <int D>
struct Forward {
  static void run(ffi::ThreadPool& pool, const Shape& s, const std::vector<float>& cmask,
                  const ForwardArgs& a) {
    parallel_for(pool, s.b * s.n, [&](int64_t item) { forward_item<D>(s, cmask, a, item); });
  }
};

template <int D>
struct Backward {
  static void run(ffi::ThreadPool& pool, const Shape& s, const std::vector<float>& cmask,
                  const BackwardArgs& a) {
    parallel_for(pool, s.b * s.n, [&](int64_t item) { backward_item<D>(s, cmask, a, item); });
  }
};

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> rel_h,
                   ffi::Buffer<ffi::F32> rel_w, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, int64_t num_heads, int64_t kernel_size,
                   bool rel) {
  const Shape s = make_shape(q, num_heads, kernel_size, rel);
  const ForwardArgs a{q.typed_data(),     k.typed_data(),     v.typed_data(),
                      rel_h.typed_data(), rel_w.typed_data(), out->typed_data(),
                      lse->typed_data()};
  with_head_dim<Forward>(s.d, pool, s, column_mask(s), a);
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> rel_h,
                    ffi::Buffer<ffi::F32> rel_w, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> g,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> drel_h,
                    ffi::ResultBuffer<ffi::F32> drel_w, int64_t num_heads,
                    int64_t kernel_size, bool rel) {
  const Shape s = make_shape(q, num_heads, kernel_size, rel);
  // drel_h, drel_w: per (image, head) partial sums [B * N, k, dh], summed by the caller.
  const BackwardArgs a{q.typed_data(),      k.typed_data(),      v.typed_data(),
                       rel_h.typed_data(),  rel_w.typed_data(),  out.typed_data(),
                       lse.typed_data(),    g.typed_data(),      dq->typed_data(),
                       dk->typed_data(),    dv->typed_data(),    drel_h->typed_data(),
                       drel_w->typed_data()};
  with_head_dim<Backward>(s.d, pool, s, column_mask(s), a);
  return ffi::Error::Success();
}

}  // namespace

// Bindings (a Binding can only be built in one chained expression): q, k, v, rel_h, rel_w ->
// out, lse; and q, k, v, rel_h, rel_w, out, lse, g -> dq, dk, dv, drel_h, drel_w.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SasaLocalAttentionFwd, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<bool>("rel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SasaLocalAttentionBwd, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<bool>("rel"));
