"""``leapformer train`` under torchrun (issue #30), on CPU with gloo: 2 spawned processes (one
thread each, the launcher's environment variables set as torchrun sets them) give the same loss
trajectory as one process on the same global batch, with DDP and with FSDP2; a 2-process
checkpoint resumes on 2 processes and on 1, continuing the same trajectory; gradient accumulation;
one-line errors for an incomplete launcher environment, an indivisible batch and unused parameters.
One spawn runs every multi-process case (start-up dominates); it has a deadline and its groups are
destroyed by ``train`` itself."""
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from leapformer_models import distributed
from leapformer_models.errors import UsageError
from leapformer_models.train import TrainConfig, train
from utils import TINY_TEXT as TEXT

SPAWN_TIMEOUT = 150
TINY = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32)
STEPS = 5


def _cfg(data, out, **kw):
    base = dict(model="leapformer-lm", data=data, steps=STEPS, batch_size=4, warmup=2, eval_interval=STEPS,
                eval_batches=1, ckpt_interval=100, threads=1, time_limit=None, out=out, progress=False)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [r["train_loss"] for r in json.load(f)["history"] if r["train_loss"] is not None]


def _worker(rank, world, ports, data, d):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    res = {}
    runs = [(dict(out="ddp"), False), (dict(out="fsdp", distributed="fsdp"), False),
            (dict(out="cut", stop_after=3), False), (dict(out="cut"), True),
            (dict(out="cut1", stop_after=3, distributed="fsdp"), False),  # resumed by 1 process in the test
            (dict(out="accum", grad_accum=2), False)]
    try:
        for port, (kw, resume) in zip(ports, runs):
            # a fresh rendezvous per run: a new group on the old port could meet the previous run's
            # store before rank 0 has closed it (torchrun starts one run per process, so no such race)
            os.environ["MASTER_PORT"] = str(port)
            kw["out"] = os.path.join(d, kw["out"])
            train(_cfg(data, **kw), TINY, resume=resume)
    except Exception:
        res["crash"] = traceback.format_exc()
    with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    data = d / "tiny.txt"
    data.write_text(TEXT)
    ports = [_free_port() for _ in range(6)]
    ctx = mp.start_processes(_worker, args=(2, ports, str(data), str(d)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise AssertionError(f"the 2 processes did not finish within {SPAWN_TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for r in range(2):
        with open(d / f"rank{r}.json") as f:
            res = json.load(f)
        assert "crash" not in res, f"rank {r}: {res['crash']}"
    single = _cfg(str(data), str(d / "single"))
    train(single, TINY)
    return d, str(data), _losses(str(d / "single"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("run", ["ddp", "fsdp", "accum"])
def test_two_processes_follow_the_one_process_trajectory(runs, run):
    d, _, ref = runs
    got = _losses(str(d / run))
    assert len(got) == len(ref) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    with open(d / run / "metrics.json") as f:
        assert json.load(f)["summary"]["processes"] == 2  # one writer: rank 0's summary


@pytest.mark.usefixtures("one_thread")
def test_resume_continues_the_trajectory_on_2_and_on_1_process(runs):
    d, data, ref = runs
    torch.testing.assert_close(torch.tensor(_losses(str(d / "cut"))), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    train(_cfg(data, str(d / "cut1")), TINY, resume=True)  # an FSDP checkpoint of 2 ranks, resumed alone
    torch.testing.assert_close(torch.tensor(_losses(str(d / "cut1"))), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_grad_accumulation_in_one_process(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    train(_cfg(str(data), str(tmp_path / "a")), TINY)
    train(_cfg(str(data), str(tmp_path / "b"), grad_accum=4), TINY)
    torch.testing.assert_close(torch.tensor(_losses(str(tmp_path / "b"))), torch.tensor(_losses(str(tmp_path / "a"))),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("env,match", [
    (dict(RANK="0", WORLD_SIZE="2"), "MASTER_ADDR"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="x", MASTER_PORT="p"), "MASTER_PORT='p'"),
    (dict(RANK="3", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="x", MASTER_PORT="1"), "RANK=3"),
])
def test_incomplete_launcher_environment(env, match):
    with pytest.raises(UsageError, match=match) as e:
        distributed.launch_env(env)
    assert "\n" not in str(e.value)
    assert distributed.launch_env({}) is None


def test_indivisible_batch_and_unused_parameters(tmp_path):
    with pytest.raises(UsageError, match="divisible"):
        distributed.check_batch(distributed.Context(world=2), 6, 2)
    import leapformer_models as lm

    model = lm.build("leapformer-lm", **TINY)
    model.extra = torch.nn.Linear(2, 2)  # never used by the loss
    x = torch.randint(0, 256, (2, 8))
    assert distributed.unused_parameters(model, (x, x)) == ["extra.weight", "extra.bias"]
    assert all(p.grad is None for p in model.parameters())


def test_cli_flags_exist():
    from leapformer_models.cli import main
    assert main(["train", "--model", "leapformer-lm", "--distributed", "zero"]) == 2
    assert main(["train", "--model", "leapformer-lm", "--grad-accum", "0"]) == 2
