import json

import pytest
import torch

from bitnet_training import BitLinear, ConfigError, QATConfig
from bitnet_training.nn import TernaryDiagnostics
from bitnet_training.train import Callback, Trainer, TrainingConfig


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = BitLinear(4, 2, bias=False)
        self.b = BitLinear(4, 4, bias=False)


def test_flip_rate_counted_on_a_hand_made_sequence():
    net = Net()
    diag = TernaryDiagnostics()
    diag.setup(type("T", (), {"model": net})())
    # Ternary absmean: gamma = mean|W|; codes round(W / gamma) clipped to [-1, 1].
    seq = [
        [[1.0, -1.0, 0.0, 0.0], [2.0, -2.0, 0.1, -0.1]],  # gamma 0.775: codes 1 -1 0 0 | 1 -1 0 0
        [[1.0, 1.0, 0.0, 0.0], [2.0, -2.0, 0.1, -0.1]],  # one code flips (-1 -> +1)
        [[0.0, 1.0, 1.0, 0.0], [2.0, -2.0, 0.1, -0.1]],  # two more flip (a[0] 1->0, a[2] 0->1)
    ]
    b = torch.tensor([[1.0, 0.0, -1.0, 0.0]] * 4)
    rates, zeros = [], []
    for w in seq:
        with torch.no_grad():
            net.a.weight.copy_(torch.tensor(w))
            net.b.weight.copy_(b)
        m = diag.measure()
        rates.append(m.get("flip_rate"))
        zeros.append(m["w_zero"])
    assert rates[0] is None  # nothing to compare with yet
    assert rates[1:] == [pytest.approx(1 / 24), pytest.approx(2 / 24)]  # 8 + 16 weights
    assert zeros[0] == pytest.approx((4 + 8) / 24)
    assert diag.measure()["flip_rate/a"] == 0.0


def test_diagnostics_fractions_and_error():
    torch.manual_seed(0)
    layer = BitLinear(256, 128, bias=False)
    net = torch.nn.Sequential(layer)
    diag = TernaryDiagnostics()
    diag.setup(type("T", (), {"model": net})())
    m = diag.measure()
    assert m["w_neg"] + m["w_zero"] + m["w_pos"] == pytest.approx(1.0)
    # nn.Linear's init is uniform on (-a, a): gamma = mean|W| = a/2, and a weight rounds to 0
    # when |w| < gamma/2 = a/4, so a quarter are zero and the rest split evenly.
    assert m["w_zero"] == pytest.approx(0.25, abs=0.01)
    assert m["w_neg"] == pytest.approx(0.375, abs=0.01)
    w = layer.weight.detach()
    q = layer.quantized_weight()
    err = (w - q.codes * q.scale).norm() / w.norm()
    assert m["quant_error"] == pytest.approx(err.item(), rel=1e-5)
    assert m["quant_error/0"] == m["quant_error"]


class Snap(Callback):
    def __init__(self):
        self.lams = []

    def on_step_end(self, trainer):
        self.lams.append(trainer.model.model.layers[0].mlp.up_proj.weight_blend)


def test_resume_mid_schedule_is_exact(tmp_path, micro_model, token_windows):
    # quantize_model(model, QATConfig(schedule...)) then a plain Trainer: no callback is
    # passed, the quantized layers declare their step clock (on main before the recipe
    # issue the schedule was silently ignored here and lambda stayed 1 from step 0).
    qat = QATConfig(
        weight_schedule={"shape": "cosine", "start_step": 1, "end_step": 7},
        activation_schedule={"end_step": 4},
        weight_bit_stages=[(0, 8), (5, 1.58)],
        quant_noise=0.5,
    )
    data = token_windows(20, 16)
    kw = dict(max_steps=8, batch_size=2, save_every=4, log_every=1, mixed_precision="fp32")

    def cfg(name):
        return TrainingConfig(output_dir=str(tmp_path / name), **kw)

    snap = Snap()
    full = Trainer(micro_model(qat, seed=0), cfg("full"), data, callbacks=[snap]).train()
    lams = snap.lams
    assert lams[0] == 0.0 and lams[-1] == 1.0 and 0 < lams[3] < 1
    logged = [h["qat_weight_bits"] for h in full.history if h["kind"] == "train"]
    assert logged == [8] * 5 + [1.58] * 3

    class Stop(Callback):
        def on_step_end(self, trainer):
            trainer.state.should_stop = trainer.state.step == 4

    part = Trainer(micro_model(qat, seed=0), cfg("part"), data, callbacks=[Stop()]).train()
    rest = Trainer(micro_model(qat, seed=9), cfg("part"), data)
    r2 = rest.train(resume_from="latest")
    losses = [h["loss"] for r in (part, r2) for h in r.history if h["kind"] == "train"]
    assert losses == [h["loss"] for h in full.history if h["kind"] == "train"]
    saved = json.loads(
        (tmp_path / "part" / "checkpoint-00000004" / "trainer_state.json").read_text()
    )
    assert saved["callbacks"]["QATControl"]["step"] == 4
    assert saved["callbacks"]["QATControl"]["qat_weight_bits"] == 8


def test_activation_clip_rate_in_diagnostics():
    cfg = QATConfig(activation_observer="minmax", calibration_samples=1)
    layer = BitLinear(4, 2, bias=False, config=cfg)
    diag = TernaryDiagnostics()
    diag.setup(type("T", (), {"model": torch.nn.Sequential(layer)})())
    layer(torch.full((1, 4), 0.5))  # calibrates: range [0, 0.5], symmetric step 0.5 / 127
    assert diag.clipping() == {}  # not tracked in this step
    layer.track_clipping = True
    layer(torch.tensor([[0.1, 0.2, 5.0, -5.0]]))
    assert diag.clipping() == {"act_clip_rate/0": 0.5, "act_clip_rate": 0.5}


def test_warns_when_training_ends_before_quantization_is_complete(
    tmp_path, micro_model, token_windows, caplog
):
    qat = QATConfig(weight_schedule={"end_step": 100})
    cfg = TrainingConfig(
        output_dir=str(tmp_path), batch_size=2, max_steps=2, mixed_precision="fp32"
    )
    with caplog.at_level("WARNING"):
        Trainer(micro_model(qat), cfg, token_windows()).train()
    assert "not fully quantized" in caplog.text


def test_linear_weight_decay_groups_come_from_the_quantized_model(micro_model):
    from bitnet_training.optim import OptimizerConfig, build_optimizer

    model = micro_model(QATConfig(weight_decay_on="linear"))
    opt = build_optimizer(model, OptimizerConfig(name="sgd", weight_decay=0.1), 1e-3)
    assert isinstance(opt, torch.optim.SGD)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == linear and "lm_head.weight" in decayed
    assert "model.embed_tokens.weight" in kept
    assert all("norm" in n for n in kept - {"model.embed_tokens.weight"})
    # The default (matrices) decays the embedding too.
    model = micro_model()
    plain = build_optimizer(model, OptimizerConfig(weight_decay=0.1), 1e-3)
    assert any(p is model.model.embed_tokens.weight for p in plain.param_groups[0]["params"])


def test_latent_clip_bounds_weights_by_the_layer_scale_without_wiring(tmp_path):
    torch.manual_seed(0)
    layer = BitLinear(16, 8, bias=False, config=QATConfig(latent_clip=2.0))
    with torch.no_grad():
        layer.weight[0, 0] = 5.0  # an outlier far beyond the ternary threshold
    model = torch.nn.Sequential(layer)
    gamma = layer.weight.detach().abs().mean().item()
    cfg = TrainingConfig(
        learning_rate=1e-9,
        max_steps=1,
        batch_size=2,
        output_dir=str(tmp_path),
        device="cpu",
        mixed_precision="fp32",
        save_total_limit=None,
    )
    data = [{"x": torch.randn(16)} for _ in range(4)]

    def loss_fn(m, batch):
        return m(batch["x"]).square().mean()

    Trainer(model, cfg, data, loss_fn=loss_fn, count_targets=lambda b: torch.tensor(2)).train()
    assert layer.weight.abs().max().item() == pytest.approx(2.0 * gamma, rel=1e-3)
    assert layer.weight[0, 0].item() == pytest.approx(2.0 * gamma, rel=1e-3)
    with pytest.raises(ConfigError, match="latent_clip"):
        QATConfig(latent_clip=-1.0)
