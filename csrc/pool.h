/* pool.h — a persistent pthread pool for the vlmfo1 core.
 *
 * vlm_pool_run(pool, fn, ctx) calls fn(ctx, ith, nth) once for every ith in [0, nth), nth = pool size;
 * the calling thread is worker 0 and the call returns when all workers are done. Workers spin briefly
 * and then sleep on a condition variable. OpenBLAS is kept single-threaded and called from inside pool
 * tasks (one sgemm per output tile, see gemm.c), so the pool is the only source of parallelism.
 * Runs do not nest; one pool serves one driving thread at a time. */
#ifndef VLM_POOL_H
#define VLM_POOL_H

#include <stdint.h>

typedef struct vlm_pool vlm_pool;
typedef void (*vlm_task_fn)(void *ctx, int ith, int nth);

vlm_pool *vlm_pool_create(int n_threads);   /* NULL on failure; n_threads >= 1 */
void vlm_pool_free(vlm_pool *pool);         /* NULL-safe; joins the workers */
int vlm_pool_size(const vlm_pool *pool);
void vlm_pool_run(vlm_pool *pool, vlm_task_fn fn, void *ctx);

/* Work counters of the ops run on a pool, in FLOPs (a multiply-add is 2): VLM_FLOPS_GEMM, the matmuls (linear
 * layers, convolutions run as matmuls; the useful m x n x k, whatever the kernel pads); VLM_FLOPS_ATTN, the score and
 * value products of the attention ops over the (query, key) pairs they compute. Elementwise work, norms, depthwise
 * convolutions, RoIAlign and sampling are not counted. The driving thread adds when an op starts (ops are entered one
 * at a time per pool), so the counts depend only on the shapes run, not on the thread count. NULL-safe. */
enum { VLM_FLOPS_GEMM = 0, VLM_FLOPS_ATTN = 1, VLM_FLOPS_KINDS = 2 };
void vlm_pool_count(vlm_pool *pool, int kind, uint64_t flops);
void vlm_pool_counts(const vlm_pool *pool, uint64_t out[VLM_FLOPS_KINDS]);   /* zeros for NULL */
void vlm_pool_set_counts(vlm_pool *pool, const uint64_t in[VLM_FLOPS_KINDS]);

/* Inside a pool task: worker ith of nth has finished its share of a first phase; wait until all have (*done counts
 * them, starting at 0), so that a second phase in the same pool run may read what every worker wrote. */
void vlm_task_join(int *done, int nth);

/* Split [0, n) into nth contiguous parts aligned to `align`; part ith is [*lo, *hi). */
static inline void vlm_split(long n, long align, int ith, int nth, long *lo, long *hi) {
    long blocks = (n + align - 1) / align;
    long b0 = blocks * ith / nth, b1 = blocks * (ith + 1) / nth;
    *lo = b0 * align < n ? b0 * align : n;
    *hi = b1 * align < n ? b1 * align : n;
}

#endif
