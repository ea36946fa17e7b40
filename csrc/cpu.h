/* cpu.h — the one place for CPU feature detection and the function attributes that compile code for one
 * instruction set (x86-64 with GCC/Clang; elsewhere everything falls back to plain C).
 *
 * vlm_cpu_isa() is the instruction-set level every kernel family dispatches on (GEMM, attention, GELU),
 * detected once; the environment variable VLM_GEMM_ISA=generic|avx2|avx512 caps it (read at the first
 * call), which is how the tests run the portable kernels on a big machine. VLM_CLONES functions are
 * plain C compiled three times and picked by the loader; they follow the CPU, not the cap. */
#ifndef VLM_CPU_H
#define VLM_CPU_H

#if defined(__x86_64__) && defined(__GNUC__)
#define VLM_X86 1
#else
#define VLM_X86 0
#endif

/* Levels, each implying the ones below it. */
enum { VLM_ISA_GENERIC = 0, VLM_ISA_AVX2 = 1, VLM_ISA_AVX512 = 2, VLM_ISA_AVX512BF16 = 3 };

/* AVX2+FMA; AVX-512 F/BW/VL/DQ; and AVX512-BF16, detected once and capped by VLM_GEMM_ISA. */
int vlm_cpu_isa(void);
/* "generic", "avx2", "avx512", "avx512bf16" */
const char *vlm_isa_name(int level);
/* vlm_cpu_isa() >= VLM_ISA_AVX512 */
int vlm_cpu_has_avx512(void);
/* AVX512-VNNI (vpdpbusd): vlm_cpu_isa() >= VLM_ISA_AVX512 (so the VLM_GEMM_ISA cap applies) and the CPU has it. */
int vlm_cpu_has_vnni(void);

/* Target attributes: one name per instruction-set level. */
#if VLM_X86
#define VLM_TGT_AVX2 __attribute__((target("avx2,fma")))
#define VLM_TGT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define VLM_TGT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#define VLM_TGT_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#else
#define VLM_TGT_AVX2
#define VLM_TGT_AVX512
#define VLM_TGT_AVX512BF16
#define VLM_TGT_AVX512VNNI
#endif
#define VLM_INLINE __attribute__((always_inline))

/* Plain C hot loops: compiled for AVX-512, AVX2 and baseline x86-64, one picked at load time (GCC). */
#if VLM_X86 && !defined(__clang__) && !defined(VLM_NO_CLONES)
#define VLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VLM_CLONES
#endif

/* Float expressions that must round like a reference's step-by-step float32 code (no FMA contraction). */
#if defined(__GNUC__) && !defined(__clang__)
#define VLM_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define VLM_NO_CONTRACT
#endif

#endif
