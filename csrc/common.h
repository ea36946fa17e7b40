/* common.h — status codes, error reporting and small helpers shared by every C file of the vlmfo1 core.
 *
 * The core never exits or aborts: every fallible function returns a vlm_status and writes a
 * human-readable message into a caller-provided vlm_err buffer; csrc/module.c turns both into a
 * Python exception. Nothing here knows about Python. */
#ifndef VLM_COMMON_H
#define VLM_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdarg.h>
#include <time.h>

typedef enum {
    VLM_OK = 0,
    VLM_ERR_NOMEM,   /* allocation failed                      -> MemoryError */
    VLM_ERR_IO,      /* open/read/mmap failed                  -> OSError     */
    VLM_ERR_FORMAT,  /* malformed file, wrong dtype, bad json  -> ValueError  */
    VLM_ERR_SHAPE,   /* tensor shape does not match the config -> ValueError  */
    VLM_ERR_ARG,     /* bad argument (token id, length, ...)   -> ValueError  */
    VLM_ERR_KEY,     /* missing tensor name                    -> KeyError    */
    VLM_ERR_STATE,   /* context full / misuse                  -> RuntimeError*/
    VLM_ERR_TYPE,    /* a tensor of the wrong kind or dtype    -> TypeError   */
} vlm_status;

#define VLM_ERR_LEN 512
typedef struct { char msg[VLM_ERR_LEN]; } vlm_err;

/* Record a formatted message in err (if non-NULL) and return st. */
static inline vlm_status vlm_fail(vlm_err *err, vlm_status st, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return st;
}

#define VLM_TRY(expr) do { vlm_status _st = (expr); if (_st != VLM_OK) return _st; } while (0)

/* Monotonic wall-clock seconds (stage timings). */
static inline double vlm_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#define VLM_ALIGN 64
static inline size_t vlm_align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

/* bf16 <-> fp32. bf16 is stored as uint16_t (the top half of an IEEE float). */
static inline float vlm_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v; v.u = (uint32_t)h << 16; return v.f;
}
/* Round-to-nearest-even, NaN kept quiet: the rounding torch uses for .to(bfloat16). */
static inline uint16_t vlm_f32_to_bf16(float f) {
    union { uint32_t u; float f; } v; v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    uint32_t lsb = (v.u >> 16) & 1u;
    v.u += 0x7fffu + lsb;
    return (uint16_t)(v.u >> 16);
}
static inline float vlm_round_bf16(float f) { return vlm_bf16_to_f32(vlm_f32_to_bf16(f)); }

/* exp for softmax-style arguments (x <= 0 after max subtraction; clamped to [-87, 88]):
 * x = n·ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n from the exponent bits.
 * ~2 ulp; plain C so that loops calling it vectorize. */
static inline float vlm_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } u;
    u.i = ((int32_t)n + 127) << 23;
    return p * u.f;
}

#endif
