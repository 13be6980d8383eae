"""Precision, recall, density and coverage (Naeem et al., ICML 2020, Eqs. 1-4, with Kynkäänniemi
et al. 2019 for precision/recall).

Real features R (N x D) and fake features F (M x D); radius(x) is the distance from x to its k-th
nearest neighbour within its own set (x itself excluded); a point lies in a ball when its distance
is <= the radius:
  precision = 1/M  sum_f [exists r: d(f, r) <= radius(r)]
  recall    = 1/N  sum_r [exists f: d(r, f) <= radius(f)]
  density   = 1/(kM) sum_f sum_r [d(f, r) <= radius(r)]
  coverage  = 1/N  sum_r [min_f d(r, f) <= radius(r)]
(The reference code of Naeem et al. and of the SFD repo compares with '<'; the two differ only on
exact ties, e.g. duplicated images.)

Distances are computed in float64, a block of rows at a time, so 10 000 x 10 000 features need only
a few hundred MB; everything runs on the device the features are on.
"""

import torch
import torch.distributed

from torch_utils import distributed as dist

_BLOCK_ELEMENTS = 1 << 25  # float64 entries per distance block (256 MB)


def _sq_dists(a, b):
    """Squared Euclidean distances [len(a), len(b)] via |a|^2 + |b|^2 - 2ab, clamped at 0."""
    d = torch.addmm((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :], a, b.T, alpha=-2.0)
    return d.clamp_min_(0)


def _rows_per_block(n_cols, block_rows):
    return block_rows or max(1, _BLOCK_ELEMENTS // max(n_cols, 1))


def knn_sq_radii(x, k, block_rows=None):
    """Squared distance of each row of x to its k-th nearest other row of x."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"nearest_k must be between 1 and {n - 1} for {n} feature vectors, got {k}")
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    step = _rows_per_block(n, block_rows)
    for i in range(0, n, step):
        d = _sq_dists(x[i : i + step], x)
        # The k+1 smallest include the point itself (distance ~0), so the largest of them is the
        # k-th true neighbour, duplicates included.
        out[i : i + step] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return out


NEAREST_K = 5  # k of the k-NN balls: Naeem et al.'s choice, and the paper's prdc.py (prdc.py calc's default)


def compute_prdc(real_features, fake_features, nearest_k=NEAREST_K, block_rows=None):
    """dict(precision, recall, density, coverage) as Python floats."""
    real = torch.as_tensor(real_features).to(torch.float64)
    fake = torch.as_tensor(fake_features, device=real.device).to(torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {list(real.shape)} and {list(fake.shape)}")
    real_r2 = knn_sq_radii(real, nearest_k, block_rows)
    fake_r2 = knn_sq_radii(fake, nearest_k, block_rows)
    n, m = real.shape[0], fake.shape[0]

    precise = torch.zeros(m, dtype=torch.bool, device=real.device)
    density_count = torch.zeros(m, dtype=torch.float64, device=real.device)
    recalled = torch.zeros(n, dtype=torch.bool, device=real.device)
    nearest_fake = torch.full([n], float("inf"), dtype=torch.float64, device=real.device)
    step = _rows_per_block(n, block_rows)
    for j in range(0, m, step):
        d = _sq_dists(fake[j : j + step], real)  # [block of fakes, all reals]
        inside_real_balls = d <= real_r2[None, :]
        precise[j : j + step] = inside_real_balls.any(1)
        density_count[j : j + step] = inside_real_balls.sum(1, dtype=torch.float64)
        recalled |= (d <= fake_r2[j : j + step, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values)
    return dict(
        precision=precise.double().mean().item(),
        recall=recalled.double().mean().item(),
        density=(density_count.sum() / (nearest_k * m)).item(),
        coverage=(nearest_fake <= real_r2).double().mean().item(),
    )


def gather_rows(x, device="cpu"):
    """Concatenate each rank's rows [n_rank, D] on every rank (ranks may hold different counts;
    a rank with no rows passes None)."""
    if not dist.is_distributed():
        return x
    world = dist.get_world_size()
    shape = torch.tensor([0, 0] if x is None else list(x.shape[:2]), dtype=torch.int64, device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    torch.distributed.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    dim = max(int(s[1]) for s in shapes)
    padded = torch.zeros([max(counts), dim], dtype=torch.float64, device=device)
    if x is not None and x.shape[0] > 0:
        padded[: x.shape[0]] = x.to(device, torch.float64)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])
