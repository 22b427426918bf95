/* workspace.c — grow-only scratch buffers, one set per calling thread.
 *
 * Kernels need temporary memory (im2col columns, GEMM outputs, attention score
 * gradients) on every call. Allocating it each time costs page faults on buffers of
 * tens of MB, so each thread keeps IDD_WORKSPACE_SLOTS buffers that only ever grow.
 * _Thread_local makes this safe without locks: two threads calling kernels at once
 * each get their own memory. */
#include "iddpm/kernels.h"

#include <stdlib.h>

typedef struct {
    void *ptr;
    size_t cap;
} ws_slot;

static _Thread_local ws_slot ws[IDD_WORKSPACE_SLOTS];

void *idd_workspace_get(int slot, size_t nbytes) {
    if (slot < 0 || slot >= IDD_WORKSPACE_SLOTS) return NULL;
    ws_slot *s = &ws[slot];
    if (nbytes == 0) nbytes = 64;
    if (s->ptr && s->cap >= nbytes) return s->ptr;
    /* round up to 64 bytes (aligned_alloc needs a multiple of the alignment) and grow by
     * at least 1/4 so slowly growing requests do not reallocate every time */
    size_t want = (nbytes + 63) & ~(size_t)63;
    if (s->cap && want < s->cap + s->cap / 4) want = ((s->cap + s->cap / 4) + 63) & ~(size_t)63;
    free(s->ptr);
    s->ptr = aligned_alloc(64, want);
    s->cap = s->ptr ? want : 0;
    return s->ptr;
}

void idd_workspace_release(void) {
    for (int i = 0; i < IDD_WORKSPACE_SLOTS; i++) {
        free(ws[i].ptr);
        ws[i].ptr = NULL;
        ws[i].cap = 0;
    }
}

void idd_workspace_release_all(void) {
#pragma omp parallel
    idd_workspace_release();
    idd_workspace_release();
}

size_t idd_workspace_bytes(void) {
    size_t total = 0;
    for (int i = 0; i < IDD_WORKSPACE_SLOTS; i++) total += ws[i].cap;
    return total;
}
