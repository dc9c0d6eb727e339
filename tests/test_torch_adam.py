"""torch's AdamW inside megatron-core's optimizers switched to its fused kernel (megatron_ext.training.torch_adam)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from megatron_ext.training import optimizer_checkpoint, torch_adam


def params(seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), ()]  # a matrix, a vector, a 0-d WeSaR gate
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(device)) for shape in shapes]


def adam(parameters: list[torch.nn.Parameter], **kwargs) -> torch.optim.AdamW:
    groups = [{"params": parameters[:1], "weight_decay": 0.1}, {"params": parameters[1:], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), **kwargs)


def steps(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], first: int, last: int) -> None:
    for step in range(first, last):
        g = torch.Generator().manual_seed(100 + step)
        for p in parameters:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def megatron_like(optimizer: torch.optim.Optimizer) -> SimpleNamespace:
    """The attribute of megatron-core's Float16/FP32/Distributed optimizers that holds torch's."""
    return SimpleNamespace(optimizer=optimizer, init_state_fn=None)


def test_fused_updates_equal_torch_s_default_adamw():
    reference, fused = params(), params()
    plain = adam(reference)
    switched = adam(fused)
    assert torch_adam.fuse(megatron_like(switched)) == 1
    assert all(g["fused"] and not g["foreach"] for g in switched.param_groups) and switched.defaults["fused"]
    steps(plain, reference, 0, 5)
    steps(switched, fused, 0, 5)
    for a, b, initial in zip(reference, fused, params()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert not torch.equal(b, initial)  # it did update


def test_chained_optimizers_are_unwrapped_and_other_optimizers_left_alone():
    first, second = adam(params(1)), adam(params(2))
    chained = SimpleNamespace(chained_optimizers=[megatron_like(first), megatron_like(second)])
    assert torch_adam.fuse(chained) == 2
    assert first.param_groups[0]["fused"] and second.param_groups[1]["fused"]
    sgd = torch.optim.SGD(params(), lr=0.1)
    assert torch_adam.fuse(megatron_like(sgd)) == 0
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]


def fused_adam(parameters: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    optimizer = adam(parameters)
    torch_adam.fuse(megatron_like(optimizer))
    return optimizer


def resumed_from(saved: dict, start: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Parameters after loading ``saved`` (taken after 3 updates of ``start``) into a fused
    AdamW, fusing again as after a checkpoint load, and 3 more updates."""
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in start]
    optimizer = fused_adam(resumed)
    optimizer.load_state_dict(copy.deepcopy(saved))  # torch takes the saved groups' settings
    torch_adam.fuse(megatron_like(optimizer))
    assert all(g["fused"] and not g["foreach"] for g in optimizer.param_groups)
    assert all(optimizer.state[p]["step"].dtype == torch.float32 and float(optimizer.state[p]["step"]) == 3.0
               for p in resumed)
    steps(optimizer, resumed, 3, 6)
    return resumed


def test_fused_state_resumes_exactly_and_unfused_state_resumes_fused():
    """Saved after 3 updates and resumed for 3: the uninterrupted fused run exactly; from
    state of torch's unfused AdamW (steps on the host, ``fused`` off in its saved groups),
    the same within the two kernels' rounding."""
    whole = params()
    steps(fused_adam(whole), whole, 0, 6)
    for make, tolerance in ((fused_adam, 0.0), (adam, 1e-6)):
        half = params()
        optimizer = make(half)
        steps(optimizer, half, 0, 3)
        for a, b in zip(whole, resumed_from(optimizer.state_dict(), half)):
            torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


def test_steps_move_to_the_parameters_device_and_new_ones_are_made_there():
    """The fused kernel reads ``step`` on the parameter's device (the meta device stands in
    for a GPU here); the host is where the other kernels keep it."""
    on_device = params(device="meta")
    optimizer = adam(on_device)
    for p in on_device:
        optimizer.state[p] = {"step": torch.tensor(4.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    torch_adam.fuse(megatron_like(optimizer))
    assert all(optimizer.state[p]["step"].device.type == "meta" for p in on_device)
    group = optimizer.param_groups[0]
    assert torch_adam.step_tensor(group, on_device[0], 2.0).device.type == "meta"
    assert torch_adam.step_tensor({**group, "fused": False}, on_device[0], 2.0).device.type == "cpu"


def test_state_allocated_before_a_save_has_its_step_where_the_kernel_reads_it():
    """optimizer_checkpoint.allocate_state (before the first update) under the fused kernel."""
    on_device = params(device="meta")
    optimizer = adam(on_device)
    torch_adam.fuse(megatron_like(optimizer))

    def zero_moments(opt, config):
        for p in on_device:
            opt.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    optimizer_checkpoint.allocate_state(SimpleNamespace(optimizer=optimizer, init_state_fn=zero_moments, config=None))
    assert all(optimizer.state[p]["step"].device.type == "meta" for p in on_device)
