/* hfre.h — VLM-FO1's Hybrid Fine-grained Region Encoder (HFRE) and its MLP projectors.
 *
 * Input: the four DaViT stage maps (aux, channels-last [H_l][W_l][C_l], stride 4/8/16/32), the Qwen
 * ViT maps after the full-attention blocks ([gh][gw][D] each, raster patch order), and N boxes
 * x1,y1,x2,y2 in aux pixels (A) and Qwen pixels (Q). Output: one region vector per box,
 * [N][R] = [aux part (sum C_l) | vt part (4F with SimpleFP, n_vt*D without)] + bbox sine PE.
 *
 * RoIAlign is torchvision's (aligned=False, sampling_ratio=-1) followed by the mean over the S x S
 * bins. Both it and the bilinear upsampling (align_corners=False) of aux levels 1-3 are separable
 * linear maps, so each box becomes one weight vector over the rows and one over the columns of each
 * map (the upsampling folded in by its transpose): the 3840-channel upsampled aux map is never built
 * and the cost per box is (rows x cols x channels) of the box window on each map.
 * SimpleFP runs level by level through two ping-pong buffers (zero-padded channels-last maps so the
 * 3x3 conv is 9 accumulated GEMMs on shifted views); each level is pooled as soon as it exists.
 *
 * Ownership: vlm_hfre / vlm_mlp borrow every weight pointer (the Python object keeps the arrays
 * alive) and are read-only after set-up, so one can serve several threads; scratch is per call. */
#ifndef VLM_HFRE_H
#define VLM_HFRE_H

#include "common.h"
#include "gemm.h"
#include "pool.h"
#include "tensors.h"

#define VLM_HFRE_AUX_LEVELS 4
#define VLM_HFRE_MAX_VT 8
#define VLM_MLP_MAX_LAYERS 16
/* |box coordinate| limit: RoIAlign's sample count grows with the box size (torch would take hours) */
#define VLM_HFRE_MAX_COORD 1e7f

typedef struct { const float *w, *b; } vlm_hfre_ln;   /* LayerNorm affine [C] each; w == NULL: off */

/* One SimpleFP stage: [ct1 (LN GELU ct2) | maxpool] , 1x1 conv + LN, 3x3 conv + LN.
 * Transposed convs (k = s = 2) are GEMMs with n = 4*out, rows ordered (a, b, o) (a = row offset,
 * b = column offset), bias repeated 4 times; the 3x3 conv is [9*F][F]: tap (ky, kx) = rows
 * (3*ky + kx)*F .. +F. */
typedef struct {
    vlm_weight ct1, ct2;   /* ct1: stages 1, 2; ct2: stage 1 only (data NULL when absent) */
    vlm_hfre_ln ln0;       /* LN(D/2) between ct1 and ct2 (stage 1) */
    vlm_weight c1;         /* [F][C_in] */
    vlm_hfre_ln ln1;       /* [F] */
    vlm_weight c3;         /* [9F][F] */
    vlm_hfre_ln ln3;       /* [F] */
} vlm_fpn_stage;

typedef struct {
    int S;                 /* RoIAlign output size (mm_roi_output_size) */
    int R;                 /* region vector width (mm_region_hidden_size) */
    int use_aux;           /* 0 in vt-only mode */
    int use_vt;            /* the Qwen ViT branch */
    int simple_fpn;        /* SimpleFP on the last ViT map */
    int pe;                /* 0: none, 1: bbox PE from Q boxes (W_q = gw*patch), 2: from A boxes (W = 4*W0) */
    int aux_c[VLM_HFRE_AUX_LEVELS];  /* aux channels per level (256, 512, 1024, 2048) */
    int vt_c;              /* D, channels of a ViT map (1280) */
    int n_vt;              /* ViT maps pooled without SimpleFP (4); with SimpleFP only the last one is read */
    int fpn_c;             /* F, SimpleFP output channels (512) */
    int patch;             /* ViT patch size (14): spatial scale 1/patch, PE width gw*patch */
    vlm_compute compute;
} vlm_hfre_config;

typedef struct {
    vlm_hfre_config cfg;
    vlm_fpn_stage fpn[4];  /* strides 3.5, 7, 14, 28 */
    vlm_hfre_ln aux_ln, vt_ln;   /* optional region LayerNorms (eps 1e-5) */
} vlm_hfre;

/* Aux-part width, vt-part width. */
int vlm_hfre_aux_dim(const vlm_hfre *m);
int vlm_hfre_vt_dim(const vlm_hfre *m);
/* Fills m's weights from t (m->cfg set by the caller) and validates them. Tensor names (SimpleFP only with
 * use_vt && simple_fpn): fpn0.{ct1, ct2} and fpn1.ct1 (with _bias), fpn0.ln0_{w,b}, fpn{l}.{c1, c3},
 * fpn{l}.{ln1, ln3}_{w,b}; the optional region norms aux_ln_{w,b}, vt_ln_{w,b}. Nothing is allocated. */
vlm_status vlm_hfre_bind(vlm_hfre *m, const vlm_tensor_table *t, vlm_err *err);
vlm_status vlm_hfre_validate(const vlm_hfre *m, vlm_err *err);

/* aux_hw[l] = {H_l, W_l}; gh, gw: ViT patch grid (ignored without the vt branch). */
size_t vlm_hfre_scratch_size(const vlm_hfre *m, const int aux_hw[VLM_HFRE_AUX_LEVELS][2], int gh, int gw, int N,
                             int n_threads);
/* out[N][R]. aux[l]: [H_l][W_l][aux_c[l]]; vt[k]: [gh][gw][vt_c] for k < n_vt (with SimpleFP only
 * vt[n_vt-1] is read); boxes_a / boxes_q: [N][4] (either may be NULL when its branch is off). */
vlm_status vlm_hfre_forward(const vlm_hfre *m, vlm_pool *pool, const float *const aux[VLM_HFRE_AUX_LEVELS],
                            const int aux_hw[VLM_HFRE_AUX_LEVELS][2], const float *const vt[], int gh, int gw,
                            const float *boxes_a, const float *boxes_q, int N, float *out, void *scratch,
                            size_t scratch_size, vlm_err *err);

/* A projector: Linear, then (GELU, Linear) x (n_layers - 1); GELU is exact (erf). */
typedef struct {
    int n_layers;
    vlm_weight layers[VLM_MLP_MAX_LAYERS];   /* each with bias */
    vlm_compute compute;
    const char *name;                        /* tensor name prefix: layers are <name>.{i} with <name>.{i}_bias */
} vlm_mlp;

/* Fills p->layers from t (n_layers, compute and name set by the caller) and validates them. */
vlm_status vlm_mlp_bind(vlm_mlp *p, const vlm_tensor_table *t, vlm_err *err);
vlm_status vlm_mlp_validate(const vlm_mlp *p, vlm_err *err);
size_t vlm_mlp_scratch_size(const vlm_mlp *p, int64_t m, int n_threads);
/* out[m][layers[last].n] from x[m][layers[0].k] */
vlm_status vlm_mlp_forward(const vlm_mlp *p, vlm_pool *pool, float *out, const float *x, int64_t m, void *scratch,
                           size_t scratch_size, vlm_err *err);

#endif
