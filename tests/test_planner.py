"""The memory planner against the real thing: its traced plan of a run (fake tensors) is
within 10% of the peak heap a real CPU training step of that run reaches, over several shapes
and methods; its refusals are one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from bitnet_training.cli import main
from bitnet_training.config import load_config
from bitnet_training.errors import BitNetError
from bitnet_training.planner import Layout, parse_memory, plan
from bitnet_training.quant import gemm

WORKER = os.path.join(os.path.dirname(__file__), "_heap_peak.py")
SMALL = ["training.batch_size=2", "data.seq_len=128"]
CASES = {
    "qat fp32": ["training.mixed_precision=fp32"],
    "qat bf16, 6 layers of 256": [
        "model.hidden_size=256", "model.intermediate_size=768", "model.num_hidden_layers=6",
        "model.num_attention_heads=4", "training.mixed_precision=bf16",
    ],
    "full precision": ["quantize=false", "training.mixed_precision=fp32"],
    "lora": ["peft.method=lora", "training.mixed_precision=fp32"],
    "activation checkpointing": [
        "training.activation_checkpointing=true", "training.mixed_precision=fp32",
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_plan_is_within_10_percent_of_the_measured_peak(case):
    overrides = [*SMALL, *CASES[case]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, WORKER, *overrides], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    measured = run["peak"]
    gemm.load_path_state(run["paths"])  # the run's bf16 GEMMs (each measured)
    planned = plan(load_config(None, overrides), device="cpu").total
    assert abs(planned / measured - 1) <= 0.10, (planned, measured)


def test_layouts_divide_what_they_shard():
    cfg = load_config(None, SMALL)
    one = plan(cfg, device="cpu").components
    fsdp = plan(cfg, Layout(fsdp=2), device="cpu").components
    assert fsdp["optimizer states"] == one["optimizer states"] // 2
    tp = plan(load_config(None, [*SMALL, "model.num_attention_heads=6"]), Layout(tp=2), "cpu")
    assert tp.components["activations"] < one["activations"]
    assert tp.components["weights"] < one["weights"]


def test_plan_from_the_command_line(capsys):
    code = main(["plan", "--shape", "7b", "training.batch_size=8", "data.seq_len=2048",
                 "--device-memory", "24GB"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "32 layers x 4096" in out and "does NOT fit in 24.00 GiB" in out
    assert parse_memory("h100") == 80 * 2**30 and parse_memory("512MB") == 512 * 2**20
    for args, message in [
        (["--device-memory", "lots"], "--device-memory 'lots' is invalid"),
        (["--tp", "3"], "--tp 3 does not divide"),
        (["--shape", "nowhere.json"], "neither 7b / 13b nor a readable config.json"),
        (["--dp", "2", "--fsdp", "2"], "choose one"),
        (["--device", "tpu"], "--device 'tpu' is invalid"),
        (["--device-memory", "0GB"], "a size above zero"),
        (["--pp", "2", "--pp-schedule", "zb"], "--pp-schedule 'zb' is invalid"),
        (["--pp-microbatches", "2"], "describe a pipeline: give --pp"),
        (["distributed.strategy=fsdp"], "plan takes the layout from --dp / --fsdp"),
        (["--pp", "2", "--tp", "2"], "not combined with data or tensor parallelism"),
        (["--pp", "2", "model.tie_word_embeddings=true"], "tied embeddings"),
    ]:
        assert main(["plan", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(BitNetError, match="layer per stage"):
        plan(load_config(None, ["model.num_hidden_layers=1"]), Layout(pp=2))


def test_the_cpu_runtime_overhead_follows_the_cpu_family(monkeypatch):
    """Measured: 11-21 MiB on a Xeon with AMX, -1 to 11 MiB on an EPYC without (oneDNN /
    MKL buffers); the plan adds the constant of the CPU it runs on."""
    from bitnet_training import planner

    cfg = load_config(None, SMALL)
    totals = {}
    for amx in (True, False):
        monkeypatch.setattr(planner, "_has_amx", lambda amx=amx: amx)
        p = plan(cfg, device="cpu")
        totals[amx] = p.total
        assert p.components["runtime overhead"] == planner.runtime_overhead("cpu")
    assert totals[True] - totals[False] == planner.RUNTIME["cpu"] - planner.RUNTIME_CPU_WITHOUT_AMX
    assert plan(cfg).components["runtime overhead"] == planner.RUNTIME["cuda"]
