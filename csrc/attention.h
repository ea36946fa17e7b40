/* attention.h — the blocked (online-softmax) attention kernel used by every attention op. */
#ifndef VLM_ATTENTION_H
#define VLM_ATTENTION_H

#include "common.h"

#define FA_KB 64   /* keys per block */
#define FA_QB 64   /* query rows per work item (callers' choice; R may be anything) */

/* Workspace floats for R query rows of head size D. */
size_t vlm_flash_workspace_floats(int R, int D);

/* Keys are passed transposed: kt[d][j] with row stride ldkt >= vlm_flash_kt_stride(n) (the padding
 * columns are read but never used). vlm_flash_transpose fills kt from K [n][D] (row stride ldk). */
int vlm_flash_kt_stride(int n);
void vlm_flash_transpose(float *kt, int ldkt, const float *K, int ldk, int n, int D);

/* out[r] (row stride ldo) = softmax_j(q[r]·K[j] · scale) · V[j] over keys j < lim[r] (lim
 * non-decreasing, lim[r] >= 1); q rows stride ldq, V rows stride ldv, head size D.
 * ws: vlm_flash_workspace_floats(R, D) floats. */
void vlm_flash_rows(float *out, int ldo, const float *q, int ldq, int R, const float *kt, int ldkt, const float *V,
                    int ldv, const int *lim, int D, float scale, float *ws);

#endif
