"""Small shared utilities: attribute dicts, construct-by-name and cached downloads."""

from .util import EasyDict, construct_class_by_name, get_obj_by_name, open_url, download_file, DownloadError

__all__ = ["EasyDict", "construct_class_by_name", "get_obj_by_name", "open_url", "download_file", "DownloadError"]
