"""The ``cpu`` backend: multi-tensor C kernels for CPU tensors, built once with the system cc.

Why C and not ``torch.compile``: the ops run over lists of hundreds of tensors (437 for a
LLaVA-7B-shaped model), most of them small. A compiled per-tensor function pays its dispatch
(guards + wrappers, tens of µs) once per tensor, which alone exceeds the whole step at 4 M
elements; one compiled function over the whole list recompiles per model and takes minutes on
2 cores. These kernels read the same pointer/chunk tables the Triton kernels read, so one call
covers every tensor in one pass, its chunks taken by ``torch.get_num_threads()`` POSIX threads
from a shared counter. Build: ``cc -O3 -march=native``, ≈1 s once per machine, then a cached shared
object (``$MMUNLEARN_CACHE_DIR``, default ``~/.cache/mmunlearn``) that loads in milliseconds.
Numbers and the alternatives measured: bench/NOTES.md.

Arithmetic follows ATen's CPU kernels operation for operation, so the results equal the torch
twins bit for bit on the machines measured (fmaf where ATen uses a fused multiply-add: ``lerp``,
``addcmul``, ``add(alpha=)``; ``-ffp-contract=off`` everywhere else); the tests bound them
by the same ulp tolerances as the Triton kernels. Elements whose mask bit is 0 are written
back with the integer bit pattern that was read (whole-vector read-modify-write, so the loops
vectorise): their bytes never change. Imports nothing beyond the standard library and torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

# Elements per chunk (a multiple of 8: chunks start on mask bytes). 32 K fp32 = 128 KiB per
# operand: per-chunk overhead is negligible and 4 M model-shaped elements give ~500 chunks to
# balance over the threads.
CPU_BLOCK = 1 << 15
# Below this many elements one thread does the work (a thread start costs ~20 µs; 2 threads
# only pay off past ~64 K elements on the 2-core CI machine, 2026-11-30).
PARALLEL_MIN = 1 << 16
ABI = 3

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int64_t mmu_abi(void) { return 3; }

static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
/* storage <-> fp32, per dtype: f32 words, bf16 and f16 halves */
static inline float ld_f32(uint32_t x) { return u2f(x); }
static inline uint32_t st_f32(float x) { return f2u(x); }
static inline float ld_bf16(uint16_t x) { return u2f((uint32_t)x << 16); }
static inline uint16_t st_bf16(float x) {  /* round to nearest even, NaN -> 0x7FC0 (c10) */
    uint32_t b = f2u(x);
    uint16_t r = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    return x != x ? (uint16_t)0x7FC0 : r;
}
/* bit-0 elements store back the bits they read: a branch-free blend (written as a ?: the compiler
   may turn it into a conditional store and give up vectorising) */
static inline uint32_t blend32(int on, uint32_t a, uint32_t b) {
    uint32_t m = 0u - (uint32_t)on; return (a & m) | (b & ~m);
}
static inline uint16_t blend16(int on, uint16_t a, uint16_t b) {
    uint16_t m = (uint16_t)(0u - (uint32_t)on); return (uint16_t)((a & m) | (b & ~m));
}
#define BLEND_f32 blend32
#define BLEND_bf16 blend16
#define BLEND_f16 blend16
static inline float ld_f16(uint16_t x) { _Float16 h; memcpy(&h, &x, 2); return (float)h; }
static inline uint16_t st_f16(float x) {
    _Float16 h = (_Float16)x; uint16_t u; memcpy(&u, &h, 2); return u;
}

/* ---------------------------------------------------------------- parallel driver */
typedef void (*range_fn)(const void *ctx, int64_t c0, int64_t c1, int th);
/* Threads take chunks from a shared counter (dynamic scheduling): on a CPU shared with other
   jobs a descheduled thread does not hold the others up. Results never depend on which thread
   ran a chunk (per-chunk partials, per-thread integer histograms). */
typedef struct { range_fn fn; const void *ctx; int64_t C, grain; int64_t *next; int th; } task_t;
static void *run_task(void *a) {
    task_t *t = (task_t *)a;
    for (;;) {
        int64_t c0 = __atomic_fetch_add(t->next, t->grain, __ATOMIC_RELAXED);
        if (c0 >= t->C) break;
        int64_t c1 = c0 + t->grain < t->C ? c0 + t->grain : t->C;
        t->fn(t->ctx, c0, c1, t->th);
    }
    return NULL;
}

/* Run fn over chunks [0, C) on nt threads (this one included); returns the thread count. */
static int parallel_chunks(range_fn fn, const void *ctx, int64_t C, int nt) {
    if (nt > 64) nt = 64;
    if (nt > C) nt = (int)C;
    if (nt <= 1) { fn(ctx, 0, C, 0); return 1; }
    int64_t next = 0;
    task_t tasks[64];
    pthread_t th[64];
    int started[64];
    for (int k = 0; k < nt; k++) {
        tasks[k].fn = fn; tasks[k].ctx = ctx; tasks[k].C = C; tasks[k].grain = 1;
        tasks[k].next = &next; tasks[k].th = k;
    }
    for (int k = 1; k < nt; k++)
        started[k] = pthread_create(&th[k], NULL, run_task, &tasks[k]) == 0;
    run_task(&tasks[0]);
    for (int k = 1; k < nt; k++)
        if (started[k]) pthread_join(th[k], NULL);
    return nt;
}

#define PTR(TY, row, i) ((TY *)(intptr_t)ctx->ptrs[(row) * ctx->T + (i)])

/* ---------------------------------------------------------------- masked AdamW / SGD */
typedef struct {
    const int64_t *ptrs, *tid, *start; int64_t T, block; int has_mask;
    float gmul, decay, beta2, w1, omb2, eps, nss, bc2s, lr;
} step_ctx;

/* ATen: p.mul_(decay); m.lerp_(g, w1) = fma(w1, g - m, m) (w1 < 0.5) or fma(w1 - 1, g - m, g);
   v.mul(beta2).addcmul_(g, g, omb2) = fma(omb2 * g, g, v * beta2);
   denom = sqrt(v) / bc2s + eps; p.addcdiv_(m, denom, -step_size) = p + (nss * m) / denom */
#define ADAMW_KERNEL(PN, PS, GN, GS)                                                          \
static inline void adamw_elem_##PN##_##GN(const step_ctx *ctx, PS *restrict p,                 \
        const GS *restrict g, uint32_t *restrict m, uint32_t *restrict v, int64_t j, int on,   \
        int small, float w1s) {                                                               \
    float gg = ld_##GN(g[j]) * ctx->gmul;                                                     \
    float pp = ld_##PN(p[j]) * ctx->decay;                                                    \
    float mo = u2f(m[j]), vo = u2f(v[j]), d = gg - mo;                                        \
    float mn = small ? fmaf(ctx->w1, d, mo) : fmaf(w1s, d, gg);                               \
    float vn = fmaf(ctx->omb2 * gg, gg, vo * ctx->beta2);                                     \
    float den = sqrtf(vn) / ctx->bc2s + ctx->eps;                                             \
    float pn = pp + (ctx->nss * mn) / den;                                                    \
    PS pold = p[j]; uint32_t mold = m[j], vold = v[j];                                        \
    p[j] = BLEND_##PN(on, st_##PN(pn), pold);                                                 \
    m[j] = blend32(on, f2u(mn), mold);                                                        \
    v[j] = blend32(on, f2u(vn), vold);                                                        \
}                                                                                             \
static void adamw_##PN##_##GN(const void *vctx, int64_t c0, int64_t c1, int th) {             \
    const step_ctx *ctx = (const step_ctx *)vctx; (void)th;                                   \
    const int64_t *numel = ctx->ptrs + 6 * ctx->T;                                            \
    const int small = fabsf(ctx->w1) < 0.5f; const float w1s = ctx->w1 - 1.0f;                \
    for (int64_t c = c0; c < c1; c++) {                                                       \
        int64_t i = ctx->tid[c], s = ctx->start[c];                                           \
        int64_t e = s + ctx->block < numel[i] ? s + ctx->block : numel[i];                    \
        PS *restrict p = PTR(PS, 0, i); const GS *restrict g = PTR(const GS, 1, i);           \
        uint32_t *restrict m = PTR(uint32_t, 2, i); uint32_t *restrict v = PTR(uint32_t, 3, i); \
        const uint8_t *restrict k = PTR(const uint8_t, 4, i);                                 \
        int64_t j = s;                                                                        \
        if (ctx->has_mask) {                                                                  \
            for (; j + 16 <= e; j += 16) {                                                    \
                uint32_t bits = (uint32_t)k[j >> 3] | ((uint32_t)k[(j >> 3) + 1] << 8);       \
                for (int l = 0; l < 16; l++)                                                  \
                    adamw_elem_##PN##_##GN(ctx, p, g, m, v, j + l, (bits >> l) & 1, small, w1s); \
            }                                                                                 \
            for (; j < e; j++) {                                                              \
                int on = (k[j >> 3] >> (j & 7)) & 1;                                          \
                adamw_elem_##PN##_##GN(ctx, p, g, m, v, j, on, small, w1s);                   \
            }                                                                                 \
        } else {                                                                              \
            for (; j < e; j++) adamw_elem_##PN##_##GN(ctx, p, g, m, v, j, 1, small, w1s);     \
        }                                                                                     \
    }                                                                                         \
}

/* torch twin: (p.float() * decay - lr * g).to(p.dtype) */
#define SGD_KERNEL(PN, PS, GN, GS)                                                            \
static inline void sgd_elem_##PN##_##GN(const step_ctx *ctx, PS *restrict p,                   \
        const GS *restrict g, int64_t j, int on) {                                            \
    float gg = ld_##GN(g[j]) * ctx->gmul;                                                     \
    float pn = ld_##PN(p[j]) * ctx->decay - ctx->lr * gg;                                     \
    PS pold = p[j];                                                                           \
    p[j] = BLEND_##PN(on, st_##PN(pn), pold);                                                 \
}                                                                                             \
static void sgd_##PN##_##GN(const void *vctx, int64_t c0, int64_t c1, int th) {               \
    const step_ctx *ctx = (const step_ctx *)vctx; (void)th;                                   \
    const int64_t *numel = ctx->ptrs + 3 * ctx->T;                                            \
    for (int64_t c = c0; c < c1; c++) {                                                       \
        int64_t i = ctx->tid[c], s = ctx->start[c];                                           \
        int64_t e = s + ctx->block < numel[i] ? s + ctx->block : numel[i];                    \
        PS *restrict p = PTR(PS, 0, i); const GS *restrict g = PTR(const GS, 1, i);           \
        const uint8_t *restrict k = PTR(const uint8_t, 2, i);                                 \
        int64_t j = s;                                                                        \
        if (ctx->has_mask) {                                                                  \
            for (; j + 16 <= e; j += 16) {                                                    \
                uint32_t bits = (uint32_t)k[j >> 3] | ((uint32_t)k[(j >> 3) + 1] << 8);       \
                for (int l = 0; l < 16; l++)                                                  \
                    sgd_elem_##PN##_##GN(ctx, p, g, j + l, (bits >> l) & 1);                  \
            }                                                                                 \
            for (; j < e; j++) sgd_elem_##PN##_##GN(ctx, p, g, j, (k[j >> 3] >> (j & 7)) & 1); \
        } else {                                                                              \
            for (; j < e; j++) sgd_elem_##PN##_##GN(ctx, p, g, j, 1);                         \
        }                                                                                     \
    }                                                                                         \
}

#define FOR_PG(X)                                                                             \
    X(f32, uint32_t, f32, uint32_t) X(f32, uint32_t, bf16, uint16_t)                          \
    X(f32, uint32_t, f16, uint16_t) X(bf16, uint16_t, f32, uint32_t)                          \
    X(bf16, uint16_t, bf16, uint16_t) X(bf16, uint16_t, f16, uint16_t)                        \
    X(f16, uint16_t, f32, uint32_t) X(f16, uint16_t, bf16, uint16_t)                          \
    X(f16, uint16_t, f16, uint16_t)
FOR_PG(ADAMW_KERNEL)
FOR_PG(SGD_KERNEL)
#define NAME_ADAMW(PN, PS, GN, GS) adamw_##PN##_##GN,
#define NAME_SGD(PN, PS, GN, GS) sgd_##PN##_##GN,
static const range_fn ADAMW[9] = {FOR_PG(NAME_ADAMW)};
static const range_fn SGD[9] = {FOR_PG(NAME_SGD)};

/* table rows: p, g, m, v, mask (or p), unused, numel */
int mmu_adamw(int pcode, int gcode, const int64_t *ptrs, int64_t T, const int64_t *chunks,
              int64_t C, int64_t block, int nt, int has_mask, float gmul, float decay,
              float beta2, float w1, float omb2, float eps, float nss, float bc2s) {
    step_ctx ctx = {ptrs, chunks, chunks + C, T, block, has_mask, gmul, decay, beta2, w1, omb2,
                    eps, nss, bc2s, 0.0f};
    return parallel_chunks(ADAMW[pcode * 3 + gcode], &ctx, C, nt);
}

/* table rows: p, g, mask (or p), numel */
int mmu_sgd(int pcode, int gcode, const int64_t *ptrs, int64_t T, const int64_t *chunks,
            int64_t C, int64_t block, int nt, int has_mask, float gmul, float lr, float decay) {
    step_ctx ctx = {ptrs, chunks, chunks + C, T, block, has_mask, gmul, decay,
                    0, 0, 0, 0, 0, 0, lr};
    return parallel_chunks(SGD[pcode * 3 + gcode], &ctx, C, nt);
}

/* ---------------------------------------------------------------- Fisher, grad norm */
typedef struct {
    const int64_t *ptrs, *tid, *start; int64_t T, block; float scale; int abs_mode; double *partial;
} red_ctx;

/* ATen: acc.add_(g * g, alpha=scale) = fma(scale, g * g, acc) */
#define FISHER_KERNEL(GN, GS)                                                                 \
static void fisher_##GN(const void *vctx, int64_t c0, int64_t c1, int th) {                   \
    const red_ctx *ctx = (const red_ctx *)vctx; (void)th;                                     \
    const int64_t *numel = ctx->ptrs + 2 * ctx->T;                                            \
    const float sc = ctx->scale;                                                              \
    for (int64_t c = c0; c < c1; c++) {                                                       \
        int64_t i = ctx->tid[c], s = ctx->start[c];                                           \
        int64_t e = s + ctx->block < numel[i] ? s + ctx->block : numel[i];                    \
        float *restrict a = PTR(float, 0, i); const GS *restrict g = PTR(const GS, 1, i);     \
        if (ctx->abs_mode) {                                                                  \
            for (int64_t j = s; j < e; j++) a[j] = fmaf(sc, fabsf(ld_##GN(g[j])), a[j]);     \
        } else {                                                                              \
            for (int64_t j = s; j < e; j++) {                                                 \
                float x = ld_##GN(g[j]); a[j] = fmaf(sc, x * x, a[j]);                        \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}

/* per-chunk sums in double, in element order within 8 lanes: independent of the thread count */
#define SQNORM_KERNEL(GN, GS)                                                                 \
static void sqnorm_##GN(const void *vctx, int64_t c0, int64_t c1, int th) {                   \
    const red_ctx *ctx = (const red_ctx *)vctx; (void)th;                                     \
    const int64_t *numel = ctx->ptrs + 1 * ctx->T;                                            \
    for (int64_t c = c0; c < c1; c++) {                                                       \
        int64_t i = ctx->tid[c], s = ctx->start[c];                                           \
        int64_t e = s + ctx->block < numel[i] ? s + ctx->block : numel[i];                    \
        const GS *restrict g = PTR(const GS, 0, i);                                           \
        double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                            \
        int64_t j = s;                                                                        \
        for (; j + 8 <= e; j += 8)                                                            \
            for (int l = 0; l < 8; l++) { double x = ld_##GN(g[j + l]); lane[l] += x * x; }   \
        for (; j < e; j++) { double x = ld_##GN(g[j]); lane[0] += x * x; }                    \
        ctx->partial[c] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) +                       \
                          ((lane[4] + lane[5]) + (lane[6] + lane[7]));                        \
    }                                                                                         \
}
#define FOR_G(X) X(f32, uint32_t) X(bf16, uint16_t) X(f16, uint16_t)
FOR_G(FISHER_KERNEL)
FOR_G(SQNORM_KERNEL)
static const range_fn FISHER[3] = {fisher_f32, fisher_bf16, fisher_f16};
static const range_fn SQNORM[3] = {sqnorm_f32, sqnorm_bf16, sqnorm_f16};

/* table rows: acc, g, numel */
int mmu_fisher(int gcode, const int64_t *ptrs, int64_t T, const int64_t *chunks, int64_t C,
               int64_t block, int nt, float scale, int abs_mode) {
    red_ctx ctx = {ptrs, chunks, chunks + C, T, block, scale, abs_mode, NULL};
    return parallel_chunks(FISHER[gcode], &ctx, C, nt);
}

/* table rows: g, numel; returns the sum over chunks (chunk order) */
double mmu_sqnorm(int gcode, const int64_t *ptrs, int64_t T, const int64_t *chunks, int64_t C,
                  int64_t block, int nt) {
    double *partial = (double *)malloc((size_t)(C > 0 ? C : 1) * sizeof(double));
    if (!partial) return NAN;
    red_ctx ctx = {ptrs, chunks, chunks + C, T, block, 0.0f, 0, partial};
    parallel_chunks(SQNORM[gcode], &ctx, C, nt);
    double total = 0.0;
    for (int64_t c = 0; c < C; c++) total += partial[c];
    free(partial);
    return total;
}

/* ---------------------------------------------------------------- saliency */
typedef struct {
    const int64_t *ptrs, *tid, *start; int64_t T, block; float gamma, eps;
    int64_t *counts; /* per chunk */
    int64_t *hist; int shift, nbits, level0; uint32_t prefix; /* histogram: per thread */
} sal_ctx;

/* bit = (ff + eps) / (fp + eps) >= gamma, packed little-endian; popcount per chunk */
static void mask_range(const void *vctx, int64_t c0, int64_t c1, int th) {
    const sal_ctx *ctx = (const sal_ctx *)vctx; (void)th;
    const int64_t *numel = ctx->ptrs + 3 * ctx->T;
    const float eps = ctx->eps, gamma = ctx->gamma;
    for (int64_t c = c0; c < c1; c++) {
        int64_t i = ctx->tid[c], s = ctx->start[c];
        int64_t e = s + ctx->block < numel[i] ? s + ctx->block : numel[i];
        const float *restrict ff = PTR(const float, 0, i), *restrict fp = PTR(const float, 1, i);
        uint8_t *restrict out = PTR(uint8_t, 2, i);
        int64_t cnt = 0, j = s;
        for (; j + 8 <= e; j += 8) {
            uint32_t byte = 0;
            for (int l = 0; l < 8; l++)
                byte |= (uint32_t)((ff[j + l] + eps) / (fp[j + l] + eps) >= gamma) << l;
            out[j >> 3] = (uint8_t)byte;
            cnt += __builtin_popcount(byte);
        }
        if (j < e) {
            uint32_t byte = 0;
            for (int l = 0; j + l < e; l++)
                byte |= (uint32_t)((ff[j + l] + eps) / (fp[j + l] + eps) >= gamma) << l;
            out[j >> 3] = (uint8_t)byte;
            cnt += __builtin_popcount(byte);
        }
        ctx->counts[c] = cnt;
    }
}

/* table rows: ff, fp, out, numel; counts[T] += per-tensor popcounts */
int mmu_mask(const int64_t *ptrs, int64_t T, const int64_t *chunks, int64_t C, int64_t block,
             int nt, float gamma, float eps, int64_t *counts) {
    int64_t *per = (int64_t *)calloc((size_t)(C > 0 ? C : 1), sizeof(int64_t));
    if (!per) return -1;
    sal_ctx ctx = {ptrs, chunks, chunks + C, T, block, gamma, eps, per, NULL, 0, 0, 0, 0};
    int used = parallel_chunks(mask_range, &ctx, C, nt);
    for (int64_t c = 0; c < C; c++) counts[chunks[c]] += per[c];
    free(per);
    return used;
}

/* radix-select histogram of the order-preserving keys of the ratio's fp32 bits */
static void hist_range(const void *vctx, int64_t c0, int64_t c1, int th) {
    const sal_ctx *ctx = (const sal_ctx *)vctx;
    const int64_t *numel = ctx->ptrs + 2 * ctx->T;
    int64_t *h = ctx->hist + ((int64_t)th << ctx->nbits);
    const float eps = ctx->eps;
    const int shift = ctx->shift, top = ctx->shift + ctx->nbits;
    const uint32_t dmask = (1u << ctx->nbits) - 1u, prefix = ctx->prefix;
    for (int64_t c = c0; c < c1; c++) {
        int64_t i = ctx->tid[c], s = ctx->start[c];
        int64_t e = s + ctx->block < numel[i] ? s + ctx->block : numel[i];
        const float *restrict ff = PTR(const float, 0, i), *restrict fp = PTR(const float, 1, i);
        for (int64_t j = s; j < e; j++) {
            uint32_t b = f2u((ff[j] + eps) / (fp[j] + eps));
            uint32_t key = b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
            if (ctx->level0 || (key >> top) == prefix) h[(key >> shift) & dmask]++;
        }
    }
}

/* table rows: ff, fp, numel; hist[2^nbits] += counts */
int mmu_hist(const int64_t *ptrs, int64_t T, const int64_t *chunks, int64_t C, int64_t block,
             int nt, float eps, int shift, int nbits, int level0, uint32_t prefix,
             int64_t *hist) {
    int n = nt > 64 ? 64 : (nt < 1 ? 1 : nt);
    int64_t bins = (int64_t)1 << nbits;
    int64_t *local = (int64_t *)calloc((size_t)(n * bins), sizeof(int64_t));
    if (!local) return -1;
    sal_ctx ctx = {ptrs, chunks, chunks + C, T, block, 0.0f, eps, NULL, local, shift, nbits,
                   level0, prefix};
    int used = parallel_chunks(hist_range, &ctx, C, n);
    for (int t = 0; t < used; t++)
        for (int64_t b = 0; b < bins; b++) hist[b] += local[t * bins + b];
    free(local);
    return used;
}
"""


# ------------------------------------------------------------------ build and load
_LOCK = threading.Lock()
_STATE: dict = {}


def cache_dir() -> str:
    """Where the built library is kept: ``$MMUNLEARN_CACHE_DIR``, else ``~/.cache/mmunlearn``
    (``$XDG_CACHE_HOME`` respected), else — if that cannot be written — a private
    ``mmunlearn-<uid>`` directory (mode 0700) in the temporary directory."""
    d = os.environ.get("MMUNLEARN_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = os.path.join(base, "mmunlearn")
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = os.path.join(tempfile.gettempdir(), f"mmunlearn-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    if os.stat(d).st_uid != os.getuid():
        raise RuntimeError(f"{d} belongs to another user; set MMUNLEARN_CACHE_DIR")
    return d


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return text


_FLAGS = [
    "-O3",
    "-std=gnu11",
    "-ffp-contract=off",  # no fused multiply-adds but the explicit fmaf() where ATen has them
    "-fno-math-errno",  # lets sqrtf vectorise; IEEE results unchanged
    "-fPIC",
    "-shared",
    "-pthread",
]


def _build(path: str) -> str:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        src = os.path.join(tmp, "mmu_cpu.c")
        with open(src, "w") as f:
            f.write(_SOURCE)
        out = os.path.join(tmp, "mmu_cpu.so")
        errors = []
        for arch in (["-march=native"], []):  # -march=native is unknown to some compilers
            cmd = [cc, *_FLAGS, *arch, src, "-o", out, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(out, path)  # atomic: concurrent builders write the same bytes
                return " ".join(cmd)
            errors.append(proc.stderr.strip()[-2000:])
    raise RuntimeError("building the CPU kernels failed:\n" + "\n".join(errors))


def _declare(lib) -> None:
    i64p = ctypes.c_void_p
    i64, i32, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
    table = [i64p, i64, i64p, i64, i64, i32]
    lib.mmu_abi.restype = i64
    lib.mmu_adamw.argtypes = [i32, i32, *table, i32] + [f32] * 8
    lib.mmu_adamw.restype = i32
    lib.mmu_sgd.argtypes = [i32, i32, *table, i32, f32, f32, f32]
    lib.mmu_sgd.restype = i32
    lib.mmu_fisher.argtypes = [i32, *table, f32, i32]
    lib.mmu_fisher.restype = i32
    lib.mmu_sqnorm.argtypes = [i32, *table]
    lib.mmu_sqnorm.restype = ctypes.c_double
    lib.mmu_mask.argtypes = [*table, f32, f32, i64p]
    lib.mmu_mask.restype = i32
    lib.mmu_hist.argtypes = [*table, f32, i32, i32, i32, ctypes.c_uint32, i64p]
    lib.mmu_hist.restype = i32


def load():
    """The loaded library (built on first use); RuntimeError when it cannot be built."""
    lib = _STATE.get("lib")
    if lib is not None:
        return lib
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]
        if "error" in _STATE:
            raise RuntimeError(_STATE["error"])
        key = hashlib.sha256(
            "\0".join([_SOURCE, " ".join(_FLAGS), _cpu_id(), str(ABI)]).encode()
        ).hexdigest()[:24]
        try:
            path = os.path.join(cache_dir(), f"mmu_cpu_{key}.so")
            if not os.path.exists(path):
                _STATE["build"] = _build(path)
            lib = ctypes.CDLL(path)
            _declare(lib)
            if lib.mmu_abi() != ABI:
                raise RuntimeError(f"{path}: ABI {lib.mmu_abi()} != {ABI}")
        except (OSError, RuntimeError) as e:
            _STATE["error"] = f"mmunlearn CPU kernels unavailable: {e}"
            raise RuntimeError(_STATE["error"]) from e
        _STATE["path"], _STATE["lib"] = path, lib
        return lib


def available() -> bool:
    """Whether the ``cpu`` backend works here (builds it on the first call, warns once if not)."""
    if "lib" in _STATE:
        return True
    try:
        load()
        return True
    except RuntimeError as e:
        if not _STATE.get("warned"):
            _STATE["warned"] = True
            warnings.warn(f"{e}; the torch twins are used instead", RuntimeWarning, stacklevel=3)
        return False


def threads_for(total: int) -> int:
    """Threads for a call over ``total`` elements: torch's intra-op count, 1 for small work."""
    return 1 if total < PARALLEL_MIN else max(1, torch.get_num_threads())
