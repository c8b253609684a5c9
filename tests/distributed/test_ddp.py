"""Data parallelism under torchrun (gloo, 2 CPU processes): DP=2 with batch b trains as one
process with batch 2b, only rank 0 writes, evaluation is reduced over the ranks, and the
checkpoint is an ordinary one; strategy and backend settings that cannot act are refused."""

import json
import os
import subprocess
import sys

import pytest

from bitnet_training.cli import main

COMMON = [
    "--no-progress", "data.seq_len=32", "model.hidden_size=64", "model.intermediate_size=128",
    "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.num_key_value_heads=1",
    "training.mixed_precision=fp32", "training.max_steps=4", "training.log_every=1",
    "training.eval_every=2", "sample.max_new_tokens=0", "training.gradient_clip_norm=null",
]  # fmt: skip


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    import random

    d = tmp_path_factory.mktemp("ddp")
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "ternary"]
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(80)]
    (d / "t.txt").write_text("\n\n".join(docs[:70]))
    (d / "v.txt").write_text("\n\n".join(docs[70:]))
    return d


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("every", ["0", "1"])
def test_rank_zero_speaks_for_the_run(tmp_path, text, every):
    """A warning every rank hits (one training document: no validation split) is shown once;
    BITNET_TRAINING_LOG_ALL_RANKS=1 shows every rank's, the others prefixed."""
    one = tmp_path / "one.txt"
    one.write_text((text / "t.txt").read_text().split("\n\n")[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BITNET_TRAINING_LOG_ALL_RANKS": every}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--standalone", "-m", "bitnet_training", "train", *COMMON,
           f"data.train_files={one}", "training.max_steps=1", "training.batch_size=2",
           f"training.output_dir={tmp_path / 'run'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [ln for ln in done.stderr.splitlines() if "left no validation text" in ln]
    if every == "0":
        assert len(warned) == 1 and not warned[0].startswith("[rank")
    else:
        assert len(warned) == 2 and sum(ln.startswith("[rank 1] ") for ln in warned) == 1


def test_bf16_ranks_run_rank_zeros_measured_matmuls(tmp_path, text):
    """bf16 with integer_matmul auto under DDP: the first step's forward broadcasts rank 0's
    integer-or-float choice for every layer shape (no rank hangs), and the checkpoint
    holds one decision per shape."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--standalone", "-m", "bitnet_training", "train", *COMMON,
           f"data.train_files={text / 't.txt'}", "training.mixed_precision=bf16",
           "training.max_steps=1", "training.batch_size=2",
           f"training.output_dir={tmp_path / 'run'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "integer vs float GEMM measured" in done.stdout
    state = json.loads(
        (tmp_path / "run" / "checkpoint-00000001" / "trainer_state.json").read_text()
    )
    shapes = {(dev, dt, k, m) for dev, dt, k, m, _ in state["matmul_paths"]}
    # hidden 64, 1 kv head of 32, intermediate 128: q/o, k/v, gate/up, down
    assert shapes == {
        ("cpu", "bfloat16", k, m) for k, m in [(64, 64), (64, 32), (64, 128), (128, 64)]
    }


def test_two_ranks_train_as_one_process_with_the_global_batch(tmp_path, text):
    data = [f"data.train_files={text / 't.txt'}", f"data.val_files={text / 'v.txt'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--standalone", "-m", "bitnet_training", "train", *COMMON, *data,
           "training.batch_size=2", "training.save_every=2",
           f"training.output_dir={tmp_path / 'dp2'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("== summary ==") == 1  # rank 0 speaks for the run
    assert "global batch 2 per data-parallel rank x 1 accumulation x 2 data-parallel ranks = 4" in (
        done.stderr
    )
    one = tmp_path / "dp1"
    assert main(["train", *COMMON, *data, "training.batch_size=4",
                 f"training.output_dir={one}"]) == 0  # fmt: skip
    two, single = rows(tmp_path / "dp2"), rows(one)
    assert len(two) == len(single)  # one writer, the same records
    for a, b in zip(two, single, strict=True):
        assert a["kind"] == b["kind"] and a["step"] == b["step"]
        key = "loss" if a["kind"] == "train" else "val_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-5)  # float32 reduction order only
        if a["kind"] == "train":
            assert a["tokens_seen"] == b["tokens_seen"]
    # adapters and a distillation teacher (a replica per rank, never wrapped) under DDP
    both = [*cmd[:-3], "training.batch_size=2", "peft.method=lora",
            f"teacher.pretrained={one}", "loss.distill.relation_weight=10",
            f"training.output_dir={tmp_path / 'kd'}"]  # fmt: skip
    done = subprocess.run(both, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "kd" / "adapter" / "adapter_model.safetensors").is_file()
    # the checkpoint is an ordinary one: a single process evaluates it ...
    assert main(["eval", str(tmp_path / "dp2")]) == 0
    # ... and resumes it with the same global batch (4 = 2 x 2 ranks = 4 x 1 rank)
    import shutil

    again = tmp_path / "resumed"
    shutil.copytree(tmp_path / "dp2", again)
    shutil.rmtree(again / "checkpoint-00000004")
    (again / "latest").write_text("checkpoint-00000002\n")
    kept = [r for r in rows(again) if r["step"] <= 2]
    (again / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert main(["train", "--resume", *COMMON, *data, "training.batch_size=4",
                 "training.save_every=2", f"training.output_dir={again}"]) == 0  # fmt: skip
    for a, b in zip(rows(again), single, strict=True):
        key = "loss" if a["kind"] == "train" else "val_loss"
        assert a["step"] == b["step"] and a[key] == pytest.approx(b[key], rel=1e-5)


def test_settings_that_cannot_act_alone_are_refused(tmp_path, capsys, text):
    base = [*COMMON, f"data.train_files={text / 't.txt'}", f"training.output_dir={tmp_path}"]
    for extra, message in [
        ("distributed.strategy=ddp", "needs several processes: launch with torchrun"),
        ("distributed.backend=gloo", "acts only under torchrun"),
        ("distributed.strategy=fsdp", "strategy=fsdp needs several processes"),
        ("distributed.strategy=tp", "strategy=tp needs several processes"),
        ("distributed.strategy=pp", "strategy=pp needs several processes"),
        ("distributed.strategy=pipeline", "expected one of auto, none, ddp, fsdp, tp, pp"),
        ("distributed.pp_microbatches=2", "set only with strategy pp"),
        ("distributed.strategy=tp distributed.gradient_compression=bf16", "with strategy tp"),
        ("distributed.fsdp_param_dtype=bfloat16", "set only with strategy fsdp"),
        ("distributed.strategy=fsdp distributed.gradient_compression=fp16", "fsdp_reduce_dtype"),
    ]:
        assert main(["train", *base, *extra.split()]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def _compressed(rank, world, init, out, compression):
    import torch
    import torch.distributed as dist

    from bitnet_training import BitNetLM, ModelConfig
    from bitnet_training.distributed.ddp import wrap_ddp

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    sent = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):  # what the hooks hand to the all-reduce
        sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    model = wrap_ddp(BitNetLM(cfg), torch.device("cpu"), compression, 2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(4):
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))
        if step == 3:
            sent.clear()  # measure the last step (PowerSGD is on from step 2)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    dist.all_reduce = real
    grads = sum(p.numel() * 4 for p in model.parameters())  # what a float32 all-reduce sends
    result = {"losses": losses, "bytes": sum(sent), "float32": grads}
    torch.save(result, f"{out}/{compression}-{rank}.pt")
    dist.barrier()  # no rank tears down while another still talks
    dist.destroy_process_group()
    # The results are on disk: skip the interpreter's teardown, where gloo has been seen to
    # abort now and then under load (a non-zero exit would fail the spawn).
    os._exit(0)


def test_gradient_compression_trains_and_sends_fewer_bytes(tmp_path):
    import torch
    import torch.multiprocessing as mp

    sent = {}
    for i, c in enumerate(["fp16", "bf16", "powersgd"]):
        init = f"file://{tmp_path}/store-{i}"
        mp.spawn(_compressed, args=(2, init, str(tmp_path), c), nprocs=2)
        r = torch.load(tmp_path / f"{c}-0.pt")
        assert all(x == x and x < 10 for x in r["losses"])  # finite, training
        sent[c], full = r["bytes"], r["float32"]
    assert sent["fp16"] == sent["bf16"] == full // 2  # the buckets hold every gradient
    assert 0 < sent["powersgd"] < sent["fp16"]


def test_two_nodes_on_loopback_train_as_one_process(tmp_path, text):
    """Two torchrun launches (one process each) meet by c10d rendezvous, as two machines
    would; their run equals one process with the global batch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = [f"data.train_files={text / 't.txt'}", f"data.val_files={text / 'v.txt'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=1", f"--node-rank={rank}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bitnet-test",
               "-m", "bitnet_training", "train", *COMMON, *data, "training.batch_size=2",
               f"training.output_dir={tmp_path / 'nodes'}"]  # fmt: skip
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))  # fmt: skip
    outs = [n.communicate(timeout=180) for n in nodes]
    for n, (_, err) in zip(nodes, outs, strict=True):
        assert n.returncode == 0, err[-3000:]
    assert sum(out.count("== summary ==") for out, _ in outs) == 1
    one = tmp_path / "one"
    assert main(["train", *COMMON, *data, "training.batch_size=4",
                 f"training.output_dir={one}"]) == 0  # fmt: skip
    for a, b in zip(rows(tmp_path / "nodes"), rows(one), strict=True):
        key = "loss" if a["kind"] == "train" else "val_loss"
        assert a["step"] == b["step"] and a[key] == pytest.approx(b[key], rel=1e-5)
