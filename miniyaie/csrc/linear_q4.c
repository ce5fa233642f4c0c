/* A Linear on Q4_1 block codes in integers: y[m, n] = x[m, k] W[n, k]^T (+ bias), W = scale * code +
 * offset per block of 32 along k with codes in [0, 15] (linear.c's block codes; GGUF's Q4_1, the
 * embedded model's layers), at fp32's precision.
 *
 * linear.c expands the codes to fp32 and multiplies in fp32: 16 multiply-adds a cycle on a Zen 4
 * core at best. AVX-512 VNNI multiplies bytes: `vpdpbusd` adds 64 products of an unsigned byte and
 * a signed byte into 16 int32 sums, once a cycle. The codes are bytes already; x is made bytes
 * without giving up fp32's precision by splitting it in three. Per block of 32 values of a row,
 * delta = max |x| / 2^22 and x ~ delta * X with X = round(x / delta), an integer of 23 bits (the
 * block's largest value keeps 23 significant bits; fp32 keeps 24 per value), written in base 256
 * with signed digits: X = 65536 h + 256 m + l, each in [-128, 127]. The codes times X are exact in
 * int32 by Horner's rule (the h products, times 256, plus the m products, times 256, plus the l
 * products; int32 wraps, but the result, (code - 8) . X below, is within 8 * 32 * 2^22 = 2^30), and
 * a block adds
 *
 *     delta * (scale * (code - 8) . X + (offset + 8 * scale) * sum(X))
 *
 * to the row's fp32 sum: the codes centred on 0 (8 * sum(X) taken off the integer), so that neither
 * term is much larger than the block's share of the result; with raw codes the offset term is large
 * and cancels, and the error was ~10x fp32's on weights not centred on 0. Three byte products per
 * value of x: 21 multiply-adds a cycle at best, and the conversion and scaling once a block take 7
 * operations to the block's 24 `vpdpbusd`: 16-row products 0.70-0.82x linear.c's time over the
 * model's weight shapes on the 2-core dev machine (Zen 4), 0.72-0.78x at prefill sizes. On real
 * rows through SmolLM2's layers the error against float64 is 1.2x linear.c's as the median over
 * the Linears, 2.3x at most (benchmarks/RESULTS.md, session 15). Bias is added last.
 *
 * q4_layout lays the codes out once, as the head's screen does (greedy_head.c): 16 weight rows side
 * by side, their codes 4 along k at a time ([n / 16][k / 4][16][4]: one 64-byte load feeds a
 * `vpdpbusd`), and the blocks' scales and centred offsets [n / 16][k / 32][16]; n padded to whole
 * tiles with zero rows. A tile is TILE_ROWS x rows by 32 weight rows: 12 int32 sums for the block
 * in progress and 12 fp32 sums in registers. Without VNNI (q4_products_fast() == 0) the same
 * arithmetic runs in plain C — the tests' path there; the engine keeps linear.c, faster there.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512VNNI__
#include <immintrin.h>
#endif

#include "kernels.h"

#define BLOCK 32          /* weights per (scale, offset) (linear.c) */
#define LANES 16          /* weight rows side by side in the layout */
#define TILE_COLS 32      /* weight rows a tile covers: two vectors of 16 */
#define TILE_ROWS 6       /* x rows a tile covers */
#define X_STEPS 4194304.0f  /* 2^22: X's range is [-2^22, 2^22] */
#define DIGITS 3          /* bytes of X: h, m, l */
#define CENTRE 8          /* taken off every code: Q4_1's [0, 15] centred on 0 */

int q4_products_fast(void)
{
#ifdef __AVX512VNNI__
    return 1;
#else
    return 0;
#endif
}

/* Fills q (codes [panels][k / 4][16][4], scales and offsets + CENTRE * scales [panels][k / 32][16],
 * panels = n padded to TILE_COLS, over 16) from codes [n, k], scales/offsets [n, k / 32]. Returns 0,
 * leaving q part filled, when some code is outside Q4_1's [0, 15] or a centred offset is not exact. */
int q4_layout(const int8_t *codes, const float *scales, const float *offsets, int n, int k, q4_panels q)
{
    const int panels = (n + TILE_COLS - 1) / TILE_COLS * TILE_COLS / LANES, blocks = k / BLOCK;
    int fits = 1;  /* every code in [0, 15], every offset + CENTRE * scale exact in fp32 */
    #pragma omp parallel for schedule(static) reduction(&& : fits)
    for (int p = 0; p < panels; p++)
        for (int lane = 0; lane < LANES; lane++) {
            const int64_t j = (int64_t)p * LANES + lane;
            for (int i = 0; i < k; i++) {
                const int8_t c = j < n ? codes[j * k + i] : 0;
                fits = fits && c >= 0 && c <= 15;
                ((uint8_t *)q.codes)[(((int64_t)p * (k / 4) + i / 4) * LANES + lane) * 4 + i % 4] = (uint8_t)c;
            }
            for (int b = 0; b < blocks; b++) {
                const int64_t at = ((int64_t)p * blocks + b) * LANES + lane;
                const float scale = j < n ? scales[j * blocks + b] : 0.0f, offset = j < n ? offsets[j * blocks + b] : 0.0f;
                /* volatile: -ffast-math would fold (offset + 8 scale) - 8 scale to offset */
                const volatile float centred = offset + CENTRE * scale;
                fits = fits && centred - CENTRE * scale == offset;
                ((float *)q.scales)[at] = scale;
                ((float *)q.offsets)[at] = centred;
            }
        }
    return fits;
}

/* x's rows split into digits: per row and block, the 32 h, then m, then l bytes (8 words each:
 * `vpdpbusd` broadcasts a word of 4), CENTRE * sum(X), delta and delta * sum(X). */
typedef struct {
    int32_t *digits;      /* [rows][blocks][DIGITS][8] */
    int32_t *centring;    /* [rows][blocks] */
    float *deltas, *sums; /* [rows][blocks] */
} split_rows;

static void split_block(const float *v, int8_t *digits, int32_t *centring, float *delta, float *sum)
{
    /* the largest |x| by its bits, so that an inf or NaN is the peak (as -ffast-math's fmaxf need not
     * make it): delta is then not a number, and so is every output of the row, as with fp32 products */
    uint32_t top = 0;
    for (int i = 0; i < BLOCK; i++) {
        uint32_t bits;
        memcpy(&bits, v + i, sizeof bits);
        top = (bits & 0x7fffffffu) > top ? bits & 0x7fffffffu : top;
    }
    float peak;
    memcpy(&peak, &top, sizeof peak);
    const float inv = top > 0 && top < 0x7f800000u ? X_STEPS / peak : 0.0f;
    int32_t total = 0;
#ifdef __AVX512VNNI__
    const __m512i half = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(255);
    __m512i totals = _mm512_setzero_si512();
    for (int i = 0; i < BLOCK; i += 16) {
        const __m512i X = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(inv)));
        /* l = X's low byte as a signed digit, then (X - l) / 256's, then what is left */
        const __m512i l = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, half), byte), half);
        const __m512i rest = _mm512_srai_epi32(_mm512_sub_epi32(X, l), 8);
        const __m512i m = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(rest, half), byte), half);
        const __m512i h = _mm512_srai_epi32(_mm512_sub_epi32(rest, m), 8);
        _mm_storeu_si128((__m128i *)(digits + i), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128((__m128i *)(digits + BLOCK + i), _mm512_cvtepi32_epi8(m));
        _mm_storeu_si128((__m128i *)(digits + 2 * BLOCK + i), _mm512_cvtepi32_epi8(l));
        totals = _mm512_add_epi32(totals, X);
    }
    total = _mm512_reduce_add_epi32(totals);
#else
    for (int i = 0; i < BLOCK; i++) {
        const int32_t X = inv > 0.0f ? (int32_t)rintf(v[i] * inv) : 0;  /* an inf's or NaN's block: 0 */
        const int32_t l = ((X + 128) & 255) - 128, rest = (X - l) >> 8, m = ((rest + 128) & 255) - 128;
        digits[i] = (int8_t)((rest - m) >> 8), digits[BLOCK + i] = (int8_t)m, digits[2 * BLOCK + i] = (int8_t)l;
        total += X;
    }
#endif
    *centring = CENTRE * total;
    *delta = peak / X_STEPS;
    *sum = *delta * (float)total;
}

static void split(const float *x, int r0, int r1, int k, split_rows s)
{
    const int blocks = k / BLOCK;
    for (int64_t r = r0; r < r1; r++)
        for (int b = 0; b < blocks; b++)
            split_block(x + r * k + b * BLOCK, (int8_t *)(s.digits + (r * blocks + b) * DIGITS * 8),
                        s.centring + r * blocks + b, s.deltas + r * blocks + b, s.sums + r * blocks + b);
}

/* out[r, 0:32] (ld floats apart) = rows r0.. of x times the 32 weight rows at panel p0 (and p0 + 1). */
#ifdef __AVX512VNNI__
#define DEFINE_TILE(ROWS)                                                                          \
static void tile##ROWS(q4_panels q, int p0, int k, split_rows s, int r0, float *out, int64_t ld)   \
{                                                                                                  \
    enum { C = TILE_COLS / LANES };                                                                \
    const int blocks = k / BLOCK;                                                                  \
    const uint8_t *codes = (const uint8_t *)q.codes + (int64_t)p0 * (k / 4) * LANES * 4;           \
    const float *scales = q.scales + (int64_t)p0 * blocks * LANES, *offsets = q.offsets + (int64_t)p0 * blocks * LANES; \
    __m512 acc[ROWS][C];                                                                           \
    for (int r = 0; r < ROWS; r++)                                                                 \
        for (int c = 0; c < C; c++)                                                                \
            acc[r][c] = _mm512_setzero_ps();                                                       \
    for (int b = 0; b < blocks; b++) {                                                             \
        __m512i dot[ROWS][C];                                                                      \
        const int32_t *digits[ROWS];                                                               \
        for (int r = 0; r < ROWS; r++) {                                                           \
            digits[r] = s.digits + ((int64_t)(r0 + r) * blocks + b) * DIGITS * 8;                  \
            for (int c = 0; c < C; c++)                                                            \
                dot[r][c] = _mm512_setzero_si512();                                                \
        }                                                                                          \
        for (int d = 0; d < DIGITS; d++) {  /* Horner's rule: times 256 before the next digit */   \
            if (d > 0)                                                                             \
                for (int r = 0; r < ROWS; r++)                                                     \
                    for (int c = 0; c < C; c++)                                                    \
                        dot[r][c] = _mm512_slli_epi32(dot[r][c], 8);                               \
            for (int i = 0; i < BLOCK / 4; i++)                                                    \
                for (int c = 0; c < C; c++) {                                                      \
                    const __m512i w = _mm512_loadu_si512(codes + (((int64_t)c * (k / 4) + b * (BLOCK / 4) + i) * LANES * 4)); \
                    for (int r = 0; r < ROWS; r++)                                                 \
                        dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], w, _mm512_set1_epi32(digits[r][d * 8 + i])); \
                }                                                                                  \
        }                                                                                          \
        for (int c = 0; c < C; c++) {                                                              \
            const __m512 scale = _mm512_loadu_ps(scales + ((int64_t)c * blocks + b) * LANES);      \
            const __m512 offset = _mm512_loadu_ps(offsets + ((int64_t)c * blocks + b) * LANES);    \
            for (int r = 0; r < ROWS; r++) {                                                       \
                const int64_t at = (int64_t)(r0 + r) * blocks + b;                                 \
                const __m512i centred = _mm512_sub_epi32(dot[r][c], _mm512_set1_epi32(s.centring[at])); \
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred),                           \
                                            _mm512_mul_ps(scale, _mm512_set1_ps(s.deltas[at])), acc[r][c]); \
                acc[r][c] = _mm512_fmadd_ps(offset, _mm512_set1_ps(s.sums[at]), acc[r][c]);       \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < ROWS; r++)                                                                 \
        for (int c = 0; c < C; c++)                                                                \
            _mm512_storeu_ps(out + r * ld + c * LANES, acc[r][c]);                                 \
}
DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)

typedef void (*tile_fn)(q4_panels, int, int, split_rows, int, float *, int64_t);
static const tile_fn tiles[TILE_ROWS + 1] = {NULL, tile1, tile2, tile3, tile4, tile5, tile6};

static void tile(q4_panels q, int p0, int k, split_rows s, int r0, int rows, float *out, int64_t ld)
{
    tiles[rows](q, p0, k, s, r0, out, ld);
}
#else
static void tile(q4_panels q, int p0, int k, split_rows s, int r0, int rows, float *out, int64_t ld)
{
    const int blocks = k / BLOCK;
    for (int r = r0; r < r0 + rows; r++)
        for (int col = 0; col < TILE_COLS; col++) {
            const int64_t p = p0 + col / LANES, lane = col % LANES;
            float acc = 0.0f;
            for (int b = 0; b < blocks; b++) {
                const int8_t *digits = (const int8_t *)(s.digits + ((int64_t)r * blocks + b) * DIGITS * 8);
                int32_t dot = 0;
                for (int d = 0; d < DIGITS; d++) {
                    dot *= 256;
                    for (int i = b * BLOCK; i < (b + 1) * BLOCK; i++)
                        dot += (int32_t)((const uint8_t *)q.codes)[((p * (k / 4) + i / 4) * LANES + lane) * 4 + i % 4]
                             * digits[d * BLOCK + i - b * BLOCK];
                }
                const int64_t wb = (p * blocks + b) * LANES + lane, at = (int64_t)r * blocks + b;
                acc += (float)(dot - s.centring[at]) * (q.scales[wb] * s.deltas[at]);
                acc += q.offsets[wb] * s.sums[at];
            }
            out[(r - r0) * ld + col] = acc;
        }
}
#endif

/* q from q4_layout of a weight [n, k], k a multiple of 32. */
void linear_q4(const float *x, q4_panels q, const float *bias, float *y, int m, int n, int k)
{
    if (m == 0)
        return;
    const int blocks = k / BLOCK, spans = (n + TILE_COLS - 1) / TILE_COLS;
    const split_rows s = {malloc(sizeof(int32_t) * m * blocks * DIGITS * 8), malloc(sizeof(int32_t) * m * blocks),
                          malloc(sizeof(float) * m * blocks), malloc(sizeof(float) * m * blocks)};
    #pragma omp parallel
    {
        const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
        split(x, (int64_t)m * thread / threads, (int64_t)m * (thread + 1) / threads, k, s);
        #pragma omp barrier
        float edge[TILE_ROWS * TILE_COLS];  /* the last span's columns past n */
        /* guided, as linear.c's panels: the thread that finishes first takes the other's last spans */
        #pragma omp for schedule(guided)
        for (int t = 0; t < spans; t++) {
            const int j0 = t * TILE_COLS, cols = n - j0 < TILE_COLS ? n - j0 : TILE_COLS;
            for (int r = 0; r < m; r += TILE_ROWS) {
                const int rows = m - r < TILE_ROWS ? m - r : TILE_ROWS;
                float *out = cols == TILE_COLS ? y + (int64_t)r * n + j0 : edge;
                const int64_t ld = cols == TILE_COLS ? n : TILE_COLS;
                tile(q, j0 / LANES, k, s, r, rows, out, ld);
                if (out == edge || bias)
                    for (int tr = 0; tr < rows; tr++)
                        for (int c = 0; c < cols; c++)
                            y[(int64_t)(r + tr) * n + j0 + c] = out[tr * ld + c] + (bias ? bias[j0 + c] : 0.0f);
            }
        }
    }
    free(s.digits);
    free(s.centring);
    free(s.deltas);
    free(s.sums);
}
