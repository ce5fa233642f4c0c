/* A Linear on the CPU, fp32: y[m, n] = x[m, k] W[n, k]^T (+ bias), for any m.
 *
 * The weight comes either as fp32 rows or as *block codes*: each row cut into blocks of 32, each
 * value exactly scale * code + offset with one (scale, offset) per block and an int8 code. That is
 * how GGUF's Q4_1 and Q8_0 checkpoints store weights, and their fp32 conversion (the embedded
 * model) has exactly these values: the products of a float16 scale and a small integer are exact
 * in fp32, so expanding the codes gives back every weight bit for bit. Reading 1 byte a weight
 * instead of 4 is what makes a decode step fast here, where the weights don't fit the caches and
 * are streamed from memory every step. ``find_block_codes`` finds the codes of a weight, or says
 * there are none.
 *
 * The product is a grid of dot products along k. The weight rows are taken NR at a time (a panel,
 * expanded from codes into a small buffer that stays in cache while every row of x goes by), and
 * the x rows MR at a time: an MR x NR tile keeps MR * NR accumulators of 8 lanes in registers and
 * reads MR + NR vectors per MR * NR fused multiply-adds (2 x 6 fills AVX2's 16 registers with
 * room for the loads). Panels are split between torch's OpenMP threads (the runtime torch loaded:
 * one thread pool). Written with GCC vector extensions, so it compiles for any CPU; on the 2-core
 * AVX2 dev machine it runs SmolLM2-135M's weights at 16 rows in ~45-55 ms (oneDNN: 75-110 ms on
 * packed fp32 weights) and keeps up with oneDNN at prefill sizes (219 rows: 489 vs 491 ms), so it
 * serves every batch size. With its panel in L1 the 2 x 6 tile runs at 80-87% of the core's
 * multiply-add peak; at 16 rows in a real step the products ran at ~50% of it there (65-73% on the
 * Zen 4 machine that followed), and expanding the codes is most of the difference (packing Q4_1's
 * codes two to a byte, other tile shapes and expanding between tiles were all slower:
 * benchmarks/RESULTS.md). A panel longer than KC along k (the down
 * projection's 1,536) is taken a chunk of k at a time, each tile adding to what the last chunk left,
 * so that the panel stays in L1 beside the x rows going by (6 x 1,536 floats are 36 KB, more than
 * the Zen 4 dev machine's 32 KB of L1): its down projections 7.0 -> 6.0 ms a 16-row step, 161 -> 142
 * ms over a chat burst's prefill. Up to 8 rows take a path without the buffer (few_rows, below).
 * Where the CPU has AVX-512 VNNI, weights whose codes are all Q4_1's go to linear_q4.c instead.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec8.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 32  /* weights per (scale, offset) */
#define MR 2      /* x rows per tile */
#define NR 6      /* weight rows per tile (a panel) */
#define KC 768    /* the most of k a panel takes at once (a multiple of BLOCK) */

/* out = scale * code + offset for one row of k weights. With AVX-512, 16 at a time in intrinsics:
 * GCC vectorises the plain loop 8 wide even there; the wider expansion makes 16-row products
 * 89 -> 93 GFLOPS in cache on the Zen 4 dev machine, 1.5-3% faster over the model from memory. */
static void expand_row(const int8_t *codes, const float *scales, const float *offsets, float *out, int k)
{
    for (int b = 0; b < k / BLOCK; b++) {
        const float scale = scales[b], offset = offsets[b];  /* held: out might alias them, as far as C knows */
#ifdef __AVX512F__
        for (int i = 0; i < BLOCK; i += 16) {
            const __m512i code = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + b * BLOCK + i)));
            _mm512_storeu_ps(out + b * BLOCK + i,
                             _mm512_fmadd_ps(_mm512_set1_ps(scale), _mm512_cvtepi32_ps(code), _mm512_set1_ps(offset)));
        }
#else
        for (int i = 0; i < BLOCK; i++)
            out[b * BLOCK + i] = scale * (float)codes[b * BLOCK + i] + offset;
#endif
    }
}

/* Left alone, GCC folds the weight load into each multiply-add that uses it, loading it MR times:
 * 14 loads per 12 FMAs for a 2 x 6 tile, more than the load ports take. Loading it once into a
 * register (8 loads per 12) makes the tile 15% faster on the dev machine. */
#ifdef __AVX__
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))  /* an AVX register holds all 8 lanes */
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif

/* y[r, c] = x[r] . w[c] for r < ROWS x rows (stride ldx) and c < NR weight rows (stride ldw), over
 * k: plus bias[c] (or nothing), or, to accumulate a product cut along k, plus y[r, c]. */
#define DEFINE_TILE(ROWS)                                                                          \
static inline void tile##ROWS(const float *x, int64_t ldx, const float *w, int ldw, int k,        \
                              float *y, int64_t ldy, const float *bias, int accumulate)            \
{                                                                                                  \
    v8f acc[ROWS][NR];                                                                             \
    for (int r = 0; r < ROWS; r++)                                                                 \
        for (int c = 0; c < NR; c++)                                                               \
            acc[r][c] = (v8f){0};                                                                  \
    for (int i = 0; i < k; i += 8) {                                                               \
        v8f xs[ROWS];                                                                              \
        for (int r = 0; r < ROWS; r++)                                                             \
            xs[r] = load8(x + r * ldx + i);                                                        \
        for (int c = 0; c < NR; c++) {                                                             \
            v8f wv = load8(w + (int64_t)c * ldw + i);                                              \
            KEEP_IN_REGISTER(wv);                                                                  \
            for (int r = 0; r < ROWS; r++)                                                         \
                acc[r][c] += xs[r] * wv;                                                           \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < ROWS; r++)                                                                 \
        for (int c = 0; c < NR; c++)                                                               \
            y[r * ldy + c] = sum8(acc[r][c]) + (accumulate ? y[r * ldy + c] : bias ? bias[c] : 0.0f); \
}
DEFINE_TILE(1)
DEFINE_TILE(2)

/* Up to FEW_ROWS rows on block codes (a few sequences decoding): every weight is used by only a
 * few rows, so expanding the codes into the panel buffer (a store and a load per weight) costs
 * more than the products. Here each 8 codes are expanded in registers and go straight into every
 * row's sum: 1 row 20 -> 15 ms, 8 rows 37 -> 30 ms over SmolLM2 on the dev machine. Written with
 * AVX2 intrinsics because GCC's generic vector conversions from int8 come out scalar; without AVX2
 * the panel path serves these sizes too. */
#ifdef __AVX2__
#define FEW_ROWS 8

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* y[r, j] = x[r] . weight[j] (+ bias[j]) for ROWS rows; sums for 1-3 rows are split in two so
 * that two chains of dependent multiply-adds are in flight. */
#define DEFINE_FEW_ROWS(ROWS)                                                                      \
static void few_rows##ROWS(const float *x, const int8_t *codes, const float *scales,                 \
                           const float *offsets, const float *bias, float *y, int n, int k)          \
{                                                                                                  \
    enum { SUMS = ROWS < 4 ? 2 : 1 };                                                              \
    const int blocks = k / BLOCK;                                                                  \
    _Pragma("omp parallel for schedule(static)")                                                   \
    for (int j = 0; j < n; j++) {                                                                  \
        const int8_t *q = codes + (int64_t)j * k;                                                  \
        __m256 acc[ROWS][SUMS];                                                                    \
        for (int r = 0; r < ROWS; r++)                                                             \
            for (int s = 0; s < SUMS; s++)                                                         \
                acc[r][s] = _mm256_setzero_ps();                                                   \
        for (int b = 0; b < blocks; b++) {                                                         \
            const __m256 scale = _mm256_set1_ps(scales[(int64_t)j * blocks + b]);                  \
            const __m256 offset = _mm256_set1_ps(offsets[(int64_t)j * blocks + b]);                \
            for (int i = 0; i < BLOCK; i += 8) {  /* a constant count: unrolled, sums in registers */ \
                const int at = b * BLOCK + i;                                                      \
                const __m256i code = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + at))); \
                const __m256 w = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(code), offset);         \
                for (int r = 0; r < ROWS; r++)                                                     \
                    acc[r][(i / 8) % SUMS] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (int64_t)r * k + at), \
                                                             acc[r][(i / 8) % SUMS]);              \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < ROWS; r++) {                                                           \
            const __m256 sum = SUMS == 2 ? _mm256_add_ps(acc[r][0], acc[r][SUMS - 1]) : acc[r][0];  \
            y[(int64_t)r * n + j] = hsum(sum) + (bias ? bias[j] : 0.0f);                           \
        }                                                                                          \
    }                                                                                              \
}
DEFINE_FEW_ROWS(1)
DEFINE_FEW_ROWS(2)
DEFINE_FEW_ROWS(3)
DEFINE_FEW_ROWS(4)
DEFINE_FEW_ROWS(5)
DEFINE_FEW_ROWS(6)
DEFINE_FEW_ROWS(7)
DEFINE_FEW_ROWS(8)

typedef void (*few_rows_fn)(const float *, const int8_t *, const float *, const float *, const float *, float *, int, int);
static const few_rows_fn few_rows[FEW_ROWS + 1] = {
    NULL, few_rows1, few_rows2, few_rows3, few_rows4, few_rows5, few_rows6, few_rows7, few_rows8};
#endif

/* Either weight (fp32 [n, k]) or codes/scales/offsets (int8 [n, k], fp32 [n, k / 32] twice) is
 * given; k is a multiple of 8 (of 32 with codes). */
void linear(const float *x, const float *weight, const int8_t *codes, const float *scales,
            const float *offsets, const float *bias, float *y, int m, int n, int k)
{
    if (m == 0)  /* a step whose rows all continue a prompt's chunk wants no logits */
        return;
#ifdef __AVX2__
    if (codes != NULL && m <= FEW_ROWS) {
        few_rows[m](x, codes, scales, offsets, bias, y, n, k);
        return;
    }
#endif
    const int panels = (n + NR - 1) / NR, blocks = k / BLOCK;
    const int kc = k > KC ? KC : k;  /* a panel's length along k: NR x KC floats stay in L1 beside x's rows */
    #pragma omp parallel
    {
        /* a panel expanded from codes, or an edge panel; aligned so no vector load straddles two cache lines */
        float *buffer = aligned_alloc(64, sizeof(float) * NR * kc);
        /* every row's results where the panel is cut short (the last one), kept across k's chunks */
        float *edge = malloc(sizeof(float) * ((m + MR - 1) / MR) * MR * NR);
        /* guided: large runs of panels first, smaller ones as the threads near the end, so that the
         * thread finishing first takes the other's last panels. The two vCPUs of the dev machine
         * do not run at one speed (which one lags changes from minute to minute): with halves
         * fixed in advance one thread waited out 0.1-0.3 s of a 4.5 s chat burst at the barrier,
         * 0.04-0.1 s with guided; the burst 0.964x the time (11 of 12 alternating pairs faster). */
        #pragma omp for schedule(guided)
        for (int p = 0; p < panels; p++) {
            const int j0 = p * NR, rows = n - j0 < NR ? n - j0 : NR;
            /* The next panel's weight bytes are fetched from memory a share per tile (of k's last
             * chunk), so that expanding it does not start by waiting on memory: the weights are read
             * in bursts (a panel, then ~1 us of products), which the hardware prefetcher does not
             * run far enough ahead of. 4-9% over SmolLM2's weights at 16-64 rows (session 5's
             * prefetch of whole panels, issued at once, gained nothing). The next panel is this
             * thread's own except at the end of one of its guided runs, where the fetch serves the
             * other thread or goes unused. */
            const int next_rows = n - j0 - NR < NR ? n - j0 - NR : NR;  /* <= 0 after the last panel */
            const int64_t next_bytes = next_rows > 0 ? (int64_t)next_rows * k * (codes ? 1 : sizeof(float)) : 0;
            const char *next = next_bytes == 0 ? NULL
                             : codes ? (const char *)(codes + (int64_t)(j0 + NR) * k)
                                     : (const char *)(weight + (int64_t)(j0 + NR) * k);
            const int tiles = (m + MR - 1) / MR;
            for (int k0 = 0; k0 < k; k0 += kc) {
                const int len = k - k0 < kc ? k - k0 : kc, last_chunk = k0 + len == k;
                const float *w = buffer;
                int ldw = len;
                if (codes == NULL && rows == NR) {
                    w = weight + (int64_t)j0 * k + k0;
                    ldw = k;
                } else {
                    for (int c = 0; c < NR; c++) {
                        const int64_t j = j0 + c;
                        if (c >= rows)
                            memset(buffer + c * len, 0, sizeof(float) * len);
                        else if (codes == NULL)
                            memcpy(buffer + c * len, weight + j * k + k0, sizeof(float) * len);
                        else
                            expand_row(codes + j * k + k0, scales + j * blocks + k0 / BLOCK,
                                       offsets + j * blocks + k0 / BLOCK, buffer + c * len, len);
                    }
                }
                for (int r = 0; r < m; r += MR) {
                    if (last_chunk)
                        for (int64_t at = next_bytes * (r / MR) / tiles / 64 * 64; at < next_bytes * (r / MR + 1) / tiles; at += 64)
                            __builtin_prefetch(next + at);
                    const float *xr = x + (int64_t)r * k + k0;
                    const int tile_rows = m - r < MR ? m - r : MR;
                    float *out = rows == NR ? y + (int64_t)r * n + j0 : edge + (int64_t)r * NR;
                    const int64_t ldy = rows == NR ? n : NR;
                    const float *b = bias && rows == NR ? bias + j0 : NULL;
                    if (tile_rows == 2)
                        tile2(xr, k, w, ldw, len, out, ldy, b, k0 > 0);
                    else
                        tile1(xr, k, w, ldw, len, out, ldy, b, k0 > 0);
                    if (rows < NR && last_chunk)
                        for (int tr = 0; tr < tile_rows; tr++)
                            for (int c = 0; c < rows; c++)
                                y[(int64_t)(r + tr) * n + j0 + c] = out[tr * NR + c] + (bias ? bias[j0 + c] : 0.0f);
                }
            }
        }
        free(buffer);
        free(edge);
    }
}

/* scale rounded to float16's 11 significant bits (GGUF stores scales as float16; the conversion's
 * fp32 weights are products of those). Out-of-range values just fail the exactness check. */
static float round_to_half(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits = (bits + 0x1000u) & ~0x1fffu;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* 1 when every code reproduces its weight exactly under (scale, offset). */
static int encode_block(const float *w, float scale, float offset, int lo, int hi, int8_t *codes)
{
    for (int i = 0; i < BLOCK; i++) {
        float q = scale > 0.0f ? __builtin_rintf((w[i] - offset) / scale) : 0.0f;
        q = q < lo ? lo : q > hi ? hi : q;
        if (scale * q + offset != w[i])
            return 0;
        codes[i] = (int8_t)q;
    }
    return 1;
}

/* Fills codes/scales/offsets for weight [n, k] (k a multiple of 32) and returns 1 when every
 * block is exactly Q4_1 (scale * [0, 15] + min) or Q8_0 (scale * [-127, 127]); else returns 0. */
int find_block_codes(const float *weight, int n, int k, int8_t *codes, float *scales, float *offsets)
{
    const int64_t blocks = (int64_t)n * (k / BLOCK);
    int exact = 1;
    #pragma omp parallel for schedule(static) reduction(&& : exact)
    for (int64_t b = 0; b < blocks; b++) {
        const float *w = weight + b * BLOCK;
        float lo = w[0], hi = w[0];
        for (int i = 1; i < BLOCK; i++) {
            lo = w[i] < lo ? w[i] : lo;
            hi = w[i] > hi ? w[i] : hi;
        }
        const float absmax = -lo > hi ? -lo : hi;
        const float q4_scale = round_to_half((hi - lo) / 15.0f), q8_scale = round_to_half(absmax / 127.0f);
        if (encode_block(w, q4_scale, lo, 0, 15, codes + b * BLOCK)) {
            scales[b] = q4_scale, offsets[b] = lo;
        } else if (encode_block(w, q8_scale, 0.0f, -127, 127, codes + b * BLOCK)) {
            scales[b] = q8_scale, offsets[b] = 0.0f;
        } else {
            exact = 0;
        }
    }
    return exact;
}
