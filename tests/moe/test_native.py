"""The native decode kernels (moekit.moe.native), built here from their source, against plain
PyTorch: SwiGLU experts for a few tokens and a dense product, at shapes with tails (rows not a
multiple of four, a model dim not a multiple of 16) and over thread counts that split experts
between threads. Skipped, with the reason, on a CPU without AVX-512 (the kernels are not used
there); on one with it, a failed build fails here."""

import logging
import os
import time

import pytest
import torch
import torch.nn.functional as F

from moekit.moe import native
from moekit.moe.experts import Experts, decode_experts
from tests.moe.test_decode_kernel import _reference

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 rounding: summed in another order


@pytest.fixture
def built():
    if not native.enabled():
        pytest.skip("the native kernels need an AVX-512 CPU (and MOEKIT_NATIVE not 0)")
    assert native.load(), "the native kernels did not build on an AVX-512 CPU"


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _experts(num_experts=6, dim=40, hidden=40, seed=0):
    torch.manual_seed(seed)
    ex = Experts(num_experts, dim, hidden)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0.0, 0.2)
    return ex


@pytest.mark.parametrize("hidden", [10, 40])  # the down rows: one partial step, or two and a part
@pytest.mark.parametrize("scale_input", [False, True])
def test_streamed_experts_equal_a_plain_loop(built, threads, scale_input, hidden):
    ex = _experts(hidden=hidden)
    x = torch.randn(4, 40)
    weights = torch.rand(4, 2).softmax(-1)
    chosen = (
        [[5, 0], [0, 3], [5, 5], [1, 2]],  # expert 5 twice in one token; 0 by two tokens
        [[2, -1], [-1, -1], [4, 2], [3, 1]],  # empty slots, a token with none
        [[-1, -1]] * 4,  # no expert at all: zeros
    )
    with torch.inference_mode():
        gate_up = ex.fused_gate_up()
        for rows in (1, 2, 4):
            for c in chosen:
                args = (x[:rows], torch.tensor(c[:rows]), weights[:rows])
                assert native.takes(args[0], gate_up, ex.w_down)
                got = native.grouped_swiglu(*args, gate_up, ex.w_down, scale_input)
                want = _reference(*args, ex, scale_input)
                torch.testing.assert_close(got, want, **TOL)


def test_the_dense_product_equals_the_library(built, threads):
    torch.manual_seed(1)
    w = torch.randn(37, 40)
    for rows in (1, 2, 3, 4, 5, 7, native.NATIVE_MAX_TOKENS):  # inputs in fours, twos, ones
        x = torch.randn(rows, 40)
        assert native.takes_linear(x, w)
        torch.testing.assert_close(native.linear(x, w), F.linear(x, w), **TOL)


def test_the_operators_pass_torchs_operator_checks(built):
    ex = _experts(num_experts=4, dim=16, hidden=8)
    with torch.no_grad():
        gate_up, down = ex.fused_gate_up().clone(), ex.w_down.detach().clone()
    x, weights = torch.randn(2, 16), torch.rand(2, 2).softmax(-1)
    for scale_input in (False, True):
        args = (x, torch.tensor([[3, 0], [1, -1]]), weights, gate_up, down, scale_input)
        torch.library.opcheck(torch.ops.moekit_native.grouped_swiglu, args)
    torch.library.opcheck(torch.ops.moekit_native.linear, (x, torch.randn(5, 16)))


def test_nothing_autograd_follows_is_taken(built):
    x, w = torch.randn(1, 40), torch.randn(8, 40, requires_grad=True)
    assert not native.takes_linear(x, w)  # the operators have no backward
    with torch.no_grad():
        assert native.takes_linear(x, w)


def test_the_operators_refuse_what_they_cannot_compute(built):
    ex = _experts()
    x, weights = torch.randn(1, 40), torch.rand(1, 2)
    gate_up, down = ex.fused_gate_up(), ex.w_down
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="expert index out of range"):
            native.grouped_swiglu(x, torch.tensor([[0, 6]]), weights, gate_up, down, False)
        with pytest.raises(RuntimeError, match="weight shapes do not match"):
            native.grouped_swiglu(x[:, :32], torch.tensor([[0, 1]]), weights, gate_up, down, False)
        q64, _ = _int4(_experts(num_experts=4, dim=128, hidden=64), 64)
        q32, _ = _int4(_experts(num_experts=4, dim=128, hidden=64), 32)
        x = torch.randn(1, 128)
        parts = list(q32.native_parts(x))
        parts[3:6] = q64.native_parts(x)[3:6]  # up in groups of 64, gate in groups of 32
        assert not native.takes_int4(x, 32, *parts)
        with pytest.raises(RuntimeError, match="same groups"):
            native.grouped_swiglu_int4(
                x, torch.tensor([[0, 1]]), weights, *parts, scale_input=False
            )


def test_a_failed_builds_reason_is_the_compilers_error_line():
    message = (
        "Error building extension 'moekit_native': [1/2] c++ -c native.cpp -o native.o\n"
        "FAILED: native.o\nnative.cpp:3:1: error: 'this' does not name a type\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    assert native._reason(message) == "native.cpp:3:1: error: 'this' does not name a type"
    assert native._reason("no such file: ninja") == "no such file: ninja"


def test_what_the_kernels_do_not_take(built, monkeypatch):
    ex = _experts()
    gate_up, down = ex.fused_gate_up(), ex.w_down
    x = torch.randn(1, 40)
    assert not native.takes(x, gate_up, down)  # trainable weights, autograd on: no backward
    torch.set_grad_enabled(False)  # as when decoding (restored by the fixture below)
    assert native.takes(x, gate_up, down)
    too_many = torch.randn(native.NATIVE_MAX_TOKENS + 1, 40)  # a prefill: the library's GEMM
    assert not native.takes(too_many, gate_up, down)
    assert not native.takes(x.bfloat16(), gate_up, down)
    assert not native.takes(x, gate_up.bfloat16(), down.bfloat16())
    assert not native.takes(x, gate_up, down.transpose(1, 2).contiguous().transpose(1, 2))
    w = torch.randn(8, 40)
    assert native.takes_linear(x, w) and not native.takes_linear(x, torch.randn(40, 8).T)
    monkeypatch.setattr(native, "_loaded", False)  # not built: nothing is taken
    assert not native.takes(x, gate_up, down) and not native.takes_linear(x, w)


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    before = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(before)


def test_eager_decoding_of_large_experts_streams_them(built, monkeypatch):
    import moekit.moe.decode_kernel as dk

    ex = _experts()
    monkeypatch.setattr(dk, "LIBRARY_CPU", True)
    monkeypatch.setattr(dk, "LIBRARY_MIN_ELEMENTS", 1)  # every expert counts as large
    x, weights, experts = torch.randn(1, 40), torch.rand(1, 2).softmax(-1), torch.tensor([[4, 1]])
    with torch.inference_mode():
        kernel = ex.token_kernel()
        assert kernel is not None
        got = kernel(x, experts, weights)
        assert got is not None  # the native kernel ran
        torch.testing.assert_close(got, _reference(x, experts, weights, ex), **TOL)
        monkeypatch.setattr(native, "_loaded", False)
        assert kernel(x, experts, weights) is None  # not built: the library's products
        torch.testing.assert_close(
            decode_experts(x, experts, weights, ex), _reference(x, experts, weights, ex), **TOL
        )


def test_a_failed_build_is_logged_once_with_the_compilers_error(monkeypatch, tmp_path, caplog):
    if not native.enabled():
        pytest.skip("the native kernels need an AVX-512 CPU (and MOEKIT_NATIVE not 0)")
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setattr(native, "NAME", "moekit_native_broken")  # not the real build's folder
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(native, "_loaded", None)
    # A lock left by a killed build would make PyTorch's builder wait forever: it is cleared.
    lock = tmp_path / "ext" / "moekit_native_broken" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="moekit"):
        assert not native.load()
        assert not native.load()  # tried once
    messages = [r.getMessage() for r in caplog.records]
    assert any("stale build lock" in m for m in messages)
    failures = [m for m in messages if "could not be built" in m]
    assert len(failures) == 1 and "MOEKIT_NATIVE=0" in failures[0]
    assert "broken.cpp" in failures[0] and "error" in failures[0]  # the compiler's own line


def test_moekit_native_0_never_builds(monkeypatch, caplog):
    monkeypatch.setenv("MOEKIT_NATIVE", "0")
    monkeypatch.setattr(native, "_loaded", None)
    with caplog.at_level(logging.INFO, logger="moekit"):
        assert not native.load()
    assert not caplog.records


def _int4(ex, group):
    from moekit.quant.experts import QuantExperts

    q = QuantExperts.like(ex, 4, group)
    oracle = _experts(ex.num_experts, ex.dim, ex.hidden)  # the dequantised weights, as floats
    with torch.no_grad():
        for name in ("w_gate", "w_up", "w_down"):
            getattr(oracle, name).copy_(getattr(q, name).dequantize())
    return q, oracle


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("scale_input", [False, True])
def test_streamed_int4_experts_equal_the_dequantised_oracle(built, threads, group, scale_input):
    q, oracle = _int4(_experts(num_experts=6, dim=128, hidden=64), group)
    torch.manual_seed(2)
    x = torch.randn(native.NATIVE_MAX_TOKENS, 128)
    weights = torch.rand(native.NATIVE_MAX_TOKENS, 2).softmax(-1)
    with torch.inference_mode():
        for rows in (1, 2, 3, 5, native.NATIVE_MAX_TOKENS):  # tokens in fours, then the rest
            experts = torch.randint(-1, 6, (rows, 2))  # repeats and empty slots
            parts = q.native_parts(x[:rows])
            assert parts is not None and len(parts) == 9
            args = (x[:rows], experts, weights[:rows])
            got = native.grouped_swiglu_int4(*args, *parts, scale_input=scale_input)
            want = _reference(*args, oracle, scale_input)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_int4_experts_the_native_kernel_does_not_take(built, monkeypatch):
    from moekit.quant.experts import QuantExperts

    ex = _experts(num_experts=4, dim=64, hidden=32)
    x = torch.randn(1, 64)
    assert QuantExperts.like(ex, 4, 32).native_parts(x) is not None
    assert QuantExperts.like(ex, 4, 16).native_parts(x) is None  # groups of 16 bytes or more
    assert QuantExperts.like(ex, 8, None).native_parts(x) is None  # int8: the compiled kernel
    q = QuantExperts.like(ex, 4, 32)
    q.w_up.kernel = "dequant"  # a kernel asked for by name runs as asked
    assert q.native_parts(x) is None
    assert QuantExperts.like(ex, 4, 32).native_parts(torch.randn(9, 64)) is None  # prefill


def test_int4_operator_passes_torchs_operator_checks(built):
    q, _ = _int4(_experts(num_experts=4, dim=64, hidden=32), 32)
    x, weights = torch.randn(2, 64), torch.rand(2, 2).softmax(-1)
    parts = q.native_parts(x)
    args = (x, torch.tensor([[3, 0], [1, -1]]), weights, *parts, False)
    torch.library.opcheck(torch.ops.moekit_native.grouped_swiglu_int4, args)


@pytest.mark.slow  # compiles the decode step
def test_an_int4_model_decodes_through_the_native_kernel_as_through_the_oracle(built, caplog):
    from moekit import build_model
    from moekit.config import ModelConfig, QuantizationConfig
    from moekit.data.tokenizer import Tokenizer
    from moekit.infer.compiled import CompiledDecoder
    from moekit.infer.generate import Generator
    from moekit.infer.sampling import SamplingParams
    from moekit.quant.build import quantize_model
    from moekit.quant.weight import QuantWeight

    cfg = dict(
        vocab_size=300, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=64,
        max_seq_len=64, moe=dict(num_experts=4, top_k=2, expert_hidden=32),
    )  # fmt: skip
    tokenizer = Tokenizer.train(["a b c d e f g h"], 300)
    model = build_model(ModelConfig.from_dict(cfg), seed=4).eval()
    model = quantize_model(model, QuantizationConfig(bits=4))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    prompts = [[5, 9, 17, 33], [40, 41]]
    compiled = Generator(model, tokenizer, compile=True)
    # One graph or none: a graph break in the kernel's conditions would turn the step off.
    # (A fresh compile cache: earlier tests in this process may have used up torch's 8
    # compiled variants of the step function, which fullgraph would report as a failure.)
    torch._dynamo.reset()
    options = {"cpp_wrapper": True}  # C++-driven, as by default
    one_graph = lambda fn: torch.compile(fn, dynamic=False, fullgraph=True, options=options)  # noqa: E731
    compiled._decoder = CompiledDecoder(model, compiler=one_graph)
    with torch.profiler.profile() as prof, caplog.at_level(logging.WARNING, logger="moekit"):
        got = compiled.generate(prompts, greedy)
    assert compiled._decoder.active, [r.getMessage() for r in caplog.records]  # why it failed
    assert "moekit_native::grouped_swiglu_int4" in {e.key for e in prof.key_averages()}
    for m in model.modules():
        if isinstance(m, QuantWeight):
            m.kernel = "dequant"  # the oracle: dequantise, then the float product, eagerly
    want = Generator(model, tokenizer).generate(prompts, greedy)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in g.tokens]),
            torch.tensor([t.logprob for t in w.tokens]),
            rtol=1e-4,
            atol=1e-4,
        )
