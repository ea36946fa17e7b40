/* pool.h — a persistent pthread pool for the vlmfo1 core.
 *
 * vlm_pool_run(pool, fn, ctx) calls fn(ctx, ith, nth) once for every ith in [0, nth), nth = pool size;
 * the calling thread is worker 0 and the call returns when all workers are done. Workers spin briefly
 * and then sleep on a condition variable. OpenBLAS is kept single-threaded and called from inside pool
 * tasks (one sgemm per output tile, see gemm.c), so the pool is the only source of parallelism.
 * Runs do not nest; one pool serves one driving thread at a time. */
#ifndef VLM_POOL_H
#define VLM_POOL_H

typedef struct vlm_pool vlm_pool;
typedef void (*vlm_task_fn)(void *ctx, int ith, int nth);

vlm_pool *vlm_pool_create(int n_threads);   /* NULL on failure; n_threads >= 1 */
void vlm_pool_free(vlm_pool *pool);         /* NULL-safe; joins the workers */
int vlm_pool_size(const vlm_pool *pool);
void vlm_pool_run(vlm_pool *pool, vlm_task_fn fn, void *ctx);

/* Split [0, n) into nth contiguous parts aligned to `align`; part ith is [*lo, *hi). */
static inline void vlm_split(long n, long align, int ith, int nth, long *lo, long *hi) {
    long blocks = (n + align - 1) / align;
    long b0 = blocks * ith / nth, b1 = blocks * (ith + 1) / nth;
    *lo = b0 * align < n ? b0 * align : n;
    *hi = b1 * align < n ? b1 * align : n;
}

#endif
