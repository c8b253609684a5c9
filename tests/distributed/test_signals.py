"""Signals under torchrun (gloo, 2 CPU processes): Ctrl-C (SIGINT) on one rank stops every
rank after the same step with a complete final checkpoint; SIGTERM, as torchrun's agent sends
it to the surviving workers when one dies, ends them at once without starting a collective
save, leaving the last complete checkpoint for the restart."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bitnet_training.cli import main

ARGS = [
    "--no-progress", "data.seq_len=32", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.num_key_value_heads=1",
    "training.mixed_precision=fp32", "training.max_steps=100000", "training.log_every=1",
    "training.save_every=3", "training.batch_size=2", "sample.max_new_tokens=0",
]  # fmt: skip


def workers(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def write_text(tmp_path) -> None:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    text = "\n\n".join(" ".join(words[(i * 5 + j) % 9] for j in range(50)) for i in range(40))
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "v.txt").write_text(text[:1500])


def start(tmp_path, name):
    write_text(tmp_path)
    out = tmp_path / name
    data = [f"data.train_files={tmp_path / 't.txt'}", f"data.val_files={tmp_path / 'v.txt'}"]
    run = ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    cmd = [sys.executable, *run, "-m", "bitnet_training", "train", *ARGS, *data]
    cmd.append(f"training.output_dir={out}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Output to a file, not a pipe nobody reads while training runs (a full pipe would block
    # the workers); a session of its own, so a failed test kills the workers too.
    log = open(tmp_path / f"{name}.log", "w+b")  # noqa: SIM115 (closed with the test's tmp)
    agent = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    agent.log = log
    deadline = time.monotonic() + 180
    # training is under way, with a checkpoint (old ones are pruned within milliseconds here,
    # so the pointer is what to watch)
    while not (out / "latest").is_file():
        assert agent.poll() is None, output(agent)
        if time.monotonic() > deadline:
            os.killpg(agent.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint within 180 s: {output(agent)}")
        time.sleep(0.2)
    pids = workers(agent.pid)
    assert len(pids) == 2
    return agent, pids, out


def output(agent, tail: int = 3000) -> str:
    agent.log.seek(0)
    return agent.log.read().decode(errors="replace")[-tail:]


def finish(agent) -> str:
    try:
        agent.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        pytest.fail(f"the workers did not stop within 60 s: {output(agent)}")
    return output(agent, tail=10**7)


def test_ctrl_c_on_one_rank_stops_all_after_the_same_step_and_saves(tmp_path):
    agent, pids, out = start(tmp_path, "int")
    os.kill(pids[1], signal.SIGINT)  # one rank only: the other learns it at the next step
    err = finish(agent)
    latest = (out / "latest").read_text().strip()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert latest == f"checkpoint-{steps[-1]:08d}"  # saved at the last step trained
    state = json.loads((out / latest / "trainer_state.json").read_text())
    assert state["step"] == steps[-1]
    assert "SIGINT received" in err
    assert main(["eval", str(out)]) == 0


def test_sigterm_under_torchrun_exits_at_once_without_saving(tmp_path):
    agent, pids, out = start(tmp_path, "term")
    for pid in pids:  # what torchrun's agent does to the survivors of a failed worker
        os.kill(pid, signal.SIGTERM)
    t0 = time.monotonic()
    finish(agent)
    assert time.monotonic() - t0 < 30
    latest = (out / "latest").read_text().strip()
    assert (out / latest / "trainer_state.json").is_file()  # a complete checkpoint
    assert main(["eval", str(out)]) == 0  # which the restart resumes from
