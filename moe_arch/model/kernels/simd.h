/* Shared helpers of the CPU kernels: 16-float vectors (GCC/Clang vector extensions: one AVX-512 register, two
   AVX2 ones, plain scalar code elsewhere) and an explicit vector exp, so no -ffast-math is needed. */

#ifndef MOE_ARCH_SIMD_H
#define MOE_ARCH_SIMD_H

#include <stdint.h>

#define W 16
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef float vf_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(sizeof(float))));

static inline vf splat(float x) {
    return x - (vf){};  /* scalar op vector broadcasts the scalar (one vbroadcastss); x - 0 keeps -0.0 */
}

static inline vf load(const float *p, int w) {
    vf v;
    if (w == W) {
        v = *(const vf_unaligned *)p;
    } else {
        v = splat(0.0f);
        for (int k = 0; k < w; k++) v[k] = p[k];
    }
    return v;
}

static inline void store(float *p, vf v, int w) {
    if (w == W) {
        *(vf_unaligned *)p = v;
    } else {
        for (int k = 0; k < w; k++) p[k] = v[k];
    }
}

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int k = 0; k < W; k++) s += v[k];
    return s;
}

/* m ? a : b lane by lane (m is a comparison result: all ones or all zeros per lane). */
static inline vf vselect(vi m, vf a, vf b) {
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}

/* exp(x): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for exp(r) (relative error
   ~2e-7, within 2 ulp of expf), times 2^n. Inputs below -87.3 return exp(-87.3) ~ 1.2e-38 (the decay of a state
   that is already gone; no denormals, which are slow on x86); inputs above 88.7 overflow as expf does (to inf on
   AVX-512, where vscalefps builds 2^n; to ~3.4e38 elsewhere, where 2^n is built in the exponent bits). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf vexp(vf x) {
    /* max(lo, x) returns its second operand when either is NaN: NaN inputs stay NaN */
    __m512 xv = _mm512_max_ps(_mm512_set1_ps(-87.3f), (__m512)x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xv);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return (vf)_mm512_scalef_ps(p, n);
}
#else
static inline vf vexp(vf x) {
    const vf lo = splat(-87.3f), hi = splat(88.7f);
    x = vselect(x < lo, lo, x);
    x = vselect(x > hi, hi, x);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding and subtracting rounds to the nearest integer */
    vf n = (x * splat(1.44269504088896341f) + magic) - magic;
    vf r = x - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    vf p = splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}
#endif

/* silu(z) = z * sigmoid(z); its derivative is sigmoid(z) * (1 + z * (1 - sigmoid(z))). */
static inline vf vsigmoid(vf z) {
    return splat(1.0f) / (splat(1.0f) + vexp(-z));
}

#endif
