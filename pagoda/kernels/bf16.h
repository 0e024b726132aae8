// bf16 -> fp32, shared by the kernels that read bf16 (paged_attention.cpp's KV cache, quant_linear.cpp's weights).
// A bf16 is the high 16 bits of an fp32, so widening is a shift: exact.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pagoda_bf16 {

inline float to_f32(uint16_t bits) {
    const uint32_t wide = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
}

#if defined(__AVX2__)
// Eight consecutive bf16 values as fp32 lanes.
inline __m256 load8(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#endif

#if defined(__AVX512F__)
// Sixteen consecutive bf16 values as fp32 lanes.
inline __m512 load16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

}  // namespace pagoda_bf16
