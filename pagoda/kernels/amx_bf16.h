// bf16 GEMM on AMX tiles with fp32 output: y[M, N] = bf16(x[M, K]) @ bf16(W[N, K])^T, products exact in fp32 and
// summed in fp32 (TDPBF16PS). Included by quant_linear.cpp (so by llama_stack.cpp too).
//
// Why by hand and not through torch: oneDNN runs bf16 GEMMs on AMX, but torch 2.13 reaches them on the CPU only
// with bf16 output (F.linear on bf16 tensors: every output rounded to bf16, twice the logprob error) or with an
// fp32 weight that oneDNN converts and reorders at every call (fp32 x fp32 with fp32_precision "bf16"): 4 bytes
// per weight read plus the reorder's traffic, which at decode batches is most of the call. Here the weight is
// converted and packed once, at 2 bytes per weight, and the output stays fp32.
//
// Packed weight (pagoda/layers/quantized.py `pack_amx_bf16`): N and K multiples of 16 and 32;
//   w[N/16][K/32][16][16][2]  bf16   column tile t, k block b, k pair p, column i, pair element e
//                                    = W[16 t + i][32 b + 2 p + e]
// so each 1 KiB run is one B tile in the VNNI layout TDPBF16PS reads (16 rows of 64 bytes: k pairs x columns).
// x is rounded to bf16 (round to nearest even, as torch's .to(bfloat16) for normal numbers) into a per-call buffer
// whose rows are padded with zeros to a multiple of 32.
//
// Tiles: C0..C3 are a 32 x 32 block of y (2 row tiles x 2 column tiles of 16 x 16 fp32), A4, A5 its 32 rows of the
// current k block (16 x 32 bf16 each), B6, B7 its 32 columns: 4 tile products per 2 + 2 tile loads. Threads split
// the column blocks, so each output element is written by exactly one thread; within one, all row blocks run
// while the block's weight (K x 32 x 2 bytes) stays in L1 / L2.
//
// AMX needs the kernel's permission (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA) once per process, and a tile
// configuration in every thread that uses tiles: each call loads its own (oneDNN, in the same threads, loads
// others) and releases the tiles at the end. amx_bf16_available() says whether this build and this kernel allow
// it; callers must not call amx_bf16_linear otherwise.

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && \
    defined(__linux__)
#define PAGODA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define PAGODA_AMX 0
#endif

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace pagoda_amx {

#if PAGODA_AMX
constexpr int64_t TILE = 16;    // rows of a tile; columns of an fp32 C tile and of a B tile
constexpr int64_t KB = 32;      // bf16 elements of K per tile row (64 bytes)
constexpr int64_t MB = 32;      // rows of x per block (two A tiles)
constexpr int64_t B_TILE = TILE * KB;  // bf16 elements of one packed B tile

struct TileConfig {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

bool permitted() {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ok;
}

void configure() {
    TileConfig c;
    std::memset(&c, 0, sizeof(c));
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {  // every tile 16 rows x 64 bytes
        c.rows[t] = TILE;
        c.colsb[t] = 64;
    }
    // Not _tile_loadconfig: GCC 12's version tells the compiler it reads only the first 8 bytes, so the stores of
    // rows and colsb were dropped as dead and ldtilecfg faulted. This operand is the whole struct.
    __asm__ volatile("ldtilecfg %0" ::"m"(c));
}

// a[r][0, K) = bf16(x[r][0, K)) for rows [r0, r1); K a multiple of 32.
void round_rows(const float* x, int64_t ldx, int64_t K, int64_t r0, int64_t r1, uint16_t* a) {
    for (int64_t r = r0; r < r1; ++r) {
        const float* src = x + r * ldx;
        uint16_t* dst = a + r * K;
        for (int64_t k = 0; k < K; k += 32) {
            const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k));
            _mm512_storeu_si512(dst + k, reinterpret_cast<__m512i>(v));
        }
    }
}

// y block of rows [m0, m0 + 32) x columns [16 t, 16 t + 16 * tiles) (tiles 1 or 2); rows past M go to a scratch
// tile, not to y.
void block(const uint16_t* a, int64_t K, const uint16_t* w, int64_t t, int tiles, int64_t m0, int64_t M, float* y,
           int64_t ldy) {
    const int64_t kblocks = K / KB;
    const uint16_t* b0 = w + t * kblocks * B_TILE;
    const uint16_t* b1 = b0 + kblocks * B_TILE;
    const uint16_t* a0 = a + m0 * K;
    const uint16_t* a1 = a0 + TILE * K;
    const int64_t lda = K * 2;  // bytes
    const bool two_rows = m0 + TILE < M;  // else the second row tile would be padding only: skip its products
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        _tile_loadd(4, a0 + kb * KB, lda);
        _tile_loadd(6, b0 + kb * B_TILE, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (tiles == 2) {
            _tile_loadd(7, b1 + kb * B_TILE, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two_rows) {
            _tile_loadd(5, a1 + kb * KB, lda);
            _tile_dpbf16ps(2, 5, 6);
            if (tiles == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    alignas(64) float scratch[TILE * TILE];
    float* out = y + m0 * ldy + t * TILE;
    const int64_t ldb = ldy * 4;  // bytes
    // The tile intrinsics take the tile number as a literal (it names the register), hence a macro.
#define PAGODA_AMX_STORE(tile, row_tile, col_tile)                                               \
    do {                                                                                         \
        const int64_t rows = std::min<int64_t>(TILE, M - m0 - (row_tile) * TILE);                \
        float* dst = out + (row_tile) * TILE * ldy + (col_tile) * TILE;                          \
        if (rows == TILE) {                                                                      \
            _tile_stored(tile, dst, ldb);                                                        \
        } else if (rows > 0) {                                                                   \
            _tile_stored(tile, scratch, 64);                                                     \
            for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ldy, scratch + r * TILE, 64); \
        }                                                                                        \
    } while (0)
    PAGODA_AMX_STORE(0, 0, 0);
    PAGODA_AMX_STORE(2, 1, 0);
    if (tiles == 2) {
        PAGODA_AMX_STORE(1, 0, 1);
        PAGODA_AMX_STORE(3, 1, 1);
    }
#undef PAGODA_AMX_STORE
}
#endif

}  // namespace pagoda_amx

extern "C" {

// 1 when amx_bf16_linear may be called: built with AMX-BF16 and AVX512-BF16, and the kernel grants the tile state.
int amx_bf16_available() {
#if PAGODA_AMX
    return pagoda_amx::permitted() ? 1 : 0;
#else
    return 0;
#endif
}

// y[M, N] (rows ldy floats apart) = bf16(x[M, K]) (rows ldx floats apart) @ W^T for the packed W (see the top of
// this file). N % 16 == 0, K % 32 == 0; x finite.
void amx_bf16_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                     int64_t ldy, int threads) {
#if PAGODA_AMX
    using namespace pagoda_amx;
    if (!permitted()) {  // a caller that did not ask amx_bf16_available(): NaN, not SIGILL
        for (int64_t r = 0; r < M; ++r)
            std::fill(y + r * ldy, y + r * ldy + N, std::numeric_limits<float>::quiet_NaN());
        return;
    }
    const int64_t padded = (M + MB - 1) / MB * MB;
    static thread_local std::vector<uint16_t> abuf;  // x in bf16: the calling thread's, filled by its team
    if (static_cast<int64_t>(abuf.size()) < padded * K) abuf.resize(padded * K);
    uint16_t* a = abuf.data();
    std::memset(a + M * K, 0, (padded - M) * K * sizeof(uint16_t));
    const int64_t col_tiles = N / TILE, col_blocks = (col_tiles + 1) / 2, row_blocks = padded / MB;
    const int nt = std::max(1, std::min<int>(threads > 0 ? threads : omp_get_max_threads(),
                                             static_cast<int>(col_blocks)));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r += 8) round_rows(x, ldx, K, r, std::min(M, r + 8), a);
        configure();
#pragma omp for schedule(static)
        for (int64_t cb = 0; cb < col_blocks; ++cb) {
            const int64_t t = 2 * cb;
            const int tiles = t + 1 < col_tiles ? 2 : 1;
            for (int64_t rb = 0; rb < row_blocks; ++rb) block(a, K, w, t, tiles, rb * MB, M, y, ldy);
        }
        _tile_release();
    }
#else
    (void)x, (void)M, (void)K, (void)ldx, (void)w, (void)N, (void)y, (void)ldy, (void)threads;
#endif
}

}  // extern "C"
