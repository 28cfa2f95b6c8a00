/* effx's CPU kernels: float32 products whose cost follows the bytes of weight they read.
 *
 * A decode step multiplies a few rows of activations (1 token, a batch, or a few tokens to verify) by
 * each weight matrix once, so on a CPU it is bound by reading the weights. These kernels read each weight
 * row once per call, whatever the number of activation rows (up to a few dozen), from the weight's own
 * row-major [N, K] layout: no packed copy, so passes' slices, shared weights and row gathers need nothing
 * more. Every output y[m, n] is one dot product accumulated in a fixed order (16-lane partial sums over k,
 * each lane a fused multiply-add, then a fixed tree reduction), on one thread: results do not depend on how
 * many rows are computed together (batch invariant), nor on the thread count, nor on the instruction set.
 *
 * One source for every target. The kernels are written against a 16-lane float vector (v16 below) whose
 * operations each target implements with its own instructions:
 *
 *   EFFX_ISA_AVX512   x86-64 AVX-512F/BW + FMA + F16C: one 512-bit register per v16 (int8 dot products
 *                     with VNNI where the build has -mavx512vnni, else AVX-512BW's byte multiply-adds)
 *   EFFX_ISA_AVX2     x86-64 AVX2 + FMA + F16C: two 256-bit registers
 *   EFFX_ISA_NEON     aarch64 Advanced SIMD: four 128-bit registers (sdot where built with +dotprod)
 *   EFFX_ISA_GENERIC  portable C (fmaf per lane): the reference the others are checked against
 *
 * chosen by the compiler flags of the build (effx.kernels builds the one this CPU runs best, at first use;
 * -DEFFX_FORCE_GENERIC builds the portable one anywhere).
 * Since a lane's multiply-adds and the reduction tree are the same on every target, every target computes
 * the same bits (tests/kernels_harness.c checks this across targets, aarch64 under emulation). Only the
 * block shapes (how many weight rows share a pass over k) differ, to fit each target's registers.
 *
 * Threads come from OpenMP (the libgomp that torch loaded, which this library links against by soname).
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#if defined(EFFX_FORCE_GENERIC)
#define EFFX_ISA_GENERIC 1
#define EFFX_ISA_NAME "generic"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__) && defined(__F16C__)
#define EFFX_ISA_AVX512 1
#define EFFX_ISA_NAME "avx512"
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EFFX_ISA_AVX2 1
#define EFFX_ISA_NAME "avx2"
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define EFFX_ISA_NEON 1
#define EFFX_ISA_NAME "neon"
#include <arm_neon.h>
#else
#define EFFX_ISA_GENERIC 1
#define EFFX_ISA_NAME "generic"
#endif

#define INLINE static inline __attribute__((always_inline))
/* A block's loops over its rows, unrolled so that its accumulators stay in registers (vector targets; the
 * portable C's lanes are loops already, and unrolled they take minutes to compile) */
#if defined(EFFX_ISA_GENERIC)
#define UNROLL
#define SPECIALIZE 0 /* nor does it get a copy of each block per weight form (see qblock) */
#else
#define UNROLL _Pragma("GCC unroll 8")
#define SPECIALIZE 1
#endif

/* The instruction set this build was compiled for. */
const char *effx_isa(void) { return EFFX_ISA_NAME; }

/* Whether this CPU runs this build's instructions. */
int effx_supported(void) {
#if defined(EFFX_ISA_AVX512) || defined(EFFX_ISA_AVX2)
  __builtin_cpu_init();
#if defined(EFFX_ISA_AVX512)
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return 0;
#if defined(__AVX512VNNI__)
  if (!__builtin_cpu_supports("avx512vnni")) return 0;
#endif
#else
  if (!__builtin_cpu_supports("avx2")) return 0;
#endif
  return __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return 1; /* Advanced SIMD is part of every aarch64 CPU (dot products: built only where the CPU has them);
               the generic build needs nothing */
#endif
}

/* How far ahead of the rows being read (in floats) the next weight bytes are prefetched into L2: 64 KB.
 * Rows of a block are contiguous, so this reaches a few blocks ahead; the hardware prefetchers alone
 * kept too few lines in flight (SmolLM2's layer products: 19.7 -> 17.0 ms for one token, 23.3 -> 17.6 ms
 * for four, measured interleaved on AVX-512). A prefetch past the end of a weight is a harmless hint. */
#define PREFETCH 16384
#define prefetch(p) __builtin_prefetch((const void *)(p), 0, 2)

/* ---- the 16-lane vector, per target --------------------------------------------------------------- */

#if defined(EFFX_ISA_AVX512)
typedef struct { __m512 v; } v16;
INLINE v16 v_zero(void) { return (v16){_mm512_setzero_ps()}; }
INLINE v16 v_load(const float *p) { return (v16){_mm512_loadu_ps(p)}; }
INLINE v16 v_set1(float a) { return (v16){_mm512_set1_ps(a)}; }
INLINE v16 v_fma(v16 a, v16 b, v16 c) { return (v16){_mm512_fmadd_ps(a.v, b.v, c.v)}; }
INLINE v16 v_mul(v16 a, v16 b) { return (v16){_mm512_mul_ps(a.v, b.v)}; }
INLINE v16 v_add(v16 a, v16 b) { return (v16){_mm512_add_ps(a.v, b.v)}; }
INLINE float v_sum(v16 a) { /* lanes (i, i+8), then (i, i+4), (i, i+2), (0, 1) */
  __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a.v), 
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
/* 16 integers as floats: signed bytes, and the low or high nibbles of 16 bytes */
INLINE v16 v_from_i8(const int8_t *p) { return (v16){_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)))}; }
INLINE void v_nibbles(const uint8_t *p, v16 *lo, v16 *hi) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
  lo->v = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi->v = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
INLINE v16 v_from_bf16(const uint16_t *p) {
  __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return (v16){_mm512_castsi512_ps(_mm512_slli_epi32(a, 16))};
}
INLINE float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
/* block shapes: for MB activation rows, R weight rows per pass over k (MB * R accumulators) */
#define R1 8
#define R2 8
#define R3 6
#define R4 6
#define R5 4
#define R6 4

#elif defined(EFFX_ISA_AVX2)
typedef struct { __m256 a, b; } v16; /* lanes 0..7, 8..15 */
INLINE v16 v_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
INLINE v16 v_load(const float *p) { return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
INLINE v16 v_set1(float a) { return (v16){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
INLINE v16 v_fma(v16 x, v16 y, v16 c) { return (v16){_mm256_fmadd_ps(x.a, y.a, c.a), _mm256_fmadd_ps(x.b, y.b, c.b)}; }
INLINE v16 v_mul(v16 x, v16 y) { return (v16){_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
INLINE v16 v_add(v16 x, v16 y) { return (v16){_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
INLINE float v_sum(v16 x) {
  __m256 s8 = _mm256_add_ps(x.a, x.b);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
INLINE v16 v_from_i8(const int8_t *p) {
  return (v16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))),
               _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))))};
}
INLINE void v_nibbles(const uint8_t *p, v16 *lo, v16 *hi) {
  __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
  const __m256i f = _mm256_set1_epi32(15);
  lo->a = _mm256_cvtepi32_ps(_mm256_and_si256(a, f));
  lo->b = _mm256_cvtepi32_ps(_mm256_and_si256(b, f));
  hi->a = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
  hi->b = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
INLINE v16 v_from_bf16(const uint16_t *p) {
  __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
  __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 8)));
  return (v16){_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
}
INLINE float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
/* 16 registers of 8 lanes: at most 12 accumulators (two registers each: 6 v16) beside the operands */
#define R1 4
#define R2 3
#define R3 2
#define R4 1
#define R5 1
#define R6 1

#elif defined(EFFX_ISA_NEON)
typedef struct { float32x4_t q[4]; } v16;
INLINE v16 v_zero(void) { v16 r; for (int i = 0; i < 4; i++) r.q[i] = vdupq_n_f32(0.f); return r; }
INLINE v16 v_load(const float *p) { v16 r; for (int i = 0; i < 4; i++) r.q[i] = vld1q_f32(p + 4 * i); return r; }
INLINE v16 v_set1(float a) { v16 r; for (int i = 0; i < 4; i++) r.q[i] = vdupq_n_f32(a); return r; }
INLINE v16 v_fma(v16 x, v16 y, v16 c) { v16 r; for (int i = 0; i < 4; i++) r.q[i] = vfmaq_f32(c.q[i], x.q[i], y.q[i]); return r; }
INLINE v16 v_mul(v16 x, v16 y) { v16 r; for (int i = 0; i < 4; i++) r.q[i] = vmulq_f32(x.q[i], y.q[i]); return r; }
INLINE v16 v_add(v16 x, v16 y) { v16 r; for (int i = 0; i < 4; i++) r.q[i] = vaddq_f32(x.q[i], y.q[i]); return r; }
INLINE float v_sum(v16 x) {
  float32x4_t s8a = vaddq_f32(x.q[0], x.q[2]), s8b = vaddq_f32(x.q[1], x.q[3]); /* lanes (i, i+8) */
  float32x4_t s4 = vaddq_f32(s8a, s8b);                                          /* (i, i+4) */
  float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));               /* (i, i+2) */
  return vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
}
INLINE float32x4_t u32_to_f(uint32x4_t u) { return vcvtq_f32_u32(u); }
INLINE v16 v_from_u8x16(uint8x16_t b) {
  uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_u8(vget_high_u8(b));
  v16 r;
  r.q[0] = u32_to_f(vmovl_u16(vget_low_u16(lo)));
  r.q[1] = u32_to_f(vmovl_u16(vget_high_u16(lo)));
  r.q[2] = u32_to_f(vmovl_u16(vget_low_u16(hi)));
  r.q[3] = u32_to_f(vmovl_u16(vget_high_u16(hi)));
  return r;
}
INLINE v16 v_from_i8(const int8_t *p) {
  int8x16_t b = vld1q_s8(p);
  int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
  v16 r;
  r.q[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  r.q[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
  r.q[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  r.q[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
  return r;
}
INLINE void v_nibbles(const uint8_t *p, v16 *lo, v16 *hi) {
  uint8x16_t b = vld1q_u8(p);
  *lo = v_from_u8x16(vandq_u8(b, vdupq_n_u8(15)));
  *hi = v_from_u8x16(vshrq_n_u8(b, 4));
}
INLINE v16 v_from_bf16(const uint16_t *p) {
  v16 r;
  for (int i = 0; i < 4; i++) r.q[i] = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p + 4 * i), 16));
  return r;
}
INLINE float half_to_float(uint16_t h) {
  __fp16 f;
  memcpy(&f, &h, 2);
  return (float)f;
}
/* 32 registers of 4 lanes: at most 16 accumulators (four registers each: 4 v16) beside the operands */
#define R1 4
#define R2 2
#define R3 1
#define R4 1
#define R5 1
#define R6 1

#else /* portable C */
typedef struct { float f[16]; } v16;
INLINE v16 v_zero(void) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = 0.f; return r; }
INLINE v16 v_load(const float *p) { v16 r; memcpy(r.f, p, sizeof r.f); return r; }
INLINE v16 v_set1(float a) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = a; return r; }
INLINE v16 v_fma(v16 x, v16 y, v16 c) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = fmaf(x.f[i], y.f[i], c.f[i]); return r; }
INLINE v16 v_mul(v16 x, v16 y) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = x.f[i] * y.f[i]; return r; }
INLINE v16 v_add(v16 x, v16 y) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = x.f[i] + y.f[i]; return r; }
INLINE float v_sum(v16 x) {
  float s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; i++) s8[i] = x.f[i] + x.f[i + 8];
  for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
  for (int i = 0; i < 2; i++) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}
INLINE v16 v_from_i8(const int8_t *p) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = (float)p[i]; return r; }
INLINE void v_nibbles(const uint8_t *p, v16 *lo, v16 *hi) {
  for (int i = 0; i < 16; i++) {
    lo->f[i] = (float)(p[i] & 15);
    hi->f[i] = (float)(p[i] >> 4);
  }
}
INLINE v16 v_from_bf16(const uint16_t *p) {
  v16 r;
  for (int i = 0; i < 16; i++) {
    uint32_t u = (uint32_t)p[i] << 16;
    memcpy(&r.f[i], &u, 4);
  }
  return r;
}
INLINE float half_to_float(uint16_t h) { /* IEEE binary16 -> binary32, exact (subnormals, inf, nan) */
  uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, u;
  if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (!man) {
    u = sign;
  } else { /* subnormal: normalize */
    int e = -1;
    do {
      man <<= 1;
      e++;
    } while (!(man & 1024));
    u = sign | ((uint32_t)(112 - e) << 23) | ((man & 1023) << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
#define R1 4
#define R2 4
#define R3 4
#define R4 2
#define R5 2
#define R6 2
#endif

/* ---- 64 bytes for integer dot products (int8 activations), per target ------------------------------ */

/* b64 holds 64 byte-sized integers; v_dot_u / v_dot_s give, as a v16, lane l = the exact integer sum of
 * w[4l + i] * x[4l + i] over i < 4 (w unsigned 0..255 or signed, x signed -127..127). Integer sums are exact
 * on every target, so each lane is the same number everywhere; only the float steps after it round, and
 * those are the v16 operations above. */
#if defined(EFFX_ISA_AVX512)
typedef struct { __m512i v; } b64;
INLINE b64 b_load(const void *p) { return (b64){_mm512_loadu_si512(p)}; }
INLINE b64 b_nibbles(const uint8_t *p) { /* 32 bytes -> lo(p[0..16)), hi(p[0..16)), lo(p[16..32)), hi(...) */
  __m512i z = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
  z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(1, 1, 0, 0));
  z = _mm512_srlv_epi64(z, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
  return (b64){_mm512_and_si512(z, _mm512_set1_epi8(15))};
}
INLINE b64 b_sub8(b64 a) { return (b64){_mm512_sub_epi8(a.v, _mm512_set1_epi8(8))}; }
INLINE __m512i dot_us(__m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
#endif
}
INLINE v16 v_dot_u(b64 w, b64 x) { return (v16){_mm512_cvtepi32_ps(dot_us(w.v, x.v))}; }
INLINE v16 v_dot_s(b64 w, b64 x) { /* |w| * (x with w's sign): u8 x s8 */
  __m512i sx = _mm512_mask_sub_epi8(x.v, _mm512_movepi8_mask(w.v), _mm512_setzero_si512(), x.v);
  return (v16){_mm512_cvtepi32_ps(dot_us(_mm512_abs_epi8(w.v), sx))};
}
INLINE v16 v_halves(float a, float b) {
  return (v16){_mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b))};
}
#define HAVE_PAIR16 1
INLINE v16 v_pair16(const uint16_t *p) { /* float16 p[0] in lanes 0..7, p[1] in 8..15 */
  int32_t u;
  memcpy(&u, p, 4);
  __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(u));
  return (v16){_mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                     _mm512_castps128_ps512(two))};
}

#elif defined(EFFX_ISA_AVX2)
typedef struct { __m256i a, b; } b64;
INLINE b64 b_load(const void *p) {
  return (b64){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)((const char *)p + 32))};
}
INLINE b64 b_nibbles(const uint8_t *p) {
  const __m256i f = _mm256_set1_epi8(15);
  __m128i x = _mm_loadu_si128((const __m128i *)p), y = _mm_loadu_si128((const __m128i *)(p + 16));
  return (b64){_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), f),
               _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(y, 4), y), f)};
}
INLINE b64 b_sub8(b64 x) {
  const __m256i e = _mm256_set1_epi8(8);
  return (b64){_mm256_sub_epi8(x.a, e), _mm256_sub_epi8(x.b, e)};
}
INLINE __m256 dot_us(__m256i w, __m256i x) { /* maddubs's pairs fit int16: |w| <= 128, |x| <= 127 */
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
INLINE v16 v_dot_u(b64 w, b64 x) { return (v16){dot_us(w.a, x.a), dot_us(w.b, x.b)}; }
INLINE v16 v_dot_s(b64 w, b64 x) {
  return (v16){dot_us(_mm256_abs_epi8(w.a), _mm256_sign_epi8(x.a, w.a)),
               dot_us(_mm256_abs_epi8(w.b), _mm256_sign_epi8(x.b, w.b))};
}
INLINE v16 v_halves(float a, float b) { return (v16){_mm256_set1_ps(a), _mm256_set1_ps(b)}; }
#define HAVE_PAIR16 1
INLINE v16 v_pair16(const uint16_t *p) {
  int32_t u;
  memcpy(&u, p, 4);
  __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(u));
  return (v16){_mm256_broadcastss_ps(two), _mm256_broadcastss_ps(_mm_movehdup_ps(two))};
}

#elif defined(EFFX_ISA_NEON)
typedef struct { int8x16_t q[4]; } b64;
INLINE b64 b_load(const void *p) {
  b64 r;
  for (int i = 0; i < 4; i++) r.q[i] = vld1q_s8((const int8_t *)p + 16 * i);
  return r;
}
INLINE b64 b_nibbles(const uint8_t *p) {
  uint8x16_t a = vld1q_u8(p), b = vld1q_u8(p + 16), f = vdupq_n_u8(15);
  b64 r = {{vreinterpretq_s8_u8(vandq_u8(a, f)), vreinterpretq_s8_u8(vshrq_n_u8(a, 4)),
            vreinterpretq_s8_u8(vandq_u8(b, f)), vreinterpretq_s8_u8(vshrq_n_u8(b, 4))}};
  return r;
}
INLINE b64 b_sub8(b64 x) {
  for (int i = 0; i < 4; i++) x.q[i] = vsubq_s8(x.q[i], vdupq_n_s8(8));
  return x;
}
INLINE int32x4_t dot4(int8x16_t w, int8x16_t x) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(vdupq_n_s32(0), w, x);
#else
  int16x8_t lo = vmull_s8(vget_low_s8(w), vget_low_s8(x)), hi = vmull_high_s8(w, x);
  return vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi));
#endif
}
/* signed x signed: effx's 4-bit values (0..15) are also signed bytes */
INLINE v16 v_dot_s(b64 w, b64 x) {
  v16 r;
  for (int i = 0; i < 4; i++) r.q[i] = vcvtq_f32_s32(dot4(w.q[i], x.q[i]));
  return r;
}
INLINE v16 v_dot_u(b64 w, b64 x) { return v_dot_s(w, x); }
INLINE v16 v_halves(float a, float b) {
  v16 r = {{vdupq_n_f32(a), vdupq_n_f32(a), vdupq_n_f32(b), vdupq_n_f32(b)}};
  return r;
}

#else /* portable C */
typedef struct { int16_t v[64]; } b64;
INLINE b64 b_load(const void *p) {
  b64 r;
  for (int i = 0; i < 64; i++) r.v[i] = ((const int8_t *)p)[i];
  return r;
}
INLINE b64 b_nibbles(const uint8_t *p) {
  b64 r;
  for (int h = 0; h < 2; h++)
    for (int i = 0; i < 16; i++) {
      r.v[32 * h + i] = p[16 * h + i] & 15;
      r.v[32 * h + 16 + i] = p[16 * h + i] >> 4;
    }
  return r;
}
INLINE b64 b_sub8(b64 x) {
  for (int i = 0; i < 64; i++) x.v[i] -= 8;
  return x;
}
INLINE v16 v_dot_s(b64 w, b64 x) {
  v16 r;
  for (int l = 0; l < 16; l++) {
    int32_t s = 0;
    for (int i = 0; i < 4; i++) s += (int32_t)w.v[4 * l + i] * x.v[4 * l + i];
    r.f[l] = (float)s;
  }
  return r;
}
INLINE v16 v_dot_u(b64 w, b64 x) { return v_dot_s(w, x); }
INLINE v16 v_halves(float a, float b) {
  v16 r;
  for (int i = 0; i < 16; i++) r.f[i] = i < 8 ? a : b;
  return r;
}
#endif
#if !defined(HAVE_PAIR16)
INLINE v16 v_pair16(const uint16_t *p) { return v_halves(half_to_float(p[0]), half_to_float(p[1])); }
#endif

/* Up to 16 floats from p (n < 16 of them; the rest zero): the tail of a row whose length is not a
 * multiple of 16. */
INLINE v16 v_load_n(const float *p, int n) {
  float buf[16] = {0};
  memcpy(buf, p, (size_t)n * sizeof(float));
  return v_load(buf);
}

/* ---- float32 weights ------------------------------------------------------------------------------- */

/* out[i * R + j] = x[i, :] . w[j][:] for i < MB, j < R */
#define DEFINE_BLOCK(MB, R)                                                                        \
  INLINE void block_##MB(const float *x, size_t ldx, const float *const *w, int K, float *out) {   \
    v16 acc[MB][R];                                                                                \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) acc[i][j] = v_zero();                                            \
    int kmain = K & ~15;                                                                           \
    for (int k = 0; k < kmain; k += 16) {                                                          \
      v16 wv[R];                                                                                   \
      for (int j = 0; j < R; j++) {                                                                \
        wv[j] = v_load(w[j] + k);                                                                  \
        prefetch(w[j] + k + PREFETCH);                                                             \
      }                                                                                            \
      for (int i = 0; i < MB; i++) {                                                               \
        v16 xv = v_load(x + i * ldx + k);                                                          \
        for (int j = 0; j < R; j++) acc[i][j] = v_fma(wv[j], xv, acc[i][j]);                       \
      }                                                                                            \
    }                                                                                              \
    if (K & 15) {                                                                                  \
      int t = K & 15;                                                                              \
      v16 wv[R];                                                                                   \
      for (int j = 0; j < R; j++) wv[j] = v_load_n(w[j] + kmain, t);                               \
      for (int i = 0; i < MB; i++) {                                                               \
        v16 xv = v_load_n(x + i * ldx + kmain, t);                                                 \
        for (int j = 0; j < R; j++) acc[i][j] = v_fma(wv[j], xv, acc[i][j]);                       \
      }                                                                                            \
    }                                                                                              \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) out[i * R + j] = v_sum(acc[i][j]);                               \
  }

DEFINE_BLOCK(1, R1)
DEFINE_BLOCK(2, R2)
DEFINE_BLOCK(3, R3)
DEFINE_BLOCK(4, R4)
DEFINE_BLOCK(5, R5)
DEFINE_BLOCK(6, R6)

/* ---- quantized weights ----------------------------------------------------------------------------- */

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
  int act8;          /* kinds 4 and 8 with groups of 32 or more: multiply int8 activations (see act8 below) */
} effx_weight;

INLINE float scalar_at(const void *p, int f16, size_t i) {
  return f16 ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Quantized blocks: two 16-lane vectors hold a row's weights k0..k0+31 (k0 a multiple of 32), de-quantized
 * exactly as effx.quant.dequantize does (q * scale, then + minimum: a product, then a sum, no contraction;
 * see -ffp-contract=off), and each is used as the float kernels use their 16-lane loads: every output is the
 * float kernel's dot product over the de-quantized weights, bit for bit (K a multiple of 16).
 * `min`: the weight has minimums; `fast`: float16 scales, one per 32 values (GGUF's form). Both are
 * constants where the blocks below inline these loads, so each form gets its own straight-line code. */
INLINE void dequant_pair(const effx_weight *W, size_t row, int k0, v16 *lo, v16 *hi, int min, int fast) {
  const int f16 = fast ? 1 : W->scale_f16, wide = fast ? 1 : W->gshift >= 5;
  size_t g0 = row * (size_t)W->ngroups + (size_t)(k0 >> W->gshift);
  size_t g1 = wide ? g0 : g0 + 1; /* one scale for the 32 values, or one per 16 */
  *lo = v_mul(*lo, v_set1(scalar_at(W->scale, f16, g0)));
  *hi = v_mul(*hi, v_set1(scalar_at(W->scale, f16, g1)));
  if (min) {
    *lo = v_add(*lo, v_set1(scalar_at(W->min, f16, g0)));
    *hi = v_add(*hi, v_set1(scalar_at(W->min, f16, g1)));
  }
}

/* `few`: the block multiplies at most 2 activation rows (a constant where inlined): AVX-512 then looks the
 * de-quantized values up in a table of 16, the same bits (more rows: the table's registers cost more). */
INLINE void load32_4(const effx_weight *W, size_t row, int k0, v16 *lo, v16 *hi, int few, int min, int fast) {
  const uint8_t *p = (const uint8_t *)W->data + row * (size_t)W->ld + k0 / 2;
  (void)few;
  prefetch(p + 4 * PREFETCH / 8);
#if defined(EFFX_ISA_AVX512)
  if (few && (fast || W->gshift >= 5)) { /* few activation rows, one scale for the 32 values: de-quantize
                           the 16 possible values once (the same products and sums, lane by lane), then look
                           each one up (vpermps reads the low 4 bits of each index) */
    const int f16 = fast ? 1 : W->scale_f16;
    size_t g = row * (size_t)W->ngroups + (size_t)(k0 >> W->gshift);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512 table = _mm512_mul_ps(min ? iota : centred, _mm512_set1_ps(scalar_at(W->scale, f16, g)));
    if (min) table = _mm512_add_ps(table, _mm512_set1_ps(scalar_at(W->min, f16, g)));
    lo->v = _mm512_permutexvar_ps(v, table);
    hi->v = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    return;
  }
#endif
  v_nibbles(p, lo, hi); /* weight k0 + i is byte i's low nibble, k0 + 16 + i its high nibble */
  if (!min) {           /* symmetric: q - 8 */
    *lo = v_add(*lo, v_set1(-8.f));
    *hi = v_add(*hi, v_set1(-8.f));
  }
  dequant_pair(W, row, k0, lo, hi, min, fast);
}

INLINE void load32_8(const effx_weight *W, size_t row, int k0, v16 *lo, v16 *hi, int few, int min, int fast) {
  (void)few;
  const int8_t *p = (const int8_t *)W->data + row * (size_t)W->ld + k0;
  prefetch(p + 4 * PREFETCH / 4);
  *lo = v_from_i8(p);
  *hi = v_from_i8(p + 16);
  dequant_pair(W, row, k0, lo, hi, min, fast);
}

INLINE void load32_16(const effx_weight *W, size_t row, int k0, v16 *lo, v16 *hi, int few, int min, int fast) {
  (void)few, (void)min, (void)fast;
  const uint16_t *p = (const uint16_t *)W->data + row * (size_t)W->ld + k0;
  prefetch(p + 4 * PREFETCH / 2);
  *lo = v_from_bf16(p);
  *hi = v_from_bf16(p + 16);
}

/* out[i * R + j] = x[i, :] . w[rows[j]] for i < MB, j < R, w quantized (kind KIND); qcore's `min` and
 * `fast` are constants in each of qblock's calls (see dequant_pair), its loops unrolled: the accumulators
 * stay in registers */
#define DEFINE_QBLOCK(KIND, MB, R)                                                                  \
  INLINE void qcore_##KIND##_##MB(const float *x, size_t ldx, const effx_weight *W,                \
                                  const size_t *rows, int K, float *out, int min, int fast) {       \
    v16 acc[MB][R];                                                                                \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) acc[i][j] = v_zero();                                            \
    int kmain = K & ~31;                                                                           \
    for (int k0 = 0; k0 < kmain; k0 += 32) {                                                       \
      UNROLL for (int j = 0; j < R; j++) {                                        \
        v16 lo, hi;                                                                                \
        load32_##KIND(W, rows[j], k0, &lo, &hi, MB <= 2, min, fast);                               \
        UNROLL for (int i = 0; i < MB; i++) {                                     \
          const float *xi = x + i * ldx + k0;                                                      \
          acc[i][j] = v_fma(lo, v_load(xi), acc[i][j]);                                            \
          acc[i][j] = v_fma(hi, v_load(xi + 16), acc[i][j]);                                       \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    if (K & 31) {                                                                                  \
      int k0 = kmain, t = K - kmain;                                                               \
      for (int j = 0; j < R; j++) {                                                                \
        v16 lo, hi;                                                                                \
        load32_##KIND(W, rows[j], k0, &lo, &hi, MB <= 2, min, fast);                               \
        for (int i = 0; i < MB; i++) {                                                             \
          const float *xi = x + i * ldx + k0;                                                      \
          acc[i][j] = v_fma(lo, t >= 16 ? v_load(xi) : v_load_n(xi, t), acc[i][j]);                \
          if (t > 16) acc[i][j] = v_fma(hi, v_load_n(xi + 16, t - 16), acc[i][j]);                 \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) out[i * R + j] = v_sum(acc[i][j]);                               \
  }                                                                                                \
  INLINE void qblock_##KIND##_##MB(const float *x, size_t ldx, const effx_weight *W,               \
                                   const size_t *rows, int K, float *out) {                         \
    int fast = W->scale_f16 && W->gshift == 5;                                                     \
    if (KIND == 16) qcore_##KIND##_##MB(x, ldx, W, rows, K, out, 0, 0);                            \
    /* GGUF's 4-bit forms get their own code, the rarer ones share one body (the same bits) */     \
    else if (SPECIALIZE && KIND == 4 && fast && W->min)                                            \
      qcore_##KIND##_##MB(x, ldx, W, rows, K, out, 1, 1);                                          \
    else if (SPECIALIZE && KIND == 4 && fast)                                                      \
      qcore_##KIND##_##MB(x, ldx, W, rows, K, out, 0, 1);                                          \
    else                                                                                           \
      qcore_##KIND##_##MB(x, ldx, W, rows, K, out, W->min != NULL, fast);                          \
  }

#define DEFINE_QBLOCKS(KIND)  \
  DEFINE_QBLOCK(KIND, 1, R1)  \
  DEFINE_QBLOCK(KIND, 2, R2)  \
  DEFINE_QBLOCK(KIND, 3, R3)  \
  DEFINE_QBLOCK(KIND, 4, R4)  \
  DEFINE_QBLOCK(KIND, 5, R5)  \
  DEFINE_QBLOCK(KIND, 6, R6)

DEFINE_QBLOCKS(4)
DEFINE_QBLOCKS(8)
DEFINE_QBLOCKS(16)

/* ---- int8 activations ------------------------------------------------------------------------------ */

/* A product with int8 activations (effx_weight.act8; quantize{activations=int8}) multiplies the input
 * rounded per block of the weight's group g to scale * int8, scale = the block's largest magnitude / 127,
 * q = nearbyint(x / scale) (effx_round_int8's rounding: the same integers and scales), by the weight's
 * integers, in integer arithmetic: per 64 values k0..k0+63 and lane l < 16 (values k0+4l..k0+4l+3, in one
 * block of x and one group of the weight, g >= 32), the exact integer sum s_l of q_x q_w (q_w - 8 for the
 * symmetric 4-bit form), then acc_l = fma(s_l, sx_l * sw_l, acc_l), and for weights with a minimum
 * acc_l = fma(sx_l * t_l, min_l, acc_l) where t_l is the sum of the four q_x; y = the v16 reduction of acc.
 * That is the product of round_int8(x) with the de-quantized weight up to float rounding (the integer part
 * exact), and the same bits on every target. */
typedef struct {
  int8_t *q;  /* [M, K64]: K rounded up to 64, zero past K */
  float *s;   /* [M, K64 / 4]: the scale of each lane's block (0 past K) */
  float *u;   /* [M, K64 / 4]: each lane's scale times its sum of four q (the minimum's factor) */
  int K64;
} act8;

static int act8_make(act8 *a, const float *x, int M, int K, int ldx, int gshift) {
  int K64 = (K + 63) & ~63, L = K64 / 4, g = 1 << gshift;
  a->K64 = K64;
  a->q = (int8_t *)calloc((size_t)M * K64, 1);
  a->s = (float *)calloc((size_t)M * L, sizeof(float));
  a->u = (float *)calloc((size_t)M * L, sizeof(float));
  if (!a->q || !a->s || !a->u) return 0;
  for (int m = 0; m < M; m++) {
    const float *xm = x + (size_t)m * ldx;
    int8_t *qm = a->q + (size_t)m * K64;
    float *sm = a->s + (size_t)m * L, *um = a->u + (size_t)m * L;
    for (int k0 = 0; k0 < K; k0 += g) {
      int n = K - k0 < g ? K - k0 : g;
      float amax = 0.f;
      for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(xm[k0 + i]));
      float scale = amax / 127.f;
      for (int i = 0; i < n; i++) qm[k0 + i] = scale > 0.f ? (int8_t)nearbyintf(xm[k0 + i] / scale) : 0;
      for (int l = k0 / 4; l < (k0 + n + 3) / 4; l++) sm[l] = scale;
    }
    for (int l = 0; l < L; l++) um[l] = sm[l] * (float)(qm[4 * l] + qm[4 * l + 1] + qm[4 * l + 2] + qm[4 * l + 3]);
  }
  return 1;
}

static void act8_free(act8 *a) {
  free(a->q);
  free(a->s);
  free(a->u);
}

/* 64 weights of row `row` from k0 (of kind 4 or 8) as bytes; `half`: only k0..k0+31 exist (zeros after);
 * `sym`: symmetric 4-bit (no minimum: q - 8). */
INLINE b64 iload_4(const effx_weight *W, size_t row, int k0, int half, int sym) {
  const uint8_t *p = (const uint8_t *)W->data + row * (size_t)W->ld + k0 / 2;
  prefetch(p + 4 * PREFETCH / 8);
  b64 v;
  if (half) {
    uint8_t buf[32] = {0};
    memcpy(buf, p, 16);
    v = b_nibbles(buf);
  } else {
    v = b_nibbles(p);
  }
  return sym ? b_sub8(v) : v;
}

INLINE b64 iload_8(const effx_weight *W, size_t row, int k0, int half, int sym) {
  (void)sym;
  const int8_t *p = (const int8_t *)W->data + row * (size_t)W->ld + k0;
  prefetch(p + 4 * PREFETCH / 4);
  if (half) {
    int8_t buf[64] = {0};
    memcpy(buf, p, 32);
    return b_load(buf);
  }
  return b_load(p);
}

/* The scales (or minimums) of groups g0 (lanes 0..7) and g1 (lanes 8..15; 0 if `half`); `pair`: float16
 * with g1 = g0 + 1 (groups of 32, a whole 64 values) */
INLINE v16 scales64(const void *p, int f16, size_t g0, size_t g1, int half, int pair) {
  if (pair) return v_pair16((const uint16_t *)p + g0);
  return v_halves(scalar_at(p, f16, g0), half ? 0.f : scalar_at(p, f16, g1));
}

/* One 64-value step of an int8-activation block (MB activation rows from m, R weight rows), every choice
 * a constant where inlined: `half` (the last 32 values of a row), `min` (the weight has minimums), `pair`
 * (float16 scales of 32-value groups). */
#define DEFINE_ISTEP(KIND, MB, R)                                                                   \
  INLINE void istep_##KIND##_##MB(v16 acc[MB][R], const act8 *a, int m, const effx_weight *W,       \
                                  const size_t *rows, int k0, int half, int min, int pair) {        \
    const int K64 = a->K64, L = K64 / 4;                                                           \
    UNROLL for (int j = 0; j < R; j++) {                                          \
      b64 wv = iload_##KIND(W, rows[j], k0, half, KIND == 4 && !min);                              \
      size_t g0 = rows[j] * (size_t)W->ngroups + (size_t)(k0 >> W->gshift);                        \
      size_t g1 = rows[j] * (size_t)W->ngroups + (size_t)((k0 + 32) >> W->gshift);                  \
      v16 sw = scales64(W->scale, W->scale_f16, g0, g1, half, pair && !half);                      \
      v16 mw = min ? scales64(W->min, W->scale_f16, g0, g1, half, pair && !half) : v_zero();       \
      UNROLL for (int i = 0; i < MB; i++) {                                       \
        size_t r = (size_t)(m + i);                                                                \
        b64 xv = b_load(a->q + r * K64 + k0);                                                      \
        v16 d = (KIND == 4 && min) ? v_dot_u(wv, xv) : v_dot_s(wv, xv);                            \
        acc[i][j] = v_fma(d, v_mul(v_load(a->s + r * L + k0 / 4), sw), acc[i][j]);                 \
        if (min) acc[i][j] = v_fma(v_load(a->u + r * L + k0 / 4), mw, acc[i][j]);                  \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  INLINE void icore_##KIND##_##MB(const act8 *a, int m, const effx_weight *W, const size_t *rows,   \
                                  int kw, float *out, int min, int pair) {                          \
    v16 acc[MB][R];                                                                                \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) acc[i][j] = v_zero();                                            \
    int kfull = kw & ~63;                                                                          \
    if (kfull > a->K64) kfull = a->K64;                                                            \
    for (int k0 = 0; k0 < kfull; k0 += 64) istep_##KIND##_##MB(acc, a, m, W, rows, k0, 0, min, pair); \
    if (kfull < a->K64) istep_##KIND##_##MB(acc, a, m, W, rows, kfull, 1, min, pair);             \
    for (int i = 0; i < MB; i++)                                                                   \
      for (int j = 0; j < R; j++) out[i * R + j] = v_sum(acc[i][j]);                               \
  }

/* out[i * R + j] = the int8-activation product of activation row m + i with weight row rows[j] */
#define DEFINE_IBLOCK(KIND, MB, R)                                                                  \
  DEFINE_ISTEP(KIND, MB, R)                                                                        \
  INLINE void iblock_##KIND##_##MB(const act8 *a, int m, const effx_weight *W, const size_t *rows,  \
                                   int kw, float *out) {                                            \
    int pair = W->scale_f16 && W->gshift == 5;                                                     \
    /* as qblock: GGUF's 4-bit forms and Q8_0 (its usual head) get their own code, the rarer forms */\
    /* share one body */                                                                           \
    if (SPECIALIZE && KIND == 4 && pair && W->min)                                                 \
      icore_##KIND##_##MB(a, m, W, rows, kw, out, 1, 1);                                           \
    else if (SPECIALIZE && KIND == 8 && pair && !W->min)                                           \
      icore_##KIND##_##MB(a, m, W, rows, kw, out, 0, 1);                                           \
    else if (SPECIALIZE && KIND == 4 && pair)                                                      \
      icore_##KIND##_##MB(a, m, W, rows, kw, out, 0, 1);                                           \
    else                                                                                           \
      icore_##KIND##_##MB(a, m, W, rows, kw, out, W->min != NULL, pair);                           \
  }

#define DEFINE_IBLOCKS(KIND)  \
  DEFINE_IBLOCK(KIND, 1, R1)  \
  DEFINE_IBLOCK(KIND, 2, R2)  \
  DEFINE_IBLOCK(KIND, 3, R3)  \
  DEFINE_IBLOCK(KIND, 4, R4)  \
  DEFINE_IBLOCK(KIND, 5, R5)  \
  DEFINE_IBLOCK(KIND, 6, R6)

DEFINE_IBLOCKS(4)
DEFINE_IBLOCKS(8)

#define ICASES(KIND)                                                                                \
  case KIND:                                                                                       \
    switch (mb) {                                                                                  \
      case 1: iblock_##KIND##_1(xa, am, W, rr + h, kw, tmp); break;                                \
      case 2: iblock_##KIND##_2(xa, am, W, rr + h, kw, tmp); break;                                \
      case 3: iblock_##KIND##_3(xa, am, W, rr + h, kw, tmp); break;                                \
      case 4: iblock_##KIND##_4(xa, am, W, rr + h, kw, tmp); break;                                \
      case 5: iblock_##KIND##_5(xa, am, W, rr + h, kw, tmp); break;                                \
      default: iblock_##KIND##_6(xa, am, W, rr + h, kw, tmp); break;                               \
    }                                                                                              \
    break;

#define QCASES(KIND)                                                                                \
  case KIND:                                                                                       \
    switch (mb) {                                                                                  \
      case 1: qblock_##KIND##_1(xm, ldx, W, rr + h, K, tmp); break;                                \
      case 2: qblock_##KIND##_2(xm, ldx, W, rr + h, K, tmp); break;                                \
      case 3: qblock_##KIND##_3(xm, ldx, W, rr + h, K, tmp); break;                                \
      case 4: qblock_##KIND##_4(xm, ldx, W, rr + h, K, tmp); break;                                \
      case 5: qblock_##KIND##_5(xm, ldx, W, rr + h, K, tmp); break;                                \
      default: qblock_##KIND##_6(xm, ldx, W, rr + h, K, tmp); break;                               \
    }                                                                                              \
    break;

/* The int8 activations of x for the weights ws[0..n) that take them (all of one group), or NULL if none
 * does. A few kilobytes per call; without them there is no right answer to give, so the process aborts. */
static act8 *act8_for(act8 *a, const float *x, int M, int K, int ldx, const effx_weight *ws, int n) {
  for (int p = 0; p < n; p++)
    if (ws[p].act8) {
      if (!act8_make(a, x, M, K, ldx, ws[p].gshift)) abort();
      return a;
    }
  return NULL;
}

/* Rows of weight handled per work item: a multiple of every block's R on every target (8, 6, 4, 3, 2, 1). */
#define ROWS 48

/* The dot products of activation rows x[0..M) with weight rows rows[0..nr) of W (nr <= ROWS), into
 * out[m * ROWS + j]. Rows past nr repeat row 0 (computed, not stored). */
static void dots(const float *x, size_t ldx, int M, int K, const effx_weight *W, const size_t *rows,
                 int nr, float *out, const act8 *xa, int xa_row) {
  const int kw = W->kind == 4 ? 2 * W->ld : W->ld; /* values per quantized row */
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
    const int shapes[7] = {0, R1, R2, R3, R4, R5, R6}, am = xa_row + m0;
    int R = shapes[mb];
    for (int h = 0; h < ROWS && h < nr; h += R) {
      if (xa && W->act8) {
        switch (W->kind) {
          ICASES(4)
          ICASES(8)
        }
      } else switch (W->kind) {
        case 0:
          switch (mb) {
            case 1: block_1(xm, ldx, wr + h, K, tmp); break;
            case 2: block_2(xm, ldx, wr + h, K, tmp); break;
            case 3: block_3(xm, ldx, wr + h, K, tmp); break;
            case 4: block_4(xm, ldx, wr + h, K, tmp); break;
            case 5: block_5(xm, ldx, wr + h, K, tmp); break;
            default: block_6(xm, ldx, wr + h, K, tmp); break;
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
  effx_weight W = {0, w, NULL, NULL, 0, 0, 0, K, 0};
  return W;
}

/* Up to 4 products of the same activations, as one parallel loop over all their row blocks:
 * ys[p][m, n] = x[m, :] . ws[p][n] (+ bs[p][n]), ys[p] with row stride ldys[p]. */
void effx_linear_w(const float *x, int M, int K, int ldx, int np, const effx_weight *ws,
                   const float *const *bs, const int *Ns, float *const *ys, const int *ldys,
                          int nthreads) {
  int start[5] = {0};
  for (int p = 0; p < np; p++) start[p + 1] = start[p] + (Ns[p] + ROWS - 1) / ROWS;
  int nblocks = start[np];
  act8 xa, *pa = act8_for(&xa, x, M, K, ldx, ws, np);
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
        dots(x + (size_t)m0 * ldx, ldx, mc, K, &ws[p], rows, nr, out, pa, m0);
        const float *bias = bs[p];
        for (int m = 0; m < mc; m++) {
          float *y = ys[p] + (size_t)(m0 + m) * ldys[p] + n0;
          for (int j = 0; j < nr; j++) y[j] = out[m * ROWS + j] + (bias ? bias[n0 + j] : 0.f);
        }
      }
    }
  }
  if (pa) act8_free(pa);
}

/* effx_linear_w on float32 weights ws[p] [Ns[p], K]. */
void effx_linear(const float *x, int M, int K, int ldx, int np, const float *const *ws,
                 const float *const *bs, const int *Ns, float *const *ys, const int *ldys,
                        int nthreads) {
  effx_weight W[4];
  for (int p = 0; p < np && p < 4; p++) W[p] = plain(ws[p], K);
  effx_linear_w(x, M, K, ldx, np, W, bs, Ns, ys, ldys, nthreads);
}

/* One product: y[m, n] = x[m, :] . w[n, :] (+ b[n]), y with row stride ldy (scalar arguments: a cheaper
 * call from Python than effx_linear's arrays). */
void effx_linear1(const float *x, int M, int K, const float *w, const float *b, int N, float *y,
                  int ldy, int nthreads) {
  effx_linear(x, M, K, K, 1, &w, &b, &N, &y, &ldy, nthreads);
}

/* One product with a weight descriptor. */
void effx_qlinear(const float *x, int M, int K, const effx_weight *w, const float *b, int N, float *y,
                  int nthreads) {
  effx_linear_w(x, M, K, K, 1, w, &b, &N, &y, &N, nthreads);
}

void effx_rope(float *t, int M, int H, int D, int ld, const float *cos, const float *sin);

/* A Llama attention's input side in one call: q, k and v of x as column ranges of y [M, nq + 2 nkv],
 * then the rotary embedding on q's and k's heads of d values. ws: the q, k and v weights. */
void effx_qkv_rope_w(const float *x, int M, int K, const effx_weight *ws, const float *bq,
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

void effx_qkv_rope(const float *x, int M, int K, const float *wq, const float *wk, const float *wv,
                   const float *bq, const float *bk, const float *bv, int nq, int nkv, float *y,
                          const float *cos, const float *sin, int d, int nthreads) {
  effx_weight ws[3] = {plain(wq, K), plain(wk, K), plain(wv, K)};
  effx_qkv_rope_w(x, M, K, ws, bq, bk, bv, nq, nkv, y, cos, sin, d, nthreads);
}

/* y[m, n] = x[m, :] . w[ids[n]]: a product with a gathered subset of weight rows (no copy). */
void effx_linear_rows_w(const float *x, int M, int K, const effx_weight *W, const int64_t *ids, int N,
                        float *y, int nthreads) {
  int nblocks = (N + ROWS - 1) / ROWS;
  act8 xa, *pa = act8_for(&xa, x, M, K, K, W, 1);
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
        dots(x + (size_t)m0 * K, K, mc, K, W, rows, nr, out, pa, m0);
        for (int m = 0; m < mc; m++)
          for (int j = 0; j < nr; j++) y[(size_t)(m0 + m) * N + n0 + j] = out[m * ROWS + j];
      }
    }
  }
  if (pa) act8_free(pa);
}

void effx_linear_rows(const float *x, int M, int K, const float *w, const int64_t *ids, int N,
                      float *y, int nthreads) {
  effx_weight W = plain(w, K);
  effx_linear_rows_w(x, M, K, &W, ids, N, y, nthreads);
}

/* The gated MLP's input side: y[m, n] = silu(x . wg[n]) * (x . wu[n]). */
void effx_gated_w(const float *x, int M, int K, const effx_weight *wg, const effx_weight *wu, int N,
                  float *y, int nthreads) {
  int nblocks = (N + ROWS - 1) / ROWS;
  effx_weight both[2] = {*wg, *wu};
  act8 xa, *pa = act8_for(&xa, x, M, K, K, both, 2);
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
        dots(x + (size_t)m0 * K, K, mc, K, wg, rows, nr, g, pa, m0);
        dots(x + (size_t)m0 * K, K, mc, K, wu, rows, nr, u, pa, m0);
        for (int m = 0; m < mc; m++)
          for (int j = 0; j < nr; j++) {
            float a = g[m * ROWS + j];
            y[(size_t)(m0 + m) * N + n0 + j] = a / (1.f + expf(-a)) * u[m * ROWS + j];
          }
      }
    }
  }
  if (pa) act8_free(pa);
}

void effx_gated(const float *x, int M, int K, const float *wg, const float *wu, int N, float *y,
                int nthreads) {
  effx_weight a = plain(wg, K), b = plain(wu, K);
  effx_gated_w(x, M, K, &a, &b, N, y, nthreads);
}

/* RMSNorm over the last axis: y[m, :] = w * (x[m, :] / sqrt(mean(x[m, :]^2) + eps)). */
void effx_rms_norm(const float *x, const float *w, float *y, int M, int D, float eps) {
  for (int m = 0; m < M; m++) {
    const float *xm = x + (size_t)m * D;
    float *ym = y + (size_t)m * D;
    float ss = 0.f;
    for (int i = 0; i < D; i++) ss += xm[i] * xm[i];
    float r = 1.f / sqrtf(ss / (float)D + eps);
    for (int i = 0; i < D; i++) ym[i] = w[i] * (xm[i] * r);
  }
}

/* ---- a whole decoder layer in one call ------------------------------------------------------------- */

/* A Llama-family decoder layer (RMSNorm, q/k/v with rotary embedding, grouped-query attention over a KV
 * cache, output projection, residual, RMSNorm, gated MLP, residual): its weights and sizes. */
typedef struct {
  int D, nq, nkv, hd, F; /* hidden size, q and kv widths (heads x hd), head size, MLP width */
  float eps1, eps2, scale;
  const float *norm1, *norm2;
  effx_weight wq, wk, wv, wo, wg, wu, wd;
  const float *bq, *bk, *bv, *bo; /* or NULL */
} effx_layer_params;

/* Floats of work space effx_layer needs for M rows. */
long effx_layer_work(const effx_layer_params *L, int M) {
  return (long)M * (2L * L->D + L->nq + L->F) + 0L;
}

/* One decoder layer on M = B * S new tokens x [M, D] (cos, sin [M, hd]): the new keys and values go into
 * the caches kc, vc ([B, nkv/hd, cap, hd], filled to `past`) after the filled slots and stay in qkv
 * [M, nq + 2 nkv] (q, k, v by row); mask [B, S, past + S] (element strides mb, ms, 1) is added to the
 * scores; out [M, D]. Each step is the kernel the unfused layer runs (the same bits), except the attention,
 * which runs here: per query row and head, scores in key order, softmax (largest score subtracted, expf),
 * then the weighted sum of values in key order. */
void effx_layer(const effx_layer_params *L, const float *x, int B, int S, const float *cos, const float *sin,
                float *kc, float *vc, int cap, int past, const float *mask, long mb, long ms, float *qkv,
                float *work, float *out, int nthreads) {
  const int M = B * S, D = L->D, nq = L->nq, nkv = L->nkv, hd = L->hd, F = L->F, W = nq + 2 * nkv;
  const int hq = nq / hd, hk = nkv / hd, group = hq / hk, T = past + S;
  float *h = work, *att = h + (size_t)M * D, *x2 = att + (size_t)M * nq, *g = x2 + (size_t)M * D;
  effx_rms_norm(x, L->norm1, h, M, D, L->eps1);
  effx_weight ws[3] = {L->wq, L->wk, L->wv};
  effx_qkv_rope_w(h, M, D, ws, L->bq, L->bk, L->bv, nq, nkv, qkv, cos, sin, hd, nthreads);
  for (int m = 0; m < M; m++) { /* the new keys and values into the cache, after the filled slots */
    int b = m / S, s = m % S;
    for (int j = 0; j < hk; j++) {
      size_t slot = (((size_t)b * hk + j) * cap + past + s) * hd;
      memcpy(kc + slot, qkv + (size_t)m * W + nq + (size_t)j * hd, (size_t)hd * sizeof(float));
      memcpy(vc + slot, qkv + (size_t)m * W + nq + nkv + (size_t)j * hd, (size_t)hd * sizeof(float));
    }
  }
#pragma omp parallel num_threads(nthreads)
  {
    float *p = (float *)malloc((size_t)T * sizeof(float));
#pragma omp for schedule(static)
    for (int task = 0; task < M * hq; task++) {
      int m = task / hq, head = task % hq, b = m / S, s = m % S, j = head / group;
      const float *q = qkv + (size_t)m * W + (size_t)head * hd;
      const float *keys = kc + ((size_t)b * hk + j) * cap * hd, *vals = vc + ((size_t)b * hk + j) * cap * hd;
      const float *mrow = mask + (size_t)b * mb + (size_t)s * ms;
      float top = -INFINITY;
      for (int t = 0; t < T; t++) {
        v16 acc = v_zero();
        int d = 0;
        for (; d + 16 <= hd; d += 16) acc = v_fma(v_load(q + d), v_load(keys + (size_t)t * hd + d), acc);
        if (d < hd) acc = v_fma(v_load_n(q + d, hd - d), v_load_n(keys + (size_t)t * hd + d, hd - d), acc);
        p[t] = v_sum(acc) * L->scale + mrow[t];
        top = p[t] > top ? p[t] : top;
      }
      float sum = 0.f;
      for (int t = 0; t < T; t++) {
        p[t] = expf(p[t] - top);
        sum += p[t];
      }
      float *o = att + (size_t)m * nq + (size_t)head * hd;
      for (int d = 0; d < hd; d++) o[d] = 0.f;
      for (int t = 0; t < T; t++) {
        float w = p[t] / sum;
        const float *v = vals + (size_t)t * hd;
        for (int d = 0; d < hd; d++) o[d] += w * v[d];
      }
    }
    free(p);
  }
  /* x2 = x + att . wo (+ bo); out = x2 + down(silu(gate) * up) of rms_norm(x2) */
  int n_o = D;
  float *ys[1] = {out};
  const float *bos[1] = {L->bo};
  effx_linear_w(att, M, nq, nq, 1, &L->wo, bos, &n_o, ys, &n_o, nthreads);
  for (size_t i = 0; i < (size_t)M * D; i++) x2[i] = x[i] + out[i];
  effx_rms_norm(x2, L->norm2, h, M, D, L->eps2);
  effx_gated_w(h, M, D, &L->wg, &L->wu, F, g, nthreads);
  effx_qlinear(g, M, F, &L->wd, NULL, D, out, nthreads);
  for (size_t i = 0; i < (size_t)M * D; i++) out[i] = x2[i] + out[i];
}

/* nl decoder layers of one attention shape (their MLP widths F may differ), one after another, on the same
 * M = B * S new tokens x [M, D]: layer l reads layer l - 1's output and writes its new keys and values into
 * its own caches kcs[l], vcs[l] (every one filled to `past`, of capacity cap); one mask for all. The output
 * of the last layer goes to out [M, D]; tmp [M, D] holds the ones between; qkv and work as effx_layer's for
 * the widest layer. The same bits as nl calls of effx_layer, without a return to the caller between
 * layers. */
void effx_layers(const effx_layer_params *const *Ls, int nl, const float *x, int B, int S, const float *cos,
                 const float *sin, float *const *kcs, float *const *vcs, int cap, int past, const float *mask,
                 long mb, long ms, float *qkv, float *work, float *tmp, float *out, int nthreads) {
  const float *in = x;
  for (int l = 0; l < nl; l++) {
    float *dst = ((nl - 1 - l) % 2 == 0) ? out : tmp; /* the last layer writes out */
    effx_layer(Ls[l], in, B, S, cos, sin, kcs[l], vcs[l], cap, past, mask, mb, ms, qkv, work, dst, nthreads);
    in = dst;
  }
}

/* Int8 activations: y = x rounded per block of g values (along rows of K, the last block zero-padded) to
 * scale * int8, scale = the block's largest magnitude / 127: y = scale * nearbyint(x / scale) (round half
 * to even, as torch.round; a block of zeros stays zero). Scalar IEEE operations: the same bits everywhere,
 * and the same as effx.quant.round_int8_reference. */
void effx_round_int8(const float *x, float *y, int M, int K, int g) {
  for (int m = 0; m < M; m++) {
    const float *xm = x + (size_t)m * K;
    float *ym = y + (size_t)m * K;
    for (int k0 = 0; k0 < K; k0 += g) {
      int n = K - k0 < g ? K - k0 : g;
      float amax = 0.f;
      for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(xm[k0 + i]));
      float scale = amax / 127.f;
      for (int i = 0; i < n; i++) ym[k0 + i] = scale > 0.f ? nearbyintf(xm[k0 + i] / scale) * scale : 0.f;
    }
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
