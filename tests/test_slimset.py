import torch

from slimdiff.slimset import farthest_point_sampling, geometric_median, select_slimset


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_geometric_median_is_robust_to_an_outlier():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    med = geometric_median(pts)
    # the mean is dragged to (20.4, 20.4); the median stays inside the unit square
    assert med.min() >= 0 and med.max() <= 1.01
    # optimality: no nearby point has a smaller sum of distances
    cost = lambda z: (pts.double() - z).norm(dim=1).sum()
    for d in torch.eye(2, dtype=torch.float64) * 1e-3:
        assert cost(med) <= cost(med + d) + 1e-9 and cost(med) <= cost(med - d) + 1e-9


def test_fps_is_max_min_and_deterministic():
    g = torch.Generator().manual_seed(0)
    x = _unit(torch.randn(200, 16, generator=g))
    picks = farthest_point_sampling(x, 10, start=3)
    assert picks == farthest_point_sampling(x.clone(), 10, start=3)
    assert len(set(picks)) == 10 and picks[0] == 3
    # each new pick maximises the distance to the set chosen before it
    for i in range(1, 10):
        dist = (1 - x @ x[picks[:i]].T).min(dim=1).values
        assert dist[picks[i]] >= dist.max() - 1e-12


def test_slimset_starts_near_median_and_drops_outliers():
    g = torch.Generator().manual_seed(1)
    x = _unit(torch.randn(300, 8, generator=g) * 0.1 + torch.tensor([1.0] + [0.0] * 7))
    x[7] = _unit(torch.tensor([-1.0] + [0.0] * 7))  # one far outlier
    pool = [f"p{i}" for i in range(300)]
    s = select_slimset(pool, x, 20)
    assert 7 not in s.indices
    med = geometric_median(x)
    assert s.indices[0] == int(torch.argmin((x.double() - med).norm(dim=1)))
    assert s.prompts == [pool[i] for i in s.indices]
    assert s.sha256 == select_slimset(pool, x, 20).sha256
