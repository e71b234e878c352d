"""The Hugging Face Hub side of gmpq exports: download a repo snapshot into the HF cache, upload an export folder.

Downloads go through ``huggingface_hub.snapshot_download``, so its cache (``$HF_HOME/hub`` or ``cache_dir``),
revisions, ``HF_HUB_OFFLINE`` and ``local_files_only`` behave as everywhere else in the HF ecosystem; uploads go
through ``HfApi.create_repo`` + ``HfApi.upload_folder``. Every failure becomes a :class:`CheckpointError` naming the
repo id and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from gmpq.errors import CheckpointError
from gmpq.hub import format as F

#: The files fetched from a repo: what a loader needs, plus the card and its figure.
DOWNLOAD_PATTERNS = [F.CONFIG_FILE, F.WEIGHTS_FILE, F.POLICY_FILE, F.CARD_FILE, F.FIGURE_FILE]


def download_snapshot(
    repo_id: str, revision: str | None = None, local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
) -> Path:
    """The local folder of ``repo_id`` at ``revision`` in the HF cache, downloading what is missing.

    ``local_files_only=None`` leaves the decision to ``huggingface_hub`` (offline when ``HF_HUB_OFFLINE=1``).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from gmpq.version import __version__

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only), token=token,
            allow_patterns=DOWNLOAD_PATTERNS, library_name="gmpq", library_version=__version__,
        )
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is neither a local export directory nor a valid Hugging Face repo id "
                              f"({e})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"Hugging Face repo {repo_id!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"Hugging Face repo {repo_id!r} was not found (or is private: pass token=...), and "
                              f"there is no local directory {repo_id!r}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot load {repo_id!r}{at}: it is not a local directory, and the Hugging Face cache "
            f"({cache_dir or _default_cache()}) has no copy while downloads are off (HF_HUB_OFFLINE=1, "
            "local_files_only=True or no network); download it once online, or pass an export directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot download {repo_id!r}{at} from the Hugging Face Hub: {e}") from None
    return Path(folder)


def _default_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def upload_export(
    folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
    revision: str | None = None, commit_message: str | None = None, create_pr: bool = False,
) -> str:
    """Create ``repo_id`` (if needed) and upload the export ``folder`` to it; return the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision, create_pr=create_pr,
            commit_message=commit_message or "Upload gmpq mixed-precision model", allow_patterns=DOWNLOAD_PATTERNS,
        )
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is not a valid Hugging Face repo id ({e})") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot upload {folder} to Hugging Face repo {repo_id!r}: {e}") from None
    return str(getattr(info, "commit_url", info))
