/* Paged extend attention on the CPU, fp32: each extending sequence's new tokens (a prompt, a
 * prefill chunk, a question after a cached prefix) attend causally over every earlier token in its
 * blocks and over themselves, reading K and V in place from the paged pool (no gather).
 *
 * One task per (sequence, KV head, tile of new tokens). A tile is up to LANES query rows, the GROUP
 * query heads of that KV head for TILE consecutive tokens, laid across the lanes of two vectors,
 * so each K and V value is loaded once for all of them and no dot product needs a horizontal sum:
 * a score is built as sum over d of K[key][d] (broadcast) times the rows' q[d] (a vector), and the
 * output as sum over keys of V[key][d] (broadcast) times the rows' probabilities (a vector). Keys
 * go a block at a time with the online softmax of flash attention (per-lane running maximum and
 * sum). A row's keys end at its own position; the last blocks of a tile mask the keys beyond each
 * row's position. Rows past the tile's end are padding (zero queries, results dropped).
 *
 * Built at run time by miniyaie/cpu_kernels.py with -O3 -march=native -ffast-math. No infinities
 * are used (fast-math assumes none): masked scores are -1e30, whose exponent underflows to 0.
 * Blocks are read through block_rows (paged_decode_attention.c), which fetches the next one into L2.
 */
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "vec8.h"

#define LANES 16          /* query rows a task carries: two vectors of 8 */
#define KEYS 4            /* keys (or head_dim entries) per register tile: 4 x 2 sums */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 256
#define MASKED (-1e30f)

static inline v8f splat(float v) { return (v8f){v, v, v, v, v, v, v, v}; }

/* Tiles are float arrays of LANES per entry (lanes 0-7, then 8-15): qt and acc [head_dim][LANES],
 * scores [keys][LANES]. */

/* scores[t] = sum over d of k_t[d] * qt[d] for the n keys of a block (row floats apart), KEYS at a
 * time. A block's last keys are taken KEYS at a time too, reading slots past n (still inside the
 * block, so finite values: the pool starts zeroed) whose scores nobody reads: one key alone would
 * be a chain of dependent multiply-adds, 4x slower a key. Only blocks smaller than KEYS (1 or 2
 * tokens) take keys one at a time. */
static void tile_scores(const float *qt, const float *k_rows, int64_t row, int n, int block_size, int head_dim,
                        float *scores)
{
    int t = 0;
    for (; t < n && t + KEYS <= block_size; t += KEYS) {
        v8f lo[KEYS] = {{0}}, hi[KEYS] = {{0}};
        for (int d = 0; d < head_dim; d++) {
            const v8f q_lo = load8(qt + d * LANES), q_hi = load8(qt + d * LANES + 8);
            for (int i = 0; i < KEYS; i++) {
                const v8f key = splat(k_rows[(t + i) * row + d]);
                lo[i] += key * q_lo;
                hi[i] += key * q_hi;
            }
        }
        for (int i = 0; i < KEYS; i++) {
            store8(scores + (t + i) * LANES, lo[i]);
            store8(scores + (t + i) * LANES + 8, hi[i]);
        }
    }
    for (; t < n; t++) {
        v8f lo = {0}, hi = {0};
        for (int d = 0; d < head_dim; d++) {
            const v8f key = splat(k_rows[t * row + d]);
            lo += key * load8(qt + d * LANES);
            hi += key * load8(qt + d * LANES + 8);
        }
        store8(scores + t * LANES, lo);
        store8(scores + t * LANES + 8, hi);
    }
}

/* acc[d] += sum over t < n of v_t[d] * p[t], KEYS entries of head_dim at a time in registers
 * (head_dim is a multiple of 8: kernel_supports). */
static void tile_values(const float *p, const float *v_rows, int64_t row, int n, int head_dim, float *acc)
{
    for (int d = 0; d < head_dim; d += KEYS) {
        v8f lo[KEYS], hi[KEYS];
        for (int i = 0; i < KEYS; i++)
            lo[i] = load8(acc + (d + i) * LANES), hi[i] = load8(acc + (d + i) * LANES + 8);
        for (int t = 0; t < n; t++) {
            const v8f p_lo = load8(p + t * LANES), p_hi = load8(p + t * LANES + 8);
            for (int i = 0; i < KEYS; i++) {
                const v8f value = splat(v_rows[t * row + d + i]);
                lo[i] += value * p_lo;
                hi[i] += value * p_hi;
            }
        }
        for (int i = 0; i < KEYS; i++) {
            store8(acc + (d + i) * LANES, lo[i]);
            store8(acc + (d + i) * LANES + 8, hi[i]);
        }
    }
}

/* Sequence b's new tokens are q rows cu_q_lens[b] .. cu_q_lens[b + 1] - 1, the last at position
 * seq_lens[b] - 1; out rows match q rows. */
void paged_extend_attention(
    const float *q, int64_t q_row_stride, int64_t q_head_stride,
    const float *k_cache, const float *v_cache,
    const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens, const int32_t *cu_q_lens,
    float *out, int64_t out_row_stride, int64_t out_head_stride,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale)
{
    const int group = num_heads / num_kv_heads, tile = LANES / group;
    const int64_t row = (int64_t)num_kv_heads * head_dim; /* floats between a slot's K rows */
    int tasks_per_head = 0;  /* the most tiles of any sequence: tasks beyond a sequence's own are empty */
    for (int b = 0; b < num_seqs; b++) {
        const int tiles = (cu_q_lens[b + 1] - cu_q_lens[b] + tile - 1) / tile;
        tasks_per_head = tiles > tasks_per_head ? tiles : tasks_per_head;
    }

    #pragma omp parallel for collapse(3) schedule(dynamic, 1)
    for (int b = 0; b < num_seqs; b++) {
        for (int j = 0; j < num_kv_heads; j++) {
            for (int task = 0; task < tasks_per_head; task++) {
                const int q_len = cu_q_lens[b + 1] - cu_q_lens[b], first = task * tile;
                if (first >= q_len)
                    continue;
                const int tokens = q_len - first < tile ? q_len - first : tile;
                const int64_t start_pos = seq_lens[b] - q_len + first;  /* the tile's first token */
                float qt[MAX_HEAD_DIM * LANES], acc[MAX_HEAD_DIM * LANES], s[(MAX_BLOCK + KEYS) * LANES];
                float pos[LANES], running_max[LANES], denom[LANES];
                for (int lane = 0; lane < LANES; lane++) {
                    const int token = lane / group, g = lane % group;
                    const int real = token < tokens;
                    const float *src = q + (cu_q_lens[b] + first + token) * q_row_stride
                                         + (int64_t)(j * group + g) * q_head_stride;
                    for (int d = 0; d < head_dim; d++)
                        qt[d * LANES + lane] = real ? src[d] * scale : 0.0f;
                    pos[lane] = (float)(start_pos + (real ? token : tokens - 1));
                    running_max[lane] = MASKED;
                    denom[lane] = 0.0f;
                }
                for (int i = 0; i < head_dim * LANES; i++)
                    acc[i] = 0.0f;
                const int64_t len = start_pos + tokens;  /* keys the tile's last token sees */
                for (int64_t key0 = 0; key0 < len; key0 += block_size) {
                    const int n = (int)(len - key0 < block_size ? len - key0 : block_size);
                    const kv_rows rows = block_rows(k_cache, v_cache, block_tables + b * table_stride, key0, len, row, j,
                                                    head_dim, block_size);
                    const float *k_rows = rows.k, *v_rows = rows.v;
                    tile_scores(qt, k_rows, row, n, block_size, head_dim, s);
                    if (key0 + n - 1 > start_pos)  /* some key here is past some row's position */
                        for (int t = 0; t < n; t++)
                            for (int lane = 0; lane < LANES; lane++)
                                s[t * LANES + lane] = (float)(key0 + t) > pos[lane] ? MASKED : s[t * LANES + lane];
                    /* the online softmax, every loop across the lanes (vectors), not along a lane */
                    float rescale[LANES], sum[LANES];
                    for (int lane = 0; lane < LANES; lane++)
                        rescale[lane] = running_max[lane];  /* the block's new maximum, first */
                    for (int t = 0; t < n; t++)
                        for (int lane = 0; lane < LANES; lane++)
                            rescale[lane] = s[t * LANES + lane] > rescale[lane] ? s[t * LANES + lane] : rescale[lane];
                    for (int lane = 0; lane < LANES; lane++) {
                        const float new_max = rescale[lane];
                        rescale[lane] = running_max[lane] - new_max;  /* its exp, below */
                        running_max[lane] = new_max;
                        sum[lane] = 0.0f;
                    }
                    #pragma omp simd  /* vector exps (libmvec); left alone, GCC unrolls 16 scalar expf calls */
                    for (int lane = 0; lane < LANES; lane++)
                        rescale[lane] = expf(rescale[lane]);
                    for (int t = 0; t < n; t++)
                        #pragma omp simd
                        for (int lane = 0; lane < LANES; lane++) {
                            s[t * LANES + lane] = expf(s[t * LANES + lane] - running_max[lane]);
                            sum[lane] += s[t * LANES + lane];
                        }
                    for (int lane = 0; lane < LANES; lane++)
                        denom[lane] = denom[lane] * rescale[lane] + sum[lane];
                    for (int d = 0; d < head_dim; d++)
                        for (int lane = 0; lane < LANES; lane++)
                            acc[d * LANES + lane] *= rescale[lane];
                    tile_values(s, v_rows, row, n, head_dim, acc);
                }
                for (int lane = 0; lane < tokens * group; lane++) {
                    const int token = lane / group, g = lane % group;
                    float *dst = out + (cu_q_lens[b] + first + token) * out_row_stride
                                     + (int64_t)(j * group + g) * out_head_stride;
                    const float inv = 1.0f / denom[lane];
                    for (int d = 0; d < head_dim; d++)
                        dst[d] = acc[d * LANES + lane] * inv;
                }
            }
        }
    }
}
