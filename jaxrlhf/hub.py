"""Model names on the Hugging Face Hub → local checkpoint directories.

``resolve_model("gpt2")`` returns a directory with ``config.json``, the safetensors weights and the
tokenizer files: the argument itself when it is a local directory, else the snapshot that
``huggingface_hub.snapshot_download`` fetches (or finds in the Hub cache: offline, with
``HF_HUB_OFFLINE=1``, only the cache is looked at). A name that cannot be resolved is a
:class:`HubError` naming it (a ``ValueError``: the CLI prints it as one ``error:`` line), not a
stack of HTTP retries. Dataset names are resolved by :mod:`jaxrlhf.data.sources`.
"""

from __future__ import annotations

import os

# What a checkpoint needs: config, safetensors weights (or their index), tokenizer files.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


class HubError(ValueError):
    """A model or dataset name that is neither a local path nor resolvable on the Hub."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_model(name_or_path: str | os.PathLike, *, what: str = "model") -> str:
    """A local checkpoint directory for a directory or a Hub model id (``what`` names it in errors:
    "model", "policy", "reward model")."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise HubError(f"{what} {name!r}: a file, not a checkpoint directory")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise HubError(f"{what} {name!r}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    offline = _offline()
    try:
        return snapshot_download(name, allow_patterns=list(MODEL_FILES), local_files_only=offline)
    except HFValidationError as e:
        raise HubError(f"{what} {name!r}: no such directory, nor a valid Hub model id") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{what} {name!r}: no such directory, nor a model on the Hub") from e
    except Exception as e:  # offline cache misses, network errors: one clear line
        if offline:
            raise HubError(
                f"{what} {name!r}: no such directory, and not in the local Hugging Face cache "
                "while offline (HF_HUB_OFFLINE is set): download it first "
                f"(huggingface-cli download {name}), or give a path"
            ) from e
        raise HubError(
            f"{what} {name!r}: no such directory, and it could not be fetched from the Hub "
            f"({type(e).__name__}: {e})"
        ) from e
