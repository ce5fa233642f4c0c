/* The sampling pipeline on the CPU, fp32 logits [rows, vocab], a row at a time: temperature, top-k,
 * top-p, min-p, then the token (greedy: the argmax; sampled: inverse-CDF over the kept tokens in
 * vocabulary order, with the row's one uniform), its log-probability and the most likely entries of
 * the processed distribution. The same pipeline and rules as SamplingKernel's torch stages
 * (miniyaie/sampling.py), which stay the reference and the path on other devices.
 *
 * torch needs ~20 [B, V] passes for it (a division, a top-k, a scatter into a full -inf row, a
 * log-softmax, an exp, a float64 copy and cumsum, another top-k): ~9.5 ms a step for 16 rows of
 * SmolLM2's 49,152 logits with the demo's temperature 0.7 / top-k 40 / top-p 0.95 on the 2-core dev
 * machine, a sixth of the step; here ~0.35 ms. A row is a pass for its maximum and one that keeps its
 * best entries in a short sorted list; top-k and top-p cut that list, so the kept tokens (and their
 * softmax) come from it without touching the rest of the row again. Only rows whose kept set is not a cut of a
 * short list go over the row again: no top-k and no top-p (every token, or those min-p keeps), and
 * top-p without top-k where the 64 best do not reach p (the tokens down to where the mass reaches p
 * are sorted, then cut).
 *
 * The sorted order puts larger values first and, among equal values, the smaller id (argmax's
 * tie rule). No infinities are used (fast-math assumes none): the maximum starts at -FLT_MAX.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#include "kernels.h"

#define MAX_TOP 64     /* the most alternatives reported (cpu_kernels.MAX_TOP) */
#define FIRST_TRY 64   /* top-p without top-k first looks for its cut among this many best */
#define BINS 512       /* ... then by its softmax mass in bins of SPAN / BINS below the peak */
#define SPAN 32.0f     /* exp(-32): ~1e-14 of the peak's weight, past any top-p's cut */

typedef struct {
    float z;  /* the logit while the list is built, then divided by the temperature */
    int32_t id;
} entry;

/* Offer (z, id) to list[0:*n], sorted, at most cap long. Ids arrive in increasing order, so an
 * equal value never goes ahead of one already there. */
static void offer(entry *list, int *n, int cap, float z, int32_t id)
{
    if (*n == cap && z <= list[cap - 1].z)
        return;
    int j = *n < cap ? (*n)++ : cap - 1;
    for (; j > 0 && z > list[j - 1].z; j--)
        list[j] = list[j - 1];
    list[j] = (entry){z, id};
}

static int by_rank(const void *a, const void *b)
{
    const entry *x = a, *y = b;
    return x->z > y->z ? -1 : x->z < y->z ? 1 : (x->id > y->id) - (x->id < y->id);
}

static int by_id(const void *a, const void *b)
{
    return (((const entry *)a)->id > ((const entry *)b)->id) - (((const entry *)a)->id < ((const entry *)b)->id);
}

/* How many of the sorted list's first entries top-p keeps: a position stays while the softmax mass
 * strictly before it (over the first `over` entries, or over `norm` when given) is < p. Returns -1
 * when the list ends before the mass reaches p (the cut lies past it). */
static int top_p_cut(const entry *list, int n, int over, double norm, float p)
{
    const float peak = list[0].z;
    if (norm <= 0.0)
        for (int j = 0; j < over; j++)
            norm += expf(list[j].z - peak);
    float mass = 0.0f;
    for (int j = 0; j < n && j < over; j++) {
        const float prob = (float)(expf(list[j].z - peak) / norm);
        mass += prob;
        if (mass - prob >= p)  /* torch's cumsum - probs: the mass before position j */
            return j;
    }
    return n >= over ? over : -1;
}

/* x / t as torch divides (t == 1: x itself). */
static inline float scale(float x, float t)
{
    return t == 1.0f ? x : x / t;
}

/* The first index of x's maximum (argmax's tie rule), on the logits themselves: dividing by t > 0
 * keeps their order. A row of NaNs has no maximum: then any index, in range. (greedy_head.c's
 * tokens follow the same rule through it.) */
int64_t first_argmax(const float *x, int vocab, float *peak_logit)
{
    float peak = -FLT_MAX;
    for (int i = 0; i < vocab; i++)  /* a plain reduction: vectorised */
        peak = fmaxf(peak, x[i]);
    int64_t best = 0;
#ifdef __AVX__
    for (; best + 8 <= vocab; best += 8)  /* 8 at a time to the block holding it */
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + best), _mm256_set1_ps(peak), _CMP_EQ_OQ)))
            break;
#endif
    best = best < vocab ? best : vocab - 1;
    while (best < vocab - 1 && x[best] != peak)
        best++;
    *peak_logit = peak;
    return best;
}

/* list[0:n] = the row's cap best, sorted, their values divided by t; returns n (< cap only in a row
 * with NaNs). Found on the logits (dividing keeps their order), so only the listed are divided. */
static int list_best(const float *x, int vocab, float t, entry *list, int cap)
{
    int n = 0, next = 0;  /* entries listed; the next logit to offer */
#ifdef __AVX__
    /* After the first few hundred logits almost none enter: test 8 at a time against the last
     * entry and offer only where one of them beats it (one at a time, the demo's 16 rows took
     * 1.4 ms on the 2-core dev machine; with this and argmax's blockwise search, ~0.35). */
    for (; cap > 0 && next + 8 <= vocab; next += 8) {
        const float last = n == cap ? list[cap - 1].z : -FLT_MAX;
        const __m256 beats = _mm256_cmp_ps(_mm256_loadu_ps(x + next), _mm256_set1_ps(last), _CMP_GT_OQ);
        if (_mm256_movemask_ps(beats) != 0)
            for (int i = next; i < next + 8; i++)
                offer(list, &n, cap, x[i], i);
    }
#endif
    for (; cap > 0 && next < vocab; next++)
        offer(list, &n, cap, x[next], next);
    for (int j = 0; j < n; j++)
        list[j].z = scale(list[j].z, t);
    return n;
}

/* Top-p without top-k whose cut lies past the list: sorted[0:*listed] = the tokens down to two
 * bins below the one where the softmax mass reaches p (mass: the row's weights exp(z - peak) in
 * bins of SPAN / BINS below the peak, summing to norm) — a prefix of the sorted order holding the
 * cut — or, if rounding left the cut outside it, the whole row. Returns the cut. A flat row's cut
 * lies thousands of tokens down: sorting all 49,152 took ~4 ms a row (16 flat rows at top-p 0.9:
 * 65 -> 5.8 ms; torch's stages 47). */
static int sort_to_cut(const float *x, int vocab, float t, float peak, const double *mass, double norm,
                       float top_p, entry *sorted, int *listed)
{
    int keep = -1;
    for (int whole = 0; keep < 0 && whole < 2; whole++) {
        int deep = 0;
        for (double reached = mass[0]; deep < BINS - 1 && reached < top_p * norm; reached += mass[++deep])
            ;
        const float edge = whole || deep + 2 >= BINS ? -FLT_MAX : peak - (deep + 2) * (SPAN / BINS);
        *listed = 0;
        for (int i = 0; i < vocab; i++)
            if (scale(x[i], t) >= edge)
                sorted[(*listed)++] = (entry){scale(x[i], t), i};
        qsort(sorted, *listed, sizeof(entry), by_rank);
        keep = top_p_cut(sorted, *listed, vocab, norm, top_p);
    }
    return keep < 0 ? *listed : keep;  /* only a row with NaNs (a NaN mass) never reaches p */
}

/* The inverse CDF over kept[0:keep] (any order): the token i whose cumulative probability in
 * vocabulary order first exceeds u times the total. */
static int64_t draw_from(entry *kept, int keep, float peak, float log_norm, double u)
{
    qsort(kept, keep, sizeof(entry), by_id);
    double total = 0.0;
    for (int j = 0; j < keep; j++)
        total += (double)expf((kept[j].z - peak) - log_norm);
    const double target = fmin(u * total, nextafter(total, 0.0));
    double cdf = 0.0;
    int j = 0;
    for (; j < keep - 1; j++) {
        cdf += (double)expf((kept[j].z - peak) - log_norm);
        if (cdf > target)
            break;
    }
    return kept[j].id;
}

/* One row: see the file's comment. temperature 0 (greedy) reports the distribution at 1. */
static void sample_row(const float *x, int vocab, float temperature, int64_t top_k, float top_p, float min_p,
                       int greedy, double u, int top, int want_logprob, float *scratch,
                       int64_t *token, float *logprob, int64_t *top_ids, float *top_probs)
{
    const float t = temperature > 0.0f ? temperature : 1.0f;
    float peak_logit;
    *token = first_argmax(x, vocab, &peak_logit);  /* filters never remove the maximum */
    *logprob = NAN;
    if (greedy && !want_logprob && top == 0)
        return;
    const float peak = scale(peak_logit, t);

    const int cut_k = top_k < vocab, cut_p = top_p < 1.0f;
    int cap = cut_k ? (int)top_k : cut_p ? FIRST_TRY : 0;
    cap = cap < top ? top : cap;
    cap = cap > vocab ? vocab : cap;
    entry small[FIRST_TRY > MAX_TOP ? FIRST_TRY : MAX_TOP];
    entry *list = cap <= (int)(sizeof small / sizeof small[0]) ? small : malloc(sizeof(entry) * cap);
    const int n = list_best(x, vocab, t, list, cap);
    if (cap > 0 && n == 0) {  /* nothing beat -FLT_MAX: a row of NaNs; report no distribution */
        for (int j = 0; j < top; j++)
            top_ids[j] = j, top_probs[j] = 0.0f;
        if (list != small)
            free(list);
        return;
    }

    /* the kept tokens: the first `keep` of the sorted order (keep < 0: all), then min-p's floor */
    int keep = cut_k ? (int)top_k : -1, listed = n;
    entry *sorted = list;
    if (cut_p) {
        double norm = 0.0, mass[BINS];  /* mass: read only without top-k (sort_to_cut) */
        if (!cut_k) {  /* the softmax top-p cuts is over the whole row; its mass by distance from the peak too */
            memset(mass, 0, sizeof mass);
            for (int i = 0; i < vocab; i++) {
                const float z = scale(x[i], t), e = expf(z - peak);
                const int bin = (int)((peak - z) * (BINS / SPAN));
                norm += e;
                mass[bin >= 0 && bin < BINS ? bin : BINS - 1] += e;  /* a NaN's bin is INT_MIN */
            }
        }
        keep = top_p_cut(list, n, cut_k ? (int)top_k : vocab, norm, top_p);
        if (keep < 0) {
            sorted = malloc(sizeof(entry) * (size_t)(unsigned)vocab);
            keep = sort_to_cut(x, vocab, t, peak, mass, norm, top_p, sorted, &listed);
        }
    }
    const float floor = min_p > 0.0f ? peak + logf(min_p) : -FLT_MAX;

    float log_norm;
    if (keep >= 0) {  /* a cut of the sorted order: min-p shortens it further (values fall along it) */
        keep = keep < listed ? keep : listed;
        while (keep > 1 && sorted[keep - 1].z < floor)
            keep--;
        double sum = 0.0;  /* in float64: a float32 sum of ~10^4 terms drifts by ~10^-5 */
        for (int j = 0; j < keep; j++)
            sum += expf(sorted[j].z - peak);
        log_norm = (float)log(sum);
        if (!greedy) {
            entry *kept = malloc(sizeof(entry) * keep);
            memcpy(kept, sorted, sizeof(entry) * keep);
            *token = draw_from(kept, keep, peak, log_norm, u);
            free(kept);
        }
    } else {  /* every token that reaches min-p's floor: more passes over the row */
        double sum = 0.0;
        for (int i = 0; i < vocab; i++) {
            const float z = scale(x[i], t);
            sum += z >= floor ? expf(z - peak) : 0.0f;
        }
        log_norm = (float)log(sum);
        if (!greedy) {  /* the inverse CDF in vocabulary order */
            double total = 0.0;
            for (int i = 0; i < vocab; i++) {
                const float z = scale(x[i], t);
                scratch[i] = z >= floor ? expf((z - peak) - log_norm) : 0.0f;
                total += (double)scratch[i];
            }
            const double target = fmin(u * total, nextafter(total, 0.0));
            double cdf = 0.0;
            int i = 0;
            for (; i < vocab - 1; i++) {
                cdf += (double)scratch[i];
                if (cdf > target)
                    break;
            }
            *token = i;
        }
        keep = n;  /* the listed entries are kept, but for min-p's floor (below) */
    }
    *logprob = (scale(x[*token], t) - peak) - log_norm;
    for (int j = 0; j < top; j++) {  /* the sorted order's first entries; those not kept have probability 0 */
        top_ids[j] = j < listed ? sorted[j].id : j;
        top_probs[j] = j < listed && j < keep && sorted[j].z >= floor ? expf((sorted[j].z - peak) - log_norm) : 0.0f;
    }
    if (sorted != list)
        free(sorted);
    if (list != small)
        free(list);
}

/* Per row: temperatures (NULL: 1), top_ks (NULL: none; >= vocab: none), top_ps (NULL: 1), min_ps
 * (NULL: 0), greedy flags, uniforms in [0, 1) (read for sampled rows only). logprob is NaN where
 * neither it (want_logprob) nor alternatives (top) are asked for and the row is greedy. */
void sample_rows(const float *logits, int rows, int vocab, const float *temperatures, const int64_t *top_ks,
                 const float *top_ps, const float *min_ps, const uint8_t *greedy, const double *uniforms,
                 int top, int want_logprob, int64_t *token, float *logprob, int64_t *top_ids, float *top_probs)
{
    #pragma omp parallel
    {
        float *scratch = NULL;  /* a row's probabilities, for rows kept whole */
        #pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            const int64_t k = top_ks ? top_ks[r] : vocab;
            const float p = top_ps ? top_ps[r] : 1.0f, mp = min_ps ? min_ps[r] : 0.0f;
            if (scratch == NULL && !greedy[r] && k >= vocab && p >= 1.0f)
                scratch = malloc(sizeof(float) * (size_t)(unsigned)vocab);
            sample_row(logits + (int64_t)r * vocab, vocab, temperatures ? temperatures[r] : 1.0f, k, p, mp,
                       greedy[r], uniforms ? uniforms[r] : 0.0, top, want_logprob, scratch,
                       token + r, logprob + r, top_ids + (int64_t)r * top, top_probs + (int64_t)r * top);
        }
        free(scratch);
    }
}
