"""The memory policy: how an element-wise optimizer stores what it updates (issue 14).

A policy is chosen per param group with three options every element-wise optimizer
takes, and changes storage only, never the algorithm (DESIGN.md: "Compute in fp32
(opmath), store in the storage dtype"):

  * ``state_dtype``: the dtype of every element-wise state tensor (moments, sums,
    buffers; not the per-tensor scalars such as ``step``). None (the default) keeps
    torch.optim's choice: the dtype of what the math updates (the param, or its fp32
    master copy). Values are computed in fp32 and rounded once on store.
  * ``master_weights``: bf16 / fp16 params get an fp32 copy, state key ``master_param``;
    the kernels update the copy and write the param rounded from it in the same pass.
  * ``stochastic_rounding``: every bf16 store (the param without a master copy, bf16
    states) rounds stochastically ([note: stochastic rounding] in
    csrc/include/fused_optim/math/stochastic.h), from Philox4x32-10 keyed on a per-param
    seed and counted from a per-param offset, state key ``rng_state`` (int64
    ``[seed, offset]``); see ``[note: the policy's random bits]`` below.

With none of them set (the defaults) a step is torch.optim's, bit for bit.

[note: the policy's random bits]
Element i of a param (its position in the param's memory, as the kernels index it) at a
step rounds with the four 32-bit words of Philox4x32-10 at counter ``offset + i`` under
key ``seed`` (the layout of Triton's tl.randint4x(seed, offset)): word 0 for the param,
word 1 + k for the k-th state list the call keeps. After the step the offset advances by
the param's element count, so no counter repeats. The seed is drawn when the state is
created, from the seed of the torch generator of the param's device
(``torch.manual_seed``) and the param's index in the optimizer, so a run is
reproducible from its seed, and a checkpoint, which holds ``rng_state``, resumes
bit-identically. A skipped step (GradScaler's found_inf) advances nothing.

The combinations the engines run (``POLICIES``) are validated per param, when a group is
added (ValueError naming the param and what is allowed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Policy", "POLICY_KEYS", "MASTER_KEY", "RNG_KEY", "policy_of", "check_group",
           "state_dtype", "storage", "new_rng_state", "philox_words", "bf16_stochastic",
           "round_to"]

MASTER_KEY = "master_param"
RNG_KEY = "rng_state"
# The param group keys of a policy, with torch.optim's behaviour as their defaults.
POLICY_KEYS = {"state_dtype": None, "master_weights": False, "stochastic_rounding": False}

_F32, _BF16, _F16, _F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# (param dtype, state dtype, master_weights, stochastic_rounding): every combination the
# engines run, beside the uniform ones (states of the param's dtype, no master copy, no
# stochastic rounding: torch.optim's).
POLICIES = frozenset({
    (_F32, _BF16, False, False),   # fp32 params, bf16 states
    (_F32, _BF16, False, True),    # ... rounded stochastically
    (_BF16, _F32, False, False),   # bf16 params, fp32 states
    (_BF16, _F32, False, True),    # ... the params rounded stochastically
    (_BF16, _BF16, False, True),   # bf16 params and states, both rounded stochastically
    (_BF16, _F32, True, False),    # bf16 params, fp32 master copy and states
    (_BF16, _BF16, True, False),   # ... bf16 states
    (_BF16, _BF16, True, True),    # ... bf16 states rounded stochastically
    (_F16, _F32, True, False),     # fp16 params, fp32 master copy and states
})


@dataclass(frozen=True)
class Policy:
    """A param group's policy: its three options."""

    state_dtype: torch.dtype | None = None
    master_weights: bool = False
    stochastic_rounding: bool = False

    @property
    def default(self) -> bool:
        """True for torch.optim's storage (nothing set)."""
        return (self.state_dtype is None and not self.master_weights
                and not self.stochastic_rounding)


_DEFAULT = Policy()


def policy_of(group: dict[str, Any]) -> Policy:
    """The policy of a param group (torch.optim's for a group without the keys)."""
    state = group.get("state_dtype")
    master = group.get("master_weights", False)
    rounding = group.get("stochastic_rounding", False)
    if state is None and not master and not rounding:
        return _DEFAULT
    return Policy(state, bool(master), bool(rounding))


def state_dtype(policy: Policy, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a param's element-wise state tensors under `policy`."""
    if policy.state_dtype is not None:
        return policy.state_dtype
    return _F32 if policy.master_weights else param_dtype


def storage(policy: Policy, param_dtype: torch.dtype) -> tuple | None:
    """The engines' storage tuple (param dtype, state dtype, master, stochastic) of a
    param under `policy`; None for torch.optim's uniform storage."""
    if policy.default:
        return None
    key = (param_dtype, state_dtype(policy, param_dtype), policy.master_weights,
           policy.stochastic_rounding)
    if key[1] == param_dtype and not key[2] and not key[3]:
        return None  # e.g. state_dtype=torch.float32 on fp32 params
    return key


def _allowed(param_dtype: torch.dtype) -> str:
    combos = sorted({f"state_dtype={str(s).removeprefix('torch.')}"
                     + (", master_weights=True" if m else "")
                     + (", stochastic_rounding=True" if r else "")
                     for p, s, m, r in POLICIES if p == param_dtype})
    if not combos:
        return f"{param_dtype} params take no memory policy (only state_dtype={param_dtype})"
    return f"for {param_dtype} params: " + "; ".join(combos)


def check_group(group: dict[str, Any], owner: str) -> None:
    """Checks a param group's policy options and that each param's dtype can take them:
    ValueError naming the option or the param otherwise (at construction and in
    add_param_group, before anything is created)."""
    state = group.get("state_dtype")
    if state is not None and not isinstance(state, torch.dtype):
        raise ValueError(f"{owner}: state_dtype must be a torch.dtype or None, got "
                         f"{type(state).__name__} {state!r}")
    if state is not None and state not in (_F32, _BF16, _F16, _F64):
        raise ValueError(f"{owner}: state_dtype must be a floating-point dtype "
                         f"(torch.float32 or torch.bfloat16), got {state}")
    for key in ("master_weights", "stochastic_rounding"):
        if not isinstance(group.get(key, False), bool):
            raise ValueError(f"{owner}: {key} must be a bool, got "
                             f"{type(group[key]).__name__} {group[key]!r}")
    policy = policy_of(group)
    if policy.default:
        return
    if group.get("differentiable"):
        raise ValueError(f"{owner}: a memory policy (state_dtype, master_weights, "
                         "stochastic_rounding) cannot be combined with differentiable=True")
    for i, p in enumerate(group["params"]):
        dtype = p.dtype
        if policy.master_weights and dtype not in (_BF16, _F16):
            raise ValueError(
                f"{owner}: master_weights=True keeps an fp32 copy of bfloat16 or float16 "
                f"params, but param {i} of the group is {dtype}")
        if policy.stochastic_rounding and not (
                (dtype == _BF16 and not policy.master_weights)
                or state_dtype(policy, dtype) == _BF16):
            raise ValueError(
                f"{owner}: stochastic_rounding=True rounds bf16 stores, but param {i} of "
                f"the group ({dtype}) has none: it needs bfloat16 params without "
                "master_weights, or state_dtype=torch.bfloat16")
        key = storage(policy, dtype)
        if key is not None and key not in POLICIES:
            raise ValueError(
                f"{owner}: param {i} of the group is {dtype}, which cannot take "
                f"state_dtype={key[1]}" + (", master_weights=True" if key[2] else "")
                + (", stochastic_rounding=True" if key[3] else "")
                + f"; allowed {_allowed(dtype)}")


# -- the random bits and the rounding, in torch ops (the reference backend) -----------

_M32 = 0xFFFFFFFF


def _mulhilo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b, for int64 tensors a < 2^32 and b < 2^32, in
    int64 arithmetic without overflow (b split into 16-bit halves)."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _M32


def philox_words(seed: Tensor, counters: Tensor) -> list[Tensor]:
    """The four words of Philox4x32-10 at each counter (an int64 tensor of values below
    2^63) under the 64-bit key `seed` (an int64 tensor, its bits), as
    math/stochastic.h's random_words and Triton's tl.randint4x: int64 tensors of
    values below 2^32."""
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, 0xCD9E8D57)
        hi_a, lo_a = _mulhilo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return [c0, c1, c2, c3]


def bf16_stochastic(x: Tensor, r: Tensor) -> Tensor:
    """float32 x rounded to bfloat16 stochastically with the random words r (their low
    16 bits), on bit patterns in int64 ops: the same bits as bf16_bits_stochastic in
    math/stochastic.h."""
    u = x.float().view(torch.int32).to(torch.int64) & _M32
    b = (u + (r & 0xFFFF)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    b = torch.where(nan, (u >> 16) | 0x40, b) & 0xFFFF
    b = b - ((b >> 15) & 1) * 0x10000  # as a signed 16-bit value
    return b.to(torch.int16).view(torch.bfloat16)


def memory_offsets(t: Tensor) -> Tensor:
    """Each element's offset in t's memory (int64, t's shape): the index i by which the
    kernels count its random bits."""
    offsets = torch.zeros(t.shape, dtype=torch.int64, device=t.device)
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[d] = size
        offsets = offsets + (torch.arange(size, device=t.device) * stride).reshape(shape)
    return offsets


def round_to(value: Tensor, dtype: torch.dtype, words: Tensor | None) -> Tensor:
    """value (opmath) rounded to `dtype` for a store: stochastically into bf16 when
    `words` (the element's random words for this list) are given, else to nearest."""
    if words is not None and dtype == _BF16:
        return bf16_stochastic(value, words)
    return value.to(dtype)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _generator_seed(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0].initial_seed()
    return torch.initial_seed()


def new_rng_state(p: Tensor, index: int) -> Tensor:
    """A param's ``rng_state`` ([note: the policy's random bits]): int64 [seed, 0] on its
    device, the seed mixed from the device generator's seed and the param's index."""
    seed = _splitmix64(_generator_seed(p.device) ^ _splitmix64(index))
    if seed >= 1 << 63:
        seed -= 1 << 64  # the same 64 bits, as int64
    return torch.tensor([seed, 0], dtype=torch.int64, device=p.device)
