"""The compiled decode step (moekit.infer.compiled) against the eager model.

Compiling is slow on a small CPU, so two tests compile (tiny models covering dense and MoE
layers, shared experts with a gate, q/k/v biases, both kinds of q/k norm and left padding);
the others check the guards and the fallback without compiling a graph.
"""

import logging

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig, QuantizationConfig
from moekit.data.tokenizer import Tokenizer
from moekit.infer.compiled import CompiledDecoder, cache_length, decode_support
from moekit.infer.generate import Generator
from moekit.infer.offload import OffloadConfig, plan_budget
from moekit.infer.sampling import SamplingParams

CFG = dict(
    vocab_size=300, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden=48,
    max_seq_len=64, attention=dict(qkv_bias=True, qk_norm="head"),
    moe=dict(num_experts=4, top_k=2, expert_hidden=16, first_dense_layers=1,
             num_shared_experts=1, shared_expert_gate=True),
)  # fmt: skip
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["a b c d e f g h"], 300)


def _model(seed=0):
    model = build_model(ModelConfig.from_dict(CFG), seed=seed).eval()
    with torch.no_grad():  # biases away from their zero initialisation
        for block in model.blocks():
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv):
                lin.bias.normal_(0.0, 0.1)
    return model


def _same_tokens_and_logprobs(got, want, tol):
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in g.tokens]),
            torch.tensor([t.logprob for t in w.tokens]),
            rtol=tol,
            atol=tol,
        )


def test_the_cache_length_is_bucketed_and_capped():
    assert cache_length(10, 512) == 64
    assert cache_length(65, 512) == 128
    assert cache_length(300, 512) == 512
    assert cache_length(300, 400) == 400
    assert cache_length(70, 70) == 70


@pytest.mark.slow  # compiles a graph (tens of seconds on a small CPU)
def test_compiled_decoding_gives_the_eager_tokens_and_logprobs(tokenizer, monkeypatch):
    from moekit.infer.compiled import cpp_wrapper

    monkeypatch.setenv("MOEKIT_CPP_WRAPPER", "1")  # the default: a C++-driven graph
    assert cpp_wrapper()
    model = _model()
    eager = Generator(model, tokenizer)
    compiled = Generator(model, tokenizer, compile=True)
    prompts = [[5, 9, 17, 33, 2, 80], [40, 41, 42], [7] * 11]  # left padding, three lengths
    want = eager.generate(prompts, GREEDY)
    got = compiled.generate(prompts, GREEDY)
    assert compiled._decoder is not None and compiled._decoder.active  # it really ran compiled
    _same_tokens_and_logprobs(got, want, tol=1e-4)
    # Rows that stop early (a stop token) leave the batch while the others go on.
    stop = SamplingParams(
        temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=[want[1].token_ids[3]]
    )
    assert [c.token_ids for c in compiled.generate(prompts, stop)] == [
        c.token_ids for c in eager.generate(prompts, stop)
    ]


@pytest.mark.slow  # compiles a graph (tens of seconds on a small CPU)
def test_compiled_decoding_with_full_qk_norms_gives_the_eager_tokens(tokenizer):
    cfg = dict(
        CFG, attention=dict(qk_norm="full"), moe=dict(num_experts=4, top_k=2, expert_hidden=16)
    )
    model = build_model(ModelConfig.from_dict(cfg), seed=1).eval()
    prompts = [[5, 9, 17, 33], [40, 41]]
    want = [c.token_ids for c in Generator(model, tokenizer).generate(prompts, GREEDY)]
    compiled = Generator(model, tokenizer, compile=True)
    assert [c.token_ids for c in compiled.generate(prompts, GREEDY)] == want
    assert compiled._decoder is not None and compiled._decoder.active


@pytest.mark.parametrize("qk_norm", ["head", "full", "none"])
def test_the_step_as_written_gives_the_eager_tokens_and_logprobs(tokenizer, qk_norm):
    # The step's arithmetic without the compiler (fast): the same function it compiles.
    model = build_model(ModelConfig.from_dict(dict(CFG, attention=dict(qk_norm=qk_norm)))).eval()
    gen = Generator(model, tokenizer, compile=True)
    gen._decoder = CompiledDecoder(model, compiler=lambda fn: fn)
    prompts = [[5, 9, 17, 33, 2, 80], [40, 41, 42], [7] * 11]
    want = Generator(model, tokenizer).generate(prompts, GREEDY)
    got = gen.generate(prompts, GREEDY)
    assert gen._decoder.active
    _same_tokens_and_logprobs(got, want, tol=1e-5)


HIER = dict(vocab_size=300, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48,
            max_seq_len=64,
            moe=dict(num_experts=8, top_k=4, expert_hidden=16, router="hierarchical",
                     router_groups=4, group_top_k=2, bias_update_rate=1e-3,
                     group_bias_update_rate=1e-3))  # fmt: skip


def _hierarchical():
    model = build_model(ModelConfig.from_dict(HIER), seed=0).eval()
    with torch.no_grad():  # selection biases at both levels, away from zero
        for layer in model.moe_layers().values():
            layer.router.selection_bias.normal_(0.0, 0.05)
            layer.router.group_selection_bias.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_hierarchical_router_decodes_through_the_step_as_eagerly(tokenizer, compiled):
    model = _hierarchical()
    assert decode_support(model) is None
    prompts = [[5, 9, 17, 33, 2, 80], [40, 41, 42], [7] * 11]
    want = Generator(model, tokenizer).generate(prompts, GREEDY)
    gen = Generator(model, tokenizer, compile=True)
    if not compiled:  # the step's arithmetic without the compiler
        gen._decoder = CompiledDecoder(model, compiler=lambda fn: fn)
    got = gen.generate(prompts, GREEDY)
    assert gen._decoder is not None and gen._decoder.active
    _same_tokens_and_logprobs(got, want, tol=1e-4)
    one = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, experts_per_token=3)
    assert [c.token_ids for c in gen.generate(prompts, one)] == [
        c.token_ids for c in Generator(model, tokenizer).generate(prompts, one)
    ]


def _broken_backend(gm, example_inputs):
    raise RuntimeError("this backend cannot compile")


def test_a_failed_compilation_falls_back_to_eager_and_says_why_once(tokenizer, caplog):
    model = _model()
    want = Generator(model, tokenizer).generate([[3, 4, 5]], GREEDY)[0].token_ids
    gen = Generator(model, tokenizer, compile=True)
    gen._decoder = CompiledDecoder(
        model, compiler=lambda fn: torch.compile(fn, backend=_broken_backend)
    )
    with caplog.at_level(logging.WARNING, logger="moekit"):
        got = gen.generate([[3, 4, 5]], GREEDY)[0].token_ids
        again = gen.generate([[3, 4, 5]], GREEDY)[0].token_ids
    assert got == want and again == want
    warnings = [r for r in caplog.records if "compiled decoding is off" in r.getMessage()]
    assert len(warnings) == 1
    assert "cannot compile" in warnings[0].getMessage()
    assert not gen._decoder.active


@pytest.mark.slow  # compiles a graph
def test_a_failed_cpp_wrapped_step_is_compiled_again_with_the_python_wrapper(
    tokenizer, caplog, monkeypatch
):
    monkeypatch.setenv("MOEKIT_CPP_WRAPPER", "1")
    real = torch.compile

    def cpp_fails(fn, **kwargs):  # the C++-driven compile breaks, the Python-driven one works
        if (kwargs.get("options") or {}).get("cpp_wrapper"):
            return real(fn, backend=_broken_backend)
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", cpp_fails)
    model = _model()
    want = Generator(model, tokenizer).generate([[3, 4, 5]], GREEDY)[0].token_ids
    gen = Generator(model, tokenizer, compile=True)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        got = gen.generate([[3, 4, 5]], GREEDY)[0].token_ids
    assert got == want
    messages = [r.getMessage() for r in caplog.records]
    assert sum("C++-driven step failed" in m and "cannot compile" in m for m in messages) == 1
    assert not any("compiled decoding is off" in m for m in messages)
    assert gen._decoder is not None and gen._decoder.active


def test_models_the_compiled_step_does_not_cover_are_named():
    assert decode_support(_model()) is None
    assert decode_support(_model().train()) == "the model is in training mode"
    mla = dict(
        CFG, num_kv_heads=4,
        attention=dict(kind="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8),
    )  # fmt: skip
    assert decode_support(build_model(ModelConfig.from_dict(mla)).eval()) == (
        "multi-head latent attention"
    )
    hooked = _model()
    hooked.blocks()[0].attn.wq.register_forward_hook(lambda *a: None)
    assert "adapters or hooks" in str(decode_support(hooked))


def test_a_hook_added_after_the_first_request_turns_the_compiled_step_off(tokenizer):
    model = _model()
    gen = Generator(model, tokenizer, compile=True)
    gen._decoder = CompiledDecoder(model, compiler=lambda fn: fn)  # the step, uncompiled
    want = Generator(model, tokenizer).generate([[3, 4, 5]], GREEDY)[0].token_ids
    assert gen.generate([[3, 4, 5]], GREEDY)[0].token_ids == want  # the step as written
    assert gen._decoder.active
    seen = []
    model.blocks()[1].attn.wo.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert gen.generate([[3, 4, 5]], GREEDY)[0].token_ids == want
    assert not gen._decoder.active and len(seen) == len(want)  # prefill + each decode step


# Sizes that int4 groups of 32 divide (every projection's input dimension).
QCFG = dict(
    CFG, dim=64, ffn_hidden=64,
    moe=dict(CFG["moe"], expert_hidden=32),
)  # fmt: skip


def _quantised(bits, parts):
    from moekit.quant.build import quantize_model
    from moekit.quant.weight import QuantWeight

    model = build_model(ModelConfig.from_dict(QCFG), seed=2).eval()
    model = quantize_model(model, QuantizationConfig(bits=bits, parts=parts))
    for m in model.modules():
        if isinstance(m, QuantWeight):
            m.kernel = "dequant"  # the eager oracle: dequantise, then the float product
    return model


@pytest.mark.parametrize("bits,parts", [(8, "experts"), (4, "experts"), (8, "all"), (4, "all")])
def test_the_step_as_written_reads_quantised_weights_as_the_eager_model(tokenizer, bits, parts):
    model = _quantised(bits, parts)
    assert decode_support(model) is None
    gen = Generator(model, tokenizer, compile=True)
    gen._decoder = CompiledDecoder(model, compiler=lambda fn: fn)  # the step, uncompiled
    prompts = [[5, 9, 17, 33, 2, 80], [40, 41, 42]]
    want = Generator(model, tokenizer).generate(prompts, GREEDY)
    got = gen.generate(prompts, GREEDY)
    assert gen._decoder.active
    _same_tokens_and_logprobs(got, want, tol=1e-4)


@pytest.mark.slow  # compiles a graph (tens of seconds on a small CPU)
def test_compiled_decoding_of_an_int4_model_gives_the_eager_tokens(tokenizer):
    model = _quantised(4, "all")
    prompts = [[5, 9, 17, 33], [40, 41]]
    want = [c.token_ids for c in Generator(model, tokenizer).generate(prompts, GREEDY)]
    compiled = Generator(model, tokenizer, compile=True)
    assert [c.token_ids for c in compiled.generate(prompts, GREEDY)] == want
    assert compiled._decoder is not None and compiled._decoder.active


def test_paged_experts_decode_eagerly_with_compile_on(tiny_model_dir):
    full = Generator.from_dir(tiny_model_dir, device="cpu")
    budget = plan_budget(full.model, 1 << 40).minimum  # the smallest budget that works
    offload = OffloadConfig(max_memory=budget)
    paged = Generator.from_dir(tiny_model_dir, device="cpu", offload=offload, compile=True)
    assert "paged experts" in str(decode_support(paged.model))
    prompts = ["The history of", "Water boils at"]
    want = [c.token_ids for c in full.generate(prompts, GREEDY)]
    assert [c.token_ids for c in paged.generate(prompts, GREEDY)] == want


@pytest.mark.parametrize(
    ("compiled", "scale_input", "streamed"),
    [
        (False, False, False),
        (False, True, False),
        pytest.param(True, False, False, marks=pytest.mark.slow),
        (False, False, True),
        (False, True, True),
        pytest.param(True, False, True, marks=pytest.mark.slow),
    ],
)
def test_large_weights_through_the_library_products_give_the_eager_tokens(
    tokenizer, monkeypatch, compiled, scale_input, streamed
):
    # Every weight counts as large on an AVX-512 CPU: dense projections go to the library's
    # product and the experts to `grouped_swiglu`, in the step as written and compiled (and
    # with the routing weights on the experts' inputs, as Llama 4 weights them); `streamed`:
    # to the native kernels instead (moekit.moe.native), which need a real AVX-512 CPU.
    import moekit.moe.decode_kernel as dk
    from moekit.moe import native

    monkeypatch.setattr(dk, "LIBRARY_MIN_ELEMENTS", 1)
    monkeypatch.setattr(dk, "LIBRARY_CPU", True)
    if streamed and not native.enabled():
        pytest.skip("the native kernels need an AVX-512 CPU (and MOEKIT_NATIVE not 0)")
    if streamed:
        assert native.load()
    else:
        monkeypatch.setattr(native, "_loaded", False)
    moe = dict(CFG["moe"], scale_expert_input=scale_input)
    model = build_model(ModelConfig.from_dict(dict(CFG, moe=moe)), seed=3).eval()
    gen = Generator(model, tokenizer, compile=True)
    # Compiled as one graph or not at all (a graph break would fail here, and the decoder
    # would then be off): the operator and the size rule must not split the step.
    # C++-driven, as by default: the wrapper calls the operators through the dispatcher.
    options = {"cpp_wrapper": True}
    if compiled:  # torch's 8 compiled variants of the step may be used up by earlier tests
        torch._dynamo.reset()
    one_graph = lambda fn: torch.compile(fn, dynamic=False, fullgraph=True, options=options)  # noqa: E731
    gen._decoder = CompiledDecoder(model, compiler=one_graph if compiled else lambda fn: fn)
    prompts = [[5, 9, 17, 33, 2, 80], [40, 41, 42]]
    want = Generator(model, tokenizer).generate(prompts, GREEDY)
    with torch.profiler.profile() as prof:  # which operators the steps called
        got = gen.generate(prompts, GREEDY)
    assert gen._decoder.active
    _same_tokens_and_logprobs(got, want, tol=1e-4)
    ran = {e.key for e in prof.key_averages()}
    native_ops = {"moekit_native::grouped_swiglu", "moekit_native::linear"}
    assert (native_ops <= ran) == streamed and (native_ops & ran == set()) == (not streamed)
