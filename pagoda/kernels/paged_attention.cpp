// Paged attention on the CPU: fp32 queries, fp32 KV cache read in place through block tables.
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
//   k_cache, v_cache [num_slots, Hkv, D] contiguous; slot of position k = table[k / bs] * bs + k % bs
//   block_tables [B, table_stride] int64, context_lens [B] int64, query_start [B + 1] int64
// A request's queries are its last n context positions [ctx - n, ctx); their k, v are already in the cache
// (paged_cache_write runs first), so attention reads only the cache, never the step's k, v.
//
// The core (attend_rows) handles one (request, kv head, query tile): its R = n_q * G query rows (G = query
// heads per kv head) stream over the allowed key range in segments of KT keys with an online softmax, so each
// K and V row of the range is read once per tile and serves all R rows. Decode is the n_q = 1 case.
// Parallelism: OpenMP over (sequence x kv head) for decode and (query tile x kv head) for prefill, dynamic.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGODA_AVX2 1
#else
#define PAGODA_AVX2 0
#endif

namespace {

using i64 = int64_t;

constexpr int KT = 32;            // keys per segment: the width of one score row (a multiple of 8)
constexpr int TILE_ROWS = 32;     // target query rows (tokens x heads of a GQA group) per prefill tile
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Problem {
    const float* q;
    i64 q_stride;
    float* out;
    i64 out_stride;
    const float* k_cache;
    const float* v_cache;
    const i64* block_tables;
    i64 table_stride;
    const i64* context_lens;
    i64 num_heads, num_kv_heads, head_dim, block_size;
    i64 window;  // <= 0: no sliding window
    float scale;

    i64 group() const { return num_heads / num_kv_heads; }
    i64 slot_stride() const { return num_kv_heads * head_dim; }
};

// Per-thread buffers, sized for the largest tile the call can produce.
struct Scratch {
    std::vector<float> scores;  // [R][KT]: scaled scores, then probabilities (0 where masked)
    std::vector<float> acc;     // [R][D]: unnormalised output rows
    std::vector<float> m, l;    // [R]: running max and running sum of exp
    std::vector<const float*> qrows;
    std::vector<const float*> krows, vrows;  // [2][KT]: this segment's rows and the next one's
    Scratch(i64 rows, i64 dim)
        : scores(rows * KT), acc(rows * dim), m(rows), l(rows), qrows(rows), krows(2 * KT), vrows(2 * KT) {}
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
#endif

inline float dot(const float* a, const float* b, i64 n) {
    i64 d = 0;
    float s = 0.0f;
#if PAGODA_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    s = hsum(acc);
#endif
    for (; d < n; ++d) s += a[d] * b[d];
    return s;
}

#if PAGODA_AVX2
// scores[r][j] = scale * q_r . k_j for NR rows starting at r and keys [0, n): NR rows x 4 keys per pass, so each
// K chunk loaded serves NR rows and each q chunk 4 keys.
template <int NR>
void qk_block(const float* const* qrows, const float* const* krows, int n, i64 D, float scale, float* scores) {
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
                const __m256 kv = _mm256_loadu_ps(krows[j + u] + d);
                for (int r = 0; r < NR; ++r) a[r][u] = _mm256_fmadd_ps(x[r], kv, a[r][u]);
            }
        }
        for (int r = 0; r < NR; ++r) {
            __m128 s4 = hsum4(a[r][0], a[r][1], a[r][2], a[r][3]);
            if (Dv < D) {  // scalar tail of a head dim that is not a multiple of 8
                alignas(16) float t[4];
                for (int u = 0; u < 4; ++u) t[u] = dot(qrows[r] + Dv, krows[j + u] + Dv, D - Dv);
                s4 = _mm_add_ps(s4, _mm_load_ps(t));
            }
            _mm_storeu_ps(scores + r * KT + j, _mm_mul_ps(s4, vscale));
        }
    }
    for (; j < n; ++j)
        for (int r = 0; r < NR; ++r) scores[r * KT + j] = scale * dot(qrows[r], krows[j], D);
}

// acc[r] += sum_j probs[r][j] * v_j for NR rows starting at r and keys [0, n): the rows' accumulators stay in
// registers over all keys, 32 floats of D at a time, so each V chunk loaded serves NR rows.
template <int NR>
void pv_block(const float* probs, const float* const* vrows, int n, i64 D, float* acc) {
    i64 d = 0;
    for (; d + 32 <= D; d += 32) {
        __m256 a[NR][4];
        for (int r = 0; r < NR; ++r)
            for (int c = 0; c < 4; ++c) a[r][c] = _mm256_loadu_ps(acc + r * D + d + 8 * c);
        for (int j = 0; j < n; ++j) {
            const float* v = vrows[j] + d;
            __m256 vv[4];
            for (int c = 0; c < 4; ++c) vv[c] = _mm256_loadu_ps(v + 8 * c);
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
            const __m256 v = _mm256_loadu_ps(vrows[j] + d);
            for (int r = 0; r < NR; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(probs + r * KT + j), v, a[r]);
        }
        for (int r = 0; r < NR; ++r) _mm256_storeu_ps(acc + r * D + d, a[r]);
    }
    for (; d < D; ++d)
        for (int r = 0; r < NR; ++r)
            for (int j = 0; j < n; ++j) acc[r * D + d] += probs[r * KT + j] * vrows[j][d];
}
#endif

// scores[r][j] = scale * q_r . k_j for rows [0, R) and keys [0, n).
void qk_scores(const float* const* qrows, i64 R, const float* const* krows, int n, i64 D, float scale,
               float* scores) {
    i64 r = 0;
#if PAGODA_AVX2
    for (; r + 2 <= R; r += 2) qk_block<2>(qrows + r, krows, n, D, scale, scores + r * KT);
    if (r < R) qk_block<1>(qrows + r, krows, n, D, scale, scores + r * KT);
#else
    for (; r < R; ++r)
        for (int j = 0; j < n; ++j) scores[r * KT + j] = scale * dot(qrows[r], krows[j], D);
#endif
}

// acc[r] += sum_j probs[r][j] * v_j for rows [0, R) and keys [0, n).
void pv_accumulate(const float* probs, i64 R, const float* const* vrows, int n, i64 D, float* acc) {
    i64 r = 0;
#if PAGODA_AVX2
    for (; r + 2 <= R; r += 2) pv_block<2>(probs + r * KT, vrows, n, D, acc + r * D);
    if (r < R) pv_block<1>(probs + r * KT, vrows, n, D, acc + r * D);
#else
    for (; r < R; ++r)
        for (int j = 0; j < n; ++j)
            for (i64 d = 0; d < D; ++d) acc[r * D + d] += probs[r * KT + j] * vrows[j][d];
#endif
}

// Online-softmax step of one row over its KT scores (masked and padding entries hold -inf, and at least one
// is finite): rescales the row's acc and l to the new max, turns the scores into probabilities in place.
inline void softmax_step(float* s, float& m, float& l, float* acc_row, i64 D) {
    float mx = NEG_INF;
#if PAGODA_AVX2
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
#if PAGODA_AVX2
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

// Pointers to the K and V rows of kv head g at positions [k0, k0 + n), found through the block table.
inline void segment_rows(const Problem& P, const i64* table, i64 g, i64 k0, int n, const float** krows,
                         const float** vrows) {
    const i64 bs = P.block_size, slot_stride = P.slot_stride(), head = g * P.head_dim;
    i64 block = k0 / bs, within = k0 % bs;  // one division per segment, not per key
    for (int j = 0; j < n; ++j) {
        const i64 offset = (table[block] * bs + within) * slot_stride + head;
        krows[j] = P.k_cache + offset;
        vrows[j] = P.v_cache + offset;
        if (++within == bs) {
            within = 0;
            ++block;
        }
    }
}

// Asks for the cache lines of n rows of D floats: blocks are scattered, so the hardware prefetcher cannot
// guess the next one.
inline void prefetch_rows(const float* const* rows, int n, i64 D) {
    for (int j = 0; j < n; ++j)
        for (i64 d = 0; d < D; d += 16) __builtin_prefetch(rows[j] + d, 0, 3);
}

// Attention of one (request, kv head g, query tile): n_q query tokens at flat rows [tok0, tok0 + n_q) and
// positions [pos0, pos0 + n_q), all G query heads of the group.
void attend_rows(const Problem& P, Scratch& S, i64 req, i64 g, i64 tok0, i64 pos0, i64 n_q) {
    const i64 G = P.group(), D = P.head_dim;
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
    // Double-buffered row pointers: while segment k0 is computed, the K rows of the next one are prefetched
    // (and the V rows of this one, which are needed only after its scores).
    const float** krows = S.krows.data();
    const float** vrows = S.vrows.data();
    segment_rows(P, table, g, key_begin, static_cast<int>(std::min<i64>(KT, key_end - key_begin)), krows, vrows);
    for (i64 k0 = key_begin; k0 < key_end; k0 += KT) {
        const int n = static_cast<int>(std::min<i64>(KT, key_end - k0));
        const float** next_k = krows == S.krows.data() ? krows + KT : S.krows.data();
        const float** next_v = vrows == S.vrows.data() ? vrows + KT : S.vrows.data();
        prefetch_rows(vrows, n, D);
        if (k0 + KT < key_end) {
            const int n_next = static_cast<int>(std::min<i64>(KT, key_end - k0 - KT));
            segment_rows(P, table, g, k0 + KT, n_next, next_k, next_v);
            prefetch_rows(next_k, n_next, D);
        }
        qk_scores(S.qrows.data(), R, krows, n, D, P.scale, S.scores.data());
        // Masking: the whole segment is allowed for every row unless it reaches past the tile's first position
        // (causal) or starts before the last position's window.
        const bool all_allowed = k0 + n - 1 <= pos0 && (P.window <= 0 || k0 > last - P.window);
        for (i64 r = 0; r < R; ++r) {
            float* s = S.scores.data() + r * KT;
            if (!all_allowed) {
                const i64 p = pos0 + r / G;
                const i64 lo = P.window > 0 ? p - P.window + 1 : 0;
                for (int j = 0; j < n; ++j)
                    if (k0 + j > p || k0 + j < lo) s[j] = NEG_INF;
            }
            for (int j = n; j < KT; ++j) s[j] = NEG_INF;
            bool any = all_allowed;
            for (int j = 0; j < n && !any; ++j) any = s[j] != NEG_INF;
            if (any) {
                softmax_step(s, S.m[r], S.l[r], S.acc.data() + r * D, D);
            } else {
                std::fill(s, s + KT, 0.0f);  // no allowed key here: contributes nothing
            }
        }
        pv_accumulate(S.scores.data(), R, vrows, n, D, S.acc.data());
        krows = next_k;
        vrows = next_v;
    }
    for (i64 r = 0; r < R; ++r) {
        float* o = P.out + (tok0 + r / G) * P.out_stride + (g * G + r % G) * D;
        const float inv = 1.0f / S.l[r];
        const float* a = S.acc.data() + r * D;
        for (i64 d = 0; d < D; ++d) o[d] = a[d] * inv;
    }
}

int threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

}  // namespace

extern "C" {

// k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t] for t in [0, T); a row is Hkv * D floats, contiguous in
// k and v (token strides k_stride, v_stride) and in the caches.
void paged_cache_write(const float* k, int64_t k_stride, const float* v, int64_t v_stride, const int64_t* slots,
                       int64_t num_tokens, int64_t row, float* k_cache, float* v_cache) {
    for (int64_t t = 0; t < num_tokens; ++t) {
        std::memcpy(k_cache + slots[t] * row, k + t * k_stride, row * sizeof(float));
        std::memcpy(v_cache + slots[t] * row, v + t * v_stride, row * sizeof(float));
    }
}

// Requests [0, num_seqs): one query token each, flat row i, at position context_lens[i] - 1.
void paged_attention_decode(const float* q, int64_t q_stride, float* out, int64_t out_stride, const float* k_cache,
                            const float* v_cache, const int64_t* block_tables, int64_t table_stride,
                            const int64_t* context_lens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t block_size, int64_t window, float scale, int num_threads) {
    const Problem P{q, q_stride, out, out_stride, k_cache, v_cache, block_tables, table_stride, context_lens,
                    num_heads, num_kv_heads, head_dim, block_size, window, scale};
#pragma omp parallel num_threads(threads(num_threads))
    {
        Scratch S(P.group(), head_dim);
#pragma omp for collapse(2) schedule(dynamic)
        for (int64_t i = 0; i < num_seqs; ++i)
            for (int64_t g = 0; g < num_kv_heads; ++g) attend_rows(P, S, i, g, i, context_lens[i] - 1, 1);
    }
}

// Requests [first, last): request i has flat query rows [query_start[i], query_start[i + 1]) at the last
// positions of its context_lens[i]. Its queries are cut into tiles of ~TILE_ROWS / G tokens.
void paged_attention_prefill(const float* q, int64_t q_stride, float* out, int64_t out_stride, const float* k_cache,
                             const float* v_cache, const int64_t* block_tables, int64_t table_stride,
                             const int64_t* context_lens, const int64_t* query_start, int64_t first, int64_t last,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             int64_t window, float scale, int num_threads) {
    const Problem P{q, q_stride, out, out_stride, k_cache, v_cache, block_tables, table_stride, context_lens,
                    num_heads, num_kv_heads, head_dim, block_size, window, scale};
    const int64_t tile = std::max<int64_t>(1, TILE_ROWS / P.group());
    std::vector<int64_t> tile_start(last - first + 1, 0);  // prefix sums of tiles per request
    for (int64_t i = first; i < last; ++i) {
        const int64_t n = query_start[i + 1] - query_start[i];
        tile_start[i - first + 1] = tile_start[i - first] + (n + tile - 1) / tile;
    }
    const int64_t num_tiles = tile_start.back();
#pragma omp parallel num_threads(threads(num_threads))
    {
        Scratch S(tile * P.group(), head_dim);
#pragma omp for collapse(2) schedule(dynamic)
        for (int64_t order = 0; order < num_tiles; ++order)
            for (int64_t g = 0; g < num_kv_heads; ++g) {
                const int64_t t = num_tiles - 1 - order;  // last tiles first: they attend to the most keys
                const int64_t idx = std::upper_bound(tile_start.begin(), tile_start.end(), t) - tile_start.begin() - 1;
                const int64_t i = first + idx;
                const int64_t n = query_start[i + 1] - query_start[i];
                const int64_t q0 = (t - tile_start[idx]) * tile;  // first query of the tile within the request
                attend_rows(P, S, i, g, query_start[i] + q0, context_lens[i] - n + q0, std::min(tile, n - q0));
            }
    }
}

}  // extern "C"
