// Fused CPU kernels of EdgeConv's contraction (models/layers/slot_kernels.py documents the
// maths and the layout). One sparse 4-operand form
//
//   Phi(O, H, Y, W) = sum_{n, slot s of n, entry e} coef_e O[n, col_e, c] H[j(s), m1_e, c]
//                                                   Y[s, m2_e] W[s, p_e, c]   (summed over c)
//
// and four kernels, each the derivative of Phi by one operand given the other three
// (forward = dPhi/dO; every backward is another of the four). Nothing the size of
// slots x channels x paths is ever written: each slot's products stay in a C-long buffer.
//
// Entries are grouped by (p, m1): a group's W[s, p] * H[j, m1] (or its dual) is formed once.
// A block of Nc receivers: receiver n's edges are rows start[n] .. start[n + 1] of Y and W
// (back to back, no padding), O has one row per receiver; H and its gradient are whole
// ([N, KH, C]). Parallel over receivers or over senders: no two threads
// write the same row. Plain C++ and OpenMP: built at first use, no torch headers.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Table {
  int64_t groups;
  const int64_t *gp, *gm1, *gstart;  // group g: path, H row, entries [gstart[g], gstart[g + 1])
  const int64_t *em2, *ecol;          // entry e: Y column, O row
};

// O[n] = sum over n's slots: O[n, col] += coef Y[s, m2] (W[s, p] * H[j, m1])
template <typename T>
void forward(int64_t nc, const int64_t* start, const int64_t* sender, const T* y,
             int64_t m, const T* w, int64_t p, const T* h, int64_t kh, T* o, int64_t cols,
             int64_t c, Table t, const T* coef, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> tmp(c);
#pragma omp for schedule(dynamic, 8)
    for (int64_t n = 0; n < nc; ++n) {
      T* on = o + n * cols * c;
      std::memset(on, 0, sizeof(T) * cols * c);
      for (int64_t s = start[n]; s < start[n + 1]; ++s) {
        const T* ys = y + s * m;
        const T* ws = w + s * p * c;
        const T* hj = h + sender[s] * kh * c;
        for (int64_t g = 0; g < t.groups; ++g) {
          const T* wp = ws + t.gp[g] * c;
          const T* hm = hj + t.gm1[g] * c;
#pragma omp simd
          for (int64_t i = 0; i < c; ++i) tmp[i] = wp[i] * hm[i];
          for (int64_t e = t.gstart[g]; e < t.gstart[g + 1]; ++e) {
            const T a = coef[e] * ys[t.em2[e]];
            if (a == T(0)) continue;
            T* oc = on + t.ecol[e] * c;
#pragma omp simd
            for (int64_t i = 0; i < c; ++i) oc[i] += a * tmp[i];
          }
        }
      }
    }
  }
}

// dPhi/dW[s, p] = sum over groups of p: H[j, m1] * (sum_e coef Y[s, m2] O[n, col])
template <typename T>
void grad_w(int64_t nc, const int64_t* start, const int64_t* sender, const T* y,
            int64_t m, const T* h, int64_t kh, const T* o, int64_t cols, T* gw, int64_t p,
            int64_t c, Table t, const T* coef, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> acc(c);
#pragma omp for schedule(dynamic, 8)
    for (int64_t n = 0; n < nc; ++n) {
      const T* on = o + n * cols * c;
      std::memset(gw + start[n] * p * c, 0, sizeof(T) * (start[n + 1] - start[n]) * p * c);
      for (int64_t s = start[n]; s < start[n + 1]; ++s) {
        const T* ys = y + s * m;
        const T* hj = h + sender[s] * kh * c;
        T* gs = gw + s * p * c;
        for (int64_t g = 0; g < t.groups; ++g) {
          std::fill(acc.begin(), acc.end(), T(0));
          for (int64_t e = t.gstart[g]; e < t.gstart[g + 1]; ++e) {
            const T a = coef[e] * ys[t.em2[e]];
            if (a == T(0)) continue;
            const T* oc = on + t.ecol[e] * c;
#pragma omp simd
            for (int64_t i = 0; i < c; ++i) acc[i] += a * oc[i];
          }
          const T* hm = hj + t.gm1[g] * c;
          T* gp = gs + t.gp[g] * c;
#pragma omp simd
          for (int64_t i = 0; i < c; ++i) gp[i] += hm[i] * acc[i];
        }
      }
    }
  }
}

// dPhi/dY[s, m2] = sum_e coef <W[s, p] * H[j, m1], O[n, col]>
template <typename T>
void grad_y(int64_t nc, const int64_t* start, const int64_t* sender, const T* w,
            int64_t p, const T* h, int64_t kh, const T* o, int64_t cols, T* gy, int64_t m,
            int64_t c, Table t, const T* coef, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> tmp(c);
#pragma omp for schedule(dynamic, 8)
    for (int64_t n = 0; n < nc; ++n) {
      const T* on = o + n * cols * c;
      std::memset(gy + start[n] * m, 0, sizeof(T) * (start[n + 1] - start[n]) * m);
      for (int64_t s = start[n]; s < start[n + 1]; ++s) {
        const T* ws = w + s * p * c;
        const T* hj = h + sender[s] * kh * c;
        T* gs = gy + s * m;
        for (int64_t g = 0; g < t.groups; ++g) {
          const T* wp = ws + t.gp[g] * c;
          const T* hm = hj + t.gm1[g] * c;
#pragma omp simd
          for (int64_t i = 0; i < c; ++i) tmp[i] = wp[i] * hm[i];
          for (int64_t e = t.gstart[g]; e < t.gstart[g + 1]; ++e) {
            const T* oc = on + t.ecol[e] * c;
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < c; ++i) dot += tmp[i] * oc[i];
            gs[t.em2[e]] += coef[e] * dot;
          }
        }
      }
    }
  }
}

// dPhi/dH[j, m1] += sum over the block's slots s sent by j (order[ptr[j] .. ptr[j + 1]]):
// W[s, p] * (sum_e coef Y[s, m2] O[n, col]). Adds to gh (the caller zeroes it once).
template <typename T>
void grad_h(int64_t nodes, const int64_t* recv, const int64_t* order, const int64_t* ptr, const T* y,
            int64_t m, const T* w, int64_t p, const T* o, int64_t cols, T* gh, int64_t kh,
            int64_t c, Table t, const T* coef, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> acc(c);
#pragma omp for schedule(dynamic, 8)
    for (int64_t j = 0; j < nodes; ++j) {
      T* hj = gh + j * kh * c;
      for (int64_t k = ptr[j]; k < ptr[j + 1]; ++k) {
        const int64_t s = order[k];
        const T* on = o + recv[s] * cols * c;
        const T* ys = y + s * m;
        const T* ws = w + s * p * c;
        for (int64_t g = 0; g < t.groups; ++g) {
          std::fill(acc.begin(), acc.end(), T(0));
          bool any = false;
          for (int64_t e = t.gstart[g]; e < t.gstart[g + 1]; ++e) {
            const T a = coef[e] * ys[t.em2[e]];
            if (a == T(0)) continue;
            any = true;
            const T* oc = on + t.ecol[e] * c;
#pragma omp simd
            for (int64_t i = 0; i < c; ++i) acc[i] += a * oc[i];
          }
          if (!any) continue;
          const T* wp = ws + t.gp[g] * c;
          T* hm = hj + t.gm1[g] * c;
#pragma omp simd
          for (int64_t i = 0; i < c; ++i) hm[i] += wp[i] * acc[i];
        }
      }
    }
  }
}


// Channel-wise products (models/mace.py ChannelProduct): per atom n and channel c,
//   Psi(O, X, Y, W) = sum_{n, e, c} coef_e O[n, k3_e, c] X[n, k1_e, c] Y[n, k2_e, c] W[q_e, c].
// Entries grouped by (k1, k2); cw[e, c] = coef_e W[q_e, c] is formed by the caller.
struct ProductTable {
  int64_t groups;
  const int64_t *gk1, *gk2, *gstart;  // group g: X row, Y row, entries [gstart[g], gstart[g + 1])
  const int64_t* ek3;                  // entry e: O row
};

// O[n, k3] = sum_e cw[e] X[n, k1] Y[n, k2]
template <typename T>
void product(int64_t n, const T* x, int64_t k1, const T* y, int64_t k2, const T* cw, T* o,
             int64_t k3, int64_t c, ProductTable t, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> tmp(c);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      T* on = o + i * k3 * c;
      std::memset(on, 0, sizeof(T) * k3 * c);
      for (int64_t g = 0; g < t.groups; ++g) {
        const T* xm = x + (i * k1 + t.gk1[g]) * c;
        const T* ym = y + (i * k2 + t.gk2[g]) * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) tmp[j] = xm[j] * ym[j];
        for (int64_t e = t.gstart[g]; e < t.gstart[g + 1]; ++e) {
          T* oc = on + t.ek3[e] * c;
          const T* w = cw + e * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) oc[j] += w[j] * tmp[j];
        }
      }
    }
  }
}

// dPsi/dX (first = 1: out[n, k1] from other = Y) or dPsi/dY (first = 0: out[n, k2] from X):
// per group, acc = sum_e cw[e] O[n, k3]; out[n, k] += acc * other[n, k'].
template <typename T>
void product_grad(int64_t n, const T* o, int64_t k3, const T* other, int64_t ko, T* out,
                  int64_t kout, int first, const T* cw, int64_t c, ProductTable t, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> acc(c);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* on = o + i * k3 * c;
      T* outn = out + i * kout * c;
      std::memset(outn, 0, sizeof(T) * kout * c);
      for (int64_t g = 0; g < t.groups; ++g) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t e = t.gstart[g]; e < t.gstart[g + 1]; ++e) {
          const T* oc = on + t.ek3[e] * c;
          const T* w = cw + e * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) acc[j] += w[j] * oc[j];
        }
        const T* om = other + (i * ko + (first ? t.gk2[g] : t.gk1[g])) * c;
        T* dst = outn + (first ? t.gk1[g] : t.gk2[g]) * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) dst[j] += acc[j] * om[j];
      }
    }
  }
}

// per entry: ge[e, c] = sum_n O[n, k3_e, c] X[n, k1_e, c] Y[n, k2_e, c] (dPsi/dW is coef x this)
template <typename T>
void product_grad_entries(int64_t n, const T* o, int64_t k3, const T* x, int64_t k1, const T* y,
                          int64_t k2, T* ge, int64_t entries, int64_t c, ProductTable t,
                          int threads) {
  std::memset(ge, 0, sizeof(T) * entries * c);
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> local(entries * c, T(0)), tmp(c);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* on = o + i * k3 * c;
      for (int64_t g = 0; g < t.groups; ++g) {
        const T* xm = x + (i * k1 + t.gk1[g]) * c;
        const T* ym = y + (i * k2 + t.gk2[g]) * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) tmp[j] = xm[j] * ym[j];
        for (int64_t e = t.gstart[g]; e < t.gstart[g + 1]; ++e) {
          const T* oc = on + t.ek3[e] * c;
          T* le = local.data() + e * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) le[j] += tmp[j] * oc[j];
        }
      }
    }
#pragma omp critical
    for (int64_t k = 0; k < entries * c; ++k) ge[k] += local[k];
  }
}

}  // namespace

// C entry points, one per kernel and dtype (f32, f64); ctypes calls them with raw pointers.
#define TABLE Table{groups, gp, gm1, gstart, em2, ecol}
#define ENTRY_POINTS(T, SUFFIX)                                                                 \
  extern "C" void slot_forward_##SUFFIX(                                                        \
      int64_t nc, const int64_t* start, const int64_t* sender, const T* y,                      \
      int64_t m, const T* w, int64_t p, const T* h, int64_t kh, T* o, int64_t cols, int64_t c,  \
      int64_t groups, const int64_t* gp, const int64_t* gm1, const int64_t* gstart,             \
      const int64_t* em2, const int64_t* ecol, const T* coef, int threads) {                    \
    forward<T>(nc, start, sender, y, m, w, p, h, kh, o, cols, c, TABLE, coef, threads);      \
  }                                                                                             \
  extern "C" void slot_grad_w_##SUFFIX(                                                         \
      int64_t nc, const int64_t* start, const int64_t* sender, const T* y,                      \
      int64_t m, const T* h, int64_t kh, const T* o, int64_t cols, T* gw, int64_t p, int64_t c, \
      int64_t groups, const int64_t* gp, const int64_t* gm1, const int64_t* gstart,             \
      const int64_t* em2, const int64_t* ecol, const T* coef, int threads) {                    \
    grad_w<T>(nc, start, sender, y, m, h, kh, o, cols, gw, p, c, TABLE, coef, threads);      \
  }                                                                                             \
  extern "C" void slot_grad_y_##SUFFIX(                                                         \
      int64_t nc, const int64_t* start, const int64_t* sender, const T* w,                      \
      int64_t p, const T* h, int64_t kh, const T* o, int64_t cols, T* gy, int64_t m, int64_t c, \
      int64_t groups, const int64_t* gp, const int64_t* gm1, const int64_t* gstart,             \
      const int64_t* em2, const int64_t* ecol, const T* coef, int threads) {                    \
    grad_y<T>(nc, start, sender, w, p, h, kh, o, cols, gy, m, c, TABLE, coef, threads);      \
  }                                                                                             \
  extern "C" void slot_grad_h_##SUFFIX(                                                         \
      int64_t nodes, const int64_t* recv, const int64_t* order, const int64_t* ptr, const T* y, \
      int64_t m, const T* w, int64_t p, const T* o, int64_t cols, T* gh, int64_t kh, int64_t c, \
      int64_t groups, const int64_t* gp, const int64_t* gm1, const int64_t* gstart,             \
      const int64_t* em2, const int64_t* ecol, const T* coef, int threads) {                    \
    grad_h<T>(nodes, recv, order, ptr, y, m, w, p, o, cols, gh, kh, c, TABLE, coef, threads);      \
  }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(double, f64)

#define PTABLE ProductTable{groups, gk1, gk2, gstart, ek3}
#define PRODUCT_ENTRY_POINTS(T, SUFFIX)                                                         \
  extern "C" void product_forward_##SUFFIX(                                                     \
      int64_t n, const T* x, int64_t k1, const T* y, int64_t k2, const T* cw, T* o, int64_t k3, \
      int64_t c, int64_t groups, const int64_t* gk1, const int64_t* gk2, const int64_t* gstart, \
      const int64_t* ek3, int threads) {                                                        \
    product<T>(n, x, k1, y, k2, cw, o, k3, c, PTABLE, threads);                                 \
  }                                                                                             \
  extern "C" void product_grad_##SUFFIX(                                                        \
      int64_t n, const T* o, int64_t k3, const T* other, int64_t ko, T* out, int64_t kout,      \
      int first, const T* cw, int64_t c, int64_t groups, const int64_t* gk1,                    \
      const int64_t* gk2, const int64_t* gstart, const int64_t* ek3, int threads) {             \
    product_grad<T>(n, o, k3, other, ko, out, kout, first, cw, c, PTABLE, threads);             \
  }                                                                                             \
  extern "C" void product_grad_entries_##SUFFIX(                                                \
      int64_t n, const T* o, int64_t k3, const T* x, int64_t k1, const T* y, int64_t k2, T* ge, \
      int64_t entries, int64_t c, int64_t groups, const int64_t* gk1, const int64_t* gk2,       \
      const int64_t* gstart, const int64_t* ek3, int threads) {                                 \
    product_grad_entries<T>(n, o, k3, x, k1, y, k2, ge, entries, c, PTABLE, threads);           \
  }

PRODUCT_ENTRY_POINTS(float, f32)
PRODUCT_ENTRY_POINTS(double, f64)
