"""python -m benchmarks.lm_speed: the LeaPformer LM against the same LM with softmax attention, by length.

Training: tokens per second of one optimizer step (forward, backward and AdamW step; batch
--batch of T tokens). Decoding: ms per new token, one token at a time through the model's
state after a prompt of `context` tokens (LeaP: the per-layer (S, z), constant in the context;
softmax: the KV cache, which the model extends and masks at every step). Both attentions run
in the same model (``leapformer-lm-long``'s architecture: 4 layers, width 128, 4 heads, no
position table; --n-layer / --n-embd change it) with the same weights apart from LeaP's
predictors, and every figure comes with its ratio against softmax measured in the same run.

Timing on the CPU: the two contenders of a case alternate round-robin after a warm-up call
(benchmarks/timing.py's rule), median of the rounds; a case stops adding rounds once its
--budget seconds are spent (at least one timed round each), so the full run stays bounded on a
slow or loaded machine. Writes <out>/lm_speed_<device>.md (table), .json (every number, the
device, thread count and versions) and .png. Ctrl-C writes the cases finished so far (marked
interrupted) and exits 130.

    python -m benchmarks.lm_speed                  # T = 128 .. 8192, 1 thread -> benchmarks/results
    python -m benchmarks.lm_speed --quick          # tiny sizes (CI smoke test) -> a scratch folder
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = "benchmarks/results"
SCRATCH = str(Path(tempfile.gettempdir()) / "leapformer-benchmarks")
ATTENTIONS = ("leap", "softmax")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores), {threads} thread(s)"


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=None,
                   help="training lengths and decode contexts (default 128 256 512 1024 2048 4096 8192)")
    p.add_argument("--batch", type=int, default=1, help="sequences per training step (default 1)")
    p.add_argument("--decode-batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--n-layer", type=int, default=None, help="layers (default: leapformer-lm-long's)")
    p.add_argument("--n-embd", type=int, default=None, help="width (default: leapformer-lm-long's)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case at most (default 11; 3 quick)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="timed decode steps per round (default 16; 2 quick); the median round per step is reported")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per case after which no further round starts (default 60; 5 quick)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test); writes to a scratch folder")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS}; with --quick {SCRATCH})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    a = p.parse_args(argv)
    for name in ("batch", "decode_batch", "repeats", "decode_steps", "threads", "n_layer", "n_embd"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.T is not None and min(a.T) < 2:
        p.error("--T values must be at least 2")
    if a.budget is not None and not a.budget > 0:
        p.error("--budget must be > 0")
    if a.quick:
        a.T = a.T or [32, 64]
        a.n_layer, a.n_embd = a.n_layer or 1, a.n_embd or 32
        a.repeats, a.decode_steps, a.budget = a.repeats or 3, a.decode_steps or 2, a.budget or 5.0
        a.out = a.out or SCRATCH
    a.T = sorted(set(a.T or [128, 256, 512, 1024, 2048, 4096, 8192]))
    a.repeats, a.decode_steps, a.budget = a.repeats or 11, a.decode_steps or 16, a.budget or 60.0
    a.out = a.out or RESULTS
    return a


def build_models(a, T, device):
    """The LM with LeaP and with softmax attention; softmax copies LeaP's shared weights."""
    import leapformer_models as lm
    cfg = {"seq_len": T}
    if a.n_layer:
        cfg["n_layer"] = a.n_layer
    if a.n_embd:
        cfg["n_embd"] = a.n_embd
        cfg["n_head"] = max(1, min(4, a.n_embd // 16))
    torch.manual_seed(0)
    models = {att: lm.build("leapformer-lm-long", attention=att, **cfg).to(device) for att in ATTENTIONS}
    models["softmax"].load_state_dict(models["leap"].state_dict(), strict=False)
    return models


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(fns, device, repeats, budget, warmup=1):
    """Round-robin timing after ``warmup`` calls each: {name: [ms, ...]}; no round starts once
    ``budget`` seconds have passed (counting the warm-up), but every contender gets one round."""
    t_start = time.perf_counter()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for r in range(repeats):
        if r > 0 and time.perf_counter() - t_start > budget:
            break
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def train_case(a, T, device):
    models = build_models(a, T, device)
    g = torch.Generator().manual_seed(T)
    x = torch.randint(0, 256, (a.batch, T + 1), generator=g).to(device)
    batch = (x[:, :-1], x[:, 1:])
    opts = {att: torch.optim.AdamW(m.parameters(), lr=1e-4) for att, m in models.items()}

    def step(att):
        m, opt = models[att], opts[att]
        loss = m.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for m in models.values():
        m.train()
    times = timed_rounds({att: (lambda att=att: step(att)) for att in ATTENTIONS}, device, a.repeats, a.budget)
    row = {"T": T, "batch": a.batch, "rounds": len(times["softmax"])}
    for att in ATTENTIONS:
        ms = statistics.median(times[att])
        row[f"{att}_step_ms"] = ms
        row[f"{att}_tokens_per_s"] = a.batch * T / (ms / 1e3)
        row[f"{att}_step_ms_all"] = times[att]
    row["leap_vs_softmax"] = row["leap_tokens_per_s"] / row["softmax_tokens_per_s"]
    return row


@torch.no_grad()
def decode_case(a, L, device):
    models = build_models(a, L, device)
    g = torch.Generator().manual_seed(L)
    prompt = torch.randint(0, 256, (a.decode_batch, L), generator=g).to(device)
    nxt = torch.randint(0, 256, (a.decode_batch, 1), generator=g).to(device)
    states = {}
    for att, m in models.items():
        m.eval()
        _, states[att] = m(prompt, use_cache=True)  # the prompt, once (not timed)

    def steps(att):  # decode_steps tokens after the prompt; the model returns a new state each step
        m, s = models[att], states[att]
        for _ in range(a.decode_steps):
            _, s = m(nxt, state=s, use_cache=True)

    times = timed_rounds({att: (lambda att=att: steps(att)) for att in ATTENTIONS}, device, a.repeats, a.budget)
    row = {"context": L, "batch": a.decode_batch, "rounds": len(times["softmax"]), "steps_per_round": a.decode_steps}
    for att in ATTENTIONS:
        row[f"{att}_ms_per_token"] = statistics.median(times[att]) / a.decode_steps
    row["leap_vs_softmax"] = row["softmax_ms_per_token"] / row["leap_ms_per_token"]
    return row


def crossover(rows, key="leap_vs_softmax", x="T"):
    """The smallest length from which LeaP stays ahead (ratio > 1 there and at every longer one)."""
    cross = None
    for r in sorted(rows, key=lambda r: r[x], reverse=True):
        if r[key] > 1:
            cross = r[x]
        else:
            break
    return cross


def markdown(payload) -> str:
    m, train, dec = payload["meta"], payload["train"], payload["decode"]
    lines = [
        "# leapformer-lm: LeaP vs softmax attention by length",
        "",
        f"Device: {m['device']}; torch {m['torch']}, Python {m['python']}; LeaP attention backend "
        f"`{m['leap_backend']}`, softmax through SDPA. Model: {m['model']}. {m['date']}.",
        f"Timing: {m['timing']}.",
        "",
        "Ratios are LeaP over softmax from the same run (> 1: LeaP is faster). Training: one optimizer step "
        f"(forward, backward, AdamW) on {m['train_batch']} x T tokens. Decoding: ms per new token after a "
        f"prompt of `context` tokens, batch {m['decode_batch']}.",
        "",
        "| T (context) | train tok/s LeaP | train tok/s softmax | train LeaP/softmax | decode ms/token LeaP | "
        "decode ms/token softmax | decode LeaP/softmax |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dec_by = {d["context"]: d for d in dec}
    for r in train:
        d = dec_by.get(r["T"])
        dcells = (f"{d['leap_ms_per_token']:.2f} | {d['softmax_ms_per_token']:.2f} | **{d['leap_vs_softmax']:.2f}x**"
                  if d else " | | ")
        lines.append(f"| {r['T']} | {r['leap_tokens_per_s']:,.0f} | {r['softmax_tokens_per_s']:,.0f} | "
                     f"**{r['leap_vs_softmax']:.2f}x** | {dcells} |")
    ct, cd = payload["crossover"]["train_T"], payload["crossover"]["decode_context"]
    lines += ["",
              f"Crossover: LeaP trains faster from T = {ct if ct else 'none measured'} and decodes faster from a "
              f"context of {cd if cd else 'none measured'} tokens on (every longer length measured included).",
              ""]
    if m.get("interrupted"):
        lines += ["**Interrupted**: only the cases above were measured.", ""]
    lines += [f"Reproduce: `{' '.join(['python -m benchmarks.lm_speed', *m['argv']])}`.", ""]
    return "\n".join(lines)


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, dec, m = payload["train"], payload["decode"], payload["meta"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for att, col in (("leap", "C0"), ("softmax", "C1")):
        if train:
            axes[0].plot([r["T"] for r in train], [r[f"{att}_tokens_per_s"] for r in train], "o-", color=col, label=att)
        if dec:
            axes[1].plot([d["context"] for d in dec], [d[f"{att}_ms_per_token"] for d in dec], "o-", color=col,
                         label=att)
    if train:
        axes[2].plot([r["T"] for r in train], [r["leap_vs_softmax"] for r in train], "o-", color="C2",
                     label="training tok/s")
    if dec:
        axes[2].plot([d["context"] for d in dec], [d["leap_vs_softmax"] for d in dec], "s-", color="C3",
                     label="decode speed")
    axes[2].axhline(1.0, color="k", ls="--", lw=1)
    for ax, title, ylabel in ((axes[0], "training (fwd + bwd + AdamW)", "tokens / s"),
                              (axes[1], "decoding one token", "ms / token"),
                              (axes[2], "LeaP / softmax (> 1: LeaP faster)", "ratio")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (training) / context (decoding), tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an interrupted run may have no decode case yet
            ax.legend(fontsize=8)
    fig.suptitle(f"leapformer-lm, {m['model']} | {m['device']} | torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(payload, out: Path, stem: str):
    out.mkdir(parents=True, exist_ok=True)
    payload["crossover"] = {"train_T": crossover(payload["train"]),
                            "decode_context": crossover(payload["decode"], x="context")}
    for ext, writer in (("json", lambda p: p.write_text(json.dumps(payload, indent=1))),
                        ("md", lambda p: p.write_text(markdown(payload))),
                        ("png", lambda p: plot(payload, p))):
        tmp = out / f".{stem}.tmp.{ext}"
        writer(tmp)
        os.replace(tmp, out / f"{stem}.{ext}")


def setup(prog: str, device_arg: str) -> torch.device:
    """What the LM benchmarks do first: the [zoo] extra present (one line and exit 1 if not), then the
    device resolved (``auto``: CUDA when available; one line and exit 2 for an absent CUDA)."""
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as e:
        print(f'python -m {prog} needs {e.name}: pip install "leapformer-kernels[zoo]"', file=sys.stderr)
        sys.exit(1)
    device = torch.device("cuda" if device_arg == "auto" and torch.cuda.is_available() else
                          ("cpu" if device_arg == "auto" else device_arg))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"python -m {prog}: --device cuda, but CUDA is not available here", file=sys.stderr)
        sys.exit(2)
    return device


def main(argv=None):
    a = parse(argv)
    device = setup("benchmarks.lm_speed", a.device)
    from tqdm import tqdm

    from leapformer_models.train import attention_backend
    before = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    probe = build_models(a, 16, device)["leap"].config
    meta = {"device": device_label(device, a.threads), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "leap_backend": attention_backend(device).replace("_backend", ""),
            "model": f"{probe.n_layer} layers, width {probe.n_embd}, {probe.n_head} heads, byte vocabulary, "
                     f"pos_emb {probe.pos_emb}",
            "train_batch": a.batch, "decode_batch": a.decode_batch, "repeats": a.repeats, "budget_s": a.budget,
            "decode_steps": a.decode_steps, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": list(sys.argv[1:] if argv is None else argv), "interrupted": False,
            "timing": f"wall clock, LeaP and softmax alternating round-robin after one warm-up call each, median of "
                      f"up to {a.repeats} rounds; a case starts no new round after {a.budget:g} s"}
    payload = {"meta": meta, "train": [], "decode": []}
    cases = [("train", T) for T in a.T] + [("decode", T) for T in a.T]
    out, stem = Path(a.out), f"lm_speed_{device.type}"
    t0 = time.perf_counter()
    bar = tqdm(cases, desc="lm_speed", unit="case", disable=not a.progress, dynamic_ncols=True)
    try:
        for kind, T in bar:
            bar.set_postfix_str(f"{kind} T={T}")
            if kind == "train":
                payload["train"].append(train_case(a, T, device))
            else:
                payload["decode"].append(decode_case(a, T, device))
        bar.close()
    except KeyboardInterrupt:
        bar.close()
        meta["interrupted"] = True
        meta["wall_s"] = time.perf_counter() - t0
        write(payload, out, stem)
        print(f"\ninterrupted: wrote the {len(payload['train']) + len(payload['decode'])} finished cases to "
              f"{out / stem}.{{md,json,png}}", file=sys.stderr)
        torch.set_num_threads(before)
        if argv is None:
            sys.exit(130)
        raise
    finally:
        torch.set_num_threads(before)
    meta["wall_s"] = time.perf_counter() - t0
    write(payload, out, stem)
    print(markdown(payload))
    print(f"wrote {out / stem}.md, .json and .png ({meta['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
