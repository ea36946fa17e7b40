/* gemm_pack.h — what the two packed matmul paths share (gemm.c's bf16 bp_*, gemm_i8.c's int8 / int4 qp_*): the
 * register-tile geometry, the row blocking of the packed activations, and the weight packer. Internal to those two
 * files.
 *
 * Both paths see their operands as 32-bit groups along k (two bf16, or four int8 bytes): a weight panel is
 * [groups of 16][16][VLM_PACK_NC] uint32, 16 x 16 transposes of 64-byte row segments. */
#ifndef VLM_GEMM_PACK_H
#define VLM_GEMM_PACK_H

#include <stddef.h>
#include <stdint.h>

#include "simd.h"

#define VLM_PACK_MR 14   /* activation rows per register tile (14 x 2 accumulators + 2 weight vectors + 1 broadcast) */
#define VLM_PACK_NC 32   /* weight columns per panel: two 16-lane vectors */
/* Bytes of packed activations per row block: the rows every weight panel of a thread meets while they stay in L3
 * (chosen among 1.5 MB, 3 MB and no blocking on 2 Zen 4 cores with the ViT's 3888-row matmuls, which an unblocked
 * sweep slowed; the int8 path measured the same). */
#define VLM_PACK_XBLOCK_BYTES ((size_t)3 << 20)
/* Weight packing prefetches this many 64-byte groups ahead in each of its rows (the weights come from DRAM). */
#define VLM_PACK_PF_GROUPS 8

/* Rows per row block for m rows packed into panels of panel_bytes each: blocks of near-equal size (whole panels),
 * each at most VLM_PACK_XBLOCK_BYTES (a 512-row matmul is not cut into 420 + 92 rows, the last block paying a whole
 * weight packing for 92 rows). */
static inline long vlm_pack_row_block(long m, size_t panel_bytes) {
    long panels = (m + VLM_PACK_MR - 1) / VLM_PACK_MR, per = (long)(VLM_PACK_XBLOCK_BYTES / panel_bytes);
    if (per < 1) per = 1;
    long blocks = (panels + per - 1) / per;
    return (panels + blocks - 1) / blocks * VLM_PACK_MR;
}

#if VLM_X86
/* Weight rows j0..j0+nc (nc <= VLM_PACK_NC, row stride ld bytes), bytes [b0, b0 + nbytes) of each, as `groups`
 * 64-byte groups -> dst [groups * 16][VLM_PACK_NC] uint32 (missing columns and the bytes past nbytes zero). */
static inline VLM_TGT_AVX512 void vlm_pack_w(const uint8_t *w, size_t ld, long j0, int nc, size_t b0, long nbytes,
                                             long groups, uint32_t *dst) {
    for (long g = 0; g < groups; g++) {
        const long t = 64 * g, rem = nbytes - t;
        const __mmask64 mk = rem >= 64 ? ~(__mmask64)0 : rem > 0 ? (__mmask64)((1ULL << rem) - 1) : 0;
        for (int h = 0; h < VLM_PACK_NC / 16; h++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                const int col = 16 * h + i;
                const uint8_t *row = w + (size_t)(j0 + col) * ld + b0 + t;
                if (col < nc && rem > 64 * VLM_PACK_PF_GROUPS) /* 32 row streams from DRAM: fetch ahead */
                    _mm_prefetch((const char *)(row + 64 * VLM_PACK_PF_GROUPS), _MM_HINT_T0);
                r[i] = col < nc ? _mm512_maskz_loadu_epi8(mk, row) : _mm512_setzero_si512();
            }
            vlm_transpose16_epi32(r);
            for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(dst + (16 * g + p) * VLM_PACK_NC + 16 * h), r[p]);
        }
    }
}
#endif

#endif
