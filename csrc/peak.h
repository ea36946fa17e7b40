/* peak.h — peak probes: the measured rate of each instruction family the kernels use (fp32 FMA,
 * AVX512-BF16 vdpbf16ps, AVX512-VNNI vpdpbusd) and the DRAM read bandwidth, on n threads, so benchmarks
 * can report a kernel's achieved fraction of the machine's limit (see peak.c). Not ops: a probe starts
 * its own threads, runs ~0.3-0.6 s and the bandwidth probe allocates (and frees) its 1 GiB buffer. */
#ifndef VLM_PEAK_H
#define VLM_PEAK_H

typedef enum {
    VLM_PEAK_FMA32 = 0,   /* fp32 FMA at the widest width vlm_cpu_isa() allows, GFLOP/s (2 per lane) */
    VLM_PEAK_BF16DP,      /* vdpbf16ps zmm (AVX512-BF16), GFLOP/s: 2 per bf16 pair, 64 per instruction */
    VLM_PEAK_VNNI,        /* vpdpbusd zmm (AVX512-VNNI), GOP/s: 2 per u8 x s8 product, 128 per instruction */
    VLM_PEAK_BANDWIDTH,   /* streaming read of 1 GiB (far above any last-level cache), GB/s (1e9 bytes) */
    VLM_PEAK_N
} vlm_peak_family;

/* "fma32", "bf16dp", "vnni", "bandwidth"; NULL for an unknown family. */
const char *vlm_peak_name(int family);
/* The family of that name, or -1. */
int vlm_peak_family_from_name(const char *name);
/* 1 if this CPU (within the VLM_GEMM_ISA cap of vlm_cpu_isa(), cpu.h) has the family's instructions. */
int vlm_peak_available(int family);
/* The measured rate of the family with n_threads threads running at once (the calling thread is one of
 * them; n_threads is clamped to [1, 256]): 0 when the CPU lacks the family or the family is unknown,
 * -1 when the probe cannot allocate its buffer (bandwidth) or its thread bookkeeping. */
double vlm_measure_peak(int family, int n_threads);
/* vlm_measure_peak(VLM_PEAK_FMA32, n_threads) (0 instead of -1): measured peak fp32 FMA rate in GFLOP/s (~0.4 s). */
double vlm_measure_fma_peak(int n_threads);

#endif
