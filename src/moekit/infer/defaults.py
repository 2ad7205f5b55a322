"""A model's own generation settings: generation_config.json, as Hugging Face checkpoints carry
it (import keeps the file).

What is read: the end-of-sequence ids (`eos_token_id`, one id or a list: Qwen's chat models
end a turn with `<|im_end|>`, which is not the tokenizer's end-of-text token), and the
sampling defaults `do_sample`, `temperature`, `top_p`, `top_k`, `repetition_penalty`.
Generation stops at every listed end-of-sequence id as it does at the tokenizer's own; the
sampling defaults apply where the user sets nothing (`moekit generate` and `chat` flags left
out, OpenAI request fields left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.files import read_json
from moekit.model_dir import ModelDir

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class GenerationDefaults:
    """The generation settings of a model directory (empty: it states none)."""

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    @classmethod
    def load(cls, model_dir: str | Path) -> GenerationDefaults:
        """The settings in `model_dir`'s generation_config.json (none without the file); a
        ValueError naming the file and field when a value is malformed."""
        path = Path(model_dir) / ModelDir.GENERATION_CONFIG
        if not path.is_file():
            return cls()
        data = read_json(path, what="generation settings")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> GenerationDefaults:
        eos = data.get("eos_token_id")
        ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{where}: eos_token_id={eos!r} must be a token id or a list of them")
        values: dict[str, Any] = {}
        for name, kind in (("temperature", float), ("top_p", float), ("top_k", int),
                           ("repetition_penalty", float)):  # fmt: skip
            value = data.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}: {name}={value!r} must be a number")
            values[name] = kind(value)
        if data.get("do_sample") is False:  # transformers decodes greedily then
            values["temperature"] = 0.0
        return cls(eos_token_ids=tuple(dict.fromkeys(ids)), **values)

    def sampling(self) -> dict[str, Any]:
        """The sampling defaults the model states, by SamplingParams field name."""
        return {
            name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None
        }
