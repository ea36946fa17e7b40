/* pool.c — persistent pthread pool (see pool.h). The caller is worker 0; workers 1..n-1 wait for a
 * new generation number, spinning for a short while and then sleeping on a condition variable. */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sched.h>

#define SPIN_ITERS 20000

struct vlm_pool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    atomic_long generation;   /* bumped once per run */
    atomic_int pending;       /* workers still running the current task */
    atomic_int stop;
    vlm_task_fn fn;
    void *ctx;
    uint64_t flops[VLM_FLOPS_KINDS];   /* pool.h: work counters, written by the driving thread only */
};

typedef struct { vlm_pool *pool; int ith; } worker_arg;

static void *worker_main(void *p) {
    worker_arg a = *(worker_arg *)p;
    free(p);
    vlm_pool *pool = a.pool;
    long seen = 0;
    for (;;) {
        long g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen &&
               !atomic_load(&pool->stop) && spins < SPIN_ITERS) {
            spins++;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
        if (g == seen && !atomic_load(&pool->stop)) {
            pthread_mutex_lock(&pool->mu);
            while ((g = atomic_load(&pool->generation)) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->cv_work, &pool->mu);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop)) return NULL;
        seen = g;
        pool->fn(pool->ctx, a.ith, pool->n);
        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool->mu);
            pthread_cond_signal(&pool->cv_done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
}

vlm_pool *vlm_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    vlm_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv_work, NULL);
    pthread_cond_init(&pool->cv_done, NULL);
    pool->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!pool->threads) { free(pool); return NULL; }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) { pool->n = i; vlm_pool_free(pool); return NULL; }
        a->pool = pool; a->ith = i;
        if (pthread_create(&pool->threads[i], NULL, worker_main, a) != 0) {
            free(a); pool->n = i; vlm_pool_free(pool); return NULL;
        }
    }
    return pool;
}

void vlm_pool_free(vlm_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->cv_work);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv_work);
    pthread_cond_destroy(&pool->cv_done);
    free(pool->threads);
    free(pool);
}

int vlm_pool_size(const vlm_pool *pool) { return pool ? pool->n : 1; }

void vlm_pool_count(vlm_pool *pool, int kind, uint64_t flops) {
    if (pool && kind >= 0 && kind < VLM_FLOPS_KINDS) pool->flops[kind] += flops;
}

void vlm_pool_counts(const vlm_pool *pool, uint64_t out[VLM_FLOPS_KINDS]) {
    for (int i = 0; i < VLM_FLOPS_KINDS; i++) out[i] = pool ? pool->flops[i] : 0;
}

void vlm_pool_set_counts(vlm_pool *pool, const uint64_t in[VLM_FLOPS_KINDS]) {
    if (pool)
        for (int i = 0; i < VLM_FLOPS_KINDS; i++) pool->flops[i] = in[i];
}

void vlm_pool_run(vlm_pool *pool, vlm_task_fn fn, void *ctx) {
    if (!pool || pool->n == 1) { fn(ctx, 0, 1); return; }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->pending, pool->n - 1);
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->cv_work);
    pthread_mutex_unlock(&pool->mu);
    fn(ctx, 0, pool->n);
    int spins = 0;
    while (atomic_load_explicit(&pool->pending, memory_order_acquire) != 0 && spins < SPIN_ITERS * 10) {
        spins++;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    if (atomic_load(&pool->pending) != 0) {
        pthread_mutex_lock(&pool->mu);
        while (atomic_load(&pool->pending) != 0) pthread_cond_wait(&pool->cv_done, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
    }
}

void vlm_task_join(int *done, int nth) {
    if (nth <= 1) return;
    __atomic_add_fetch(done, 1, __ATOMIC_ACQ_REL);
    for (long spins = 0; __atomic_load_n(done, __ATOMIC_ACQUIRE) < nth; spins++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (spins > 2000) sched_yield();
    }
}
