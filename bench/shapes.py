"""Parameter shape lists to benchmark: real models, synthetic sweeps, literal NxM.

An element-wise optimizer step costs what its tensors cost: their total size (bandwidth)
and their count (launches, per-tensor overhead). So a model is benchmarked as its list of
parameter shapes, nothing else.

Real models live in bench/shapes/<name>.json (package data). Each is derived here from the
architecture's published dimensions by a ``_build_*`` function, not downloaded; the JSON
files are written by ``python -m fused_optim.bench.shapes`` and tests check that both agree
and that the totals match the models' known parameter counts.

Spec strings accepted by ``resolve`` (the CLI's --shapes):
  gpt2-124m, llama-1b, llama-1b-layer, llama-7b-layer, resnet50, bert-base   real models
  sweep-size     8 tensors, total 2M..128M elements          (bandwidth-bound)
  sweep-count    16M elements in 1..4096 tensors              (launch-bound)
  NxM            N tensors of M elements, M may end in K (x1024) or M (x1024^2): 8x4M
  embedding-1m, embedding-100k, embedding-100k-hot            sparse grads (EMBEDDINGS)
  embeddings     the three of them
  embRxD:L[:H]   Embedding(R, D) with L lookups a step [drawn from H hot rows]:
                 emb1000x16:256, emb1000x16:256:8 (R, L, H may end in K or M as above)

An embedding shape is one ``nn.Embedding(R, D, sparse=True)`` table: its grads are sparse
COO tensors as the embedding's backward makes them (the runner draws them, see
``Embedding``), so only the optimizers that take sparse grads run on it, and a step costs
the rows the lookups touch, not the table.

``scale`` multiplies every tensor's element count of the real models and sweeps (tensor
count unchanged, so launch-bound shapes stay launch-bound); literal NxM specs and
embedding shapes are taken as written (an embedding step's cost is set by its lookups,
and the issue's sizes are the point).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

__all__ = ["Shape", "Embedding", "resolve", "load_model", "MODELS", "SWEEPS", "EMBEDDINGS",
           "DEFAULT_SHAPES"]

SHAPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes")

# The foundation issue's two synthetic shapes (at full size) and two real models.
DEFAULT_SHAPES = ["8x4M", "2048x16K", "gpt2-124m", "resnet50"]


@dataclass(frozen=True)
class Embedding:
    """One ``nn.Embedding(num_embeddings, embedding_dim, sparse=True)`` and the lookups of
    a step: ``lookups`` row indices drawn uniformly from all rows, or, with ``hot_rows``,
    from that many rows (drawn once, uniformly): heavy duplication, ~lookups / hot_rows
    entries per touched row. The grad of a step is what the embedding's backward makes:
    an uncoalesced sparse COO tensor, indices [1, lookups] (duplicates included), values
    [lookups, embedding_dim]."""

    num_embeddings: int
    embedding_dim: int
    lookups: int
    hot_rows: int | None = None

    def describe(self) -> str:
        draw = (f"from {self.hot_rows:,} hot rows" if self.hot_rows
                else "uniform over the rows")
        return (f"Embedding({self.num_embeddings:,}, {self.embedding_dim}), "
                f"{self.lookups:,} lookups a step {draw}")

    def to_dict(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "lookups": self.lookups, "hot_rows": self.hot_rows}


@dataclass(frozen=True)
class Shape:
    """One benchmarked parameter list: the element count of each tensor; for an
    embedding shape, its one table and the lookups of a step (``embedding``)."""

    name: str
    sizes: tuple[int, ...]
    group: str = ""          # "model", "sweep-size", "sweep-count", "literal", "embedding"
    scale: float = 1.0       # applied to the original sizes
    source: str = ""
    embedding: Embedding | None = None

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def sparse(self) -> bool:
        """The grads are sparse (an embedding shape)."""
        return self.embedding is not None

    def dims(self) -> list[tuple[int, ...]]:
        """Each tensor's shape: 1-D for a parameter list, [rows, dim] for an embedding."""
        if self.embedding is not None:
            return [(self.embedding.num_embeddings, self.embedding.embedding_dim)]
        return [(n,) for n in self.sizes]

    def to_dict(self) -> dict:
        d = {"name": self.name, "group": self.group, "scale": self.scale,
             "n_tensors": self.count, "numel": self.numel, "source": self.source,
             "min_tensor": min(self.sizes), "max_tensor": max(self.sizes)}
        if self.embedding is not None:
            d["embedding"] = self.embedding.to_dict()
        return d


# --------------------------------------------------------------------------------------
# Real models, from their architectures' dimensions.
# --------------------------------------------------------------------------------------

def _build_gpt2_124m():
    # GPT-2 small (Radford et al. 2019; HF "gpt2"): n_layer 12, n_embd 768, n_ctx 1024,
    # vocab 50257, Conv1D weights stored (in, out), LM head tied to wte. 124,439,808.
    d, L, V, T = 768, 12, 50257, 1024
    ps = [("wte.weight", [V, d]), ("wpe.weight", [T, d])]
    for i in range(L):
        h = f"h.{i}."
        ps += [(h + "ln_1.weight", [d]), (h + "ln_1.bias", [d]),
               (h + "attn.c_attn.weight", [d, 3 * d]), (h + "attn.c_attn.bias", [3 * d]),
               (h + "attn.c_proj.weight", [d, d]), (h + "attn.c_proj.bias", [d]),
               (h + "ln_2.weight", [d]), (h + "ln_2.bias", [d]),
               (h + "mlp.c_fc.weight", [d, 4 * d]), (h + "mlp.c_fc.bias", [4 * d]),
               (h + "mlp.c_proj.weight", [4 * d, d]), (h + "mlp.c_proj.bias", [d])]
    ps += [("ln_f.weight", [d]), ("ln_f.bias", [d])]
    return ps, "GPT-2 small: 12 layers, d_model 768, vocab 50257, ctx 1024, tied LM head"


def _llama_layer(prefix, d, d_ff, n_heads, n_kv_heads):
    hd = d // n_heads
    kv = n_kv_heads * hd
    return [(prefix + "self_attn.q_proj.weight", [d, d]),
            (prefix + "self_attn.k_proj.weight", [kv, d]),
            (prefix + "self_attn.v_proj.weight", [kv, d]),
            (prefix + "self_attn.o_proj.weight", [d, d]),
            (prefix + "mlp.gate_proj.weight", [d_ff, d]),
            (prefix + "mlp.up_proj.weight", [d_ff, d]),
            (prefix + "mlp.down_proj.weight", [d, d_ff]),
            (prefix + "input_layernorm.weight", [d]),
            (prefix + "post_attention_layernorm.weight", [d])]


# Llama-3.2-1B: hidden 2048, 16 layers, FFN 8192, 32 heads, 8 KV heads (GQA), vocab
# 128256, tied embeddings, no biases. 1,235,814,400 parameters.
_LLAMA_1B = dict(d=2048, d_ff=8192, n_heads=32, n_kv_heads=8)


def _build_llama_1b():
    ps = [("model.embed_tokens.weight", [128256, 2048])]
    for i in range(16):
        ps += _llama_layer(f"model.layers.{i}.", **_LLAMA_1B)
    ps += [("model.norm.weight", [2048])]
    return ps, "Llama-3.2-1B style: 16 layers, d 2048, FFN 8192, GQA 32/8 heads, vocab 128256, tied"


def _build_llama_1b_layer():
    return (_llama_layer("model.layers.0.", **_LLAMA_1B),
            "one decoder layer of the Llama-3.2-1B style model (9 tensors)")


def _build_llama_7b_layer():
    # Llama-2-7B: hidden 4096, FFN 11008, 32 heads, MHA (32 KV heads). 202,383,360.
    return (_llama_layer("model.layers.0.", d=4096, d_ff=11008, n_heads=32, n_kv_heads=32),
            "one decoder layer of Llama-2-7B: d 4096, FFN 11008, 32 heads (9 tensors)")


def _build_resnet50():
    # torchvision resnet50 (He et al. 2016, v1.5): Bottleneck blocks [3, 4, 6, 3], widths
    # 64..512, expansion 4, BatchNorm weight + bias, fc 2048 -> 1000. 25,557,032
    # parameters in 161 tensors: many small ones (launch-bound).
    ps = [("conv1.weight", [64, 3, 7, 7]), ("bn1.weight", [64]), ("bn1.bias", [64])]
    inplanes = 64
    for li, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            pre = f"layer{li}.{b}."
            ps += [(pre + "conv1.weight", [width, inplanes, 1, 1]),
                   (pre + "bn1.weight", [width]), (pre + "bn1.bias", [width]),
                   (pre + "conv2.weight", [width, width, 3, 3]),
                   (pre + "bn2.weight", [width]), (pre + "bn2.bias", [width]),
                   (pre + "conv3.weight", [width * 4, width, 1, 1]),
                   (pre + "bn3.weight", [width * 4]), (pre + "bn3.bias", [width * 4])]
            if b == 0:
                ps += [(pre + "downsample.0.weight", [width * 4, inplanes, 1, 1]),
                       (pre + "downsample.1.weight", [width * 4]),
                       (pre + "downsample.1.bias", [width * 4])]
            inplanes = width * 4
    ps += [("fc.weight", [1000, 2048]), ("fc.bias", [1000])]
    return ps, "ResNet-50 (torchvision): 161 tensors, most of them small"


def _build_bert_base():
    # BERT-base uncased (Devlin et al. 2018; HF BertModel with pooler): 12 layers, d 768,
    # FFN 3072, vocab 30522, 512 positions, 2 token types. 109,482,240 parameters.
    d, L, V, P, ff = 768, 12, 30522, 512, 3072
    ps = [("embeddings.word_embeddings.weight", [V, d]),
          ("embeddings.position_embeddings.weight", [P, d]),
          ("embeddings.token_type_embeddings.weight", [2, d]),
          ("embeddings.LayerNorm.weight", [d]), ("embeddings.LayerNorm.bias", [d])]
    for i in range(L):
        pre = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            ps += [(pre + f"attention.self.{m}.weight", [d, d]),
                   (pre + f"attention.self.{m}.bias", [d])]
        ps += [(pre + "attention.output.dense.weight", [d, d]),
               (pre + "attention.output.dense.bias", [d]),
               (pre + "attention.output.LayerNorm.weight", [d]),
               (pre + "attention.output.LayerNorm.bias", [d]),
               (pre + "intermediate.dense.weight", [ff, d]),
               (pre + "intermediate.dense.bias", [ff]),
               (pre + "output.dense.weight", [d, ff]), (pre + "output.dense.bias", [d]),
               (pre + "output.LayerNorm.weight", [d]), (pre + "output.LayerNorm.bias", [d])]
    ps += [("pooler.dense.weight", [d, d]), ("pooler.dense.bias", [d])]
    return ps, "BERT-base uncased (BertModel + pooler): 12 layers, d 768, FFN 3072, vocab 30522"


_BUILDERS = {
    "gpt2-124m": _build_gpt2_124m,
    "llama-1b": _build_llama_1b,
    "llama-1b-layer": _build_llama_1b_layer,
    "llama-7b-layer": _build_llama_7b_layer,
    "resnet50": _build_resnet50,
    "bert-base": _build_bert_base,
}
MODELS = list(_BUILDERS)


def build_model_doc(name: str) -> dict:
    """The JSON document of a real model, from its builder."""
    params, source = _BUILDERS[name]()
    total = 0
    for _, shape in params:
        n = 1
        for s in shape:
            n *= s
        total += n
    return {"name": name, "source": source, "n_tensors": len(params), "total": total,
            "params": [[n, s] for n, s in params]}


def load_model(name: str) -> dict:
    """A real model's JSON document from bench/shapes/ (package data)."""
    path = os.path.join(SHAPES_DIR, f"{name}.json")
    with open(path) as f:
        return json.load(f)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------------------
# Synthetic sweeps and literal specs.
# --------------------------------------------------------------------------------------

_M = 1024 * 1024
SWEEPS = {
    # Bandwidth-bound: a fixed small tensor count, growing total.
    "sweep-size": [(8, total) for total in (2 * _M, 8 * _M, 32 * _M, 128 * _M)],
    # Launch-bound: a fixed total, growing tensor count (4096 tensors of 4K elements).
    "sweep-count": [(count, 16 * _M) for count in (1, 16, 256, 4096)],
}

_LITERAL = re.compile(r"^(\d+)x(\d+)([KkMm]?)$")

# --------------------------------------------------------------------------------------
# Embedding tables with sparse grads (nn.Embedding(sparse=True)).
# --------------------------------------------------------------------------------------

# The sparse-embedding issue's three shapes: a large table with few lookups (almost every
# lookup a distinct row), a smaller, wider one with many (~48K distinct rows of 100K), and
# the same with the lookups drawn from ~1,000 hot rows (~65 entries summed per row: the
# coalescing is the work).
EMBEDDINGS = {
    "embedding-1m": Embedding(1_000_000, 64, 16_384),
    "embedding-100k": Embedding(100_000, 128, 65_536),
    "embedding-100k-hot": Embedding(100_000, 128, 65_536, hot_rows=1_000),
}
# "embeddings" expands to all of them, as a sweep does.
EMBEDDING_GROUP = "embeddings"
_EMB_LITERAL = re.compile(r"^emb(\d+[KkMm]?)x(\d+):(\d+[KkMm]?)(?::(\d+[KkMm]?))?$")


def _count(text: str) -> int:
    unit = text[-1].lower()
    if unit in "km":
        return int(text[:-1]) * {"k": 1024, "m": _M}[unit]
    return int(text)


def _embedding_shape(name: str, emb: Embedding, group: str = "embedding") -> Shape:
    if min(emb.num_embeddings, emb.embedding_dim, emb.lookups) < 1 or (
            emb.hot_rows is not None and not 1 <= emb.hot_rows <= emb.num_embeddings):
        raise ValueError(f"shape {name!r}: rows, dim and lookups must be >= 1 and the hot "
                         "rows between 1 and the rows")
    return Shape(name, (emb.num_embeddings * emb.embedding_dim,), group, 1.0,
                 emb.describe(), emb)


def _fmt_count(n: int) -> str:
    for unit, div in (("M", _M), ("K", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _scaled(n: int, scale: float) -> int:
    return max(1, int(round(n * scale)))


def resolve(specs: list[str] | str, scale: float = 1.0) -> list[Shape]:
    """Expands shape specs (see the module doc) into Shapes, in order, without repeats."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    out: list[Shape] = []
    for spec in (s.strip() for s in specs):
        m = _LITERAL.match(spec)
        if m:
            count, size = int(m.group(1)), int(m.group(2))
            size *= {"": 1, "k": 1024, "m": _M}[m.group(3).lower()]
            if count < 1 or size < 1:
                raise ValueError(f"shape {spec!r}: count and size must be >= 1")
            out.append(Shape(spec, (size,) * count, "literal", 1.0,
                             f"{count} tensors of {size} elements"))
        elif spec in SWEEPS:
            for count, total in SWEEPS[spec]:
                per = _scaled(total // count, scale)
                out.append(Shape(f"{count}x{_fmt_count(per)}", (per,) * count, spec, scale,
                                 f"{spec}: {count} tensors of {per} elements"))
        elif spec in EMBEDDINGS:
            out.append(_embedding_shape(spec, EMBEDDINGS[spec]))
        elif spec == EMBEDDING_GROUP:
            out += [_embedding_shape(n, e) for n, e in EMBEDDINGS.items()]
        elif _EMB_LITERAL.match(spec):
            rows, dim, lookups, hot = _EMB_LITERAL.match(spec).groups()
            out.append(_embedding_shape(spec, Embedding(
                _count(rows), _count(dim), _count(lookups), _count(hot) if hot else None)))
        elif spec in _BUILDERS:
            doc = load_model(spec)
            sizes = tuple(_scaled(_numel(s), scale) for _, s in doc["params"])
            name = spec if scale == 1.0 else f"{spec}@{scale:g}"
            out.append(Shape(name, sizes, "model", scale, doc["source"]))
        else:
            raise ValueError(
                f"unknown shape {spec!r}: expected one of "
                f"{', '.join(MODELS + list(SWEEPS) + list(EMBEDDINGS) + [EMBEDDING_GROUP])}, "
                "NxM (e.g. 8x4M, 2048x16K) or embRxD:L[:H] (e.g. emb1000x16:256)")
    seen, unique = set(), []
    for s in out:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique


def write_model_files(directory: str = SHAPES_DIR) -> list[str]:
    """Writes bench/shapes/<model>.json from the builders. Returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in MODELS:
        doc = build_model_doc(name)
        path = os.path.join(directory, f"{name}.json")
        with open(path, "w") as f:
            # One param per line: diffs of these files stay readable.
            f.write("{\n")
            for key in ("name", "source", "n_tensors", "total"):
                f.write(f"  {json.dumps(key)}: {json.dumps(doc[key])},\n")
            f.write('  "params": [\n')
            rows = [f"    {json.dumps(p)}" for p in doc["params"]]
            f.write(",\n".join(rows))
            f.write("\n  ]\n}\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_model_files():
        print(p)
