// Quantized-weight linear layers for AVX2 (VNNI where the CPU has it): y[M, N] = x[M, K] @ W[N, K]^T with x and y fp32 and W in one of
// two packed formats:
//   int8  Q8_0-style: symmetric int8, one fp16 scale per group of 32 weights along K;
//   q4    Q4_1-style: 4-bit codes c in [0, 15], w = d * c + m with fp16 d and m per group of 32 (exactly the
//         values of a GGUF Q4_1 tensor, repacked; see the q4 section below, which rounds x to int8 instead).
//
// Method (int8). Each row of x is rounded, per group of 32, to int16 with scale max|x_group| / 32767 (relative error
// at most 2^-16 of the group's largest value: far below the weights' int8 rounding). Then every product
// int8 * int16 is exact, `_mm256_madd_epi16` sums two of them into an int32 lane, and a group's 32 products
// are summed exactly in int32 (|sum| <= 32 * 127 * 32767 < 2^31). Only the per-group total is scaled, in
// fp32, by weight scale * activation scale. Compared with widening the weights to fp32 and using FMAs, this
// does half the instructions per weight, which keeps a decode step (M = 1) bound by memory, not by the core.
//
// Packed layout, made by pagoda/layers/quantized.py (`pack`): output rows are grouped in tiles of NT = 16.
//   qweight[T][K/2][16][2]  int8   tile t, input columns (2j, 2j+1), row t*16 + i   (T = ceil(N / 16))
//   scales [T][K/32][16]    fp16   tile t, group g,                  row t*16 + i
// Pad rows are zero. One 32-byte read is a k pair of the tile's 16 rows: two sign-extensions give the
// int16 operands for 16 rows, and a broadcast x pair multiplies them; accumulators are lane-wise per row,
// so no horizontal sums are needed. Each tile's bytes are read front to back once per block of MR x rows,
// and stay in L1/L2 for the next block.
//
// Invariants: K is a multiple of 32; x rows are `ldx` floats apart, y rows `ldy` floats apart; weights in
// [-127, 127]; x finite. Threads split the tiles, so each output element is written by exactly one thread (and
// split the rounding of x by rows when there are many).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"  // the bf16 GEMM on AMX tiles (the kernel plan's bf16 path where the CPU has them)
#include "bf16.h"
#include "kernel_abi.h"

namespace {

constexpr int QK = 32;  // weights per scale group along K
constexpr int NT = 16;  // output rows per tile

// Integer dot products: with VNNI (AVX512-VNNI on 256-bit registers, or AVX-VNNI) one instruction multiplies and
// accumulates into int32 lanes where AVX2 needs a madd and an add (int16 x int16, `vpdpwssd`) or a maddubs, an
// int16 add and a final madd by ones (uint8 x int8, `vpdpbusd`). Neither saturates, so both give the same exact
// int32 sums as the AVX2 sequence: outputs are bit-identical whichever variant the CPU builds
// (tests/test_kernel_variants.py builds both where VNNI exists). PAGODA_NO_VNNI forces the AVX2 baseline.
#if !defined(PAGODA_NO_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define PAGODA_VNNI 1
inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }
inline __m256i dot_u8i8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
constexpr const char* VNNI_NAME = "avx512vnni";
#elif !defined(PAGODA_NO_VNNI) && defined(__AVXVNNI__)
#define PAGODA_VNNI 1
inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
inline __m256i dot_u8i8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
constexpr const char* VNNI_NAME = "avxvnni";
#else
#define PAGODA_VNNI 0
inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
constexpr const char* VNNI_NAME = "avx2";
#endif

inline __m256 scales8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// Loads group g of x row into v and returns the group's scale, max|x_group| / qmax (codes in [-qmax, qmax]),
// with the reciprocal the codes are rounded with (0 for an all-zero group).
inline float load_group(const float* x, int64_t g, float qmax, __m256 (&v)[4], __m256& inv) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(x + g * QK + j * 8);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], abs_mask));
    }
    const float scale = hmax(amax) / qmax;
    inv = _mm256_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
    return scale;
}

// x row [K] fp32 -> q [K] int16 and d [K/32] fp32 with x ~= q * d per group.
inline void quantize_row(const float* x, int64_t K, int16_t* q, float* d) {
    for (int64_t g = 0; g < K / QK; ++g) {
        __m256 v[4], inv;
        d[g] = load_group(x, g, 32767.0f, v, inv);
        for (int j = 0; j < 4; j += 2) {  // packs interleaves 128-bit lanes; the permute restores the order
            const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
            const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[j + 1], inv));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * QK + j * 8),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
        }
    }
}

// x row [K] fp32 -> q [K] int8 in [-127, 127] and d [K/32] fp32 with x ~= q * d per group (the q4 kernel's x).
inline void quantize_row_i8(const float* x, int64_t K, int8_t* q, float* d) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' 128-bit interleave
    for (int64_t g = 0; g < K / QK; ++g) {
        __m256 v[4], inv;
        d[g] = load_group(x, g, 127.0f, v, inv);
        __m256i i32[4];
        for (int j = 0; j < 4; ++j) i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
        const __m256i i8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * QK), _mm256_permutevar8x32_epi32(i8, order));
    }
}

// One tile (16 output rows) for MR rows of x: y[m][0..valid) for m < MR.
template <int MR>
inline void tile_kernel(const int16_t* xq, const float* dx, int64_t K, const int8_t* q, const uint16_t* s,
                        int64_t groups, float* y, int64_t ldy, int valid) {
    // As in q4_tile_kernel: the fp32 accumulators live in memory, updated once per group, so the registers
    // hold the int32 sums (2 per row), the codes (2) and the x pair of 4 rows without spills.
    alignas(32) float acc_mem[MR][NT];
    for (int m = 0; m < MR; ++m)
        for (int i = 0; i < NT; ++i) acc_mem[m][i] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
        __m256i isum[MR][2];  // exact int32 sums of the group's products, rows 0-7 and 8-15
        for (int m = 0; m < MR; ++m) isum[m][0] = isum[m][1] = _mm256_setzero_si256();
        const int8_t* qg = q + g * QK * NT;
        // Unrolled by 2 only: a full unroll lets GCC reassociate the int32 sums into a tree that spills.
#pragma GCC unroll 2
        for (int j = 0; j < QK / 2; ++j) {
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + j * 32)));
            const __m256i w1 =
                _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + j * 32 + 16)));
            for (int m = 0; m < MR; ++m) {
                int32_t pair;
                std::memcpy(&pair, xq + m * K + g * QK + j * 2, sizeof pair);
                const __m256i xb = _mm256_set1_epi32(pair);
                isum[m][0] = dot_i16(isum[m][0], w0, xb);
                isum[m][1] = dot_i16(isum[m][1], w1, xb);
            }
        }
        const __m256 s0 = scales8(s + g * NT), s1 = scales8(s + g * NT + 8);
        for (int m = 0; m < MR; ++m) {
            const __m256 dm = _mm256_set1_ps(dx[m * groups + g]);
            const __m256 a0 = _mm256_load_ps(acc_mem[m]), a1 = _mm256_load_ps(acc_mem[m] + 8);
            _mm256_store_ps(acc_mem[m], _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m][0]), _mm256_mul_ps(s0, dm), a0));
            _mm256_store_ps(acc_mem[m] + 8,
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m][1]), _mm256_mul_ps(s1, dm), a1));
        }
        asm volatile("" : : "r"(&acc_mem[0][0]) : "memory");  // keep acc_mem in memory
    }
    for (int m = 0; m < MR; ++m) std::memcpy(y + m * ldy, acc_mem[m], sizeof(float) * valid);
}

// All M rows of x against one tile, in blocks of 4 rows (the most whose sums fit the registers).
inline void tile_all_rows(const int16_t* xq, const float* dx, int64_t M, int64_t K, const int8_t* q,
                          const uint16_t* s, float* y, int64_t ldy, int valid) {
    const int64_t groups = K / QK;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile_kernel<4>(xq + m * K, dx + m * groups, K, q, s, groups, y + m * ldy, ldy, valid);
    const int64_t left = M - m;
    xq += m * K, dx += m * groups, y += m * ldy;
    if (left == 3) tile_kernel<3>(xq, dx, K, q, s, groups, y, ldy, valid);
    if (left == 2) tile_kernel<2>(xq, dx, K, q, s, groups, y, ldy, valid);
    if (left == 1) tile_kernel<1>(xq, dx, K, q, s, groups, y, ldy, valid);
}

inline int tile_rows(int64_t N, int64_t t) { return static_cast<int>(N - t * NT < NT ? N - t * NT : NT); }


// ---- q4 (Q4_1 values) with int8 activations (quantization "gguf-a8") ---------------------------------------
// Method. Each row of x is rounded, per group of 32, to int8 with scale dx = max|x_group| / 127 (as llama.cpp
// does for its Q4 dot products; half a step, max|x_group| / 254, per element at most). `_mm256_maddubs_epi16`
// multiplies the unsigned 4-bit codes by the int8 x and sums adjacent pairs into int16 lanes: |c0 x0 + c1 x1| <=
// 2 * 15 * 127 = 3810, so the 8 such terms of a group add up exactly in int16 (<= 30480) before one
// `_mm256_madd_epi16` by ones widens a row's two lanes into its int32 group sum. That is about half the
// instructions per weight of int16 operands.
// Packed layout, made by pagoda/layers/quantized.py (`pack_q4`), tiles of NT = 16 output rows:
//   q4  [T][K/4][32]   uint8   chunk (t, kq): byte 4 * r + i holds the code of row t*16 + r, column 4 * kq + i in
//                              its low nibble and that of row t*16 + 8 + r in its high nibble (r < 8, i < 4)
//   d   [T][K/32][16]  fp16    scale of the group, row t*16 + i
//   m   [T][K/32][16]  fp16    offset of the group
// One 32-byte load, a mask and a shift give two registers of codes (rows 0-7 and 8-15, four columns each), and a
// broadcast of four x bytes multiplies either: accumulators are lane-wise per row, no horizontal sums. A
// group's dot product is d * sum(x~ * c) + m * sum(x~), where x~ = xq * dx is the int8-rounded x row: the first
// sum is exact in integers, the second is xs = dx * sum(xq), one per row and group, precomputed. So the result
// equals x~ @ W^T up to fp32 rounding of the per-group terms.

// The exact int32 sums of group g's code * x products for MR rows of x (int8): isum[m][0] for the tile's rows
// 0-7, isum[m][1] for rows 8-15. qg: the group's chunks.
template <int MR>
inline void q4_group_sums(const int8_t* xq, int64_t K, const uint8_t* qg, int64_t g, __m256i (&isum)[MR][2]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
#if PAGODA_VNNI
    for (int m = 0; m < MR; ++m) isum[m][0] = isum[m][1] = _mm256_setzero_si256();
#else
    __m256i sum16[MR][2];  // two int16 lanes per row, widened to int32 after the loop
    for (int m = 0; m < MR; ++m) sum16[m][0] = sum16[m][1] = _mm256_setzero_si256();
#endif
    // Unrolled by 2 only: a full unroll lets GCC reassociate the sums into a tree that spills.
#pragma GCC unroll 2
    for (int kq = 0; kq < QK / 4; ++kq) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + kq * 32));
        const __m256i lo = _mm256_and_si256(b, low4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
        for (int m = 0; m < MR; ++m) {
            int32_t quad;
            std::memcpy(&quad, xq + m * K + g * QK + kq * 4, sizeof quad);
            const __m256i xb = _mm256_set1_epi32(quad);
#if PAGODA_VNNI
            isum[m][0] = dot_u8i8(isum[m][0], lo, xb);
            isum[m][1] = dot_u8i8(isum[m][1], hi, xb);
#else
            sum16[m][0] = _mm256_add_epi16(sum16[m][0], _mm256_maddubs_epi16(lo, xb));
            sum16[m][1] = _mm256_add_epi16(sum16[m][1], _mm256_maddubs_epi16(hi, xb));
#endif
        }
    }
#if !PAGODA_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
    for (int m = 0; m < MR; ++m) {
        isum[m][0] = _mm256_madd_epi16(sum16[m][0], ones);
        isum[m][1] = _mm256_madd_epi16(sum16[m][1], ones);
    }
#endif
}

// ---- q4 with int16 activations (quantization "gguf", the default) ---------------------------------------------
// x rounded to int16 as in the int8 kernel (2^-16 of the group's largest value), for outputs within fp32
// rounding of x @ W^T, at about 2/3 of the speed of the int8-activation kernel above ("gguf-a8"). Its own packed layout:
// two of the int8 layout's 32-byte k-pair units (A = pair 2*j4, B = pair 2*j4+1; bytes 0-15 hold rows 0-7,
// bytes 16-31 rows 8-15) share one 32-byte chunk of 16 little-endian uint16 words: word L = A[L] | A[16+L] << 4
// | B[L] << 8 | B[16+L] << 12. So four shifts and masks of one load give the four int16 operands (A rows 0-7,
// A rows 8-15, B rows 0-7, B rows 8-15) with no shuffle instructions; d and m as above. The group sums are
// exact in int32 (|sum| <= 32 * 15 * 32767).
//   q4a16  [T][K/4][32]   uint8

// One 32-byte chunk of the q4a16 layout -> int16 codes: w[0] = A rows 0-7, w[1] = A rows 8-15, w[2] = B rows 0-7,
// w[3] = B rows 8-15.
inline void unpack_q4a16(const uint8_t* chunk, __m256i (&w)[4]) {
    const __m256i low4 = _mm256_set1_epi16(0x000F);
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
    w[0] = _mm256_and_si256(b, low4);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(b, 8), low4);
    w[3] = _mm256_srli_epi16(b, 12);
}

// The same sums for int16 x over the q4a16 layout.
template <int MR>
inline void q4_group_sums(const int16_t* xq, int64_t K, const uint8_t* qg, int64_t g, __m256i (&isum)[MR][2]) {
    for (int m = 0; m < MR; ++m) isum[m][0] = isum[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int j4 = 0; j4 < QK / 4; ++j4) {
        __m256i w[4];
        unpack_q4a16(qg + j4 * 32, w);
        for (int m = 0; m < MR; ++m) {
            int32_t pairs[2];
            std::memcpy(pairs, xq + m * K + g * QK + j4 * 4, sizeof pairs);
            const __m256i xa = _mm256_set1_epi32(pairs[0]), xb = _mm256_set1_epi32(pairs[1]);
#if PAGODA_VNNI
            isum[m][0] = dot_i16(dot_i16(isum[m][0], w[0], xa), w[2], xb);
            isum[m][1] = dot_i16(dot_i16(isum[m][1], w[1], xa), w[3], xb);
#else  // two independent madds summed first: a shorter dependency chain than two accumulating adds
            isum[m][0] = _mm256_add_epi32(isum[m][0],
                                          _mm256_add_epi32(_mm256_madd_epi16(w[0], xa), _mm256_madd_epi16(w[2], xb)));
            isum[m][1] = _mm256_add_epi32(isum[m][1],
                                          _mm256_add_epi32(_mm256_madd_epi16(w[1], xa), _mm256_madd_epi16(w[3], xb)));
#endif
        }
    }
}

// ---- both q4 kernels -----------------------------------------------------------------------------------------

// One tile (16 output rows) for MR rows of x (int8 or int16 codes, with their scales dx and scaled sums xs).
template <int MR, typename X>
inline void q4_tile_kernel(const X* xq, const float* dx, const float* xs, int64_t K, const uint8_t* q,
                           const uint16_t* d, const uint16_t* mo, int64_t groups, float* y, int64_t ldy, int valid) {
    // The fp32 accumulators live in memory, updated once per group: the registers go to the integer sums (2 per
    // row), the codes and the x broadcasts, so 4 rows fit without spills in the inner loop.
    alignas(32) float acc_mem[MR][NT];
    for (int m = 0; m < MR; ++m)
        for (int i = 0; i < NT; ++i) acc_mem[m][i] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
        __m256i isum[MR][2];
        q4_group_sums<MR>(xq, K, q + g * (QK / 2) * NT, g, isum);
        const __m256 d0 = scales8(d + g * NT), d1 = scales8(d + g * NT + 8);
        const __m256 m0 = scales8(mo + g * NT), m1 = scales8(mo + g * NT + 8);
        for (int m = 0; m < MR; ++m) {
            const __m256 dm = _mm256_set1_ps(dx[m * groups + g]), sm = _mm256_set1_ps(xs[m * groups + g]);
            __m256 a0 = _mm256_load_ps(acc_mem[m]), a1 = _mm256_load_ps(acc_mem[m] + 8);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m][0]), _mm256_mul_ps(d0, dm), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m][1]), _mm256_mul_ps(d1, dm), a1);
            _mm256_store_ps(acc_mem[m], _mm256_fmadd_ps(m0, sm, a0));
            _mm256_store_ps(acc_mem[m] + 8, _mm256_fmadd_ps(m1, sm, a1));
        }
        asm volatile("" : : "r"(&acc_mem[0][0]) : "memory");  // keep acc_mem in memory (see above)
    }
    for (int m = 0; m < MR; ++m) std::memcpy(y + m * ldy, acc_mem[m], sizeof(float) * valid);
}

template <typename X>
inline void q4_tile_all_rows(const X* xq, const float* dx, const float* xs, int64_t M, int64_t K, const uint8_t* q,
                             const uint16_t* d, const uint16_t* mo, float* y, int64_t ldy, int valid) {
    const int64_t groups = K / QK;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
        q4_tile_kernel<4>(xq + m * K, dx + m * groups, xs + m * groups, K, q, d, mo, groups, y + m * ldy, ldy, valid);
    const int64_t left = M - m;
    xq += m * K, dx += m * groups, xs += m * groups, y += m * ldy;
    if (left == 3) q4_tile_kernel<3>(xq, dx, xs, K, q, d, mo, groups, y, ldy, valid);
    if (left == 2) q4_tile_kernel<2>(xq, dx, xs, K, q, d, mo, groups, y, ldy, valid);
    if (left == 1) q4_tile_kernel<1>(xq, dx, xs, K, q, d, mo, groups, y, ldy, valid);
}

// Per-thread buffers of the rounded activations, grown on demand.
constexpr int64_t PARALLEL_QUANTIZE_ROWS = 32;  // rows from which q4_linear quantizes x on every thread

struct QuantizedRows {
    std::vector<int16_t> xq16;  // int8 and q4a16 kernels: x rounded to int16
    std::vector<int8_t> xq8;    // q4 kernel: x rounded to int8
    // dx: the scale of each row and group; xs: dx times the group sum of the codes (q4 kernels only)
    std::vector<float> dx, xs;
    void resize(int64_t M, int64_t K, bool int8_codes) {
        (int8_codes ? xq8.resize(M * K) : xq16.resize(M * K));
        dx.resize(M * (K / QK));
        xs.resize(M * (K / QK));
    }
    // Rows [m0, m1) of x to int8 or int16 codes, with their group sums (times dx) if asked; resize first.
    void quantize(const float* x, int64_t m0, int64_t m1, int64_t K, int64_t ldx, bool int8_codes, bool sums) {
        const int64_t groups = K / QK;
        for (int64_t m = m0; m < m1; ++m) {
            if (int8_codes)
                quantize_row_i8(x + m * ldx, K, xq8.data() + m * K, dx.data() + m * groups);
            else
                quantize_row(x + m * ldx, K, xq16.data() + m * K, dx.data() + m * groups);
            if (!sums) continue;
            for (int64_t g = 0; g < groups; ++g) {
                int32_t s = 0;
                for (int j = 0; j < QK; ++j) s += int8_codes ? xq8[m * K + g * QK + j] : xq16[m * K + g * QK + j];
                xs[m * groups + g] = dx[m * groups + g] * static_cast<float>(s);
            }
        }
    }
};

// y[M, N] = x[M, K] @ dequant(W)^T, W in the q4 layout (int8 activations) or the q4a16 one (int16).
template <bool INT8_X>
void q4_linear_impl(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* q, const uint16_t* d,
                    const uint16_t* mo, int64_t N, float* y, int64_t ldy, int threads) {
    const int64_t tiles = (N + NT - 1) / NT, groups = K / QK;
    static thread_local QuantizedRows rows_of_caller;
    QuantizedRows* rows = &rows_of_caller;  // the caller's buffers, shared by the threads below
    rows->resize(M, K, INT8_X);
    const std::conditional_t<INT8_X, int8_t, int16_t>* xqp;
    if constexpr (INT8_X)
        xqp = rows->xq8.data();
    else
        xqp = rows->xq16.data();
    const float *dxp = rows->dx.data(), *xsp = rows->xs.data();
    // Few rows: quantized by the calling thread. Many (prefill): by all threads, a slice each, before the tiles.
    const bool split_rows = M >= PARALLEL_QUANTIZE_ROWS;
    if (!split_rows) rows->quantize(x, 0, M, K, ldx, INT8_X, true);
#pragma omp parallel num_threads(threads)
    {
        if (split_rows) {
            const int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
            rows->quantize(x, M * i / n, M * (i + 1) / n, K, ldx, INT8_X, true);
#pragma omp barrier
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const uint8_t* qt = q + t * (K / 2) * NT;
            const uint16_t *dt = d + t * groups * NT, *mt = mo + t * groups * NT;
            q4_tile_all_rows(xqp, dxp, xsp, M, K, qt, dt, mt, y + t * NT, ldy, tile_rows(N, t));
        }
    }
}

// ---- bf16 weights (a --dtype bfloat16 model's own) ------------------------------------------------------------
// y = x @ W^T with W bf16 [N, K] row-major (torch's Linear layout) and fp32 x, y: each weight is widened to fp32
// on load (a bf16 is the high half of an fp32) and multiplied by x unrounded, fp32 sums. Blocks of MR rows of x by
// 4 rows of W keep 4 * MR accumulators in registers; a thread's 4 weight rows stay in L1 over all rows of x.

// y[r][j] = x_r . w_j for MR rows of x (stride ldx) and nn <= 4 rows of W (stride K).
template <int MR>
void bf16_block(const float* x, int64_t ldx, const uint16_t* w, int64_t K, int64_t nn, float* y, int64_t ldy) {
    const uint16_t* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = w + std::min<int64_t>(j, nn - 1) * K;  // a short block repeats its last row
    __m256 acc[MR][4];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
    const int64_t kv = K & ~int64_t(7);
    for (int64_t k = 0; k < kv; k += 8) {
        __m256 wv[4];
        for (int j = 0; j < 4; ++j) wv[j] = pagoda_bf16::load8(wr[j] + k);
        for (int r = 0; r < MR; ++r) {
            const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        // the four horizontal sums of acc[r][0..3], in order
        const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
        alignas(16) float sums[4];
        _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
        for (int64_t j = 0; j < nn; ++j) {
            float s = sums[j];
            for (int64_t k = kv; k < K; ++k) s += x[r * ldx + k] * pagoda_bf16::to_f32(wr[j][k]);
            y[r * ldy + j] = s;
        }
    }
}

}  // namespace

extern "C" {

// The integer dot-product variant this library was built with: "avx512vnni", "avxvnni" or "avx2".
const char* quant_linear_variant() { return VNNI_NAME; }

// y[M, N] = x[M, K] @ dequant(W)^T, W in the int8 layout.
void int8_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* qweight, const uint16_t* scales,
                 int64_t N, float* y, int64_t ldy, int threads) {
    const int64_t tiles = (N + NT - 1) / NT, groups = K / QK;
    static thread_local QuantizedRows rows;  // per calling thread: callers may run concurrently
    rows.resize(M, K, false);
    rows.quantize(x, 0, M, K, ldx, false, false);
    const int16_t* xqp = rows.xq16.data();
    const float* dxp = rows.dx.data();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; ++t)
        tile_all_rows(xqp, dxp, M, K, qweight + t * K * NT, scales + t * groups * NT, y + t * NT, ldy, tile_rows(N, t));
}

void q4_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* q, const uint16_t* d,
               const uint16_t* mo, int64_t N, float* y, int64_t ldy, int threads) {
    q4_linear_impl<true>(x, M, K, ldx, q, d, mo, N, y, ldy, threads);
}

void q4a16_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* q, const uint16_t* d,
                  const uint16_t* mo, int64_t N, float* y, int64_t ldy, int threads) {
    q4_linear_impl<false>(x, M, K, ldx, q, d, mo, N, y, ldy, threads);
}

// out[K, T * 16] = dequant(W)^T, row-major fp32 (pad rows of W give zero columns): for large M, where a float
// GEMM is faster than the kernel. Transposed because the packed k pairs split into k rows with two madds.
void int8_dequantize_t(const int8_t* qweight, const uint16_t* scales, int64_t N, int64_t K, float* out, int threads) {
    const int64_t tiles = (N + NT - 1) / NT, groups = K / QK, ld = tiles * NT;
    const __m256i even = _mm256_set1_epi32(1), odd = _mm256_set1_epi32(1 << 16);  // int16 pairs (1, 0), (0, 1)
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        for (int64_t g = 0; g < groups; ++g) {
            const int8_t* qg = qweight + (t * K + g * QK) * NT;
            const __m256 s[2] = {scales8(scales + (t * groups + g) * NT), scales8(scales + (t * groups + g) * NT + 8)};
            for (int j = 0; j < QK / 2; ++j) {
                float* row = out + (g * QK + 2 * j) * ld + t * NT;  // row k = 2j; row k + 1 is ld further
                for (int h = 0; h < 2; ++h) {
                    const __m256i w =
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + j * 32 + h * 16)));
                    _mm256_storeu_ps(row + h * 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(w, even)), s[h]));
                    _mm256_storeu_ps(row + ld + h * 8,
                                     _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(w, odd)), s[h]));
                }
            }
        }
    }
}

// y[M, N] = x[M, K] @ W^T, W bf16 [N, K] row-major (see bf16_block).
void bf16_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                 int64_t ldy, int threads) {
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = 4 * b, nn = std::min<int64_t>(4, N - n0);
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) bf16_block<4>(x + m * ldx, ldx, w + n0 * K, K, nn, y + m * ldy + n0, ldy);
        for (; m < M; ++m) bf16_block<1>(x + m * ldx, ldx, w + n0 * K, K, nn, y + m * ldy + n0, ldy);
    }
}

}  // extern "C"
