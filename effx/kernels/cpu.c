/* effx's CPU kernels: float32 products whose cost follows the bytes of weight they read.
 *
 * A decode step multiplies a few rows of activations (1 token, a batch, or a few tokens to verify) by
 * each weight matrix once, so on a CPU it is bound by reading the weights. These kernels read each weight
 * row once per call, whatever the number of activation rows (up to a few dozen), from the weight's own
 * row-major [N, K] layout: no packed copy, so passes' slices, shared weights and row gathers need nothing
 * more. Every output y[m, n] is one dot product accumulated in a fixed order (16-lane partial sums over k,
 * then a fixed reduction), on one thread: results do not depend on how many rows are computed together
 * (batch invariant) nor on the thread count.
 *
 * Built by effx.kernels with the C compiler at first use; AVX-512F. Threads come from OpenMP (the libgomp
 * that torch loaded, which this library links against by soname).
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define TARGET __attribute__((target("avx512f,fma")))
#define INLINE static inline __attribute__((always_inline))

int effx_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

/* How far ahead of the rows being read (in floats) the next weight bytes are prefetched into L2: 64 KB.
 * Rows of a block are contiguous, so this reaches a few blocks ahead; the hardware prefetchers alone
 * kept too few lines in flight (SmolLM2's layer products: 19.7 -> 17.0 ms for one token, 23.3 -> 17.6 ms
 * for four, measured interleaved). A prefetch past the end of a weight is a harmless hint. */
#define PREFETCH 16384

/* out[i * R + j] = x[i, :] . w[j][:] for i < MB, j < R */
#define DEFINE_BLOCK(MB, R)                                                                        \
  TARGET INLINE void block_##MB##_##R(const float *x, size_t ldx, const float *const *w, int K,      \
                                      float *out) {                                                \
    __m512 acc[MB][R];                                                                             \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) acc[i][j] = _mm512_setzero_ps();                                 \
    int kmain = K & ~15;                                                                           \
    for (int k = 0; k < kmain; k += 16) {                                                          \
      __m512 wv[R];                                                                                \
      for (int j = 0; j < R; j++) {                                                                \
        wv[j] = _mm512_loadu_ps(w[j] + k);                                                         \
        _mm_prefetch((const char *)(w[j] + k + PREFETCH), _MM_HINT_T1);                            \
      }                                                                                            \
      for (int i = 0; i < MB; i++) {                                                               \
        __m512 xv = _mm512_loadu_ps(x + i * ldx + k);                                              \
        for (int j = 0; j < R; j++) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);             \
      }                                                                                            \
    }                                                                                              \
    if (K & 15) {                                                                                  \
      __mmask16 t = (__mmask16)((1u << (K & 15)) - 1);                                             \
      __m512 wv[R];                                                                                \
      for (int j = 0; j < R; j++) wv[j] = _mm512_maskz_loadu_ps(t, w[j] + kmain);                  \
      for (int i = 0; i < MB; i++) {                                                               \
        __m512 xv = _mm512_maskz_loadu_ps(t, x + i * ldx + kmain);                                 \
        for (int j = 0; j < R; j++) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);             \
      }                                                                                            \
    }                                                                                              \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) out[i * R + j] = _mm512_reduce_add_ps(acc[i][j]);                \
  }

DEFINE_BLOCK(1, 8)
DEFINE_BLOCK(2, 8)
DEFINE_BLOCK(3, 6)
DEFINE_BLOCK(4, 6)
DEFINE_BLOCK(5, 4)
DEFINE_BLOCK(6, 4)

/* Rows of weight handled per work item: a multiple of every block's R (8, 6 and 4). */
#define ROWS 48

/* The dot products of activation rows x[0..M) with weight rows rows[0..nr) (nr <= ROWS), into
 * out[m * ROWS + j]. Rows past nr repeat row 0 (computed, not stored). */
TARGET static void dots(const float *x, size_t ldx, int M, int K, const float *const *rows, int nr,
                        float *out) {
  const float *wr[ROWS];
  for (int j = 0; j < ROWS; j++) wr[j] = rows[j < nr ? j : 0];
  float tmp[6 * 8];
  for (int m0 = 0; m0 < M;) {
    int left = M - m0;
    int mb = left <= 6 ? left : (left >= 10 ? 6 : 4); /* chunks of 1..6 rows */
    const float *xm = x + (size_t)m0 * ldx;
    int R = mb <= 2 ? 8 : mb <= 4 ? 6 : 4;
    for (int h = 0; h < ROWS && h < nr; h += R) {
      switch (mb) {
        case 1: block_1_8(xm, ldx, wr + h, K, tmp); break;
        case 2: block_2_8(xm, ldx, wr + h, K, tmp); break;
        case 3: block_3_6(xm, ldx, wr + h, K, tmp); break;
        case 4: block_4_6(xm, ldx, wr + h, K, tmp); break;
        case 5: block_5_4(xm, ldx, wr + h, K, tmp); break;
        default: block_6_4(xm, ldx, wr + h, K, tmp); break;
      }
      for (int i = 0; i < mb; i++)
        for (int j = 0; j < R && h + j < nr; j++) out[(size_t)(m0 + i) * ROWS + h + j] = tmp[i * R + j];
    }
    m0 += mb;
  }
}

/* Up to 4 products of the same activations, as one parallel loop over all their row blocks:
 * ys[p][m, n] = x[m, :] . ws[p][n, :] (+ bs[p][n]), ys[p] with row stride ldys[p]. */
TARGET void effx_linear(const float *x, int M, int K, int ldx, int np, const float *const *ws,
                        const float *const *bs, const int *Ns, float *const *ys, const int *ldys,
                        int nthreads) {
  int start[5] = {0};
  for (int p = 0; p < np; p++) start[p + 1] = start[p] + (Ns[p] + ROWS - 1) / ROWS;
  int nblocks = start[np];
#pragma omp parallel num_threads(nthreads)
  {
    float out[64 * ROWS];
#pragma omp for schedule(static)
    for (int b = 0; b < nblocks; b++) {
      int p = 0;
      while (b >= start[p + 1]) p++;
      int n0 = (b - start[p]) * ROWS, nr = Ns[p] - n0 < ROWS ? Ns[p] - n0 : ROWS;
      const float *rows[ROWS];
      for (int j = 0; j < nr; j++) rows[j] = ws[p] + (size_t)(n0 + j) * K;
      for (int m0 = 0; m0 < M; m0 += 64) {
        int mc = M - m0 < 64 ? M - m0 : 64;
        dots(x + (size_t)m0 * ldx, ldx, mc, K, rows, nr, out);
        const float *bias = bs[p];
        for (int m = 0; m < mc; m++) {
          float *y = ys[p] + (size_t)(m0 + m) * ldys[p] + n0;
          for (int j = 0; j < nr; j++) y[j] = out[m * ROWS + j] + (bias ? bias[n0 + j] : 0.f);
        }
      }
    }
  }
}

/* One product: y[m, n] = x[m, :] . w[n, :] (+ b[n]), y with row stride ldy (scalar arguments: a cheaper
 * call from Python than effx_linear's arrays). */
TARGET void effx_linear1(const float *x, int M, int K, const float *w, const float *b, int N, float *y,
                         int ldy, int nthreads) {
  effx_linear(x, M, K, K, 1, &w, &b, &N, &y, &ldy, nthreads);
}

void effx_rope(float *t, int M, int H, int D, int ld, const float *cos, const float *sin);

/* A Llama attention's input side in one call: q, k and v of x as column ranges of y [M, nq + 2 nkv],
 * then the rotary embedding on q's and k's heads of d values. */
TARGET void effx_qkv_rope(const float *x, int M, int K, const float *wq, const float *wk, const float *wv,
                          const float *bq, const float *bk, const float *bv, int nq, int nkv, float *y,
                          const float *cos, const float *sin, int d, int nthreads) {
  const float *ws[3] = {wq, wk, wv}, *bs[3] = {bq, bk, bv};
  int ns[3] = {nq, nkv, nkv}, width = nq + 2 * nkv;
  int lds[3] = {width, width, width};
  float *ys[3] = {y, y + nq, y + nq + nkv};
  effx_linear(x, M, K, K, 3, ws, bs, ns, ys, lds, nthreads);
  effx_rope(y, M, nq / d, d, width, cos, sin);
  effx_rope(y + nq, M, nkv / d, d, width, cos, sin);
}

/* y[m, n] = x[m, :] . w[ids[n], :]: a product with a gathered subset of weight rows (no copy). */
TARGET void effx_linear_rows(const float *x, int M, int K, const float *w, const int64_t *ids, int N,
                             float *y, int nthreads) {
  int nblocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(nthreads)
  {
    float out[64 * ROWS];
#pragma omp for schedule(static)
    for (int b = 0; b < nblocks; b++) {
      int n0 = b * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;
      const float *rows[ROWS];
      for (int j = 0; j < nr; j++) rows[j] = w + (size_t)ids[n0 + j] * K;
      for (int m0 = 0; m0 < M; m0 += 64) {
        int mc = M - m0 < 64 ? M - m0 : 64;
        dots(x + (size_t)m0 * K, K, mc, K, rows, nr, out);
        for (int m = 0; m < mc; m++)
          for (int j = 0; j < nr; j++) y[(size_t)(m0 + m) * N + n0 + j] = out[m * ROWS + j];
      }
    }
  }
}

/* The gated MLP's input side: y[m, n] = silu(x . wg[n]) * (x . wu[n]). */
TARGET void effx_gated(const float *x, int M, int K, const float *wg, const float *wu, int N, float *y,
                       int nthreads) {
  int nblocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(nthreads)
  {
    float g[64 * ROWS], u[64 * ROWS];
#pragma omp for schedule(static)
    for (int b = 0; b < nblocks; b++) {
      int n0 = b * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;
      const float *rg[ROWS], *ru[ROWS];
      for (int j = 0; j < nr; j++) {
        rg[j] = wg + (size_t)(n0 + j) * K;
        ru[j] = wu + (size_t)(n0 + j) * K;
      }
      for (int m0 = 0; m0 < M; m0 += 64) {
        int mc = M - m0 < 64 ? M - m0 : 64;
        dots(x + (size_t)m0 * K, K, mc, K, rg, nr, g);
        dots(x + (size_t)m0 * K, K, mc, K, ru, nr, u);
        for (int m = 0; m < mc; m++)
          for (int j = 0; j < nr; j++) {
            float a = g[m * ROWS + j];
            y[(size_t)(m0 + m) * N + n0 + j] = a / (1.f + expf(-a)) * u[m * ROWS + j];
          }
      }
    }
  }
}

/* RMSNorm over the last axis: y[m, :] = w * (x[m, :] / sqrt(mean(x[m, :]^2) + eps)). */
TARGET void effx_rms_norm(const float *x, const float *w, float *y, int M, int D, float eps) {
  for (int m = 0; m < M; m++) {
    const float *xm = x + (size_t)m * D;
    float *ym = y + (size_t)m * D;
    float ss = 0.f;
    for (int i = 0; i < D; i++) ss += xm[i] * xm[i];
    float r = 1.f / sqrtf(ss / (float)D + eps);
    for (int i = 0; i < D; i++) ym[i] = w[i] * (xm[i] * r);
  }
}

/* Rotary embedding in place, Llama's rotate-half form, on M rows of H heads of D values (row stride ld):
 * t[i] = t[i] cos[i] - t[i + D/2] sin[i];  t[i + D/2] = t[i + D/2] cos[i + D/2] + t[i] sin[i + D/2]. */
void effx_rope(float *t, int M, int H, int D, int ld, const float *cos, const float *sin) {
  int half = D / 2;
  for (int m = 0; m < M; m++) {
    const float *c = cos + (size_t)m * D, *s = sin + (size_t)m * D;
    for (int h = 0; h < H; h++) {
      float *v = t + (size_t)m * ld + (size_t)h * D;
      for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}
