/* Fused element-wise chains of the blocks, forward and backward, for float32 CPU training:

     RMSNorm        y = x * r * w,  r = 1 / sqrt(mean(x^2) + eps)          rows of D, one pass each way
     SwiGLU gate    y = silu(a) * b                                        (dense and expert feed-forward)
     causal conv    y_t = silu(bias + sum_j w_j x_{t-K+1+j})               (Mamba's depthwise conv, [B, T, D])
     rotary         RoPE on q and k, read in place from the fused QKV projection

   Why hand-written: in PyTorch ops each of these is 4-10 separate passes over the activations (RMSNorm's
   backward alone is pow, mean, rsqrt, mul x 4, sum), and at the tiny preset's sizes every pass is a memory
   round trip plus a dispatch. One pass per direction here. torch.compile fuses the same chains, but only in the
   regions it compiles (train.compile), so the eager path needs these; moe_arch/model/fused.py uses PyTorch
   ops when compiling, for other dtypes/devices and when the library cannot be built.

   Row ranges [r0, r1) are split across threads by the caller or the OpenMP drivers at the end; reductions over
   rows (dw, dbias) go to per-thread buffers the caller adds up. */

#include <math.h>

#include "simd.h"

/* ---- RMSNorm over rows of D (D contiguous) ---- */

void moe_arch_rmsnorm_fwd(const float *x, const float *w, float *y, float *rstd, int64_t D, float eps, int64_t r0,
                          int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        vf acc = splat(0.0f);
        int64_t i = 0;
        for (; i + W <= D; i += W) {
            const vf v = *(const vf_unaligned *)(xr + i);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; i < D; i++) ss += xr[i] * xr[i];
        const float rs = 1.0f / sqrtf(ss / (float)D + eps);
        rstd[r] = rs;
        const vf rv = splat(rs);
        for (i = 0; i + W <= D; i += W)
            *(vf_unaligned *)(yr + i) = *(const vf_unaligned *)(xr + i) * rv * *(const vf_unaligned *)(w + i);
        for (; i < D; i++) yr[i] = xr[i] * rs * w[i];
    }
}

/* dx = r * (g - n * mean(g * n)) with n = x r, g = dy w;  dw += sum over rows of dy * n. */
void moe_arch_rmsnorm_bwd(const float *x, const float *w, const float *rstd, const float *dy, float *dx, float *dw,
                          int64_t D, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * D, *dyr = dy + r * D;
        float *dxr = dx + r * D;
        const float rs = rstd[r];
        const vf rv = splat(rs);
        vf acc = splat(0.0f);
        int64_t i = 0;
        for (; i + W <= D; i += W) {
            const vf n = *(const vf_unaligned *)(xr + i) * rv, d = *(const vf_unaligned *)(dyr + i);
            acc += d * *(const vf_unaligned *)(w + i) * n;
            *(vf_unaligned *)(dw + i) += d * n;
        }
        float dot = hsum(acc);
        for (; i < D; i++) {
            const float n = xr[i] * rs;
            dot += dyr[i] * w[i] * n;
            dw[i] += dyr[i] * n;
        }
        const float m = dot / (float)D;
        const vf mv = splat(m);
        for (i = 0; i + W <= D; i += W) {
            const vf n = *(const vf_unaligned *)(xr + i) * rv;
            const vf g = *(const vf_unaligned *)(dyr + i) * *(const vf_unaligned *)(w + i);
            *(vf_unaligned *)(dxr + i) = rv * (g - n * mv);
        }
        for (; i < D; i++) dxr[i] = rs * (dyr[i] * w[i] - xr[i] * rs * m);
    }
}

/* ---- SwiGLU gate over n elements ---- */

void moe_arch_swiglu_fwd(const float *a, const float *b, float *y, int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + W <= i1; i += W) {
        const vf av = *(const vf_unaligned *)(a + i);
        *(vf_unaligned *)(y + i) = av * vsigmoid(av) * *(const vf_unaligned *)(b + i);
    }
    for (; i < i1; i++) y[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}

/* d silu(a) / da = s (1 + a (1 - s)), s = sigmoid(a). */
void moe_arch_swiglu_bwd(const float *a, const float *b, const float *dy, float *da, float *db, int64_t i0,
                         int64_t i1) {
    int64_t i = i0;
    const vf one = splat(1.0f);
    for (; i + W <= i1; i += W) {
        const vf av = *(const vf_unaligned *)(a + i), bv = *(const vf_unaligned *)(b + i);
        const vf d = *(const vf_unaligned *)(dy + i), s = vsigmoid(av);
        *(vf_unaligned *)(da + i) = d * bv * s * (one + av * (one - s));
        *(vf_unaligned *)(db + i) = d * av * s;
    }
    for (; i < i1; i++) {
        const float s = 1.0f / (1.0f + expf(-a[i]));
        da[i] = dy[i] * b[i] * s * (1.0f + a[i] * (1.0f - s));
        db[i] = dy[i] * a[i] * s;
    }
}

/* ---- causal depthwise conv + silu, x [B, T, D] with rows of x at stride sx (x may be a slice of a wider
   tensor), w [K, D] (tap j multiplies x_{t-K+1+j}), bias [D]; y [B, T, D] contiguous. Items are (b, t) rows. */

static inline void conv_pre(const float *x, int64_t sx, const float *w, const float *bias, int64_t T, int64_t D,
                            int64_t K, int64_t b, int64_t t, int64_t d0, int wd, vf *out) {
    vf acc = load(bias + d0, wd);
    for (int64_t j = 0; j < K; j++) {
        const int64_t ts = t - K + 1 + j;
        if (ts < 0)
            continue;
        acc += load(w + j * D + d0, wd) * load(x + (b * T + ts) * sx + d0, wd);
    }
    *out = acc;
}

void moe_arch_conv_silu_fwd(const float *x, int64_t sx, const float *w, const float *bias, float *y, int64_t T,
                            int64_t D, int64_t K, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / T, t = r % T;
        for (int64_t d0 = 0; d0 < D; d0 += W) {
            const int wd = (int)(D - d0 < W ? D - d0 : W);
            vf p;
            conv_pre(x, sx, w, bias, T, D, K, b, t, d0, wd, &p);
            store(y + r * D + d0, p * vsigmoid(p), wd);
        }
    }
}

/* Gradient at the pre-activation g_t = dy_t * silu'(pre_t) (pre recomputed), then dx_s = sum_j w_j g_{s+K-1-j},
   dw_j += sum_t g_t x_{t-K+1+j}, dbias += sum_t g_t. Two sweeps over the rows: g into dpre (scratch [B, T, D]),
   then dx; dw and dbias into this thread's buffers. dpre must be complete for the rows a dx row reads (s..s+K-1
   of the same sequence), so the caller runs pass 1 for all rows before pass 2 (pass = 1 or 2). */
void moe_arch_conv_silu_bwd(const float *x, int64_t sx, const float *w, const float *bias, const float *dy,
                            float *dpre, float *dx, int64_t sdx, float *dw, float *dbias, int64_t T, int64_t D,
                            int64_t K, int64_t r0, int64_t r1, int pass) {
    const vf one = splat(1.0f);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / T, t = r % T;
        for (int64_t d0 = 0; d0 < D; d0 += W) {
            const int wd = (int)(D - d0 < W ? D - d0 : W);
            if (pass == 1) {
                vf p;
                conv_pre(x, sx, w, bias, T, D, K, b, t, d0, wd, &p);
                const vf s = vsigmoid(p);
                const vf g = load(dy + r * D + d0, wd) * s * (one + p * (one - s));
                store(dpre + r * D + d0, g, wd);
                store(dbias + d0, load(dbias + d0, wd) + g, wd);
                for (int64_t j = 0; j < K; j++) {
                    const int64_t ts = t - K + 1 + j;
                    if (ts < 0)
                        continue;
                    store(dw + j * D + d0, load(dw + j * D + d0, wd) + g * load(x + (b * T + ts) * sx + d0, wd), wd);
                }
            } else {
                vf acc = splat(0.0f);
                for (int64_t j = 0; j < K; j++) {
                    const int64_t tt = t + K - 1 - j;
                    if (tt >= T)
                        continue;
                    acc += load(w + j * D + d0, wd) * load(dpre + (b * T + tt) * D + d0, wd);
                }
                store(dx + (b * T + t) * sdx + d0, acc, wd);
            }
        }
    }
}


/* ---- rotary position embedding, "rotate half" convention: per head row of D = 2 * half,
     forward   y[d] = x[d] c[d] - x[d + half] s[d]        y[d + half] = x[d + half] c[d + half] + x[d] s[d + half]
     backward  dx[d] = dy[d] c[d] + dy[d + half] s[d + half]    dx[d + half] = dy[d + half] c[d + half] - dy[d] s[d]
   (backward = the transposed rotation). x and y are [B, H, T, D] at any strides (sb, sh, st; unit stride on D), so
   q and k are read straight out of the fused QKV projection; cos/sin rows [T, D] at batch stride cb (0: shared by
   the batch; MoD-gathered positions have their own per row). Items are (b, t) pairs, all heads inside. */
void moe_arch_rope(const float *x, int64_t xb, int64_t xh, int64_t xt, const float *cos, const float *sin,
                   int64_t cb, float *y, int64_t yb, int64_t yh, int64_t yt, int64_t H, int64_t T, int64_t D,
                   int backward, int64_t r0, int64_t r1) {
    const int64_t half = D / 2;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / T, t = r % T;
        const float *c = cos + b * cb + t * D, *s = sin + b * cb + t * D;
        for (int64_t h = 0; h < H; h++) {
            const float *xr = x + b * xb + h * xh + t * xt;
            float *yr = y + b * yb + h * yh + t * yt;
            if (!backward) {
                for (int64_t d = 0; d < half; d++) yr[d] = xr[d] * c[d] - xr[d + half] * s[d];
                for (int64_t d = 0; d < half; d++) yr[d + half] = xr[d + half] * c[d + half] + xr[d] * s[d + half];
            } else {
                for (int64_t d = 0; d < half; d++) yr[d] = xr[d] * c[d] + xr[d + half] * s[d + half];
                for (int64_t d = 0; d < half; d++) yr[d + half] = xr[d + half] * c[d + half] - xr[d] * s[d];
            }
        }
    }
}

#ifdef _OPENMP
#include <omp.h>

#define SPLIT(n)                                                    \
    const int64_t k_ = omp_get_thread_num(), n_ = omp_get_num_threads(); \
    const int64_t lo = (n) * k_ / n_, hi = (n) * (k_ + 1) / n_;

void moe_arch_rmsnorm_fwd_par(const float *x, const float *w, float *y, float *rstd, int64_t D, float eps, int64_t R,
                              int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        SPLIT(R)
        moe_arch_rmsnorm_fwd(x, w, y, rstd, D, eps, lo, hi);
    }
}

void moe_arch_rmsnorm_bwd_par(const float *x, const float *w, const float *rstd, const float *dy, float *dx,
                              float *dw /* [nthreads, D] */, int64_t D, int64_t R, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        SPLIT(R)
        moe_arch_rmsnorm_bwd(x, w, rstd, dy, dx, dw + k_ * D, D, lo, hi);
    }
}

void moe_arch_swiglu_fwd_par(const float *a, const float *b, float *y, int64_t n, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        SPLIT(n / W)
        moe_arch_swiglu_fwd(a, b, y, lo * W, k_ == n_ - 1 ? n : hi * W);
    }
}

void moe_arch_swiglu_bwd_par(const float *a, const float *b, const float *dy, float *da, float *db, int64_t n,
                             int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        SPLIT(n / W)
        moe_arch_swiglu_bwd(a, b, dy, da, db, lo * W, k_ == n_ - 1 ? n : hi * W);
    }
}

void moe_arch_conv_silu_fwd_par(const float *x, int64_t sx, const float *w, const float *bias, float *y, int64_t T,
                                int64_t D, int64_t K, int64_t R, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        SPLIT(R)
        moe_arch_conv_silu_fwd(x, sx, w, bias, y, T, D, K, lo, hi);
    }
}

void moe_arch_conv_silu_bwd_par(const float *x, int64_t sx, const float *w, const float *bias, const float *dy,
                                float *dpre, float *dx, int64_t sdx, float *dw /* [nthreads, K, D] */,
                                float *dbias /* [nthreads, D] */, int64_t T, int64_t D, int64_t K, int64_t R,
                                int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        SPLIT(R)
        moe_arch_conv_silu_bwd(x, sx, w, bias, dy, dpre, dx, sdx, dw + k_ * K * D, dbias + k_ * D, T, D, K, lo, hi, 1);
#pragma omp barrier
        moe_arch_conv_silu_bwd(x, sx, w, bias, dy, dpre, dx, sdx, dw + k_ * K * D, dbias + k_ * D, T, D, K, lo, hi, 2);
    }
}

void moe_arch_rope_par(const float *x, int64_t xb, int64_t xh, int64_t xt, const float *cos, const float *sin,
                       int64_t cb, float *y, int64_t yb, int64_t yh, int64_t yt, int64_t H, int64_t T, int64_t D,
                       int backward, int64_t R, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        SPLIT(R)
        moe_arch_rope(x, xb, xh, xt, cos, sin, cb, y, yb, yh, yt, H, T, D, backward, lo, hi);
    }
}
#endif
