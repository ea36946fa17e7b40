/* cpu.c — run-time instruction-set detection (see cpu.h): the level every kernel family dispatches on. */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

static const char *const isa_names[] = {"generic", "avx2", "avx512", "avx512bf16"};
static int g_isa = -1;

static int detect_isa(void) {
    int level = VLM_ISA_GENERIC;
#if VLM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = VLM_ISA_AVX2;
    if (level == VLM_ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        level = VLM_ISA_AVX512;
    if (level == VLM_ISA_AVX512 && __builtin_cpu_supports("avx512bf16")) level = VLM_ISA_AVX512BF16;
#endif
    /* VLM_GEMM_ISA=generic|avx2|avx512 caps the level (testing the fallbacks on a big machine). */
    const char *cap = getenv("VLM_GEMM_ISA");
    if (cap) {
        for (int i = 0; i < 4; i++)
            if (strcmp(cap, isa_names[i]) == 0 && i < level) level = i;
    }
    return level;
}

int vlm_cpu_isa(void) {
    int v = __atomic_load_n(&g_isa, __ATOMIC_RELAXED);
    if (v < 0) {
        v = detect_isa();
        __atomic_store_n(&g_isa, v, __ATOMIC_RELAXED);
    }
    return v;
}

const char *vlm_isa_name(int level) { return level >= 0 && level < 4 ? isa_names[level] : "?"; }

int vlm_cpu_has_avx512(void) { return vlm_cpu_isa() >= VLM_ISA_AVX512; }

static int g_vnni = -1;

int vlm_cpu_has_vnni(void) {
    int v = __atomic_load_n(&g_vnni, __ATOMIC_RELAXED);
    if (v < 0) {
        v = 0;
#if VLM_X86
        __builtin_cpu_init();
        v = vlm_cpu_isa() >= VLM_ISA_AVX512 && __builtin_cpu_supports("avx512vnni");
#endif
        __atomic_store_n(&g_vnni, v, __ATOMIC_RELAXED);
    }
    return v;
}
