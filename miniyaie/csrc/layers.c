/* A forward step on the CPU, fp32, in one call: the tokens' embeddings and rotary rows, then for
 * each layer RMSNorm, the fused QKV product, the rotary embedding, the new K/V into the paged pool,
 * attention over the pool, the output product and the residual add, then RMSNorm, the gate/up
 * product, SiLU-and-multiply, the down product and the residual add; last the final RMSNorm of the
 * rows that want logits and the head. Each op is the kernel the model's forward calls (so the
 * result is the forward's, bit for bit); this file only strings them together.
 *
 * Called once per step from Python (miniyaie/cpu_forward.py) instead of once per op: at decode
 * batch sizes the Python between ~12 kernel calls a layer cost ~1.3 ms of a 16-sequence step on
 * the 2-core dev machine, and while it ran the second core only waited. The embedding, the rotary
 * lookup and the final norm around the layers cost another ~0.85 ms a step as torch ops and
 * wrapper calls (a step has just streamed the weights through the caches, so the interpreter runs
 * cold). The structs mirror ctypes Structures in cpu_forward.py field for field.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

typedef struct {  /* a Linear's weight: fp32 rows, block codes (linear.c), or Q4_1's codes for linear_q4 */
    const float *weight;
    const int8_t *codes;
    const float *scales, *offsets;
    q4_panels q4;                          /* q4.codes NULL: not laid out for linear_q4 */
    const float *bias;
    int32_t out_features, in_features;
} linear_weights;

typedef struct {
    const float *input_norm, *post_norm;  /* RMSNorm weights */
    linear_weights qkv, o, gate_up, down;
    float *k_cache, *v_cache;             /* the layer's part of the paged pool: [slots, kv_heads, head_dim] */
} decoder_layer;

typedef struct {  /* what a step reads besides its layers */
    const float *embedding;               /* [vocab, hidden] */
    const float *cos, *sin;               /* rotary tables [positions, head_dim], RotaryEmbedding's layout */
    const float *final_norm;              /* RMSNorm weight */
    linear_weights head;
} model_ends;

typedef struct {
    int32_t tokens, hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
} step_shape;

typedef struct {  /* where the step's tokens go: ForwardBatch's tensors */
    int32_t num_seqs, num_extends;        /* extending sequences first, then decoding ones */
    const int32_t *block_tables;          /* [num_seqs, table_stride] */
    int64_t table_stride;
    const int32_t *seq_lens, *cu_q_lens;  /* [num_seqs]: tokens after the step; [num_seqs + 1]: row offsets */
    const int64_t *slots;                 /* [tokens]: the pool slot of each new token's K/V */
    const int64_t *input_ids, *positions; /* [tokens]: in the vocabulary and the rotary tables (the engine checks) */
    const int64_t *logits_indices;        /* [num_logits]: the rows whose logits the step returns */
    int32_t num_logits;
    int32_t shared_prefix_len;            /* leading tokens every decoding sequence has in the same blocks */
} step_batch;

typedef struct {  /* per-step scratch, rows = tokens (final: num_logits); reused by every layer */
    float *x, *cos, *sin, *normed, *qkv, *rotated, *attn, *out, *gate_up, *act, *final;
} step_buffers;

static void run_linear(const float *x, const linear_weights *w, float *y, int rows)
{
    if (w->q4.codes != NULL)
        linear_q4(x, w->q4, w->bias, y, rows, w->out_features, w->in_features);
    else
        linear(x, w->weight, w->codes, w->scales, w->offsets, w->bias, y, rows, w->out_features, w->in_features);
}

static void add_into(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* out = the attention of every query row q over the pool: the extending sequences' rows through
 * the extend kernel, the decoding ones' (one row each, after them) through the decode kernel.
 * q rows are q_row_stride floats apart, heads head_dim apart; out is [tokens, heads, head_dim]. */
void paged_attention(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache,
                     const step_batch *batch, float *out, int heads, int kv_heads, int head_dim,
                     int block_size, float scale)
{
    const int extends = batch->num_extends, extend_rows = batch->cu_q_lens[extends];
    const int64_t out_row_stride = (int64_t)heads * head_dim;
    if (extends > 0)
        paged_extend_attention(q, q_row_stride, head_dim, k_cache, v_cache, batch->block_tables,
                               batch->table_stride, batch->seq_lens, batch->cu_q_lens, out, out_row_stride,
                               head_dim, extends, heads, kv_heads, head_dim, block_size, scale);
    if (batch->num_seqs > extends)
        paged_decode_attention(q + extend_rows * q_row_stride, q_row_stride, head_dim, k_cache, v_cache,
                               batch->block_tables + extends * batch->table_stride, batch->table_stride,
                               batch->seq_lens + extends, batch->shared_prefix_len, out + extend_rows * out_row_stride,
                               out_row_stride, head_dim, batch->num_seqs - extends, heads, kv_heads, head_dim, block_size, scale);
}

/* b->x [tokens, hidden] is the residual stream after the embedding; on return it is the last
 * layer's output. b->cos / b->sin hold the rotary tables' rows for the tokens' positions. */
static void run_layers(const decoder_layer *layers, int num_layers, const step_shape *s,
                       const step_batch *batch, const step_buffers *b)
{
    float *x = b->x;
    const float *cos = b->cos, *sin = b->sin;
    const int rows = s->tokens, qk_heads = s->heads + s->kv_heads;
    const int64_t qkv_width = (int64_t)(s->heads + 2 * s->kv_heads) * s->head_dim;
    const int64_t q_width = (int64_t)s->heads * s->head_dim, rotated_width = (int64_t)qk_heads * s->head_dim;
    for (int i = 0; i < num_layers; i++) {
        const decoder_layer *l = &layers[i];
        rms_norm(x, s->hidden, l->input_norm, b->normed, rows, s->hidden, s->eps);
        run_linear(b->normed, &l->qkv, b->qkv, rows);
        rotary(b->qkv, qkv_width, cos, sin, b->rotated, rows, qk_heads, s->head_dim);
        write_kv(b->rotated + q_width, rotated_width, b->qkv + rotated_width, qkv_width,
                 l->k_cache, l->v_cache, batch->slots, rows, s->kv_heads * s->head_dim);
        paged_attention(b->rotated, rotated_width, l->k_cache, l->v_cache, batch, b->attn,
                        s->heads, s->kv_heads, s->head_dim, s->block_size, s->scale);
        run_linear(b->attn, &l->o, b->out, rows);
        add_into(x, b->out, (int64_t)rows * s->hidden);
        rms_norm(x, s->hidden, l->post_norm, b->normed, rows, s->hidden, s->eps);
        run_linear(b->normed, &l->gate_up, b->gate_up, rows);
        silu_and_mul(b->gate_up, b->act, rows, s->intermediate);
        run_linear(b->act, &l->down, b->out, rows);
        add_into(x, b->out, (int64_t)rows * s->hidden);
    }
}

/* logits [num_logits, vocab] for the rows batch->logits_indices name, as the model's forward
 * computes them, or, given the head's screen, their argmaxes alone into greedy_tokens
 * (greedy_head.c); writes the step's K/V into the pool. */
void forward_step(const model_ends *m, const decoder_layer *layers, int num_layers, const step_shape *s,
                  const step_batch *batch, const step_buffers *b, float *logits, const head_screen *screen,
                  int64_t *greedy_tokens)
{
    const int hidden = s->hidden, head_dim = s->head_dim;
    for (int t = 0; t < s->tokens; t++) {
        memcpy(b->x + (int64_t)t * hidden, m->embedding + batch->input_ids[t] * hidden, sizeof(float) * hidden);
        memcpy(b->cos + (int64_t)t * head_dim, m->cos + batch->positions[t] * head_dim, sizeof(float) * head_dim);
        memcpy(b->sin + (int64_t)t * head_dim, m->sin + batch->positions[t] * head_dim, sizeof(float) * head_dim);
    }
    run_layers(layers, num_layers, s, batch, b);
    for (int i = 0; i < batch->num_logits; i++)
        memcpy(b->final + (int64_t)i * hidden, b->x + batch->logits_indices[i] * hidden, sizeof(float) * hidden);
    rms_norm(b->final, hidden, m->final_norm, b->final, batch->num_logits, hidden, s->eps);  /* row by row: in place is safe */
    if (screen != NULL)
        greedy_head(b->final, batch->num_logits, m->head.codes, m->head.scales, m->head.offsets, screen,
                    m->head.out_features, hidden, greedy_tokens);
    else
        run_linear(b->final, &m->head, logits, batch->num_logits);
}
