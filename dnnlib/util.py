"""EasyDict and a download cache under ./src/{dataset_name}/.

Downloads never happen twice: a file already present in the cache folder is used as is.
With no network the error names the file, the URL and the folder to place it in, within seconds.
"""

import contextlib
import os
import tempfile
import urllib.parse


class EasyDict(dict):
    """A dict whose keys are also attributes (cfg.lr == cfg['lr'])."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


class DownloadError(RuntimeError):
    """A needed file is neither in the cache nor downloadable."""


def _file_name_from_url(url):
    return os.path.basename(urllib.parse.urlparse(url).path) or "download"


def download_file(url, cache_dir, file_name=None, timeout=20, verbose=True):
    """Return the local path of `url` inside `cache_dir`, downloading it only if absent.

    The download goes to a temporary file in the same folder and is renamed when complete,
    so an interrupted download never leaves a truncated file that would be trusted later.
    """
    file_name = file_name or _file_name_from_url(url)
    cache_dir = os.path.abspath(cache_dir)
    path = os.path.join(cache_dir, file_name)
    if os.path.isfile(path):
        return path
    if os.path.isfile(url):  # a local path given where a URL is allowed
        return url
    hint = f"cannot get '{file_name}' from {url}: download it yourself and put it in {cache_dir}/"
    if os.environ.get("SFD_OFFLINE", "0") == "1":
        raise DownloadError(hint + " (SFD_OFFLINE=1)")
    import requests  # imported here: only needed when something must be fetched

    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{file_name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            # timeout=(connect, read): with no network the connect fails or times out in seconds.
            with requests.get(url, stream=True, timeout=(timeout, 60)) as r:
                r.raise_for_status()
                total = int(r.headers.get("content-length", 0)) or None
                bar = _progress(total, file_name) if verbose else None
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DownloadError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return path


def _progress(total, name):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", leave=False)


def open_url(url, cache_dir="./src", file_name=None, mode="rb"):
    """Open a local path or a URL (cached under cache_dir) for reading."""
    if os.path.isfile(url):
        return open(url, mode)
    if "://" not in url:
        raise FileNotFoundError(f"no such file: {url}")
    return open(download_file(url, cache_dir, file_name=file_name), mode)


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def tee_stdout(path):
    """Copy everything printed to stdout into `path` (appending), e.g. an experiment's log.txt."""
    import sys

    sys.stdout = _Tee(sys.stdout, open(path, "a", encoding="utf-8"))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write to; on success it is renamed to `path`, on failure removed.

    Readers (and a crashed run's successor) see the old file or the complete new one, never a truncated one.
    Temporaries are named `.{name}.*.tmp`, which a resumed training run cleans up.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        default_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomic(path, text):
    """Write a text file atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def default_file_mode(path):
    """Give a file made by tempfile.mkstemp (mode 0600) the permissions a plain open() would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
