"""python -m benchmarks.precision_probe --out DIR: where a low-precision Triton result loses digits.

For each case (dtype, D, T, normalize): the relative error (``tests/utils.rel_err``) of o and of
every gradient against the float64 chunked form (torch backend), for

- ``triton``: the Triton backend as shipped (its dot operand mode for that dtype),
- ``triton_fp32dots``: the same kernels with every dot forced to fp32 operands (DOT_MODE 0),
- ``torch``: the torch backend run in the same low-precision dtype,
- ``plain``: the quadratic form run entirely in that dtype (``tests/utils.plain_form``, the
  baseline of the tests' flash-attn rule), up to T = 2048.

If ``triton`` is far worse than ``triton_fp32dots``, the dot operands' rounding is the cause; if it
is near ``torch``, the dtype itself is. Kernels are compiled up front in parallel (first autotune
config only, as in the parity stage of ``gpu_report``). Writes DIR/precision.json and .md.
Without CUDA it runs tiny sizes under TRITON_INTERPRET=1 (a rehearsal).
"""
import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

CASES = [  # (dtype, D, T, normalize, state)
    ("bfloat16", 64, 16384, True, False), ("bfloat16", 64, 65536, True, False),
    ("bfloat16", 128, 16384, True, False), ("bfloat16", 128, 65536, True, False),
    ("float16", 64, 200, False, True), ("float16", 128, 200, False, True),
]
TINY = [("float16", 16, 70, True, False), ("float16", 16, 70, False, True)]
VARIANTS = ("triton", "triton_fp32dots", "torch", "plain")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    from . import aot
    from . import gpu_report as gr
    import leapformer_kernels as lk
    from leapformer_kernels.attention import triton_chunk

    shipped = triton_chunk._dot_mode
    cases = [gr.Case(f"{dt}.D{D}.T{T}.{'norm' if n else 'unnorm'}{'.state' if s else ''}", dt, B=1, T=T, D=D,
                     normalize=n, state=s, final_state=s) for dt, D, T, n, s in (CASES if cuda else TINY)]

    def set_mode(fp32):
        triton_chunk._dot_mode = (lambda dtype: 0) if fp32 else shipped

    t0 = time.monotonic()
    if cuda:  # compile every kernel (both dot modes) in parallel before anything runs
        from triton.runtime import driver

        t = driver.active.get_current_target()
        launches = []
        for fp32 in (False, True):
            set_mode(fp32)
            launches += gr.record_launches([functools.partial(gr.triton_fwd_bwd, c) for c in cases], dev)
        set_mode(False)
        pc = aot.Precompiler(a.jobs)
        keys = pc.submit(launches, (t.backend, t.arch, t.warp_size), [0])
        st = pc.wait(keys, timeout=240)
        pc.close()
        print(f"compiled {st} in {time.monotonic() - t0:.0f} s", flush=True)
    rel_err = gr.tu().rel_err
    rows = []
    with aot.first_config_only():
        for c in cases:
            ins, kw = gr.case_inputs(c, dev)
            ref_ins = [t.detach().double().requires_grad_() for t in ins]
            refs = gr.call(functools.partial(lk.leap_attention, backend="torch"), ref_ins, kw, c)
            g = torch.Generator(device=dev).manual_seed(1)
            gens = [torch.randn(o.shape, dtype=torch.float64, device=dev, generator=g) for o in refs]
            gr.loss(refs, gens).backward()
            names = ["o", "S", "z"][:len(refs)] + gr.GRADS[:len(ins)]
            ref_vals = [r.detach() for r in refs] + [t.grad for t in ref_ins]
            row = {"case": c.name, "dtype": c.dtype, "D": c.D, "T": c.T, "errs": {}}
            for var in VARIANTS:
                if var == "plain" and c.T > 2048:
                    row["errs"][var] = {}
                    continue
                x = [t.detach().clone().requires_grad_() for t in ins]
                set_mode(var == "triton_fp32dots")
                try:
                    fn = (functools.partial(gr.tu().plain_form, dtype=gr.DT[c.dtype]) if var == "plain" else
                          functools.partial(lk.leap_attention, backend="torch" if var == "torch" else "triton"))
                    outs = gr.call(fn, x, kw, c)
                    gr.loss(outs, gens).backward()
                    row["errs"][var] = {n: rel_err(y, r, finite=False)
                                        for n, y, r in zip(names, list(outs) + [t.grad for t in x], ref_vals)}
                except Exception as e:  # report, go on
                    row["errs"][var] = {"error": f"{type(e).__name__}: {e}"[:200]}
                finally:
                    set_mode(False)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from .timing import device_name, versions

    meta = {"device": device_name(dev), "versions": versions(), "seconds": round(time.monotonic() - t0, 1)}
    (out / "precision.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Precision probe: {meta['device']}", "",
             f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}; relative error against "
             "the float64 chunked form (torch backend)", "",
             "| case | variant | " + " | ".join(["o", "dq", "dk", "dv", "dpq", "dpk"]) + " |",
             "| --- | --- |" + " --- |" * 6]
    for r in rows:
        for var in VARIANTS:
            e = r["errs"][var]
            cells = [f"{e[n]:.2e}" if n in e else "-" for n in ("o", "dq", "dk", "dv", "dpq", "dpk")]
            lines.append(f"| {r['case']} | {var} | " + " | ".join(cells) + " |")
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
