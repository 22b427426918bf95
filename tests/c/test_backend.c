/* test_backend.c — the backend interface (include/iddpm/backend.h): the CPU table is
 * complete; a table that lacks a device-part entry, or claims a layer family (float32 or
 * bf16) without its entries, is refused by idd_backend_check and idd_backend_register
 * with a message naming the entry; a refused table never replaces the registered one; a
 * layer op on a device whose backend does not support the family fails with the op's
 * name, and a bf16 input on a backend without bf16 kernels is computed in float32 and
 * comes back in bf16 (the one fallback rule, engine/ops/ops_internal.h). */
#include <string.h>

#include "check.h"
#include "iddpm/backend.h"
#include "iddpm/nn.h"

/* a test backend: the CPU's table with a chosen supports() */
static int claim_bf16_conv, drop_groupnorm;
static bool test_supports(idd_kernel k, idd_dtype dtype) {
    if (k == IDD_K_CONV2D && dtype == IDD_BF16) return claim_bf16_conv;
    if (k == IDD_K_GROUPNORM) return !drop_groupnorm && dtype == IDD_F32;
    return idd_cpu_backend.supports(k, dtype);
}

static void check_refused(const char *name, const idd_backend *b, const char *entry) {
    idd_status st = idd_backend_check(b);
    const char *msg = st == IDD_OK ? "" : idd_last_error();
    char detail[320];
    snprintf(detail, sizeof detail, "status %d, message '%s', expected one naming %s", (int)st, msg, entry);
    check_report(st != IDD_OK && strstr(msg, entry) != NULL, name, detail);
    idd_clear_error();
}

int main(void) {
    check_report(idd_backend_check(&idd_cpu_backend) == IDD_OK, "the CPU table passes idd_backend_check",
                 idd_last_error());
    check_report(idd_backend_get(IDD_CPU) == &idd_cpu_backend, "the CPU device is served by the CPU table", NULL);

    idd_backend b = idd_cpu_backend;
    b.name = "test";
    b.supports = test_supports;
    b.adamw = NULL;
    check_refused("a table without adamw is refused", &b, "adamw");
    b = idd_cpu_backend;
    b.name = "test";
    b.upload_async = NULL;
    check_refused("a table without upload_async is refused", &b, "upload_async");

    b = idd_cpu_backend;
    b.name = "test";
    b.supports = test_supports;
    b.groupnorm_backward = NULL;
    check_refused("claiming group norm without its backward is refused", &b, "groupnorm_backward");
    drop_groupnorm = 1;
    check_report(idd_backend_check(&b) == IDD_OK, "not claiming group norm, the same table passes", idd_last_error());
    drop_groupnorm = 0;
    claim_bf16_conv = 1;
    b = idd_cpu_backend;
    b.name = "test";
    b.supports = test_supports;
    check_refused("claiming bf16 conv2d without the bf16 entries is refused", &b, "conv2d_forward_bf16");
    claim_bf16_conv = 0;

    /* registration: a refused table leaves the device as it was */
    b.adamw = NULL;
    idd_status st = idd_backend_register(IDD_CUDA, &b);
    idd_clear_error();
    check_report(st != IDD_OK && idd_backend_get(IDD_CUDA) == NULL, "a refused table is not registered", NULL);

    /* an op on a backend that lacks the family names the op and the device */
    b = idd_cpu_backend;
    b.name = "test";
    b.supports = test_supports;
    drop_groupnorm = 1;
    st = idd_backend_register(IDD_CUDA, &b);
    check_report(st == IDD_OK, "a complete table registers", idd_last_error());
    int64_t shape[4] = {2, 4, 3, 3};
    idd_tensor *x = idd_tensor_zeros(IDD_F32, IDD_CUDA, 4, shape);
    idd_tensor *y = x ? idd_group_norm(x, 2, NULL, NULL, NULL, NULL, false, 1e-5) : NULL;
    const char *msg = y ? "" : idd_last_error();
    check_report(x && !y && strstr(msg, "group_norm") && strstr(msg, "not implemented"),
                 "group_norm on a backend without it fails naming the op", msg);
    idd_clear_error();
    idd_tensor_release(y);
    idd_tensor_release(x);
    drop_groupnorm = 0;

    /* the bf16 fallback: bf16 in, float32 kernels, bf16 out equal to the float32 op's result rounded */
    int64_t s2[4] = {1, 2, 2, 2};
    idd_tensor *xf = idd_tensor_new(IDD_F32, IDD_CPU, 4, s2);
    float *p = idd_data(xf);
    for (int i = 0; i < 8; i++) p[i] = 0.25f * (float)(i - 3);
    idd_tensor *xb = idd_to_dtype(xf, IDD_BF16);
    idd_tensor *uf = idd_upsample_nearest2x(xf), *ub = xb ? idd_upsample_nearest2x(xb) : NULL;
    idd_tensor *ubf = ub ? idd_to_dtype(ub, IDD_F32) : NULL;
    bool ok = uf && ub && ub->dtype == IDD_BF16 && ubf;
    /* every value is a multiple of 1/4 below 2: exact in bf16, so the results are equal */
    for (int i = 0; ok && i < 32; i++) ok = ((float *)idd_data(uf))[i] == ((float *)idd_data(ubf))[i];
    check_report(ok, "a bf16 upsample on the CPU runs in float32 and comes back in bf16", idd_last_error());
    idd_tensor_release(xf); idd_tensor_release(xb); idd_tensor_release(uf); idd_tensor_release(ub);
    idd_tensor_release(ubf);
    return check_done();
}
