/* Paged decode attention on the CPU (GQA): the C twin of kernels/paged_attention.py's Triton
 * kernel, for every decode row of a step in one call per layer. Included by cpu_gemv.c (one
 * library, built per instruction set by the same flags); never compiled on its own.
 *
 *     out[b, h] = softmax(scale * q[b, h] . K_b[kvh(h)]^T) V_b[kvh(h)]   over positions 0..len_b-1
 *
 * K/V pages are [num_pages, KVH, PAGE, D] (strided views of the pool, unit stride along D);
 * sequence b's page of position p is table[rows[b] * table_stride + p / PAGE]. When k_new/v_new
 * are given, each sequence's new K/V row [KVH, D] is first stored at its position len_b - 1.
 *
 * Work is one (sequence, KV head) at a time: scores of each query head of the group go to a
 * per-thread buffer, then one max and one sum of exp per head, then each V row is loaded once and
 * added into GROUP float32 accumulators (vectorised along D). Head dims are short (64-128), so a
 * score's dot product is a few vector steps and summing its lanes would cost as much again: the
 * SIMD builds take the GEMV's primitives (cpu_gemv_avx512.c / _avx2.c) and compute MAX_ACC
 * positions at once, one accumulator each, their lanes summed together by the GEMV's
 * reduce_lanes tree. The plain build sums ATT_LANES lanes per score by a fixed tree.
 *
 * exp is a polynomial over a range reduction (att_exp, within 2 ulp of expf), so gcc vectorises
 * the softmax. Every score, sum and output element has one order of operations that depends on
 * (D, length) only: a sequence decoded alone equals the same sequence in a batch, bit for bit,
 * whatever the thread count or the addresses. The avx2 and avx512 builds sum in the same order and
 * agree bit for bit (as the GEMV does); plain (no FMA) rounds differently in the last bits.
 */
#include <math.h>

#define ATT_LANES 16

struct attn {
    const void *q, *k_new, *v_new;
    void *k, *v;
    const int32_t *table, *rows, *lengths;
    void *out;
    int64_t q_sb, q_sh, kn_sb, kn_sh, vn_sb, vn_sh; /* strides of q, k_new, v_new (elements) */
    int64_t sp, sh, st;                             /* strides of a page, a head, a position */
    int64_t table_stride;
    int B, H, KVH, D, PAGE, table_rows, table_width, num_pages;
    float scale;
};

static inline __attribute__((always_inline)) float att_load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void att_store(void *p, int64_t i, float x,
                                                            int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(x);
    else
        ((float *)p)[i] = x;
}

/* ((0+1) + (2+3)) + ((4+5) + (6+7)) ... over 16 lanes */
static inline float att_sum_lanes(const float s[ATT_LANES]) {
    float a[8];
    for (int i = 0; i < 8; i++) a[i] = s[i] + s[i + 8];
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* q (float32, D) . k row (D elements of the page dtype) in lanes. */
static inline __attribute__((always_inline)) float att_dot(const float *q, const void *k,
                                                           int D, int bf16) {
    float s[ATT_LANES] = {0};
    int i = 0;
    for (; i + ATT_LANES <= D; i += ATT_LANES)
        for (int l = 0; l < ATT_LANES; l++) s[l] += q[i + l] * att_load(k, i + l, bf16);
    for (int l = 0; i + l < D; l++) s[l] += q[i + l] * att_load(k, i + l, bf16);
    return att_sum_lanes(s);
}

/* Per-thread scratch, 64-byte aligned: GROUP packed query rows, GROUP accumulators (float32
 * [GROUP, D]) and GROUP rows of scores (float32 [GROUP, len]). Grown (contents not kept), never
 * shrunk; NULL when out of memory. */
static float *att_scratch(size_t floats) {
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (floats > cap) {
        void *grown = NULL;
        if (posix_memalign(&grown, 64, floats * sizeof(float))) return NULL;
        free(buf);
        buf = grown;
        cap = floats;
    }
    return buf;
}

/* e^x for x <= 0 (a softmax argument): x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor
 * polynomial (relative error < 2e-7 there), times 2^n built in the exponent bits. Below -87 the
 * result is flushed to 0 (e^-87 is 1.6e-38, at the edge of the normal floats). Plain arithmetic
 * and bit operations only, so gcc vectorises the loops that call it. */
static inline float att_exp(float x) {
    if (x < -87.0f) x = -87.0f;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693145751953125f; /* ln2 in two parts: this one exact in n * it */
    r = r - n * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x <= -87.0f ? 0.0f : p * scale;
}

/* max and sum of s[0..n) in ATT_LANES lanes (lane l takes p = l mod ATT_LANES, in order), then
 * one fixed tree: vectorised, and one order for a given n. */
static inline float att_max(const float *s, int n) {
    float m[ATT_LANES];
    for (int l = 0; l < ATT_LANES; l++) m[l] = s[0];
    int p = 0;
    for (; p + ATT_LANES <= n; p += ATT_LANES)
        for (int l = 0; l < ATT_LANES; l++) m[l] = s[p + l] > m[l] ? s[p + l] : m[l];
    for (int l = 0; p + l < n; l++) m[l] = s[p + l] > m[l] ? s[p + l] : m[l];
    float best = m[0];
    for (int l = 1; l < ATT_LANES; l++) best = m[l] > best ? m[l] : best;
    return best;
}

static inline float att_sum(const float *s, int n) {
    float a[ATT_LANES] = {0};
    int p = 0;
    for (; p + ATT_LANES <= n; p += ATT_LANES)
        for (int l = 0; l < ATT_LANES; l++) a[l] += s[p + l];
    for (int l = 0; p + l < n; l++) a[l] += s[p + l];
    return att_sum_lanes(a);
}

#ifdef ACC_FLOATS
/* Scores of MAX_ACC consecutive rows of one K page (the first n real; the others repeat row 0
 * and are dropped) against one packed query: out[t] = q . k[t], each by the GEMV's lane order
 * and reduce_lanes tree, so a score does not depend on its neighbours. */
#define DEF_ATT_TILE(DT, ELEM)                                                                    \
    static inline __attribute__((always_inline)) void att_tile_##DT(                              \
        const char *qp, const char *k, int64_t row_bytes, int n, int D, float *out) {             \
        vacc acc[MAX_ACC];                                                                        \
        const char *rows[MAX_ACC];                                                                \
        for (int t = 0; t < MAX_ACC; t++) {                                                       \
            acc[t] = acc_zero();                                                                  \
            rows[t] = k + (t < n ? t : 0) * row_bytes;                                            \
        }                                                                                         \
        int i = 0, step = 0;                                                                      \
        for (; i + VEC_##DT <= D; i += VEC_##DT, step++) {                                        \
            xvec_##DT x = load_x_##DT(qp + step * XBYTES_##DT);                                   \
            for (int t = 0; t < MAX_ACC; t++)                                                     \
                acc[t] = step_##DT(acc[t], load_w_##DT(rows[t] + i * ELEM), x);                   \
        }                                                                                         \
        if (i < D) {                                                                              \
            xvec_##DT x = load_x_##DT(qp + step * XBYTES_##DT);                                   \
            for (int t = 0; t < MAX_ACC; t++)                                                     \
                acc[t] = step_##DT(acc[t], tail_w_##DT(rows[t] + i * ELEM, D - i), x);            \
        }                                                                                         \
        reduce_lanes(acc, out);                                                                   \
    }
DEF_ATT_TILE(f32, 4)
DEF_ATT_TILE(bf16, 2)

/* Bytes of one packed query row (the GEMV's packed-x layout, whole vectors). */
static inline int64_t att_qbytes(int D, int bf16) {
    return bf16 ? (int64_t)((D + VEC_bf16 - 1) / VEC_bf16) * XBYTES_bf16
                : (int64_t)((D + VEC_f32 - 1) / VEC_f32) * XBYTES_f32;
}
#else
static inline int64_t att_qbytes(int D, int bf16) {
    (void)bf16;
    return (int64_t)D * 4;
}
#endif

static inline int64_t att_page(const struct attn *a, int b, int pos) {
    return a->table[(int64_t)a->rows[b] * a->table_stride + pos / a->PAGE];
}

/* One (sequence, KV head): store its new row, then attend. Returns -1 when out of memory. */
static inline __attribute__((always_inline)) int att_one(const struct attn *a, int b, int kvh,
                                                         int bf16) {
    const int D = a->D, G = a->H / a->KVH, len = a->lengths[b];
    const int64_t head = (int64_t)kvh * a->sh;
    if (a->k_new != NULL) {
        int pos = len - 1;
        int64_t at = att_page(a, b, pos) * a->sp + head + (int64_t)(pos % a->PAGE) * a->st;
        int64_t kn = (int64_t)b * a->kn_sb + (int64_t)kvh * a->kn_sh;
        int64_t vn = (int64_t)b * a->vn_sb + (int64_t)kvh * a->vn_sh;
        int64_t elem = bf16 ? 2 : 4;
        memcpy((char *)a->k + at * elem, (const char *)a->k_new + kn * elem, D * elem);
        memcpy((char *)a->v + at * elem, (const char *)a->v_new + vn * elem, D * elem);
    }
    const int64_t qbytes = att_qbytes(D, bf16), elem = bf16 ? 2 : 4;
    const size_t qfloats = (size_t)G * (size_t)(qbytes / 4), sfloats = (size_t)G * (size_t)len;
    char *qp = (char *)att_scratch(qfloats + (size_t)G * D + sfloats + (size_t)G);
    if (qp == NULL) return -1;
    float *acc = (float *)qp + qfloats, *scores = acc + (size_t)G * D; /* [G, D], [G, len] */
    float *inv = scores + sfloats;                                      /* [G]: 1 / sum per head */
    for (int g = 0; g < G; g++) {
        int64_t qo = (int64_t)b * a->q_sb + (int64_t)(kvh * G + g) * a->q_sh;
        const char *src = (const char *)a->q + qo * elem;
        char *dst = qp + g * qbytes;
#ifdef ACC_FLOATS
        int vec = bf16 ? VEC_bf16 : VEC_f32, xbytes = bf16 ? XBYTES_bf16 : XBYTES_f32;
        for (int i = 0, j = 0; i < D; i += vec, j++) {
            int n = D - i < vec ? D - i : vec;
            if (bf16)
                pack_x_bf16(dst + j * xbytes, src + i * elem, n);
            else
                pack_x_f32(dst + j * xbytes, src + i * elem, n);
        }
#else
        for (int d = 0; d < D; d++) ((float *)dst)[d] = att_load(src, d, bf16);
#endif
    }
    for (int start = 0; start < len; start += a->PAGE) {
        int64_t base = att_page(a, b, start) * a->sp + head;
        int n = len - start < a->PAGE ? len - start : a->PAGE;
        const char *k = (const char *)a->k + base * elem;
#ifdef ACC_FLOATS
        for (int t0 = 0; t0 < n; t0 += MAX_ACC) {
            int m = n - t0 < MAX_ACC ? n - t0 : MAX_ACC;
            const char *rows = k + (int64_t)t0 * a->st * elem;
            for (int g = 0; g < G; g++) {
                float tile[MAX_ACC];
                if (bf16)
                    att_tile_bf16(qp + g * qbytes, rows, a->st * elem, m, D, tile);
                else
                    att_tile_f32(qp + g * qbytes, rows, a->st * elem, m, D, tile);
                float *s = scores + (size_t)g * len + start + t0;
                for (int t = 0; t < m; t++) s[t] = tile[t] * a->scale;
            }
        }
#else
        for (int t = 0; t < n; t++) {
            const char *row = k + (int64_t)t * a->st * elem;
            for (int g = 0; g < G; g++)
                scores[(size_t)g * len + start + t] =
                    att_dot((const float *)qp + g * D, row, D, bf16) * a->scale;
        }
#endif
    }
    for (int g = 0; g < G; g++) { /* scores -> unnormalised probabilities; acc <- 0 */
        float *s = scores + (size_t)g * len, m = att_max(s, len);
        for (int p = 0; p < len; p++) s[p] = att_exp(s[p] - m);
        float sum = att_sum(s, len);
        for (int d = 0; d < D; d++) acc[g * D + d] = 0.0f;
        inv[g] = 1.0f / sum;
    }
    for (int start = 0; start < len; start += a->PAGE) {
        int64_t base = att_page(a, b, start) * a->sp + head;
        int n = len - start < a->PAGE ? len - start : a->PAGE;
        for (int t = 0; t < n; t++) {
            int64_t row = base + (int64_t)t * a->st;
            for (int g = 0; g < G; g++) {
                float p = scores[(size_t)g * len + start + t], *o = acc + g * D;
                for (int d = 0; d < D; d++) o[d] += p * att_load(a->v, row + d, bf16);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        int64_t oo = ((int64_t)b * a->H + kvh * G + g) * D;
        for (int d = 0; d < D; d++) att_store(a->out, oo + d, acc[g * D + d] * inv[g], bf16);
    }
    return 0;
}

/* Every index the call will follow is inside its tensors: nothing is written otherwise. */
static int att_check(const struct attn *a) {
    if (a->B < 0 || a->H < 1 || a->KVH < 1 || a->H % a->KVH || a->D < 1 || a->PAGE < 1)
        return -1;
    for (int b = 0; b < a->B; b++) {
        int len = a->lengths[b], row = a->rows[b];
        if (len < 1 || row < 0 || row >= a->table_rows) return -1;
        if ((int64_t)(len - 1) / a->PAGE >= a->table_width) return -1;
        for (int start = 0; start < len; start += a->PAGE) {
            int64_t page = att_page(a, b, start);
            if (page < 0 || page >= a->num_pages) return -1;
        }
    }
    return 0;
}

static int att_run(const struct attn *a, int bf16, int num_threads) {
    if (att_check(a)) return -1;
    int items = a->B * a->KVH, failed = 0;
    int nt = num_threads < 1 ? 1 : (num_threads < items ? num_threads : items);
    if (nt <= 1) {
        for (int i = 0; i < items && !failed; i++)
            failed = bf16 ? att_one(a, i / a->KVH, i % a->KVH, 1) : att_one(a, i / a->KVH, i % a->KVH, 0);
        return failed ? -2 : 0;
    }
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : failed)
    for (int i = 0; i < items; i++)
        failed |= bf16 ? att_one(a, i / a->KVH, i % a->KVH, 1) : att_one(a, i / a->KVH, i % a->KVH, 0);
    return failed ? -2 : 0;
}

/* Returns 0; -1 for arguments outside the contract (nothing written); -2 out of memory. */
int ruyiflow_paged_attention(int bf16, const void *q, const void *k_new, const void *v_new,
                             void *k, void *v, const int32_t *table, const int32_t *rows,
                             const int32_t *lengths, void *out, const int64_t *strides,
                             const int32_t *dims, float scale, int num_threads) {
    /* strides: q_sb, q_sh, kn_sb, kn_sh, vn_sb, vn_sh, page, head, position, table row;
     * dims: B, H, KVH, D, PAGE, table rows, table width, pages */
    struct attn a = {q, k_new, v_new, k, v, table, rows, lengths, out,
                     strides[0], strides[1], strides[2], strides[3], strides[4], strides[5],
                     strides[6], strides[7], strides[8], strides[9],
                     dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7],
                     scale};
    return att_run(&a, bf16 != 0, num_threads);
}
