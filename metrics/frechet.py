"""Feature statistics in float64 and the Fréchet distance between two Gaussians (FID).

FID = |mu - mu_r|^2 + tr(Sigma + Sigma_r - 2 (Sigma Sigma_r)^{1/2})   (Heusel et al. 2017, Eq. 6)

Statistics are kept as running sums (count, sum x, sum x x^T), so batches may arrive in any order
and processes merge by summing; mean and unbiased covariance come out at the end, as in EDM's fid.py.
"""

import os

import numpy as np
import scipy.linalg
import torch
import torch.distributed

import dnnlib
from torch_utils import distributed as dist

from .detectors import compute_features


class FeatureStats:
    """Running float64 sums of features [N, D] (D is fixed by the first batch)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.num = 0
        self._sum = None  # [D]
        self._sum_outer = None  # [D, D]

    @property
    def dim(self):
        return None if self._sum is None else self._sum.shape[0]

    def _allocate(self, dim):
        self._sum = torch.zeros([dim], dtype=torch.float64, device=self.device)
        self._sum_outer = torch.zeros([dim, dim], dtype=torch.float64, device=self.device)

    def add(self, features):
        """Add a batch of features (torch tensor or numpy array, shape [N, D])."""
        x = torch.as_tensor(features)
        if x.ndim != 2:
            raise ValueError(f"features must have shape [N, D], got {list(x.shape)}")
        x = x.to(self.device, torch.float64)
        if self._sum is None:
            self._allocate(x.shape[1])
        elif x.shape[1] != self.dim:
            raise ValueError(f"feature size {x.shape[1]} differs from the earlier batches ({self.dim})")
        self._sum += x.sum(0)
        self._sum_outer += x.T @ x
        self.num += x.shape[0]

    def all_reduce(self):
        """Totals over all processes, as a new FeatureStats (self is left unchanged).

        A collective call: every rank must call it, including ranks that saw no features."""
        total = FeatureStats(self.device)
        total.num = self.num
        if self._sum is not None:
            total._sum, total._sum_outer = self._sum.clone(), self._sum_outer.clone()
        if not dist.is_distributed():
            return total
        dims = torch.tensor([self.dim or 0, -(self.dim or 1 << 30)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(dims, op=torch.distributed.ReduceOp.MAX)
        dim, min_dim = int(dims[0]), -int(dims[1])
        if dim == 0:
            return total
        if total._sum is None:
            total._allocate(dim)
        elif min_dim != dim:
            raise ValueError(f"feature sizes differ between processes ({min_dim} vs {dim})")
        num = torch.tensor([self.num], dtype=torch.int64, device=self.device)
        for t in (num, total._sum, total._sum_outer):
            torch.distributed.all_reduce(t)
        total.num = int(num)
        return total

    def mean_cov(self):
        """(mu [D], sigma [D, D]) as float64 numpy arrays; sigma is the unbiased (N - 1) covariance."""
        if self.num < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.num}")
        mu = self._sum / self.num
        sigma = (self._sum_outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else None
    if d is None or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            f"were both computed with the same feature detector?"
        )
    if np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2):
        return 0.0  # identical Gaussians: exactly 0, not the +-1e-7 that sqrtm's rounding leaves
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product can make sqrtm blow up; a tiny ridge on both covariances fixes it
        # without changing the value noticeably (the remedy pytorch-fid uses).
        ridge = np.eye(d) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    # sqrtm may return a complex matrix whose imaginary part is rounding noise; EDM keeps the real part.
    trace_covmean = np.real(np.trace(covmean))
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)
    # The distance is never negative; a negative value is float rounding of (nearly) equal statistics.
    return max(value, 0.0)


def load_ref(npz_or_url, cache_dir="./src/metrics"):
    """(mu [D], sigma [D, D]) float64 from a reference .npz (local path, or URL downloaded once into cache_dir).

    ValueError, in one line naming the file, for a missing, empty, truncated or foreign file, missing arrays, and
    arrays of the wrong shapes or with non-finite values; a URL that cannot be fetched raises DownloadError."""
    is_url = "://" in str(npz_or_url)
    if not is_url and not os.path.isfile(npz_or_url):
        raise ValueError(f"reference statistics {npz_or_url}: no such file")
    with dnnlib.util.open_url(str(npz_or_url), cache_dir=cache_dir) as f:
        try:
            data = np.load(f)  # allow_pickle=False: a pickle or object array is refused, never run
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            keys = set(data.files)
            ref = {k: data[k] for k in ("mu", "sigma") if k in keys}
        except Exception as e:  # empty (EOFError), truncated (BadZipFile, zlib.error), foreign (ValueError, ...)
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__
            raise ValueError(f"reference statistics {npz_or_url} is not a readable .npz file ({reason}); "
                             f"make one with 'python fid.py ref'") from None
    if set(ref) != {"mu", "sigma"}:
        raise ValueError(
            f"reference statistics {npz_or_url} must hold arrays 'mu' and 'sigma', found {sorted(keys)}; "
            f"make one with 'python fid.py ref'"
        )
    mu, sigma = ref["mu"], ref["sigma"]
    if mu.ndim != 1 or mu.shape[0] < 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics {npz_or_url}: mu {list(mu.shape)} and sigma {list(sigma.shape)} "
                         f"are not the shapes [D] and [D, D] of one feature size D")
    try:
        mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"reference statistics {npz_or_url}: mu and sigma must be numbers, found "
                         f"{ref['mu'].dtype} and {ref['sigma'].dtype}") from None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"reference statistics {npz_or_url}: mu or sigma holds NaN or infinite values")
    return mu, sigma


def save_ref(path, mu, sigma):
    """Write mu/sigma to an .npz atomically (a temporary file in the same folder, then rename)."""
    with dnnlib.util.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


class StreamingFID:
    """FID of images fed in batches, without writing PNGs (used by sample.py).

    ``add_images`` takes uint8 NCHW tensors, exactly what would be written to / read back from PNG,
    so the result equals ``fid.py calc`` on those PNGs up to float summation order. ``compute``
    merges the statistics of all ranks (a collective call: every rank must call it) and returns
    the same FID on every rank.
    """

    def __init__(self, detector, ref_mu, ref_sigma, device="cpu"):
        self.detector = detector
        self.ref_mu = np.asarray(ref_mu, np.float64)
        self.ref_sigma = np.asarray(ref_sigma, np.float64)
        self.device = torch.device(device)
        self.stats = FeatureStats(self.device)

    @property
    def num_images(self):
        """Images added on this rank."""
        return self.stats.num

    def add_images(self, images):
        self.stats.add(compute_features(self.detector, images, self.device))

    def compute(self):
        mu, sigma = self.stats.all_reduce().mean_cov()
        return frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)
