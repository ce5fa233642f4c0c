/* The C kernels' entry points, for the kernels that call each other (decode_step.c) and for the
 * files that define them, so the compiler checks every definition against its declaration. The
 * Python side declares the same signatures for ctypes (miniyaie/cpu_kernels.py). */
#ifndef MINIYAIE_KERNELS_H
#define MINIYAIE_KERNELS_H

#include <stdint.h>

void linear(const float *x, const float *weight, const int8_t *codes, const float *scales,
            const float *offsets, const float *bias, float *y, int m, int n, int k);
typedef struct {  /* Q4_1 codes laid out for linear_q4 (linear_q4.c, q4_layout) */
    const void *codes;              /* uint8 [panels][k / 4][16][4] */
    const float *scales, *offsets;  /* [panels][k / 32][16] */
} q4_panels;
int q4_products_fast(void);
int q4_layout(const int8_t *codes, const float *scales, const float *offsets, int n, int k, q4_panels q);
void linear_q4(const float *x, q4_panels q, const float *bias, float *y, int m, int n, int k);
void rms_norm(const float *x, int64_t x_stride, const float *weight, float *out, int rows, int dim, float eps);
void silu_and_mul(const float *x, float *out, int rows, int half);
void rotary(const float *x, int64_t x_stride, const float *cos, const float *sin, float *out,
            int tokens, int heads, int head_dim);
void write_kv(const float *k, int64_t k_stride, const float *v, int64_t v_stride,
              float *k_cache, float *v_cache, const int64_t *slots, int tokens, int row);
void paged_decode_attention(
    const float *q, int64_t q_row_stride, int64_t q_head_stride,
    const float *k_cache, const float *v_cache,
    const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens, int32_t shared_len,
    float *out, int64_t out_row_stride, int64_t out_head_stride,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale);
typedef struct {  /* one KV head's rows of a block: K and V */
    const float *k, *v;
} kv_rows;
kv_rows block_rows(const float *k_cache, const float *v_cache, const int32_t *table, int64_t start, int64_t len,
                   int64_t row, int head, int head_dim, int block_size);
void paged_extend_attention(
    const float *q, int64_t q_row_stride, int64_t q_head_stride,
    const float *k_cache, const float *v_cache,
    const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens, const int32_t *cu_q_lens,
    float *out, int64_t out_row_stride, int64_t out_head_stride,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale);

typedef struct {  /* the head's codes laid out for its screen (greedy_head.c, head_screen_layout) */
    const uint8_t *codes4;               /* [panels][k / 4][16][4]: code + 128 */
    const float *scales, *offsets, *l1;  /* [panels][k / 32][16]; l1: the block's sum of |weight| */
    const float *l1_peaks;               /* [n]: the row's largest block l1 */
    int32_t any_offsets;                 /* 0: every offset is 0 (Q8_0), so the screen skips them */
} head_screen;

int64_t first_argmax(const float *x, int vocab, float *peak_logit);
int greedy_head_fast(void);
int head_screen_layout(const int8_t *codes, const float *scales, const float *offsets, int n, int k,
                       uint8_t *codes4, float *scales_t, float *offsets_t, float *l1, float *l1_peaks);
void greedy_head(const float *x, int m, const int8_t *codes, const float *scales, const float *offsets,
                 const head_screen *s, int n, int k, int64_t *tokens);

#endif
