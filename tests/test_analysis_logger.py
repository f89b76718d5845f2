"""SpectrumLogger and the log format: round trip, crash tolerance, resume, optimizer ranks."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import adarank
from adarank.analysis import LogError, SpectrumLogger, load_log, metrics


class TinyNet(nn.Module):
    """Embedding, attention-style projections, an MLP and a conv: every kind of tracked weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 8))
        self.conv = nn.Conv1d(8, 6, kernel_size=3, padding=1)
        self.lm_head = nn.Linear(6, 11)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # B, T, 8
        x = x + self.v_proj(torch.tanh(self.q_proj(x)))
        x = x + self.mlp(x)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(x)


TRACKED = ["q_proj.weight", "v_proj.weight", "mlp.0.weight", "mlp.2.weight", "conv.weight"]


def _train(model, optimizer, logger, steps, *, grads=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        tokens = torch.randint(11, (4, 7), generator=generator)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1))
        loss.backward()
        if grads is not None:
            grads[step] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        if logger is not None:
            logger.record(step, loss=loss)
        optimizer.step()
        optimizer.zero_grad()


def test_logger_round_trip_matches_float64_reference(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    path = tmp_path / "run.jsonl"
    grads: dict[int, dict[str, torch.Tensor]] = {}
    with SpectrumLogger(model, path, every=2, top_k=5, optimizer=optimizer) as logger:
        assert logger.layer_names == TRACKED  # embed and lm_head excluded, conv as a matrix
        _train(model, optimizer, logger, 5, grads=grads)

    log = load_log(path)
    np.testing.assert_array_equal(log.steps, [0, 2, 4])
    assert log.layer_names == TRACKED
    assert np.all(np.isfinite(log.scalars["loss"]))
    for row, step in enumerate(log.steps):
        for name in TRACKED:
            G = grads[step][name].double().reshape(grads[step][name].shape[0], -1).numpy()
            s = np.linalg.svd(G, compute_uv=False)
            layer = log.layers[name]
            # float32 SVD and 7 logged digits: agreement to 1e-5 of σ_1.
            np.testing.assert_allclose(layer["sv"][row, : len(s[:5])], s[:5], atol=1e-5 * s[0])
            assert layer["fro_norm"][row] == pytest.approx(np.linalg.norm(G), rel=1e-6)
            assert layer["stable_rank"][row] == pytest.approx(
                np.linalg.norm(G) ** 2 / np.linalg.norm(G, 2) ** 2, rel=1e-5
            )
            p = s / s.sum()
            assert layer["effective_rank"][row] == pytest.approx(
                math.exp(scipy.stats.entropy(p)), rel=1e-5
            )
            for eta in (0.9, 0.95, 0.99):
                assert layer[f"energy_rank_{eta:g}"][row] == metrics.energy_rank(s, eta)
    assert log.layers["conv.weight"]["sv"].shape == (3, 5)


def test_header_describes_model_optimizer_and_versions(tmp_path):
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    SpectrumLogger(model, tmp_path / "h.jsonl", optimizer=optimizer, meta={"data": "toy"}).close()
    header = load_log(tmp_path / "h.jsonl").header
    assert header["model"]["class"] == "TinyNet"
    assert header["model"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    layers = {layer["name"]: layer for layer in header["layers"]}
    assert layers["conv.weight"]["shape"] == [6, 8, 3]
    assert layers["conv.weight"]["matrix_shape"] == [6, 24]
    assert layers["q_proj.weight"]["type"] == "q"
    assert header["optimizer"]["class"] == "AdamW"
    assert header["optimizer"]["groups"][0]["lr"] == 3e-3
    assert header["optimizer"]["groups"][0]["weight_decay"] == 0.1
    assert header["versions"]["torch"] == torch.__version__
    assert header["settings"]["every"] == 50
    assert header["meta"] == {"data": "toy"}


def test_include_patterns_and_callables_select_weights(tmp_path):
    model = TinyNet()
    only_mlp = SpectrumLogger(model, tmp_path / "a.jsonl", include=["mlp.*"])
    assert only_mlp.layer_names == ["mlp.0.weight", "mlp.2.weight"]
    by_substring = SpectrumLogger(model, tmp_path / "b.jsonl", include="proj")
    assert by_substring.layer_names == ["q_proj.weight", "v_proj.weight"]
    everything = SpectrumLogger(model, tmp_path / "c.jsonl", exclude=())
    assert "embed.weight" in everything.layer_names and "lm_head.weight" in everything.layer_names
    square = SpectrumLogger(model, tmp_path / "d.jsonl", include=lambda n, p: p.shape[0] == 8)
    assert square.layer_names == ["q_proj.weight", "v_proj.weight", "mlp.2.weight"]
    for logger in (only_mlp, by_substring, everything, square):
        logger.close()


def test_truncated_last_record_is_skipped_with_warning(tmp_path):
    torch.manual_seed(1)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "crash.jsonl"
    with SpectrumLogger(model, path, every=1, optimizer=optimizer) as logger:
        _train(model, optimizer, logger, 4)
    whole = load_log(path)
    data = path.read_bytes()
    last_line_start = data.rstrip(b"\n").rfind(b"\n") + 1
    middle_of_last_record = last_line_start + (len(data) - last_line_start) // 2
    path.write_bytes(data[:middle_of_last_record])

    with pytest.warns(UserWarning, match="torn last line"):
        torn = load_log(path)
    np.testing.assert_array_equal(torn.steps, [0, 1, 2])
    for name in TRACKED:
        np.testing.assert_array_equal(torn.layers[name]["sv"], whole.layers[name]["sv"][:3])
        np.testing.assert_array_equal(
            torn.layers[name]["energy_rank_0.9"], whole.layers[name]["energy_rank_0.9"][:3]
        )


def test_resumed_run_replaces_re_logged_steps(tmp_path):
    torch.manual_seed(2)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "resume.jsonl"
    with SpectrumLogger(model, path, every=1) as logger:
        _train(model, optimizer, logger, 4)
    with open(path, "ab") as f:
        f.write(b'{"kind":"record","step":4,"lay')  # the crash tore a line
    with SpectrumLogger(model, path, every=1, resume=True) as logger:
        for step in (2, 3, 4, 5):  # restored from a checkpoint at step 2
            _train(model, optimizer, None, 1)
            model.q_proj.weight.grad = torch.full_like(model.q_proj.weight, float(step))
            logger.record(step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torn tail was cut before appending: no warning
        log = load_log(path)
    np.testing.assert_array_equal(log.steps, [0, 1, 2, 3, 4, 5])
    # Steps 2-5 come from the resumed run: a constant gradient c·1 (8×8) has ‖G‖_F = 8c.
    np.testing.assert_allclose(log.layers["q_proj.weight"]["fro_norm"][2:], [16, 24, 32, 40])
    np.testing.assert_array_equal(log.layers["q_proj.weight"]["energy_rank_0.99"][2:], 1)


def test_resume_keeps_a_whole_last_record_that_lacks_its_newline(tmp_path):
    model = TinyNet()
    model.q_proj.weight.grad = torch.ones(8, 8)
    path = tmp_path / "nl.jsonl"
    with SpectrumLogger(model, path, every=1) as logger:
        logger.record(0)
        logger.record(1)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with SpectrumLogger(model, path, every=1, resume=True) as logger:
        logger.record(2)
    np.testing.assert_array_equal(load_log(path).steps, [0, 1, 2])


def test_randomized_path_matches_exact_on_known_spectrum(tmp_path):
    m, n = 96, 80
    # σ_i² = 0.7225^i: energy ranks 8 (η = 0.9), 10 (0.95), 15 (0.99), all beyond top_k = 4;
    # the sketch doubles 4 -> 8 -> 16 to find them.
    s = 0.85 ** np.arange(n)
    U = scipy.stats.ortho_group.rvs(m, random_state=3)[:, :n]
    V = scipy.stats.ortho_group.rvs(n, random_state=4)
    G = (U * s) @ V.T
    model = nn.Linear(n, m, bias=False)
    model.weight.grad = torch.tensor(G, dtype=torch.float32)
    path = tmp_path / "rsvd.jsonl"
    with SpectrumLogger(model, path, top_k=4, exact_max_dim=0) as logger:
        logger.record(0)
    with SpectrumLogger(
        model, tmp_path / "capped.jsonl", top_k=4, exact_max_dim=0, max_probe_rank=8
    ) as capped:
        capped.record(0)
    layer = load_log(path).layers["weight"]
    assert load_log(path).header["layers"][0]["svd"] == "randomized"
    np.testing.assert_allclose(layer["sv"][0], s[:4], rtol=1e-5)
    assert layer["stable_rank"][0] == pytest.approx(np.sum(s**2), rel=1e-5)
    assert [layer[f"energy_rank_{eta:g}"][0] for eta in (0.9, 0.95, 0.99)] == [8, 10, 15]
    assert [metrics.energy_rank(s, eta) for eta in (0.9, 0.95, 0.99)] == [8, 10, 15]
    # With the probe capped at rank 8, ranks beyond 8 are unknown: logged as null, read as NaN.
    capped_layer = load_log(tmp_path / "capped.jsonl").layers["weight"]
    assert capped_layer["energy_rank_0.9"][0] == 8
    assert np.isnan(capped_layer["energy_rank_0.95"][0])
    assert np.isnan(capped_layer["energy_rank_0.99"][0])


def test_adarank_optimizer_ranks_and_captured_energy_are_logged(tmp_path):
    torch.manual_seed(3)
    model = TinyNet()
    optimizer = adarank.AdaRankAdamW(adarank.param_groups(model), lr=1e-2, eta=0.9)
    path = tmp_path / "adarank.jsonl"
    with SpectrumLogger(model, path, every=1, optimizer=optimizer) as logger:
        _train(model, optimizer, logger, 3)
    log = load_log(path)
    ranks = optimizer.ranks()
    lowrank = [name for name in TRACKED if name in ranks]
    assert lowrank == ["q_proj.weight", "v_proj.weight", "mlp.0.weight", "mlp.2.weight"]
    for name in lowrank:
        layer = log.layers[name]
        assert np.isnan(layer["optimizer_rank"][0])  # no subspace before the first step
        assert layer["optimizer_rank"][-1] == ranks[name]
        assert 0 < layer["captured_energy"][-1] <= 1 + 1e-6
        assert layer["refresh_count"][-1] >= 1
    assert "optimizer_rank" not in log.layers["conv.weight"]  # a conv is not projected
    assert log.scalars["state_bytes.total"][-1] == optimizer.state_bytes()["total"]
    assert log.header["optimizer"]["class"] == "AdaRankAdamW"
    assert log.header["optimizer"]["defaults"]["eta"] == 0.9
    assert log.header["optimizer"]["groups"][0]["param_names"][0] == "q_proj.weight"


def test_attach_records_before_each_optimizer_step(tmp_path):
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "hook.jsonl"
    logger = SpectrumLogger(model, path, every=2, optimizer=optimizer)
    handle = logger.attach()
    _train(model, optimizer, None, 5)
    handle.remove()
    logger.close()
    np.testing.assert_array_equal(load_log(path).steps, [0, 2, 4])


def test_nonfinite_and_missing_gradients_do_not_break_a_record(tmp_path):
    model = TinyNet()
    model.q_proj.weight.grad = torch.full((8, 8), float("nan"))
    model.v_proj.weight.grad = torch.zeros(8, 8)
    with SpectrumLogger(model, tmp_path / "nan.jsonl") as logger:
        record = logger.record(0)
    assert set(record["layers"]) == {"q_proj.weight", "v_proj.weight"}  # others have no grad
    log = load_log(tmp_path / "nan.jsonl")
    assert np.isnan(log.layers["q_proj.weight"]["fro_norm"][0])
    assert log.layers["v_proj.weight"]["energy_rank_0.9"][0] == 0
    assert log.layers["mlp.0.weight"] == {}  # tracked, never recorded
    assert np.isnan(log.stack("fro_norm", ["mlp.0.weight"])).all()


def test_records_only_every_k_steps_unless_forced(tmp_path):
    model = TinyNet()
    model.q_proj.weight.grad = torch.randn(8, 8)
    with SpectrumLogger(model, tmp_path / "k.jsonl", every=50) as logger:
        assert logger.record(49) is None
        assert logger.record(50) is not None
        assert logger.record(51, force=True) is not None
    np.testing.assert_array_equal(load_log(tmp_path / "k.jsonl").steps, [50, 51])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"\n\n", "empty"),
        (b"not json at all\n", "not valid JSON"),
        (b'{"kind":"record","step":0,"layers":{}}\n', "not an adarank-spectrum header"),
        (
            b'{"kind":"header","format":"adarank-spectrum","version":1}\n{"kind":"rec\n'
            b'{"kind":"record","step":1,"layers":{}}\n',
            "line 2 is not valid JSON",
        ),
        (
            b'{"kind":"header","format":"adarank-spectrum","version":1}\n'
            b'{"kind":"record","step":"x","layers":{}}\n',
            "malformed",
        ),
        (b'{"kind":"header","format":"adarank-spectrum","version":99}\n', "newer"),
    ],
)
def test_bad_logs_raise_log_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LogError, match=message):
        load_log(path)


def test_log_is_strict_json_lines(tmp_path):
    model = TinyNet()
    model.q_proj.weight.grad = torch.full((8, 8), float("inf"))
    with SpectrumLogger(model, tmp_path / "strict.jsonl") as logger:
        logger.record(0)
    for line in (tmp_path / "strict.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_invalid_settings_raise_value_error(tmp_path):
    model = TinyNet()
    for kwargs in ({"every": 0}, {"top_k": 0}, {"energy_levels": (0.5, 1.2)}):
        with pytest.raises(ValueError):
            SpectrumLogger(model, tmp_path / "x.jsonl", **kwargs)


@pytest.mark.slow
def test_logging_overhead_at_every_50_is_under_5_percent(tmp_path):
    from adarank.analysis.demo import DemoConfig, train

    result = train(DemoConfig(optimizer="adamw", steps=300, every=50), tmp_path / "o.jsonl")
    overhead = result["record_seconds"] / (result["train_seconds"] - result["record_seconds"])
    assert overhead < 0.05


def test_logger_reads_int8_weights_float_gradient(tmp_path):
    # adarank.Int8Linear's weight (an Int8Weight) has an ordinary float .grad; the logger
    # must track and measure it like any other weight.
    import adarank

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    adarank.quantize_linears(model, exclude=())
    opt = adarank.QGaLoreAdamW(adarank.param_groups(model, rank=4))
    path = tmp_path / "int8.jsonl"
    logger = SpectrumLogger(model, path, every=1, optimizer=opt)
    for step in range(2):
        model(torch.randn(4, 16)).square().mean().backward()
        G = model[0].weight.grad.double()
        logger.record(step)
        opt.step()
        opt.zero_grad()
    logger.close()
    log = load_log(path)
    assert log.layer_names == ["0.weight", "1.weight"]
    expected = float(torch.linalg.matrix_norm(G))
    assert log.layers["0.weight"]["fro_norm"][-1] == pytest.approx(expected, rel=1e-5)


def test_record_without_any_gradient_warns(tmp_path):
    model = TinyNet()  # no backward yet: every .grad is None
    with SpectrumLogger(model, tmp_path / "none.jsonl") as logger:
        with pytest.warns(UserWarning, match="none of the 5 tracked weights has a gradient"):
            record = logger.record(0)
    assert record["layers"] == {}


def _layerwise_pair(seed=0):
    """A model trained layer-wise and its twin trained normally, both AdaRankAdamW (exact SVD,
    so the per-parameter optimizers' sketches cannot differ from the single optimizer's)."""
    from adarank.layerwise import layerwise

    def factory(groups):
        return adarank.AdaRankAdamW(groups, lr=1e-2, eta=0.9, backend="exact", update_gap=2)

    torch.manual_seed(seed)
    model = TinyNet()
    twin = TinyNet()
    twin.load_state_dict(model.state_dict())
    lw = layerwise(model, factory, groups=adarank.param_groups(model))
    return model, lw, twin, factory(adarank.param_groups(twin))


def _train_layerwise(model, lw, logger, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(11, (4, 7), generator=generator)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1))
        loss.backward()
        if logger is not None:
            logger.record(lw.steps, loss=loss)
        lw.step()


def test_layerwise_logger_records_what_the_normal_optimizer_logger_records(tmp_path):
    # Layer-wise steps see the same gradients and give the same parameters as the normal
    # step (tests/test_layerwise.py), so both logs must agree: to the log's 7 significant
    # digits for the spectra, exactly for the ranks and refresh counts.
    model, lw, twin, optimizer = _layerwise_pair()
    with SpectrumLogger(model, tmp_path / "lw.jsonl", every=2, optimizer=lw) as logger:
        _train_layerwise(model, lw, logger, 5)
    with SpectrumLogger(twin, tmp_path / "normal.jsonl", every=2, optimizer=optimizer) as logger:
        _train(twin, optimizer, logger, 5)
    layerwise_log, normal = load_log(tmp_path / "lw.jsonl"), load_log(tmp_path / "normal.jsonl")
    np.testing.assert_array_equal(layerwise_log.steps, [0, 2, 4])
    assert layerwise_log.layer_names == normal.layer_names == TRACKED
    for name in TRACKED:
        for quantity in ("fro_norm", "stable_rank", "sv", "loss"):
            if quantity == "loss":
                got, want = layerwise_log.scalars["loss"], normal.scalars["loss"]
            else:
                got, want = layerwise_log.layers[name][quantity], normal.layers[name][quantity]
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{name} {quantity}")
        for quantity in ("optimizer_rank", "refresh_count", "energy_rank_0.9"):
            if quantity in normal.layers[name]:
                np.testing.assert_array_equal(
                    layerwise_log.layers[name][quantity], normal.layers[name][quantity]
                )
    assert "optimizer_rank" in layerwise_log.layers["q_proj.weight"]
    assert layerwise_log.scalars["state_bytes.total"][-1] == lw.state_bytes()["total"]
    header = layerwise_log.header["optimizer"]
    assert header["class"] == "LayerwiseOptimizer" and header["inner_class"] == "AdaRankAdamW"
    assert header["defaults"]["eta"] == 0.9


def test_layerwise_attach_records_on_the_optimizers_steps(tmp_path):
    model, lw, _, _ = _layerwise_pair()
    logger = SpectrumLogger(model, tmp_path / "attach.jsonl", every=2, optimizer=lw)
    with pytest.raises(ValueError, match="start_step=3"):
        logger.attach(start_step=3)
    handle = logger.attach()
    _train_layerwise(model, lw, None, 5)
    handle.remove()
    logger.close()
    log = load_log(tmp_path / "attach.jsonl")
    np.testing.assert_array_equal(log.steps, [0, 2, 4])
    assert all(np.isfinite(log.layers[name]["fro_norm"]).all() for name in TRACKED)


def test_layerwise_without_the_optimizer_or_off_its_steps_is_an_error(tmp_path):
    model, lw, _, _ = _layerwise_pair()
    blind = SpectrumLogger(model, tmp_path / "blind.jsonl", every=1)
    logger = SpectrumLogger(model, tmp_path / "lw.jsonl", every=1, optimizer=lw)
    tokens = torch.randint(11, (4, 7))
    model(tokens).square().mean().backward()
    with pytest.raises(ValueError, match="pass optimizer=<the LayerwiseOptimizer>"):
        blind.record(0)
    with pytest.raises(ValueError, match="none were measured for step 7"):
        logger.record(7)
    assert set(logger.record(0)["layers"]) == set(TRACKED)
    lw.step()
    with pytest.raises(ValueError, match="none were measured for step 3"):
        logger.record(3, force=True)
    blind.close()
    logger.close()
