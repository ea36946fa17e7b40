/* fo1.h — VLM-FO1's vision side in one call: ViT -> mm_projector, DaViT -> HFRE -> mm_projector_aux, with the
 * image rows and region rows written straight into the caller's prefill embedding buffer.
 *
 * Thread safety (whisper.cpp's context/state split): a vlm_fo1_model is read-only after setup and may be
 * shared by any number of threads; a vlm_fo1_state (thread pool + one arena) serves one thread at a time.
 *
 *   vlm_fo1_model m = {&vit, &davit, &hfre, &proj_image, &proj_aux};   // networks bound elsewhere
 *   vlm_fo1_limits lim = {gh, gw, aux_h, aux_w, 100};                  // the largest request expected
 *   vlm_fo1_state *s; vlm_fo1_state_create(&m, &lim, n_threads, &s, &err);
 *   vlm_fo1_encode(&m, s, &in, n_threads, emb, hidden, image_row, region_rows, NULL, &err);   // per request
 *   vlm_fo1_state_free(s);
 *
 * The arena holds every intermediate of a request (ViT merger output and full-attention maps, the four DaViT
 * maps, the region vectors, the aux projector output) plus one scratch block shared by the networks in turn
 * (each network's scratch is dead when the next one runs). It is sized at creation for the limits and only
 * grows if a request needs more (the workspace's n_allocs counts its allocations). Results are bit-identical to
 * the per-network calls (vlm_vit_forward, vlm_mlp_forward, ...) with a pool of the same size. The decoder is
 * not part of the model: its state (the KV cache) is sized by context length, not by the image, outlives an
 * encode (prefix snapshots, conversations) and consumes the buffer this call fills. */
#ifndef VLM_FO1_H
#define VLM_FO1_H

#include "common.h"
#include "davit.h"
#include "hfre.h"
#include "qwen_vit.h"
#include "workspace.h"

typedef struct {
    const vlm_vit *vit;
    const vlm_davit *davit;        /* may be NULL when the HFRE has no aux branch */
    const vlm_hfre *hfre;
    const vlm_mlp *proj_image;     /* NULL: identity (vit out_hidden == hidden) */
    const vlm_mlp *proj_aux;       /* NULL: identity (R == hidden) */
} vlm_fo1_model;

typedef struct {
    int gh, gw;                    /* ViT patch grid */
    int aux_h, aux_w;              /* DaViT input size */
    int n_boxes;
} vlm_fo1_limits;

/* One request's inputs. With n_boxes == 0 the aux side is skipped (aux_pixels and boxes may be NULL). */
typedef struct {
    const float *vit_pixels;       /* [gh*gw][in_dim], 2x2 merge-block order */
    int gh, gw;
    const float *aux_pixels;       /* [3][aux_h][aux_w] */
    int aux_h, aux_w;
    const float *boxes_a;          /* [n_boxes][4] in aux pixels */
    const float *boxes_q;          /* [n_boxes][4] in ViT-input pixels */
    int n_boxes;
} vlm_fo1_input;

/* A state is a workspace (workspace.h: one pool, one 64-byte-aligned block that only grows) used as the
 * arena of the requests: create it reserved for the largest request expected. */
typedef vlm_workspace vlm_fo1_state;

/* Checks that the networks fit together; VLM_ERR_SHAPE / VLM_ERR_ARG naming the mismatch otherwise. With
 * n_boxes == 0 only the image side (ViT, mm_projector) is checked, as only it runs. */
vlm_status vlm_fo1_validate(const vlm_fo1_model *m, int hidden, int n_boxes, vlm_err *err);

/* A state with an n_threads pool and an arena sized for `lim` (NULL: empty until the first request). */
vlm_status vlm_fo1_state_create(const vlm_fo1_model *m, const vlm_fo1_limits *lim, int n_threads,
                                vlm_fo1_state **out, vlm_err *err);
void vlm_fo1_state_free(vlm_fo1_state *s);   /* NULL-safe */

/* Bytes of arena a request of these sizes needs (0 if the sizes are invalid). */
size_t vlm_fo1_arena_size(const vlm_fo1_model *m, const vlm_fo1_limits *lim, int n_threads);

/* What one encode did per stage (0: ViT + mm_projector, 1: DaViT, 2: HFRE + mm_projector_aux): wall seconds and
 * the work counters of pool.h (FLOPs by kind). A stage not reached reads 0. */
typedef struct {
    double seconds[3];
    uint64_t flops[3][VLM_FLOPS_KINDS];
} vlm_fo1_stats;

/* Encode one image and its boxes. emb: [*][hidden]; rows image_row ..
 * image_row + gh*gw/4 - 1 receive the projected image tokens (raster merged order), row region_rows[i] the
 * projected region i. Other rows are not touched. n_threads != the state's pool size restarts the pool.
 * stats (NULL or one vlm_fo1_stats) receives each stage's wall time and FLOPs.
 * Non-finite intermediates (bad weights) fail with VLM_ERR_ARG, as the per-network path's checks do. */
vlm_status vlm_fo1_encode(const vlm_fo1_model *m, vlm_fo1_state *s, const vlm_fo1_input *in, int n_threads, float *emb,
                          int hidden, int64_t image_row, const int64_t *region_rows, vlm_fo1_stats *stats, vlm_err *err);

#endif
