// The whole decoder stack of a Llama-family model in one native call, for small steps (decode batches).
//
// This file owns the native half of pagoda/models/native_stack.py. Per layer it runs, for the step's T tokens:
//   x = rmsnorm(h) ; qkv = x W_qkv^T ; [q/k head norms] ; rotary(q, k) ; write k, v to the paged cache ;
//   a = paged attention(q) ; h += a W_o^T ; x = rmsnorm(h) ; gu = x W_gate_up^T ; h += (silu(g) * u) W_down^T
// and at the end out = rmsnorm(h). With tensor parallelism the stack is one rank's shard (its heads and its slice
// of the MLP): the o and down projections give partial sums, which the all_reduce callback (torch.distributed,
// called from this thread between parallel regions) sums over the group before the residual add. A pipeline
// stage runs its own layers; only the last one has a final norm. The linear layers are the quantized kernels of
// quant_linear.cpp, or, for calls of as many rows as the kernel plan says, a bf16 GEMM: AMX tiles or
// AVX512-BF16 here (bf16_gemm.h) where the CPU has them, else called back in torch (oneDNN); attention
// is paged_attention.cpp (both included below, so one library holds the whole step). The semantics are the
// torch modules' (models/llama.py, models/qwen3.py, layers/common.py): the tests compare the two paths.
//
// Why: a decode step of a 135M model is ~30 layers x ~15 small tensor ops; in torch each op costs a few
// microseconds of dispatch, which at batch 1 is more than the arithmetic. Here the element-wise work runs in
// place, single-threaded for small steps (it is tiny) and split over tokens for large ones; the matmuls and
// attention fork OpenMP threads.
//
// Layouts: h, out [T, hidden] fp32 row-major; the KV cache of a layer is [2, num_slots, Hkv, D] of its element
// (paged_attention.cpp; 8-bit codes: rows of D + 4 bytes, the scale last); rotary
// tables cos, sin [max_positions, D/2] (rotate-half layout). Every K dimension is a multiple of 32.

#include "paged_attention.cpp"
#include "quant_linear.cpp"  // both include kernel_abi.h

namespace {

enum LinearKind : int64_t { INT8 = 1, Q4 = 2, Q4A16 = 3, BF16 = 4 };  // QuantizedLinear.kind

struct QLinear {
    int64_t kind, n, k;
    const void* q;      // the packed weight (bf16: [n, k] row-major)
    const uint16_t* d;  // scales; null for bf16
    const uint16_t* m;  // q4 offsets; null for int8 and bf16
    int64_t dense_from;  // calls of at least this many rows take the dense bf16 path (0: never; the kernel plan):
    const uint16_t* dense;  // the weight packed for bf16_packed_linear, or null: Stack::dense_gemm (torch) runs them
    int64_t id;             // the layer's index for dense_gemm
};

struct Layer {
    const float* attn_norm;
    const float* ffn_norm;
    const float* q_norm;  // per-head norms (Qwen3); null when absent
    const float* k_norm;
    QLinear qkv, o, gate_up, down;
    void* kv_cache;  // [2, num_slots, Hkv, row] of Stack::kv_dtype
    int64_t window;  // <= 0: full attention
};

struct Stack {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate, num_slots;
    int64_t kv_dtype;  // 0: fp32, 1: fp16, 2: bf16, 3: int8, 4: fp8 e4m3, 5: fp8 e5m2 (paged_attention.cpp)
    float eps, scale;
    const float* cos;
    const float* sin;
    const float* final_norm;  // null: not the last pipeline stage (out = h)
    const Layer* layers;
    void (*all_reduce)(float* data, int64_t n);  // null: one rank
    // y[M, n] = x[M, k] @ W^T of layer `id` on its dequantized weight (a bf16 GEMM through torch/oneDNN on an
    // fp32 copy, where no packed kernel runs), called from this thread between parallel regions; null: the kernels only.
    void (*dense_gemm)(int64_t id, const float* x, int64_t M, float* y);
};

struct Batch {
    int64_t num_tokens;
    const int64_t* positions;
    const int64_t* slots;
    const int64_t* block_tables;
    int64_t table_stride;
    const int64_t* context_lens;
    const int64_t* query_start;
    int64_t num_decodes, num_requests, block_size;
};

void linear(const Stack& S, const QLinear& w, const float* x, int64_t M, float* y, int threads) {
    if (w.dense_from > 0 && M >= w.dense_from && w.dense != nullptr)
        bf16_packed_linear(0, x, M, w.k, w.k, w.dense, w.n, y, w.n, threads);
    else if (S.dense_gemm != nullptr && w.dense_from > 0 && M >= w.dense_from)
        S.dense_gemm(w.id, x, M, y);
    else if (w.kind == INT8)
        int8_linear(x, M, w.k, w.k, static_cast<const int8_t*>(w.q), w.d, w.n, y, w.n, threads);
    else if (w.kind == BF16)
        bf16_linear(x, M, w.k, w.k, static_cast<const uint16_t*>(w.q), w.n, y, w.n, threads);
    else if (w.kind == Q4)
        q4_linear(x, M, w.k, w.k, static_cast<const uint8_t*>(w.q), w.d, w.m, w.n, y, w.n, threads);
    else
        q4a16_linear(x, M, w.k, w.k, static_cast<const uint8_t*>(w.q), w.d, w.m, w.n, y, w.n, threads);
}

// y = x / rms(x) * w over n floats.
void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* y) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; i < n; ++i) ss += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), _mm256_loadu_ps(w + i)));
    for (; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// Rotate-half rotary of one head in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
void rotate(float* x, const float* c, const float* s, int64_t half) {
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + half + i);
        const __m256 vc = _mm256_loadu_ps(c + i), vs = _mm256_loadu_ps(s + i);
        _mm256_storeu_ps(x + i, _mm256_fmsub_ps(x1, vc, _mm256_mul_ps(x2, vs)));
        _mm256_storeu_ps(x + half + i, _mm256_fmadd_ps(x2, vc, _mm256_mul_ps(x1, vs)));
    }
    for (; i < half; ++i) {
        const float x1 = x[i], x2 = x[half + i];
        x[i] = x1 * c[i] - x2 * s[i];
        x[half + i] = x2 * c[i] + x1 * s[i];
    }
}

// act[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up.
void silu_mul(const float* gate, const float* up, int64_t n, float* act) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; ++i) act[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void add_rows(float* h, const float* delta, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(delta + i)));
    for (; i < n; ++i) h[i] += delta[i];
}

constexpr int64_t PARALLEL_ROWS = 32;  // below this many tokens the element-wise work is not worth a fork

void norm_rows(const float* h, const float* w, const Stack& S, int64_t T, float* out, int threads) {
#pragma omp parallel for num_threads(threads) if (T >= PARALLEL_ROWS)
    for (int64_t t = 0; t < T; ++t) rmsnorm(h + t * S.hidden, w, S.hidden, S.eps, out + t * S.hidden);
}

struct Buffers {
    std::vector<float> x, qkv, attn, tmp, gate_up, act;
    void resize(const Stack& S, int64_t T) {
        const int64_t qkv_n = (S.heads + 2 * S.kv_heads) * S.head_dim;
        x.resize(T * S.hidden);
        qkv.resize(T * qkv_n);
        attn.resize(T * S.heads * S.head_dim);
        tmp.resize(T * S.hidden);
        gate_up.resize(T * 2 * S.intermediate);
        act.resize(T * S.intermediate);
    }
};

void attention(const Stack& S, const Layer& L, const Batch& B, float* qkv, float* out, int threads) {
    const int64_t T = B.num_tokens, H = S.heads, Hkv = S.kv_heads, D = S.head_dim, half = D / 2;
    const int64_t qkv_n = (H + 2 * Hkv) * D;
#pragma omp parallel for num_threads(threads) if (T >= PARALLEL_ROWS)
    for (int64_t t = 0; t < T; ++t) {
        float* row = qkv + t * qkv_n;
        const float* c = S.cos + B.positions[t] * half;
        const float* s = S.sin + B.positions[t] * half;
        for (int64_t h = 0; h < H + Hkv; ++h) {  // q heads, then k heads
            float* head = row + h * D;
            const float* norm = h < H ? L.q_norm : L.k_norm;
            if (norm != nullptr) rmsnorm(head, norm, D, S.eps, head);
            rotate(head, c, s, half);
        }
    }
    void* k_cache = L.kv_cache;
    void* v_cache = static_cast<char*>(L.kv_cache) + S.num_slots * slot_bytes(S.kv_dtype, Hkv, D);
    paged_cache_write(qkv + H * D, qkv_n, qkv + (H + Hkv) * D, qkv_n, B.slots, T, Hkv, D, k_cache, v_cache,
                      S.kv_dtype);
    if (B.num_decodes > 0)
        paged_attention_decode(qkv, qkv_n, out, H * D, k_cache, v_cache, S.kv_dtype, B.block_tables, B.table_stride,
                               B.context_lens, B.num_decodes, H, Hkv, D, B.block_size, L.window, S.scale, threads);
    if (B.num_decodes < B.num_requests)
        paged_attention_prefill(qkv, qkv_n, out, H * D, k_cache, v_cache, S.kv_dtype, B.block_tables, B.table_stride,
                                B.context_lens, B.query_start, B.num_decodes, B.num_requests, H, Hkv, D,
                                B.block_size, L.window, S.scale, threads);
}

}  // namespace

extern "C" {

// The sizes of the structs native_stack.py mirrors with ctypes, checked there before the first call.
void llama_stack_struct_sizes(int64_t* out) {
    out[0] = sizeof(QLinear);
    out[1] = sizeof(Layer);
    out[2] = sizeof(Stack);
    out[3] = sizeof(Batch);
}

// h [T, hidden]: the embedded tokens in, the last layer's residual stream out; out [T, hidden]: the final norm.
void llama_stack_forward(const Stack* stack, const Batch* batch, float* h, float* out, int threads) {
    const Stack& S = *stack;
    const Batch& B = *batch;
    const int64_t T = B.num_tokens, I = S.intermediate;
    static thread_local Buffers buf;
    buf.resize(S, T);
    for (int64_t l = 0; l < S.num_layers; ++l) {
        const Layer& L = S.layers[l];
        norm_rows(h, L.attn_norm, S, T, buf.x.data(), threads);
        linear(S, L.qkv, buf.x.data(), T, buf.qkv.data(), threads);
        attention(S, L, B, buf.qkv.data(), buf.attn.data(), threads);
        linear(S, L.o, buf.attn.data(), T, buf.tmp.data(), threads);
        if (S.all_reduce != nullptr) S.all_reduce(buf.tmp.data(), T * S.hidden);
        add_rows(h, buf.tmp.data(), T * S.hidden);
        norm_rows(h, L.ffn_norm, S, T, buf.x.data(), threads);
        linear(S, L.gate_up, buf.x.data(), T, buf.gate_up.data(), threads);
        const float* gate_up = buf.gate_up.data();
        float* act = buf.act.data();
#pragma omp parallel for num_threads(threads) if (T >= PARALLEL_ROWS)
        for (int64_t t = 0; t < T; ++t) silu_mul(gate_up + t * 2 * I, gate_up + t * 2 * I + I, I, act + t * I);
        linear(S, L.down, buf.act.data(), T, buf.tmp.data(), threads);
        if (S.all_reduce != nullptr) S.all_reduce(buf.tmp.data(), T * S.hidden);
        add_rows(h, buf.tmp.data(), T * S.hidden);
    }
    if (S.final_norm != nullptr)
        norm_rows(h, S.final_norm, S, T, out, threads);
    else
        std::memcpy(out, h, T * S.hidden * sizeof(float));
}

}  // extern "C"
