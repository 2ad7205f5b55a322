"""The tokenizer's way in and out of a Hugging Face checkpoint.

Each architecture states its tokenizer files in a `TokenizerFormat`: which Hugging Face files
travel, and the model-directory file each becomes. Import copies them in (naming the
end-of-text token for moekit when tokenizer_config.json leaves it out); export copies them
back and states the special token ids in config.json and generation_config.json.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.data.tokenizer import Tokenizer
from moekit.files import read_json, write_json
from moekit.model_dir import ModelDir

HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers 5 saves a tokenizer's Jinja chat template in a file of its own; multimodal
# checkpoints keep their processor's in chat_template.json ({"chat_template": ...}).
HF_CHAT_TEMPLATE = "chat_template.jinja"
HF_PROCESSOR_TEMPLATE = "chat_template.json"


def _default_files() -> dict[str, str]:
    return {HF_TOKENIZER: ModelDir.TOKENIZER, HF_TOKENIZER_CONFIG: ModelDir.TOKENIZER_CONFIG}


@dataclass(frozen=True)
class TokenizerFormat:
    """The tokenizer files of an architecture's checkpoints: Hugging Face file name -> the
    model-directory file it becomes. tokenizer.json (the `tokenizers` pipeline) is what makes
    a checkpoint's tokenizer usable; without it nothing is carried."""

    files: Mapping[str, str] = field(default_factory=_default_files)


def import_tokenizer(
    fmt: TokenizerFormat, src: Path, out: ModelDir, hf_config: Mapping[str, Any]
) -> None:
    """Carry the tokenizer of the Hugging Face checkpoint `src` into `out`, naming its
    end-of-text token in the tokenizer config (from the checkpoint's `eos_token_id`) when the
    checkpoint's own leaves it out. A chat template saved as chat_template.jinja (or a
    processor's chat_template.json) goes into the tokenizer config's `chat_template`, where
    chat, serve and every export read it; as in transformers, it comes before a template in
    the checkpoint's tokenizer_config.json."""
    if not (src / HF_TOKENIZER).is_file():
        return
    for theirs, ours in fmt.files.items():
        if theirs != HF_TOKENIZER_CONFIG and (src / theirs).is_file():
            shutil.copyfile(src / theirs, out / ours)
    config: dict[str, Any] = {}
    if (src / HF_TOKENIZER_CONFIG).is_file():
        config = read_json(src / HF_TOKENIZER_CONFIG)
    template = _separate_chat_template(src)  # transformers: it comes before the config's
    if template is not None:
        config["chat_template"] = template
    if not config.get("eos_token"):
        added = read_json(src / HF_TOKENIZER).get("added_tokens", [])
        by_id = {t["id"]: t["content"] for t in added}
        eos = hf_config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        if eos in by_id:
            config["eos_token"] = by_id[eos]
    write_json(out / fmt.files.get(HF_TOKENIZER_CONFIG, ModelDir.TOKENIZER_CONFIG), config)


def _separate_chat_template(src: Path) -> str | None:
    """A checkpoint's Jinja chat template kept outside tokenizer_config.json, or None."""
    if (src / HF_CHAT_TEMPLATE).is_file():
        return (src / HF_CHAT_TEMPLATE).read_text(encoding="utf-8")
    if (src / HF_PROCESSOR_TEMPLATE).is_file():
        data = read_json(src / HF_PROCESSOR_TEMPLATE, what="the processor's chat template")
        template = data.get("chat_template") if isinstance(data, dict) else None
        return template if isinstance(template, str) else None
    return None


def export_tokenizer(fmt: TokenizerFormat, src: ModelDir, out: Path) -> None:
    """Copy the tokenizer files of the model directory `src` to the Hugging Face directory
    `out` under their Hugging Face names. tokenizer_config.json states `add_bos_token` and
    `add_eos_token` when it does not already (what the tokenizer's post-processor puts
    around a text), so consumers never guess."""
    for theirs, ours in fmt.files.items():
        if not (src / ours).is_file():
            continue
        if theirs == HF_TOKENIZER_CONFIG and src.tokenizer_path.is_file():
            config = read_json(src / ours)
            for key, value in added_specials(Tokenizer.load(src.path)).items():
                config.setdefault(key, value)
            write_json(out / theirs, config)
        else:
            shutil.copyfile(src / ours, out / theirs)


def added_specials(tok: Tokenizer) -> dict[str, bool]:
    """Whether the tokenizer `tok` puts its BOS in front of a prompt and an EOS after it
    (`add_bos_token`, `add_eos_token`, as transformers and llama.cpp name them)."""
    probe = tok.backend.encode("a", add_special_tokens=True).ids
    return {
        "add_bos_token": tok.bos_id is not None and tok.bos_id in tok.prompt_prefix,
        "add_eos_token": tok.eos_id is not None and bool(probe) and probe[-1] == tok.eos_id,
    }


def special_ids(model_dir: ModelDir) -> dict[str, int | None]:
    """bos/eos/pad token ids of a model directory's tokenizer (None without one; a tokenizer
    trained by moekit has no BOS, and saying so keeps transformers from assuming its
    architecture's default)."""
    if not model_dir.tokenizer_path.is_file():
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tok = Tokenizer.load(model_dir.path)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
