"""Tests of the benchmark harness itself (fused_optim.bench): the byte model, the
statistics, the shape lists, provider discovery with providers missing, the JSON schema,
tiny end-to-end runs, dense and sparse (embedding shapes), and the training-quality
runner's source and a tiny run of it. Seconds, no GPU, no
optional package needed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    """fused_optim.bench as installed (editable or wheel); else bench/ straight from this
    checkout under a private name, so the harness is testable without a build."""
    try:
        return importlib.import_module("fused_optim.bench")
    except Exception:  # noqa: BLE001
        pass
    name = "_fused_optim_bench_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "bench", "__init__.py"),
        submodule_search_locations=[os.path.join(ROOT, "bench")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()
_sub = lambda m: importlib.import_module(f"{bench.__name__}.{m}")  # noqa: E731
bytes_model = _sub("bytes_model")
stats = _sub("stats")
shapes = _sub("shapes")
providers = _sub("providers")
runner = _sub("runner")
report = _sub("report")
probe = _sub("probe")
cli = _sub("__main__")
quality = _sub("quality")


# --------------------------------------------------------------------------------------
# Byte model
# --------------------------------------------------------------------------------------

def test_bytes_fp32_adamw_is_16_read_12_written():
    pol = bytes_model.StoragePolicy.uniform(torch.float32)
    assert bytes_model.bytes_per_element("adamw", pol) == (16, 12)
    assert bytes_model.bytes_per_element("adam", pol) == (16, 12)


def test_bytes_sgd_momentum_is_20():
    pol = bytes_model.StoragePolicy.uniform(torch.float32)
    rd, wr = bytes_model.bytes_per_element("sgd", pol)
    assert (rd, wr) == (12, 8)
    # Plain SGD (momentum=0) keeps no buffer: the spec's list has when="momentum".
    plain = bytes_model.algorithm_for("sgd", {"momentum": 0.0})
    assert plain.states == () and sum(bytes_model.bytes_per_element(plain, pol)) == 12


@pytest.mark.parametrize("dtype,state,total", [
    (torch.bfloat16, None, 14),             # torch.optim: states in the param dtype
    (torch.bfloat16, torch.float32, 22),    # bf16 params + fp32 m, v
    (torch.float16, None, 14),
    (torch.float64, None, 56),
])
def test_bytes_storage_policies(dtype, state, total):
    pol = bytes_model.StoragePolicy.uniform(dtype, state)
    assert sum(bytes_model.bytes_per_element("adamw", pol)) == total


def test_bytes_amsgrad_adds_a_state():
    pol = bytes_model.StoragePolicy.uniform(torch.float32)
    alg = bytes_model.algorithm_for("adamw", {"amsgrad": True})
    assert alg.states == ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    assert bytes_model.bytes_per_element(alg, pol) == (20, 16)


def test_algorithm_comes_from_the_spec():
    """Every state list of a spec is read and written, a list with ``when`` only while
    that option is on; per-tensor scalar state costs nothing; a per-call flag
    (group_key="") is never an option."""
    from fused_optim.spec import Hyper as H, ScalarState, Spec, StateList

    spec = Spec(name="toy", lists=(StateList("sums", "sum"),
                                   StateList("bufs", "buf", when="momentum"),
                                   StateList("maxes", "max_sum", when="keep_max")),
                scalars=(ScalarState("state_steps", "step"),),
                hypers=(H("momentum"), H("keep_max", bool), H("first", bool, group_key="")),
                reference=lambda *a: None)
    alg = bytes_model.algorithm_of_spec(spec, {"momentum": 0.0, "keep_max": False})
    assert (alg.reads, alg.writes) == (("param", "grad", "sum"), ("param", "sum"))
    alg = bytes_model.algorithm_of_spec(spec, {"momentum": 0.9, "keep_max": True})
    assert alg.states == ("sum", "buf", "max_sum")
    pol = bytes_model.StoragePolicy.uniform(torch.float32)
    assert bytes_model.bytes_per_element(alg, pol) == (20, 16)


def test_benchmarked_optimizers_are_the_tested_ones():
    """The benchmark's optimizers (``--optim all``) that take dense grads are exactly the
    classes of the parity tests' table (tests/_tables.py OPTIMIZERS, itself checked
    against fused_optim's exports by tests/test_optimizers.py), in fused_optim's
    ``__all__`` order; the others take sparse grads only (SparseAdam: tests/test_sparse.py)
    and run on the embedding shapes only."""
    import fused_optim
    from _tables import OPTIMIZERS

    tested = sorted((row.fused for row in OPTIMIZERS),
                    key=lambda cls: fused_optim.__all__.index(cls.__name__))
    dense = {n: c for n, c in providers.optimizers().items()
             if providers.grads_reason(n, sparse=False) is None}
    assert list(dense.values()) == tested
    sparse_only = [n for n in providers.optim_names() if n not in dense]
    assert "sparseadam" in sparse_only
    for name in sparse_only:
        assert providers.optimizers()[name].spec.sparse.only
        assert "sparse grads only" in providers.grads_reason(name, sparse=False)


def test_every_benchmarked_optimizer_has_a_spec_derived_algorithm():
    names = providers.optim_names()
    assert {"adam", "adamw", "sgd"} <= set(names)
    for name in names:
        cls = providers.optimizers()[name]
        assert name == cls.__name__.lower()  # what --optim and GPU_CHECK_OPTIMS take
        hyper = providers.Hyper.for_optim(name)
        alg = bytes_model.algorithm_for(name)
        spec = cls.spec
        kept = [s.key for s in spec.lists if s.when is None or hyper.values.get(s.when)]
        assert alg.states == tuple(kept), name
        for key, value in spec.bench.items():
            assert hyper.kwargs[key] == value, name


@pytest.mark.parametrize("dtype,total", [(torch.float32, 28), (torch.bfloat16, 14)])
def test_policy_read_off_a_real_optimizer(dtype, total):
    ps = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (33, 4097)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(ps, foreach=False)
    opt.step()
    alg, pol = bytes_model.policy_of(opt, ps)
    assert sorted(alg.states) == ["exp_avg", "exp_avg_sq"]   # the scalar step is ignored
    assert sum(bytes_model.bytes_per_element(alg, pol)) == total


def test_policy_of_quantized_state_counts_block_scales():
    # An 8-bit state with one fp32 scale per 256 elements: 1 + 4/256 B per element.
    p = torch.nn.Parameter(torch.zeros(1024))
    p.grad = torch.zeros(1024)

    class Fake(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            for q in self.param_groups[0]["params"]:
                self.state[q] = {"state1": torch.zeros(1024, dtype=torch.uint8),
                                 "absmax1": torch.zeros(4), "step": 3}

    alg, pol = bytes_model.policy_of(Fake([p]), [p])
    rd, wr = bytes_model.bytes_per_element(alg, pol)
    assert rd == pytest.approx(4 + 4 + 1 + 4 / 256)
    assert wr == pytest.approx(4 + 1 + 4 / 256)


# --------------------------------------------------------------------------------------
# Hyperparameters: class defaults + spec.bench + the benchmark's lr
# --------------------------------------------------------------------------------------

def test_hyperparameters_of_the_existing_optimizers():
    h = providers.Hyper.for_optim("adamw")
    assert h.kwargs == {"lr": 1e-3}
    assert h.values["weight_decay"] == 1e-2 and h.values["decoupled_weight_decay"] is True
    h = providers.Hyper.for_optim("adam")
    assert h.kwargs == {"lr": 1e-3} and h.values["weight_decay"] == 0
    h = providers.Hyper.for_optim("sgd")
    # spec.bench = {"momentum": 0.9}; lr raised from the class default 1e-3 to 1e-2, so
    # that one step moves bf16 params by several ulps.
    assert h.kwargs == {"lr": 1e-2, "momentum": 0.9}
    assert json.loads(json.dumps(h.to_dict()))["kwargs"] == {"lr": 1e-2, "momentum": 0.9}


def test_resolve_optims():
    assert providers.resolve_optims(["all"]) == providers.optim_names()
    assert providers.resolve_optims(["adamw", "all", "ADAMW"])[0] == "adamw"
    # The class name lowercased, or spelled with "_" / "-" (the spec's name).
    assert providers.resolve_optims(["sparse_adam", "SparseAdam", "sparse-adam"]) == [
        "sparseadam"]
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        providers.resolve_optims(["nope"])


def test_a_new_fused_optim_class_is_benchmarked_without_naming_it(monkeypatch):
    """A class fused_optim exports is picked up by name; torch.optim without a class of
    that name leaves the torch providers out with a reason."""
    import fused_optim

    class Toyopt(fused_optim.SGD):   # SGD's spec: no new op is registered
        pass

    monkeypatch.setattr(fused_optim, "Toyopt", Toyopt, raising=False)
    providers._hyper_for.cache_clear()
    try:
        assert "toyopt" in providers.optim_names()
        cpu = torch.device("cpu")
        assert "torch.optim has no Toyopt" in _by_name("torch-forloop").available(
            cpu, torch.float32, "toyopt")
        assert _by_name("fused_optim[reference]").available(cpu, torch.float32, "toyopt") is None
        assert "DeepSpeed has no Toyopt" in _by_name("deepspeed").available(
            cpu, torch.float32, "toyopt")
        assert bytes_model.algorithm_for("toyopt").states == ("momentum_buffer",)
    finally:
        providers._hyper_for.cache_clear()


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------

def test_quantile_matches_numpy():
    np = pytest.importorskip("numpy")
    xs = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0])
    for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        assert stats.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))


def test_summary():
    s = stats.summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert s.n == 5 and s.median == 3.0 and s.min == 1.0 and s.max == 100.0
    assert (s.q25, s.q75) == (2.0, 4.0)
    assert s.spread_pct == pytest.approx(100 * 2.0 / 3.0)
    assert s.mean == pytest.approx(22.0)
    one = stats.summarize([2.5])
    assert one.median == 2.5 and one.stdev == 0.0 and one.iqr == 0.0
    with pytest.raises(ValueError):
        stats.summarize([])
    with pytest.raises(ValueError):
        stats.summarize([1.0, float("nan")])


def test_paired_ratio_cancels_drift():
    # The machine slows down 3x over the run; the provider is always 2x faster than the
    # baseline within a round. Medians of the raw samples would mix rounds; pairs do not.
    drift = [1.0, 1.0, 2.0, 3.0, 3.0, 3.0]
    base = [10.0 * d for d in drift]
    prov = [5.0 * d for d in drift]
    assert stats.paired_ratio(base, prov) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        stats.paired_ratio([1.0], [1.0, 2.0])


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------

KNOWN_TOTALS = {  # published parameter counts
    "gpt2-124m": (124_439_808, 148),
    "llama-1b": (1_235_814_400, 146),
    "llama-1b-layer": (60_821_504, 9),
    "llama-7b-layer": (202_383_360, 9),
    "resnet50": (25_557_032, 161),
    "bert-base": (109_482_240, 199),
}


@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_model_json_matches_builder_and_known_count(name):
    doc = shapes.load_model(name)
    assert doc == shapes.build_model_doc(name), "regenerate: python -m fused_optim.bench.shapes"
    total, count = KNOWN_TOTALS[name]
    assert doc["total"] == total
    assert doc["n_tensors"] == count == len(doc["params"])
    assert sum(math.prod(s) for _, s in doc["params"]) == total


def test_resolve_literals_sweeps_and_scale():
    a, b = shapes.resolve("8x4M,2048x16K")
    assert (a.count, a.sizes[0], a.numel) == (8, 4 << 20, 32 << 20)
    assert (b.count, b.sizes[0]) == (2048, 16 << 10)
    # Literals are not scaled; models keep their tensor count and shrink each tensor.
    (lit,) = shapes.resolve(["8x4M"], scale=0.25)
    assert lit.numel == 32 << 20
    (full,) = shapes.resolve(["resnet50"])
    (small,) = shapes.resolve(["resnet50"], scale=0.25)
    assert small.count == full.count == 161
    assert small.numel == pytest.approx(full.numel * 0.25, rel=1e-3)
    assert small.name == "resnet50@0.25"
    sweep = shapes.resolve(["sweep-count"], scale=1.0)
    assert [s.count for s in sweep] == [1, 16, 256, 4096]
    assert {s.numel for s in sweep} == {16 << 20}
    assert len(shapes.resolve(["sweep-size"])) == 4
    assert len(shapes.resolve("8x4M,8x4M")) == 1
    for bad in ("gpt3", "0x5", "8x"):
        with pytest.raises(ValueError):
            shapes.resolve([bad])
    with pytest.raises(ValueError):
        shapes.resolve(["8x4M"], scale=0)


# --------------------------------------------------------------------------------------
# Providers: discovery with providers missing
# --------------------------------------------------------------------------------------

def _by_name(name):
    return next(p for p in providers.all_providers() if p.name == name)


def test_torch_providers_available_on_cpu():
    for name in ("torch-forloop", "torch-foreach", "torch-fused"):
        for optim in ("adamw", "adam", "sgd"):
            assert _by_name(name).available(torch.device("cpu"), torch.float32, optim) is None


def test_torch_fused_asks_torch():
    """torch-fused exists where torch.optim's class takes fused=True and steps with it;
    elsewhere the reason is torch's (or that the class has no fused implementation)."""
    p = _by_name("torch-fused")
    for optim in providers.optim_names():
        cls = getattr(torch.optim, providers.Hyper.for_optim(optim).class_name, None)
        reason = p.available(torch.device("cpu"), torch.float32, optim)
        if cls is None:
            assert "torch.optim has no" in reason
        elif "fused" not in __import__("inspect").signature(cls).parameters:
            assert "no fused implementation" in reason
        else:
            assert reason is None, (optim, reason)


def test_missing_packages_give_one_line_reasons(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name.split(".")[0] in ("deepspeed", "bitsandbytes", "torchao"):
            return None
        return real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for name in ("deepspeed", "bnb-8bit", "torchao-8bit"):
        reason = _by_name(name).available(torch.device("cpu"), torch.float32, "adamw")
        assert reason and "not installed" in reason and "\n" not in reason


def test_fused_optim_that_does_not_import_is_skipped(monkeypatch):
    real = importlib.import_module

    def import_module(name, *a, **k):
        if name == "fused_optim" or name.startswith("fused_optim."):
            raise ImportError("libc10.so: cannot open shared object file")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setitem(sys.modules, "fused_optim.backends", None)  # `from ... import` fails
    p = providers.FusedOptim("cpu")
    reason = p.available(torch.device("cpu"), torch.float32, "adamw")
    assert reason.startswith("fused_optim does not import") and "\n" not in reason


def test_select():
    allp = providers.all_providers()
    sel = lambda spec, dev="cpu": [p.name for p in providers.select(allp, spec, dev)[0]]  # noqa: E731
    assert sel("torch") == ["torch-forloop", "torch-foreach", "torch-fused"]
    assert sel("torch-fo*") == ["torch-forloop", "torch-foreach"]
    assert "fused_optim[reference]" in sel("fused_optim")
    # On CPU "all" leaves out the GPU-first libraries, with a reason; naming them adds them.
    chosen, left_out = providers.select(allp, "all", "cpu")
    assert "bnb-8bit" not in [p.name for p in chosen] and "bnb-8bit" in left_out
    assert "torch-fused" in [p.name for p in chosen] and "deepspeed" in [p.name for p in chosen]
    assert "bnb-8bit" in sel("all,bnb")
    assert not providers.select(allp, "all,bnb", "cpu")[1].get("bnb-8bit")
    assert len(sel("all", "cuda")) == len(allp)
    with pytest.raises(ValueError):
        providers.select(allp, "nope")


# --------------------------------------------------------------------------------------
# The run: tiny end to end, schema, a wrong provider made visible
# --------------------------------------------------------------------------------------

class _NoOp(providers.Provider):
    """A provider that is fast and wrong: its step does nothing."""

    def __init__(self, name="noop", family="test"):
        super().__init__(name=name, family=family)

    def available(self, device, dtype, optim):
        return None

    def make(self, params, hyper, *, capturable=False):
        class NoOp(torch.optim.Optimizer):
            def __init__(self, ps):
                super().__init__(ps, {})

            def step(self, closure=None):
                return None

        return NoOp(params)


class _Missing(providers.Provider):
    def __init__(self):
        super().__init__(name="missing", family="test")

    def available(self, device, dtype, optim):
        return "not installed (pip install missing)"


@pytest.fixture()
def tiny_providers(monkeypatch):
    base = [p for p in providers.all_providers() if p.family == "torch"]
    monkeypatch.setattr(runner, "all_providers", lambda: base + [_NoOp(), _Missing()])


def _tiny_cfg(**kw):
    cfg = dict(shapes=["3x1000", "17x300"], dtypes=["fp32", "bf16"], warmup=1, repeat=3,
               min_repeat=2, budget_s=5.0, probe_numel=1 << 16, gap_ms=0.0)
    cfg.update(kw)
    return runner.Config(**cfg)


def test_run_reports_wrong_provider_and_missing_one(tiny_providers):
    doc = runner.run(_tiny_cfg())
    report.validate(doc)
    res = {(r["dtype"], r["shape"], r["provider"]): r for r in doc["results"]}
    for dt in ("fp32", "bf16"):
        for shape in ("3x1000", "17x300"):
            ref = res[(dt, shape, "torch-forloop")]
            assert ref["status"] == "ok" and ref["max_rel_err"] == 0.0
            assert ref["steps"] == 1 + 1 + len(ref["samples_ms"])
            fused = res[(dt, shape, "torch-fused")]
            tol = 1e-5 if dt == "fp32" else 2e-2
            assert fused["max_rel_err"] < tol
            assert fused["ratio_vs_baseline"] == pytest.approx(1.0)
            assert fused["bytes_per_element"]["total"] == (28 if dt == "fp32" else 14)
            assert fused["gbps"] > 0 and fused["pct_limit"] > 0
            # The no-op is visibly wrong, and by the amount the case says a no-op shows.
            noop = res[(dt, shape, "noop")]
            case = next(c for c in doc["cases"] if (c["dtype"], c["shape"]) == (dt, shape))
            assert noop["max_rel_err"] == pytest.approx(case["noop_err"])
            assert noop["max_rel_err"] > 20 * max(fused["max_rel_err"], 1e-7)
            assert noop["wrong"] and "wrong result" in noop["reason"]
            assert not fused["wrong"] and not ref["wrong"]
            if shutil.which("cc") or shutil.which("gcc"):
                # The bandwidth stream ran in the same rounds; % limit is paired with it.
                lim = case["limit"]
                assert len(lim["samples_ms"]) == len(fused["samples_ms"])
                want = 100 * (fused["bytes_per_step"] / (lim["numel"] * 28)) * \
                    stats.paired_ratio(lim["samples_ms"], fused["samples_ms"])
                assert fused["pct_limit"] == pytest.approx(want)
            missing = res[(dt, shape, "missing")]
            assert missing["status"] == "skipped" and "not installed" in missing["reason"]
    # The second yardstick: the fastest torch implementation of each case.
    for case in doc["cases"]:
        rows = {n: res[(case["dtype"], case["shape"], n)]
                for n in ("torch-forloop", "torch-foreach", "torch-fused", "noop")}
        fastest = min((rows[n] for n in ("torch-forloop", "torch-foreach", "torch-fused")),
                      key=lambda r: r["stats_ms"]["median"])
        assert case["fastest_torch"] == {"provider": fastest["provider"],
                                         "median_ms": fastest["stats_ms"]["median"]}
        assert fastest["ratio_vs_fastest_torch"] == 1.0
        assert rows["noop"]["ratio_vs_fastest_torch"] == pytest.approx(
            stats.paired_ratio(fastest["samples_ms"], rows["noop"]["samples_ms"]))
        assert case["best_fused_optim"] is None   # no fused_optim provider in this run
        assert case["hyper"]["kwargs"] == {"lr": 1e-3}
        assert case["bytes_model"]["reads"] == ["param", "grad", "exp_avg", "exp_avg_sq"]
    text = report.render_table(doc)
    assert "torch-fused" in text and "missing" in text and "not installed" in text
    assert "vs fastest (torch-" in text


def test_a_wrong_torch_implementation_is_never_the_yardstick(monkeypatch):
    # torch has shipped a fused kernel that skips the step (pytorch/pytorch#191763): a
    # torch provider that is fast and wrong is timed and marked, never the fastest.
    base = [p for p in providers.all_providers() if p.family == "torch"]
    monkeypatch.setattr(runner, "all_providers",
                        lambda: base + [_NoOp("torch-broken", providers.TORCH_FAMILY)])
    doc = runner.run(_tiny_cfg(shapes=["3x1000"], dtypes=["fp32"]))
    report.validate(doc)
    (case,) = doc["cases"]
    res = {r["provider"]: r for r in doc["results"]}
    assert res["torch-broken"]["status"] == "ok" and res["torch-broken"]["wrong"]
    assert case["fastest_torch"]["provider"] in ("torch-forloop", "torch-foreach",
                                                 "torch-fused")
    assert "wrong result" in report.render_table(doc)


def test_schema_rejects_broken_documents(tiny_providers):
    doc = runner.run(_tiny_cfg(shapes=["2x100"], dtypes=["fp32"], probe=False))
    report.validate(doc)
    assert doc["probe"] is None
    ok = next(r for r in doc["results"] if r["status"] == "ok")
    for mutate in (lambda d: d.pop("machine"),
                   lambda d: d.__setitem__("schema", "other/0"),
                   lambda d: ok.__setitem__("status", "fine"),
                   lambda d: ok.__setitem__("samples_ms", []),
                   lambda d: ok["samples_ms"].append(-1.0),
                   lambda d: ok.pop("max_rel_err")):
        broken = json.loads(json.dumps(doc))
        ok = next(r for r in broken["results"] if r["status"] == "ok")
        mutate(broken)
        with pytest.raises(ValueError):
            report.validate(broken)


def test_cli_end_to_end(tmp_path, tiny_providers, capsys):
    out_json = tmp_path / "r.json"
    args = ["--shapes", "5x777", "--dtype", "fp32", "--repeat", "2", "--warmup", "1",
            "--providers", "torch-fused,torch-forloop,missing", "--probe-numel", "65536",
            "--json", str(out_json), "--quiet", "--optim", "all"]
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    if have_mpl:
        args += ["--plot", str(tmp_path / "r.png")]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "torch-fused" in printed and "GB/s" in printed
    doc = json.loads(out_json.read_text())
    report.validate(doc)
    m = doc["machine"]
    assert m["versions"]["torch"] == torch.__version__ and m["cpu"]["model"]
    assert "sha" in m["commit"]
    assert {r["provider"] for r in doc["results"]} == {"torch-fused", "torch-forloop", "missing"}
    # --optim all: every optimizer fused_optim exports, each compared with its own
    # torch.optim for-loop (the reference agrees with itself exactly); one that takes
    # sparse grads only is listed as a skipped case on a dense shape.
    assert doc["config"]["optims"] == providers.optim_names()
    dense = {n for n in providers.optim_names() if providers.grads_reason(n, False) is None}
    assert {r["optim"] for r in doc["results"]} == dense
    assert {c["optim"] for c in doc["skipped_cases"]} == set(providers.optim_names()) - dense
    assert "sparseadam on 5x777: fused_optim.SparseAdam takes sparse grads only" in printed
    for r in doc["results"]:
        if r["provider"] == "torch-forloop" and r["status"] == "ok":
            assert r["max_rel_err"] == 0.0
    if have_mpl:
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_names_the_best_fused_optim_against_torchs_fastest(monkeypatch, tmp_path):
    base = [p for p in providers.all_providers()
            if p.name in ("torch-forloop", "torch-fused", "fused_optim[reference]")]
    monkeypatch.setattr(runner, "all_providers", lambda: base)
    doc = runner.run(_tiny_cfg(shapes=["3x500"], dtypes=["fp32"], probe=False, repeat=3,
                               min_repeat=3))
    (case,) = doc["cases"]
    ours = next(r for r in doc["results"] if r["provider"] == "fused_optim[reference]")
    assert case["best_fused_optim"]["provider"] == "fused_optim[reference]"
    assert case["best_fused_optim"]["ratio_vs_fastest_torch"] == ours["ratio_vs_fastest_torch"]
    lines = report.summary_lines(doc)
    assert lines[0].startswith("summary: best fused_optim vs torch's fastest CPU")
    assert "fused_optim[reference]" in lines[1] and case["fastest_torch"]["provider"] in lines[1]
    assert "summary:" in report.render_table(doc)
    if importlib.util.find_spec("matplotlib") is not None:
        report.plot(doc, str(tmp_path / "s.png"))
        assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_committed_results_still_load():
    """Documents written before a field was added (ratio_vs_fastest_torch) validate and
    print."""
    folder = os.path.join(ROOT, "bench", "results", "cpu")
    paths = sorted(p for p in os.listdir(folder) if p.endswith(".json")) if os.path.isdir(
        folder) else []
    if not paths:
        pytest.skip("no committed CPU results")
    with open(os.path.join(folder, paths[0])) as f:
        doc = json.load(f)
    report.validate(doc)
    assert "torch-fused" in report.render_table(doc)


def test_results_folder_is_the_gpu_name():
    machine = _sub("machine")
    assert machine.results_dir({"device": "cuda", "gpu": {"name": "NVIDIA H200"}}) == "nvidia-h200"
    assert machine.results_dir({"device": "cuda", "gpu": {"name": "NVIDIA A100-SXM4-80GB"}}) == (
        "nvidia-a100-sxm4-80gb")
    assert machine.results_dir({"device": "cpu"}) == "cpu"


def test_commit_from_the_environment_without_git(monkeypatch):
    machine = _sub("machine")
    monkeypatch.setattr(machine, "_git", lambda *a: None)
    monkeypatch.setenv("FUSED_OPTIM_COMMIT", "0123456789abcdef-dirty")
    assert machine.commit() == {"sha": "0123456789abcdef", "dirty": True}
    monkeypatch.delenv("FUSED_OPTIM_COMMIT")
    assert machine.commit() == {"sha": None, "dirty": None}


def test_memory_estimate_counts_the_spec_states_and_the_reference():
    (shape,) = shapes.resolve(["8x1M"])
    n = shape.numel
    # fp32 AdamW: params + grads + 2 states + 1 transient = 20 B per provider.
    assert runner._estimate_bytes(shape, torch.float32, 4, 2) == 20 * n * 5 + 8 * n
    assert runner._estimate_bytes(shape, torch.float32, 4, 2, own_reference=False) == (
        20 * n * 4 + 8 * n)
    assert runner._estimate_bytes(shape, torch.float32, 4, 1, own_reference=False) == (
        16 * n * 4 + 8 * n)


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["--optim", "nope", "--shapes", "2x10", "--quiet"]) == 2
    assert "unknown optimizer" in capsys.readouterr().err
    assert cli.main(["--shapes", "nonsense", "--quiet"]) == 2
    assert cli.main(["--repeat", "0", "--quiet"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["--device", "cuda", "--shapes", "2x10", "--quiet", "--no-probe"]) == 2
        assert "cuda" in capsys.readouterr().err


def test_probe_measures_copy_and_adamw_stream():
    res = probe.measure(torch.device("cpu"), numel=1 << 16, reps=3)
    assert res["streams"]["copy"]["gbps"] > 0
    if shutil.which("cc") or shutil.which("gcc"):
        assert "adamw-stream" in res["streams"], res["skipped"]
        assert res["streams"]["adamw-stream"]["bytes_per_element"] == 28
    assert res["limit_gbps"] == max(s["gbps"] for s in res["streams"].values())


class _Slow(_NoOp):
    def __init__(self):
        providers.Provider.__init__(self, name="slow", family="test")

    def make(self, params, hyper, *, capturable=False):
        import time

        opt = super().make(params, hyper)
        opt.step = lambda closure=None: time.sleep(0.3)
        return opt


def test_a_very_slow_provider_is_dropped_not_waited_for(monkeypatch):
    base = [p for p in providers.all_providers() if p.name in ("torch-fused", "torch-forloop")]
    monkeypatch.setattr(runner, "all_providers", lambda: base + [_Slow()])
    doc = runner.run(_tiny_cfg(shapes=["2x100"], dtypes=["fp32"], probe=False, max_step_s=0.1,
                               repeat=5, min_repeat=5))
    slow = next(r for r in doc["results"] if r["provider"] == "slow")
    assert slow["status"] == "skipped" and slow["reason"].startswith("too slow")
    assert "too slow" in report.render_table(doc)
    fused = next(r for r in doc["results"] if r["provider"] == "torch-fused")
    assert fused["status"] == "ok" and len(fused["samples_ms"]) == 5


class _OwnPool(_NoOp):
    def __init__(self):
        providers.Provider.__init__(self, name="own-pool", family="test", threads="own-openmp")


def test_idle_gap_only_where_the_thread_pool_changes(monkeypatch):
    # [note: idle gap] in runner.py: steps on torch's pool run back to back; a step on
    # another pool (a provider's own OpenMP, the probe's pthreads) first waits for
    # torch's spinners to park, and torch's pool after another OpenMP pool waits for its.
    base = [p for p in providers.all_providers() if p.name in ("torch-forloop", "torch-fused")]
    monkeypatch.setattr(runner, "all_providers", lambda: base + [_OwnPool()])
    order: list[str] = []
    real_step = runner._Case._step
    monkeypatch.setattr(runner._Case, "_step",
                        lambda self, e: (order.append(e.provider.threads), real_step(self, e)))
    monkeypatch.setattr(runner.time, "sleep", lambda s: order.append(f"sleep {s:g}"))
    runner.run(_tiny_cfg(shapes=["2x100"], dtypes=["fp32"], gap_ms=7.0, repeat=3,
                         min_repeat=3))
    steps = [i for i, x in enumerate(order) if not x.startswith("sleep")]
    pools = {"torch", "own-openmp", "pthreads"}
    assert {order[i] for i in steps} == pools  # every pool ran, the probe's included
    for before, i in zip(steps, steps[1:]):
        slept = order[before + 1:i] == ["sleep 0.007"]
        assert order[before + 1:i] in ([], ["sleep 0.007"])
        assert slept == (order[before] not in (order[i], "pthreads")), order[before:i + 1]


_TRITON_PROBE_CHECK = r"""
import importlib.util, os, sys, torch
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("_b", os.path.join(root, "bench", "__init__.py"),
                                              submodule_search_locations=[os.path.join(root, "bench")])
m = importlib.util.module_from_spec(spec); sys.modules["_b"] = m; spec.loader.exec_module(m)
from _b import probe
n = 5000  # not a multiple of the block: the masked tail is exercised
p, g, m_, v = (torch.rand(n) for _ in range(4))
ref = [t.clone().double() for t in (p, g, m_, v)]
probe._triton_stream()(p, g, m_, v)
P, G, M, V = ref
M = 0.9 * M + 0.1 * G
V = 0.999 * V + 0.001 * G * G
P = P * (1 - 1e-5) - 1e-3 * M * V
for got, want in ((p, P), (m_, M), (v, V)):
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_gpu_probe_kernel_under_triton_interpreter(tmp_path):
    # The CUDA bandwidth probe's Triton kernel, run by the Triton interpreter on CPU
    # tensors: its arithmetic and masking are checked here; its speed only on a GPU.
    pytest.importorskip("triton")
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _TRITON_PROBE_CHECK, ROOT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_busy_machine_is_measured_without_our_own_cpu_time():
    machine = _sub("machine")
    a = {"t": 0.0, "busy_s": 100.0, "steal_s": 1.0, "own_s": 10.0}
    b = {"t": 10.0, "busy_s": 120.0, "steal_s": 1.0, "own_s": 28.0}  # we used 18 of 20 s
    ncpu = os.cpu_count() or 1
    got = machine.others_busy(a, b)
    assert got["others_cpu_fraction"] == pytest.approx(2.0 / (10.0 * ncpu), abs=1e-3)
    assert got["steal_cpu_fraction"] == 0.0
    snap = machine.cpu_snapshot()
    if snap is not None:
        assert snap["own_s"] > 0 and snap["busy_s"] > 0


def test_gpu_check_script_parses():
    """.ci/gpu_check.sh (make gpu-check) runs only on a GPU machine; here its syntax is
    checked (GPU_CHECK_DRY_RUN=1 rehearses it on the CPU, too slow for this file)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    import subprocess

    res = subprocess.run([bash, "-n", os.path.join(ROOT, ".ci", "gpu_check.sh")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------------------
# Sparse grads: embedding shapes
# --------------------------------------------------------------------------------------

def test_embedding_shapes_resolve():
    one, hundred, hot = shapes.resolve("embeddings")
    assert [s.name for s in (one, hundred, hot)] == [
        "embedding-1m", "embedding-100k", "embedding-100k-hot"]
    assert one.embedding == shapes.Embedding(1_000_000, 64, 16_384)
    assert hundred.embedding == shapes.Embedding(100_000, 128, 65_536)
    assert hot.embedding == shapes.Embedding(100_000, 128, 65_536, hot_rows=1_000)
    assert one.sparse and not shapes.resolve("8x4M")[0].sparse
    assert (one.count, one.numel, one.dims()) == (1, 64_000_000, [(1_000_000, 64)])
    # Taken as written: --scale shrinks models and sweeps, never an embedding.
    assert shapes.resolve(["embedding-1m"], scale=0.25)[0] == one
    (lit,) = shapes.resolve("emb1000x16:256:8")
    assert lit.embedding == shapes.Embedding(1000, 16, 256, hot_rows=8)
    assert shapes.resolve("emb2Kx16:1K")[0].embedding == shapes.Embedding(2048, 16, 1024)
    assert lit.to_dict()["embedding"]["hot_rows"] == 8
    assert "Embedding(1,000, 16), 256 lookups a step from 8 hot rows" == lit.source
    for bad in ("emb1000x16", "emb0x16:4", "emb10x4:4:11", "emb10x4:4:0"):
        with pytest.raises(ValueError):
            shapes.resolve([bad])


def test_embedding_grads_are_the_embedding_backwards():
    """Each grad is what nn.Embedding(sparse=True)'s backward makes: uncoalesced COO,
    indices [1, lookups] with duplicates, values [lookups, dim]; the same from the same
    seed; the hot shape's lookups fall on its hot rows only."""
    (shape,) = shapes.resolve("emb64x8:100")
    p0 = torch.randn(64 * 8).to(torch.bfloat16)
    grads = runner._embedding_grads(shape, p0, seed=3)
    assert len(grads) == runner.GRADS_PER_CASE
    for g in grads:
        assert g.is_sparse and not g.is_coalesced() and g.shape == (64, 8)
        assert g._indices().shape == (1, 100) and g._values().shape == (100, 8)
        assert g.dtype == torch.bfloat16
        assert runner._unique_rows(g) < 100    # 100 draws of 64 rows repeat some
    # As the module's own backward makes them, for the same lookups and upstream grad.
    idx = grads[0]._indices()[0]
    emb = torch.nn.Embedding(64, 8, sparse=True).to(torch.bfloat16)
    emb(idx).backward(grads[0]._values())
    want = emb.weight.grad
    assert not want.is_coalesced()
    assert torch.equal(want._indices(), grads[0]._indices())
    assert torch.equal(want._values(), grads[0]._values())
    again = runner._embedding_grads(shape, p0, seed=3)
    assert all(torch.equal(a.to_dense(), b.to_dense()) for a, b in zip(grads, again))
    assert not torch.equal(grads[0].to_dense(), grads[1].to_dense())
    (hot,) = shapes.resolve("emb1000x4:512:5")
    rows = {r for g in runner._embedding_grads(hot, torch.zeros(4000), seed=0)
            for r in g._indices()[0].tolist()}
    assert len(rows) == 5


def test_sparse_hyperparameters():
    """Sparse cases run the row-sparse engine's step: SGD without its bench momentum
    (torch would keep a sparse buffer, stepped in torch ops), no weight decay anywhere."""
    sgd = providers.Hyper.for_optim("sgd", sparse=True)
    assert sgd.kwargs == {"lr": 1e-2} and sgd.values["momentum"] == 0
    assert sgd.sparse and sgd.to_dict()["grads"] == "sparse"
    assert providers.Hyper.for_optim("sgd").kwargs["momentum"] == 0.9   # dense unchanged
    ada = providers.Hyper.for_optim("adagrad", sparse=True)
    assert ada.kwargs == {"lr": 1e-2} and ada.values["weight_decay"] == 0
    adam = providers.Hyper.for_optim("sparseadam", sparse=True)
    assert adam.kwargs == {"lr": 1e-3} and adam.class_name == "SparseAdam"
    assert providers.grads_reason("adamw", sparse=True) == (
        "fused_optim.AdamW takes dense grads only")
    for name in ("sgd", "adagrad", "sparseadam"):
        assert providers.grads_reason(name, sparse=True) is None


@pytest.mark.parametrize("optim,states", [("sparseadam", 2), ("adagrad", 1), ("sgd", 0)])
def test_sparse_bytes_model(optim, states):
    """Per distinct touched row: the param and each state read and written; per lookup:
    its grad values and its int64 index read once."""
    alg = bytes_model.algorithm_for(optim, sparse=True)
    assert len(alg.states) == states
    unique, lookups, dim = 900, 1000, 16
    fp32 = bytes_model.StoragePolicy.uniform(torch.float32)
    rd, wr = bytes_model.sparse_bytes_per_step(alg, fp32, unique_rows=unique, lookups=lookups,
                                               row_len=dim)
    assert rd == unique * dim * 4 * (1 + states) + lookups * (dim * 4 + 8)
    assert wr == unique * dim * 4 * (1 + states)
    assert (rd, wr) == bytes_model.sparse_bytes_per_step(optim, fp32, unique_rows=unique,
                                                         lookups=lookups, row_len=dim)
    # bf16 params and grads, fp32 states (what a provider may keep).
    mixed = bytes_model.StoragePolicy.uniform(torch.bfloat16, torch.float32)
    rd, wr = bytes_model.sparse_bytes_per_step(alg, mixed, unique_rows=unique,
                                               lookups=lookups, row_len=dim)
    assert rd == unique * dim * (2 + 4 * states) + lookups * (dim * 2 + 8)
    assert wr == unique * dim * (2 + 4 * states)


def test_policy_of_a_sparse_grad_counts_a_value_per_element():
    p = torch.nn.Parameter(torch.zeros(10, 4))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 3]]), torch.ones(3, 4), (10, 4))
    opt = torch.optim.Adagrad([p])
    opt.step()
    alg, pol = bytes_model.policy_of(opt, [p])
    assert alg.states == ("sum",) and pol.grad == 4 and pol.param == 4


def test_memory_estimate_of_an_embedding_counts_its_table_not_a_dense_grad():
    (shape,) = shapes.resolve("emb1000x16:256")
    n, grad = 16_000, 256 * (16 * 4 + 8)
    per = n * (4 + 2 * 4) + (runner.GRADS_PER_CASE + 4) * grad
    assert runner._estimate_bytes(shape, torch.float32, 2, 2) == (
        3 * per + 4 * n + runner.GRADS_PER_CASE * grad)


class _SparseNoOp(_NoOp):
    """A provider that takes sparse grads and does nothing with them; it records the
    grad of each step (the values' sum) to check what every provider is fed."""

    def __init__(self):
        providers.Provider.__init__(self, name="sparse-noop", family="test")
        self.seen: list[float] = []

    def sparse_grads(self, device, dtype, optim):
        return None

    def make(self, params, hyper, *, capturable=False):
        opt = super().make(params, hyper)
        opt.step = lambda closure=None: self.seen.append(
            params[0].grad._values().double().sum().item())
        return opt


@pytest.fixture()
def sparse_providers(monkeypatch):
    base = [p for p in providers.all_providers()
            if p.name in ("torch-forloop", "torch-fused", "fused_optim[cpu]")]
    noop = _SparseNoOp()
    monkeypatch.setattr(runner, "all_providers", lambda: base + [noop, _Missing()])
    return noop


def test_sparse_cases_run_end_to_end(sparse_providers):
    """The three optimizers that take sparse grads on a uniform and a heavy-duplication
    embedding, torch's for-loop against fused_optim's cpu backend: each steps the same
    cycle of grads, matches the for-loop, and reports the touched rows' bytes; a provider
    that does not step is marked wrong; torch-fused is listed as torch's one
    implementation; AdamW (dense grads only) is a skipped case."""
    noop = sparse_providers
    cfg = _tiny_cfg(shapes=["emb1000x16:256", "emb1000x16:256:8"], dtypes=["fp32"],
                    optims=["sparseadam", "adagrad", "sgd", "adamw"], repeat=3, min_repeat=3)
    doc = runner.run(cfg)
    report.validate(doc)
    assert {(c["optim"], c["shape"]) for c in doc["skipped_cases"]} == {
        ("adamw", "emb1000x16:256"), ("adamw", "emb1000x16:256:8")}
    res = {(r["optim"], r["shape"], r["provider"]): r for r in doc["results"]}
    for case in doc["cases"]:
        key = (case["optim"], case["shape"])
        ref, ours = res[(*key, "torch-forloop")], res[(*key, "fused_optim[cpu]")]
        assert case["grads"] == "sparse" and ref["status"] == ours["status"] == "ok"
        assert ref["max_rel_err"] == 0.0 and ref["steps"] == ours["steps"] == 1 + 1 + 3
        # fp32: the same row math; 1e-6 is ~8 ulps of the largest param.
        assert ours["max_rel_err"] < 1e-6 and not ours["wrong"]
        assert res[(*key, "sparse-noop")]["wrong"]
        assert res[(*key, "sparse-noop")]["max_rel_err"] == pytest.approx(case["noop_err"])
        fused = res[(*key, "torch-fused")]
        assert fused["status"] == "skipped" and "one implementation" in fused["reason"]
        assert res[(*key, "missing")]["status"] == "skipped"
        # The bytes of the touched rows, from the distinct rows of the drawn grads.
        sp = case["sparse"]
        assert sp["lookups"] == 256 and sp["row_len"] == 16 and len(sp["unique_rows"]) == 4
        if key[1].endswith(":8"):
            assert sp["unique_rows"] == [8] * 4
        else:
            assert 200 < sp["mean_unique_rows"] < 256
        states = {"sparseadam": 2, "adagrad": 1, "sgd": 0}[key[0]]
        touched = sp["mean_unique_rows"] * 16
        want = touched * 4 * (1 + states) * 2 + 256 * (16 * 4 + 8)
        for r in (ref, ours):
            assert r["bytes_per_step"] == pytest.approx(want)
            assert r["bytes_per_element"]["total"] == pytest.approx(want / touched)
            assert r["gbps"] > 0
            if shutil.which("cc") or shutil.which("gcc"):
                assert r["pct_limit"] > 0
        assert case["fastest_torch"]["provider"] == "torch-forloop"
        assert case["best_fused_optim"]["provider"] == "fused_optim[cpu]"
        assert case["hyper"]["kwargs"] == {"sgd": {"lr": 1e-2}, "adagrad": {"lr": 1e-2},
                                           "sparseadam": {"lr": 1e-3}}[key[0]]
    # Every provider is fed the same grads in turn: 4 drawn, 5 steps a case.
    per_case = []
    for optim in ("sparseadam", "adagrad", "sgd"):
        for spec in ("emb1000x16:256", "emb1000x16:256:8"):
            (shape,) = shapes.resolve(spec)
            p0, _ = runner._make_inputs(shape, torch.float32, torch.device("cpu"), cfg.seed)
            sums = [g._values().double().sum().item()
                    for g in runner._embedding_grads(shape, p0, cfg.seed)]
            per_case += [sums[i % len(sums)] for i in range(5)]
    assert noop.seen == per_case
    text = report.render_table(doc)
    assert "Embedding(1,000, 16), sparse grads of 256 lookups from 8 hot rows" in text
    assert "adamw on emb1000x16:256, emb1000x16:256:8: fused_optim.AdamW takes dense" in text


def test_sparse_cli(tmp_path, capsys):
    out_json = tmp_path / "s.json"
    args = ["--optim", "sparse_adam", "--shapes", "emb500x8:128:16", "--dtype", "bf16",
            "--providers", "torch,fused_optim[cpu]", "--repeat", "2", "--warmup", "1",
            "--no-probe", "--gap-ms", "0", "--json", str(out_json), "--quiet"]
    assert cli.main(args) == 0
    doc = json.loads(out_json.read_text())
    report.validate(doc)
    assert doc["config"]["optims"] == ["sparseadam"]
    ok = {r["provider"]: r for r in doc["results"] if r["status"] == "ok"}
    assert set(ok) == {"torch-forloop", "fused_optim[cpu]"}
    # bf16: the same ops rounding to bf16; 2e-2 is the dense bf16 bound (~3 eps of the
    # largest param over a few steps).
    assert ok["fused_optim[cpu]"]["max_rel_err"] < 2e-2
    assert doc["shapes"][0]["embedding"]["hot_rows"] == 16
    assert "torch-forloop" in capsys.readouterr().out


@pytest.mark.parametrize("name,args,shows", [
    ("adafactor", ["--shapes", "2x64x32,2x64", "--rounds", "2"], "torch-forloop"),
    ("muon", ["--shapes", "2x32x32", "--warmup", "1", "--repeat", "2"], "unbatched"),
    ("lbfgs", ["--n", "4096", "--history", "5", "--max-iter", "3", "--rounds", "2"],
     "step minus closure"),
])
def test_subcommands_of_the_steps_that_are_not_element_wise(name, args, shows, capsys):
    """fused-optim-bench adafactor|muon|lbfgs runs that optimizer's own runner, which
    checks its result against torch.optim's and prints the comparison."""
    assert name in cli.SUBCOMMANDS
    assert cli.main([name, *args]) == 0
    out = capsys.readouterr().out
    assert shows in out and "torch" in out
    with pytest.raises(SystemExit):
        cli.main([name, "--no-such-option"])


def test_policy_subcommand_reports_each_policy(tmp_path, capsys):
    """fused-optim-bench policy: a row per memory policy, with its bytes held and moved
    per element from the model (fp32 28 B moved and 12 held; bf16 states 20 and 8; a
    master copy with bf16 states 20 and 10) and its ratios."""
    out = tmp_path / "policy.json"
    assert cli.main(["policy", "--shapes", "2x4099", "--rounds", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert (rows["fp32"]["bytes_per_element_moved"], rows["fp32"]["bytes_per_element_held"]) == (28, 12)
    assert rows["fp32, bf16 states"]["bytes_per_element_moved"] == 20
    assert rows["fp32, bf16 states"]["bytes_per_element_held"] == 8
    assert rows["bf16, master, bf16 states"]["bytes_per_element_moved"] == 20
    assert rows["bf16, master, bf16 states"]["bytes_per_element_held"] == 10
    assert rows["torch fused bf16"]["bytes_per_element_moved"] == 14
    assert all(r["median_ms"] > 0 and r["speedup_vs_fp32"] > 0 for r in rows.values())
    assert "bf16, master, bf16 states" in capsys.readouterr().out

# --------------------------------------------------------------------------------------
# Quality: loss curves of the memory policies (fused-optim-bench quality)
# --------------------------------------------------------------------------------------

def test_quality_source_floor_is_its_entropy_rate():
    """The floor reported is what the source's own probabilities score on its samples:
    the mean of -log P(x_t | x_{t-2}, x_{t-1}) over stationary samples is the entropy
    rate, that of -log P(x_1 | x_0) the bigram entropy (Monte Carlo, within 4 standard
    errors); and the entropies are ordered as they must be."""
    src = quality.MarkovSource(vocab=24, branching=5, seed=3)
    seqs = src.sample(4000, 12, torch.Generator().manual_seed(0))
    a, b, c = seqs[:, :-2], seqs[:, 1:-1], seqs[:, 2:]
    j = (src.succ[b] == c[..., None]).to(torch.int64).argmax(-1)
    assert (src.succ[b].gather(-1, j[..., None]).squeeze(-1) == c).all()  # c is a successor
    nll = -src.probs[a, b, j].log()
    assert nll.mean().item() == pytest.approx(src.entropy_rate,
                                              abs=4 * nll.std().item() / nll.numel() ** 0.5)
    next_given_b = torch.einsum("ab,abj->bj", src.pairs, src.probs) / src.pairs.sum(0)[:, None]
    j1 = (src.succ[seqs[:, 0]] == seqs[:, 1:2]).to(torch.int64).argmax(-1)
    nll1 = -next_given_b[seqs[:, 0], j1].log()
    assert nll1.mean().item() == pytest.approx(src.bigram_entropy,
                                               abs=4 * nll1.std().item() / nll1.numel() ** 0.5)
    assert 0 < src.entropy_rate < src.bigram_entropy < src.unigram_entropy <= math.log(24) + 1e-9
    assert src.bigram_entropy <= math.log(5) + 1e-9
    assert src.floor(1) == pytest.approx(src.bigram_entropy)
    assert src.floor(12) == pytest.approx((src.bigram_entropy + 11 * src.entropy_rate) / 12)
    # One successor each: the sequence is determined by its first token.
    assert quality.MarkovSource(vocab=16, branching=1, seed=0).entropy_rate == pytest.approx(0)


def test_quality_policies_are_the_issues_five_and_one_line_each():
    assert quality.DEFAULT_POLICIES == ("fp32", "bf16", "bf16-stochastic-rounding",
                                        "bf16-master-weights", "fp32-bf16-state")
    names = [p.name for p in quality.POLICIES]
    assert len(set(names)) == len(names) and quality.BASELINE in names
    assert [p.name for p in quality.resolve_policies("default,fp32")] == list(
        quality.DEFAULT_POLICIES)
    assert [p.name for p in quality.resolve_policies("all")] == names
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        quality.resolve_policies("fp32,nope")


def _accepts(make) -> str | None:
    """None where the policy's optimizer can be built on a bf16 and an fp32 param here,
    else the TypeError's text."""
    try:
        make([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], 1e-3, 0.0)
        make([torch.nn.Parameter(torch.zeros(4))], 1e-3, 0.0)
    except TypeError as e:
        return str(e)
    except Exception:  # noqa: BLE001  (accepted the options; a dtype rule may refuse one)
        return None
    return None


def test_quality_tiny_run_through_the_cli(tmp_path, capsys):
    """A few steps of a tiny model under every default policy: the JSON's structure, the
    PNG, finite curves, fp32 learning, the same init for every policy of a dtype, state
    bytes read off the real state, and a policy whose options fused_optim does not take
    yet reported as not available (with the constructor's error), not dropped."""
    steps = 12
    args = ["quality", "--steps", str(steps), "--batch", "8", "--vocab", "32",
            "--context", "16", "--d-model", "32", "--layers", "1", "--heads", "2",
            "--branching", "4", "--eval-every", "4", "--eval-batches", "2", "--lr", "1e-2",
            "--seed", "1", "--out", str(tmp_path), "--quiet"]
    # The PNG needs matplotlib, a benchmark dependency `make test` does not install (as
    # test_cli_end_to_end).
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    if not have_mpl:
        args.append("--no-plot")
    assert cli.main(args) == 0
    (path,) = tmp_path.glob("cpu/*-quality.json")
    if have_mpl:
        assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(path.read_text())
    quality.validate(doc)
    assert doc["config"]["steps"] == steps and doc["config"]["seed"] == 1
    assert doc["config"]["model"]["d_model"] == 32 and doc["argv"] == args[1:]
    assert doc["machine"]["versions"]["torch"] == torch.__version__
    assert "sha" in doc["machine"]["commit"]
    src = doc["source"]
    assert 0 < doc["floor"] == src["floor_nats"] <= src["bigram_entropy_nats"]
    assert src["bigram_entropy_nats"] < src["uniform_nats"] == pytest.approx(math.log(32))

    runs = {r["name"]: r for r in doc["runs"]}
    assert list(runs) == list(quality.DEFAULT_POLICIES)
    policies = {p.name: p for p in quality.POLICIES}
    for name, r in runs.items():
        refused = _accepts(policies[name].make)
        if refused is not None:
            assert r["status"] == "not available"
            assert r["reason"] == f"not available: {refused}"
            continue
        assert r["status"] == "ok", (name, r["reason"])
        assert len(r["train_loss"]) == len(r["train_loss_smoothed"]) == steps
        assert all(math.isfinite(x) for x in r["train_loss"] + r["eval_loss"])
        assert r["eval_steps"] == [0, 4, 8, 12]
        assert r["final_loss"] == r["eval_loss"][-1] > doc["floor"]
        assert len(r["unchanged_fraction"]) == 3
        assert all(0 <= x <= 1 for x in r["unchanged_fraction"])
        assert r["final_train_loss_raw"] == r["train_loss"][-1]
        assert math.isfinite(r["ratio_to_fp32"]) and r["wall_s"] > 0
        state = r["state"]
        assert state["param_bytes_per_param"] == (4 if r["param_dtype"] == "float32" else 2)
        assert {"exp_avg", "exp_avg_sq"} <= set(state["dtypes"])
    # torch.optim keeps the moments in the params' dtype: 2 x 4 B or 2 x 2 B per param
    # (plus one step scalar per tensor, a fraction of a byte here).
    assert runs["fp32"]["state"]["dtypes"]["exp_avg"] == "float32"
    assert 8 <= runs["fp32"]["state"]["bytes_per_param"] < 8.2
    assert runs["bf16"]["state"]["dtypes"]["exp_avg"] == "bfloat16"
    assert 4 <= runs["bf16"]["state"]["bytes_per_param"] < 4.2
    fp32 = runs["fp32"]
    assert fp32["ratio_to_fp32"] == 1.0
    # fp32 params move every step; bf16 params lose the updates under half an ulp.
    assert max(fp32["unchanged_fraction"]) < 0.01
    assert all(b >= f for b, f in zip(runs["bf16"]["unchanged_fraction"],
                                      fp32["unchanged_fraction"]))
    assert fp32["eval_loss"][-1] < fp32["eval_loss"][0] - 0.1
    assert sum(fp32["train_loss"][-3:]) < sum(fp32["train_loss"][:3])
    # The same initial weights and held-out set: equal step-0 losses within a dtype, and
    # the bf16 init is the fp32 one rounded (close, not equal).
    ran = [r for r in runs.values() if r["status"] == "ok"]
    for r in ran:
        same = runs["fp32"] if r["param_dtype"] == "float32" else runs["bf16"]
        assert r["eval_loss"][0] == same["eval_loss"][0]
    assert runs["bf16"]["eval_loss"][0] == pytest.approx(fp32["eval_loss"][0], rel=1e-2)
    out = capsys.readouterr().out
    assert "fp32" in out and "wrote" in out
    for r in runs.values():
        if r["status"] == "not available":
            assert r["reason"] in out
    with pytest.raises(SystemExit):
        cli.main(["quality", "--configs", "nope"])


def test_quality_reports_a_refused_option_and_a_failure(monkeypatch):
    """A TypeError from the optimizer's constructor is "not available" (the other
    policies still run); any other error is "failed" with its text."""
    def refuse(params, lr, wd):
        raise TypeError("AdamW.__init__() got an unexpected keyword argument 'x'")

    def broken(params, lr, wd):
        raise RuntimeError("boom")

    rows = (quality.Policy("fp32", torch.float32, "torch.optim.AdamW()",
                           quality.POLICIES[0].make),
            quality.Policy("refused", torch.bfloat16, "X(x=True)", refuse),
            quality.Policy("broken", torch.float32, "Y()", broken))
    cfg = quality.TrainConfig(steps=2, batch=2, eval_every=1, eval_batches=1, branching=2,
                              model=quality.ModelConfig(vocab=8, context=4, d_model=8,
                                                        layers=1, heads=1))
    doc = quality.run(cfg, list(rows))
    quality.validate(doc)
    fp32, refused, broken_run = doc["runs"]
    assert fp32["status"] == "ok" and fp32["steps_done"] == 2
    assert refused["status"] == "not available"
    assert refused["reason"] == ("not available: AdamW.__init__() got an unexpected keyword "
                                 "argument 'x'")
    assert broken_run["status"] == "failed" and "RuntimeError: boom" in broken_run["reason"]
    assert "not available: AdamW" in quality.render_table(doc)
