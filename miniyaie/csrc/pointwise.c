/* The small operations between a layer's matrix products, fp32, one pass each: RMSNorm, SiLU-and-
 * multiply, the rotary embedding.
 *
 * Each is a handful of torch ops (RMSNorm: square, mean, add, rsqrt, two products), and at decode
 * batch sizes every torch op costs its dispatch (~5-10 us) far more than its arithmetic: on the
 * 2-core dev machine these took ~10 ms of a 16-sequence decode step. Here each is one call that
 * reads its input once. The torch versions in miniyaie/model.py are the reference (tests compare).
 * Rows are split between threads from PARALLEL_ROWS on: at a 16-sequence decode step the three
 * took ~2.4 ms on one thread and ~1.6 on two (their inputs come from a Linear both threads wrote);
 * at one sequence a parallel region costs more than the row.
 */
#include <math.h>
#include <stdint.h>

#include "kernels.h"

#define PARALLEL_ROWS 4

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for rows of dim floats (x rows x_stride apart). */
void rms_norm(const float *x, int64_t x_stride, const float *weight, float *out, int rows, int dim, float eps)
{
    #pragma omp parallel for if (rows > PARALLEL_ROWS) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + (int64_t)r * dim;
        float squares = 0.0f;
        for (int i = 0; i < dim; i++)
            squares += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(squares / dim + eps);
        for (int i = 0; i < dim; i++)
            o[i] = (xr[i] * inv) * weight[i];  /* the reference's order: normalise, then scale */
    }
}

/* out[r, i] = silu(x[r, i]) * x[r, half + i] for i < half (gate and up projections side by side). */
void silu_and_mul(const float *x, float *out, int rows, int half)
{
    #pragma omp parallel for if (rows > PARALLEL_ROWS) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *gate = x + (int64_t)r * 2 * half, *up = gate + half;
        float *o = out + (int64_t)r * half;
        for (int i = 0; i < half; i++)
            o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* Rotary embedding in HF's rotate-half layout: out[t, h] = x[t, h] * cos[t] + swap(x[t, h]) * sin[t],
 * where swap exchanges the halves of head_dim and sin comes negated on its first half (the tables of
 * RotaryEmbedding). x is [tokens, heads, head_dim] with rows x_stride apart; out is contiguous. */
void rotary(const float *x, int64_t x_stride, const float *cos, const float *sin, float *out,
            int tokens, int heads, int head_dim)
{
    const int half = head_dim / 2;
    #pragma omp parallel for if (tokens > PARALLEL_ROWS) schedule(static)
    for (int t = 0; t < tokens; t++) {
        const float *c = cos + (int64_t)t * head_dim, *s = sin + (int64_t)t * head_dim;
        for (int h = 0; h < heads; h++) {
            const float *xh = x + t * x_stride + (int64_t)h * head_dim;
            float *o = out + ((int64_t)t * heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                o[i] = xh[i] * c[i] + xh[half + i] * s[i];
                o[half + i] = xh[half + i] * c[half + i] + xh[i] * s[half + i];
            }
        }
    }
}
