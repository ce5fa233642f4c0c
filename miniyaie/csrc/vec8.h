/* Eight fp32 lanes as a GCC vector (one AVX register; split in two where vectors are narrower):
 * the unit the C kernels compute in. Loads and stores go through memcpy, so pointers need no
 * alignment. */
#ifndef MINIYAIE_VEC8_H
#define MINIYAIE_VEC8_H

#include <string.h>

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline float sum8(v8f v)
{
    float s = 0.0f;
    for (int i = 0; i < 8; i++)
        s += v[i];
    return s;
}

#endif
