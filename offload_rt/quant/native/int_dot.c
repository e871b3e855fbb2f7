/* The "int8-dot" CPU kernels: int4 or int8 weights x activations quantized to int8.
 *
 * int4 (ort_int4_dot):
 * out[t, n] = sum over groups G of  sx[t,G] * ((float)J * scale[G,n] + (float)X * zero[G,n])
 *   X = sum_{k in G} xq[t,k],  J = sum_{k in G} xq[t,k] * q[n,k] - 8 * X   (both exact int32)
 * with xq = rint(x * (127 / amax)), sx = amax / 127 per row and group of the weights' group size
 * (the weights: w ~ (q - 8) * scale + zero, torch's "tinygemm" convention, q in 0..15 packed by
 * one of torch's CPU int4 packings, see int4_layout.py). The groups are summed in order, each
 * float operation separately rounded (built with -ffp-contract=off): the AVX-512 VNNI path and
 * the portable path give the same bits, and both the bits of the torch reference in
 * offload_rt/quant/int_dot.py.
 *
 * int8 (ort_int8_dot): weights int8 [N, K] (row-major, one scale per row n, quant/int8.py):
 * out[t, n] = (sum over groups G, in order, of sx[t,G] * (float)I[G, n]) * scale[n]
 *   I = sum_{k in G} xq[t,k] * w[n,k]   (exact int32)
 *
 * The approach (integer dot products of quantized weights and int8 activations with per-block
 * float scales) is llama.cpp's Q4 x Q8 / Q8 x Q8 one; the code is offload_rt's own.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ORT_X86 1
#endif

enum { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2 };

static float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return bits_to_f32(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return bits_to_f32(sign);
        float v = (float)man * (1.0f / 16777216.0f); /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN -> 0x7FC0 (c10::BFloat16) */
    uint32_t u; memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static float value_at(const void *sz, int dt, int64_t i) {
    if (dt == DT_BF16) return bf16_to_f32(((const uint16_t *)sz)[i]);
    if (dt == DT_F16) return f16_to_f32(((const uint16_t *)sz)[i]);
    return ((const float *)sz)[i];
}

/* x [T, K] in xdt -> xq int8 [T, K], sx float [T, K/g], xs int32 [T, K/g]; g <= 256 */
int ort_quantize_rows(const void *x, int xdt, int64_t T, int64_t K, int64_t g, int8_t *xq,
                      float *sx, int32_t *xs) {
    if (g > 256 || K % g) return 1;
    for (int64_t t = 0; t < T; t++)
        for (int64_t k0 = 0; k0 < K; k0 += g) {
            float xr[256];
            for (int64_t k = 0; k < g; k++) xr[k] = value_at(x, xdt, t * K + k0 + k);
            int8_t *qr = xq + t * K + k0;
            float amax = 0.0f;
            int finite = 1;
            for (int64_t k = 0; k < g; k++) {
                float a = fabsf(xr[k]);
                if (!(a <= 3.4028234663852886e38f)) finite = 0;
                else if (a > amax) amax = a;
            }
            int64_t gi = t * (K / g) + k0 / g;
            int32_t sum = 0;
            if (!finite || amax == 0.0f) {
                for (int64_t k = 0; k < g; k++) qr[k] = 0;
                sx[gi] = finite ? 0.0f : NAN;
            } else {
                float inv = 127.0f / amax;
                for (int64_t k = 0; k < g; k++) {
                    float v = nearbyintf(xr[k] * inv);
                    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                    qr[k] = (int8_t)v;
                    sum += qr[k];
                }
                sx[gi] = amax / 127.0f;
            }
            xs[gi] = sum;
        }
    return 0;
}

/* the nibble of row c (within its block of R rows) at column k */
static inline int nibble(const uint8_t *block, int64_t k, int R, int pairs, int c) {
    int half = R / 2;
    if (pairs) {
        uint8_t b = block[k * half + c / 2];
        return (c & 1) ? (b >> 4) : (b & 15);
    }
    uint8_t b = block[k * half + (c % half)];
    return (c >= half) ? (b >> 4) : (b & 15);
}

/* one row of x against one block of R weight rows, any packing: out_block[c] for c < R */
static void block_row_portable(const uint8_t *block, int R, int pairs, const int8_t *xq,
                               const float *sx, const int32_t *xs, int64_t K, int64_t g,
                               const void *sz, int sdt, int64_t N, int64_t n0, float *o) {
    for (int c = 0; c < R; c++) o[c] = 0.0f;
    for (int64_t gi = 0; gi < K / g; gi++) {
        int32_t X = xs[gi];
        for (int c = 0; c < R; c++) {
            int32_t I = 0;
            for (int64_t k = gi * g; k < (gi + 1) * g; k++)
                I += (int32_t)xq[k] * nibble(block, k, R, pairs, c);
            int64_t at = (gi * N + n0 + c) * 2;
            float s = value_at(sz, sdt, at), z = value_at(sz, sdt, at + 1);
            float a = (float)(I - 8 * X) * s;
            float b = (float)X * z;
            float t = a + b;
            float u = sx[gi] * t;
            o[c] = o[c] + u;
        }
    }
}

#ifdef ORT_X86
#define ORT_VNNI __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/* vpdpbusd without VNNI: u8 x s8 pairs to int16 (no saturation here: 2 * 15 * 127 < 2^15),
 * then pairs of those to int32 */
#define ORT_AVX2 __attribute__((target("avx2,f16c")))
ORT_AVX2 static inline __m256i dp4_avx2(__m256i acc, __m256i u8, __m256i s8) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8),
                                                   _mm256_set1_epi16(1)));
}
ORT_VNNI static inline __m256i dp4_vnni(__m256i acc, __m256i u8, __m256i s8) {
    return _mm256_dpbusd_epi32(acc, u8, s8);
}

/* 8 channels' (scale, zero) at ``at`` without AVX-512 (fp16: converted one by one) */
ORT_AVX2 static inline void scales8_avx2(const void *sz, int sdt, int64_t at, __m256 *s,
                                         __m256 *z) {
    if (sdt == DT_F16) {
        float sv[8], zv[8];
        for (int i = 0; i < 8; i++) {
            sv[i] = value_at(sz, sdt, at + 2 * i);
            zv[i] = value_at(sz, sdt, at + 2 * i + 1);
        }
        *s = _mm256_loadu_ps(sv);
        *z = _mm256_loadu_ps(zv);
        return;
    }
    if (sdt == DT_F32) {
        const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)sz + at), idx);
        __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)sz + at + 8), idx);
        *s = _mm256_permute2f128_ps(lo, hi, 0x20);
        *z = _mm256_permute2f128_ps(lo, hi, 0x31);
        return;
    }
    __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)sz + at));
    *s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}
/* the same; fp16 converted 8 at a time (AVX-512VL's vpmovdw) */
ORT_VNNI static inline void scales8_vnni(const void *sz, int sdt, int64_t at, __m256 *s,
                                         __m256 *z) {
    if (sdt != DT_F16) {
        scales8_avx2(sz, sdt, at, s, z);
        return;
    }
    __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)sz + at)); /* (s, z) */
    *s = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF))));
    *z = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(v, 16)));
}

/* 8 int32 sums of 8 channels -> the group's float step into acc (the portable loop's order) */
#define ORT_GROUP_STEP(TARGET)                                                                \
    TARGET static inline __m256 group_step_##TARGET(__m256 acc, __m256i sums, int32_t X,      \
                                                    float sxg, __m256 s, __m256 z) {         \
        __m256 jf = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, _mm256_set1_epi32(8 * X)));    \
        __m256 t = _mm256_add_ps(_mm256_mul_ps(jf, s), _mm256_mul_ps(_mm256_set1_ps((float)X), z)); \
        return _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(sxg), t));                    \
    }
ORT_GROUP_STEP(ORT_AVX2)
ORT_GROUP_STEP(ORT_VNNI)

/* torch's AVX-512 packing (64 rows, byte j of a k-row: rows j and j + 32): 4 k-rows of 32 bytes
 * are interleaved into lanes of 4 consecutive k per row (unpack bytes, then 16-bit pairs) and
 * multiplied by 4 int8 activations per lane (vpdpbusd, or its AVX2 equivalent). The unpacks
 * work within 128-bit lanes: E holds rows 0-3 | 16-19, F 4-7 | 20-23, G 8-11 | 24-27, H 12-15 |
 * 28-31 (+32: high nibbles). */
#define ORT_BLOCK_ROW64(TARGET, DP, SCALES)                                                   \
    TARGET static void block_row64_##DP(const uint8_t *block, const int8_t *xq, const float *sx, \
                                        const int32_t *xs, int64_t K, int64_t g, const void *sz, \
                                        int sdt, int64_t N, int64_t n0, float *o) {          \
        const __m256i m4 = _mm256_set1_epi8(0x0F);                                            \
        __m256 acc[8];                                                                        \
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();                             \
        for (int64_t gi = 0; gi < K / g; gi++) {                                              \
            __m256i a[8];                                                                     \
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_si256();                        \
            for (int64_t k = gi * g; k < (gi + 1) * g; k += 4) {                              \
                const uint8_t *p = block + k * 32;                                            \
                __m256i r0 = _mm256_loadu_si256((const __m256i *)p);                          \
                __m256i r1 = _mm256_loadu_si256((const __m256i *)(p + 32));                   \
                __m256i r2 = _mm256_loadu_si256((const __m256i *)(p + 64));                   \
                __m256i r3 = _mm256_loadu_si256((const __m256i *)(p + 96));                   \
                int32_t quad;                                                                 \
                memcpy(&quad, xq + k, 4);                                                     \
                __m256i xb = _mm256_set1_epi32(quad);                                         \
                __m256i A = _mm256_unpacklo_epi8(r0, r1), B = _mm256_unpackhi_epi8(r0, r1);   \
                __m256i C = _mm256_unpacklo_epi8(r2, r3), D = _mm256_unpackhi_epi8(r2, r3);   \
                __m256i q[4] = {_mm256_unpacklo_epi16(A, C), _mm256_unpackhi_epi16(A, C),     \
                                _mm256_unpacklo_epi16(B, D), _mm256_unpackhi_epi16(B, D)};    \
                for (int i = 0; i < 4; i++) {                                                 \
                    a[i] = DP(a[i], _mm256_and_si256(q[i], m4), xb);                          \
                    a[i + 4] = DP(a[i + 4], _mm256_and_si256(_mm256_srli_epi16(q[i], 4), m4), xb); \
                }                                                                             \
            }                                                                                 \
            __m256i rows[8]; /* rows 8i .. 8i + 7 of the block */                             \
            for (int h = 0; h < 2; h++) {                                                     \
                rows[4 * h + 0] = _mm256_permute2x128_si256(a[4 * h + 0], a[4 * h + 1], 0x20); \
                rows[4 * h + 1] = _mm256_permute2x128_si256(a[4 * h + 2], a[4 * h + 3], 0x20); \
                rows[4 * h + 2] = _mm256_permute2x128_si256(a[4 * h + 0], a[4 * h + 1], 0x31); \
                rows[4 * h + 3] = _mm256_permute2x128_si256(a[4 * h + 2], a[4 * h + 3], 0x31); \
            }                                                                                 \
            for (int i = 0; i < 8; i++) {                                                     \
                __m256 s, z;                                                                  \
                SCALES(sz, sdt, (gi * N + n0 + 8 * i) * 2, &s, &z);                           \
                acc[i] = group_step_##TARGET(acc[i], rows[i], xs[gi], sx[gi], s, z);          \
            }                                                                                 \
        }                                                                                     \
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);                      \
    }
ORT_BLOCK_ROW64(ORT_VNNI, dp4_vnni, scales8_vnni)
ORT_BLOCK_ROW64(ORT_AVX2, dp4_avx2, scales8_avx2)

/* torch's AVX2 packing (32 rows, byte j of a 16-byte k-row: rows j and j + 16): k-rows k..k+3
 * in the low 128-bit lane and k+4..k+7 in the high one, unpacked as above (E: rows 0-3, F 4-7,
 * G 8-11, H 12-15, +16 high nibbles, each lane a different 4 of k), the lanes added at the
 * group's end. */
ORT_AVX2 static void block_row32_avx2(const uint8_t *block, const int8_t *xq, const float *sx,
                                      const int32_t *xs, int64_t K, int64_t g, const void *sz,
                                      int sdt, int64_t N, int64_t n0, float *o) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4];
    for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < K / g; gi++) {
        __m256i a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_si256();
        for (int64_t k = gi * g; k < (gi + 1) * g; k += 8) {
            const uint8_t *p = block + k * 16;
            __m256i r[4];
            for (int j = 0; j < 4; j++)
                r[j] = _mm256_loadu2_m128i((const __m128i *)(p + (j + 4) * 16),
                                           (const __m128i *)(p + j * 16));
            int32_t lo, hi;
            memcpy(&lo, xq + k, 4);
            memcpy(&hi, xq + k + 4, 4);
            __m256i xb = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
            __m256i A = _mm256_unpacklo_epi8(r[0], r[1]), B = _mm256_unpackhi_epi8(r[0], r[1]);
            __m256i C = _mm256_unpacklo_epi8(r[2], r[3]), D = _mm256_unpackhi_epi8(r[2], r[3]);
            __m256i q[4] = {_mm256_unpacklo_epi16(A, C), _mm256_unpackhi_epi16(A, C),
                            _mm256_unpacklo_epi16(B, D), _mm256_unpackhi_epi16(B, D)};
            for (int i = 0; i < 4; i++) {
                a[i] = dp4_avx2(a[i], _mm256_and_si256(q[i], m4), xb);
                a[i + 4] = dp4_avx2(a[i + 4], _mm256_and_si256(_mm256_srli_epi16(q[i], 4), m4),
                                    xb);
            }
        }
        for (int i = 0; i < 4; i++) { /* rows 8i .. 8i + 7: (a[2i] | a[2i+1]) lanes added */
            __m256i x = a[2 * i], y = a[2 * i + 1]; /* rows 0-3 | 4-7, 8-11 | 12-15, ... */
            __m128i lx = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
            __m128i ly = _mm_add_epi32(_mm256_castsi256_si128(y), _mm256_extracti128_si256(y, 1));
            __m256 s, z;
            scales8_avx2(sz, sdt, (gi * N + n0 + 8 * i) * 2, &s, &z);
            acc[i] = group_step_ORT_AVX2(acc[i], _mm256_set_m128i(ly, lx), xs[gi], sx[gi], s, z);
        }
    }
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + 8 * i, acc[i]);
}

static int have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

static int have_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
}
#endif

/* ---- int8 weights ---- */

static void rows_int8_portable(const int8_t *w, int64_t K, int64_t g, const int8_t *xq,
                               const float *sx, int rows, float *o) {
    for (int c = 0; c < rows; c++) {
        float acc = 0.0f;
        for (int64_t gi = 0; gi < K / g; gi++) {
            int32_t I = 0;
            for (int64_t k = gi * g; k < (gi + 1) * g; k++)
                I += (int32_t)xq[k] * (int32_t)w[c * K + k];
            float u = sx[gi] * (float)I;
            acc = acc + u;
        }
        o[c] = acc;
    }
}

#ifdef ORT_X86
#define ORT_AVX512 ORT_VNNI

ORT_AVX512 static inline __m512i widen32(const int8_t *p) { /* 32 int8 -> 32 int16 */
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}

/* one row at a time, each group's 16 lanes added at once (16 rows interleaved group by group
 * ran at half the rate from memory: 16 short streams instead of one) */
ORT_AVX512 static void rows_int8_vnni(const int8_t *w, int64_t K, int64_t g, const int16_t *x16,
                                      const float *sx, int rows, float *o) {
    for (int c = 0; c < rows; c++) {
        const int8_t *row = w + c * K;
        float acc = 0.0f;
        for (int64_t gi = 0; gi < K / g; gi++) {
            __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
            int64_t k = gi * g;
            for (; k + 64 <= (gi + 1) * g; k += 64) {
                a = _mm512_dpwssd_epi32(a, widen32(row + k), _mm512_loadu_si512(x16 + k));
                b = _mm512_dpwssd_epi32(b, widen32(row + k + 32), _mm512_loadu_si512(x16 + k + 32));
            }
            for (; k < (gi + 1) * g; k += 32)
                a = _mm512_dpwssd_epi32(a, widen32(row + k), _mm512_loadu_si512(x16 + k));
            int32_t I = _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
            float u = sx[gi] * (float)I;
            acc = acc + u;
        }
        o[c] = acc;
    }
}

/* the same without AVX-512: 16 products per vpmaddwd */
ORT_AVX2 static void rows_int8_avx2(const int8_t *w, int64_t K, int64_t g, const int16_t *x16,
                                    const float *sx, int rows, float *o) {
    for (int c = 0; c < rows; c++) {
        const int8_t *row = w + c * K;
        float acc = 0.0f;
        for (int64_t gi = 0; gi < K / g; gi++) {
            __m256i a = _mm256_setzero_si256();
            for (int64_t k = gi * g; k < (gi + 1) * g; k += 16) {
                __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
                a = _mm256_add_epi32(a, _mm256_madd_epi16(
                                            wv, _mm256_loadu_si256((const __m256i *)(x16 + k))));
            }
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
            float u = sx[gi] * (float)_mm_cvtsi128_si32(h);
            acc = acc + u;
        }
        o[c] = acc;
    }
}
#endif

enum { PATH_BEST = 0, PATH_PORTABLE = 1, PATH_AVX2 = 2, PATH_VNNI = 3 };

/* ``want`` (PATH_*) if this CPU has it (``vnni``, ``avx2``: whether those paths can run), the
 * best one for PATH_BEST; -1 when the wanted one is missing */
static int choose_path(int vnni, int avx2, int want) {
    if (want == PATH_BEST) return vnni ? PATH_VNNI : avx2 ? PATH_AVX2 : PATH_PORTABLE;
    if (want == PATH_VNNI) return vnni ? want : -1;
    if (want == PATH_AVX2) return avx2 ? want : -1;
    return PATH_PORTABLE;
}

/* The int8 kernel's path for group size g: ``want`` (PATH_*) if this CPU has it, the best one
 * for PATH_BEST; -1 when the wanted one is missing. */
int ort_int8_dot_path(int64_t g, int want) {
    int vnni = 0, avx2 = 0;
#ifdef ORT_X86
    vnni = g % 32 == 0 && have_vnni();
    avx2 = g % 16 == 0 && have_avx2();
#endif
    return choose_path(vnni, avx2, want);
}

/* out [T, N] (float32, or bfloat16 bits when out_bf16) = the module comment's int8 sum, times
 * scale [N] (in sdt). w: int8 [N, K]. */
int ort_int8_dot(const int8_t *xq, const float *sx, int64_t T, int64_t K, int64_t g,
                 const int8_t *w, int64_t N, const void *scale, int sdt, void *out, int out_bf16,
                 int threads, int want) {
    if (K % g) return 1;
    int path = ort_int8_dot_path(g, want);
    if (path < 0) return 3;
    int vector = path != PATH_PORTABLE;
    int64_t G = K / g, nblocks = (N + 15) / 16;
    int16_t *x16 = NULL;
    if (vector) {
        x16 = (int16_t *)malloc(sizeof(int16_t) * (size_t)(T * K));
        if (!x16) return 2;
        for (int64_t i = 0; i < T * K; i++) x16[i] = xq[i];
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nblocks > 1)
    for (int64_t b = 0; b < nblocks; b++) {
        int rows = (int)((N - b * 16) < 16 ? (N - b * 16) : 16);
        const int8_t *wb = w + b * 16 * K;
        for (int64_t t = 0; t < T; t++) {
            float o[16];
#ifdef ORT_X86
            if (path == PATH_VNNI)
                rows_int8_vnni(wb, K, g, x16 + t * K, sx + t * G, rows, o);
            else if (path == PATH_AVX2)
                rows_int8_avx2(wb, K, g, x16 + t * K, sx + t * G, rows, o);
            else
#endif
                rows_int8_portable(wb, K, g, xq + t * K, sx + t * G, rows, o);
            for (int c = 0; c < rows; c++) {
                float y = o[c] * value_at(scale, sdt, b * 16 + c);
                if (out_bf16) ((uint16_t *)out)[t * N + b * 16 + c] = f32_to_bf16(y);
                else ((float *)out)[t * N + b * 16 + c] = y;
            }
        }
    }
    free(x16);
    return 0;
}

/* The int4 kernel's path for packing (R, pairs), as ort_int8_dot_path */
int ort_int4_dot_path(int R, int pairs, int want) {
    int vnni = 0, avx2 = 0;
#ifdef ORT_X86
    vnni = R == 64 && !pairs && have_vnni();
    avx2 = (R == 64 || R == 32) && !pairs && have_avx2();
#else
    (void)R; (void)pairs;
#endif
    return choose_path(vnni, avx2, want);
}

/* out [T, N] (float32, or bfloat16 bits when out_bf16) = the module comment's sum.
 * w: packed uint8 [N / R blocks][K][R / 2]; sz: [K / g, N, 2] (scale, zero) in sdt. */
int ort_int4_dot(const int8_t *xq, const float *sx, const int32_t *xs, int64_t T, int64_t K,
                 int64_t g, const uint8_t *w, int64_t N, int R, int pairs, const void *sz,
                 int sdt, void *out, int out_bf16, int threads, int want) {
    if (K % g || g % 8 || N % R || R % 2) return 1;
    int path = ort_int4_dot_path(R, pairs, want);
    if (path < 0) return 3;
    int64_t nblocks = N / R, G = K / g;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nblocks > 1)
    for (int64_t b = 0; b < nblocks; b++) {
        float o[256];
        const uint8_t *block = w + b * K * (R / 2);
        for (int64_t t = 0; t < T; t++) {
            const int8_t *xr = xq + t * K;
            const float *sr = sx + t * G;
            const int32_t *sumr = xs + t * G;
#ifdef ORT_X86
            if (path == PATH_VNNI)
                block_row64_dp4_vnni(block, xr, sr, sumr, K, g, sz, sdt, N, b * R, o);
            else if (path == PATH_AVX2 && R == 64)
                block_row64_dp4_avx2(block, xr, sr, sumr, K, g, sz, sdt, N, b * R, o);
            else if (path == PATH_AVX2)
                block_row32_avx2(block, xr, sr, sumr, K, g, sz, sdt, N, b * R, o);
            else
#endif
                block_row_portable(block, R, pairs, xr, sr, sumr, K, g, sz, sdt, N, b * R, o);
            if (out_bf16) {
                uint16_t *dst = (uint16_t *)out + t * N + b * R;
                for (int c = 0; c < R; c++) dst[c] = f32_to_bf16(o[c]);
            } else {
                memcpy((float *)out + t * N + b * R, o, sizeof(float) * (size_t)R);
            }
        }
    }
    return 0;
}
