/* Plain build of the CPU GEMV: included by cpu_gemv.c when no SIMD flags are given (any x86-64
 * CPU, or any other). Never compiled on its own.
 *
 * The same contract in loops the compiler can vectorise: 8 independent lanes per output, so no
 * reassociation is needed, summed by one fixed tree. Each row of W is read once per row of x (the
 * second time from L1). Without FMA in the baseline instruction set each product is rounded
 * before it is added, so results differ from the SIMD builds' in the last bits.
 */
#define LANES 8

static int prepare(struct gemv *g) {
    g->chunk = g->in;
    return 0;
}

/* ((0+1) + (2+3)) + ((4+5) + (6+7)) */
static inline float sum_lanes(const float s[LANES]) {
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static void f32_rows(const struct gemv *g, int lo, int hi) {
    const float *bias = g->bias;
    for (int o = lo; o < hi; o++)
        for (int m = 0; m < g->M; m++) {
            const float *x = (const float *)g->x + (int64_t)m * g->in;
            const float *w = (const float *)g->w + (int64_t)o * g->in;
            float s[LANES] = {0};
            int i = 0;
            for (; i + LANES <= g->in; i += LANES)
                for (int k = 0; k < LANES; k++) s[k] += x[i + k] * w[i + k];
            for (int k = 0; i + k < g->in; k++) s[k] += x[i + k] * w[i + k];
            float t = sum_lanes(s);
            ((float *)g->y)[(int64_t)m * g->out + o] = bias ? t + bias[o] : t;
        }
}

static void bf16_rows(const struct gemv *g, int lo, int hi) {
    const uint16_t *bias = g->bias;
    for (int o = lo; o < hi; o++)
        for (int m = 0; m < g->M; m++) {
            const uint16_t *x = (const uint16_t *)g->x + (int64_t)m * g->in;
            const uint16_t *w = (const uint16_t *)g->w + (int64_t)o * g->in;
            float s[LANES] = {0};
            int i = 0;
            for (; i + LANES <= g->in; i += LANES)
                for (int k = 0; k < LANES; k++)
                    s[k] += bf16_to_f32(x[i + k]) * bf16_to_f32(w[i + k]);
            for (int k = 0; i + k < g->in; k++)
                s[k] += bf16_to_f32(x[i + k]) * bf16_to_f32(w[i + k]);
            float t = sum_lanes(s);
            if (bias) t += bf16_to_f32(bias[o]);
            ((uint16_t *)g->y)[(int64_t)m * g->out + o] = f32_to_bf16(t);
        }
}
