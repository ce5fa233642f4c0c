/* One token through a Linear on the CPU, fp32: y = W x (+ bias), W [n, k] row-major as stored.
 *
 * A single row makes the product a stream over the weights with two flops per float read, so
 * what matters is reading memory at full speed: each weight row is read once, in order, as one
 * dot product that -O3 -march=native -ffast-math vectorises, and the rows are split between
 * torch's OpenMP threads (the runtime torch loaded: one thread pool). On the 2-core dev machine
 * this reads SmolLM2-135M's weights at ~15 GB/s, where oneDNN's and MKL's GEMMs reach 10-11.
 */
#include <stdint.h>

void gemv(const float *x, const float *weight, const float *bias, float *y, int n, int k)
{
    #pragma omp parallel for schedule(static)
    for (int j = 0; j < n; j++) {
        const float *w = weight + (int64_t)j * k;
        float dot = 0.0f;
        for (int i = 0; i < k; i++)
            dot += w[i] * x[i];
        y[j] = bias ? dot + bias[j] : dot;
    }
}
