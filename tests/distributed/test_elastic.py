"""Surviving a crashed worker: under `torchrun --max-restarts=1` one rank is killed with
SIGKILL after a checkpoint; torchrun restarts the group, which resumes from the latest
checkpoint by itself (the command has no --resume) and ends where an uninterrupted run does,
to the last bit, with each step logged once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from test_signals import ARGS, output, workers, write_text

from bitnet_training.distributed.elastic import JOB_FILE, restart_plan

STEPS = 12


def launch(tmp_path, name, restarts: int):
    out = tmp_path / name
    args = [a for a in ARGS if not a.startswith("training.max_steps")]
    data = [f"data.train_files={tmp_path / 't.txt'}", f"data.val_files={tmp_path / 'v.txt'}"]
    run = ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    run.append(f"--max-restarts={restarts}")
    cmd = [sys.executable, *run, "-m", "bitnet_training", "train", *args, *data]
    cmd += [f"training.max_steps={STEPS}", f"training.output_dir={out}"]
    log = open(tmp_path / f"{name}.log", "w+b")  # noqa: SIM115 (closed with the test's tmp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    agent.log = log
    return agent, out


def wait(agent, timeout=240) -> str:
    try:
        agent.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish within {timeout} s: {output(agent)}")
    assert agent.returncode == 0, output(agent)
    return output(agent, tail=10**7)


def final(out):
    latest = (out / "latest").read_text().strip()
    assert latest == f"checkpoint-{STEPS:08d}"
    return load_file(str(out / latest / "model.safetensors"))


def records(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keep = ("kind", "step", "loss", "grad_norm", "lr", "tokens_seen", "perplexity")
    return [{k: r.get(k) for k in keep} for r in rows]


def test_a_killed_worker_is_restarted_and_the_run_resumes_to_the_uninterrupted_result(tmp_path):
    write_text(tmp_path)
    agent, out = launch(tmp_path, "crash", restarts=1)
    deadline = time.monotonic() + 180
    while not (out / "latest").is_file():  # the first checkpoint (step 3)
        assert agent.poll() is None, output(agent)
        assert time.monotonic() < deadline, output(agent)
        time.sleep(0.1)
    os.kill(workers(agent.pid)[1], signal.SIGKILL)
    err = wait(agent)
    assert "torchrun restart 1: resuming from" in err
    reference, ref_out = launch(tmp_path, "whole", restarts=0)
    wait(reference)
    ours, theirs = final(out), final(ref_out)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].equal(theirs[k]), k
    assert records(out) == records(ref_out)  # each step once, with the same losses


def test_restart_plan_takes_over_only_this_jobs_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_plan(str(tmp_path), None, False) == (None, False, None)  # first attempt
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restart_plan(str(tmp_path), None, False) == (None, False, None)  # not ours
    (tmp_path / JOB_FILE).write_text("job-0\n")
    assert restart_plan(str(tmp_path), None, False) == (None, False, None)  # another job's
    (tmp_path / JOB_FILE).write_text("job-1\n")
    resume, overwrite, note = restart_plan(str(tmp_path), None, False)
    assert (resume, overwrite) == (None, True) and "starting again" in note
    (tmp_path / "checkpoint-00000003").mkdir()
    (tmp_path / "latest").write_text("checkpoint-00000003\n")
    resume, overwrite, note = restart_plan(str(tmp_path), None, True)
    assert (resume, overwrite) == ("latest", False) and "resuming from" in note
