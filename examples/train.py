"""Exact resume after preemption: the seed tutorial's CNN, DDP on 2 CPU ranks, checkpointed with ckptstore.

Two modes:

* ``python examples/train.py demo`` — the end-to-end demonstration (the README's main job):
  1. an uninterrupted reference run (torchrun, 2 ranks);
  2. a run that is sent SIGTERM mid-way (to every worker, as SLURM/Kubernetes do): both ranks agree, save the
     same step synchronously and exit 0;
  3. a fresh launch that resumes with ``restore(step="latest")`` and finishes;
  then compares the final weights and optimizer state of (3) with (1), bit for bit.
  ``--store s3`` starts a moto S3 server on 127.0.0.1 and checkpoints there instead of ./checkpoints.

* ``torchrun --nproc_per_node 2 examples/train.py worker --root DIR --steps N`` — one training run; resumes
  from the newest verified step under DIR if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------
# worker (one rank under torchrun)
# ---------------------------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, str(HERE))
    from tutorial import TheModelClass

    from ckptstore import CheckpointManager, PerRank
    from ckptstore.schedule import SaveSchedule

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = DDP(TheModelClass())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    storage_options = json.loads(args.storage_options) if args.storage_options else None
    mgr = CheckpointManager(args.root, storage_options=storage_options, retention={"keep_last": 2})
    schedule = SaveSchedule(every_steps=args.save_every)  # SIGTERM / SIGUSR1 -> agreed preemption save

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[train] {msg}", flush=True)

    state: dict[str, Any] = {"model": model.module, "optim": opt, "sampler": PerRank({"seen": 0})}
    start = 0
    if mgr.latest() is not None:
        t0 = time.perf_counter()
        info = mgr.restore(state)
        start = info.step
        log(
            f"resumed from step {info.step} at {info.url} ({info.nbytes / 1024:.0f} KiB, saved by {info.world_size} "
            f"ranks) in {(time.perf_counter() - t0) * 1000:.0f} ms; loss there was {info.metrics['loss']:.4f}"
        )
    print(f"[train] rank {rank} pid {os.getpid()} ready at step {start}", flush=True)

    loss_v = float("nan")
    for step in range(start, args.steps):
        # Each (step, rank) has its own batch: a resumed run sees exactly the data an uninterrupted one does.
        g = torch.Generator().manual_seed(10_000 * step + rank)
        x = torch.randn(16, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        state["sampler"].value["seen"] += 16
        loss_v = loss.item()
        done = step + 1
        if args.step_delay:
            time.sleep(args.step_delay)
        if rank == 0 and done % 5 == 0:
            log(f"step {done}/{args.steps} loss {loss_v:.4f}")
        if schedule.should_save(done) or done == args.steps:
            res = mgr.save(done, state, epoch=done // 10, metrics={"loss": loss_v})
            why = (
                "preemption" if schedule.preempted else ("final" if done == args.steps else f"every {args.save_every}")
            )
            log(
                f"saved step {done} ({why}): {res.nbytes / 1024:.0f} KiB in {res.files} file(s) by {world} ranks, "
                f"{res.seconds * 1000:.0f} ms -> {res.url}"
                + (f"; retention removed {list(res.deleted_steps)}" if res.deleted_steps else "")
            )
        if schedule.preempted:
            print(f"[train] rank {rank}: preempted, checkpoint at step {done} committed, exiting cleanly", flush=True)
            break
    mgr.close()
    schedule.uninstall()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------------------
# demo (orchestrates three torchrun launches)
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(
    root: str, steps: int, save_every: int, storage_options: str, step_delay: float = 0.0
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(Path(__file__).resolve()), "worker", "--root", root,
        "--steps", str(steps), "--save-every", str(save_every), "--step-delay", str(step_delay),
    ]  # fmt: skip
    if storage_options:
        cmd += ["--storage-options", storage_options]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _final_state(root: str, storage_options: str) -> dict[str, Any]:
    from ckptstore import CheckpointManager

    mgr = CheckpointManager(root, storage_options=json.loads(storage_options) if storage_options else None)
    return mgr.load("latest")


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def demo(args: argparse.Namespace) -> int:
    storage_options = ""
    server = None
    base = args.root
    if args.store == "s3":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="ckpt-demo")
        storage_options = json.dumps({"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}})
        base = "s3://ckpt-demo/train"
        print(f"[demo] moto S3 server on {endpoint}; checkpoints go to {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    ref_root, run_root = f"{base}/reference", f"{base}/preempted"
    try:
        print(f"[demo] 1/3 uninterrupted reference run: {args.steps} steps, DDP on 2 CPU ranks (torchrun, gloo)")
        p = _torchrun(ref_root, args.steps, args.save_every, storage_options)
        out, _ = p.communicate(timeout=600)
        print(_indent(out))
        if p.returncode != 0:
            print(f"[demo] reference run failed with exit code {p.returncode}")
            return 1

        print(f"[demo] 2/3 same run, SIGTERM to every worker after step ~{args.preempt_after}")
        p = _torchrun(run_root, args.steps, args.save_every, storage_options, step_delay=0.05)
        pids: list[int] = []
        lines: list[str] = []
        sent = False
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            print(_indent(line), end="")
            pids += [int(m) for m in re.findall(r"pid (\d+) ready", line)]
            if not sent and f"step {args.preempt_after}/" in line:
                for pid in pids:
                    os.kill(pid, signal.SIGTERM)
                print(f"[demo] >>> sent SIGTERM to workers {pids}")
                sent = True
        p.wait(timeout=300)
        text = "".join(lines)
        clean = text.count("exiting cleanly") == 2
        print(f"[demo] preempted run: torchrun exit code {p.returncode}; both ranks exited cleanly: {clean}")

        print("[demo] 3/3 fresh launch: restore(step='latest') and finish")
        p = _torchrun(run_root, args.steps, args.save_every, storage_options)
        out, _ = p.communicate(timeout=600)
        print(_indent(out))
        if p.returncode != 0:
            print(f"[demo] resumed run failed with exit code {p.returncode}")
            return 1

        ref, got = _final_state(ref_root, storage_options), _final_state(run_root, storage_options)
        same_model = _same(ref["model"], got["model"])
        same_optim = _same(ref["optim"], got["optim"])
        print(
            f"[demo] final weights equal the uninterrupted run bit for bit: model {same_model}, optimizer {same_optim}"
        )
        ok = same_model and same_optim and clean and p.returncode == 0
        print("[demo] OK" if ok else "[demo] MISMATCH")
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()


def _indent(text: str) -> str:
    return "".join(f"    {line}" for line in text.splitlines(keepends=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("demo", help="reference run, preempted run, resume, bit-exact comparison")
    d.add_argument("--root", default="./checkpoints/train")
    d.add_argument("--store", choices=["local", "s3"], default="local")
    d.add_argument("--steps", type=int, default=40)
    d.add_argument("--save-every", type=int, default=10)
    d.add_argument("--preempt-after", type=int, default=25)
    w = sub.add_parser("worker", help="one rank (run under torchrun)")
    w.add_argument("--root", required=True)
    w.add_argument("--steps", type=int, default=40)
    w.add_argument("--save-every", type=int, default=10)
    w.add_argument("--step-delay", type=float, default=0.0)
    w.add_argument("--storage-options", default="")
    args = ap.parse_args()
    return demo(args) if args.mode == "demo" else worker(args)


if __name__ == "__main__":
    raise SystemExit(main())
