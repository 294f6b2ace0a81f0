"""The parallel (training) form and the step (exported) form of Hydra must agree."""

import dataclasses

import pytest
import torch

from hydra_edge.config import get_preset, hydra_state_spec
from hydra_edge.errors import UsageError
from hydra_edge.model import build_model
from hydra_edge.model.ssm import ssd_chunk_step, ssd_chunked, ssd_recurrent

CALL_SIZES = [1, 5, 32, 7, 3, 11, 2, 64, 13]


def open_all_gates(model):
    """Zero the controller biases so that SGA and MoE weigh as much as the SSM."""
    for block in model.blocks:
        torch.nn.init.zeros_(block.controller.bias)


def stream(model, idx, sizes=CALL_SIZES):
    """Feed idx (B, T) through model.step in calls of the given sizes, never crossing a chunk boundary."""
    chunk = model.cfg.chunk
    state = model.init_state(idx.shape[0])
    outs, pos, k = [], 0, 0
    while pos < idx.shape[1]:
        n = min(sizes[k % len(sizes)], chunk - pos % chunk, idx.shape[1] - pos)
        logits, state = model.step(idx[:, pos:pos + n], state)
        outs.append(logits)
        pos, k = pos + n, k + 1
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("preset", ["hydra-tiny", "hydra-29m"])
def test_step_matches_parallel_forward(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    open_all_gates(model)
    chunk = model.cfg.chunk
    length = 3 * chunk + chunk // 2 + 3  # three whole chunks and a partial one
    idx = torch.randint(0, model.cfg.vocab_size, (2, length))
    with torch.no_grad():
        full, aux = model(idx)
        stepped, state = stream(model, idx)
    assert stepped.shape == (2, length, model.cfg.vocab_size)
    assert (stepped - full).abs().max().item() < 1e-4
    assert int(state["pos"]) == length
    assert aux.item() > 0  # the MoE router ran on chunks after the first


def test_every_path_contributes_to_logits():
    torch.manual_seed(0)
    model = build_model(get_preset("hydra-tiny")).eval()
    open_all_gates(model)
    idx = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        base, _ = model(idx)
        for path in ("sga", "moe"):
            module = next(getattr(b, path) for b in model.blocks if getattr(b, path) is not None)
            saved = module.out_proj.weight.clone() if path == "sga" else module.w_down.clone()
            target = module.out_proj.weight if path == "sga" else module.w_down
            target.zero_()
            changed, _ = model(idx)
            target.copy_(saved)
            assert (changed - base).abs().max().item() > 1e-4, path
        for module, name in ((model.workspace.out_proj, "workspace"), (model.pkm, "pkm")):
            param = module.weight if name == "workspace" else module.values
            saved = param.clone()
            param.zero_()
            changed, _ = model(idx)
            param.copy_(saved)
            assert (changed - base).abs().max().item() > 1e-4, name


@pytest.mark.parametrize("component", ["sga", "moe", "workspace", "pkm"])
def test_ablated_model_step_matches_parallel(component):
    cfg = dataclasses.replace(get_preset("hydra-tiny"), ablate=(component,))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    open_all_gates(model)
    idx = torch.randint(0, cfg.vocab_size, (1, 3 * cfg.chunk + 5))
    with torch.no_grad():
        full, _ = model(idx)
        stepped, _ = stream(model, idx)
    assert (stepped - full).abs().max().item() < 1e-4


def test_ablation_switches_the_component_off():
    torch.manual_seed(0)
    full = build_model(get_preset("hydra-tiny")).eval()
    idx = torch.randint(0, full.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        for component in ("workspace", "pkm"):
            cfg = dataclasses.replace(full.cfg, ablate=(component,))
            ablated = build_model(cfg).eval()
            ablated.load_state_dict(full.state_dict())
            # zeroing the component's output weights in the full model gives the ablated model's logits
            module = full.workspace.out_proj.weight if component == "workspace" else full.pkm.values
            saved = module.clone()
            module.zero_()
            expected, _ = full(idx)
            module.copy_(saved)
            assert torch.allclose(ablated(idx)[0], expected, atol=1e-6), component
    no_sga = build_model(dataclasses.replace(full.cfg, ablate=("sga", "moe")))
    assert all(b.sga is None and b.moe is None for b in no_sga.blocks)


def test_ablate_rejects_unknown_components():
    with pytest.raises(UsageError, match="cannot ablate 'ssm'; choose from sga, moe, workspace, pkm"):
        dataclasses.replace(get_preset("hydra-tiny"), ablate=("ssm",))


def test_ssd_forms_match_recurrence():
    torch.manual_seed(0)
    b, t, h, p, n = 2, 37, 3, 4, 5
    x, a = torch.randn(b, t, h, p), -torch.rand(b, t, h) * 0.5
    bm, cm = torch.randn(b, t, n), torch.randn(b, t, n)
    y_ref, h_ref = ssd_recurrent(x, a, bm, cm, torch.zeros(b, h, p, n))
    assert (ssd_chunked(x, a, bm, cm, chunk=8) - y_ref).abs().max().item() < 1e-5

    state, ys = torch.zeros(b, h, p, n), []
    for start, end in [(0, 3), (3, 8), (8, 16), (16, 17), (17, 24), (24, 37)]:
        y, state = ssd_chunk_step(x[:, start:end], a[:, start:end], bm[:, start:end], cm[:, start:end], state)
        ys.append(y)
    assert (torch.cat(ys, 1) - y_ref).abs().max().item() < 1e-5
    assert (state - h_ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset", ["hydra-tiny", "hydra-29m"])
def test_state_is_fixed_size_after_10_and_10000_tokens(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    spec = {t.name: t.shape for t in hydra_state_spec(model.cfg, 1)}
    chunk = model.cfg.chunk
    with torch.no_grad():
        _, after_10 = stream(model, torch.randint(0, model.cfg.vocab_size, (1, 10)))
        state = after_10
        idx = torch.randint(0, model.cfg.vocab_size, (1, 10_000))
        start = 10
        while start < 10_000:
            end = min(start + chunk - start % chunk, 10_000)
            _, state = model.step(idx[:, start:end], state)
            start = end
    for name, shape in spec.items():
        assert tuple(after_10[name].shape) == shape, name
        assert tuple(state[name].shape) == shape, name
        assert state[name].dtype == after_10[name].dtype == torch.float32, name
        assert torch.isfinite(state[name]).all(), name
    assert set(state) == set(spec) | {"pos"}
    assert int(state["pos"]) == 10_000


def test_step_rejects_a_call_across_a_chunk_boundary():
    model = build_model(get_preset("hydra-tiny")).eval()
    state = model.init_state(1)
    _, state = model.step(torch.zeros(1, 10, dtype=torch.long), state)
    with pytest.raises(UsageError, match="step got 7 tokens at chunk offset 10; a call takes 1 to 6 tokens"):
        model.step(torch.zeros(1, 7, dtype=torch.long), state)


def test_presets_have_the_documented_sizes():
    hydra = sum(p.numel() for p in build_model(get_preset("hydra-29m")).parameters())
    transformer = sum(p.numel() for p in build_model(get_preset("transformer-29m")).parameters())
    assert 28_000_000 <= hydra <= 30_000_000
    assert abs(transformer - hydra) / hydra <= 0.05


def test_pinned_moe_keeps_the_chosen_experts():
    torch.manual_seed(0)
    model = build_model(get_preset("hydra-tiny")).eval()
    moe = next(b.moe for b in model.blocks if b.moe is not None)
    w_gate = moe.w_gate.detach().clone()
    moe.pin([3, 1])
    assert moe.expert_ids == [1, 3]
    assert moe.n_experts == 2
    assert torch.equal(moe.w_gate.detach(), w_gate[[1, 3]])
    with pytest.raises(ValueError, match="pinning keeps 1 experts but top_k is 2"):
        moe.pin([0])
