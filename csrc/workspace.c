/* workspace.c — a reusable pool + growing scratch block for the encoder entry points (see workspace.h). */
#include "workspace.h"

#include <stdlib.h>

vlm_status vlm_workspace_get(vlm_workspace *ws, int n_threads, size_t bytes, vlm_pool **pool, void **scratch,
                             vlm_err *err) {
    if (n_threads < 1) n_threads = 1;
    if (!ws->pool || vlm_pool_size(ws->pool) != n_threads) {
        vlm_pool *p = vlm_pool_create(n_threads);
        if (!p) return vlm_fail(err, VLM_ERR_NOMEM, "cannot start %d threads", n_threads);
        uint64_t counts[VLM_FLOPS_KINDS];   /* the work counters outlive a restart */
        vlm_pool_counts(ws->pool, counts);
        vlm_pool_set_counts(p, counts);
        vlm_pool_free(ws->pool);
        ws->pool = p;
        ws->n_pools++;
    }
    if (bytes > ws->cap) {   /* the old block goes first: its contents are dead and the peak stays lower */
        size_t cap = vlm_align_up(bytes, VLM_ALIGN);
        free(ws->scratch);
        ws->cap = 0;
        ws->scratch = aligned_alloc(VLM_ALIGN, cap);
        if (!ws->scratch) return vlm_fail(err, VLM_ERR_NOMEM, "cannot allocate %.1f MB of scratch", bytes / 1e6);
        ws->cap = cap;
        ws->n_allocs++;
    }
    *pool = ws->pool;
    *scratch = ws->scratch;
    return VLM_OK;
}

void vlm_workspace_clear(vlm_workspace *ws) {
    if (!ws) return;
    vlm_pool_free(ws->pool);
    free(ws->scratch);
    ws->pool = NULL;
    ws->scratch = NULL;
    ws->cap = 0;
}
