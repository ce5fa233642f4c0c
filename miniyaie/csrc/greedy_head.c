/* The greedy token of each row — the first index of the maximum of its logits x . w_j over the
 * head's vocabulary rows w_j — exactly, without computing every logit in fp32.
 *
 * At a 16-sequence decode step the head (SmolLM2: 49,152 x 576) is a sixth of the step, and a
 * greedy request that asks for no log-probabilities needs only the argmax. So each row is first
 * scored against every w_j in integers. Per block b of 32 (the block codes' blocks: w = scale *
 * code + offset, linear.c) the row is rounded to q = round(x / delta_b) in [-127, 127] with
 * delta_b = max |x| over the block (and over the rows scored with it) / 127 (a scale per block:
 * the residual stream's few huge channels then coarsen only their own block), and the codes
 * multiply q exactly in int32 — 64 bytes at a time in one AVX-512 VNNI instruction, four times the
 * multiply-adds of an fp32 FMA (both issue once a cycle on Zen 4) from a quarter of the bytes. The score s_j = sum_b delta_b (scale * (code . q) + offset * sum(q)) is
 * w_j . (delta q), so
 *
 *     |logit_j - s_j| <= sum_b delta_b * l1_jb * slack = margin_j
 *
 * with l1_jb = sum over the block of |w_ji| (precomputed) and slack = 1/2 (q's rounding) plus an
 * allowance for the fp32 rounding of s_j and of the logit itself. The best-scoring row's logit is
 * at least its s - margin (the floor), so a j with s_j + margin_j below the floor cannot hold the
 * maximum (tested first on the looser sum_b delta_b * slack * max_b l1_jb, one product). The rest — for
 * SmolLM2's greedy chats a few hundred of 49,152 for 16 rows together — get their fp32 logits from
 * the head's own kernel (linear.c: same rows, same order of operations, so the very values the
 * full head gives), and the first maximum among them, in vocabulary order, is the token: the full
 * head's argmax, tie rule included. A row with a value that is not a finite number keeps every j.
 * A chat burst's 16-row head: 5.4 -> 2.1 ms on the 2-core dev machine (Zen 4).
 *
 * head_screen_layout builds the screen's copy of the codes once: 16 vocabulary rows side by side
 * (a panel), their codes 4 along k at a time ([panels][k / 4][16][4], as unsigned bytes code + 128,
 * which VNNI's unsigned-by-signed products take; the 128 * sum(q) that adds is taken off per block).
 * Without VNNI (greedy_head_fast() == 0) the same scores come from plain C: exact, for the tests,
 * but slower than the fp32 head, so the engine does not screen there.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512VNNI__
#include <immintrin.h>
#endif

#include "kernels.h"

#define BLOCK 32  /* weights per (scale, offset) (linear.c) */
#define LANES 16  /* vocabulary rows in a panel */
#define GROUP 8   /* x rows scored together against a panel */
#define CHUNK 2048  /* vocabulary rows a thread tests for candidates at a time, row by row */

int greedy_head_fast(void)
{
#ifdef __AVX512VNNI__
    return 1;
#else
    return 0;
#endif
}

/* The screen's copy of codes [n, k] with scales/offsets [n, k / 32] (n padded to whole panels with
 * zero rows): codes4 [panels][k / 4][16][4] (code + 128); scales_t, offsets_t and l1 [panels][k /
 * 32][16], l1 the block's sum of |weight| (rounded up); l1_peaks [n] the row's largest l1. Returns
 * whether any offset is not 0 (head_screen.any_offsets). */
int head_screen_layout(const int8_t *codes, const float *scales, const float *offsets, int n, int k,
                       uint8_t *codes4, float *scales_t, float *offsets_t, float *l1, float *l1_peaks)
{
    const int panels = (n + LANES - 1) / LANES, blocks = k / BLOCK;
    int any_offsets = 0;
    #pragma omp parallel for schedule(static) reduction(|| : any_offsets)
    for (int p = 0; p < panels; p++)
        for (int lane = 0; lane < LANES; lane++) {
            const int64_t j = (int64_t)p * LANES + lane;
            float peak = 0.0f;
            for (int b = 0; b < blocks; b++) {
                const float scale = j < n ? scales[j * blocks + b] : 0.0f, offset = j < n ? offsets[j * blocks + b] : 0.0f;
                double sum = 0.0;
                for (int i = b * BLOCK; i < (b + 1) * BLOCK; i++) {
                    const int8_t c = j < n ? codes[j * k + i] : 0;
                    codes4[(((int64_t)p * (k / 4) + i / 4) * LANES + lane) * 4 + i % 4] = (uint8_t)(c + 128);
                    sum += fabs((double)scale * c + offset);
                }
                const int64_t at = ((int64_t)p * blocks + b) * LANES + lane;
                scales_t[at] = scale, offsets_t[at] = offset, l1[at] = (float)(sum * (1.0 + 1e-6));
                peak = fmaxf(peak, l1[at]);
                any_offsets = any_offsets || offset != 0.0f;
            }
            if (j < n)
                l1_peaks[j] = peak;
        }
    return any_offsets;
}

/* One x row's blocks, rounded for the screen. */
typedef struct {
    int32_t *q4;      /* [k / 4]: q, 4 bytes to a word (VNNI broadcasts a word) */
    int32_t *qsums;   /* [blocks]: 128 * sum(q) */
    float *deltas;    /* [blocks]: delta_b */
    float *offsets;   /* [blocks]: delta_b * sum(q), the offsets' factor */
    float *reach;     /* [blocks]: delta_b * slack, so margin_j = sum_b reach_b * l1_jb */
} screened_row;

/* Panel p's part of the screen: its codes (k / 4 words of 16 lanes) and its blocks' scales and offsets. */
typedef struct {
    const uint8_t *codes4;
    const float *scales, *offsets;
} screen_panel;

static inline screen_panel panel_of(const head_screen *s, int p, int k)
{
    const int64_t blocks = k / BLOCK;
    return (screen_panel){s->codes4 + (int64_t)p * (k / 4) * LANES * 4, s->scales + p * blocks * LANES,
                          s->offsets + p * blocks * LANES};
}

/* scores[r][0:16] = the screen's scores of panel p's 16 rows for x rows r < rows <= GROUP (ld floats
 * apart). With VNNI, one function per row count, so the sums stay in registers. */
#ifdef __AVX512VNNI__
#define DEFINE_SCORE_PANEL(ROWS)                                                                   \
static void score_panel##ROWS(const head_screen *s, screen_panel pn, int k, const screened_row *x, \
                              float *scores, int64_t ld, const uint8_t *next)                      \
{                                                                                                  \
    __m512 acc[ROWS];                                                                              \
    for (int r = 0; r < ROWS; r++)                                                                 \
        acc[r] = _mm512_setzero_ps();                                                              \
    for (int b = 0; b < k / BLOCK; b++) {                                                          \
        if (next != NULL)  /* the next panel's block, into L2 (see greedy_head) */                \
            for (int line = 0; line < BLOCK * LANES / 64; line++)                                  \
                _mm_prefetch((const char *)next + (b * BLOCK * LANES + line * 64), _MM_HINT_T1);  \
        __m512i dot[ROWS];  /* starting at -128 sum(q): the codes' + 128, taken off */             \
        for (int r = 0; r < ROWS; r++)                                                             \
            dot[r] = _mm512_set1_epi32(-x[r].qsums[b]);                                           \
        for (int i = 0; i < BLOCK / 4; i++) {  /* 64 unsigned codes times 4 signed q each, per lane */ \
            const __m512i codes = _mm512_loadu_si512(pn.codes4 + ((int64_t)b * (BLOCK / 4) + i) * LANES * 4); \
            for (int r = 0; r < ROWS; r++)                                                         \
                dot[r] = _mm512_dpbusd_epi32(dot[r], codes, _mm512_set1_epi32(x[r].q4[b * (BLOCK / 4) + i])); \
        }                                                                                          \
        /* the rows share the block's delta (round_rows), so scale * delta is one product for all */ \
        const __m512 step = _mm512_mul_ps(_mm512_loadu_ps(pn.scales + b * LANES), _mm512_set1_ps(x[0].deltas[b])); \
        for (int r = 0; r < ROWS; r++)                                                             \
            acc[r] = _mm512_fmadd_ps(step, _mm512_cvtepi32_ps(dot[r]), acc[r]);                   \
        if (s->any_offsets) {  /* Q4_1's minimums; Q8_0 has none */                                \
            const __m512 offset = _mm512_loadu_ps(pn.offsets + b * LANES);                        \
            for (int r = 0; r < ROWS; r++)                                                         \
                acc[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(x[r].offsets[b]), acc[r]);        \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < ROWS; r++)                                                                 \
        _mm512_storeu_ps(scores + r * ld, acc[r]);                                                 \
}
DEFINE_SCORE_PANEL(1)
DEFINE_SCORE_PANEL(2)
DEFINE_SCORE_PANEL(3)
DEFINE_SCORE_PANEL(4)
DEFINE_SCORE_PANEL(5)
DEFINE_SCORE_PANEL(6)
DEFINE_SCORE_PANEL(7)
DEFINE_SCORE_PANEL(8)

typedef void (*score_panel_fn)(const head_screen *, screen_panel, int, const screened_row *, float *, int64_t,
                               const uint8_t *);
static const score_panel_fn score_panels[GROUP + 1] = {
    NULL, score_panel1, score_panel2, score_panel3, score_panel4, score_panel5, score_panel6, score_panel7,
    score_panel8};

static void score_panel(const head_screen *s, int p, int k, const screened_row *x, int rows, float *scores, int64_t ld,
                        const uint8_t *next)
{
    score_panels[rows](s, panel_of(s, p, k), k, x, scores, ld, next);
}
#else
static void score_panel(const head_screen *s, int p, int k, const screened_row *x, int rows, float *scores, int64_t ld,
                        const uint8_t *next)
{
    (void)next;
    const screen_panel pn = panel_of(s, p, k);
    for (int r = 0; r < rows; r++) {
        const int8_t *q = (const int8_t *)x[r].q4;
        for (int lane = 0; lane < LANES; lane++) {
            float acc = 0.0f;
            for (int b = 0; b < k / BLOCK; b++) {
                int32_t dot = 0;
                for (int i = b * BLOCK; i < (b + 1) * BLOCK; i++)
                    dot += (int32_t)pn.codes4[((int64_t)(i / 4) * LANES + lane) * 4 + i % 4] * q[i];
                acc += pn.scales[b * LANES + lane] * x[r].deltas[b] * (float)(dot - x[r].qsums[b]);
                acc += pn.offsets[b * LANES + lane] * x[r].offsets[b];
            }
            scores[r * ld + lane] = acc;
        }
    }
}
#endif

/* margin_j = sum_b reach_b * l1_jb for one vocabulary row j. */
static float margin(const head_screen *s, const screened_row *x, int64_t j, int blocks)
{
    const float *l1 = s->l1 + (j / LANES) * blocks * LANES + j % LANES;
    float sum = 0.0f;
    for (int b = 0; b < blocks; b++)
        sum += x->reach[b] * l1[b * LANES];
    return sum;
}

/* Whether v is a number (not inf or NaN), by its exponent bits: -ffast-math folds isfinite() to 1. */
static inline int is_finite(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

/* Rounds `rows` rows of x (k floats apart) for the screen, with one delta per block for all of
 * them, from the largest |x| any of them has there: the screen's kernel then scales a block's
 * integer sums by scale * delta once for the rows it scores together, not once per row (the
 * residual stream's huge channels are the same channels in every row, so a shared delta coarsens
 * a row's rounding little). Sets finite[r] to 0 (and rounds the row to zeros) where x holds a
 * value that is not a number: such a row keeps every token, and leaves the deltas alone. */
static void round_rows(const float *x, int rows, int k, screened_row *row, int *finite)
{
    /* q's half step, then the fp32 rounding of the score's and the logit's sums (|x| <= 127 delta) */
    const float slack = 0.5f + 1e-3f + 127.0f * (k + 64) * 1.2e-7f;
    const int blocks = k / BLOCK;
    for (int r = 0; r < rows; r++) {
        finite[r] = 1;
        for (int i = 0; i < k; i++)
            finite[r] &= is_finite(x[(int64_t)r * k + i]);
    }
    for (int b = 0; b < blocks; b++) {
        float peak = 0.0f;
        for (int r = 0; r < rows; r++)
            for (int i = b * BLOCK; finite[r] && i < (b + 1) * BLOCK; i++)
                peak = fmaxf(peak, fabsf(x[(int64_t)r * k + i]));
        const float inverse = peak > 0.0f ? 127.0f / peak : 0.0f;
        for (int r = 0; r < rows; r++) {
            int8_t *q = (int8_t *)row[r].q4;
            int32_t sum = 0;
            for (int i = b * BLOCK; i < (b + 1) * BLOCK; i++)
                sum += q[i] = finite[r] ? (int8_t)rintf(x[(int64_t)r * k + i] * inverse) : 0;
            row[r].deltas[b] = peak / 127.0f;
            row[r].qsums[b] = 128 * sum;
            row[r].offsets[b] = row[r].deltas[b] * (float)sum;
            row[r].reach[b] = row[r].deltas[b] * slack;
        }
    }
}

/* tokens[r] = the first argmax over j < n of x[r] . w_j for x [m, k] (k a multiple of 32) and the
 * head's block codes/scales/offsets (linear.c's layout) with their screen (head_screen_layout). */
void greedy_head(const float *x, int m, const int8_t *codes, const float *scales, const float *offsets,
                 const head_screen *s, int n, int k, int64_t *tokens)
{
    if (m == 0)
        return;
    const int panels = (n + LANES - 1) / LANES, blocks = k / BLOCK, npad = panels * LANES;
    screened_row *rows = malloc(sizeof(screened_row) * m);
    int32_t *ints = malloc(sizeof(int32_t) * m * (k / 4 + blocks));
    float *floats = malloc(sizeof(float) * m * 3 * blocks);
    float *scores = malloc(sizeof(float) * m * npad), *floor_ = malloc(sizeof(float) * m);
    float *loose = malloc(sizeof(float) * m);  /* sum_b reach_b: margin_j <= loose * l1_peaks_j */
    int *keep_all = malloc(sizeof(int) * m);
    uint8_t *candidate = calloc(n, 1);
    for (int r = 0; r < m; r++) {
        int32_t *w = ints + (int64_t)r * (k / 4 + blocks);
        float *f = floats + (int64_t)r * 3 * blocks;
        rows[r] = (screened_row){w, w + k / 4, f, f + blocks, f + 2 * blocks};
    }
    for (int r = 0; r < m; r += GROUP)  /* the rows the kernel scores together share their deltas */
        round_rows(x + (int64_t)r * k, m - r < GROUP ? m - r : GROUP, k, rows + r, keep_all + r);
    for (int r = 0; r < m; r++) {
        keep_all[r] = !keep_all[r];  /* round_rows said which rows are finite */
        loose[r] = 0.0f;
        for (int b = 0; b < blocks; b++)
            loose[r] += rows[r].reach[b];
    }
    /* While a panel is scored its successor's codes are fetched into L2, a block at a time: the
     * codes stream from memory (28 MB for SmolLM2), and without the fetch a panel's products wait
     * on it, with it into L1 they wait on the fetches (16 rows: 2.1 ms with none, 2.3 into L1,
     * 1.65 into L2, in place on the dev machine). */
    #pragma omp parallel for schedule(guided)
    for (int p = 0; p < panels; p++)
        for (int r = 0; r < m; r += GROUP)
            score_panel(s, p, k, rows + r, m - r < GROUP ? m - r : GROUP, scores + (int64_t)r * npad + p * LANES, npad,
                        r == 0 && p + 1 < panels ? panel_of(s, p + 1, k).codes4 : NULL);
    /* floor: the best score's lower bound, which the maximum logit reaches */
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < m; r++) {
        float peak;
        const int64_t best = first_argmax(scores + (int64_t)r * npad, n, &peak);
        floor_[r] = scores[(int64_t)r * npad + best] - margin(s, &rows[r], best, blocks);
    }
    /* a candidate: a row where its score is within its margin of the floor; tested first on the
     * looser margin sum_b reach_b * max_b l1_jb (one product, where the margin is a sum over blocks) */
    #pragma omp parallel for schedule(static)
    for (int start = 0; start < n; start += CHUNK) {
        const int end = n - start < CHUNK ? n : start + CHUNK;
        for (int r = 0; r < m; r++) {
            const float *score = scores + (int64_t)r * npad;
            if (keep_all[r])
                memset(candidate + start, 1, end - start);
            else
                for (int j = start; j < end; j++)  /* vectorised: no branch */
                    candidate[j] |= score[j] + loose[r] * s->l1_peaks[j] >= floor_[r];
        }
        for (int j = start; j < end; j++)  /* the few that pass: the margin itself, where it passed */
            if (candidate[j]) {
                int within = 0;
                for (int r = 0; r < m && !within; r++) {
                    const float score = scores[(int64_t)r * npad + j];
                    within = keep_all[r] || (score + loose[r] * s->l1_peaks[j] >= floor_[r]
                                             && score + margin(s, &rows[r], j, blocks) >= floor_[r]);
                }
                candidate[j] = within;
            }
    }
    int count = 0;
    for (int j = 0; j < n; j++)
        count += candidate[j];
    if (count == 0) {  /* the best-scoring token always passes; only scores beyond float's range get here */
        memset(candidate, 1, n);
        count = n;
    }
    /* the candidates' logits by the head's own kernel: their codes gathered, every row */
    int *ids = malloc(sizeof(int) * count);
    int8_t *picked = malloc((size_t)count * k);
    float *picked_scales = malloc(sizeof(float) * count * blocks), *picked_offsets = malloc(sizeof(float) * count * blocks);
    float *logits = malloc(sizeof(float) * m * count);
    for (int j = 0, c = 0; j < n; j++) {
        if (!candidate[j])
            continue;
        ids[c] = j;
        memcpy(picked + (int64_t)c * k, codes + (int64_t)j * k, k);
        memcpy(picked_scales + (int64_t)c * blocks, scales + (int64_t)j * blocks, sizeof(float) * blocks);
        memcpy(picked_offsets + (int64_t)c * blocks, offsets + (int64_t)j * blocks, sizeof(float) * blocks);
        c++;
    }
    linear(x, NULL, picked, picked_scales, picked_offsets, NULL, logits, m, count, k);
    for (int r = 0; r < m; r++) {
        float peak;
        tokens[r] = ids[first_argmax(logits + (int64_t)r * count, count, &peak)];  /* the sampler's rule */
    }
    free(rows), free(ints), free(floats), free(scores), free(floor_), free(loose), free(keep_all), free(candidate);
    free(ids), free(picked), free(picked_scales), free(picked_offsets), free(logits);
}
