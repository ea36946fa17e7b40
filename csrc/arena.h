/* arena.h — a tiny 64-byte-aligned bump arena for states and scratch blocks.
 *
 * llm.c style: one function lays a block out by taking its pieces in order; run it once with base == NULL
 * (a sizing pass: every piece is NULL, a.off ends at the bytes needed), allocate, then run it again on the
 * block (the carving pass) — the same code, so sizes and pointers can never disagree. Every piece starts
 * on a VLM_ALIGN (64-byte) boundary when base does. Nothing is freed piecewise: the owner frees base. */
#ifndef VLM_ARENA_H
#define VLM_ARENA_H

#include "common.h"

typedef struct {
    char *base;   /* the block, or NULL in a sizing pass */
    size_t off;   /* bytes taken so far */
} vlm_arena;

/* The next `bytes` of the arena (rounded up to VLM_ALIGN); NULL in a sizing pass. */
static inline void *vlm_arena_take(vlm_arena *a, size_t bytes) {
    void *p = a->base ? a->base + a->off : NULL;
    a->off += vlm_align_up(bytes, VLM_ALIGN);
    return p;
}

/* ptr = the next `count` elements of *ptr's type. */
#define VLM_ARENA_TAKE(a, ptr, count) ((ptr) = vlm_arena_take((a), (size_t)(count) * sizeof *(ptr)))

#endif
