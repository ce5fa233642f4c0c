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
 *
 * A prefix every sequence shares (the same leading block ids: the radix tree's cached system
 * prompt) is first attended for all of them at once, 16 query heads to a vector
 * (shared_prefix_lanes, below), and each sequence's task starts from that state, its running
 * maximum, denominator and sums, instead of from nothing: cascade attention, as the GPU's Triton
 * kernels do it. On the chat burst (176 shared tokens of ~240) ~0.3-0.5 ms of a ~4.7 ms step's attention.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* KV head `head`'s K and V rows in the block that holds token `start` of a sequence (its block
 * table; `len` tokens), row floats apart. The next block's rows are fetched into L2 meanwhile: K/V
 * come from memory (a step streams ~135 MB of weights through the caches between two reads of a
 * layer's pool), and the hardware does not run ahead across blocks, which are scattered. Into L2,
 * not L1: fetches into L1 made decode attention slower (as they did the greedy head's screen); into
 * L2 the chat burst's decode attention takes 0.80-0.84x the time. Shared with
 * paged_extend_attention.c. */
kv_rows block_rows(const float *k_cache, const float *v_cache, const int32_t *table, int64_t start, int64_t len,
                   int64_t row, int head, int head_dim, int block_size)
{
    const int64_t offset = (int64_t)head * head_dim;
    if (start + block_size < len) {
        const int64_t next = (int64_t)table[start / block_size + 1] * block_size * row + offset;
        for (int t = 0; t < block_size; t++)
            for (int d = 0; d < head_dim; d += 16) {  /* a cache line holds 16 floats */
                __builtin_prefetch(k_cache + next + t * row + d, 0, 2);
                __builtin_prefetch(v_cache + next + t * row + d, 0, 2);
            }
    }
    const int64_t first = (int64_t)table[start / block_size] * block_size * row + offset;
    return (kv_rows){k_cache + first, v_cache + first};
}

/* The prefix's heads go across a vector's lanes: a score is one key's element times a vector of
 * 16 queries' elements, a weighted value one value's element times a vector of 16 weights, so
 * each K/V row is read once for 16 heads (once for 3 in the per-sequence loop), the multiply-adds
 * need no horizontal sums, and the online softmax runs 16 heads at a time. */
#define LANES 16
typedef float v16f __attribute__((vector_size(64)));

static inline v16f load16(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }

static inline v16f max16(v16f a, v16f b)
{
    typedef int32_t v16i __attribute__((vector_size(64)));
    const v16i a_wins = a > b;
    return (v16f)(((v16i)a & a_wins) | ((v16i)b & ~a_wins));
}

/* A task's result, in the layout it computes in: LANES maxima, LANES denominators, then
 * acc[head_dim][LANES] (lane i of acc[d] is element d of lane i's unnormalised output). */
static inline int64_t lane_state_floats(int head_dim) { return (int64_t)LANES * (head_dim + 2); }

/* The attention of up to LANES query heads of one KV head over the first `shared` tokens of
 * `table` (whole blocks), into `state`: lane i is query head (lane0 + i) % group of sequence
 * (lane0 + i) / group, for `lanes` of them; the lanes past them compute on zeros, unread. */
static void shared_prefix_lanes(
    const float *q, int64_t q_row_stride, int64_t q_head_stride, const float *k_cache, const float *v_cache,
    const int32_t *table, int shared, int kv_head, int lane0, int lanes, int group, int64_t row, int head_dim,
    int block_size, float scale, float *state)
{
    float qt[MAX_HEAD_DIM][LANES], p[MAX_BLOCK][LANES];
    float (*acc)[LANES] = (float (*)[LANES])(state + 2 * LANES);
    for (int i = 0; i < LANES; i++) {
        const int lane = lane0 + i, b = lane / group, h = kv_head * group + lane % group;
        for (int d = 0; d < head_dim; d++)
            qt[d][i] = i < lanes ? q[b * q_row_stride + h * q_head_stride + d] * scale : 0.0f;
    }
    memset(acc, 0, sizeof(float) * head_dim * LANES);
    v16f running_max = (v16f){0} - 1e30f, denom = (v16f){0};
    for (int start = 0; start < shared; start += block_size) {
        const kv_rows rows = block_rows(k_cache, v_cache, table, start, shared, row, kv_head, head_dim, block_size);
        const float *k_rows = rows.k, *v_rows = rows.v;
        int t = 0;
        for (; t + 16 <= block_size; t += 16) {  /* 16 keys' scores at a time: 16 vectors of sums in registers */
            v16f s[16] = {{0}};
            for (int d = 0; d < head_dim; d++) {
                const v16f qv = load16(qt[d]);
                for (int i = 0; i < 16; i++)
                    s[i] += k_rows[(t + i) * row + d] * qv;
            }
            for (int i = 0; i < 16; i++)
                store16(p[t + i], s[i]);
        }
        for (; t < block_size; t++) {
            v16f s = {0};
            for (int d = 0; d < head_dim; d++)
                s += k_rows[t * row + d] * load16(qt[d]);
            store16(p[t], s);
        }
        v16f block_max = running_max;
        for (t = 0; t < block_size; t++)
            block_max = max16(load16(p[t]), block_max);
        int raised = 0;
        for (int i = 0; i < LANES; i++)
            raised |= block_max[i] > running_max[i];
        if (raised) {  /* rescale the sums to the new maximum (lanes it did not raise: by exp(0) = 1) */
            float rescale[LANES], before[LANES], after[LANES];
            store16(before, running_max);
            store16(after, block_max);
            #pragma omp simd
            for (int i = 0; i < LANES; i++)
                rescale[i] = expf(before[i] - after[i]);
            const v16f r = load16(rescale);
            denom *= r;
            for (int d = 0; d < head_dim; d++)
                store16(acc[d], load16(acc[d]) * r);
            running_max = block_max;
        }
        float peak[LANES];
        store16(peak, running_max);
        for (t = 0; t < block_size; t++) {
            #pragma omp simd  /* one vector exp (libmvec) for the 16 lanes; left alone, GCC unrolls and calls expf 16 times */
            for (int i = 0; i < LANES; i++)
                p[t][i] = expf(p[t][i] - peak[i]);
            denom += load16(p[t]);
        }
        int d = 0;
        for (; d + 16 <= head_dim; d += 16) {  /* 16 of the values' elements, for every lane, in registers */
            v16f sums[16];
            for (int i = 0; i < 16; i++)
                sums[i] = load16(acc[d + i]);
            for (t = 0; t < block_size; t++) {
                const v16f w = load16(p[t]);
                for (int i = 0; i < 16; i++)
                    sums[i] += v_rows[t * row + d + i] * w;
            }
            for (int i = 0; i < 16; i++)
                store16(acc[d + i], sums[i]);
        }
        for (; d < head_dim; d++) {  /* head_dim a multiple of 8, not of 16 */
            v16f sum = load16(acc[d]);
            for (t = 0; t < block_size; t++)
                sum += v_rows[t * row + d] * load16(p[t]);
            store16(acc[d], sum);
        }
    }
    store16(state, running_max);
    store16(state + LANES, denom);
}

void paged_decode_attention(
    const float *q, int64_t q_row_stride, int64_t q_head_stride,
    const float *k_cache, const float *v_cache, /* [slots, num_kv_heads, head_dim], contiguous */
    const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens, int32_t shared_len,
    float *out, int64_t out_row_stride, int64_t out_head_stride,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale)
{
    const int group = num_heads / num_kv_heads;
    const int64_t row = (int64_t)num_kv_heads * head_dim; /* floats between a slot's K rows */
    /* The prefix every sequence shares, in whole blocks, when there are heads enough to fill a
     * vector's lanes (fewer leave most lanes idle: slower than the loop below). */
    const int lanes_per_kv_head = num_seqs * group, chunks = (lanes_per_kv_head + LANES - 1) / LANES;
    const int shared = lanes_per_kv_head >= LANES ? shared_len / block_size * block_size : 0;
    const int64_t task_floats = lane_state_floats(head_dim);
    float *states = shared > 0 ? malloc(sizeof(float) * num_kv_heads * chunks * task_floats) : NULL;

    #pragma omp parallel
    {
        if (shared > 0) {
            #pragma omp for collapse(2) schedule(dynamic, 1)
            for (int j = 0; j < num_kv_heads; j++)
                for (int c = 0; c < chunks; c++) {
                    const int lane0 = c * LANES;
                    const int lanes = lanes_per_kv_head - lane0 < LANES ? lanes_per_kv_head - lane0 : LANES;
                    shared_prefix_lanes(q, q_row_stride, q_head_stride, k_cache, v_cache, block_tables, shared, j,
                                        lane0, lanes, group, row, head_dim, block_size, scale,
                                        states + ((int64_t)j * chunks + c) * task_floats);
                }
        }
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < num_seqs; b++) {
            for (int j = 0; j < num_kv_heads; j++) {
                float qs[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
                float scores[MAX_GROUP][MAX_BLOCK], running_max[MAX_GROUP], denom[MAX_GROUP];
                for (int g = 0; g < group; g++) {
                    const float *src = q + b * q_row_stride + (int64_t)(j * group + g) * q_head_stride;
                    const int lane = b * group + g, i = lane % LANES;  /* where the prefix left this head */
                    const float *state = shared > 0 ? states + ((int64_t)j * chunks + lane / LANES) * task_floats : NULL;
                    for (int d = 0; d < head_dim; d++) {
                        qs[g][d] = src[d] * scale;
                        acc[g][d] = state ? state[(2 + d) * LANES + i] : 0.0f;
                    }
                    running_max[g] = state ? state[i] : -1e30f;
                    denom[g] = state ? state[LANES + i] : 0.0f;
                }
                const int64_t len = seq_lens[b];
                for (int64_t start = shared; start < len; start += block_size) {
                    const int n = (int)(len - start < block_size ? len - start : block_size);
                    const kv_rows rows = block_rows(k_cache, v_cache, block_tables + b * table_stride, start, len, row, j,
                                                    head_dim, block_size);
                    const float *k_rows = rows.k, *v_rows = rows.v;
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
    free(states);
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
