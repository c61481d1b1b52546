"""The element-wise optimizer math in Triton, written once for every Triton kernel.

What it computes: one Adam / AdamW step and one SGD step per element, the same
operations in the same order as the C++ math (csrc/include/fused_optim/math/adam.h,
sgd.h, stages.h), which follows torch.optim's single-tensor implementations:

    Adam   g = -grad (maximize) ; g += wd * p (L2)  or  p *= 1 - lr * wd (decoupled)
           m = lerp(m, g, 1 - beta1) ; v = beta2 * v + (1 - beta2) * (g * g)
           vmax = maximum(vmax, v) (amsgrad)
           p += -lr / (1 - beta1^t) * m / (sqrt(v or vmax) * (1 / sqrt(1 - beta2^t)) + eps)
    SGD    g = -grad (maximize) ; g += wd * p
           b = g (first step)  or  b = momentum * b + (1 - dampening) * g
           g = g + momentum * b (nesterov)  or  b ; p += -lr * g

Preconditions: element values arrive in opmath (float32, or float64 for float64
storage); the per-tensor scalars come from `adam_tensor_scalars` / `sgd_scalars`,
computed in float64 from exact float64 hyperparameters and rounded once to opmath, as
the C++ code computes them in double and casts. Memory traffic is the kernels' business
(launcher.py); nothing here loads or stores.

[note: exact float64 hyperparameters]
A Python float passed to a Triton kernel becomes a float32 argument (the interpreter
ignores `x: tl.float64` annotations). beta1 = 0.9 rounded to float32 changes
1 - beta1^t by 2 ulp of float32, so every float64 hyperparameter travels as three
float32 parts (hi, mid, lo) with hi + mid + lo == x exactly (launcher.split_f64), and
the scalar functions below rebuild it. lr comes from device memory in its own dtype.

[note: rounding on a GPU vs the interpreter]
On NVIDIA GPUs Triton's float32 `/` is div.full.f32 (approximate) and `tl.sqrt` may be
approximate; the updates use the IEEE-rounded tl.div_rn / tl.sqrt_rn in float32
(float64 `/` and tl.sqrt are IEEE already), and the launchers pass
enable_fp_fusion=False so that no multiply-add is contracted (the C++ backend does not
contract either). Checked in PTX for sm_90 (div.rn.f32, sqrt.rn.f32, no fma.rn.f32);
bit-for-bit agreement with the C++ backend ON a GPU is unverified. The interpreter
converts float32 to bfloat16 by truncation, so bfloat16 is rounded explicitly
(`to_storage`).

[note: few, larger functions]
The interpreter re-patches triton.language on every call of a @triton.jit function
(~1.5 ms each), which dominates CI time; the stages of stages.h (maybe_negate,
add_l2_penalty, decay_weights, bias_correct) are therefore inlined in the algorithm
functions, with lerp and maximum kept as functions where torch's exact formula matters.
"""

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------
# Storage and stages


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Rounds opmath values to the storage dtype, to nearest even (as torch does)."""
    if DTYPE == tl.bfloat16:
        # Explicit RNE: the interpreter's float32 -> bfloat16 cast truncates. NaN
        # becomes the quiet NaN 0x7fc0, as c10::BFloat16 makes it.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def lerp(start, end, weight):
    """torch.lerp with ATen's two-branch formula, exact at weight 0 and 1, written as in
    stages.h: start + w * (end - start) for w < 0.5, else end + (w - 1) * (end - start),
    which is bit-identical to ATen's end - (end - start) * (1 - w)."""
    from_start = weight < 0.5
    coefficient = tl.where(from_start, weight, weight - 1.0)
    return tl.where(from_start, start, end) + coefficient * (end - start)


@triton.jit
def maximum(a, b):
    """torch.maximum: NaN from either side propagates."""
    return tl.where(a != a, a, tl.where(b != b, b, tl.where(a > b, a, b)))


@triton.jit
def unscale(grad, grad_scale):
    """grad / grad_scale, IEEE-rounded (torch.amp's unscale)."""
    if grad.dtype == tl.float64:
        return grad / grad_scale
    else:
        return tl.div_rn(grad, grad_scale)


# ---------------------------------------------------------------------------------
# Adam / AdamW

WD_NONE: tl.constexpr = tl.constexpr(0)
WD_L2: tl.constexpr = tl.constexpr(1)
WD_DECOUPLED: tl.constexpr = tl.constexpr(2)


@triton.jit
def adam_tensor_scalars(step, lr,
                        beta1_hi, beta1_mid, beta1_lo, beta2_hi, beta2_mid, beta2_lo,
                        wd_hi, wd_mid, wd_lo, eps_hi, eps_mid, eps_lo,
                        OPMATH: tl.constexpr):
    """The per-tensor scalars of one Adam step (math/adam.h adam_tensor_scalars).

    step is this step's count (1 on the first step) and lr, both float64; the
    hyperparameters arrive as float32 parts (see [note: exact float64 ...]). Everything
    is computed in float64 and rounded once to OPMATH.

    beta^step is computed by binary exponentiation (libdevice's pow does not run in the
    interpreter): at most 2 * log2(step) float64 roundings; rounded to float32, the
    results equal those from C's pow for every step in 1..20000 and beta in {0.5, 0.9,
    0.95, 0.98, 0.99, 0.999, 0.9999} (checked on the host with the same operations).
    A non-integer step is truncated.
    """
    # tl.cast, not .to: the interpreter passes float arguments as Python floats.
    beta1 = (tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_mid, tl.float64)
             + tl.cast(beta1_lo, tl.float64))
    beta2 = (tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_mid, tl.float64)
             + tl.cast(beta2_lo, tl.float64))
    weight_decay = (tl.cast(wd_hi, tl.float64) + tl.cast(wd_mid, tl.float64)
                    + tl.cast(wd_lo, tl.float64))
    eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_mid, tl.float64) + tl.cast(eps_lo, tl.float64)
    n = step.to(tl.int64)
    beta1_pow = beta1 * 0.0 + 1.0
    beta2_pow = beta1_pow
    b1 = beta1
    b2 = beta2
    while n > 0:
        if (n & 1) == 1:
            beta1_pow = beta1_pow * b1
            beta2_pow = beta2_pow * b2
        b1 = b1 * b1
        b2 = b2 * b2
        n = n >> 1
    bias_correction1 = 1.0 - beta1_pow
    bias_correction2 = 1.0 - beta2_pow
    return (
        beta2.to(OPMATH),
        (1.0 - beta1).to(OPMATH),                      # one_minus_beta1
        (1.0 - beta2).to(OPMATH),                      # one_minus_beta2
        weight_decay.to(OPMATH),
        (1.0 - lr * weight_decay).to(OPMATH),          # decay_factor
        (-(lr / bias_correction1)).to(OPMATH),         # neg_step_size
        (1.0 / tl.sqrt(bias_correction2)).to(OPMATH),  # inv_bias_correction2_sqrt
        eps.to(OPMATH),
    )


@triton.jit
def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                beta2, one_minus_beta1, one_minus_beta2, weight_decay, decay_factor,
                neg_step_size, inv_bias_correction2_sqrt, eps,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr):
    """One Adam step on a block of opmath values (math/adam.h adam_update).

    WEIGHT_DECAY is WD_NONE, WD_L2 (Adam) or WD_DECOUPLED (AdamW). max_exp_avg_sq is
    only read and returned updated when AMSGRAD.
    """
    if MAXIMIZE:                                       # maybe_negate
        grad = -grad
    if WEIGHT_DECAY == WD_L2:                          # add_l2_penalty
        grad = grad + weight_decay * param
    elif WEIGHT_DECAY == WD_DECOUPLED:                 # decay_weights
        param = param * decay_factor
    # update_moments
    exp_avg = lerp(exp_avg, grad, one_minus_beta1)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * (grad * grad)
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
    # bias_correct + apply_update: param.addcdiv_(exp_avg, denom, value=-step_size), with
    # sqrt(v) / sqrt(1 - beta2^t) as sqrt(v) * (1 / sqrt(1 - beta2^t)) as adam.h does.
    if param.dtype == tl.float64:
        denom = tl.sqrt(second_moment) * inv_bias_correction2_sqrt + eps
        param = param + neg_step_size * (exp_avg / denom)
    else:
        denom = tl.sqrt_rn(second_moment) * inv_bias_correction2_sqrt + eps
        param = param + neg_step_size * tl.div_rn(exp_avg, denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


# ---------------------------------------------------------------------------------
# SGD


@triton.jit
def sgd_scalars(lr, momentum_hi, momentum_mid, momentum_lo,
                dampening_hi, dampening_mid, dampening_lo, wd_hi, wd_mid, wd_lo,
                OPMATH: tl.constexpr):
    """The scalars of one SGD step (math/sgd.h sgd_scalars): lr float64, the
    hyperparameters as float32 parts; computed in float64, rounded once to OPMATH."""
    momentum = (tl.cast(momentum_hi, tl.float64) + tl.cast(momentum_mid, tl.float64)
                + tl.cast(momentum_lo, tl.float64))
    dampening = (tl.cast(dampening_hi, tl.float64) + tl.cast(dampening_mid, tl.float64)
                 + tl.cast(dampening_lo, tl.float64))
    weight_decay = (tl.cast(wd_hi, tl.float64) + tl.cast(wd_mid, tl.float64)
                    + tl.cast(wd_lo, tl.float64))
    return (
        (-lr).to(OPMATH),                              # neg_lr
        momentum.to(OPMATH),
        (1.0 - dampening).to(OPMATH),                  # one_minus_dampening
        weight_decay.to(OPMATH),
    )


@triton.jit
def sgd_update(param, grad, momentum_buffer,
               neg_lr, momentum, one_minus_dampening, weight_decay,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
               MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr):
    """One SGD step on a block of opmath values (math/sgd.h sgd_update).

    momentum_buffer is only read and returned updated when MOMENTUM.
    """
    if MAXIMIZE:
        grad = -grad
    if WEIGHT_DECAY:
        grad = grad + weight_decay * param
    if MOMENTUM:
        if FIRST_STEP:
            momentum_buffer = grad
        else:
            momentum_buffer = momentum_buffer * momentum + one_minus_dampening * grad
        if NESTEROV:
            grad = grad + momentum * momentum_buffer
        else:
            grad = momentum_buffer
    param = param + neg_lr * grad
    return param, momentum_buffer
