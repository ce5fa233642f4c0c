/* Paged decode attention on the CPU, fp32: each decoding sequence's one new query token attends
 * over every token in its blocks, reading K and V straight from the paged pool (no gather).
 *
 * One task per (sequence, KV head): the GROUP query heads sharing that KV head read each K/V row
 * once. A block at a time: scores for its tokens, then, only where the block raises the running
 * maximum, one rescale of the running sums to it, then the weighted V rows (the online softmax of
 * flash attention, per block instead of per token). In the chat burst only 7% of the blocks after
 * a sequence's first raise it, so most skip the rescale's exp. Tasks run on the OpenMP runtime
 * torch already loaded (same libgomp.so.1), so they share torch's threads instead of competing
 * with a second pool.
 *
 * Built at run time by miniyaie/cpu_kernels.py with -O3 -march=native -ffast-math. A dot product
 * is a chain of dependent multiply-adds, each waiting on the last (4 cycles apiece), so scores are
 * computed 8 keys at a time: 8 independent chains keep both FMA units busy, and their 8 sums are
 * reduced together (three rounds of pairwise adds) instead of by one horizontal sum a key. With
 * the skipped rescales that made the kernel ~12% faster on the burst's shapes and the burst ~5%
 * (session 10). The weighted sum of V keeps 64 output lanes in registers across a block's tokens
 * instead of loading and storing them per token. head_dim must be a multiple of 8
 * (kernel_supports). No infinities are used (fast-math assumes none): a running maximum starts at
 * -1e30 and padding never reaches the kernel (lengths bound every loop).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "vec8.h"
#ifdef __AVX__
#include <immintrin.h>
#endif

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 256

/* The 8 sums of 8 vectors, as one vector: lane i holds the sum of a[i]'s lanes. */
static inline v8f sums8(const v8f a[8])
{
#ifdef __AVX__
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);  /* lanes 0-3 | 4-7 halves */
    return _mm256_permute2f128_ps(lo, hi, 0x20) + _mm256_permute2f128_ps(lo, hi, 0x31);
#else
    v8f s;
    for (int i = 0; i < 8; i++)
        s[i] = sum8(a[i]);
    return s;
#endif
}

/* scores[t] = q . k_t for the n key rows of a block (row floats apart), 8 rows at a time. */
static void block_scores(const float *q, const float *k_rows, int64_t row, int n, int head_dim, float *scores)
{
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        v8f acc[8] = {{0}};
        for (int d = 0; d < head_dim; d += 8) {
            const v8f qv = load8(q + d);
            for (int i = 0; i < 8; i++)
                acc[i] += qv * load8(k_rows + (t + i) * row + d);
        }
        store8(scores + t, sums8(acc));
    }
    for (; t < n; t++) {
        v8f acc = {0};
        for (int d = 0; d < head_dim; d += 8)
            acc += load8(q + d) * load8(k_rows + t * row + d);
        scores[t] = sum8(acc);
    }
}

/* out[0:head_dim] += sum over t < n of p[t] * v_t, 64 lanes held in registers at a time. */
static void block_values(const float *p, const float *v_rows, int64_t row, int n, int head_dim, float *out)
{
    int d = 0;
    for (; d + 64 <= head_dim; d += 64) {
        v8f acc[8];
        for (int i = 0; i < 8; i++)
            acc[i] = load8(out + d + 8 * i);
        for (int t = 0; t < n; t++) {
            const float *v = v_rows + t * row + d;
            for (int i = 0; i < 8; i++)
                acc[i] += p[t] * load8(v + 8 * i);
        }
        for (int i = 0; i < 8; i++)
            store8(out + d + 8 * i, acc[i]);
    }
    for (; d < head_dim; d += 8) {
        v8f acc = load8(out + d);
        for (int t = 0; t < n; t++)
            acc += p[t] * load8(v_rows + t * row + d);
        store8(out + d, acc);
    }
}

void paged_decode_attention(
    const float *q, int64_t q_row_stride, int64_t q_head_stride,
    const float *k_cache, const float *v_cache, /* [slots, num_kv_heads, head_dim], contiguous */
    const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
    float *out, int64_t out_row_stride, int64_t out_head_stride,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale)
{
    const int group = num_heads / num_kv_heads;
    const int64_t row = (int64_t)num_kv_heads * head_dim; /* floats between a slot's K rows */

    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < num_seqs; b++) {
        for (int j = 0; j < num_kv_heads; j++) {
            float qs[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
            float scores[MAX_GROUP][MAX_BLOCK], running_max[MAX_GROUP], denom[MAX_GROUP];
            for (int g = 0; g < group; g++) {
                const float *src = q + b * q_row_stride + (int64_t)(j * group + g) * q_head_stride;
                for (int d = 0; d < head_dim; d++) {
                    qs[g][d] = src[d] * scale;
                    acc[g][d] = 0.0f;
                }
                running_max[g] = -1e30f;
                denom[g] = 0.0f;
            }
            const int64_t len = seq_lens[b];
            for (int64_t start = 0; start < len; start += block_size) {
                const int n = (int)(len - start < block_size ? len - start : block_size);
                const int64_t block = block_tables[b * table_stride + start / block_size];
                const float *k_rows = k_cache + block * block_size * row + (int64_t)j * head_dim;
                const float *v_rows = v_cache + block * block_size * row + (int64_t)j * head_dim;
                for (int g = 0; g < group; g++) {
                    block_scores(qs[g], k_rows, row, n, head_dim, scores[g]);
                    float block_max = -1e30f;
                    for (int t = 0; t < n; t++)
                        block_max = scores[g][t] > block_max ? scores[g][t] : block_max;
                    if (block_max > running_max[g]) {  /* else the sums stand as they are */
                        const float rescale = expf(running_max[g] - block_max);
                        running_max[g] = block_max;
                        denom[g] *= rescale;
                        for (int d = 0; d < head_dim; d++)
                            acc[g][d] *= rescale;
                    }
                    const float new_max = running_max[g];
                    for (int t = 0; t < n; t++) {
                        scores[g][t] = expf(scores[g][t] - new_max);
                        denom[g] += scores[g][t];
                    }
                    block_values(scores[g], v_rows, row, n, head_dim, acc[g]);
                }
            }
            for (int g = 0; g < group; g++) {
                float *dst = out + b * out_row_stride + (int64_t)(j * group + g) * out_head_stride;
                const float inv = 1.0f / denom[g];
                for (int d = 0; d < head_dim; d++)
                    dst[d] = acc[g][d] * inv;
            }
        }
    }
}

/* k_cache[slots[t]] = k[t] and v_cache[slots[t]] = v[t]: the step's new K/V rows (row floats each:
 * kv_heads x head_dim) into their slots of the pool; k and v rows are k_stride / v_stride apart. */
void write_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride,
              float *k_cache, float *v_cache, const int64_t *slots, int tokens, int row)
{
    for (int t = 0; t < tokens; t++) {
        memcpy(k_cache + slots[t] * row, k + t * k_stride, sizeof(float) * row);
        memcpy(v_cache + slots[t] * row, v + t * v_stride, sizeof(float) * row);
    }
}
