"""Small shared utilities: attribute dicts and cached downloads."""

from .util import EasyDict, open_url, download_file, DownloadError

__all__ = ["EasyDict", "open_url", "download_file", "DownloadError"]
