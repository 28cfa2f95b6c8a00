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

#define TARGET __attribute__((target("avx512f,avx512bw,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

int effx_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
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

/* A weight as the kernels read it: float32 rows, or quantized rows (effx.quant's format). */
typedef struct {
  int kind;          /* 0: float32 [N, ld]; 4: 4-bit uint8 [N, ld bytes]; 8: int8 [N, ld]; 16: bfloat16 [N, ld] */
  const void *data;
  const void *scale; /* [N, ngroups] float16 or float32 (kinds 4 and 8) */
  const void *min;   /* the same, or NULL */
  int scale_f16;     /* scale and min are float16 */
  int gshift;        /* log2 of the values per scale */
  int ngroups;
  int ld;            /* row stride of data, in elements of its type (bytes for kind 4) */
} effx_weight;

/* Quantized blocks: two 16-lane vectors hold a row's weights k0..k0+31 (k0 a multiple of 32), de-quantized
 * exactly as effx.quant.dequantize does (a product, then a sum: no contraction, see -ffp-contract=off), and
 * each is used as the float kernels use their 16-lane loads: every output is the float kernel's dot product
 * over the de-quantized weights, bit for bit (K a multiple of 16). */
TARGET INLINE __m512 broadcast_at(const void *p, int f16, size_t i) {
  return f16 ? _mm512_cvtph_ps(_mm256_set1_epi16((short)((const uint16_t *)p)[i]))
             : _mm512_set1_ps(((const float *)p)[i]);
}

TARGET INLINE void scale_pair(const effx_weight *W, size_t row, int k0, __m512 *lo, __m512 *hi) {
  size_t g = row * (size_t)W->ngroups;
  size_t g0 = g + (size_t)(k0 >> W->gshift);
  __m512 d0 = broadcast_at(W->scale, W->scale_f16, g0);
  if (W->gshift >= 5) { /* one scale for the 32 values */
    *lo = _mm512_mul_ps(*lo, d0);
    *hi = _mm512_mul_ps(*hi, d0);
    if (W->min) {
      __m512 m0 = broadcast_at(W->min, W->scale_f16, g0);
      *lo = _mm512_add_ps(*lo, m0);
      *hi = _mm512_add_ps(*hi, m0);
    }
    return;
  }
  *lo = _mm512_mul_ps(*lo, d0);
  *hi = _mm512_mul_ps(*hi, broadcast_at(W->scale, W->scale_f16, g0 + 1));
  if (W->min) {
    *lo = _mm512_add_ps(*lo, broadcast_at(W->min, W->scale_f16, g0));
    *hi = _mm512_add_ps(*hi, broadcast_at(W->min, W->scale_f16, g0 + 1));
  }
}

TARGET INLINE void load32_4(const effx_weight *W, size_t row, int k0, __m512 *lo, __m512 *hi) {
  const uint8_t *p = (const uint8_t *)W->data + row * (size_t)W->ld + k0 / 2;
  _mm_prefetch((const char *)p + 4 * PREFETCH / 8, _MM_HINT_T1);
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
  if (W->gshift >= 5) {
    /* one scale for the 32 values: de-quantize the 16 possible values once, then look each one up
     * (vpermps reads the low 4 bits of each index) */
    size_t g = row * (size_t)W->ngroups + (size_t)(k0 >> W->gshift);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m512 d = broadcast_at(W->scale, W->scale_f16, g), table;
    if (W->min)
      table = _mm512_add_ps(_mm512_mul_ps(iota, d), broadcast_at(W->min, W->scale_f16, g));
    else
      table = _mm512_mul_ps(centred, d);
    *lo = _mm512_permutexvar_ps(v, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    return;
  }
  __m512i a = _mm512_and_si512(v, _mm512_set1_epi32(15)), b = _mm512_srli_epi32(v, 4);
  if (!W->min) {
    a = _mm512_sub_epi32(a, _mm512_set1_epi32(8));
    b = _mm512_sub_epi32(b, _mm512_set1_epi32(8));
  }
  *lo = _mm512_cvtepi32_ps(a);
  *hi = _mm512_cvtepi32_ps(b);
  scale_pair(W, row, k0, lo, hi);
}

TARGET INLINE void load32_8(const effx_weight *W, size_t row, int k0, __m512 *lo, __m512 *hi) {
  const int8_t *p = (const int8_t *)W->data + row * (size_t)W->ld + k0;
  _mm_prefetch((const char *)p + 4 * PREFETCH / 4, _MM_HINT_T1);
  *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
  *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
  scale_pair(W, row, k0, lo, hi);
}

TARGET INLINE void load32_16(const effx_weight *W, size_t row, int k0, __m512 *lo, __m512 *hi) {
  const uint16_t *p = (const uint16_t *)W->data + row * (size_t)W->ld + k0;
  _mm_prefetch((const char *)p + 4 * PREFETCH / 2, _MM_HINT_T1);
  __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 16)));
  *lo = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
  *hi = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
}

/* out[i * R + j] = x[i, :] . w[rows[j]] for i < MB, j < R, w quantized (kind KIND) */
#define DEFINE_QBLOCK(KIND, MB, R)                                                                  \
  TARGET INLINE void qblock_##KIND##_##MB##_##R(const float *x, size_t ldx, const effx_weight *W,   \
                                                const size_t *rows, int K, float *out) {            \
    __m512 acc[MB][R];                                                                             \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) acc[i][j] = _mm512_setzero_ps();                                 \
    int kmain = K & ~31;                                                                           \
    for (int k0 = 0; k0 < kmain; k0 += 32) {                                                       \
      for (int j = 0; j < R; j++) {                                                                \
        __m512 lo, hi;                                                                             \
        load32_##KIND(W, rows[j], k0, &lo, &hi);                                                   \
        for (int i = 0; i < MB; i++) {                                                             \
          const float *xi = x + i * ldx + k0;                                                      \
          acc[i][j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xi), acc[i][j]);                         \
          acc[i][j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xi + 16), acc[i][j]);                    \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    if (K & 31) {                                                                                  \
      int k0 = kmain, t = K - kmain;                                                               \
      __mmask16 ml = t >= 16 ? 0xFFFF : (__mmask16)((1u << t) - 1);                                \
      __mmask16 mh = t > 16 ? (__mmask16)((1u << (t - 16)) - 1) : 0;                               \
      for (int j = 0; j < R; j++) {                                                                \
        __m512 lo, hi;                                                                             \
        load32_##KIND(W, rows[j], k0, &lo, &hi);                                                   \
        for (int i = 0; i < MB; i++) {                                                             \
          const float *xi = x + i * ldx + k0;                                                      \
          acc[i][j] = _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(ml, xi), acc[i][j]);               \
          if (mh) acc[i][j] = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(mh, xi + 16), acc[i][j]);  \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) out[i * R + j] = _mm512_reduce_add_ps(acc[i][j]);                \
  }

#define DEFINE_QBLOCKS(KIND)  \
  DEFINE_QBLOCK(KIND, 1, 8)   \
  DEFINE_QBLOCK(KIND, 2, 8)   \
  DEFINE_QBLOCK(KIND, 3, 6)   \
  DEFINE_QBLOCK(KIND, 4, 6)   \
  DEFINE_QBLOCK(KIND, 5, 4)   \
  DEFINE_QBLOCK(KIND, 6, 4)

DEFINE_QBLOCKS(4)
DEFINE_QBLOCKS(8)
DEFINE_QBLOCKS(16)

#define QCASES(KIND)                                                                                \
  case KIND:                                                                                       \
    switch (mb) {                                                                                  \
      case 1: qblock_##KIND##_1_8(xm, ldx, W, rr + h, K, tmp); break;                              \
      case 2: qblock_##KIND##_2_8(xm, ldx, W, rr + h, K, tmp); break;                              \
      case 3: qblock_##KIND##_3_6(xm, ldx, W, rr + h, K, tmp); break;                              \
      case 4: qblock_##KIND##_4_6(xm, ldx, W, rr + h, K, tmp); break;                              \
      case 5: qblock_##KIND##_5_4(xm, ldx, W, rr + h, K, tmp); break;                              \
      default: qblock_##KIND##_6_4(xm, ldx, W, rr + h, K, tmp); break;                             \
    }                                                                                              \
    break;

/* Rows of weight handled per work item: a multiple of every block's R (8, 6 and 4). */
#define ROWS 48

/* The dot products of activation rows x[0..M) with weight rows rows[0..nr) of W (nr <= ROWS), into
 * out[m * ROWS + j]. Rows past nr repeat row 0 (computed, not stored). */
TARGET static void dots(const float *x, size_t ldx, int M, int K, const effx_weight *W, const size_t *rows,
                        int nr, float *out) {
  const float *wr[ROWS];
  size_t rr[ROWS];
  for (int j = 0; j < ROWS; j++) {
    rr[j] = rows[j < nr ? j : 0];
    if (W->kind == 0) wr[j] = (const float *)W->data + rr[j] * (size_t)W->ld;
  }
  float tmp[6 * 8];
  for (int m0 = 0; m0 < M;) {
    int left = M - m0;
    int mb = left <= 6 ? left : (left >= 10 ? 6 : 4); /* chunks of 1..6 rows */
    const float *xm = x + (size_t)m0 * ldx;
    int R = mb <= 2 ? 8 : mb <= 4 ? 6 : 4;
    for (int h = 0; h < ROWS && h < nr; h += R) {
      switch (W->kind) {
        case 0:
          switch (mb) {
            case 1: block_1_8(xm, ldx, wr + h, K, tmp); break;
            case 2: block_2_8(xm, ldx, wr + h, K, tmp); break;
            case 3: block_3_6(xm, ldx, wr + h, K, tmp); break;
            case 4: block_4_6(xm, ldx, wr + h, K, tmp); break;
            case 5: block_5_4(xm, ldx, wr + h, K, tmp); break;
            default: block_6_4(xm, ldx, wr + h, K, tmp); break;
          }
          break;
        QCASES(4)
        QCASES(8)
        QCASES(16)
      }
      for (int i = 0; i < mb; i++)
        for (int j = 0; j < R && h + j < nr; j++) out[(size_t)(m0 + i) * ROWS + h + j] = tmp[i * R + j];
    }
    m0 += mb;
  }
}

static effx_weight plain(const float *w, int K) {
  effx_weight W = {0, w, NULL, NULL, 0, 0, 0, K};
  return W;
}

/* Up to 4 products of the same activations, as one parallel loop over all their row blocks:
 * ys[p][m, n] = x[m, :] . ws[p][n] (+ bs[p][n]), ys[p] with row stride ldys[p]. */
TARGET void effx_linear_w(const float *x, int M, int K, int ldx, int np, const effx_weight *ws,
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
      size_t rows[ROWS];
      for (int j = 0; j < nr; j++) rows[j] = (size_t)(n0 + j);
      for (int m0 = 0; m0 < M; m0 += 64) {
        int mc = M - m0 < 64 ? M - m0 : 64;
        dots(x + (size_t)m0 * ldx, ldx, mc, K, &ws[p], rows, nr, out);
        const float *bias = bs[p];
        for (int m = 0; m < mc; m++) {
          float *y = ys[p] + (size_t)(m0 + m) * ldys[p] + n0;
          for (int j = 0; j < nr; j++) y[j] = out[m * ROWS + j] + (bias ? bias[n0 + j] : 0.f);
        }
      }
    }
  }
}

/* effx_linear_w on float32 weights ws[p] [Ns[p], K]. */
TARGET void effx_linear(const float *x, int M, int K, int ldx, int np, const float *const *ws,
                        const float *const *bs, const int *Ns, float *const *ys, const int *ldys,
                        int nthreads) {
  effx_weight W[4];
  for (int p = 0; p < np && p < 4; p++) W[p] = plain(ws[p], K);
  effx_linear_w(x, M, K, ldx, np, W, bs, Ns, ys, ldys, nthreads);
}

/* One product: y[m, n] = x[m, :] . w[n, :] (+ b[n]), y with row stride ldy (scalar arguments: a cheaper
 * call from Python than effx_linear's arrays). */
TARGET void effx_linear1(const float *x, int M, int K, const float *w, const float *b, int N, float *y,
                         int ldy, int nthreads) {
  effx_linear(x, M, K, K, 1, &w, &b, &N, &y, &ldy, nthreads);
}

/* One product with a weight descriptor. */
TARGET void effx_qlinear(const float *x, int M, int K, const effx_weight *w, const float *b, int N, float *y,
                         int nthreads) {
  effx_linear_w(x, M, K, K, 1, w, &b, &N, &y, &N, nthreads);
}

void effx_rope(float *t, int M, int H, int D, int ld, const float *cos, const float *sin);

/* A Llama attention's input side in one call: q, k and v of x as column ranges of y [M, nq + 2 nkv],
 * then the rotary embedding on q's and k's heads of d values. ws: the q, k and v weights. */
TARGET void effx_qkv_rope_w(const float *x, int M, int K, const effx_weight *ws, const float *bq,
                            const float *bk, const float *bv, int nq, int nkv, float *y, const float *cos,
                            const float *sin, int d, int nthreads) {
  const float *bs[3] = {bq, bk, bv};
  int ns[3] = {nq, nkv, nkv}, width = nq + 2 * nkv;
  int lds[3] = {width, width, width};
  float *ys[3] = {y, y + nq, y + nq + nkv};
  effx_linear_w(x, M, K, K, 3, ws, bs, ns, ys, lds, nthreads);
  effx_rope(y, M, nq / d, d, width, cos, sin);
  effx_rope(y + nq, M, nkv / d, d, width, cos, sin);
}

TARGET void effx_qkv_rope(const float *x, int M, int K, const float *wq, const float *wk, const float *wv,
                          const float *bq, const float *bk, const float *bv, int nq, int nkv, float *y,
                          const float *cos, const float *sin, int d, int nthreads) {
  effx_weight ws[3] = {plain(wq, K), plain(wk, K), plain(wv, K)};
  effx_qkv_rope_w(x, M, K, ws, bq, bk, bv, nq, nkv, y, cos, sin, d, nthreads);
}

/* y[m, n] = x[m, :] . w[ids[n]]: a product with a gathered subset of weight rows (no copy). */
TARGET void effx_linear_rows_w(const float *x, int M, int K, const effx_weight *W, const int64_t *ids, int N,
                               float *y, int nthreads) {
  int nblocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(nthreads)
  {
    float out[64 * ROWS];
#pragma omp for schedule(static)
    for (int b = 0; b < nblocks; b++) {
      int n0 = b * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;
      size_t rows[ROWS];
      for (int j = 0; j < nr; j++) rows[j] = (size_t)ids[n0 + j];
      for (int m0 = 0; m0 < M; m0 += 64) {
        int mc = M - m0 < 64 ? M - m0 : 64;
        dots(x + (size_t)m0 * K, K, mc, K, W, rows, nr, out);
        for (int m = 0; m < mc; m++)
          for (int j = 0; j < nr; j++) y[(size_t)(m0 + m) * N + n0 + j] = out[m * ROWS + j];
      }
    }
  }
}

TARGET void effx_linear_rows(const float *x, int M, int K, const float *w, const int64_t *ids, int N,
                             float *y, int nthreads) {
  effx_weight W = plain(w, K);
  effx_linear_rows_w(x, M, K, &W, ids, N, y, nthreads);
}

/* The gated MLP's input side: y[m, n] = silu(x . wg[n]) * (x . wu[n]). */
TARGET void effx_gated_w(const float *x, int M, int K, const effx_weight *wg, const effx_weight *wu, int N,
                         float *y, int nthreads) {
  int nblocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(nthreads)
  {
    float g[64 * ROWS], u[64 * ROWS];
#pragma omp for schedule(static)
    for (int b = 0; b < nblocks; b++) {
      int n0 = b * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;
      size_t rows[ROWS];
      for (int j = 0; j < nr; j++) rows[j] = (size_t)(n0 + j);
      for (int m0 = 0; m0 < M; m0 += 64) {
        int mc = M - m0 < 64 ? M - m0 : 64;
        dots(x + (size_t)m0 * K, K, mc, K, wg, rows, nr, g);
        dots(x + (size_t)m0 * K, K, mc, K, wu, rows, nr, u);
        for (int m = 0; m < mc; m++)
          for (int j = 0; j < nr; j++) {
            float a = g[m * ROWS + j];
            y[(size_t)(m0 + m) * N + n0 + j] = a / (1.f + expf(-a)) * u[m * ROWS + j];
          }
      }
    }
  }
}

TARGET void effx_gated(const float *x, int M, int K, const float *wg, const float *wu, int N, float *y,
                       int nthreads) {
  effx_weight a = plain(wg, K), b = plain(wu, K);
  effx_gated_w(x, M, K, &a, &b, N, y, nthreads);
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
