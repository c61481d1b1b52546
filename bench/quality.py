"""fused-optim-bench quality: does a memory policy train as well as fp32? Loss curves.

    fused-optim-bench quality                       # the issue's five configs, 300 steps
    fused-optim-bench quality --configs fp32,bf16 --steps 100 --out /tmp/q
    fused-optim-bench quality --configs all         # every row of POLICIES

The speed benchmarks say what a step costs; this says what a storage policy (bf16 params,
bf16 moments, stochastic rounding, fp32 master weights) costs in training quality. It
trains one small GPT-2-shaped decoder (``GPT``, plain torch, built from ``--seed``) on
synthetic text with a known floor (``MarkovSource``) once per policy (``POLICIES``: a
name, the params' dtype, the optimizer), and compares the loss curves.

The method:
* every policy starts from the same weights (initialised in fp32 from the seed, then cast
  to the policy's param dtype) and sees the same batches in the same order, with the
  same learning-rate schedule (default: GPT-2's, linear warm-up over steps // 10, then
  cosine decay to lr / 10); torch's global RNG is reseeded before each, so a policy
  that draws from it draws the same bits in every run;
* the loss is cross-entropy in fp32 on the model's logits (bf16 models compute in bf16,
  as a bf16 model does); the train loss of every step is kept, and a held-out set drawn
  from the same source is evaluated every ``--eval-every`` steps and at the end. The
  final loss compared across policies is the held-out one (one batch's train loss is
  noisy); the train loss is reported raw (last step) and smoothed (mean of the last
  ``steps // 20`` steps);
* the source is an order-2 Markov chain over the vocabulary: each token has
  ``--branching`` successors (a sparse bigram structure, learned first), whose
  probabilities are modulated by the token before it (learned later, through
  attention). Its entropy rate is computed exactly from the stationary distribution of
  token pairs, so the floor of the loss is known: a model that predicts each token from
  all the tokens before it, perfectly, scores ``floor`` = (H1 + (T-1) h) / T nats, h the
  entropy rate, H1 the bigram entropy (the first target of a window has one token of
  context only), T the context length. The bigram entropy is the plateau of a model
  that ignores the token two back;
* a policy whose optimizer options the installed fused_optim does not take (TypeError
  from its constructor) is reported "not available: <error>", never left out or
  replaced; one whose loss turns non-finite is reported "diverged" at that step.

Reported per policy: final held-out loss, its ratio to the fp32 policy's, its excess over
the floor against fp32's excess, wall time, the optimizer state's bytes per param (read
off the state after training), and, at each held-out evaluation's step, the fraction of
param elements that step left bit for bit unchanged (how bf16 params lose updates
smaller than half an ulp: fp32 params show ~0). The JSON keeps every step's loss; the
PNG draws the curves with the floor dashed. --out DIR writes
DIR/<device>/<stamp>-<commit>-quality.json and .png (committed runs: --out bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "GPT", "MarkovSource", "Policy", "POLICIES", "DEFAULT_POLICIES",
           "run", "validate", "plot", "main"]

SCHEMA = "fused_optim.bench.quality/1"


# --------------------------------------------------------------------------------------
# The model: a GPT-2-shaped decoder in plain torch
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    context: int = 64
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    tied: bool = True      # the LM head is the token embedding, as in GPT-2


class _Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln1(x)), then x + mlp(ln2(x)), GELU (tanh) MLP of 4 d."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Token and position embeddings, ``layers`` pre-LN blocks, final LayerNorm, LM head.
    GPT-2's initialisation: N(0, 0.02) weights, zero biases, the two residual projections
    of each block N(0, 0.02 / sqrt(2 layers))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"d_model {cfg.d_model} is not a multiple of heads {cfg.heads}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith("proj") else 0.02
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if cfg.tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------------------
# The data: an order-2 Markov chain with a known entropy rate
# --------------------------------------------------------------------------------------

def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dim (0 log 0 = 0)."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


class MarkovSource:
    """Tokens x_t with P(x_t = succ[b, j] | x_{t-2} = a, x_{t-1} = b) = probs[a, b, j]:
    each token b has ``branching`` successors succ[b] (distinct, random), and
    probs[a, b] = softmax_j(bigram[b, j] + order2[a, succ[b, j]]), both logit tables
    N(0, 1) times their scale. Sequences start from the stationary distribution of token
    pairs, so every window is stationary and the per-position floor is exact."""

    def __init__(self, vocab: int = 256, branching: int = 16, seed: int = 0,
                 bigram_scale: float = 1.0, order2_scale: float = 1.0):
        if not 1 <= branching <= vocab:
            raise ValueError(f"branching {branching} not in [1, vocab {vocab}]")
        self.vocab, self.branching = vocab, branching
        g = torch.Generator().manual_seed(seed)
        self.succ = torch.rand(vocab, vocab, generator=g).argsort(dim=1)[:, :branching]
        bigram = bigram_scale * torch.randn(vocab, branching, generator=g, dtype=torch.float64)
        order2 = order2_scale * torch.randn(vocab, vocab, generator=g, dtype=torch.float64)
        self.probs = torch.softmax(bigram[None, :, :] + order2[:, self.succ], dim=-1)
        self.pairs = self._stationary_pairs()
        pair_h = _entropy(self.probs)                                    # [a, b]
        self.entropy_rate = float((self.pairs * pair_h).sum())
        marg = self.pairs.sum(0)                                         # P(x_{t-1} = b)
        next_given_b = torch.einsum("ab,abj->bj", self.pairs, self.probs) / marg[:, None]
        self.bigram_entropy = float((marg * _entropy(next_given_b)).sum())
        self.unigram_entropy = float(_entropy(marg))

    def _stationary_pairs(self, tol: float = 1e-14, max_iter: int = 100_000) -> torch.Tensor:
        """pi[a, b] = P(x_{t-1} = a, x_t = b), by lazy power iteration (converges even if
        the chain were periodic) from the uniform distribution over possible pairs."""
        v = self.vocab
        pi = torch.zeros(v, v, dtype=torch.float64).scatter_(1, self.succ, 1.0)
        pi /= pi.sum()
        for _ in range(max_iter):
            flow = torch.einsum("ab,abj->bj", pi, self.probs)            # P(b, succ[b, j])
            new = 0.5 * (pi + torch.zeros_like(pi).scatter_(1, self.succ, flow))
            if (new - pi).abs().sum() < tol:
                return new
            pi = new
        raise RuntimeError("the pair chain's stationary distribution did not converge")

    def floor(self, context: int) -> float:
        """The loss of the Bayes predictor averaged over the positions of a window of
        ``context`` inputs (targets 1..T): the first has one token of context (H1)."""
        return (self.bigram_entropy + (context - 1) * self.entropy_rate) / context

    def sample(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """n stationary sequences of ``length`` tokens, [n, length] int64."""
        v = self.vocab
        first = torch.multinomial(self.pairs.flatten(), n, replacement=True, generator=generator)
        a, b = first // v, first % v
        out = [a, b]
        for _ in range(length - 2):
            j = torch.multinomial(self.probs[a, b], 1, generator=generator).squeeze(1)
            a, b = b, self.succ[b, j]
            out.append(b)
        return torch.stack(out[:length], dim=1)

    def to_dict(self, context: int) -> dict:
        return {"kind": "order-2 Markov chain, sparse successors", "vocab": self.vocab,
                "branching": self.branching, "entropy_rate_nats": self.entropy_rate,
                "bigram_entropy_nats": self.bigram_entropy,
                "unigram_entropy_nats": self.unigram_entropy,
                "uniform_nats": math.log(self.vocab), "floor_nats": self.floor(context),
                "floor_is": "(H1 + (T-1) h) / T: the Bayes loss averaged over a window"}


# --------------------------------------------------------------------------------------
# The policies: one row each
# --------------------------------------------------------------------------------------

Factory = Callable[[list, float, float], torch.optim.Optimizer]


def _kwargs_text(kw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items())


def _torch_adamw(**kw) -> tuple[str, Factory]:
    def make(params, lr, weight_decay):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    return f"torch.optim.AdamW({_kwargs_text(kw)})", make


def _fused_adamw(**kw) -> tuple[str, Factory]:
    def make(params, lr, weight_decay):
        import fused_optim

        return fused_optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    return f"fused_optim.AdamW({_kwargs_text(kw)})", make


@dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: torch.dtype
    optimizer: str           # what the factory builds, for the table and the JSON
    make: Factory
    default: bool = True     # run without --configs


def _row(name, dtype, opt, default=True):
    return Policy(name, dtype, *opt, default=default)


POLICIES: tuple[Policy, ...] = (
    _row("fp32", torch.float32, _torch_adamw()),
    _row("bf16", torch.bfloat16, _torch_adamw()),
    _row("bf16-stochastic-rounding", torch.bfloat16, _fused_adamw(stochastic_rounding=True)),
    _row("bf16-master-weights", torch.bfloat16, _fused_adamw(master_weights=True)),
    _row("fp32-bf16-state", torch.float32, _fused_adamw(state_dtype=torch.bfloat16)),
    # Not the issue's: fused_optim on bf16 params with no policy computes in fp32 and
    # rounds to nearest into bf16 (torch's for-loop above computes in bf16).
    _row("bf16-fused", torch.bfloat16, _fused_adamw(), default=False),
)
DEFAULT_POLICIES = tuple(p.name for p in POLICIES if p.default)
BASELINE = "fp32"


def resolve_policies(text: str) -> list[Policy]:
    by_name = {p.name: p for p in POLICIES}
    names = [t.strip() for t in text.split(",") if t.strip()]
    out: list[Policy] = []
    for n in names:
        if n == "all":
            out += POLICIES
        elif n == "default":
            out += [by_name[d] for d in DEFAULT_POLICIES]
        elif n in by_name:
            out.append(by_name[n])
        else:
            raise ValueError(f"unknown config {n!r}; known: {', '.join(by_name)}, default, all")
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------
# Training one policy
# --------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    schedule: str = "cosine"       # to lr / 10 at the end, after warm-up; or "constant"
    warmup: int | None = None      # linear warm-up steps (None: steps // 10)
    eval_every: int = 25
    eval_batches: int = 4
    seed: int = 0
    branching: int = 16
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if self.warmup is None:
            self.warmup = self.steps // 10


def _lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """GPT-2's recipe: linear warm-up, then cosine decay to lr / 10 at the last step
    (``step`` counts from 0)."""
    warmup = cfg.warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            t = (step - warmup) / max(1, cfg.steps - 1 - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0
    return factor


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def _eval(model, eval_data) -> float:
    return sum(_loss(model, b).item() for b in eval_data) / len(eval_data)


def _state_bytes(opt, params) -> dict:
    """The optimizer's state as stored: total bytes over the params' elements, and each
    key's dtype (a per-tensor scalar like ``step`` counts its bytes too; they are few)."""
    total, dtypes = 0, {}
    for p in params:
        for key, val in opt.state.get(p, {}).items():
            if torch.is_tensor(val):
                total += val.numel() * val.element_size()
                dtypes.setdefault(key, str(val.dtype).removeprefix("torch."))
    n = sum(p.numel() for p in params)
    return {"bytes": total, "bytes_per_param": total / n,
            "param_bytes_per_param": sum(p.numel() * p.element_size() for p in params) / n,
            "dtypes": dtypes}


def _smooth(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def train_policy(policy: Policy, init_state: dict, cfg: TrainConfig, batches, eval_data,
                 say=lambda msg: None) -> dict:
    out = {"name": policy.name, "param_dtype": str(policy.param_dtype).removeprefix("torch."),
           "optimizer": policy.optimizer, "status": "ok", "reason": None}
    t_start = time.perf_counter()
    model = GPT(cfg.model)
    model.load_state_dict(init_state)
    model.to(policy.param_dtype)
    params = list(model.parameters())
    try:
        opt = policy.make(params, cfg.lr, cfg.weight_decay)
    except TypeError as e:   # an option this fused_optim does not take (yet)
        out.update(status="not available", reason=f"not available: {e}")
        return out
    except Exception as e:  # noqa: BLE001  (reported, the other policies still run)
        out.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500])
        return out
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg))
    torch.manual_seed(cfg.seed)
    losses, eval_steps, eval_losses = [], [0], [_eval(model, eval_data)]
    unchanged, n_elements = [], sum(p.numel() for p in params)
    train_s = eval_s = 0.0
    try:
        for step, batch in enumerate(batches, start=1):
            probe = step % cfg.eval_every == 0 or step == len(batches)
            t0 = time.perf_counter()
            loss = _loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before = [p.detach().clone() for p in params] if probe else None
            opt.step()
            if probe:   # what this step left bit for bit as it was (~1 ms, timed)
                unchanged.append(sum(int((p.detach() == b).sum()) for p, b in
                                     zip(params, before)) / n_elements)
            sched.step()
            losses.append(loss.item())
            train_s += time.perf_counter() - t0
            if not math.isfinite(losses[-1]):
                out.update(status="diverged", reason=f"loss {losses[-1]} at step {step}")
                losses[-1] = None
                break
            if probe:
                t0 = time.perf_counter()
                eval_steps.append(step)
                eval_losses.append(_eval(model, eval_data))
                eval_s += time.perf_counter() - t0
                say(f"  {policy.name}: step {step}, train {losses[-1]:.4f}, "
                    f"held-out {eval_losses[-1]:.4f}")
    except Exception as e:  # noqa: BLE001  (reported, the other policies still run)
        out.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500])
    window = max(1, len(batches) // 20)
    done = [x for x in losses if x is not None]
    out.update({
        "steps_done": len(done), "train_loss": losses,
        "train_loss_smoothed": _smooth(done, window), "smoothing_window": window,
        "eval_steps": eval_steps, "eval_loss": eval_losses,
        "unchanged_fraction": unchanged,
        "final_loss": eval_losses[-1] if out["status"] == "ok" else None,
        "final_train_loss_raw": done[-1] if done and out["status"] == "ok" else None,
        "final_train_loss_smoothed": (sum(done[-window:]) / len(done[-window:])
                                      if done and out["status"] == "ok" else None),
        "wall_s": time.perf_counter() - t_start, "train_s": train_s, "eval_s": eval_s,
        "s_per_step": train_s / max(1, len(losses)),
        "state": _state_bytes(opt, params),
    })
    return out


# --------------------------------------------------------------------------------------
# A run: every policy, the same init and batches
# --------------------------------------------------------------------------------------

def run(cfg: TrainConfig, policies: list[Policy], say=lambda msg: None) -> dict:
    from . import machine

    t_run = time.perf_counter()
    facts = machine.facts(torch.device("cpu"))
    snap = machine.cpu_snapshot()
    m = cfg.model
    source = MarkovSource(m.vocab, cfg.branching, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    data = source.sample(cfg.steps * cfg.batch, m.context + 1, g).view(cfg.steps, cfg.batch, -1)
    eval_data = list(source.sample(cfg.eval_batches * cfg.batch, m.context + 1, g)
                     .view(cfg.eval_batches, cfg.batch, -1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        init = GPT(m)
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    n_params = sum(p.numel() for p in init.parameters())
    say(f"model {n_params:,} params ({m.layers} layers, d {m.d_model}, {m.heads} heads, "
        f"vocab {m.vocab}, context {m.context}, {'tied' if m.tied else 'untied'}); source "
        f"entropy rate {source.entropy_rate:.4f}, floor {source.floor(m.context):.4f} nats")
    runs = []
    batches = list(data)
    for policy in policies:
        say(f"{policy.name}: {policy.optimizer}, {policy.param_dtype} params")
        r = train_policy(policy, init_state, cfg, batches, eval_data, say)
        if r["status"] == "not available":
            say(f"  {policy.name}: {r['reason']}")
        elif r["status"] != "ok":
            say(f"  {policy.name}: {r['status']}: {r['reason']}")
        runs.append(r)
    _compare(runs, source.floor(m.context))
    facts["load_average_end"] = machine.load_average()
    facts["others_busy"] = machine.others_busy(snap, machine.cpu_snapshot())
    cfg_dict = asdict(cfg)
    cfg_dict["n_params"] = n_params
    cfg_dict["policies"] = [p.name for p in policies]
    return {"schema": SCHEMA, "created_unix": time.time(), "machine": facts,
            "config": cfg_dict, "source": source.to_dict(m.context),
            "floor": source.floor(m.context), "baseline": BASELINE, "runs": runs,
            "wall_s": time.perf_counter() - t_run}


def _compare(runs: list[dict], floor: float) -> None:
    """Each run's final losses against the fp32 run's: the ratio, and the ratio of the
    excess over the floor (which the ratio of losses compresses near the floor)."""
    base = next((r for r in runs if r["name"] == BASELINE and r["status"] == "ok"), None)
    for r in runs:
        ok = base is not None and r["status"] == "ok"
        r["ratio_to_fp32"] = r["final_loss"] / base["final_loss"] if ok else None
        r["train_ratio_to_fp32"] = (r["final_train_loss_smoothed"]
                                    / base["final_train_loss_smoothed"] if ok else None)
        r["excess_ratio_to_fp32"] = ((r["final_loss"] - floor) / (base["final_loss"] - floor)
                                     if ok and base["final_loss"] > floor else None)


# --------------------------------------------------------------------------------------
# Output: the schema, the table, the PNG
# --------------------------------------------------------------------------------------

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_TOP = {"schema": str, "created_unix": _NUM, "machine": dict, "config": dict, "source": dict,
        "floor": _NUM, "baseline": str, "runs": list, "wall_s": _NUM}
_RUN = {"name": str, "param_dtype": str, "optimizer": str, "status": str,
        "reason": (str, type(None))}
_RUN_DONE = {"steps_done": int, "train_loss": list, "train_loss_smoothed": list,
             "eval_steps": list, "eval_loss": list, "unchanged_fraction": list,
             "final_loss": _OPT_NUM,
             "final_train_loss_raw": _OPT_NUM, "final_train_loss_smoothed": _OPT_NUM,
             "ratio_to_fp32": _OPT_NUM, "train_ratio_to_fp32": _OPT_NUM,
             "excess_ratio_to_fp32": _OPT_NUM, "wall_s": _NUM, "train_s": _NUM,
             "s_per_step": _NUM, "state": dict}
_STATE = {"bytes": int, "bytes_per_param": _NUM, "param_bytes_per_param": _NUM, "dtypes": dict}
_STATUSES = ("ok", "not available", "diverged", "failed")


def _check(obj, spec: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, typ in spec.items():
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(obj[key], typ):
            raise ValueError(f"{where}.{key}: {type(obj[key]).__name__} is not {typ}")


def validate(doc: dict) -> None:
    """Raises ValueError naming the first place where ``doc`` breaks the schema."""
    _check(doc, _TOP, "doc")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"doc.schema: {doc['schema']!r} is not {SCHEMA!r}")
    for i, r in enumerate(doc["runs"]):
        where = f"doc.runs[{i}]"
        _check(r, _RUN, where)
        if r["status"] not in _STATUSES:
            raise ValueError(f"{where}.status: {r['status']!r} not in {_STATUSES}")
        if r["status"] == "not available" and not r["reason"].startswith("not available: "):
            raise ValueError(f"{where}.reason: {r['reason']!r}")
        if r["status"] != "ok" and "train_loss" not in r:
            if r["reason"] is None:
                raise ValueError(f"{where}: status {r['status']!r} without a reason")
            continue   # refused or failed before its first step
        _check(r, _RUN_DONE, where)
        _check(r["state"], _STATE, f"{where}.state")
        if r["status"] == "ok" and (r["final_loss"] is None
                                    or len(r["train_loss"]) != doc["config"]["steps"]):
            raise ValueError(f"{where}: status ok without a full curve")


def _fmt(x, spec):
    """format(x, spec), or a dash as wide (spec like '9.4f')."""
    return "-".rjust(int(spec.split(".")[0] or 0)) if x is None else format(x, spec)


def render_table(doc: dict) -> str:
    src, c, m = doc["source"], doc["config"], doc["config"]["model"]
    lines = [(f"{c['n_params']:,} params ({m['layers']} layers, d {m['d_model']}, vocab "
              f"{m['vocab']}, context {m['context']}), {c['steps']} steps of {c['batch']}, "
              f"lr {c['lr']:g} {c['schedule']}, seed {c['seed']}"),
             (f"source: entropy rate {src['entropy_rate_nats']:.4f}, bigram "
              f"{src['bigram_entropy_nats']:.4f}, uniform {src['uniform_nats']:.4f}; floor "
              f"{doc['floor']:.4f} nats"),
             (f"{'config':26s}{'params':>8s}{'held-out':>10s}{'vs fp32':>9s}{'excess':>8s}"
              f"{'train':>9s}{'kept':>7s}{'state B/p':>10s}{'s/step':>8s}{'wall s':>8s}"
              "  optimizer")]
    for r in doc["runs"]:
        if "train_loss" not in r:   # not available, or failed before its first step
            reason = r["reason"] if r["status"] == "not available" else (
                f"{r['status']}: {r['reason']}")
            lines.append(f"{r['name']:26s}{r['param_dtype']:>8s}  {reason}")
            continue
        note = "" if r["status"] == "ok" else f"  {r['status']}: {r['reason']}"
        kept = (f"{r['unchanged_fraction'][-1]:6.1%}" if r["unchanged_fraction"]
                else f"{'-':>6s}")
        lines.append(
            f"{r['name']:26s}{r['param_dtype']:>8s}{_fmt(r['final_loss'], '10.4f')}"
            f"{_fmt(r['ratio_to_fp32'], '9.4f')}{_fmt(r['excess_ratio_to_fp32'], '8.2f')}"
            f"{_fmt(r['final_train_loss_smoothed'], '9.4f')}"
            f" {kept}"
            f"{r['state']['bytes_per_param']:10.2f}{r['s_per_step']:8.3f}{r['wall_s']:8.1f}"
            f"  {r['optimizer']}{note}")
    lines.append("held-out: final loss on the held-out set; vs fp32: its ratio to fp32's; "
                 "excess: (loss - floor) / (fp32's loss - floor); train: mean of the last "
                 f"{max(1, c['steps'] // 20)} steps' train loss; kept: the param elements "
                 "the last step left unchanged")
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_ex) = plt.subplots(1, 2, figsize=(13, 5))
    floor = doc["floor"]
    done = [r for r in doc["runs"] if "train_loss" in r]
    for i, r in enumerate(done):
        color = f"C{i}"
        steps = range(1, len(r["train_loss"]) + 1)
        ax.plot(steps, [math.nan if x is None else x for x in r["train_loss"]],
                color=color, alpha=0.15, lw=0.6)
        ax.plot(range(1, len(r["train_loss_smoothed"]) + 1), r["train_loss_smoothed"],
                color=color, lw=1.4, label=f"{r['name']} ({r['optimizer']})")
        ax.plot(r["eval_steps"], r["eval_loss"], "o", color=color, ms=3)
        ax_ex.plot(r["eval_steps"], [max(x - floor, 1e-6) for x in r["eval_loss"]], "o-",
                   color=color, ms=3, label=r["name"])
    src = doc["source"]
    ax.axhline(floor, ls="--", color="k", lw=1, label=f"floor {floor:.3f} (entropy rate)")
    ax.axhline(src["bigram_entropy_nats"], ls=":", color="gray", lw=1,
               label=f"bigram entropy {src['bigram_entropy_nats']:.3f}")
    lo = floor - 0.1
    hi = max([r["eval_loss"][min(1, len(r["eval_loss"]) - 1)] for r in done] + [floor + 1])
    ax.set_ylim(lo, hi + 0.1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token): train, smoothed (line) and held-out (dots)")
    ax.legend(fontsize=7)
    ax_ex.set_yscale("log")
    ax_ex.set_xlabel("step")
    ax_ex.set_ylabel("held-out loss - floor (nats)")
    ax_ex.legend(fontsize=7)
    missing = [r for r in doc["runs"] if "train_loss" not in r]
    c, m = doc["config"], doc["config"]["model"]
    title = (f"{c['n_params']:,}-param GPT ({m['layers']}x{m['d_model']}), {c['steps']} "
             f"steps x {c['batch']}x{m['context']} tokens, AdamW lr {c['lr']:g} "
             f"{c['schedule']}, seed {c['seed']}; commit "
             f"{(doc['machine']['commit'].get('sha') or '?')[:10]}")
    for r in missing:
        why = r["reason"] if r["status"] == "not available" else f"{r['status']}: {r['reason']}"
        title += f"\n{r['name']}: {why}"[:160]
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d, dm = TrainConfig(), ModelConfig()
    ap = argparse.ArgumentParser(
        prog="fused-optim-bench quality", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configs: " + "; ".join(f"{p.name} = {p.param_dtype} params, {p.optimizer}"
                                       + ("" if p.default else " (not in default)")
                                       for p in POLICIES))
    ap.add_argument("--configs", default="default",
                    help="comma list of config names, 'default' (the issue's five: "
                         f"{','.join(DEFAULT_POLICIES)}) or 'all'")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--seed", type=int, default=d.seed,
                    help="the model's init, the source and the batches")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default=d.schedule,
                    help="after --warmup: constant, or cosine decay to lr/10 at the end")
    ap.add_argument("--warmup", type=int, default=d.warmup,
                    help="linear warm-up steps (default: --steps // 10)")
    ap.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches,
                    help="held-out batches of --batch sequences")
    ap.add_argument("--branching", type=int, default=d.branching,
                    help="successors of each token in the source")
    ap.add_argument("--vocab", type=int, default=dm.vocab)
    ap.add_argument("--context", type=int, default=dm.context)
    ap.add_argument("--d-model", type=int, default=dm.d_model)
    ap.add_argument("--layers", type=int, default=dm.layers)
    ap.add_argument("--heads", type=int, default=dm.heads)
    ap.add_argument("--untied", action="store_true", help="an LM head of its own")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice); on a shared "
                         "machine 1 thread wastes less time spinning")
    ap.add_argument("--out", default="results",
                    help="write OUT/<device>/<stamp>-<commit>-quality.json and .png "
                         "(default: results; committed runs: bench/results)")
    ap.add_argument("--no-plot", action="store_true", help="the JSON only")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        policies = resolve_policies(args.configs)
    except ValueError as e:
        ap.error(str(e))
    if args.steps < 1 or args.batch < 1 or args.eval_every < 1 or args.eval_batches < 1:
        ap.error("--steps, --batch, --eval-every and --eval-batches must be >= 1")
    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr,
                      weight_decay=args.weight_decay, schedule=args.schedule,
                      warmup=args.warmup, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, seed=args.seed, branching=args.branching,
                      model=ModelConfig(vocab=args.vocab, context=args.context,
                                        d_model=args.d_model, layers=args.layers,
                                        heads=args.heads, tied=not args.untied))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    say = (lambda msg: None) if args.quiet else (
        lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        doc = run(cfg, policies, say)
    except ValueError as e:
        print(f"fused-optim-bench quality: {e}", file=sys.stderr)
        return 2
    doc["argv"] = list(argv) if argv is not None else sys.argv[1:]
    validate(doc)
    print(render_table(doc))
    from .machine import results_dir

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(doc["created_unix"]))
    sha = (doc["machine"]["commit"].get("sha") or "nocommit")[:10]
    base = os.path.join(args.out, results_dir(doc["machine"]), f"{stamp}-{sha}-quality")
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {base}.json")
    if not args.no_plot:
        plot(doc, base + ".png")
        print(f"wrote {base}.png")
    # A policy that diverges is a finding; one that fails (an error) is not.
    return 1 if any(r["status"] == "failed" for r in doc["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
