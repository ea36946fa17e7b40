/* davit.c — forward pass of DaViT, VLM-FO1's auxiliary vision encoder (see davit.h).
 *
 * Layout: channels-last token matrices [H*W][C] (raster order), the residual stream of stage s living
 * in the caller's output map out[s]. Per stage: ConvEmbed (im2col in row chunks + vlm_matmul, with its
 * LayerNorm before or after), then the block pairs. Depthwise convs are residual and run out of place
 * (x -> t -> x), so after every block half the stream is back in out[s].
 * Memory is bounded by working in row chunks: window attention one band of `window` image rows at a
 * time (LN, qkv, attention, proj added to the stream), the MLP in chunks of rows (LN, fc1, GELU, fc2
 * added), channel attention in two chunked passes (q/k -> the [d][d] group matrices over all tokens;
 * then v, A applied, proj added). Chunk sizes depend on the image size only, never on the thread
 * count, and every output element is computed by one thread in a fixed order, so results are the same
 * for any pool size. All scratch comes from one caller-provided block. */
#include "davit.h"
#include "arena.h"
#include "attention.h"
#include "ops.h"
#include "simd.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


#define DV_CHUNK_FLOATS (1L << 22)   /* target size of the per-chunk MLP / im2col buffers (16 MB) */
#define DV_MAX_HEAD 256              /* head / group size limit (attention kernel) */
#define DV_MAX_WINDOW 256            /* query rows per attention call (attention kernel) */

/* ---------------------------------------------------------------- sizes */

static int conv_out(int n, int k, int s, int p) { return n + 2 * p < k ? 0 : (n + 2 * p - k) / s + 1; }

static long clampl(long v, long lo, long hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Rows per chunk of the MLP / channel-attention passes and of the patch-embedding im2col. */
static long chunk_rows(const vlm_davit_config *c, int s, long N) {
    long wide = c->mlp_hidden[s] > 3 * c->dim[s] ? c->mlp_hidden[s] : 3 * c->dim[s];
    return clampl(DV_CHUNK_FLOATS / wide, 256, N);
}
static long conv_rows(const vlm_davit_config *c, int s, long N) {
    long K = (long)(s ? c->dim[s - 1] : c->in_chans) * c->kernel[s] * c->kernel[s];
    return clampl(DV_CHUNK_FLOATS / K, 64, N);
}

vlm_status vlm_davit_stage_sizes(const vlm_davit *m, int H, int W, int hs[VLM_DAVIT_STAGES], int ws[VLM_DAVIT_STAGES],
                                 vlm_err *err) {
    const vlm_davit_config *c = &m->cfg;
    int h = H, w = W;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        h = conv_out(h, c->kernel[s], c->stride[s], c->pad[s]);
        w = conv_out(w, c->kernel[s], c->stride[s], c->pad[s]);
        if (h <= 0 || w <= 0)
            return vlm_fail(err, VLM_ERR_ARG, "image %dx%d (HxW) is too small: stage %d would be empty", H, W, s);
        hs[s] = h;
        ws[s] = w;
    }
    return VLM_OK;
}

/* ---------------------------------------------------------------- validation */

static vlm_status check_half(const vlm_davit_half *h, int C, int I, const char *kind, int s, int j, vlm_err *err) {
    if (!h->dw1 || !h->dw1_b || !h->dw2 || !h->dw2_b || !h->ln1 || !h->ln1_b || !h->ln2 || !h->ln2_b)
        return vlm_fail(err, VLM_ERR_KEY, "davit stage %d block %d: missing %s conv or norm tensors", s, j, kind);
    VLM_TRY(vlm_check_weight(&h->qkv, 3 * C, C, 1, err, "davit stage %d block %d: %s qkv", s, j, kind));
    VLM_TRY(vlm_check_weight(&h->proj, C, C, 1, err, "davit stage %d block %d: %s proj", s, j, kind));
    VLM_TRY(vlm_check_weight(&h->fc1, I, C, 1, err, "davit stage %d block %d: %s fc1", s, j, kind));
    VLM_TRY(vlm_check_weight(&h->fc2, C, I, 1, err, "davit stage %d block %d: %s fc2", s, j, kind));
    return VLM_OK;
}

vlm_status vlm_davit_validate(const vlm_davit *m, vlm_err *err) {
    const vlm_davit_config *c = &m->cfg;
    if (c->in_chans <= 0 || c->window <= 0 || c->window > DV_MAX_WINDOW || !(c->eps >= 0.0f))
        return vlm_fail(err, VLM_ERR_ARG, "davit: invalid in_chans, window (1..%d) or eps", DV_MAX_WINDOW);
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        int C = c->dim[s], Cin = s ? c->dim[s - 1] : c->in_chans;
        if (C <= 0 || c->depth[s] < 0 || c->depth[s] > VLM_DAVIT_MAX_DEPTH || c->heads[s] <= 0 || c->groups[s] <= 0 ||
            c->mlp_hidden[s] <= 0 || c->kernel[s] <= 0 || c->stride[s] <= 0 || c->pad[s] < 0)
            return vlm_fail(err, VLM_ERR_ARG, "davit stage %d: invalid configuration", s);
        if (C % c->heads[s] || C / c->heads[s] > DV_MAX_HEAD || C % c->groups[s] || C / c->groups[s] > DV_MAX_HEAD)
            return vlm_fail(err, VLM_ERR_ARG, "davit stage %d: dim %d must split into heads/groups of <= %d channels", s, C,
                            DV_MAX_HEAD);
        if (s == 0 && c->prenorm[0])
            return vlm_fail(err, VLM_ERR_ARG, "davit: a LayerNorm before the first patch embedding is not supported "
                                              "(the reference never applies it to an image)");
        VLM_TRY(vlm_check_weight(&m->conv[s], C, Cin * c->kernel[s] * c->kernel[s], 1, err, "davit: convs.%d", s));
        if (!m->norm[s] || !m->norm_b[s]) return vlm_fail(err, VLM_ERR_KEY, "davit: missing convs.%d norm", s);
        if (c->depth[s] && !m->blocks[s]) return vlm_fail(err, VLM_ERR_KEY, "davit: missing blocks of stage %d", s);
        for (int j = 0; j < c->depth[s]; j++) {
            VLM_TRY(check_half(&m->blocks[s][j].spatial, C, c->mlp_hidden[s], "spatial", s, j, err));
            VLM_TRY(check_half(&m->blocks[s][j].channel, C, c->mlp_hidden[s], "channel", s, j, err));
        }
    }
    return VLM_OK;
}

/* ---------------------------------------------------------------- scratch layout */

typedef struct {
    float *t;        /* [max N*C]  the stream after a depthwise conv; ConvEmbed pre-norm output */
    float *col;      /* [conv chunk][K] im2col rows */
    float *xn;       /* [chunk][C]  LayerNorm output */
    float *qkv;      /* [band][3C] / [chunk][2C] / [chunk][C] */
    float *att;      /* [chunk][C]  attention output before proj */
    float *h;        /* [chunk][hidden] MLP hidden */
    float *A, *At;   /* [G][d][d] channel-attention matrices, accumulated and transposed */
    float *thr;      /* n_threads x per_thread floats */
    size_t per_thread;
    void *mm; size_t mm_size;
} dv_scratch;

/* Lays the scratch block out (a sizing pass when base is NULL); returns its bytes. */
static size_t carve(dv_scratch *S, const vlm_davit *m, const int hs[], const int ws[], int nth, char *base) {
    const vlm_davit_config *c = &m->cfg;
    size_t t = 0, col = 0, xn = 0, qkv = 0, att = 0, h = 0, A = 0, per = 0, mm = 0;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        size_t C = c->dim[s], N = (size_t)hs[s] * ws[s], I = c->mlp_hidden[s];
        size_t band = (size_t)(c->window < hs[s] ? c->window : hs[s]) * ws[s];
        size_t ch = (size_t)chunk_rows(c, s, (long)N), cr = (size_t)conv_rows(c, s, (long)N);
        size_t rows = band > ch ? band : ch;
        size_t K = (size_t)m->conv[s].k, D = C / c->heads[s], d = C / c->groups[s], n = (size_t)c->window * c->window;
#define UP(v, x) do { size_t _x = (x); if (_x > (v)) (v) = _x; } while (0)
        UP(t, N * C);
        UP(col, cr * K);
        UP(xn, rows * C);
        UP(qkv, band * 3 * C > ch * 2 * C ? band * 3 * C : ch * 2 * C);
        UP(att, rows * C);
        UP(h, ch * I);
        UP(A, C * d);
        UP(per, D * (size_t)vlm_flash_kt_stride((int)n) + n * D + vlm_flash_workspace_floats(c->window, (int)D) + 64);
        UP(per, d * d + 64);
#undef UP
        mm = vlm_matmul_scratch_max(mm, (int64_t)cr, &m->conv[s], c->compute, nth);
        for (int j = 0; j < c->depth[s]; j++) {
            const vlm_davit_half *hv[2] = {&m->blocks[s][j].spatial, &m->blocks[s][j].channel};
            for (int k = 0; k < 2; k++) {
                mm = vlm_matmul_scratch_max(mm, (int64_t)rows, &hv[k]->qkv, c->compute, nth);  /* bounds the q/k and v views */
                mm = vlm_matmul_scratch_max(mm, (int64_t)rows, &hv[k]->proj, c->compute, nth);
                mm = vlm_matmul_scratch_max(mm, (int64_t)ch, &hv[k]->fc1, c->compute, nth);
                mm = vlm_matmul_scratch_max(mm, (int64_t)ch, &hv[k]->fc2, c->compute, nth);
            }
        }
    }
    per = vlm_align_up(per, 16);
    vlm_arena a = {base, 0};
    VLM_ARENA_TAKE(&a, S->t, t);
    VLM_ARENA_TAKE(&a, S->col, col);
    VLM_ARENA_TAKE(&a, S->xn, xn);
    VLM_ARENA_TAKE(&a, S->qkv, qkv);
    VLM_ARENA_TAKE(&a, S->att, att);
    VLM_ARENA_TAKE(&a, S->h, h);
    VLM_ARENA_TAKE(&a, S->A, A);
    VLM_ARENA_TAKE(&a, S->At, A);
    VLM_ARENA_TAKE(&a, S->thr, (size_t)nth * per);
    S->per_thread = per;
    S->mm = vlm_arena_take(&a, mm);
    S->mm_size = mm;
    return a.off;
}

size_t vlm_davit_scratch_size(const vlm_davit *m, int H, int W, int n_threads) {
    int hs[VLM_DAVIT_STAGES], ws[VLM_DAVIT_STAGES];
    if (vlm_davit_stage_sizes(m, H, W, hs, ws, NULL) != VLM_OK) return 0;
    dv_scratch S;
    return carve(&S, m, hs, ws, n_threads < 1 ? 1 : n_threads, NULL);
}

/* ---------------------------------------------------------------- LayerNorm */


/* ---------------------------------------------------------------- depthwise 3x3 conv, residual */

typedef struct { float *y; const float *x, *w, *b; int H, W, C; } dw_ctx;

/* y[h][w][:] = x[h][w][:] + b + sum over the 3x3 taps of x[h+dy][w+dx][:] * wt[tap][:] (zero padding) */
VLM_CLONES static void dw_rows(float *y, const float *x, const float *wt, const float *b, int H, int W, int C, int h0,
                               int h1) {
    for (int h = h0; h < h1; h++)
        for (int w = 0; w < W; w++) {
            float *yo = y + ((size_t)h * W + w) * C;
            for (int c = 0; c < C; c++) yo[c] = b[c];
            for (int dy = -1; dy <= 1; dy++) {
                int hh = h + dy;
                if (hh < 0 || hh >= H) continue;
                for (int dx = -1; dx <= 1; dx++) {
                    int ww = w + dx;
                    if (ww < 0 || ww >= W) continue;
                    const float *xs = x + ((size_t)hh * W + ww) * C, *wk = wt + (size_t)((dy + 1) * 3 + dx + 1) * C;
                    for (int c = 0; c < C; c++) yo[c] += xs[c] * wk[c];
                }
            }
            const float *xc = x + ((size_t)h * W + w) * C;
            for (int c = 0; c < C; c++) yo[c] += xc[c];
        }
}

static void dw_task(void *p, int ith, int nth) {
    dw_ctx *c = p;
    long lo, hi;
    vlm_split(c->H, 1, ith, nth, &lo, &hi);
    dw_rows(c->y, c->x, c->w, c->b, c->H, c->W, c->C, (int)lo, (int)hi);
}

static void dwconv(vlm_pool *pool, float *y, const float *x, const float *w, const float *b, int H, int W, int C) {
    dw_ctx c = {y, x, w, b, H, W, C};
    vlm_pool_run(pool, dw_task, &c);
}

/* ---------------------------------------------------------------- GELU (erf) */

typedef struct { float *x; size_t n; } gelu_ctx;

/* x * 0.5 * (1 + erf(x / sqrt 2)) with erf from Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7), the formula of
 * PyTorch's vectorized CPU GELU. An AVX-512 version (the compiler does not vectorize the scalar exp) and a
 * portable one; the split into threads is 64-aligned, so only the array's tail takes the scalar path. */
static inline float gelu1(float v) {
    float z = v * 0.70710678118654752f, a = fabsf(z);
    float t = 1.0f / (0.3275911f * a + 1.0f);
    float r = (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f;
    float e = 1.0f - r * t * vlm_expf(-(a * a));
    return v * 0.5f * (1.0f + copysignf(e, z));
}

static void gelu_generic(float *x, size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; i++) x[i] = gelu1(x[i]);
}

#if VLM_X86
static VLM_TGT_AVX512 void gelu_512(float *x, size_t lo, size_t hi) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f), sgn = _mm512_set1_ps(-0.0f);
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i), z = _mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f));
        __m512 a = _mm512_abs_ps(z);
        __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
        __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
        __m512 e = vlm_exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));   /* exp(-a^2) */
        __m512 erfa = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, one);           /* erf(|z|) >= 0 */
        __m512 erf = _mm512_or_ps(erfa, _mm512_and_ps(z, sgn));                /* sign of z */
        _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_mul_ps(v, half), _mm512_add_ps(one, erf)));
    }
    gelu_generic(x, i, hi);
}

static int dv_has_512(void) { return vlm_cpu_has_avx512(); }
#else
static int dv_has_512(void) { return 0; }
static void gelu_512(float *x, size_t lo, size_t hi) { gelu_generic(x, lo, hi); }
#endif

static void gelu_range(float *x, size_t lo, size_t hi) {
    if (dv_has_512()) gelu_512(x, lo, hi);
    else gelu_generic(x, lo, hi);
}

static void gelu_task(void *p, int ith, int nth) {
    gelu_ctx *c = p;
    long lo, hi;
    vlm_split((long)c->n, 64, ith, nth, &lo, &hi);
    gelu_range(c->x, (size_t)lo, (size_t)hi);
}

/* ---------------------------------------------------------------- patch embedding (im2col) */

typedef struct {
    float *col; const float *in; int chan_last, Hi, Wi, Ci, k, st, pd, Wo; long r0, nr;
} col_ctx;

/* col[r][(ci*k + ky)*k + kx] = in(ci, oy*st - pd + ky, ox*st - pd + kx) (0 outside), the column order of the
 * flattened PyTorch conv weight; output pixel r0 + r = oy*Wo + ox. `in` is [Ci][Hi][Wi] or [Hi][Wi][Ci]. */
static void col_task(void *p, int ith, int nth) {
    const col_ctx *c = p;
    const int k = c->k, kk = k * k, K = c->Ci * kk;
    long lo, hi;
    vlm_split(c->nr, 1, ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        long pix = c->r0 + r;
        int oy = (int)(pix / c->Wo), ox = (int)(pix % c->Wo);
        float *dst = c->col + (size_t)r * K;
        for (int ky = 0; ky < k; ky++) {
            int iy = oy * c->st - c->pd + ky;
            for (int kx = 0; kx < k; kx++) {
                int ix = ox * c->st - c->pd + kx, tap = ky * k + kx;
                int inside = iy >= 0 && iy < c->Hi && ix >= 0 && ix < c->Wi;
                if (!inside) {
                    for (int ci = 0; ci < c->Ci; ci++) dst[ci * kk + tap] = 0.f;
                } else if (c->chan_last) {
                    const float *src = c->in + ((size_t)iy * c->Wi + ix) * c->Ci;
                    for (int ci = 0; ci < c->Ci; ci++) dst[ci * kk + tap] = src[ci];
                } else {
                    const float *src = c->in + (size_t)iy * c->Wi + ix;
                    for (int ci = 0; ci < c->Ci; ci++) dst[ci * kk + tap] = src[(size_t)ci * c->Hi * c->Wi];
                }
            }
        }
    }
}

/* ---------------------------------------------------------------- window attention (one band of rows) */

typedef struct {
    float *att; const float *qkv; const float *bias;   /* att [nb][C], qkv [nb][3C], bias = qkv bias [3C] */
    int rows, W, C, heads, win; float scale; float *thr; size_t per;
} win_ctx;

/* Work item = (window column, head). Keys/values: the win x win window in raster order, positions
 * outside the image being the zero-padded tokens, whose k and v are the qkv bias. Queries: the real
 * tokens only (padded queries are cropped by the reference), one call per image row of the window. */
static void win_task(void *p, int ith, int nth) {
    const win_ctx *c = p;
    const int C = c->C, D = C / c->heads, win = c->win, n = win * win, ld = 3 * C, ldkt = vlm_flash_kt_stride(n);
    const int nwc = (c->W + win - 1) / win;
    float *kt = c->thr + (size_t)ith * c->per, *V = kt + (size_t)D * ldkt, *ws = V + (size_t)n * D;
    int lim[DV_MAX_WINDOW];
    for (int r = 0; r < win; r++) lim[r] = n;
    for (long it = ith; it < (long)nwc * c->heads; it += nth) {
        int wc = (int)(it / c->heads), h = (int)(it % c->heads), x0 = wc * win;
        const float *kb = c->bias + C + h * D, *vb = c->bias + 2 * C + h * D;
        for (int j = 0; j < n; j++) {
            int ly = j / win, lx = j % win;
            const float *k = kb, *v = vb;
            if (ly < c->rows && x0 + lx < c->W) {
                const float *row = c->qkv + ((size_t)ly * c->W + x0 + lx) * ld;
                k = row + C + h * D;
                v = row + 2 * C + h * D;
            }
            for (int d = 0; d < D; d++) kt[(size_t)d * ldkt + j] = k[d];
            memcpy(V + (size_t)j * D, v, (size_t)D * sizeof(float));
        }
        for (int d = 0; d < D; d++)
            for (int j = n; j < ldkt; j++) kt[(size_t)d * ldkt + j] = 0.f;
        int R = c->W - x0 < win ? c->W - x0 : win;
        for (int ly = 0; ly < c->rows; ly++) {
            size_t t0 = (size_t)ly * c->W + x0;
            vlm_flash_rows(c->att + t0 * C + (size_t)h * D, C, c->qkv + t0 * ld + (size_t)h * D, ld, R, kt, ldkt, V, D, lim,
                           D, c->scale, ws);
        }
    }
}

/* ---------------------------------------------------------------- channel attention */

typedef struct {
    float *A; const float *qk; long nr; int C, d, G; float scale; float *thr; size_t per;
} chA_ctx;

/* A[g][i][j] += sum over the chunk's tokens of (q[n][g d + i] * scale) * k[n][g d + j], in blocks of 256 tokens. */
VLM_CLONES static void chA_group(float *A, float *Ap, const float *qk, long nr, int C, int d, int g, float scale) {
    for (long n0 = 0; n0 < nr; n0 += 256) {
        long n1 = n0 + 256 < nr ? n0 + 256 : nr;
        memset(Ap, 0, (size_t)d * d * sizeof(float));
        for (long n = n0; n < n1; n++) {
            const float *q = qk + (size_t)n * 2 * C + (size_t)g * d, *k = q + C;
            for (int i = 0; i < d; i++) {
                float a = q[i] * scale;
                float *row = Ap + (size_t)i * d;
                for (int j = 0; j < d; j++) row[j] += a * k[j];
            }
        }
        for (int i = 0; i < d * d; i++) A[i] += Ap[i];
    }
}

static void chA_task(void *p, int ith, int nth) {
    const chA_ctx *c = p;
    float *Ap = c->thr + (size_t)ith * c->per;
    for (int g = ith; g < c->G; g += nth)
        chA_group(c->A + (size_t)g * c->d * c->d, Ap, c->qk, c->nr, c->C, c->d, g, c->scale);
}

typedef struct { float *att; const float *v, *At; long nr; int C, d, G; } chV_ctx;

/* att[n][g d + i] = sum_j A[g][i][j] v[n][g d + j], with At[g][j][i] = A[g][i][j] */
VLM_CLONES static void chV_rows(float *att, const float *v, const float *At, long n0, long n1, int C, int d, int G) {
    for (long n = n0; n < n1; n++)
        for (int g = 0; g < G; g++) {
            const float *vr = v + (size_t)n * C + (size_t)g * d, *Ag = At + (size_t)g * d * d;
            float *o = att + (size_t)n * C + (size_t)g * d;
            for (int i = 0; i < d; i++) o[i] = 0.f;
            for (int j = 0; j < d; j++) {
                float a = vr[j];
                const float *r = Ag + (size_t)j * d;
                for (int i = 0; i < d; i++) o[i] += a * r[i];
            }
        }
}

static void chV_task(void *p, int ith, int nth) {
    const chV_ctx *c = p;
    long lo, hi;
    vlm_split(c->nr, 1, ith, nth, &lo, &hi);
    chV_rows(c->att, c->v, c->At, lo, hi, c->C, c->d, c->G);
}

/* Row softmax of every group matrix, written transposed: At[g][j][i] = softmax_j(A[g][i][:]). */
static void ch_softmax(float *At, const float *A, int G, int d) {
    for (int g = 0; g < G; g++)
        for (int i = 0; i < d; i++) {
            const float *a = A + ((size_t)g * d + i) * d;
            float mx = a[0], sum = 0.f;
            for (int j = 1; j < d; j++) mx = a[j] > mx ? a[j] : mx;
            float e[DV_MAX_HEAD];
            for (int j = 0; j < d; j++) { e[j] = expf(a[j] - mx); sum += e[j]; }
            float inv = 1.0f / sum;
            for (int j = 0; j < d; j++) At[((size_t)g * d + j) * d + i] = e[j] * inv;
        }
}

/* ---------------------------------------------------------------- the forward pass */

typedef struct {
    const vlm_davit *m;
    vlm_pool *pool;
    dv_scratch S;
    vlm_mm_ctx mm;
} dv_run;

/* x [Ho*Wo][C] = conv(in) + bias, im2col in chunks of rows. */
static vlm_status conv_embed(dv_run *r, int s, float *x, const float *in, int chan_last, int Hi, int Wi, int Ho, int Wo) {
    const vlm_davit_config *c = &r->m->cfg;
    const vlm_weight *w = &r->m->conv[s];
    long N = (long)Ho * Wo, step = conv_rows(c, s, N);
    for (long r0 = 0; r0 < N; r0 += step) {
        long nr = N - r0 < step ? N - r0 : step;
        col_ctx cc = {r->S.col, in, chan_last, Hi, Wi, s ? c->dim[s - 1] : c->in_chans, c->kernel[s], c->stride[s],
                      c->pad[s], Wo, r0, nr};
        vlm_pool_run(r->pool, col_task, &cc);
        VLM_TRY(vlm_mm(&r->mm, x + (size_t)r0 * w->n, w->n, r->S.col, w->k, nr, w, 0));
    }
    return VLM_OK;
}

/* x += proj(WindowAttention(LN(x))), one band of `window` image rows at a time. */
static vlm_status window_attention(dv_run *r, int s, float *x, const vlm_davit_half *B, int H, int W) {
    const vlm_davit_config *c = &r->m->cfg;
    const int C = c->dim[s], win = c->window;
    const float scale = 1.0f / sqrtf((float)(C / c->heads[s]));
    for (int y0 = 0; y0 < H; y0 += win) {
        int rows = H - y0 < win ? H - y0 : win;
        long nb = (long)rows * W;
        float *xb = x + (size_t)y0 * W * C;
        vlm_layernorm(r->pool, r->S.xn, xb, B->ln1, B->ln1_b, c->eps, nb, C);
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv, 3 * C, r->S.xn, C, nb, &B->qkv, 0));
        win_ctx wc = {r->S.att, r->S.qkv, B->qkv.bias, rows, W, C, c->heads[s], win, scale, r->S.thr, r->S.per_thread};
        vlm_pool_run(r->pool, win_task, &wc);
        VLM_TRY(vlm_mm(&r->mm, xb, C, r->S.att, C, nb, &B->proj, 1));
    }
    return VLM_OK;
}

/* x += proj(ChannelAttention(LN(x))): pass 1 accumulates the group matrices from q and k over all
 * tokens; pass 2 computes v, applies the softmaxed matrices and adds the projection. */
static vlm_status channel_attention(dv_run *r, int s, float *x, const vlm_davit_half *B, long N) {
    const vlm_davit_config *c = &r->m->cfg;
    const int C = c->dim[s], G = c->groups[s], d = C / G;
    const long step = chunk_rows(c, s, N);
    const float scale = (float)(1.0 / sqrt((double)N));  /* q * N^-0.5, N = tokens */
    const size_t esz = B->qkv.dtype == VLM_BF16 ? 2 : 4;
    vlm_weight wqk = B->qkv, wv = B->qkv;
    wqk.n = 2 * C;
    wv.n = C;
    wv.data = (const char *)B->qkv.data + (size_t)2 * C * C * esz;
    wv.bias = B->qkv.bias + 2 * C;
    memset(r->S.A, 0, (size_t)C * d * sizeof(float));
    for (long t0 = 0; t0 < N; t0 += step) {
        long nr = N - t0 < step ? N - t0 : step;
        vlm_layernorm(r->pool, r->S.xn, x + (size_t)t0 * C, B->ln1, B->ln1_b, c->eps, nr, C);
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv, 2 * C, r->S.xn, C, nr, &wqk, 0));
        chA_ctx ac = {r->S.A, r->S.qkv, nr, C, d, G, scale, r->S.thr, r->S.per_thread};
        vlm_pool_run(r->pool, chA_task, &ac);
    }
    ch_softmax(r->S.At, r->S.A, G, d);
    for (long t0 = 0; t0 < N; t0 += step) {
        long nr = N - t0 < step ? N - t0 : step;
        float *xb = x + (size_t)t0 * C;
        vlm_layernorm(r->pool, r->S.xn, xb, B->ln1, B->ln1_b, c->eps, nr, C);
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv, C, r->S.xn, C, nr, &wv, 0));
        chV_ctx vc = {r->S.att, r->S.qkv, r->S.At, nr, C, d, G};
        vlm_pool_run(r->pool, chV_task, &vc);
        VLM_TRY(vlm_mm(&r->mm, xb, C, r->S.att, C, nr, &B->proj, 1));
    }
    return VLM_OK;
}

/* x += fc2(GELU(fc1(LN(x)))), in chunks of rows. */
static vlm_status mlp(dv_run *r, int s, float *x, const vlm_davit_half *B, long N) {
    const vlm_davit_config *c = &r->m->cfg;
    const int C = c->dim[s], I = c->mlp_hidden[s];
    const long step = chunk_rows(c, s, N);
    for (long t0 = 0; t0 < N; t0 += step) {
        long nr = N - t0 < step ? N - t0 : step;
        float *xb = x + (size_t)t0 * C;
        vlm_layernorm(r->pool, r->S.xn, xb, B->ln2, B->ln2_b, c->eps, nr, C);
        VLM_TRY(vlm_mm(&r->mm, r->S.h, I, r->S.xn, C, nr, &B->fc1, 0));
        gelu_ctx gc = {r->S.h, (size_t)nr * I};
        vlm_pool_run(r->pool, gelu_task, &gc);
        VLM_TRY(vlm_mm(&r->mm, xb, C, r->S.h, I, nr, &B->fc2, 1));
    }
    return VLM_OK;
}

vlm_status vlm_davit_forward(const vlm_davit *m, vlm_pool *pool, const float *pixels, int H, int W,
                             float *out[VLM_DAVIT_STAGES], void *scratch, size_t scratch_size, vlm_err *err) {
    const vlm_davit_config *c = &m->cfg;
    int hs[VLM_DAVIT_STAGES], ws[VLM_DAVIT_STAGES];
    if (!pixels || !out) return vlm_fail(err, VLM_ERR_ARG, "davit: NULL pixels or outputs");
    VLM_TRY(vlm_davit_stage_sizes(m, H, W, hs, ws, err));
    dv_run run = {.m = m, .pool = pool}, *r = &run;
    size_t need = carve(&r->S, m, hs, ws, vlm_pool_size(pool), NULL);
    if (!scratch || scratch_size < need)
        return vlm_fail(err, VLM_ERR_ARG, "davit scratch too small: %zu < %zu bytes", scratch_size, need);
    carve(&r->S, m, hs, ws, vlm_pool_size(pool), scratch);
    r->mm = (vlm_mm_ctx){pool, c->compute, r->S.mm, r->S.mm_size, err};

    const float *in = pixels;  /* stage input: the image [Ci][H][W], then the previous map [H][W][C] */
    int Hi = H, Wi = W, Ci = c->in_chans, chan_last = 0;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        const int C = c->dim[s], Ho = hs[s], Wo = ws[s];
        const long N = (long)Ho * Wo;
        float *x = out[s];
        float *t = r->S.t;
        if (!x) return vlm_fail(err, VLM_ERR_ARG, "davit: NULL output of stage %d", s);

        /* ConvEmbed: [LN ->] conv [-> LN] */
        if (c->prenorm[s]) {
            vlm_layernorm(pool, t, in, m->norm[s], m->norm_b[s], c->eps, (long)Hi * Wi, Ci);
            VLM_TRY(conv_embed(r, s, x, t, chan_last, Hi, Wi, Ho, Wo));
        } else {
            VLM_TRY(conv_embed(r, s, x, in, chan_last, Hi, Wi, Ho, Wo));
            vlm_layernorm(pool, x, x, m->norm[s], m->norm_b[s], c->eps, N, C);
        }

        for (int j = 0; j < c->depth[s]; j++) {
            const vlm_davit_half *sp = &m->blocks[s][j].spatial, *ch = &m->blocks[s][j].channel;
            /* spatial block */
            dwconv(pool, t, x, sp->dw1, sp->dw1_b, Ho, Wo, C);
            VLM_TRY(window_attention(r, s, t, sp, Ho, Wo));
            dwconv(pool, x, t, sp->dw2, sp->dw2_b, Ho, Wo, C);
            VLM_TRY(mlp(r, s, x, sp, N));
            /* channel block */
            dwconv(pool, t, x, ch->dw1, ch->dw1_b, Ho, Wo, C);
            VLM_TRY(channel_attention(r, s, t, ch, N));
            dwconv(pool, x, t, ch->dw2, ch->dw2_b, Ho, Wo, C);
            VLM_TRY(mlp(r, s, x, ch, N));
        }
        in = x;
        Hi = Ho;
        Wi = Wo;
        Ci = C;
        chan_last = 1;
    }
    return VLM_OK;
}
