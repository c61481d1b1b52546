"""The element-wise optimizer math in Triton, written once for every Triton kernel.

Each optimizer of fused_optim (its spec, fused_optim/spec.py, names it) has here, under
its name, the same operations in the same order as its C++ math
(csrc/include/fused_optim/math/<name>.h), which follows torch.optim's single-tensor
implementation:

  <name>_variant(h) -> tuple      plain Python: the compile-time variant of a call from
                                  its float / bool arguments `h` (a dict by name, with
                                  the params' torch dtype under "param_dtype", as the
                                  reference's h has it), a tuple of ints or bools
                                  (VARIANT in the kernels)
  <name>_skip_reads(h) -> int     optional, plain Python: lists (a bit each) whose old
                                  values the call's update never reads (the grad
                                  included: a call that never reads it leaves it as it
                                  is, grad_scale or not)
  <name>_skip_writes(h) -> int    optional, plain Python: lists (a bit each) the call's
                                  update never changes, which are then not stored (a
                                  stage that leaves the params as they are); the C++
                                  math's reads<LISTS, V> / writes<LISTS, V>
  <name>_advance(state, lr, h, STATE_F64, LR_DTYPE)
                                  the tensor's per-tensor state after this step (a tuple
                                  of float64; default `count_step`: step + 1); bit j of
                                  STATE_F64 says state j is kept in float64 (else
                                  float32), for torch's operand roundings
                                  (math/optimizer.h's advance)
  <name>_scalars(state, lr, h, LISTS, VARIANT, LR_DTYPE, OPMATH)
                                  the per-tensor scalars of one step (a tuple), from the
                                  step's state (the advanced state, rounded as stored,
                                  then the state before the advance: [note: the step's
                                  state] in math/optimizer.h), lr and `h` (tuples of
                                  float64), computed in float64 and rounded once to
                                  OPMATH, as the C++ code computes them in double and casts
  <name>_update(x, grad, s, LISTS, VARIANT) -> x
                                  one block of elements: x holds every list of the
                                  optimizer in op order (x[0] params, x[1] grads; lists
                                  the call leaves out, LISTS being a bit per list present,
                                  are zeros to be ignored), grad the unscaled, signed
                                  grad, s the scalars; returns x updated

Element values arrive in opmath (float32, or float64 for float64 storage), those of
a work list stored in a fixed dtype (the spec's ``StateList(dtype=...)``: Muon's bf16
updates) too, loaded exactly. Memory traffic is the kernels' business (launcher.py);
nothing here loads or stores.

An optimizer that takes sparse grads also has a row math for the row-sparse engine
(sparse.py), under its SparseGrads.math name: `<math>_rows(p, g, s, c, DTYPE)` and
`<math>_rows_shape` (see "Row maths" at the end of this file).

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
(~1.5 ms each), which dominates CI time; the stages of stages.h (add_l2_penalty,
decay_weights, average_square) are therefore inlined in the optimizers' functions, with
lerp and maximum kept as functions where torch's exact formula matters.

[note: lr arithmetic]
As in csrc/include/fused_optim/math/stages.h: torch.optim computes with a tensor lr in
the tensor's dtype (a Python float operand rounded to it first), so `lr_mul`, `lr_div`
and `lr_sub_from` compute in LR_DTYPE's opmath and round the result to LR_DTYPE.
"""

from typing import NamedTuple

import torch
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
def to_bf16_stochastic(x, r):
    """float32 -> bfloat16 rounded stochastically with the random bits r (tl.randint's
    int32 words, the low 16 bits used): [note: stochastic rounding] in
    csrc/include/fused_optim/math/stochastic.h, the same bits for the same (x, r). NaN
    stays a quiet NaN of its sign. The memory policy's stores (`to_policy_storage`)."""
    return to_policy_storage(x, tl.bfloat16, r, True)


@triton.jit
def to_policy_storage(x, DTYPE: tl.constexpr, r, STOCHASTIC: tl.constexpr):
    """A memory policy's store of float32 values into DTYPE (fused_optim/_policy.py), as
    round_store in csrc/cpu/kernels_impl.h: into bfloat16 stochastically with the random
    words r when STOCHASTIC, else to nearest even with float_to_bf16_any's NaN rule (a NaN
    keeps its sign and high payload, quieted: (u >> 16) | 0x40; an fp32 param or master
    copy may hold NaNs of any payload); other dtypes to nearest (float32: unchanged)."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            b = (u + (r.to(tl.uint32, bitcast=True) & 0xFFFF)) >> 16
        else:
            b = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        b = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x0040, b)
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def to_work_storage(x, DTYPE: tl.constexpr, WORK_DTYPE: tl.constexpr):
    """A value stored into a work list of its own dtype WORK_DTYPE beside params of
    DTYPE ([note: bf16 work lists] in csrc/include/fused_optim/math/optimizer.h): rounded
    to DTYPE first, then through float32 to WORK_DTYPE, as torch's `.bfloat16()` of a
    tensor of the params' dtype (and the C++ engines' store_work: float_to_bf16_any's NaN
    rule, a NaN keeping its sign and high payload)."""
    return to_policy_storage(round_to(x, DTYPE).to(tl.float32), WORK_DTYPE, 0, False)


@triton.jit
def lerp(start, end, weight):
    """torch.lerp with ATen's two-branch formula, exact at weight 0 and 1, written as in
    stages.h: start + w * (end - start) for w < 0.5, else end + (w - 1) * (end - start),
    which is bit-identical to ATen's end - (end - start) * (1 - w)."""
    from_start = weight < 0.5
    coefficient = tl.where(from_start, weight, weight - 1.0)
    return tl.where(from_start, start, end) + coefficient * (end - start)


@triton.jit
def lerp_fused(start, end, weight):
    """torch.lerp as ATen's kernels compute it (stages.h lerp_fused): |weight| < 0.5
    picks start + w * (end - start), else end + (w - 1) * (end - start), each with ONE
    rounding (a fused multiply-add: tl.fma, which the interpreter rounds once too);
    `weight` is a per-tensor scalar."""
    from_start = tl.abs(weight) < 0.5
    return tl.fma(tl.where(from_start, weight, weight - 1.0), end - start,
                  tl.where(from_start, start, end))


@triton.jit
def maximum(a, b):
    """torch.maximum: NaN from either side propagates."""
    return tl.where(a != a, a, tl.where(b != b, b, tl.where(a > b, a, b)))


@triton.jit
def div(a, b):
    """a / b, IEEE-rounded in float32 and float64."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


unscale = div  # grad / grad_scale, IEEE-rounded (torch.amp's unscale)


@triton.jit
def sqrt(x):
    """IEEE square root in float32 and float64."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _lr_round(x, LR_DTYPE: tl.constexpr):
    """A float64 result rounded as a tensor of LR_DTYPE stores it, back in float64."""
    if LR_DTYPE == tl.float64:
        return x
    else:
        return to_storage(x.to(tl.float32), LR_DTYPE).to(tl.float64)


@triton.jit
def lr_mul(lr, x, LR_DTYPE: tl.constexpr):
    """lr * x as torch.optim computes it with an lr tensor of LR_DTYPE."""
    if LR_DTYPE == tl.float64:
        return lr * x
    else:
        return _lr_round((lr.to(tl.float32) * x.to(tl.float32)).to(tl.float64), LR_DTYPE)


@triton.jit
def lr_div(lr, x, LR_DTYPE: tl.constexpr):
    """lr / x as torch.optim computes it with an lr tensor of LR_DTYPE."""
    if LR_DTYPE == tl.float64:
        return lr / x
    else:
        return _lr_round(tl.div_rn(lr.to(tl.float32), x.to(tl.float32)).to(tl.float64),
                         LR_DTYPE)


@triton.jit
def lr_sub_from(a, t, LR_DTYPE: tl.constexpr):
    """a - t for a value t of LR_DTYPE, in that dtype (torch's `1 - lr * wd`)."""
    if LR_DTYPE == tl.float64:
        return a - t
    else:
        return _lr_round((a - t.to(tl.float32)).to(tl.float64), LR_DTYPE)


@triton.jit
def pow_int(base, step):
    """base ** step for float64 base and a whole-number float64 step, by binary
    exponentiation (libdevice's pow does not run in the interpreter): at most
    2 * log2(step) float64 roundings; rounded to float32, the results equal those from C's
    pow for every step in 1..20000 and base in {0.5, 0.9, 0.95, 0.98, 0.99, 0.999,
    0.9999} (checked on the host with the same operations). A non-integer step is
    truncated."""
    n = step.to(tl.int64)
    result = base * 0.0 + 1.0
    b = base
    while n > 0:
        if (n & 1) == 1:
            result = result * b
        b = b * b
        n = n >> 1
    return result


def l2_decay_variant(h) -> tuple[bool]:
    """(weight decay,): the variant of an optimizer whose only option with a kernel of its
    own is an L2 weight decay (skipped, not multiplied by 0, when it is 0: inf / NaN
    params then behave as in torch)."""
    return (h["weight_decay"] != 0.0,)


@triton.jit
def count_step(state, lr, h, STATE_F64: tl.constexpr, LR_DTYPE: tl.constexpr):
    """The advance of an optimizer whose only per-tensor state is its step count."""
    return (state[0] + 1.0,)


# ---------------------------------------------------------------------------------
# Adam / AdamW

WD_NONE: tl.constexpr = tl.constexpr(0)
WD_L2: tl.constexpr = tl.constexpr(1)
WD_DECOUPLED: tl.constexpr = tl.constexpr(2)


def adam_variant(h) -> tuple[int]:
    """(weight-decay mode,)."""
    if h["weight_decay"] == 0.0:
        return (WD_NONE.value,)
    return (WD_DECOUPLED.value if h["decoupled_weight_decay"] else WD_L2.value,)


@triton.jit
def adam_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                 LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """The per-tensor scalars of one Adam step (math/adam.h Adam::scalars): state[0] is
    this step's count (1 on the first step); h = (beta1, beta2, weight_decay, eps)."""
    beta1 = h[0]
    beta2 = h[1]
    weight_decay = h[2]
    step = state[0]
    bias_correction1 = 1.0 - pow_int(beta1, step)
    bias_correction2 = 1.0 - pow_int(beta2, step)
    return (
        beta2.to(OPMATH),
        (1.0 - beta1).to(OPMATH),                      # one_minus_beta1
        (1.0 - beta2).to(OPMATH),                      # one_minus_beta2
        weight_decay.to(OPMATH),
        lr_sub_from(1.0, lr_mul(lr, weight_decay, LR_DTYPE), LR_DTYPE).to(OPMATH),  # decay
        (-lr_div(lr, bias_correction1, LR_DTYPE)).to(OPMATH),   # neg_step_size
        (1.0 / tl.sqrt(bias_correction2)).to(OPMATH),  # inv_bias_correction2_sqrt
        h[3].to(OPMATH),                               # eps
    )


@triton.jit
def adam_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """One Adam step on a block (math/adam.h Adam::update): x = (param, grad, exp_avg,
    exp_avg_sq, max_exp_avg_sq), the last only with amsgrad (LISTS bit 4)."""
    beta2, one_minus_beta1, one_minus_beta2 = s[0], s[1], s[2]
    weight_decay, decay_factor, neg_step_size = s[3], s[4], s[5]
    inv_bias_correction2_sqrt, eps = s[6], s[7]
    param = x[0]
    if VARIANT[0] == WD_L2:                            # add_l2_penalty
        grad = grad + weight_decay * param
    elif VARIANT[0] == WD_DECOUPLED:                   # decay_weights
        param = param * decay_factor
    # update_moments
    exp_avg = lerp(x[2], grad, one_minus_beta1)
    exp_avg_sq = x[3] * beta2 + one_minus_beta2 * (grad * grad)
    second_moment = exp_avg_sq
    max_exp_avg_sq = x[4]
    if (LISTS >> 4) & 1:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
    # bias_correct + apply_update: param.addcdiv_(exp_avg, denom, value=-step_size), with
    # sqrt(v) / sqrt(1 - beta2^t) as sqrt(v) * (1 / sqrt(1 - beta2^t)) as adam.h does.
    denom = sqrt(second_moment) * inv_bias_correction2_sqrt + eps
    param = param + neg_step_size * div(exp_avg, denom)
    return param, x[1], exp_avg, exp_avg_sq, max_exp_avg_sq


# ---------------------------------------------------------------------------------
# SGD

def sgd_variant(h) -> tuple[bool, bool, bool]:
    """(weight decay, nesterov, the buffer's first step): l2_decay_variant's, then two
    that only matter with momentum."""
    momentum = h["momentum"] != 0.0
    return l2_decay_variant(h) + (momentum and bool(h["nesterov"]),
                                  momentum and bool(h["is_first_step"]))


def sgd_skip_reads(h) -> int:
    # On the buffer's first step its old contents are never used (list 2).
    return 1 << 2 if h["momentum"] != 0.0 and h["is_first_step"] else 0


@triton.jit
def sgd_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """The scalars of one SGD step (math/sgd.h Sgd::scalars); h = (momentum, dampening,
    weight_decay)."""
    return (
        (-lr).to(OPMATH),                              # neg_lr
        h[0].to(OPMATH),                               # momentum
        (1.0 - h[1]).to(OPMATH),                       # one_minus_dampening
        h[2].to(OPMATH),                               # weight_decay
    )


@triton.jit
def sgd_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """One SGD step on a block (math/sgd.h Sgd::update): x = (param, grad,
    momentum_buffer), the buffer only with momentum (LISTS bit 2)."""
    neg_lr, momentum, one_minus_dampening, weight_decay = s[0], s[1], s[2], s[3]
    param = x[0]
    if VARIANT[0]:
        grad = grad + weight_decay * param
    momentum_buffer = x[2]
    if (LISTS >> 2) & 1:
        if VARIANT[2]:
            momentum_buffer = grad
        else:
            momentum_buffer = momentum_buffer * momentum + one_minus_dampening * grad
        if VARIANT[1]:
            grad = grad + momentum * momentum_buffer
        else:
            grad = momentum_buffer
    param = param + neg_lr * grad
    return param, x[1], momentum_buffer


# ---------------------------------------------------------------------------------
# Adagrad


adagrad_variant = l2_decay_variant


@triton.jit
def adagrad_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                    LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/adagrad.h Adagrad::scalars); h = (lr_decay, weight_decay, eps)."""
    return (
        (-lr_div(lr, 1.0 + (state[0] - 1.0) * h[0], LR_DTYPE)).to(OPMATH),  # neg_clr
        h[1].to(OPMATH),                               # weight_decay
        h[2].to(OPMATH),                               # eps
    )


@triton.jit
def adagrad_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/adagrad.h Adagrad::update): x = (param, grad, sum)."""
    neg_clr, weight_decay, eps = s[0], s[1], s[2]
    param = x[0]
    if VARIANT[0]:
        grad = grad + weight_decay * param
    state_sum = x[2] + grad * grad
    std = sqrt(state_sum) + eps
    param = param + div(neg_clr * grad, std)
    return param, x[1], state_sum


# ---------------------------------------------------------------------------------
# RMSprop


rmsprop_variant = l2_decay_variant


@triton.jit
def rmsprop_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                    LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/rmsprop.h RMSprop::scalars); h = (alpha, eps, weight_decay, momentum)."""
    return (
        h[0].to(OPMATH),                               # alpha
        (1.0 - h[0]).to(OPMATH),                       # one_minus_alpha
        h[1].to(OPMATH),                               # eps
        h[2].to(OPMATH),                               # weight_decay
        h[3].to(OPMATH),                               # momentum
        (-lr).to(OPMATH),                              # neg_lr
    )


@triton.jit
def rmsprop_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/rmsprop.h RMSprop::update): x = (param, grad, square_avg, grad_avg,
    momentum_buffer), grad_avg with centered (LISTS bit 3), the buffer with momentum
    (bit 4)."""
    alpha, one_minus_alpha, eps = s[0], s[1], s[2]
    weight_decay, momentum, neg_lr = s[3], s[4], s[5]
    param = x[0]
    if VARIANT[0]:
        grad = grad + weight_decay * param
    square_avg = x[2] * alpha + (one_minus_alpha * grad) * grad
    grad_avg = x[3]
    if (LISTS >> 3) & 1:
        grad_avg = lerp(grad_avg, grad, one_minus_alpha)
        avg = sqrt(square_avg - grad_avg * grad_avg)
    else:
        avg = sqrt(square_avg)
    avg = avg + eps
    buf = x[4]
    if (LISTS >> 4) & 1:
        buf = buf * momentum + div(grad, avg)
        param = param + neg_lr * buf
    else:
        param = param + div(neg_lr * grad, avg)
    return param, x[1], square_avg, grad_avg, buf


# ---------------------------------------------------------------------------------
# Adadelta


adadelta_variant = l2_decay_variant


@triton.jit
def adadelta_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                     LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/adadelta.h Adadelta::scalars); h = (rho, eps, weight_decay)."""
    return (
        h[0].to(OPMATH),                               # rho
        (1.0 - h[0]).to(OPMATH),                       # one_minus_rho
        h[1].to(OPMATH),                               # eps
        h[2].to(OPMATH),                               # weight_decay
        (-lr).to(OPMATH),                              # neg_lr
    )


@triton.jit
def adadelta_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/adadelta.h Adadelta::update): x = (param, grad, square_avg, acc_delta)."""
    rho, one_minus_rho, eps, weight_decay, neg_lr = s[0], s[1], s[2], s[3], s[4]
    param = x[0]
    if VARIANT[0]:
        grad = grad + weight_decay * param
    square_avg = x[2] * rho + (one_minus_rho * grad) * grad
    std = sqrt(square_avg + eps)
    delta = div(sqrt(x[3] + eps), std) * grad
    acc_delta = x[3] * rho + (one_minus_rho * delta) * delta
    param = param + neg_lr * delta
    return param, x[1], square_avg, acc_delta


# ---------------------------------------------------------------------------------
# Adamax


adamax_variant = l2_decay_variant


@triton.jit
def adamax_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                   LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/adamax.h Adamax::scalars); h = (beta1, beta2, eps, weight_decay)."""
    bias_correction = 1.0 - pow_int(h[0], state[0])
    return (
        (1.0 - h[0]).to(OPMATH),                       # one_minus_beta1
        h[1].to(OPMATH),                               # beta2
        h[2].to(OPMATH),                               # eps
        h[3].to(OPMATH),                               # weight_decay
        (-lr_div(lr, bias_correction, LR_DTYPE)).to(OPMATH),   # neg_clr
    )


@triton.jit
def adamax_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/adamax.h Adamax::update): x = (param, grad, exp_avg, exp_inf)."""
    one_minus_beta1, beta2, eps, weight_decay, neg_clr = s[0], s[1], s[2], s[3], s[4]
    param = x[0]
    if VARIANT[0]:
        grad = grad + weight_decay * param
    exp_avg = lerp(x[2], grad, one_minus_beta1)
    exp_inf = maximum(x[3] * beta2, tl.abs(grad) + eps)
    param = param + div(neg_clr * exp_avg, exp_inf)
    return param, x[1], exp_avg, exp_inf


# ---------------------------------------------------------------------------------
# Per-tensor scalar helpers of the optimizers below


@triton.jit
def pow_f64(base, exponent):
    """base ** exponent for float64 base > 0 and any float64 exponent, as
    exp(exponent * log(base)) (libdevice's pow does not run in the interpreter): within a
    few float64 ulps of C's pow for the exponents used here (|exponent * log(base)| <
    ~50), far below the float32 rounding every result then takes."""
    return tl.exp(exponent * tl.log(base))


@triton.jit
def lr_add_to(a, t, LR_DTYPE: tl.constexpr):
    """a + t for a value t of LR_DTYPE, in that dtype (torch's `1 + lambd * lr * t`)."""
    if LR_DTYPE == tl.float64:
        return a + t
    else:
        return _lr_round((a + t.to(tl.float32)).to(tl.float64), LR_DTYPE)


@triton.jit
def lr_pow(t, exponent, LR_DTYPE: tl.constexpr):
    """t ** exponent for a value t of LR_DTYPE, rounded to that dtype; the exponent (a
    Python float) unrounded, as ATen's pow takes it (LrMath::pow)."""
    if LR_DTYPE == tl.float64:
        return pow_f64(t, exponent)
    else:
        return _lr_round(pow_f64(t, exponent), LR_DTYPE)


# ---------------------------------------------------------------------------------
# NAdam


nadam_variant = adam_variant


@triton.jit
def _nadam_mu(h, step):
    """mu_t = beta1 * (1 - 0.5 * 0.96^(step * momentum_decay)) (math/nadam.h NAdam::mu)."""
    return h[0] * (1.0 - 0.5 * pow_f64(step * 0.0 + 0.96, step * h[4]))


@triton.jit
def nadam_advance(state, lr, h, STATE_F64: tl.constexpr, LR_DTYPE: tl.constexpr):
    """step += 1; mu_product *= mu_t, mu_t rounded to the state's dtype first."""
    step = state[0] + 1.0
    mu = _nadam_mu(h, step)
    if ((STATE_F64 >> 1) & 1) == 0:  # a float32 mu_product
        mu = mu.to(tl.float32).to(tl.float64)
    return (step, state[1] * mu)


@triton.jit
def nadam_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                  LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/nadam.h NAdam::scalars); state = (step, mu_product, ...), h = (beta1, beta2,
    eps, weight_decay, momentum_decay)."""
    step = state[0]
    mu_product = state[1]
    mu = _nadam_mu(h, step)
    mu_next = _nadam_mu(h, step + 1.0)
    return (
        (1.0 - h[0]).to(OPMATH),                       # one_minus_beta1
        h[1].to(OPMATH),                               # beta2
        (1.0 - h[1]).to(OPMATH),                       # one_minus_beta2
        (1.0 - pow_int(h[1], step)).to(OPMATH),        # bias_correction2
        h[2].to(OPMATH),                               # eps
        h[3].to(OPMATH),                               # weight_decay
        lr_sub_from(1.0, lr_mul(lr, h[3], LR_DTYPE), LR_DTYPE).to(OPMATH),  # decay_factor
        lr_div(lr_mul(-lr, 1.0 - mu, LR_DTYPE), 1.0 - mu_product, LR_DTYPE).to(OPMATH),
        lr_div(lr_mul(-lr, mu_next, LR_DTYPE), 1.0 - mu_product * mu_next,
               LR_DTYPE).to(OPMATH),                   # exp_avg_coef
    )


@triton.jit
def nadam_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/nadam.h NAdam::update): x = (param, grad, exp_avg, exp_avg_sq)."""
    one_minus_beta1, beta2, one_minus_beta2, bias_correction2 = s[0], s[1], s[2], s[3]
    eps, weight_decay, decay_factor, grad_coef, exp_avg_coef = s[4], s[5], s[6], s[7], s[8]
    param = x[0]
    if VARIANT[0] == WD_L2:
        grad = grad + weight_decay * param
    elif VARIANT[0] == WD_DECOUPLED:
        param = param * decay_factor
    exp_avg = lerp(x[2], grad, one_minus_beta1)
    exp_avg_sq = x[3] * beta2 + (one_minus_beta2 * grad) * grad
    denom = sqrt(div(exp_avg_sq, bias_correction2)) + eps
    param = param + div(grad_coef * grad, denom)
    param = param + div(exp_avg_coef * exp_avg, denom)
    return param, x[1], exp_avg, exp_avg_sq


# ---------------------------------------------------------------------------------
# RAdam


radam_variant = adam_variant


@triton.jit
def radam_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                  LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/radam.h RAdam::scalars); h = (beta1, beta2, eps, weight_decay). The square
    roots torch takes as ** 0.5 are IEEE square roots here (within an ulp of pow's, in
    float64)."""
    step = state[0]
    beta1 = h[0]
    beta2 = h[1]
    beta2_t = pow_int(beta2, step)
    bias_correction2 = 1.0 - beta2_t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / bias_correction2
    rectified = rho_t > 5.0
    rect = tl.where(rectified, tl.sqrt(tl.where(
        rectified, (rho_t - 4.0) * (rho_t - 2.0) * rho_inf
        / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 1.0)), 0.0)
    return (
        (1.0 - beta1).to(OPMATH),                      # one_minus_beta1
        beta2.to(OPMATH),                              # beta2
        (1.0 - beta2).to(OPMATH),                      # one_minus_beta2
        (1.0 - pow_int(beta1, step)).to(OPMATH),       # bias_correction1
        lr.to(OPMATH),                                 # lr
        tl.sqrt(bias_correction2).to(OPMATH),          # bias_correction2_sqrt
        rect.to(OPMATH),                               # rect
        tl.where(rectified, 1.0, 0.0).to(OPMATH),      # rectified
        h[2].to(OPMATH),                               # eps
        h[3].to(OPMATH),                               # weight_decay
        lr_sub_from(1.0, lr_mul(lr, h[3], LR_DTYPE), LR_DTYPE).to(OPMATH),  # decay_factor
    )


@triton.jit
def radam_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/radam.h RAdam::update): x = (param, grad, exp_avg, exp_avg_sq); the
    tensor's branch is s[7] (rectified), one value for the whole tensor."""
    one_minus_beta1, beta2, one_minus_beta2, bias_correction1 = s[0], s[1], s[2], s[3]
    lr, bias_correction2_sqrt, rect, rectified = s[4], s[5], s[6], s[7]
    eps, weight_decay, decay_factor = s[8], s[9], s[10]
    param = x[0]
    if VARIANT[0] == WD_L2:
        grad = grad + weight_decay * param
    elif VARIANT[0] == WD_DECOUPLED:
        param = param * decay_factor
    exp_avg = lerp(x[2], grad, one_minus_beta1)
    exp_avg_sq = x[3] * beta2 + (one_minus_beta2 * grad) * grad
    step = div(exp_avg, bias_correction1) * lr
    one = tl.zeros_like(exp_avg_sq) + 1.0
    adaptive_lr = div(one, sqrt(exp_avg_sq) + eps) * bias_correction2_sqrt
    param = tl.where(rectified != 0.0, param - (step * adaptive_lr) * rect, param - step)
    return param, x[1], exp_avg, exp_avg_sq


# ---------------------------------------------------------------------------------
# ASGD


asgd_variant = l2_decay_variant


@triton.jit
def asgd_advance(state, lr, h, STATE_F64: tl.constexpr, LR_DTYPE: tl.constexpr):
    """(math/asgd.h Asgd::advance): step += 1, then the next step's eta and mu, eta in
    lr's dtype; state = (step, eta, mu), h = (lambd, alpha, t0, weight_decay)."""
    step = state[0] + 1.0
    base = lr_add_to(1.0, lr_mul(lr_mul(lr, h[0], LR_DTYPE), step, LR_DTYPE), LR_DTYPE)
    eta = lr_div(lr, lr_pow(base, h[1], LR_DTYPE), LR_DTYPE)
    since_t0 = step - h[2]
    mu = 1.0 / tl.where(since_t0 > 1.0, since_t0, 1.0)
    if (STATE_F64 & 1) == 0:  # a float32 step: torch.as_tensor gives float32 (asgd.h)
        eta = eta.to(tl.float32).to(tl.float64)
        mu = mu.to(tl.float32).to(tl.float64)
    return (step, eta, mu)


@triton.jit
def asgd_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                 LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/asgd.h Asgd::scalars): from the eta and mu the previous step stored (the
    old values, state[3:]); h = (lambd, alpha, t0, weight_decay)."""
    eta = state[4]
    mu = state[5]
    return (
        (1.0 - h[0] * eta).to(OPMATH),                 # decay_factor
        (-eta).to(OPMATH),                             # neg_eta
        mu.to(OPMATH),                                 # mu
        tl.where(mu != 1.0, 1.0, 0.0).to(OPMATH),      # averaging
        h[3].to(OPMATH),                               # weight_decay
    )


@triton.jit
def asgd_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/asgd.h Asgd::update): x = (param, grad, ax)."""
    decay_factor, neg_eta, mu, averaging, weight_decay = s[0], s[1], s[2], s[3], s[4]
    param = x[0]
    if VARIANT[0]:
        grad = grad + weight_decay * param
    param = param * decay_factor
    param = param + neg_eta * grad
    ax = tl.where(averaging != 0.0, x[2] + (param - x[2]) * mu, param)
    return param, x[1], ax


# ---------------------------------------------------------------------------------
# Rprop


def rprop_variant(h) -> tuple[()]:
    """Rprop has no compile-time variant."""
    return ()


@triton.jit
def rprop_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                  LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/rprop.h Rprop::scalars); h = (step_size_min, step_size_max, etaminus,
    etaplus)."""
    return (h[0].to(OPMATH), h[1].to(OPMATH), h[2].to(OPMATH), h[3].to(OPMATH))


@triton.jit
def rprop_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/rprop.h Rprop::update): x = (param, grad, prev, step_size)."""
    step_size_min, step_size_max, etaminus, etaplus = s[0], s[1], s[2], s[3]
    prod = grad * x[2]
    factor = tl.where(prod > 0.0, etaplus, tl.where(prod < 0.0, etaminus, 1.0))
    step_size = x[3] * factor
    step_size = tl.where(step_size < step_size_min, step_size_min, step_size)
    step_size = tl.where(step_size > step_size_max, step_size_max, step_size)
    grad = tl.where(prod < 0.0, 0.0, grad)
    # -1 * sign(grad): -1, 1, or -0 for 0 and NaN (torch.sign gives 0 for both).
    negative_zero = tl.zeros_like(grad) * -1.0
    neg_sign = tl.where(grad > 0.0, -1.0, tl.where(grad < 0.0, 1.0, negative_zero))
    param = x[0] + neg_sign.to(grad.dtype) * step_size
    return param, x[1], grad, step_size


# ---------------------------------------------------------------------------------
# Muon's element-wise stages (fused_optim/muon.py; math/muon.h Muon)
#
# Two stages of one op, chosen by the `apply` flag: momentum (reads grad and buffer,
# writes the buffer and the bf16 update) and apply (reads param and update, writes the
# param). The params' storage rounding between two of torch's ops (bf16 / fp16 params)
# is a variant: _muon_stored.

MUON_BF16: tl.constexpr = tl.constexpr(1)
MUON_F16: tl.constexpr = tl.constexpr(2)


def muon_variant(h) -> tuple[bool, bool, int, bool]:
    """(apply, nesterov, the params' half dtype (MUON_BF16, MUON_F16 or 0), split add):
    Muon::variant. The split add is bf16 params' apply stage with a transposed update
    (kSplitAddBit: torch's strided add_ rounds alpha * O to bf16 before the sum)."""
    dtype = h["param_dtype"]
    half = (MUON_BF16.value if dtype == torch.bfloat16
            else MUON_F16.value if dtype == torch.float16 else 0)
    if h["apply"]:
        return (True, False, half, half == MUON_BF16.value and bool(h["transposed_update"]))
    return (False, bool(h["nesterov"]), half, False)


def muon_skip_reads(h) -> int:
    """Muon::reads: apply reads param and update only (not grad, buffer); momentum grad
    and buffer only (not param, update)."""
    return (1 << 1) | (1 << 2) if h["apply"] else (1 << 0) | (1 << 3)


def muon_skip_writes(h) -> int:
    """Muon::writes: apply writes the param only; momentum the buffer and the update."""
    return (1 << 2) | (1 << 3) if h["apply"] else 1 << 0


@triton.jit
def muon_scalars(state, lr, h, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                 LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(math/muon.h Muon::scalars); h = (momentum, weight_decay, lr_ratio). alpha =
    -lr * lr_ratio in lr's dtype, cast to bf16 for bf16 params (torch's add_ on a bf16
    tensor takes its alpha in bf16 on the CPU)."""
    momentum = h[0]
    alpha = -lr_mul(lr, h[2], LR_DTYPE)
    if VARIANT[2] == MUON_BF16:
        alpha = _lr_round(alpha, tl.bfloat16)
    return (
        (1.0 - momentum).to(OPMATH),                   # weight: torch's 1 - momentum
        momentum.to(OPMATH),                           # momentum
        lr_sub_from(1.0, lr_mul(lr, h[1], LR_DTYPE), LR_DTYPE).to(OPMATH),  # decay
        alpha.to(OPMATH),                              # alpha
    )


@triton.jit
def _muon_stored(x, HALF: tl.constexpr):
    """x as the params' storage holds it (Muon::stored): round_to the params' half dtype,
    else x."""
    if HALF == MUON_BF16:
        return round_to(x, tl.bfloat16)
    elif HALF == MUON_F16:
        return round_to(x, tl.float16)
    else:
        return x


@triton.jit
def muon_update(x, grad, s, LISTS: tl.constexpr, VARIANT: tl.constexpr):
    """(math/muon.h Muon::update): x = (param, grad, momentum_buffer, update); the lists
    a stage does not read are zeros (muon_skip_reads), those it does not write are
    returned as they came and not stored (muon_skip_writes).

      momentum:  B <- lerp(B, g, 1 - momentum); U <- lerp(g, B as stored, momentum)
                 with nesterov, else B (stored to the params' dtype, then bf16)
      apply:     p <- p * decay, stored in the params' dtype; p <- fma(alpha, O, p), or
                 for the split add p + (alpha * O stored in bf16)
    """
    weight, momentum, decay, alpha = s[0], s[1], s[2], s[3]
    param = x[0]
    buf = x[2]
    update = x[3]
    if VARIANT[0]:
        decayed = _muon_stored(param * decay, VARIANT[2])
        if VARIANT[3]:
            param = decayed + _muon_stored(alpha * update, VARIANT[2])
        else:
            param = tl.fma(alpha, update, decayed)
    else:
        buf = lerp_fused(buf, grad, weight)
        if VARIANT[1]:
            update = lerp_fused(grad, _muon_stored(buf, VARIANT[2]), momentum)
        else:
            update = buf
    return param, x[1], buf, update


# ---------------------------------------------------------------------------------
# Row maths: the row-sparse engine's per-element steps (triton_kernels/sparse.py)
#
# [note: row math] in csrc/include/fused_optim/math/optimizer.h: an optimizer that takes
# sparse grads (its spec's SparseGrads) has a row math named SparseGrads.math, here
# `<math>_rows(p, g, s, c, DTYPE) -> (p, s)`: one block of elements of a row its grad
# touches, p the param and s the tuple of its element-wise states (the spec's
# SparseGrads.states order), g the (summed, signed) grad, c the tuple of the tensor's
# per-tensor constants (SparseGrads.constants, float64 rounded once to opmath), all in
# opmath. The C++ struct's R::r(x) is `round_to(x, DTYPE)` here and R::add_scaled
# `add_scaled`, in the same order: torch.optim's sparse paths are sequences of tensor ops
# that each round to the param's dtype. `<math>_rows_shape` is the struct's kStates,
# kConstants, kCoalesce, which the engine checks a call against.


class RowShape(NamedTuple):
    states: int       # kStates: element-wise states, read and written
    constants: int    # kConstants: per-tensor constants
    coalesce: bool    # kCoalesce: a row's entries summed first, else applied in turn


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """r(x) of the row maths: x rounded to the storage dtype DTYPE (to nearest even) and
    back to x's opmath type; nothing to do for float32 and float64 storage, whose opmath
    is the storage type."""
    if DTYPE == tl.float32:
        return x
    elif DTYPE == tl.float64:
        return x
    else:
        return to_storage(x, DTYPE).to(x.dtype)


@triton.jit
def add_scaled(p, alpha, x, DTYPE: tl.constexpr):
    """torch's p.add_(x, alpha=alpha) on storage DTYPE (R::add_scaled of the row maths):
    one fused multiply-add in float32 / float64 (ATen's vectorized add kernel); in
    bfloat16 / float16, alpha rounded to the dtype, then a rounded product and a
    rounded sum."""
    if DTYPE == tl.float32:
        return tl.fma(alpha, x, p)
    elif DTYPE == tl.float64:
        return tl.fma(alpha, x, p)
    else:
        return round_to(p + round_to(round_to(alpha, DTYPE) * x, DTYPE), DTYPE)


sparse_adam_rows_shape = RowShape(states=2, constants=4, coalesce=True)


@triton.jit
def sparse_adam_rows(p, g, s, c, DTYPE: tl.constexpr):
    """torch.optim.SparseAdam on a block of a touched row (math/sparse_adam.h
    SparseAdamRows): s = (exp_avg, exp_avg_sq), c = (1 - beta1, 1 - beta2, eps,
    -step_size)."""
    m_old = s[0]
    v_old = s[1]
    m_upd = round_to(round_to(g - m_old, DTYPE) * c[0], DTYPE)
    m = round_to(m_old + m_upd, DTYPE)
    v_upd = round_to(round_to(round_to(g * g, DTYPE) - v_old, DTYPE) * c[1], DTYPE)
    v = round_to(v_old + v_upd, DTYPE)
    numer = round_to(m_upd + m_old, DTYPE)
    denom = round_to(round_to(sqrt(round_to(v_upd + v_old, DTYPE)), DTYPE) + c[2], DTYPE)
    p = round_to(p + round_to(c[3] * round_to(div(numer, denom), DTYPE), DTYPE), DTYPE)
    return p, (m, v)


adagrad_rows_shape = RowShape(states=1, constants=2, coalesce=True)


@triton.jit
def adagrad_rows(p, g, s, c, DTYPE: tl.constexpr):
    """torch.optim.Adagrad's sparse update of a block of a touched row (math/adagrad.h
    AdagradRows): s = (sum,), c = (eps, -clr); the param's add_(values, alpha=-clr) is
    add_scaled."""
    state_sum = round_to(s[0] + round_to(g * g, DTYPE), DTYPE)
    std = round_to(round_to(sqrt(state_sum), DTYPE) + c[0], DTYPE)
    p = add_scaled(p, c[1], round_to(div(g, std), DTYPE), DTYPE)
    return p, (state_sum,)


sgd_rows_shape = RowShape(states=0, constants=1, coalesce=False)


@triton.jit
def sgd_rows(p, g, s, c, DTYPE: tl.constexpr):
    """torch.optim.SGD without momentum on a block of a row, for ONE entry of the grad
    (math/sgd.h SgdRows: torch's param.add_(grad, alpha=-lr) adds the entries in turn,
    each an add_scaled): c = (-lr,), no state."""
    return add_scaled(p, c[0], g, DTYPE), s
