"""Adapters in the store: LoRA weights and textual-inversion embeddings, each stored under its own tag with the
name of the base model it fits (`kind: lora|embedding`, `adapter: {base, weights, token}` in model.yaml).

They follow the store's rules (atomic writes, sha256 per file, safetensors only unless `allow_pickle`), so list,
get, delete, export, import-archive and the S3 store work on them as on pipelines. An adapter that does not fit
its base (shapes, or no module it targets) is refused at import: it is loaded into the base once to find out.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import StoreError
from .files import PICKLE_WEIGHTS
from .model import Model
from .store import ModelStore

LORA, EMBEDDING = "lora", "embedding"
SAFE_SUFFIXES = (".safetensors",)
# Tokens are matched anywhere in a prompt, even inside words ("cat" in "category"): require a delimited form.
TOKEN = re.compile(r"<[A-Za-z0-9][A-Za-z0-9._-]{0,62}>")
MAX_ADAPTER_BYTES = 4 << 30  # an SDXL LoRA of high rank is under 2 GiB; raise it with max_bytes (--max-size-gb)
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.bin", "*.pt"]


def import_lora(
    store: ModelStore,
    name: str,
    source: str | os.PathLike[str],
    base: str,
    *,
    allow_pickle: bool = False,
    version: str | None = None,
    labels: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_ADAPTER_BYTES,
) -> Model:
    """Store LoRA weights (any format `load_lora_weights` reads: diffusers, kohya, PEFT) for `base`."""
    weights = _weights_file(source, allow_pickle, max_bytes)
    _check_fits(store, base, LORA, weights, None)
    return _write(store, name, LORA, base, weights, None, version, labels, metadata)


def import_embedding(
    store: ModelStore,
    name: str,
    source: str | os.PathLike[str],
    base: str,
    token: str,
    *,
    allow_pickle: bool = False,
    version: str | None = None,
    labels: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_ADAPTER_BYTES,
) -> Model:
    """Store a textual-inversion embedding for `base`, used by writing `token` in a prompt."""
    if not TOKEN.fullmatch(token):
        raise StoreError(
            f"token {token!r} must look like <name> (letters, digits, '.', '_', '-'): a bare word would also match "
            "inside other words of a prompt"
        )
    weights = _weights_file(source, allow_pickle, max_bytes)
    _check_fits(store, base, EMBEDDING, weights, token)
    return _write(store, name, EMBEDDING, base, weights, token, version, labels, metadata)


def adapters_for(store: ModelStore, base: str) -> list[Model]:
    """The newest version of every adapter stored for the model named `base`."""
    newest: dict[str, Model] = {}
    for model in store.list_models():
        if model.info.is_adapter and model.info.adapter.get("base") == base:
            newest[model.name] = model  # list_models sorts versions oldest first
    return list(newest.values())


def weights_path(model: Model) -> Path:
    """The weights file of a stored adapter."""
    return model.path / str(model.info.adapter["weights"])


def adapter_problem(model: Model, *, allow_pickle: bool, full: bool = True) -> str | None:
    """Why a stored adapter must not be served, or None: the rules `import-lora` and `import-embedding` apply,
    checked again whatever the entry's origin (an archive, S3, a hand-made folder), since the store's own word in
    model.yaml is data, not trust. The weights must be one plain file inside the entry, recorded with its sha256
    (re-hashed when `full`), in safetensors unless the operator allows pickle; an embedding needs a delimited
    token. (Whether it fits its base is known when a replica loads it.)"""
    adapter = model.info.adapter
    kind, weights, base = model.info.kind, adapter.get("weights"), adapter.get("base")
    if kind not in (LORA, EMBEDDING):
        return f"unknown adapter kind {kind!r}"
    if not isinstance(base, str) or not base:
        return "names no base model"
    if not isinstance(weights, str) or Path(weights).name != weights or weights in ("", ".", ".."):
        return f"its weights {str(weights)[:80]!r} are not a file name inside the entry"
    if weights not in model.info.files:
        return f"its weights {weights} have no recorded sha256"
    path = model.path / weights
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return f"its weights {weights} are missing"
    if not stat.S_ISREG(mode):
        return f"its weights {weights} are not a regular file"
    if path.suffix in PICKLE_WEIGHTS and not allow_pickle:
        return f"its weights {weights} are a pickle file, served only with --allow-pickle"
    if path.suffix not in SAFE_SUFFIXES + PICKLE_WEIGHTS:
        return f"its weights {weights} are neither .safetensors nor, with --allow-pickle, .bin/.pt"
    token = adapter.get("token")
    if kind == EMBEDDING and not (isinstance(token, str) and TOKEN.fullmatch(token)):
        return f"its token {str(token)[:80]!r} is not of the form <name>"
    try:
        model.check_files(full=full)
    except StoreError as exc:
        return str(exc)
    return None


def _write(
    store: ModelStore,
    name: str,
    kind: str,
    base: str,
    weights: Path,
    token: str | None,
    version: str | None,
    labels: Mapping[str, str] | None,
    metadata: Mapping[str, Any] | None,
) -> Model:
    adapter: dict[str, Any] = {"base": base, "weights": weights.name}
    if token is not None:
        adapter["token"] = token

    def fill(target: Path) -> None:
        shutil.copyfile(weights, target / weights.name)

    fields = {"pipeline_class": "", "signatures": {}, "kind": kind, "adapter": adapter}
    return store.write_model(name, version, fill, labels, metadata, fields)


def _weights_file(source: str | os.PathLike[str], allow_pickle: bool, max_bytes: int) -> Path:
    """The one weights file a source names: a file, a folder holding one, or a hub id (resolved offline-first)."""
    path = Path(source).expanduser()
    if not path.exists():
        path = _from_hub(str(source))
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.suffix in SAFE_SUFFIXES + PICKLE_WEIGHTS)
        safe = [p for p in candidates if p.suffix in SAFE_SUFFIXES]
        chosen = safe or (candidates if allow_pickle else [])
        if len(chosen) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise StoreError(f"{source}: expected one weights file (.safetensors), found {found}")
        path = chosen[0]
    if path.suffix in PICKLE_WEIGHTS and not allow_pickle:
        raise StoreError(
            f"{path.name} is a pickle file, which can run code when loaded: pass --allow-pickle to accept it"
        )
    if path.suffix not in SAFE_SUFFIXES + PICKLE_WEIGHTS:
        raise StoreError(f"{path.name}: adapter weights must be .safetensors (or, with --allow-pickle, .bin/.pt)")
    if not path.is_file():
        raise StoreError(f"{path}: adapter weights must be a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise StoreError(
            f"{path.name} is {size / 2**30:.2f} GiB, over the limit of {max_bytes / 2**30:g} GiB (--max-size-gb)"
        )
    return path


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # answers from the local cache when HF_HUB_OFFLINE=1 or the hub is unreachable
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise StoreError(f"cannot resolve {repo_id!r} as a local file, folder or hub id: {exc}") from exc


def _check_fits(store: ModelStore, base: str, kind: str, weights: Path, token: str | None) -> None:
    """Load the adapter into its base once: shapes that do not fit, or nothing it targets, refuse the import."""
    pipeline = store.get(base).load_pipeline("cpu")
    try:
        if kind == LORA:
            pipeline.load_lora_weights(str(weights), adapter_name="import-check")
            loaded = {name for names in pipeline.get_list_adapters().values() for name in names}
            if "import-check" not in loaded:
                raise ValueError("none of its weights matches a module of the base")
        else:
            load_embedding(pipeline, weights, token or "")
    except Exception as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines()[:2])  # the first mismatch says enough
        raise StoreError(f"{weights.name} does not fit {base} ({type(pipeline).__name__}): {reason}") from None


def load_embedding(pipeline: Any, weights: Path, token: str) -> None:
    """Load a textual-inversion embedding; an SDXL file with `clip_l` and `clip_g` parts goes to both encoders."""
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        parts = load_file(str(weights))
        if {"clip_l", "clip_g"} <= set(parts) and getattr(pipeline, "text_encoder_2", None) is not None:
            pipeline.load_textual_inversion(
                parts["clip_l"], token=token, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer
            )
            pipeline.load_textual_inversion(
                parts["clip_g"], token=token, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2
            )
            return
    pipeline.load_textual_inversion(str(weights), token=token, use_safetensors=weights.suffix == ".safetensors" or None)
