/* mmunlearn CPU kernels (the ``cpu`` backend; loaded by kernels/_cpu.py through ctypes).

   Multi-tensor kernels over the same pointer / chunk tables the Triton kernels read; one call
   covers every tensor of a list, its chunks taken by POSIX threads from a shared counter.
   Arithmetic follows ATen's CPU kernels op for op (fmaf where ATen fuses; built with
   -ffp-contract=off). Plain C11 + POSIX: no _Float16 (gcc < 12 lacks it on x86), fp16 is
   converted with integer bit manipulation (round to nearest even, as c10's conversion).
   Build flags and caching: kernels/_cpu.py. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int64_t mmu_abi(void) { return 4; }

static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
/* storage <-> fp32, per dtype: f32 words, bf16 and f16 halves. The st_* take an "add" for
   the bf16 rounding (round_add below): ignored by f32 and f16. */
static inline float ld_f32(uint32_t x) { return u2f(x); }
static inline uint32_t st_f32(float x, uint32_t add) { (void)add; return f2u(x); }
static inline float ld_bf16(uint16_t x) { return u2f((uint32_t)x << 16); }
/* fp32 -> bf16 by adding ``add`` to the fp32 bits and truncating the low 16 bits:
   add = 0x7FFF + lsb is round-to-nearest-even (c10), add = a uniform 16-bit random integer is
   stochastic rounding (P(round away from zero) = dropped fraction / 2^16). NaN -> 0x7FC0. */
static inline uint16_t st_bf16(float x, uint32_t add) {
    uint32_t b = f2u(x);
    uint16_t r = (uint16_t)((b + add) >> 16);
    return x != x ? (uint16_t)0x7FC0 : r;
}
static inline uint32_t rne_add(float x) { return 0x7FFFu + ((f2u(x) >> 16) & 1u); }
/* fp16 <-> fp32 by bit manipulation (no _Float16): exact widening; narrowing rounds to
   nearest even, overflow -> inf, NaN -> sign | 0x7E00 (c10's fp16_ieee_from_fp32_value). */
static inline float ld_f16(uint16_t h) {
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13, e = o & 0x0f800000u;
    o += (uint32_t)(127 - 15) << 23;
    if (e == 0x0f800000u) o += (uint32_t)(128 - 16) << 23;           /* inf / NaN */
    else if (e == 0) o = f2u(u2f(o + (1u << 23)) - u2f(113u << 23)); /* zero / subnormal */
    return u2f(o | ((uint32_t)(h & 0x8000u) << 16));
}
static inline uint16_t st_f16(float x, uint32_t add) {
    (void)add;
    uint32_t f = f2u(x), sign = f & 0x80000000u, o;
    f ^= sign;
    if (f >= (uint32_t)(127 + 16) << 23) {                    /* >= 65536, inf, NaN */
        o = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (f < 113u << 23) {                              /* subnormal or zero in fp16 */
        float magic = u2f((uint32_t)((127 - 15) + (23 - 10) + 1) << 23);
        o = f2u(u2f(f) + magic) - f2u(magic);
    } else {                                                  /* normal: RNE on 13 bits */
        uint32_t odd = (f >> 13) & 1u;
        f += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        o = f >> 13;                                          /* 65520..65535 carry to inf */
    }
    return (uint16_t)(o | (sign >> 16));
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
/* Counter-based random bits for stochastic rounding: a 32-bit integer hash (xor-shift-multiply,
   both multipliers < 2^31 so the torch twin can evaluate it in int64 without overflow). The
   bits of element j of tensor i at one step are mix32(j ^ key_i), key_i = mix32(seed ^ salt_i):
   low 16 bits round exp_avg, high 16 exp_avg_sq, the high half of u * 0x5BD1E995 (mod 2^32)
   the parameter.
   Same function in the torch twin and the Triton kernel (kernels/_common.py). */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x21f0aaadu; x ^= x >> 15; return x;
}
#define PARAM_MUL 0x5bd1e995u
/* the per-element and per-chunk bodies must be inlined into each (SRS, SRP) call site: their
   flags then are constants and the element loops vectorise */
#define INLINE static inline __attribute__((always_inline))
/* selected elements per tile of the compacted-state step (its buffers live on the stack) */
#define CTILE 512

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
    const int64_t *ptrs, *tid, *start, *cbase; int64_t T, block; int has_mask, compact;
    uint32_t seed; int sr_state, sr_param;
    float gmul, decay, beta2, w1, omb2, eps, nss, bc2s, lr;
    float eps2, nss2; /* eps·bc2s and nss·bc2s (fp32 products): the bf16-state update */
} step_ctx;

/* ---------------------------------------------------------------- bf16-state AdamW, AVX2
   The bf16-moment step, 16 elements at a time with AVX2 + FMA + F16C intrinsics. Same
   operations in the same order as adamw_elem (IEEE mul/add/div/sqrt, fmaf as one FMA; the
   update ADAM_P_bf16), same random bits (mix32 of the parameter's element index), same NaN
   and masked-out rules: results are bit-identical to the scalar body (and the torch twin),
   only the instruction selection differs. Why by hand: gcc's auto-vectorised bf16 body (16-bit
   lanes widened and narrowed through extracts and permutes, the hash and the NaN selects on
   every store) took 1.6-1.8 ns per element on one Zen 3 core (16 M elements, bf16 params)
   against 1.1-1.3 for the fp32-state step, which is bound by its 22 bytes per element; these
   blocks take 1.0-1.1 with ATen's two divisions, 0.9-1.0 with ADAM_P_bf16's one (bench/NOTES.md,
   issue 21, third pass). The fp32-state step keeps the auto-vectorised body.
   Lane order: 16 bf16 values widen with vpunpck{l,h}wd, which leaves elements 0-3, 8-11 in the
   "lo" vector and 4-7, 12-15 in "hi" (per 128-bit lane); vpackusdw narrows back to element
   order. Operands of other dtypes are loaded into the same lane order. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MMU_VEC 1
typedef struct {
    __m256 gmul, decay, beta2, w1, w1s, omb2, eps2, nss2; __m256i key; int small;
} vconst;
static inline vconst vconst_make(const step_ctx *ctx, int small, float w1s, uint32_t key) {
    vconst k = {_mm256_set1_ps(ctx->gmul), _mm256_set1_ps(ctx->decay), _mm256_set1_ps(ctx->beta2),
                _mm256_set1_ps(ctx->w1), _mm256_set1_ps(w1s), _mm256_set1_ps(ctx->omb2),
                _mm256_set1_ps(ctx->eps2), _mm256_set1_ps(ctx->nss2),
                _mm256_set1_epi32((int)key), small};
    return k;
}
/* loads: 16 elements -> lo, hi (lane order); raw = the bits read, for the masked-out blend */
typedef struct { __m256i a, b; } raw2;
static inline void vld_bf16(const uint16_t *x, __m256 *lo, __m256 *hi, raw2 *raw) {
    __m256i r = _mm256_loadu_si256((const __m256i *)x), z = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, r));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, r));
    raw->a = r;
}
static inline void vld_f32(const uint32_t *x, __m256 *lo, __m256 *hi, raw2 *raw) {
    __m256i a = _mm256_loadu_si256((const __m256i *)x);
    __m256i b = _mm256_loadu_si256((const __m256i *)x + 1);
    *lo = _mm256_castsi256_ps(_mm256_permute2x128_si256(a, b, 0x20));
    *hi = _mm256_castsi256_ps(_mm256_permute2x128_si256(a, b, 0x31));
    raw->a = a; raw->b = b;
}
/* exact widening (a signalling NaN comes back quiet: the multiply that follows every load
   quiets it in the scalar body too) */
static inline void vld_f16(const uint16_t *x, __m256 *lo, __m256 *hi, raw2 *raw) {
    __m256i r = _mm256_loadu_si256((const __m256i *)x);
    __m256 a = _mm256_cvtph_ps(_mm256_castsi256_si128(r));
    __m256 b = _mm256_cvtph_ps(_mm256_extracti128_si256(r, 1));
    *lo = _mm256_permute2f128_ps(a, b, 0x20); *hi = _mm256_permute2f128_ps(a, b, 0x31);
    raw->a = r;
}
/* 16 mask bits -> lane masks for 16-bit / 32-bit lanes in element order */
static inline __m256i vsel16(uint32_t bits) {
    const __m256i b = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                        8192, 16384, (short)0x8000);
    return _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)bits), b), b);
}
static inline __m256i vsel32(uint32_t bits) {
    const __m256i b = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), b), b);
}
static inline __m256i vnan16(__m256i r, __m256 lo, __m256 hi, __m256i q) {
    /* (lo, hi) lane order -> 16-bit lanes in element order: where NaN, q */
    __m256i a = _mm256_castps_si256(_mm256_cmp_ps(lo, lo, _CMP_UNORD_Q));
    __m256i b = _mm256_castps_si256(_mm256_cmp_ps(hi, hi, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, q, _mm256_packs_epi32(a, b));
}
/* stores. bf16: add (16-bit rounding addend per lane, lane order) to the fp32 bits, keep the
   high half; NaN -> 0x7FC0 only when the caller saw a NaN among its results (nan). f32: the
   bits. f16: c10's round to nearest even (F16C), NaN -> sign | 0x7E00. Masked-out lanes get
   the raw bits back. */
static inline void vst_bf16(uint16_t *x, __m256 lo, __m256 hi, __m256i alo, __m256i ahi,
                            int nan, const raw2 *raw, int masked, uint32_t bits) {
    __m256i a = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(lo), alo), 16);
    __m256i b = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(hi), ahi), 16);
    __m256i r = _mm256_packus_epi32(a, b);
    if (nan) r = vnan16(r, lo, hi, _mm256_set1_epi16(0x7FC0));
    if (masked) r = _mm256_blendv_epi8(raw->a, r, vsel16(bits));
    _mm256_storeu_si256((__m256i *)x, r);
}
static inline void vst_f32(uint32_t *x, __m256 lo, __m256 hi, const raw2 *raw, int masked,
                           uint32_t bits) {
    __m256i a = _mm256_castps_si256(_mm256_permute2f128_ps(lo, hi, 0x20));
    __m256i b = _mm256_castps_si256(_mm256_permute2f128_ps(lo, hi, 0x31));
    if (masked) {
        a = _mm256_blendv_epi8(raw->a, a, vsel32(bits));
        b = _mm256_blendv_epi8(raw->b, b, vsel32(bits >> 8));
    }
    _mm256_storeu_si256((__m256i *)x, a); _mm256_storeu_si256((__m256i *)x + 1, b);
}
static inline void vst_f16(uint16_t *x, __m256 lo, __m256 hi, const raw2 *raw, int masked,
                           uint32_t bits) {
    __m256 a = _mm256_permute2f128_ps(lo, hi, 0x20), b = _mm256_permute2f128_ps(lo, hi, 0x31);
    __m256i r = _mm256_set_m128i(_mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT),
                                 _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
    /* NaN: sign | 0x7E00, the payload dropped (c10) */
    __m256i sa = _mm256_srli_epi32(_mm256_castps_si256(a), 16);
    __m256i sb = _mm256_srli_epi32(_mm256_castps_si256(b), 16);
    __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_permute4x64_epi64(
                    _mm256_packus_epi32(sa, sb), 0xD8), _mm256_set1_epi16((short)0x8000)),
                                _mm256_set1_epi16(0x7E00));
    __m256i na = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    __m256i nb = _mm256_castps_si256(_mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, q, _mm256_permute4x64_epi64(_mm256_packs_epi32(na, nb), 0xD8));
    if (masked) r = _mm256_blendv_epi8(raw->a, r, vsel16(bits));
    _mm256_storeu_si256((__m256i *)x, r);
}
static inline __m256i vmix32(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x21f0aaad));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}
/* rne_add on 8 lanes: 0x7FFF + bit 16 */
static inline __m256i vrne(__m256 x) {
    return _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(
        _mm256_srli_epi32(_mm256_castps_si256(x), 16), _mm256_set1_epi32(1)));
}
/* adamw_elem's arithmetic on 8 lanes (bf16 moments: ADAM_P_bf16) */
static inline void vadamw8(const vconst *k, __m256 g, __m256 p, __m256 mo, __m256 vo,
                           __m256 *pn, __m256 *mn, __m256 *vn) {
    __m256 gg = _mm256_mul_ps(g, k->gmul), pp = _mm256_mul_ps(p, k->decay);
    __m256 d = _mm256_sub_ps(gg, mo);
    *mn = k->small ? _mm256_fmadd_ps(k->w1, d, mo) : _mm256_fmadd_ps(k->w1s, d, gg);
    *vn = _mm256_fmadd_ps(_mm256_mul_ps(k->omb2, gg), gg, _mm256_mul_ps(vo, k->beta2));
    __m256 den = _mm256_add_ps(_mm256_sqrt_ps(*vn), k->eps2);
    *pn = _mm256_add_ps(pp, _mm256_div_ps(_mm256_mul_ps(k->nss2, *mn), den));
}
#define PBF16_f32 0
#define PBF16_bf16 1
#define PBF16_f16 0
/* 16 elements: parameters and gradients at p, g (element j of the tensor: the hash input),
   bf16 moments at m, v. masked: blend with the mask bits (1 = update). */
#define ADAMW_VEC(PN, PS, GN, GS)                                                             \
INLINE void adamw16_##PN##_##GN(const vconst *k, PS *restrict p, const GS *restrict g,        \
        uint16_t *restrict m, uint16_t *restrict v, int64_t j, uint32_t bits, const int masked,\
        const int SRS, const int SRP) {                                                       \
    __m256 gl, gh, pl, ph, ml, mh, vl, vh, pnl, pnh, mnl, mnh, vnl, vnh;                      \
    raw2 rg, rp, rm, rv;                                                                      \
    vld_##GN(g, &gl, &gh, &rg); vld_##PN(p, &pl, &ph, &rp);                                  \
    vld_bf16(m, &ml, &mh, &rm); vld_bf16(v, &vl, &vh, &rv);                                   \
    vadamw8(k, gl, pl, ml, vl, &pnl, &mnl, &vnl);                                             \
    vadamw8(k, gh, ph, mh, vh, &pnh, &mnh, &vnh);                                             \
    __m256i ul = _mm256_setzero_si256(), uh = ul;                                             \
    if (SRS || SRP) {                                                                         \
        const __m256i ilo = _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11);                      \
        __m256i jb = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)j), ilo);              \
        ul = vmix32(_mm256_xor_si256(jb, k->key));                                            \
        uh = vmix32(_mm256_xor_si256(_mm256_add_epi32(jb, _mm256_set1_epi32(4)), k->key));    \
    }                                                                                         \
    __m256 nanv = _mm256_or_ps(_mm256_cmp_ps(mnl, mnh, _CMP_UNORD_Q),                         \
                               _mm256_cmp_ps(vnl, vnh, _CMP_UNORD_Q));                        \
    if (PBF16_##PN) nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(pnl, pnh, _CMP_UNORD_Q));         \
    const int nan = _mm256_movemask_ps(nanv) != 0;                                            \
    const int msk = masked && bits != 0xFFFFu;                                                \
    const __m256i lo16 = _mm256_set1_epi32(0xFFFF);                                           \
    if (SRS) {                                                                                \
        vst_bf16(m, mnl, mnh, _mm256_and_si256(ul, lo16), _mm256_and_si256(uh, lo16), nan,    \
                 &rm, msk, bits);                                                             \
        vst_bf16(v, vnl, vnh, _mm256_srli_epi32(ul, 16), _mm256_srli_epi32(uh, 16), nan, &rv, \
                 msk, bits);                                                                  \
    } else {                                                                                  \
        vst_bf16(m, mnl, mnh, vrne(mnl), vrne(mnh), nan, &rm, msk, bits);                     \
        vst_bf16(v, vnl, vnh, vrne(vnl), vrne(vnh), nan, &rv, msk, bits);                     \
    }                                                                                         \
    VST_P_##PN(p, pnl, pnh, ul, uh, nan, &rp, msk, bits, SRP);                                \
}
#define VST_P_f32(p, lo, hi, ul, uh, nan, raw, msk, bits, SRP)                                \
    vst_f32((uint32_t *)(p), lo, hi, raw, msk, bits)
#define VST_P_f16(p, lo, hi, ul, uh, nan, raw, msk, bits, SRP)                                \
    vst_f16((uint16_t *)(p), lo, hi, raw, msk, bits)
#define VST_P_bf16(p, lo, hi, ul, uh, nan, raw, msk, bits, SRP) do {                          \
    if (SRP) {                                                                                \
        const __m256i pm = _mm256_set1_epi32((int)PARAM_MUL);                                 \
        vst_bf16((uint16_t *)(p), lo, hi, _mm256_srli_epi32(_mm256_mullo_epi32(ul, pm), 16),  \
                 _mm256_srli_epi32(_mm256_mullo_epi32(uh, pm), 16), nan, raw, msk, bits);     \
    } else {                                                                                  \
        vst_bf16((uint16_t *)(p), lo, hi, vrne(lo), vrne(hi), nan, raw, msk, bits);           \
    }                                                                                         \
} while (0)
#else
#define MMU_VEC 0
#endif

#if MMU_VEC
#define VEC_bf16 1
#define VEC_INIT(ctx, small, w1s, key) const vconst vk = vconst_make(ctx, small, w1s, key); (void)vk
#define VEC_CALL(PN, GN, p, g, m, v, j, bits, masked, SRS, SRP)                               \
    adamw16_##PN##_##GN(&vk, p, g, (uint16_t *)(m), (uint16_t *)(v), j, bits, masked, SRS, SRP)
#else
#define VEC_bf16 0
#define VEC_INIT(ctx, small, w1s, key) (void)0
#define VEC_CALL(PN, GN, p, g, m, v, j, bits, masked, SRS, SRP) (void)0
#endif
/* A 16-element block of a masked step with at most SPARSE_LANES selected elements runs the
   scalar step on those elements alone (no vector work, no blend of the other lanes). */
#ifndef SPARSE_LANES
#define SPARSE_LANES 2
#endif
#define VEC_f32 0 /* the fp32-state step stays as it was (auto-vectorised, bit-exact with ATen) */

/* The parameter's new value. fp32 moments: ATen's ops, denom = sqrt(v) / bc2s + eps, then
   p + (nss * m) / denom (two divisions and a square root: bit-exact with torch.optim.AdamW).
   bf16 moments (rounded anyway, so not bit-exact with torch whatever the update does): the same
   quotient with numerator and denominator multiplied by bc2s, p + (nss2 * m) / (sqrt(v) + eps2),
   nss2 = nss * bc2s, eps2 = eps * bc2s in fp32 — one division and a square root; the torch twin
   and the Triton kernel compute it alike. The update's relative error against fp64 stays within
   a few fp32 ulps either way (tests/test_kernels_state.py). */
#define ADAM_P_f32(ctx, pp, mn, vn)                                                           \
    ((pp) + ((ctx)->nss * (mn)) / (sqrtf(vn) / (ctx)->bc2s + (ctx)->eps))
#define ADAM_P_bf16(ctx, pp, mn, vn) ((pp) + ((ctx)->nss2 * (mn)) / (sqrtf(vn) + (ctx)->eps2))

/* ATen: p.mul_(decay); m.lerp_(g, w1) = fma(w1, g - m, m) (w1 < 0.5) or fma(w1 - 1, g - m, g);
   v.mul(beta2).addcmul_(g, g, omb2) = fma(omb2 * g, g, v * beta2);
   denom = sqrt(v) / bc2s + eps; p.addcdiv_(m, denom, -step_size) = p + (nss * m) / denom.
   Parameter element j, moments element k (k = j, or the rank of j among the selected elements
   with compacted state). SRS / SRP: stochastic rounding of bf16 moments / bf16 parameters
   (compile-time constants at every call site, so the fp32 path carries no random bits). */
#define ADAMW_KERNEL(PN, PS, GN, GS, SN, SS)                                                  \
INLINE void adamw_elem_##PN##_##GN##_##SN(const step_ctx *ctx, PS *restrict p,         \
        const GS *restrict g, SS *restrict m, SS *restrict v, int64_t j, int64_t k, int on,    \
        int small, float w1s, uint32_t key, const int SRS, const int SRP) {                   \
    float gg = ld_##GN(g[j]) * ctx->gmul;                                                     \
    float pp = ld_##PN(p[j]) * ctx->decay;                                                    \
    float mo = ld_##SN(m[k]), vo = ld_##SN(v[k]), d = gg - mo;                                \
    float mn = small ? fmaf(ctx->w1, d, mo) : fmaf(w1s, d, gg);                               \
    float vn = fmaf(ctx->omb2 * gg, gg, vo * ctx->beta2);                                     \
    float pn = ADAM_P_##SN(ctx, pp, mn, vn);                                                  \
    uint32_t u = (SRS || SRP) ? mix32((uint32_t)j ^ key) : 0u;                                \
    uint32_t am = SRS ? (u & 0xffffu) : rne_add(mn), av = SRS ? (u >> 16) : rne_add(vn);      \
    uint32_t ap = SRP ? ((u * PARAM_MUL) >> 16) : rne_add(pn);                      \
    PS pold = p[j]; SS mold = m[k], vold = v[k];                                              \
    p[j] = BLEND_##PN(on, st_##PN(pn, ap), pold);                                             \
    m[k] = BLEND_##SN(on, st_##SN(mn, am), mold);                                             \
    v[k] = BLEND_##SN(on, st_##SN(vn, av), vold);                                             \
}                                                                                             \
/* compacted state: a tile of n selected elements at indices jj[], parameters and gradients \
   already gathered (widened to fp32) into pf[] / gf[], moments contiguous at m[k..k+n): the \
   loop runs over contiguous lanes and vectorises (the divisions and the square root, which \
   bound this step on a CPU, run for the selected elements only); new parameter bits -> pb[]. \
   The same operations as adamw_elem, so results are bit-identical to the dense masked step. */ \
INLINE void adamw_tile_##PN##_##GN##_##SN(const step_ctx *ctx, const int64_t *restrict jj,    \
        const float *restrict pf, const float *restrict gf, uint32_t *restrict pb,            \
        SS *restrict m, SS *restrict v, int n, int small, float w1s, uint32_t key,            \
        const int SRS, const int SRP) {                                                       \
    for (int i = 0; i < n; i++) {                                                             \
        float gg = gf[i] * ctx->gmul;                                                         \
        float pp = pf[i] * ctx->decay;                                                        \
        float mo = ld_##SN(m[i]), vo = ld_##SN(v[i]), d = gg - mo;                            \
        float mn = small ? fmaf(ctx->w1, d, mo) : fmaf(w1s, d, gg);                           \
        float vn = fmaf(ctx->omb2 * gg, gg, vo * ctx->beta2);                                 \
        float pn = ADAM_P_##SN(ctx, pp, mn, vn);                                              \
        uint32_t u = (SRS || SRP) ? mix32((uint32_t)jj[i] ^ key) : 0u;                        \
        uint32_t am = SRS ? (u & 0xffffu) : rne_add(mn), av = SRS ? (u >> 16) : rne_add(vn);  \
        uint32_t ap = SRP ? ((u * PARAM_MUL) >> 16) : rne_add(pn);                            \
        m[i] = st_##SN(mn, am); v[i] = st_##SN(vn, av); pb[i] = (uint32_t)st_##PN(pn, ap);    \
    }                                                                                         \
}                                                                                             \
/* compacted state over one chunk [j, e): collect the selected indices (64 mask bits per word) \
   into a tile; gather, compute (adamw_tile), scatter the parameters back when it fills. A word \
   selecting all 64 is contiguous in the moments too: the pending tile is flushed (moments stay \
   in element order) and the 64 run through the vector loop of the dense step. */            \
INLINE int64_t adamw_flush_##PN##_##GN##_##SN(const step_ctx *ctx, PS *restrict p,            \
        const GS *restrict g, SS *restrict m, SS *restrict v, const int64_t *restrict jj,     \
        int n, int64_t k, int small, float w1s, uint32_t key, const int SRS, const int SRP) { \
    float pf[CTILE], gf[CTILE]; uint32_t pb[CTILE];                                           \
    for (int i = 0; i < n; i++) { pf[i] = ld_##PN(p[jj[i]]); gf[i] = ld_##GN(g[jj[i]]); }     \
    adamw_tile_##PN##_##GN##_##SN(ctx, jj, pf, gf, pb, m + k, v + k, n, small, w1s, key,      \
                                  SRS, SRP);                                                  \
    for (int i = 0; i < n; i++) p[jj[i]] = (PS)pb[i];                                         \
    return k + n;                                                                             \
}                                                                                             \
INLINE void adamw_compact_##PN##_##GN##_##SN(const step_ctx *ctx, PS *restrict p,             \
        const GS *restrict g, SS *restrict m, SS *restrict v, const uint8_t *restrict kb,     \
        int64_t j, int64_t e, int64_t k, int small, float w1s, uint32_t key,                  \
        const int SRS, const int SRP) {                                                       \
    int64_t jj[CTILE]; int n = 0;                                                             \
    VEC_INIT(ctx, small, w1s, key);                                                           \
    for (; j < e; j += 64) {                                                                  \
        uint64_t bits = 0;                                                                    \
        if (j + 64 <= e) memcpy(&bits, kb + (j >> 3), 8);                                     \
        else for (int64_t t = j; t < e; t++)                                                  \
            bits |= (uint64_t)((kb[t >> 3] >> (t & 7)) & 1u) << (t - j);                      \
        if (bits == ~(uint64_t)0) {                                                           \
            if (n) k = adamw_flush_##PN##_##GN##_##SN(ctx, p, g, m, v, jj, n, k, small, w1s,  \
                                                      key, SRS, SRP);                         \
            n = 0;                                                                            \
            if (VEC_##SN) {                                                                   \
                for (int l = 0; l < 64; l += 16)                                              \
                    VEC_CALL(PN, GN, p + j + l, g + j + l, m + k + l, v + k + l, j + l,       \
                             0xFFFFu, 0, SRS, SRP);                                           \
            } else {                                                                          \
                for (int l = 0; l < 64; l++)                                                  \
                    adamw_elem_##PN##_##GN##_##SN(ctx, p, g, m, v, j + l, k + l, 1, small,    \
                                                  w1s, key, SRS, SRP);                        \
            }                                                                                 \
            k += 64;                                                                          \
            continue;                                                                         \
        }                                                                                     \
        while (bits) { jj[n++] = j + __builtin_ctzll(bits); bits &= bits - 1u; }              \
        if (n + 64 > CTILE) {                                                                 \
            k = adamw_flush_##PN##_##GN##_##SN(ctx, p, g, m, v, jj, n, k, small, w1s, key,    \
                                               SRS, SRP);                                     \
            n = 0;                                                                            \
        }                                                                                     \
    }                                                                                         \
    if (n) adamw_flush_##PN##_##GN##_##SN(ctx, p, g, m, v, jj, n, k, small, w1s, key, SRS, SRP); \
}                                                                                             \
INLINE void adamw_range_##PN##_##GN##_##SN(const step_ctx *ctx, int64_t c, int small,  \
        float w1s, const int SRS, const int SRP) {                                            \
    const int64_t *numel = ctx->ptrs + 6 * ctx->T, *salt = ctx->ptrs + 7 * ctx->T;            \
    int64_t i = ctx->tid[c], s = ctx->start[c];                                               \
    int64_t e = s + ctx->block < numel[i] ? s + ctx->block : numel[i];                        \
    PS *restrict p = PTR(PS, 0, i); const GS *restrict g = PTR(const GS, 1, i);               \
    SS *restrict m = PTR(SS, 2, i); SS *restrict v = PTR(SS, 3, i);                           \
    const uint8_t *restrict kb = PTR(const uint8_t, 4, i);                                    \
    const uint32_t key = mix32(ctx->seed ^ (uint32_t)salt[i]);                                \
    int64_t j = s;                                                                            \
    if (ctx->compact) { /* the selected elements only, in order; moments at cbase[c] + rank */ \
        adamw_compact_##PN##_##GN##_##SN(ctx, p, g, m, v, kb, j, e, ctx->cbase[c], small, w1s, \
                                         key, SRS, SRP);                                      \
    } else if (ctx->has_mask) {                                                               \
        VEC_INIT(ctx, small, w1s, key);                                                       \
        for (; j + 16 <= e; j += 16) {                                                        \
            uint32_t bits = (uint32_t)kb[j >> 3] | ((uint32_t)kb[(j >> 3) + 1] << 8);         \
            if (!bits) continue; /* nothing selected: nothing read or written */              \
            if (__builtin_popcount(bits) <= SPARSE_LANES) { /* the selected lanes alone */     \
                for (uint32_t b = bits; b; b &= b - 1) {                                      \
                    const int64_t jl = j + __builtin_ctz(b);                                  \
                    adamw_elem_##PN##_##GN##_##SN(ctx, p, g, m, v, jl, jl, 1, small, w1s, key, \
                                                  SRS, SRP);                                  \
                }                                                                             \
                continue;                                                                     \
            }                                                                                 \
            if (VEC_##SN) {                                                                   \
                VEC_CALL(PN, GN, p + j, g + j, m + j, v + j, j, bits, 1, SRS, SRP);           \
                continue;                                                                     \
            }                                                                                 \
            for (int l = 0; l < 16; l++)                                                      \
                adamw_elem_##PN##_##GN##_##SN(ctx, p, g, m, v, j + l, j + l, (bits >> l) & 1,  \
                                              small, w1s, key, SRS, SRP);                     \
        }                                                                                     \
        for (; j < e; j++)                                                                    \
            adamw_elem_##PN##_##GN##_##SN(ctx, p, g, m, v, j, j, (kb[j >> 3] >> (j & 7)) & 1,  \
                                          small, w1s, key, SRS, SRP);                         \
    } else {                                                                                  \
        if (VEC_##SN) {                                                                       \
            VEC_INIT(ctx, small, w1s, key);                                                   \
            for (; j + 16 <= e; j += 16)                                                      \
                VEC_CALL(PN, GN, p + j, g + j, m + j, v + j, j, 0xFFFFu, 0, SRS, SRP);        \
        }                                                                                     \
        for (; j < e; j++)                                                                    \
            adamw_elem_##PN##_##GN##_##SN(ctx, p, g, m, v, j, j, 1, small, w1s, key, SRS, SRP); \
    }                                                                                         \
}                                                                                             \
static void adamw_##PN##_##GN##_##SN(const void *vctx, int64_t c0, int64_t c1, int th) {      \
    const step_ctx *ctx = (const step_ctx *)vctx; (void)th;                                   \
    const int small = fabsf(ctx->w1) < 0.5f; const float w1s = ctx->w1 - 1.0f;                \
    for (int64_t c = c0; c < c1; c++) {                                                       \
        if (ctx->sr_state && ctx->sr_param)                                                   \
            adamw_range_##PN##_##GN##_##SN(ctx, c, small, w1s, 1, 1);                         \
        else if (ctx->sr_state)                                                               \
            adamw_range_##PN##_##GN##_##SN(ctx, c, small, w1s, 1, 0);                         \
        else if (ctx->sr_param)                                                               \
            adamw_range_##PN##_##GN##_##SN(ctx, c, small, w1s, 0, 1);                         \
        else                                                                                  \
            adamw_range_##PN##_##GN##_##SN(ctx, c, small, w1s, 0, 0);                         \
    }                                                                                         \
}

/* torch twin: (p.float() * decay - lr * g).to(p.dtype) */
#define SGD_KERNEL(PN, PS, GN, GS)                                                            \
static inline void sgd_elem_##PN##_##GN(const step_ctx *ctx, PS *restrict p,                   \
        const GS *restrict g, int64_t j, int on) {                                            \
    float gg = ld_##GN(g[j]) * ctx->gmul;                                                     \
    float pn = ld_##PN(p[j]) * ctx->decay - ctx->lr * gg;                                     \
    PS pold = p[j];                                                                           \
    p[j] = BLEND_##PN(on, st_##PN(pn, rne_add(pn)), pold);                                    \
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
                if (!bits) continue;                                                          \
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
/* (param, grad, state) with state f32 or bf16 */
#if MMU_VEC
FOR_PG(ADAMW_VEC)
#endif
#define WITH_STATE(PN, PS, GN, GS) ADAMW_KERNEL(PN, PS, GN, GS, f32, uint32_t)                \
                                   ADAMW_KERNEL(PN, PS, GN, GS, bf16, uint16_t)
FOR_PG(WITH_STATE)
FOR_PG(SGD_KERNEL)
#define NAME_ADAMW(PN, PS, GN, GS) adamw_##PN##_##GN##_f32, adamw_##PN##_##GN##_bf16,
#define NAME_SGD(PN, PS, GN, GS) sgd_##PN##_##GN,
static const range_fn ADAMW[18] = {FOR_PG(NAME_ADAMW)};
static const range_fn SGD[9] = {FOR_PG(NAME_SGD)};

/* table rows: p, g, m, v, mask (or p), unused, numel, salt. chunks: [tid; start] (C each),
   plus [cbase] with compact (moments packed to the selected elements; mask required). */
int mmu_adamw(int pcode, int gcode, int scode, const int64_t *ptrs, int64_t T,
              const int64_t *chunks, int64_t C, int64_t block, int nt, int has_mask, int compact,
              uint32_t seed, int sr_state, int sr_param, float gmul, float decay, float beta2,
              float w1, float omb2, float eps, float nss, float bc2s) {
    step_ctx ctx = {ptrs, chunks, chunks + C, compact ? chunks + 2 * C : NULL, T, block,
                    has_mask || compact, compact, seed, sr_state, sr_param,
                    gmul, decay, beta2, w1, omb2, eps, nss, bc2s, 0.0f, eps * bc2s, nss * bc2s};
    return parallel_chunks(ADAMW[(pcode * 3 + gcode) * 2 + scode], &ctx, C, nt);
}

/* table rows: p, g, mask (or p), numel */
int mmu_sgd(int pcode, int gcode, const int64_t *ptrs, int64_t T, const int64_t *chunks,
            int64_t C, int64_t block, int nt, int has_mask, float gmul, float lr, float decay) {
    step_ctx ctx = {ptrs, chunks, chunks + C, NULL, T, block, has_mask, 0, 0u, 0, 0, gmul, decay,
                    0, 0, 0, 0, 0, 0, lr, 0, 0};
    return parallel_chunks(SGD[pcode * 3 + gcode], &ctx, C, nt);
}

/* ---------------------------------------------------------------- fp16 conversion (tests) */
void mmu_f16_to_f32(const uint16_t *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = ld_f16(x[i]);
}
void mmu_f32_to_f16(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = st_f16(x[i], 0u);
}
void mmu_mix32(const uint32_t *x, uint32_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = mix32(x[i]);
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
