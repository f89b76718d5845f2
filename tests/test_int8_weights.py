"""INT8 weights (Int8Linear) through the tools of the ecosystem: their gradient is an ordinary
``.grad`` that zero_grad, GradScaler, clipping, parameter filters and the HF Trainer all see.

References are float64 copies of the model holding the dequantised weights; gradients agree
with them to float32 rounding (rtol 1e-5).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import adarank
from adarank.quant import Int8Linear, Int8Weight, is_int8_weight, requantize_

RTOL = 1e-5  # float32 gradients against float64 ones on the same (dequantised) weights


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))
    assert adarank.quantize_linears(model, exclude=(), group_size=32) == ["0", "2"]
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=gen), torch.randn(16, 6, generator=gen)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return (model(x) - y).square().mean()


def float64_twin(model: nn.Sequential) -> nn.Sequential:
    """The same network in float64, its weights the INT8 ones dequantised."""
    twin = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6)).double()
    with torch.no_grad():
        for i in (0, 2):
            twin[i].weight.copy_(model[i].weight.dequantized())
            twin[i].bias.copy_(model[i].bias)
    return twin


def reference_grads(model: nn.Sequential, step: int) -> dict[str, torch.Tensor]:
    twin = float64_twin(model)
    x, y = batch(step)
    (twin(x.double()) - y.double()).square().mean().backward()
    return {name: p.grad for name, p in twin.named_parameters()}


def int8_weights(model: nn.Module) -> list[Int8Weight]:
    return [p for p in model.parameters() if is_int8_weight(p)]


def qgalore(params, **kwargs) -> adarank.QGaLoreAdamW:
    return adarank.QGaLoreAdamW(params, lr=1e-2, **kwargs)


# ----------------------------------------------------------------- the gradient itself


def test_model_zero_grad_clears_int8_gradients_so_nothing_accumulates():
    # What the HF Trainer calls between steps is model.zero_grad(), not the optimizer's.
    model = mlp()
    opt = qgalore(adarank.param_groups(model, rank=4))
    for step in range(3):
        expected = reference_grads(model, step)
        loss_of(model, step).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.double(), expected[name], rtol=RTOL, atol=1e-7)
        opt.step()
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())


def test_grad_scaler_unscales_int8_gradients():
    model = mlp()
    opt = qgalore(adarank.param_groups(model, rank=4))
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    expected = reference_grads(model, 0)
    scaler.scale(loss_of(model, 0)).backward()
    torch.testing.assert_close(
        model[0].weight.grad.double(), 4096 * expected["0.weight"], rtol=RTOL, atol=4096 * 1e-7
    )
    scaler.unscale_(opt)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=RTOL, atol=1e-7)
    codes = model[0].weight.codes.clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model[0].weight.codes, codes)  # stepped
    # An inf in an INT8 weight's gradient is found: the step is skipped, the scale halves.
    opt.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    model[2].weight.grad[0, 0] = float("inf")
    codes = [w.codes.clone() for w in int8_weights(model)]
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(w.codes, c) for w, c in zip(int8_weights(model), codes, strict=True))
    assert scaler.get_scale() == scale / 2


@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_norm_counts_and_clips_int8_gradients(foreach):
    model = mlp()
    expected = reference_grads(model, 0)
    norm64 = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()]))
    loss_of(model, 0).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, foreach=foreach)
    assert float(total) == pytest.approx(float(norm64), rel=RTOL)
    coef = 0.1 / (float(norm64) + 1e-6)  # torch's clipping factor
    assert coef < 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), coef * expected[name], rtol=RTOL, atol=1e-8)


def test_requires_grad_filters_keep_int8_weights_and_train_them():
    model = mlp()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.weight", "0.bias", "2.weight", "2.bias"]
    opt = qgalore(p for p in model.parameters() if p.requires_grad)
    codes = [w.codes.clone() for w in int8_weights(model)]
    loss_of(model, 0).backward()
    opt.step()
    assert all(not torch.equal(w.codes, c) for w, c in zip(int8_weights(model), codes, strict=True))


def test_float_optimizer_writing_an_int8_weight_is_refused():
    model = mlp()
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="would write into an INT8 weight.*requantize_"):
        torch.optim.SGD(model.parameters(), lr=0.1).step()


def test_int8_weight_reads_as_its_float_weight():
    model = mlp()
    w = model[0].weight
    W = w.dequantized()
    x = torch.randn(3, 12)
    assert torch.equal(nn.functional.linear(x, w), nn.functional.linear(x, W))
    assert torch.equal(w.t(), W.t()) and type(w.t()) is torch.Tensor
    assert torch.equal(w.norm(), W.norm())
    like = torch.zeros_like(w)
    assert type(like) is torch.Tensor and like.shape == w.shape and like.dtype == w.dtype
    # copy_ stores a float weight with round-to-nearest (within half a scale).
    target = torch.randn(24, 12)
    with torch.no_grad():
        w.copy_(target)
    err = (w.dequantized() - target).abs().reshape(-1, 32)
    assert bool((err <= w.scale[:, None] / 2 + 1e-6).all())


def test_stochastic_write_back_is_reproducible_and_unbiased():
    w = mlp()[0].weight
    W = w.dequantized() + 0.3 * w.scale.repeat_interleave(32).view(24, 12)  # 0.3 of a step
    results = []
    for _ in range(2):
        requantize_(w, W, generator=torch.Generator().manual_seed(5))
        results.append(w.codes.clone())
    assert torch.equal(*results)
    with pytest.raises(ValueError, match=r"shape \(12, 24\)"):
        requantize_(w, W.T)


# ------------------------------------------------------------------- memory and state


def test_int8_weight_holds_one_byte_per_weight_plus_group_scales():
    layer = Int8Linear.from_linear(nn.Linear(1024, 512), group_size=256)
    w = layer.weight
    assert w.stored_bytes() == 1024 * 512 + 8 * (1024 * 512 // 256)
    assert w.stored_bytes() / w.numel() == 1 + 8 / 256
    with pytest.raises(RuntimeError):
        w.untyped_storage().data_ptr()  # the wrapper itself holds no float copy
    held = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert held == w.stored_bytes() + 512 * 4  # plus the float32 bias


def test_resume_from_weights_only_checkpoint_is_bit_identical():
    model = mlp()
    twin = copy.deepcopy(model)
    options = dict(rank=4, update_proj_gap=3)
    opt = qgalore(adarank.param_groups(model, **options))

    def run(net, optimizer, steps):
        for step in steps:
            loss_of(net, step).backward()
            optimizer.step()
            net.zero_grad()

    run(model, opt, range(4))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, range(4, 9))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["model"]["0.weight"].dtype == torch.int8
    twin.load_state_dict(saved["model"])
    resumed = qgalore(adarank.param_groups(twin, **options))
    resumed.load_state_dict(saved["opt"])
    run(twin, resumed, range(4, 9))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------ HF Trainer


def tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)  # built from a config: nothing downloaded
    quantized = adarank.quantize_linears(model, group_size=64)
    assert len(quantized) == 7  # q, k, v, o, gate, up, down
    return model


def test_hf_trainer_trains_int8_weights_as_a_hand_loop_does(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from torch.utils.data import SequentialSampler

    steps, lr, max_norm = 10, 1e-2, 1.0
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids.clone()}
        for ids in torch.randint(0, 64, (4 * steps, 12), generator=gen)
    ]
    model = tiny_llama()
    twin = copy.deepcopy(model)
    start = {n: p.codes.clone() for n, p in model.named_parameters() if is_int8_weight(p)}

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):  # the hand loop's batch order
            return SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=max_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=data,
        optimizer_cls_and_kwargs=(adarank.QGaLoreAdamW, {"lr": lr}),
    )
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]

    # The hand loop: the Trainer's two param groups (decay / no decay), its loss
    # normalisation (num_items_in_batch: the shifted labels), clipping, step, zero_grad.
    decay = set(trainer.get_decay_parameter_names(twin))
    named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    opt = adarank.QGaLoreAdamW(
        [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.0},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        len(g["params"]) for g in trainer.optimizer.param_groups
    )
    norms = []
    twin.train()
    for step in range(steps):
        rows = data[4 * step : 4 * step + 4]
        ids = torch.stack([row["input_ids"] for row in rows])
        labels = torch.stack([row["labels"] for row in rows])
        count = labels[..., 1:].ne(-100).sum()
        twin(input_ids=ids, labels=labels, num_items_in_batch=count).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)))
        opt.step()
        twin.zero_grad()

    assert logged == pytest.approx(norms, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if is_int8_weight(p):
            assert not torch.equal(p.codes, start[name]), f"{name} was not trained"
            assert torch.equal(p.codes, q.codes) and torch.equal(p.scale, q.scale), name
        else:
            assert torch.equal(p, q), name
