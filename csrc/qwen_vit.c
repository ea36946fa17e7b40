/* qwen_vit.c — forward pass of the Qwen2.5-VL vision transformer (see qwen_vit.h).
 *
 * Patch embedding (one GEMM), reorder merge units into window order, then per block: RMSNorm, qkv,
 * 2-D RoPE, window or full attention per segment, proj added to the residual, RMSNorm, SwiGLU MLP
 * added to the residual. Patch merger (RMSNorm, 4 tokens -> 1, Linear-GELU-Linear) and the inverse
 * window order at the end. All scratch comes from one caller-provided block. */
#include "qwen_vit.h"
#include "arena.h"
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int N, U, lh, lw, n_win, max_win;
    int *widx;      /* [U] window order -> raster merged unit */
    int *cu_win;    /* [n_win+1] patch offsets of the windows */
    int cu_full[2];
} vit_layout;

/* Window partition of the merged grid, as transformers' get_window_index (windows of wm x wm units,
 * raster over windows, raster inside; empty windows dropped). */
static void vit_windows(vit_layout *L, int wm) {
    int lh = L->lh, lw = L->lw;
    int nwh = (lh + wm - lh % wm) / wm, nww = (lw + wm - lw % wm) / wm;
    int k = 0, nw = 0;
    L->cu_win[0] = 0;
    L->max_win = 0;
    for (int a = 0; a < nwh; a++)
        for (int b = 0; b < nww; b++) {
            int cnt = 0;
            for (int r = a * wm; r < a * wm + wm && r < lh; r++)
                for (int c = b * wm; c < b * wm + wm && c < lw; c++) { L->widx[k++] = r * lw + c; cnt++; }
            if (cnt) {
                L->cu_win[nw + 1] = L->cu_win[nw] + 4 * cnt;
                if (4 * cnt > L->max_win) L->max_win = 4 * cnt;
                nw++;
            }
        }
    L->n_win = nw;
    L->cu_full[0] = 0;
    L->cu_full[1] = L->N;
}

vlm_status vlm_vit_validate(const vlm_vit *m, vlm_err *err) {
    const vlm_vit_config *c = &m->cfg;
    if (c->depth <= 0 || c->depth > VLM_VIT_MAX_DEPTH || c->hidden <= 0 || c->n_heads <= 0 || c->inter <= 0 ||
        c->out_hidden <= 0 || c->in_dim <= 0 || c->patch <= 0 || c->merge != 2 || c->window <= 0)
        return vlm_fail(err, VLM_ERR_ARG, "invalid vision config (only spatial_merge_size 2 is supported)");
    if (c->hidden % c->n_heads || (c->hidden / c->n_heads) % 4 || c->hidden / c->n_heads > 256)
        return vlm_fail(err, VLM_ERR_ARG, "vision head_dim must be a multiple of 4 and <= 256");
    if (c->window % (c->patch * c->merge))
        return vlm_fail(err, VLM_ERR_ARG, "window_size must be a multiple of patch_size * spatial_merge_size");
    const int D = c->hidden, I = c->inter, D4 = 4 * D;
    VLM_TRY(vlm_check_weight(&m->patch_embed, D, c->in_dim, 0, err, "vision: patch_embed"));
    VLM_TRY(vlm_check_weight(&m->merger1, D4, D4, 1, err, "vision: merger.mlp.0"));
    VLM_TRY(vlm_check_weight(&m->merger2, c->out_hidden, D4, 1, err, "vision: merger.mlp.2"));
    if (!m->merger_ln || !m->inv_freq || !m->blocks) return vlm_fail(err, VLM_ERR_KEY, "vision: missing tensors");
    for (int l = 0; l < c->depth; l++) {
        const vlm_vit_block *B = &m->blocks[l];
        VLM_TRY(vlm_check_weight(&B->qkv, 3 * D, D, 1, err, "vision block %d: attn.qkv", l));
        VLM_TRY(vlm_check_weight(&B->proj, D, D, 1, err, "vision block %d: attn.proj", l));
        VLM_TRY(vlm_check_weight(&B->gate, I, D, 1, err, "vision block %d: mlp.gate_proj", l));
        VLM_TRY(vlm_check_weight(&B->up, I, D, 1, err, "vision block %d: mlp.up_proj", l));
        VLM_TRY(vlm_check_weight(&B->down, D, I, 1, err, "vision block %d: mlp.down_proj", l));
        if (!B->ln1 || !B->ln2) return vlm_fail(err, VLM_ERR_KEY, "vision block %d: missing norm weights", l);
    }
    return VLM_OK;
}

static vlm_status bind_all(vlm_vit *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_vit_config *c = &m->cfg;
    const int D = c->hidden, I = c->inter, D4 = 4 * D;
    VLM_TRY(vlm_tensor_weight(t, &m->patch_embed, -1, err, "patch_embed"));
    VLM_TRY(vlm_tensor_weight(t, &m->merger1, D4, err, "merger1"));
    VLM_TRY(vlm_tensor_weight(t, &m->merger2, c->out_hidden, err, "merger2"));
    VLM_TRY(vlm_tensor_vec(t, &m->merger_ln, D, err, "merger_ln"));
    VLM_TRY(vlm_tensor_vec(t, &m->inv_freq, D / c->n_heads / 2, err, "inv_freq"));
    for (int l = 0; l < c->depth; l++) {
        vlm_vit_block *B = &m->blocks[l];
        const struct { const char *name; vlm_weight *w; int n; } lin[] = {
            {"qkv", &B->qkv, 3 * D}, {"proj", &B->proj, D}, {"gate", &B->gate, I}, {"up", &B->up, I}, {"down", &B->down, D}};
        for (int i = 0; i < 5; i++) VLM_TRY(vlm_tensor_weight(t, lin[i].w, lin[i].n, err, "blocks.%d.%s", l, lin[i].name));
        VLM_TRY(vlm_tensor_vec(t, &B->ln1, D, err, "blocks.%d.ln1", l));
        VLM_TRY(vlm_tensor_vec(t, &B->ln2, D, err, "blocks.%d.ln2", l));
    }
    return vlm_vit_validate(m, err);
}

vlm_status vlm_vit_bind(vlm_vit *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_vit_config *c = &m->cfg;
    vlm_vit_unbind(m);
    if (c->depth <= 0 || c->depth > VLM_VIT_MAX_DEPTH || c->n_heads <= 0 || c->hidden <= 0 || c->hidden % c->n_heads)
        return vlm_fail(err, VLM_ERR_ARG, "invalid vision config (depth, hidden_size, num_heads)");
    if (!(m->blocks = calloc((size_t)c->depth, sizeof *m->blocks))) return vlm_fail(err, VLM_ERR_NOMEM, "out of memory");
    vlm_status st = bind_all(m, t, err);
    if (st != VLM_OK) vlm_vit_unbind(m);
    return st;
}

void vlm_vit_unbind(vlm_vit *m) {
    if (!m) return;
    free(m->blocks);
    m->blocks = NULL;
}

int vlm_vit_n_full(const vlm_vit *m) {
    int n = 0;
    for (int l = 0; l < m->cfg.depth; l++) n += m->cfg.fullatt[l] != 0;
    return n;
}

/* ---- scratch layout */
typedef struct {
    float *x, *xn, *qkv, *att, *g, *u, *cs, *sn, *h1, *o2, *attn_scratch;
    int *widx, *cu_win;
    int32_t *pos;
    void *mm; size_t mm_size;
    size_t total;
} vit_scratch;

/* Lays the scratch block out (a sizing pass when base is NULL); returns its bytes. */
static size_t carve(vit_scratch *s, const vlm_vit *m, int gh, int gw, int n_threads, char *base) {
    const vlm_vit_config *c = &m->cfg;
    size_t N = (size_t)gh * gw, U = N / 4, D = c->hidden, I = c->inter, hd = D / c->n_heads;
    vlm_arena a = {base, 0};
    VLM_ARENA_TAKE(&a, s->x, N * D);
    VLM_ARENA_TAKE(&a, s->xn, N * D);
    VLM_ARENA_TAKE(&a, s->qkv, N * 3 * D);
    VLM_ARENA_TAKE(&a, s->att, N * D);
    VLM_ARENA_TAKE(&a, s->g, N * I);
    VLM_ARENA_TAKE(&a, s->u, N * I);
    VLM_ARENA_TAKE(&a, s->cs, N * hd / 2);
    VLM_ARENA_TAKE(&a, s->sn, N * hd / 2);
    VLM_ARENA_TAKE(&a, s->h1, U * 4 * D);
    VLM_ARENA_TAKE(&a, s->o2, U * (size_t)c->out_hidden);
    VLM_ARENA_TAKE(&a, s->attn_scratch, (size_t)n_threads * vlm_segment_attention_scratch_floats((int)N, (int)hd));
    VLM_ARENA_TAKE(&a, s->widx, U);
    VLM_ARENA_TAKE(&a, s->cu_win, U + 2);
    VLM_ARENA_TAKE(&a, s->pos, 3 * N);
    size_t mm = 0;
    const vlm_vit_block *B = &m->blocks[0];
    const vlm_weight *ws[] = {&m->patch_embed, &B->qkv, &B->proj, &B->gate, &B->up, &B->down};
    for (int i = 0; i < 6; i++) mm = vlm_matmul_scratch_max(mm, (int64_t)N, ws[i], c->compute, n_threads);
    mm = vlm_matmul_scratch_max(mm, (int64_t)U, &m->merger1, c->compute, n_threads);
    mm = vlm_matmul_scratch_max(mm, (int64_t)U, &m->merger2, c->compute, n_threads);
    s->mm = vlm_arena_take(&a, mm);
    s->mm_size = mm;
    s->total = a.off;
    return a.off;
}

size_t vlm_vit_scratch_size(const vlm_vit *m, int gh, int gw, int n_threads) {
    vit_scratch s;
    return carve(&s, m, gh, gw, n_threads < 1 ? 1 : n_threads, NULL);
}

typedef struct { float *y; const float *x; const int *widx; int D; int U; } perm_ctx;

/* y[4k + j] = x[4 widx[k] + j]: merge order -> window order */
static void perm_task(void *p, int ith, int nth) {
    perm_ctx *c = p;
    long lo, hi;
    vlm_split(c->U, 1, ith, nth, &lo, &hi);
    for (long k = lo; k < hi; k++)
        memcpy(c->y + (size_t)4 * k * c->D, c->x + (size_t)4 * c->widx[k] * c->D, (size_t)4 * c->D * sizeof(float));
}

vlm_status vlm_vit_forward(const vlm_vit *m, vlm_pool *pool, const float *pixels, int gh, int gw, float *out,
                           float *feats, void *scratch, size_t scratch_size, vlm_err *err) {
    const vlm_vit_config *c = &m->cfg;
    if (gh <= 0 || gw <= 0 || gh % 2 || gw % 2)
        return vlm_fail(err, VLM_ERR_ARG, "patch grid %dx%d must be positive and even", gh, gw);
    const int nth = vlm_pool_size(pool);
    vit_scratch s;
    size_t need = carve(&s, m, gh, gw, nth, NULL);
    if (!scratch || scratch_size < need)
        return vlm_fail(err, VLM_ERR_ARG, "vision scratch too small: %zu < %zu bytes", scratch_size, need);
    carve(&s, m, gh, gw, nth, scratch);
    const vlm_mm_ctx mm = {pool, c->compute, s.mm, s.mm_size, err};

    const int N = gh * gw, U = N / 4, D = c->hidden, H = c->n_heads, hd = D / H, I = c->inter;
    vit_layout L = {.N = N, .U = U, .lh = gh / 2, .lw = gw / 2, .widx = s.widx, .cu_win = s.cu_win};
    vit_windows(&L, c->window / c->patch / c->merge);

    /* rotary positions of the tokens in window order: axis 0 = patch row, axis 1 = patch column */
    for (int k = 0; k < U; k++) {
        int u = L.widx[k], bh = u / L.lw, bw = u % L.lw;
        for (int j = 0; j < 4; j++) {
            int t = 4 * k + j;
            s.pos[t] = 2 * bh + j / 2;
            s.pos[N + t] = 2 * bw + j % 2;
            s.pos[2 * N + t] = 0;
        }
    }
    int sec[3] = {hd / 4, hd / 4, 0};
    vlm_rope_table(s.cs, s.sn, s.pos, m->inv_freq, sec, N, hd);

    VLM_TRY(vlm_mm(&mm, s.xn, D, pixels, c->in_dim, N, &m->patch_embed, 0));
    perm_ctx pc = {s.x, s.xn, L.widx, D, U};
    vlm_pool_run(pool, perm_task, &pc);

    const float scale = 1.0f / sqrtf((float)hd);
    int f = 0;
    for (int l = 0; l < c->depth; l++) {
        const vlm_vit_block *B = &m->blocks[l];
        int full = c->fullatt[l];
        vlm_rmsnorm(pool, s.xn, s.x, B->ln1, c->eps, N, D);
        VLM_TRY(vlm_mm(&mm, s.qkv, 3 * D, s.xn, D, N, &B->qkv, 0));
        vlm_rope_apply(pool, s.qkv, 3 * D, s.cs, s.sn, N, H, hd);          /* q */
        vlm_rope_apply(pool, s.qkv + D, 3 * D, s.cs, s.sn, N, H, hd);      /* k */
        vlm_segment_attention(pool, s.att, s.qkv, full ? L.cu_full : L.cu_win, full ? 1 : L.n_win, H, hd, scale,
                              s.attn_scratch, full ? N : L.max_win, c->compute == VLM_COMPUTE_BF16);
        VLM_TRY(vlm_mm(&mm, s.x, D, s.att, D, N, &B->proj, 1));
        vlm_rmsnorm(pool, s.xn, s.x, B->ln2, c->eps, N, D);
        VLM_TRY(vlm_mm(&mm, s.g, I, s.xn, D, N, &B->gate, 0));
        VLM_TRY(vlm_mm(&mm, s.u, I, s.xn, D, N, &B->up, 0));
        vlm_silu_mul(pool, s.g, s.u, N, I);
        VLM_TRY(vlm_mm(&mm, s.x, D, s.g, I, N, &B->down, 1));
        if (full && feats) {  /* window order -> raster patch order */
            float *dst = feats + (size_t)f * N * D;
            for (int k = 0; k < U; k++) {
                int u = L.widx[k], bh = u / L.lw, bw = u % L.lw;
                for (int j = 0; j < 4; j++) {
                    int r = (2 * bh + j / 2) * gw + 2 * bw + j % 2;
                    memcpy(dst + (size_t)r * D, s.x + (size_t)(4 * k + j) * D, D * sizeof(float));
                }
            }
        }
        f += full != 0;
    }
    /* merger: RMSNorm per patch, 4 consecutive patches -> one 4D row, Linear, GELU, Linear */
    vlm_rmsnorm(pool, s.xn, s.x, m->merger_ln, c->eps, N, D);
    VLM_TRY(vlm_mm(&mm, s.h1, 4 * D, s.xn, 4 * D, U, &m->merger1, 0));
    vlm_gelu_erf(pool, s.h1, (size_t)U * 4 * D);
    VLM_TRY(vlm_mm(&mm, s.o2, c->out_hidden, s.h1, 4 * D, U, &m->merger2, 0));
    for (int k = 0; k < U; k++)
        memcpy(out + (size_t)L.widx[k] * c->out_hidden, s.o2 + (size_t)k * c->out_hidden, c->out_hidden * sizeof(float));
    return VLM_OK;
}
