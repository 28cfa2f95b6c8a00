/* A torch-free check of effx's CPU kernels (effx/kernels/cpu.c), for any target the compiler builds: run
 * natively for each x86 target this CPU runs, and for aarch64 under user-mode emulation (qemu-aarch64), by
 * tests/test_kernels_harness.py.
 *
 * On tiny shapes (every tail of k, 1..7 activation rows, float and quantized weights of every kind), it
 * checks the kernels' contract on the target it was built for and exits non-zero on the first failure:
 *
 *   - every output equals the defining order bitwise: 16 lanes, lane l a chain of fused multiply-adds over
 *     k = l, l + 16, ... (zeros past k), then the tree (i, i+8), (i, i+4), (i, i+2), (0, 1);
 *   - a quantized product equals the float product over the de-quantized weight (q * scale + minimum);
 *   - a row computed alone equals the row computed with the others (batch invariance), on 1 or 2 threads;
 *   - int8 activations: the exact integer sums and the float steps of their definition, bitwise, and within
 *     float rounding of the float product over the rounded input;
 *   - the fused kernels (gated MLP, q/k/v with rotary embedding, gathered rows) equal their parts;
 *   - a whole decoder layer (effx_layer) runs (its bits are compared across targets by the test).
 *
 * It prints every output's bits, so that the test can also check that all targets give the same bits.
 *
 *   cc -O1 -fopenmp -std=gnu11 -ffp-contract=off [-mavx2 -mfma -mf16c] tests/kernels_harness.c -lm
 */
#include "../effx/kernels/cpu.c"

#include <stdio.h>
#include <stdlib.h>

static uint32_t state = 12345u;
static float rnd(void) { /* xorshift32, uniform in [-1, 1) */
  state ^= state << 13;
  state ^= state >> 17;
  state ^= state << 5;
  return (float)(state >> 8) / 8388608.f - 1.f;
}

static int failures = 0;
#define CHECK(cond, ...)                    \
  do {                                      \
    if (!(cond)) {                          \
      fprintf(stderr, "FAIL: " __VA_ARGS__); \
      fprintf(stderr, "\n");                \
      failures++;                           \
    }                                       \
  } while (0)

static uint32_t bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

/* the defining order of one output */
static float reference_dot(const float *x, const float *w, int K) {
  float lane[16] = {0};
  for (int k = 0; k < K; k++) lane[k % 16] = fmaf(w[k], x[k], lane[k % 16]);
  float s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; i++) s8[i] = lane[i] + lane[i + 8];
  for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
  for (int i = 0; i < 2; i++) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}

static void emit(const char *name, const float *y, int n) {
  printf("%s", name);
  for (int i = 0; i < n; i++) printf(" %08x", bits(y[i]));
  printf("\n");
}

static uint16_t to_half(float f) { /* truncating, the same on every target (test scales: exact not needed) */
  uint32_t u = bits(f), sign = (u >> 16) & 0x8000u;
  int exp = (int)((u >> 23) & 255) - 127 + 15;
  if (exp <= 0) return (uint16_t)sign;
  if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
  return (uint16_t)(sign | ((uint32_t)exp << 10) | ((u >> 13) & 1023));
}

enum { MAXM = 7, MAXN = 53, MAXK = 100 };

/* checks a product of M rows against the reference, alone and together, on 1 and 2 threads */
static void check_product(const char *name, const float *x, int M, int K, const effx_weight *W, const float *wd,
                          int N) {
  float y[MAXM * MAXN], one[MAXN], y1[MAXM * MAXN];
  effx_qlinear(x, M, K, W, NULL, N, y, 2);
  effx_qlinear(x, M, K, W, NULL, N, y1, 1);
  for (int m = 0; m < M; m++) {
    effx_qlinear(x + m * K, 1, K, W, NULL, N, one, 2);
    for (int n = 0; n < N; n++) {
      float want = reference_dot(x + m * K, wd + n * K, K);
      CHECK(bits(y[m * N + n]) == bits(want), "%s M=%d K=%d: y[%d,%d] %a, the defining order gives %a", name, M, K,
            m, n, y[m * N + n], want);
      CHECK(bits(one[n]) == bits(y[m * N + n]), "%s M=%d K=%d: row %d alone differs", name, M, K, m);
      CHECK(bits(y1[m * N + n]) == bits(y[m * N + n]), "%s M=%d K=%d: 1 thread differs", name, M, K);
    }
  }
  emit(name, y, M * N);
}

static void float_products(void) {
  static const int ks[] = {1, 15, 16, 17, 31, 32, 33, 64, 100};
  float x[MAXM * MAXK], w[MAXN * MAXK];
  char name[64];
  for (size_t t = 0; t < sizeof ks / sizeof *ks; t++) {
    int K = ks[t];
    for (int M = 1; M <= MAXM; M++) {
      int N = 3 + (M * 11 + K) % (MAXN - 3);
      for (int i = 0; i < M * K; i++) x[i] = rnd();
      for (int i = 0; i < N * K; i++) w[i] = rnd();
      effx_weight W = plain(w, K);
      snprintf(name, sizeof name, "f32:M%d:K%d:N%d", M, K, N);
      check_product(name, x, M, K, &W, w, N);
    }
  }
}

/* n random scales and minimums, as float16 and as the floats the kernels read (f16: the float16 values) */
static void random_scales(int n, int f16, uint16_t *s16, uint16_t *m16, float *s32, float *m32) {
  for (int i = 0; i < n; i++) {
    float d = 0.05f + 0.1f * (rnd() + 1.f), m = -0.5f * (rnd() + 1.f);
    s16[i] = to_half(d), m16[i] = to_half(m);
    s32[i] = f16 ? half_to_float(s16[i]) : d;
    m32[i] = f16 ? half_to_float(m16[i]) : m;
  }
}

/* quantized weights of one kind: values, scales (float16 or float32), optional minimum, group size */
static void quantized_products(int kind, int with_min, int f16, int group) {
  enum { K = 128, N = 29 };
  uint8_t q4[N * K / 2];
  int8_t q8[N * K];
  uint16_t b16[N * K], s16[N * K / 16], m16[N * K / 16];
  float s32[N * K / 16], m32[N * K / 16], wd[N * K], x[MAXM * K];
  int ngroups = K / group, gshift = 0;
  while ((1 << gshift) < group) gshift++;
  random_scales(N * ngroups, f16, s16, m16, s32, m32);
  for (int n = 0; n < N; n++)
    for (int k = 0; k < K; k++) {
      int i = n * K + k, g = n * ngroups + k / group;
      float v;
      if (kind == 4) { /* byte j of a 32-block: value j (low nibble), value j + 16 (high nibble) */
        int u = (int)((rnd() + 1.f) * 8.f) & 15;
        int b = n * (K / 2) + (k / 32) * 16 + (k % 16);
        q4[b] = (uint8_t)((k % 32) < 16 ? (q4[b] & 0xf0) | u : (q4[b] & 0x0f) | (u << 4));
        v = (float)(with_min ? u : u - 8);
      } else if (kind == 8) {
        q8[i] = (int8_t)(int)(rnd() * 127.f);
        v = (float)q8[i];
      } else {
        uint32_t u = bits(rnd()) & 0xffff0000u;
        b16[i] = (uint16_t)(u >> 16);
        memcpy(&v, &u, 4);
      }
      if (kind != 16) {
        v = v * s32[g];
        if (with_min) v = v + m32[g];
      }
      wd[i] = v;
    }
  effx_weight W = {kind, kind == 4 ? (const void *)q4 : kind == 8 ? (const void *)q8 : (const void *)b16,
                   kind == 16 ? NULL : f16 ? (const void *)s16 : (const void *)s32,
                   kind == 16 || !with_min ? NULL : f16 ? (const void *)m16 : (const void *)m32,
                   f16, gshift, ngroups, kind == 4 ? K / 2 : K, 0};
  char name[64];
  for (int M = 1; M <= MAXM; M += 3) {
    for (int i = 0; i < M * K; i++) x[i] = rnd();
    snprintf(name, sizeof name, "q%d:min%d:f16%d:g%d:M%d", kind, with_min, f16, group, M);
    check_product(name, x, M, K, &W, wd, N); /* the defining order over the de-quantized weight */
  }
}

/* int8 activations (effx_weight.act8), defined independently of cpu.c: x rounded per group to scale * q;
 * per 64 values and lane l (values 4l..4l+3), the exact integer sum s of q_x q_w, acc = fma(s, sx sw, acc),
 * then acc = fma(sx t, min, acc) with t the sum of the four q_x; then the tree. */
static float reference_int8(const float *x, int K, const int *qw, const float *sw, const float *mw, int group) {
  int K64 = (K + 63) / 64 * 64;
  int q[128 + 64] = {0};
  float sx[128 + 64] = {0};
  for (int k0 = 0; k0 < K; k0 += group) {
    int n = K - k0 < group ? K - k0 : group;
    float amax = 0.f;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[k0 + i]));
    float scale = amax / 127.f;
    for (int i = 0; i < n; i++) {
      q[k0 + i] = scale > 0.f ? (int)nearbyintf(x[k0 + i] / scale) : 0;
      sx[k0 + i] = scale;
    }
  }
  float lane[16] = {0};
  for (int k0 = 0; k0 < K64; k0 += 64)
    for (int l = 0; l < 16; l++) {
      int k = k0 + 4 * l, s = 0, t = 0;
      for (int i = 0; i < 4; i++) s += q[k + i] * qw[k + i], t += q[k + i];
      lane[l] = fmaf((float)s, sx[k] * sw[k], lane[l]);
      if (mw) lane[l] = fmaf(sx[k] * (float)t, mw[k], lane[l]);
    }
  float s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; i++) s8[i] = lane[i] + lane[i + 8];
  for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
  for (int i = 0; i < 2; i++) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}

/* int8-activation products: K values of x against rows of kp >= K values (kp a multiple of 32) */
static void int8_products(int kind, int with_min, int f16, int group, int K, int kp) {
  enum { N = 21, KP = 128 }; /* kp <= KP */
  static uint8_t q4[N * KP / 2];
  static int8_t q8[N * KP];
  static uint16_t s16[N * KP / 32], m16[N * KP / 32];
  static float s32[N * KP / 32], m32[N * KP / 32], x[MAXM * KP];
  static int qw[N][KP + 64];
  static float sw[N][KP + 64], mw[N][KP + 64], wd[N * KP];
  int ngroups = kp / group, gshift = 0;
  while ((1 << gshift) < group) gshift++;
  memset(qw, 0, sizeof qw), memset(sw, 0, sizeof sw), memset(mw, 0, sizeof mw), memset(q4, 0, sizeof q4);
  random_scales(N * ngroups, f16, s16, m16, s32, m32);
  for (int n = 0; n < N; n++)
    for (int k = 0; k < kp; k++) {
      int g = n * ngroups + k / group, v;
      if (kind == 4) {
        int u = (int)((rnd() + 1.f) * 8.f) & 15, b = n * (kp / 2) + (k / 32) * 16 + (k % 16);
        q4[b] = (uint8_t)((k % 32) < 16 ? (q4[b] & 0xf0) | u : (q4[b] & 0x0f) | (u << 4));
        v = with_min ? u : u - 8;
      } else {
        q8[n * kp + k] = (int8_t)(k % 7 == 3 ? -128 : (int)(rnd() * 127.f)); /* -128 too: |w| <= 128 */
        v = q8[n * kp + k];
      }
      qw[n][k] = v, sw[n][k] = s32[g], mw[n][k] = m32[g];
      if (k < K) wd[n * K + k] = with_min ? v * s32[g] + m32[g] : v * s32[g];
    }
  effx_weight W = {kind, kind == 4 ? (const void *)q4 : (const void *)q8, f16 ? (const void *)s16 : (const void *)s32,
                   !with_min ? NULL : f16 ? (const void *)m16 : (const void *)m32, f16, gshift, ngroups,
                   kind == 4 ? kp / 2 : kp, 1};
  char name[64];
  for (int M = 1; M <= MAXM; M += 3) {
    float y[MAXM * N], y1[MAXM * N], one[N], rx[KP];
    for (int i = 0; i < M * K; i++) x[i] = rnd() * (i % 5 == 0 ? 4.f : 1.f);
    effx_qlinear(x, M, K, &W, NULL, N, y, 2);
    effx_qlinear(x, M, K, &W, NULL, N, y1, 1);
    for (int m = 0; m < M; m++) {
      effx_qlinear(x + m * K, 1, K, &W, NULL, N, one, 2);
      effx_round_int8(x + m * K, rx, 1, K, group);
      for (int n = 0; n < N; n++) {
        float want = reference_int8(x + m * K, K, qw[n], sw[n], with_min ? mw[n] : NULL, group);
        float got = y[m * N + n], emulated = reference_dot(rx, wd + n * K, K);
        CHECK(bits(got) == bits(want), "int8 q%d min%d g%d K%d M%d: y[%d,%d] %a, the defining order gives %a", kind,
              with_min, group, K, M, m, n, got, want);
        CHECK(bits(one[n]) == bits(got) && bits(y1[m * N + n]) == bits(got), "int8 M=%d: batch or threads differ", M);
        float mag = 0.f; /* the float product over round_int8(x): equal up to float rounding */
        for (int k = 0; k < K; k++) mag += fabsf(rx[k] * wd[n * K + k]);
        CHECK(fabsf(got - emulated) <= 1e-5f * mag + 1e-30f, "int8: %a is far from the emulated %a", got, emulated);
      }
    }
    snprintf(name, sizeof name, "i8:q%d:min%d:f16%d:g%d:K%d:M%d", kind, with_min, f16, group, K, M);
    emit(name, y, M * N);
  }
}

static void fused(void) {
  enum { M = 3, K = 48, N = 40, D = 16, NQ = 64, NKV = 32 };
  float x[M * K], wg[N * K], wu[N * K], g[M * N], u[M * N], y[M * N], nw[K];
  for (int i = 0; i < M * K; i++) x[i] = rnd();
  for (int i = 0; i < N * K; i++) wg[i] = rnd(), wu[i] = rnd();
  for (int i = 0; i < K; i++) nw[i] = rnd();
  effx_linear1(x, M, K, wg, NULL, N, g, N, 2);
  effx_linear1(x, M, K, wu, NULL, N, u, N, 2);
  effx_gated(x, M, K, wg, wu, N, y, 2);
  for (int i = 0; i < M * N; i++) {
    float a = g[i], want = a / (1.f + expf(-a)) * u[i];
    CHECK(bits(y[i]) == bits(want), "gated[%d] %a, its parts give %a", i, y[i], want);
  }
  emit("gated", y, M * N);

  int64_t ids[5] = {7, 0, 39, 7, 31};
  float r[M * 5];
  effx_linear_rows(x, M, K, wg, ids, 5, r, 2);
  for (int m = 0; m < M; m++)
    for (int j = 0; j < 5; j++)
      CHECK(bits(r[m * 5 + j]) == bits(g[m * N + ids[j]]), "linear_rows[%d,%d]", m, j);

  float wq[NQ * K], wk[NKV * K], wv[NKV * K], qkv[M * (NQ + 2 * NKV)], cs[M * D], sn[M * D];
  for (int i = 0; i < NQ * K; i++) wq[i] = rnd();
  for (int i = 0; i < NKV * K; i++) wk[i] = rnd(), wv[i] = rnd();
  for (int i = 0; i < M * D; i++) cs[i] = rnd(), sn[i] = rnd();
  effx_qkv_rope(x, M, K, wq, wk, wv, NULL, NULL, NULL, NQ, NKV, qkv, cs, sn, D, 2);
  float parts[M * NQ];
  effx_linear1(x, M, K, wq, NULL, NQ, parts, NQ, 2);
  for (int m = 0; m < M; m++)
    for (int h = 0; h < NQ / D; h++)
      for (int i = 0; i < D / 2; i++) {
        float a = parts[m * NQ + h * D + i], b = parts[m * NQ + h * D + i + D / 2];
        float want = a * cs[m * D + i] - b * sn[m * D + i];
        CHECK(bits(qkv[m * (NQ + 2 * NKV) + h * D + i]) == bits(want), "qkv_rope q[%d,%d,%d]", m, h, i);
      }
  emit("qkv_rope", qkv, M * (NQ + 2 * NKV));

  float nrm[M * K];
  effx_rms_norm(x, nw, nrm, M, K, 1e-5f);
  emit("rms_norm", nrm, M * K);
}

/* a whole decoder layer (effx_layer): 2 rows of 2 new tokens on caches filled to 5 of 9 slots */
static void layer(void) {
  enum { B = 2, S = 2, M = B * S, D = 32, HD = 16, NQ = 32, NKV = 16, F = 48, CAP = 9, PAST = 5, T = PAST + S };
  static float x[M * D], n1[D], n2[D], wq[NQ * D], wk[NKV * D], wv[NKV * D], wo[D * NQ], wg[F * D], wu[F * D],
      wd[D * F], cs[M * HD], sn[M * HD], kc[B * (NKV / HD) * CAP * HD], vc[B * (NKV / HD) * CAP * HD],
      mask[B * S * T], qkv[M * (NQ + 2 * NKV)], out[M * D];
  float *all[] = {x, n1, n2, wq, wk, wv, wo, wg, wu, wd, cs, sn, kc, vc};
  int sizes[] = {M * D, D, D, NQ * D, NKV * D, NKV * D, D * NQ, F * D, F * D, D * F, M * HD, M * HD,
                 B * (NKV / HD) * CAP * HD, B * (NKV / HD) * CAP * HD};
  for (int a = 0; a < 14; a++)
    for (int i = 0; i < sizes[a]; i++) all[a][i] = rnd() * 0.5f;
  for (int b = 0; b < B; b++)
    for (int s = 0; s < S; s++)
      for (int t = 0; t < T; t++) mask[(b * S + s) * T + t] = (t <= PAST + s && !(b == 0 && t < 2)) ? 0.f : -3.0e38f;
  effx_layer_params L = {D, NQ, NKV, HD, F, 1e-5f, 1e-5f, 0.25f, n1, n2, plain(wq, D), plain(wk, D), plain(wv, D),
                         plain(wo, NQ), plain(wg, D), plain(wu, D), plain(wd, F), NULL, NULL, NULL, NULL};
  float *work = (float *)malloc((size_t)effx_layer_work(&L, M) * sizeof(float));
  effx_layer(&L, x, B, S, cs, sn, kc, vc, CAP, PAST, mask, (long)S * T, T, qkv, work, out, 2);
  free(work);
  emit("layer", out, M * D);
  emit("layer.kv", kc, B * (NKV / HD) * CAP * HD);
}

int main(void) {
  printf("isa %s supported %d\n", effx_isa(), effx_supported());
  if (!effx_supported()) return 2;
  float_products();
  for (int f16 = 0; f16 <= 1; f16++) {
    for (int group = 16; group <= 64; group *= 2) {
      quantized_products(4, 1, f16, group);
      quantized_products(4, 0, f16, group);
      quantized_products(8, 1, f16, group);
      quantized_products(8, 0, f16, group);
    }
  }
  quantized_products(16, 0, 0, 32);
  static const int shapes[][3] = {{32, 128, 128}, {32, 96, 96}, {32, 80, 96}, {64, 128, 128}, {32, 20, 32}};
  for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++)
    for (int kind = 4; kind <= 8; kind += 4)
      for (int with_min = 0; with_min <= 1; with_min++)
        int8_products(kind, with_min, (int)(i % 2), shapes[i][0], shapes[i][1], shapes[i][2]);
  fused();
  layer();
  if (failures) fprintf(stderr, "%d failures\n", failures);
  return failures ? 1 : 0;
}
