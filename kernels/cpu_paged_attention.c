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
 * Work is one (sequence, KV head) at a time: each K row is loaded once for the GROUP query heads
 * that share it, scores go to a per-thread buffer, one max and one sum of exp per head, then each
 * V row is loaded once and added into GROUP float32 accumulators. Dots run in LANES independent
 * float32 lanes summed by one fixed tree (no reassociation, so gcc vectorises them without
 * -ffast-math), positions in order: a row's result depends only on its own values, never on the
 * batch, the thread count or the addresses, so a sequence decoded alone equals the same sequence
 * in a batch, bit for bit. The SIMD builds contract a*b+c into FMA and the plain build does not,
 * so paths round differently in the last bits.
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

/* Per-thread scratch: GROUP query rows, GROUP accumulators (float32 [GROUP, D]) and GROUP rows
 * of scores (float32 [GROUP, len]). Grown, never shrunk; NULL when out of memory. */
static float *att_scratch(size_t floats) {
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (floats > cap) {
        float *grown = realloc(buf, floats * sizeof(float));
        if (grown == NULL) return NULL;
        buf = grown;
        cap = floats;
    }
    return buf;
}

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
    float *q = att_scratch((size_t)G * (2 * (size_t)D + (size_t)len));
    if (q == NULL) return -1;
    float *acc = q + (size_t)G * D, *scores = acc + (size_t)G * D; /* [G, D], [G, D], [G, len] */
    for (int g = 0; g < G; g++) {
        int64_t qo = (int64_t)b * a->q_sb + (int64_t)(kvh * G + g) * a->q_sh;
        for (int d = 0; d < D; d++) q[g * D + d] = att_load(a->q, qo + d, bf16);
    }
    for (int start = 0; start < len; start += a->PAGE) {
        int64_t base = att_page(a, b, start) * a->sp + head;
        int n = len - start < a->PAGE ? len - start : a->PAGE;
        for (int t = 0; t < n; t++) {
            int64_t row = base + (int64_t)t * a->st;
            const void *k = bf16 ? (const void *)((const uint16_t *)a->k + row)
                                 : (const void *)((const float *)a->k + row);
            for (int g = 0; g < G; g++)
                scores[(size_t)g * len + start + t] = att_dot(q + g * D, k, D, bf16) * a->scale;
        }
    }
    for (int g = 0; g < G; g++) { /* scores -> unnormalised probabilities; acc <- 0 */
        float *s = scores + (size_t)g * len, m = s[0], sum = 0.0f;
        for (int p = 1; p < len; p++) m = s[p] > m ? s[p] : m;
        for (int p = 0; p < len; p++) {
            s[p] = expf(s[p] - m);
            sum += s[p];
        }
        for (int d = 0; d < D; d++) acc[g * D + d] = 0.0f;
        q[g] = 1.0f / sum; /* q is no longer needed: it keeps each head's 1 / sum */
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
        for (int d = 0; d < D; d++) att_store(a->out, oo + d, acc[g * D + d] * q[g], bf16);
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
