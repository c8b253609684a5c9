/* BitLinear's CPU kernels, called through ctypes (bitnet_training.quant.native).
 *
 * act_quant_*: the per-token absmax activation quantizer in one pass over each row
 *   m = max(|x|) clamped below at eps;  s = (1 / m) * qp;  codes = round_half_even(x * s)
 * computed exactly as the eager PyTorch composition does it (x widened to float32, or kept
 * in float64; `qp / t` in PyTorch is `t.reciprocal() * qp`), so codes and scales are
 * bit-identical to it. |x * s| <= qp + rounding, so no clamp is needed. Given an output,
 * the same pass also writes the quantized activations x_q = dt(code / s) (as rebuild_*).
 *
 * ternary_*: the ternary weight codes and the dequantized weight in one pass (below).
 * rebuild_*: the quantized activations from their codes (below).
 *
 * Rows are split over `threads` OpenMP threads (the libgomp torch itself loaded).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_MIN 32768 /* elements below which one thread does the whole call */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define ACT_QUANT(NAME, T, W, LOAD, OUT_T, STORE)                                          \
    void NAME(const T *x, int64_t rows, int64_t k, W qp, W eps, int8_t *codes, W *inv,     \
              OUT_T *xq, int threads) {                                                    \
        int nt = rows * k >= PARALLEL_MIN ? threads : 1;                                   \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                       \
        for (int64_t r = 0; r < rows; r++) {                                               \
            const T *xr = x + r * k;                                                       \
            int8_t *cr = codes + r * k;                                                    \
            W m = 0;                                                                       \
            int nan = 0;                                                                   \
            _Pragma("omp simd reduction(max:m) reduction(|:nan)")                          \
            for (int64_t j = 0; j < k; j++) {                                              \
                W a = LOAD(xr[j]);                                                         \
                nan |= a != a;                                                             \
                a = a < 0 ? -a : a;                                                        \
                m = a > m ? a : m;                                                         \
            }                                                                              \
            m = nan ? (W)NAN : (m < eps ? eps : m); /* a NaN row keeps a NaN scale */      \
            W s = ((W)1 / m) * qp;                                                         \
            inv[r] = s;                                                                    \
            if (nan || m == (W)INFINITY) { /* NaN products: code 0, as PyTorch casts them */ \
                for (int64_t j = 0; j < k; j++) {                                          \
                    W t = LOAD(xr[j]) * s;                                                 \
                    cr[j] = t != t ? 0 : (int8_t)(int32_t)nearbyint(t);                    \
                }                                                                          \
            } else {                                                                       \
                _Pragma("omp simd")                                                        \
                for (int64_t j = 0; j < k; j++)                                            \
                    cr[j] = (int8_t)(int32_t)nearbyint(LOAD(xr[j]) * s);                   \
            }                                                                              \
            if (xq) { /* x_q = OUT_T(code / s) while the row is in cache (see rebuild_*) */ \
                OUT_T *qr = xq + r * k;                                                    \
                _Pragma("omp simd")                                                        \
                for (int64_t j = 0; j < k; j++) qr[j] = STORE((W)cr[j] / s);               \
            }                                                                              \
        }                                                                                  \
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

/* rebuild_*: the quantized activations from their codes (the forward's matmul operand, and
 * the backward's for the weight gradient),
 *   x_q = dt(code / s[row])      s in float32 (float64 for float64), the quotient in it,
 * as PyTorch's `codes_int8.div(s).to(dt)` rounds it: once, at the end (no scale rounded to
 * a low precision first: a bf16 or float16 s would overflow for small activations). */
#define REBUILD(NAME, W, OUT_T, STORE)                                                     \
    void NAME(const int8_t *codes, int64_t rows, int64_t k, const W *s, OUT_T *out,       \
              int threads) {                                                               \
        int nt = rows * k >= PARALLEL_MIN ? threads : 1;                                   \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                       \
        for (int64_t r = 0; r < rows; r++) {                                               \
            W sr = s[r];                                                                   \
            _Pragma("omp simd")                                                            \
            for (int64_t j = 0; j < k; j++) out[r * k + j] = STORE((W)codes[r * k + j] / sr); \
        }                                                                                  \
    }

REBUILD(rebuild_f32, float, float, STORE_F32)
REBUILD(rebuild_bf16, float, uint16_t, STORE_BF16)
REBUILD(rebuild_f16, float, _Float16, STORE_F16)
REBUILD(rebuild_f64, double, double, STORE_F64)

/* act_quant_<input dtype>_<x_q dtype>: x_q is written only where a pointer is given. */
#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)
#define LOAD_F16(v) ((float)(v))
#define ACT_QUANT_TO(IN, T, LOAD)                                                          \
    ACT_QUANT(act_quant_##IN##_f32, T, float, LOAD, float, STORE_F32)                      \
    ACT_QUANT(act_quant_##IN##_bf16, T, float, LOAD, uint16_t, STORE_BF16)                 \
    ACT_QUANT(act_quant_##IN##_f16, T, float, LOAD, _Float16, STORE_F16)
ACT_QUANT_TO(f32, float, LOAD_F32)
ACT_QUANT_TO(bf16, uint16_t, LOAD_BF16)
ACT_QUANT_TO(f16, _Float16, LOAD_F16)
ACT_QUANT(act_quant_f64_f64, double, double, LOAD_F32, double, STORE_F64)
