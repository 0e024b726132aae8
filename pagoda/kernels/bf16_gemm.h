// bf16 GEMM with fp32 output on a weight packed once in bf16: y[M, N] = bf16(x[M, K]) @ bf16(W[N, K])^T, products
// exact in fp32 and summed in fp32. Two kernels read the same packed weight: AMX tiles (TDPBF16PS) where the CPU has
// AMX-BF16, else AVX512-BF16 (VDPBF16PS: 16 columns x one k pair per instruction). Included by quant_linear.cpp (so
// by llama_stack.cpp too).
//
// Why by hand and not through torch: oneDNN runs bf16 GEMMs on these units, but torch 2.13 reaches them on the CPU
// only with bf16 output (F.linear on bf16 tensors: every output rounded to bf16, twice the logprob error) or with an
// fp32 weight that oneDNN converts and reorders at every call (fp32 x fp32 with fp32_precision "bf16"): 4 bytes
// per weight read plus the reorder's traffic, which halved its rate at SmolLM2's shapes (BENCHMARKS.md, stop 21).
// Here the weight is converted and packed once, at 2 bytes per weight, and the output stays fp32.
//
// Packed weight (pagoda/layers/quantized.py `pack_bf16`): N and K multiples of 16 and 32;
//   w[N/16][K/32][16][16][2]  bf16   column tile t, k block b, k pair p, column i, pair element e
//                                    = W[16 t + i][32 b + 2 p + e]
// so each 1 KiB run is one B tile in the VNNI layout TDPBF16PS reads (16 rows of 64 bytes: k pairs x columns), and
// for AVX512-BF16 column tile t is a stream of K / 2 vectors, vector P = 16 columns x k pair P.
// x is rounded to bf16 (round to nearest even, as torch's .to(bfloat16) for normal numbers) into a per-call buffer
// whose rows are padded with zeros to a multiple of 32.
//
// AMX tiles: C0..C3 are a 32 x 32 block of y (2 row tiles x 2 column tiles of 16 x 16 fp32), A4, A5 its 32 rows of
// the current k block (16 x 32 bf16 each), B6, B7 its 32 columns: 4 tile products per 2 + 2 tile loads. AVX512-BF16:
// a block of 4 rows x 4 column tiles (16 accumulators) per pass over K; per k pair, 4 weight vectors and 4
// broadcast x pairs feed 16 VDPBF16PS. Threads split the column blocks, so each output element is written by
// exactly one thread; within one, all row blocks run while the block's weight stays in L1 / L2.
//
// AMX needs the kernel's permission (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA) once per process, and a tile
// configuration in every thread that uses tiles: each call loads its own (oneDNN, in the same threads, loads
// others) and releases the tiles at the end. bf16_packed_kinds() says which kernels this build and this kernel
// allow; a caller asking for another gets NaN, not SIGILL.

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && \
    defined(__linux__)
#define PAGODA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define PAGODA_AMX 0
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define PAGODA_AVX512BF16 1
#else
#define PAGODA_AVX512BF16 0
#endif

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace pagoda_bf16_gemm {

constexpr int KIND_AVX512BF16 = 1, KIND_AMX = 2;  // bit flags of bf16_packed_kinds()

#if PAGODA_AMX || PAGODA_AVX512BF16
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

// x rounded to bf16 in a buffer of the calling thread, rows padded with zeros to a multiple of `pad` (filled by
// the team of threads in `fill`, which the caller runs inside its parallel region).
struct RoundedRows {
    uint16_t* a;
    int64_t padded;
    RoundedRows(int64_t M, int64_t K, int64_t pad) {
        padded = (M + pad - 1) / pad * pad;
        static thread_local std::vector<uint16_t> abuf;  // the calling thread's, filled by its team
        if (static_cast<int64_t>(abuf.size()) < padded * K) abuf.resize(padded * K);
        a = abuf.data();
        std::memset(a + M * K, 0, (padded - M) * K * sizeof(uint16_t));
    }
    void fill(const float* x, int64_t ldx, int64_t M, int64_t K) const {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r += 8) round_rows(x, ldx, K, r, std::min(M, r + 8), a);
    }
};
#endif

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

void amx_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                int64_t ldy, int threads) {
    const RoundedRows rows(M, K, MB);
    const int64_t col_tiles = N / TILE, col_blocks = (col_tiles + 1) / 2, row_blocks = rows.padded / MB;
    const int nt = std::max(1, std::min<int>(threads > 0 ? threads : omp_get_max_threads(),
                                             static_cast<int>(col_blocks)));
#pragma omp parallel num_threads(nt)
    {
        rows.fill(x, ldx, M, K);
        configure();
#pragma omp for schedule(static)
        for (int64_t cb = 0; cb < col_blocks; ++cb) {
            const int64_t t = 2 * cb;
            const int tiles = t + 1 < col_tiles ? 2 : 1;
            for (int64_t rb = 0; rb < row_blocks; ++rb) block(rows.a, K, w, t, tiles, rb * MB, M, y, ldy);
        }
        _tile_release();
    }
}
#endif

#if PAGODA_AVX512BF16
constexpr int64_t COLS = 16;      // columns per vector (and per packed column tile)
constexpr int AVX_ROWS = 4;       // rows of a block
constexpr int AVX_TILES = 4;      // column tiles of a block

// y[r0 + r][16 (t0 + c) + i] for r < R, c < C: the rows' bf16 pairs (a, K / 2 uint32 per row) against the C
// column tiles' streams of K / 2 vectors.
template <int R, int C>
inline void avx512_block(const uint32_t* a, int64_t pairs, const uint16_t* w, int64_t t0, int64_t r0, float* y,
                         int64_t ldy) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint16_t* streams[C];
    for (int c = 0; c < C; ++c) streams[c] = w + (t0 + c) * pairs * 32;
    const uint32_t* arow[R];
    for (int r = 0; r < R; ++r) arow[r] = a + (r0 + r) * pairs;
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh wv[C];
        for (int c = 0; c < C; ++c) wv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(streams[c] + p * 32));
        for (int r = 0; r < R; ++r) {
            const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(arow[r][p])));
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + (r0 + r) * ldy + (t0 + c) * COLS, acc[r][c]);
}

template <int C>
inline void avx512_rows(const uint32_t* a, int64_t pairs, const uint16_t* w, int64_t t0, int64_t M, float* y,
                        int64_t ldy) {
    int64_t r = 0;
    for (; r + AVX_ROWS <= M; r += AVX_ROWS) avx512_block<AVX_ROWS, C>(a, pairs, w, t0, r, y, ldy);
    switch (M - r) {
        case 3: avx512_block<3, C>(a, pairs, w, t0, r, y, ldy); break;
        case 2: avx512_block<2, C>(a, pairs, w, t0, r, y, ldy); break;
        case 1: avx512_block<1, C>(a, pairs, w, t0, r, y, ldy); break;
        default: break;
    }
}

void avx512bf16_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, float* y,
                       int64_t ldy, int threads) {
    const RoundedRows rows(M, K, 1);
    const uint32_t* a = reinterpret_cast<const uint32_t*>(rows.a);
    const int64_t pairs = K / 2, col_tiles = N / COLS;
    const int64_t col_blocks = (col_tiles + AVX_TILES - 1) / AVX_TILES;
    const int nt = std::max(1, std::min<int>(threads > 0 ? threads : omp_get_max_threads(),
                                             static_cast<int>(col_blocks)));
#pragma omp parallel num_threads(nt)
    {
        rows.fill(x, ldx, M, K);
#pragma omp for schedule(dynamic)
        for (int64_t cb = 0; cb < col_blocks; ++cb) {
            const int64_t t0 = cb * AVX_TILES;
            switch (std::min<int64_t>(AVX_TILES, col_tiles - t0)) {
                case 4: avx512_rows<4>(a, pairs, w, t0, M, y, ldy); break;
                case 3: avx512_rows<3>(a, pairs, w, t0, M, y, ldy); break;
                case 2: avx512_rows<2>(a, pairs, w, t0, M, y, ldy); break;
                default: avx512_rows<1>(a, pairs, w, t0, M, y, ldy); break;
            }
        }
    }
}
#endif

}  // namespace pagoda_bf16_gemm

extern "C" {

// Which packed-bf16 kernels may run here (bit flags): 1 AVX512-BF16 (built for it), 2 AMX (built for it, and the
// kernel grants the tile state).
int bf16_packed_kinds() {
    using namespace pagoda_bf16_gemm;
    int kinds = 0;
#if PAGODA_AVX512BF16
    kinds |= KIND_AVX512BF16;
#endif
#if PAGODA_AMX
    if (permitted()) kinds |= KIND_AMX;
#endif
    return kinds;
}

// The best kind available: AMX, else AVX512-BF16, else 0.
int bf16_packed_best() {
    const int kinds = bf16_packed_kinds();
    return kinds & pagoda_bf16_gemm::KIND_AMX ? pagoda_bf16_gemm::KIND_AMX : kinds & pagoda_bf16_gemm::KIND_AVX512BF16;
}

// y[M, N] (rows ldy floats apart) = bf16(x[M, K]) (rows ldx floats apart) @ W^T for the packed W (see the top of
// this file), by the kernel `kind` (1 AVX512-BF16, 2 AMX; 0: the best available). N % 16 == 0, K % 32 == 0; x
// finite. A kind that cannot run here writes NaN.
void bf16_packed_linear(int kind, const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                        float* y, int64_t ldy, int threads) {
    using namespace pagoda_bf16_gemm;
    if (kind == 0) kind = bf16_packed_best();
    if (!(kind & bf16_packed_kinds()) || (kind != KIND_AMX && kind != KIND_AVX512BF16)) {
        for (int64_t r = 0; r < M; ++r)
            std::fill(y + r * ldy, y + r * ldy + N, std::numeric_limits<float>::quiet_NaN());
        return;
    }
#if PAGODA_AMX
    if (kind == KIND_AMX) return amx_linear(x, M, K, ldx, w, N, y, ldy, threads);
#endif
#if PAGODA_AVX512BF16
    if (kind == KIND_AVX512BF16) return avx512bf16_linear(x, M, K, ldx, w, N, y, ldy, threads);
#endif
    (void)x, (void)K, (void)ldx, (void)w, (void)threads;
}

}  // extern "C"
