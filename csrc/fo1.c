/* fo1.c — VLM-FO1's vision side as one flat pass (see fo1.h): ViT, mm_projector into the image rows of the
 * embedding buffer; DaViT, HFRE, mm_projector_aux into the region rows. Every intermediate lives in the state's
 * arena, carved per request by the same function that sizes it; the networks share one scratch block. */
#include "fo1.h"
#include "arena.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    float *tokens;                     /* [U][vit out_hidden]  ViT merger output (mm_projector input) */
    float *feats;                      /* [n_full][gh*gw][D]   hidden states after the full-attention blocks */
    float *aux[VLM_DAVIT_STAGES];      /* [H_s][W_s][C_s]      DaViT stage maps */
    float *regions;                    /* [N][R]               region vectors (mm_projector_aux input) */
    float *proj;                       /* [N][hidden]          projected regions, before the row scatter */
    void *scratch;                     /* the running network's scratch */
    size_t scratch_size;
} fo1_arena;

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

static int use_davit(const vlm_fo1_model *m) { return m->hfre->cfg.use_aux; }

/* Lays a request's arena out (a sizing pass when base is NULL); returns its bytes. Sizes must be valid
 * (vlm_fo1_encode checks them first). hidden: the embedding width. */
static size_t carve(fo1_arena *A, const vlm_fo1_model *m, const vlm_fo1_limits *L, int hidden, int nth, char *base) {
    const vlm_vit_config *vc = &m->vit->cfg;
    const size_t N = (size_t)L->gh * L->gw, U = N / 4;
    vlm_arena a = {base, 0};
    VLM_ARENA_TAKE(&a, A->tokens, U * vc->out_hidden);
    VLM_ARENA_TAKE(&a, A->feats, (size_t)vlm_vit_n_full(m->vit) * N * vc->hidden);
    size_t ss = vlm_vit_scratch_size(m->vit, L->gh, L->gw, nth);
    if (m->proj_image) ss = max_sz(ss, vlm_mlp_scratch_size(m->proj_image, (int64_t)U, nth));
    memset(A->aux, 0, sizeof A->aux);
    A->regions = A->proj = NULL;
    if (L->n_boxes > 0) {
        int aux_hw[VLM_HFRE_AUX_LEVELS][2] = {{0}};
        if (use_davit(m)) {
            int hs[VLM_DAVIT_STAGES], ws[VLM_DAVIT_STAGES];
            vlm_davit_stage_sizes(m->davit, L->aux_h, L->aux_w, hs, ws, NULL);
            for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
                VLM_ARENA_TAKE(&a, A->aux[s], (size_t)hs[s] * ws[s] * m->davit->cfg.dim[s]);
                aux_hw[s][0] = hs[s];
                aux_hw[s][1] = ws[s];
            }
            ss = max_sz(ss, vlm_davit_scratch_size(m->davit, L->aux_h, L->aux_w, nth));
        }
        VLM_ARENA_TAKE(&a, A->regions, (size_t)L->n_boxes * m->hfre->cfg.R);
        VLM_ARENA_TAKE(&a, A->proj, (size_t)L->n_boxes * hidden);
        ss = max_sz(ss, vlm_hfre_scratch_size(m->hfre, (const int(*)[2])aux_hw, L->gh, L->gw, L->n_boxes, nth));
        if (m->proj_aux) ss = max_sz(ss, vlm_mlp_scratch_size(m->proj_aux, L->n_boxes, nth));
    }
    A->scratch = vlm_arena_take(&a, ss);
    A->scratch_size = ss;
    return a.off;
}

/* The widths every stage hands the next, as the per-network path checks them. */
vlm_status vlm_fo1_validate(const vlm_fo1_model *m, int hidden, int n_boxes, vlm_err *err) {
    if (!m->vit || !m->hfre) return vlm_fail(err, VLM_ERR_ARG, "fo1: the ViT and the HFRE are required");
    const int out = m->vit->cfg.out_hidden;
    if (m->proj_image ? (m->proj_image->layers[0].k != out ||
                         m->proj_image->layers[m->proj_image->n_layers - 1].n != hidden)
                      : out != hidden)
        return vlm_fail(err, VLM_ERR_SHAPE, "fo1: mm_projector does not map the ViT's %d features to %d", out, hidden);
    if (n_boxes <= 0) return VLM_OK;
    const vlm_hfre_config *c = &m->hfre->cfg;
    if (c->use_aux) {
        if (!m->davit) return vlm_fail(err, VLM_ERR_ARG, "fo1: the region encoder needs the DaViT maps");
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++)
            if (m->davit->cfg.dim[l] != c->aux_c[l])
                return vlm_fail(err, VLM_ERR_SHAPE, "aux map %d must be [H, W, %d] channels-last, got %d channels", l,
                                c->aux_c[l], m->davit->cfg.dim[l]);
    }
    if (c->use_vt) {
        if (vlm_vit_n_full(m->vit) != c->n_vt)
            return vlm_fail(err, VLM_ERR_ARG, "expected %d ViT maps (one per full-attention block), got %d", c->n_vt,
                            vlm_vit_n_full(m->vit));
        if (m->vit->cfg.hidden != c->vt_c)
            return vlm_fail(err, VLM_ERR_SHAPE, "ViT maps must be [gh, gw, %d] channels-last, got %d channels", c->vt_c,
                            m->vit->cfg.hidden);
    }
    if (m->proj_aux ? (m->proj_aux->layers[0].k != c->R || m->proj_aux->layers[m->proj_aux->n_layers - 1].n != hidden)
                    : c->R != hidden)
        return vlm_fail(err, VLM_ERR_SHAPE, "fo1: mm_projector_aux does not map the %d region features to %d", c->R,
                        hidden);
    return VLM_OK;
}

/* Sizes a request may have; VLM_ERR_ARG otherwise (then carve must not run). */
static vlm_status check_sizes(const vlm_fo1_model *m, const vlm_fo1_limits *L, vlm_err *err) {
    if (L->gh <= 0 || L->gw <= 0 || L->gh % 2 || L->gw % 2 || (long)L->gh * L->gw > (1L << 22))
        return vlm_fail(err, VLM_ERR_ARG, "invalid patch grid %dx%d (both sides positive and even)", L->gh, L->gw);
    if (L->n_boxes < 0 || L->n_boxes > (1 << 24)) return vlm_fail(err, VLM_ERR_ARG, "fo1: bad box count %d", L->n_boxes);
    if (L->n_boxes > 0 && use_davit(m)) {
        if (L->aux_h < 1 || L->aux_w < 1 || L->aux_h > 16384 || L->aux_w > 16384)
            return vlm_fail(err, VLM_ERR_ARG, "fo1: aux image %dx%d out of range", L->aux_h, L->aux_w);
        int hs[VLM_DAVIT_STAGES], ws[VLM_DAVIT_STAGES];
        VLM_TRY(vlm_davit_stage_sizes(m->davit, L->aux_h, L->aux_w, hs, ws, err));
    }
    return VLM_OK;
}

static int hidden_of(const vlm_fo1_model *m) {
    return m->proj_image ? (int)m->proj_image->layers[m->proj_image->n_layers - 1].n : m->vit->cfg.out_hidden;
}

size_t vlm_fo1_arena_size(const vlm_fo1_model *m, const vlm_fo1_limits *lim, int n_threads) {
    if (check_sizes(m, lim, NULL) != VLM_OK) return 0;
    fo1_arena A;
    return carve(&A, m, lim, hidden_of(m), n_threads < 1 ? 1 : n_threads, NULL);
}

vlm_status vlm_fo1_state_create(const vlm_fo1_model *m, const vlm_fo1_limits *lim, int n_threads,
                                vlm_fo1_state **out, vlm_err *err) {
    *out = NULL;
    vlm_fo1_state *s = calloc(1, sizeof *s);
    if (!s) return vlm_fail(err, VLM_ERR_NOMEM, "out of memory");
    vlm_pool *pool;
    void *block;
    vlm_status st = vlm_workspace_get(s, n_threads, lim ? vlm_fo1_arena_size(m, lim, n_threads) : 0, &pool, &block, err);
    if (st != VLM_OK) { vlm_fo1_state_free(s); return st; }
    *out = s;
    return VLM_OK;
}

void vlm_fo1_state_free(vlm_fo1_state *s) {
    vlm_workspace_clear(s);
    free(s);
}

typedef struct {   /* the clock and the pool's work counters when a stage ended (t == 0: not reached) */
    double t;
    uint64_t c[VLM_FLOPS_KINDS];
} fo1_mark;

static void mark_now(fo1_mark *mk, const vlm_pool *pool) {
    mk->t = vlm_seconds();
    vlm_pool_counts(pool, mk->c);
}

static vlm_status encode(const vlm_fo1_model *m, vlm_fo1_state *s, const vlm_fo1_input *in, int n_threads, float *emb,
                         int hidden, int64_t image_row, const int64_t *region_rows, fo1_mark mk[4], vlm_err *err);

static int all_finite(const float *x, size_t n) {
    float acc = 0.0f;   /* inf - inf and NaN propagate to NaN; finite values keep acc at 0 */
    for (size_t i = 0; i < n; i++) acc += x[i] - x[i];
    return acc == 0.0f;
}

vlm_status vlm_fo1_encode(const vlm_fo1_model *m, vlm_fo1_state *s, const vlm_fo1_input *in, int n_threads, float *emb,
                          int hidden, int64_t image_row, const int64_t *region_rows, vlm_fo1_stats *stats, vlm_err *err) {
    fo1_mark mk[4];
    memset(mk, 0, sizeof mk);
    mk[0].t = vlm_seconds();
    vlm_status st = encode(m, s, in, n_threads, emb, hidden, image_row, region_rows, mk, err);
    if (stats) {
        memset(stats, 0, sizeof *stats);
        for (int i = 0; i < 3; i++) {   /* stages run in order; one not reached (no boxes) reads 0 */
            const fo1_mark *a = &mk[i], *b = &mk[i + 1];
            if (b->t == 0) continue;
            stats->seconds[i] = b->t - a->t;
            for (int k = 0; k < VLM_FLOPS_KINDS; k++) stats->flops[i][k] = b->c[k] - a->c[k];
        }
    }
    return st;
}

/* The pass itself; mk[0] = the start (its counters set here), mk[i + 1] = when stage i ended. */
static vlm_status encode(const vlm_fo1_model *m, vlm_fo1_state *s, const vlm_fo1_input *in, int n_threads, float *emb,
                         int hidden, int64_t image_row, const int64_t *region_rows, fo1_mark mk[4], vlm_err *err) {
    const vlm_fo1_limits L = {in->gh, in->gw, in->aux_h, in->aux_w, in->n_boxes};
    const int N = in->n_boxes;
    VLM_TRY(vlm_fo1_validate(m, hidden, N, err));
    VLM_TRY(check_sizes(m, &L, err));
    if (!in->vit_pixels || !emb || image_row < 0 || (N > 0 && !region_rows))
        return vlm_fail(err, VLM_ERR_ARG, "fo1: missing pixels, output buffer or region rows");
    if (N > 0 && ((use_davit(m) && (!in->aux_pixels || !in->boxes_a)) || (m->hfre->cfg.use_vt && !in->boxes_q)))
        return vlm_fail(err, VLM_ERR_ARG, "fo1: missing aux pixels or boxes");
    fo1_arena A;
    vlm_pool *pool;
    void *block;
    const int nth = n_threads < 1 ? 1 : n_threads;
    VLM_TRY(vlm_workspace_get(s, nth, carve(&A, m, &L, hidden, nth, NULL), &pool, &block, err));
    carve(&A, m, &L, hidden, nth, block);
    vlm_pool_counts(pool, mk[0].c);
    const vlm_vit_config *vc = &m->vit->cfg;
    const int64_t U = (int64_t)in->gh * in->gw / 4;
    const size_t n_patch = (size_t)in->gh * in->gw;

    /* ViT -> mm_projector -> the image rows */
    VLM_TRY(vlm_vit_forward(m->vit, pool, in->vit_pixels, in->gh, in->gw, A.tokens, A.feats, A.scratch, A.scratch_size,
                            err));
    if (!all_finite(A.tokens, (size_t)U * vc->out_hidden))
        return vlm_fail(err, VLM_ERR_ARG, "image projector input contains NaN or inf");
    float *img = emb + image_row * hidden;
    if (m->proj_image) VLM_TRY(vlm_mlp_forward(m->proj_image, pool, img, A.tokens, U, A.scratch, A.scratch_size, err));
    else memcpy(img, A.tokens, sizeof(float) * (size_t)U * hidden);
    mark_now(&mk[1], pool);
    if (N == 0) return VLM_OK;

    /* DaViT -> HFRE -> mm_projector_aux -> the region rows */
    const vlm_hfre_config *hc = &m->hfre->cfg;
    int aux_hw[VLM_HFRE_AUX_LEVELS][2] = {{0}};
    if (use_davit(m)) {
        int hs[VLM_DAVIT_STAGES], ws[VLM_DAVIT_STAGES];
        VLM_TRY(vlm_davit_stage_sizes(m->davit, in->aux_h, in->aux_w, hs, ws, err));
        VLM_TRY(vlm_davit_forward(m->davit, pool, in->aux_pixels, in->aux_h, in->aux_w, A.aux, A.scratch,
                                  A.scratch_size, err));
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++) {
            aux_hw[l][0] = hs[l];
            aux_hw[l][1] = ws[l];
            if (!all_finite(A.aux[l], (size_t)hs[l] * ws[l] * hc->aux_c[l]))
                return vlm_fail(err, VLM_ERR_ARG, "aux maps contain NaN or inf");
        }
    }
    mark_now(&mk[2], pool);
    const float *vt[VLM_HFRE_MAX_VT] = {0};
    if (hc->use_vt)
        for (int k = 0; k < hc->n_vt; k++) {
            vt[k] = A.feats + (size_t)k * n_patch * vc->hidden;
            if ((!hc->simple_fpn || k == hc->n_vt - 1) && !all_finite(vt[k], n_patch * vc->hidden))
                return vlm_fail(err, VLM_ERR_ARG, "ViT maps contain NaN or inf");
        }
    VLM_TRY(vlm_hfre_forward(m->hfre, pool, (const float *const *)A.aux, (const int(*)[2])aux_hw, vt, in->gh, in->gw,
                             in->boxes_a, in->boxes_q, N, A.regions, A.scratch, A.scratch_size, err));
    if (!all_finite(A.regions, (size_t)N * hc->R))
        return vlm_fail(err, VLM_ERR_ARG, "aux projector input contains NaN or inf");
    if (m->proj_aux) VLM_TRY(vlm_mlp_forward(m->proj_aux, pool, A.proj, A.regions, N, A.scratch, A.scratch_size, err));
    else memcpy(A.proj, A.regions, sizeof(float) * (size_t)N * hidden);
    for (int i = 0; i < N; i++) {
        if (region_rows[i] < 0) return vlm_fail(err, VLM_ERR_ARG, "fo1: negative region row");
        memcpy(emb + region_rows[i] * hidden, A.proj + (size_t)i * hidden, sizeof(float) * hidden);
    }
    mark_now(&mk[3], pool);
    return VLM_OK;
}
