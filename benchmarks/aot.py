"""Ahead-of-time compilation of the package's Triton kernels, shared by ``triton_report`` (CPU, no
driver: resource usage per config) and ``gpu_report`` (warms Triton's cache in parallel first).

``record()`` patches every ``@triton.jit`` / ``@triton.autotune`` kernel of the kernel modules with
a recorder, so that calling the host wrappers (or the public ops) yields the exact launches --
grid, arguments, constexprs -- without running anything (tensors may be ``meta``). Tensor
arguments are recorded as ``Ptr`` (dtype, alignment), so launches pickle. ``Precompiler`` compiles
each config of each launch for a ``GPUTarget`` in spawned worker processes: ``specs()`` binds the
arguments through Triton's own binder (the runtime's specialisation and options, so the on-disk
cache key equals the one a real launch computes: the parent's later launch is a cache hit). These use Triton
internals (``create_function_from_signature``, ``JITFunction._pack_args``), identical in 3.6-3.9.
"""
import contextlib
import importlib
import io
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Dict, List, Tuple
from unittest import mock

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

MODULES = ("leapformer_kernels.attention.triton_chunk", "leapformer_kernels.attention.triton_monotone",
           "leapformer_kernels.pooling.triton_pool")
STAGES = {0: "fwd", 2: "bwd.dq"}


def label(name: str, kwargs: Dict) -> str:
    """Readable kernel name: fwd, fwd.segment_sums, segment_scan, bwd.dden, bwd.dq,
    bwd.segment_sums, bwd.dkv, step, step_inplace, monotone.fwd / .bwd.dq / .bwd.dkv / .tables,
    pool.<name>."""
    if name == "leap_fwd_kernel_sweep":
        return STAGES.get(kwargs.get("STAGE"), f"sweep{kwargs.get('STAGE')}")
    if name == "leap_bwd_kernel_dkv":
        return "bwd.dkv"
    if name == "leap_bwd_kernel_dden":
        return "bwd.dden"
    if name == "leap_fwd_kernel_step":
        return "step_inplace" if kwargs.get("HAS_IDX") else "step"
    if name == "leap_fwd_kernel_segment_sums":
        return "fwd.segment_sums"
    if name == "leap_bwd_kernel_segment_sums":
        return "bwd.segment_sums"
    if name == "leap_fwd_kernel_segment_scan":
        return "segment_scan"
    if name == "leap_fwd_kernel_monotone":  # monotone cross-attention (num_visible_keys)
        return {0: "monotone.fwd", 2: "monotone.bwd.dq"}.get(
            kwargs.get("STAGE"), f"monotone.q{kwargs.get('STAGE')}")
    if name == "leap_bwd_kernel_monotone_dkv":
        return "monotone.bwd.dkv"
    if name == "leap_bwd_kernel_monotone_tables":
        return "monotone.tables"
    part = name.split("_kernel_", 1)[-1]  # pool_<fwd|bwd>_kernel_<part>
    return "pool." + {"pool_bwd_kernel_max": "max_bwd", "pool_bwd_kernel_sum": "sum_bwd"}.get(name, part)


class Ptr:
    """A tensor argument as Triton's binder sees it (dtype, 16-byte alignment): picklable, so a
    launch recorded on CUDA (or interpreted CPU) tensors can be compiled in another process."""

    def __init__(self, dtype, aligned=True):
        self.dtype, self.aligned = dtype, aligned

    def data_ptr(self):
        return 0 if self.aligned else 8

    def key(self):
        return ("ptr", str(self.dtype), self.aligned)


def _arg(x):
    return Ptr(x.dtype, x.data_ptr() % 16 == 0) if hasattr(x, "data_ptr") and hasattr(x, "dtype") else x


def _arg_key(x):
    """The part of an argument that Triton's specialisation sees."""
    if isinstance(x, Ptr):
        return x.key()
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return ("int", x == 1, x % 16 == 0, -2**31 <= x < 2**31)
    if isinstance(x, float):
        return "float"
    return repr(x)


@dataclass
class Launch:
    module: str
    name: str
    grid: Tuple
    args: Tuple
    kwargs: Dict[str, Any]
    label: str = field(init=False)

    def __post_init__(self):
        self.label = label(self.name, self.kwargs)

    def kernel(self):
        return getattr(importlib.import_module(self.module), self.name)

    def key(self):
        """Launches with equal keys compile to the same kernels."""
        return (self.module, self.name, tuple(_arg_key(x) for x in self.args),
                tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())))


class _Recorder:
    def __init__(self, module, name, out):
        self.module, self.name, self.out = module, name, out

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.out.append(Launch(self.module, self.name, tuple(grid), tuple(_arg(x) for x in args),
                                   {k: _arg(v) for k, v in kwargs.items()}))
        return launch


def _kernel_types():
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    types = [JITFunction, Autotuner]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        types.append(InterpretedFunction)
    except ImportError:
        pass
    return tuple(types)


def _kernels():
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, _kernel_types()):
                yield modname, mod, name, obj


@contextlib.contextmanager
def record():
    """Within the block, kernel launches of MODULES are recorded (into the yielded list), not run:
    the host code around them runs as usual (outputs stay uninitialised)."""
    out: List[Launch] = []
    with contextlib.ExitStack() as stack:
        for modname, mod, name, _ in _kernels():
            stack.enter_context(mock.patch.object(mod, name, _Recorder(modname, name, out)))
        yield out


@contextlib.contextmanager
def first_config_only():
    """Within the block every autotuned kernel has only its first config: no autotune sweep."""
    saved = [(k, k.configs) for _, _, _, k in _kernels() if hasattr(k, "configs")]
    try:
        for k, cs in saved:
            k.configs = cs[:1]
        yield
    finally:
        for k, cs in saved:
            k.configs = cs


def configs(launch: Launch, which=None):
    """The configs the autotuner may pick (index, Config or None for a plain kernel), after its
    ``early_config_prune`` for this launch's arguments; ``which``: a list of indices to keep."""
    k = launch.kernel()
    cs = list(enumerate(getattr(k, "configs", [None])))
    prune = getattr(k, "early_config_prune", None)
    if prune is not None and len(cs) > 1:
        kept = prune([c for _, c in cs], {}, **launch.kwargs)
        cs = [(i, c) for i, c in cs if any(c is x for x in kept)]
    return [c for c in cs if which is None or c[0] in which]


def _runtime_kwargs(kwargs):
    """What ``JITFunction.run`` adds to the launch kwargs before binding (cache-key relevant)."""
    from triton import knobs

    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", False) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kw


def _jit_fn(k):
    """The JITFunction under an autotuner (or the kernel itself)."""
    from triton.runtime.autotuner import Autotuner

    return k.fn if isinstance(k, Autotuner) else k


def specs(launch: Launch, target, which=None) -> List[Dict]:
    """One picklable compile spec per config of ``launch`` for ``target`` (a GPUTarget)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_fn(launch.kernel())
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    out = []
    for idx, cfg in configs(launch, which):
        kw = _runtime_kwargs({**launch.kwargs, **(cfg.all_kwargs() if cfg is not None else {})})
        bound, spec, opts = binder(*launch.args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        out.append(dict(module=launch.module, name=launch.name, label=launch.label, config=idx,
                        num_warps=options.num_warps, num_stages=options.num_stages, signature=signature,
                        constexprs=constexprs, attrs=attrs, options=dict(options.__dict__),
                        target=(target.backend, target.arch, target.warp_size)))
    return out


def compile_launch(launch: Launch, target: Tuple, config: int, analyse=None):
    """Compile one config of a recorded launch for ``target`` = (backend, arch, warp size), in a
    worker process (Triton's on-disk cache is shared, so a later launch of the same kernel in the
    parent finds it). Returns ``analyse(compiled, spec, seconds)``, else the seconds."""
    import time

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _init_worker()
    fn = _jit_fn(launch.kernel())
    s = specs(launch, GPUTarget(*target), [config])[0]
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's -v log there (a fresh compile)
        if analyse is not None:
            knobs.nvidia.dump_ptxas_log = True
        ck = triton.compile(ASTSource(fn, s["signature"], s["constexprs"], s["attrs"]),
                            target=GPUTarget(*target), options=s["options"])
    secs = time.perf_counter() - t0
    return analyse(ck, s, secs, log.getvalue()) if analyse is not None else secs


def resources(ck, s: Dict, secs: float, log: str = "") -> Dict:
    """Resource usage of a compiled kernel, read with the CUDA tools shipped in Triton's wheel:
    ``cuobjdump -res-usage`` on its cubin (registers, stack frame, local memory) and the ``ptxas -v``
    log (spill stores / loads): Triton's own, printed during a fresh compile, else (a cache hit) that
    of Triton's ptxas step run again on the PTX (same ptxas, same flags). Shared memory is Triton's
    allocation; the PTX tells whether the dots became ``wgmma`` or ``mma.sync``."""
    import re
    import subprocess
    import tempfile

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nv
    from triton.compiler.compiler import make_backend

    arch, ptx = s["target"][1], ck.asm["ptx"]
    source = "triton's compile"
    if "spill stores" not in log:
        source = "triton's ptxas step again"
        backend = make_backend(GPUTarget(*s["target"]))
        buf = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            backend.make_cubin(ptx, {}, backend.parse_options(dict(s["options"])), arch)
        log = buf.getvalue()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.cubin"), "wb") as f:
            f.write(ck.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(nv.get_ptxas(arch).path), "cuobjdump")
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout

    def num(pattern, text):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None

    return dict(config=s["config"], num_warps=s["num_warps"], num_stages=s["num_stages"],
                regs=num(r"REG:(\d+)", res), stack=num(r"STACK:(\d+)", res), local=num(r"LOCAL:(\d+)", res),
                ptxas_log=source, ptxas_regs=num(r"Used (\d+) registers", log),
                spill_stores=num(r"(\d+) bytes spill stores", log), spill_loads=num(r"(\d+) bytes spill loads", log),
                shared=ck.metadata.shared, wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync", ptx)), compile_s=round(secs, 2))


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)  # workers compile; only the parent may interpret
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


class Precompiler:
    """Compiles launches (each config) in ``jobs`` spawned processes, in submission order, while
    the parent goes on; ``wait`` blocks on a subset. Duplicates are compiled once."""

    def __init__(self, jobs: int):
        self.pool = ProcessPoolExecutor(max(1, jobs), mp_context=get_context("spawn"), initializer=_init_worker)
        self.futures: Dict[Tuple, Any] = {}

    def submit(self, launches, target: Tuple, which=None, analyse=None) -> List[Tuple]:
        keys = []
        for L in launches:
            for idx, _ in configs(L, which):
                key = (L.key(), tuple(target), idx)
                if key not in self.futures:
                    self.futures[key] = self.pool.submit(compile_launch, L, tuple(target), idx, analyse)
                    self.futures[key].launch = L
                keys.append(key)
        return list(dict.fromkeys(keys))

    def wait(self, keys, timeout=None) -> Dict[str, Any]:
        """{"done": n, "failed": [messages], "pending": n, "compile_s": summed worker seconds}."""
        futs = [self.futures[k] for k in keys]
        done, pending = wait_futures(futs, timeout=timeout)
        failed = [f"{f.launch.label}: {type(f.exception()).__name__}: {str(f.exception())[:300]}"
                  for f in done if f.exception() is not None]
        secs = sum(f.result() for f in done if f.exception() is None and isinstance(f.result(), float))
        return dict(done=len(done), failed=failed, pending=len(pending), compile_s=round(secs, 1))

    def close(self):
        """Drop what is queued and stop the workers (a compile still running is not waited for)."""
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
