// Paged attention on the CPU: fp32 queries, an fp32, fp16, bf16, int8 or fp8 KV cache read in place through block
// tables (AVX2 loops, or AVX-512 ones where the CPU has it; see PAGODA_AVX512).
//
// This file owns the native half of pagoda/layers/attention_cpu.py:
//   paged_cache_write        copy the step's new k, v rows into their cache slots;
//   paged_attention_decode   one query token per sequence (the batch's leading requests);
//   paged_attention_prefill  several query tokens per request: a fresh prompt or a chunk after a cached prefix.
// Semantics are those of the reference backend (attention_reference.py): a query at position p attends key
// positions k with k <= p and, when a window w > 0 is given, p - k < w; GQA maps query head h to kv head
// h / (H / Hkv); softmax(scale * q.k) weights the values. Every query token has at least one allowed key (its
// own position), so every output row is a proper weighted mean.
//
// Layouts (element strides, fp32 unless said):
//   q    [T, H, D]   token stride q_stride, heads packed (head stride D, element stride 1)
//   out  [T, H, D]   token stride out_stride, heads packed
//   k_cache, v_cache [num_slots, Hkv, D] contiguous, fp32, fp16 or bf16 (kv_dtype 0, 1 or 2: the kernels are
//                    templates on the element), or [num_slots, Hkv, D + 4] bytes of 8-bit codes and each row's
//                    fp32 scale (3 int8, 4 fp8 e4m3, 5 fp8 e5m2); slot of position k = table[k / bs] * bs + k % bs
//   block_tables [B, table_stride] int64, context_lens [B] int64, query_start [B + 1] int64
// A request's queries are its last n context positions [ctx - n, ctx); their k, v are already in the cache
// (paged_cache_write runs first), so attention reads only the cache, never the step's k, v.
//
// Prefill (attend_rows) handles one (request, kv head, query tile): its R = n_q * G query rows (G = query heads
// per kv head) stream over the allowed key range in segments of KT keys with an online softmax, so each K and V
// row of the range is read once per tile and serves all R rows. Decode (attend_decode_range) handles one
// (request, key range) for all heads at once, reading each cache slot (every kv head's row) front to back.
// Parallelism: OpenMP, dynamic, over (query tile x kv head) for prefill and (request x key range) for decode,
// where a request's keys are split into several ranges only when there are fewer requests than threads.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGODA_AVX2 1
#else
#define PAGODA_AVX2 0
#endif
// AVX-512: the score, value and softmax loops on 16 lanes, up to 4 query rows per pass (the AVX2 ones: 8 lanes, 2
// rows). Only the order of fp32 sums differs from the AVX2 baseline (tests/test_kernel_variants.py compares them);
// PAGODA_NO_AVX512 builds the baseline on a CPU that has it.
#if PAGODA_AVX2 && defined(__AVX512F__) && !defined(PAGODA_NO_AVX512)
#define PAGODA_AVX512 1
#else
#define PAGODA_AVX512 0
#endif

#include "bf16.h"
#include "kernel_abi.h"

namespace {

using i64 = int64_t;

constexpr int KT = 32;            // keys per segment: the width of one score row (a multiple of 8)
constexpr int TILE_ROWS = 32;     // target query rows (tokens x heads of a GQA group) per prefill tile
constexpr int MIN_RANGE = 64;     // fewest keys worth a work item of their own in split decode
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// KV cache elements: fp32, IEEE fp16 (_Float16, the bits of torch.float16) or bf16 (BF16, the bits of
// torch.bfloat16: the high 16 bits of an fp32); or 8-bit codes with a scale per row (one token's one kv head):
// int8 (I8), fp8 e4m3 (E4M3, torch.float8_e4m3fn) and fp8 e5m2 (E5M2, torch.float8_e5m2). A scaled row is D codes
// and then the row's fp32 scale (4 bytes), value = code x scale; the codes use the range (amax / 127, 448, 57344).
// Arithmetic is fp32: the loads widen codes, and the row's scale multiplies its score (q . k) and its weight (p v).
struct BF16 {
    uint16_t bits;
};
struct I8 {
    int8_t v;
};
struct E4M3 {
    uint8_t v;
};
struct E5M2 {
    uint8_t v;
};

template <typename KV>
constexpr bool scaled_kv() {
    return std::is_same_v<KV, I8> || std::is_same_v<KV, E4M3> || std::is_same_v<KV, E5M2>;
}

// Elements of one row (a token's kv head) in the cache: D, and the 4 bytes of the scale for 8-bit codes.
template <typename KV>
constexpr i64 row_len(i64 head_dim) {
    return scaled_kv<KV>() ? head_dim + 4 : head_dim;
}

// e4m3 codes are widened as fp16 numbers 2^-8 of their value (the exponent bias differs by 8), so their rows'
// factor carries the 256.
template <typename KV>
inline float row_factor(const KV* row, i64 head_dim) {
    if constexpr (scaled_kv<KV>()) {
        float scale;
        std::memcpy(&scale, reinterpret_cast<const char*>(row + head_dim), sizeof scale);
        return std::is_same_v<KV, E4M3> ? scale * 256.0f : scale;
    } else {
        (void)row, (void)head_dim;
        return 1.0f;
    }
}

template <typename KV>
struct Problem {
    const float* q;
    i64 q_stride;
    float* out;
    i64 out_stride;
    const KV* k_cache;
    const KV* v_cache;
    const i64* block_tables;
    i64 table_stride;
    const i64* context_lens;
    i64 num_heads, num_kv_heads, head_dim, block_size;
    i64 window;  // <= 0: no sliding window
    float scale;

    i64 group() const { return num_heads / num_kv_heads; }
    i64 row() const { return row_len<KV>(head_dim); }
    i64 slot_stride() const { return num_kv_heads * row(); }
};

// Per-thread buffers, sized for the largest tile the call can produce.
template <typename KV>
struct Scratch {
    std::vector<float> scores;  // [R][KT]: scaled scores, then probabilities (0 where masked)
    std::vector<float> acc;     // [R][D]: unnormalised output rows
    std::vector<float> m, l;    // [R]: running max and running sum of exp
    std::vector<const float*> qrows;
    std::vector<const KV*> kslots, vslots;  // [2][KT]: this segment's cache slots and the next one's
    Scratch(i64 rows, i64 dim)
        : scores(rows * KT), acc(rows * dim), m(rows), l(rows), qrows(rows), kslots(2 * KT), vslots(2 * KT) {}
};

// ---- vector primitives --------------------------------------------------------------------------------------

#if PAGODA_AVX2
// exp on 8 lanes (Cephes polynomial, ~1 ulp on the range used here: x <= 0). Lanes equal to -inf give 0.
inline __m256 exp8(__m256 x) {
    const __m256 is_neg_inf = _mm256_cmp_ps(x, _mm256_set1_ps(NEG_INF), _CMP_EQ_OQ);
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
    fx = _mm256_floor_ps(fx);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, z, x);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i n = _mm256_cvttps_epi32(fx);
    n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
    return _mm256_andnot_ps(is_neg_inf, y);
}

// The four horizontal sums of a0..a3, in order.
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const _Float16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const BF16* p) { return pagoda_bf16::load8(&p->bits); }
inline __m256 load8(const I8* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const E5M2* p) {  // an e5m2 code is the high byte of the fp16 of the same value
    return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 8));
}
inline __m256 load8(const E4M3* p) {  // sign to bit 15, exponent and mantissa to bits 7-13: an fp16 of value / 256
    const __m128i u = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0x80)), 8),
                                   _mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0x7f)), 7));
    return _mm256_cvtph_ps(h);
}
#endif

inline float to_f32(float x) { return x; }
inline float to_f32(_Float16 x) { return static_cast<float>(x); }
inline float to_f32(BF16 x) { return pagoda_bf16::to_f32(x.bits); }
inline float to_f32(I8 x) { return static_cast<float>(x.v); }
inline float half_bits_to_f32(uint16_t bits) {
    _Float16 h;
    std::memcpy(&h, &bits, sizeof h);
    return static_cast<float>(h);
}
inline float to_f32(E5M2 x) { return half_bits_to_f32(static_cast<uint16_t>(x.v << 8)); }
inline float to_f32(E4M3 x) {  // value / 256, as load8 (row_factor carries the 256)
    return half_bits_to_f32(static_cast<uint16_t>(((x.v & 0x80) << 8) | ((x.v & 0x7f) << 7)));
}

template <typename KV>
inline float dot(const float* a, const KV* b, i64 n) {
    i64 d = 0;
    float s = 0.0f;
#if PAGODA_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc);
    s = hsum(acc);
#endif
    for (; d < n; ++d) s += a[d] * to_f32(b[d]);
    return s;
}

#if PAGODA_AVX2
// scores[r][j] = scale * q_r . k_j for NR rows starting at r and keys [0, n): NR rows x 4 keys per pass, so each
// K chunk loaded serves NR rows and each q chunk 4 keys.
template <int NR, typename KV>
void qk_block(const float* const* qrows, const KV* const* krows, i64 off, int n, i64 D, float scale,
              float* scores) {
    const i64 Dv = D & ~i64(7);
    const __m128 vscale = _mm_set1_ps(scale);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        __m256 a[NR][4];
        for (int r = 0; r < NR; ++r)
            for (int u = 0; u < 4; ++u) a[r][u] = _mm256_setzero_ps();
        for (i64 d = 0; d < Dv; d += 8) {
            __m256 x[NR];
            for (int r = 0; r < NR; ++r) x[r] = _mm256_loadu_ps(qrows[r] + d);
            for (int u = 0; u < 4; ++u) {
                const __m256 kv = load8(krows[j + u] + off + d);
                for (int r = 0; r < NR; ++r) a[r][u] = _mm256_fmadd_ps(x[r], kv, a[r][u]);
            }
        }
        for (int r = 0; r < NR; ++r) {
            __m128 s4 = hsum4(a[r][0], a[r][1], a[r][2], a[r][3]);
            if (Dv < D) {  // scalar tail of a head dim that is not a multiple of 8
                alignas(16) float t[4];
                for (int u = 0; u < 4; ++u) t[u] = dot(qrows[r] + Dv, krows[j + u] + off + Dv, D - Dv);
                s4 = _mm_add_ps(s4, _mm_load_ps(t));
            }
            _mm_storeu_ps(scores + r * KT + j, _mm_mul_ps(s4, vscale));
        }
    }
    for (; j < n; ++j)
        for (int r = 0; r < NR; ++r) scores[r * KT + j] = scale * dot(qrows[r], krows[j] + off, D);
}

// acc[r] += sum_j probs[r][j] * v_j for NR rows starting at r and keys [0, n): the rows' accumulators stay in
// registers over all keys, 32 floats of D at a time, so each V chunk loaded serves NR rows.
template <int NR, typename KV>
void pv_block(const float* probs, const KV* const* vrows, i64 off, int n, i64 D, float* acc) {
    i64 d = 0;
    for (; d + 32 <= D; d += 32) {
        __m256 a[NR][4];
        for (int r = 0; r < NR; ++r)
            for (int c = 0; c < 4; ++c) a[r][c] = _mm256_loadu_ps(acc + r * D + d + 8 * c);
        for (int j = 0; j < n; ++j) {
            const KV* v = vrows[j] + off + d;
            __m256 vv[4];
            for (int c = 0; c < 4; ++c) vv[c] = load8(v + 8 * c);
            for (int r = 0; r < NR; ++r) {
                const __m256 w = _mm256_broadcast_ss(probs + r * KT + j);
                for (int c = 0; c < 4; ++c) a[r][c] = _mm256_fmadd_ps(w, vv[c], a[r][c]);
            }
        }
        for (int r = 0; r < NR; ++r)
            for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + r * D + d + 8 * c, a[r][c]);
    }
    for (; d + 8 <= D; d += 8) {
        __m256 a[NR];
        for (int r = 0; r < NR; ++r) a[r] = _mm256_loadu_ps(acc + r * D + d);
        for (int j = 0; j < n; ++j) {
            const __m256 v = load8(vrows[j] + off + d);
            for (int r = 0; r < NR; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(probs + r * KT + j), v, a[r]);
        }
        for (int r = 0; r < NR; ++r) _mm256_storeu_ps(acc + r * D + d, a[r]);
    }
    for (; d < D; ++d)
        for (int r = 0; r < NR; ++r)
            for (int j = 0; j < n; ++j) acc[r * D + d] += probs[r * KT + j] * to_f32(vrows[j][off + d]);
}
#endif

#if PAGODA_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const _Float16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const BF16* p) { return pagoda_bf16::load16(&p->bits); }
inline __m512 load16(const I8* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const E5M2* p) {
    return _mm512_cvtph_ps(
        _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 8));
}
inline __m512 load16(const E4M3* p) {
    const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8),
                                      _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x7f)), 7));
    return _mm512_cvtph_ps(h);
}

// The two 8-lane halves of a summed: hsum4 of the results gives the 16-lane sums.
inline __m256 fold(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

// exp on 16 lanes: exp8's polynomial and steps, so each lane's value is exp8's. Lanes equal to -inf give 0.
inline __m512 exp16(__m512 x) {
    const __mmask16 is_neg_inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(NEG_INF), _CMP_EQ_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f));
    __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
    fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    const __m512 z = _mm512_mul_ps(x, x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, z, x);
    y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
    __m512i n = _mm512_cvttps_epi32(fx);
    n = _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(n));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~is_neg_inf), y);
}

// qk_block on 16 lanes (D a multiple of 16): NR rows x 4 keys per pass.
template <int NR, typename KV>
void qk_block16(const float* const* qrows, const KV* const* krows, i64 off, int n, i64 D, float scale,
                float* scores) {
    const __m128 vscale = _mm_set1_ps(scale);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        __m512 a[NR][4];
        for (int r = 0; r < NR; ++r)
            for (int u = 0; u < 4; ++u) a[r][u] = _mm512_setzero_ps();
        for (i64 d = 0; d < D; d += 16) {
            __m512 x[NR];
            for (int r = 0; r < NR; ++r) x[r] = _mm512_loadu_ps(qrows[r] + d);
            for (int u = 0; u < 4; ++u) {
                const __m512 kv = load16(krows[j + u] + off + d);
                for (int r = 0; r < NR; ++r) a[r][u] = _mm512_fmadd_ps(x[r], kv, a[r][u]);
            }
        }
        for (int r = 0; r < NR; ++r)
            _mm_storeu_ps(scores + r * KT + j,
                          _mm_mul_ps(hsum4(fold(a[r][0]), fold(a[r][1]), fold(a[r][2]), fold(a[r][3])), vscale));
    }
    for (; j < n; ++j)
        for (int r = 0; r < NR; ++r) {
            __m512 acc = _mm512_setzero_ps();
            for (i64 d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qrows[r] + d),
                                                                  load16(krows[j] + off + d), acc);
            scores[r * KT + j] = scale * hsum(fold(acc));
        }
}

// pv_block on 16 lanes (D a multiple of 16): the NR rows' accumulators stay in registers, 64 floats of D at a time.
template <int NR, typename KV>
void pv_block16(const float* probs, const KV* const* vrows, i64 off, int n, i64 D, float* acc) {
    i64 d = 0;
    for (; d + 64 <= D; d += 64) {
        __m512 a[NR][4];
        for (int r = 0; r < NR; ++r)
            for (int c = 0; c < 4; ++c) a[r][c] = _mm512_loadu_ps(acc + r * D + d + 16 * c);
        for (int j = 0; j < n; ++j) {
            const KV* v = vrows[j] + off + d;
            __m512 vv[4];
            for (int c = 0; c < 4; ++c) vv[c] = load16(v + 16 * c);
            for (int r = 0; r < NR; ++r) {
                const __m512 w = _mm512_set1_ps(probs[r * KT + j]);
                for (int c = 0; c < 4; ++c) a[r][c] = _mm512_fmadd_ps(w, vv[c], a[r][c]);
            }
        }
        for (int r = 0; r < NR; ++r)
            for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + r * D + d + 16 * c, a[r][c]);
    }
    for (; d < D; d += 16) {
        __m512 a[NR];
        for (int r = 0; r < NR; ++r) a[r] = _mm512_loadu_ps(acc + r * D + d);
        for (int j = 0; j < n; ++j) {
            const __m512 v = load16(vrows[j] + off + d);
            for (int r = 0; r < NR; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(probs[r * KT + j]), v, a[r]);
        }
        for (int r = 0; r < NR; ++r) _mm512_storeu_ps(acc + r * D + d, a[r]);
    }
}

// Rows [0, R) in passes of 4, then one pass of the remaining 1-3 (a GQA group of 3 heads: one pass).
template <typename Block>
inline void by_row_blocks(i64 R, Block&& block) {
    i64 r = 0;
    for (; r + 4 <= R; r += 4) block(std::integral_constant<int, 4>{}, r);
    if (R - r == 3) block(std::integral_constant<int, 3>{}, r);
    if (R - r == 2) block(std::integral_constant<int, 2>{}, r);
    if (R - r == 1) block(std::integral_constant<int, 1>{}, r);
}
#endif

template <typename KV>
void qk_scores_raw(const float* const* qrows, i64 R, const KV* const* krows, i64 off, int n, i64 D, float scale,
                   float* scores);

// scores[r][j] = scale * q_r . k_j for rows [0, R) and keys [0, n); key j's row starts at krows[j] + off. A scaled
// cache's codes are dotted as they are, and each key's row factor multiplies its scores.
template <typename KV>
void qk_scores(const float* const* qrows, i64 R, const KV* const* krows, i64 off, int n, i64 D, float scale,
               float* scores) {
    qk_scores_raw(qrows, R, krows, off, n, D, scale, scores);
    if constexpr (scaled_kv<KV>()) {
        for (int j = 0; j < n; ++j) {
            const float f = row_factor(krows[j] + off, D);
            for (i64 r = 0; r < R; ++r) scores[r * KT + j] *= f;
        }
    }
}

template <typename KV>
void qk_scores_raw(const float* const* qrows, i64 R, const KV* const* krows, i64 off, int n, i64 D, float scale,
                   float* scores) {
    i64 r = 0;
#if PAGODA_AVX512
    if (D % 16 == 0) {
        by_row_blocks(R, [&](auto nr, i64 r0) {
            qk_block16<decltype(nr)::value>(qrows + r0, krows, off, n, D, scale, scores + r0 * KT);
        });
        return;
    }
#endif
#if PAGODA_AVX2
    for (; r + 2 <= R; r += 2) qk_block<2>(qrows + r, krows, off, n, D, scale, scores + r * KT);
    if (r < R) qk_block<1>(qrows + r, krows, off, n, D, scale, scores + r * KT);
#else
    for (; r < R; ++r)
        for (int j = 0; j < n; ++j) scores[r * KT + j] = scale * dot(qrows[r], krows[j] + off, D);
#endif
}

template <typename KV>
void pv_accumulate_raw(const float* probs, i64 R, const KV* const* vrows, i64 off, int n, i64 D, float* acc);

// acc[r] += sum_j probs[r][j] * v_j for rows [0, R) and keys [0, n); key j's row starts at vrows[j] + off. A scaled
// cache's row factors multiply the weights (a copy: the probabilities themselves stay as they are).
template <typename KV>
void pv_accumulate(const float* probs, i64 R, const KV* const* vrows, i64 off, int n, i64 D, float* acc) {
    if constexpr (scaled_kv<KV>()) {
        static thread_local std::vector<float> weighted;
        if (static_cast<i64>(weighted.size()) < R * KT) weighted.resize(R * KT);
        float f[KT];
        for (int j = 0; j < n; ++j) f[j] = row_factor(vrows[j] + off, D);
        for (i64 r = 0; r < R; ++r)
            for (int j = 0; j < n; ++j) weighted[r * KT + j] = probs[r * KT + j] * f[j];
        pv_accumulate_raw(weighted.data(), R, vrows, off, n, D, acc);
    } else {
        pv_accumulate_raw(probs, R, vrows, off, n, D, acc);
    }
}

template <typename KV>
void pv_accumulate_raw(const float* probs, i64 R, const KV* const* vrows, i64 off, int n, i64 D, float* acc) {
    i64 r = 0;
#if PAGODA_AVX512
    if (D % 16 == 0) {
        by_row_blocks(R, [&](auto nr, i64 r0) {
            pv_block16<decltype(nr)::value>(probs + r0 * KT, vrows, off, n, D, acc + r0 * D);
        });
        return;
    }
#endif
#if PAGODA_AVX2
    for (; r + 2 <= R; r += 2) pv_block<2>(probs + r * KT, vrows, off, n, D, acc + r * D);
    if (r < R) pv_block<1>(probs + r * KT, vrows, off, n, D, acc + r * D);
#else
    for (; r < R; ++r)
        for (int j = 0; j < n; ++j)
            for (i64 d = 0; d < D; ++d) acc[r * D + d] += probs[r * KT + j] * to_f32(vrows[j][off + d]);
#endif
}

// Online-softmax step of one row over its KT scores (masked and padding entries hold -inf, and at least one
// is finite): rescales the row's acc and l to the new max, turns the scores into probabilities in place.
inline void softmax_step(float* s, float& m, float& l, float* acc_row, i64 D) {
    float mx = NEG_INF;
#if PAGODA_AVX512
    static_assert(KT == 32, "two 16-lane vectors per score row");
    const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
    mx = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
#elif PAGODA_AVX2
    __m256 vmax = _mm256_loadu_ps(s);
    for (int j = 8; j < KT; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#else
    for (int j = 0; j < KT; ++j) mx = std::max(mx, s[j]);
#endif
    if (mx > m) {  // invariant: acc and l are relative to exp(m); move them to the new max
        const float corr = m == NEG_INF ? 0.0f : std::exp(m - mx);
        l *= corr;
        for (i64 d = 0; d < D; ++d) acc_row[d] *= corr;
        m = mx;
    }
    float sum = 0.0f;
#if PAGODA_AVX512
    const __m512 vm = _mm512_set1_ps(m);
    const __m512 p0 = exp16(_mm512_sub_ps(s0, vm)), p1 = exp16(_mm512_sub_ps(s1, vm));
    _mm512_storeu_ps(s, p0);
    _mm512_storeu_ps(s + 16, p1);
    sum = _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
#elif PAGODA_AVX2
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (int j = 0; j < KT; j += 8) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, p);
        vsum = _mm256_add_ps(vsum, p);
    }
    sum = hsum(vsum);
#else
    for (int j = 0; j < KT; ++j) {
        s[j] = s[j] == NEG_INF ? 0.0f : std::exp(s[j] - m);
        sum += s[j];
    }
#endif
    l += sum;
}

// Pointers to the K and V cache slots (all kv heads) of positions [k0, k0 + n), found through the block table.
template <typename KV>
inline void segment_slots(const Problem<KV>& P, const i64* table, i64 k0, int n, const KV** kslots,
                          const KV** vslots) {
    const i64 bs = P.block_size, slot_stride = P.slot_stride();
    i64 block = k0 / bs, within = k0 % bs;  // one division per segment, not per key
    for (int j = 0; j < n; ++j) {
        const i64 offset = (table[block] * bs + within) * slot_stride;
        kslots[j] = P.k_cache + offset;
        vslots[j] = P.v_cache + offset;
        if (++within == bs) {
            within = 0;
            ++block;
        }
    }
}

// Asks for the cache lines of elements [off, off + len) of n rows: blocks are scattered, so the hardware
// prefetcher cannot guess the next one.
template <typename KV>
inline void prefetch_rows(const KV* const* rows, int n, i64 off, i64 len) {
    constexpr i64 line = 64 / sizeof(KV);
    for (int j = 0; j < n; ++j)
        for (i64 d = 0; d < len; d += line) __builtin_prefetch(rows[j] + off + d, 0, 3);
}

// One step of a double-buffered walk over the cache slots of positions [k0, end) in segments of KT: cur_v holds
// segment k0's V slot pointers; requests their rows ([off, off + len) of each slot), fills nxt_k, nxt_v with the
// next segment's slots and requests its K rows, so both arrive while segment k0 is computed. Returns segment
// k0's number of keys.
template <typename KV>
inline int step_segment(const Problem<KV>& P, const i64* table, i64 k0, i64 end, i64 off, i64 len,
                        const KV* const* cur_v, const KV** nxt_k, const KV** nxt_v) {
    const int n = static_cast<int>(std::min<i64>(KT, end - k0));
    prefetch_rows(cur_v, n, off, len);
    if (k0 + KT < end) {
        const int n_next = static_cast<int>(std::min<i64>(KT, end - k0 - KT));
        segment_slots(P, table, k0 + KT, n_next, nxt_k, nxt_v);
        prefetch_rows(nxt_k, n_next, off, len);
    }
    return n;
}

// Marks the scores [n, KT) of rows [0, R) as padding (-inf, probability 0).
inline void pad_scores(float* scores, i64 R, int n) {
    for (i64 r = 0; r < R; ++r)
        for (int j = n; j < KT; ++j) scores[r * KT + j] = NEG_INF;
}

// Attention of one (request, kv head g, query tile): n_q query tokens at flat rows [tok0, tok0 + n_q) and
// positions [pos0, pos0 + n_q), all G query heads of the group.
template <typename KV>
void attend_rows(const Problem<KV>& P, Scratch<KV>& S, i64 req, i64 g, i64 tok0, i64 pos0, i64 n_q) {
    const i64 G = P.group(), D = P.head_dim, off = g * P.row();
    const i64 R = n_q * G;  // row r: query token r / G, head g * G + r % G
    const i64* table = P.block_tables + req * P.table_stride;
    for (i64 r = 0; r < R; ++r) {
        S.qrows[r] = P.q + (tok0 + r / G) * P.q_stride + (g * G + r % G) * D;
        S.m[r] = NEG_INF;
        S.l[r] = 0.0f;
    }
    std::fill(S.acc.begin(), S.acc.begin() + R * D, 0.0f);

    const i64 last = pos0 + n_q - 1;  // positions of the tile: [pos0, last]
    const i64 key_begin = P.window > 0 ? std::max<i64>(0, pos0 - P.window + 1) : 0;
    const i64 key_end = last + 1;
    const KV** kslots = S.kslots.data();
    const KV** vslots = S.vslots.data();
    segment_slots(P, table, key_begin, static_cast<int>(std::min<i64>(KT, key_end - key_begin)), kslots, vslots);
    for (i64 k0 = key_begin; k0 < key_end; k0 += KT) {
        const KV** next_k = kslots == S.kslots.data() ? kslots + KT : S.kslots.data();
        const KV** next_v = vslots == S.vslots.data() ? vslots + KT : S.vslots.data();
        const int n = step_segment(P, table, k0, key_end, off, P.row(), vslots, next_k, next_v);
        qk_scores(S.qrows.data(), R, kslots, off, n, D, P.scale, S.scores.data());
        // Masking: the whole segment is allowed for every row unless it reaches past the tile's first position
        // (causal) or starts before the last position's window.
        const bool all_allowed = k0 + n - 1 <= pos0 && (P.window <= 0 || k0 > last - P.window);
        pad_scores(S.scores.data(), R, n);
        for (i64 r = 0; r < R; ++r) {
            float* s = S.scores.data() + r * KT;
            if (!all_allowed) {
                const i64 p = pos0 + r / G;
                const i64 lo = P.window > 0 ? p - P.window + 1 : 0;
                for (int j = 0; j < n; ++j)
                    if (k0 + j > p || k0 + j < lo) s[j] = NEG_INF;
            }
            bool any = all_allowed;
            for (int j = 0; j < n && !any; ++j) any = s[j] != NEG_INF;
            if (any) {
                softmax_step(s, S.m[r], S.l[r], S.acc.data() + r * D, D);
            } else {
                std::fill(s, s + KT, 0.0f);  // no allowed key here: contributes nothing
            }
        }
        pv_accumulate(S.scores.data(), R, vslots, off, n, D, S.acc.data());
        kslots = next_k;
        vslots = next_v;
    }
    for (i64 r = 0; r < R; ++r) {
        float* o = P.out + (tok0 + r / G) * P.out_stride + (g * G + r % G) * D;
        const float inv = 1.0f / S.l[r];
        const float* a = S.acc.data() + r * D;
        for (i64 d = 0; d < D; ++d) o[d] = a[d] * inv;
    }
}

// Decode attention of request req over its key positions [key_lo, key_hi), all H heads at once: each segment
// of cache slots is read front to back (a slot holds every kv head's row, so the reads are contiguous within a
// block) and serves the G query heads of each kv head. Leaves the unnormalised state of the range: running max
// m[h], sum of exp l[h] and acc[h][D], relative to exp(m[h]).
template <typename KV>
void attend_decode_range(const Problem<KV>& P, Scratch<KV>& S, i64 req, i64 key_lo, i64 key_hi, float* m, float* l,
                         float* acc) {
    const i64 H = P.num_heads, G = P.group(), D = P.head_dim, slot = P.slot_stride();
    const i64* table = P.block_tables + req * P.table_stride;
    for (i64 h = 0; h < H; ++h) {
        S.qrows[h] = P.q + req * P.q_stride + h * D;
        m[h] = NEG_INF;
        l[h] = 0.0f;
    }
    std::fill(acc, acc + H * D, 0.0f);
    const KV** kslots = S.kslots.data();
    const KV** vslots = S.vslots.data();
    segment_slots(P, table, key_lo, static_cast<int>(std::min<i64>(KT, key_hi - key_lo)), kslots, vslots);
    for (i64 k0 = key_lo; k0 < key_hi; k0 += KT) {
        const KV** next_k = kslots == S.kslots.data() ? kslots + KT : S.kslots.data();
        const KV** next_v = vslots == S.vslots.data() ? vslots + KT : S.vslots.data();
        const int n = step_segment(P, table, k0, key_hi, 0, slot, vslots, next_k, next_v);  // whole slots
        for (i64 g = 0; g < P.num_kv_heads; ++g)
            qk_scores(S.qrows.data() + g * G, G, kslots, g * P.row(), n, D, P.scale, S.scores.data() + g * G * KT);
        pad_scores(S.scores.data(), H, n);  // a decode query may attend every key of its range
        for (i64 h = 0; h < H; ++h) softmax_step(S.scores.data() + h * KT, m[h], l[h], acc + h * D, D);
        for (i64 g = 0; g < P.num_kv_heads; ++g)
            pv_accumulate(S.scores.data() + g * G * KT, G, vslots, g * P.row(), n, D, acc + g * G * D);
        kslots = next_k;
        vslots = next_v;
    }
}

int threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

inline void store_row(float* dst, const float* src, i64 n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(_Float16* dst, const float* src, i64 n) {
    i64 d = 0;
#if PAGODA_AVX2
    for (; d + 8 <= n; d += 8)  // round to nearest even, as torch's .to(torch.float16)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; d < n; ++d) dst[d] = static_cast<_Float16>(src[d]);
}
// fp32 -> bf16 rounded to nearest even, as torch's .to(torch.bfloat16); a NaN becomes a quiet NaN.
inline BF16 to_bf16(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return BF16{0x7fc0};
    return BF16{uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16)};
}
inline void store_row(BF16* dst, const float* src, i64 n) {
    i64 d = 0;
#if PAGODA_AVX2
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i quiet_nan = _mm256_set1_epi32(0x7fc0);
    for (; d + 8 <= n; d += 8) {
        const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(src + d));
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, lsb)), 16);
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, abs_mask), inf);
        r = _mm256_blendv_epi8(r, quiet_nan, nan);
        // 8 x u32 (each < 2^16) -> 8 x u16: pack within 128-bit lanes, then bring the two halves together
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), _mm256_castsi256_si128(packed));
    }
#endif
    for (; d < n; ++d) dst[d] = to_bf16(src[d]);
}

// 8-bit codes, rounded to nearest even as torch's .round() / .to(torch.float8_*) (the reference backend's), for
// |x| within the code's range (the row's scale puts it there; larger values saturate).
inline I8 to_code(float x, I8*) { return I8{static_cast<int8_t>(std::clamp(std::nearbyint(x), -127.0f, 127.0f))}; }
// A minifloat with `man` mantissa bits and exponent bias `bias`, `max_code` its largest finite magnitude.
inline uint8_t minifloat(float x, int man, int bias, uint8_t max_code) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const uint8_t sign = (bits >> 24) & 0x80;
    const float a = std::fabs(x);
    const float min_normal = std::ldexp(1.0f, 1 - bias);
    uint32_t code;
    if (a < min_normal) {  // subnormal: units of 2^(1 - bias - man), exact scaling, then round half to even
        code = static_cast<uint32_t>(std::nearbyint(std::ldexp(a, bias - 1 + man)));
    } else {
        std::memcpy(&bits, &a, sizeof bits);
        int e = static_cast<int>(bits >> 23) - 127;
        const int drop = 23 - man;
        uint32_t m = bits & 0x7fffff;
        m = (m + ((1u << (drop - 1)) - 1) + ((m >> drop) & 1)) >> drop;
        if (m == (1u << man)) {
            m = 0;
            ++e;
        }
        code = (static_cast<uint32_t>(e + bias) << man) | m;
    }
    return sign | static_cast<uint8_t>(std::min<uint32_t>(code, max_code));
}
inline E4M3 to_code(float x, E4M3*) { return E4M3{minifloat(x, 3, 7, 0x7e)}; }
inline E5M2 to_code(float x, E5M2*) { return E5M2{minifloat(x, 2, 15, 0x7b)}; }
template <typename KV>
constexpr float code_max() {
    return std::is_same_v<KV, I8> ? 127.0f : std::is_same_v<KV, E4M3> ? 448.0f : 57344.0f;
}

// One scaled row: scale = max|x| / code_max (0 for a zero row, whose codes are 0), codes of x / scale, the scale.
template <typename KV>
void store_scaled_row(KV* dst, const float* src, i64 D) {
    float amax = 0.0f;
    for (i64 d = 0; d < D; ++d) amax = std::max(amax, std::fabs(src[d]));
    const float scale = amax / code_max<KV>();
    for (i64 d = 0; d < D; ++d) dst[d] = scale > 0.0f ? to_code(src[d] / scale, static_cast<KV*>(nullptr)) : KV{0};
    std::memcpy(reinterpret_cast<char*>(dst + D), &scale, sizeof scale);
}

// Token t's rows (Hkv kv heads of D values, contiguous in k and v) into slot slots[t] of each cache.
template <typename KV>
void cache_write(const float* k, i64 k_stride, const float* v, i64 v_stride, const i64* slots, i64 num_tokens,
                 i64 kv_heads, i64 D, KV* k_cache, KV* v_cache) {
    const i64 row = row_len<KV>(D), slot = kv_heads * row;
    for (i64 t = 0; t < num_tokens; ++t) {
        if constexpr (scaled_kv<KV>()) {
            for (i64 h = 0; h < kv_heads; ++h) {
                store_scaled_row(k_cache + slots[t] * slot + h * row, k + t * k_stride + h * D, D);
                store_scaled_row(v_cache + slots[t] * slot + h * row, v + t * v_stride + h * D, D);
            }
        } else {
            store_row(k_cache + slots[t] * slot, k + t * k_stride, slot);
            store_row(v_cache + slots[t] * slot, v + t * v_stride, slot);
        }
    }
}

// Work items are (request, key range): a request's keys are split into ranges only when there are too few
// requests to keep every thread busy (flash-decoding); the ranges' partial states are then merged.
template <typename KV>
void decode(const Problem<KV>& P, i64 num_seqs, int nt) {
    const int64_t H = P.num_heads, D = P.head_dim, window = P.window;
    // Ranges per request: enough items for ~4 per thread, but no range shorter than MIN_RANGE keys.
    const int64_t wanted = std::max<int64_t>(1, (4 * nt + num_seqs - 1) / num_seqs);
    std::vector<int64_t> item_start(num_seqs + 1, 0), key_begin(num_seqs), range_len(num_seqs);
    for (int64_t i = 0; i < num_seqs; ++i) {
        const int64_t end = P.context_lens[i];
        key_begin[i] = window > 0 ? std::max<int64_t>(0, end - window) : 0;
        const int64_t len = end - key_begin[i];
        const int64_t ranges = std::min(wanted, std::max<int64_t>(1, len / MIN_RANGE));
        range_len[i] = ((len + ranges - 1) / ranges + P.block_size - 1) / P.block_size * P.block_size;
        item_start[i + 1] = item_start[i] + (len + range_len[i] - 1) / range_len[i];
    }
    const int64_t num_items = item_start[num_seqs];
    const bool split = num_items > num_seqs;
    // Partial states of split requests, per item: m [H], l [H], acc [H][D].
    std::vector<float> partial(split ? num_items * H * (D + 2) : 0);
#pragma omp parallel num_threads(nt)
    {
        Scratch<KV> S(H, D);
        std::vector<float> state(H * (D + 2));
#pragma omp for schedule(dynamic)
        for (int64_t item = 0; item < num_items; ++item) {
            const int64_t i = std::upper_bound(item_start.begin(), item_start.end(), item) - item_start.begin() - 1;
            const int64_t lo = key_begin[i] + (item - item_start[i]) * range_len[i];
            const int64_t hi = std::min(P.context_lens[i], lo + range_len[i]);
            const bool whole = item_start[i + 1] - item_start[i] == 1;
            float* st = whole ? state.data() : partial.data() + item * H * (D + 2);
            attend_decode_range(P, S, i, lo, hi, st, st + H, st + 2 * H);
            if (whole) {
                for (int64_t h = 0; h < H; ++h) {
                    const float inv = 1.0f / st[H + h];
                    const float* a = st + 2 * H + h * D;
                    float* o = P.out + i * P.out_stride + h * D;
                    for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
                }
            }
        }
        if (split) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < num_seqs; ++i) {
                const int64_t first = item_start[i], count = item_start[i + 1] - first;
                if (count == 1) continue;
                for (int64_t h = 0; h < H; ++h) {
                    float mx = NEG_INF;
                    for (int64_t c = 0; c < count; ++c) mx = std::max(mx, partial[(first + c) * H * (D + 2) + h]);
                    float l = 0.0f;
                    float* o = P.out + i * P.out_stride + h * D;
                    std::fill(o, o + D, 0.0f);
                    for (int64_t c = 0; c < count; ++c) {
                        const float* st = partial.data() + (first + c) * H * (D + 2);
                        const float w = std::exp(st[h] - mx);  // every range holds at least one key: m is finite
                        l += w * st[H + h];
                        const float* a = st + 2 * H + h * D;
                        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
                    }
                    const float inv = 1.0f / l;
                    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
                }
            }
        }
    }
}

template <typename KV>
void prefill(const Problem<KV>& P, const i64* query_start, i64 first, i64 last, int nt) {
    const int64_t tile = std::max<int64_t>(1, TILE_ROWS / P.group());
    std::vector<int64_t> tile_start(last - first + 1, 0);  // prefix sums of tiles per request
    for (int64_t i = first; i < last; ++i) {
        const int64_t n = query_start[i + 1] - query_start[i];
        tile_start[i - first + 1] = tile_start[i - first] + (n + tile - 1) / tile;
    }
    const int64_t num_tiles = tile_start.back();
#pragma omp parallel num_threads(nt)
    {
        Scratch<KV> S(tile * P.group(), P.head_dim);
#pragma omp for collapse(2) schedule(dynamic)
        for (int64_t order = 0; order < num_tiles; ++order)
            for (int64_t g = 0; g < P.num_kv_heads; ++g) {
                const int64_t t = num_tiles - 1 - order;  // last tiles first: they attend to the most keys
                const int64_t idx = std::upper_bound(tile_start.begin(), tile_start.end(), t) - tile_start.begin() - 1;
                const int64_t i = first + idx;
                const int64_t n = query_start[i + 1] - query_start[i];
                const int64_t q0 = (t - tile_start[idx]) * tile;  // first query of the tile within the request
                attend_rows(P, S, i, g, query_start[i] + q0, P.context_lens[i] - n + q0, std::min(tile, n - q0));
            }
    }
}

// Calls f with a null pointer of the cache's element type (kv_dtype: 0 fp32, 1 fp16, 2 bf16, 3 int8, 4 fp8 e4m3,
// 5 fp8 e5m2).
template <typename F>
void with_kv_type(int64_t kv_dtype, F&& f) {
    switch (kv_dtype) {
        case 1: f(static_cast<_Float16*>(nullptr)); break;
        case 2: f(static_cast<BF16*>(nullptr)); break;
        case 3: f(static_cast<I8*>(nullptr)); break;
        case 4: f(static_cast<E4M3*>(nullptr)); break;
        case 5: f(static_cast<E5M2*>(nullptr)); break;
        default: f(static_cast<float*>(nullptr)); break;
    }
}

// Bytes of one cache slot (a token's kv_heads rows) of kv_dtype.
int64_t slot_bytes(int64_t kv_dtype, int64_t kv_heads, int64_t head_dim) {
    int64_t bytes = 0;
    with_kv_type(kv_dtype, [&](auto* tag) {
        using KV = std::remove_pointer_t<decltype(tag)>;
        bytes = kv_heads * row_len<KV>(head_dim) * static_cast<int64_t>(sizeof(KV));
    });
    return bytes;
}

}  // namespace

extern "C" {

// The vector width the attention loops were built with: "avx512", "avx2" or "scalar".
const char* paged_attention_variant() { return PAGODA_AVX512 ? "avx512" : PAGODA_AVX2 ? "avx2" : "scalar"; }

// k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t] for t in [0, T): Hkv rows of D values, contiguous in k and v
// (fp32, token strides k_stride, v_stride), stored as the cache's element (kv_dtype: see with_kv_type; 8-bit codes
// with their row's scale after them).
void paged_cache_write(const float* k, int64_t k_stride, const float* v, int64_t v_stride, const int64_t* slots,
                       int64_t num_tokens, int64_t kv_heads, int64_t head_dim, void* k_cache, void* v_cache,
                       int64_t kv_dtype) {
    with_kv_type(kv_dtype, [&](auto* tag) {
        using KV = std::remove_pointer_t<decltype(tag)>;
        cache_write(k, k_stride, v, v_stride, slots, num_tokens, kv_heads, head_dim, static_cast<KV*>(k_cache),
                    static_cast<KV*>(v_cache));
    });
}

// Requests [0, num_seqs): one query token each, flat row i, at position context_lens[i] - 1.
void paged_attention_decode(const float* q, int64_t q_stride, float* out, int64_t out_stride, const void* k_cache,
                            const void* v_cache, int64_t kv_dtype, const int64_t* block_tables,
                            int64_t table_stride, const int64_t* context_lens, int64_t num_seqs, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t window, float scale,
                            int num_threads) {
    with_kv_type(kv_dtype, [&](auto* tag) {
        using KV = std::remove_pointer_t<decltype(tag)>;
        decode(Problem<KV>{q, q_stride, out, out_stride, static_cast<const KV*>(k_cache),
                           static_cast<const KV*>(v_cache), block_tables, table_stride, context_lens, num_heads,
                           num_kv_heads, head_dim, block_size, window, scale},
               num_seqs, threads(num_threads));
    });
}

// Requests [first, last): request i has flat query rows [query_start[i], query_start[i + 1]) at the last
// positions of its context_lens[i]. Its queries are cut into tiles of ~TILE_ROWS / G tokens.
void paged_attention_prefill(const float* q, int64_t q_stride, float* out, int64_t out_stride, const void* k_cache,
                             const void* v_cache, int64_t kv_dtype, const int64_t* block_tables,
                             int64_t table_stride, const int64_t* context_lens, const int64_t* query_start,
                             int64_t first, int64_t last, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, int64_t window, float scale, int num_threads) {
    with_kv_type(kv_dtype, [&](auto* tag) {
        using KV = std::remove_pointer_t<decltype(tag)>;
        prefill(Problem<KV>{q, q_stride, out, out_stride, static_cast<const KV*>(k_cache),
                            static_cast<const KV*>(v_cache), block_tables, table_stride, context_lens, num_heads,
                            num_kv_heads, head_dim, block_size, window, scale},
                query_start, first, last, threads(num_threads));
    });
}

}  // extern "C"
