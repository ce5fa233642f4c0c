/* The layers of a decode step on the CPU, fp32, in one call: for each layer RMSNorm, the fused
 * QKV product, the rotary embedding, the new K/V into the paged pool, decode attention over the
 * pool, the output product and the residual add, then RMSNorm, the gate/up product, SiLU-and-
 * multiply, the down product and the residual add. Each op is the kernel the model's forward
 * calls (so the result is the forward's, bit for bit); this file only strings them together.
 *
 * Called once per step from Python (miniyaie/cpu_decode.py) instead of once per op: at decode
 * batch sizes the Python between ~12 kernel calls a layer cost ~1.3 ms of a 16-sequence step on
 * the 2-core dev machine, and while it ran the second core only waited. The structs mirror
 * ctypes Structures in cpu_decode.py field for field.
 */
#include <stdint.h>

#include "kernels.h"

typedef struct {  /* a Linear's weight: fp32 rows, or else block codes (linear.c) */
    const float *weight;
    const int8_t *codes;
    const float *scales, *offsets, *bias;
    int32_t out_features, in_features;
} linear_weights;

typedef struct {
    const float *input_norm, *post_norm;  /* RMSNorm weights */
    linear_weights qkv, o, gate_up, down;
    float *k_cache, *v_cache;             /* the layer's part of the paged pool: [slots, kv_heads, head_dim] */
} decoder_layer;

typedef struct {
    int32_t tokens, hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
} decode_shape;

typedef struct {  /* per-step scratch, rows = tokens; reused by every layer */
    float *normed, *qkv, *rotated, *attn, *out, *gate_up, *act;
} decode_buffers;

static void run_linear(const float *x, const linear_weights *w, float *y, int rows)
{
    linear(x, w->weight, w->codes, w->scales, w->offsets, w->bias, y, rows, w->out_features, w->in_features);
}

static void add_into(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* x [tokens, hidden] is the residual stream after the embedding; on return it is the last layer's
 * output. cos/sin are the rotary tables' rows for the tokens' positions; slots the pool slots the
 * new K/V go to; block_tables [tokens, table_stride] and seq_lens [tokens] each sequence's blocks
 * and length after this step (one new token per sequence). */
void decode_layers(float *x, const decoder_layer *layers, int num_layers, const decode_shape *s,
                   const decode_buffers *b, const float *cos, const float *sin, const int64_t *slots,
                   const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens)
{
    const int rows = s->tokens, qk_heads = s->heads + s->kv_heads;
    const int64_t qkv_width = (int64_t)(s->heads + 2 * s->kv_heads) * s->head_dim;
    const int64_t q_width = (int64_t)s->heads * s->head_dim, rotated_width = (int64_t)qk_heads * s->head_dim;
    for (int i = 0; i < num_layers; i++) {
        const decoder_layer *l = &layers[i];
        rms_norm(x, s->hidden, l->input_norm, b->normed, rows, s->hidden, s->eps);
        run_linear(b->normed, &l->qkv, b->qkv, rows);
        rotary(b->qkv, qkv_width, cos, sin, b->rotated, rows, qk_heads, s->head_dim);
        write_kv(b->rotated + q_width, rotated_width, b->qkv + rotated_width, qkv_width,
                 l->k_cache, l->v_cache, slots, rows, s->kv_heads * s->head_dim);
        paged_decode_attention(b->rotated, rotated_width, s->head_dim, l->k_cache, l->v_cache,
                               block_tables, table_stride, seq_lens, b->attn, q_width, s->head_dim,
                               rows, s->heads, s->kv_heads, s->head_dim, s->block_size, s->scale);
        run_linear(b->attn, &l->o, b->out, rows);
        add_into(x, b->out, (int64_t)rows * s->hidden);
        rms_norm(x, s->hidden, l->post_norm, b->normed, rows, s->hidden, s->eps);
        run_linear(b->normed, &l->gate_up, b->gate_up, rows);
        silu_and_mul(b->gate_up, b->act, rows, s->intermediate);
        run_linear(b->act, &l->down, b->out, rows);
        add_into(x, b->out, (int64_t)rows * s->hidden);
    }
}
