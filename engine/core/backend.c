/* backend.c — the backend registry: which backend serves each device. The CPU backend
 * (engine/cpu) is always present; another registers itself (engine/cuda/memory.cu:
 * idd_cuda_init) or is stood in for by the CPU's (IDDPM_FAKE_CUDA=1, lua/l_iddpm.c). */
#include "iddpm/backend.h"

#include <stddef.h>

/* a device-part entry or a kernel entry: its name and whether the table has it */
typedef struct { const char *name; const void *fn; } entry;
#define E(field) {#field, (const void *)b->field}

static idd_status missing(const idd_backend *b, const entry *e, int n, const char *why) {
    for (int i = 0; i < n; i++)
        if (!e[i].fn) return idd_error("backend %s: %s lacks %s", b->name ? b->name : "?", why, e[i].name);
    return IDD_OK;
}

idd_status idd_backend_check(const idd_backend *b) {
    if (!b || !b->name || !b->supports) return idd_error("backend: a table without a name or supports()");
    const entry dev[] = {E(alloc), E(free), E(copy), E(upload), E(download), E(upload_async), E(fill), E(binary),
                         E(unary), E(clamp), E(affine), E(reduce), E(bmm), E(rand_normal), E(rand_uniform),
                         E(diff_pointwise), E(diff_p_finish), E(diff_losses), E(diff_losses_backward), E(adamw),
                         E(ema), E(sumsq), E(scale)};
    idd_status st = missing(b, dev, (int)(sizeof dev / sizeof *dev), "the device part");
    /* per family: its float32 entries, then its bf16 entries (none: float32 only) */
    const entry f32[IDD_K_COUNT][2] = {
        [IDD_K_CONV2D] = {E(conv2d_forward), E(conv2d_backward)},
        [IDD_K_CONV2D_HW] = {E(conv2d_forward_hw), E(conv2d_backward_hw)},
        [IDD_K_GROUPNORM] = {E(groupnorm_forward), E(groupnorm_backward)},
        [IDD_K_ATTENTION] = {E(attention_forward), E(attention_backward)},
        [IDD_K_UPSAMPLE2X] = {E(upsample2x_forward), E(upsample2x_backward)},
        [IDD_K_AVGPOOL2X] = {E(avgpool2x_forward), E(avgpool2x_backward)},
        [IDD_K_DROPOUT] = {E(dropout_forward), E(dropout_backward)},
        [IDD_K_TIMESTEP_EMB] = {E(timestep_embedding), E(timestep_embedding)},
        [IDD_K_MAXPOOL2D] = {E(maxpool2d_forward), E(maxpool2d_forward)},
        [IDD_K_AVGPOOL2D] = {E(avgpool2d_forward), E(avgpool2d_forward)},
        [IDD_K_RESIZE] = {E(resize_bilinear), E(resize_bilinear)},
    };
    const entry bf16[IDD_K_COUNT][2] = {
        [IDD_K_CONV2D] = {E(conv2d_forward_bf16), E(conv2d_backward_bf16)},
        [IDD_K_GROUPNORM] = {E(groupnorm_forward_bf16), E(groupnorm_backward_bf16)},
        [IDD_K_ATTENTION] = {E(attention_forward_bf16), E(attention_backward_bf16)},
        [IDD_K_UPSAMPLE2X] = {E(upsample2x_forward_bf16), E(upsample2x_backward_bf16)},
        [IDD_K_AVGPOOL2X] = {E(avgpool2x_forward_bf16), E(avgpool2x_backward_bf16)},
        [IDD_K_DROPOUT] = {E(dropout_forward_bf16), E(dropout_backward_bf16)},
    };
    for (int k = 0; k < IDD_K_COUNT && st == IDD_OK; k++) {
        if (b->supports((idd_kernel)k, IDD_F32)) st = missing(b, f32[k], 2, "supports() claims a float32 family but");
        if (st == IDD_OK && b->supports((idd_kernel)k, IDD_BF16)) {
            /* a family without bf16 entries can never be claimed in bf16 */
            entry none = {"a bf16 form of this family", NULL};
            st = bf16[k][0].name ? missing(b, bf16[k], 2, "supports() claims a bf16 family but")
                                 : missing(b, &none, 1, "supports() claims bf16 but");
        }
    }
    return st;
}
#undef E

static const idd_backend *backends[IDD_NDEVICES] = {&idd_cpu_backend};

const idd_backend *idd_backend_get(idd_device dev) { return (unsigned)dev < IDD_NDEVICES ? backends[dev] : NULL; }
idd_status idd_backend_register(idd_device dev, const idd_backend *b) {
    if ((unsigned)dev >= IDD_NDEVICES) return idd_error("backend: device %d out of range", (int)dev);
    idd_status st = idd_backend_check(b);
    if (st == IDD_OK) backends[dev] = b;
    return st;
}

static const char *unavailable[IDD_NDEVICES];
const char *idd_backend_unavailable_reason(idd_device dev) {
    if ((unsigned)dev < IDD_NDEVICES && unavailable[dev]) return unavailable[dev];
    return "this build has no CUDA backend: build with `make CUDA=1` on a machine with a GPU";
}
void idd_backend_set_unavailable(idd_device dev, const char *reason) {
    if ((unsigned)dev < IDD_NDEVICES) unavailable[dev] = reason;
}
