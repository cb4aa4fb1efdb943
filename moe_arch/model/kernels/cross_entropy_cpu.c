/* Softmax cross-entropy rows for the fused output head (moe_arch/model/losses.py), in place:

       loss[r]      = logsumexp(x[r, :]) - x[r, target[r]]
       x[r, :]     <- softmax(x[r, :]) - onehot(target[r])      (d loss[r] / d x[r, :])

   Why hand-written: PyTorch needs five passes over the [rows, vocab] logits for this (amax, subtract + exp, sum,
   scale, the one-hot subtraction), each streaming the whole block through memory; here each row (16 KB at a
   4096 vocabulary) is read once into L1 and finished there: 2.5x less time for this part of the head
   (bench/RESULTS.md). Same arithmetic order as the PyTorch path: max, exp(x - max), sum, multiply by 1/sum.
   Targets are checked by the caller. Built and loaded with the scan kernel (cpu_kernels.py). */

#include <math.h>

#include "simd.h"

void moe_arch_xent_rows(float *logits, const int64_t *target, double *loss, int64_t V, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        float *x = logits + r * V;
        const float picked = x[target[r]];
        vf mv = splat(-INFINITY);
        int64_t i = 0;
        for (; i + W <= V; i += W) {
            const vf v = *(const vf_unaligned *)(x + i);
            mv = vselect(v > mv, v, mv);
        }
        float m = -INFINITY;
        for (int k = 0; k < W; k++) m = mv[k] > m ? mv[k] : m;
        for (; i < V; i++) m = x[i] > m ? x[i] : m;
        const vf mvec = splat(m);
        vf sv = splat(0.0f);
        for (i = 0; i + W <= V; i += W) {
            const vf d = *(const vf_unaligned *)(x + i) - mvec;
            const vf e = vselect(d < splat(-87.3f), splat(0.0f), vexp(d));  /* vexp stops at exp(-87.3) */
            *(vf_unaligned *)(x + i) = e;
            sv += e;
        }
        float s = hsum(sv);
        for (; i < V; i++) {
            const float e = expf(x[i] - m);
            x[i] = e;
            s += e;
        }
        const float inv = 1.0f / s;
        const vf ivec = splat(inv);
        for (i = 0; i + W <= V; i += W) *(vf_unaligned *)(x + i) *= ivec;
        for (; i < V; i++) x[i] *= inv;
        x[target[r]] -= 1.0f;
        loss[r] = (double)m + log((double)s) - (double)picked;
    }
}

#ifdef _OPENMP
#include <omp.h>

void moe_arch_xent_rows_par(float *logits, const int64_t *target, double *loss, int64_t V, int64_t R,
                            int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
        moe_arch_xent_rows(logits, target, loss, V, R * k / n, R * (k + 1) / n);
    }
}
#endif
