/* roi_align.c — RoIAlign as separable weight vectors (see ops.h): the per-axis sample weights of
 * torchvision's RoIAlign (aligned=False, adaptive sampling grid), the transpose of PyTorch's bilinear
 * upsampling that moves such weights to a coarser map, and the pooling op that applies them:
 * out[b][c] = Σ_y wy[y] Σ_x wx[x] map[y][x][c] over the box's window of non-zero weights.
 * Sample coordinates and interpolation weights use the reference's float32 expressions without FMA
 * contraction; each pooled value is computed by one thread in a fixed order. */
#include "ops.h"
#include "cpu.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

/* ---------------------------------------------------------------- weight vectors */

void vlm_roi_plan_layout(vlm_roi_plan *p, int n_maps, const int *H, const int *W, int N) {
    p->n_maps = n_maps;
    p->N = N;
    size_t o = 0;
    for (int i = 0; i < n_maps; i++) {
        p->H[i] = H[i];
        p->W[i] = W[i];
        p->off[i] = o;
        o += (size_t)H[i] + W[i];
    }
    p->per_box = o;
}

VLM_NO_CONTRACT long vlm_roi_axis_weights(double *w, int len, float a1, float a2, float scale, int S) {
    float st = a1 * scale, en = a2 * scale;
    float ext = en - st;
    if (ext < 1.0f) ext = 1.0f;
    float bin = ext / (float)S;
    float gf = ceilf(ext / (float)S);
    long grid = (long)gf;
    const float fl = (float)len;
    for (int p = 0; p < S; p++) {
        float base = st + (float)p * bin;
        for (long i = 0; i < grid; i++) {
            float y = base + (float)((float)i + .5f) * bin / gf;
            if (y < -1.0f || y > fl) continue;
            if (y <= 0) y = 0;
            int lo = (int)y, hi;
            if (lo >= len - 1) { hi = lo = len - 1; y = (float)lo; }
            else hi = lo + 1;
            float ly = y - (float)lo, hy = 1.0f - ly;
            w[lo] += hy;
            w[hi] += ly;
        }
    }
    return grid;
}

/* PyTorch's bilinear source index (align_corners=False) of output index d: i0, i1, lambda0, lambda1. */
VLM_NO_CONTRACT static void up_index(int in, int out, int d, int *i0, int *i1, float *l0, float *l1) {
    float scale = (float)in / (float)out;
    float src = scale * ((float)d + 0.5f) - 0.5f;
    if (src < 0) src = 0;
    int a = (int)src;
    *i0 = a;
    *i1 = a + (a < in - 1 ? 1 : 0);
    float l = src - (float)a;
    l = l < 0 ? 0 : (l > 1 ? 1 : l);
    *l1 = l;
    *l0 = 1.0f - l;
}

void vlm_upsample_weights_t(double *w_out, const double *w_in, int in, int out) {
    for (int d = 0; d < out; d++) {
        if (w_in[d] == 0) continue;
        int i0, i1;
        float l0, l1;
        up_index(in, out, d, &i0, &i1, &l0, &l1);
        w_out[i0] += w_in[d] * l0;
        w_out[i1] += w_in[d] * l1;
    }
}

void vlm_roi_finish_axis(float *dst, int *lo, int *hi, const double *w, int len, double mul) {
    *lo = len; *hi = -1;
    for (int i = 0; i < len; i++) {
        dst[i] = (float)(w[i] * mul);
        if (dst[i] != 0.0f) { if (i < *lo) *lo = i; *hi = i; }
    }
}

/* ---------------------------------------------------------------- pooling */

typedef struct {
    const vlm_roi_job *jobs;
    int n_jobs;
    long start[VLM_ROI_MAX_JOBS + 1];   /* first item of each job */
    const vlm_roi_plan *plan;
    float *out;
    int ld_out;
    float *tmp;                         /* [nth][2·VLM_ROI_CH] */
    atomic_long next;
} pool_ctx;

size_t vlm_roi_pool_scratch_floats(void) { return 2 * VLM_ROI_CH; }

/* acc[0..n) = Σ_y wy[y] Σ_x wx[x] map[y][x][0..n) over the spans (pixel stride C). */
VLM_CLONES static void pool_window(float *restrict acc, float *restrict row, const float *map, size_t ld_row, int C,
                                   int n, const float *wy, int y0, int y1, const float *wx, int x0, int x1) {
    for (int i = 0; i < n; i++) acc[i] = 0;
    for (int y = y0; y <= y1; y++) {
        float a = wy[y];
        if (a == 0.0f) continue;
        for (int i = 0; i < n; i++) row[i] = 0;
        const float *mr = map + (size_t)y * ld_row;
        for (int x = x0; x <= x1; x++) {
            float w = wx[x];
            if (w == 0.0f) continue;
            const float *px = mr + (size_t)x * C;
            for (int i = 0; i < n; i++) row[i] += w * px[i];
        }
        for (int i = 0; i < n; i++) acc[i] += a * row[i];
    }
}

static void pool_task(void *pv, int ith, int nth) {
    pool_ctx *c = pv;
    const vlm_roi_plan *p = c->plan;
    float *acc = c->tmp + (size_t)ith * 2 * VLM_ROI_CH, *row = acc + VLM_ROI_CH;
    const long total = c->start[c->n_jobs];
    for (;;) {
        long it = atomic_fetch_add(&c->next, 1);
        if (it >= total) break;
        int j = 0;
        while (it >= c->start[j + 1]) j++;
        const vlm_roi_job *J = &c->jobs[j];
        long r = it - c->start[j];
        int nch = (J->C + VLM_ROI_CH - 1) / VLM_ROI_CH;
        int b = (int)(r / nch), ch = (int)(r % nch);
        int c0 = ch * VLM_ROI_CH, n = J->C - c0 < VLM_ROI_CH ? J->C - c0 : VLM_ROI_CH;
        int g = J->map_index;
        const int *sp = p->span + ((size_t)b * p->n_maps + g) * 4;
        const float *wy = p->wts + (size_t)b * p->per_box + p->off[g], *wx = wy + p->H[g];
        float *o = c->out + (size_t)b * c->ld_out + J->out_off + c0;
        if (sp[0] > sp[1] || sp[2] > sp[3]) { memset(o, 0, sizeof(float) * n); continue; }
        pool_window(acc, row, J->map + c0, J->ld_row, J->C, n, wy, sp[0], sp[1], wx, sp[2], sp[3]);
        memcpy(o, acc, sizeof(float) * n);
    }
    (void)nth;
}

void vlm_roi_pool(vlm_pool *pool, float *out, int ld_out, const vlm_roi_job *jobs, int n_jobs, const vlm_roi_plan *plan,
                  float *scratch) {
    pool_ctx c = {.jobs = jobs, .n_jobs = n_jobs, .plan = plan, .out = out, .ld_out = ld_out, .tmp = scratch};
    c.start[0] = 0;
    for (int j = 0; j < n_jobs; j++)
        c.start[j + 1] = c.start[j] + (long)plan->N * ((jobs[j].C + VLM_ROI_CH - 1) / VLM_ROI_CH);
    atomic_init(&c.next, 0);
    if (c.start[n_jobs] > 0) vlm_pool_run(pool, pool_task, &c);
}
