/* BitLinear's CPU kernels, called through ctypes (bitnet_training.quant.native).
 *
 * act_quant_*: the per-token absmax activation quantizer in one pass over each row
 *   m = max(|x|) clamped below at eps;  s = (1 / m) * qp;  codes = round_half_even(x * s)
 * computed exactly as the eager PyTorch composition does it (x widened to float32, or kept
 * in float64; `qp / t` in PyTorch is `t.reciprocal() * qp`), so codes and scales are
 * bit-identical to it. |x * s| <= qp + rounding, so no clamp is needed. Given an output,
 * the same pass also writes the quantized activations x_q = dt(code / s) (as rebuild_*);
 * with no codes buffer (NULL) it writes x_q alone. Returns 0, or 1 where a scratch row could
 * not be allocated (nothing then is complete).
 *
 * absmean_f32: the ternary weight scale gamma = mean(|W|), as PyTorch sums it (below).
 * ternary_*: the ternary weight codes and the dequantized weight in one pass (below);
 *   absmean_ternary_*: gamma and then those, in one call.
 * rebuild_*: the quantized activations from their codes (below).
 * quotient_mismatches: the exhaustive check of x_q's division-free quotient (below).
 * rescale_i32_f32: the integer GEMM's int32 sums to float32 with both scales (below).
 *
 * Rows are split over `threads` OpenMP threads (the libgomp torch itself loaded).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PARALLEL_MIN 32768 /* elements below which one thread does the whole call */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* max |x| over a row of k, and whether the row holds a NaN (*nan; the max is then unused).
 * Float32 rows with AVX-512 compare |x|'s bit patterns as unsigned integers: for non-negative
 * floats (infinity included) their order is the numbers' order, and any NaN's pattern is
 * above infinity's, so one integer max per 16 floats finds both. */
#define ABSMAX_ANY(NAME, T, W, LOAD)                                                       \
    static inline W NAME(const T *x, int64_t k, int *nan_out) {                            \
        W m = 0;                                                                           \
        int nan = 0;                                                                       \
        _Pragma("omp simd reduction(max:m) reduction(|:nan)")                              \
        for (int64_t j = 0; j < k; j++) {                                                  \
            W a = LOAD(x[j]);                                                              \
            nan |= a != a;                                                                 \
            a = a < 0 ? -a : a;                                                            \
            m = a > m ? a : m;                                                             \
        }                                                                                  \
        *nan_out = nan;                                                                    \
        return m;                                                                          \
    }

static inline float absmax_f32(const float *x, int64_t k, int *nan) {
    uint32_t top = 0;
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = m0;
    for (; j + 32 <= k; j += 32) { /* two chains: the max's latency is hidden */
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(x + j), magnitude));
        m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(x + j + 16), magnitude));
    }
    for (; j + 16 <= k; j += 16)
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(x + j), magnitude));
    top = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
#endif
    for (; j < k; j++) {
        uint32_t u;
        memcpy(&u, x + j, sizeof u);
        u &= 0x7fffffffu;
        top = u > top ? u : top;
    }
    *nan = top > 0x7f800000u;
    float m;
    memcpy(&m, &top, sizeof m);
    return m;
}

#define ACT_QUANT(NAME, T, W, LOAD, AMAX, OUT_T, ROW, FAST)                                \
    int NAME(const T *x, int64_t rows, int64_t k, W qp, W eps, int8_t *codes, W *inv,      \
             OUT_T *xq, int threads) {                                                     \
        int nt = rows * k >= PARALLEL_MIN ? threads : 1, fail = 0;                         \
        _Pragma("omp parallel num_threads(nt)")                                            \
        {                                                                                  \
            /* No codes wanted: each thread's row goes through its own scratch row. */     \
            int8_t *scratch = codes ? NULL : (int8_t *)malloc(k);                          \
            if (!codes && !scratch) {                                                      \
                _Pragma("omp atomic write") fail = 1;                                      \
            }                                                                              \
            _Pragma("omp for schedule(static)")                                            \
            for (int64_t r = 0; r < rows; r++) {                                           \
                if (!codes && !scratch) continue;                                          \
                const T *xr = x + r * k;                                                   \
                int8_t *cr = codes ? codes + r * k : scratch;                              \
                int nan = 0;                                                               \
                W m = AMAX(xr, k, &nan);                                                   \
                m = nan ? (W)NAN : (m < eps ? eps : m); /* a NaN row keeps a NaN scale */  \
                W s = ((W)1 / m) * qp;                                                     \
                inv[r] = s;                                                                \
                OUT_T *xr_q = xq ? xq + r * k : NULL;                                      \
                if (nan || m == (W)INFINITY) { /* NaN products: code 0, as PyTorch does */ \
                    for (int64_t j = 0; j < k; j++) {                                      \
                        W t = LOAD(xr[j]) * s;                                             \
                        cr[j] = t != t ? 0 : (int8_t)(int32_t)nearbyint(t);                \
                    }                                                                      \
                    if (xq) ROW(cr, k, s, xr_q);                                           \
                } else if (!FAST(xr, k, s, codes ? cr : NULL, xr_q)) {                     \
                    _Pragma("omp simd")                                                    \
                    for (int64_t j = 0; j < k; j++)                                        \
                        cr[j] = (int8_t)(int32_t)nearbyint(LOAD(xr[j]) * s);               \
                    if (xq) ROW(cr, k, s, xr_q); /* x_q while the row is in cache */       \
                }                                                                          \
            }                                                                              \
            free(scratch);                                                                 \
        }                                                                                  \
        return fail;                                                                       \
    }

/* absmean_f32: gamma = mean(|W|) clamped below at eps, per tensor (or per row when per_row
 * is set), bit-identical to PyTorch's `w.abs().mean()` (`.mean(dim=1, keepdim=True)`) on a
 * contiguous float32 CPU tensor, in one pass over W and no |W| temporary. That mean is
 * PyTorch's sum divided by the count in float32, and its float sum is a fixed-order cascade
 * (aten/src/ATen/native/cpu/SumKernel.cpp, which runs its AVX2 build, 8 lanes, also on
 * AVX-512 CPUs): reproduced here operation for operation, including how a whole-tensor sum
 * over >= GRAIN_SIZE elements is split between `threads` threads and the partial sums
 * combined. quant.native checks the result against PyTorch's once per shape and thread
 * count and uses PyTorch's own from then on if they ever differ. */
#define SUM_LANES 8      /* at::vec::Vectorized<float>::size() in the kernel PyTorch runs */
#define GRAIN_SIZE 32768 /* at::internal::GRAIN_SIZE */

static inline int64_t ceil_log2(int64_t x) { /* at::native::utils::CeilLog2 */
    return x <= 2 ? 1 : 64 - __builtin_clzll((uint64_t)(x - 1));
}

/* row_sum over `size` rows of 4 accumulators of `lanes` floats (multi_row_sum: partial sums
 * kept in 4 levels, each level flushed into the next every 2^level_power additions). */
#define CASCADE_LEVELS(LANES)                                                              \
    const int64_t lp = ceil_log2(size) / 4 > 4 ? ceil_log2(size) / 4 : 4;                  \
    const int64_t step = (int64_t)1 << lp, mask = step - 1;                                \
    float acc[4][4 * (LANES)];                                                             \
    memset(acc, 0, sizeof acc);                                                            \
    int64_t i = 0;                                                                         \
    for (; i + step <= size;) {                                                            \
        for (int64_t j = 0; j < step; ++j, ++i)                                            \
            for (int l = 0; l < 4 * (LANES); l++) acc[0][l] += LOAD(i * 4 * (LANES) + l);  \
        for (int j = 1; j < 4; ++j) {                                                      \
            for (int l = 0; l < 4 * (LANES); l++) {                                        \
                acc[j][l] += acc[j - 1][l];                                                \
                acc[j - 1][l] = 0;                                                         \
            }                                                                              \
            if ((i & (mask << (j * lp))) != 0) break;                                      \
        }                                                                                  \
    }                                                                                      \
    for (; i < size; ++i)                                                                  \
        for (int l = 0; l < 4 * (LANES); l++) acc[0][l] += LOAD(i * 4 * (LANES) + l);      \
    for (int j = 1; j < 4; ++j)                                                            \
        for (int l = 0; l < 4 * (LANES); l++) acc[0][l] += acc[j][l];

/* The plain sum of n floats (the combination of the threads' partial sums). */
static float scalar_sum(const float *x, int64_t n) {
    const int64_t size = n / 4;
#define LOAD(idx) x[idx]
    CASCADE_LEVELS(1)
#undef LOAD
    for (int64_t v = size * 4; v < n; v++) acc[0][0] += x[v];
    return ((acc[0][0] + acc[0][1]) + acc[0][2]) + acc[0][3];
}

/* sum(|x|) over n >= SUM_LANES contiguous floats (vectorized_inner_sum). */
static float abs_sum(const float *x, int64_t n) {
    const int64_t nvec = n / SUM_LANES, size = nvec / 4;
#define LOAD(idx) fabsf(x[idx])
    CASCADE_LEVELS(SUM_LANES)
#undef LOAD
    for (int64_t v = size * 4; v < nvec; v++) /* leftover vectors: into accumulator 0 */
        for (int l = 0; l < SUM_LANES; l++) acc[0][l] += fabsf(x[v * SUM_LANES + l]);
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < SUM_LANES; l++) acc[0][l] += acc[0][k * SUM_LANES + l];
    float s = 0; /* the scalar tail first, then the lanes in order */
    for (int64_t j = nvec * SUM_LANES; j < n; j++) s += fabsf(x[j]);
    for (int l = 0; l < SUM_LANES; l++) s += acc[0][l];
    return s;
}

static inline float clamp_eps(float g, float eps) { return g < eps ? eps : g; } /* NaN kept */

/* 0: done; 1: a shape this does not reproduce (fewer than SUM_LANES summed at once, or too
 * many threads): the caller uses PyTorch's. */
int absmean_f32(const float *w, int64_t rows, int64_t k, int per_row, float eps, int threads,
                float *gamma) {
    int64_t n = rows * k;
    if (per_row && rows > 1) { /* one output per row: each row summed whole, in one thread */
        if (k < SUM_LANES) return 1;
        int nt = n >= GRAIN_SIZE ? threads : 1;
        _Pragma("omp parallel for num_threads(nt) schedule(static)")
        for (int64_t r = 0; r < rows; r++)
            gamma[r] = clamp_eps((0.0f + abs_sum(w + r * k, k)) / (float)k, eps);
        return 0;
    }
    /* One output: below GRAIN_SIZE (or one thread) one serial sum; else TensorIterator's
     * two-pass reduction. at::parallel_for opens a parallel region with no num_threads
     * clause and splits the range into min(team size, ceil(n / GRAIN_SIZE)) equal chunks,
     * the team being what OpenMP actually gives (OMP_THREAD_LIMIT or OMP_DYNAMIC can make
     * it smaller than `threads`); each chunk is summed into its own slot of a
     * `threads`-long buffer of zeros, then that buffer is summed. This library shares
     * PyTorch's libgomp and is called from the thread that set its thread count, so the
     * same region here gets the same team. */
    if (n < GRAIN_SIZE || threads <= 1) {
        if (n < SUM_LANES) return 1;
        gamma[0] = clamp_eps((0.0f + abs_sum(w, n)) / (float)n, eps);
        return 0;
    }
    if (threads > 256) return 1;
    float partial[256] = {0};
    int fail = 0;
    _Pragma("omp parallel")
    {
        int64_t team = omp_get_num_threads(), tid = omp_get_thread_num();
        int64_t nt = (n + GRAIN_SIZE - 1) / GRAIN_SIZE;
        nt = nt < team ? nt : team;
        int64_t chunk = (n + nt - 1) / nt, b = tid * chunk, e = b + chunk < n ? b + chunk : n;
        if (team > threads) fail = 1; /* a team larger than the buffer PyTorch would size */
        else if (b < e) partial[tid] = 0.0f + abs_sum(w + b, e - b);
    }
    if (fail) return 1;
    /* The buffer's own sum: vectorized once it holds a whole vector (abs is the identity
     * on these non-negative sums). */
    float total = threads >= SUM_LANES ? abs_sum(partial, threads) : scalar_sum(partial, threads);
    gamma[0] = clamp_eps((0.0f + total) / (float)n, eps);
    return 0;
}

/* ternary_*: BitNet b1.58's absmean weight quantizer given gamma (per tensor, or per row
 * when per_row is set), in one pass writing both outputs:
 *   codes = clamp(round_half_even(w * (1 / gamma)), -1, 1)      int8
 *   dq    = dt(codes * gamma)                                    the dequantized weight
 * as `ternary_quantize` and `dequantize(...).to(dt)` compute them. */
static inline uint16_t f32_to_bf16(float f) { /* round half to even; NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define STORE_F32(v) (v)
#define STORE_BF16(v) f32_to_bf16(v)
#define STORE_F16(v) ((_Float16)(v))
#define STORE_F64(v) ((double)(v))

/* t = w * (1 / gamma); round half to even then clamp to [-1, 1] is: 1 above 0.5, -1 below
 * -0.5, else 0 (a tie at +-0.5 rounds to the even 0; one at +-1.5 is clamped to +-1; NaN
 * gives 0, as PyTorch's cast of NaN to int8 does here). The dequantized value is then
 * dt(+-gamma) or dt(0 * gamma), rounded once as dt(code * gamma) is. */
#define TERNARY(NAME, OUT_T, STORE)                                                        \
    void NAME(const float *w, int64_t rows, int64_t k, const float *gamma, int per_row,    \
              int8_t *codes, OUT_T *dq, int threads) {                                     \
        int nt = rows * k >= PARALLEL_MIN ? threads : 1;                                   \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                       \
        for (int64_t r = 0; r < rows; r++) {                                               \
            float g = gamma[per_row ? r : 0], ig = 1.0f / g;                               \
            OUT_T pos = STORE(g), neg = STORE(-g), zero = STORE(0.0f * g); /* NaN if g is */ \
            const float *wr = w + r * k;                                                   \
            _Pragma("omp simd")                                                            \
            for (int64_t j = 0; j < k; j++) {                                              \
                float t = wr[j] * ig;                                                      \
                int8_t code = (int8_t)((t > 0.5f) - (t < -0.5f));                          \
                codes[r * k + j] = code;                                                   \
                dq[r * k + j] = code > 0 ? pos : (code < 0 ? neg : zero);                  \
            }                                                                              \
        }                                                                                  \
    }

TERNARY(ternary_f32, float, STORE_F32)
TERNARY(ternary_bf16, uint16_t, STORE_BF16)
TERNARY(ternary_f16, _Float16, STORE_F16)
TERNARY(ternary_f64, double, STORE_F64)

/* absmean_ternary_*: gamma (absmean_f32) then the codes and dequantized weight (ternary_*),
 * in one call from Python (the weight is quantized this way once per step and layer; the
 * caller has checked absmean_f32 against PyTorch's sum for this shape and thread count).
 * Returns absmean_f32's status: 1 (nothing written) where it leaves the shape to PyTorch. */
#define ABSMEAN_TERNARY(NAME, TERN, OUT_T)                                                 \
    int NAME(const float *w, int64_t rows, int64_t k, int per_row, float eps, int threads,  \
             float *gamma, int8_t *codes, OUT_T *dq) {                                     \
        if (absmean_f32(w, rows, k, per_row, eps, threads, gamma)) return 1;               \
        TERN(w, rows, k, gamma, per_row, codes, dq, threads);                              \
        return 0;                                                                          \
    }
ABSMEAN_TERNARY(absmean_ternary_f32, ternary_f32, float)
ABSMEAN_TERNARY(absmean_ternary_bf16, ternary_bf16, uint16_t)
ABSMEAN_TERNARY(absmean_ternary_f16, ternary_f16, _Float16)
ABSMEAN_TERNARY(absmean_ternary_f64, ternary_f64, double)

/* rebuild_*: the quantized activations from their codes (the forward's matmul operand, and
 * the backward's for the weight gradient),
 *   x_q = dt(code / s[row])      s in float32 (float64 for float64), the quotient in it,
 * as PyTorch's `codes_int8.div(s).to(dt)` rounds it: once, at the end (no scale rounded to
 * a low precision first: a bf16 or float16 s would overflow for small activations).
 *
 * The float32 quotient is taken without a division, which is the slow part of the pass:
 * with y = 1 / s (once per row), q0 = c * y, r = c - s * q0 (exact, by a fused
 * multiply-add) and q = q0 + r * y (one more), Markstein's correction of the reciprocal's
 * product. It is the correctly rounded c / s, bit for bit, for every code -128..127 and
 * 2^-100 <= |s| <= 2^100: quotient_mismatches() below compares it with the division for
 * every one of them and every float32 s in [1, 2) (and its negatives), and in that range
 * every value involved stays a normal float, so the result scales exactly with s's
 * exponent. Other scales divide. (float64 rows always divide.) */
#define QUOT_MIN 0x1p-100f
#define QUOT_MAX 0x1p100f

static inline int quot_fast(float s) {
    float a = fabsf(s);
    return a >= QUOT_MIN && a <= QUOT_MAX; /* false for NaN */
}

static inline float quot(float c, float s, float y) {
    float q0 = c * y;
    return fmaf(fmaf(-s, q0, c), y, q0);
}

#if defined(__AVX512F__)
static inline __m512 quot16(__m512 c, __m512 s, __m512 y) { /* quot() on 16 lanes */
    __m512 q0 = _mm512_mul_ps(c, y);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(s, q0, c), y, q0);
}
#endif

#define XQ_ROW_F32(NAME, OUT_T, STORE)                                                     \
    static inline void NAME(const int8_t *c, int64_t k, float s, OUT_T *out) {             \
        if (quot_fast(s)) {                                                                \
            const float y = 1.0f / s;                                                      \
            _Pragma("omp simd")                                                            \
            for (int64_t j = 0; j < k; j++) out[j] = STORE(quot((float)c[j], s, y));       \
        } else {                                                                           \
            _Pragma("omp simd")                                                            \
            for (int64_t j = 0; j < k; j++) out[j] = STORE((float)c[j] / s);               \
        }                                                                                  \
    }
XQ_ROW_F32(xq_row_f32, float, STORE_F32)
XQ_ROW_F32(xq_row_f16, _Float16, STORE_F16)

static inline void xq_row_f64(const int8_t *c, int64_t k, double s, double *out) {
    _Pragma("omp simd")
    for (int64_t j = 0; j < k; j++) out[j] = (double)c[j] / s;
}

/* The number of codes -128..127 and float32 scales s = +-m 2^-23, 2^23 <= m < 2^24 (every
 * float32 in [1, 2) and its negative) whose `quot` (and, with AVX-512, `quot16`, which the
 * bf16 kernels use) differs from c / s in any bit: 0 proves the identity above (run by the
 * tests). */
int64_t quotient_mismatches(int threads) {
    int64_t bad = 0;
    _Pragma("omp parallel for num_threads(threads) reduction(+:bad) schedule(static)")
    for (int64_t m = 1 << 23; m < 1 << 24; m++) {
        for (int sign = -1; sign <= 1; sign += 2) {
            const float s = (float)(sign * m) * 0x1p-23f, y = 1.0f / s;
            _Pragma("omp simd reduction(+:bad)")
            for (int c = -128; c < 128; c++) {
                float a = quot((float)c, s, y), b = (float)c / s;
                uint32_t ua, ub;
                memcpy(&ua, &a, sizeof ua);
                memcpy(&ub, &b, sizeof ub);
                bad += ua != ub;
            }
#if defined(__AVX512F__)
            const __m512 vs = _mm512_set1_ps(s), vy = _mm512_set1_ps(y);
            const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3,
                                                   2, 1, 0);
            for (int c0 = -128; c0 < 128; c0 += 16) {
                __m512 c = _mm512_cvtepi32_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(c0)));
                __m512i got = _mm512_castps_si512(quot16(c, vs, vy));
                __m512i want = _mm512_castps_si512(_mm512_div_ps(c, vs));
                bad += __builtin_popcount(_mm512_cmpneq_epi32_mask(got, want));
            }
#endif
        }
    }
    return bad;
}

/* bf16 rows: with AVX512-BF16, vcvtneps2bf16 rounds 16 quotients at once, half to even and
 * NaN made quiet as f32_to_bf16 does. It reads float32 subnormals as zero, so it runs only
 * where no quotient can be one (in the quotient's range above every nonzero |code / s| is at
 * least 2^-100). */
static inline void xq_row_bf16(const int8_t *c, int64_t k, float s, uint16_t *out) {
    int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (quot_fast(s)) {
        const __m512 vs = _mm512_set1_ps(s), vy = _mm512_set1_ps(1.0f / s);
        for (; j + 16 <= k; j += 16) {
            __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
            __m512 q = quot16(_mm512_cvtepi32_ps(wide), vs, vy);
            _mm256_storeu_si256((__m256i *)(out + j), (__m256i)_mm512_cvtneps_pbh(q));
        }
    }
#endif
    for (; j < k; j++) out[j] = f32_to_bf16((float)c[j] / s);
}

#define REBUILD(NAME, W, OUT_T, ROW)                                                       \
    void NAME(const int8_t *codes, int64_t rows, int64_t k, const W *s, OUT_T *out,       \
              int threads) {                                                               \
        int nt = rows * k >= PARALLEL_MIN ? threads : 1;                                   \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                       \
        for (int64_t r = 0; r < rows; r++) ROW(codes + r * k, k, s[r], out + r * k);       \
    }

REBUILD(rebuild_f32, float, float, xq_row_f32)
REBUILD(rebuild_bf16, float, uint16_t, xq_row_bf16)
REBUILD(rebuild_f16, float, _Float16, xq_row_f16)
REBUILD(rebuild_f64, double, double, xq_row_f64)

/* rescale_i32_f32: the exact integer GEMM's int32 sums (rows, cols) to float32 with both
 * scales, in place (int32 and float32 are both 4 bytes), as PyTorch's
 *   acc.to(float32).mul_(t)                 t = gamma / s per row     (col == NULL)
 *   acc.to(float32).div_(s).mul_(gamma)     s per row, gamma per column
 * computes it (int32 to float32 rounds half to even; one multiply, or a divide then a
 * multiply: nothing to contract into a fused multiply-add). */
void rescale_i32_f32(int32_t *acc, int64_t rows, int64_t cols, const float *row,
                     const float *col, int threads) {
    int nt = rows * cols >= PARALLEL_MIN ? threads : 1;
    _Pragma("omp parallel for num_threads(nt) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        int32_t *a = acc + r * cols;
        float *y = (float *)a, t = row[r];
        if (col == NULL) {
            _Pragma("omp simd")
            for (int64_t c = 0; c < cols; c++) y[c] = (float)a[c] * t;
        } else {
            _Pragma("omp simd")
            for (int64_t c = 0; c < cols; c++) y[c] = ((float)a[c] / t) * col[c];
        }
    }
}

/* act_quant_f32_bf16's finite rows, where the quotient needs no division: codes (if wanted)
 * and x_q in one pass, each code kept in a register (as a float32 integer, exactly the int8
 * code's value) instead of going through memory. Returns 0 where it does not apply. */
static inline int fast_f32_bf16(const float *x, int64_t k, float s, int8_t *codes,
                                uint16_t *out) {
    if (!out || !quot_fast(s)) return 0;
    int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s), vy = _mm512_set1_ps(1.0f / s);
    for (; j + 16 <= k; j += 16) {
        /* round half to even (the default mode), as nearbyint: |x s| <= qp, no overflow */
        __m512i ci = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vs));
        if (codes) _mm_storeu_si128((__m128i *)(codes + j), _mm512_cvtsepi32_epi8(ci));
        __m512 q = quot16(_mm512_cvtepi32_ps(ci), vs, vy);
        _mm256_storeu_si256((__m256i *)(out + j), (__m256i)_mm512_cvtneps_pbh(q));
    }
#else
    return 0;
#endif
    for (; j < k; j++) {
        int8_t code = (int8_t)(int32_t)nearbyintf(x[j] * s);
        if (codes) codes[j] = code;
        out[j] = f32_to_bf16((float)code / s);
    }
    return 1;
}
#define NO_FAST(x, k, s, codes, out) 0

/* act_quant_<input dtype>_<x_q dtype>: x_q is written only where a pointer is given. */
#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)
#define LOAD_F16(v) ((float)(v))
ABSMAX_ANY(absmax_bf16, uint16_t, float, LOAD_BF16)
ABSMAX_ANY(absmax_f16, _Float16, float, LOAD_F16)
ABSMAX_ANY(absmax_f64, double, double, LOAD_F32)
#define ACT_QUANT_TO(IN, T, LOAD, FAST_BF16)                                               \
    ACT_QUANT(act_quant_##IN##_f32, T, float, LOAD, absmax_##IN, float, xq_row_f32,        \
              NO_FAST)                                                                     \
    ACT_QUANT(act_quant_##IN##_bf16, T, float, LOAD, absmax_##IN, uint16_t, xq_row_bf16,   \
              FAST_BF16)                                                                   \
    ACT_QUANT(act_quant_##IN##_f16, T, float, LOAD, absmax_##IN, _Float16, xq_row_f16,     \
              NO_FAST)
ACT_QUANT_TO(f32, float, LOAD_F32, fast_f32_bf16)
ACT_QUANT_TO(bf16, uint16_t, LOAD_BF16, NO_FAST)
ACT_QUANT_TO(f16, _Float16, LOAD_F16, NO_FAST)
ACT_QUANT(act_quant_f64_f64, double, double, LOAD_F32, absmax_f64, double, xq_row_f64,
          NO_FAST)
