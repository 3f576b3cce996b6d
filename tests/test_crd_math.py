"""CRD (kdx.distill.crd): NCE loss, Embed, the memory bank (Z, momentum update) and the contrast sampling.

Reference numbers come from megvii-research/mdistiller at a08d46f10d6102bd6e3f258ca5ac880b020ea259,
``mdistiller/distillers/CRD.py`` (Embed, ContrastMemory with ``AliasMethod.cuda`` made a no-op for CPU,
ContrastLoss) and ``mdistiller/dataset/cifar100.py`` (``CIFAR100InstanceSample`` on given labels), run on
CPU with torch 2.14.1 on the seeded inputs that each test re-creates.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdx.distill.crd import (
    ContrastMemory,
    CRDLoss,
    Embed,
    _mix32,
    contrast_pools,
    crd_nce_loss,
    sample_contrast_idx,
    uniform_contrast_idx,
)


# ----------------------------------------------------------------------------------------------- NCE loss
def test_nce_loss_hand_values():
    # K = 2 negatives, n_data = 4: noise c = K/n = 0.5 (ε = 1e-7 ignored at this tolerance)
    # L = −[log(0.5/(0.5+0.5)) + log(0.5/(0.1+0.5)) + log(0.5/(0.2+0.5))] / 1
    x = torch.tensor([[0.5, 0.1, 0.2]], dtype=torch.float64)
    want = -(math.log(0.5) + math.log(0.5 / 0.6) + math.log(0.5 / 0.7))
    assert crd_nce_loss(x, 4).item() == pytest.approx(want, abs=1e-6)
    # a batch of two equal rows: the sum over rows is divided by B, so the value is unchanged
    assert crd_nce_loss(x.repeat(2, 1), 4).item() == pytest.approx(want, abs=1e-6)
    # the official B × (K+1) × 1 layout gives the same
    assert crd_nce_loss(x.unsqueeze(2), 4).item() == pytest.approx(want, abs=1e-6)


def test_nce_loss_eps_placement():
    # x = 0 everywhere: log(0/(c+ε)) = −inf for the positive (eps only in the denominators, as official)
    assert crd_nce_loss(torch.zeros(1, 3), 4).item() == math.inf
    # negatives at 0: each log(c/(c+ε)) ≈ −ε/c, the positive at 1e30: log ≈ 0  →  L ≈ 2·ε/c = 4e-7
    x = torch.tensor([[1e30, 0.0, 0.0]], dtype=torch.float64)
    assert crd_nce_loss(x, 4).item() == pytest.approx(2 * 1e-7 / 0.5, rel=1e-6)


def test_nce_loss_official_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 6, generator=g) * 0.5
    assert crd_nce_loss(x, 50).item() == pytest.approx(6.382230281829834, rel=1e-6)  # ContrastLoss(50)
    x = torch.rand(8, 4097, generator=g) * 2e-4
    assert crd_nce_loss(x, 50000).item() == pytest.approx(11.879252433776855, rel=1e-6)  # ContrastLoss(50000)


def test_nce_loss_gradcheck(one_thread):
    x = (torch.rand(3, 5, dtype=torch.float64) * 0.5 + 0.01).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: crd_nce_loss(t, 20), (x,))


def test_nce_loss_low_precision_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.randn(16, 1025, generator=g) / 0.07 * 0.05) / 400.0  # realistic P ≈ exp(s/T)/Z
    ref = crd_nce_loss(x, 50000)
    for dt in (torch.bfloat16, torch.float16):
        out = crd_nce_loss(x.to(dt), 50000)
        assert out.dtype == torch.float32 and torch.isfinite(out)
        assert out.item() == pytest.approx(ref.item(), rel=1e-3)  # measured 3e-5 (bf16)


# ------------------------------------------------------------------------------------------------ Embed
def test_embed_hand_values_and_unit_norm():
    e = Embed(4, 2)
    with torch.no_grad():
        e.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        e.linear.bias.zero_()
    x = torch.tensor([[3.0, 4.0, 9.0, 9.0]]).view(1, 1, 2, 2)  # flattened, like the official reshape
    assert e(x)[0].tolist() == pytest.approx([0.6, 0.8])
    assert e(torch.randn(5, 4)).norm(dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-6)


def test_embed_gradcheck():
    e = Embed(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(e, (x,))


# ------------------------------------------------------------------------------------------------ memory
def _tiny_memory(temperature: float = 0.5, momentum: float = 0.5) -> ContrastMemory:
    mem = ContrastMemory(feat_dim=2, n_data=3, k=1, temperature=temperature, momentum=momentum)
    mem.memory_v1.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    mem.memory_v2.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]))
    return mem


def test_memory_buffers_and_init_range():
    mem = ContrastMemory(feat_dim=12, n_data=50, k=7, temperature=0.07, momentum=0.5)
    assert set(mem.state_dict()) == {"params", "memory_v1", "memory_v2"}
    assert mem.params.dtype == torch.float32
    assert mem.params.tolist() == [7.0, torch.tensor(0.07).item(), -1.0, -1.0, 0.5]  # T is float32(0.07)
    stdv = 1 / math.sqrt(12 / 3)  # = 0.5
    for bank in (mem.memory_v1, mem.memory_v2):
        assert bank.shape == (50, 12) and bank.min() >= -stdv and bank.max() < stdv
        assert bank.min() < -0.4 and bank.max() > 0.4  # spread over the range, not a constant
    assert not torch.equal(mem.memory_v1, mem.memory_v2)


def test_memory_scores_and_z_by_hand():
    mem = _tiny_memory(temperature=0.5)
    v1 = torch.tensor([[1.0, 0.0]])  # student embedding, scored against memory_v2 rows 0, 1
    v2 = torch.tensor([[0.0, 1.0]])  # teacher embedding, scored against memory_v1 rows 0, 1
    cidx = torch.tensor([[0, 1]])
    out1, out2 = mem(v1, v2, torch.tensor([0]), cidx, update=False)
    # out_v1 raw = [exp(1/0.5), exp(0)] = [e², 1]; Z1 = mean · n_data = (e² + 1)/2 · 3
    z1 = (math.exp(2) + 1) / 2 * 3
    # out_v2 raw = [exp(0), exp(1/0.5)] = [1, e²]; Z2 equal by symmetry
    assert mem.params[2].item() == pytest.approx(z1, rel=1e-6)
    assert mem.params[3].item() == pytest.approx(z1, rel=1e-6)
    assert out1[0].tolist() == pytest.approx([math.exp(2) / z1, 1 / z1], rel=1e-6)
    assert out2[0].tolist() == pytest.approx([1 / z1, math.exp(2) / z1], rel=1e-6)
    # Z is frozen after the first batch: a second, different batch divides by the same Z
    out1b, _ = mem(torch.tensor([[0.0, 1.0]]), v2, torch.tensor([0]), torch.tensor([[2, 2]]), update=False)
    assert mem.params[2].item() == pytest.approx(z1, rel=1e-6)
    assert out1b[0].tolist() == pytest.approx([math.exp(0.6 / 0.5) / z1] * 2, rel=1e-6)


def test_memory_momentum_update_by_hand():
    mem = _tiny_memory(momentum=0.75)
    before = mem.memory_v1.clone()
    mem.update(torch.tensor([0]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, -1.0]]))
    # v1 row 0: 0.75·[1,0] + 0.25·[0,1] = [0.75, 0.25] → / √0.625
    assert mem.memory_v1[0].tolist() == pytest.approx([0.75 / math.sqrt(0.625), 0.25 / math.sqrt(0.625)])
    # v2 row 0: 0.75·[1,0] + 0.25·[0,−1] = [0.75, −0.25] → / √0.625
    assert mem.memory_v2[0].tolist() == pytest.approx([0.75 / math.sqrt(0.625), -0.25 / math.sqrt(0.625)])
    assert torch.equal(mem.memory_v1[1:], before[1:])  # the other rows are untouched


def test_memory_rows_stay_unit_norm_and_forward_updates_after_scoring():
    torch.manual_seed(0)
    mem = ContrastMemory(feat_dim=8, n_data=30, k=4)
    v1 = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    v2 = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    idx = torch.tensor([3, 7, 11, 19, 29])
    cidx = torch.randint(0, 30, (5, 5))
    cidx[:, 0] = idx
    frozen = mem.memory_v2.clone()
    out_no, _ = mem(v1, v2, idx, cidx, update=False)
    out_yes, _ = mem(v1, v2, idx, cidx)
    assert torch.equal(out_no, out_yes)  # scores use the memory before this batch's update
    assert not torch.equal(mem.memory_v2, frozen)
    assert mem.memory_v1[idx].norm(dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    assert mem.memory_v2[idx].norm(dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    others = torch.ones(30, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(mem.memory_v2[others], frozen[others])


def test_memory_update_with_gathered_tensors_equals_local_updates():
    # DDP recipe: forward(update=False) on each rank, then update() with the concatenated (all-gathered) batch
    torch.manual_seed(1)
    a, b = ContrastMemory(6, 20, 3), ContrastMemory(6, 20, 3)
    b.load_state_dict(a.state_dict())
    idx = torch.tensor([1, 4, 9, 15])
    v1, v2 = torch.randn(4, 6), torch.randn(4, 6)
    a.update(idx[:2], v1[:2], v2[:2])
    a.update(idx[2:], v1[2:], v2[2:])
    b.update(idx, v1, v2)
    assert torch.equal(a.memory_v1, b.memory_v1) and torch.equal(a.memory_v2, b.memory_v2)


def test_memory_no_gradient_into_banks_and_gradcheck_scores():
    torch.manual_seed(2)
    crd = CRDLoss(s_dim=5, t_dim=4, n_data=12, feat_dim=3, k=4).double()
    f_s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, 4, dtype=torch.float64)
    idx = torch.tensor([0, 5, 7])
    cidx = torch.stack([idx, *torch.randint(0, 12, (4, 3))], dim=1)
    crd(f_s, f_t, idx, cidx, update=False)  # sets Z
    assert not any(b.requires_grad for b in crd.contrast.buffers())
    assert torch.autograd.gradcheck(lambda s: crd(s, f_t, idx, cidx, update=False), (f_s,))


def test_crd_official_reference_two_steps():
    # official CRD.init_crd_modules order under torch.manual_seed(0): Embed(6,8), Embed(7,8),
    # ContrastMemory(8, 20, 5, 0.07, 0.5); two steps with the batches drawn below (Generator seed 1)
    torch.manual_seed(0)
    crd = CRDLoss(6, 7, 20, feat_dim=8, k=5)
    assert crd.contrast.memory_v1[0].tolist() == pytest.approx(
        [0.2403122783, 0.0366812348, -0.2987941206, 0.2897679210, -0.5874176025, -0.3629572392, -0.1532950997,
         -0.2982948124], abs=1e-9)
    assert crd.contrast.memory_v2[19].tolist() == pytest.approx(
        [0.5197682977, 0.0401645303, -0.4081386924, -0.2194038332, 0.1337201595, -0.4668225646, 0.3042329550,
         -0.5559543371], abs=1e-9)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        fs, ft = torch.randn(4, 6, generator=g), torch.randn(4, 7, generator=g)
        idx = torch.randperm(20, generator=g)[:4]
        cidx = torch.randint(0, 20, (4, 6), generator=g)
        cidx[:, 0] = idx
        batches.append((fs, ft, idx, cidx))
    want = [  # loss, Σ grad W_s, Σ grad W_t, Σ memory_v1, Σ memory_v2 (after the step)
        (13.472346305847168, 4.099956512451172, 10.171677589416504, -2.955353021621704, 2.1410458087921143),
        (16.113731384277344, 3.3575243949890137, 15.176406860351562, -0.7644145488739014, 2.628732681274414),
    ]
    for (fs, ft, idx, cidx), (loss_w, gs_w, gt_w, m1_w, m2_w) in zip(batches, want):
        crd.zero_grad()
        loss = crd(fs, ft, idx, cidx)
        loss.backward()
        assert loss.item() == pytest.approx(loss_w, rel=1e-6)
        assert crd.embed_s.linear.weight.grad.sum().item() == pytest.approx(gs_w, rel=1e-5)
        assert crd.embed_t.linear.weight.grad.sum().item() == pytest.approx(gt_w, rel=1e-5)
        assert crd.contrast.memory_v1.sum().item() == pytest.approx(m1_w, rel=1e-5)
        assert crd.contrast.memory_v2.sum().item() == pytest.approx(m2_w, rel=1e-5)
        assert crd.contrast.params[2:4].tolist() == pytest.approx([1618.0328369140625, 48751.71484375], rel=1e-6)


def test_crd_under_bf16_autocast_is_finite_and_close():
    torch.manual_seed(3)
    crd = CRDLoss(s_dim=64, t_dim=64, n_data=200, feat_dim=128, k=64)
    fs, ft = torch.randn(8, 64).relu(), torch.randn(8, 64).relu()  # pooled post-ReLU features
    idx = torch.arange(8) * 20
    cidx = torch.cat([idx[:, None], torch.randint(0, 200, (8, 64))], dim=1)
    state = {k: v.clone() for k, v in crd.state_dict().items()}
    ref = crd(fs, ft, idx, cidx)
    crd.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crd(fs, ft, idx, cidx)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert crd.contrast.memory_v1.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=2e-3)  # measured 1.4e-4


# ------------------------------------------------------------------------------------------ sampling
def test_hash_mixer_matches_integer_reference():
    # lowbias32 on Python integers (exact, arbitrary precision) vs the int64 tensor version without overflow
    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    assert _mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]


def test_pools_hand_values():
    # labels [1,0,2,0,1]: cls_positive = [[1,3],[0,4],[2]]; cls_negative[c] = other classes in class order
    pools = contrast_pools(torch.tensor([1, 0, 2, 0, 1]))
    assert [pools.positives(c).tolist() for c in range(3)] == [[1, 3], [0, 4], [2]]
    assert [pools.negatives(c).tolist() for c in range(3)] == [[0, 4, 2], [1, 3, 2], [1, 3, 0, 4]]


def _cifar_like_labels() -> torch.Tensor:
    return torch.randperm(300, generator=torch.Generator().manual_seed(5)) % 100  # 3 samples per class


def test_pools_official_reference():
    # official CIFAR100InstanceSample(k=10) built on these 300 labels (100 classes × 3)
    labels = _cifar_like_labels()
    assert labels[:6].tolist() == [11, 46, 73, 4, 10, 85]
    pools = contrast_pools(labels, num_classes=100)
    assert pools.positives(7).tolist() == [131, 149, 153]
    neg = pools.negatives(7)
    assert neg.shape == (297,) and neg[:8].tolist() == [8, 120, 249, 40, 132, 250, 79, 112]
    assert int((neg * torch.arange(297)).sum()) == 6649315  # the whole list, order included


def test_exact_sampling_invariants():
    labels = _cifar_like_labels()
    pools = contrast_pools(labels)
    idx = torch.tensor([11, 0, 299, 150, 42])
    ci = sample_contrast_idx(pools, idx, k=50, mode="exact", seed=3, epoch=2)
    assert ci.shape == (5, 51) and ci.dtype == torch.int64
    assert torch.equal(ci[:, 0], idx)  # positive first: the sample itself
    assert (labels[ci[:, 1:]] != labels[idx][:, None]).all()  # never the positive's class
    assert all(len(set(row.tolist())) == 50 for row in ci[:, 1:])  # K ≤ 297: without replacement


def test_sampling_with_replacement_when_the_pool_is_small():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # class 0 has 4 negatives, class 1 has 3, class 2 has 5
    pools = contrast_pools(labels)
    ci = sample_contrast_idx(pools, torch.arange(6), k=4, seed=1)
    assert (labels[ci[:, 1:]] != labels[:, None]).all()
    assert [len(set(r.tolist())) for r in ci[[0, 1, 5], 1:]] == [4, 4, 4]  # 4 ≤ pool: all distinct
    assert set(ci[2:5, 1:].flatten().tolist()) <= {0, 1, 5}  # 4 > 3: drawn with replacement from the pool
    # replace=True (official ImageNet sampler) repeats entries even when the pool is large
    big = contrast_pools(_cifar_like_labels())
    ci = sample_contrast_idx(big, torch.arange(4), k=200, replace=True)
    assert all(len(set(r.tolist())) < 200 for r in ci[:, 1:])


def test_relax_sampling_positive_from_the_same_class():
    labels = _cifar_like_labels()
    pools = contrast_pools(labels)
    idx = torch.arange(300)
    ci = sample_contrast_idx(pools, idx, k=5, mode="relax", seed=0, epoch=1)
    assert torch.equal(labels[ci[:, 0]], labels)
    assert (ci[:, 0] != idx).any() and (ci[:, 0] == idx).any()  # any member of the class, itself included
    assert (labels[ci[:, 1:]] != labels[:, None]).all()
    with pytest.raises(ValueError):
        sample_contrast_idx(pools, idx, k=5, mode="loose")


def test_sampling_is_a_function_of_seed_epoch_and_index():
    pools = contrast_pools(_cifar_like_labels())
    a = sample_contrast_idx(pools, torch.tensor([5, 9, 200]), k=20, seed=7, epoch=4)
    b = sample_contrast_idx(pools, torch.tensor([200, 1, 5]), k=20, seed=7, epoch=4)  # other batch, order
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])
    assert not torch.equal(a, sample_contrast_idx(pools, torch.tensor([5, 9, 200]), k=20, seed=7, epoch=5))
    assert not torch.equal(a, sample_contrast_idx(pools, torch.tensor([5, 9, 200]), k=20, seed=8, epoch=4))
    # pinned values: a change of the stream would silently change resumed runs
    assert a[0, :6].tolist() == [5, 219, 136, 85, 24, 293]


def test_sampling_is_uniform_over_the_pool(one_thread):
    # the 3 samples of class 0 over 1000 epochs, K = 10 from a pool of 297: each entry ≈ 3000·10/297 ≈ 101 times
    pools = contrast_pools(_cifar_like_labels())
    cls0 = pools.positives(0)
    rows = torch.cat([sample_contrast_idx(pools, cls0, k=10, seed=0, epoch=e)[:, 1:] for e in range(1000)])
    counts = torch.bincount(rows.flatten(), minlength=300)[pools.negatives(0)].double()
    expected = rows.numel() / 297
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert 200 < chi2 < 400  # χ² with 296 degrees of freedom: mean ≈ 296·(1 − 10/297), sd ≈ 24
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected


def test_percent_pools():
    labels = _cifar_like_labels()
    pools = contrast_pools(labels, percent=0.5, seed=1)
    assert pools.table.shape == (100, 148)  # int(297 · 0.5), the official n
    full = contrast_pools(labels)
    for c in (0, 42, 99):
        row = pools.negatives(c)
        assert len(set(row.tolist())) == 148 and set(row.tolist()) <= set(full.negatives(c).tolist())
    ci = sample_contrast_idx(pools, torch.arange(300), k=30, seed=2)
    assert all(set(ci[i, 1:].tolist()) <= set(pools.table[labels[i]].tolist()) for i in range(300))
    assert contrast_pools(labels, percent=1.0).table is None


def test_uniform_contrast_idx():
    idx = torch.tensor([4, 8, 15])
    ci = uniform_contrast_idx(idx, n_data=16, k=100, seed=0, epoch=0)
    assert ci.shape == (3, 101) and torch.equal(ci[:, 0], idx)
    assert ci.min() >= 0 and ci.max() < 16 and len(set(ci[:, 1:].flatten().tolist())) == 16
