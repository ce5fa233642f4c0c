/* Greedy decoding's choice and the distribution it reports, fp32, one row of logits at a time:
 * the argmax, its log-probability under softmax, and the top entries with their probabilities.
 *
 * torch needs a [B, V] log-softmax, an argmax, a top-k and a gather for this (~2.5 ms a step for
 * 16 rows of SmolLM2's 49,152 logits on the 2-core dev machine); here it is a pass for the maximum
 * and the best few and one for the softmax's normaliser. The best few are kept in a short sorted
 * list that a logit enters only when it beats the last: after the first few hundred logits almost
 * none do. Ties keep the earlier index first, as torch.argmax does. No infinities are used
 * (fast-math assumes none): the list starts at -FLT_MAX.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define MAX_TOP 64

void greedy_pick(const float *logits, int rows, int vocab, int top,
                 int64_t *token, float *logprob, int64_t *top_ids, float *top_probs)
{
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *x = logits + (int64_t)r * vocab;
        const int keep = top > 0 ? top : 1;  /* the best one is the token itself */
        float best[MAX_TOP];
        int64_t ids[MAX_TOP];
        for (int j = 0; j < keep; j++)
            best[j] = -FLT_MAX, ids[j] = 0;
        for (int i = 0; i < vocab; i++) {
            if (x[i] <= best[keep - 1])
                continue;
            int j = keep - 1;
            for (; j > 0 && x[i] > best[j - 1]; j--)  /* strictly greater: an equal one stays ahead */
                best[j] = best[j - 1], ids[j] = ids[j - 1];
            best[j] = x[i], ids[j] = i;
        }
        const float max = best[0];
        float sum = 0.0f;
        for (int i = 0; i < vocab; i++)
            sum += expf(x[i] - max);
        const float log_norm = max + logf(sum);
        token[r] = ids[0];
        logprob[r] = max - log_norm;
        for (int j = 0; j < top; j++) {
            top_ids[(int64_t)r * top + j] = ids[j];
            top_probs[(int64_t)r * top + j] = expf(best[j] - log_norm);
        }
    }
}
