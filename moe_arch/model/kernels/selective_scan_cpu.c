/* Mamba-1 selective scan on the CPU: forward and backward of

       h_t[d, n] = exp(dt_t[d] * A[d, n]) * h_{t-1}[d, n] + dt_t[d] * u_t[d] * B_t[n]
       y_t[d]    = sum_n C_t[n] * h_t[d, n]

   Why hand-written: no maintained library ships a CPU selective-scan kernel (mamba_ssm's kernels are CUDA
   only), and in PyTorch ops the scan costs ~25 passes over a [L, B, D, N] state tensor per training step.
   Here one pass runs the recurrence with the state of W channels x N states in registers/L1: per time step
   W-wide vector work, nothing written but y (forward) or the gradients (backward).

   Optionally fused as in mamba_ssm's selective_scan_fn: the skip term D * u and the output gate silu(z),
   out_t = (y_t + D u_t) * silu(z_t), which saves ~10 element-wise passes over [B, L, D] per layer and step.

   Layout: batch-major, contiguous, float32. u, dt, z, out, gout, du, ddt, dz [B, L, D]; Dskip, dD [D] (Dskip and z
   may be NULL); Bm, Cm, dB, dC [B, L, N];
   AT, dAT [N, D] (A transposed, so a block of W channels is contiguous); h0, h_last [B, D, N] (h0 may be NULL).
   Work items are (batch row, block of W channels) pairs, item i -> b = i / nblk, block = i % nblk; the caller
   splits [0, B * nblk) across threads. The backward accumulates dB, dC and dAT (sums over channels or batch)
   (and dD) into per-thread buffers the caller adds up, so threads never write the same memory.

   Portable C11 + GCC/Clang vector extensions (vector_size(64) = 16 floats: one AVX-512 register, two AVX2
   ones; simd.h); no -ffast-math, the exponential is explicit. Built on first use by moe_arch/model/cpu_kernels.py;
   tested against the step-by-step recurrence and the chunked PyTorch scan. */

#include "simd.h"

#define MAX_N 64 /* d_state limit of this kernel (the caller falls back above it) */

void moe_arch_scan_fwd(const float *u, const float *dt, const float *AT, const float *Bm, const float *Cm,
                       const float *Dskip, const float *z, const float *h0, float *y, float *h_last, int64_t B,
                       int64_t L, int64_t D, int64_t N, int64_t item0, int64_t item1) {
    const int64_t nblk = (D + W - 1) / W;
    (void)B;  /* the item range already bounds the batch */
    vf hv[MAX_N];
    for (int64_t item = item0; item < item1; item++) {
        const int64_t b = item / nblk, d0 = (item % nblk) * W;
        const int w = (int)(D - d0 < W ? D - d0 : W);
        for (int64_t n = 0; n < N; n++) {
            if (h0) {
                vf v = splat(0.0f);
                for (int k = 0; k < w; k++) v[k] = h0[(b * D + d0 + k) * N + n];
                hv[n] = v;
            } else {
                hv[n] = splat(0.0f);
            }
        }
        const vf Dv = Dskip ? load(Dskip + d0, w) : splat(0.0f);
        for (int64_t t = 0; t < L; t++) {
            const int64_t row = (b * L + t) * D + d0;
            const vf uv = load(u + row, w), dtv = load(dt + row, w), x = dtv * uv;
            const float *Bt = Bm + (b * L + t) * N, *Ct = Cm + (b * L + t) * N;
            vf acc = Dv * uv;
            for (int64_t n = 0; n < N; n++) {
                const vf a = vexp(dtv * load(AT + n * D + d0, w));
                hv[n] = a * hv[n] + x * splat(Bt[n]);
                acc += hv[n] * splat(Ct[n]);
            }
            if (z) {
                const vf zv = load(z + row, w);
                acc = acc * zv * vsigmoid(zv);
            }
            store(y + row, acc, w);
        }
        for (int64_t n = 0; n < N; n++)
            for (int k = 0; k < w; k++) h_last[(b * D + d0 + k) * N + n] = hv[n][k];
    }
}

void moe_arch_scan_bwd(const float *u, const float *dt, const float *AT, const float *Bm, const float *Cm,
                       const float *Dskip, const float *z, const float *h0, const float *gout, float *du, float *ddt,
                       float *dAT, float *dB, float *dC, float *dD, float *dz, int64_t B, int64_t L, int64_t D,
                       int64_t N, int64_t item0, int64_t item1,
                       float *scratch /* (4 L + 1) N W floats, 64-byte aligned */) {
    const int64_t nblk = (D + W - 1) / W;
    (void)B;
    vf *hsv = (vf *)scratch;        /* hsv[(t + 1) * N + n]: state after step t; row 0 is h0 */
    vf *decay = hsv + (L + 1) * N;  /* decay[t * N + n] = exp(dt_t * A[:, n]), kept from the recomputation */
    vf *gB = decay + L * N;         /* lane partial sums of dB and dC for the current batch row: reduced across */
    vf *gC = gB + L * N;            /* lanes once per row, not once per block of channels */
    int64_t row_b = -1;
    for (int64_t item = item0; item <= item1; item++) {
        const int64_t b = item < item1 ? item / nblk : -1;
        if (b != row_b && row_b >= 0) { /* flush the finished batch row */
            for (int64_t i = 0; i < L * N; i++) {
                dB[row_b * L * N + i] += hsum(gB[i]);
                dC[row_b * L * N + i] += hsum(gC[i]);
            }
        }
        if (item == item1)
            break;
        if (b != row_b) {
            for (int64_t i = 0; i < L * N; i++) gB[i] = gC[i] = splat(0.0f);
            row_b = b;
        }
        const int64_t d0 = (item % nblk) * W;
        const int w = (int)(D - d0 < W ? D - d0 : W);
        /* Recompute the states and decays of this block. */
        for (int64_t n = 0; n < N; n++) {
            vf v = splat(0.0f);
            if (h0)
                for (int k = 0; k < w; k++) v[k] = h0[(b * D + d0 + k) * N + n];
            hsv[n] = v;
        }
        for (int64_t t = 0; t < L; t++) {
            const int64_t row = (b * L + t) * D + d0;
            const vf dtv = load(dt + row, w), x = dtv * load(u + row, w);
            const float *Bt = Bm + (b * L + t) * N;
            const vf *prev = hsv + t * N;
            vf *cur = hsv + (t + 1) * N, *at = decay + t * N;
            for (int64_t n = 0; n < N; n++) {
                at[n] = vexp(dtv * load(AT + n * D + d0, w));
                cur[n] = at[n] * prev[n] + x * splat(Bt[n]);
            }
        }
        /* Reverse sweep with the adjoint lam_t = dL/dh_t = C_t gy_t + exp(dt_{t+1} A) lam_{t+1}. */
        vf lam[MAX_N], dA_acc[MAX_N];
        for (int64_t n = 0; n < N; n++) {
            lam[n] = splat(0.0f);
            dA_acc[n] = splat(0.0f);
        }
        const vf Dv = Dskip ? load(Dskip + d0, w) : splat(0.0f);
        vf dD_acc = splat(0.0f);
        for (int64_t t = L - 1; t >= 0; t--) {
            const int64_t row = (b * L + t) * D + d0;
            const vf dtv = load(dt + row, w), uv = load(u + row, w);
            const vf dtu = dtv * uv;
            const float *Bt = Bm + (b * L + t) * N, *Ct = Cm + (b * L + t) * N;
            const vf *ht = hsv + (t + 1) * N, *hprev = hsv + t * N, *at = decay + t * N;
            vf gyv = load(gout + row, w);  /* becomes dL/dy, y = C.h + D u, before the gate */
            if (z) {
                vf yv = Dv * uv;
                for (int64_t n = 0; n < N; n++) yv += ht[n] * splat(Ct[n]);
                const vf zv = load(z + row, w), sg = vsigmoid(zv);
                store(dz + row, gyv * yv * sg * (splat(1.0f) + zv * (splat(1.0f) - sg)), w);
                gyv = gyv * zv * sg;
            }
            dD_acc += gyv * uv;
            vf *gBt = gB + t * N, *gCt = gC + t * N;
            vf s1 = splat(0.0f), sq = splat(0.0f);
            for (int64_t n = 0; n < N; n++) {
                const vf l = lam[n] + splat(Ct[n]) * gyv;
                const vf q = l * at[n] * hprev[n];
                s1 += l * splat(Bt[n]);
                sq += q * load(AT + n * D + d0, w);
                dA_acc[n] += q * dtv;
                gBt[n] += l * dtu;
                gCt[n] += ht[n] * gyv;
                lam[n] = l * at[n];
            }
            store(du + row, s1 * dtv + gyv * Dv, w);
            store(ddt + row, s1 * uv + sq, w);
        }
        for (int64_t n = 0; n < N; n++) {
            float *p = dAT + n * D + d0;
            for (int k = 0; k < w; k++) p[k] += dA_acc[n][k];
        }
        for (int k = 0; k < w; k++) dD[d0 + k] += dD_acc[k];
    }
}

/* Thread drivers. Built with -fopenmp only when PyTorch's own parallel backend is GNU OpenMP: the library then
   binds to the libgomp.so.1 that PyTorch already loaded (the dynamic linker matches the soname), so these
   parallel regions run on PyTorch's intra-op worker threads. Threads of our own would compete with those
   workers, which spin for a while after every PyTorch parallel op: on 2 cores that made the backward ~1.8x
   slower. Without OpenMP the caller splits the items over a thread pool and calls the functions above. */
#ifdef _OPENMP
#include <omp.h>

int moe_arch_openmp(void) { return 1; }

void moe_arch_scan_fwd_par(const float *u, const float *dt, const float *AT, const float *Bm, const float *Cm,
                           const float *Dskip, const float *z, const float *h0, float *y, float *h_last, int64_t B,
                           int64_t L, int64_t D, int64_t N, int64_t n_items, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
        moe_arch_scan_fwd(u, dt, AT, Bm, Cm, Dskip, z, h0, y, h_last, B, L, D, N, n_items * k / n,
                          n_items * (k + 1) / n);
    }
}

/* dAT, dB, dC, dD and scratch hold nthreads consecutive per-thread buffers of the sizes given by the strides. */
void moe_arch_scan_bwd_par(const float *u, const float *dt, const float *AT, const float *Bm, const float *Cm,
                           const float *Dskip, const float *z, const float *h0, const float *gout, float *du,
                           float *ddt, float *dAT, float *dB, float *dC, float *dD, float *dz, int64_t B, int64_t L,
                           int64_t D, int64_t N, int64_t n_items, int nthreads, float *scratch,
                           int64_t scratch_stride) {
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
        moe_arch_scan_bwd(u, dt, AT, Bm, Cm, Dskip, z, h0, gout, du, ddt, dAT + k * N * D, dB + k * B * L * N,
                          dC + k * B * L * N, dD + k * D, dz, B, L, D, N, n_items * k / n, n_items * (k + 1) / n,
                          scratch + k * scratch_stride);
    }
}
#else
int moe_arch_openmp(void) { return 0; }
#endif
