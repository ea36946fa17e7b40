/* peak.c — peak probes (see peak.h): how fast this CPU runs each instruction family the kernels use, and
 * how fast it streams memory, measured in the same process as a benchmark so its results can be given as
 * fractions of the machine's limit.
 *
 * Compute probes: every thread runs a loop of independent accumulator chains (enough of them to cover the
 * instruction's latency times the number of issue ports, with distinct initial values so the compiler
 * cannot merge them) for ~0.3 s; the iteration count is calibrated on the calling thread first. The rate is
 * all threads' operations over the span from the first thread's start to the last one's end.
 *   fma32  : 12 chains of vfmadd (zmm, or ymm when vlm_cpu_isa() is AVX2; plain C below that).
 *   bf16dp : 16 chains of vdpbf16ps zmm; 16 lanes x 2 bf16 pairs x 2 = 64 FLOP per instruction.
 *   vnni   : 16 chains of vpdpbusd zmm; 16 lanes x 4 u8*s8 products x 2 = 128 int ops per instruction.
 * A family the CPU lacks (or that VLM_GEMM_ISA caps away) measures 0 and runs nothing.
 * Bandwidth probe: a 1 GiB buffer (MADV_HUGEPAGE, as a weight arena would ask for) is split into one
 * contiguous slice per thread, first touched by that thread, then read BW_PASSES times with wide loads into
 * 8 running sums; the passes start together (barrier) and the best pass counts: bytes / (last end - first
 * start). This is the bound decode (every weight read once per token) runs against.
 * No AMX probe yet (tdpbf16ps / tdpbssd need a machine with AMX to be written and checked on). */
#include "peak.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "cpu.h"
#if VLM_X86
#include <immintrin.h>
#endif

#define MAX_THREADS 256
#define RUN_SECONDS 0.3
#define BW_BYTES ((size_t)1 << 30)
#define BW_PASSES 5

static const char *const family_names[VLM_PEAK_N] = {"fma32", "bf16dp", "vnni", "bandwidth"};

const char *vlm_peak_name(int family) {
    return family >= 0 && family < VLM_PEAK_N ? family_names[family] : NULL;
}

int vlm_peak_family_from_name(const char *name) {
    for (int i = 0; name && i < VLM_PEAK_N; i++)
        if (strcmp(name, family_names[i]) == 0) return i;
    return -1;
}

int vlm_peak_available(int family) {
    switch (family) {
    case VLM_PEAK_FMA32:
    case VLM_PEAK_BANDWIDTH: return 1;
    case VLM_PEAK_BF16DP: return vlm_cpu_isa() >= VLM_ISA_AVX512BF16;
    case VLM_PEAK_VNNI: return vlm_cpu_has_vnni();
    default: return 0;
    }
}

static double now_sec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------------ */
/* compute loops: each returns a value depending on every chain (kept in a volatile by the caller)  */

#if VLM_X86
static VLM_TGT_AVX512 float fma_loop_512(long iters, float seed) {
    const __m512 mul = _mm512_set1_ps(0.999999f), add = _mm512_set1_ps(1e-6f);
    __m512 a0 = _mm512_set1_ps(seed), a1 = _mm512_set1_ps(seed + 1), a2 = _mm512_set1_ps(seed + 2),
           a3 = _mm512_set1_ps(seed + 3), a4 = _mm512_set1_ps(seed + 4), a5 = _mm512_set1_ps(seed + 5),
           a6 = _mm512_set1_ps(seed + 6), a7 = _mm512_set1_ps(seed + 7), a8 = _mm512_set1_ps(seed + 8),
           a9 = _mm512_set1_ps(seed + 9), a10 = _mm512_set1_ps(seed + 10), a11 = _mm512_set1_ps(seed + 11);
    for (long i = 0; i < iters; i++) {
        a0 = _mm512_fmadd_ps(a0, mul, add); a1 = _mm512_fmadd_ps(a1, mul, add);
        a2 = _mm512_fmadd_ps(a2, mul, add); a3 = _mm512_fmadd_ps(a3, mul, add);
        a4 = _mm512_fmadd_ps(a4, mul, add); a5 = _mm512_fmadd_ps(a5, mul, add);
        a6 = _mm512_fmadd_ps(a6, mul, add); a7 = _mm512_fmadd_ps(a7, mul, add);
        a8 = _mm512_fmadd_ps(a8, mul, add); a9 = _mm512_fmadd_ps(a9, mul, add);
        a10 = _mm512_fmadd_ps(a10, mul, add); a11 = _mm512_fmadd_ps(a11, mul, add);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return _mm512_reduce_add_ps(s);
}

static VLM_TGT_AVX2 float fma_loop_avx2(long iters, float seed) {
    const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-6f);
    __m256 a0 = _mm256_set1_ps(seed), a1 = _mm256_set1_ps(seed + 1), a2 = _mm256_set1_ps(seed + 2),
           a3 = _mm256_set1_ps(seed + 3), a4 = _mm256_set1_ps(seed + 4), a5 = _mm256_set1_ps(seed + 5),
           a6 = _mm256_set1_ps(seed + 6), a7 = _mm256_set1_ps(seed + 7), a8 = _mm256_set1_ps(seed + 8),
           a9 = _mm256_set1_ps(seed + 9), a10 = _mm256_set1_ps(seed + 10), a11 = _mm256_set1_ps(seed + 11);
    for (long i = 0; i < iters; i++) {
        a0 = _mm256_fmadd_ps(a0, mul, add); a1 = _mm256_fmadd_ps(a1, mul, add);
        a2 = _mm256_fmadd_ps(a2, mul, add); a3 = _mm256_fmadd_ps(a3, mul, add);
        a4 = _mm256_fmadd_ps(a4, mul, add); a5 = _mm256_fmadd_ps(a5, mul, add);
        a6 = _mm256_fmadd_ps(a6, mul, add); a7 = _mm256_fmadd_ps(a7, mul, add);
        a8 = _mm256_fmadd_ps(a8, mul, add); a9 = _mm256_fmadd_ps(a9, mul, add);
        a10 = _mm256_fmadd_ps(a10, mul, add); a11 = _mm256_fmadd_ps(a11, mul, add);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float b[8];
    _mm256_storeu_ps(b, s);
    return b[0] + b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + b[7];
}

/* Independent chains of the dot-product loops: 16 (vdpbf16ps / vpdpbusd latency 4-6 cycles, 1-2 zmm per
 * cycle on current cores; 32 zmm registers hold them plus the operands; 8, 12 and 16 measure the same on
 * Zen 4). Named variables, as in the FMA loops, so they stay in registers in every build (-O1 with
 * sanitizers too, where an array of vectors lives in instrumented memory). */
#define DP_ACC 16
#define DP_REP(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

/* acc += a.even*b.even + a.odd*b.odd per fp32 lane; a = b = 2^-6 (exact in bf16), so the chains grow slowly
 * and stay normal numbers. */
static VLM_TGT_AVX512BF16 float bf16dp_loop(long iters, float seed) {
    const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.015625f), _mm512_set1_ps(0.015625f));
#define BF_INIT(j) __m512 c##j = _mm512_set1_ps(seed + (float)(j));
#define BF_STEP(j) c##j = _mm512_dpbf16_ps(c##j, a, a);
#define BF_SUM(j) s = _mm512_add_ps(s, c##j);
    DP_REP(BF_INIT)
    for (long i = 0; i < iters; i++) {
        DP_REP(BF_STEP)
    }
    __m512 s = _mm512_setzero_ps();
    DP_REP(BF_SUM)
    return _mm512_reduce_add_ps(s);
}

/* acc += sum of 4 u8 x s8 products per int32 lane (wraps, no saturation: vpdpbusd, not vpdpbusds). */
static VLM_TGT_AVX512VNNI float vnni_loop(long iters, float seed) {
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
#define VN_INIT(j) __m512i c##j = _mm512_set1_epi32((int)seed + (j));
#define VN_STEP(j) c##j = _mm512_dpbusd_epi32(c##j, a, b);
#define VN_SUM(j) s = _mm512_add_epi32(s, c##j);
    DP_REP(VN_INIT)
    for (long i = 0; i < iters; i++) {
        DP_REP(VN_STEP)
    }
    __m512i s = _mm512_setzero_si512();
    DP_REP(VN_SUM)
    uint32_t lanes[16], t = 0; /* unsigned sum: the chains wrap (_mm512_reduce_add_epi32 would be signed overflow) */
    _mm512_storeu_si512((void *)lanes, s);
    for (int j = 0; j < 16; j++) t += lanes[j];
    return (float)t;
}
#endif

static float fma_loop_generic(long iters, float seed) {
    float a[8];
    for (int j = 0; j < 8; j++) a[j] = seed + (float)j;
    for (long i = 0; i < iters; i++)
        for (int j = 0; j < 8; j++) a[j] = a[j] * 0.999999f + 1e-6f;
    float s = 0;
    for (int j = 0; j < 8; j++) s += a[j];
    return s;
}

typedef float (*loop_fn)(long iters, float seed);

/* The loop of a compute family at this CPU's level and its operations per iteration; NULL if absent. */
static loop_fn compute_loop(int family, double *ops_per_iter) {
    const int level = vlm_cpu_isa();
    (void)level;
    switch (family) {
    case VLM_PEAK_FMA32:
#if VLM_X86
        if (level >= VLM_ISA_AVX512) { *ops_per_iter = 12.0 * 16 * 2; return fma_loop_512; }
        if (level == VLM_ISA_AVX2) { *ops_per_iter = 12.0 * 8 * 2; return fma_loop_avx2; }
#endif
        *ops_per_iter = 8.0 * 2;
        return fma_loop_generic;
#if VLM_X86
    case VLM_PEAK_BF16DP:
        if (!vlm_peak_available(family)) return NULL;
        *ops_per_iter = DP_ACC * 64.0;
        return bf16dp_loop;
    case VLM_PEAK_VNNI:
        if (!vlm_peak_available(family)) return NULL;
        *ops_per_iter = DP_ACC * 128.0;
        return vnni_loop;
#endif
    default: return NULL;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* memory read loops: sum of every 64-bit word (wrapping), len a multiple of 512 bytes, p 64-aligned */

#if VLM_X86
static VLM_TGT_AVX512 uint64_t read_512(const char *p, size_t len) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (size_t i = 0; i < len; i += 512) {
        const __m512i *q = (const __m512i *)(p + i);
        s0 = _mm512_add_epi64(s0, _mm512_load_si512(q + 0));
        s1 = _mm512_add_epi64(s1, _mm512_load_si512(q + 1));
        s2 = _mm512_add_epi64(s2, _mm512_load_si512(q + 2));
        s3 = _mm512_add_epi64(s3, _mm512_load_si512(q + 3));
        s4 = _mm512_add_epi64(s4, _mm512_load_si512(q + 4));
        s5 = _mm512_add_epi64(s5, _mm512_load_si512(q + 5));
        s6 = _mm512_add_epi64(s6, _mm512_load_si512(q + 6));
        s7 = _mm512_add_epi64(s7, _mm512_load_si512(q + 7));
    }
    __m512i s = _mm512_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)),
                                 _mm512_add_epi64(_mm512_add_epi64(s4, s5), _mm512_add_epi64(s6, s7)));
    uint64_t b[8]; /* unsigned sum (_mm512_reduce_add_epi64 adds signed) */
    _mm512_storeu_si512((void *)b, s);
    return b[0] + b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + b[7];
}

static VLM_TGT_AVX2 uint64_t read_avx2(const char *p, size_t len) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (size_t i = 0; i < len; i += 256) {
        const __m256i *q = (const __m256i *)(p + i);
        s0 = _mm256_add_epi64(s0, _mm256_load_si256(q + 0));
        s1 = _mm256_add_epi64(s1, _mm256_load_si256(q + 1));
        s2 = _mm256_add_epi64(s2, _mm256_load_si256(q + 2));
        s3 = _mm256_add_epi64(s3, _mm256_load_si256(q + 3));
        s4 = _mm256_add_epi64(s4, _mm256_load_si256(q + 4));
        s5 = _mm256_add_epi64(s5, _mm256_load_si256(q + 5));
        s6 = _mm256_add_epi64(s6, _mm256_load_si256(q + 6));
        s7 = _mm256_add_epi64(s7, _mm256_load_si256(q + 7));
    }
    __m256i s = _mm256_add_epi64(_mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)),
                                 _mm256_add_epi64(_mm256_add_epi64(s4, s5), _mm256_add_epi64(s6, s7)));
    uint64_t b[4];
    _mm256_storeu_si256((__m256i *)b, s);
    return b[0] + b[1] + b[2] + b[3];
}
#endif

static uint64_t read_generic(const char *p, size_t len) {
    uint64_t s[8] = {0};
    const uint64_t *q = (const uint64_t *)p;
    for (size_t i = 0; i < len / 8; i += 8)
        for (int j = 0; j < 8; j++) s[j] += q[i + j];
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

static uint64_t read_run(int level, const char *p, size_t len) {
#if VLM_X86
    if (level >= VLM_ISA_AVX512) return read_512(p, len);
    if (level == VLM_ISA_AVX2) return read_avx2(p, len);
#endif
    return read_generic(p, len);
}

/* ------------------------------------------------------------------------------------------------ */
/* threads                                                                                          */

typedef struct {
    const int *go;
    /* compute probes */
    loop_fn fn;
    long iters;
    double t0, t1;
    volatile float sink;
    /* bandwidth probe */
    int level;
    char *p;
    size_t len;
    pthread_barrier_t *bar;
    double bt0[BW_PASSES], bt1[BW_PASSES];
    volatile uint64_t bsink;
} probe_arg;

static void *compute_thread(void *p) {
    probe_arg *a = (probe_arg *)p;
    while (!__atomic_load_n(a->go, __ATOMIC_ACQUIRE)) sched_yield();
    a->t0 = now_sec();
    a->sink = a->fn(a->iters, 1.0f);
    a->t1 = now_sec();
    return NULL;
}

static void *bandwidth_thread(void *p) {
    probe_arg *a = (probe_arg *)p;
    while (!__atomic_load_n(a->go, __ATOMIC_ACQUIRE)) sched_yield();
    memset(a->p, 1, a->len); /* first touch by the thread that reads the slice */
    for (int r = 0; r < BW_PASSES; r++) {
        pthread_barrier_wait(a->bar);
        a->bt0[r] = now_sec();
        a->bsink = read_run(a->level, a->p, a->len);
        a->bt1[r] = now_sec();
    }
    return NULL;
}

/* Runs fn(args[i]) on n threads (the caller is thread 0) once all are started; bar (if non-NULL) is
 * initialised for the number of threads that did start. Returns that number. */
static int run_threads(void *(*fn)(void *), probe_arg *args, int n, pthread_barrier_t *bar) {
    pthread_t th[MAX_THREADS];
    int go = 0, started = 1;
    for (int i = 0; i < n; i++) args[i].go = &go;
    for (int i = 1; i < n; i++) {
        if (pthread_create(&th[i], NULL, fn, &args[i]) != 0) break;
        started++;
    }
    if (bar) pthread_barrier_init(bar, NULL, (unsigned)started);
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
    fn(&args[0]);
    for (int i = 1; i < started; i++) pthread_join(th[i], NULL);
    if (bar) pthread_barrier_destroy(bar);
    return started;
}

static double compute_peak(loop_fn fn, double ops_per_iter, int n_threads) {
    /* calibrate on this thread: aim at RUN_SECONDS for the real run */
    long iters = 1 << 16;
    volatile float sink;
    double dt;
    for (;;) {
        double t0 = now_sec();
        sink = fn(iters, 2.0f);
        dt = now_sec() - t0;
        if (dt > 0.03 || iters > (1L << 40)) break;
        iters *= 4;
    }
    (void)sink;
    iters = (long)((double)iters * RUN_SECONDS / dt) + 1;

    probe_arg *args = calloc((size_t)n_threads, sizeof *args);
    if (!args) return -1.0;
    for (int i = 0; i < n_threads; i++) {
        args[i].fn = fn;
        args[i].iters = iters;
    }
    n_threads = run_threads(compute_thread, args, n_threads, NULL);
    double t0 = args[0].t0, t1 = args[0].t1;
    for (int i = 1; i < n_threads; i++) {
        if (args[i].t0 < t0) t0 = args[i].t0;
        if (args[i].t1 > t1) t1 = args[i].t1;
    }
    free(args);
    return t1 > t0 ? ops_per_iter * (double)iters * n_threads / (t1 - t0) * 1e-9 : 0.0;
}

static double bandwidth_peak(int n_threads) {
    const size_t huge = (size_t)2 << 20, map_bytes = BW_BYTES + huge;
    char *map = mmap(NULL, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return -1.0;
    char *buf = map + (huge - (uintptr_t)map % huge) % huge;
#ifdef MADV_HUGEPAGE
    madvise(buf, BW_BYTES, MADV_HUGEPAGE); /* best effort: +~10% where transparent huge pages are "madvise" */
#endif
    probe_arg *args = calloc((size_t)n_threads, sizeof *args);
    if (!args) {
        munmap(map, map_bytes);
        return -1.0;
    }
    /* equal slices, multiples of 2 MiB (huge pages) when the buffer allows it, else of 4 KiB */
    const size_t quantum = BW_BYTES / (size_t)n_threads >= huge ? huge : 4096;
    const size_t slice = BW_BYTES / (size_t)n_threads / quantum * quantum;
    const int level = vlm_cpu_isa();
    for (int i = 0; i < n_threads; i++) {
        args[i].level = level;
        args[i].p = buf + (size_t)i * slice;
        args[i].len = slice;
    }
    pthread_barrier_t bar;
    for (int i = 0; i < n_threads; i++) args[i].bar = &bar;
    int started = run_threads(bandwidth_thread, args, n_threads, &bar);
    double best = 0.0;
    for (int r = 0; r < BW_PASSES; r++) {
        double t0 = args[0].bt0[r], t1 = args[0].bt1[r];
        for (int i = 1; i < started; i++) {
            if (args[i].bt0[r] < t0) t0 = args[i].bt0[r];
            if (args[i].bt1[r] > t1) t1 = args[i].bt1[r];
        }
        if (t1 > t0) {
            double gbs = (double)slice * started / (t1 - t0) * 1e-9;
            if (gbs > best) best = gbs;
        }
    }
    free(args);
    munmap(map, map_bytes);
    return best;
}

double vlm_measure_peak(int family, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (family == VLM_PEAK_BANDWIDTH) return bandwidth_peak(n_threads);
    double ops_per_iter = 0;
    loop_fn fn = compute_loop(family, &ops_per_iter);
    return fn ? compute_peak(fn, ops_per_iter, n_threads) : 0.0;
}

double vlm_measure_fma_peak(int n_threads) {
    double r = vlm_measure_peak(VLM_PEAK_FMA32, n_threads);
    return r > 0 ? r : 0.0; /* 0 as before when the thread bookkeeping cannot be allocated */
}
