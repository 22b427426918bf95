/* iddpm/optim.h — optimizer and EMA updates over lists of parameter tensors.
 *
 * AdamW as torch.optim.AdamW (decoupled weight decay, bias correction), EMA as the
 * official code: ema = rate*ema + (1-rate)*param. Tensors are float32 and contiguous,
 * of matching shapes; the lists are updated in place; parameters without a gradient
 * are skipped, as PyTorch does. */
#ifndef IDDPM_OPTIM_H
#define IDDPM_OPTIM_H

#include "iddpm/tensor.h"

typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    int64_t step;   /* the step being taken, 1-based (for bias correction) */
} idd_adamw_cfg;

/* params[i] -= ...; m[i], v[i] the first/second moments */
idd_status idd_adamw_step(int n, idd_tensor **params, idd_tensor **m, idd_tensor **v, const idd_adamw_cfg *cfg);

/* ema[i] = rate*ema[i] + (1-rate)*params[i] */
idd_status idd_ema_update(int n, idd_tensor **ema, idd_tensor **params, double rate);

/* sqrt(sum of squares of every gradient), in double */
double idd_grad_norm(int n, idd_tensor **params);

/* multiply every gradient by s */
idd_status idd_grad_scale(int n, idd_tensor **params, double s);

#endif
