/* workspace.h — reusable compute resources for the encoders: one thread pool and one 64-byte-aligned
 * scratch block that only grows.
 *
 * The encoder entry points (ViT, DaViT, HFRE, the MLP projectors) need a pool and a scratch block per
 * call. A vlm_workspace keeps both between calls: vlm_workspace_get hands out a pool of the asked size
 * (started once; restarted only if a call asks for another thread count) and a scratch block of at least
 * the asked bytes (reallocated only when a call needs more than any call before). A zero-initialised
 * vlm_workspace is valid and empty; vlm_workspace_clear frees what it holds.
 *
 * Thread safety: a workspace serves one driving thread at a time (like the pool inside it); the caller
 * guarantees that (module.c guards it with a busy flag). */
#ifndef VLM_WORKSPACE_H
#define VLM_WORKSPACE_H

#include "common.h"
#include "pool.h"

typedef struct {
    vlm_pool *pool;       /* NULL until first needed */
    void *scratch;        /* VLM_ALIGN-aligned, cap bytes (NULL when cap == 0) */
    size_t cap;
    size_t n_allocs;      /* scratch (re)allocations so far */
    size_t n_pools;       /* pools started so far */
} vlm_workspace;

/* *pool = a pool of n_threads workers, *scratch = at least `bytes` bytes (NULL if bytes == 0 and nothing
 * was allocated yet). VLM_ERR_NOMEM if either cannot be had (the workspace is still valid; a failed grow leaves it without
 * scratch). */
vlm_status vlm_workspace_get(vlm_workspace *ws, int n_threads, size_t bytes, vlm_pool **pool, void **scratch,
                             vlm_err *err);
/* Frees the pool and the scratch block; the workspace is empty (and reusable) after. NULL-safe. */
void vlm_workspace_clear(vlm_workspace *ws);

#endif
