"""The random bits and the stochastic rounding into bf16 of the memory policy (issue 14;
[note: stochastic rounding] in csrc/include/fused_optim/math/stochastic.h), on the
Python side: a plain-Python Philox4x32-10 against Random123's known-answer vectors (the
C++ one is checked against the same vectors by ctest, test_stochastic.cpp), Triton's
tl.randint4x and triton_kernels.math.to_bf16_stochastic under the interpreter against
it and against a torch bit-level reference, and that reference's unbiasedness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
M32 = 0xFFFFFFFF


def philox4x32_10(c: list[int], k0: int, k1: int) -> list[int]:
    c = list(c)
    for _ in range(10):
        c0, c2 = c[0], c[2]
        c[0] = ((0xCD9E8D57 * c2) >> 32) ^ c[1] ^ k0
        c[2] = ((0xD2511F53 * c0) >> 32) ^ c[3] ^ k1
        c[1] = (0xCD9E8D57 * c2) & M32
        c[3] = (0xD2511F53 * c0) & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def random_words(seed: int, offset: int) -> list[int]:
    """Triton's tl.randint4x(seed, offset) layout: key (seed lo, hi), counter (offset lo,
    hi, 0, 0)."""
    return philox4x32_10([offset & M32, offset >> 32, 0, 0], seed & M32, seed >> 32)


def bf16_stochastic(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The rounding on bit patterns, in torch integer ops (int64: no overflow)."""
    u = x.float().view(torch.int32).to(torch.int64) & M32
    b = (u + (r.to(torch.int64) & 0xFFFF)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    b = torch.where(nan, (u >> 16) | 0x40, b) & 0xFFFF
    b = b - ((b >> 15) & 1) * 0x10000  # as a signed 16-bit value: no float conversion
    return b.to(torch.int16).view(torch.bfloat16)


def test_philox_known_answers():
    assert philox4x32_10([0, 0, 0, 0], 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10([M32] * 4, M32, M32) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                  0x6D5451FD]
    assert philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], 0xA4093822,
                         0x299F31D0) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_reference_rounding_is_unbiased():
    """Over all 2^16 random values the rounding of x averages to x exactly."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=gen) * torch.logspace(-20, 20, 64)
    r = torch.arange(1 << 16, dtype=torch.int64)
    for v in x:
        y = bf16_stochastic(v.expand(r.numel()), r).double()
        assert y.mean().item() == v.double().item()
        # two neighbouring bf16 values at most: v rounded toward zero and away from it
        lo, hi = y.abs().min().item(), y.abs().max().item()
        assert y.unique().numel() <= 2
        assert hi == lo or (torch.tensor(hi).bfloat16().view(torch.int16).item()
                            - torch.tensor(lo).bfloat16().view(torch.int16).item()) == 1


_SCRIPT = r"""
import json, sys, torch, triton, triton.language as tl
from fused_optim.triton_kernels.math import to_bf16_stochastic

@triton.jit
def kernel(x_ptr, words_ptr, out_ptr, seed, N: tl.constexpr):
    i = tl.arange(0, N)
    off = i.to(tl.int64) * 1000003 + 0x123456789
    a, b, c, d = tl.randint4x(seed, off)
    tl.store(words_ptr + i * 4 + 0, a)
    tl.store(words_ptr + i * 4 + 1, b)
    tl.store(words_ptr + i * 4 + 2, c)
    tl.store(words_ptr + i * 4 + 3, d)
    tl.store(out_ptr + i, to_bf16_stochastic(tl.load(x_ptr + i), a))

N = 64
x = torch.tensor(json.loads(sys.argv[1]), dtype=torch.int32).view(torch.float32)
words = torch.zeros(N * 4, dtype=torch.int32)
out = torch.zeros(N, dtype=torch.bfloat16)
kernel[(1,)](x, words, out, int(sys.argv[2]), N=N)
print(json.dumps({"words": [w & 0xFFFFFFFF for w in words.tolist()],
                  "out": out.view(torch.int16).tolist()}))
"""


def test_triton_matches_the_reference_bit_for_bit():
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(1 << 31), (1 << 31) - 1, (64,), generator=gen, dtype=torch.int64)
    bits[:4] = torch.tensor([0x7F800000, 0x7FC00001, -1, 0x7F7FC000])  # inf, NaNs, big
    seed = 0x1234567890ABCDEF
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(bits.tolist()), str(seed)],
                         env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    want_words = []
    for i in range(64):
        want_words += random_words(seed, i * 1000003 + 0x123456789)
    assert got["words"] == want_words
    x = bits.to(torch.int32).view(torch.float32)
    r = torch.tensor(want_words[0::4], dtype=torch.int64)
    want = bf16_stochastic(x, r).view(torch.int16).tolist()
    assert got["out"] == want
