"""The app factory: an engine and a server config in, a FastAPI application out.

The application is the routes (routes.py) behind the guard (guard.py: the Host and Origin
checks, the API key, the body limit, the metrics), with every error answered in the OpenAI
shape (errors.py). `build` checks its settings and the model's chat template, then loads a
model directory into an engine and makes its app; `moekit.serve.serve` runs both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from moekit.infer.chat import TEMPLATE_FILE, ChatTemplate, PromptTemplate, check_template
from moekit.infer.detokenize import TokenBytes
from moekit.infer.generate import Generator
from moekit.infer.jinja_chat import load_chat_template
from moekit.infer.offload import OffloadConfig
from moekit.infer.speculative import MAX_DRAFT_TOKENS
from moekit.serve.admission import Admission
from moekit.serve.config import ServerConfig, SettingError, check_count, listed
from moekit.serve.draft import check_draft_dir, load_drafter
from moekit.serve.engine import DEFAULT_PREFILL_CHUNK, Engine
from moekit.serve.errors import add_error_handlers
from moekit.serve.guard import Guard
from moekit.serve.metrics import Metrics
from moekit.serve.prefix_cache import check_prefix_tokens
from moekit.serve.routes import ServerState, router
from moekit.serve.speculate import check_speculative_tokens

if TYPE_CHECKING:
    from moekit.parallel.mesh import Parallel

__all__ = ["ServerConfig", "build", "create_app"]


def create_app(
    engine: Engine, config: ServerConfig, template: PromptTemplate | None = None
) -> FastAPI:
    """The FastAPI application serving `engine`'s model under `config.model_name`, formatting
    chats with `template` (default: moekit's plain template; a ValueError when it cannot
    render a conversation). Start the engine to serve."""
    if isinstance(template, ChatTemplate):
        check_template(template, "the chat template")
    app = FastAPI(title="moekit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    app.state.moekit = ServerState(
        engine=engine,
        config=config,
        admission=Admission(engine, config, template),
        metrics=metrics,
        token_bytes=TokenBytes(engine.tokenizer),
    )
    app.add_middleware(Guard, config=config, metrics=metrics)
    add_error_handlers(app)
    app.include_router(router)
    return app


def build(
    model_dir: str | Path,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens_limit: int | None = None,
    max_context: int | None = None,
    device: str | None = "auto",
    allowed_hosts: str | Sequence[str] = (),
    allowed_origins: str | Sequence[str] = (),
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    offload: OffloadConfig | None = None,
    parallel: Parallel | None = None,
    tool_call_format: str | None = None,
    prefix_cache_tokens: int | None = None,
    speculative_tokens: int = 0,
    draft_dir: str | Path | None = None,
    compile: bool = False,
) -> tuple[FastAPI, Engine]:
    """Load a model directory and return (app, engine); start the engine before serving.
    `max_context` bounds prompt plus new tokens per request and sizes the KV cache (default:
    the model's max_seq_len, at most 4096). The model runs on `device` ("auto": CUDA when
    present, else the CPU). `allowed_hosts` and `allowed_origins` open the server to other
    host names and to web pages (see ServerConfig). `prefill_chunk`: prompt tokens prefilled
    between two decode steps of the running requests (0: whole prompts at once). With
    `parallel` (the main process of a torchrun), the model's experts are split over its
    processes, which serve them (`moekit.parallel.inference`). `tool_call_format`: the format
    the model writes tool calls in (None: the one its chat template shows).
    `prefix_cache_tokens`: prompt tokens whose keys and values are kept for later prompts that
    start the same way (None: a quarter of max_batch x max_context; 0: off; see
    moekit.serve.prefix_cache). `speculative_tokens`: prompt-lookup drafts per request and
    decode step, checked in the step's pass (0: off; see moekit.serve.speculate). `draft_dir`:
    a draft model drafts them instead of prompt lookup (same tokenizer; moekit.serve.draft).
    `compile`: decode steps through torch.compile (moekit.serve.compiled_step; compiled on
    first use, or by `engine.compiled.warm_up()` before requests arrive). The
    settings and the model's chat template are checked before the model loads: a ValueError (a
    SettingError naming the setting, or naming the template's file) for one that cannot work;
    the draft model's tokenizer and vocabulary are checked once both models are loaded."""
    config = ServerConfig(
        model_name=model_name or Path(model_dir).resolve().name,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        allowed_hosts=listed(allowed_hosts),
        allowed_origins=listed(allowed_origins),
        tool_call_format=tool_call_format,
    )
    check_count("max_batch", max_batch)
    check_count("max_queue", max_queue)
    check_count("max_context", max_context, none_ok=True)
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 0:
        raise SettingError("prefill_chunk", prefill_chunk, "must be an integer >= 0 (0: off)")
    check_prefix_tokens(prefix_cache_tokens)
    try:
        check_speculative_tokens(speculative_tokens)
    except (TypeError, ValueError):
        allowed = f"must be an integer in [0, {MAX_DRAFT_TOKENS}] (0: off)"
        raise SettingError("speculative_tokens", speculative_tokens, allowed) from None
    check_draft_dir(draft_dir, speculative_tokens)
    template = load_chat_template(model_dir)
    if isinstance(template, ChatTemplate):
        check_template(template, str(Path(model_dir) / TEMPLATE_FILE))
    generator = Generator.from_dir(model_dir, device=device, offload=offload, compile=compile)
    if parallel is not None:  # the experts split over processes (moekit.parallel.inference)
        from moekit.parallel.inference import split_model

        split_model(generator.model, parallel)
    engine = Engine(
        generator,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
        prefix_cache_tokens=prefix_cache_tokens,
        speculative_tokens=speculative_tokens,
    )
    if draft_dir is not None:
        engine.drafter = load_drafter(draft_dir, engine)
    return create_app(engine, config, template), engine
