// All-reduce (sum of fp32 vectors) for the ranks of one tensor-parallel group on one host, through a shared
// memory segment. This file owns the native half of pagoda/parallel/shm.py, which creates the segment, exchanges
// its name over torch.distributed and falls back to gloo when the ranks are on different hosts.
//
// Why: gloo's all-reduce of a decode step's hidden states takes ~0.5-1 ms on the machines this was measured on
// (BENCHMARKS.md), and a Llama step makes two per layer; here one takes microseconds.
//
// Segment layout: a header of per-rank sequence counters (one cache line each) and their pids, then two
// parities x ranks data slots of `capacity` floats. Call number s (1, 2, ...) of rank r:
//   0. wait until every peer has started call s - 1, so none still reads the slots of parity s % 2 from call s - 2;
//   1. copy its data into slot [s % 2][r], then publish seq[r] = s (release);
//   2. wait until every peer published s (acquire);
//   3. out = slot[s % 2][0] + slot[s % 2][1] + ... in rank order, so every rank gets bit-identical sums.
// Vectors longer than `capacity` go in pieces. Waiting spins with a pause, yields the core after a while (ranks may
// share cores with the server's threads), and fails — the call returns nonzero and every later call fails at
// once — when a peer's process is gone or `timeout_s` passes.

#include <immintrin.h>
#include <sched.h>
#include <signal.h>
#include <time.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "kernel_abi.h"

namespace {

constexpr int64_t MAX_RANKS = 64;
constexpr int64_t LINE = 64;

struct alignas(LINE) Counter {
    std::atomic<int64_t> seq;
    int64_t pid;
};

struct Group {
    char* base = nullptr;
    int64_t rank = 0, size = 1, capacity = 0;
    int64_t seq = 0;  // calls made by this rank
    double timeout_s = 60.0;
    bool failed = false;

    Counter* counters() const { return reinterpret_cast<Counter*>(base); }
    float* slot(int64_t parity, int64_t r) const {
        return reinterpret_cast<float*>(base + MAX_RANKS * sizeof(Counter)) + (parity * size + r) * capacity;
    }
};

Group g_group;
double g_seconds = 0.0;  // time inside shm_allreduce since the last reset (benchmarks: communication share)

double now() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

bool peer_alive(int64_t pid) { return pid <= 0 || kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH; }

// Wait until every peer's counter reaches `target`. False on a dead peer or the timeout.
bool wait_all(Group& G, int64_t target) {
    Counter* c = G.counters();
    for (int64_t r = 0; r < G.size; ++r) {
        if (r == G.rank) continue;
        int64_t spins = 0;
        double start = 0.0;
        while (c[r].seq.load(std::memory_order_acquire) < target) {
            _mm_pause();
            if (++spins < 4096) continue;
            sched_yield();
            if (spins % 1024 == 0) {
                if (start == 0.0) start = now();
                if (!peer_alive(c[r].pid) || now() - start > G.timeout_s) return false;
            }
        }
    }
    return true;
}

int reduce_piece(Group& G, float* data, int64_t n) {
    const int64_t s = ++G.seq;
    if (!wait_all(G, s - 1)) return 1;
    const int64_t parity = s & 1;
    std::memcpy(G.slot(parity, G.rank), data, n * sizeof(float));
    G.counters()[G.rank].seq.store(s, std::memory_order_release);
    if (!wait_all(G, s)) return 1;
    const float* first = G.slot(parity, 0);
    std::memcpy(data, first, n * sizeof(float));
    for (int64_t r = 1; r < G.size; ++r) {
        const float* src = G.slot(parity, r);
        int64_t i = 0;
#if defined(__AVX__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(data + i, _mm256_add_ps(_mm256_loadu_ps(data + i), _mm256_loadu_ps(src + i)));
#endif
        for (; i < n; ++i) data[i] += src[i];
    }
    return 0;
}

}  // namespace

extern "C" {

// Bytes the segment needs for `size` ranks of `capacity` floats per slot.
int64_t shm_allreduce_bytes(int64_t size, int64_t capacity) {
    return MAX_RANKS * static_cast<int64_t>(sizeof(Counter)) + 2 * size * capacity * static_cast<int64_t>(sizeof(float));
}

// Attach this process's group to a mapped segment (zeroed by its creator). Returns nonzero on bad arguments.
int shm_allreduce_init(void* base, int64_t rank, int64_t size, int64_t capacity, double timeout_s, int64_t pid) {
    if (base == nullptr || size < 1 || size > MAX_RANKS || rank < 0 || rank >= size || capacity < 1) return 1;
    g_group.base = static_cast<char*>(base);
    g_group.rank = rank;
    g_group.size = size;
    g_group.capacity = capacity;
    g_group.seq = 0;
    g_group.timeout_s = timeout_s;
    g_group.failed = false;
    g_group.counters()[rank].pid = pid;
    return 0;
}

// data[0, n) = the sum of every rank's data[0, n), in place. Nonzero: a peer died or timed out (then every later
// call fails too: the ranks are out of step).
int shm_allreduce(float* data, int64_t n) {
    if (g_group.failed) return 1;
    const double start = now();
    for (int64_t off = 0; off < n; off += g_group.capacity) {
        const int64_t piece = n - off < g_group.capacity ? n - off : g_group.capacity;
        if (reduce_piece(g_group, data + off, piece) != 0) {
            g_group.failed = true;
            return 1;
        }
    }
    g_seconds += now() - start;
    return 0;
}

// Seconds spent in shm_allreduce since the last call (resets the count).
double shm_allreduce_take_seconds() {
    const double s = g_seconds;
    g_seconds = 0.0;
    return s;
}

// The native decoder stack's callback (no return value): failures are read back with shm_allreduce_failed.
void shm_allreduce_void(float* data, int64_t n) { shm_allreduce(data, n); }

int shm_allreduce_failed() { return g_group.failed ? 1 : 0; }

}  // extern "C"
