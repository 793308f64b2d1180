"""Helpers for the parity tests: inputs, relative errors, DESIGN section 4 tolerances."""
import torch

import leapformer_kernels as lk

# ||out - ref|| / ||ref|| targets (DESIGN section 4); gradients get twice these.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# Relative error needs a reference that is not ~0: a result whose RMS is below FLOOR counts as
# O(FLOOR) in scale (e.g. dq of a normalised T=1 call is exactly 0 mathematically: o = v).
FLOOR = 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / max(||ref||, FLOOR * sqrt(numel)); NaN/Inf in out fail."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output holds NaN or Inf"
    denom = max(ref.norm().item(), FLOOR * max(ref.numel(), 1) ** 0.5)
    return (out - ref).norm().item() / denom


def assert_close(out, ref, dtype, what="output", factor=1.0, baseline=None):
    """Error within the DESIGN tolerance, or within 2x a plain-PyTorch baseline's error."""
    err = rel_err(out, ref)
    tol = TOL[dtype] * factor
    if baseline is not None:
        tol = max(tol, 2 * rel_err(baseline, ref))
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e} ({dtype})"


def make_inputs(B=2, T=65, S=None, H=2, Hkv=None, Dk=16, Dv=16, dtype=torch.float32, device="cpu",
                p_extremes=True, requires_grad=False):
    """Random q, k, v, pq, pk with proportions in [0, 1] including exactly 0 and 1."""
    S = T if S is None else S
    Hkv = H if Hkv is None else Hkv
    g = dict(dtype=dtype, device=device)
    q = torch.randn(B, T, H, Dk, **g)
    k = torch.randn(B, S, Hkv, Dk, **g)
    v = torch.randn(B, S, Hkv, Dv, **g)
    pq = torch.rand(B, T, H, **g)
    pk = torch.rand(B, S, Hkv, **g)
    if p_extremes:
        pq.view(-1)[::5] = 0.0
        pq.view(-1)[1::7] = 1.0
        pk.view(-1)[::6] = 1.0
        pk.view(-1)[2::9] = 0.0
    out = [q, k, v, pq, pk]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


def make_state(n, H, Dk, Dv, dtype=torch.float32, device="cpu", requires_grad=False):
    S0 = torch.rand(n, H, 2 * Dk, Dv, dtype=dtype, device=device)
    z0 = torch.rand(n, H, 2 * Dk, dtype=dtype, device=device) + 1.0
    if requires_grad:
        S0.requires_grad_()
        z0.requires_grad_()
    return S0, z0


def reference(*tensors, **kw):
    """The float64 quadratic oracle on float64 copies of the inputs."""
    return lk.reference.leap_attention(*[t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                          else t for t in tensors], **kw)
