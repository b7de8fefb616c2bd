/* CPU GEMV for decode: y[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]) for M <= 16 rows of x.
 *
 * W is the nn.Linear layout, row-major [out, in]; x is [M, in] and y is [M, out], both row-major
 * and contiguous. Two variants: float32 everywhere, and bfloat16 (stored as uint16) weights,
 * activations, bias and output with float32 accumulation and round-to-nearest-even on the store.
 *
 * One source, one build per instruction set, chosen by the compiler flags alone (cpu_gemv.py
 * passes explicit -m flags, never -march=native, and loads a build the CPU supports);
 * `ruyiflow_gemv_path()` names the build:
 *   avx512  cpu_gemv_avx512.c: 16-lane accumulators in one register;
 *   avx2    cpu_gemv_avx2.c (AVX2 + FMA): 16-lane accumulators in two registers;
 *   plain   any CPU: 8 lanes in plain C, for the compiler to vectorise.
 *
 * Decode reads each weight once per token, so the SIMD builds are a memory stream: OpenMP threads
 * take contiguous blocks of output rows (each thread streams its own region of W), a block of R
 * rows is in flight (one when it can be: W then streams in address order), every loaded weight
 * vector is used by all the rows of x in the block, and a software prefetch runs ahead where the
 * hardware prefetchers fall behind. x is first packed as [in / VEC][M][VEC] so one pointer walks
 * all its rows, and it must stay in L1 across blocks: when it does not fit, `in` is cut into
 * chunks and the rows into panels, and a panel's partial sums go to a small buffer after each
 * chunk and come back for the next.
 *
 * Determinism, on every build: y[m, o] has one accumulator running over i in order -- chunking
 * stores and reloads it exactly -- then one fixed tree across its lanes, then + bias. Its
 * rounding therefore depends only on (o, in) and the values: never on M, on which rows share a
 * block, on the chunking, on the thread count or on the tensors' addresses, so a row computed
 * alone equals the same row computed in a batch, bit for bit. The avx2 and avx512 builds sum in
 * the same order, so they agree bit for bit too (but where vdpbf16ps, on CPUs with AVX512_BF16,
 * flushes a bfloat16 subnormal to zero); plain (8 lanes, no FMA) rounds differently.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_M 16
/* Below this many weight elements one thread streams the matrix faster than a fork/join. */
#define MIN_PARALLEL_ELEMS (1 << 16)

/* One call's arguments, shared by all threads (read-only once set). */
struct gemv {
    const void *x, *w, *bias;
    void *y;
    int M, in, out;
    int elem;  /* bytes per element: 4 or 2 */
    int chunk; /* elements of `in` per pass: `in` itself when x fits in L1 */
    char *xp;  /* packed x: [ceil(in / VEC)][M][XBYTES], zero-padded */
};

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Keep a loaded x vector in a register: otherwise gcc folds its load into each of the R
 * multiplies, and loads, not multiplies, bound the loop. */
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PATH "avx512"
#include "cpu_gemv_avx512.c"
#elif defined(__AVX2__) && defined(__FMA__)
#define PATH "avx2"
#include "cpu_gemv_avx2.c"
#else
#define PATH "plain"
#include "cpu_gemv_plain.c"
#endif

#ifdef ACC_FLOATS
/* ---------------------------------------------------------------------------------------------
 * SIMD builds. The included file defines, per dtype D (f32, bf16): VEC_D elements of `in` per
 * step, XBYTES_D bytes of packed x per row per step, wvec_D / xvec_D and their loads, step_D
 * (acc += w * x), pack_x_D, rows_log2_D; and the accumulator type vacc, reduce_lanes,
 * FOR_EACH_BLOCK and the tuning constants. A block computes R consecutive output rows for MB
 * consecutive rows of x: R * MB accumulators in registers, R weight vectors loaded per step,
 * each used MB times. Each (R, MB) is its own function, so the register arrays are fixed.
 * ------------------------------------------------------------------------------------------- */

/* One thread's pass over a chunk of a panel of rows. */
struct pass {
    const struct gemv *g;
    int p0;         /* first row of the panel */
    int k0, k1;     /* the chunk: x[:, k0:k1], W[:, k0:k1]; k0 a multiple of VEC */
    float *partial; /* [panel rows][M][ACC_FLOATS] running sums between chunks */
    uintptr_t pf;   /* next weight line to prefetch (may run past W: prefetches never fault) */
};

typedef void (*block_fn)(struct pass *, int, int);

#define ELEM_f32 4 /* bytes per element */
#define ELEM_bf16 2

/* y[m0 + m, o + r] = sum of acc[m][r] (+ bias[o + r]), for E-byte elements. */
static inline __attribute__((always_inline)) void finish(const struct gemv *g, vacc v[MAX_ACC],
                                                         int o, int m0, int R, int MB, int E) {
    float s[MAX_ACC];
    for (int a = R * MB; a < MAX_ACC; a++) v[a] = acc_zero();
    reduce_lanes(v, s);
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            float t = s[m * R + r];
            int64_t at = (int64_t)(m0 + m) * g->out + o + r;
            if (E == 4) {
                if (g->bias) t += ((const float *)g->bias)[o + r];
                ((float *)g->y)[at] = t;
            } else {
                if (g->bias) t += bf16_to_f32(((const uint16_t *)g->bias)[o + r]);
                ((uint16_t *)g->y)[at] = f32_to_bf16(t);
            }
        }
}

/* Software prefetch of a block's loop. Into L2, not L1: a prefetch into L1 holds one of L1's few
 * miss buffers until its line arrives, and the demand loads queue behind them (on Zen 4 that
 * halved the rate at M >= 3). */
#define PF_NONE 0   /* the hardware prefetchers follow one fast stream alone (M <= 2) */
#define PF_STREAM 1 /* R lines PF_BYTES ahead of the weight stream, read in address order */
#define PF_PANEL 2  /* chunked: R lines a panel ahead, and this chunk's next block into L1 */

/* One step at vector column j: R weight vectors (one 64-byte line each), each multiplied by MB
 * x vectors of the packed x. */
#define BLOCK_STEP(D, R, MB, MODE, LOAD_W)                                                        \
    do {                                                                                          \
        wvec_##D wv[R];                                                                           \
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                                    \
            if (MODE != PF_NONE)                                                                  \
                _mm_prefetch((const char *)(pf + ((uintptr_t)j * R + r) * 64), _MM_HINT_T1);      \
            if (MODE == PF_PANEL)                                                                 \
                _mm_prefetch((const char *)wb + (r + R) * row + j * 64, _MM_HINT_T0);             \
            wv[r] = LOAD_W;                                                                       \
        }                                                                                         \
        _Pragma("GCC unroll 16") for (int m = 0; m < MB; m++) {                                   \
            xvec_##D xv = load_x_##D(xb + (int64_t)j * xstep + m * XBYTES_##D);                   \
            KEEP_X_##D(xv);                                                                       \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                                  \
                acc[m][r] = step_##D(acc[m][r], wv[r], xv);                                       \
        }                                                                                         \
    } while (0)

#define BLOCK_LOOP(D, R, MB, MODE)                                                                \
    for (int j = 0; j < steps; j++)                                                               \
    BLOCK_STEP(D, R, MB, MODE, load_w_##D(wb + r * row + (int64_t)j * 64))

#define PARTIAL(p, o, m0, r, m) \
    ((p)->partial + ((int64_t)((o) - (p)->p0 + (r)) * (p)->g->M + (m0) + (m)) * ACC_FLOATS)

/* Rows o..o+R-1 for x rows m0..m0+MB-1 over the pass's chunk of `in`. The first x block
 * (m0 == 0) reads the weights from memory and prefetches as many lines as it reads, advancing
 * the pass's prefetch pointer; later x blocks re-read them from L1. Partial sums of a chunked
 * pass go to p->partial. */
#define DEF_BLOCK(D, R, MB)                                                                       \
    static void D##_block_##R##_##MB(struct pass *p, int o, int m0) {                            \
        const struct gemv *g = p->g;                                                              \
        const int in = g->in, E = ELEM_##D;                                                       \
        const int64_t row = (int64_t)in * E, xstep = (int64_t)g->M * XBYTES_##D;                  \
        const char *wb = (const char *)g->w + (int64_t)o * row + (int64_t)p->k0 * E;              \
        const char *xb = g->xp + (int64_t)(p->k0 / VEC_##D) * xstep + m0 * XBYTES_##D;            \
        const uintptr_t pf = p->pf;                                                               \
        const int n = p->k1 - p->k0, steps = n / VEC_##D;                                         \
        vacc acc[MB][R];                                                                          \
        _Pragma("GCC unroll 16") for (int m = 0; m < MB; m++)                                     \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) acc[m][r] =                      \
                p->k0 == 0 ? acc_zero() : acc_load(PARTIAL(p, o, m0, r, m));                      \
        if (m0 > 0 || (g->chunk == in && g->M < PF_MIN_M)) {                                      \
            BLOCK_LOOP(D, R, MB, PF_NONE);                                                        \
        } else {                                                                                  \
            if (g->chunk == in)                                                                   \
                BLOCK_LOOP(D, R, MB, PF_STREAM);                                                  \
            else                                                                                  \
                BLOCK_LOOP(D, R, MB, PF_PANEL);                                                   \
            p->pf = pf + (uintptr_t)R * n * E;                                                    \
        }                                                                                         \
        if (steps * VEC_##D < n) {                                                                \
            const int j = steps;                                                                  \
            BLOCK_STEP(D, R, MB, PF_NONE,                                                         \
                       tail_w_##D(wb + r * row + (int64_t)j * 64, n - j * VEC_##D));              \
        }                                                                                         \
        if (p->k1 < in) {                                                                         \
            _Pragma("GCC unroll 16") for (int m = 0; m < MB; m++)                                 \
                _Pragma("GCC unroll 16") for (int r = 0; r < R; r++)                              \
                    acc_store(PARTIAL(p, o, m0, r, m), acc[m][r]);                                \
            return;                                                                               \
        }                                                                                         \
        vacc v[MAX_ACC];                                                                          \
        _Pragma("GCC unroll 16") for (int m = 0; m < MB; m++)                                     \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) v[m * R + r] = acc[m][r];        \
        finish(g, v, o, m0, R, MB, E);                                                            \
    }

/* Indexed [log2 R][MB - 1]; blocks FOR_EACH_BLOCK does not list stay NULL. */
#define LOG2(R) ((R) == 1 ? 0 : (R) == 2 ? 1 : (R) == 4 ? 2 : 3)
#define TABLE_ENTRY(D, R, MB) [LOG2(R)][(MB) - 1] = D##_block_##R##_##MB,

FOR_EACH_BLOCK(DEF_BLOCK, f32)
FOR_EACH_BLOCK(DEF_BLOCK, bf16)
static const block_fn F32_BLOCKS[4][MAX_MB] = {FOR_EACH_BLOCK(TABLE_ENTRY, f32)};
static const block_fn BF16_BLOCKS[4][MAX_MB] = {FOR_EACH_BLOCK(TABLE_ENTRY, bf16)};

/* Pack one row of x: its steps j at dst + j * stride, the last one zero-padded. */
#define DEF_PACK(D)                                                                               \
    static void pack_row_##D(char *dst, const char *src, int in, int64_t stride) {               \
        int j = 0;                                                                                \
        for (; (j + 1) * VEC_##D <= in; j++)                                                      \
            pack_x_##D(dst + j * stride, src + (int64_t)j * 64, VEC_##D);                    \
        if (j * VEC_##D < in)                                                                     \
            pack_x_##D(dst + j * stride, src + (int64_t)j * 64, in - j * VEC_##D);           \
    }
DEF_PACK(f32)
DEF_PACK(bf16)

/* What differs between the dtypes, for the code below. */
struct kind {
    int vec, xbytes; /* VEC_D, XBYTES_D */
    void (*pack_row)(char *, const char *, int, int64_t);
    int (*rows_log2)(int);
    const block_fn (*blocks)[MAX_MB];
};
static const struct kind F32 = {VEC_f32, XBYTES_f32, pack_row_f32, rows_log2_f32, F32_BLOCKS};
static const struct kind BF16 = {VEC_bf16, XBYTES_bf16, pack_row_bf16, rows_log2_bf16,
                                 BF16_BLOCKS};

/* Elements of `in` per pass: all of it when packed x fits in X_L1_BYTES, else a multiple of 32
 * (of every VEC). */
static int chunk_len(int M, int in, int packed_elem_bytes) {
    int64_t fit = X_L1_BYTES / ((int64_t)M * packed_elem_bytes);
    if (in <= fit) return in;
    fit &= ~(int64_t)31;
    return fit < 64 ? 64 : (int)fit;
}

/* The calling thread's packed-x buffer, grown on demand and kept for the thread's life (at most
 * 16 * in * 4 bytes): decode repeats the same shapes, and a fresh allocation per call would
 * fault in fresh pages. */
static __thread char *xp_buf;
static __thread size_t xp_cap;

static char *xp_reserve(size_t bytes) {
    if (bytes > xp_cap) {
        void *p;
        if (posix_memalign(&p, 64, bytes)) return NULL;
        free(xp_buf);
        xp_buf = p;
        xp_cap = bytes;
    }
    return xp_buf;
}

/* Size the chunks and pack x into the calling thread's buffer. (Packing before the fork keeps
 * one synchronisation per call: the copy is M * in elements, small beside the out * in of the
 * weights.) */
static int prepare(struct gemv *g) {
    const struct kind *k = g->elem == 4 ? &F32 : &BF16;
    int num_vec = (g->in + k->vec - 1) / k->vec;
    int64_t stride = (int64_t)g->M * k->xbytes;
    g->chunk = chunk_len(g->M, g->in, k->xbytes / k->vec);
    if (!(g->xp = xp_reserve((size_t)num_vec * stride))) return -1;
    for (int m = 0; m < g->M; m++)
        k->pack_row(g->xp + (int64_t)m * k->xbytes,
                    (const char *)g->x + (int64_t)m * g->in * g->elem, g->in, stride);
    return 0;
}

/* Rows [lo, hi) of the output: panels of rows, chunks of `in`, blocks of R rows x MB x rows. */
static void simd_rows(const struct gemv *g, const struct kind *k, int lo, int hi) {
    float partial[PANEL_ROWS * MAX_M * ACC_FLOATS] __attribute__((aligned(64)));
    int lg0 = k->rows_log2(g->M);
    int max_mb = MAX_ACC >> lg0 < MAX_MB ? MAX_ACC >> lg0 : MAX_MB;
    int num_mb = (g->M + max_mb - 1) / max_mb;
    int chunked = g->chunk < g->in;
    int panel = chunked ? PANEL_ROWS : hi - lo;
    int64_t row = (int64_t)g->in * g->elem;
    uintptr_t w = (uintptr_t)g->w + (uintptr_t)(lo * row);
    struct pass p = {g, lo, 0, 0, partial, w + (chunked ? (uintptr_t)(panel * row) : PF_BYTES)};
    for (p.p0 = lo; p.p0 < hi; p.p0 += panel) {
        int p1 = p.p0 + panel < hi ? p.p0 + panel : hi;
        for (p.k0 = 0; p.k0 < g->in; p.k0 = p.k1) {
            p.k1 = p.k0 + g->chunk < g->in ? p.k0 + g->chunk : g->in;
            int lg = lg0;
            for (int o = p.p0; o < p1; o += 1 << lg) {
                while (lg > 0 && o + (1 << lg) > p1) lg--;
                int m0 = 0;
                for (int b = 0; b < num_mb; b++) {
                    int mb = (g->M - m0) / (num_mb - b); /* near-equal blocks, e.g. 9 -> 4 + 5 */
                    k->blocks[lg][mb - 1](&p, o, m0);
                    m0 += mb;
                }
            }
        }
    }
}

static void f32_rows(const struct gemv *g, int lo, int hi) { simd_rows(g, &F32, lo, hi); }
static void bf16_rows(const struct gemv *g, int lo, int hi) { simd_rows(g, &BF16, lo, hi); }

#endif /* ACC_FLOATS */

/* ---------------------------------------------------------------------------------------------
 * Threads and entry points.
 * ------------------------------------------------------------------------------------------- */

/* Threads used for a matrix: one for small ones (a fork/join costs more than it saves). */
static int thread_count(int in, int out, int num_threads) {
    if (num_threads < 1 || (int64_t)in * out < MIN_PARALLEL_ELEMS) return 1;
    return num_threads < out ? num_threads : out;
}

/* Thread t's contiguous output rows: equal shares rounded up to 16 rows (whole cache lines of
 * y for float32 and whole row blocks), the last thread taking the remainder. */
static void thread_rows(int out, int nt, int t, int *lo, int *hi) {
    int64_t share = ((int64_t)out + nt - 1) / nt;
    share = (share + 15) & ~(int64_t)15;
    int64_t a = share * t, b = a + share;
    *lo = (int)(a < out ? a : out);
    *hi = (int)(b < out ? b : out);
}

static int run(struct gemv *g, void (*rows)(const struct gemv *, int, int), int num_threads) {
    if (g->M < 1 || g->M > MAX_M || g->in < 1 || g->out < 1 || prepare(g)) return -1;
    int nt = thread_count(g->in, g->out, num_threads);
    if (nt == 1) {
        rows(g, 0, g->out);
        return 0;
    }
#pragma omp parallel num_threads(nt)
    {
        int lo, hi, t = 0, n = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        thread_rows(g->out, n, t, &lo, &hi);
        if (lo < hi) rows(g, lo, hi);
    }
    return 0;
}

/* Return 0 on success, -1 on arguments outside the contract (nothing written). */
int ruyiflow_gemv_f32(const float *x, const float *w, const float *bias, float *y, int M, int in,
                      int out, int num_threads) {
    struct gemv g = {x, w, bias, y, M, in, out, sizeof(float), in, NULL};
    return run(&g, f32_rows, num_threads);
}

int ruyiflow_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                       int M, int in, int out, int num_threads) {
    struct gemv g = {x, w, bias, y, M, in, out, sizeof(uint16_t), in, NULL};
    return run(&g, bf16_rows, num_threads);
}

/* The instruction set this build was compiled for: "avx512", "avx2" or "plain". */
const char *ruyiflow_gemv_path(void) { return PATH; }

/* Paged decode attention, in the same library and build (see that file). */
#include "cpu_paged_attention.c"
