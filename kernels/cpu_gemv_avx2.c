/* AVX2 + FMA primitives of the CPU GEMV: included by cpu_gemv.c when it is built with -mavx2
 * -mfma (every x86-64 CPU since Haswell / Zen 1). Never compiled on its own.
 *
 * An accumulator is 16 float32 lanes in two registers, as in the AVX-512 build: lane k sums the
 * elements i = k mod 16 (float32) or the pairs i = 2k, 2k+1 mod 32 (bfloat16) in the same order,
 * and reduce_lanes uses the same tree, so float32 results equal the AVX-512 build's bit for bit
 * (bfloat16 too, but where vdpbf16ps flushes a subnormal). Two independent FMA chains per output
 * let one row of weights stream at full speed: the loop reads W in address order, the pattern
 * hardware prefetchers follow best. A step reads one 64-byte line of a weight row.
 *
 * AVX2 has no bfloat16 arithmetic: a bfloat16 is the high half of a float32, so a 32-bit lane
 * holding the pair (w[2j], w[2j+1]) gives w[2j+1] by masking its low half and w[2j] by a shift of
 * 16 bits. x is converted once per call when packed: [odd | even] float32 halves per 16 elements.
 */
#include <immintrin.h>

#define ACC_FLOATS 16 /* lanes of an accumulator */
#define MAX_ACC 4     /* accumulators in one block: 8 of the 16 registers */
#define MAX_MB 4

/* Tuned on a 2-core Zen 4 (32 KiB L1d, 1 MiB L2 per core); see bench/cpu_gemv.py. L1d is 32-48
 * KiB on AVX2 CPUs (Haswell to Alder Lake P-cores, Zen 1-4). */
#define X_L1_BYTES (20 << 10) /* x must fit here, with the weights' lines, or `in` is chunked */
#define PANEL_ROWS 16         /* rows sharing one chunk of x when chunked */
#define PF_BYTES 8192         /* prefetch lead over the weight stream */
#define PF_MIN_M 3            /* fewer rows of x: the hardware prefetchers do better alone */

typedef struct {
    __m256 lo, hi; /* lanes 0-7, 8-15 */
} vacc;

static inline vacc acc_zero(void) { return (vacc){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vacc acc_load(const float *p) {
    return (vacc){_mm256_load_ps(p), _mm256_load_ps(p + 8)};
}
static inline void acc_store(float *p, vacc v) {
    _mm256_store_ps(p, v.lo);
    _mm256_store_ps(p + 8, v.hi);
}

/* out[a] = the sum of v[a]'s 16 lanes, by the AVX-512 build's tree: add the halves at 256, 128,
 * 64 and 32 bits. */
static inline __attribute__((always_inline)) void reduce_lanes(const vacc v[4], float out[4]) {
    __m256 t[4], u[2];
    for (int a = 0; a < 4; a++) t[a] = _mm256_add_ps(v[a].lo, v[a].hi); /* k + (k+8) */
    for (int p = 0; p < 2; p++) /* k + (k+4): [t[2p] lanes 0-3 | t[2p+1] lanes 0-3] */
        u[p] = _mm256_add_ps(_mm256_permute2f128_ps(t[2 * p], t[2 * p + 1], 0x20),
                             _mm256_permute2f128_ps(t[2 * p], t[2 * p + 1], 0x31));
    /* k + (k+2): [t0 0-1, t2 0-1 | t1 0-1, t3 0-1] */
    __m256 c =
        _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], 0x44), _mm256_shuffle_ps(u[0], u[1], 0xEE));
    /* k + (k+1): [t0, t2, t0, t2 | t1, t3, t1, t3] */
    __m256 d = _mm256_add_ps(_mm256_shuffle_ps(c, c, 0x88), _mm256_shuffle_ps(c, c, 0xDD));
    float s[8];
    _mm256_storeu_ps(s, d);
    out[0] = s[0], out[1] = s[4], out[2] = s[1], out[3] = s[5];
}

static inline __m256i first_lanes(int n) { /* lanes < n all ones (n may be <= 0 or >= 8) */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* --- float32: 16 elements per step. ------------------------------------------------------- */
#define VEC_f32 16
#define XBYTES_f32 64 /* packed x bytes per row per step */
typedef vacc wvec_f32;
typedef vacc xvec_f32;
/* One row per block uses each x vector once: let its loads fold into the FMAs. */
#define KEEP_X_f32(v) ((void)0)

static inline wvec_f32 load_w_f32(const char *p) {
    const float *f = (const float *)p;
    return (vacc){_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
}
static inline wvec_f32 tail_w_f32(const char *p, int n) {
    const float *f = (const float *)p;
    return (vacc){_mm256_maskload_ps(f, first_lanes(n)),
                  _mm256_maskload_ps(f + 8, first_lanes(n - 8))};
}
static inline xvec_f32 load_x_f32(const char *p) { return acc_load((const float *)p); }
static inline vacc step_f32(vacc acc, wvec_f32 w, xvec_f32 x) {
    return (vacc){_mm256_fmadd_ps(w.lo, x.lo, acc.lo), _mm256_fmadd_ps(w.hi, x.hi, acc.hi)};
}
static inline void pack_x_f32(char *dst, const char *src, int n) {
    acc_store((float *)dst, n == VEC_f32 ? load_w_f32(src) : tail_w_f32(src, n));
}

/* --- bfloat16: 32 elements per step, in pairs. -------------------------------------------- */
#define VEC_bf16 32
#define XBYTES_bf16 128 /* as float32: odd and even halves of elements 0-15, then of 16-31 */
typedef struct {
    __m256i lo, hi; /* elements 0-15, 16-31 */
} wvec_bf16;
typedef struct {
    __m256 odd_lo, even_lo, odd_hi, even_hi;
} xvec_bf16;
#define KEEP_X_bf16(v) ((void)0) /* as for float32 */

static inline __m256 odd_bf16(__m256i pairs) {
    return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline __m256 even_bf16(__m256i pairs) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
}
static inline wvec_bf16 load_w_bf16(const char *p) {
    const __m256i *v = (const __m256i *)p;
    return (wvec_bf16){_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
static inline wvec_bf16 tail_w_bf16(const char *p, int n) {
    uint16_t buf[VEC_bf16] = {0}; /* no 16-bit masked load in AVX2; once per row per chunk */
    memcpy(buf, p, (size_t)n * 2);
    return load_w_bf16((const char *)buf);
}
static inline xvec_bf16 load_x_bf16(const char *p) {
    const float *f = (const float *)p;
    return (xvec_bf16){_mm256_load_ps(f), _mm256_load_ps(f + 8), _mm256_load_ps(f + 16),
                       _mm256_load_ps(f + 24)};
}

/* acc[j] += w[2j+1] * x[2j+1], then += w[2j] * x[2j] (bfloat16 products are exact in float32),
 * as vdpbf16ps does. */
static inline vacc step_bf16(vacc acc, wvec_bf16 w, xvec_bf16 x) {
    acc.lo = _mm256_fmadd_ps(odd_bf16(w.lo), x.odd_lo, acc.lo);
    acc.hi = _mm256_fmadd_ps(odd_bf16(w.hi), x.odd_hi, acc.hi);
    acc.lo = _mm256_fmadd_ps(even_bf16(w.lo), x.even_lo, acc.lo);
    acc.hi = _mm256_fmadd_ps(even_bf16(w.hi), x.even_hi, acc.hi);
    return acc;
}
static inline void pack_x_bf16(char *dst, const char *src, int n) {
    wvec_bf16 w = n == VEC_bf16 ? load_w_bf16(src) : tail_w_bf16(src, n);
    float *f = (float *)dst;
    _mm256_store_ps(f, odd_bf16(w.lo));
    _mm256_store_ps(f + 8, even_bf16(w.lo));
    _mm256_store_ps(f + 16, odd_bf16(w.hi));
    _mm256_store_ps(f + 24, even_bf16(w.hi));
}

/* log2 of the rows per block: one row, so each block streams W in address order (the pattern
 * hardware prefetchers follow best); its two chains per output hide the FMA latency already, and
 * 16 registers hold no more than MB = 4 accumulators beside a row's weights and x. */
static int rows_log2_f32(int M) {
    (void)M;
    return 0;
}
#define rows_log2_bf16 rows_log2_f32

/* Every (R, MB) that rows_log2 can ask for. */
#define FOR_EACH_BLOCK(X, D) X(D, 1, 1) X(D, 1, 2) X(D, 1, 3) X(D, 1, 4)
