/* qwen2.c — forward pass of the Qwen2 / Qwen2.5 decoder (see qwen2.h).
 *
 * One call appends T tokens to the KV cache, in chunks of at most `chunk` tokens. Per chunk and
 * layer it is the flat list of ops of the reference module: RMSNorm, q/k/v projections, M-RoPE,
 * causal GQA attention over the cache, o projection added to the residual, RMSNorm, SwiGLU MLP added
 * to the residual. The lm_head runs only for the rows whose logits were asked for. */
#include "qwen2.h"
#include "arena.h"
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct vlm_qwen2_state {
    int max_ctx, chunk, n_past;
    vlm_pool *pool;
    float *kcache, *vcache;          /* [n_layers][KV][max_ctx][D] each */
    /* scratch, carved from one allocation, sized for `chunk` tokens */
    float *x, *xn, *q, *k, *v, *att, *g, *u, *cs, *sn, *attn_scratch;
    int32_t *pos;                    /* [3][chunk] */
    void *mm_scratch; size_t mm_scratch_size;
    void *block; size_t block_size;
};

static int kv_dim(const vlm_qwen2_config *c) { return c->n_kv_heads * c->head_dim; }
static int q_dim(const vlm_qwen2_config *c) { return c->n_heads * c->head_dim; }

vlm_status vlm_qwen2_validate(const vlm_qwen2 *m, vlm_err *err) {
    const vlm_qwen2_config *c = &m->cfg;
    if (c->hidden <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 || c->head_dim <= 0 ||
        c->inter <= 0 || c->vocab <= 0)
        return vlm_fail(err, VLM_ERR_ARG, "config sizes must be positive");
    if (c->n_heads % c->n_kv_heads) return vlm_fail(err, VLM_ERR_ARG, "num_attention_heads %% num_key_value_heads != 0");
    if (c->head_dim % 2) return vlm_fail(err, VLM_ERR_ARG, "head_dim must be even");
    if (c->mrope[0] < 0 || c->mrope[1] < 0 || c->mrope[2] < 0 ||
        c->mrope[0] + c->mrope[1] + c->mrope[2] != c->head_dim / 2)
        return vlm_fail(err, VLM_ERR_ARG, "mrope_section must sum to head_dim/2 = %d", c->head_dim / 2);
    if (!m->embed || !m->norm || !m->inv_freq || !m->layers) return vlm_fail(err, VLM_ERR_KEY, "missing global weights");
    VLM_TRY(vlm_check_weight(&m->lm_head, c->vocab, c->hidden, 0, err, "lm_head"));
    for (int l = 0; l < c->n_layers; l++) {
        const vlm_qwen2_layer *L = &m->layers[l];
        VLM_TRY(vlm_check_weight(&L->wq, q_dim(c), c->hidden, 1, err, "layer %d: q_proj", l));
        VLM_TRY(vlm_check_weight(&L->wk, kv_dim(c), c->hidden, 1, err, "layer %d: k_proj", l));
        VLM_TRY(vlm_check_weight(&L->wv, kv_dim(c), c->hidden, 1, err, "layer %d: v_proj", l));
        VLM_TRY(vlm_check_weight(&L->wo, c->hidden, q_dim(c), 0, err, "layer %d: o_proj", l));
        VLM_TRY(vlm_check_weight(&L->wg, c->inter, c->hidden, 0, err, "layer %d: gate_proj", l));
        VLM_TRY(vlm_check_weight(&L->wu, c->inter, c->hidden, 0, err, "layer %d: up_proj", l));
        VLM_TRY(vlm_check_weight(&L->wd, c->hidden, c->inter, 0, err, "layer %d: down_proj", l));
        if (!L->ln1 || !L->ln2) return vlm_fail(err, VLM_ERR_KEY, "layer %d: missing layernorm weight", l);
    }
    return VLM_OK;
}

static vlm_status bind_all(vlm_qwen2 *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_qwen2_config *c = &m->cfg;
    vlm_weight emb;
    VLM_TRY(vlm_tensor_weight(t, &emb, -1, err, "embed"));
    if (emb.n != c->vocab || emb.k != c->hidden)
        return vlm_fail(err, VLM_ERR_SHAPE, "embed_tokens has shape [%lld, %lld], expected [%d, %d]", (long long)emb.n,
                        (long long)emb.k, c->vocab, c->hidden);
    if (emb.dtype == VLM_I8 || emb.dtype == VLM_I4)
        return vlm_fail(err, VLM_ERR_TYPE, "embed: the embedding table must be float32 or bf16, not %s",
                        emb.dtype == VLM_I8 ? "int8" : "int4");
    m->embed = emb.data;
    m->embed_dtype = emb.dtype;
    if (vlm_tensor_find(t, "lm_head")) VLM_TRY(vlm_tensor_weight(t, &m->lm_head, -1, err, "lm_head"));
    else m->lm_head = emb;
    VLM_TRY(vlm_tensor_vec(t, &m->norm, c->hidden, err, "norm"));
    VLM_TRY(vlm_tensor_vec(t, &m->inv_freq, c->head_dim / 2, err, "inv_freq"));
    for (int l = 0; l < c->n_layers; l++) {
        vlm_qwen2_layer *L = &m->layers[l];
        const struct { const char *name; vlm_weight *w; int n_bias; } lin[] = {
            {"q", &L->wq, q_dim(c)}, {"k", &L->wk, kv_dim(c)}, {"v", &L->wv, kv_dim(c)}, {"o", &L->wo, -1},
            {"gate", &L->wg, -1}, {"up", &L->wu, -1}, {"down", &L->wd, -1}};
        for (int i = 0; i < 7; i++)
            VLM_TRY(vlm_tensor_weight(t, lin[i].w, lin[i].n_bias, err, "layers.%d.%s", l, lin[i].name));
        VLM_TRY(vlm_tensor_vec(t, &L->ln1, c->hidden, err, "layers.%d.ln1", l));
        VLM_TRY(vlm_tensor_vec(t, &L->ln2, c->hidden, err, "layers.%d.ln2", l));
    }
    return vlm_qwen2_validate(m, err);
}

vlm_status vlm_qwen2_bind(vlm_qwen2 *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_qwen2_config *c = &m->cfg;
    vlm_qwen2_unbind(m);
    if (c->n_layers <= 0 || c->n_layers > 4096 || c->hidden <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->head_dim <= 0)
        return vlm_fail(err, VLM_ERR_ARG, "invalid decoder configuration");
    if (!(m->layers = calloc((size_t)c->n_layers, sizeof *m->layers))) return vlm_fail(err, VLM_ERR_NOMEM, "out of memory");
    vlm_status st = bind_all(m, t, err);
    if (st != VLM_OK) vlm_qwen2_unbind(m);
    return st;
}

void vlm_qwen2_unbind(vlm_qwen2 *m) {
    if (!m) return;
    free(m->layers);
    m->layers = NULL;
}

/* Lays the state block out (a sizing pass when a->base is NULL): both caches, the activations of a
 * `chunk`-token chunk, the attention and matmul scratch. */
static void state_carve(vlm_qwen2_state *s, const vlm_qwen2 *m, int n_threads, vlm_arena *a) {
    const vlm_qwen2_config *c = &m->cfg;
    size_t kv = (size_t)c->n_layers * kv_dim(c) * (size_t)s->max_ctx;
    size_t H = (size_t)c->hidden, Q = q_dim(c), K = kv_dim(c), I = c->inter, Tc = s->chunk, half = c->head_dim / 2;
    VLM_ARENA_TAKE(a, s->kcache, kv);
    VLM_ARENA_TAKE(a, s->vcache, kv);
    VLM_ARENA_TAKE(a, s->x, Tc * H);
    VLM_ARENA_TAKE(a, s->xn, Tc * H);
    VLM_ARENA_TAKE(a, s->q, Tc * Q);
    VLM_ARENA_TAKE(a, s->k, Tc * K);
    VLM_ARENA_TAKE(a, s->v, Tc * K);
    VLM_ARENA_TAKE(a, s->att, Tc * Q);
    VLM_ARENA_TAKE(a, s->g, Tc * I);
    VLM_ARENA_TAKE(a, s->u, Tc * I);
    VLM_ARENA_TAKE(a, s->cs, Tc * half);
    VLM_ARENA_TAKE(a, s->sn, Tc * half);
    VLM_ARENA_TAKE(a, s->attn_scratch,
                   (size_t)n_threads * vlm_attention_scratch_floats(c->n_heads, c->n_kv_heads, c->head_dim, s->max_ctx));
    VLM_ARENA_TAKE(a, s->pos, 3 * Tc);
    /* matmul scratch: the largest of all projections at m = chunk */
    size_t mm = 0;
    const vlm_qwen2_layer *L = &m->layers[0];
    const vlm_weight *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->wg, &L->wu, &L->wd, &m->lm_head};
    for (int i = 0; i < 8; i++) mm = vlm_matmul_scratch_max(mm, s->chunk, ws[i], c->compute, n_threads);
    s->mm_scratch = vlm_arena_take(a, mm);
    s->mm_scratch_size = vlm_align_up(mm, VLM_ALIGN);
}

vlm_status vlm_qwen2_state_create(const vlm_qwen2 *m, int max_ctx, int chunk, int n_threads,
                                  vlm_qwen2_state **out, vlm_err *err) {
    *out = NULL;
    VLM_TRY(vlm_qwen2_validate(m, err));
    if (max_ctx <= 0) return vlm_fail(err, VLM_ERR_ARG, "max_context must be positive");
    if (chunk <= 0) chunk = 512;
    if (chunk > max_ctx) chunk = max_ctx;
    if (n_threads < 1) n_threads = 1;
    vlm_qwen2_state *s = calloc(1, sizeof *s);
    if (!s) return vlm_fail(err, VLM_ERR_NOMEM, "out of memory");
    s->max_ctx = max_ctx; s->chunk = chunk;
    vlm_arena a = {NULL, 0};
    state_carve(s, m, n_threads, &a);
    size_t total = a.off;
    s->block = aligned_alloc(VLM_ALIGN, total);
    if (!s->block) { free(s); return vlm_fail(err, VLM_ERR_NOMEM, "cannot allocate %.1f MB of state", total / 1e6); }
    s->block_size = total;
    a = (vlm_arena){s->block, 0};
    state_carve(s, m, n_threads, &a);
    s->pool = vlm_pool_create(n_threads);
    if (!s->pool) { free(s->block); free(s); return vlm_fail(err, VLM_ERR_NOMEM, "cannot start %d threads", n_threads); }
    *out = s;
    return VLM_OK;
}

void vlm_qwen2_state_free(vlm_qwen2_state *s) {
    if (!s) return;
    vlm_pool_free(s->pool);
    free(s->block);
    free(s);
}

int vlm_qwen2_state_len(const vlm_qwen2_state *s) { return s->n_past; }
int vlm_qwen2_state_max(const vlm_qwen2_state *s) { return s->max_ctx; }
size_t vlm_qwen2_state_bytes(const vlm_qwen2_state *s) { return s->block_size; }

void vlm_qwen2_state_flops(const vlm_qwen2_state *s, uint64_t out[VLM_FLOPS_KINDS]) { vlm_pool_counts(s->pool, out); }

vlm_status vlm_qwen2_state_truncate(vlm_qwen2_state *s, int n, vlm_err *err) {
    if (n < 0 || n > s->n_past) return vlm_fail(err, VLM_ERR_ARG, "cannot truncate a context of %d tokens to %d", s->n_past, n);
    s->n_past = n;
    return VLM_OK;
}

size_t vlm_qwen2_kv_floats(const vlm_qwen2 *m, int n) {
    return (size_t)m->cfg.n_layers * 2 * kv_dim(&m->cfg) * (size_t)(n > 0 ? n : 0);
}

/* Copy rows [0, n) of every (layer, k|v, head) between the cache and a packed snapshot. */
static void kv_copy(const vlm_qwen2 *m, const vlm_qwen2_state *s, int n, float *packed, int to_cache) {
    const vlm_qwen2_config *c = &m->cfg;
    const size_t D = c->head_dim, rows = (size_t)n * D;
    for (int l = 0; l < c->n_layers; l++)
        for (int kv = 0; kv < 2; kv++) {
            float *cache = (kv ? s->vcache : s->kcache) + (size_t)l * kv_dim(c) * s->max_ctx;
            for (int g = 0; g < c->n_kv_heads; g++, packed += rows) {
                float *row0 = cache + (size_t)g * s->max_ctx * D;
                if (to_cache) memcpy(row0, packed, rows * sizeof(float));
                else memcpy(packed, row0, rows * sizeof(float));
            }
        }
}

vlm_status vlm_qwen2_state_save(const vlm_qwen2 *m, const vlm_qwen2_state *s, int n, float *out, vlm_err *err) {
    if (n < 0 || n > s->n_past)
        return vlm_fail(err, VLM_ERR_ARG, "cannot save %d positions of a context holding %d", n, s->n_past);
    kv_copy(m, s, n, out, 0);
    return VLM_OK;
}

vlm_status vlm_qwen2_state_load(const vlm_qwen2 *m, vlm_qwen2_state *s, const float *kv, int n, vlm_err *err) {
    if (n < 0 || n > s->max_ctx)
        return vlm_fail(err, VLM_ERR_STATE, "a saved prefix of %d positions does not fit in max_context %d", n,
                        s->max_ctx);
    kv_copy(m, s, n, (float *)kv, 1);
    s->n_past = n;
    return VLM_OK;
}

static void embed_rows(const vlm_qwen2 *m, const int32_t *ids, int T, float *out) {
    size_t H = m->cfg.hidden;
    for (int t = 0; t < T; t++) {
        if (m->embed_dtype == VLM_BF16) {
            const uint16_t *row = (const uint16_t *)m->embed + (size_t)ids[t] * H;
            for (size_t i = 0; i < H; i++) out[t * H + i] = vlm_bf16_to_f32(row[i]);
        } else {
            memcpy(out + t * H, (const float *)m->embed + (size_t)ids[t] * H, H * sizeof(float));
        }
    }
}

static vlm_status check_ids(const vlm_qwen2 *m, const int32_t *ids, int T, vlm_err *err) {
    for (int t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= m->cfg.vocab)
            return vlm_fail(err, VLM_ERR_ARG, "token id %d at position %d is outside the vocabulary [0, %d)", ids[t], t,
                            m->cfg.vocab);
    return VLM_OK;
}

vlm_status vlm_qwen2_embed(const vlm_qwen2 *m, const int32_t *ids, int T, float *out, vlm_err *err) {
    VLM_TRY(check_ids(m, ids, T, err));
    embed_rows(m, ids, T, out);
    return VLM_OK;
}

/* One chunk of T <= s->chunk tokens whose residual stream is already in s->x. */
static vlm_status forward_chunk(const vlm_qwen2 *m, vlm_qwen2_state *s, int T, float *logits, int logits_all,
                                vlm_err *err) {
    const vlm_qwen2_config *c = &m->cfg;
    const int H = c->hidden, Q = q_dim(c), KVd = kv_dim(c), D = c->head_dim, I = c->inter;
    const float scale = 1.0f / sqrtf((float)D);
    const vlm_mm_ctx mm = {s->pool, c->compute, s->mm_scratch, s->mm_scratch_size, err};
    vlm_rope_table(s->cs, s->sn, s->pos, m->inv_freq, c->mrope, T, D);

    for (int l = 0; l < c->n_layers; l++) {
        const vlm_qwen2_layer *L = &m->layers[l];
        float *kc = s->kcache + (size_t)l * KVd * s->max_ctx;   /* [KV][max_ctx][D] */
        float *vc = s->vcache + (size_t)l * KVd * s->max_ctx;

        vlm_rmsnorm(s->pool, s->xn, s->x, L->ln1, c->eps, T, H);
        VLM_TRY(vlm_mm_multi(&mm, 3, (float *[]){s->q, s->k, s->v}, (int64_t[]){Q, KVd, KVd}, s->xn, H, T,
                             (const vlm_weight *[]){&L->wq, &L->wk, &L->wv}));   /* q, k, v: one pass */
        vlm_rope_apply(s->pool, s->q, Q, s->cs, s->sn, T, c->n_heads, D);
        vlm_rope_apply(s->pool, s->k, KVd, s->cs, s->sn, T, c->n_kv_heads, D);
        for (int t = 0; t < T; t++)               /* append to the cache: [t][g][D] -> [g][pos][D] */
            for (int g = 0; g < c->n_kv_heads; g++) {
                size_t dst = ((size_t)g * s->max_ctx + s->n_past + t) * D, src = (size_t)t * KVd + (size_t)g * D;
                memcpy(kc + dst, s->k + src, D * sizeof(float));
                memcpy(vc + dst, s->v + src, D * sizeof(float));
            }
        vlm_attention(s->pool, s->att, Q, s->q, Q, kc, vc, s->max_ctx, s->n_past, T, c->n_heads, c->n_kv_heads, D,
                      scale, s->attn_scratch, c->compute == VLM_COMPUTE_BF16);
        VLM_TRY(vlm_mm(&mm, s->x, H, s->att, Q, T, &L->wo, 1));      /* x += att · Woᵀ */

        vlm_rmsnorm(s->pool, s->xn, s->x, L->ln2, c->eps, T, H);
        VLM_TRY(vlm_mm_multi(&mm, 2, (float *[]){s->g, s->u}, (int64_t[]){I, I}, s->xn, H, T,
                             (const vlm_weight *[]){&L->wg, &L->wu}));                 /* gate, up: one pass */
        vlm_silu_mul(s->pool, s->g, s->u, T, I);
        VLM_TRY(vlm_mm(&mm, s->x, H, s->g, I, T, &L->wd, 1));        /* x += mlp */
    }
    s->n_past += T;
    if (!logits) return VLM_OK;
    if (logits_all) {
        vlm_rmsnorm(s->pool, s->xn, s->x, m->norm, c->eps, T, H);
        VLM_TRY(vlm_mm(&mm, logits, c->vocab, s->xn, H, T, &m->lm_head, 0));
    } else {
        vlm_rmsnorm(s->pool, s->xn, s->x + (size_t)(T - 1) * H, m->norm, c->eps, 1, H);
        VLM_TRY(vlm_mm(&mm, logits, c->vocab, s->xn, H, 1, &m->lm_head, 0));
    }
    return VLM_OK;
}

vlm_status vlm_qwen2_forward(const vlm_qwen2 *m, vlm_qwen2_state *s, const int32_t *ids, const float *embeds,
                             const int32_t *pos, int T, float *logits, int logits_all, vlm_err *err) {
    const vlm_qwen2_config *c = &m->cfg;
    if (T <= 0) return vlm_fail(err, VLM_ERR_ARG, "empty input: at least one token is needed");
    if ((ids == NULL) == (embeds == NULL)) return vlm_fail(err, VLM_ERR_ARG, "give either token ids or embeddings");
    if (!pos) return vlm_fail(err, VLM_ERR_ARG, "positions are required");
    if ((long)s->n_past + T > s->max_ctx)
        return vlm_fail(err, VLM_ERR_STATE, "context overflow: %d cached + %d new tokens > max_context %d", s->n_past, T,
                        s->max_ctx);
    if (ids) VLM_TRY(check_ids(m, ids, T, err));
    const size_t H = c->hidden;
    int start = s->n_past;
    for (int t0 = 0; t0 < T; t0 += s->chunk) {
        int n = T - t0 < s->chunk ? T - t0 : s->chunk;
        if (ids) embed_rows(m, ids + t0, n, s->x);
        else memcpy(s->x, embeds + (size_t)t0 * H, (size_t)n * H * sizeof(float));
        for (int a = 0; a < 3; a++) memcpy(s->pos + (size_t)a * n, pos + (size_t)a * T + t0, n * sizeof(int32_t));
        int last = t0 + n == T;
        float *lg = NULL;
        if (logits && logits_all) lg = logits + (size_t)t0 * c->vocab;
        else if (last) lg = logits;
        vlm_status st = forward_chunk(m, s, n, lg, logits_all, err);
        if (st != VLM_OK) { s->n_past = start; return st; }
    }
    return VLM_OK;
}
