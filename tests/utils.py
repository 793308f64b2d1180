"""Helpers for the parity tests: inputs, relative errors, DESIGN section 4 tolerances, and the
backends a test session must have (``LEAPFORMER_REQUIRE_BACKENDS``, enforced by conftest)."""
import math
import os
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import leapformer_kernels as lk
from leapformer_kernels._validate import BACKEND_NAMES

# ||out - ref|| / ||ref|| targets (DESIGN section 4); gradients get twice these.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# Relative error needs a reference that is not ~0: a result whose RMS is below FLOOR counts as
# O(FLOOR) in scale (e.g. dq of a normalised T=1 call is exactly 0 mathematically: o = v).
FLOOR = 1e-3


HALF = (torch.float16, torch.bfloat16)
# a small English text for the zoo's model tests (train a few steps, checkpoints, resume)
TINY_TEXT = ("The quick brown fox jumps over the lazy dog. A def statement defines a function; "
             "a class statement defines a class. ") * 12
# flash-attn's rule compares against 2x the baseline's error, but never asks for less than this
BASELINE_FLOOR = 1e-6


def rel_err(out: torch.Tensor, ref: torch.Tensor, finite: bool = True) -> float:
    """||out - ref|| / max(||ref||, FLOOR * sqrt(numel)); NaN/Inf in out fail (with
    ``finite=False`` they give an infinite error instead)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not bool(torch.isfinite(out).all()):
        assert not finite, "output holds NaN or Inf"
        return math.inf
    denom = max(ref.norm().item(), FLOOR * max(ref.numel(), 1) ** 0.5)
    return (out - ref).norm().item() / denom


def assert_close(out, ref, dtype, what="output", factor=1.0, baseline=None):
    """``rel_err(out, ref)`` against the float64 reference ``ref`` (DESIGN section 4).

    Without a baseline: at most ``TOL[dtype] * factor`` (factor 2 for gradients).
    With a baseline and a half ``dtype`` (flash-attn's rule): ``baseline`` is the plain quadratic
    PyTorch form run entirely in ``dtype`` (``plain_form``); the error is at most 2x the
    baseline's (floor ``BASELINE_FLOOR``), and at most ``TOL[dtype] * factor`` unless 2x the
    baseline's error already exceeds that. A non-finite baseline leaves the tolerance alone.
    float32 / float64 ignore ``baseline``: their targets are the tolerances themselves.
    """
    err = rel_err(out, ref)
    tol = TOL[dtype] * factor
    if baseline is not None and dtype in HALF:
        base = rel_err(baseline, ref, finite=False)
        if math.isfinite(base):
            bound = max(2 * base, BASELINE_FLOOR)
            assert err <= bound, (f"{what}: relative error {err:.3e} > 2x that of the plain {dtype} PyTorch "
                                  f"form ({base:.3e})")
            if bound > tol:  # 2x the baseline's error already exceeds the tolerance: it is waived
                tol = bound
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e} ({dtype})"


def plain_form(*tensors, dtype, **kw):
    """The oracle's quadratic form (``attention/naive.py``) run entirely in ``dtype``: inputs,
    features, scores, sums and state all in ``dtype`` (the oracle itself computes half inputs in
    float32). The baseline of flash-attn's rule; differentiable, gradients in ``dtype``."""
    from leapformer_kernels.attention import naive

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    if kw.get("initial_state") is not None:
        kw["initial_state"] = tuple(cast(t) for t in kw["initial_state"])
    with mock.patch.object(naive, "state_dtype", lambda d: d):
        return naive.leap_attention(*[cast(t) for t in tensors], **kw)


# beyond this many elements of the [B, T, W, T, D] max membership, plain_pool's max takes the torch
# backend's sparse-table form in dtype (the same gather of x, so the same values and gradients)
PLAIN_POOL_MAX_ELEMENTS = 4_000_000


def plain_pool(x, windows, reduce="mean", *, dtype):
    """The oracle's window_pool (``pooling/naive.py``) run entirely in ``dtype``: the membership
    matrix, the window sums (``naive._WindowSum``: einsum with its exact non-finite rules), the
    division by the count and the max all in ``dtype`` (the oracle itself sums in float64 and
    takes the max in float32 for half inputs). The baseline of flash-attn's rule for window_pool;
    differentiable in x, gradients in ``dtype``. Returns (pooled, valid)."""
    from leapformer_kernels.pooling import naive, torch_prefix

    x = x.to(dtype)
    B, T, D = x.shape
    if reduce == "max":
        if B * T * T * D * len(windows) > PLAIN_POOL_MAX_ELEMENTS:
            return torch_prefix.prefix_window_pool(x, windows, "max")
        with mock.patch.object(naive, "state_dtype", lambda d: d):
            return naive.window_pool(x, windows, "max")
    lo, hi, valid = naive.window_bounds(T, windows, x.device)
    s = torch.arange(T, device=x.device)
    member = (s[None, None, :] >= lo[:, :, None]) & (s[None, None, :] < hi[:, :, None])  # [T, W, T]
    out = naive._WindowSum.apply(member.to(dtype), x)
    if reduce == "mean":
        out = out / member.sum(-1).clamp(min=1)[None, :, :, None].to(dtype)
    return out, valid[None].expand(B, T, len(windows)).clone()


def required_backends(environ=None):
    """The backends a test session must have: ``LEAPFORMER_REQUIRE_BACKENDS`` (comma list; set
    but empty = none), else ``torch,cpu,triton`` when ``CI=true``, else none."""
    env = os.environ if environ is None else environ
    raw = env.get("LEAPFORMER_REQUIRE_BACKENDS")
    if raw is None:
        raw = "torch,cpu,triton" if env.get("CI", "").strip().lower() == "true" else ""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if n not in BACKEND_NAMES]
    if bad:
        raise ValueError(f"LEAPFORMER_REQUIRE_BACKENDS names unknown backend(s) {', '.join(bad)}; "
                         f"expected a comma list of {', '.join(BACKEND_NAMES)}")
    return names


def _one_line(reason: str, limit: int = 400) -> str:
    """A multi-line reason (a build log's tail) as one line: its first line, then the last line
    that names an error (else its last line)."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    if not lines:
        return "no reason given"
    errors = [ln for ln in lines[1:] if "error" in ln.lower()]
    tail = errors[-1] if errors else (lines[-1] if len(lines) > 1 else "")
    text = lines[0] + (f" ... {tail}" if tail and tail != lines[0] else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def missing_backends(required):
    """{name: one-line reason} for each required backend that cannot run leap_attention or
    window_pool (float32) on this machine."""
    from leapformer_kernels import backends

    cuda = torch.cuda.is_available()
    missing = {}
    for name in required:
        device = torch.device("cuda" if cuda and name != "cpu" else "cpu")
        for op in ("leap_attention", "window_pool"):
            reason = backends.unavailable(op, name, device, torch.float32)
            if reason is not None:
                missing[name] = f"{op}: {_one_line(reason)}"
                break
    return missing


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


def tiny_run_config(data, out, model, **kw):
    """A TrainConfig of a few steps for the zoo's checkpoint tests (6 steps, batch 4, one thread)."""
    from leapformer_models.train import TrainConfig

    return TrainConfig(**{**dict(model=model, data=str(data), steps=6, batch_size=4, warmup=2, eval_interval=3,
                                 eval_batches=1, ckpt_interval=100, threads=1, time_limit=None, out=str(out),
                                 progress=False), **kw})


def check_roundtrip_and_exact_resume(model_name, overrides, corpus, tmp_path):
    """Train ``model_name`` a few steps on TINY_TEXT: the loaded checkpoint gives the trained model's logits
    bitwise, and a run stopped at step 3 then resumed ends with the uninterrupted run's validation loss.
    Returns (summary, loaded model, data path)."""
    import leapformer_models as lm
    from leapformer_models.train import train

    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT)
    summary, model = train(tiny_run_config(data, tmp_path / "full", model_name), overrides, return_model=True)
    loaded = lm.load_checkpoint(summary["checkpoint"])
    x, _ = model.get_batch(corpus, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    train(tiny_run_config(data, tmp_path / "cut", model_name, stop_after=3), overrides)
    resumed = train(tiny_run_config(data, tmp_path / "cut", model_name), overrides, resume=True)
    assert resumed["final_val_loss"] == summary["final_val_loss"]
    assert (tmp_path / "full" / "loss.png").exists()
    return summary, loaded, data


class ScratchRecorder(TorchDispatchMode):
    """Bytes of every storage an op creates between ``known`` inputs and the outputs (views and
    in-place results share a known storage): ``with ScratchRecorder(inputs) as rec: outs = f(...)``,
    then ``rec.scratch(outs)``. The storages are held until the recorder goes, so that no address is
    freed and reused within the recording: a reused address would otherwise be counted once, with
    the size first seen there (which made the count depend on what earlier tests left in the
    allocator)."""

    def __init__(self, known):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known if isinstance(t, torch.Tensor)}
        self.new = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                p = t.untyped_storage().data_ptr()
                if p not in self.known:
                    self.new.setdefault(p, t.untyped_storage())
        return out

    def scratch(self, outputs):
        outs = {t.untyped_storage().data_ptr() for t in outputs if isinstance(t, torch.Tensor)}
        return sum(st.nbytes() for p, st in self.new.items() if p not in outs)
