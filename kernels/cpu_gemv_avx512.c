/* AVX-512 primitives of the CPU GEMV: included by cpu_gemv.c when it is built with -mavx512f
 * -mavx512bw -mavx512vl (BW for 16-bit masks, VL for 256-bit masked loads: every AVX-512 CPU
 * since Skylake-SP), and -mavx512bf16 where the CPU has it. Never compiled on its own.
 *
 * An accumulator is 16 float32 lanes; a step reads one 64-byte weight vector (16 float32 or 32
 * bfloat16) per row and one 64-byte vector of packed x per row of x, which is x as it is.
 */
#include <immintrin.h>

#define ACC_FLOATS 16 /* lanes of an accumulator */
#define MAX_ACC 16    /* accumulators in one block: half the 32 vector registers */
#define MAX_MB 8

/* Tuned on a 2-core Zen 4 (32 KiB L1d, 1 MiB L2 per core); see bench/cpu_gemv.py. */
#define X_L1_BYTES (24 << 10) /* x must fit here, with the weights' lines, or `in` is chunked */
#define PANEL_ROWS 16         /* rows sharing one chunk of x when chunked */
#define PF_BYTES 8192         /* prefetch lead over the weight stream */
#define PF_MIN_M 3            /* fewer rows of x: the hardware prefetchers do better alone */

typedef __m512 vacc;

static inline vacc acc_zero(void) { return _mm512_setzero_ps(); }
static inline vacc acc_load(const float *p) { return _mm512_load_ps(p); }
static inline void acc_store(float *p, vacc v) { _mm512_store_ps(p, v); }

/* out[a] = the sum of v[a]'s lanes, by the same tree for every a (add the halves at 256, 128, 64
 * and 32 bits), so the rounding of one accumulator's sum does not depend on its neighbours. */
static inline __attribute__((always_inline)) void reduce_lanes(const vacc v[16], float out[16]) {
    __m512 a[8], b[4], c[2];
    for (int p = 0; p < 8; p++)
        a[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE));
    for (int p = 0; p < 4; p++)
        b[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xDD));
    for (int p = 0; p < 2; p++)
        c[p] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * p], b[2 * p + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * p], b[2 * p + 1], 0xEE));
    __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88),
                             _mm512_shuffle_ps(c[0], c[1], 0xDD));
    /* d's lane k holds the sum of v[{0,4,8,12,1,5,9,13,2,6,10,14,3,7,11,15}[k]]: reorder. */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, d));
}

/* --- float32: 16 elements per step. ------------------------------------------------------- */
#define VEC_f32 16
#define XBYTES_f32 64 /* packed x bytes per row per step */
typedef __m512 wvec_f32;
typedef __m512 xvec_f32;
#define KEEP_X_f32(v) KEEP_IN_REGISTER(v)

static inline wvec_f32 load_w_f32(const char *p) { return _mm512_loadu_ps(p); }
static inline wvec_f32 tail_w_f32(const char *p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
}
static inline xvec_f32 load_x_f32(const char *p) { return _mm512_load_ps(p); }
static inline vacc step_f32(vacc acc, wvec_f32 w, xvec_f32 x) { return _mm512_fmadd_ps(w, x, acc); }
static inline void pack_x_f32(char *dst, const char *src, int n) {
    _mm512_store_ps(dst, n == VEC_f32 ? load_w_f32(src) : tail_w_f32(src, n));
}

/* --- bfloat16: 32 elements per step, in pairs. -------------------------------------------- */
#define VEC_bf16 32
#define XBYTES_bf16 64
typedef __m512i wvec_bf16;
typedef __m512i xvec_bf16;
#define KEEP_X_bf16(v) KEEP_IN_REGISTER(v)

static inline wvec_bf16 load_w_bf16(const char *p) { return _mm512_loadu_si512(p); }
static inline wvec_bf16 tail_w_bf16(const char *p, int n) {
    return _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1ull), p);
}
static inline xvec_bf16 load_x_bf16(const char *p) { return _mm512_load_si512(p); }

/* acc[j] += w[2j+1] * x[2j+1], then += w[2j] * x[2j] (bfloat16 products are exact in float32).
 * vdpbf16ps flushes bf16 subnormals to zero, which no trained weight or activation notices. */
static inline vacc step_bf16(vacc acc, wvec_bf16 w, xvec_bf16 x) {
#ifdef __AVX512BF16__
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
#else
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w, hi)),
                          _mm512_castsi512_ps(_mm512_and_si512(x, hi)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
                           _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), acc);
#endif
}
static inline void pack_x_bf16(char *dst, const char *src, int n) {
    _mm512_store_si512(dst, n == VEC_bf16 ? load_w_bf16(src) : tail_w_bf16(src, n));
}

/* log2 of the rows per block. M <= 2: one row, so each block streams W in address order (the
 * pattern hardware prefetchers follow best; measured 1.4x the rate of 8 rows at M = 1). More rows
 * of x: two rows per block, each weight vector used by up to 8 rows of x, and enough independent
 * accumulator chains (R * MB >= 6) to hide the FMA latency, at most MAX_ACC of them. */
static int rows_log2_f32(int M) { return M <= 2 ? 0 : 1; }
#define rows_log2_bf16 rows_log2_f32

/* Every (R, MB) that rows_log2 and its tails can ask for: R * MB <= 16, MB <= MAX_MB. */
#define FOR_EACH_BLOCK(X, D)                                                                   \
    X(D, 1, 1) X(D, 1, 2) X(D, 1, 3) X(D, 1, 4) X(D, 1, 5) X(D, 1, 6) X(D, 1, 7) X(D, 1, 8)    \
    X(D, 2, 1) X(D, 2, 2) X(D, 2, 3) X(D, 2, 4) X(D, 2, 5) X(D, 2, 6) X(D, 2, 7) X(D, 2, 8)
